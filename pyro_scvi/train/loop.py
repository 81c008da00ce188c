"""The SVI training loop: epochs of minibatch steps, and the hooks around them.

:func:`train_svi` is Pyro's :class:`~pyro.infer.SVI` with Adam, plus what single-cell users
expect: a validation ELBO each epoch, KL warm-up, early stopping, checkpoints, a clean stop
on SIGINT/SIGTERM, a progress bar, and a guard that stops on a non-finite loss and restores
the last good parameters. It is a short loop; the rest lives where it is decided:

- :mod:`pyro_scvi.train.engine` decides how the run steps and
  :meth:`~pyro_scvi.train.engine.RunEngine.stepper` assembles the step
  (:mod:`pyro_scvi.train.stepper`: ELBO, optimizer, kernel, data-parallel group);
- :mod:`pyro_scvi.train.hooks` holds the loop's named hooks (validation, early stopping,
  checkpoints, interrupts, the last good epoch);
- :mod:`pyro_scvi.train.kl` the KL warm-up, :mod:`pyro_scvi.train.optim` Adam and its
  parameter groups, :mod:`pyro_scvi.train.passes` the passes that change no parameter.

Their public names are importable from here too (the module's old path,
``pyro_scvi.infer``, still leads here).

KL warm-up schedule
-------------------
In epoch ``e`` (counting from 0) the ``z`` terms of the ELBO are scaled by
``min(1, e / kl_warmup_epochs)``: a linear ramp from 0 that reaches 1 after
``kl_warmup_epochs`` epochs, as in scvi-tools. The library term is never annealed. The
validation ELBO is always the true ELBO (weight 1). The weight is applied by the Pyro
handler :class:`~pyro_scvi.train.kl.KLWeight` around the model and the guide, so neither
takes it as an argument: the model is the paper's equations, and any model or guide with
sites named ``z`` is annealed the same way (a model may name other sites in
``annealed_sites``).

Inference schemes
-----------------
Any Pyro ELBO trains the model: ``Trace_ELBO`` (default; compiled as ``JitTrace_ELBO`` when
the training engine says so, see :mod:`pyro_scvi.train.engine`), ``TraceMeanField_ELBO``
(analytic KL where Pyro has one, e.g. for the default Normal priors of ``z`` and ``l``),
``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`` (the importance-weighted
bound of Burda et al., 2016) and the JIT variants. What the step needs to know of an ELBO
it asks its declared capabilities (:class:`~pyro_scvi.train.engine.ElboCapabilities`). Two
need care, which the step takes:

- ``RenyiELBO`` averages the importance weights of each cell inside a logarithm, so the
  minibatch scale ``num_cells / batch_size`` that makes other ELBOs unbiased would land
  inside that logarithm (weights raised to that power, no longer a bound). Its minibatches
  are therefore not rescaled: each step maximizes the sum over the minibatch's cells of
  their K-sample bounds, and ``train_elbo`` is that sum per cell. The validation column is
  then the same bound.
- JIT ELBOs (``JitTrace_ELBO``, ``JitTraceMeanField_ELBO``) compile the loss on first use:
  positional arguments must be tensors (inputs of the compiled graph) and everything else
  is a keyword, compiled once per distinct value. The KL weight is therefore passed to
  :class:`~pyro_scvi.train.kl.KLWeight` as a tensor, so warm-up changes it without
  recompiling (a Python float would be frozen into the graph), and the minibatch size as
  a keyword, so each size gets its own graph (``history.attrs["engine"]["compiled_sizes"]``
  lists them). A JIT ELBO object keeps the model, guide and parameter names of the run it
  first compiled for, so each run compiles a copy of the one passed in: the object passed
  may serve several runs. Pyro 1.9's ``JitTraceMeanField_ELBO`` re-traces on every step,
  and torch keeps every traced graph (memory grows by megabytes a step): the run's copy
  gets a loss that keeps its graphs instead
  (:class:`~pyro_scvi.train.engine.MeanFieldLossCompiledOnce`, recorded in
  ``reasons["compiled"]``). Validation uses the ELBO's uncompiled ``loss`` in eval mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable

import numpy as np
import pandas as pd
import pyro
import torch
from pyro.infer import ELBO
from pyro.optim import PyroOptim
from torch import nn
from tqdm.auto import tqdm

from ..data.counts import CountData
from ..errors import (  # noqa: F401 - as before
    InputError,
    TrainingError,
    TrainingInterrupted,
    TrainingWarning,
)
from .engine import Engine
from .hooks import (
    HISTORY_COLUMNS,
    VALIDATION_NORM_CELLS,
    BestEpoch,
    Checkpoints,
    Divergence,
    EarlyStopping,
    Interrupts,
    LastGoodEpoch,
    RunHistory,
    Validation,
    norms_finite,
    stop_on_signals,
)
from .kl import KLWeight, annealed_sites, kl_weight
from .optim import (
    FusedAdam,
    declared_optim_groups,
    default_optim,
    describe_optim_groups,
    scaled_lr,
)
from .passes import evaluate_elbo, refresh_batch_norm

__all__ = [
    "HISTORY_COLUMNS",
    "VALIDATION_NORM_CELLS",
    "FusedAdam",
    "KLWeight",
    "TrainState",
    "annealed_sites",
    "declared_optim_groups",
    "default_optim",
    "describe_optim_groups",
    "evaluate_elbo",
    "kl_weight",
    "refresh_batch_norm",
    "scaled_lr",
    "stop_on_signals",
    "train_svi",
]


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
    recent, best, since_best
        Early stopping's last monitored ELBOs, its best (smoothed) value and the epochs
        since it improved.
    optim
        The optimizer's state: ``{"kind": "fused_adam" | "pyro", "state": ...}``.
    rng_states
        Pyro's random states (torch, numpy's and Python's global) when the run stopped.
    good_state
        Parameters at the end of the last complete epoch, kept while inside an epoch.
    best_epoch, best_value, best_params
        The best epoch after the KL warm-up by the monitored (smoothed) value, that value
        and the epoch's parameters (``None`` in a run that does not restore, and while the
        model holds them after a restore): :class:`~pyro_scvi.train.hooks.BestEpoch`.
    last_params
        After a call that restored its best epoch, the parameters of its last epoch, from
        which a continued call goes on (``None``: the model holds them).
    """

    rng: np.random.Generator
    batches: list[np.ndarray] | None = None
    step: int = 0
    total: float = 0.0
    seconds: float = 0.0
    best: float = -math.inf
    since_best: int = 0
    recent: list[float] = dataclasses.field(default_factory=list)
    optim: dict | None = None
    rng_states: dict | None = None
    good_state: list[dict] | None = None
    best_epoch: int | None = None
    best_value: float = -math.inf
    best_params: list[dict] | None = None
    last_params: list[dict] | None = None

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
    min_delta: float | None = None,
    restore_best_epoch: bool = False,
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

    The run's engine assembles the step (:meth:`~pyro_scvi.train.engine.RunEngine.stepper`);
    the loop calls the hooks of :mod:`pyro_scvi.train.hooks`, whose docstrings say more.

    Parameters
    ----------
    model, guide, data, train_idx, val_idx
        Pyro model and guide called as ``(x, batch_index, cell_index, num_cells)`` (e.g.
        :class:`~pyro_scvi.model.ScviModel`); the counts; cells to train on and to score.
    max_epochs, batch_size, kl_warmup_epochs, first_epoch
        Passes, cells per step, the KL warm-up ramp (0: none), the epoch to count from.
    optim, lr, param_groups, elbo, engine
        A Pyro optimizer, else Adam at ``lr`` (declared parameter groups their own unless
        ``param_groups=False``); any Pyro ELBO (see the module docstring); an
        :class:`~pyro_scvi.train.engine.Engine`, a preset name or ``None`` (decide).
    early_stopping, patience, min_delta
        Stop when the validation (else train) ELBO, a mean of 5 epochs, has not improved
        by ``min_delta`` nats per cell (``None``: by more than its noise) for ``patience``
        epochs after the KL warm-up (:class:`~pyro_scvi.train.hooks.EarlyStopping`); the
        last epoch and why the run ended are in ``attrs["stopping"]``.
    restore_best_epoch
        At the end, load the parameters of the epoch after the KL warm-up whose monitored
        value (the one early stopping uses) is best, batch norm's statistics re-estimated
        for them (:class:`~pyro_scvi.train.hooks.BestEpoch`; a continued call goes on from
        the last epoch); ``attrs["stopping"]`` records the epoch and its value.
    device, seed, progress_bar, state
        Where the modules are; the minibatch order's seed; a tqdm bar; the
        :class:`TrainState` to continue and update in place (``None``: new, from ``seed``).
    checkpoint, checkpoint_every, stop
        ``checkpoint(state, history)`` writes them and returns where, every
        ``checkpoint_every``-th epoch (0: never) and on a stop; ``stop()`` returns a
        signal's number to stop after the step (:func:`stop_on_signals`).

    Returns
    -------
    pandas.DataFrame
        One row per epoch (:data:`HISTORY_COLUMNS`); ``attrs["engine"]`` and
        ``attrs["optim"]`` record the run's engine and optimizer, ``attrs["stopping"]``
        its last epoch and why it ended (:meth:`~pyro_scvi.train.hooks.EarlyStopping.record`),
        and ``attrs["engine"]["diverged"]`` whether its ELBO diverged (``None``, or the
        warning).

    Warns
    -----
    TrainingWarning
        When the monitored ELBO diverged (:class:`~pyro_scvi.train.hooks.Divergence`); the
        message says which setting to change.

    Raises
    ------
    TrainingError
        On a non-finite loss, or non-finite batch-norm statistics from the pass over the
        training cells after the last epoch; the last complete epoch's parameters restored.
    TrainingInterrupted
        When ``stop`` asked, after the step in progress (and the checkpoint).
    """
    n_train, full_size = len(train_idx), min(batch_size, len(train_idx))
    sizes = _run_sizes(data, n_train, max_epochs, batch_size)
    run = Engine.coerce(engine).resolve(
        model, guide, **sizes, device=device, elbo=elbo, optim=optim
    )
    optimizer = {"optim": optim, "lr": lr, "param_groups": param_groups}
    step = run.stepper(model, guide, n_train=n_train, batch_size=full_size, elbo=elbo, **optimizer)
    data = step.place(data)  # minibatches, validation and batch-norm passes gather there
    state = state if state is not None else TrainState.new(seed)
    step.start(state)
    validate_first = pyro.infer.util.is_validation_enabled()  # the data were checked already
    history = RunHistory({"engine": step.record, "optim": step.optim_record})
    refresh = functools.partial(
        refresh_batch_norm, model, guide, data, train_idx, batch_size=batch_size, device=device
    )
    # first: a call after a restore goes on from the last epoch's parameters
    best = BestEpoch(model, guide, state, enabled=restore_best_epoch, warmup_end=kl_warmup_epochs)
    guard = LastGoodEpoch(model, guide, state, refresh=refresh, completed_before=first_epoch)
    keep = functools.partial(_keep, step, guard, state)
    validation = Validation(step, data, train_idx, val_idx)
    epoch_range = range(first_epoch, first_epoch + max_epochs)
    epochs = tqdm(epoch_range, desc="Training", unit="epoch", disable=not progress_bar)
    stopping = EarlyStopping(
        state,
        enabled=early_stopping,
        patience=patience,
        min_delta=min_delta,
        warmup_end=kl_warmup_epochs,
        say=epochs.write,
    )
    writer = checkpoint if run.group is None or run.group.is_main else None  # rank 0 writes
    checkpoints = Checkpoints(writer, checkpoint_every, state=state, keep=keep)
    interrupts = Interrupts(stop, keep=keep, checkpoints=checkpoints, refresh=refresh)
    threads = run.thread_policy()
    threads.start()
    precision_before = run.set_matmul_precision()
    try:
        for epoch in epochs:
            start = time.perf_counter()
            w = kl_weight(epoch, kl_warmup_epochs)
            model.train(), guide.train()
            if state.batches is None:
                state.batches = step.minibatches(data, train_idx, batch_size, state.rng)
                state.step, state.total, state.seconds = 0, 0.0, 0.0
            first_step = state.step
            for step_no in range(first_step, len(state.batches)):
                chunk = state.batches[step_no]
                first = validate_first and epoch == first_epoch and step_no == first_step
                loss = step.step(*step.batch(data, chunk), w, validate=first)
                if not math.isfinite(loss):
                    raise guard.fail(loss, f"epoch {epoch}, step {step_no}", history)
                # A rescaled minibatch's loss is scaled by n_train / its size; undo that.
                state.total += loss * len(chunk) / n_train if step.num_cells else loss
                state.step = step_no + 1
                if interrupts.requested() and state.step < len(state.batches):
                    state.seconds += time.perf_counter() - start
                    raise interrupts.interrupt(epoch, state.step, mid_epoch=True, history=history)
            row = {"epoch": epoch, "train_elbo": -state.total / n_train, "kl_weight": w}
            row["seconds"] = state.seconds
            state.batches, state.step, state.total, state.seconds = None, 0, 0.0, 0.0
            row["validation_elbo"] = validation()
            if len(val_idx) and not math.isfinite(row["validation_elbo"]):
                raise guard.fail(row["validation_elbo"], f"epoch {epoch}, validation", history)
            row["seconds"] += time.perf_counter() - start
            row["threads"] = threads.current
            history.append(row)
            guard.save()
            threads.update()
            epochs.set_postfix(
                train_elbo=f"{row['train_elbo']:.1f}", val_elbo=f"{row['validation_elbo']:.1f}"
            )
            done = stopping.update(epoch, row["validation_elbo" if len(val_idx) else "train_elbo"])
            best.update(epoch, stopping.value)
            if interrupts.requested():
                raise interrupts.interrupt(epoch, 0, mid_epoch=False, history=history)
            checkpoints.after_epoch(epoch, history)
            if done:
                break
        history.attrs["stopping"] = stopping.record(history.last_epoch, max_epochs) | best.record()
        keep(False)
        best.restore(history.last_epoch)  # the statistics of its parameters: the pass below
        # still under the run's threads: a pass over every training cell
        if not _refresh_at_end(step, data, train_idx, batch_size):
            raise guard.fail(
                float("nan"),
                "the pass over the training cells after the last epoch",
                history,
                what="Batch norm's statistics",
            )
        quoted_lr = lr if optim is None else None  # a Pyro optimizer carries its own
        _check_divergence(step, data, train_idx, val_idx, history, lr=quoted_lr)
        checkpoints.at_end(history)  # a finished run can be continued from its folder later
    finally:
        torch.set_float32_matmul_precision(precision_before)
        threads.close()
        epochs.close()
    return history.frame()


def _run_sizes(data, n_train: int, max_epochs: int, batch_size: int) -> dict:
    """What :meth:`Engine.resolve` needs to know of the run's length and its counts."""
    return {
        "n_steps": max_epochs * math.ceil(n_train / max(batch_size, 1)),
        "batch_size": min(batch_size, n_train),
        "n_genes": data.n_genes,
        "data_bytes": data.resident_bytes(),  # every source of counts says (None: cannot)
        "data_source": getattr(data, "source_reason", None),
        # (streamed counts have no dense size: they stay on the host)
        "dense_bytes": data.dense_bytes() if hasattr(data, "dense_bytes") else None,
    }


def _check_divergence(step, data, train_idx, val_idx, history: RunHistory, *, lr) -> None:
    """Record in the run's engine record whether its ELBO diverged, and warn if it did.

    ``record["diverged"]``: ``None``, or the warning given (:class:`Divergence`).
    """
    cells, column = (val_idx, "validation_elbo") if len(val_idx) else (train_idx, "train_elbo")
    verdict = Divergence(data, cells, column=column, lr=lr, device=step.device).check(history)
    step.record["diverged"] = verdict
    if verdict is not None:
        warnings.warn(verdict, TrainingWarning, stacklevel=3)


def _refresh_at_end(step, data, train_idx: np.ndarray, batch_size: int) -> bool:
    """Batch norm's statistics from every training cell; whether they came out finite.

    Weights on the edge of overflowing (a high learning rate) can give some training cell
    infinite activations that the validation sample did not meet; the loop then fails as
    on a non-finite loss, with the last epoch's parameters and statistics restored.
    """
    try:
        # NaN parameters of a distribution would raise inside Pyro's checks: the
        # statistics are checked below instead, one way for every failure
        with pyro.validation_enabled(False):
            step.refresh_batch_norm(data, train_idx, batch_size)
    except (ValueError, RuntimeError):
        if step.group is not None:
            raise  # the other ranks wait in the pass: no quiet way out
        return False
    return norms_finite(step.model, step.guide)


def _keep(step, guard: LastGoodEpoch, state: TrainState, mid_epoch: bool) -> None:
    """Leave in ``state`` what continues the run.

    The optimizer's state, the random streams and, stopped inside an epoch, the
    parameters of the last complete one.
    """
    step.capture(state)
    state.good_state = guard.snapshot if mid_epoch else None
