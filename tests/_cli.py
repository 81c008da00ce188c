"""The ``pyro-scvi`` command line run in-process, for the tests that call it.

The test files import it as ``from _cli import run_cli``. ``tests/`` is not a package, and
pytest's default ("prepend") import mode puts this folder first on ``sys.path`` when it
imports ``conftest.py`` and the test files, so the import works from the repository root,
from ``tests/`` and from a fresh clone, with ``pytest`` or ``python -m pytest``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from typing import Literal, TextIO

from pyro_scvi.cli import main


def run_cli(
    argv: Sequence[object],
    *,
    stdout: Literal["pass", "drop"] | TextIO = "pass",
    catch_exit: bool = True,
) -> tuple[int | str | None, str]:
    """``main(argv)`` in-process: ``(exit status, stderr)``.

    ``argv`` is the command line after ``pyro-scvi``; paths and numbers become strings.
    ``stdout``: ``"pass"`` leaves the command's stdout to pytest's capture (``capsys``
    reads it), ``"drop"`` discards it, a stream receives it (a closed pipe, say).
    ``catch_exit``: argparse's usage errors raise ``SystemExit``; caught, its code is the
    status, as a shell sees it (2). False lets it fail the test instead, for tests where a
    status of 2 must come from the command's own refusal, not from argparse.
    """
    err = io.StringIO()
    out = stdout
    if isinstance(stdout, str):
        if stdout not in ("pass", "drop"):
            raise ValueError(f"stdout={stdout!r}; give 'pass', 'drop' or a stream.")
        out = None if stdout == "pass" else io.StringIO()
    to_out = contextlib.nullcontext() if out is None else contextlib.redirect_stdout(out)
    with contextlib.redirect_stderr(err), to_out:
        try:
            status = main([str(a) for a in argv])
        except SystemExit as exc:
            if not catch_exit:
                raise
            status = exc.code
    return status, err.getvalue()


def run_cli_output(argv: Sequence[object]) -> tuple[int | str | None, str, str]:
    """``main(argv)`` in-process: ``(exit status, stdout, stderr)``."""
    out = io.StringIO()
    status, err = run_cli(argv, stdout=out)
    return status, out.getvalue(), err
