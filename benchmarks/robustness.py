"""Robustness matrix: every dataset x seed x engine path x thread setting must train.

Exit code 0: all finished or rejected and the paths agree on the held-out ELBO within 1 %;
2: a spread above 1 %; 1: a failure. Details: ``benchmarks/README.md``.

    python -m benchmarks.robustness            # the full matrix (hours)
    python -m benchmarks.robustness --smoke    # about a minute
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, workers
from .lib.results import fmt

STUDY = "robustness"
REAL = (
    "pbmc8k_200hvg cellbench_3cl_2tech zeisel_cortex_subset_1464x1000 baron_pancreas_indrop_neuca "
    "worm_neuron_scirnaseq_scdeepcluster onek1k_pbmc_40donors_scdesignpop"
).split()
#: Simulated stress cases (see :func:`simulate`): name -> what it stresses
STRESS = {
    "stress_library_1e2_to_1e6": "1,000 cells x 500 genes, one batch, library sizes "
    "log-uniform from 10^2 to 10^6 counts per cell (deep ZINB data binomially thinned)",
    "stress_gene_30pct": "1,000 cells x 500 genes, gene 0 holds 30 % of every cell's "
    "counts (Poisson, 3/7 of the other genes' total)",
    "stress_20000_genes_10pct_zero": "300 cells x 20,000 genes (about 10^4 counts per "
    "cell), 2,000 random genes set to zero in every cell",
    "stress_60_cells": "60 cells x 500 genes",
    "stress_40_batches_of_50": "40 batches x 50 cells (2,000 cells) x 500 genes, batch "
    "effect sd 0.5 per gene",
    "stress_batch_of_2_cells": "two batches of about 300 cells and one of 2 cells, 500 "
    "genes, batch effect sd 0.5",
    # 10 % of 10,250 cells: 1,025 validation cells in passes of 1,024, the last of one cell
    "stress_1025_validation_cells": "10,250 cells x 200 genes: the validation pass's last "
    "minibatch (of 1,024 cells) holds one cell",
}
PATHS = ("auto", "eager", "compiled", "fused", "pyro")
SMOKE = dict(datasets=["stress_60_cells", "stress_batch_of_2_cells"], seeds=[0], threads=["1"])
SMOKE |= dict(paths=["eager", "fused"], epochs=2, elbo_samples=2)
TOLERANCE = 0.01  # relative spread of the held-out ELBO across paths
STATUSES = ("finished", "rejected", "failed")
ELBOS = ("validation_elbo", "heldout_elbo")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    merge = "keep the file's datasets this run does not redo"
    smoke = "two tiny stress cases, 2 paths, 2 epochs"
    p, add = results.parser(__doc__, smoke, out="--out", merge=merge)
    add("--datasets", nargs="+", default=["real", "stress"], help="names; 'real', 'stress'")
    add("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    add("--seeds", nargs="+", type=int, default=[0, 1, 2])
    add("--threads", nargs="+", default=["1", "all"], help="a count, 'all' or 'auto'")
    add("--epochs", type=int, default=20)
    add("--elbo-samples", type=int, default=10, help="draws per cell, held-out ELBO")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if bad := [t for t in args.threads if t not in ("all", "auto") and not t.isdigit()]:
        p.error(f"--threads {bad}: a positive integer, 'all' or 'auto'")
    names = [d.removesuffix(".h5ad") for d in args.datasets]
    groups = {"real": REAL, "stress": list(STRESS)}
    args.datasets = list(dict.fromkeys(n for d in names for n in groups.get(d, [d])))
    if unknown := [d for d in args.datasets if d.startswith("stress_") and d not in STRESS]:
        p.error(f"unknown stress cases {unknown}; choose from {', '.join(STRESS)}")
    args.paths = [x for x in PATHS if x in args.paths]
    return args


def simulate(name: str, smoke: bool = False) -> Any:
    """The stress case ``name`` (:data:`STRESS`) as CSR integer counts; ``smoke``: 100 genes
    (and the batch-of-2 case about 100 cells a batch)."""
    import numpy as np
    import scipy.sparse as sp
    from pyro_scvi.datasets import synthetic_zinb

    genes, seed = 100 if smoke else 500, list(STRESS).index(name)  # fixed, one per case
    rng, sim = np.random.default_rng(1000 + seed), {"n_clusters": 5, "seed": seed}
    if name == "stress_library_1e2_to_1e6":
        adata = synthetic_zinb(1000, genes, library_log_mean=math.log(2e6), **sim)
        x = adata.X.toarray()
        target = 10.0 ** rng.permutation(np.linspace(2, 6, adata.n_obs))
        x = rng.binomial(x, np.minimum(1.0, target / x.sum(1))[:, None])
        adata.obs["batch"] = "batch0"  # depth groups are not batches here
    elif name == "stress_gene_30pct":
        adata = synthetic_zinb(1000, genes, **sim)
        x = adata.X.toarray()
        x[:, 0] = rng.poisson(3 / 7 * x[:, 1:].sum(1))
    elif name == "stress_20000_genes_10pct_zero":
        n_genes = 2000 if smoke else 20000
        adata = synthetic_zinb(300, n_genes, library_log_mean=math.log(1e4), **sim)
        x = adata.X.toarray()
        x[:, rng.choice(n_genes, n_genes // 10, replace=False)] = 0
    elif name in ("stress_1025_validation_cells", "stress_60_cells"):
        cells, genes = (10250, 40 if smoke else 200) if "1025" in name else (60, genes)
        adata = synthetic_zinb(cells, genes, **sim)
        x = adata.X.toarray()
    else:  # a few cells per batch: 40 batches of 50, or one batch of 2
        many = name == "stress_40_batches_of_50"
        cells, batches = (4000, 40) if many else (300 if smoke else 900, 3)
        adata = synthetic_zinb(cells, genes, n_batches=batches, batch_effect=0.5, **sim)
        batch = adata.obs["batch"].astype(str).to_numpy()
        sizes = {b: 50 if many else 2 if b == "batch2" else None for b in sorted(set(batch))}
        keep = [np.flatnonzero(batch == b)[:n] for b, n in sizes.items()]
        if many and min(len(k) for k in keep) < 50:
            raise RuntimeError("simulate more cells: a batch has fewer than 50")
        adata = adata[np.sort(np.concatenate(keep))].copy()
        x = adata.X.toarray()
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    adata.X = sp.csr_matrix(x.astype(np.int32))
    adata.uns.pop("simulation", None)
    adata.uns["source"] = f"benchmarks/robustness.py: {STRESS[name]}"
    return adata


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker mode ``--prepare``: simulate the stress cases to ``.h5ad``; describe all data."""
    import anndata
    import numpy as np

    info: dict[str, Any] = {}
    for name in spec["datasets"]:
        try:
            if name in STRESS:
                adata, path = simulate(name, spec["smoke"]), Path(spec["tmp"]) / f"{name}.h5ad"
                adata.write_h5ad(path)
            else:
                path = data.path_of(name, spec["data_dir"])
                adata = anndata.read_h5ad(path)  # as it is
            library, per_gene = (np.asarray(adata.X.sum(a)).ravel() for a in (1, 0))
            batches = adata.obs["batch"].astype(str).value_counts()
            d = data.describe(adata) | {"kind": "stress" if name in STRESS else "file"}
            d |= {"h5ad": str(path), "smallest_batch": int(batches.min())}
            d["zero_fraction"] = 1 - adata.X.nnz / (adata.n_obs * adata.n_vars)
            d |= {"library_min": float(library.min()), "library_max": float(library.max())}
            d["library_median"] = float(np.median(library))
            d["all_zero_genes"] = int((per_gene == 0).sum())
            d["top_gene_share"] = float(per_gene.max() / per_gene.sum())
            info[name] = d | ({"description": STRESS[name]} if name in STRESS else {})
        except Exception as err:  # a missing or unreadable file: its runs are skipped
            traceback.print_exc()
            info[name] = {"error": f"{type(err).__name__}: {err}"}
    return info


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (dataset, seed, path, threads) run in this process."""
    import anndata
    import numpy as np

    import pyro_scvi
    from pyro_scvi.train.engine import Engine

    adata = anndata.read_h5ad(spec["h5ad"])
    token = spec["threads"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = None if token == "auto" else cores if token == "all" else int(token)
    engine = Engine.preset(spec["path"], threads=threads)
    fit = adapters.PyroScvi(adata, data.batch_key_for(adata), seed=spec["seed"], engine=engine)
    out: dict[str, Any] = {"engine_threads": threads}
    try:
        fit.fit(spec["epochs"])
    except Exception as err:  # InputError: rejected; TrainingError or any other: failed
        stage = "SCVI(...)" if fit.model is None else "train()"
        first = (str(err).strip().splitlines() or [""])[0]  # Pyro appends the trace's shapes
        rejected = isinstance(err, pyro_scvi.InputError)
        out["status"] = "rejected" if rejected else "failed"
        out["message"] = f"{stage}: {err if rejected else f'{type(err).__name__}: {first}'}"
        out["traceback"] = None if rejected else traceback.format_exc()
        if fit.model is None or not hasattr(fit.model, "history"):
            return out
    run, model, h = fit.run, fit.model, fit.model.history
    keep = ("train_seconds", "engine", "epoch_seconds", "threads_per_epoch")
    out |= {k: run[k] for k in keep if k in run} | {"epochs_run": len(h)}
    out["validation_elbo_curve"] = [float(v) for v in h["validation_elbo"]]
    out["n_validation"] = len(model.validation_indices)
    out |= {k: float(h[k].iloc[-1]) for k in ("validation_elbo", "train_elbo") if len(h)}
    if "status" in out:
        return out
    try:
        held = adata[model.validation_indices].copy()
        stats = model.get_fit_statistics(held, n_samples=spec["elbo_samples"], seed=0)
        out["heldout_elbo"] = float(stats["elbo"].mean())
        out["heldout_marginal_ll"] = float(stats["marginal_ll"].mean())
    except Exception as err:
        message = f"held-out ELBO: {type(err).__name__}: {err}"
        return out | {"status": "failed", "message": message, "traceback": traceback.format_exc()}
    values = [out.get("validation_elbo", math.nan), out["heldout_elbo"]]
    if np.isfinite(values).all():
        return out | {"status": "finished"}
    return out | {"status": "failed", "message": f"non-finite ELBO: val, held-out = {values}"}


def spread(values: list[float]) -> float | None:
    """``(max - min) / |mean|`` of at least two values, else ``None``."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / abs(mean) if mean else math.inf


def spreads(runs: list[dict[str, Any]], over: str, keys: tuple[str, ...]) -> list[dict]:
    """The relative spread of both ELBOs over ``over``, per group of the other ``keys``."""
    groups: dict[tuple, list[dict]] = {}
    for r in (r for r in runs if r["status"] == "finished"):
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key, strict=True)) | {over: [r[over] for r in members]}
        for col in ELBOS:
            row[col] = [r[col] for r in members]
            row[f"{col}_spread"] = spread(row[col])
        out.append(row)
    return out


def auto_matches(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished ``auto`` run beside the preset run it resolved to (same seed, threads)."""
    presets = {"eager": (False, False, True), "compiled": (True, False, True)}
    presets |= {"fused": (True, True, True), "pyro": (False, False, False)}
    keys = ("dataset", "seed", "threads", "path")
    done = {tuple(r[k] for k in keys): r for r in runs if r["status"] == "finished"}
    out = []
    for (dataset, seed, threads, path), r in done.items():
        if path == "auto":
            e = r["engine"]
            choice = (e["compiled"], e["fused_kernel"], e["fused_adam"])
            twin = next((p for p, c in presets.items() if c == choice), None)
            row = {"dataset": dataset, "seed": seed, "threads": threads, "resolved": twin}
            if other := done.get((dataset, seed, threads, twin)):
                for key in ELBOS:
                    row[f"abs_diff_{key}"] = abs(r[key] - other[key])
            out.append(row)
    return out


def counts(runs: list[dict[str, Any]], field: str) -> dict[str, dict[str, int]]:
    """Finished / rejected / failed / total runs per value of ``field``."""
    out: dict[str, dict[str, int]] = {}
    for r in runs:
        c = out.setdefault(str(r[field]), dict.fromkeys((*STATUSES, "total"), 0))
        c[r["status"]] += 1
        c["total"] += 1
    return out


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    across = spreads(runs, "path", ("dataset", "seed", "threads"))
    worst = [r["heldout_elbo_spread"] for r in across if r["heldout_elbo_spread"]]
    worst_val = [r["validation_elbo_spread"] for r in across if r["validation_elbo_spread"]]
    out: dict[str, Any] = {f"by_{k}": counts(runs, k) for k in ("path", "dataset", "threads")}
    out["across_paths"] = across
    out["across_seeds"] = spreads(runs, "seed", ("dataset", "path", "threads"))
    out["across_threads"] = spreads(runs, "threads", ("dataset", "seed", "path"))
    out["auto_vs_preset"] = auto_matches(runs)
    out["max_heldout_spread_across_paths"] = max(worst, default=None)
    out["max_validation_spread_across_paths"] = max(worst_val, default=None)
    out |= {"paths_agree": all(s <= TOLERANCE for s in worst), "n_runs": len(runs)}
    return out | {f"n_{s}": sum(r["status"] == s for r in runs) for s in STATUSES}


def engine_label(engine: dict[str, Any] | None) -> str:
    """``compiled + fused kernel + fused Adam``-style summary of a resolved engine."""
    if not engine:
        return "—"
    kernel = " + fused kernel" * bool(engine["fused_kernel"])
    adam = "fused Adam" if engine["fused_adam"] else "Pyro Adam"
    return f"{'compiled' if engine['compiled'] else 'eager'}{kernel} + {adam}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def markdown(res: dict[str, Any]) -> str:
    s, sm, table = res["settings"], res["summary"], results.md_table
    how = (
        f"Every run in its own process; {s['epochs']} epochs, seeds {s['seeds']}, paths "
        f"{', '.join(s['paths'])}, threads {', '.join(s['threads'])}; {sm['n_finished']} of "
        f"{sm['n_runs']} runs finished, {sm['n_rejected']} rejected, {sm['n_failed']} failed."
    )
    title = "Robustness matrix: datasets x seeds x engine paths x threads"
    lines = results.header(res, title, how)
    agree = f"within {100 * TOLERANCE:g} %: {'yes' if sm['paths_agree'] else 'NO'}"
    held, val = (pct(sm[f"max_{k}_spread_across_paths"]) for k in ("heldout", "validation"))
    spread = f"largest spread across paths {held} %; val ELBO {val} %"
    lines += [f"**Paths agree on the held-out ELBO {agree}** ({spread}).", ""]
    planned = res.get("planned_runs") or {"done": 0, "total": 0}
    if planned["done"] < planned["total"]:
        done = f"{planned['done']} of this command's {planned['total']} runs so far"
        lines += [f"**In progress**: {done}; the tables hold what has finished.", ""]
    cell = "{finished}/{total} | {rejected} | {failed}".format
    rows = [f"{p} | {cell(**c)}" for p, c in sm["by_path"].items()]
    columns = "path|finished/total:|rejected:|failed:"
    lines += ["## Runs finished, per path", "", *table(columns, rows)]
    rows = []
    for d in res["datasets"]:
        c = cell(**sm["by_dataset"].get(d["name"], dict.fromkeys((*STATUSES, "total"), 0)))
        if "error" in d:
            rows.append(f"{d['name']} | {d['error']} | | | | {c} |")
            continue
        mine = [r for r in res["runs"] if r["dataset"] == d["name"] and r["path"] == "auto"]
        autos = " / ".join(sorted({engine_label(r.get("engine")) for r in mine} - {"—"})) or "—"
        rows.append(f"{d['name']} | {d['n_cells']} x {d['n_genes']} | {d['n_batches']} "
                    f"({d['smallest_batch']}) | {100 * d['zero_fraction']:.1f} | "
                    f"{d['library_min']:.0f}-{d['library_max']:.0f} | {c} | {autos}")  # fmt: skip
    columns = "dataset|cells x genes|batches (smallest):|zeros %:|library min-max|"
    columns += "finished/total:|rejected:|failed:|auto resolved to"
    lines += results.section("Runs finished, per dataset", columns, rows)
    rows = []
    for r in sm["across_paths"]:
        x = r["heldout_elbo_spread"]
        ok = "—" if x is None else "yes" if x <= TOLERANCE else "**no**"
        val, held = (" / ".join(fmt(v, ".2f") for v in r[k]) for k in ELBOS)
        rows.append(
            f"{r['dataset']} | {r['threads']} | {r['seed']} | {' / '.join(r['path'])}: {val} | "
            f"{pct(r['validation_elbo_spread'])} | {held} | {pct(x)} | {ok}"
        )
    columns = "dataset|threads|seed:|val ELBO per path|spread %:|held-out ELBO per path|"
    columns += f"spread %:|≤ {100 * TOLERANCE:g} %"
    title = "Held-out ELBO across paths (per dataset, threads, seed)"
    lines += results.section(title, columns, rows)
    for over, keys, title in SPREADS:  # over: "seed" or "threads"
        rows = [f"{' | '.join(str(r[k]) for k in keys)} | {', '.join(map(str, r[over]))} | "
                f"{pct(r['validation_elbo_spread'])} | {pct(r['heldout_elbo_spread'])}"
                for r in sm[f"across_{over.removesuffix('s')}s"]
                if len(r[over]) > 1]  # fmt: skip
        if rows or over == "seed":
            columns = f"{'|'.join(keys)}|{over}s|val ELBO spread %:|held-out ELBO spread %:"
            lines += ["", f"## {title}", ""]
            lines += table(columns, rows) if rows else ["Fewer than two seeds finished per path."]
    rows = [f"{r['dataset']} | {r['threads']} | {r['seed']} | {r['resolved']} | "
            f"{r['abs_diff_validation_elbo']:.3g} | {r['abs_diff_heldout_elbo']:.3g}"
            for r in sm["auto_vs_preset"] if "abs_diff_heldout_elbo" in r]  # fmt: skip
    if rows:
        title = "auto beside the preset it resolved to (same seed and threads)"
        columns = "dataset|threads|seed:|resolved to|abs. diff val ELBO:|abs. diff held-out:"
        lines += results.section(title, columns, rows)
    problems = [f"- {r['status']}: {r['dataset']}, seed {r['seed']}, path {r['path']}, threads "
                f"{r['threads']}: " + str(r.get("message")).replace("\n", " ")
                for r in res["runs"] if r["status"] != "finished"]  # fmt: skip
    lines += ["", "## Failures and rejections", "", *(problems or ["None."]), "", "## Notes", ""]
    lines.append(f"- {NOTE}")
    kept = "- {}: kept from an earlier run (--merge): `{command}` at commit {commit}, {date}."
    lines += [kept.format(d["name"], **d["from_run"]) for d in res["datasets"] if "from_run" in d]
    return "\n".join([*lines, ""])


SPREADS = (
    ("seed", ("dataset", "threads", "path"), "Yardstick: spread across seeds of one path"),
    ("threads", ("dataset", "seed", "path"), "Spread across thread settings"),
)
NOTE = (
    "finished: training ended, and the last validation ELBO and the held-out ELBO are finite; "
    "rejected: pyro_scvi.InputError (bad input, with a message naming the fix); failed: "
    "anything else. val ELBO: the last epoch's history['validation_elbo'] (one draw, the path's "
    "own density); held-out ELBO: get_fit_statistics(validation cells, n_samples=K, seed=0) "
    "(eager density, one estimator for every path). spread = (max - min) / |mean| in %: across "
    "paths the criterion, across seeds the yardstick. Details: benchmarks/README.md."
)


def run_one(ds: dict, seed: int, path: str, threads: str, args, tmp: Path) -> dict[str, Any]:
    """One worker process and its outcome."""
    spec = {"h5ad": ds["h5ad"], "seed": seed, "path": path, "threads": threads}
    spec |= {"epochs": args.epochs, "elbo_samples": args.elbo_samples}
    pinned = int(threads) if threads.isdigit() else None
    run = workers.spawn(STUDY, "--worker", spec | {"result": str(tmp / "r.json")}, pinned)
    if "error" in run:  # the worker died or raised outside worker()
        run |= {"status": "failed", "message": run["error"]}
    run = {"dataset": ds["name"], "seed": seed, "path": path, "threads": threads} | run
    return results.finite(run)


def progress(run: dict[str, Any]) -> str:
    head = f"seed {run['seed']} threads {run['threads']} {run['path']}: {run['status']}"
    if run["status"] != "finished":
        return f"{head}: {run.get('message')}"
    return f"{head}, held-out ELBO {run['heldout_elbo']:.2f}, {engine_label(run.get('engine'))}"


def main(argv: list[str] | None = None) -> int:
    if (rc := workers.main(argv, worker=worker, prepare=prepare)) is not None:
        return rc
    args = parse_args(argv)
    start, stem = time.perf_counter(), results.stem(STUDY, args.smoke)
    settings = {k: v for k, v in vars(args).items() if k != "out"} | {"tolerance": TOLERANCE}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv), "settings": settings}
    res |= {"datasets": [], "runs": []}
    if args.merge and (earlier := results.read(args.out / f"{stem}.json")):
        redone = set(args.datasets)
        res["datasets"] = results.keep_not_redone(earlier["datasets"], redone, "name", earlier)
        res["runs"] = results.keep_not_redone(earlier["runs"], redone, "dataset", earlier)
    n_total = len(args.datasets) * len(args.seeds) * len(args.paths) * len(args.threads)
    k = 0
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as tmp:
        spec = {"datasets": args.datasets, "data_dir": args.data_dir and str(args.data_dir)}
        spec |= {"tmp": tmp, "smoke": args.smoke, "result": str(Path(tmp) / "info.json")}
        print(f"Preparing {len(args.datasets)} datasets ...", file=sys.stderr, flush=True)
        info = workers.spawn(STUDY, "--prepare", spec)
        for name in args.datasets:
            ds = {"name": name, **info.get(name, {"error": info.get("error", "--prepare failed")})}
            res["datasets"].append({key: v for key, v in ds.items() if key != "h5ad"})
            for threads, seed, path in itertools.product(args.threads, args.seeds, args.paths):
                k += 1
                if "error" not in ds:
                    res["planned_runs"] = {"done": k - 1, "total": n_total}
                    res["runs"].append(run := run_one(ds, seed, path, threads, args, Path(tmp)))
                    print(f"  [{k}/{n_total}] {progress(run)}", file=sys.stderr, flush=True)
            res["planned_runs"] = {"done": k, "total": n_total}
            res["summary"] = summarize(res["runs"])
            results.write(args.out, stem, res, markdown(res))  # after every dataset
    res["total_seconds"] = time.perf_counter() - start
    res["summary"] = sm = summarize(res["runs"])
    results.publish(args.out, stem, res, markdown(res))
    failed = sm["n_failed"] or any("error" in d for d in res["datasets"])
    return 1 if failed else 0 if sm["paths_agree"] else 2


if __name__ == "__main__":
    sys.exit(main())
