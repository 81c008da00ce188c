"""The training loop's named hooks: small objects that the training loop calls.

- :class:`Validation` scores the validation cells after each epoch;
- :class:`EarlyStopping` says when the monitored ELBO stopped improving;
- :class:`BestEpoch` keeps the parameters of the best epoch after the KL warm-up and
  restores them at the end of the run;
- :class:`Checkpoints` writes the run's state every few epochs and at its end;
- :class:`Interrupts` turns a signal (:func:`stop_on_signals`) into a clean stop;
- :class:`LastGoodEpoch` keeps the parameters of the last complete epoch and restores them
  when the loss goes non-finite;
- :class:`Divergence` says, at the end of a run, whether its ELBO diverged.

:class:`RunHistory` holds the rows they report into. Each takes what it works on when
it is made (a stepper, the run's state, functions to call), so each can be used and
tested alone (``tests/test_hooks.py``).

The loop is :func:`pyro_scvi.train.loop.train_svi`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn

from ..errors import OutputError, TrainingError, TrainingInterrupted
from ..model.nn import eval_mode
from .passes import norm_batches, poisson_null_loglik, refresh_batch_norm

if TYPE_CHECKING:
    from .loop import TrainState
    from .stepper import Stepper

#: Training cells whose activations give batch norm's statistics for a validation pass.
VALIDATION_NORM_CELLS = 512

#: How messages name the learning rate: the argument, and the command line's option.
LR_SETTING = "lr=; --lr on the command line"

#: :class:`Divergence`: a last ELBO below this many times the Poisson null log-likelihood.
DIVERGED_RATIO = 10.0

#: :class:`Divergence`: a last ELBO below its best by more than this many null log-likelihoods.
DROP_FROM_BEST = 1.0

#: Columns of a training history, one row per epoch.
HISTORY_COLUMNS = ["epoch", "train_elbo", "validation_elbo", "kl_weight", "seconds", "threads"]


class RunHistory:
    """A run's rows (one per complete epoch, :data:`HISTORY_COLUMNS`) and ``attrs``.

    Examples
    --------
    >>> h = RunHistory({"engine": {}})
    >>> h.append({"epoch": 0, "train_elbo": -5.0})
    >>> h.frame().columns.tolist()[:3], h.last_epoch
    (['epoch', 'train_elbo', 'validation_elbo'], 0)
    """

    def __init__(self, attrs: dict | None = None) -> None:
        self.rows: list[dict] = []
        self.attrs = dict(attrs or {})

    def append(self, row: dict) -> None:
        """Add a complete epoch's row."""
        self.rows.append(row)

    @property
    def last_epoch(self) -> int | None:
        """The last complete epoch's number (``None``: none yet)."""
        return self.rows[-1]["epoch"] if self.rows else None

    def frame(self) -> pd.DataFrame:
        """The history as a DataFrame, ``attrs`` attached."""
        history = pd.DataFrame(self.rows, columns=HISTORY_COLUMNS)
        history.attrs.update(self.attrs)
        return history


class Validation:
    """The validation hook: the epoch's ELBO per validation cell (the true ELBO, weight 1).

    Validation runs the networks in eval mode, on batch norm's running statistics: an
    average over the last ~100 steps (momentum 0.01). Early in a run Adam moves each weight
    by about lr per step whatever its gradient, so the first layer's activations shift by
    about ``lr * sum_g log1p(x_g)`` per step (tens of units on 10,000 genes and deep
    cells), far faster than those averages follow; on stale statistics q(l) can sit far
    above the data's log-library and ``exp(l)`` overflows float32 (test_infer's regression
    test: a validation ELBO 6x the training loss at best). So each pass first re-estimates
    the statistics at the current weights from a fixed sample of :data:`VALIDATION_NORM_CELLS`
    training cells (one forward pass, no draws from the training stream:
    :func:`~pyro_scvi.train.passes.refresh_batch_norm`).

    In a data-parallel run every rank uses rank 0's statistics, scores its own share of
    the validation cells, and the shares are summed: every rank sees one value (and early
    stopping stops them together). Without validation cells the value is NaN.

    Parameters
    ----------
    stepper
        The run's :class:`~pyro_scvi.train.stepper.Stepper` (its ``model``, ``guide``,
        ``device``, ``group``, :meth:`~pyro_scvi.train.stepper.Stepper.shard` and
        :meth:`~pyro_scvi.train.stepper.Stepper.loss`).
    data, train_idx, val_idx
        The counts, the training cells (whose sample gives the statistics) and the
        validation cells.
    """

    def __init__(
        self,
        stepper: Stepper,
        data,
        train_idx: np.ndarray,
        val_idx: np.ndarray,
        *,
        norm_cells: int = VALIDATION_NORM_CELLS,
    ) -> None:
        self.stepper, self.data, self.val_idx = stepper, data, val_idx
        self.norm_cells = np.random.default_rng(0).permutation(train_idx)[:norm_cells]
        # The sample's counts, gathered at the first pass and kept: the same cells every
        # epoch, read and densified once (at most norm_cells x genes, which each pass
        # holds at once anyway).
        self._norm_batches: list | None = None

    def __call__(self) -> float:
        """The validation ELBO per cell at the current weights (NaN: no validation cells)."""
        if not len(self.val_idx):
            return float("nan")
        s = self.stepper
        with pyro.validation_enabled(False), eval_mode(s.model, s.guide):
            if self._norm_batches is None:
                self._norm_batches = norm_batches(
                    self.data, self.norm_cells, batch_size=len(self.norm_cells), device=s.device
                )
            refresh_batch_norm(
                s.model,
                s.guide,
                self.data,
                self.norm_cells,
                batch_size=len(self.norm_cells),
                device=s.device,
                batches=self._norm_batches,
            )
            own = s.shard(self.val_idx)
            if s.group is not None:
                s.group.broadcast(s.model, s.guide)  # rank 0's statistics, on every rank
            value = s.loss(self.data, own) if len(own) else 0.0
            if s.group is not None:  # one value on every rank: they stop together
                value = s.group.sum(value * len(own)) / len(self.val_idx)
        return value


#: Epochs averaged into the value that early stopping monitors (a spike of one epoch
#: neither sets nor beats the best).
STOPPING_WINDOW = 5


class EarlyStopping:
    """The early-stopping hook: stop when the monitored ELBO stops improving.

    :meth:`update` is called once per epoch with the monitored value (the validation ELBO,
    else the training ELBO) and says whether to stop. The rule (the default of
    :meth:`pyro_scvi.SCVI.train`; evidence in ``benchmarks/results/stopping_rule.md``):

    - the value monitored is the mean of the last :data:`STOPPING_WINDOW` epochs' ELBOs;
    - it improves when it beats the best so far by more than a threshold: ``min_delta``
      nats per cell when given, else (``None``) the standard error of that mean, estimated
      from the epoch-to-epoch noise of the recent ELBOs (a robust spread of their
      differences, so a trend does not count as noise). The threshold is thus in the
      ELBO's own units, whatever the dataset's size, genes or depth;
    - epochs before ``warmup_end`` (the end of the KL warm-up, whose rising weight changes
      the objective) never count: the best is the current value until then;
    - the run stops after ``patience`` epochs without an improvement, when ``enabled``
      (then ``say`` gets a sentence for the user).

    The recent values, the best and the epochs since it are kept in the run's
    :class:`~pyro_scvi.train.loop.TrainState` (``recent``, ``best``, ``since_best``),
    counted whether or not stopping is enabled, so a continued or resumed run goes on
    counting. :attr:`reason` says why the run ended (:meth:`record`).

    Examples
    --------
    >>> from pyro_scvi.train.loop import TrainState
    >>> stopping = EarlyStopping(TrainState.new(0), enabled=True, patience=2, min_delta=0.0,
    ...                          window=1, say=print)
    >>> [stopping.update(e, v) for e, v in enumerate((-10.0, -9.0, -9.5, -9.2))]
    Early stopping at epoch 3: the ELBO has not improved by more than 0 for 2 epochs.
    [False, False, False, True]
    """

    def __init__(
        self,
        state: TrainState,
        *,
        enabled: bool,
        patience: int,
        min_delta: float | None = None,
        warmup_end: int = 0,
        window: int = STOPPING_WINDOW,
        say: Callable[[str], None] = lambda sentence: None,
    ) -> None:
        self.state, self.enabled, self.say = state, enabled, say
        self.patience, self.min_delta = patience, min_delta
        self.warmup_end, self.window = warmup_end, max(1, int(window))
        #: The threshold of the last update (nats per cell; NaN: too few epochs yet).
        self.threshold = float("nan")
        #: The value monitored at the last update: the mean of the last ``window`` epochs.
        self.value = float("nan")
        #: Why the run stopped early (``None``: it did not).
        self.reason: str | None = None

    def noise(self) -> float:
        """The standard error of the monitored mean, from the recent epochs' differences.

        Robust: the median absolute deviation of the epoch-to-epoch differences (about
        their median, which removes a steady trend), scaled to a standard deviation of
        one epoch's value (/ sqrt 2: a difference holds two epochs' noise), divided by
        sqrt(window). NaN with fewer than 3 differences.
        """
        diffs = np.diff(np.asarray(self.state.recent, dtype=float))
        if len(diffs) < 3:
            return float("nan")
        mad = float(np.median(np.abs(diffs - np.median(diffs))))
        return 1.4826 * mad / np.sqrt(2.0) / np.sqrt(self.window)

    def update(self, epoch: int, monitored: float) -> bool:
        """Record epoch ``epoch``'s monitored ELBO; return whether the run should stop now."""
        state = self.state
        state.recent = [*state.recent, float(monitored)][-(self.patience + self.window) :]
        value = self.value = float(np.mean(state.recent[-self.window :]))
        self.threshold = self.noise() if self.min_delta is None else float(self.min_delta)
        threshold = self.threshold if math.isfinite(self.threshold) else 0.0
        if epoch < self.warmup_end:  # the objective still changes: nothing counts yet
            state.best, state.since_best = value, 0
        elif value > state.best + threshold:
            state.best, state.since_best = value, 0
        else:
            state.since_best += 1
        stop = bool(self.enabled and state.since_best >= self.patience)
        if stop:
            self.reason = (
                f"converged: the ELBO has not improved by more than {threshold:.3g} for "
                f"{self.patience} epochs"
            )
            self.say(f"Early stopping at epoch {epoch}: {self.reason.split(': ', 1)[1]}.")
        return stop

    def record(self, last_epoch: int | None, max_epochs: int) -> dict:
        """What the run's history records of its end (``history.attrs["stopping"]``).

        ``epoch``: the last epoch run; ``reason``: ``"converged: ..."``, or
        ``"max_epochs: ..."`` when the call ran all its ``max_epochs``; the rule's
        settings beside them.

        Examples
        --------
        >>> from pyro_scvi.train.loop import TrainState
        >>> hook = EarlyStopping(TrainState.new(0), enabled=True, patience=45)
        >>> hook.record(9, 10)["reason"]
        'max_epochs: all 10 epochs of the call ran'
        """
        reason = self.reason or f"max_epochs: all {max_epochs} epochs of the call ran"
        return {
            "early_stopping": bool(self.enabled),
            "epoch": last_epoch,
            "reason": reason,
            "patience": int(self.patience),
            "min_delta": self.min_delta,
            "threshold": None if math.isnan(self.threshold) else float(self.threshold),
            "window": self.window,
            "warmup_end": int(self.warmup_end),
            "max_epochs": int(max_epochs),
        }


class BestEpoch:
    """The restore hook: the best epoch after the KL warm-up, its parameters restored at the end.

    :meth:`update` is called after each epoch with the value early stopping monitors (the
    mean of the last :data:`STOPPING_WINDOW` epochs' validation ELBOs, else training ELBOs:
    :attr:`~pyro_scvi.train.hooks.EarlyStopping.value`), so the epoch restored is judged as
    the rule judges. Only epochs from ``warmup_end`` on count (their objective is the true
    ELBO; an epoch of the warm-up is never restored). When the value beats the best so far
    (strictly), the run's state records the epoch and its value (``state.best_epoch``,
    ``best_value``) and, only when restoring is ``enabled``, copies its parameters (model
    and guide, batch norm's buffers included) into ``best_params``: a run that does not
    restore keeps no second copy of the model, in memory or in its checkpoints. A call
    that restores after calls that did not (no copy of their best) counts its own epochs
    only.

    :meth:`restore`, at the end of a call with ``enabled``, loads the best epoch's
    parameters into the modules (in place: the optimizer keeps its tensors) and keeps the
    last epoch's in ``state.last_params``; the caller then re-estimates batch norm's
    statistics for them (the end of :func:`~pyro_scvi.train.loop.train_svi`). A restore
    changes what the model holds, not the run: a continued or resumed call goes on from
    the last epoch's parameters (made when this hook is, from ``state.last_params``), with
    the optimizer's moments and random streams that belong to them, exactly as if nothing
    had been restored; the best epoch is carried over, and the end of that call restores
    the best of the whole run.

    Parameters
    ----------
    model, guide
        The modules.
    state
        The run's :class:`~pyro_scvi.train.loop.TrainState`.
    enabled
        Whether :meth:`restore` restores.
    warmup_end
        The first epoch that counts (the end of the KL warm-up).

    Examples
    --------
    >>> from torch import nn
    >>> from pyro_scvi.train.loop import TrainState
    >>> net, state = nn.Linear(1, 1), TrainState.new(0)
    >>> best = BestEpoch(net, nn.Identity(), state, enabled=True, warmup_end=2)
    >>> for epoch, value in enumerate((-1.0, -9.0, -5.0, -7.0)):
    ...     _ = net.bias.data.fill_(epoch)
    ...     best.update(epoch, value)
    >>> best.restore(last_epoch=3), net.bias.item(), state.best_epoch
    (True, 2.0, 2)
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        state: TrainState,
        *,
        enabled: bool,
        warmup_end: int = 0,
    ) -> None:
        self.modules, self.state = (model, guide), state
        self.enabled, self.warmup_end = bool(enabled), int(warmup_end)
        no_copy = state.best_params is None and state.last_params is None
        if enabled and state.best_epoch is not None and no_copy:  # earlier calls kept none
            state.best_epoch, state.best_value = None, -math.inf
        if state.last_params is not None:  # an earlier call restored: go on from its end
            if state.best_params is None:  # the model holds the best epoch's parameters
                state.best_params = _snapshot(model, guide)
            _restore(model, guide, state.last_params)
            state.last_params = None

    def update(self, epoch: int, monitored: float) -> None:
        """Epoch ``epoch`` ended with the monitored (smoothed) value ``monitored``."""
        state = self.state
        if epoch < self.warmup_end or not math.isfinite(monitored):
            return
        if state.best_epoch is None or monitored > state.best_value:
            state.best_epoch, state.best_value = int(epoch), float(monitored)
            # off, a copy an earlier call kept is of another epoch now: dropped
            copy = _snapshot(*self.modules, into=state.best_params) if self.enabled else None
            state.best_params = copy

    def restore(self, last_epoch: int | None) -> bool:
        """With ``enabled``, load the best epoch's parameters; whether they replaced others.

        Nothing to do when no epoch counted yet, or the best is the last epoch.
        """
        state = self.state
        if not self.enabled or state.best_epoch is None or state.best_epoch == last_epoch:
            return False
        state.last_params = _snapshot(*self.modules)
        _restore(*self.modules, state.best_params)
        state.best_params = None  # the modules hold them now
        return True

    def record(self) -> dict:
        """What ``history.attrs["stopping"]`` records of it.

        ``restore_best_epoch``: whether it was on; ``best_epoch`` and ``best_value``: the
        best epoch after the warm-up and its monitored value (``None``: none yet);
        ``restored_epoch``: the epoch whose parameters the model ends with when it is on
        (the best one, which may be the last; ``None`` when off or no epoch counted).
        """
        best = self.state.best_epoch
        return {
            "restore_best_epoch": self.enabled,
            "best_epoch": best,
            "best_value": None if best is None else float(self.state.best_value),
            "restored_epoch": best if self.enabled else None,
        }


class Checkpoints:
    """The checkpoint hook: the run's state written every few epochs and at its end.

    ``write(state, history)`` stores the run's :class:`~pyro_scvi.train.loop.TrainState`
    ``state`` and the history somewhere and returns where (``write=None``: no
    checkpoints, e.g. on a rank other than 0). ``keep(mid_epoch)`` fills the state in
    before a periodic write (optimizer, random streams). Written after every
    ``every``-th epoch (0: only when interrupted, :meth:`now`) and at the end of the run
    (after batch norm's statistics are re-estimated), so a finished run can be continued
    from its checkpoint later and its outputs written from it. A checkpoint that cannot be
    written (a full disk, a folder gone) does not end the run: a warning says why,
    ``failed`` records it, and training goes on, so that its result is not lost for want
    of a copy on the way.

    Examples
    --------
    >>> written = []
    >>> hook = Checkpoints(lambda state, h: written.append(len(h)), every=2)
    >>> h = RunHistory()
    >>> for epoch in range(3):
    ...     h.append({"epoch": epoch})
    ...     hook.after_epoch(epoch, h)
    >>> hook.at_end(h)
    >>> written
    [2, 3]
    """

    def __init__(
        self,
        write: Callable[[TrainState, pd.DataFrame], str | None] | None,
        every: int = 0,
        *,
        state: TrainState | None = None,
        keep: Callable[[bool], None] = lambda mid_epoch: None,
    ) -> None:
        self.write, self.every, self.state, self.keep = write, every, state, keep
        #: The epoch of the last periodic checkpoint (``None``: none yet).
        self.written: int | None = None
        #: Why the last checkpoint could not be written (``None``: it was, or none was due).
        self.failed: str | None = None

    @property
    def enabled(self) -> bool:
        """Whether this run writes checkpoints at all."""
        return self.write is not None

    def after_epoch(self, epoch: int, history: RunHistory) -> None:
        """Write after every ``every``-th epoch."""
        if self.enabled and self.every and (epoch + 1) % self.every == 0:
            self.keep(False)
            if self._write(history.frame()) is not None:
                self.written = epoch

    def at_end(self, history: RunHistory) -> None:
        """At the end of the run (the state kept): write, even if its last epoch was.

        The run's end re-estimates batch norm's statistics after the last epoch's
        checkpoint, so that checkpoint is not the finished model; this one is (``fit
        --resume`` of a finished run writes its outputs from it).
        """
        if self.enabled and self.every and history.last_epoch is not None:
            self._write(history.frame())

    def now(self, history: pd.DataFrame) -> str | None:
        """Write at once (the state kept already); return where (``None``: not written)."""
        return self._write(history) if self.enabled else None

    def _write(self, history: pd.DataFrame) -> str | None:
        try:
            where = self.write(self.state, history)
        except (OSError, OutputError) as err:
            self.failed = " ".join(str(err).split()) or type(err).__name__
            warnings.warn(
                f"A training checkpoint could not be written ({self.failed}); training goes "
                "on without it. Free some space or choose another checkpoint folder.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        self.failed = None
        return where if where is not None else ""


class Interrupts:
    """The interrupt hook: a request to stop, polled after every step and every epoch.

    ``stop()`` returns a signal's number (0: go on), e.g. from :func:`stop_on_signals`.
    :meth:`interrupt` ends the run there: ``keep(mid_epoch)`` leaves in the run's state
    what resumes it, and with checkpoints on, ``refresh()`` re-estimates batch norm's
    statistics (so the checkpoint is a usable model too; they do not change the rest of
    the run) before the checkpoint is written; it returns the
    :class:`~pyro_scvi.errors.TrainingInterrupted` to raise, with the history so far and
    where the checkpoint went.

    Examples
    --------
    >>> import signal
    >>> hook = Interrupts(lambda: signal.SIGTERM)
    >>> err = hook.interrupt(1, 2, mid_epoch=True, history=RunHistory())
    >>> str(err), err.epoch, err.step
    ('Training interrupted by SIGTERM at epoch 1, step 2.', 1, 2)
    """

    def __init__(
        self,
        stop: Callable[[], int] | None = None,
        *,
        keep: Callable[[bool], None] = lambda mid_epoch: None,
        checkpoints: Checkpoints | None = None,
        refresh: Callable[[], None] = lambda: None,
    ) -> None:
        self.stop = stop if stop is not None else (lambda: 0)
        self.keep, self.checkpoints, self.refresh = keep, checkpoints, refresh

    def requested(self) -> int:
        """The number of the signal that asked to stop (0: none)."""
        return int(self.stop())

    def interrupt(
        self, epoch: int, step: int, *, mid_epoch: bool, history: RunHistory
    ) -> TrainingInterrupted:
        """Stop at ``step`` of ``epoch`` (``mid_epoch``) or after the epoch; the error to raise."""
        self.keep(mid_epoch)
        signum = self.requested()
        where = f"epoch {epoch}, step {step}" if mid_epoch else f"the end of epoch {epoch}"
        err = TrainingInterrupted(
            f"Training interrupted by {_signal_name(signum)} at {where}.",
            signal=signum,
            epoch=epoch if mid_epoch else epoch + 1,
            step=step if mid_epoch else 0,
        )
        err.history = history.frame()
        if self.checkpoints is not None and self.checkpoints.enabled:
            self.refresh()
            err.checkpoint = self.checkpoints.now(err.history) or None
            err.checkpoint_error = self.checkpoints.failed
        return err


class Divergence:
    """The divergence hook: whether the run's monitored ELBO ran away, judged at its end.

    A learning rate too high can leave a run that never produced a non-finite loss with an
    ELBO of -1e21 per cell. The yardstick is the data's own: the log-likelihood per cell
    of a Poisson model of each gene's share of the counts, which learns no structure
    (:func:`~pyro_scvi.train.passes.poisson_null_loglik`, on up to ``cells`` of the
    monitored cells). In units of it, a fit that learned anything ends near or below 1
    (an untrained model 1.3-1.6, trained ones 0.2-1.0 on the shipped and shared data; a
    high learning rate's first epochs may pass 1,000 and come back). The run diverged when
    its last monitored ELBO (validation, else training)

    - is below :data:`DIVERGED_RATIO` (10) times the null: an order of magnitude worse
      than knowing nothing of the cells; or
    - fell below its best of the run by more than :data:`DROP_FROM_BEST` (1) times the
      null's magnitude: the run lost more than all its structure could give.

    Both are ratios of log-likelihoods of the same cells, so no depth, gene count or
    dataset sets the scale. :meth:`check` returns the warning to give (``None``: none).

    Parameters
    ----------
    data, cells
        The counts and the monitored cells (the validation cells, else the training ones).
    column
        The history column monitored.
    lr
        The run's learning rate, quoted in the warning (``None``: a Pyro optimizer's).
    device
        Where the counts' tensors are gathered.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=50, seed=0))
    >>> hook = Divergence(data, np.arange(50), column="validation_elbo", lr=0.15)
    >>> h = RunHistory()
    >>> for epoch, value in enumerate((-300.0, -200.0, -9e21)):
    ...     h.append({"epoch": epoch, "validation_elbo": value})
    >>> hook.check(h).startswith("The validation ELBO diverged")
    True
    >>> h.rows[-1]["validation_elbo"] = -190.0
    >>> hook.check(h) is None
    True
    """

    def __init__(
        self,
        data,
        cells: np.ndarray,
        *,
        column: str,
        lr: float | None = None,
        device: torch.device | str = "cpu",
        max_cells: int = 4096,
    ) -> None:
        sample = np.random.default_rng(0).permutation(np.asarray(cells))[:max_cells]
        self.data, self.cells, self.device = data, np.sort(sample), device
        self.column, self.lr = column, lr
        self._null: float | None = None

    @property
    def null(self) -> float:
        """The null log-likelihood per monitored cell (computed once, when first asked)."""
        if self._null is None:
            self._null = poisson_null_loglik(self.data, self.cells, device=self.device)
        return self._null

    def check(self, history: RunHistory) -> str | None:
        """The warning for the run's rows (``None``: it did not diverge)."""
        values = [(row["epoch"], row.get(self.column, np.nan)) for row in history.rows]
        values = [(e, float(v)) for e, v in values if np.isfinite(v)]
        if not values or not len(self.cells) or not self.null < 0:
            return None
        unit = -self.null
        last_epoch, last = values[-1]
        best_epoch, best = max(values, key=lambda ev: ev[1])
        name = self.column.replace("_elbo", " ELBO")
        lr = "" if self.lr is None else f"; this run's was {self.lr:g}"
        advice = f"Train again with a smaller learning rate ({LR_SETTING}{lr})."
        if -last > DIVERGED_RATIO * unit:
            return (
                f"The {name} diverged: {last:.4g} per cell at epoch {last_epoch}, "
                f"{-last / unit:.3g} times the log-likelihood of a Poisson model that learns no "
                f"structure ({self.null:.4g}); the model is not usable. {advice}"
            )
        if best - last > DROP_FROM_BEST * unit:
            return (
                f"The {name} diverged: {last:.4g} per cell at epoch {last_epoch}, down from "
                f"{best:.4g} at epoch {best_epoch}, a fall larger than the whole log-likelihood "
                f"of a Poisson model that learns no structure ({self.null:.4g}). {advice}"
            )
        return None


class LastGoodEpoch:
    """The failure hook: the parameters of the last complete epoch, restored on a bad loss.

    :meth:`save` snapshots the model and guide at the end of each epoch (into the same
    buffers); :meth:`fail` restores them, re-estimates batch norm's statistics for them
    with ``refresh()`` (as at the end of a normal run: the snapshot's are a validation
    pass's, from a sample of cells; should that pass fail too, the snapshot's stay), and
    returns the :class:`~pyro_scvi.errors.TrainingError` to raise. A run continued inside
    an epoch starts from the snapshot its state carries (``state.good_state``).

    Parameters
    ----------
    model, guide
        The modules.
    state
        The run's :class:`~pyro_scvi.train.loop.TrainState`.
    refresh
        Re-estimates batch norm's statistics.
    completed_before
        Epochs completed by earlier calls (the number of this call's first epoch).
    """

    def __init__(
        self,
        model: nn.Module,
        guide: nn.Module,
        state: TrainState,
        *,
        refresh: Callable[[], None],
        completed_before: int = 0,
    ) -> None:
        self.modules = (model, guide)
        self.snapshot = state.good_state or _snapshot(model, guide)
        # A snapshot taken at the end of an epoch holds the statistics of a validation pass
        # (a sample of cells), which a failure re-estimates; one taken when this call
        # started holds those that the end of the previous call re-estimated already.
        self.stale_norms = state.good_state is not None
        state.good_state = None
        self.refresh, self.completed_before = refresh, completed_before

    def save(self) -> None:
        """The current parameters become the last good ones (end of a complete epoch)."""
        self.snapshot = _snapshot(*self.modules, into=self.snapshot)

    def fail(
        self, loss: float, where: str, history: RunHistory, *, what: str = "The loss"
    ) -> TrainingError:
        """Restore the last good parameters; the error that says so, with the history.

        ``what`` became ``loss`` (non-finite) at ``where``.
        """
        _restore(*self.modules, self.snapshot)
        if history.rows or self.stale_norms:
            try:
                with pyro.validation_enabled(False):
                    self.refresh()
                ok = norms_finite(*self.modules)
            except Exception:  # noqa: BLE001 - the training error is the one to report
                ok = False
            if not ok:  # the pass failed too: the snapshot's statistics stay
                _restore(*self.modules, self.snapshot)
        last = history.last_epoch
        err = TrainingError(
            _failure_message(
                f"{what} became {loss} at {where}",
                self.completed_before - 1 if last is None else last,
            )
        )
        err.history = history.frame()
        return err


def norms_finite(*modules: nn.Module) -> bool:
    """Whether every batch-norm running statistic of ``modules`` is finite.

    Examples
    --------
    >>> norm = nn.BatchNorm1d(2)
    >>> before = norms_finite(norm)
    >>> _ = norm.running_var.fill_(float("inf"))
    >>> before, norms_finite(norm)
    (True, False)
    """
    return all(
        bool(torch.isfinite(buffer).all())
        for module in modules
        for m in module.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
        for buffer in (m.running_mean, m.running_var)
        if buffer is not None
    )


def _failure_message(event: str, last_epoch: int) -> str:
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
        f"{event}; {restored}. Try a smaller learning rate ({LR_SETTING}), a longer KL "
        "warm-up (kl_warmup_epochs=), or check the counts for extreme outliers."
    )


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@contextlib.contextmanager
def stop_on_signals(signums: Sequence[int] = (signal.SIGINT, signal.SIGTERM)):
    """Turn SIGINT and SIGTERM into a request to stop, polled by :class:`Interrupts`.

    Yields a function returning the number of the first signal received (0: none). A
    second SIGINT raises :class:`KeyboardInterrupt` at once, for a user who will not wait
    for the step to finish. Outside the main thread (where Python cannot handle signals)
    nothing is installed and the function always returns 0.

    A signal that nobody saw (it came after the loop's last look, in the end-of-run pass or
    checkpoint) is never dropped: when the block ends without an error, it is sent
    again to the process once the previous handlers are back, so that it acts as it would
    have outside training (:class:`KeyboardInterrupt` for SIGINT, the end of the process
    for SIGTERM, or what the caller installed -- the command line's orderly stop).
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

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)

    seen = []

    def poll() -> int:
        if received:
            seen.append(True)  # the caller knows now: it acts on it
        return received[0] if received else 0

    try:
        yield poll
    except BaseException:  # an interrupt raised (acted on), or a failure: no second delivery
        restore()
        raise
    restore()
    if received and not seen:
        signal.raise_signal(received[0])


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
