"""A training run's step, assembled by the engine: ELBO, optimizer, kernel and ranks.

:meth:`RunEngine.stepper <pyro_scvi.train.engine.RunEngine.stepper>` builds a
:class:`Stepper` from what the engine decided, and :func:`~pyro_scvi.train.loop.train_svi`
only asks it for the epoch's minibatches (:meth:`Stepper.minibatches`,
:meth:`Stepper.batch`), to step (:meth:`Stepper.step`) and for the ELBO of cells
(:meth:`Stepper.loss`): which path runs (compiled or not, fused kernel, fused Adam or
Pyro's SVI, one process or a data-parallel rank) is the stepper's business alone, and
what it learns as it runs goes into the run's engine record (``Stepper.record``).

Fault injection: :meth:`Stepper.step` is the package's documented seam for tests that need
a training step to fail or to be interrupted. Wrapping it
(``monkeypatch.setattr(Stepper, "step", wrapper)``) to return NaN from the n-th call, or
to send the process a signal before stepping, exercises the loop's failure and interrupt
hooks without touching the step's arithmetic. :meth:`Stepper.refresh_batch_norm`, the pass
over the training cells after the last epoch (after the loop's last look for a signal),
is the seam for a failure there (wrapped to leave non-finite statistics, as weights on the
edge of overflowing do) and for a signal that arrives as training ends.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyro
import torch
from pyro.infer import ELBO, SVI
from torch import nn

from ..data.placement import dense_gather
from ..model.nn import eval_mode
from .kl import Annealed, JitCall, annealed_sites
from .optim import (
    FusedAdam,
    _PerParamSettings,
    _store_names,
    default_optim,
    describe_optim_groups,
    run_groups,
)
from .passes import evaluate_elbo, refresh_batch_norm

if TYPE_CHECKING:
    from .distributed import DataParallel
    from .engine import ElboCapabilities
    from .kernels import FusedLogProb
    from .loop import TrainState


class Stepper:
    """One run's training step, as its engine assembled it.

    Made by :meth:`~pyro_scvi.train.engine.RunEngine.stepper`.

    Attributes
    ----------
    model, guide
        The run's modules.
    run_model
        The model under the engine's handlers (the fused kernel's, when on).
    elbo, capabilities
        The step's ELBO and what it declares (:class:`~pyro_scvi.train.engine.ElboCapabilities`).
    kernel
        The fused kernel's handler (:class:`~pyro_scvi.train.kernels.FusedLogProb`), or ``None``.
    group
        The data-parallel group this process is a rank of, or ``None``.
    optim
        :class:`~pyro_scvi.train.optim.FusedAdam`, or the Pyro optimizer run through SVI.
    num_cells
        The plate size minibatches are rescaled to (all training cells), or ``None`` for an
        ELBO that does not sum site terms (minibatches then stay minibatches).
    record
        The run's engine record (:meth:`~pyro_scvi.train.engine.RunEngine.as_dict`) with
        what the run learned:
        ``compiled_sizes`` (the minibatch sizes a compiled ELBO compiled a graph for),
        a compiled kernel that failed (``compile_kernel`` then false and the fused
        kernel's reason says why), and ``reasons["parameters"]`` (who registers them).
    optim_record
        The optimizer's settings and declared groups
        (:func:`~pyro_scvi.train.optim.describe_optim_groups`).
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        *,
        elbo: ELBO,
        tail_elbo: ELBO | None,
        capabilities: ElboCapabilities,
        differentiable: Sequence[ELBO],
        kernel: FusedLogProb | None,
        group: DataParallel | None,
        device: torch.device | str,
        data_placement: str,
        fused_adam: bool,
        optim: Any,
        lr: float,
        param_groups: bool,
        n_train: int,
        batch_size: int,
        record: dict,
    ) -> None:
        self.model, self.guide = model, guide
        self.elbo, self.tail_elbo, self.capabilities = elbo, tail_elbo, capabilities
        self.kernel, self.group = kernel, group
        self.device = torch.device(device)
        self.data_placement = data_placement
        self.fused_adam = fused_adam
        self.full_size = batch_size
        self.record = record
        self.compiled_sizes: list[int] = record.setdefault("compiled_sizes", [])
        self.run_model = kernel(model) if kernel is not None else model
        self.jit = capabilities.compiled
        sites = annealed_sites(model)
        wrap = JitCall if self.jit else Annealed
        self._pair = (wrap(self.run_model, sites), wrap(guide, sites))
        self._tail_pair = (Annealed(self.run_model, sites), Annealed(guide, sites))
        # None: minibatches are not rescaled to the full data (see pyro_scvi.train.loop).
        self.num_cells = n_train if capabilities.sums_site_terms else None
        # The ELBO is a sum over training cells, scvi-tools' loss a mean: scale Adam's eps
        # and L2 weight decay by the cell count so the updates are the same. Without the
        # rescaling a step's loss sums over one minibatch's cells only.
        n_scale = self.num_cells or batch_size
        self.settings = {"lr": lr, "eps": 0.01 * n_scale, "weight_decay": 1e-6 * n_scale}
        self._optim_made_here = optim is None
        groups, groups_reason = run_groups(
            model, guide, param_groups=param_groups, pyro_optim_passed=optim is not None
        )
        self.groups = groups
        self.optim_record = describe_optim_groups(self.settings, groups, groups_reason)
        # (a resumed Pyro optimizer's saved state is keyed by these names, before the store
        # of this call holds them)
        self._named = _store_names(model=model, guide=guide) if groups else {}
        reasons = record["reasons"]
        # TorchScript's graph executor, optimizing a traced graph, may reorder random ops
        # that do not depend on each other (two sites' standard-normal draws, dropout
        # masks), so a compiled graph would draw other numbers than eager from the same
        # seed. A component whose draws it reorders declares ``jit_optimize = False``; its
        # graphs then run unoptimized (torch.jit.optimized_execution(False)), in eager's
        # order. Measured on CPU (1 thread) no slower than optimized.
        why_not = unoptimized_graph_reason(model, guide) if self.jit else None
        self._graph_mode = (
            functools.partial(torch.jit.optimized_execution, False)
            if why_not
            else contextlib.nullcontext
        )
        if why_not:
            reasons["compiled"] = f"{reasons.get('compiled', 'on')}; {why_not}"
        if fused_adam:
            self.optim = FusedAdam(
                **self.settings,
                groups=groups,
                hold=(model, guide),
                differentiable=differentiable,
                data_parallel=group,
            )
            self._steps = (
                functools.partial(self.optim, elbo, *self._pair),
                functools.partial(self.optim, tail_elbo, *self._tail_pair) if tail_elbo else None,
            )
            reasons["parameters"] = _registration(elbo, tail_elbo, differentiable)
        else:
            self.optim = (
                optim
                if optim is not None
                else default_optim(**self.settings, groups=groups, named=self._named)
            )
            self._steps = (
                SVI(*self._pair, self.optim, loss=elbo).step,
                SVI(*self._tail_pair, self.optim, loss=tail_elbo).step if tail_elbo else None,
            )
            reasons["parameters"] = "registered every step (a Pyro optimizer reads the store)"
        self._weight: tuple[float | None, torch.Tensor | None] = (None, None)

    # --- data ----------------------------------------------------------------------------

    def place(self, data):
        """The run's counts where the engine placed them (on the device, or as they are).

        On a CPU, counts that fit :func:`~pyro_scvi.data.placement.dense_gather` are held as
        one dense block.
        """
        if self.data_placement != "device":
            return data
        size = data.dense_bytes() if hasattr(data, "dense_bytes") else None
        dense = dense_gather(self.device.type, size, streamed=False)
        return data.to_device(self.device, dense=dense)

    def shard(self, cells: np.ndarray) -> np.ndarray:
        """The share of ``cells`` this process takes (all of them outside data parallelism)."""
        return cells if self.group is None else self.group.shard(cells)

    def minibatches(
        self, data, cells: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> list[np.ndarray]:
        """An epoch's shuffled minibatches of ``cells``.

        In a data-parallel run global ones, the same on every rank, each rank taking its
        share in :meth:`batch`.
        """
        if self.group is None:
            return list(
                data.minibatches(cells, batch_size, shuffle=True, rng=rng, drop_singleton=True)
            )
        return self.group.global_minibatches(rng.permutation(cells), batch_size)

    def batch(self, data, chunk: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x, batch_index, cell_index)`` of this process's share of the minibatch ``chunk``."""
        idx = self.shard(chunk)
        cell_index = torch.as_tensor(idx, device=self.device)
        if self.data_placement == "device":
            x, b = data.gather(cell_index)
        else:
            x, b = data.tensors(idx, self.device)
        return x, b, cell_index

    # --- stepping --------------------------------------------------------------------------

    def step(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor,
        kl_weight: float,
        *,
        validate: bool = False,
    ) -> float:
        """One optimizer step on a minibatch; returns its loss (NaN: not finite, not applied).

        ``kl_weight`` scales the annealed sites (:class:`~pyro_scvi.train.kl.KLWeight`);
        ``validate``: Pyro's argument and support checks on for this step (a run checks
        its first). A loss that failed because parameters or outputs went non-finite
        (a distribution refusing its arguments) is NaN. The documented fault-injection
        seam (see the module docstring).
        """
        with self._graph_mode():
            which, args, kwargs, fresh = self._call(x, batch_index, cell_index, kl_weight)
            with pyro.validation_enabled(validate), self._quiet(fresh):
                loss = _nan_on_invalid(
                    self._steps[which], (self.model, self.guide), *args, **kwargs
                )
        self._note_kernel()
        return loss

    def loss_and_grads(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor,
        kl_weight: float,
    ) -> float:
        """The loss :meth:`step` would take and its gradients in ``.grad``, with no update.

        The same ELBO, wrappers, compiled graphs and (with fused Adam) parameter handling
        as :meth:`step`: for checking that every path is the same estimator.
        """
        with self._graph_mode():
            which, args, kwargs, fresh = self._call(x, batch_index, cell_index, kl_weight)
            elbo = self.elbo if which == 0 else self.tail_elbo
            pair = self._pair if which == 0 else self._tail_pair
            with self._quiet(fresh):
                if self.fused_adam:
                    return self.optim.loss_and_grads(elbo, *pair, *args, **kwargs)
                return elbo.loss_and_grads(*pair, *args, **kwargs)

    def loss(self, data, cells: np.ndarray) -> float:
        """ELBO per cell of ``cells`` (the true ELBO, weight 1), networks in eval mode.

        Computed with the step's ELBO (uncompiled: Pyro's ``loss``) and model handlers;
        NaN if parameters or outputs went non-finite.
        """
        # run_model may be the model under a handler, which evaluate_elbo cannot put in
        # eval mode itself: the modules go into eval mode here.
        with eval_mode(self.model, self.guide):
            value = _nan_on_invalid(
                evaluate_elbo,
                (self.model, self.guide),
                self.run_model,
                self.guide,
                data,
                cells,
                elbo=self.elbo,
                device=self.device,
            )
        self._note_kernel()
        return value

    def _call(self, x, batch_index, cell_index, kl_weight) -> tuple[int, tuple, dict, bool]:
        """The step function to call, its arguments, and whether a graph was just compiled.

        The function is 0 (the ELBO's) or 1 (the uncompiled tail's); a compiled run compiles
        one graph per new minibatch size.
        """
        n = len(cell_index)
        if self.jit and (self.tail_elbo is None or n == self.full_size):
            args = (x, batch_index, cell_index, self._weight_tensor(kl_weight))
            kwargs = {"num_cells": self.num_cells, "n_cells": n}
            fresh = n not in self.compiled_sizes
            if fresh:
                self.compiled_sizes.append(n)
                _compile_aside(self.elbo, *self._pair, (self.model, self.guide), args, kwargs)
            return 0, args, kwargs, fresh
        # uncompiled, or a default compiled run's smaller last minibatch
        args = (x, batch_index, cell_index, self.num_cells, kl_weight)
        return (1 if self.jit else 0), args, {}, False

    def _weight_tensor(self, w: float) -> torch.Tensor:
        # A compiled graph's input: warm-up changes it without recompiling (a Python float
        # would be frozen into the graph).
        if self._weight[0] != w:
            self._weight = (w, torch.tensor(w, device=self.device))
        return self._weight[1]

    def _quiet(self, fresh: bool) -> contextlib.AbstractContextManager:
        # only a step that meets a new graph can raise torch's tracing notice; catching
        # warnings on every step would be per-step work for nothing
        return _quiet_jit() if fresh else contextlib.nullcontext()

    def _note_kernel(self) -> None:
        """Copy a compiled kernel's failure into the record (once)."""
        why = self.kernel.fallback if self.kernel is not None else None
        if why is not None and self.record["compile_kernel"]:
            self.record["compile_kernel"] = False
            self.record["reasons"]["fused_kernel"] += f"; {why} during the run: uncompiled since"

    # --- state -----------------------------------------------------------------------------

    def start(self, state: TrainState) -> None:
        """Continue from ``state``: its random streams and the optimizer's moments.

        In a data-parallel run every rank starts from rank 0's parameters, and (in a new
        run) draws from its own random stream.
        """
        if state.rng_states is not None:
            # a continued run: the random streams go on from where the last run stopped, not
            # from whatever other code drew since
            pyro.util.set_rng_state(state.rng_states)
            if state.rng_states.get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(state.rng_states["cuda"])
        if self.group is not None:
            self.group.broadcast(self.model, self.guide)  # one starting point
            if state.rng_states is None:
                self.group.seed_rank()  # ... and each rank its own draws
        kind = "fused_adam" if self.fused_adam else "pyro"
        saved = state.optim if state.optim and state.optim.get("kind") == kind else None
        if saved is not None and self.fused_adam:
            self.optim.load_state_dict(saved["state"])
        elif saved is not None:
            waiting = copy.copy(saved["state"])
            if self._optim_made_here:
                # the new call's settings win over the saved ones (e.g. another lr)
                per_param = _PerParamSettings(self.settings, self.groups, self._named)
                for name, value in waiting.items():
                    own = per_param.for_store_name(name)
                    waiting[name] = {
                        **value,
                        "param_groups": [{**g, **own} for g in value["param_groups"]],
                    }
            self.optim.set_state(waiting)

    def capture(self, state: TrainState) -> None:
        """Write the optimizer's state and the random streams into ``state``."""
        if self.fused_adam:
            optim = {"kind": "fused_adam", "state": copy.deepcopy(self.optim.state_dict())}
        else:
            optim = {"kind": "pyro", "state": copy.deepcopy(self.optim.get_state())}
        state.optim = optim
        state.rng_states = pyro.util.get_rng_state()
        if self.device.type == "cuda":
            state.rng_states["cuda"] = torch.cuda.get_rng_state_all()

    def refresh_batch_norm(self, data, cells: np.ndarray, batch_size: int) -> None:
        """Batch norm's statistics at the current weights, from this process's ``cells``.

        This process's share of them; averaged over the ranks of a data-parallel run.
        """
        own = self.shard(cells)
        refresh_batch_norm(
            self.model, self.guide, data, own, batch_size=batch_size, device=self.device
        )
        if self.group is not None:
            self.group.average_buffers(self.model, self.guide)


def _registration(elbo: ELBO, tail_elbo: ELBO | None, differentiable: Sequence[ELBO]) -> str:
    """Who registers the parameters in fused Adam's steps, for the run's record."""
    name = type(elbo).__name__
    if any(elbo is e for e in differentiable):
        return (
            f"held by fused Adam after the first step ({name} differentiates without param sites)"
        )
    held_tail = tail_elbo is not None and any(tail_elbo is e for e in differentiable)
    return f"registered every step ({name} reads param sites)" + (
        f"; held in the {type(tail_elbo).__name__} steps of smaller last minibatches"
        if held_tail
        else ""
    )


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


def unoptimized_graph_reason(model: Callable, guide: Callable) -> str | None:
    """Why a compiled graph of ``model`` and ``guide`` runs unoptimized, or None.

    A component declares ``jit_optimize = False`` (and may say why in
    ``jit_optimize_reason``) when TorchScript's optimization passes reorder its random
    draws.

    Examples
    --------
    >>> from pyro_scvi.model.guides import FullCovarianceGuide
    >>> unoptimized_graph_reason(None, FullCovarianceGuide(5, 1)).split(":")[0]
    'its graphs run without TorchScript optimization'
    """
    for part in (model, guide):
        if getattr(part, "jit_optimize", True) is False:
            why = getattr(part, "jit_optimize_reason", "")
            name = type(part).__name__
            return f"its graphs run without TorchScript optimization: {name}" + (
                f" {why}" if why else " declares jit_optimize = False"
            )
    return None


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
