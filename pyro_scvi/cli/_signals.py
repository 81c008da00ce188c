"""SIGINT and SIGTERM on the command line: one orderly way out, never a silent one.

While a command runs, :func:`handling_signals` makes the first SIGINT or SIGTERM raise
:class:`~pyro_scvi.errors.Interrupted` (a :class:`KeyboardInterrupt` that knows its signal),
so a SIGTERM unwinds like Ctrl-C: ``finally`` blocks remove temporary files, ``fit`` keeps
a trained model, and :func:`pyro_scvi.cli.main` exits with ``128 + signal`` (130, 143).
Later signals are recorded, not raised, so that the cleanup the first one started (a few
renames, saving a trained model) is not cut short. Training installs its own handlers
(:func:`pyro_scvi.train.loop.stop_on_signals`), and steps that must not stop half-way hold
signals until they end (:func:`pyro_scvi.io.files.deferred_signals`).

Python drops an exception raised where it cannot propagate (a weakref callback, a
``__del__``), so the exception alone is not proof: :func:`check` raises again if a signal
arrived at all, and a command calls it before it moves its outputs into place. (Python's
report of the dropped exception, a traceback on stderr, is left out: it is acted on.)
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

from ..errors import Interrupted

#: The signals that stop a command in order.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Signals received while the current command runs (first first).
received: list[int] = []


def signal_name(signum: int) -> str:
    """``"SIGTERM"`` for 15, ...

    Examples
    --------
    >>> signal_name(15)
    'SIGTERM'
    """
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _handler(signum: int, frame) -> None:
    received.append(signum)
    if len(received) == 1:
        raise Interrupted(f"interrupted by {signal_name(signum)}", signal=signum)


def check() -> None:
    """Raise :class:`~pyro_scvi.errors.Interrupted` if a signal arrived during the command."""
    if received:
        raise Interrupted(f"interrupted by {signal_name(received[0])}", signal=received[0])


@contextlib.contextmanager
def handling_signals() -> Iterator[list[int]]:
    """Install the command line's handlers for the block; yield the signals received.

    Outside the main thread (where Python cannot handle signals) nothing is installed.
    """
    received.clear()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    hook = sys.unraisablehook

    def unraisable(report) -> None:
        if not isinstance(report.exc_value, Interrupted):
            hook(report)

    sys.unraisablehook = unraisable
    try:
        yield received
    finally:
        sys.unraisablehook = hook
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
