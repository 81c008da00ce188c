"""Calibration of differential expression: pyro_scvi vs scvi-tools vs Wilcoxon, on known truth.

Simulator
---------
ZINB counts for ``--types`` cell types in ``--batches`` batches. Every cell type has its
own set of DE genes (disjoint between types), built from pairs of genes: one gene goes up
by ``u`` and its partner down by ``d`` (``|log2 FC|`` drawn uniformly in
``--lfc-range``), and the partner's baseline is set so that the two changes cancel in the
total expression. Every cell type then has the same library composition, so genes outside
the DE sets have *exactly* equal normalized expression in all types (no compositional
artefact), and the true log2 fold change between two types is known gene by gene. Batch
effects multiply each gene by ``exp(N(0, --batch-effect))`` per batch (the two genes of a
DE pair share theirs, which keeps the balance in every batch) and shift the library size;
cell types are unevenly spread over batches (from 20 % to 80 % in the last batch), so a
method that ignores batches sees batch effects as DE.

Comparisons and metrics
-----------------------
* Every pair of cell types, one against the other. A gene is truly DE when its true
  ``|log2 FC| > 0`` (every DE gene has at least the lower end of ``--lfc-range``, above the
  ``delta = 0.25`` threshold of change mode; every other gene exactly 0).
* AUROC of each method's ranking for recovering the DE genes. Bayesian methods rank by
  ``proba_de`` (ties by ``|lfc_mean|``), vanilla mode by ``|bayes_factor|`` (the same
  order), Wilcoxon by ``|score|``.
* Calls at a 5 % target: pyro_scvi's ``is_de_fdr``; scvi-tools' ``is_de_fdr_0.05``
  (change mode) or, for its vanilla mode, which makes no calls itself, the same posterior
  expected FDR rule applied to ``max(proba_m1, proba_m2)``; Benjamini-Hochberg adjusted
  p-values < 0.05 for Wilcoxon. Empirical FDR = false calls / calls (pooled over
  comparisons and replicates), and the power (true calls / DE genes).
* Null halves: the largest cell type split into two random halves, compared with each
  other; the fraction of genes called DE should be near 0 (Lopez et al. 2018, supp. fig.
  15f).

Methods: pyro_scvi change and vanilla (``batch_correction=True``, and change mode without
it, to show what batch correction does), scvi-tools 1.4.2 ``differential_expression``
change and vanilla (``batch_correction=True``, delta 0.25, its defaults otherwise), and
scanpy's ``rank_genes_groups(method="wilcoxon")`` on ``normalize_total`` + ``log1p`` data.
Both scVI implementations are trained with their defaults (n_latent 10, ZINB, gene
dispersion, KL warm-up over 400 epochs) for ``--max-epochs`` epochs on the same data.

Timing
------
One-vs-rest over every cell type of the shipped ``pbmc8k_200hvg`` (7,448 cells) after a
short training (``--pbmc-epochs``), and over the 10 types of a simulated dataset of
``--scale-cells`` x ``--scale-genes`` (the speed target: 10,000 cells, 10 groups), for
both implementations and both modes. Training quality does not change these times much,
so the large dataset is trained for only ``--scale-epochs``.

Run
---
::

    python benchmarks/de_calibration.py            # full run
    python benchmarks/de_calibration.py --smoke    # < 1 minute check

(any environment with pyro_scvi, scvi-tools 1.4.2 and scanpy). Results go to
``benchmarks/results/de_calibration.{json,md}``, written atomically; ``--smoke`` writes
``de_calibration_smoke.{json,md}`` instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from itertools import combinations
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.metrics import roc_auc_score

import pyro_scvi
from pyro_scvi.analysis.de import posterior_fdr
from pyro_scvi.train.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

OUT_DIR = Path(__file__).resolve().parent / "results"
DELTA = 0.25
FDR_TARGET = 0.05
METHODS = (
    "pyro_scvi change",
    "pyro_scvi vanilla",
    "pyro_scvi change, no batch corr.",
    "scvi-tools change",
    "scvi-tools vanilla",
    "Wilcoxon (scanpy)",
)
SMOKE = {
    "cells": 600,
    "genes": 100,
    "types": 3,
    "pairs": 3,
    "max_epochs": 5,
    "replicates": 1,
    "pbmc_epochs": 1,
    "pbmc_cells": 1000,
    "scale_cells": 2000,
    "scale_genes": 300,
    "scale_epochs": 1,
    "n_samples": 200,
}


# ---------------------------------------------------------------------------- simulator
def simulate(
    n_cells: int = 4000,
    n_genes: int = 500,
    *,
    n_types: int = 4,
    n_batches: int = 2,
    n_pairs: int = 10,
    lfc_range: tuple[float, float] = (0.5, 2.0),
    batch_effect: float = 0.5,
    seed: int = 0,
) -> anndata.AnnData:
    """ZINB counts with known DE genes and batch effects (see the module docstring).

    ``uns["simulation"]["log2_fold_change"]`` is the types x genes matrix of true log2
    fold changes of normalized expression against the shared baseline, so the truth for
    type ``a`` against type ``b`` is the difference of two rows.
    """
    rng = np.random.default_rng(seed)
    if 2 * n_pairs * n_types > n_genes:
        raise ValueError("Too few genes for the DE sets.")
    base = rng.normal(0.0, 1.0, n_genes)
    lfc = np.zeros((n_types, n_genes))  # natural log
    genes = rng.permutation(n_genes)
    batch_shift = rng.normal(0.0, batch_effect, (n_batches, n_genes))
    lo, hi = (x * np.log(2) for x in lfc_range)
    for k in range(n_types):
        block = genes[2 * n_pairs * k : 2 * n_pairs * (k + 1)]
        for up, down in zip(block[:n_pairs], block[n_pairs:], strict=True):
            u, d = rng.uniform(lo, hi, 2)
            lfc[k, up], lfc[k, down] = u, -d
            # exp(base_up) (e^u - 1) = exp(base_down) (1 - e^-d): type k's total expression
            # is the baseline's, so no other gene's normalized expression moves.
            base[down] = base[up] + np.log(np.expm1(u) / -np.expm1(-d))
            batch_shift[:, down] = batch_shift[:, up]
    batch_shift[0] = 0.0
    cell_type = rng.integers(0, n_types, n_cells)
    # uneven spread over batches: type k is in the last batch with probability 0.2..0.8
    p_last = np.linspace(0.2, 0.8, n_types) if n_types > 1 else np.array([0.5])
    if n_batches == 1:
        batch = np.zeros(n_cells, dtype=int)
    else:
        last = rng.random(n_cells) < p_last[cell_type]
        batch = np.where(last, n_batches - 1, rng.integers(0, n_batches - 1, n_cells))
    logits = base + lfc[cell_type] + batch_shift[batch]
    freq = np.exp(logits - logits.max(1, keepdims=True))
    freq /= freq.sum(1, keepdims=True)
    library = np.exp(rng.normal(7.0 + 0.3 * batch, 0.3))
    mu = library[:, None] * freq
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
    adata = anndata.AnnData(
        sp.csr_matrix(counts.astype(np.float32)),
        obs=obs,
        var=pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)]),
    )
    keep = np.asarray(adata.X.sum(1)).ravel() > 0
    adata = adata[keep].copy()
    adata.uns["simulation"] = {"log2_fold_change": lfc / np.log(2), "batch_shift": batch_shift}
    return adata


# ---------------------------------------------------------------------------- methods
def bayes_rank_score(proba: np.ndarray, lfc: np.ndarray) -> np.ndarray:
    """Scores ordering genes by ``proba`` with ties broken by ``|lfc|``."""
    order = np.lexsort((np.abs(lfc), proba))
    score = np.empty(len(proba))
    score[order] = np.arange(len(proba))
    return score


def fdr_calls(proba_de: np.ndarray, target: float) -> np.ndarray:
    """Posterior expected FDR rule on ``proba_de`` (in gene order)."""
    order = np.argsort(-proba_de, kind="stable")
    calls = np.zeros(len(proba_de), dtype=bool)
    calls[order] = posterior_fdr(proba_de[order]) <= target
    return calls


def train_pyro(adata, epochs: int, seed: int):
    model = pyro_scvi.SCVI(adata, batch_key="batch" if adata.obs["batch"].nunique() > 1 else None)
    start = time.perf_counter()
    # the script's torch thread count, fixed (the engine's default follows the free cores)
    engine = Engine(threads=torch.get_num_threads())
    model.train(max_epochs=epochs, seed=seed, progress_bar=False, engine=engine)
    return model, time.perf_counter() - start


def train_scvi_tools(adata, epochs: int, seed: int):
    import scvi

    scvi.settings.seed = seed
    adata = adata.copy()
    batch_key = "batch" if adata.obs["batch"].nunique() > 1 else None
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(adata)
    start = time.perf_counter()
    model.train(max_epochs=epochs, accelerator="cpu", enable_progress_bar=False)
    return model, time.perf_counter() - start


def de_pyro(model, adata, g1, g2, *, mode, batch_correction, n_samples, seed, groupby):
    start = time.perf_counter()
    res = model.differential_expression(
        adata,
        groupby=groupby,
        group1=g1,
        group2=g2,
        mode=mode,
        delta=DELTA,
        fdr_target=FDR_TARGET,
        batch_correction=batch_correction,
        n_samples=n_samples,
        seed=seed,
    )
    seconds = time.perf_counter() - start
    res = res.loc[adata.var_names]
    score = bayes_rank_score(res["proba_de"].to_numpy(), res["lfc_mean"].to_numpy())
    return score, res["is_de_fdr"].to_numpy(), res["lfc_mean"].to_numpy(), seconds


def de_scvi_tools(model, adata, g1, g2, *, mode, groupby):
    start = time.perf_counter()
    res = model.differential_expression(
        adata,
        groupby=groupby,
        group1=g1,
        group2=g2,
        mode=mode,
        delta=DELTA,
        fdr_target=FDR_TARGET,
        batch_correction=True,
        silent=True,
    )
    seconds = time.perf_counter() - start
    res = res.loc[adata.var_names]
    if mode == "change":
        proba, calls = res["proba_de"].to_numpy(), res[f"is_de_fdr_{FDR_TARGET}"].to_numpy()
        lfc = res["lfc_mean"].to_numpy()
    else:
        proba = np.maximum(res["proba_m1"], res["proba_m2"]).to_numpy()
        calls = fdr_calls(proba, FDR_TARGET)
        lfc = res["lfc_mean"].to_numpy() if "lfc_mean" in res else res["bayes_factor"].to_numpy()
    return bayes_rank_score(proba, lfc), calls.astype(bool), lfc, seconds


def de_wilcoxon(adata_log, g1, g2, *, groupby):
    import scanpy as sc

    start = time.perf_counter()
    sc.tl.rank_genes_groups(
        adata_log,
        groupby,
        groups=[g1],
        reference=g2,
        method="wilcoxon",
        corr_method="benjamini-hochberg",
        n_genes=adata_log.n_vars,
    )
    seconds = time.perf_counter() - start
    res = sc.get.rank_genes_groups_df(adata_log, g1).set_index("names").loc[adata_log.var_names]
    return (
        np.abs(res["scores"].to_numpy()),
        (res["pvals_adj"] < FDR_TARGET).to_numpy(),
        res["logfoldchanges"].to_numpy(),
        seconds,
    )


def run_methods(pyro_model, scvi_model, adata, adata_log, g1, g2, groupby, args, seed):
    out = {}
    for name, kw in [
        ("pyro_scvi change", {"mode": "change", "batch_correction": True}),
        ("pyro_scvi vanilla", {"mode": "vanilla", "batch_correction": True}),
        ("pyro_scvi change, no batch corr.", {"mode": "change", "batch_correction": False}),
    ]:
        out[name] = de_pyro(
            pyro_model, adata, g1, g2, n_samples=args.n_samples, seed=seed, groupby=groupby, **kw
        )
    for mode in ("change", "vanilla"):
        out[f"scvi-tools {mode}"] = de_scvi_tools(
            scvi_model, scvi_model.adata, g1, g2, mode=mode, groupby=groupby
        )
    out["Wilcoxon (scanpy)"] = de_wilcoxon(adata_log, g1, g2, groupby=groupby)
    return out


# ---------------------------------------------------------------------------- evaluation
def log_normalized(adata):
    import scanpy as sc

    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def comparison_metrics(score, calls, lfc, truth_lfc) -> dict[str, Any]:
    truth = np.abs(truth_lfc) > 0
    n_calls = int(calls.sum())
    false = int((calls & ~truth).sum())
    return {
        "auroc": float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else None,
        "n_de": int(truth.sum()),
        "n_calls": n_calls,
        "false_calls": false,
        "true_calls": n_calls - false,
        "empirical_fdr": false / n_calls if n_calls else 0.0,
        "power": (n_calls - false) / truth.sum() if truth.sum() else None,
        "lfc_correlation": float(np.corrcoef(lfc[truth], truth_lfc[truth])[0, 1])
        if truth.sum() > 2
        else None,
    }


def run_replicate(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    adata = simulate(
        args.cells,
        args.genes,
        n_types=args.types,
        n_batches=2,
        n_pairs=args.pairs,
        batch_effect=args.batch_effect,
        seed=seed,
    )
    rng = np.random.default_rng(seed)
    largest = adata.obs["cell_type"].value_counts().idxmax()
    halves = np.where(rng.random(adata.n_obs) < 0.5, "half1", "half2")
    adata.obs["halves"] = pd.Categorical(
        np.where(adata.obs["cell_type"] == largest, halves, "other")
    )
    adata_log = log_normalized(adata)
    print(f"replicate {seed}: {adata.n_obs} cells x {adata.n_vars} genes", file=sys.stderr)
    pyro_model, pyro_seconds = train_pyro(adata, args.max_epochs, seed)
    scvi_model, scvi_seconds = train_scvi_tools(adata, args.max_epochs, seed)
    true_lfc = adata.uns["simulation"]["log2_fold_change"]
    types = list(adata.obs["cell_type"].cat.categories)
    comparisons = []
    for a, b in combinations(types, 2):
        truth = true_lfc[types.index(a)] - true_lfc[types.index(b)]
        results = run_methods(
            pyro_model, scvi_model, adata, adata_log, a, b, "cell_type", args, seed
        )
        comparisons.append(
            {
                "comparison": f"{a} vs {b}",
                "methods": {
                    m: {**comparison_metrics(*r[:3], truth), "seconds": r[3]}
                    for m, r in results.items()
                },
            }
        )
        print(f"  {a} vs {b} done", file=sys.stderr, flush=True)
    null = run_methods(
        pyro_model, scvi_model, adata, adata_log, "half1", "half2", "halves", args, seed
    )
    null_result = {
        m: {
            "n_calls": int(r[1].sum()),
            "fraction_called": float(r[1].mean()),
            "seconds": r[3],
        }
        for m, r in null.items()
    }
    return {
        "seed": seed,
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "cell_types": adata.obs["cell_type"].value_counts().to_dict(),
        "null_halves_of": largest,
        "null_halves_cells": int((adata.obs["halves"] != "other").sum()),
        "train_seconds": {"pyro_scvi": pyro_seconds, "scvi-tools": scvi_seconds},
        "comparisons": comparisons,
        "null_halves": null_result,
    }


def summarize(replicates: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for m in METHODS:
        rows = [c["methods"][m] for r in replicates for c in r["comparisons"]]
        calls = sum(x["n_calls"] for x in rows)
        false = sum(x["false_calls"] for x in rows)
        de = sum(x["n_de"] for x in rows)
        aurocs = [x["auroc"] for x in rows if x["auroc"] is not None]
        nulls = [r["null_halves"][m] for r in replicates]
        out[m] = {
            "auroc_mean": float(np.mean(aurocs)) if aurocs else None,
            "auroc_min": float(np.min(aurocs)) if aurocs else None,
            "empirical_fdr": false / calls if calls else 0.0,
            "empirical_fdr_max_comparison": max(x["empirical_fdr"] for x in rows),
            "power": (calls - false) / de if de else None,
            "calls": calls,
            "null_fraction_called": float(
                sum(x["n_calls"] for x in nulls) / sum(r["n_genes"] for r in replicates)
            ),
            "null_max_calls": max(x["n_calls"] for x in nulls),
            "seconds_per_comparison": float(np.mean([x["seconds"] for x in rows])),
        }
    return out


# ---------------------------------------------------------------------------- timing
def one_vs_rest_timing(name: str, adata, epochs: int, args: argparse.Namespace) -> dict:
    """Train both implementations briefly, then time one-vs-rest over every cell type."""
    print(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes, one-vs-rest", file=sys.stderr)
    pyro_model, pyro_train = train_pyro(adata, epochs, 0)
    scvi_model, scvi_train = train_scvi_tools(adata, epochs, 0)
    out: dict[str, Any] = {
        "dataset": name,
        "n_cells": adata.n_obs,
        "n_genes": adata.n_vars,
        "n_groups": int(adata.obs["cell_type"].nunique()),
        "n_batches": int(adata.obs["batch"].nunique()),
        "epochs": epochs,
        "train_seconds": {"pyro_scvi": pyro_train, "scvi-tools": scvi_train},
        "one_vs_rest_seconds": {},
        "calls": {},
    }
    for mode in ("change", "vanilla"):
        start = time.perf_counter()
        res = pyro_model.differential_expression(
            groupby="cell_type", mode=mode, n_samples=args.n_samples
        )
        out["one_vs_rest_seconds"][f"pyro_scvi {mode}"] = time.perf_counter() - start
        out["calls"][f"pyro_scvi {mode}"] = (
            res.groupby("group1", observed=True)["is_de_fdr"].sum().astype(int).to_dict()
        )
        start = time.perf_counter()
        scvi_model.differential_expression(
            groupby="cell_type", mode=mode, delta=DELTA, batch_correction=True, silent=True
        )
        out["one_vs_rest_seconds"][f"scvi-tools {mode}"] = time.perf_counter() - start
    return out


def timings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One-vs-rest wall times on the shipped PBMC data and on a large simulated dataset."""
    pbmc = pyro_scvi.datasets.pbmc8k_200hvg()
    pbmc.X = sp.csr_matrix(pbmc.X, dtype=np.float32)
    if args.pbmc_cells and args.pbmc_cells < pbmc.n_obs:
        keep = np.sort(np.random.default_rng(0).choice(pbmc.n_obs, args.pbmc_cells, False))
        pbmc = pbmc[keep].copy()
    out = [one_vs_rest_timing("pbmc8k_200hvg", pbmc, args.pbmc_epochs, args)]
    if args.scale_cells:
        large = simulate(
            args.scale_cells, args.scale_genes, n_types=10, n_pairs=10, seed=args.seed
        )
        out.append(one_vs_rest_timing("simulated", large, args.scale_epochs, args))
    return out


# ---------------------------------------------------------------------------- output
def _f(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Differential expression calibration",
        "",
        f"{results['date']}; {_common.machine_line(results)}, torch threads {s['threads']}; "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items())
        + ".",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Simulated data: {s['cells']} cells x {s['genes']} genes, {s['types']} cell types, "
        f"2 batches (batch effect sd {s['batch_effect']}, types spread 20-80 % over "
        f"batches), {2 * s['pairs']} DE genes per type (|log2 FC| in [0.5, 2]); "
        f"{s['replicates']} replicate(s) (seeds {s['seeds']}); every pair of types compared; "
        f"both scVI implementations trained {s['max_epochs']} epochs with their defaults. "
        f"delta = {DELTA}, FDR target {FDR_TARGET}; pyro_scvi n_samples = {s['n_samples']}.",
        "",
        "| method | AUROC (mean) | AUROC (min) | empirical FDR at 5 % | worst comparison FDR "
        "| power | null halves: fraction called | null halves: max calls | s / comparison |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, v in results["summary"].items():
        lines.append(
            f"| {m} | {_f(v['auroc_mean'], '.3f')} | {_f(v['auroc_min'], '.3f')} "
            f"| {_f(v['empirical_fdr'], '.3f')} | {_f(v['empirical_fdr_max_comparison'], '.3f')} "
            f"| {_f(v['power'], '.3f')} | {_f(v['null_fraction_called'], '.4f')} "
            f"| {v['null_max_calls']} | {_f(v['seconds_per_comparison'], '.2f')} |"
        )
    if results.get("timings"):
        methods = list(results["timings"][0]["one_vs_rest_seconds"])
        lines += [
            "",
            "## One-vs-rest wall time (seconds; every cell type against all other cells)",
            "",
            "| dataset | cells x genes | groups | batches | training epochs | "
            + " | ".join(methods)
            + " |",
            "|---|---|---:|---:|---:|" + "---:|" * len(methods),
        ]
        for t in results["timings"]:
            lines.append(
                f"| {t['dataset']} | {t['n_cells']} x {t['n_genes']} | {t['n_groups']} "
                f"| {t['n_batches']} | {t['epochs']} | "
                + " | ".join(f"{v:.1f}" for v in t["one_vs_rest_seconds"].values())
                + " |"
            )
    lines += [
        "",
        "- Truth: a gene is DE between two types when its designed |log2 FC| > 0 (all such "
        "genes have >= 0.5, above delta); all other genes have exactly equal normalized "
        "expression (the simulator balances every type's composition).",
        "- AUROC: Bayesian methods rank by proba_de (ties by |lfc_mean|), Wilcoxon by |score|.",
        "- Calls: pyro_scvi is_de_fdr; scvi-tools is_de_fdr_0.05 (change) or the same "
        "posterior expected FDR rule on max(proba_m1, proba_m2) (vanilla); Wilcoxon "
        "Benjamini-Hochberg adjusted p < 0.05. Empirical FDR is pooled over comparisons "
        "and replicates (false calls / calls).",
        "- Null halves: two random halves of the largest type; fraction of all genes called.",
        "- Wilcoxon ignores batches and tests any difference (no threshold).",
        "",
    ]
    return "\n".join(lines)


def quiet_libraries() -> None:
    import scvi

    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Calibration of DE calls on simulated truth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--cells", type=int, default=4000)
    p.add_argument("--genes", type=int, default=500)
    p.add_argument("--types", type=int, default=4)
    p.add_argument("--pairs", type=int, default=10, help="DE gene pairs per cell type")
    p.add_argument("--batch-effect", type=float, default=0.5)
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--replicates", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="seed of the first replicate")
    p.add_argument("--n-samples", type=int, default=1000, help="pyro_scvi n_samples")
    p.add_argument("--pbmc-epochs", type=int, default=30)
    p.add_argument("--pbmc-cells", type=int, default=None, help="subsample pbmc8k")
    p.add_argument("--scale-cells", type=int, default=10000, help="0: no large timing")
    p.add_argument("--scale-genes", type=int, default=2000)
    p.add_argument("--scale-epochs", type=int, default=5)
    p.add_argument("--no-timing", action="store_true", help="skip the one-vs-rest timings")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--smoke", action="store_true", help="tiny run (< 1 minute)")
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    # The code imported now is the code measured: record git state before the runs.
    meta = _common.run_metadata(
        argv, args.threads, extra_versions=("scanpy",), script="de_calibration.py"
    )
    seeds = list(range(args.seed, args.seed + args.replicates))
    replicates = [run_replicate(seed, args) for seed in seeds]
    results: dict[str, Any] = {
        **meta,
        "settings": {
            "cells": args.cells,
            "genes": args.genes,
            "types": args.types,
            "pairs": args.pairs,
            "batch_effect": args.batch_effect,
            "max_epochs": args.max_epochs,
            "replicates": args.replicates,
            "seeds": seeds,
            "n_samples": args.n_samples,
            "threads": args.threads,
            "delta": DELTA,
            "fdr_target": FDR_TARGET,
            "smoke": args.smoke,
        },
        "summary": summarize(replicates),
        "replicates": replicates,
    }
    if not args.no_timing:
        results["timings"] = timings(args)
    results["total_seconds"] = time.perf_counter() - start
    table = markdown(results)
    print(table)
    stem = "de_calibration" + ("_smoke" if args.smoke else "")
    _common.write_results(args.out_dir, stem, results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
