"""``pyro-scvi ppc``: posterior predictive checks and the criticism page of a saved model."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ._common import (
    PROG,
    _add_batch_size,
    _add_cells,
    _add_data_source_option,
    _add_input,
    _add_n_samples,
    _add_output,
    _add_run_options,
    _add_saved_model,
    _add_trust_model,
    _check_fitted_cells,
    _check_outputs,
    _output_path,
    _positive_int,
    _read_data,
    _refuse_input,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi ppc`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
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
            "held-out ELPD). A summary goes to stdout. The files are written under temporary "
            "names and moved in together at the end: an interrupt (SIGINT, SIGTERM) or a "
            "failure leaves the old set whole, never a mix of two runs' files."
        ),
    )
    _add_saved_model(p)
    _add_input(p, "raw-count .h5ad with the model's genes")
    _add_output(p, ".nc", "the ArviZ InferenceData (netCDF); the tables and plots go beside it")
    _add_n_samples(p, 50, "posterior draws S per cell; p-values have resolution 1/S")
    p.add_argument(
        "--max-cells",
        type=_positive_int,
        help="check a random subset of this many cells (default: all), and at most this many "
        "of the criticism page's cells; needed with --data-source streamed",
    )
    _add_batch_size(p, 256)
    _add_cells(p, "the cells of the criticism page")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME=MODEL_DIR",
        help="another saved fit to put side by side on the criticism page; repeatable",
    )
    _add_data_source_option(
        p,
        "stream them from the file (then --max-cells is needed: the draws of every "
        "checked cell are held in memory)",
    )
    _add_trust_model(p)
    _add_run_options(p)
    return p


#: What each file beside OUTPUT is, for messages.
_LABELS = {
    "table": "PPC table",
    "calibration": "calibration table",
    "ppp": "p-value plot",
    "scatter": "scatter plot",
    "criticism": "criticism table",
    "page": "criticism page",
}


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi ppc``: write the InferenceData, PPC table and plots; return the status."""
    output = _output_path(args, ".nc", " (a netCDF file)")
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
    _refuse_input(args, output, *paths.values())
    _check_outputs(
        args,
        {"OUTPUT": output, **{f"the {_LABELS[key]}": path for key, path in paths.items()}},
        models={
            "MODEL_DIR": Path(args.model_dir),
            **{f"--compare {n}": Path(d) for n, d in others.items()},
        },
    )

    import textwrap

    import matplotlib
    import numpy as np

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.criticism import compare, summary_table
    from ..analysis.plotting import plot_criticism, plot_ppc_scatter, plot_ppp_histograms
    from ..analysis.ppc import calibration_summary, ppc_table
    from ..io.files import current_umask, publish, remove_path, sweep_stale, temp_name
    from ..posterior.arviz import to_inference_data
    from ..scvi import SCVI, resolve_device
    from ._signals import check

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    if streamed and args.max_cells is None:
        raise InputError(
            f"INPUT is streamed ({data_source}), and ppc holds {args.n_samples} replicates of "
            "every checked cell in memory; pass --max-cells N to check a random subset, or "
            "--data-source memory."
        )
    streamed = True if streamed else None
    trust = args.trust_model
    model = SCVI.load(args.model_dir, adata, device=args.device, streamed=streamed, trust=trust)
    _check_fitted_cells(model, args.cells)  # before the draws
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
    fits = {"model": model}
    fits.update(
        {
            n: SCVI.load(d, adata, device=args.device, streamed=streamed, trust=trust)
            for n, d in others.items()
        }
    )
    for fit in fits.values():
        _check_fitted_cells(fit, args.cells)  # each --compare fit's own cells
    pages = compare(
        fits,
        cells=args.cells,
        max_cells=args.max_cells,
        n_samples=max(args.n_samples, 2),
        seed=args.seed,
    )
    criticism = summary_table(pages)
    # Every file under a temporary name first, then all moved in together (the .nc last):
    # an interrupt or a failure leaves the old set whole, never a mix of two runs' files.
    targets = [*paths.values(), output]
    temps: dict[Path, Path] = {}
    try:
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            sweep_stale(target)
            temps[target] = temp_name(target)
        idata.to_netcdf(str(temps[output]))
        table.to_csv(temps[paths["table"]], index=False)
        calibration.to_csv(temps[paths["calibration"]], index=False)
        plot_ppp_histograms(table, temps[paths["ppp"]])
        plot_ppc_scatter(table, temps[paths["scatter"]])
        criticism.to_csv(temps[paths["criticism"]])
        plot_criticism(pages, temps[paths["page"]])
        for tmp in temps.values():
            os.chmod(tmp, 0o666 & ~current_umask())
        check()  # a signal whose exception was swallowed on the way: keep the old set
        publish([(temps[target], target) for target in targets])
    finally:
        for tmp in temps.values():
            remove_path(tmp)
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
