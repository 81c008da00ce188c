"""One criticism page for several fits of one dataset, scvi-tools' among them.

pyro_scvi at its defaults (ZINB), with NB, with the Bayesian decoder, and scvi-tools 1.4.2
(matched architecture, its weights renamed into a pyro_scvi model) when installed, all on
the same split and checked on the same held-out cells by
:func:`pyro_scvi.analysis.criticism.compare`; every fit trains as many epochs as pyro_scvi's
default. Writes a table and the page (:func:`pyro_scvi.analysis.plotting.plot_criticism`).

    python -m benchmarks.criticism_side_by_side
    python -m benchmarks.criticism_side_by_side --smoke   # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from .lib import adapters, data, results

STUDY = "criticism_side_by_side"
COLUMNS = {
    "pit_tv": "PIT TV", "pit_tv_null": "floor", "calibration_error": "cal. error",
    "coverage_50": "cov 50", "coverage_90": "cov 90", "r2_mean": "r2 mean", "r2_cv": "r2 CV",
    "r2_zero_fraction": "r2 zeros", "r2_library_size": "r2 library", "elpd_mean": "ELPD/cell",
    "frac_pareto_k_high": "k > 0.7",
}  # fmt: skip
NOTE = (
    "- PIT TV: total-variation distance of the randomized-PIT histogram (20 bins) of every "
    "held-out entry from uniform (0 when calibrated; floor: its value for as many uniform "
    "values). cal. error: mean |coverage - nominal| of central intervals 10-95 %. r2: observed "
    "against replicated gene mean, CV, zero fraction and cell library size about the identity "
    "line. ELPD/cell: held-out log p(x) by PSIS; k > 0.7: share of cells where that estimate is "
    "unreliable. ELPD difference: the best fit's held-out ELPD minus this one's, summed over the "
    "cells, ± its paired standard error (0 for the best, larger is worse)."
)


def number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def show(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    import numpy as np

    import pyro_scvi
    from pyro_scvi.analysis import criticism
    from pyro_scvi.analysis.plotting import plot_criticism
    from pyro_scvi.model.schemes import BayesianDecoder

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--dataset", default="zeisel_cortex_subset_1464x1000")
    p.add_argument("--max-cells", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=None, help="default: pyro_scvi's default")
    p.add_argument("--n-samples", type=int, default=30, help="posterior draws per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of scvi-tools")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS)
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.n_samples, args.dataset = 2, 10, "synthetic_zinb_200x30"
        adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=30, seed=args.seed)
    else:
        adata = data.load(args.dataset, args.data_dir, subsample=args.max_cells, seed=args.seed)
    stem, meta = results.stem(STUDY, args.smoke), results.metadata(STUDY, argv)
    key, start = data.batch_key_for(adata), time.perf_counter()

    def fit_pyro_scvi(**model):
        fit = adapters.PyroScvi(adata, key, seed=args.seed, model=model).fit(args.epochs)
        return fit.model

    fits = {"pyro_scvi ZINB": fit_pyro_scvi()}
    args.epochs = len(fits["pyro_scvi ZINB"].history)  # every other fit trains as long
    split = fits["pyro_scvi ZINB"].train_indices, fits["pyro_scvi ZINB"].validation_indices
    fits["pyro_scvi NB"] = fit_pyro_scvi(likelihood=pyro_scvi.NB())
    fits["pyro_scvi ZINB + BayesianDecoder"] = fit_pyro_scvi(scheme=BayesianDecoder())
    if not adapters.skipped(["scvi-tools"]):
        theirs = adapters.ScviTools(adata, key, matched=True, seed=args.seed, threads=args.threads)
        fits["scvi-tools ZINB"] = theirs.fit(args.epochs, split).as_pyro_scvi()
    for name, model in fits.items():
        if name.startswith("pyro_scvi") and not np.array_equal(model.validation_indices, split[1]):
            raise RuntimeError(f"{name} was trained on another split")
    checked = criticism.compare(fits, indices=split[1], n_samples=args.n_samples, seed=args.seed)
    summary, elpd = criticism.summary_table(checked), criticism.compare_elpd(checked)
    seconds = time.perf_counter() - start
    png = args.out_dir / f"{stem}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    plot_criticism(checked, png)
    rows = [
        {"fit": name, **{k: number(summary.loc[name, k]) for k in COLUMNS}}
        | {f"elpd_{c}": number(elpd.loc[name, c]) for c in elpd.columns}
        for name in fits
    ]
    how = (
        f"{adata.n_obs} cells x {adata.n_vars} genes, batch key {key}; {args.epochs} epochs for "
        f"every fit (pyro_scvi's default), seed {args.seed}; checked on the same {len(split[1])} "
        f"held-out cells with {args.n_samples} posterior draws each; {seconds / 60:.1f} minutes."
        + " scvi-tools is not installed: its row is absent."
        * ("scvi-tools ZINB" not in fits)
    )
    lines = results.header({"meta": meta}, f"Criticism side by side: {args.dataset}", how)
    lines += results.md_table(
        ["fit", *(f"{c}:" for c in COLUMNS.values()), "ELPD difference:"],
        [
            f"{r['fit']} | "
            + " | ".join(show(r[k]) for k in COLUMNS)
            + f" | {show(r['elpd_elpd_diff'])} ± {show(r['elpd_dse'])}"
            for r in rows
        ],
    )
    lines += ["", NOTE, f"- The page: `{png.name}` beside this file.", ""]
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.write(
        args.out_dir, stem, {"meta": meta, "settings": settings, "rows": rows}, "\n".join(lines)
    )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
