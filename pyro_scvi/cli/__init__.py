"""The ``pyro-scvi`` command line: one module per sub-command.

- ``pyro-scvi fit`` (:mod:`pyro_scvi.cli.fit`): fit scVI to an ``.h5ad``; write the latent
  space, the normalized expression, the model and the training curves.
- ``pyro-scvi evaluate`` (:mod:`pyro_scvi.cli.evaluate`): held-out fit of a saved model, a
  JSON summary on stdout.
- ``pyro-scvi ppc`` (:mod:`pyro_scvi.cli.ppc`): posterior predictive checks and the
  criticism page of a saved model.
- ``pyro-scvi de`` (:mod:`pyro_scvi.cli.de`): differential expression between groups of
  cells.
- ``pyro-scvi plot`` (:mod:`pyro_scvi.cli.plot`): a UMAP / t-SNE picture of a latent space.
- ``pyro-scvi map-query`` (:mod:`pyro_scvi.cli.map_query`): map new batches onto a saved
  reference model and embed them.

Each command module has ``add_parser(sub)``, which declares the command's options and help
text, and ``run(args, argv)``, which does the work and returns the exit status (``argv``, the
command line as given, is quoted by ``fit`` in the command that resumes a run). What
several commands share is in ``pyro_scvi/cli/_common.py``: the vocabulary (``VOCABULARY``:
one option string, ``dest`` and set of values per idea -- INPUT, MODEL_DIR, ``-o``,
``--model-dir``, ``--cells``, ``--n-samples``, ``--batch-size``, the obs keys,
``--data-source``, ``--seed``, ``--device``, ``--threads`` -- which every command takes
from there, a replaced spelling accepted with a note on stderr until 0.3), option types,
reading INPUT and adding results to an ``.h5ad``; :func:`main` parses the command line,
runs the command and turns its errors into exit statuses. The user documentation of
``fit`` (its outputs, the checks before training, a failed or interrupted run) is the
docstring of :mod:`pyro_scvi.cli.fit`, which ``pyro-scvi fit --help`` prints.

Every command: bad arguments or input give one line on stderr and exit status 2; a failed
write exits with status 1 and removes unfinished files; SIGINT (Ctrl-C) and SIGTERM
remove unfinished files and exit with status 130 and 143 (``pyro_scvi.cli._signals``),
never 0; status 141 when stdout's reader has gone (``... | head``). Started with stdout
closed (``>&-``), a command whose result goes to stdout (``evaluate``'s JSON: its module's
``STDOUT_RESULT``) refuses before the work, one line and status 1, as ``cat`` does; the
others do their work and drop the summary line they would print there. ``fit`` adds its
own statuses for a non-finite loss and for SIGINT or SIGTERM. ``--help`` imports no
torch: the command modules import the package's numerical parts inside ``run``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from ..errors import InputError
from . import de, evaluate, fit, map_query, plot, ppc
from ._common import PROG, _Parser
from ._signals import handling_signals, signal_name
from .fit import DISPERSION_NAMES, LIKELIHOOD_NAMES

__all__ = ["COMMANDS", "DISPERSION_NAMES", "LIKELIHOOD_NAMES", "PROG", "build_parser", "main"]

#: Sub-command name -> its module, in the order ``pyro-scvi --help`` lists them.
COMMANDS = {
    "fit": fit,
    "evaluate": evaluate,
    "ppc": ppc,
    "de": de,
    "plot": plot,
    "map-query": map_query,
}


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-scvi`` argument parser."""
    parser = _Parser(prog=PROG, description="scVI in Pyro: fit models to scRNA-seq counts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-scvi`` console script."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    closed = _guard_closed_streams()
    args = build_parser().parse_args(argv)
    result = getattr(COMMANDS[args.command], "STDOUT_RESULT", None)
    if "stdout" in closed and result:
        # as cat or ls do (`cat f >&-`: "write error: Bad file descriptor", status 1), but
        # before the work rather than after it
        print(
            f"{PROG} {args.command}: error: stdout is closed, and {args.command} writes "
            f"{result} there; redirect it to a file or to /dev/null instead.",
            file=sys.stderr,
        )
        return 1
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    with handling_signals() as received:
        status = _run_command(args, argv)
        if received and status == 0:
            # the exception of the signal was swallowed where Python ignores them (a
            # weakref callback): the command finished, but never exit 0 after a signal
            print(
                f"{PROG} {args.command}: {signal_name(received[0])} arrived as the command "
                "finished; its outputs are complete.",
                file=sys.stderr,
            )
            status = 128 + received[0]
    return status


def _run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    try:
        return COMMANDS[args.command].run(args, argv)
    except InputError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout's reader has gone (e.g. `pyro-scvi evaluate ... | head`): stop quietly,
        # as Unix tools do, and keep Python from complaining when it flushes at exit
        _detach_stdout()
        return 128 + 13  # as if killed by SIGPIPE
    except KeyboardInterrupt as err:
        signum = getattr(err, "signal", signal.SIGINT)
        print(
            f"{PROG} {args.command}: interrupted by {signal_name(signum)}; unfinished files "
            "were removed.",
            file=sys.stderr,
        )
        return 128 + signum
    except OSError as err:  # a write failed (disk full, permissions changed meanwhile)
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"{PROG} {args.command}: error: {err.strerror or err}{where}; unfinished files were "
            "removed.",
            file=sys.stderr,
        )
        return 1


def _guard_closed_streams() -> list[str]:
    """The standard streams (``"stdout"``, ``"stderr"``) the process was started without.

    Started with one closed (``>&-``), Python sets it to ``None``; its descriptor is then
    the next one a file gets, and a library writing there would write into that file. It
    is pointed at /dev/null instead, and a closed stderr gets a Python stream on it too:
    ``print(..., file=None)`` would write the messages meant for it to stdout.
    """
    closed = []
    for fd, name in ((1, "stdout"), (2, "stderr")):
        if getattr(sys, name) is not None:
            continue
        closed.append(name)
        try:
            os.fstat(fd)
        except OSError:  # nothing holds the descriptor: put /dev/null there
            try:
                null = os.open(os.devnull, os.O_WRONLY)
                if null != fd:
                    os.dup2(null, fd)
                    os.close(null)
            except OSError:
                pass
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return closed


def _detach_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. in tests)
        pass
