"""Stochastic variational inference for a model/guide pair on minibatches of cells.

The loop is Pyro's :class:`~pyro.infer.SVI` with Adam, plus what single-cell users expect:
a validation ELBO each epoch, KL warm-up, early stopping, a progress bar, and a guard that
stops on a non-finite loss and restores the last good parameters.

KL warm-up schedule
-------------------
In epoch ``e`` (counting from 0) the ``z`` terms of the ELBO are scaled by
``min(1, e / kl_warmup_epochs)``: a linear ramp from 0 that reaches 1 after
``kl_warmup_epochs`` epochs, as in scvi-tools. The library term is never annealed. The
validation ELBO is always the true ELBO (weight 1). The weight is applied by the Pyro
handler :class:`KLWeight` around the model and the guide, so neither takes it as an
argument: the model is the paper's equations, and any model or guide with sites named
``z`` is annealed the same way (a model may name other sites in ``annealed_sites``).

Inference schemes
-----------------
Any Pyro ELBO trains the model: ``Trace_ELBO`` (default; compiled as ``JitTrace_ELBO`` when
the training engine says so, see :mod:`pyro_scvi.train.engine`), ``TraceMeanField_ELBO``
(analytic KL where Pyro has one, e.g. for the default Normal priors of ``z`` and ``l``),
``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`` (the importance-weighted
bound of Burda et al., 2016) and the JIT variants. Two need care, which :func:`train_svi`
takes:

- ``RenyiELBO`` averages the importance weights of each cell inside a logarithm, so the
  minibatch scale ``num_cells / batch_size`` that makes other ELBOs unbiased would land
  inside that logarithm (weights raised to that power, no longer a bound). Its minibatches
  are therefore not rescaled: each step maximizes the sum over the minibatch's cells of
  their K-sample bounds, and ``train_elbo`` is that sum per cell. The validation column is
  then the same bound.
- JIT ELBOs (``JitTrace_ELBO``, ``JitTraceMeanField_ELBO``) compile the loss on first use:
  positional arguments must be tensors (inputs of the compiled graph) and everything else
  is a keyword, compiled once per distinct value. The KL weight is therefore passed to
  :class:`KLWeight` as a tensor, so warm-up changes it without recompiling (a Python float
  would be frozen into the graph), and the minibatch size as a keyword, so each size gets
  its own graph. A JIT ELBO object keeps the model, guide and parameter names of the run
  it first compiled for (a later run, with its own parameter store, would fail or silently
  train the first model), so each training run needs a new one:
  ``train(elbo=JitTrace_ELBO())``. (In Pyro 1.9 ``JitTraceMeanField_ELBO`` re-traces on
  every step, which is correct but slower than ``TraceMeanField_ELBO``.) Validation uses
  the ELBO's uncompiled ``loss`` in eval mode.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import (
    ELBO,
    SVI,
    JitTrace_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from pyro.optim import PyroOptim
from pyro.poutine.messenger import Messenger
from torch import nn
from tqdm.auto import tqdm

from ..data.counts import CountData
from ..errors import InputError, TrainingError, TrainingInterrupted
from ..model.generative import parameters_held
from ..model.nn import eval_mode
from . import distributed
from .engine import _JIT_ELBOS, Engine


@dataclasses.dataclass
class TrainState:
    """Everything that continues a training run exactly where it stopped.

    Held by :class:`~pyro_scvi.SCVI` between ``train()`` calls and written in checkpoints,
    so that a continued or resumed run draws the same minibatches and random numbers and
    takes the same Adam steps as one that never stopped.

    Attributes
    ----------
    rng
        The minibatch-order stream.
    batches, step, total, seconds
        The epoch in progress when the run stopped inside one: its minibatches, the next
        one to run, the loss summed so far and the seconds spent; ``batches`` is ``None``
        between epochs.
    best, since_best
        Early stopping's best monitored ELBO and epochs since it improved.
    optim
        The optimizer's state: ``{"kind": "fused_adam" | "pyro", "state": ...}``.
    rng_states
        Pyro's random states (torch, numpy's and Python's global) when the run stopped.
    good_state
        Parameters at the end of the last complete epoch, kept while inside an epoch.
    """

    rng: np.random.Generator
    batches: list[np.ndarray] | None = None
    step: int = 0
    total: float = 0.0
    seconds: float = 0.0
    best: float = -math.inf
    since_best: int = 0
    optim: dict | None = None
    rng_states: dict | None = None
    good_state: list[dict] | None = None

    @classmethod
    def new(cls, seed: int | None) -> TrainState:
        """A fresh state whose minibatch order comes from ``seed``."""
        return cls(rng=np.random.default_rng(seed))

    def to_dict(self) -> dict:
        """Plain values for ``torch.save``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["rng"] = self.rng.bit_generator.state
        return out

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        """The inverse of :meth:`to_dict`."""
        values = dict(values)
        rng = np.random.default_rng()
        rng.bit_generator.state = values.pop("rng")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(rng=rng, **{k: v for k, v in values.items() if k in known})


def kl_weight(epoch: int, kl_warmup_epochs: int) -> float:
    """Weight of the ``z`` KL terms in epoch ``epoch`` (see the module docstring).

    Examples
    --------
    >>> [kl_weight(e, 4) for e in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if kl_warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch / kl_warmup_epochs)


class KLWeight(Messenger):
    """Pyro handler: scale the log-densities of the sites ``sites`` by ``weight`` (KL warm-up).

    Applied around both the model and the guide, it scales those sites' terms of the ELBO,
    their KL divergence, by ``weight``. ``poutine.scale`` rejects 0, so a zero weight masks
    the terms out instead. A tensor weight is an input of a compiled (JIT) ELBO and changes
    between calls of one compiled graph, so it cannot choose between mask and scale: 0
    becomes the smallest positive float, whose terms vanish below rounding (``1e-38``
    times a log-density).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     pyro.sample("l", dist.Normal(0.0, 1.0))
    >>> tr = pyro.poutine.trace(KLWeight(0.25)(model)).get_trace()
    >>> tr.nodes["z"]["scale"], tr.nodes["l"]["scale"]
    (0.25, 1.0)
    """

    def __init__(self, weight: float | torch.Tensor, sites: Sequence[str] = ("z",)) -> None:
        super().__init__()
        self.weight, self.sites = weight, frozenset(sites)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["name"] not in self.sites:
            return
        w = self.weight
        if isinstance(w, torch.Tensor):
            msg["scale"] = w.clamp_min(torch.finfo(w.dtype).tiny) * msg["scale"]
        elif w <= 0:
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
        elif w != 1.0:
            msg["scale"] = w * msg["scale"]


class _Annealed:
    """A model or guide called as ``(x, batch_index, cell_index, num_cells, kl_weight)``.

    Runs ``fn(x, batch_index, cell_index, num_cells)`` under :class:`KLWeight`, for the
    sites ``fn.annealed_sites`` names (default ``z``).
    """

    def __init__(self, fn: Callable, sites: Sequence[str] | None = None) -> None:
        self.fn = fn
        self.sites = tuple(sites) if sites is not None else annealed_sites(fn)

    def __call__(self, x, batch_index, cell_index=None, num_cells=None, kl_weight=1.0):
        with KLWeight(kl_weight, self.sites):
            return self.fn(x, batch_index, cell_index, num_cells)


def annealed_sites(fn: Callable) -> tuple[str, ...]:
    """The sites KL warm-up scales for a model or guide: ``fn.annealed_sites``, else ``z``."""
    return tuple(getattr(fn, "annealed_sites", ("z",)))


def scaled_lr(batch_size: int, base_lr: float = 1e-3, base_batch_size: int = 128) -> float:
    """Adam learning rate for ``batch_size`` by the square-root scaling rule.

    Larger minibatches make an epoch cheaper (fewer steps, better use of the CPU's vector
    units) but take fewer, less noisy steps. For Adam, scaling the learning rate with the
    square root of the batch size keeps the training dynamics approximately the same
    (Malladi et al., "On the SDEs and scaling rules for adaptive gradient algorithms",
    NeurIPS 2022), from scVI's defaults of 1e-3 at 128 cells. The trade-off on real data
    is measured by ``benchmarks/batch_size.py``.

    Examples
    --------
    >>> scaled_lr(512)
    0.002
    >>> round(scaled_lr(1024), 5)
    0.00283
    """
    if batch_size < 1 or base_batch_size < 1:
        raise InputError(f"batch sizes must be >= 1, got {batch_size} and {base_batch_size}.")
    return base_lr * math.sqrt(batch_size / base_batch_size)


def default_optim(
    lr: float = 1e-3,
    eps: float = 0.01,
    weight_decay: float = 1e-6,
    groups: list[dict] | None = None,
    named: dict[str, torch.Tensor] | None = None,
) -> PyroOptim:
    """Adam with scvi-tools' settings (``eps=0.01``, ``weight_decay=1e-6``), as a Pyro optim.

    :func:`train_svi` scales ``eps`` and ``weight_decay`` by the number of training cells,
    as for :class:`FusedAdam`. ``groups`` (see :func:`declared_optim_groups`) give their
    parameters their own settings, through Pyro's per-parameter ``optim_args`` callable;
    ``named`` maps parameter-store names to tensors (else the store is searched).
    """
    settings = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
    if not groups:
        return pyro.optim.Adam(settings)
    return pyro.optim.Adam(_PerParamSettings(settings, groups, named))


def declared_optim_groups(*modules) -> list[dict]:
    """Parameters that ``modules`` declare to need their own optimizer settings.

    A module (a guide, a model) may define ``optim_groups()``, returning a list of dicts
    with ``"params"`` (tensors), ``"reason"`` (a sentence for the run's record) and the
    Adam settings that differ from the run's (e.g. ``"eps"``, ``"weight_decay"``);
    e.g. :class:`~pyro_scvi.model.schemes.GlobalsGuide` for ``q``'s parameters of the globals.
    A parameter declared twice keeps its first group.
    """
    out, seen = [], set()
    for module in modules:
        declare = getattr(module, "optim_groups", None)
        if not callable(declare):
            continue
        for group in declare():
            params = [p for p in group["params"] if id(p) not in seen]
            seen.update(id(p) for p in params)
            if params:
                out.append({**group, "params": params})
    return out


def _group_settings(group: dict) -> dict:
    """A declared group's optimizer settings (without its params and reason)."""
    return {k: v for k, v in group.items() if k not in ("params", "reason")}


def describe_optim_groups(settings: dict, groups: list[dict], reason: str) -> dict:
    """The record of a run's optimizer settings and its declared groups (plain values)."""
    return {
        "settings": dict(settings),
        "groups": [
            {
                "n_tensors": len(g["params"]),
                "n_values": int(sum(p.numel() for p in g["params"])),
                "settings": {**settings, **_group_settings(g)},
                "reason": g.get("reason", ""),
            }
            for g in groups
        ],
        "groups_reason": reason,
    }


class _PerParamSettings:
    """Pyro's per-parameter ``optim_args``: a declared group's settings, else the run's.

    ``named`` maps parameter-store names (``"guide$$$loc.rho_weight"``, as
    :func:`~pyro_scvi.model.register_module` registers them) to the tensors; a name not in
    it is looked up in the parameter store.
    """

    def __init__(
        self, settings: dict, groups: list[dict], named: dict[str, torch.Tensor] | None = None
    ) -> None:
        self.settings = settings
        self.groups = groups
        self.named = dict(named or {})

    def for_tensor(self, tensor: torch.Tensor | None) -> dict:
        for group in self.groups:
            if any(p is tensor for p in group["params"]):
                return {**self.settings, **_group_settings(group)}
        return dict(self.settings)

    def for_store_name(self, name: str) -> dict:
        """Settings of the parameter store's parameter ``name`` (unnormalized)."""
        if name in self.named:
            return self.for_tensor(self.named[name])
        store = pyro.get_param_store()
        if name not in store:
            return dict(self.settings)
        return self.for_tensor(store[name].unconstrained())

    def __call__(self, normal_name: str) -> dict:
        from pyro.optim.optim import normalize_param_name

        for name in [*self.named, *pyro.get_param_store().keys()]:
            if normalize_param_name(name) == normal_name:
                return self.for_store_name(name)
        return dict(self.settings)


def _store_names(**modules: nn.Module) -> dict[str, torch.Tensor]:
    """Parameter-store names of the modules' parameters, as ``pyro.module(key, module)``."""
    return {
        f"{key}$$${path}": p
        for key, module in modules.items()
        if isinstance(module, nn.Module)
        for path, p in module.named_parameters()
    }


class FusedAdam:
    """SVI steps with one ``torch.optim.Adam`` over every parameter the ELBO touches.

    ``pyro.optim.Adam`` keeps one torch optimizer per parameter tensor, so a step pays
    Python overhead per tensor: about a quarter of a step's time for scVI's small networks.
    This runs the same update (scvi-tools' settings: ``eps=0.01``, ``weight_decay=1e-6``)
    with a single fused (else multi-tensor) Adam. (:func:`train_svi` scales ``eps`` and
    ``weight_decay`` by the number of training cells, because its loss is a sum over cells.)
    The parameters are the ones Pyro's parameter store hands to the ELBO in the first step,
    exactly those :class:`pyro.infer.SVI` would find. With ``Trace_ELBO`` or
    ``TraceMeanField_ELBO`` later steps skip re-registering pyro_scvi's modules
    (:func:`~pyro_scvi.model.parameters_held`), so a parameter first created after the first
    step would not be optimized. A step whose loss is not finite is not applied.

    Examples
    --------
    >>> import torch, pyro
    >>> from pyro.infer import Trace_ELBO
    >>> from pyro_scvi import ScviGuide, ScviModel, LogNormalLibrary
    >>> model = ScviModel(20, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
    >>> guide = ScviGuide(20, 1)
    >>> pyro.clear_param_store()  # earlier examples' modules of the same names would be used
    >>> x, b = torch.poisson(torch.full((16, 20), 2.0)), torch.zeros(16, dtype=torch.long)
    >>> step = FusedAdam(lr=1e-2)
    >>> losses = [step(Trace_ELBO(), model, guide, x, b) for _ in range(20)]
    >>> losses[-1] < losses[0]
    True
    """

    def __init__(
        self,
        lr: float = 1e-3,
        eps: float = 0.01,
        weight_decay: float = 1e-6,
        groups: list[dict] | None = None,
    ) -> None:
        self.settings = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        #: Declared parameter groups (:func:`declared_optim_groups`): their parameters get
        #: a torch param group of their own, with their settings over ``settings``.
        self.groups = list(groups or [])
        self.optim: torch.optim.Optimizer | None = None
        #: A :class:`~pyro_scvi.train.distributed.DataParallel` group whose ranks' gradients and
        #: losses are averaged before each step (``None``: this process alone).
        self.data_parallel = None
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self._pending: dict | None = None

    def state_dict(self) -> dict | None:
        """Adam's moments and step counts by parameter name (``None`` before a step)."""
        if self.optim is None:
            return self._pending
        return {"names": list(self.names), "adam": self.optim.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        """Continue from :meth:`state_dict`: Adam's moments and step counts carry over.

        The parameters are found in the first step, so the state waits for it. It is
        matched by parameter name (another ELBO may meet the parameters in another
        order); a parameter that is new, or has changed shape, starts afresh. The
        settings (``lr``, ``eps``, ``weight_decay``) stay this object's own.
        """
        self._pending = state
        if self.optim is not None:
            self._load_pending()

    def _load_pending(self) -> None:
        saved, self._pending = self._pending, None
        if saved is None:
            return
        where = {name: i for i, name in enumerate(saved["names"])}
        old = saved["adam"]["state"]
        state = {}
        for i, (name, param) in enumerate(zip(self.names, self.params, strict=True)):
            moments = old.get(where.get(name, -1))
            # the fused kernel does not check shapes: a mismatch must never reach it
            if moments is not None and all(
                not torch.is_tensor(v) or v.dim() == 0 or v.shape == param.shape
                for v in moments.values()
            ):
                state[i] = moments
        current = self.optim.state_dict()
        current["state"] = state
        self.optim.load_state_dict(current)

    def __call__(self, elbo: ELBO, model: Callable, guide: Callable, *args, **kwargs) -> float:
        """Compute the loss and its gradients, then update the parameters; return the loss."""
        if self.data_parallel is None:
            loss = self.loss_and_grads(elbo, model, guide, *args, **kwargs)
        else:
            try:
                loss = self.loss_and_grads(elbo, model, guide, *args, **kwargs)
            except ValueError:
                # (invalid parameter values): every rank must still reach the all-reduce
                if self.optim is None:
                    raise
                loss = float("nan")
            # One order on every rank: the order the first step met the parameters in can
            # differ between processes (a compiled ELBO's follows string hashing, which
            # Python randomizes per process), and the all-reduce adds them up by position.
            order = sorted(range(len(self.names)), key=self.names.__getitem__)
            loss = self.data_parallel.average_gradients([self.params[i] for i in order], loss)
        if math.isfinite(loss):
            self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        return loss

    def loss_and_grads(
        self, elbo: ELBO, model: Callable, guide: Callable, *args, **kwargs
    ) -> float:
        """The loss, with its gradients left in the parameters' ``.grad`` (no update)."""
        plain = type(elbo) in (Trace_ELBO, TraceMeanField_ELBO)
        if self.optim is None:
            with poutine.trace(param_only=True) as capture:
                if plain:
                    # the same computation as the later steps' below, so that a run's
                    # first step (e.g. after resuming) gives the same loss to the last bit
                    surrogate = elbo.differentiable_loss(model, guide, *args, **kwargs)
                    surrogate.backward()
                    loss = float(surrogate.detach())
                else:
                    loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
            named: dict[int, tuple[str, torch.Tensor]] = {}
            for name, site in capture.trace.nodes.items():
                p = site["value"].unconstrained()
                named.setdefault(id(p), (name, p))
            self.names = [name for name, _ in named.values()]
            self.params = [p for _, p in named.values()]
            self.optim = self._make_optim()
            self._load_pending()
        elif plain:
            # The optimizer holds the parameters now, so registering them again is pure
            # cost. Without param sites their loss_and_grads would skip backward, hence
            # differentiable_loss (its value is the loss, its gradient the surrogate's).
            with parameters_held():
                surrogate = elbo.differentiable_loss(model, guide, *args, **kwargs)
            surrogate.backward()
            loss = float(surrogate.detach())
        else:
            # Other ELBOs (JIT ones recompile per minibatch size) must see the param sites.
            loss = elbo.loss_and_grads(model, guide, *args, **kwargs)
        return loss

    def _make_optim(self) -> torch.optim.Optimizer:
        """One Adam; declared groups' parameters in param groups of their own, after the rest.

        ``names`` and ``params`` are reordered to the optimizer's order (its state is
        indexed by it); without declared groups they keep the ELBO's order.
        """
        if not self.groups:
            return _adam(self.params, **self.settings)
        where = {}
        for g, group in enumerate(self.groups):
            for p in group["params"]:
                where.setdefault(id(p), g)
        pairs = list(zip(self.names, self.params, strict=True))
        members: list[list[tuple[str, torch.Tensor]]] = [[] for _ in range(len(self.groups) + 1)]
        for name, p in pairs:
            members[where.get(id(p), -1) + 1].append((name, p))
        param_groups = []
        self.names, self.params = [], []
        for g, pairs_g in enumerate(members):
            if not pairs_g:
                continue
            self.names += [name for name, _ in pairs_g]
            self.params += [p for _, p in pairs_g]
            extra = {} if g == 0 else _group_settings(self.groups[g - 1])
            param_groups.append({"params": [p for _, p in pairs_g], **extra})
        return _adam(param_groups, **self.settings)


def _adam(params: list, **settings) -> torch.optim.Adam:
    """Adam as one fused kernel where torch has it, else the multi-tensor (``foreach``) one."""
    try:
        return torch.optim.Adam(params, fused=True, **settings)
    except (RuntimeError, ValueError, TypeError):  # e.g. an older torch or another device
        return torch.optim.Adam(params, foreach=True, **settings)


def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data: CountData,
    indices: np.ndarray,
    *,
    elbo: ELBO | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """ELBO per cell (nats, higher is better) of ``indices``, networks in eval mode.

    Each minibatch's ``cell_index`` (rows in ``data``) is passed on, for guides with
    per-cell parameters.
    """
    elbo = elbo if elbo is not None else Trace_ELBO()
    total = 0.0
    with torch.no_grad(), eval_mode(model, guide):
        for idx in data.minibatches(indices, batch_size):
            x, b = data.tensors(idx, device)
            total += elbo.loss(model, guide, x, b, torch.as_tensor(idx, device=device))
    return -total / max(len(indices), 1)


def train_svi(
    model: nn.Module,
    guide: nn.Module,
    data: CountData,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    *,
    max_epochs: int,
    batch_size: int = 128,
    optim: PyroOptim | None = None,
    lr: float = 1e-3,
    elbo: ELBO | None = None,
    engine: Engine | str | None = None,
    param_groups: bool = True,
    kl_warmup_epochs: int = 400,
    early_stopping: bool = False,
    patience: int = 45,
    min_delta: float = 0.0,
    device: torch.device | str = "cpu",
    seed: int | None = None,
    progress_bar: bool = True,
    first_epoch: int = 0,
    state: TrainState | None = None,
    checkpoint: Callable[[TrainState, pd.DataFrame], str | None] | None = None,
    checkpoint_every: int = 0,
    stop: Callable[[], int] | None = None,
) -> pd.DataFrame:
    """Train ``model`` and ``guide`` with SVI on minibatches of the cells ``train_idx``.

    Parameters
    ----------
    model, guide
        Pyro model and guide with signature ``(x, batch_index, cell_index, num_cells)``
        (KL warm-up scales their ``z`` sites with :class:`KLWeight`), e.g.
        :class:`~pyro_scvi.model.ScviModel` and :class:`~pyro_scvi.model.guides.ScviGuide`.
    data
        The counts.
    train_idx, val_idx
        Cells to train on and to compute the validation ELBO on (may be empty).
    max_epochs, batch_size
        Passes over ``train_idx`` and cells per minibatch.
    optim, lr
        A Pyro optimizer (run through :class:`pyro.infer.SVI`); by default Adam with
        learning rate ``lr`` and scvi-tools' settings, as :class:`FusedAdam` unless the
        engine says otherwise.
    elbo
        Any Pyro ELBO (default ``Trace_ELBO``, compiled as ``JitTrace_ELBO`` when the
        engine compiles); see the module docstring for ``RenyiELBO`` and the JIT ELBOs.
    engine
        How the run steps (:class:`pyro_scvi.train.engine.Engine`, a preset name such as
        ``"eager"``, or ``None`` to decide); the resolved choice is returned in
        ``history.attrs["engine"]``.
    param_groups
        Give parameters that the guide or model declare through ``optim_groups()``
        (:func:`declared_optim_groups`) their own Adam settings, in a param group of their
        own (``False``: every parameter gets the run's cell-scaled settings). Not applied
        to a Pyro optimizer passed in. The settings, groups and reason are in
        ``history.attrs["optim"]``.
    kl_warmup_epochs
        Length of the KL warm-up ramp (see the module docstring); 0 disables it.
    early_stopping, patience, min_delta
        Stop when the validation ELBO (train ELBO if there is no validation set) has not
        improved by ``min_delta`` for ``patience`` epochs.
    device
        Where to train; ``model`` and ``guide`` must already be there.
    seed
        Seeds minibatch order (Pyro's own RNG is seeded by the caller).
    progress_bar
        Show a tqdm bar with the epoch and ELBOs.
    first_epoch
        Epoch number to start counting from (continuing a previous run's warm-up).
    state
        Where the run starts and what it leaves for the next (:class:`TrainState`,
        updated in place): pass the state a previous call left to continue its minibatch
        stream, random streams and Adam's moments exactly; ``None`` starts afresh from
        ``seed``. A state stopped inside an epoch finishes that epoch first (it counts as
        one of ``max_epochs``).
    checkpoint, checkpoint_every
        ``checkpoint(state, history)`` is called after every ``checkpoint_every``-th epoch
        (0: never) and when the run is interrupted; it writes them somewhere and returns
        where (or ``None``).
    stop
        Polled after every step: a non-zero value (a signal's number) stops the run
        cleanly there, with :class:`TrainingInterrupted`.

    Returns
    -------
    pandas.DataFrame
        One row per epoch: ``epoch``, ``train_elbo`` (per cell, with the epoch's KL weight),
        ``validation_elbo`` (per cell, true ELBO; NaN without validation cells),
        ``kl_weight``, ``seconds`` and ``threads``; ``attrs["engine"]`` is the resolved
        engine (:meth:`pyro_scvi.train.engine.RunEngine.as_dict`). Batch-norm statistics are
        re-estimated at the current weights before each validation pass (from
        :data:`VALIDATION_NORM_CELLS` training cells) and at the end (from all training
        cells; :func:`refresh_batch_norm`).

    Raises
    ------
    TrainingError
        On a non-finite loss, after restoring the parameters of the last completed epoch
        and re-estimating batch norm's statistics for them.
    TrainingInterrupted
        When ``stop`` asked, after the step in progress (and the checkpoint).
    """
    n_train = len(train_idx)
    full_size = min(batch_size, n_train)
    n_steps = max_epochs * math.ceil(n_train / max(batch_size, 1))
    run = Engine.coerce(engine).resolve(
        model,
        guide,
        n_steps=n_steps,
        batch_size=full_size,
        n_genes=data.n_genes,
        device=device,
        elbo=elbo,
        optim=optim,
        data_bytes=data.resident_bytes() if hasattr(data, "resident_bytes") else None,
        data_source=getattr(data, "source_reason", None),
    )
    run_model = run.wrap_model(model)
    if run.data_placement == "device":
        # minibatches, validation and the batch-norm passes all gather on the device
        data = data.to_device(device)
    tail_elbo = None
    if elbo is None:
        elbo = JitTrace_ELBO(ignore_jit_warnings=True) if run.compiled else Trace_ELBO()
        if run.compiled:
            # One compiled graph, for full minibatches: the smaller last minibatch of each
            # epoch runs uncompiled (the same estimator) instead of a second compilation.
            tail_elbo = Trace_ELBO()
    jit = isinstance(elbo, _JIT_ELBOS)
    sites = annealed_sites(model)
    if jit:
        step_model, step_guide = _jit_pair(elbo, run_model, guide, sites)
    else:
        step_model, step_guide = _Annealed(run_model, sites), _Annealed(guide, sites)
    tail_model, tail_guide = _Annealed(run_model, sites), _Annealed(guide, sites)
    # None: minibatches are not rescaled to the full data (see the module docstring).
    num_cells = n_train if _sums_site_terms(elbo) else None
    # The ELBO is a sum over training cells, scvi-tools' loss a mean: scale Adam's eps and
    # L2 weight decay by the cell count so the updates are the same. Without the rescaling
    # a step's loss sums over one minibatch's cells only.
    n_scale = num_cells or full_size
    group = distributed.current() if run.data_parallel else None
    if group is not None and num_cells is None:
        raise InputError(
            f"Data-parallel training averages the ranks' full-data ELBO estimates, which "
            f"{type(elbo).__name__} does not give; use Trace_ELBO (the default) or "
            "another ELBO that sums the sites' log-densities."
        )
    optim_settings = {"lr": lr, "eps": 0.01 * n_scale, "weight_decay": 1e-6 * n_scale}
    optim_made_here = optim is None
    # Parameters the guide or model declare to need their own settings (e.g. q of a
    # Bayesian decoder's globals: their gradients are far below the cell-scaled eps).
    groups = declared_optim_groups(guide, model) if param_groups else []
    if not param_groups:
        groups_reason = "off: asked for (param_groups=False)"
    elif not groups:
        groups_reason = "none declared by the guide or model"
    elif not run.fused_adam and not optim_made_here:
        groups, groups_reason = [], "off: a Pyro optimizer was passed (its own settings)"
    else:
        groups_reason = "on: declared by the guide or model (optim_groups())"
    # (a resumed Pyro optimizer's saved state is keyed by these names, before the store
    # of this call holds them)
    store_names = _store_names(model=model, guide=guide) if groups else {}
    if run.fused_adam:
        fused = FusedAdam(**optim_settings, groups=groups)
        fused.data_parallel = group

        def step(*args, **kwargs):
            return fused(elbo, step_model, step_guide, *args, **kwargs)

        def tail_step(*args):
            return fused(tail_elbo, tail_model, tail_guide, *args)
    else:
        if optim is None:
            optim = default_optim(**optim_settings, groups=groups, named=store_names)
        step = SVI(step_model, step_guide, optim, loss=elbo).step
        if tail_elbo is not None:
            tail_step = SVI(tail_model, tail_guide, optim, loss=tail_elbo).step
    if state is None:
        state = TrainState.new(seed)
    if state.rng_states is not None:
        # a continued run: the random streams go on from where the last run stopped, not
        # from whatever other code drew since
        pyro.util.set_rng_state(state.rng_states)
        if state.rng_states.get("cuda") is not None and torch.device(device).type == "cuda":
            torch.cuda.set_rng_state_all(state.rng_states["cuda"])
    if group is not None:
        group.broadcast(model, guide)  # one starting point
        if state.rng_states is None:
            group.seed_rank()  # ... and each rank its own draws
    optim_kind = "fused_adam" if run.fused_adam else "pyro"
    saved_optim = state.optim if state.optim and state.optim.get("kind") == optim_kind else None
    if saved_optim is not None and run.fused_adam:
        fused.load_state_dict(saved_optim["state"])
    elif saved_optim is not None:
        waiting = copy.copy(saved_optim["state"])
        if optim_made_here:
            # the new call's settings win over the saved ones (e.g. another lr)
            per_param = _PerParamSettings(optim_settings, groups, store_names)
            for name, value in waiting.items():
                own = per_param.for_store_name(name)
                waiting[name] = {
                    **value,
                    "param_groups": [{**g, **own} for g in value["param_groups"]],
                }
        optim.set_state(waiting)

    def optim_state() -> dict:
        if run.fused_adam:
            return {"kind": optim_kind, "state": copy.deepcopy(fused.state_dict())}
        return {"kind": optim_kind, "state": copy.deepcopy(optim.get_state())}

    # Validate the first step of each run (shapes, supports, arguments); after that the
    # checks only cost time: the data were validated on the way in.
    validate_first = pyro.infer.util.is_validation_enabled()
    rows: list[dict] = []
    # Validation runs the networks in eval mode, on batch norm's running statistics: an
    # average over the last ~100 steps (momentum 0.01). Early in a run Adam moves each
    # weight by about lr per step whatever its gradient, so the first layer's activations
    # shift by about lr * sum_g log1p(x_g) per step (tens of units on 10,000 genes and deep
    # cells), far faster than those averages follow; on stale statistics q(l) can sit far
    # above the data's log-library and exp(l) overflows float32 (the loss becomes NaN;
    # test_infer's regression test: a validation ELBO 6x the training loss at best). So
    # each validation pass first re-estimates the statistics at the current weights from a
    # fixed sample of training cells (one forward pass, no draws from the training stream:
    # see refresh_batch_norm).
    norm_cells = np.random.default_rng(0).permutation(train_idx)[:VALIDATION_NORM_CELLS]
    threads = run.thread_policy()
    history_attrs = {
        "engine": run.as_dict(),
        "optim": describe_optim_groups(optim_settings, groups, groups_reason),
    }
    epochs = tqdm(
        range(first_epoch, first_epoch + max_epochs),
        desc="Training",
        unit="epoch",
        disable=not progress_bar,
    )
    # The parameters at the end of the last complete epoch: those a failure restores.
    good_state = state.good_state or _snapshot(model, guide)
    # A snapshot taken at the end of an epoch holds the statistics of a validation pass
    # (a sample of cells), which a failure re-estimates; one taken when this call started
    # holds those that the end of the previous call re-estimated already.
    stale_norms = state.good_state is not None
    state.good_state = None
    completed_before = first_epoch  # epochs of earlier calls

    def fail(loss: float, where: str) -> TrainingError:
        _restore(model, guide, good_state)
        if rows or stale_norms:
            # As at the end of a normal run: batch norm's statistics of the restored weights
            # (the snapshot's are a validation pass's, from a sample of cells). Should the
            # pass itself fail, the snapshot's statistics stay.
            try:
                with pyro.validation_enabled(False):
                    refresh_batch_norm(
                        model, guide, data, train_idx, batch_size=batch_size, device=device
                    )
            except Exception:  # noqa: BLE001 - the training error is the one to report
                _restore(model, guide, good_state)
        last = rows[-1]["epoch"] if rows else completed_before - 1
        err = TrainingError(_failure_message(loss, where, last))
        err.history = _history(rows, history_attrs)
        return err

    def capture(mid_epoch: bool) -> None:
        state.optim = optim_state()
        state.rng_states = pyro.util.get_rng_state()
        if torch.device(device).type == "cuda":
            state.rng_states["cuda"] = torch.cuda.get_rng_state_all()
        state.good_state = good_state if mid_epoch else None

    def stop_now(epoch: int) -> TrainingInterrupted:
        mid_epoch = state.batches is not None
        capture(mid_epoch)
        signum = int(stop_signal())
        where = f"epoch {epoch}, step {state.step}" if mid_epoch else f"the end of epoch {epoch}"
        err = TrainingInterrupted(
            f"Training interrupted by {_signal_name(signum)} at {where}.",
            signal=signum,
            epoch=epoch if mid_epoch else epoch + 1,
            step=state.step if mid_epoch else 0,
        )
        err.history = _history(rows, history_attrs)
        if checkpoint is not None:
            # statistics of the current weights, so the checkpoint is a usable model too;
            # they do not change the rest of the run (see TrainState)
            refresh_batch_norm(model, guide, data, train_idx, batch_size=batch_size, device=device)
            err.checkpoint = checkpoint(state, err.history)
        return err

    stop_signal = stop if stop is not None else (lambda: 0)
    if checkpoint is not None and group is not None and not group.is_main:
        checkpoint = None  # rank 0 writes the run's checkpoints
    written = None  # the epoch of the last periodic checkpoint
    compiled_sizes: set[int] = set()
    threads.start()
    precision_before = run.set_matmul_precision()
    try:
        for epoch in epochs:
            start = time.perf_counter()
            w = kl_weight(epoch, kl_warmup_epochs)
            w_tensor = torch.tensor(w, device=device) if jit else None  # a graph's input
            model.train(), guide.train()
            if state.batches is None:
                if group is None:
                    state.batches = list(
                        data.minibatches(
                            train_idx, batch_size, shuffle=True, rng=state.rng, drop_singleton=True
                        )
                    )
                else:  # global minibatches, the same on every rank; each takes its own share
                    state.batches = group.global_minibatches(
                        state.rng.permutation(train_idx), batch_size
                    )
                state.step, state.total, state.seconds = 0, 0.0, 0.0
            first_step = state.step
            for step_no in range(first_step, len(state.batches)):
                chunk = state.batches[step_no]
                idx = chunk if group is None else group.shard(chunk)
                cell_index = torch.as_tensor(idx, device=device)
                x, b = (
                    data.gather(cell_index)
                    if run.data_placement == "device"
                    else data.tensors(idx, device)
                )
                if jit and (tail_elbo is None or len(idx) == full_size):
                    call, args = step, (x, b, cell_index, w_tensor)
                    kwargs = {"num_cells": num_cells, "n_cells": len(idx)}
                else:  # uncompiled, or a default compiled run's smaller last minibatch
                    call, args, kwargs = (
                        tail_step if jit else step,
                        (x, b, cell_index, num_cells, w),
                        {},
                    )
                first = epoch == first_epoch and step_no == first_step
                if call is step and jit and len(idx) not in compiled_sizes:
                    compiled_sizes.add(len(idx))
                    _compile_aside(elbo, step_model, step_guide, (model, guide), args, kwargs)
                with (
                    pyro.validation_enabled(validate_first and first),
                    _quiet_jit() if jit and epoch == first_epoch else contextlib.nullcontext(),
                ):
                    loss = _nan_on_invalid(call, (model, guide), *args, **kwargs)
                if not math.isfinite(loss):
                    raise fail(loss, f"epoch {epoch}, step {step_no}")
                # A subsampled minibatch's loss is scaled by n_train / len(idx); undo that.
                state.total += loss * len(chunk) / n_train if num_cells else loss
                state.step = step_no + 1
                if stop_signal() and state.step < len(state.batches):
                    state.seconds += time.perf_counter() - start
                    raise stop_now(epoch)
            total = state.total
            seconds = state.seconds
            state.batches, state.step, state.total, state.seconds = None, 0, 0.0, 0.0
            row = {"epoch": epoch, "train_elbo": -total / n_train, "kl_weight": w}
            row["validation_elbo"] = float("nan")
            if len(val_idx):
                # run_model may be the model under a handler, which evaluate_elbo cannot put
                # in eval mode itself: the modules go into eval mode here.
                with pyro.validation_enabled(False), eval_mode(model, guide):
                    refresh_batch_norm(
                        model, guide, data, norm_cells, batch_size=len(norm_cells), device=device
                    )
                    own_val = val_idx if group is None else group.shard(val_idx)
                    if group is not None:
                        group.broadcast(model, guide)  # rank 0's statistics, on every rank
                    row["validation_elbo"] = (
                        _nan_on_invalid(
                            evaluate_elbo,
                            (model, guide),
                            run_model,
                            guide,
                            data,
                            own_val,
                            elbo=elbo,
                            device=device,
                        )
                        if len(own_val)
                        else 0.0
                    )
                    if group is not None:  # one value on every rank: they stop together
                        share = row["validation_elbo"] * len(own_val)
                        row["validation_elbo"] = group.sum(share) / len(val_idx)
                if not math.isfinite(row["validation_elbo"]):
                    raise fail(row["validation_elbo"], f"epoch {epoch}, validation")
            row["seconds"] = seconds + time.perf_counter() - start
            row["threads"] = threads.current
            rows.append(row)
            good_state = _snapshot(model, guide, into=good_state)
            threads.update()
            epochs.set_postfix(
                train_elbo=f"{row['train_elbo']:.1f}", val_elbo=f"{row['validation_elbo']:.1f}"
            )
            monitored = row["validation_elbo"] if len(val_idx) else row["train_elbo"]
            if monitored > state.best + min_delta:
                state.best, state.since_best = monitored, 0
            else:
                state.since_best += 1
            if stop_signal():
                raise stop_now(epoch)
            due = checkpoint_every and (epoch + 1) % checkpoint_every == 0
            if checkpoint is not None and due:
                capture(False)
                checkpoint(state, _history(rows, history_attrs))
                written = epoch
            if early_stopping and state.since_best >= patience:
                epochs.write(
                    f"Early stopping at epoch {epoch}: no ELBO improvement for {patience} epochs."
                )
                break
        capture(False)
        # still under the run's threads: a pass over every training cell
        own_train = train_idx if group is None else group.shard(train_idx)
        refresh_batch_norm(model, guide, data, own_train, batch_size=batch_size, device=device)
        if group is not None:
            group.average_buffers(model, guide)
        if checkpoint is not None and checkpoint_every and rows and written != rows[-1]["epoch"]:
            # the run's end too: a finished run can be continued from its folder later
            checkpoint(state, _history(rows, history_attrs))
    finally:
        torch.set_float32_matmul_precision(precision_before)
        threads.close()
        epochs.close()
    return _history(rows, history_attrs)


def refresh_batch_norm(
    model: nn.Module,
    guide: nn.Module,
    data: CountData,
    indices: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> None:
    """Re-estimate batch-norm running statistics at the current weights.

    During training each running statistic is an exponential average (momentum 0.01) over
    the last ~100 steps of a moving weight trajectory, so in eval mode the networks see
    stale statistics: after a few hundred steps q(l) sits 10-20% too high and every query
    is biased. One forward pass over ``indices`` with a cumulative average (momentum None),
    as ``torch.optim.swa_utils.update_bn`` does, replaces them with statistics of the
    trained networks. No parameter changes, and no random numbers drawn from the caller's
    stream (the pass samples the guide and applies dropout under a forked torch RNG), so
    training draws the same numbers with or without it.
    """
    norms = [
        m
        for net in (model, guide)
        for m in net.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    ]
    if not norms or len(indices) < 2:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training, guide.training
    model.train(), guide.train()
    try:
        device = torch.device(device)
        forked = [device] if device.type == "cuda" else []
        with (
            torch.no_grad(),
            pyro.get_param_store().scope(),
            torch.random.fork_rng(devices=forked, device_type=device.type),
        ):
            # Shuffled: files are often sorted by cell type, and minibatches of one type
            # would average within-type variances, several times too small.
            rng = np.random.default_rng(0)
            for idx in data.minibatches(
                indices, batch_size, shuffle=True, rng=rng, drop_singleton=True
            ):
                x, b = data.tensors(idx, device)
                # cell_index: a guide with per-cell parameters needs the cells' rows
                args = (x, b, torch.as_tensor(idx, device=device))
                guide_trace = poutine.trace(guide).get_trace(*args)
                poutine.replay(model, trace=guide_trace)(*args)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training[0]), guide.train(was_training[1])


def _compile_aside(
    elbo: ELBO, model: Callable, guide: Callable, modules: Sequence[nn.Module], args, kwargs
) -> None:
    """Compile a JIT ELBO's graph for these arguments without touching the run's state.

    Pyro's JIT ELBOs run the model and guide three times in their first call (to find
    the parameters, to trace, then the compiled graph), drawing three sets of random
    numbers. Done here under a forked random stream, with the gradients dropped, the run's
    first real step draws one set like every later one: so a run that is resumed, and
    compiles again, continues the same random stream as one that never stopped.
    """
    with torch.random.fork_rng(devices=_cuda_devices(modules)), _quiet_jit():
        with pyro.validation_enabled(False):
            elbo.loss_and_grads(model, guide, *args, **kwargs)
    for module in modules:
        for p in module.parameters():
            p.grad = None


def _cuda_devices(modules: Sequence[nn.Module]) -> list:
    return sorted(
        {p.device.index or 0 for m in modules for p in m.parameters() if p.device.type == "cuda"}
    )


#: JIT ELBO objects that a training run has compiled.
_JIT_USED: weakref.WeakSet = weakref.WeakSet()


class _JitCall:
    """A model or guide with the calling convention of Pyro's JIT ELBOs.

    Called as ``(x, batch_index, cell_index, kl_weight, *, num_cells, n_cells)``: tensors
    positionally (inputs of the compiled graph; ``kl_weight`` a 0-d tensor), the rest as
    keywords (the compiled-graph cache key). ``n_cells``, the minibatch size, is only
    there to give each minibatch size its own graph. ``fn`` runs as
    ``fn(x, batch_index, cell_index, num_cells)`` under :class:`KLWeight`.
    """

    def __init__(self, fn: Callable, sites: Sequence[str] = ("z",)) -> None:
        self.fn, self.sites = fn, tuple(sites)

    def __call__(self, x, batch_index, cell_index, kl_weight, *, num_cells, n_cells):
        with KLWeight(kl_weight, self.sites):
            return self.fn(x, batch_index, cell_index, num_cells)


def _jit_pair(
    elbo: ELBO, model: Callable, guide: Callable, sites: Sequence[str] = ("z",)
) -> tuple[_JitCall, _JitCall]:
    # Pyro's JIT ELBOs close over the model and guide of their first call and go on
    # compiling those, whatever is passed later, and look up the parameter names they
    # captured before running anything (absent from a new run's parameter store): one run
    # per ELBO object.
    if elbo in _JIT_USED:
        name = type(elbo).__name__
        raise InputError(
            f"This {name} was already used by a training run, and Pyro's JIT ELBOs keep the "
            f"model, guide and parameters they first compiled; pass a new {name}() to each "
            "train() call."
        )
    _JIT_USED.add(elbo)
    return _JitCall(model, sites), _JitCall(guide, sites)


@contextlib.contextmanager
def _quiet_jit():
    """Hide torch's deprecation notice of ``torch.jit.trace``, which Pyro's JIT ELBOs use.

    Compilation happens in a run's first epoch (one graph per minibatch size); the notice
    is about Pyro's internals, which users cannot act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.trace.*", category=DeprecationWarning
        )
        yield


def _sums_site_terms(elbo: ELBO) -> bool:
    """Whether ``elbo`` is linear in each site's log-density scale (minibatch rescaling).

    ``RenyiELBO`` is not: it takes a log-mean-exp over particles of each cell's weight.
    """
    return not isinstance(elbo, RenyiELBO)


#: Training cells whose activations give batch norm's statistics for a validation pass.
VALIDATION_NORM_CELLS = 512

#: Columns of a training history, one row per epoch.
HISTORY_COLUMNS = ["epoch", "train_elbo", "validation_elbo", "kl_weight", "seconds", "threads"]


def _history(rows: list[dict], attrs: dict | None = None) -> pd.DataFrame:
    history = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    history.attrs.update(attrs or {})
    return history


def _failure_message(loss: float, where: str, last_epoch: int) -> str:
    if last_epoch < 0:
        restored = (
            "no epoch had completed, so the model is untrained (its parameters are back at "
            "their initial values)"
        )
    else:
        restored = (
            f"the parameters were restored to the end of epoch {last_epoch}, the last complete one"
        )
    return (
        f"The loss became {loss} at {where}; {restored}. Try a smaller learning rate (lr), a "
        "longer KL warm-up, or check the counts for extreme outliers."
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Turn SIGINT and SIGTERM into a request to stop, polled by :func:`train_svi`.

    Yields a function returning the number of the first signal received (0: none). A
    second SIGINT raises :class:`KeyboardInterrupt` at once, for a user who will not wait
    for the step to finish. Outside the main thread (where Python cannot handle signals)
    nothing is installed and the function always returns 0.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return

    def handler(signum, frame):
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not received:
            received.append(signum)
            print(
                f"\n{_signal_name(signum)} received: stopping after the current step "
                "(Ctrl-C again to abort at once).",
                file=sys.stderr,
            )

    previous = {}
    for signum in signums:
        previous[signum] = signal.signal(signum, handler)
    try:
        yield lambda: received[0] if received else 0
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def _nan_on_invalid(fn: Callable, modules: tuple[nn.Module, ...], *args, **kwargs) -> float:
    """Call ``fn``; return NaN if it failed because parameters or outputs went non-finite.

    With validation on, NaN parameters surface as a distribution refusing its arguments
    ("found invalid values") rather than as a NaN loss.
    """
    try:
        return fn(*args, **kwargs)
    except ValueError as err:
        if "invalid values" not in str(err) and _all_finite(*modules):
            raise
        return float("nan")


def _all_finite(*modules: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _snapshot(*modules: nn.Module, into: list[dict] | None = None) -> list[dict]:
    """Copies of the modules' state dicts; with ``into``, copied into those buffers.

    Reusing the buffers each epoch saves an allocation the size of the model (27 MB with
    13,000 genes) and keeps one copy alive instead of two at the moment of the swap.
    """
    states = [m.state_dict() for m in modules]
    if into is not None and all(a.keys() == b.keys() for a, b in zip(states, into, strict=True)):
        with torch.no_grad():
            for state, saved in zip(states, into, strict=True):
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and saved[key].shape == value.shape:
                        saved[key].copy_(value)
                    else:
                        saved[key] = copy.deepcopy(value)
        return into
    return [
        {
            k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            for k, v in state.items()
        }
        for state in states
    ]


def _restore(model: nn.Module, guide: nn.Module, state: list[dict]) -> None:
    # load_state_dict copies in place, so the optimizer and param store keep their tensors.
    with torch.no_grad():
        model.load_state_dict(state[0])
        guide.load_state_dict(state[1])
