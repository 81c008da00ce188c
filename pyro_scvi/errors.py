"""Exceptions of pyro_scvi, in a module that imports nothing heavy.

Every layer raises these and takes them from here only. The command line imports this at
start-up, before it knows whether it needs torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


class InputError(ValueError):
    """Raised when user input (AnnData, arguments) cannot be used; the message says the fix."""


class DatasetError(InputError):
    """A dataset cannot be had as registered; the message says what to do."""


class ChecksumError(DatasetError):
    """A dataset file or a downloaded source file is not the one the registry names."""


class DatasetUnavailableError(DatasetError):
    """A dataset is in none of the folders searched, and downloading it was not possible."""


class InputChanged(InputError):
    """An input file was replaced, changed or deleted while a run was reading it.

    Nothing is written from it; the message says what changed. ``pyro-scvi fit`` keeps the
    trained model as a checkpoint and says the command that writes the outputs from it.
    """


class OutputError(InputError):
    """An output cannot be written where asked; the message says what to change."""


class ModelFileError(InputError):
    """A model folder cannot be read: missing, damaged, foreign or from a newer version."""


class UnsafeModelFileError(ModelFileError):
    """A model file needs full unpickling, which runs code from it; ``names`` lists why.

    Raised when a ``model.pt`` or ``train_state.pt`` names classes or functions beyond
    pyro_scvi's allow-list (:mod:`pyro_scvi.io.pickling`) and ``trust`` was not given;
    nothing of the file has been unpickled.
    """

    def __init__(self, message: str, names: list[str] | None = None) -> None:
        super().__init__(message)
        self.names = list(names or [])


class TrainingError(RuntimeError):
    """Training hit a non-finite loss (or batch-norm statistics); the last good epoch is back.

    The parameters were restored to the end of the last complete epoch.

    ``history`` holds the rows of the epochs completed before the failure (none: the run
    failed in its first epoch, and the parameters are back where the run started).
    """

    history: pd.DataFrame | None = None


class TrainingWarning(UserWarning):
    """Training finished, but its result is suspect (e.g. a diverged ELBO).

    The message says which setting to change; the run's engine record
    (``SCVI.engine["diverged"]``) keeps it.
    """


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signal`` is its number (exit status ``128 + signal``).

    A :class:`KeyboardInterrupt`, so that code which does not know it stops as on Ctrl-C,
    running its ``finally`` blocks (temporary files are removed on the way out). The
    command line raises it for SIGTERM too (:mod:`pyro_scvi.cli`), where the default
    would end the process on the spot.
    """

    def __init__(self, message: str = "", *, signal: int = 2) -> None:
        super().__init__(message)
        self.signal = signal


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped cleanly on SIGINT or SIGTERM, after finishing the step in progress.

    A :class:`KeyboardInterrupt`, so code that does not know it stops as on Ctrl-C.
    ``signal`` is the signal's number, ``epoch`` and ``step`` where the run stopped (the
    next minibatch to run), ``checkpoint`` the folder written (``None``: none asked for,
    or it could not be written: ``checkpoint_error`` says why) and ``history`` the epochs
    completed. ``SCVI.resume()`` or ``train()`` continue.
    """

    def __init__(self, message: str, *, signal: int, epoch: int, step: int) -> None:
        super().__init__(message)
        self.signal, self.epoch, self.step = signal, epoch, step
        self.checkpoint: str | None = None
        self.checkpoint_error: str | None = None
        self.history: pd.DataFrame | None = None
