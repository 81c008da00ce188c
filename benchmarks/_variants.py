"""Side by side variants of the default fit: what ``gate_init.py`` and ``library_residual.py``
share.

Each script changes one thing of ``SCVI(adata[, batch_key="batch"]).train(max_epochs=E,
seed=s)`` (a keyword of ``SCVI``) and trains every variant on every dataset and seed in one
run, one thread, scoring each fit the same way (:func:`fit_and_score`). :func:`run` is the
loop, with the options both take (:func:`parser`) and the results files rewritten after
every run (``--merge`` keeps the file's datasets this run does not redo, read again at
every write, so runs on disjoint datasets may share a file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import _common
import numpy as np

DATA_DIR = _common.data_dir()


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


def fit_and_score(
    adata: Any, seed: int, args: argparse.Namespace, **scvi_kwargs: Any
) -> dict[str, Any]:
    """Train ``SCVI(adata[, batch_key="batch"], **scvi_kwargs)`` at the defaults; score it.

    KMeans ARI and batch entropy of the posterior mean of z
    (:func:`pyro_scvi.analysis.metrics.score_latent`), held-out log p(x) per cell on at most
    ``args.ll_cells`` validation cells with ``args.ll_samples`` importance draws, and
    :func:`depth_r2`.
    """
    import pyro_scvi
    from pyro_scvi.analysis.metrics import score_latent

    multi = adata.obs["batch"].nunique() > 1
    model = pyro_scvi.SCVI(adata, batch_key="batch" if multi else None, **scvi_kwargs)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=seed, progress_bar=False)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    scores = score_latent(z, labels, adata.obs["batch"].to_numpy() if multi else None, seed=0)
    cells = model.validation_indices[: args.ll_cells]
    log_px = model.get_marginal_ll(adata[cells], n_samples=args.ll_samples, seed=seed)
    return {
        "ari": scores["ari"],
        "entropy_batch_mixing": scores.get("entropy_batch_mixing"),
        "heldout_log_px_per_cell": float(log_px),
        "depth_r2_within_types": depth_r2(z, adata.X, labels),
        "heldout_cells": int(len(cells)),
        "train_seconds": seconds,
        "final_validation_elbo": float(model.history["validation_elbo"].iloc[-1]),
    }


def parser(description: str) -> argparse.ArgumentParser:
    """The options every variant script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--datasets", nargs="+", help="names in --data-dir (default: every .h5ad)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--ll-cells", type=int, default=1000)
    p.add_argument("--ll-samples", type=int, default=100)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    p.add_argument("--merge", action="store_true", help="keep the file's other datasets")
    p.add_argument("--smoke", action="store_true", help="synthetic data, 1 epoch, 1 seed")
    return p


def run(
    argv: list[str] | None,
    p: argparse.ArgumentParser,
    *,
    script: str,
    key: str,
    variants: Sequence[Any],
    scvi_kwargs: Callable[[Any], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> int:
    """Train every variant on every dataset and seed; write the tables after every run.

    A run's record is ``{key: variant, "seed": seed, **fit_and_score(...)}``, the fit made
    with ``SCVI(..., **scvi_kwargs(variant))``. Results: ``<out-dir>/<stem>.{json,md}``,
    ``stem`` the script's name (``_smoke`` added with ``--smoke``).
    """
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.seeds, args.epochs, args.ll_samples = ["synthetic"], [0], 1, 5
    names = args.datasets or sorted(f.stem for f in args.data_dir.glob("*.h5ad"))
    if not names:
        p.error(f"no .h5ad in {args.data_dir}; pass --data-dir or --smoke")

    import torch

    torch.set_num_threads(1)
    results = _common.run_metadata(argv, 1, script=script)
    results["settings"] = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "ll_samples": args.ll_samples,
        "ll_cells": args.ll_cells,
        "smoke": args.smoke,
    }
    results["datasets"] = []
    stem = Path(script).stem + ("_smoke" if args.smoke else "")
    t0 = time.perf_counter()
    table = ""
    for name in names:
        adata = load(name, args)
        entry = {"name": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "runs": []}
        results["datasets"].append(entry)
        for seed in args.seeds:
            for variant in variants:
                run = {key: variant, "seed": seed}
                run |= fit_and_score(adata, seed, args, **scvi_kwargs(variant))
                entry["runs"].append(run)
                print(
                    f"{name} seed {seed} {key} {variant}: ARI {run['ari']:.3f}, "
                    f"log p(x) {run['heldout_log_px_per_cell']:.2f}, "
                    f"{run['train_seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                results["total_seconds"] = time.perf_counter() - t0
                table = _write(args, stem, results, markdown)
    print(table)
    return 0


def _write(
    args: argparse.Namespace,
    stem: str,
    results: dict[str, Any],
    markdown: Callable[[dict[str, Any]], str],
) -> str:
    """Write both files; with ``--merge`` first add the file's datasets not redone here."""
    out = dict(results)
    path = args.out_dir / f"{stem}.json"
    if args.merge and path.exists():
        earlier = json.loads(path.read_text())
        mine = {d["name"] for d in results["datasets"]}
        out["datasets"] = results["datasets"] + _common.keep_not_redone(
            earlier["datasets"], mine, "name", earlier
        )
    table = markdown(out)
    _common.write_results(args.out_dir, stem, out, table)
    return table
