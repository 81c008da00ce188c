"""Inference schemes x yardsticks: does a richer amortized posterior beat mean-field?

Schemes: the mean-field default, FullCovarianceGuide, FlowGuide, IWAE-K (RenyiELBO alpha=0)
with the default guide and with FullCovarianceGuide, per-cell refinement of the default. On
held-out cells: AIS log p(x) with its SE, IS log p(x) with the share of Pareto k > 0.7, ARI
and batch entropy of the latent space, the amortization gap, q's 90 % interval coverage of
NUTS draws of z and l on a few cells, training time and cost per epoch. Every shared dataset
subsampled (seed-0 cells, most variable genes) for a shared 2-core machine; each seed its
own split and fit. Details: ``benchmarks/README.md``.

    python -m benchmarks.compare_inference --seeds 0 1 2 [--schemes flow] --out-dir PART
    python -m benchmarks.compare_inference --gather PART1/compare_inference.json ...
    python -m benchmarks.compare_inference --smoke                          # under a minute
"""

from __future__ import annotations

import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

from .lib import data, results, score
from .lib.results import fmt

STUDY, N_LATENT = "compare_inference", 10
RICHER = ("full-covariance", "flow")
SCHEMES = ("mean-field", *RICHER, "IWAE", *(f"{f} IWAE" for f in RICHER), "per-cell")
#: the goal check's (family, baseline) pairs; the last two hold the scheme (IWAE) fixed
PAIRS = {f: (f, "mean-field") for f in (*RICHER, "IWAE", "full-covariance IWAE")}
PAIRS |= {f"{f} IWAE vs IWAE": (f"{f} IWAE", "IWAE") for f in RICHER}
OPTIONS = dict(cells=500, genes=200, epochs=40, warmup_fraction=0.25, iwae_k=5, heldout=50)
OPTIONS |= dict(ais_chains=8, ais_steps=30, is_samples=100, refine_steps=100, nuts_cells=3)
OPTIONS |= dict(nuts_warmup=80, nuts_samples=80, threads=1)
SMOKE = dict(cells=120, genes=40, epochs=2, heldout=6, ais_chains=2, ais_steps=3, is_samples=8)
SMOKE |= dict(refine_steps=3, nuts_cells=2, nuts_warmup=4, nuts_samples=4)
#: cost per epoch a richer family may add over the default before the default stays
MAX_COST_RATIO = 1.5


def load(name: str, args: Any) -> Any:
    """``args.cells`` random cells (seed 0's, for every seed), ``args.genes`` most variable."""
    adata = data.subsample_cells(data.load(name, args.data_dir), args.cells, seed=0)
    return data.most_variable(adata, args.genes) if adata.n_vars > args.genes else adata


def yardsticks(model, guide, cdata, cells, args, seed: int) -> dict[str, float]:
    """AIS and IS held-out log p(x) (means over ``cells``, AIS with its Monte Carlo SE)."""
    import numpy as np
    import torch

    from pyro_scvi import posterior
    from pyro_scvi.posterior.ais import ais_marginal_ll, pareto_k

    kw = {"n_chains": args.ais_chains, "n_steps": args.ais_steps, "n_leapfrog": 1}
    with posterior.seeded(seed):
        ais = ais_marginal_ll(model, guide, cdata, cells, batch_size=50, **kw)
        x, b = cdata.tensors(cells)
        log_w = posterior.log_importance_weights(
            model, guide, x, b, args.is_samples, batch_size=25, cell_index=torch.as_tensor(cells)
        )
    is_ll = torch.logsumexp(log_w, 0) - math.log(args.is_samples)
    se = float(np.sqrt((ais["se"] ** 2).sum()) / len(cells))
    out = {"ais": float(ais["marginal_ll"].mean()), "ais_se": se}
    out |= {"ais_ess": float(np.median(ais["ess"])), "is": float(is_ll.mean())}
    return out | {"k_over_07": float((pareto_k(log_w) > 0.7).mean())}


def coverage(model, guide, cdata, cells, samples) -> dict[str, float]:
    """Mean 90 % interval coverage of q's marginals against the NUTS draws, per site."""
    from pyro_scvi.posterior.mcmc import compare_to_nuts

    table = compare_to_nuts(model, guide, cdata, cells, samples=samples)
    return {f"nuts_cov90_{s}": float(t["coverage_0.9"].mean()) for s, t in table.groupby("site")}


def fit(adata, scheme: str, seed: int, args: Any) -> tuple[Any, dict[str, Any]]:
    """One scheme trained on the seed's training cells: the model and its cost."""
    from pyro.infer import RenyiELBO

    import pyro_scvi
    from pyro_scvi.model.guides import FlowGuide, FullCovarianceGuide

    guide = {"full-covariance": FullCovarianceGuide, "flow": FlowGuide}.get(scheme.split()[0])
    kw = {"guide": guide.from_data} if guide else {}
    m = pyro_scvi.SCVI(adata, batch_key=data.batch_key_for(adata), n_latent=N_LATENT, **kw)
    train = {"max_epochs": args.epochs, "early_stopping": False, "seed": seed}
    train |= {"kl_warmup_epochs": max(1, round(args.warmup_fraction * args.epochs))}
    train |= {"progress_bar": False, "engine": pyro_scvi.Engine(threads=args.threads)}
    if scheme.endswith("IWAE"):
        kw = {"vectorize_particles": True, "max_plate_nesting": 2}
        train["elbo"] = RenyiELBO(alpha=0, num_particles=args.iwae_k, **kw)
    start, cpu = time.perf_counter(), time.process_time()  # CPU time: the machine is shared
    m.train(train_size=data.TRAIN_SIZE, **train)
    seconds, epochs = time.perf_counter() - start, len(m.history)
    row = {"train_seconds": seconds, "epochs": epochs, "seconds_per_epoch": seconds / epochs}
    row["cpu_seconds_per_epoch"] = (time.process_time() - cpu) / epochs
    return m, row | {"compiled": bool(m.engine["compiled"]), "engine": dict(m.engine["reasons"])}


def run_seed(name: str, adata: Any, seed: int, args: Any) -> dict[str, Any]:
    """Every scheme on one dataset and seed."""
    import numpy as np
    import pyro

    import pyro_scvi
    from pyro_scvi import posterior
    from pyro_scvi.model.guides import PerCellGuide
    from pyro_scvi.posterior.gap import amortization_gap, refine
    from pyro_scvi.posterior.mcmc import sample_nuts

    train_idx, val_idx = data.make_split(adata.n_obs, seed)
    held = data.some_cells(val_idx, args.heldout, seed)
    nuts_cells = held[: args.nuts_cells]
    entry = {"dataset": name, "seed": seed, "cells": adata.n_obs, "genes": adata.n_vars}
    entry |= {"n_train": len(train_idx), "n_heldout": len(held), "schemes": {}}
    nuts_kw = {"num_samples": args.nuts_samples, "warmup_steps": args.nuts_warmup, "seed": seed}
    default: dict[str, Any] = {}  # the mean-field fit, its row and NUTS draws, for per-cell
    for scheme in args.schemes:
        print(f"{name} seed {seed}: {scheme}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            if scheme == "per-cell":  # the default's model; q refined cell by cell
                m, row = default["model"], default["row"]
                start = time.perf_counter()
                kw = {"batch_categories": m.batch_categories, "var_names": m.var_names}
                kw["batch_key"] = data.batch_key_for(adata)
                sub = pyro_scvi.from_anndata(adata[held], **kw)
                guide = PerCellGuide.from_guide(m.guide, m.data, held)
                with posterior.seeded(seed), pyro.get_param_store().scope():
                    refine(m.model, guide, m.data, held, n_steps=args.refine_steps)
                row = dict(row, refine_seconds=time.perf_counter() - start)
                row |= yardsticks(m.model, guide, sub, np.arange(len(held)), args, seed)
                row |= coverage(m.model, guide, sub, np.arange(len(nuts_cells)), default["nuts"])
            else:
                m, row = fit(adata, scheme, seed, args)
                if not np.array_equal(m.validation_indices, val_idx):
                    raise RuntimeError("SCVI.train split the cells unlike data.make_split().")
                row |= yardsticks(m.model, m.guide, m.data, held, args, seed)
                latent = m.get_latent_representation()
                row |= score.latent_scores(latent, adata, np.arange(adata.n_obs), seed=0)
                kw = {"n_steps": args.refine_steps, "n_samples": args.is_samples, "seed": seed}
                with pyro.get_param_store().scope():
                    gap = amortization_gap(m.model, m.guide, m.data, held, **kw)
                row["amortization_gap"] = float(gap["gap"].mean())
                start = time.perf_counter()
                samples = sample_nuts(m.model, m.data, nuts_cells, **nuts_kw)
                row |= {"nuts_seconds": time.perf_counter() - start}
                row |= {"nuts_min_ess": float(samples["_ess"].min())}
                row |= coverage(m.model, m.guide, m.data, nuts_cells, samples)
                if scheme == "mean-field":
                    default |= {"model": m, "row": row, "nuts": samples}
        except Exception as err:  # one failure must not sink the table
            row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
            print(f"  failed: {row['error']}", file=sys.stderr)
        entry["schemes"][scheme] = row | {"total_seconds": time.perf_counter() - t}
    return entry


def summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per dataset and scheme: each yardstick's mean over seeds (AIS SE combined)."""
    import numpy as np

    out: dict[str, dict[str, dict[str, float]]] = {}
    for r in runs:
        for scheme, row in r["schemes"].items():
            cell = out.setdefault(r["dataset"], {}).setdefault(scheme, {"seeds": []})
            if "error" not in row:
                cell["seeds"].append(r["seed"])
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        cell.setdefault(k, []).append(v)
    for schemes in out.values():
        for cell in schemes.values():
            for k, v in list(cell.items()):
                if k == "ais_se":  # the mean over seeds of independent estimates
                    cell[k] = float(np.sqrt(np.sum(np.square(v))) / len(v))
                elif k != "seeds":
                    cell[k] = float(np.mean(v))
    return out


def paired(runs: list[dict[str, Any]], name: str, fam: str, base: str) -> tuple[float, float]:
    """``fam``'s AIS gain over ``base`` on ``name``, mean and SE over the seeds both ran
    (each seed one split and fit of both: paired); SE 0 from one seed."""
    import numpy as np

    d = [r["schemes"][fam]["ais"] - r["schemes"][base]["ais"] for r in runs if r["dataset"] == name
         and all("ais" in r["schemes"].get(k, {}) for k in (fam, base))]  # fmt: skip
    return float(np.mean(d)), float(np.std(d, ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def goal_check(runs: list[dict[str, Any]], summ: dict[str, Any]) -> dict[str, Any]:
    """Issue 30's goal: beat mean-field on AIS log p(x) by > 2 SE (AIS's and the seeds')
    on >= 4 of 6 datasets, and lift NUTS 90 % coverage of l to >= 0.85."""
    out: dict[str, Any] = {}
    for entry, (fam, base) in PAIRS.items():
        wins, diffs, ratios, cov = [], {}, [], []
        for name, s in summ.items():
            a, b = s.get(fam, {}), s.get(base, {})
            if "ais" not in a or "ais" not in b:
                continue
            mc = math.hypot(a["ais_se"], b["ais_se"])
            (d, by_seed), n = paired(runs, name, fam, base), len(set(a["seeds"]) & set(b["seeds"]))
            se = math.hypot(mc, by_seed)
            diffs[name] = {"diff": d, "se": se, "mc_se": mc, "seed_se": by_seed}
            diffs[name] |= {"seeds": n, "win": d > 2 * se, "loss": d < -2 * se}
            wins += [name] if d > 2 * se else []
            ratios.append(a["seconds_per_epoch"] / b["seconds_per_epoch"])
            cov.append(a.get("nuts_cov90_l", math.nan))
        ratio = float(sum(ratios) / len(ratios)) if ratios else math.nan
        mean_cov = float(sum(cov) / len(cov)) if cov else math.nan
        g = out[entry] = {"datasets": diffs, "wins": len(wins), "of": len(diffs)}
        g |= {"cost_ratio": ratio, "nuts_cov90_l": mean_cov, "ais_goal": len(wins) >= 4}
        g["coverage_goal"] = mean_cov >= 0.85
    cov = [m["nuts_cov90_l"] for s in summ.values() if "ais" in (m := s.get("mean-field", {}))]
    out["mean-field_cov90_l"] = float(sum(cov) / len(cov)) if cov else math.nan
    best = [f for f in RICHER if out[f]["ais_goal"] and out[f]["cost_ratio"] <= MAX_COST_RATIO]
    out["decision"] = (f"propose {best[0]} as the" if best else "keep the mean-field") + " default"
    return out


COLUMNS = "scheme|seeds:|AIS log p(x):|± SE:|IS log p(x):|IS k>0.7:|ARI:|batch entropy:|"
COLUMNS += "gap:|NUTS cov90 z:|NUTS cov90 l:|train s:|s / epoch:|CPU s / epoch:"


def markdown(res: dict[str, Any]) -> str:
    s, summ, goal = res["settings"], res["summary"], res["goal"]
    how = (
        f"{s['cells']} cells (seed-0 draw) x <= {s['genes']} most variable genes per dataset; "
        f"{s['epochs']} epochs (no early stopping, KL warm-up {s['warmup_fraction']:.0%}), "
        f"n_latent {N_LATENT}, 90/10 split per seed; {s['heldout']} held-out cells for AIS "
        f"({s['ais_chains']} chains x {s['ais_steps']} steps, MALA), IS ({s['is_samples']} "
        f"draws) and the gap ({s['refine_steps']} refinement steps); NUTS on "
        f"{s['nuts_cells']} held-out cells ({s['nuts_warmup']} + {s['nuts_samples']} draws) "
        f"per fitted model; IWAE K={s['iwae_k']}; 1 thread."
    )
    lines = results.header(res, "Inference schemes x yardsticks", how)
    for name, schemes in summ.items():
        cells = schemes.items()
        rows = [[sc, len(c["seeds"])] + [fmt(c.get(k), f) for k, f in YARD] for sc, c in cells]
        lines += results.section(name, COLUMNS, rows)
    lines += ["", "## Goal check", ""]
    for entry, (fam, base) in PAIRS.items():
        g = goal[entry]
        per = ", ".join(f"{n} {d['diff']:+.2f} (2 SE {2 * d['se']:.2f}, {d['seeds']} seeds)"
                        for n, d in g["datasets"].items())  # fmt: skip
        met = {k: "met" if g[k] else "not met" for k in ("ais_goal", "coverage_goal")}
        lines.append(
            f"- {fam}{' (a scheme, not a family)' if fam == 'IWAE' else ''}: beats {base} "
            f"on AIS log p(x) by more than 2 combined SEs on {g['wins']} of {g['of']} datasets "
            f"(goal >= 4: {met['ais_goal']}; {per}); NUTS 90 % coverage of l "
            f"{fmt(g['nuts_cov90_l'], '.2f')} (goal >= 0.85: {met['coverage_goal']}; mean-field "
            f"{fmt(goal['mean-field_cov90_l'], '.2f')}); wall time per epoch "
            f"{fmt(g['cost_ratio'], '.2f')}x {base}'s."
        )
    rule = f"a family that meets the AIS goal at <= {MAX_COST_RATIO}x the default's cost per epoch"
    lines += ["", f"**Decision: {goal['decision']}** (rule: {rule}).", "", *NOTES, ""]
    return "\n".join(lines)


YARD = [("ais", ".2f"), ("ais_se", ".2f"), ("is", ".2f"), ("k_over_07", ".2f"), ("ari", ".3f")]
YARD += [("entropy_batch_mixing", ".3f"), ("amortization_gap", ".2f"), ("nuts_cov90_z", ".2f")]
YARD += [("nuts_cov90_l", ".2f"), ("train_seconds", ".0f"), ("seconds_per_epoch", ".2f")]
YARD += [("cpu_seconds_per_epoch", ".2f")]
NOTES = [
    "Means over seeds; ± SE: the AIS Monte Carlo standard error of the mean over cells, "
    "combined over seeds. Goal check: 2 SE of a gain combines that error with the gain's "
    "SE over seeds (a crude one from three). per-cell: the mean-field model with q refined "
    "per held-out cell (its ARI, entropy, gap and cost are the default's). NUTS coverage: "
    "the NUTS mass inside q's central 90 % interval from q's mean and sd (the flow's from "
    "its moments). s / epoch: wall time on a shared machine; CPU s / epoch: the process's "
    "(recorded since the flow's q(l | z) redesign); each scheme on its engine path (json)."
]


def main(argv: list[str] | None = None) -> int:
    import torch

    p, add = results.parser(__doc__, "< 1 minute check of every path")
    add("--datasets", nargs="+", default=None, help="default: every shared dataset")
    add("--seeds", nargs="+", type=int, default=[0])
    add("--schemes", nargs="+", choices=SCHEMES, default=SCHEMES, help="per-cell: mean-field")
    add("--gather", nargs="+", type=Path, help="merge parts' json files into one result")
    for name, default in OPTIONS.items():
        add(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE, datasets=args.datasets or ["pbmc8k_200hvg"])
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.threads)}
    res |= {"settings": settings, "runs": []}
    start = time.perf_counter()
    if args.gather:
        parts = [json.loads(f.read_text()) for f in args.gather]  # parts or gathered results
        runs: dict[tuple, dict] = {}  # a later part's schemes replace an earlier's
        for r in (r for pt in parts for r in pt["runs"]):
            runs.setdefault((r["dataset"], r["seed"]), r)["schemes"].update(r["schemes"])
        res |= {"settings": parts[0]["settings"], "runs": list(runs.values())}
        res["parts"] = [m for pt in parts for m in pt.get("parts", [pt["meta"]])]
    for name in [] if args.gather else args.datasets or data.default_names(args.data_dir):
        adata = load(name, args)
        for seed in args.seeds:
            res["runs"].append(run_seed(name, adata, seed, args))
            res["total_seconds"] = time.perf_counter() - start
            res["summary"] = summary(res["runs"])
            results.write(args.out_dir, results.stem(STUDY, args.smoke), res)  # as it goes
    res["summary"] = summary(res["runs"])
    res["goal"] = goal_check(res["runs"], res["summary"])
    results.publish(args.out_dir, results.stem(STUDY, args.smoke), res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
