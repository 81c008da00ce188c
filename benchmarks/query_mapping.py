"""Query mapping against training on everything: hold one donor out, map it, compare.

For each dataset: one donor (default: the largest) is the query, the other donors the
reference. Its cells are split once (seeded) into mapping cells and test cells. Then

* **mapped**: a reference model trained on the other donors, and the query donor's mapping
  cells mapped onto it with ``SCVI.load_query_data`` (only the new batch's weights train);
* **full**: one model trained on the other donors and the query's mapping cells together.

Both are scored the same way, with ``pyro_scvi.analysis.metrics``: KMeans ARI of all the cells'
latent space against the cell types (reference cells embedded by the reference model, query
cells by the mapped one: the same latent space); the batch entropy of the paper, over the
donors and over query-vs-reference; the accuracy of a 15-nearest-neighbour transfer of the
reference's labels to the query cells; and the held-out log p(x) of the query's test cells,
which neither model trained on (importance sampling). Criteria (issue 15): |ARI
difference| and |batch-entropy difference| <= 0.05, held-out log p(x) within 1 %.

    python benchmarks/query_mapping.py                  # OneK1K and Baron, 100 epochs
    python benchmarks/query_mapping.py --smoke          # seconds, synthetic data

Results: ``benchmarks/results/query_mapping.{json,md}`` (``--smoke``: ``_smoke``). Exit
code 0 when every criterion is met, 2 when one is not, 1 on a failure.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import _common
import numpy as np

DEFAULT_DATA_DIR = _common.data_dir()
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
#: NAME or NAME:DONOR (default donor: the largest). Baron has two donors: both directions.
DATASETS = (
    "onek1k_pbmc_40donors_scdesignpop",
    "baron_pancreas_indrop_neuca:human2",
    "baron_pancreas_indrop_neuca:human4",
)
TOLERANCES = {"ari": 0.05, "entropy_donors": 0.05, "entropy_query": 0.05, "heldout_ll_rel": 0.01}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    p.add_argument(
        "--datasets",
        nargs="+",
        default=list(DATASETS),
        help="NAME (an .h5ad in --data-dir) or NAME:DONOR, the donor to hold out "
        "(default: the largest)",
    )
    p.add_argument("--epochs", type=int, default=100, help="max_epochs of every training")
    p.add_argument("--test-fraction", type=float, default=0.2, help="query cells held out")
    p.add_argument("--ll-samples", type=int, default=100, help="importance samples, log p(x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    p.add_argument("--smoke", action="store_true", help="synthetic data, 2 epochs")
    return p.parse_args(argv)


def load(name: str, args: argparse.Namespace):
    import anndata

    if args.smoke:
        from pyro_scvi.datasets import synthetic_zinb

        return synthetic_zinb(
            n_cells=400, n_genes=50, n_batches=3, batch_effect=0.5, seed=args.seed
        )
    return anndata.read_h5ad(args.data_dir / f"{name}.h5ad")


def evaluate(z: np.ndarray, adata, is_query: np.ndarray, seed: int) -> dict[str, float]:
    from sklearn.neighbors import KNeighborsClassifier

    from pyro_scvi.analysis import metrics

    labels = adata.obs["cell_type"].astype(str).to_numpy()
    donors = adata.obs["batch"].astype(str).to_numpy()
    side = np.where(is_query, "query", "reference")
    knn = KNeighborsClassifier(15).fit(z[~is_query], labels[~is_query])
    return {
        "ari": metrics.clustering_scores(z, labels, seed=seed)["ari"],
        "entropy_donors": metrics.entropy_batch_mixing(z, donors, seed=seed),
        "entropy_query": metrics.entropy_batch_mixing(z, side, seed=seed),
        "label_transfer_accuracy": float((knn.predict(z[is_query]) == labels[is_query]).mean()),
    }


def run_dataset(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    from pyro_scvi import SCVI

    name, _, query_donor = spec.partition(":")
    adata = load(name, args)
    donors = adata.obs["batch"].astype(str)
    query_donor = query_donor or donors.value_counts().idxmax()
    if args.smoke:
        query_donor = "batch2"
    is_query = (donors == query_donor).to_numpy()
    rng = np.random.default_rng(args.seed)
    query_idx = np.flatnonzero(is_query)
    n_test = int(round(args.test_fraction * len(query_idx)))
    test = np.sort(rng.choice(query_idx, n_test, replace=False))
    keep = np.setdiff1d(np.arange(adata.n_obs), test)  # every cell but the test cells
    data = adata[keep].copy()
    in_query = is_query[keep]
    ref, query, test_cells = data[~in_query].copy(), data[in_query].copy(), adata[test].copy()
    train = dict(max_epochs=args.epochs, seed=args.seed, progress_bar=False)
    if args.threads:
        train["engine"] = __import__("pyro_scvi").Engine(threads=args.threads)
    row: dict[str, Any] = {
        "dataset": spec,
        "shape": list(adata.shape),
        "n_donors": int(donors.nunique()),
        "query_donor": query_donor,
        "n_query_donor_cells": int(is_query.sum()),
        "reference_cells": ref.n_obs,
        "query_cells": query.n_obs,
        "test_cells": test_cells.n_obs,
    }

    t = time.perf_counter()
    reference = SCVI(ref, batch_key="batch").train(**train)
    row["seconds_reference"] = time.perf_counter() - t
    t = time.perf_counter()
    mapped = SCVI.load_query_data(query, reference).train(**train)
    row["seconds_mapping"] = time.perf_counter() - t
    t = time.perf_counter()
    full = SCVI(data, batch_key="batch").train(**train)
    row["seconds_full"] = time.perf_counter() - t

    z_mapped = np.zeros((data.n_obs, mapped.model.n_latent), dtype=np.float32)
    z_mapped[~in_query] = reference.get_latent_representation()
    z_mapped[in_query] = mapped.get_latent_representation()
    z_full = full.get_latent_representation()
    ll = dict(n_samples=args.ll_samples, seed=args.seed)
    row["mapped"] = evaluate(z_mapped, data, in_query, args.seed)
    row["full"] = evaluate(z_full, data, in_query, args.seed)
    row["mapped"]["heldout_ll"] = mapped.get_marginal_ll(test_cells, **ll)
    row["full"]["heldout_ll"] = full.get_marginal_ll(test_cells, **ll)
    # the reference part of the mapped model is the reference, exactly
    row["reference_cells_unchanged"] = bool(
        np.allclose(mapped.get_latent_representation(ref), z_mapped[~in_query], atol=1e-5)
    )
    m, f = row["mapped"], row["full"]
    row["differences"] = {
        "ari": m["ari"] - f["ari"],
        "entropy_donors": m["entropy_donors"] - f["entropy_donors"],
        "entropy_query": m["entropy_query"] - f["entropy_query"],
        "heldout_ll_rel": (m["heldout_ll"] - f["heldout_ll"]) / abs(f["heldout_ll"]),
    }
    row["criteria_met"] = {k: bool(abs(v) <= TOLERANCES[k]) for k, v in row["differences"].items()}
    return row


def markdown_table(results: dict[str, Any]) -> str:
    meta = results
    lines = [
        "# Query mapping vs training on everything",
        "",
        f"Measured {meta['date']} on {_common.machine_line(meta)}; pyro_scvi commit "
        f"`{(meta['git'].get('pyro_scvi_commit') or '?')[:7]}`; {results['settings']['epochs']} "
        "epochs for every training (defaults otherwise), seed "
        f"{results['settings']['seed']}.",
        "",
        "mapped = reference model of the other donors + the held-out donor mapped onto it "
        "(only its batch's weights train); full = one model of all donors. ARI and entropies "
        "over every cell but the test cells; label transfer: 15-NN of the reference labels, "
        "on the query cells; held-out log p(x): the query donor's test cells (neither trained "
        "on them), nats per cell. Criteria: |difference| <= 0.05 (ARI, entropies), "
        "log p(x) within 1 %.",
        "",
        "| dataset | query donor (cells) | ARI mapped / full | batch entropy, donors | "
        "batch entropy, query vs reference | label transfer | held-out log p(x) | "
        "train s: reference + mapping / full | criteria |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        if "error" in r:
            lines.append(f"| {r['dataset']} | error: {r['error']} |||||||")
            continue
        m, f, d = r["mapped"], r["full"], r["differences"]
        unmet = [k for k, ok in r["criteria_met"].items() if not ok]
        lines.append(
            f"| {r['dataset']} | {r['query_donor']} ({r['query_cells']} + "
            f"{r['test_cells']} test) | {m['ari']:.3f} / {f['ari']:.3f} ({d['ari']:+.3f}) | "
            f"{m['entropy_donors']:.3f} / {f['entropy_donors']:.3f} "
            f"({d['entropy_donors']:+.3f}) | {m['entropy_query']:.3f} / "
            f"{f['entropy_query']:.3f} ({d['entropy_query']:+.3f}) | "
            f"{m['label_transfer_accuracy']:.3f} / {f['label_transfer_accuracy']:.3f} | "
            f"{m['heldout_ll']:.1f} / {f['heldout_ll']:.1f} "
            f"({100 * d['heldout_ll_rel']:+.2f} %) | {r['seconds_reference']:.0f} + "
            f"{r['seconds_mapping']:.0f} / {r['seconds_full']:.0f} | "
            f"{'all met' if not unmet else 'not met: ' + ', '.join(unmet)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        args.epochs, args.ll_samples, args.datasets = 2, 5, ["synthetic_smoke"]
    start = time.perf_counter()
    results: dict[str, Any] = {
        **_common.run_metadata(argv, args.threads, script="query_mapping.py"),
        "settings": {
            "datasets": args.datasets,
            "epochs": args.epochs,
            "test_fraction": args.test_fraction,
            "ll_samples": args.ll_samples,
            "seed": args.seed,
            "smoke": args.smoke,
            "tolerances": TOLERANCES,
        },
        "rows": [],
    }
    stem = "query_mapping" + ("_smoke" if args.smoke else "")
    failed = False
    for name in args.datasets:
        print(f"{name}:", file=sys.stderr, flush=True)
        try:
            results["rows"].append(run_dataset(name, args))
        except Exception as err:  # record it and go on with the next dataset
            failed = True
            results["rows"].append({"dataset": name, "error": f"{type(err).__name__}: {err}"})
        results["elapsed_seconds"] = time.perf_counter() - start
        _common.write_results(args.out_dir, stem, results, markdown_table(results))
    print(markdown_table(results))
    if failed:
        return 1
    met = all(all(r["criteria_met"].values()) for r in results["rows"])
    return 0 if met else 2


if __name__ == "__main__":
    sys.exit(main())
