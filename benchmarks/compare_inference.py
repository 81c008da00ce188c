"""Priors x likelihoods x inference schemes, scored on one yardstick: held-out log p(x).

Each combination trains on the same 90 % of the cells and is scored on the other 10 % by
:func:`pyro_scvi.posterior.fit_statistics`, with KMeans ARI/NMI, training time and the
amortization gap; NUTS on a few held-out cells checks the default guide. ``--design oat``:
the default and each factor varied alone; ``factorial``: the full product. Details:
``benchmarks/README.md``.

    python -m benchmarks.compare_inference            # about 12 minutes on 2 cores
    python -m benchmarks.compare_inference --smoke    # under a minute
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from .lib import data, results
from .lib.results import fmt

STUDY, N_LATENT = "compare_inference", 10
DEFAULT = ("StandardNormal", "zinb", "Trace_ELBO")
PRIORS = {"StandardNormal": {}, "MixtureOfGaussians": {"n_components": 10}}
PRIORS["VampPrior"] = {"n_components": 50}
OPTIONS = dict(pbmc_epochs=40, cellbench_epochs=200, warmup_fraction=0.25, cellbench_genes=1000)
OPTIONS |= dict(iwae_k=5, is_samples=100, gap_cells=128, refine_steps=400, per_cell_lr=1e-2)
OPTIONS |= dict(nuts_cells=None, nuts_warmup=200, nuts_samples=300, seed=0, threads=1)
OPTIONS |= dict(subsample=None)
SMOKE = dict(pbmc_epochs=2, cellbench_epochs=2, subsample=150, cellbench_genes=100)
SMOKE |= dict(is_samples=5, gap_cells=10, refine_steps=5, nuts_cells=2, nuts_warmup=5)
SMOKE |= dict(nuts_samples=5)


def schemes(iwae_k: int) -> dict[str, Any]:
    """ELBO factories by name (a JIT ELBO must be new for each run)."""
    from pyro.infer import JitTrace_ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO

    def iwae() -> Any:
        kw = {"vectorize_particles": True, "max_plate_nesting": 2}
        return RenyiELBO(alpha=0, num_particles=iwae_k, **kw)

    out = {"Trace_ELBO": Trace_ELBO, "TraceMeanField_ELBO": TraceMeanField_ELBO}
    return out | {f"IWAE-{iwae_k}": iwae, "JitTrace_ELBO": JitTrace_ELBO, "per-cell": Trace_ELBO}


def likelihoods() -> list[str]:
    """Every likelihood the package registers, the default first."""
    from pyro_scvi.model.likelihoods import LIKELIHOODS

    return sorted(LIKELIHOODS, key=lambda n: (n != DEFAULT[1], n))


def design(kind: str, priors: list[str], liks: list[str], names: list[str]) -> list[tuple]:
    """The (prior, likelihood, scheme) combinations to run, the default first."""
    if kind == "factorial":
        combos = [(p, lk, s) for s in names if s != "per-cell" for p in priors for lk in liks]
        combos.append((*DEFAULT[:2], "per-cell"))
    else:
        combos = [DEFAULT] + [(p, *DEFAULT[1:]) for p in priors if p != DEFAULT[0]]
        combos += [(DEFAULT[0], lk, DEFAULT[2]) for lk in liks if lk != DEFAULT[1]]
        combos += [(*DEFAULT[:2], s) for s in names if s != DEFAULT[2]]
    return sorted(combos, key=lambda c: c != DEFAULT)


def load(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """A dataset with its batch key, epochs, note and NUTS cells."""
    adata = data.load(name, args.data_dir)
    pbmc, note = name == "pbmc8k_200hvg", "all genes"
    if not pbmc and args.cellbench_genes and args.cellbench_genes < adata.n_vars:
        adata = data.most_variable(adata, args.cellbench_genes)
        note = f"{args.cellbench_genes} most variable genes (log1p per 10^4)"
    adata = data.subsample_cells(adata, args.subsample, args.seed)
    nuts = args.nuts_cells if args.nuts_cells is not None else 8 if pbmc else 4
    epochs = args.pbmc_epochs if pbmc else args.cellbench_epochs
    out = {"name": name, "adata": adata, "batch_key": None if pbmc else "batch"}
    return out | {"epochs": epochs, "note": note, "nuts_cells": nuts}


def heldout_scores(model: Any, guide: Any, cells_data: Any, indices: Any, args) -> dict:
    from pyro_scvi import posterior

    kw = {"n_samples": args.is_samples, "batch_size": 32}
    with posterior.seeded(args.seed):
        stats = posterior.fit_statistics(model, guide, cells_data, indices, **kw)
    ll, elbo = (float(stats[k].mean()) for k in ("marginal_ll", "elbo"))
    return {"heldout_marginal_ll": ll, "heldout_elbo": elbo}


def latent_scores(latent: Any, adata: Any) -> dict[str, float]:
    """KMeans (k = cell types, 10 restarts, seed 0) ARI and NMI against the cell types."""
    from pyro_scvi.analysis.metrics import clustering_scores

    return clustering_scores(latent, adata.obs["cell_type"].astype(str).to_numpy(), seed=0)


def run_combo(ds: dict, combo: tuple, split: tuple, args: argparse.Namespace) -> dict[str, Any]:
    """Train one combination; score it on the held-out cells."""
    import numpy as np
    import pyro
    import torch

    import pyro_scvi
    from pyro_scvi import posterior
    from pyro_scvi.model import priors
    from pyro_scvi.model.guides import PerCellGuide
    from pyro_scvi.model.likelihoods import LIKELIHOODS
    from pyro_scvi.posterior.gap import amortization_gap, refine

    (prior, lik, scheme), (train_idx, val_idx), adata = combo, split, ds["adata"]
    per_cell = scheme == "per-cell"
    kw = {"batch_key": ds["batch_key"], "prior": getattr(priors, prior)(**PRIORS[prior])}
    kw |= {"likelihood": LIKELIHOODS[lik](), "n_latent": N_LATENT}
    warmup = max(1, round(args.warmup_fraction * ds["epochs"]))
    train = {"max_epochs": ds["epochs"], "kl_warmup_epochs": warmup, "seed": args.seed}
    train |= {"progress_bar": False, "engine": pyro_scvi.Engine(threads=args.threads)}
    if per_cell:  # trained on the training cells only; its local parameters at their own lr
        m = pyro_scvi.SCVI(adata[train_idx].copy(), guide=PerCellGuide.from_data, **kw)

        def lr(module: str, param: str) -> dict[str, float]:
            return {"lr": args.per_cell_lr if module == "guide" else 1e-3}

        train |= {"optim": pyro.optim.Adam(lr), "train_size": 1.0}
    else:
        m = pyro_scvi.SCVI(adata, **kw)
        train |= {"elbo": schemes(args.iwae_k)[scheme](), "train_size": data.TRAIN_SIZE}
    start = time.perf_counter()
    m.train(**train)
    row = {"train_seconds": time.perf_counter() - start, "epochs": len(m.history)}
    start = time.perf_counter()
    if per_cell:  # the held-out cells get their own q, fitted with the decoder fixed
        kw = {"batch_categories": m.batch_categories, "var_names": m.var_names}
        held = pyro_scvi.from_anndata(adata[val_idx], batch_key=ds["batch_key"], **kw)
        guide = PerCellGuide.from_data(held, n_latent=N_LATENT)
        with posterior.seeded(args.seed), pyro.get_param_store().scope():
            refine(m.model, guide, held, np.arange(held.n_cells), n_steps=args.refine_steps)
        row["heldout_q_seconds"] = time.perf_counter() - start
        row |= heldout_scores(m.model, guide, held, np.arange(held.n_cells), args)
        latent = np.empty((adata.n_obs, N_LATENT))
        latent[train_idx] = m.get_latent_representation()
        latent[val_idx] = guide.z_loc.detach().numpy()
        return row | latent_scores(latent, adata) | {"model": m}
    if not np.array_equal(m.validation_indices, val_idx):
        raise RuntimeError("SCVI.train split the cells differently from make_split().")
    with torch.no_grad():
        m.get_latent_representation(adata[val_idx].copy())
    row["heldout_q_seconds"] = time.perf_counter() - start
    row |= heldout_scores(m.model, m.guide, m.data, val_idx, args)
    row |= latent_scores(m.get_latent_representation(), adata)
    cells, start = val_idx[: args.gap_cells], time.perf_counter()
    kw = {"n_steps": args.refine_steps, "n_samples": args.is_samples, "seed": args.seed}
    with pyro.get_param_store().scope():
        gap = amortization_gap(m.model, m.guide, m.data, cells, **kw)
    row |= {"gap_cells": len(cells), "gap_seconds": time.perf_counter() - start}
    row |= {"amortization_gap": float(gap["gap"].mean())}
    row |= {"gap_fraction_of_cells_improved": float((gap["gap"] > 0).mean())}
    for k in ("elbo_amortized", "elbo_refined", "marginal_ll_amortized", "marginal_ll_refined"):
        row[f"gap_{k}"] = float(gap[k].mean())
    return row | {"model": m}


def nuts_check(ds: dict, m: Any, val_idx: Any, args: argparse.Namespace) -> dict[str, Any]:
    """NUTS on a few held-out cells against the amortized and the refined guide."""
    import numpy as np
    import pyro

    import pyro_scvi
    from pyro_scvi import posterior
    from pyro_scvi.model.guides import PerCellGuide
    from pyro_scvi.posterior.gap import refine
    from pyro_scvi.posterior.mcmc import agreement, compare_to_nuts, sample_nuts

    cells, start = val_idx[: ds["nuts_cells"]], time.perf_counter()
    kw = {"num_samples": args.nuts_samples, "warmup_steps": args.nuts_warmup}
    samples = sample_nuts(m.model, m.data, cells, seed=args.seed, **kw)
    out = {"cells": len(cells), **kw, "seconds": time.perf_counter() - start}
    out |= {"min_ess": float(samples["_ess"].min()), "guides": {}}
    kw = {"batch_key": ds["batch_key"], "batch_categories": m.batch_categories}
    sub = pyro_scvi.from_anndata(ds["adata"][cells], **kw)
    refined = PerCellGuide.from_guide(m.guide, m.data, cells)
    with posterior.seeded(args.seed), pyro.get_param_store().scope():
        refine(m.model, refined, m.data, cells, n_steps=args.refine_steps)
    # the refined guide's row i is cell i of ``sub``; the NUTS draws are in that order
    for name, guide, cells_data, idx in (
        ("amortized", m.guide, m.data, cells),
        ("refined", refined, sub, np.arange(len(cells))),
    ):
        table = compare_to_nuts(m.model, guide, cells_data, idx, samples=samples)
        out["guides"][name] = agreement(table).to_dict("index")
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = f"Design: {s['design_note']}; {res['total_seconds'] / 60:.1f} minutes in all."
    lines = results.header(res, "Priors x likelihoods x inference schemes on one yardstick", how)
    for ds in res["datasets"]:
        lines += [
            f"## {ds['name']} ({ds['cells']} cells x {ds['genes']} genes; {ds['note']})",
            "",
            f"{ds['epochs']} epochs (KL warm-up {ds['kl_warmup_epochs']}), batch size 128, lr "
            f"1e-3, n_latent {N_LATENT}; {ds['n_train']} training and {ds['n_heldout']} held-out "
            f"cells; held-out scores from {s['is_samples']} importance samples per cell; "
            f"amortization gap on {ds['gap_cells']} held-out cells after {s['refine_steps']} "
            "refinement steps.",
            "",
        ]
        rows = [
            f"{r['prior']} | {r['likelihood']} | {r['scheme']} | failed: "
            f"{r['error'].splitlines()[0][:80]} | | | | | | |"
            if "error" in r
            else f"{r['prior']} | {r['likelihood']} | {r['scheme']} | "
            f"{fmt(r['heldout_marginal_ll'], '.2f')} | {fmt(r['heldout_elbo'], '.2f')} | "
            f"{fmt(r.get('amortization_gap'), '.2f')} | {fmt(r['ari'])} | {fmt(r['nmi'])} | "
            f"{fmt(r['train_seconds'], '.0f')} | {fmt(r['heldout_q_seconds'], '.1f')}"
            for r in ds["runs"]
        ]
        lines += results.md_table(RUNS, rows)
        if d := next((r for r in ds["runs"] if r.get("is_default") and "error" not in r), None):
            lines += [
                "",
                f"Amortization gap of the default combination: {d['amortization_gap']:.2f} "
                f"nats per cell (ELBO {d['gap_elbo_amortized']:.2f} -> "
                f"{d['gap_elbo_refined']:.2f}; log p(x) with the amortized / refined proposal "
                f"{d['gap_marginal_ll_amortized']:.2f} / {d['gap_marginal_ll_refined']:.2f}; "
                f"improved in {100 * d['gap_fraction_of_cells_improved']:.0f}% of cells).",
            ]
        if (nuts := ds.get("nuts")) and "error" not in nuts:
            rows = [
                f"{g} | {site} | {a['abs_mean_error']:.2f} | {a['variance_ratio']:.2f} | "
                f"{a['coverage_0.5']:.2f} | {a['coverage_0.9']:.2f} | {a['coverage_0.95']:.2f}"
                for g, sites in nuts["guides"].items()
                for site, a in sites.items()
            ]
            lines += [
                "",
                f"NUTS gold standard (default combination, {nuts['cells']} held-out cells, "
                f"{nuts['warmup_steps']} warm-up + {nuts['num_samples']} draws, min ESS "
                f"{nuts['min_ess']:.0f}, {nuts['seconds']:.0f} s):",
                "",
            ]
            lines += results.md_table(NUTS, rows)
        elif nuts:
            lines += ["", f"NUTS check failed: {nuts['error'].splitlines()[0]}"]
        lines.append("")
    return "\n".join([*lines, "## Notes", "", *NOTES, ""])


RUNS = "prior|likelihood|scheme|held-out log p(x):|held-out ELBO:|amortization gap:|KMeans ARI:|"
RUNS += "KMeans NMI:|train s:|held-out q s:"
NUTS = "guide|site|mean error (posterior sd):|variance ratio q/p:|coverage 50%:|coverage 90%:|"
NUTS += "coverage 95%:"
NOTES = [
    "- held-out log p(x): mean over held-out cells of the importance-sampled log-likelihood "
    "(the fitted guide as proposal), nats per cell, higher is better; held-out ELBO from the "
    "same draws. amortization gap: ELBO(refined per-cell q) - ELBO(encoder's q), a lower "
    "bound (the refinement is not run to convergence); not defined for per-cell.",
    "- IWAE-K: RenyiELBO(alpha=0) with K vectorized particles. per-cell: PerCellGuide trained "
    "on the training cells only, held-out cells fitted with the decoder fixed ('held-out q s'). "
    "train s: wall time on a shared machine, compare within a table.",
    "- NUTS: mean error |mean_q - mean_NUTS| / sd_NUTS averaged over coordinates; variance ratio "
    "the median of var_q / var_NUTS; coverage the NUTS posterior mass inside q's central "
    "interval.",
]


def main(argv: list[str] | None = None) -> int:
    import torch

    from pyro_scvi.model import priors

    p, add = results.parser(__doc__, "< 1 minute check of every path")
    add("--datasets", nargs="+", default=["pbmc8k_200hvg", "cellbench_3cl_2tech"])
    add("--design", choices=["oat", "factorial"], default="oat")
    for name, default in OPTIONS.items():  # a float default: a float option, else an int
        kind = float if isinstance(default, float) else int
        add(f"--{name.replace('_', '-')}", type=kind, default=default)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.trace.*")
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    prior_names = [n for n in PRIORS if hasattr(priors, n)]
    combos = design(args.design, prior_names, likelihoods(), list(schemes(args.iwae_k)))
    oat = "default combination and each factor varied alone"
    note, names = oat if args.design == "oat" else "full product", list(schemes(args.iwae_k))
    note += f"; priors {prior_names}, likelihoods {likelihoods()}, schemes {names}"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.threads)}
    res |= {"settings": settings | {"design_note": note, "n_latent": N_LATENT}, "datasets": []}
    start = time.perf_counter()
    for name in args.datasets:
        ds = load(name, args)
        split = data.make_split(ds["adata"].n_obs, args.seed)
        entry = {"name": name, "cells": ds["adata"].n_obs, "genes": ds["adata"].n_vars}
        entry |= {"note": ds["note"], "batch_key": ds["batch_key"], "epochs": ds["epochs"]}
        entry |= {"n_train": len(split[0]), "n_heldout": len(split[1])}
        entry |= {"kl_warmup_epochs": max(1, round(args.warmup_fraction * ds["epochs"]))}
        entry |= {"gap_cells": min(args.gap_cells, len(split[1])), "runs": []}
        default_model = None
        for combo in combos:
            print(f"{name}: {' / '.join(combo)}", file=sys.stderr, flush=True)
            row = dict(zip(("prior", "likelihood", "scheme"), combo, strict=True))
            row["is_default"] = combo == DEFAULT
            t = time.perf_counter()
            try:
                row |= run_combo(ds, combo, split, args)
                model = row.pop("model")
                default_model = model if row["is_default"] else default_model
            except Exception as err:  # one failure must not sink the table
                row |= {"error": f"{type(err).__name__}: {err}"}
                row["traceback"] = traceback.format_exc()
                print(f"  failed: {row['error']}", file=sys.stderr)
            entry["runs"].append(row | {"total_seconds": time.perf_counter() - t})
        if default_model is not None and ds["nuts_cells"] > 0:
            print(f"{name}: NUTS", file=sys.stderr, flush=True)
            try:
                entry["nuts"] = nuts_check(ds, default_model, split[1], args)
            except Exception as err:
                entry["nuts"] = {"error": f"{type(err).__name__}: {err}"}
        res["datasets"].append(entry)
    res["total_seconds"] = time.perf_counter() - start
    results.publish(args.out_dir, results.stem(STUDY, args.smoke), res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
