"""Adam for training: scvi-tools' settings, declared parameter groups, one fused optimizer.

:class:`FusedAdam` steps every parameter with one ``torch.optim.Adam`` (the default);
:func:`default_optim` is the same Adam as a Pyro optimizer, run through
:class:`pyro.infer.SVI`. :func:`run_groups` decides which declared parameter groups
(:func:`declared_optim_groups`) a run gives their own settings, and
:func:`describe_optim_groups` records them (``history.attrs["optim"]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.optim import PyroOptim
from torch import nn

from ..errors import InputError
from ..model.generative import parameters_held


def scaled_lr(batch_size: int, base_lr: float = 1e-3, base_batch_size: int = 128) -> float:
    """Adam learning rate for ``batch_size`` by the square-root scaling rule.

    Larger minibatches make an epoch cheaper (fewer steps, better use of the CPU's vector
    units) but take fewer, less noisy steps. For Adam, scaling the learning rate with the
    square root of the batch size keeps the training dynamics approximately the same
    (Malladi et al., "On the SDEs and scaling rules for adaptive gradient algorithms",
    NeurIPS 2022), from scVI's defaults of 1e-3 at 128 cells. The trade-off on real data
    is measured in ``benchmarks/results/batch_size.md``.

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

    :func:`~pyro_scvi.train.loop.train_svi` scales ``eps`` and ``weight_decay`` by the number
    of training cells, as for :class:`FusedAdam`. ``groups`` (see
    :func:`declared_optim_groups`) give their parameters their own settings, through Pyro's
    per-parameter ``optim_args`` callable; ``named`` maps parameter-store names to tensors
    (else the store is searched).
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


def run_groups(model, guide, *, param_groups: bool, pyro_optim_passed: bool) -> tuple[list, str]:
    """The declared groups a run gives their own settings, and why (for the record).

    Parameters the guide or model declare to need their own settings (e.g. q of a Bayesian
    decoder's globals: their gradients are far below the cell-scaled ``eps``); none with
    ``param_groups=False`` or when the user passed a Pyro optimizer of their own.
    """
    groups = declared_optim_groups(guide, model) if param_groups else []
    if not param_groups:
        return [], "off: asked for (param_groups=False)"
    if not groups:
        return [], "none declared by the guide or model"
    if pyro_optim_passed:
        return [], "off: a Pyro optimizer was passed (its own settings)"
    return groups, "on: declared by the guide or model (optim_groups())"


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
    with a single fused (else multi-tensor) Adam. (A run scales ``eps`` and ``weight_decay``
    by the number of training cells, because its loss is a sum over cells.)
    The parameters are the ones Pyro's parameter store hands to the ELBO in the first step,
    exactly those :class:`pyro.infer.SVI` would find. A step whose loss is not finite is
    not applied.

    Parameters
    ----------
    lr, eps, weight_decay
        Adam's settings.
    groups
        Declared parameter groups (:func:`declared_optim_groups`), each a torch param group
        of its own with its settings over the run's.
    hold, differentiable
        ``differentiable``: the ELBO objects whose ``differentiable_loss`` is their loss and
        needs no ``param`` sites (the engine's capability table says which:
        :class:`~pyro_scvi.train.engine.ElboCapabilities`). Their steps compute the loss
        that way, and after the first step this optimizer holds the parameters of the
        modules ``hold`` (model, guide) and tells them so
        (:func:`~pyro_scvi.model.parameters_held` around the step): they skip
        re-registering their parameters with Pyro, so a parameter first created after the
        first step would not be optimized. Steps of any other ELBO (default: all) run its
        ``loss_and_grads`` and register every parameter.
    data_parallel
        A :class:`~pyro_scvi.train.distributed.DataParallel` group whose ranks' gradients
        and losses are averaged before each step (``None``: this process alone).

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
        *,
        hold: Sequence[nn.Module] = (),
        differentiable: Sequence[ELBO] = (),
        data_parallel=None,
    ) -> None:
        self.settings = {"lr": lr, "eps": eps, "weight_decay": weight_decay}
        self.groups = list(groups or [])
        self.hold = tuple(hold)
        self.differentiable = tuple(differentiable)
        self.data_parallel = data_parallel
        self.optim: torch.optim.Optimizer | None = None
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self._pending: dict | None = None
        # (the optimizer, its state's size, what _fast_plan found for them)
        self._plan: tuple | None = None

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
            self._update()
        for group in self.optim.param_groups:  # zero_grad(set_to_none=True), less its wrappers
            for p in group["params"]:
                p.grad = None
        return loss

    def _update(self) -> None:
        """``self.optim.step()``: the same fused kernel, called without torch's per-step wrappers.

        ``torch.optim.Adam.step`` spends about 0.2 ms per call in Python (a profiler record,
        hook lookups, regrouping the tensors by device, rebuilding the lists of moments) for
        scVI's 25 parameter tensors: about 4% of a step on 200 genes, where steps are
        cheap. Once Adam's state exists, each group goes straight to the kernel that
        ``step()`` ends in (``torch._foreach_add_`` on the step counts, then
        ``torch._fused_adam_``) with the same tensors and settings, so the update is the
        same to the last bit (tests/test_train_optim.py pins it). Anything that path does
        not cover (a parameter without a gradient, hooks, another torch, mixed devices or
        dtypes, amsgrad and the like) takes ``step()``.
        """
        plan = self._fast_plan()
        if plan is None or _optimizer_hooks(self.optim):
            self.optim.step()
            return
        grads = []
        for params, *_ in plan:
            g = [p.grad for p in params]
            if any(x is None for x in g):
                self.optim.step()
                return
            grads.append(g)
        with torch.no_grad():
            for i, ((params, exp_avgs, exp_avg_sqs, steps, group), g) in enumerate(
                zip(plan, grads, strict=True)
            ):
                if not self._fused_kernel(params, g, exp_avgs, exp_avg_sqs, steps, group):
                    # another torch's kernel takes other arguments: it raised before writing,
                    # so the groups not yet updated go through step(), now and from here on
                    self._plan = (self.optim, len(self.optim.state), None)
                    for group_done in self.optim.param_groups[:i]:
                        for p in group_done["params"]:
                            p.grad = None
                    self.optim.step()
                    return

    @staticmethod
    def _fused_kernel(params, g, exp_avgs, exp_avg_sqs, steps, group) -> bool:
        """One group's update by the kernel ``Adam.step`` ends in; ``False`` if it refused."""
        beta1, beta2 = group["betas"]
        torch._foreach_add_(steps, 1)
        try:
            torch._fused_adam_(
                params,
                g,
                exp_avgs,
                exp_avg_sqs,
                [],
                steps,
                amsgrad=False,
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=False,
                grad_scale=None,
                found_inf=None,
            )
        except (TypeError, RuntimeError):
            torch._foreach_sub_(steps, 1)
            return False
        return True

    def _fast_plan(self) -> list | None:
        """Per param group ``(params, exp_avgs, exp_avg_sqs, steps, group)``, or ``None``.

        ``None``: the direct kernel call does not apply (see :meth:`_update`), or Adam's
        state is not made yet (``step()`` makes it). Rebuilt when the state was replaced.
        """
        optim = self.optim
        if self._plan is not None and self._plan[0] is optim and self._plan[1] == len(optim.state):
            cached = self._plan[2]
            # a loaded state dict brings new tensors: the plan then points at stale ones
            if cached is None or all(
                optim.state[params[0]].get("exp_avg") is exp_avgs[0]
                for params, exp_avgs, *_ in cached
            ):
                return cached
        plan = _fused_adam_plan(optim)
        self._plan = (optim, len(optim.state), plan)
        return plan

    def loss_and_grads(
        self, elbo: ELBO, model: Callable, guide: Callable, *args, **kwargs
    ) -> float:
        """The loss, with its gradients left in the parameters' ``.grad`` (no update)."""
        if self.optim is not None:
            if not self._differentiable(elbo):
                return self._loss_and_grads(elbo, model, guide, *args, **kwargs)
            # The optimizer holds the parameters now, and says so to the modules:
            # registering them again would be pure cost.
            with parameters_held(*self.hold):
                return self._loss_and_grads(elbo, model, guide, *args, **kwargs)
        with poutine.trace(param_only=True) as capture:
            loss = self._loss_and_grads(elbo, model, guide, *args, **kwargs)
        named: dict[int, tuple[str, torch.Tensor]] = {}
        for name, site in capture.trace.nodes.items():
            p = site["value"].unconstrained()
            named.setdefault(id(p), (name, p))
        self.names = [name for name, _ in named.values()]
        self.params = [p for _, p in named.values()]
        self.optim = self._make_optim()
        self._load_pending()
        return loss

    def _differentiable(self, elbo: ELBO) -> bool:
        return any(elbo is e for e in self.differentiable)

    def _loss_and_grads(self, elbo: ELBO, model: Callable, guide: Callable, *args, **kwargs):
        if not self._differentiable(elbo):
            # (JIT ELBOs recompile per minibatch size and must see the param sites)
            return elbo.loss_and_grads(model, guide, *args, **kwargs)
        # The same computation in the first step as in the later ones, so that a run's first
        # step (e.g. after resuming) gives the same loss to the last bit. Without param sites
        # loss_and_grads would skip backward, hence differentiable_loss (its value is the
        # loss, its gradient the surrogate's).
        surrogate = elbo.differentiable_loss(model, guide, *args, **kwargs)
        surrogate.backward()
        return float(surrogate.detach())

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


def _optimizer_hooks(optim: torch.optim.Optimizer) -> bool:
    """Whether step hooks are registered (on ``optim`` or for every optimizer)."""
    from torch.optim import optimizer as torch_optimizer

    return bool(
        optim._optimizer_step_pre_hooks
        or optim._optimizer_step_post_hooks
        or getattr(torch_optimizer, "_global_optimizer_pre_hooks", None)
        or getattr(torch_optimizer, "_global_optimizer_post_hooks", None)
    )


def _fused_adam_plan(optim: torch.optim.Optimizer) -> list | None:
    """What :meth:`FusedAdam._update` hands the fused kernel per group, or ``None``.

    ``None`` unless ``optim`` is a fused ``torch.optim.Adam`` whose every group is plain
    Adam (no amsgrad, maximize, capturable, differentiable or decoupled decay; a float
    learning rate), whose parameters share one device and dtype and all have their state,
    and torch has the kernel: the cases where ``step()`` makes exactly this call.
    """
    if type(optim) is not torch.optim.Adam or not hasattr(torch, "_fused_adam_"):
        return None
    if getattr(optim, "grad_scale", None) is not None or getattr(optim, "found_inf", None):
        return None
    plan = []
    for group in optim.param_groups:
        plain = group.get("fused") and not any(
            group.get(k) for k in ("amsgrad", "maximize", "capturable", "differentiable")
        )
        if not plain or group.get("decoupled_weight_decay") or torch.is_tensor(group["lr"]):
            return None
        params = list(group["params"])
        if not params or len({(p.device, p.dtype) for p in params}) != 1:
            return None
        states = [optim.state.get(p) for p in params]
        if any(not s or not {"step", "exp_avg", "exp_avg_sq"} <= s.keys() for s in states):
            return None
        moments = ([s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states])
        plan.append((params, *moments, [s["step"] for s in states], group))
    return plan


def _adam(params: list, **settings) -> torch.optim.Adam:
    """Adam as one fused kernel where torch has it, else the multi-tensor (``foreach``) one."""
    try:
        return torch.optim.Adam(params, fused=True, **settings)
    except (RuntimeError, ValueError, TypeError):  # e.g. an older torch or another device
        return torch.optim.Adam(params, foreach=True, **settings)
