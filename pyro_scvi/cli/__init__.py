"""Command line: ``pyro-scvi fit INPUT.h5ad -o OUTPUT.h5ad``.

INPUT is an ``.h5ad`` of raw counts, or the name of a dataset shipped with the package
(``pbmc8k_200hvg``). OUTPUT is a new ``.h5ad``: the input plus

- ``obsm["X_pyro_scvi"]``: posterior mean of ``z``;
- ``layers["pyro_scvi_normalized"]``: normalized expression (posterior mean of ``rho``,
  scaled to the median library size), dense cells x genes float32, written by default only
  up to 50 million entries (``pyro_scvi.io.outputs.DENSE_NORMALIZED_MAX_ENTRIES``; 200 MB):
  ``--normalized all`` writes it at any size, ``--normalized none`` never;
  ``--normalized-genes GENE ...`` (or ``--normalized-genes-file FILE``, one name a line)
  writes only those genes, as the DataFrame ``obsm["pyro_scvi_normalized_genes"]``;
- ``uns["pyro_scvi"]``: ``params`` (the settings, the normalized-expression decision and
  why, how the counts were read) and ``history`` (per-epoch ELBOs).

INPUT is opened in anndata's backed mode; its counts are loaded when they fit in memory
and otherwise streamed from the file as training goes (``--data-source``; the rule is
``pyro_scvi.data.placement.choose_data_source``). A streamed run never loads the counts: OUTPUT is
a byte copy of INPUT with the results added, and the normalized expression is computed and
written a chunk of cells at a time.

The model is saved to ``--model-dir`` (default: ``OUTPUT`` without ``.h5ad``, plus
``_model``) and the training curves to ``OUTPUT`` without ``.h5ad``, plus ``_training.png``.

Outputs are checked before training (writable, not a folder, not the input, room on the
disk); each is written under a temporary name and renamed into place at the end, the
``.h5ad`` last, so a run leaves all of its outputs or none beside another run's. The input
is never overwritten, and a model folder is replaced only if it holds a pyro_scvi model.
Bad arguments give one line on stderr and exit status 2. A non-finite loss exits with
status 1: after at least one complete epoch the outputs hold that epoch's model, else
nothing is written. SIGINT (Ctrl-C) or SIGTERM stop training after the current step, write
a checkpoint (``--checkpoint-dir``, default ``OUTPUT`` without ``.h5ad``, plus
``_checkpoint``) and the outputs so far, and exit with status 130 or 143 and the command
that resumes the run (``--resume``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError

#: ``--likelihood`` choices: the keys of :data:`pyro_scvi.model.likelihoods.LIKELIHOODS`, listed
#: here so that ``--help`` does not import torch (a test checks they agree).
LIKELIHOOD_NAMES = ("nb", "poisson", "zinb", "zip")

PROG = "pyro-scvi"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    p.add_argument("--seed", type=_seed, default=0, help="random seed, 0..2**32-1 (default 0)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: training follows the cores that other "
        "processes leave free, re-measured as it goes; other commands use torch's default)",
    )


def _engine(args: argparse.Namespace):
    """The training engine the fit options ask for: the preset, then per-field overrides."""
    from ..train.engine import Engine

    engine = Engine.preset(args.engine, threads=args.threads)
    switch = {"auto": None, "on": True, "off": False}
    overrides = {
        name: switch[value]
        for name, value in (("compiled", args.compile), ("fused_kernel", args.fused_kernel))
        if value != "auto"
    }
    for name in ("data_placement", "matmul_precision"):
        if getattr(args, name) != "auto":
            overrides[name] = getattr(args, name)
    return dataclasses.replace(engine, **overrides)


def build_parser() -> argparse.ArgumentParser:
    """The ``pyro-scvi`` argument parser."""
    parser = _Parser(prog=PROG, description="scVI in Pyro: fit models to scRNA-seq counts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    fit = sub.add_parser(
        "fit",
        help="fit scVI to an .h5ad and write the latent space and normalized expression",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fit.add_argument("input", metavar="INPUT", help="raw-count .h5ad, or 'pbmc8k_200hvg'")
    fit.add_argument("-o", "--output", required=True, metavar="OUTPUT.h5ad")
    fit.add_argument("--layer", help="layer with raw counts (default: .X)")
    fit.add_argument("--batch-key", help="obs column with each cell's batch")
    fit.add_argument("--likelihood", choices=LIKELIHOOD_NAMES, default="zinb")
    fit.add_argument("--n-latent", type=_positive_int, default=10)
    fit.add_argument(
        "--observed-library",
        action="store_true",
        help=(
            "condition on each cell's observed total count (scvi-tools' default, "
            "use_observed_lib_size=True) instead of the paper's latent library l"
        ),
    )
    fit.add_argument(
        "--library-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "centre q(l) on each cell's observed log library, the encoder learning the "
            "residual (default: on with a latent library); --no-library-residual is the "
            "paper's guide"
        ),
    )
    fit.add_argument("--max-epochs", type=_positive_int, help="default: as scvi-tools")
    fit.add_argument("--batch-size", type=_positive_int, default=128)
    fit.add_argument("--lr", type=_positive_float, default=1e-3)
    _add_run_options(fit)
    fit.add_argument("--model-dir", help="where to save the model")
    fit.add_argument("--early-stopping", action="store_true", help="stop on validation ELBO")
    fit.add_argument(
        "--n-samples",
        type=_positive_int,
        default=10,
        help="posterior samples averaged for the normalized expression (default 10)",
    )
    fit.add_argument(
        "--normalized",
        choices=["auto", "all", "none"],
        default="auto",
        help="the dense normalized layer: auto (default: written when cells x genes <= 50 "
        "million, pyro_scvi.io.outputs.DENSE_NORMALIZED_MAX_ENTRIES), all (at any size) or none",
    )
    fit.add_argument(
        "--normalized-genes",
        nargs="+",
        metavar="GENE",
        help="write only these genes' normalized expression, as the DataFrame "
        "obsm['pyro_scvi_normalized_genes'] (cells x genes), instead of the dense layer",
    )
    fit.add_argument(
        "--normalized-genes-file",
        metavar="FILE",
        help="as --normalized-genes, the names read from FILE (one a line; # comments)",
    )
    _add_data_source_option(fit, "stream them from the file as training goes")
    fit.add_argument(
        "--drop-empty-cells",
        action="store_true",
        help="drop cells with zero total counts (they are left out of OUTPUT)",
    )
    fit.add_argument(
        "--engine",
        choices=["auto", "eager", "compiled", "fused", "pyro"],  # Engine.PRESETS
        default="auto",
        help="how training steps (pyro_scvi.train.engine): auto (default: decided from the "
        "run and recorded), eager, compiled, fused (compiled ELBO and fused ZINB kernel) or pyro "
        "(plain pyro.infer.SVI); --compile and --fused-kernel override its fields",
    )
    fit.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile the ELBO (JitTrace_ELBO): auto (from --engine), on or off",
    )
    fit.add_argument(
        "--fused-kernel",
        choices=["auto", "on", "off"],
        default="auto",
        help="ZINB log-density by the compiled kernel of pyro_scvi.train.kernels: auto (from "
        "--engine; by default on long CPU runs of 500+ genes), on, or off",
    )
    fit.add_argument(
        "--data-placement",
        choices=["auto", "host", "device"],
        default="auto",
        help="where minibatches are gathered: auto (default: on the GPU when the counts take "
        "at most half its free memory, else host), host, or device",
    )
    fit.add_argument(
        "--matmul-precision",
        choices=["auto", "highest", "high", "medium"],
        default="auto",
        help="float32 matrix products: auto (= highest, exact float32), high (TF32 on GPUs "
        "that have it) or medium (bfloat16)",
    )
    fit.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write training checkpoints here (every --checkpoint-every epochs, and on "
        "SIGINT/SIGTERM); default: OUTPUT without .h5ad plus _checkpoint, on interrupt only",
    )
    fit.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="epochs between checkpoints when --checkpoint-dir is given (default 10; 0: on "
        "interrupt only)",
    )
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose checkpoint is in --checkpoint-dir (same "
        "INPUT and training options)",
    )
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser(
        "evaluate",
        help="held-out fit of a saved model on an .h5ad, a JSON summary on stdout",
        description=(
            "Print a JSON summary of the ELBO, the importance-sampled marginal "
            "log-likelihood (both nats per cell, higher is better) and the reconstruction "
            "error of INPUT's cells under the model saved in MODEL_DIR: their means, "
            "standard deviations and standard errors over cells. Both estimates use the same "
            "K draws of q(z, l | x). By default only the cells that training held out are "
            "scored (INPUT must then be the data the model was fitted to); --cells all "
            "scores every cell, e.g. of a file of new cells. --per-cell writes each cell's "
            "values to a .csv or to an .h5ad (INPUT's scored cells with obs columns "
            "pyro_scvi_elbo, pyro_scvi_marginal_ll, pyro_scvi_reconstruction_error)."
        ),
    )
    ev.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by fit / save()")
    ev.add_argument("input", metavar="INPUT", help="raw-count .h5ad with the model's genes")
    ev.add_argument(
        "--n-samples",
        type=_positive_int,
        default=100,
        help="importance samples K per cell (default 100)",
    )
    ev.add_argument("--batch-size", type=_positive_int, default=64, help="cells per pass")
    ev.add_argument(
        "--cells",
        choices=["heldout", "all"],
        default="heldout",
        help="score the validation cells training held out (default), or every cell",
    )
    ev.add_argument(
        "--per-cell",
        metavar="PATH",
        help="also write each cell's values to PATH (.csv, or .h5ad: the scored cells)",
    )
    ev.add_argument(
        "--observed-library",
        action="store_true",
        help="condition on each cell's observed library (log total count) instead of "
        "integrating over the latent one: log p(x | library), the number a model with an "
        "observed library, such as scvi-tools' default, reports",
    )
    _add_data_source_option(ev, "stream them from the file a minibatch at a time")
    _add_run_options(ev)

    check = sub.add_parser(
        "ppc",
        help="posterior predictive checks of a saved model on an .h5ad",
        description=(
            "Draw S posterior and posterior predictive samples for INPUT's cells under the "
            "model saved in MODEL_DIR and write them, with the observed counts and the "
            "per-cell log-likelihood, as ArviZ InferenceData to OUTPUT.nc. Beside it: "
            "OUTPUT.csv (observed and replicated statistics per gene and cell, with "
            "posterior predictive p-values), OUTPUT_calibration.csv (their spread per "
            "statistic), OUTPUT_ppp.png and OUTPUT_scatter.png. The criticism page, on the "
            "model's held-out (validation) cells by default: OUTPUT_criticism.png (per-entry "
            "randomized PIT, interval coverage, gene mean / CV / zero fraction and cell "
            "library size / detected genes observed vs replicated, Pareto k) and "
            "OUTPUT_criticism.csv (one row per fit: PIT TV, calibration error, coverage, r2, "
            "held-out ELPD). A summary goes to stdout."
        ),
    )
    check.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by fit / save()")
    check.add_argument("input", metavar="INPUT", help="raw-count .h5ad with the model's genes")
    check.add_argument("-o", "--output", required=True, metavar="OUTPUT.nc")
    check.add_argument(
        "--n-samples",
        type=_positive_int,
        default=50,
        help="posterior draws S per cell (default 50); p-values have resolution 1/S",
    )
    check.add_argument(
        "--max-cells",
        type=_positive_int,
        help="check a random subset of this many cells (default: all), and at most this many "
        "of the criticism page's cells; needed with --data-source streamed",
    )
    check.add_argument("--batch-size", type=_positive_int, default=256, help="cells per pass")
    check.add_argument(
        "--cells",
        choices=["held-out", "training", "all"],
        default="held-out",
        help="cells of the criticism page (default: the model's validation cells; use 'all' "
        "when INPUT is not the file the model was trained on)",
    )
    check.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=MODEL_DIR",
        help="another saved fit to put side by side on the criticism page; repeatable",
    )
    _add_data_source_option(
        check,
        "stream them from the file (then --max-cells is needed: the draws of every "
        "checked cell are held in memory)",
    )
    _add_run_options(check)

    de = sub.add_parser(
        "de",
        help="differential expression between groups of cells under a saved model",
        description=(
            "Compare groups of INPUT's cells (a column of obs) gene by gene under the model "
            "saved in MODEL_DIR, with Bayes factors: 'change' mode tests |log2 fold change| "
            ">= --delta and calls genes at a posterior expected FDR of --fdr-target; "
            "'vanilla' is the test of Lopez et al. (2018). Without --group1 every group is "
            "tested; without --group2 against all other cells. Writes OUTPUT.csv (one row "
            "per gene and comparison) and OUTPUT_volcano.png beside it; a summary goes to "
            "stdout."
        ),
    )
    de.add_argument("model_dir", metavar="MODEL_DIR", help="directory written by fit / save()")
    de.add_argument("input", metavar="INPUT", help="raw-count .h5ad with the model's genes")
    de.add_argument("--groupby", required=True, help="obs column holding each cell's group")
    de.add_argument(
        "--group1",
        action="append",
        metavar="A",
        help="group to test; repeat for several (default: every group)",
    )
    de.add_argument("--group2", metavar="B", help="reference group (default: all other cells)")
    de.add_argument("--mode", choices=["change", "vanilla"], default="change")
    de.add_argument(
        "--delta", type=_positive_float, default=0.25, help="log2 fold-change threshold"
    )
    de.add_argument(
        "--fdr-target", type=_positive_float, default=0.05, help="in (0, 1); default 0.05"
    )
    de.add_argument(
        "--n-samples", type=_positive_int, default=1000, help="posterior samples per group"
    )
    de.add_argument(
        "--no-batch-correction",
        action="store_true",
        help="decode each cell in its own batch instead of averaging over all batches",
    )
    de.add_argument(
        "--sample-key",
        metavar="KEY",
        help=(
            "obs column naming each cell's replicate (sample, donor); change mode then "
            "resamples replicates as well as cells, so differences between replicates are "
            "not called DE (use it when cells come from a few replicates per group)"
        ),
    )
    de.add_argument("--batch-size", type=_positive_int, default=256, help="cells per pass")
    _add_data_source_option(de, "stream them from the file a minibatch at a time")
    _add_run_options(de)
    de.add_argument("-o", "--output", required=True, metavar="OUTPUT.csv")

    pl = sub.add_parser(
        "plot",
        help="UMAP / t-SNE picture of a fitted latent space, by label and by batch",
        description=(
            "Embed the latent space of INPUT (an .h5ad written by fit, or any .h5ad with "
            "obsm[--use-rep]) in two dimensions and write a scatter plot with one panel per "
            "obs column of --color to OUTPUT.png. --method auto uses UMAP where umap-learn "
            "is installed (pip install umap-learn) and t-SNE (scikit-learn) otherwise."
        ),
    )
    pl.add_argument("input", metavar="INPUT", help=".h5ad holding obsm[--use-rep]")
    pl.add_argument("-o", "--output", required=True, metavar="OUTPUT.png")
    pl.add_argument("--use-rep", default="X_pyro_scvi", help="obsm key (default X_pyro_scvi)")
    pl.add_argument("--method", choices=["auto", "umap", "tsne", "pca"], default="auto")
    pl.add_argument(
        "--color",
        nargs="+",
        metavar="KEY",
        help="obs columns, one panel each (default: cell_type and batch where present)",
    )
    _add_data_source_option(pl, "leave them in the file (plot reads only obs and obsm)")
    _add_run_options(pl)

    mq = sub.add_parser(
        "map-query",
        help="map new batches onto a saved reference model (scArches-style) and embed them",
        description=(
            "Append the batches of QUERY (obs[the reference's batch_key]) to the reference "
            "model saved in REFERENCE_DIR, train only the weights the new batches feed, with "
            "every reference weight fixed (pyro_scvi.SCVI.load_query_data), and write "
            "OUTPUT.h5ad: QUERY plus obsm['X_pyro_scvi'] (in the reference's latent space) and "
            "uns['pyro_scvi']. The query model is saved to --model-dir (default: OUTPUT "
            "without .h5ad, plus _model)."
        ),
    )
    mq.add_argument("reference", metavar="REFERENCE_DIR", help="directory written by fit / save()")
    mq.add_argument("input", metavar="QUERY", help="raw-count .h5ad with the reference's genes")
    mq.add_argument("-o", "--output", required=True, metavar="OUTPUT.h5ad")
    mq.add_argument("--max-epochs", type=_positive_int, help="default: as scvi-tools")
    mq.add_argument("--batch-size", type=_positive_int, default=128)
    mq.add_argument("--lr", type=_positive_float, default=1e-3)
    mq.add_argument("--model-dir", help="where to save the query model")
    mq.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_source_option(mq, "stream them from the file as training goes")
    _add_run_options(mq)
    return parser


def _read_input(text: str):
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


def _add_data_source_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--data-source",
        choices=["auto", "memory", "streamed"],
        default="auto",
        help=f"load INPUT's counts into memory, or {what}: auto (default: streamed when they "
        "would take more than half the available memory; reported), memory or streamed",
    )


def _normalized_plan(args: argparse.Namespace, adata):
    """The one decision on normalized expression (pyro_scvi.io.outputs.plan_normalized)."""
    from ..io.outputs import plan_normalized, read_gene_file

    genes = list(args.normalized_genes or [])
    if args.normalized_genes_file is not None:
        genes += read_gene_file(args.normalized_genes_file)
    return plan_normalized(
        adata.n_obs, adata.n_vars, mode=args.normalized, genes=genes, var_names=adata.var_names
    )


def _check_fit_outputs(
    input_path: Path | None, output: Path, png: Path, model_dir: Path, checkpoint_dir: Path
) -> None:
    """Every check on fit's outputs that can be made before reading data and training."""
    from ..io.files import check_output_dir, check_output_file
    from ..io.model_dir import is_model_dir

    if input_path is not None and output.resolve() == input_path.resolve():
        raise InputError(
            "OUTPUT is the INPUT file; choose another -o: the input is never overwritten."
        )
    check_output_file(output, what="OUTPUT")
    check_output_file(png, what="the training-curve file")
    protect = [p for p in (input_path, output, png) if p is not None]
    check_output_dir(
        model_dir, owned=is_model_dir, what="--model-dir", protect=[*protect, checkpoint_dir]
    )
    check_output_dir(
        checkpoint_dir, owned=is_model_dir, what="--checkpoint-dir", protect=[*protect, model_dir]
    )


def _nbytes(matrix) -> int:
    import scipy.sparse as sp

    if matrix is None:
        return 0
    if sp.issparse(matrix):
        return sum(
            getattr(matrix, a).nbytes
            for a in ("data", "indices", "indptr", "row", "col")
            if hasattr(matrix, a)
        )
    return int(getattr(matrix, "nbytes", 0))


def _h5ad_bytes(adata, n_latent: int = 0, dense_columns: int | None = None) -> int:
    """A generous estimate of ``adata``'s size as ``.h5ad`` once the results are added.

    ``dense_columns``: float32 values per cell of normalized expression written (default:
    the dense layer, all genes). A backed AnnData counts as its file's size.
    """
    if adata.isbacked:
        n = os.path.getsize(adata.filename)
    else:
        n = _nbytes(adata.X)
        n += sum(_nbytes(m) for m in adata.layers.values())
        n += sum(_nbytes(m) for m in adata.obsm.values())
    n += int(adata.obs.memory_usage(deep=True).sum() + adata.var.memory_usage(deep=True).sum())
    dense_columns = adata.n_vars if dense_columns is None else dense_columns
    n += 4 * adata.n_obs * (dense_columns + n_latent)
    return n + 2**20


def _write_h5ad(model, adata, path: Path, *, plan, library: float, n_samples: int) -> None:
    """Write fit's ``.h5ad`` to ``path``: ``adata``, its results, the normalized expression.

    The normalized expression is added a chunk of cells at a time (pyro_scvi.io.outputs). A
    streamed (backed) ``adata`` is never loaded: its file is copied byte for byte and the
    latent space and ``uns`` are added to the copy.
    """
    from ..io.outputs import write_normalized

    _write_results_h5ad(adata, path)
    write_normalized(path, model, plan, library_size=library, n_samples=n_samples)


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


def _write_fit_outputs(
    model, *, output: Path, model_dir: Path, png: Path, run_id: str, write, n_bytes: int
):
    """Write the model folder, curves and .h5ad under temporary names, then move them in.

    ``write(path)`` writes the .h5ad (about ``n_bytes``). The old .h5ad goes aside first and
    the new one comes last, so that at no moment do an .h5ad and a model of two different
    runs sit side by side.
    """
    import matplotlib.pyplot as plt

    from ..analysis.plotting import plot_history
    from ..io.files import (
        check_free_space,
        current_umask,
        remove_path,
        replace_dir,
        sweep_stale,
        temp_name,
    )
    from ..io.model_dir import is_model_dir

    for path in (output, png):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
    tmp_model = tmp_png = tmp_h5ad = aside = None
    swapped = False
    try:
        tmp_model = model._stage(model_dir, run_id=run_id)
        tmp_png = temp_name(png)
        fig = plot_history(model.history)
        fig.savefig(tmp_png, format="png")
        plt.close(fig)
        # HDF5 can crash the process on a full disk: make sure the file fits first.
        check_free_space({output: n_bytes})
        tmp_h5ad = temp_name(output)
        write(tmp_h5ad)
        for tmp in (tmp_png, tmp_h5ad):
            os.chmod(tmp, 0o666 & ~current_umask())
        if output.exists():
            aside = temp_name(output)
            os.replace(output, aside)
        replace_dir(tmp_model, model_dir, owned=is_model_dir)
        swapped = True
        os.replace(tmp_png, png)
        os.replace(tmp_h5ad, output)
    finally:
        if aside is not None and not swapped and not output.exists():
            # nothing of this run moved in: the old .h5ad goes back beside its model
            # (once the new model is in, the old .h5ad no longer belongs there)
            os.replace(aside, output)
        for tmp in (tmp_model, tmp_png, tmp_h5ad, aside):
            if tmp is not None:
                remove_path(Path(tmp))


def _resume_command(argv: Sequence[str], checkpoint_dir: Path) -> str:
    import shlex

    words = [PROG, *argv]
    if not any(w == "--checkpoint-dir" or w.startswith("--checkpoint-dir=") for w in argv):
        words += ["--checkpoint-dir", str(checkpoint_dir)]
    if "--resume" not in argv:
        words.append("--resume")
    return shlex.join(words)


def _check_resume_options(model, args: argparse.Namespace) -> None:
    """The options that shape training must be the interrupted run's."""
    from ..model.likelihoods import LIKELIHOODS

    run = model._run or {}
    expected = {
        "--likelihood": (repr(LIKELIHOODS[args.likelihood]()), model.settings["likelihood"]),
        "--n-latent": (args.n_latent, model.settings["n_latent"]),
        "--observed-library": (
            args.observed_library,
            bool(model.settings.get("use_observed_lib_size", False)),
        ),
        "--layer": (args.layer, model.settings["layer"]),
        "--batch-key": (args.batch_key, model.settings["batch_key"]),
        "--batch-size": (args.batch_size, run.get("batch_size")),
        "--lr": (args.lr, run.get("lr")),
    }
    if args.max_epochs is not None:
        expected["--max-epochs"] = (args.max_epochs, run.get("target_epoch"))
    if args.library_residual is not None:  # not given: the checkpoint's own
        expected["--library-residual"] = (
            args.library_residual,
            bool(model.settings.get("library_residual", False)),
        )
    differ = [f"{k} {v[1]} (given: {v[0]})" for k, v in expected.items() if v[0] != v[1]]
    if differ:
        raise InputError(
            "--resume continues the checkpoint's run, which was started with "
            + ", ".join(differ)
            + "; resume with the same options."
        )


def fit(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi fit``; return the exit status.

    A process group that fit starts (under torchrun) is destroyed when it ends, however it
    ends (:func:`pyro_scvi.train.distributed.process_group`).
    """
    with contextlib.ExitStack() as stack:
        return _fit(args, argv, stack)


def _fit(args: argparse.Namespace, argv: Sequence[str], stack: contextlib.ExitStack) -> int:
    output = Path(args.output)
    if output.suffix != ".h5ad":
        raise InputError(f"OUTPUT {output} must end in .h5ad.")
    stem = output.with_suffix("")
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{stem}_model")
    png = Path(f"{stem}_training.png")
    explicit_checkpoints = args.checkpoint_dir is not None
    checkpoint_dir = Path(args.checkpoint_dir or f"{stem}_checkpoint")
    from ..data import datasets

    input_path = Path(args.input)
    if not input_path.exists() and args.input in datasets.SHIPPED:
        input_path = datasets.path(args.input)
    _check_fit_outputs(
        input_path if input_path.exists() else None, output, png, model_dir, checkpoint_dir
    )

    import matplotlib
    import numpy as np
    import torch

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..errors import TrainingError, TrainingInterrupted
    from ..io.files import check_free_space
    from ..io.model_dir import new_run_id
    from ..io.outputs import GENES_KEY, LAYER_KEY
    from ..model.likelihoods import LIKELIHOODS
    from ..scvi import SCVI, resolve_device
    from ..tl import write_results
    from ..train import distributed
    from ..train.engine import ThreadPolicy

    resolve_device(args.device)  # fail before reading data
    # launched by torchrun: join the group; only rank 0 writes (pyro_scvi.train.distributed)
    group = stack.enter_context(distributed.process_group(resolve_device(args.device)))
    adata, streamed, data_source = _read_data(args, layer=args.layer)
    plan = _normalized_plan(args, adata)
    if not plan.layer and args.normalized == "auto" and not plan.genes:
        print(f"{PROG}: {plan.reason}", file=sys.stderr)  # known before a long training
    if args.drop_empty_cells and streamed:
        raise InputError(
            "--drop-empty-cells needs the counts in memory, and INPUT is streamed "
            f"({data_source}); remove the empty cells from the file, or pass "
            "--data-source memory."
        )
    if args.drop_empty_cells:
        from ..data import nonempty_cells

        keep = nonempty_cells(adata, args.layer)
        if not keep.all():
            print(f"{PROG}: dropping {int((~keep).sum())} cells with zero counts", file=sys.stderr)
            adata = adata[keep].copy()
    if args.resume:
        model = SCVI.load_checkpoint(
            checkpoint_dir, adata, device=args.device, streamed=True if streamed else None
        )
        _check_resume_options(model, args)
        if not model.interrupted:
            raise InputError(f"the checkpoint in {checkpoint_dir} has no run left to resume.")
    else:
        model = SCVI(
            adata,
            layer=args.layer,
            batch_key=args.batch_key,
            likelihood=LIKELIHOODS[args.likelihood](),
            n_latent=args.n_latent,
            use_observed_lib_size=True if args.observed_library else None,
            library_residual=args.library_residual,
            streamed=True if streamed else None,
        )
    # room for everything this run writes, checked before a long training
    h5ad_bytes = _h5ad_bytes(adata, args.n_latent, plan.dense_columns(adata.n_vars))
    needs = {output: h5ad_bytes, model_dir: model._model_bytes()}
    needs[png] = 2**19
    if explicit_checkpoints:
        needs[checkpoint_dir] = model._checkpoint_bytes()
    check_free_space(needs)
    every = args.checkpoint_every if explicit_checkpoints else 0
    status, stopped, note = 0, None, ""
    try:
        if args.resume:
            model.resume(
                device=args.device,
                progress_bar=not args.quiet,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=every,
            )
        else:
            model.train(
                args.max_epochs,
                batch_size=args.batch_size,
                lr=args.lr,
                early_stopping=args.early_stopping,
                engine=_engine(args),
                device=args.device,
                seed=args.seed,
                progress_bar=not args.quiet,
                checkpoint_dir=checkpoint_dir,
                checkpoint_every=every,
            )
    except TrainingError as err:
        if group is not None and not group.is_main:
            return 1
        if not model.is_trained:
            print(
                f"{PROG} fit: error: {err} Nothing was written: there is no trained model.",
                file=sys.stderr,
            )
            return 1
        status, stopped = 1, str(err)
        note = f" Training failed: {err} The outputs hold the model of that epoch."
    except TrainingInterrupted as err:
        status = 128 + err.signal
        if group is not None and not group.is_main:
            return status
        resume = f" Resume with: {_resume_command(argv, checkpoint_dir)}" if err.checkpoint else ""
        if not model.is_trained:
            print(
                f"{PROG} fit: {err} No epoch had completed, so no outputs were written; the "
                f"checkpoint is in {checkpoint_dir}.{resume}",
                file=sys.stderr,
            )
            return status
        stopped = str(err)
        note = (
            f" {err} The outputs hold the model at that point; checkpoint in "
            f"{checkpoint_dir}.{resume}"
        )
    if group is not None and not group.is_main:
        return status  # rank 0 writes the outputs

    if args.seed is not None:
        torch.manual_seed(args.seed)
    library = float(np.median(model.data.total_counts()))
    run_id = new_run_id()
    # The queries follow the free cores as training did (pyro_scvi.train.engine.ThreadPolicy).
    threads = ThreadPolicy(args.threads)
    threads.start()
    try:
        # latent space and uns here; the normalized expression as the .h5ad is written
        write_results(
            model,
            adata,
            normalized_key=None,
            library_size=library,
            params=dict(
                max_epochs=len(model.history),
                batch_size=args.batch_size,
                lr=args.lr,
                seed=args.seed,
                model_dir=str(model_dir),
                input=str(args.input),
                run_id=run_id,
                resumed=bool(args.resume),
                data_source=data_source,
                **plan.record(),
                **(
                    {"normalized_key": LAYER_KEY} if plan.layer else {}
                ),  # as tl.write_results records it
                normalized_library_size=library,
                normalized_n_samples=args.n_samples,
                **({"stopped": stopped} if stopped else {}),
            ),
        )
        _write_fit_outputs(
            model,
            output=output,
            model_dir=model_dir,
            png=png,
            run_id=run_id,
            write=lambda path: _write_h5ad(
                model, adata, path, plan=plan, library=library, n_samples=args.n_samples
            ),
            n_bytes=h5ad_bytes,
        )
    finally:
        threads.close()
    last = model.history.iloc[-1]
    written = ["obsm['X_pyro_scvi']"]
    written += [f"layers[{LAYER_KEY!r}]"] if plan.layer else []
    written += [f"obsm[{GENES_KEY!r}] ({len(plan.genes)} genes)"] if plan.genes else []
    print(
        f"{PROG}: wrote {output} ({', '.join(written)}, uns['pyro_scvi']; normalized "
        f"expression -- {plan.reason}); model in {model_dir}; curves in {png}; "
        f"final validation ELBO {last['validation_elbo']:.2f} per cell.{note}",
        file=sys.stderr,
    )
    return status


def ppc(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi ppc``: write the InferenceData, PPC table and plots; return the status."""
    output = Path(args.output)
    if output.suffix != ".nc":
        raise InputError(f"OUTPUT {output} must end in .nc (a netCDF file).")
    if not Path(args.model_dir).is_dir():
        raise InputError(f"MODEL_DIR {args.model_dir} is not a directory written by fit / save().")
    stem = output.with_suffix("")
    paths = {
        "table": Path(f"{stem}.csv"),
        "calibration": Path(f"{stem}_calibration.csv"),
        "ppp": Path(f"{stem}_ppp.png"),
        "scatter": Path(f"{stem}_scatter.png"),
        "criticism": Path(f"{stem}_criticism.csv"),
        "page": Path(f"{stem}_criticism.png"),
    }
    others = {}
    for item in args.compare:
        name, sep, other_dir = item.partition("=")
        if not sep or not name or not other_dir:
            raise InputError(f"--compare {item!r}: use NAME=MODEL_DIR.")
        if not Path(other_dir).is_dir() or name == "model" or name in others:
            raise InputError(
                f"--compare {item!r}: MODEL_DIR must be a directory written by fit / save() "
                "and NAME unique (and not 'model')."
            )
        others[name] = other_dir
    input_path = Path(args.input)
    for path in [output, *paths.values()]:
        if input_path.exists() and path.resolve() == input_path.resolve():
            raise InputError(f"{path} is the INPUT file; choose another -o.")

    import textwrap

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.criticism import compare, summary_table
    from ..analysis.plotting import plot_criticism, plot_ppc_scatter, plot_ppp_histograms
    from ..analysis.ppc import calibration_summary, ppc_table
    from ..io.files import atomic_path
    from ..posterior.arviz import to_inference_data
    from ..scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    if streamed and args.max_cells is None:
        raise InputError(
            f"INPUT is streamed ({data_source}), and ppc holds {args.n_samples} replicates of "
            "every checked cell in memory; pass --max-cells N to check a random subset, or "
            "--data-source memory."
        )
    streamed = True if streamed else None
    model = SCVI.load(args.model_dir, adata, device=args.device, streamed=streamed)
    n_cells = model.data.n_cells
    indices = None
    if args.max_cells is not None and args.max_cells < n_cells:
        rng = np.random.default_rng(args.seed)
        indices = np.sort(rng.choice(n_cells, args.max_cells, replace=False))
    idata = to_inference_data(
        model,
        n_samples=args.n_samples,
        indices=indices,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    table = ppc_table(idata)
    calibration = calibration_summary(table)
    with atomic_path(output) as tmp:
        idata.to_netcdf(str(tmp))
    for key in ("table", "calibration"):
        with atomic_path(paths[key]) as tmp:
            (table if key == "table" else calibration).to_csv(tmp, index=False)
    plot_ppp_histograms(table, paths["ppp"])
    plot_ppc_scatter(table, paths["scatter"])
    fits = {"model": model}
    fits.update(
        {n: SCVI.load(d, adata, device=args.device, streamed=streamed) for n, d in others.items()}
    )
    pages = compare(
        fits,
        cells=args.cells,
        max_cells=args.max_cells,
        n_samples=max(args.n_samples, 2),
        seed=args.seed,
    )
    criticism = summary_table(pages)
    with atomic_path(paths["criticism"]) as tmp:
        criticism.to_csv(tmp)
    plot_criticism(pages, paths["page"])
    page_line = " ".join(
        f"{name} on {r.n_cells} {r.cells} cells: PIT TV {r.pit_tv:.3f} (noise floor "
        f"{r.pit_tv_null:.3f}), interval calibration error {r.calibration_error:.3f}, "
        f"90% intervals cover {r.coverage_90:.1%}, r2 of gene means {r.r2_mean:.2f}."
        for name, r in criticism.iterrows()
    )

    outside = ", ".join(
        f"{r.level} {r.statistic} {r.frac_outside:.1%}" for r in calibration.itertuples()
    )
    means = table[(table["level"] == "gene") & (table["statistic"] == "mean")]
    extreme = means[(means["ppp"] < 0.025) | (means["ppp"] > 0.975)]
    extreme = extreme.reindex((extreme["ppp"] - 0.5).abs().sort_values(ascending=False).index)
    worst = (
        "Genes whose mean the model misses most: "
        + ", ".join(f"{r.name} (ppp {r.ppp:.2f})" for r in extreme.head(5).itertuples())
        + "."
        if len(extreme)
        else "No gene's mean has an extreme p-value."
    )
    summary = (
        f"{PROG} ppc: checked {idata.observed_data.sizes['cells']} cells x "
        f"{idata.observed_data.sizes['genes']} genes of {args.input} under the model in "
        f"{args.model_dir}, with {args.n_samples} posterior predictive draws (seed "
        f"{args.seed}; counts {data_source}). Fraction of posterior predictive p-values "
        "outside [0.025, 0.975]: "
        f"{outside}. Gene-wise p-values over many cells are narrower than 5% suggests: "
        "refitted to counts simulated from itself, the PBMC model still puts about a third "
        "of gene means outside, because its decoder and dispersions are point estimates; "
        f"read them as a ranking, and calibration from the PIT below. {worst} Criticism "
        "page: "
        f"{page_line} Wrote {output} (ArviZ InferenceData), {paths['table']}, "
        f"{paths['calibration']}, {paths['ppp']}, {paths['scatter']}, {paths['criticism']} "
        f"and {paths['page']}."
    )
    print(textwrap.fill(summary, width=99))
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi evaluate``: print a JSON summary of the fit; return the status."""
    import json

    per_cell = Path(args.per_cell) if args.per_cell else None
    if per_cell is not None and per_cell.suffix not in (".csv", ".h5ad"):
        raise InputError(f"--per-cell {per_cell} must end in .csv or .h5ad.")
    input_path = Path(args.input)
    if per_cell is not None and input_path.exists() and per_cell.resolve() == input_path.resolve():
        raise InputError("--per-cell is the INPUT file; choose another path.")

    import numpy as np

    from ..io.files import atomic_path
    from ..scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    if streamed and per_cell is not None and per_cell.suffix == ".h5ad" and args.cells == "all":
        raise InputError(
            f"INPUT is streamed ({data_source}), and --per-cell .h5ad with --cells all would "
            "load every cell's counts to write them; write a .csv, or pass --data-source "
            "memory."
        )
    model = SCVI.load(
        args.model_dir, adata, device=args.device, streamed=True if streamed else None
    )
    indices = None  # every cell
    if args.cells == "heldout":
        n_fitted = len(model.train_indices) + len(model.validation_indices)
        if model.data.n_cells != n_fitted:
            raise InputError(
                f"--cells heldout scores the cells training held out, but INPUT has "
                f"{model.data.n_cells} cells and the model was fitted to {n_fitted}; pass "
                "the data it was fitted to, or --cells all to score every cell of INPUT."
            )
        if not len(model.validation_indices):
            raise InputError(
                "The model held out no cells (trained with train_size=1); pass --cells all."
            )
        indices = np.asarray(model.validation_indices)
    names = model.data.obs_names if indices is None else model.data.obs_names[indices]
    if per_cell is not None:  # keyed by cell name
        from ..data.counts import require_unique_obs_names

        require_unique_obs_names(names, "the per-cell output")
    # the model's own cells, read where the counts are (streamed: a minibatch at a time)
    stats = model.get_fit_statistics(
        indices=indices,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        observed_library=args.observed_library,
    )
    result = {
        "cells": args.cells,
        "n_cells": len(stats),
        "n_samples": args.n_samples,
        "seed": args.seed,
        "observed_library": args.observed_library,
        "data_source": data_source,
    }
    for column in stats.columns:
        values = stats[column].to_numpy(dtype=float)
        sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        result[f"{column}_mean"] = _json_number(values.mean())
        result[f"{column}_sd"] = _json_number(sd)
        result[f"{column}_sem"] = _json_number(sd / len(values) ** 0.5)
    if per_cell is not None:
        with atomic_path(per_cell) as tmp:
            if per_cell.suffix == ".csv":
                stats.to_csv(tmp, index_label="cell")
            else:
                # INPUT's scored cells, never the caller's object (streamed: only those cells)
                scored = adata if indices is None else adata[indices]
                out = scored.to_memory() if scored.isbacked else scored.copy()
                for column in stats.columns:
                    out.obs[f"pyro_scvi_{column}"] = stats[column].to_numpy()
                out.uns["pyro_scvi_evaluate"] = {
                    k: ("None" if v is None else v) for k, v in result.items()
                }
                out.write_h5ad(tmp)
        result["per_cell"] = str(per_cell)
    json.dump(result, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


def _json_number(value) -> float | None:
    """A float for JSON, or None: JSON has no NaN or infinity (e.g. a diverged model)."""
    import math

    value = float(value)
    return value if math.isfinite(value) else None


def differential(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi de``: write the DE table and volcano plot; return the status."""
    output = Path(args.output)
    if output.suffix != ".csv":
        raise InputError(f"OUTPUT {output} must end in .csv.")
    volcano = output.with_name(f"{output.stem}_volcano.png")
    input_path = Path(args.input)
    for path in (output, volcano):
        if input_path.exists() and path.resolve() == input_path.resolve():
            raise InputError(f"{path} is the INPUT file; choose another -o.")
    if not Path(args.model_dir).is_dir():
        raise InputError(f"MODEL_DIR {args.model_dir} is not a directory written by fit / save().")

    import matplotlib

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.plotting import plot_volcano
    from ..io.files import atomic_path
    from ..scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    model = SCVI.load(
        args.model_dir, adata, device=args.device, streamed=True if streamed else None
    )
    results = model.differential_expression(
        groupby=args.groupby,
        group1=args.group1,
        group2=args.group2,
        mode=args.mode,
        delta=args.delta,
        fdr_target=args.fdr_target,
        batch_correction=not args.no_batch_correction,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sample_key=args.sample_key,
    )
    with atomic_path(output) as tmp:
        results.to_csv(tmp, index_label="gene")
    plot_volcano(results, volcano)
    calls = results.groupby("comparison", sort=False)["is_de_fdr"].sum()
    listed = "; ".join(f"{name}: {int(n)}" for name, n in calls.items())
    print(
        f"{PROG} de ({args.mode} mode): genes called DE at posterior expected FDR "
        f"{args.fdr_target:g} -- {listed}. Wrote {output} and {volcano} (counts "
        f"{data_source})."
    )
    return 0


def plot(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi plot``: write a 2-D embedding picture; return the status."""
    output = Path(args.output)
    if output.suffix != ".png":
        raise InputError(f"OUTPUT {output} must end in .png.")

    import matplotlib

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.plotting import plot_embedding
    from ..tl import EMBEDDINGS, embedding, embedding_method

    # streamed: the file stays open backed; only obs and obsm are read
    adata, _, data_source = _read_data(args)
    if args.use_rep not in adata.obsm:
        raise InputError(
            f"INPUT has no obsm[{args.use_rep!r}] (it has {list(adata.obsm.keys())}); pass "
            "the output of pyro-scvi fit, or --use-rep."
        )
    missing = [k for k in args.color or () if k not in adata.obs]
    if missing:
        raise InputError(f"--color {missing} not in INPUT's obs ({list(adata.obs.columns)}).")
    method = embedding_method(args.method)
    basis = EMBEDDINGS[method]
    try:
        embedding(adata, use_rep=args.use_rep, method=method, seed=args.seed)
    except ImportError as err:
        raise InputError(str(err)) from err
    plot_embedding(adata, output, basis=basis, color=args.color)
    print(
        f"{PROG} plot: wrote {output} ({method} of obsm[{args.use_rep!r}], {adata.n_obs} cells; "
        f"counts {data_source})"
    )
    return 0


def map_query(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi map-query``: map, train, write the query's embedding; return the status."""
    output = Path(args.output)
    if output.suffix != ".h5ad":
        raise InputError(f"OUTPUT {output} must end in .h5ad.")
    input_path = Path(args.input)
    if input_path.exists() and output.resolve() == input_path.resolve():
        raise InputError("OUTPUT is the QUERY file; choose another -o.")
    if not Path(args.reference).is_dir():
        raise InputError(f"REFERENCE_DIR {args.reference} is not a directory written by fit.")
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{output.with_suffix('')}_model")

    from ..io.files import atomic_path
    from ..scvi import SCVI, resolve_device
    from ..tl import write_results

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    model = SCVI.load_query_data(adata, args.reference, streamed=True if streamed else None)
    model.train(
        args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    model.save(model_dir, overwrite=True)
    params = dict(reference=str(args.reference), model_dir=str(model_dir), seed=args.seed)
    params.update(max_epochs=len(model.history), input=str(args.input), data_source=data_source)
    write_results(model, adata, params=params)
    with atomic_path(output) as tmp:
        _write_results_h5ad(adata, tmp)
    new = [b for b in model.batch_categories if b not in model.reference_batches]
    print(
        f"{PROG} map-query: mapped {adata.n_obs} cells of batches {new} onto {args.reference}; "
        f"wrote {output} (obsm['X_pyro_scvi']); query model in {model_dir}; counts "
        f"{data_source}",
        file=sys.stderr,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-scvi`` console script."""
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "fit":
            return fit(args, argv)
        if args.command == "evaluate":
            return evaluate(args)
        if args.command == "ppc":
            return ppc(args)
        if args.command == "de":
            return differential(args)
        if args.command == "plot":
            return plot(args)
        if args.command == "map-query":
            return map_query(args)
    except InputError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # stdout's reader has gone (e.g. `pyro-scvi evaluate ... | head`): stop quietly,
        # as Unix tools do, and keep Python from complaining when it flushes at exit
        _detach_stdout()
        return 128 + 13  # as if killed by SIGPIPE
    except KeyboardInterrupt:
        print(
            f"{PROG} {args.command}: interrupted; unfinished files were removed.", file=sys.stderr
        )
        return 130
    except OSError as err:  # a write failed (disk full, permissions changed meanwhile)
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"{PROG} {args.command}: error: {err.strerror or err}{where}; unfinished files were "
            "removed.",
            file=sys.stderr,
        )
        return 1
    return 2


def _detach_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (e.g. in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
