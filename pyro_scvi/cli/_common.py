"""What the sub-commands share: the vocabulary, option types, reading INPUT, writing results.

The command line has one vocabulary (:data:`VOCABULARY`): an idea that several commands
express (the cells to score, the data source, the device, threads, INPUT, OUTPUT, the
model folder, ...) has one option string, one ``dest`` and one set of values in every
command, and every command declares it through :func:`add_idea` (or a helper here built on
it), never by its own ``add_argument``; ``tests/test_cli_vocabulary.py`` walks the parsers
and checks it. A spelling replaced by the vocabulary keeps working for one release: it is
not listed by ``--help`` and prints a deprecation note on stderr (:data:`DEPRECATED_IN`).

Every command reads its INPUT through :func:`_read_data` (backed first; loaded or streamed
by :func:`pyro_scvi.data.placement.choose_data_source`, or as ``--data-source`` says) and
takes ``--seed``, ``--device`` and ``--threads`` from :func:`_add_run_options`. Bad option
values become one line on stderr and exit status 2 (:class:`_Parser`).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .._version import REMOVED_IN
from ..errors import InputError

PROG = "pyro-scvi"

#: The release that removes the spellings the vocabulary replaced (as the flat import paths).
DEPRECATED_IN = REMOVED_IN


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# Option types: each refuses a bad value with a message naming it (argparse adds the option).
def _number(text: str, convert, valid, expected: str, out_of_range: str | None = None):
    """``convert(text)`` when ``valid`` of it; else ``ArgumentTypeError`` naming ``text``.

    ``expected`` says what was expected of a text that ``convert`` cannot read, and of a
    value outside the range unless ``out_of_range`` says it otherwise.
    """
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"{out_of_range or expected}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "expected a positive integer")


def _positive_float(text: str) -> float:
    return _number(
        text,
        float,
        lambda v: math.isfinite(v) and v > 0,
        "expected a positive number",
        "expected a positive finite number",
    )


def _seed(text: str) -> int:
    return _number(
        text,
        int,
        lambda v: 0 <= v < 2**32,
        "expected an integer seed",
        f"the seed must be in 0..{2**32 - 1}",
    )


def _non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "expected an integer >= 0")


# ------------------------------------------------------------------ the vocabulary
@dataclass(frozen=True, eq=False)
class Idea:
    """One idea of the command line and its one spelling, in every command that has it.

    Attributes
    ----------
    flags
        The option strings (``()``: a positional argument).
    dest
        The attribute of the parsed arguments that holds it.
    metavar
        Its name in usage and help (``None``: argparse's, from ``dest`` or ``choices``); a
        file's is this name plus the suffix the command writes (``OUTPUT.h5ad``).
    choices
        The values it takes (``None``: any value its type accepts).
    deprecated
        Old value -> its spelling now: still accepted, with a note on stderr, until
        :data:`DEPRECATED_IN`; ``--help`` lists only the new ones.
    meaning
        What it is, in the words of the help.
    """

    flags: tuple[str, ...]
    dest: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    deprecated: Mapping[str, str] = field(default_factory=dict)
    meaning: str = ""


#: Idea -> its spelling. Every command that expresses an idea declares it with
#: :func:`add_idea` (directly or through the helpers below), so the option string, ``dest``,
#: metavar and values are these in every command. Obs and obsm columns take scanpy's and
#: scvi-tools' names (``--batch-key``, ``--groupby``, ``--color``, ``--use-rep``), each a KEY.
VOCABULARY: dict[str, Idea] = {
    # what a command reads and writes
    "input": Idea((), "input", "INPUT", meaning="the cells: an .h5ad, or a shipped dataset"),
    "saved_model": Idea((), "model_dir", "MODEL_DIR", meaning="a folder written by fit / save()"),
    "output": Idea(("-o", "--output"), "output", "OUTPUT", meaning="the file the command writes"),
    "model_dir": Idea(("--model-dir",), "model_dir", "DIR", meaning="where the model is saved"),
    "trust_model": Idea(
        ("--trust-model",),
        "trust_model",
        meaning="load a model folder that needs full unpickling (only one you trust)",
    ),
    # which cells, how many draws, how many at a time
    "cells": Idea(
        ("--cells",),
        "cells",
        choices=("held-out", "training", "all"),
        deprecated={"heldout": "held-out"},
        meaning="the model's validation cells, its training cells, or every cell of INPUT",
    ),
    "n_samples": Idea(("--n-samples",), "n_samples", meaning="posterior draws per cell"),
    "batch_size": Idea(("--batch-size",), "batch_size", meaning="cells per minibatch"),
    "observed_library": Idea(
        ("--observed-library",), "observed_library", meaning="condition on the observed library"
    ),
    # columns of obs and obsm
    "batch_key": Idea(("--batch-key",), "batch_key", "KEY", meaning="obs column of batches"),
    "groupby": Idea(("--groupby",), "groupby", "KEY", meaning="obs column of groups"),
    "sample_key": Idea(("--sample-key",), "sample_key", "KEY", meaning="obs column of replicates"),
    "color": Idea(("--color",), "color", "KEY", meaning="obs columns to colour by"),
    "use_rep": Idea(("--use-rep",), "use_rep", "KEY", meaning="obsm key of a representation"),
    # training
    "max_epochs": Idea(("--max-epochs",), "max_epochs", meaning="passes over the cells"),
    "lr": Idea(("--lr",), "lr", meaning="learning rate"),
    "quiet": Idea(("--quiet",), "quiet", meaning="no progress bar"),
    # where and how it runs
    "data_source": Idea(
        ("--data-source",),
        "data_source",
        choices=("auto", "memory", "streamed"),
        meaning="load INPUT's counts, or read them from the file",
    ),
    "seed": Idea(("--seed",), "seed", meaning="random seed"),
    "device": Idea(("--device",), "device", choices=("auto", "cpu", "cuda"), meaning="device"),
    "threads": Idea(("--threads",), "threads", meaning="CPU threads for torch"),
}


def add_idea(p: argparse.ArgumentParser, name: str, **kwargs) -> argparse.Action:
    """Add the idea ``name`` of :data:`VOCABULARY` to ``p``, spelled as the table says.

    ``kwargs`` are ``add_argument``'s (type, default, help, ...), never the spelling: the
    option strings, ``dest`` and values are the table's. A file's ``metavar`` may add the
    suffix the command writes. The action records the idea as ``action.idea``.
    """
    idea = VOCABULARY[name]
    metavar = kwargs.pop("metavar", idea.metavar)
    if metavar != idea.metavar and not str(metavar).startswith(f"{idea.metavar}."):
        raise ValueError(f"{name}'s metavar is {idea.metavar} (plus a file suffix), not {metavar}")
    if metavar is not None:
        kwargs["metavar"] = metavar
    if idea.choices is not None:
        kwargs.update(choices=list(idea.choices), type=_value_of(name, idea))
    if idea.flags:
        action = p.add_argument(*idea.flags, dest=idea.dest, **kwargs)
    else:
        action = p.add_argument(idea.dest, **kwargs)
    action.idea = name
    return action


def _value_of(name: str, idea: Idea):
    """The ``type`` of an idea with choices: a deprecated value becomes its new spelling."""

    def value(text: str) -> str:
        new = idea.deprecated.get(text)
        if new is None:
            return text
        flag = idea.flags[0] if idea.flags else idea.metavar
        print(
            f"{PROG}: {flag} {text} is deprecated and will be removed in {DEPRECATED_IN}; "
            f"use {flag} {new}",
            file=sys.stderr,
        )
        return new

    value.__name__ = name  # argparse names the type in its messages
    return value


def _add_input(p: argparse.ArgumentParser, what: str, shipped: bool = True) -> None:
    """INPUT, the positional argument every command reads its cells from."""
    also = ", or a shipped dataset (pbmc8k_200hvg)" if shipped else ""
    add_idea(p, "input", help=f"{what}{also}")


def _add_saved_model(p: argparse.ArgumentParser) -> None:
    """MODEL_DIR, the positional argument naming the saved model a command reads."""
    add_idea(p, "saved_model", help="directory written by fit / save()")


def _add_trust_model(p: argparse.ArgumentParser) -> None:
    """``--trust-model``: allow full unpickling of the model folders the command reads."""
    add_idea(
        p,
        "trust_model",
        action="store_true",
        help="load a model folder whose files need more than pyro_scvi's own components "
        "(e.g. a prior class of your own module) by full unpickling, which runs code from "
        "the files: only for folders you trust. Without it nothing in a folder runs, and "
        "such a folder is refused (pyro_scvi.io.pickling)",
    )


def _add_output(p: argparse.ArgumentParser, suffix: str, what: str) -> None:
    """``-o/--output OUTPUT<suffix>``, the file the command writes (required)."""
    add_idea(p, "output", required=True, metavar=f"OUTPUT{suffix}", help=what)


def _add_model_dir(p: argparse.ArgumentParser, what: str) -> None:
    """``--model-dir DIR``: where a command that trains saves its model."""
    add_idea(
        p,
        "model_dir",
        help=f"where to save the {what} (default: OUTPUT without .h5ad, plus _model)",
    )


def _add_cells(p: argparse.ArgumentParser, what: str) -> None:
    """``--cells held-out|training|all``: which cells a command scores or checks."""
    add_idea(
        p,
        "cells",
        default="held-out",
        help=f"{what}: held-out (default: the validation cells training held out), training "
        "(the cells it trained on) -- both need INPUT to be the data the model was fitted to "
        "-- or all (every cell of INPUT, e.g. of a file of new cells)",
    )


def _add_n_samples(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--n-samples``: posterior draws per cell (or per group)."""
    add_idea(
        p, "n_samples", type=_positive_int, default=default, help=f"{what} (default {default})"
    )


def _add_batch_size(
    p: argparse.ArgumentParser, default: int, what: str = "cells per pass"
) -> None:
    """``--batch-size``: cells per minibatch."""
    add_idea(
        p, "batch_size", type=_positive_int, default=default, help=f"{what} (default {default})"
    )


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """``--max-epochs``, ``--batch-size`` and ``--lr`` of the commands that train."""
    add_idea(
        p,
        "max_epochs",
        type=_positive_int,
        help="the most epochs (default: as scvi-tools); training stops sooner once the "
        "held-out ELBO has converged",
    )
    _add_batch_size(p, 128, "cells per training minibatch")
    add_idea(p, "lr", type=_positive_float, default=1e-3, help="learning rate (default 0.001)")


def _add_quiet(p: argparse.ArgumentParser) -> None:
    """``--quiet``: no progress bar."""
    add_idea(p, "quiet", action="store_true", help="no progress bar")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """``--seed``, ``--device`` and ``--threads``, which every command takes."""
    add_idea(p, "seed", type=_seed, default=0, help="random seed, 0..2**32-1 (default 0)")
    add_idea(
        p,
        "device",
        default="auto",
        help="auto (default: cuda when a GPU is visible, else cpu), cpu or cuda",
    )
    add_idea(
        p,
        "threads",
        type=_positive_int,
        help="CPU threads for torch (default: training follows the cores that other "
        "processes leave free, re-measured as it goes; other commands use torch's default)",
    )


def _add_data_source_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--data-source``; ``what`` says what not loading the counts means for the command."""
    add_idea(
        p,
        "data_source",
        default="auto",
        help=f"load INPUT's counts into memory, or {what}: auto (default: streamed when they "
        "would take more than half the available memory; reported), memory or streamed",
    )


def _output_path(args: argparse.Namespace, suffix: str, note: str = "") -> Path:
    """``-o``'s path, refused (one line, status 2) unless it ends in ``suffix``."""
    output = Path(args.output)
    if output.suffix != suffix:
        raise InputError(f"OUTPUT {output} must end in {suffix}{note}.")
    return output


def _refuse_input(args: argparse.Namespace, *paths: Path) -> None:
    """Refuse to write any of ``paths`` over INPUT (the input is never overwritten)."""
    input_path = Path(args.input)
    if not input_path.exists():
        return
    for path in paths:
        if path.resolve() == input_path.resolve():
            name = "OUTPUT" if path == Path(args.output) else str(path)
            raise InputError(
                f"{name} is the INPUT file; choose another -o: the input is never overwritten."
            )


def _same_or_inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or lies inside it (as written, or after links)."""
    for a, b in (
        (Path(os.path.abspath(path)), Path(os.path.abspath(folder))),
        (path.resolve(), folder.resolve()),
    ):
        if a == b or b in a.parents:
            return True
    return False


def _check_outputs(
    args: argparse.Namespace,
    files: Mapping[str, Path],
    *,
    models: Mapping[str, Path] | None = None,
    folders: Mapping[str, Path] | None = None,
) -> None:
    """Every check on a command's outputs that can be made before it reads anything.

    ``files`` and ``folders`` name the outputs (``{"-o": path}``; a folder is a model
    folder the command saves), ``models`` the model folders it reads
    (``{"MODEL_DIR": path}``). Each output must not be INPUT, nor be, hold or lie inside a
    model folder read (the inputs are never overwritten), and must be writable: a file not
    a folder in a writable place, a folder empty or holding only a pyro_scvi model
    (:func:`pyro_scvi.io.files.check_output_file`, ``check_output_dir``). The first
    failure raises :class:`~pyro_scvi.errors.OutputError`, one line naming the option.
    """
    from ..errors import OutputError
    from ..io.files import check_output_dir, check_output_file

    models, folders = models or {}, folders or {}
    input_path = Path(args.input)
    inputs = [input_path] if input_path.exists() else []
    outputs = {**files, **folders}
    for name, path in outputs.items():
        for model_name, model in models.items():
            if _same_or_inside(path, model) or _same_or_inside(model, path):
                raise OutputError(
                    f"{name} {path} would write into {model_name} {model}, which this command "
                    f"reads; choose another {name}: a model the command reads is never "
                    "overwritten."
                )
        if inputs and _same_or_inside(input_path, path):
            raise OutputError(
                f"{name} {path} is the INPUT file; choose another {name}: the input is never "
                "overwritten."
            )
    for name, path in files.items():
        check_output_file(path, what=name)
    if folders:
        from ..io.model_dir import is_model_dir

        for name, path in folders.items():
            others = [p for n, p in outputs.items() if n != name]
            check_output_dir(path, owned=is_model_dir, what=name, protect=[*inputs, *others])


def _check_fitted_cells(model, cells: str) -> None:
    """``--cells held-out`` and ``training`` name cells of the data the model was fitted to.

    Refuse (one line, status 2) when INPUT has another number of cells than that data.
    """
    n_fitted = len(model.train_indices) + len(model.validation_indices)
    if cells != "all" and model.data.n_cells != n_fitted:
        raise InputError(
            f"--cells {cells} names cells of the data the model was fitted to, but INPUT has "
            f"{model.data.n_cells} cells and the model was fitted to {n_fitted}; pass the data "
            "it was fitted to, or --cells all to use every cell of INPUT."
        )


def _cell_indices(model, cells: str):
    """The indices of ``--cells`` in the model's data (``None``: every cell)."""
    import numpy as np

    _check_fitted_cells(model, cells)
    if cells == "all":
        return None
    if cells == "held-out" and not len(model.validation_indices):
        raise InputError(
            "The model held out no cells (trained with train_size=1); pass --cells training "
            "or --cells all."
        )
    return np.asarray(model.validation_indices if cells == "held-out" else model.train_indices)


def _read_h5ad(path: Path, **kwargs):
    """``anndata.read_h5ad(path, **kwargs)``; a file it cannot read is one InputError line."""
    import anndata

    try:
        return anndata.read_h5ad(path, **kwargs)
    except Exception as err:  # h5py/anndata raise many types for a bad file
        # h5py messages can span lines; the CLI promises one line
        reason = " ".join(str(err).split())
        raise InputError(f"cannot read {path} as .h5ad ({type(err).__name__}: {reason})") from err


def _read_input(text: str):
    """``(adata, path)``: an ``.h5ad`` file read whole, or a shipped dataset (path ``None``)."""
    import anndata

    from ..data import datasets

    path = Path(text)
    if path.exists():
        return _read_h5ad(path), path
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
    backed = _read_h5ad(path, backed="r")
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
    from ..io.outputs import append_elements, copy_h5ad, write_h5ad

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
        write_h5ad(adata, path)  # a full disk: one OSError, never a crash
