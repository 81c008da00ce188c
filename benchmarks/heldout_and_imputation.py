"""Held-out fit and imputation: pyro_scvi vs scvi-tools 1.4.2 on the shared datasets.

Both with the matched settings of :mod:`benchmarks.lib.adapters`, on one 90 % / 10 % split
per dataset. Held-out fit: each implementation's own ELBO and importance-sampled log p(x) on
the validation cells, and one common estimator (scvi-tools' weights renamed into a pyro_scvi
model). Imputation (the scVI paper's): 10 % of the non-zero entries hidden (set to 0, or
Binomial(x, 0.1)); median |imputed - original| on them of the expected counts at the latent
library, against a kNN-in-PCA smoothing baseline.

    python -m benchmarks.heldout_and_imputation            # about 12 minutes on 2 cores
    python -m benchmarks.heldout_and_imputation --smoke    # < 1 minute
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, score

STUDY = "heldout_and_imputation"
DATASETS = ("zeisel_cortex_subset_1464x1000", "pbmc8k_200hvg", "cellbench_3cl_2tech")
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools")
SCHEMES = {"zero": "uniform", "binomial": "binomial"}  # our name: corrupt_counts' name
HIDE, BINOMIAL, IMPUTE_SAMPLES = 0.1, 0.1, 25


def heldout(adata: Any, key: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Both implementations' own and common held-out ELBO and log p(x) per cell."""
    import numpy as np

    split = data.make_split(adata.n_obs, args.seed)
    out: dict[str, Any] = {"n_validation": len(split[1])}
    for impl in IMPLEMENTATIONS:
        fit = adapters.ADAPTERS[impl](adata, key, matched=True, seed=args.seed, threads=1)
        fit.fit(args.max_epochs, split)
        out[f"{impl.replace('-', '_')}_train_seconds"] = fit.run["train_seconds"]
        estimates = {}
        for name, elbo, ll in (
            ("own", fit.elbo, fit.marginal_ll),
            ("common", fit.common_elbo, fit.common_marginal_ll),
        ):
            estimates[name] = {
                "elbo": elbo(split[1], args.elbo_samples, args.seed),
                "marginal_ll": ll(split[1], args.ll_samples, args.seed),
            }
        out[impl] = estimates
        if impl == "pyro_scvi":
            out["split_matches"] = fit.run["split_matches"]
        else:  # the renaming must give back scvi-tools' latent space
            renamed = fit.as_pyro_scvi().get_latent_representation()
            out["conversion_latent_max_abs_diff"] = float(np.abs(renamed - fit.latent()).max())
    return out


def imputation(adata: Any, key: str | None, args: argparse.Namespace) -> dict[str, Any]:
    """Per scheme: every implementation trained on the corrupted counts, and kNN."""
    import numpy as np

    split, out = data.make_split(adata.n_obs, args.seed), {}
    for scheme, name in SCHEMES.items():
        hidden_data, x, hidden = score.corrupted(adata, name, HIDE, args.seed, BINOMIAL)
        y = hidden_data.X.toarray()
        if empty := int((y.sum(1) == 0).sum()):  # never happened on the shared data
            print(f"  {empty} cells emptied by corruption", file=sys.stderr)
        res = {
            "n_hidden": len(hidden[0]),
            "corrupted_median_abs_error": float(np.median(np.abs(y[hidden] - x[hidden]))),
        }
        for impl in IMPLEMENTATIONS:
            fit = adapters.ADAPTERS[impl](
                hidden_data, key, matched=True, seed=args.seed, threads=1
            )
            pred = fit.fit(args.max_epochs, split).impute(hidden_data, IMPUTE_SAMPLES, args.seed)
            res[impl] = score.imputation_errors(pred, x, hidden)
        res["kNN (PCA)"] = score.imputation_errors(score.knn_impute(y, args.seed), x, hidden)
        out[scheme] = res
        errors = ", ".join(
            f"{n} {res[n]['median_abs_error']:.3f}" for n in (*IMPLEMENTATIONS, "kNN (PCA)")
        )
        print(f"  {scheme}: {errors}", file=sys.stderr, flush=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = (
        f"{s['max_epochs']} epochs for every model (not run to convergence), the matched "
        "settings (batch size 128, KL warm-up 400 epochs, latent library, ZINB, gene "
        "dispersion, 10 latent, 128 hidden), one thread"
        + f", {s['subsample']} cells subsampled"
        * bool(s["subsample"])
    )
    lines = results.header(res, "Held-out fit and imputation: pyro_scvi vs scvi-tools", how)
    rows = [
        f"{d['name']} | {d['heldout']['n_validation']} | {impl} | "
        + " | ".join(
            f"{d['heldout'][impl][w][k]:.2f}"
            for w in ("own", "common")
            for k in ("elbo", "marginal_ll")
        )
        for d in res["datasets"]
        for impl in IMPLEMENTATIONS
    ]
    lines += ["## Held-out fit (validation cells, nats per cell, higher is better)", ""]
    lines += results.md_table(
        "dataset|val cells:|implementation|ELBO (own):|log p(x) (own):|"
        "ELBO (common):|log p(x) (common):",
        rows,
    )
    rows = [
        f"{d['name']} | {scheme} | {r['n_hidden']} | {r['corrupted_median_abs_error']:.3f} | "
        + " | ".join(
            f"{r[n]['median_abs_error']:.3f} ({r[n]['mean_abs_error']:.2f})"
            for n in (*IMPLEMENTATIONS, "kNN (PCA)")
        )
        for d in res["datasets"]
        for scheme, r in d.get("imputation", {}).items()
    ]
    lines += [
        "",
        NOTE_FIT,
        "",
        "## Imputation: median absolute error on hidden entries (lower is better)",
        "",
    ]
    lines += results.md_table(
        "dataset|scheme|hidden entries:|no imputation:|pyro_scvi:|scvi-tools:|kNN (PCA):", rows
    )
    return "\n".join([*lines, "", NOTE_IMPUTATION, ""])


NOTE_FIT = (
    "- own: each implementation's estimator (pyro_scvi `get_elbo` and `get_marginal_ll`; "
    "scvi-tools `get_elbo`, one draw plus analytic KLs averaged over calls, and "
    "`get_marginal_ll`; both return log-likelihoods in 1.4.2). common: scvi-tools' weights "
    "renamed into a pyro_scvi model and scored by pyro_scvi's estimators; for pyro_scvi common = "
    "own."
)
NOTE_IMPUTATION = (
    f"- Hidden: {HIDE:.0%} of the non-zero entries; `zero` sets them to 0, `binomial` replaces x "
    f"by Binomial(x, {BINOMIAL}). Cells: median (mean) of |imputed - original count|; 'no "
    "imputation' = the corrupted value. pyro_scvi `impute()['mean']`, scvi-tools "
    "`get_normalized_expression(library_size='latent')`: exp(l) * rho at the latent library, mean "
    f"over {IMPUTE_SAMPLES} posterior draws. kNN (PCA): log1p(counts per 10^4), PCA 30, the 15 "
    "nearest other cells; mean of their count / library times the cell's own library."
)


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ll-samples", type=int, default=100, help="K for the marginal LL")
    p.add_argument("--elbo-samples", type=int, default=10, help="draws averaged for ELBOs")
    p.add_argument("--subsample", type=int, default=None)
    p.add_argument("--skip-imputation", action="store_true")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS)
    p.add_argument("--smoke", action="store_true", help="2 epochs, 200 cells, first dataset")
    args = p.parse_args(argv)
    if args.smoke:
        args.max_epochs, args.subsample, args.ll_samples, args.elbo_samples = 2, 200, 10, 2
        args.datasets = args.datasets[:1]
    if missing := adapters.skipped(["scvi-tools"]):
        print(f"{missing['scvi-tools']}: this study compares with it.", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    settings = {k: v for k, v in vars(args).items() if k not in ("data_dir", "out_dir")}
    res: dict[str, Any] = {
        "meta": results.metadata(STUDY, argv, threads=1),
        "settings": settings,
        "datasets": [],
    }
    start = time.perf_counter()
    for name in args.datasets:
        print(f"{name}:", file=sys.stderr, flush=True)
        adata = data.load(name, args.data_dir, subsample=args.subsample, seed=args.seed)
        key = data.batch_key_for(adata)
        d = {
            "name": data.parse(name)["name"],
            "n_cells": adata.n_obs,
            "n_genes": adata.n_vars,
            "batch_key": key,
        }
        d["heldout"] = heldout(adata, key, args)
        print(f"  heldout: {json.dumps(d['heldout'])}", file=sys.stderr, flush=True)
        if not args.skip_imputation:
            d["imputation"] = imputation(adata, key, args)
        res["datasets"].append(d)
    res["total_seconds"] = time.perf_counter() - start
    table = markdown(res)
    print(table)
    results.write(args.out_dir, results.stem(STUDY, args.smoke), res, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
