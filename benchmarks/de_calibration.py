"""Calibration of differential expression on known truth: pyro_scvi vs scvi-tools vs Wilcoxon.

ZINB counts of ``--types`` cell types in 2 batches: each type has its own DE genes, built in
up/down pairs that leave every type's total expression unchanged, so all other genes have
exactly equal normalized expression; batch effects (sd ``--batch-effect`` per gene) and types
spread 20-80 % over the batches. Every pair of types is compared (AUROC, empirical FDR and
power at a 5 % target, log fold-change correlation), and two random halves of the largest
type (the fraction called). Methods: pyro_scvi change, vanilla and change without batch
correction; scvi-tools 1.4.2 change and vanilla; Wilcoxon (scanpy's test). Also times
one-vs-rest on the shipped pbmc8k_200hvg and on 10,000 simulated cells x 2,000 genes.

    python -m benchmarks.de_calibration            # about 13 minutes on 2 CPUs
    python -m benchmarks.de_calibration --smoke    # < 1 minute
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import combinations
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, score
from .lib.results import fmt

STUDY = "de_calibration"
METHODS = (
    "pyro_scvi change",
    "pyro_scvi vanilla",
    "pyro_scvi change, no batch corr.",
    "scvi-tools change",
    "scvi-tools vanilla",
    "Wilcoxon",
)
SMOKE = dict(cells=600, genes=100, types=3, pairs=3, max_epochs=5, replicates=1, n_samples=200)
SMOKE |= dict(pbmc_epochs=1, pbmc_cells=1000, scale_cells=2000, scale_genes=300, scale_epochs=1)


def simulate(
    n_cells=4000,
    n_genes=500,
    *,
    n_types=4,
    n_pairs=10,
    lfc_range=(0.5, 2.0),
    batch_effect=0.5,
    seed=0,
) -> Any:
    """ZINB counts with known DE genes and batch effects (see the module);
    ``uns["simulation"]["log2_fold_change"]``: types x genes, against the shared baseline."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    if 2 * n_pairs * n_types > n_genes:
        raise ValueError("Too few genes for the DE sets.")
    base, lfc = rng.normal(0.0, 1.0, n_genes), np.zeros((n_types, n_genes))  # natural log
    genes, shift = rng.permutation(n_genes), rng.normal(0.0, batch_effect, (2, n_genes))
    lo, hi = (x * np.log(2) for x in lfc_range)
    for k in range(n_types):
        block = genes[2 * n_pairs * k : 2 * n_pairs * (k + 1)]
        for up, down in zip(block[:n_pairs], block[n_pairs:], strict=True):
            u, d = rng.uniform(lo, hi, 2)
            lfc[k, up], lfc[k, down] = u, -d
            # exp(base_up) (e^u - 1) = exp(base_down) (1 - e^-d): the type's total is unchanged
            base[down] = base[up] + np.log(np.expm1(u) / -np.expm1(-d))
            shift[:, down] = shift[:, up]
    shift[0] = 0.0
    cell_type = rng.integers(0, n_types, n_cells)
    p_last = np.linspace(0.2, 0.8, n_types) if n_types > 1 else np.array([0.5])
    batch = np.where(rng.random(n_cells) < p_last[cell_type], 1, rng.integers(0, 1, n_cells))
    logits = base + lfc[cell_type] + shift[batch]
    freq = np.exp(logits - logits.max(1, keepdims=True))
    mu = np.exp(rng.normal(7.0 + 0.3 * batch, 0.3))[:, None] * freq / freq.sum(1, keepdims=True)
    theta = np.exp(rng.normal(1.0, 0.5, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    counts[rng.random(counts.shape) < rng.uniform(0.0, 0.2, n_genes)] = 0
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{k}" for k in cell_type]),
            "batch": pd.Categorical([f"batch{b}" for b in batch]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()
    adata.uns["simulation"] = {"log2_fold_change": lfc / np.log(2), "batch_shift": shift}
    return adata


def fits(adata: Any, epochs: int, seed: int) -> dict[str, Any]:
    """Both implementations at their defaults (pyro_scvi with the script's threads fixed)."""
    import torch

    threads = {"pyro_scvi": torch.get_num_threads(), "scvi-tools": None}
    return {
        i: adapters.ADAPTERS[i](
            adata, data.batch_key_for(adata), seed=seed, threads=threads[i], device="cpu"
        ).fit(epochs)
        for i in threads
    }


def run_methods(fitted: dict, adata: Any, g1: str, g2: str, groupby: str, args, seed: int) -> dict:
    """``method -> (score, calls, lfc, seconds)``."""
    out = {}
    for method in METHODS:
        start = time.perf_counter()
        if method.startswith("pyro_scvi"):
            kw = {"mode": method.split()[1].strip(","), "n_samples": args.n_samples, "seed": seed}
            kw["batch_correction"] = "no batch" not in method
            found = score.de_pyro(fitted["pyro_scvi"].model, adata, groupby, g1, g2, "proba", **kw)
        elif method.startswith("scvi-tools"):
            found = score.de_scvi_tools(
                fitted["scvi-tools"], groupby, g1, g2, method.split()[1], True
            )
        else:
            found = score.wilcoxon(adata, groupby, g1, g2)
        out[method] = (*found, time.perf_counter() - start)
    return out


def metrics(ranking: Any, calls: Any, lfc: Any, seconds: float, truth_lfc: Any) -> dict[str, Any]:
    import numpy as np

    truth = np.abs(truth_lfc) > 0
    n_calls, false = int(calls.sum()), int((calls & ~truth).sum())
    corr = np.corrcoef(lfc[truth], truth_lfc[truth])[0, 1] if truth.sum() > 2 else None
    return {
        "auroc": score.auroc(truth, ranking),
        "n_de": int(truth.sum()),
        "n_calls": n_calls,
        "false_calls": false,
        "true_calls": n_calls - false,
        "empirical_fdr": false / n_calls if n_calls else 0.0,
        "power": (n_calls - false) / truth.sum() if truth.sum() else None,
        "lfc_correlation": None if corr is None else float(corr),
        "seconds": seconds,
    }


def run_replicate(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pandas as pd

    kw = {"n_types": args.types, "n_pairs": args.pairs, "batch_effect": args.batch_effect}
    adata = simulate(args.cells, args.genes, seed=seed, **kw)
    largest = adata.obs["cell_type"].value_counts().idxmax()
    halves = np.where(np.random.default_rng(seed).random(adata.n_obs) < 0.5, "half1", "half2")
    adata.obs["halves"] = pd.Categorical(
        np.where(adata.obs["cell_type"] == largest, halves, "other")
    )
    print(f"replicate {seed}: {adata.n_obs} cells x {adata.n_vars} genes", file=sys.stderr)
    fitted = fits(adata, args.max_epochs, seed)
    true_lfc, types = (
        adata.uns["simulation"]["log2_fold_change"],
        list(adata.obs["cell_type"].cat.categories),
    )
    comparisons = []
    for a, b in combinations(types, 2):
        truth = true_lfc[types.index(a)] - true_lfc[types.index(b)]
        found = run_methods(fitted, adata, a, b, "cell_type", args, seed)
        per_method = {m: metrics(*r, truth) for m, r in found.items()}
        comparisons.append({"comparison": f"{a} vs {b}", "methods": per_method})
    null = run_methods(fitted, adata, "half1", "half2", "halves", args, seed)
    return {
        "seed": seed,
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "cell_types": adata.obs["cell_type"].value_counts().to_dict(),
        "null_halves_of": largest,
        "null_halves_cells": int((adata.obs["halves"] != "other").sum()),
        "train_seconds": {i: f.run["train_seconds"] for i, f in fitted.items()},
        "comparisons": comparisons,
        "null_halves": {
            m: {"n_calls": int(r[1].sum()), "fraction_called": float(r[1].mean()), "seconds": r[3]}
            for m, r in null.items()
        },
    }


def summarize(replicates: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    out = {}
    for m in METHODS:
        rows = [c["methods"][m] for r in replicates for c in r["comparisons"]]
        calls, false, de = (sum(x[k] for x in rows) for k in ("n_calls", "false_calls", "n_de"))
        aurocs, nulls = (
            [x["auroc"] for x in rows if x["auroc"] is not None],
            [r["null_halves"][m] for r in replicates],
        )
        out[m] = {
            "auroc_mean": float(np.mean(aurocs)) if aurocs else None,
            "auroc_min": float(np.min(aurocs)) if aurocs else None,
            "empirical_fdr": false / calls if calls else 0.0,
            "empirical_fdr_max_comparison": max(x["empirical_fdr"] for x in rows),
            "power": (calls - false) / de if de else None,
            "calls": calls,
            "null_fraction_called": sum(x["n_calls"] for x in nulls)
            / sum(r["n_genes"] for r in replicates),
            "null_max_calls": max(x["n_calls"] for x in nulls),
            "seconds_per_comparison": float(np.mean([x["seconds"] for x in rows])),
        }
    return out


def timing(name: str, adata: Any, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """Both implementations trained briefly; one-vs-rest over every cell type, timed."""
    print(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, one-vs-rest", file=sys.stderr)
    fitted = fits(adata, epochs, 0)
    out = {"dataset": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "epochs": epochs}
    out |= {
        "n_groups": int(adata.obs["cell_type"].nunique()),
        "n_batches": int(adata.obs["batch"].nunique()),
    }
    out |= {"train_seconds": {i: f.run["train_seconds"] for i, f in fitted.items()}}
    out |= {"one_vs_rest_seconds": {}, "calls": {}}
    for mode in ("change", "vanilla"):
        start = time.perf_counter()
        res = fitted["pyro_scvi"].model.differential_expression(
            groupby="cell_type", mode=mode, n_samples=args.n_samples
        )
        out["one_vs_rest_seconds"][f"pyro_scvi {mode}"] = time.perf_counter() - start
        calls = res.groupby("group1", observed=True)["is_de_fdr"].sum()
        out["calls"][f"pyro_scvi {mode}"] = calls.astype(int).to_dict()
        start, theirs = time.perf_counter(), fitted["scvi-tools"]
        theirs.model.differential_expression(
            theirs.adata,
            groupby="cell_type",
            mode=mode,
            delta=score.DELTA,
            batch_correction=True,
            silent=True,
        )
        out["one_vs_rest_seconds"][f"scvi-tools {mode}"] = time.perf_counter() - start
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = (
        f"Simulated data: {s['cells']} cells x {s['genes']} genes, {s['types']} cell types, 2 "
        f"batches (batch effect sd {s['batch_effect']}, types spread 20-80 % over batches), "
        f"{2 * s['pairs']} DE genes per type (|log2 FC| in [0.5, 2]); {s['replicates']} "
        f"replicate(s) (seeds {s['seeds']}); every pair of types compared; both scVI "
        f"implementations trained {s['max_epochs']} epochs with their defaults. delta = "
        f"{score.DELTA}, FDR target {score.FDR_TARGET}; pyro_scvi n_samples = {s['n_samples']}."
    )
    lines = results.header(res, "Differential expression calibration", how)
    rows = [
        f"{m} | {fmt(v['auroc_mean'])} | {fmt(v['auroc_min'])} | {fmt(v['empirical_fdr'])} | "
        f"{fmt(v['empirical_fdr_max_comparison'])} | {fmt(v['power'])} | "
        f"{fmt(v['null_fraction_called'], '.4f')} | {v['null_max_calls']} | "
        f"{fmt(v['seconds_per_comparison'], '.2f')}"
        for m, v in res["summary"].items()
    ]
    lines += results.md_table(
        "method|AUROC (mean):|AUROC (min):|empirical FDR at 5 %:|worst comparison FDR:|power:|"
        "null halves: fraction called:|null halves: max calls:|s / comparison:",
        rows,
    )
    if timings := res.get("timings"):
        methods = list(timings[0]["one_vs_rest_seconds"])
        rows = [
            f"{t['dataset']} | {t['n_cells']} x {t['n_genes']} | {t['n_groups']} | "
            f"{t['n_batches']} | "
            f"{t['epochs']} | " + " | ".join(f"{v:.1f}" for v in t["one_vs_rest_seconds"].values())
            for t in timings
        ]
        lines += [
            "",
            "## One-vs-rest wall time (seconds; every cell type against all other cells)",
            "",
        ]
        lines += results.md_table(
            [
                "dataset",
                "cells x genes",
                "groups:",
                "batches:",
                "training epochs:",
                *(f"{m}:" for m in methods),
            ],
            rows,
        )
    return "\n".join([*lines, "", NOTE, ""])


NOTE = (
    "- Truth: a gene is DE between two types when its designed |log2 FC| > 0 (all such genes "
    "have >= 0.5, above delta); all other genes have exactly equal normalized expression. AUROC: "
    "Bayesian methods rank by proba_de (ties |lfc_mean|), Wilcoxon by |z|. Calls: pyro_scvi "
    "is_de_fdr; scvi-tools is_de_fdr_0.05 (change) or the posterior expected FDR rule on "
    "max(proba_m1, proba_m2) (vanilla); Wilcoxon BH-adjusted p < 0.05. FDR pooled over "
    "comparisons and replicates. Null halves: two random halves of the largest type. Wilcoxon "
    "(log1p of counts per 10^4, tie-corrected z, as scanpy's rank_genes_groups) ignores batches."
)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description="Calibration of DE calls on simulated truth.")
    for name, default in (
        ("cells", 4000),
        ("genes", 500),
        ("types", 4),
        ("pairs", 10),
        ("max-epochs", 200),
        ("replicates", 3),
        ("seed", 0),
        ("n-samples", 1000),
        ("pbmc-epochs", 30),
        ("pbmc-cells", None),
        ("scale-cells", 10000),
        ("scale-genes", 2000),
        ("scale-epochs", 5),
        ("threads", 1),
    ):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--batch-effect", type=float, default=0.5)
    p.add_argument("--no-timing", action="store_true", help="skip the one-vs-rest timings")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS)
    p.add_argument("--smoke", action="store_true", help="tiny run (< 1 minute)")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if missing := adapters.skipped(["scvi-tools"]):
        print(f"{missing['scvi-tools']}: this study compares with it.", file=sys.stderr)
        return 2
    adapters.quiet_scvi_tools()
    torch.set_num_threads(args.threads)
    start, meta = time.perf_counter(), results.metadata(STUDY, argv, threads=args.threads)
    seeds = list(range(args.seed, args.seed + args.replicates))
    replicates = [run_replicate(seed, args) for seed in seeds]
    settings = {k: v for k, v in vars(args).items() if k != "out_dir"} | {"seeds": seeds}
    res = {
        "meta": meta,
        "settings": settings,
        "summary": summarize(replicates),
        "replicates": replicates,
    }
    if not args.no_timing:
        pbmc = data.load("pbmc8k_200hvg", subsample=args.pbmc_cells)
        res["timings"] = [timing("pbmc8k_200hvg", pbmc, args.pbmc_epochs, args)]
        if args.scale_cells:
            large = simulate(
                args.scale_cells, args.scale_genes, n_types=10, n_pairs=10, seed=args.seed
            )
            res["timings"].append(timing("simulated", large, args.scale_epochs, args))
    res["total_seconds"] = time.perf_counter() - start
    table = markdown(res)
    print(table)
    results.write(args.out_dir, results.stem(STUDY, args.smoke), res, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
