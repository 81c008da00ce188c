"""Differential expression on truth from outside the method: pyro_scvi vs scvi-tools vs
Wilcoxon vs pseudobulk, on simulators unlike scVI's generative model and on real counts.

Splatter-style and multi-sample Poisson-lognormal counts (each with and without confounded
batches), programmes that shift the libraries' composition (asymmetric, among the high
expressers, balanced; each with and without batches crossed with the groups) and fold
changes planted in real counts, balanced or one-sided (:mod:`pyro_scvi.datasets.de_truth`);
AUROC (overall and per expression stratum), empirical FDR and power at 5 %, calls between
random halves, the median LFC of unchanged genes. ``--cache DIR`` keeps the fits;
``--merge`` keeps an earlier run's rows (benchmark, seed, method) not redone; ``--methods``
runs only those (and fits only the models they need). Details: ``benchmarks/README.md``.

    python -m benchmarks.de_truth --cache "$(mktemp -d)"
    python -m benchmarks.de_truth --smoke   # < 1 minute, any environment
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, score
from .lib.results import fmt

STUDY, EXPRESSED = "de_truth", 0.05
BENCHMARKS = (
    *("splatter", "splatter, confounded", "poisson-lognormal", "poisson-lognormal, confounded"),
    *("thinned real counts", "asymmetric", "asymmetric, batches", "high expressers"),
    *("high expressers, batches", "balanced", "balanced, batches"),
    "thinned real counts, up-regulation",
)
#: composition_shift designs; the asymmetric programme's size cycles with the seed
COMPOSITION = {
    "asymmetric": lambda seed: {"up_fraction": (0.05, 0.1, 0.2)[seed % 3]},
    "high expressers": lambda seed: {"up_fraction": 0.1, "down_fraction": 0.0, "among_top": 0.2},
    "balanced": lambda seed: {"up_fraction": 0.05, "down_fraction": 0.05},
}
#: expression strata: fraction of the A and B cells with a non-zero count
STRATA = {"1-5 %": (0.01, 0.05), "5-20 %": (0.05, 0.2), "> 20 %": (0.2, 1.01)}
AVERAGED = ("auroc_all", "auroc_expressed", *(f"auroc {k}" for k in STRATA), "median_null_lfc")
METHODS = (
    *("pyro_scvi change", "pyro_scvi change, uncorrected", "pyro_scvi change, replicates"),
    *("pyro_scvi change, sparse", "pyro_scvi change, sparse, replicates", "pyro_scvi vanilla"),
    *("scvi-tools change", "scvi-tools vanilla", "Wilcoxon", "pseudobulk PyDESeq2"),
)
SMOKE = dict(cells=300, genes=120, max_epochs=2, seeds=[0], n_samples=100, pbmc_epochs=1)


def make_data(name: str, seed: int, args: argparse.Namespace) -> Any:
    """One benchmark's data: ``obs["group"]`` (A, B, ...), ``obs["halves"]``, the truth."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp
    from pyro_scvi.datasets import de_truth, pbmc8k_200hvg

    batches = 2 if name.endswith(("confounded", "batches")) else 1
    if design := COMPOSITION.get(name.split(",")[0]):
        kw = design(seed) | {"n_batches": batches, "library_size": 1500.0, "seed": seed}
        adata = de_truth.composition_shift(args.cells, args.genes, **kw)
    elif name.startswith("splatter"):
        kw = {"n_batches": batches, "batch_confounding": 0.6, "seed": seed}
        adata = de_truth.splatter_like(args.cells, args.genes, **kw)
    elif name.startswith("poisson-lognormal"):
        kw = {"n_batches": batches, "seed": seed}
        adata = de_truth.poisson_lognormal_samples(args.cells, args.genes, **kw)
    else:  # thinned real counts; where the shared data are absent (CI), the shipped PBMCs
        zeisel = "zeisel_cortex_subset_1464x1000"
        if data.available(zeisel):
            real, kind, source = data.load(zeisel), "pyramidal CA1", zeisel
        else:
            real, kind, source = pbmc8k_200hvg(), "B-cells", "pbmc8k_200hvg"
        real = real[: args.cells * 2, : args.genes].copy() if args.smoke else real
        cells = np.flatnonzero(real.obs["cell_type"] == kind)
        kw = {"min_mean": 0.05, "seed": seed}
        if name.endswith("up-regulation"):  # a programme of 20 % of the genes, 90 % up
            kw |= {"de_fraction": 0.2, "up_share": 0.9, "lfc_range": (1.0, 3.0)}
        adata = de_truth.plant_fold_changes(real, cells=cells, **kw)
        adata.uns["truth"]["source"] = f"{source}: {kind}"
    half = np.where(np.random.default_rng(seed + 1000).random(adata.n_obs) < 0.5, "h1", "h2")
    adata.obs["halves"] = pd.Categorical(np.where(adata.obs["group"] == "A", half, None))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return adata


def pseudobulk_deseq2(adata: Any, groupby: str, g1: str, g2: str, pair_by: str | None = None):
    """PyDESeq2 on per-sample summed counts; ``pair_by`` adds that column to the design."""
    import numpy as np
    import pandas as pd
    from pydeseq2.dds import DeseqDataSet
    from pydeseq2.default_inference import DefaultInference
    from pydeseq2.ds import DeseqStats

    keep = adata.obs[groupby].isin([g1, g2]).to_numpy()
    batch = data.batch_key_for(adata) and pair_by is None
    frame = adata.obs.loc[keep, ["sample", groupby] + ["batch"] * bool(batch)].astype(str)
    unit = frame["sample"] + "|" + frame[groupby]
    units = sorted(set(unit))
    x = adata.X[keep]
    counts = np.vstack([np.asarray(x[(unit == u).to_numpy()].sum(0)).ravel() for u in units])
    meta = frame.assign(unit=unit).drop_duplicates("unit").set_index("unit").loc[units]
    meta = meta.rename(columns={groupby: "condition"})
    meta["condition"] = pd.Categorical(meta["condition"], categories=[g2, g1])
    factors = ["sample"] if pair_by else ["batch"] * ("batch" in meta)
    counts = pd.DataFrame(counts.astype(int), index=units, columns=adata.var_names)
    kw = {"inference": DefaultInference(n_cpus=1), "quiet": True}
    design = "~" + " + ".join([*factors, "condition"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dds = DeseqDataSet(counts=counts, metadata=meta, design=design, **kw)
        dds.deseq2()
        ds = DeseqStats(dds, contrast=["condition", g1, g2], **kw)
        ds.summary()
    res = ds.results_df.loc[adata.var_names]
    p, padj = (res[k].fillna(1.0).to_numpy() for k in ("pvalue", "padj"))
    return score.tie_broken_score(-p, res["stat"].fillna(0.0).to_numpy()), padj < score.FDR_TARGET


def unavailable(method: str, adata: Any) -> str | None:
    if method.startswith("scvi-tools") and importlib.util.find_spec("scvi") is None:
        return "skipped: scvi-tools not installed"
    pseudobulk = method.startswith("pseudobulk")
    if (pseudobulk or method.endswith("replicates")) and "sample" not in adata.obs:
        return "no replicates"
    if pseudobulk and importlib.util.find_spec("pydeseq2") is None:
        return "skipped: pydeseq2 not installed"
    return None


def run_methods(fits: dict, adata: Any, groupby: str, g1: str, g2: str, args, seed: int) -> dict:
    """``method -> (score, calls, seconds)`` or the reason it did not run."""
    out: dict[str, Any] = {}
    for method in args.methods:
        if why := unavailable(method, adata):
            out[method] = why
            continue
        start = time.perf_counter()
        if method.startswith("pyro_scvi"):
            mode = "change" if "change" in method else "vanilla"
            kw = {"mode": mode, "seed": seed, "n_samples": args.n_samples}
            kw["composition_correction"] = "uncorrected" not in method
            kw["spread_uncertainty"] = "sparse" in method  # issue 28
            kw["sample_key"] = "sample" if method.endswith("replicates") else None
            result = score.de_pyro(fits["pyro_scvi"].model, adata, groupby, g1, g2, **kw)
        elif method.startswith("scvi-tools"):
            correct = data.batch_key_for(adata) is not None
            mode = method.split()[-1]
            result = score.de_scvi_tools(fits["scvi-tools"], groupby, g1, g2, mode, correct, seed)
        elif method == "Wilcoxon":
            result = score.wilcoxon(adata, groupby, g1, g2)
        else:
            pair_by = "sample" if groupby == "halves" else None
            result = pseudobulk_deseq2(adata, groupby, g1, g2, pair_by)
        lfc = result[2] if len(result) > 2 else None
        out[method] = (result[0], result[1], time.perf_counter() - start, lfc)
    return out


def run_replicate(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np

    adata = make_data(name, seed, args)
    truth = np.asarray(adata.uns["truth"]["is_de"], dtype=bool)
    compared = adata.obs["group"].isin(["A", "B"]).to_numpy()
    detected = np.asarray((adata.X[compared] > 0).mean(0)).ravel()
    expressed, unchanged = detected >= EXPRESSED, (detected >= EXPRESSED) & ~truth
    drift = adata.uns["truth"].get("sample_log2_fold_change", np.zeros(len(truth)))
    drifted = np.abs(np.asarray(drift)) >= score.DELTA / 2
    print(f"{name}, seed {seed}: {adata.n_obs} cells x {adata.n_vars} genes", file=sys.stderr)
    folder = args.cache and args.cache / f"{name.replace(', ', '_').replace(' ', '_')}_seed{seed}"
    fits, key = {}, data.batch_key_for(adata)
    for impl in ("pyro_scvi", "scvi-tools"):
        if any(m.startswith(impl) for m in args.methods) and not adapters.skipped([impl]):
            cache = folder and folder / impl.replace("-", "_")
            threads = args.threads if impl == "pyro_scvi" else None  # fixed, not free cores
            kw = {"seed": seed, "threads": threads, "device": "cpu", "cache": cache}
            fits[impl] = adapters.ADAPTERS[impl](adata, key, **kw).fit(args.max_epochs or None)
    found = run_methods(fits, adata, "group", "A", "B", args, seed)
    nulls, methods = run_methods(fits, adata, "halves", "h1", "h2", args, seed), {}
    strata = {k: (detected >= lo) & (detected < hi) for k, (lo, hi) in STRATA.items()}
    for method, r in found.items():
        if isinstance(r, str):
            methods[method] = {"skipped": r}
            continue
        ranking, calls, seconds, lfc = r
        false = int((calls & ~truth).sum())
        m = {"auroc_all": score.auroc(truth, ranking)}
        m["auroc_expressed"] = score.auroc(truth[expressed], ranking[expressed])
        m |= {f"auroc {k}": score.auroc(truth[s], ranking[s]) for k, s in strata.items()}
        # pyro_scvi: the LFC of the expressed genes outside the programme (truth 0)
        pyro = lfc is not None and method.startswith("pyro")
        m["median_null_lfc"] = float(np.median(lfc[unchanged])) if pyro else None
        m |= {"n_calls": int(calls.sum()), "false_calls": false}
        m["false_calls_drifted"] = int((calls & ~truth & drifted).sum())
        m |= {"true_calls": int(calls.sum()) - false, "null_calls": int(nulls[method][1].sum())}
        methods[method] = m | {"seconds": seconds}
    design = adata.uns["truth"]
    out = {"benchmark": name, "seed": seed, "n_cells": adata.n_obs, "n_genes": adata.n_vars}
    out |= {"n_de": int(truth.sum()), "n_de_expressed": int((truth & expressed).sum())}
    out["n_de_strata"] = {k: int((truth & s).sum()) for k, s in strata.items()}
    out |= {"n_expressed": int(expressed.sum()), "unchanged_drifted": drifted[~truth].mean()}
    out["group_sizes"] = {k: int(v) for k, v in adata.obs["group"].value_counts().items()}
    out["source"] = design.get("source", design["design"])
    out["composition_shift_log2"] = design.get("composition_shift_log2")
    out["train_seconds"] = {i: f.run["train_seconds"] for i, f in fits.items()}
    return out | {"methods": methods}


def summarize(replicates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    import numpy as np

    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["benchmark"] for r in replicates):
        reps = [r for r in replicates if r["benchmark"] == name]
        out[name] = {}
        for method in METHODS:
            rows = [r["methods"].get(method, {"skipped": "not in that run"}) for r in reps]
            if any("skipped" in x for x in rows):
                out[name][method] = {"skipped": rows[0]["skipped"]}
                continue
            calls, false = (sum(x[k] for x in rows) for k in ("n_calls", "false_calls"))
            mean = {k: [x[k] for x in rows if x.get(k) is not None] for k in AVERAGED}
            m = {k: float(np.mean(v)) if v else None for k, v in mean.items()}
            m |= {"empirical_fdr": false / calls if calls else 0.0, "false": false}
            m["false_drifted"] = sum(x.get("false_calls_drifted", 0) for x in rows)
            m |= {"power": (calls - false) / sum(r["n_de"] for r in reps), "calls": calls}
            nulls = sum(x["null_calls"] for x in rows) / sum(r["n_genes"] for r in reps)
            out[name][method] = m | {"null_fraction": nulls}
    return out


def targets(summary: dict[str, dict[str, Any]]) -> dict[str, dict[str, bool | None]]:
    """The issue's goals for pyro_scvi change mode (with replicates where there are);
    ``None`` where the reference did not run or a stratum holds no DE gene."""
    out = {}
    for name, methods in summary.items():
        for row in ("pyro_scvi change", "pyro_scvi change, replicates"):
            mine, ref = methods[row], methods.get("scvi-tools change", {})
            if "skipped" in mine:
                continue
            ref = None if "skipped" in ref else ref
            checks: dict[str, bool | None] = {
                "empirical FDR <= 0.10": mine["empirical_fdr"] <= 0.10,
                "power >= scvi-tools": mine["power"] >= ref["power"] if ref else None,
                "null halves <= 1 %": mine["null_fraction"] <= 0.01,
            }
            for k in STRATA:
                a, w = mine[f"auroc {k}"], methods["Wilcoxon"].get(f"auroc {k}")
                b = ref and ref[f"auroc {k}"]
                checks[f"AUROC {k} >= scvi-tools"] = None if a is None or b is None else a >= b
                checks[f"AUROC {k} >= Wilcoxon - 0.02"] = None if None in (a, w) else a >= w - 0.02
            out[f"{name} | {row}"] = checks
    return out


def pbmc_checks(args: argparse.Namespace) -> dict[str, Any]:
    """On the shipped pbmc8k_200hvg: warnings for small groups, the scanpy-style record,
    vanilla mode between CD4+ and CD8+ T-cells."""
    import numpy as np

    adata = data.load("pbmc8k_200hvg", subsample=1500 if args.smoke else None)
    cache = args.cache and args.cache / "pbmc8k"
    fit = adapters.PyroScvi(adata, seed=0, threads=args.threads, cache=cache).fit(args.pbmc_epochs)
    model = fit.model
    out: dict[str, Any] = {"epochs": args.pbmc_epochs, "train_seconds": fit.run["train_seconds"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rest = model.differential_expression(groupby="cell_type", n_samples=args.n_samples)
    messages = [str(w.message) for w in caught]
    out["small_group_warnings"] = [m for m in messages if "fewer than" in m]
    groups = rest.groupby("group1", observed=True)
    out["one_vs_rest"] = {
        str(g): {"n_cells": int(block["n_cells1"].iloc[0]), "calls": int(block["is_de_fdr"].sum())}
        for g, block in groups
    }  # fmt: skip
    key, kw = adata.copy(), {"groupby": "cell_type", "n_samples": args.n_samples}
    model.differential_expression(key, key_added="de", **kw)
    uns, out["record"] = key.uns["de"], {}
    for group in uns["names"].dtype.names:
        scores = np.asarray(uns["scores"][group], dtype=float)
        lfc = np.asarray(uns["logfoldchanges"][group], dtype=float)
        out["record"][group] = {
            "tied_scores": int(len(scores) - len(np.unique(scores))),
            "top10": list(uns["names"][group][:10]), "top10_lfc_min": float(lfc[:10].min()),
        }  # fmt: skip
    kw |= {"group1": "CD4+ T-cells", "group2": "CD8+ T-cells"}
    for mode in ("change", "vanilla"):
        res = model.differential_expression(mode=mode, **kw)
        out[f"cd4_vs_cd8_{mode}"] = {
            "calls": int(res["is_de_fdr"].sum()), "max_proba_de": float(res["proba_de"].max()),
            "genes_with_proba_de_over_0.9": int((res["proba_de"] > 0.9).sum()),
        }  # fmt: skip
    return out


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = (
        f"Seeds {s['seeds']}; simulated data {s['cells']} cells x {s['genes']} genes; both scVI "
        f"implementations trained {s['max_epochs'] or 'their default number of'} epochs; delta "
        f"{score.DELTA}, target {score.FDR_TARGET}; pyro_scvi n_samples {s['n_samples']}. "
        f"Expressed: non-zero in >= {EXPRESSED:.0%} of the A and B cells. FDR and power pooled "
        "over seeds; AUROC averaged."
    )
    lines = results.header(res, "Differential expression on truth from outside the method", how)
    rows = []
    for name, methods in res["summary"].items():
        for method, m in methods.items():
            if "skipped" in m:
                rows.append(f"{name} | {method} | {m['skipped']} |" + " |" * 10)
                continue
            cells = [name, method, *(fmt(m[k]) for k in AVERAGED[:2])]  # all, expressed
            cells += [fmt(m.get(k)) for k in AVERAGED[2:-1]]  # the strata
            cells += [f"{m['empirical_fdr']:.3f}", f"{m['power']:.3f}", m["calls"]]
            rows.append([*cells, f"{m['null_fraction']:.4f}", fmt(m.get(AVERAGED[-1]), "+.3f")])
    strata = "".join(f"AUROC {k}:|" for k in STRATA)
    columns = f"benchmark|method|AUROC all:|AUROC expressed:|{strata}FDR at 5 %:|power:|calls:|"
    columns += "null halves: fraction called:|median LFC, unchanged:"
    lines += results.md_table(columns, rows)
    n_de = [f"{r['benchmark']} seed {r['seed']} " + "/".join(map(str, r["n_de_strata"].values()))
        for r in res["replicates"] if "n_de_strata" in r]  # fmt: skip
    lines += ["", f"DE genes per stratum ({' / '.join(STRATA)}): {'; '.join(n_de)}."] * bool(n_de)
    for name, ms in res["summary"].items():  # replicates' chance differences: sample_key
        drift = [r.get("unchanged_drifted", 0) for r in res["replicates"] if name in r.values()]
        lines += [f"\n{name}: replicates differ by chance between the groups by >= "
            f"{score.DELTA / 2} log2 on {sum(drift) / len(drift):.0%} of the unchanged genes "
            "and on these of the false calls: " + ", ".join(f"{m} {ms[m]['false_drifted']} "
            f"of {ms[m]['false']}" for m in METHODS[:3] if "false" in ms[m])
        ] if any(drift) else []  # fmt: skip
    checks = next(iter(res["targets"].values()), {})
    mark = {None: "-", True: "yes", False: "**no**"}
    marks = [[n, *(mark[v] for v in t.values())] for n, t in res["targets"].items()]
    note = "'-': scvi-tools did not run, or the stratum holds no DE gene."
    lines += ["", "## Targets (pyro_scvi change mode)", "", note, ""]
    lines += results.md_table(["benchmark", "method", *checks], marks)
    if pb := res.get("pbmc8k"):
        rows = [
            f"{g} | {r['n_cells']} | {r['calls']} | {pb['record'][g]['tied_scores']} | "
            f"{pb['record'][g]['top10_lfc_min']:.2f}"
            for g, r in pb["one_vs_rest"].items()
        ]
        title = f"pbmc8k_200hvg (pyro_scvi trained {pb['epochs']} epochs)"
        columns = "group (one vs rest)|cells:|calls at 5 %:|record: tied scores:|"
        columns += "record: least LFC of the top 10:"
        lines += [*results.section(title, columns, rows), ""]
        for mode in ("change", "vanilla"):
            r = pb[f"cd4_vs_cd8_{mode}"]
            lines.append(
                f"- CD4+ vs CD8+ T-cells, {mode} mode: {r['calls']} calls, max proba_de "
                f"{r['max_proba_de']:.3f}, {r['genes_with_proba_de_over_0.9']} genes over 0.9."
            )
        lines.append(f"- Warnings: {' / '.join(pb['small_group_warnings']) or 'none'}")
    return "\n".join([*lines, "", NOTE, ""])


NOTE = (
    "- Truth: the designed DE genes (|log2 FC| 0.6-2.0; 1-3 in the composition designs and the "
    "up-regulation programme); every other gene has a designed fold change of 0, whatever "
    "its share of the counts. 'median LFC, unchanged': pyro_scvi's lfc_mean of the expressed "
    "genes outside the programme (0 if the composition is corrected), median over genes, "
    "mean over seeds; 'uncorrected': composition_correction=False. pyro_scvi ranks by its "
    "table's order, scvi-tools by proba_de (ties "
    "|lfc_mean|), Wilcoxon by |z|, PyDESeq2 by p-value. Calls: pyro_scvi is_de_fdr; scvi-tools "
    "is_de_fdr_0.05 (change) or the posterior expected FDR rule on max(proba_m1, proba_m2) "
    "(vanilla); BH-adjusted p < 0.05 for Wilcoxon and PyDESeq2 (no threshold). pyro_scvi's "
    "vanilla mode makes no calls (see the DE guide)."
)


def main(argv: list[str] | None = None) -> int:
    import torch

    doc, smoke = "DE on truth from outside the method.", "tiny run (< 1 minute)"
    p, _ = results.parser(doc, smoke, data_dir=False, merge="keep earlier rows not redone")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), choices=BENCHMARKS)
    p.add_argument("--cells", type=int, default=2000, help="simulated cells")
    p.add_argument("--genes", type=int, default=1000, help="simulated genes")
    p.add_argument("--max-epochs", type=int, default=150, help="0: each package's default")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="e.g. 3 alone")
    p.add_argument("--n-samples", type=int, default=1000, help="pyro_scvi n_samples")
    p.add_argument("--pbmc-epochs", type=int, default=100, help="0: no pbmc8k checks")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", type=Path, default=None, help="folder of trained models")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    args = p.parse_args(argv)
    vars(args).update(SMOKE if args.smoke else {})
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    meta = results.metadata(STUDY, argv, threads=args.threads, versions=("pydeseq2",))
    replicates = [run_replicate(n, s, args) for n in args.benchmarks for s in args.seeds]
    earlier = results.read(args.out_dir / f"{results.stem(STUDY, args.smoke)}.json")
    if args.merge and earlier:  # the earlier (benchmark, seed, method) rows not redone stay
        new, rows = {(r["benchmark"], r["seed"]): r for r in replicates}, []
        for old in earlier["replicates"]:
            r = new.pop((old["benchmark"], old["seed"]), {"methods": {}, "train_seconds": {}})
            source = old.pop("from_run", None) or results.provenance(earlier)
            kept = {m: {"from_run": source} | v for m, v in old["methods"].items()}
            seconds = old["train_seconds"] | r["train_seconds"]
            rows.append(old | r | {"methods": kept | r["methods"], "train_seconds": seconds})
        replicates = rows + list(new.values())
    summary = summarize(replicates)
    keys = ("cells", "genes", "max_epochs", "n_samples", "threads", "benchmarks", "smoke", "seeds")
    res: dict[str, Any] = {"meta": meta, "settings": {k: getattr(args, k) for k in keys}}
    res |= {"summary": summary, "targets": targets(summary), "replicates": replicates}
    if args.pbmc_epochs:
        res["pbmc8k"] = pbmc_checks(args)
    res["total_seconds"] = time.perf_counter() - start
    results.publish(args.out_dir, results.stem(STUDY, args.smoke), res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
