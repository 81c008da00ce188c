"""Query mapping against training on everything: hold one donor out, map it, compare.

Exit code 0: the criteria met; 2: not met; 1: a failure. Details: ``benchmarks/README.md``.

    python -m benchmarks.query_mapping            # OneK1K and Baron, 100 epochs
    python -m benchmarks.query_mapping --smoke    # seconds, synthetic data
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .lib import data, results

STUDY = "query_mapping"
#: NAME or NAME:DONOR (default donor: the largest); Baron has two donors: both directions
DATASETS = (
    "onek1k_pbmc_40donors_scdesignpop",
    "baron_pancreas_indrop_neuca:human2",
    "baron_pancreas_indrop_neuca:human4",
)
TOLERANCES = {"ari": 0.05, "entropy_donors": 0.05, "entropy_query": 0.05, "heldout_ll_rel": 0.01}


def evaluate(z: Any, adata: Any, is_query: Any, seed: int) -> dict[str, float]:
    import numpy as np
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
    import numpy as np

    from pyro_scvi import SCVI, Engine, datasets

    name, _, donor = spec.partition(":")
    if args.smoke:
        sim = {"n_batches": 3, "batch_effect": 0.5, "seed": args.seed}
        adata, donor = datasets.synthetic_zinb(n_cells=400, n_genes=50, **sim), "batch2"
    else:
        adata = data.load(name, args.data_dir)
    donors = adata.obs["batch"].astype(str)
    donor = donor or donors.value_counts().idxmax()
    is_query = (donors == donor).to_numpy()
    query_idx = np.flatnonzero(is_query)
    n_test = int(round(args.test_fraction * len(query_idx)))
    test = np.sort(np.random.default_rng(args.seed).choice(query_idx, n_test, replace=False))
    keep = np.setdiff1d(np.arange(adata.n_obs), test)  # every cell but the test cells
    cells, in_query = adata[keep].copy(), is_query[keep]
    ref, query, test_cells = cells[~in_query].copy(), cells[in_query].copy(), adata[test].copy()
    train = {"max_epochs": args.epochs, "seed": args.seed, "progress_bar": False}
    train |= {"engine": Engine(threads=args.threads)} if args.threads else {}
    row = {"dataset": spec, "shape": list(adata.shape), "n_donors": int(donors.nunique())}
    row |= {"query_donor": donor, "n_query_donor_cells": int(is_query.sum())}
    row |= {"reference_cells": ref.n_obs, "query_cells": query.n_obs}
    row["test_cells"] = test_cells.n_obs
    t = time.perf_counter()
    reference = SCVI(ref, batch_key="batch").train(**train)
    t, row["seconds_reference"] = time.perf_counter(), time.perf_counter() - t
    mapped = SCVI.load_query_data(query, reference).train(**train)
    t, row["seconds_mapping"] = time.perf_counter(), time.perf_counter() - t
    full = SCVI(cells, batch_key="batch").train(**train)
    row["seconds_full"] = time.perf_counter() - t
    z_mapped = np.zeros((cells.n_obs, mapped.model.n_latent), dtype=np.float32)
    z_mapped[~in_query] = reference.get_latent_representation()
    z_mapped[in_query] = mapped.get_latent_representation()
    z_full, ll = full.get_latent_representation(), {"n_samples": args.ll_samples}
    for side, model, z in (("mapped", mapped, z_mapped), ("full", full, z_full)):
        row[side] = evaluate(z, cells, in_query, args.seed)
        row[side]["heldout_ll"] = model.get_marginal_ll(test_cells, **ll, seed=args.seed)
    # the reference part of the mapped model is the reference, exactly
    z_ref = mapped.get_latent_representation(ref)
    row["reference_cells_unchanged"] = bool(np.allclose(z_ref, z_mapped[~in_query], atol=1e-5))
    m, f = row["mapped"], row["full"]
    row["differences"] = {k: m[k] - f[k] for k in ("ari", "entropy_donors", "entropy_query")}
    rel = (m["heldout_ll"] - f["heldout_ll"]) / abs(f["heldout_ll"])
    row["differences"]["heldout_ll_rel"] = rel
    row["criteria_met"] = {k: bool(abs(v) <= TOLERANCES[k]) for k, v in row["differences"].items()}
    return row


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = (
        f"{s['epochs']} epochs for every training (defaults otherwise), seed {s['seed']}. "
        "mapped = reference model of the other donors + the held-out donor mapped onto it (only "
        "its batch's weights train); full = one model of all donors. ARI and entropies over every "
        "cell but the test cells; label transfer: 15-NN of the reference labels, on the query "
        "cells; held-out log p(x): the query donor's test cells (neither trained on them), nats "
        "per cell. Criteria: |difference| <= 0.05 (ARI, entropies), log p(x) within 1 %."
    )
    rows = []
    for r in res["rows"]:
        if "error" in r:
            rows.append(f"{r['dataset']} | error: {r['error']} | | | | | | |")
            continue
        m, f, d = r["mapped"], r["full"], r["differences"]
        keys = ("ari", "entropy_donors", "entropy_query")
        pairs = " | ".join(f"{m[k]:.3f} / {f[k]:.3f} ({d[k]:+.3f})" for k in keys)
        unmet = [k for k, ok in r["criteria_met"].items() if not ok]
        met = "not met: " + ", ".join(unmet) if unmet else "all met"
        rows.append(
            f"{r['dataset']} | {r['query_donor']} ({r['query_cells']} + {r['test_cells']} test) | "
            f"{pairs} | {m['label_transfer_accuracy']:.3f} / {f['label_transfer_accuracy']:.3f} | "
            f"{m['heldout_ll']:.1f} / {f['heldout_ll']:.1f} ({100 * d['heldout_ll_rel']:+.2f} %)"
            f" | {r['seconds_reference']:.0f} + {r['seconds_mapping']:.0f} / "
            f"{r['seconds_full']:.0f} | {met}"
        )
    lines = results.header(res, "Query mapping vs training on everything", how)
    columns = "dataset|query donor (cells)|ARI mapped / full|batch entropy, donors|"
    columns += "batch entropy, query vs reference|label transfer|held-out log p(x)|"
    columns += "train s: reference + mapping / full|"
    return "\n".join(lines + results.md_table(columns + "criteria", rows)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p, _ = results.parser(__doc__, "synthetic data, 2 epochs")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), help="NAME or NAME:DONOR")
    p.add_argument("--epochs", type=int, default=100, help="max_epochs of every training")
    p.add_argument("--test-fraction", type=float, default=0.2, help="query cells held out")
    p.add_argument("--ll-samples", type=int, default=100, help="importance samples, log p(x)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: auto)")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.ll_samples, args.datasets = 2, 5, ["synthetic_smoke"]
    settings = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out_dir")}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.threads)}
    res |= {"settings": settings | {"tolerances": TOLERANCES}, "rows": []}
    start, failed = time.perf_counter(), False
    for name in args.datasets:
        print(f"{name}:", file=sys.stderr, flush=True)
        try:
            res["rows"].append(run_dataset(name, args))
        except Exception as err:  # record it and go on with the next dataset
            failed = True
            res["rows"].append({"dataset": name, "error": f"{type(err).__name__}: {err}"})
        res["elapsed_seconds"] = time.perf_counter() - start
        results.write(args.out_dir, results.stem(STUDY, args.smoke), res, markdown(res))
    print(markdown(res))
    return 1 if failed else 0 if all(all(r["criteria_met"].values()) for r in res["rows"]) else 2


if __name__ == "__main__":
    sys.exit(main())
