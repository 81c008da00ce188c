"""Command line: ``pyro-scvi fit INPUT.h5ad -o OUTPUT.h5ad``.

INPUT is an ``.h5ad`` of raw counts, or the name of a dataset shipped with the package
(``pbmc8k_200hvg``). OUTPUT is a new ``.h5ad``: the input plus

- ``obsm["X_pyro_scvi"]``: posterior mean of ``z``;
- ``layers["pyro_scvi_normalized"]``: normalized expression (posterior mean of ``rho``,
  scaled to the median library size);
- ``uns["pyro_scvi"]``: ``params`` (the settings) and ``history`` (per-epoch ELBOs).

The model is saved to ``--model-dir`` (default: ``OUTPUT`` without ``.h5ad``, plus
``_model``) and the training curves to ``OUTPUT`` without ``.h5ad``, plus ``_training.png``.
Files are written atomically; the input is never overwritten. Bad arguments give one line
on stderr and exit status 2; a failed training exits with status 1 after saving the last
good model.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .data import InputError
from .likelihoods import LIKELIHOODS

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


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--threads",
        type=_positive_int,
        help="CPU threads for torch (default: training follows the cores that other "
        "processes leave free, re-measured as it goes; other commands use torch's default)",
    )


def _engine(args: argparse.Namespace):
    """The training engine the fit options ask for: the preset, then per-field overrides."""
    from .engine import Engine

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
    fit.add_argument("--likelihood", choices=sorted(LIKELIHOODS), default="zinb")
    fit.add_argument("--n-latent", type=_positive_int, default=10)
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
        "--drop-empty-cells",
        action="store_true",
        help="drop cells with zero total counts (they are left out of OUTPUT)",
    )
    fit.add_argument(
        "--engine",
        choices=["auto", "eager", "compiled", "fused", "pyro"],  # Engine.PRESETS
        default="auto",
        help="how training steps (pyro_scvi.engine): auto (default: decided from the run and "
        "recorded), eager, compiled, fused (compiled ELBO and fused ZINB kernel) or pyro "
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
        help="ZINB log-density by the compiled kernel of pyro_scvi.kernels: auto (from "
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
    fit.add_argument("--quiet", action="store_true", help="no progress bar")

    ev = sub.add_parser(
        "evaluate",
        help="held-out fit of a saved model on an .h5ad, as JSON on stdout",
        description=(
            "Print JSON with the ELBO, the importance-sampled marginal log-likelihood "
            "(both nats per cell, higher is better) and the reconstruction error of "
            "INPUT's cells under the model saved in MODEL_DIR: the means over cells and "
            "the per-cell values. Both estimates use the same K draws of q(z, l | x)."
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
        help="check a random subset of this many cells (default: all)",
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
    de.add_argument("--batch-size", type=_positive_int, default=256, help="cells per pass")
    _add_run_options(de)
    de.add_argument("-o", "--output", required=True, metavar="OUTPUT.csv")
    return parser


def _read_input(text: str):
    import anndata

    from . import datasets

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
        return anndata.read_h5ad(datasets.path(text)), None
    raise InputError(
        f"INPUT {text!r} is neither an existing file nor a shipped dataset "
        f"({', '.join(datasets.SHIPPED)})."
    )


def fit(args: argparse.Namespace) -> int:
    """Run ``pyro-scvi fit``; return the exit status."""
    output = Path(args.output)
    if output.suffix != ".h5ad":
        raise InputError(f"OUTPUT {output} must end in .h5ad.")
    stem = output.with_suffix("")
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{stem}_model")
    from . import datasets

    input_path = Path(args.input)
    if not input_path.exists() and args.input in datasets.SHIPPED:
        input_path = datasets.path(args.input)
    if input_path.exists() and output.resolve() == input_path.resolve():
        raise InputError(
            "OUTPUT is the INPUT file; choose another -o: the input is never overwritten."
        )

    import matplotlib
    import numpy as np
    import torch

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from . import distributed
    from .engine import ThreadPolicy
    from .files import atomic_path
    from .infer import TrainingError
    from .plotting import plot_history
    from .scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    # launched by torchrun: join the group; only rank 0 writes (pyro_scvi.distributed)
    group = distributed.init_from_env(resolve_device(args.device))
    adata, _ = _read_input(args.input)
    if args.drop_empty_cells:
        counts = adata.layers[args.layer] if args.layer in adata.layers else adata.X
        keep = np.asarray(counts.sum(axis=1)).ravel() > 0
        if not keep.all():
            print(f"{PROG}: dropping {int((~keep).sum())} cells with zero counts", file=sys.stderr)
            adata = adata[keep].copy()
    model = SCVI(
        adata,
        layer=args.layer,
        batch_key=args.batch_key,
        likelihood=LIKELIHOODS[args.likelihood](),
        n_latent=args.n_latent,
    )
    try:
        model.train(
            args.max_epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            early_stopping=args.early_stopping,
            engine=_engine(args),
            device=args.device,
            seed=args.seed,
            progress_bar=not args.quiet,
        )
    except TrainingError as err:
        if group is not None and not group.is_main:
            return 1
        model.save(model_dir, overwrite=True)
        print(
            f"{PROG}: error: {err} The last good model is saved in {model_dir}.", file=sys.stderr
        )
        return 1
    if group is not None and not group.is_main:
        return 0
    model.save(model_dir, overwrite=True)
    plot_history(model.history, f"{stem}_training.png")

    if args.seed is not None:
        torch.manual_seed(args.seed)
    library = float(np.median(model.data.total_counts()))
    # The queries follow the free cores as training did (pyro_scvi.engine.ThreadPolicy).
    threads = ThreadPolicy(args.threads)
    threads.start()
    try:
        adata.obsm["X_pyro_scvi"] = model.get_latent_representation()
        adata.layers["pyro_scvi_normalized"] = model.get_normalized_expression(
            library_size=library, n_samples=args.n_samples
        ).to_numpy(dtype=np.float32)
    finally:
        threads.close()
    params = {k: ("None" if v is None else v) for k, v in model.settings.items()}
    params.update(
        max_epochs=len(model.history),
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        engine=model.engine,
        normalized_library_size=library,
        model_dir=str(model_dir),
        input=str(args.input),
    )
    adata.uns["pyro_scvi"] = {
        "params": params,
        "history": {c: model.history[c].to_numpy(dtype=float) for c in model.history},
    }
    with atomic_path(output) as tmp:
        adata.write_h5ad(tmp)
    last = model.history.iloc[-1]
    print(
        f"{PROG}: wrote {output} (obsm['X_pyro_scvi'], layers['pyro_scvi_normalized'], "
        f"uns['pyro_scvi']); model in {model_dir}; curves in {stem}_training.png; "
        f"final validation ELBO {last['validation_elbo']:.2f} per cell",
        file=sys.stderr,
    )
    return 0


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

    from .convert import to_inference_data
    from .criticism import compare, summary_table
    from .files import atomic_path
    from .plotting import plot_criticism, plot_ppc_scatter, plot_ppp_histograms
    from .ppc import calibration_summary, ppc_table
    from .scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, _ = _read_input(args.input)
    model = SCVI.load(args.model_dir, adata, device=args.device)
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
    fits.update({n: SCVI.load(d, adata, device=args.device) for n, d in others.items()})
    pages = compare(fits, cells=args.cells, n_samples=max(args.n_samples, 2), seed=args.seed)
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
        f"{args.seed}). Fraction of posterior predictive p-values outside [0.025, 0.975]: "
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
    """Run ``pyro-scvi evaluate``: print the fit of INPUT's cells as JSON; return the status."""
    import json
    import math

    from .scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, _ = _read_input(args.input)
    model = SCVI.load(args.model_dir, adata, device=args.device)
    stats = model.get_fit_statistics(
        n_samples=args.n_samples, batch_size=args.batch_size, seed=args.seed
    )

    def number(value) -> float | None:
        # JSON has no NaN or infinity: a non-finite value (a diverged model) is written as
        # null, keeping stdout valid JSON.
        value = float(value)
        return value if math.isfinite(value) else None

    result = {
        "n_cells": len(stats),
        "n_samples": args.n_samples,
        "elbo_mean": number(stats["elbo"].mean()),
        "marginal_ll_mean": number(stats["marginal_ll"].mean()),
        "reconstruction_error_mean": number(stats["reconstruction_error"].mean()),
        "per_cell": {
            "obs_names": [str(name) for name in stats.index],
            "elbo": [number(v) for v in stats["elbo"]],
            "marginal_ll": [number(v) for v in stats["marginal_ll"]],
        },
    }
    json.dump(result, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


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

    from .files import atomic_path
    from .plotting import plot_volcano
    from .scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, _ = _read_input(args.input)
    model = SCVI.load(args.model_dir, adata, device=args.device)
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
    )
    with atomic_path(output) as tmp:
        results.to_csv(tmp, index_label="gene")
    plot_volcano(results, volcano)
    calls = results.groupby("comparison", sort=False)["is_de_fdr"].sum()
    listed = "; ".join(f"{name}: {int(n)}" for name, n in calls.items())
    print(
        f"{PROG} de ({args.mode} mode): genes called DE at posterior expected FDR "
        f"{args.fdr_target:g} -- {listed}. Wrote {output} and {volcano}."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pyro-scvi`` console script."""
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    try:
        if args.command == "fit":
            return fit(args)
        if args.command == "evaluate":
            return evaluate(args)
        if args.command == "ppc":
            return ppc(args)
        if args.command == "de":
            return differential(args)
    except InputError as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
