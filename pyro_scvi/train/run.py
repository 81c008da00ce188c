"""A model's training between calls: what ``train()`` continues and ``resume()`` finishes.

:func:`~pyro_scvi.train.loop.train_svi` runs epochs; around it, a model keeps its
training as records. :class:`TrainingRun` is what continues a run: the loop's
:class:`~pyro_scvi.train.loop.TrainState` and, while a ``train()`` call is under way or
after it was interrupted, the call's :class:`RunSettings` (saved in a checkpoint, so a new
process can finish the run). :class:`TrainingRecord` is a model's training so far, as a
model folder holds it. The functions split the cells, merge histories and fingerprint
the data a checkpoint was trained on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.counts import CountData
from ..errors import InputError
from .loop import HISTORY_COLUMNS, TrainState


def component_name(component: object | None) -> str | None:
    """How a run records an ``elbo=`` or ``optim=`` passed to ``train()``.

    The name of its class (``None`` for the default). A run records it when it starts
    and :meth:`RunSettings.check_components` compares the object passed to ``resume()``
    through this same function, so the two always describe a component alike.

    Examples
    --------
    >>> from pyro.infer import TraceMeanField_ELBO
    >>> component_name(TraceMeanField_ELBO()), component_name(None)
    ('TraceMeanField_ELBO', None)
    """
    return None if component is None else type(component).__name__


@dataclass
class RunSettings:
    """The settings of one ``train()`` call, which ``resume()`` repeats for the epochs left.

    A checkpoint holds them as :meth:`to_dict` (its ``"run"`` entry).

    Attributes
    ----------
    target_epoch
        The epoch count at which the call ends (its first epoch plus ``max_epochs``).
    batch_size, lr, train_size, early_stopping, patience, kl_warmup_epochs, min_delta
        As passed to ``train()`` (``min_delta=None``: the early-stopping threshold is the
        monitored ELBO's noise; :class:`~pyro_scvi.train.hooks.EarlyStopping`).
    restore_best_epoch
        As passed to ``train()`` (:class:`~pyro_scvi.train.hooks.BestEpoch`); ``False`` in
        a checkpoint written before the option existed, whose run restored nothing.
    elbo, optim
        :func:`component_name` of the ELBO and optimizer passed (``None``: the default).
    engine
        How the run stepped (:meth:`pyro_scvi.train.engine.RunEngine.as_dict`), once known.
    checkpoint_dir, checkpoint_every
        Where and how often the run writes checkpoints.
    seed
        The seed the run was started with (its split, initial parameters and streams; a
        continued call keeps the run's own); ``None``: unseeded, or a checkpoint written
        before the seed was recorded.

    Examples
    --------
    >>> s = RunSettings(target_epoch=10, batch_size=128, lr=1e-3, train_size=0.9,
    ...                 early_stopping=False, patience=45, kl_warmup_epochs=400)
    >>> RunSettings.from_dict(s.to_dict()) == s, s.remaining(next_epoch=4)
    (True, 6)
    """

    target_epoch: int
    batch_size: int
    lr: float
    train_size: float
    early_stopping: bool
    patience: int
    kl_warmup_epochs: int
    min_delta: float | None = None
    restore_best_epoch: bool = False
    elbo: str | None = None
    optim: str | None = None
    engine: dict | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The settings as a checkpoint's ``"run"`` entry."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSettings:
        """The settings of a checkpoint's ``"run"`` entry (``TypeError``: it is damaged)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def remaining(self, next_epoch: int) -> int:
        """Epochs left to run when the model's next epoch is ``next_epoch``."""
        return self.target_epoch - next_epoch

    @classmethod
    def for_call(
        cls,
        first_epoch: int,
        max_epochs: int,
        *,
        batch_size: int,
        lr: float,
        train_size: float,
        early_stopping: bool,
        patience: int,
        kl_warmup_epochs: int,
        min_delta: float | None = None,
        restore_best_epoch: bool = False,
        elbo: object | None,
        optim: object | None,
        checkpoint_dir: str | os.PathLike | None,
        checkpoint_every: int,
        guide: object,
        seed: int | None = None,
    ) -> RunSettings:
        """The settings of a ``train()`` call from its arguments, checked first.

        Raises :class:`~pyro_scvi.InputError` for arguments that cannot run; a ``guide``
        that is not ``amortized`` cannot score cells it was not trained on.

        Examples
        --------
        >>> kw = dict(batch_size=128, lr=1e-3, train_size=0.9, early_stopping=False,
        ...           patience=45, kl_warmup_epochs=400, elbo=None, optim=None,
        ...           checkpoint_dir=None, checkpoint_every=0, guide=None)
        >>> RunSettings.for_call(2, 3, **kw).target_epoch
        5
        >>> RunSettings.for_call(0, 0, **kw)
        Traceback (most recent call last):
        ...
        pyro_scvi.errors.InputError: max_epochs=0; train for at least one epoch.
        """
        if max_epochs < 1:
            raise InputError(f"max_epochs={max_epochs}; train for at least one epoch.")
        if lr <= 0:
            raise InputError(f"lr={lr}; the learning rate must be positive.")
        if not 0 < train_size <= 1:
            raise InputError(f"train_size={train_size}; it must be in (0, 1].")
        if train_size < 1 and not getattr(guide, "amortized", True):
            raise InputError(
                f"train_size={train_size}, but a {type(guide).__name__} fits parameters "
                "per cell and cannot score validation cells it is not trained on; pass "
                "train_size=1.0 (held-out cells: pyro_scvi.posterior.gap.refine)."
            )
        if patience < 1:
            raise InputError(f"patience={patience}; wait at least one epoch.")
        if min_delta is not None and not min_delta >= 0:
            raise InputError(
                f"min_delta={min_delta}; use a threshold >= 0 in nats per cell, or None "
                "(the ELBO's noise)."
            )
        if checkpoint_every < 0:
            raise InputError(f"checkpoint_every={checkpoint_every}; use 0 (never) or more.")
        return cls(
            target_epoch=first_epoch + int(max_epochs),
            batch_size=int(batch_size),
            lr=float(lr),
            train_size=float(train_size),
            early_stopping=bool(early_stopping),
            patience=int(patience),
            kl_warmup_epochs=int(kl_warmup_epochs),
            min_delta=None if min_delta is None else float(min_delta),
            restore_best_epoch=bool(restore_best_epoch),
            elbo=component_name(elbo),
            optim=component_name(optim),
            checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
            checkpoint_every=int(checkpoint_every),
            seed=None if seed is None else int(seed),
        )

    def train_arguments(
        self,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> dict[str, Any]:
        """The arguments of ``train()`` that continue this run as it was started.

        ``checkpoint_dir`` and ``checkpoint_every`` replace the run's own when given.

        Examples
        --------
        >>> s = RunSettings(5, 64, 1e-3, 0.9, False, 45, 400, checkpoint_every=2)
        >>> s.train_arguments(checkpoint_every=1)["checkpoint_every"]
        1
        """
        names = ("batch_size", "lr", "train_size", "early_stopping", "patience")
        return {
            **{k: getattr(self, k) for k in names},
            "kl_warmup_epochs": self.kl_warmup_epochs,
            "min_delta": self.min_delta,
            "restore_best_epoch": self.restore_best_epoch,
            "checkpoint_dir": self.checkpoint_dir if checkpoint_dir is None else checkpoint_dir,
            "checkpoint_every": self.checkpoint_every
            if checkpoint_every is None
            else checkpoint_every,
        }

    def check_components(self, *, elbo: object | None, optim: object | None) -> None:
        """Raise :class:`~pyro_scvi.InputError` unless ``elbo`` and ``optim`` are the run's own.

        Examples
        --------
        >>> s = RunSettings(5, 128, 1e-3, 0.9, False, 45, 400, elbo="TraceMeanField_ELBO")
        >>> s.check_components(elbo=None, optim=None)
        Traceback (most recent call last):
        ...
        pyro_scvi.errors.InputError: The run was started with elbo=TraceMeanField_ELBO(); \
pass elbo= a new TraceMeanField_ELBO with the same settings to resume it.
        """
        for name, given in (("elbo", elbo), ("optim", optim)):
            recorded = getattr(self, name)
            if recorded is not None and component_name(given) != recorded:
                raise InputError(
                    f"The run was started with {name}={recorded}(); pass {name}= a new "
                    f"{recorded} with the same settings to resume it."
                )


@dataclass
class TrainingRun:
    """What continues a model's training run where it stopped.

    Attributes
    ----------
    state
        The loop's state: optimizer moments, random streams, the epoch in progress.
        ``train()`` called again continues from it.
    settings
        The settings of the ``train()`` call under way, or of one that was interrupted
        before its last epoch (``resume()`` finishes it); ``None`` once the call ended.
    last
        The settings of the last call, also once it ended: what the run used (its seed,
        learning rate ...), for the record of its results. ``None``: not known (a model
        loaded from a folder, not a checkpoint).

    Examples
    --------
    >>> run = TrainingRun(TrainState.new(0))
    >>> run.interrupted
    False
    """

    state: TrainState
    settings: RunSettings | None = None
    last: RunSettings | None = None

    @property
    def interrupted(self) -> bool:
        """Whether a call of this run stopped before its last epoch."""
        return self.settings is not None


def empty_history() -> pd.DataFrame:
    """The history of a model not trained yet: no rows, the loop's columns.

    Examples
    --------
    >>> list(empty_history().columns)[:2]
    ['epoch', 'train_elbo']
    """
    return pd.DataFrame(columns=HISTORY_COLUMNS)


@dataclass
class TrainingRecord:
    """A model's training so far: its history, its cells' split, and what continues it.

    A new model has the defaults; :mod:`pyro_scvi.io.persistence` reads one from a model
    folder.

    Attributes
    ----------
    history
        One row per epoch trained (:data:`pyro_scvi.train.loop.HISTORY_COLUMNS`).
    engine
        How the last run stepped (:meth:`pyro_scvi.train.engine.RunEngine.as_dict`).
    train_indices, validation_indices
        The cells trained on and held out, fixed by the first run.
    is_trained
        Whether an epoch was completed.
    run
        What continues training (``None``: a new run starts).

    Examples
    --------
    >>> record = TrainingRecord()
    >>> len(record.history), record.is_trained, record.run is None
    (0, False, True)
    """

    history: pd.DataFrame = field(default_factory=empty_history)
    engine: dict | None = None
    train_indices: np.ndarray = field(default_factory=lambda: np.arange(0))
    validation_indices: np.ndarray = field(default_factory=lambda: np.arange(0))
    is_trained: bool = False
    run: TrainingRun | None = None


def next_epoch(history: pd.DataFrame) -> int:
    """The number of the next epoch after ``history`` (0 for none).

    Examples
    --------
    >>> next_epoch(empty_history()), next_epoch(pd.DataFrame({"epoch": [0, 1, 2]}))
    (0, 3)
    """
    return int(history["epoch"].iloc[-1]) + 1 if len(history) else 0


def run_ended(history: pd.DataFrame) -> bool:
    """Whether a ``train()`` call ended at the last epoch of ``history``.

    A call records how it ended (``attrs["stopping"]``) only when it ends, at its last
    epoch: a run that stopped early because it converged is finished although it ran
    fewer epochs than its ``max_epochs``. A record of an earlier epoch is an earlier
    call's.

    Examples
    --------
    >>> h = pd.DataFrame({"epoch": [0, 1, 2]})
    >>> h.attrs["stopping"] = {"epoch": 2, "reason": "converged: ..."}
    >>> run_ended(h), run_ended(pd.DataFrame({"epoch": [0, 1, 2, 3]}))
    (True, False)
    """
    stopping = history.attrs.get("stopping") or {}
    return bool(len(history)) and stopping.get("epoch") == next_epoch(history) - 1


def default_max_epochs(n_cells: int) -> int:
    """scvi-tools' default number of epochs: ``min(400, round(400 * 20000 / n_cells))``.

    Examples
    --------
    >>> default_max_epochs(10_000), default_max_epochs(100_000)
    (400, 80)
    """
    return int(min(400, round(400 * 20000 / n_cells)))


def split_cells(
    n_cells: int, train_size: float, seed: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """The sorted positions of the training and the validation cells, drawn from ``seed``.

    Examples
    --------
    >>> train, validation = split_cells(10, 0.8, seed=0)
    >>> len(train), len(validation), sorted([*train, *validation]) == list(range(10))
    (8, 2, True)
    """
    perm = np.random.default_rng(seed).permutation(n_cells)
    n_train = max(2, int(round(train_size * n_cells)))
    if n_train > n_cells:
        raise InputError(f"Only {n_cells} cells: training needs at least 2.")
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def merge_history(history: pd.DataFrame, new: pd.DataFrame, engine: dict | None) -> pd.DataFrame:
    """``history`` followed by a run's ``new`` rows, ``engine`` recorded as the last run's.

    ``attrs["engines"]`` lists every run's engine in order (``train()`` may be called
    again), ``attrs["stopping"]`` is the last run's. With no new rows, ``history`` itself.

    Examples
    --------
    >>> first = pd.DataFrame({"epoch": [0]}); first.attrs["engine"] = {"threads": 1}
    >>> second = pd.DataFrame({"epoch": [1]}); second.attrs["engine"] = {"threads": 2}
    >>> merged = merge_history(merge_history(empty_history(), first, {"threads": 1}),
    ...                        second, {"threads": 2})
    >>> merged["epoch"].tolist(), merged.attrs["engines"]
    ([0, 1], [{'threads': 1}, {'threads': 2}])
    """
    if not len(new):
        return history
    merged = pd.concat([history, new], ignore_index=True) if len(history) else new
    merged.attrs.update(
        engine=engine, engines=[*history.attrs.get("engines", []), new.attrs.get("engine")]
    )
    if "stopping" in new.attrs:  # how the last run ended
        merged.attrs["stopping"] = new.attrs["stopping"]
    return merged


def fingerprint(data: CountData) -> dict[str, Any]:
    """What a checkpoint checks the data against: the cells, in order, and the counts.

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=5, n_genes=4))
    >>> sorted(fingerprint(data))
    ['n_cells', 'obs_names_sha256', 'total_counts']
    """
    names = "\n".join(map(str, data.obs_names)).encode()
    return {
        "n_cells": int(data.n_cells),
        "obs_names_sha256": hashlib.sha256(names).hexdigest(),
        # from each cell's total: streamed counts have no X in memory
        "total_counts": float(data.total_counts().sum()),
    }


def check_fingerprint(saved: dict[str, Any], data: CountData, where: object) -> None:
    """Raise :class:`~pyro_scvi.InputError` unless ``data`` is what checkpoint ``where`` saw.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=5, n_genes=4)
    >>> saved = fingerprint(pyro_scvi.from_anndata(adata))
    >>> check_fingerprint(saved, pyro_scvi.from_anndata(adata[::-1]), "ckpt")
    Traceback (most recent call last):
    ...
    pyro_scvi.errors.InputError: adata is not the data the checkpoint in ckpt was trained on \
(obs_names_sha256 differ); resume with the same AnnData, cells in the same order.
    """
    now = fingerprint(data)
    if saved != now:
        what = [k for k in now if saved.get(k) != now[k]]
        raise InputError(
            f"adata is not the data the checkpoint in {where} was trained on "
            f"({', '.join(what)} differ); resume with the same AnnData, cells in the same "
            "order."
        )
