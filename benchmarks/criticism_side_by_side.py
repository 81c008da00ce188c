"""One criticism page for several fits of one dataset, scvi-tools' among them.

Fits, all on the same 90 % / 10 % split (seed ``--seed``) and checked on the same held-out
cells with :func:`pyro_scvi.analysis.criticism.compare`:

* ``pyro_scvi ZINB``: the package defaults (``SCVI(adata).train()``);
* ``pyro_scvi NB``: the same with ``likelihood=pyro_scvi.NB()``;
* ``pyro_scvi ZINB + BayesianDecoder``: ``scheme=BayesianDecoder()`` (posterior over the
  decoder's output layer and theta);
* ``scvi-tools ZINB`` (when scvi-tools is installed): scvi-tools 1.4.2 with the same
  architecture, latent library and epochs, its weights renamed into a pyro_scvi model
  (``compare_scvi_tools.scvi_tools_as_pyro_scvi``) so the same checks apply to it.

Epochs: the pyro_scvi default (``train(max_epochs=None)``), the same number for
scvi-tools. Writes a table (PIT TV and its noise floor, calibration error, coverage, r2 of
gene and cell statistics, held-out ELPD and its differences) and the page itself
(:func:`pyro_scvi.analysis.plotting.plot_criticism`, one colour per fit).

Run (the benchmark environment, for scvi-tools)::

    PYTHONPATH=. python benchmarks/criticism_side_by_side.py
    PYTHONPATH=. python benchmarks/criticism_side_by_side.py --smoke   # seconds

Results: ``benchmarks/results/criticism_side_by_side.{json,md,png}`` (``_smoke`` with
``--smoke``).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import anndata
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import pyro_scvi  # noqa: E402
from pyro_scvi.analysis import criticism  # noqa: E402
from pyro_scvi.analysis.plotting import plot_criticism  # noqa: E402
from pyro_scvi.model.schemes import BayesianDecoder  # noqa: E402

COLUMNS = [
    ("pit_tv", "PIT TV"),
    ("pit_tv_null", "floor"),
    ("calibration_error", "cal. error"),
    ("coverage_50", "cov 50"),
    ("coverage_90", "cov 90"),
    ("r2_mean", "r2 mean"),
    ("r2_cv", "r2 CV"),
    ("r2_zero_fraction", "r2 zeros"),
    ("r2_library_size", "r2 library"),
    ("elpd_mean", "ELPD/cell"),
    ("frac_pareto_k_high", "k > 0.7"),
]


def load(args) -> tuple[anndata.AnnData, str | None]:
    """The dataset (subsampled to ``--max-cells``) and its batch key."""
    if args.smoke:
        adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=30, seed=args.seed)
    else:
        adata = anndata.read_h5ad(Path(args.data_dir) / f"{args.dataset}.h5ad")
        if args.max_cells and adata.n_obs > args.max_cells:
            rng = np.random.default_rng(args.seed)
            adata = adata[np.sort(rng.choice(adata.n_obs, args.max_cells, replace=False))]
        adata = adata.copy()
    batch_key = "batch" if "batch" in adata.obs and adata.obs["batch"].nunique() > 1 else None
    return adata, batch_key


def fit_pyro_scvi(adata, batch_key, args, **kwargs):
    """A pyro_scvi fit at its defaults but for ``kwargs``; epochs from the command line."""
    model = pyro_scvi.SCVI(adata, batch_key=batch_key, **kwargs)
    model.train(max_epochs=args.epochs, seed=args.seed, progress_bar=False)
    return model


def fit_scvi_tools(adata, batch_key, epochs, split, args):
    """scvi-tools on the same split, as a pyro_scvi model (``None`` if not installed)."""
    try:
        import compare_scvi_tools as cst
    except ImportError:
        return None
    try:
        import scvi  # noqa: F401
    except ImportError:
        return None
    # setup_anndata writes into obs: scvi-tools gets its own copy
    trained, _ = cst.train_scvi_tools(
        adata.copy(), batch_key, epochs, args.seed, split, threads=args.threads
    )
    return cst.scvi_tools_as_pyro_scvi(trained, adata, batch_key)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=str(_common.data_dir()))
    p.add_argument("--dataset", default="zeisel_cortex_subset_1464x1000")
    p.add_argument("--max-cells", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=None, help="default: pyro_scvi's default")
    p.add_argument("--n-samples", type=int, default=30, help="posterior draws per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of scvi-tools")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.n_samples, args.dataset = 2, 10, "synthetic_zinb_200x30"
    stem = "criticism_side_by_side" + ("_smoke" if args.smoke else "")
    meta = _common.run_metadata(argv, threads=None, extra_versions=("scvi-tools",))
    adata, batch_key = load(args)
    start = time.perf_counter()
    fits = {}
    fits["pyro_scvi ZINB"] = fit_pyro_scvi(adata, batch_key, args)
    reference = fits["pyro_scvi ZINB"]
    epochs = int(len(reference.history))
    args.epochs = epochs  # every other fit runs as long as the default one did
    split = (np.asarray(reference.train_indices), np.asarray(reference.validation_indices))
    fits["pyro_scvi NB"] = fit_pyro_scvi(adata, batch_key, args, likelihood=pyro_scvi.NB())
    fits["pyro_scvi ZINB + BayesianDecoder"] = fit_pyro_scvi(
        adata, batch_key, args, scheme=BayesianDecoder()
    )
    scvi_tools = fit_scvi_tools(adata, batch_key, epochs, copy.deepcopy(split), args)
    if scvi_tools is not None:
        fits["scvi-tools ZINB"] = scvi_tools
    for name, model in fits.items():
        if name.startswith("pyro_scvi") and not np.array_equal(model.validation_indices, split[1]):
            raise RuntimeError(f"{name} was trained on another split")
    results = criticism.compare(fits, indices=split[1], n_samples=args.n_samples, seed=args.seed)
    table = criticism.summary_table(results)
    elpd = criticism.compare_elpd(results)
    seconds = time.perf_counter() - start
    args.out_dir.mkdir(parents=True, exist_ok=True)
    png = args.out_dir / f"{stem}.png"
    plot_criticism(results, png)

    rows = []
    for name in fits:
        row = {"fit": name, **{k: _float(table.loc[name, k]) for k, _ in COLUMNS}}
        row.update({f"elpd_{c}": _float(elpd.loc[name, c]) for c in elpd.columns})
        rows.append(row)
    lines = [
        f"# Criticism side by side: {args.dataset}",
        "",
        _common.machine_line(meta),
        "",
        f"Command: `{meta['command']}`. {adata.n_obs} cells x {adata.n_vars} genes, "
        f"batch key {batch_key}; {epochs} epochs for every fit (pyro_scvi's default), seed "
        f"{args.seed}; checked on the same {len(split[1])} held-out cells with "
        f"{args.n_samples} posterior draws each; {seconds / 60:.1f} minutes in all."
        + ("" if scvi_tools is not None else " scvi-tools is not installed: its row is absent."),
        "",
        "| fit | " + " | ".join(label for _, label in COLUMNS) + " | ELPD difference |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for row in rows:
        cells = [_fmt(row[k]) for k, _ in COLUMNS]
        diff = f"{_fmt(row['elpd_elpd_diff'])} ± {_fmt(row['elpd_dse'])}"
        lines.append(f"| {row['fit']} | " + " | ".join(cells) + f" | {diff} |")
    lines += [
        "",
        "- PIT TV: total-variation distance of the randomized-PIT histogram (20 bins) of "
        "every held-out entry from uniform (0 when calibrated; floor: its value for as many "
        "uniform values). cal. error: mean |coverage - nominal| of central intervals "
        "10-95 %. r2: observed against replicated gene mean, CV, zero fraction and cell "
        "library size about the identity line. ELPD/cell: held-out log p(x) by PSIS; "
        "k > 0.7: share of cells where that estimate is unreliable. ELPD difference: the best "
        "fit's held-out ELPD minus this one's, summed over the cells, ± its paired standard "
        "error (criticism.compare_elpd; 0 for the best, larger is worse).",
        f"- The page: `{png.name}` beside this file.",
    ]
    results_json = {**meta, "settings": vars(args) | {"out_dir": str(args.out_dir)}, "rows": rows}
    _common.write_results(args.out_dir, stem, results_json, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _fmt(value) -> str:
    if value is None or not np.isfinite(value):
        return "—"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main())
