"""What the sub-commands share: option types, common options, reading INPUT, writing results.

Every command reads its INPUT through :func:`_read_data` (backed first; loaded or streamed
by :func:`pyro_scvi.data.placement.choose_data_source`, or as ``--data-source`` says) and
takes ``--seed``, ``--device`` and ``--threads`` from :func:`_add_run_options`. Bad option
values become one line on stderr and exit status 2 (:class:`_Parser`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import InputError

PROG = "pyro-scvi"


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Option types: each refuses a bad value with a message naming it (argparse adds the option).
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"the seed must be in 0..{2**32 - 1}, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--device`` and ``--threads``, which every command takes."""
    p.add_argument("--seed", type=_seed, default=0, help="random seed, 0..2**32-1 (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: training follows the cores that other "
        "processes leave free, re-measured as it goes; other commands use torch's default)",
    )


def _add_data_source_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--data-source``; ``what`` says what not loading the counts means for the command."""
    p.add_argument(
        "--data-source",
        choices=["auto", "memory", "streamed"],
        default="auto",
        help=f"load INPUT's counts into memory, or {what}: auto (default: streamed when they "
        "would take more than half the available memory; reported), memory or streamed",
    )


def _read_input(text: str):
    """``(adata, path)``: an ``.h5ad`` file read whole, or a shipped dataset (path ``None``)."""
    import anndata

    from ..data import datasets

    path = Path(text)
    if path.exists():
        try:
            return anndata.read_h5ad(path), path
        except Exception as err:  # h5py/anndata raise many types for a bad file
            # h5py messages can span lines; the CLI promises one line
            reason = " ".join(str(err).split())
            raise InputError(
                f"cannot read {path} as .h5ad ({type(err).__name__}: {reason})"
            ) from err
    if text in datasets.SHIPPED:
        # through the dataset's loader where it has one (tests shrink it there)
        loader = getattr(datasets, text, None)
        return (loader() if callable(loader) else anndata.read_h5ad(datasets.path(text))), None
    raise InputError(
        f"INPUT {text!r} is neither an existing file nor a shipped dataset "
        f"({', '.join(datasets.SHIPPED)})."
    )


def _read_data(args: argparse.Namespace, *, layer: str | None = None):
    """A command's INPUT: ``(adata, streamed, reason)``, the file opened backed when streamed.

    A file is opened in backed mode first (nothing of the counts is read), and
    :func:`pyro_scvi.data.placement.choose_data_source` decides from the size of its counts
    (``layer``, default ``.X``) whether to load them (``adata.to_memory()``) or stream them;
    ``--data-source`` decides instead when given. Every command that reads INPUT reads it
    here, and reports ``reason``.
    """
    import anndata

    from ..data.placement import choose_data_source

    asked = {"auto": None, "memory": False, "streamed": True}[args.data_source]
    path = Path(args.input)
    if not path.exists():
        if asked:
            raise InputError(
                "--data-source streamed reads an .h5ad file; INPUT is a shipped dataset, which "
                "is loaded into memory."
            )
        adata, _ = _read_input(args.input)
        return adata, False, "memory: a shipped dataset"
    try:
        backed = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for a bad file
        reason = " ".join(str(err).split())  # one line
        raise InputError(f"cannot read {path} as .h5ad ({type(err).__name__}: {reason})") from err
    if layer is not None and layer not in backed.layers:
        known = ", ".join(map(repr, backed.layers.keys())) or "none"
        raise InputError(
            f"Layer {layer!r} not found in INPUT's layers (available: {known}); pass "
            "--layer naming the layer holding raw counts, or leave it out for .X."
        )
    streamed, reason = choose_data_source(backed, layer=layer, asked=asked)
    if streamed:
        return backed, True, reason
    try:
        adata = backed.to_memory()
    finally:
        backed.file.close()
    return adata, False, reason


def _write_results_h5ad(adata, path: Path) -> None:
    """Write ``adata`` with its results (``obsm["X_pyro_scvi"]``, ``uns["pyro_scvi"]``).

    A streamed (backed) ``adata`` is never loaded: its file is copied byte for byte and the
    results are added to the copy.
    """
    from ..io.outputs import append_elements, copy_h5ad

    if adata.isbacked:
        copy_h5ad(adata.filename, path)
        append_elements(
            path,
            {
                "obsm": {"X_pyro_scvi": adata.obsm["X_pyro_scvi"]},
                "uns": {"pyro_scvi": adata.uns["pyro_scvi"]},
            },
        )
    else:
        adata.write_h5ad(path)
