"""Where the zero-inflation gate starts: ``ZINB(initial_dropout=0.05)`` against a layer's start.

A decoder head left at a fresh ``torch.nn.Linear``'s random start (``initial_dropout=None``,
pyro_scvi's start before the option existed) gives every cell and gene a dropout
probability near 0.5 at the first step. pyro_scvi's ZINB starts it at 0.05
instead (:class:`pyro_scvi.likelihoods.ZINB`, ``initial_dropout``), so the fit starts near
the plain negative binomial and gives zeros to the gate where the data ask for it. This
script measures what that start changes, at the user's defaults otherwise
(``SCVI(adata[, batch_key="batch"]).train(max_epochs=E, seed=s)``, latent library, 90 %
training cells), on every shared dataset and several seeds:

* KMeans ARI of the posterior mean of z against ``obs["cell_type"]`` and batch-entropy
  mixing (multi-batch data), from :func:`pyro_scvi.metrics.score_latent`;
* held-out log p(x) per cell (``get_marginal_ll`` on the validation cells, at most
  ``--ll-cells``, ``--ll-samples`` importance draws);
* how much of the cells' log library size z explains within a cell type (the median over
  cell types of the R² of a linear regression of log library size on z), a diagnostic of
  how much sequencing depth z carries.

::

    python benchmarks/gate_init.py                      # every shared dataset, seeds 0 1 2
    python benchmarks/gate_init.py --datasets zeisel_cortex_subset_1464x1000 --seeds 0
    python benchmarks/gate_init.py --smoke              # seconds (the test suite runs it)

One thread per run (``torch.set_num_threads(1)``): this measures accuracy, not speed.
Results: ``benchmarks/results/gate_init.{json,md}`` (``--smoke``: ``gate_init_smoke.*``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA_DIR = _common.REPO.parent / "shared" / "data"
STARTS = (0.05, None)  # None: the layer's random start, a gate near 0.5


def depth_r2(latent: np.ndarray, counts: Any, labels: np.ndarray) -> float:
    """Median over cell types of the R² of log library size regressed on ``latent``."""
    from sklearn.linear_model import LinearRegression

    log_lib = np.log(np.asarray(counts.sum(axis=1)).ravel())
    scores = []
    for label in np.unique(labels):
        rows = labels == label
        if rows.sum() > latent.shape[1] + 2:
            fit = LinearRegression().fit(latent[rows], log_lib[rows])
            scores.append(fit.score(latent[rows], log_lib[rows]))
    return float(np.median(scores)) if scores else float("nan")


def run_one(adata: Any, start: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train the default model with the gate starting at ``start``; score it."""
    import pyro_scvi
    from pyro_scvi.metrics import score_latent

    multi = adata.obs["batch"].nunique() > 1
    model = pyro_scvi.SCVI(
        adata,
        batch_key="batch" if multi else None,
        likelihood=pyro_scvi.ZINB(initial_dropout=start),
    )
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=seed, progress_bar=False)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    scores = score_latent(z, labels, adata.obs["batch"].to_numpy() if multi else None, seed=0)
    cells = model.validation_indices[: args.ll_cells]
    log_px = model.get_marginal_ll(adata[cells], n_samples=args.ll_samples, seed=seed)
    return {
        "initial_dropout": start,
        "seed": seed,
        "ari": scores["ari"],
        "entropy_batch_mixing": scores.get("entropy_batch_mixing"),
        "heldout_log_px_per_cell": float(log_px),
        "depth_r2_within_types": depth_r2(z, adata.X, labels),
        "heldout_cells": int(len(cells)),
        "train_seconds": seconds,
    }


def load(name: str, args: argparse.Namespace) -> Any:
    """A shared dataset without empty cells, or the smoke test's synthetic data."""
    if name == "synthetic":
        import pyro_scvi

        return pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=60, n_batches=2, seed=0)
    import anndata

    adata = anndata.read_h5ad(args.data_dir / (name if name.endswith(".h5ad") else f"{name}.h5ad"))
    keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    return adata[keep].copy()


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return float(np.median(values)) if values else None


def markdown(results: dict[str, Any]) -> str:
    """The results as a table: medians per dataset and start, then every run."""
    how = (
        f"max_epochs {results['settings']['epochs']}, seeds {results['settings']['seeds']}, "
        f"1 thread, log p(x) with {results['settings']['ll_samples']} importance samples"
    )
    lines = [
        "# Where the zero-inflation gate starts: initial dropout 0.05 (default) vs None "
        "(a fresh layer's random start, near 0.5; the default before)",
        "",
        f"{results['date']}; {_common.machine_line(results)}; pyro_scvi commit "
        f"{str(results['git']['pyro_scvi_commit'])[:7]}."
        + (" SMOKE RUN: numbers are meaningless." if results["settings"]["smoke"] else ""),
        "",
        f"Command: `{results['command']}`. {how}; {results['total_seconds'] / 60:.1f} minutes.",
        "",
        "## Medians over seeds",
        "",
        "| dataset | initial dropout | ARI | batch entropy | held-out log p(x) | "
        "R² of depth on z within types |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None or not np.isfinite(v) else format(v, spec)

    for d in results["datasets"]:
        for start in STARTS:
            rows = [r for r in d["runs"] if r["initial_dropout"] == start]
            lines.append(
                f"| {d['name']} | {start} | {fmt(median(rows, 'ari'), '.3f')} | "
                f"{fmt(median(rows, 'entropy_batch_mixing'), '.3f')} | "
                f"{fmt(median(rows, 'heldout_log_px_per_cell'), '.2f')} | "
                f"{fmt(median(rows, 'depth_r2_within_types'), '.2f')} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| dataset | seed | initial dropout | ARI | batch entropy | held-out log p(x) "
        "| R² depth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        for r in sorted(d["runs"], key=lambda r: r["seed"]):
            lines.append(
                f"| {d['name']} | {r['seed']} | {r['initial_dropout']} | {fmt(r['ari'], '.3f')} | "
                f"{fmt(r['entropy_batch_mixing'], '.3f')} | "
                f"{fmt(r['heldout_log_px_per_cell'], '.2f')} | "
                f"{fmt(r['depth_r2_within_types'], '.2f')} |"
            )
    lines += [
        "",
        "- ARI (higher is better): KMeans with k = number of cell types on the posterior mean "
        "of z; batch entropy (higher is better mixing, multi-batch data only); held-out log "
        "p(x): nats per cell on the validation cells of the seed, higher is better.",
        "- R² of depth on z: the median over cell types of the R² of log library size "
        "regressed linearly on z; lower means z carries less of the cells' sequencing depth.",
        "- Both starts train the same model (latent library, ZINB) with the same seed, split "
        "and everything else at the defaults; only the gate head's initial bias differs "
        "(logit of the initial dropout).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", help="names in --data-dir (default: every .h5ad)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--ll-cells", type=int, default=1000)
    p.add_argument("--ll-samples", type=int, default=100)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    p.add_argument("--smoke", action="store_true", help="synthetic data, 1 epoch, 1 seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.seeds, args.epochs, args.ll_samples = ["synthetic"], [0], 1, 5
    names = args.datasets or sorted(p.stem for p in args.data_dir.glob("*.h5ad"))
    if not names:
        p.error(f"no .h5ad in {args.data_dir}; pass --data-dir or --smoke")

    import torch

    torch.set_num_threads(1)
    results = _common.run_metadata(argv, 1, script="gate_init.py")
    results["settings"] = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "ll_samples": args.ll_samples,
        "ll_cells": args.ll_cells,
        "smoke": args.smoke,
    }
    results["datasets"] = []
    stem = "gate_init_smoke" if args.smoke else "gate_init"
    t0 = time.perf_counter()
    for name in names:
        adata = load(name, args)
        entry = {"name": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "runs": []}
        results["datasets"].append(entry)
        for seed in args.seeds:
            for start in STARTS:
                run = run_one(adata, start, seed, args)
                entry["runs"].append(run)
                print(
                    f"{name} seed {seed} initial dropout {start}: ARI {run['ari']:.3f}, "
                    f"log p(x) {run['heldout_log_px_per_cell']:.2f}",
                    file=sys.stderr,
                )
        results["total_seconds"] = time.perf_counter() - t0
        table = markdown(results)
        _common.write_results(args.out_dir, stem, results, table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
