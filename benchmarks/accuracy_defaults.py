"""Accuracy at the user's defaults, like for like: pyro_scvi vs scvi-tools 1.4.2 on every
shared dataset; ``--time-to-quality``: the whole default run of each, timed side by side.

Exit code 0: every criterion met; 2: a criterion not met; 1: a failure (benchmarks/README.md).

    python -m benchmarks.accuracy_defaults            # every dataset x seeds 0 1 2
    python -m benchmarks.accuracy_defaults --time-to-quality --threads default
    python -m benchmarks.accuracy_defaults --smoke    # about 30 s
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, score, workers
from .lib.results import fmt

STUDY = "accuracy_defaults"
OBSERVED, LATENT = "pyro_scvi-observed-library", "scvi-tools-latent-library"
#: pyro_scvi's model against scvi-tools' same model: (pyro_scvi, scvi-tools)
PAIRS = {"latent library": ("pyro_scvi", LATENT), "observed library": (OBSERVED, "scvi-tools")}
IMPLEMENTATIONS = ("pyro_scvi", LATENT, OBSERVED, "scvi-tools")
TIMED = ("pyro-scvi fit", "scvi-tools train()")  #: time to quality: each's whole default run
#: pyro_scvi - scvi-tools must be at least these
TOLERANCES = {"ari": -0.02, "entropy_batch_mixing": -0.05, "heldout_log_px_per_cell": 0.0}
CRITERIA = {"ari": "KMeans ARI ≥ scvi-tools − 0.02",
            "entropy_batch_mixing": "batch entropy ≥ scvi-tools − 0.05",
            "heldout_log_px_per_cell": "held-out log p(x) ≥ scvi-tools"}  # fmt: skip
KEYS = ("ari", "entropy_batch_mixing", "heldout_log_px_per_cell", "epochs_run", "wall_seconds")
TIME_GOAL = 0.5  #: time to quality's goal: pyro_scvi's wall time ÷ scvi-tools' at most this


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    merge = "keep the other datasets/seeds (marked) of --out-dir's file, else of the committed one"
    p, add = results.parser(__doc__, "cellbench, 300 cells, 1 epoch, seed 0", merge=merge)
    add("--epochs", type=int, default=None, help="max_epochs of every run (default: each's own)")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--datasets", nargs="+", help="names (default: every .h5ad in the data folder)")
    add("--threads", default="1", help="'default' (set none) or a count for every run")
    add("--subsample", type=int, default=None, help="random cells per dataset")
    add("--metric-cells", type=int, default=10000)
    add("--ll-cells", type=int, default=10000, help="at most this many held-out cells")
    add("--ll-samples", type=int, default=100)
    add("--time-to-quality", action="store_true", help="whole default runs, timed alternately")
    add("--keep-latents", help="folder for each run's latent, <dataset>_<run>_<seed>.npy")
    args = p.parse_args(argv)
    if args.smoke:
        found = data.available("cellbench_3cl_2tech", args.data_dir)
        args.datasets = args.datasets or ["cellbench_3cl_2tech" if found else "synthetic:300x100"]
        args.subsample, args.epochs, args.seeds, args.ll_samples = 300, 1, [0], 10
    names = args.datasets or data.default_names(args.data_dir)
    args.datasets = [d.removesuffix(".h5ad") for d in names]
    if not args.threads.isdigit() and args.threads != "default":
        p.error("--threads: 'default' or a count")
    if args.time_to_quality and args.threads != "default":
        p.error("--time-to-quality runs at default threads: add --threads default")
    args.thread_count = int(args.threads) if args.threads.isdigit() else None
    return args


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One implementation at its defaults on the seed's training cells, then scored."""
    import anndata
    import numpy as np
    import torch

    if spec["thread_count"] is not None:
        torch.set_num_threads(spec["thread_count"])
    impl, seed, key = spec["implementation"], spec["seed"], spec["batch_key"]
    adata = anndata.read_h5ad(spec["h5ad"])
    split = data.make_split(adata.n_obs, seed)
    # each its own estimator of log p(x); the pair's other model where not the default
    model = {"use_observed_lib_size": impl == OBSERVED} if impl in (OBSERVED, LATENT) else {}
    theirs = impl.startswith("scvi-tools")
    fit = (adapters.ScviTools if theirs else adapters.PyroScvi)(adata, key, seed=seed, model=model)
    fit.fit(spec["epochs"], split)
    out: dict[str, Any] = {}
    if not theirs:
        stop = fit.model.history.attrs.get("stopping") or {}
        out = {"engine": fit.run["engine"], "stop_reason": stop.get("reason")}
        out["split_matches_make_split"] = fit.run["split_matches"]
    keep = ("train_seconds", "epochs_run", "n_train", "use_observed_lib_size", "drop_last")
    out |= {k: fit.run[k] for k in keep if k in fit.run}
    out |= scores(fit, adata, split[1], spec, latent := fit.latent())
    if folder := spec["keep_latents"]:  # to study the scores offline (e.g. KMeans' spread)
        np.save(Path(folder, f"{Path(spec['h5ad']).stem}_{impl}_{seed}.npy"), latent)
    return out | {"threads_after": torch.get_num_threads()}


def scores(fit: Any, adata: Any, held: Any, spec: dict, latent: Any, *given: bool) -> dict:
    """ARI, batch entropy; log p(x) per ``held`` cell by the fit's estimator (``given``)."""
    import numpy as np

    errors, seed, k = {}, spec["seed"], spec["ll_samples"]
    cells = data.some_cells(np.arange(adata.n_obs), spec["metric_cells"], seed)
    out = workers.attempt(errors, "metrics", score.latent_scores, latent, adata, cells, seed)
    use = data.some_cells(held, spec["ll_cells"], seed)
    out = (out or {}) | {"metric_cells": len(cells), "heldout_ll_cells": len(use), "ll_samples": k}
    value = workers.attempt(errors, "marginal_ll", fit.marginal_ll, use, k, seed, *given)
    return out | {"heldout_log_px_per_cell": value} | ({"errors": errors} if errors else {})


def timed_scvi_tools(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker mode ``--timed-scvi-tools``: what a scvi-tools user runs at the defaults (read,
    ``setup_anndata``, ``SCVI(adata).train()``, latent and normalized expression written with
    the model, as ``pyro-scvi fit`` writes them); the clock stops when they are written."""
    import anndata
    import numpy as np
    import torch

    adata = anndata.read_h5ad(spec["h5ad"])
    split = data.make_split(adata.n_obs, spec["seed"])
    fit = adapters.ScviTools(adata, spec["batch_key"], seed=spec["seed"])
    out = fit.fit(spec["epochs"], split).adata.copy()
    out.obsm["X_scvi"] = latent = np.asarray(fit.latent())
    if spec["normalized"]:  # pyro-scvi fit's: 10 samples, at the median library size
        lib = float(np.median(np.asarray(adata.X.sum(1))))
        v = fit.model.get_normalized_expression(n_samples=10, library_size=lib, return_mean=True)
        out.layers["scvi_normalized"] = np.asarray(v, dtype=np.float32)
    fit.model.save(spec["out"] + "_model", overwrite=True, save_anndata=False)
    out.write_h5ad(spec["out"] + ".h5ad")
    run = {"outputs_written_at": time.time(), "epochs_run": fit.run["epochs_run"]}
    run["normalized_written"] = spec["normalized"]
    run |= {"threads": "default", "threads_used": [torch.get_num_threads()]}  # torch's own
    return run | scores(fit, adata, split[1], spec, latent)


def score_fit(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker mode ``--score-fit``: ``pyro-scvi fit``'s outputs scored; log p(x | library)
    (pyro_scvi's model at the observed library), like for like with scvi-tools' default."""
    import anndata
    import numpy as np

    import pyro_scvi

    adata, written = anndata.read_h5ad(spec["h5ad"]), anndata.read_h5ad(spec["out"] + ".h5ad")
    fit = adapters.PyroScvi(adata, spec["batch_key"])
    fit.model = pyro_scvi.SCVI.load(spec["out"] + "_model", adata)
    held, params = np.asarray(fit.model.validation_indices), written.uns["pyro_scvi"]["params"]
    out = {"epochs_run": len(fit.model.history), "stop_reason": params.get("stop_reason")}
    out["threads"] = (params.get("engine") or {}).get("threads")  # "auto": ThreadPolicy's
    out["threads_used"] = sorted({int(n) for n in fit.model.history.get("threads", [])})
    split = data.make_split(adata.n_obs, spec["seed"])
    out["split_matches_make_split"] = bool(np.array_equal(held, split[1]))
    out["normalized_written"] = "pyro_scvi_normalized" in written.layers
    return out | scores(fit, adata, held, spec, np.asarray(written.obsm["X_pyro_scvi"]), True)


def run_dataset(ds: dict, args: argparse.Namespace, skipped: dict, tmp: Path, runs: list) -> dict:
    """Every seed of the four implementations after ``runs`` (kept by --merge); verdict."""
    runs += [{"implementation": i, "seed": None, "error": e} for i, e in skipped.items()]
    impls = [i for i in IMPLEMENTATIONS if "scvi-tools" not in skipped or i[:4] != "scvi"]
    for seed in args.seeds:
        for impl in impls:
            spec = spec_of(ds, args, tmp, implementation=impl, seed=seed)
            run = {"implementation": impl, "seed": seed}
            runs.append(run := run | workers.spawn(STUDY, "--worker", spec, args.thread_count))
            print(f"  seed {seed} {impl:26s}: {describe(run)}", file=sys.stderr, flush=True)
    summary = workers.summarize(runs, IMPLEMENTATIONS, KEYS)
    return {"runs": runs, "summary": summary, "verdict": verdict(summary, runs, ds, skipped)}


def run_timed(ds: dict, args: argparse.Namespace, skipped: dict, tmp: Path, runs: list) -> dict:
    """``--time-to-quality``: per seed, ``pyro-scvi fit`` and scvi-tools' default run, one
    after the other (who goes first alternates), each timed from its process's start until
    its outputs are written, then scored (untimed)."""
    dense = ds["n_cells"] * ds["n_genes"] <= 5e7  # fit's DENSE_NORMALIZED_MAX_ENTRIES
    for seed in args.seeds:
        order = workers.rotate(TIMED, ds["turn"] + seed)
        for impl in (i for i in order if i == TIMED[0] or "scvi-tools" not in skipped):
            out = str(tmp / f"{impl.split()[0]}_{seed}")  # fit never replaces their model
            spec = spec_of(ds, args, tmp, seed=seed, out=out, normalized=dense)
            run = {"implementation": impl, "seed": seed, "first": impl == order[0]}
            load, start = os.getloadavg()[0], time.time()
            if impl == TIMED[0]:
                cmd = [sys.executable, "-m", "pyro_scvi", "fit", ds["h5ad"], "-o", out + ".h5ad"]
                cmd += ["--seed", str(seed), "--quiet"]
                cmd += ["--batch-key", ds["batch_key"]] * bool(ds["batch_key"])
                cmd += ["--max-epochs", str(args.epochs)] * bool(args.epochs)
                rc = subprocess.run(cmd, stdout=sys.stderr, cwd=results.REPO).returncode
                run |= {"wall_seconds": time.time() - start, "fit_exit_code": rc}
                failed = {"error": f"pyro-scvi fit exited with code {rc}"}
                run |= workers.spawn(STUDY, "--score-fit", spec) if rc == 0 else failed
            else:
                run |= workers.spawn(STUDY, "--timed-scvi-tools", spec)
                run["wall_seconds"] = (done := run.get("outputs_written_at")) and done - start
            now = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            runs.append(run | {"loadavg_1min_before": load, "uptime": now})
            print(f"  seed {seed} {impl:18s}: {describe(run)}", file=sys.stderr, flush=True)
    summary = workers.summarize(runs, TIMED, KEYS)
    return {"runs": runs, "summary": summary, "verdict": timed_verdict(runs, ds, skipped)}


def spec_of(ds: dict, args: argparse.Namespace, tmp: Path, **more: Any) -> dict[str, Any]:
    """A worker's spec: the dataset, the run's settings, ``more``."""
    spec = {k: ds[k] for k in ("h5ad", "batch_key")} | {"result": str(tmp / "r.json")}
    keys = ("epochs", "metric_cells", "ll_cells", "ll_samples", "thread_count", "keep_latents")
    return spec | {k: getattr(args, k) for k in keys} | more


def compare(mine: dict, theirs: dict, ds: dict, judged: bool) -> dict[str, Any]:
    """Each criterion on medians over seeds: pyro_scvi - scvi-tools ≥ its tolerance."""
    out: dict[str, Any] = {}
    for key, tol in TOLERANCES.items():
        a, b = mine.get(key), theirs.get(key)
        if key == "entropy_batch_mixing" and ds["n_batches"] < 2:
            out[key] = {"passed": None, "detail": "one batch: not applicable"}
        elif not judged:
            out[key] = {"passed": None, "detail": "scvi-tools skipped: not judged"}
        elif a is None or b is None:
            out[key] = {"passed": False, "detail": "no value (runs failed)"}
        else:
            out[key] = {"passed": a - b >= tol, "difference": a - b, "values": [a, b]}
    passed = [v["passed"] for v in out.values() if v["passed"] is not None]
    return out | {"all_passed": all(passed) if passed else None}


def verdict(summary: dict, runs: list[dict], ds: dict, skipped: dict) -> dict[str, Any]:
    """Every pyro_scvi run finished and scored; each pair's criteria (:data:`PAIRS`)."""
    ours = [r for r in runs if r["implementation"] in ("pyro_scvi", OBSERVED)]
    done = [r for r in ours if "error" not in r and not r.get("errors")]
    detail = f"{len(done)} of {len(ours)} pyro_scvi runs trained and scored"
    out: dict[str, Any] = {"fit_finishes": dict(passed=bool(done) and done == ours, detail=detail)}
    for pair, (a, b) in PAIRS.items():
        out[pair] = compare(summary[a], summary[b], ds, "scvi-tools" not in skipped)
    pairs = [out["fit_finishes"]["passed"], *(out[p]["all_passed"] for p in PAIRS)]
    return out | {"all_passed": False if False in pairs else None if None in pairs else True}


def timed_verdict(runs: list[dict], ds: dict, skipped: dict) -> dict[str, Any]:
    """Wall-time ratio per seed, its median against :data:`TIME_GOAL`; the criteria."""
    seeds: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.get("wall_seconds") and "error" not in r:
            seeds.setdefault(r["seed"], {})[r["implementation"]] = r["wall_seconds"]
    ratios = {s: w[TIMED[0]] / w[TIMED[1]] for s, w in seeds.items() if len(w) == 2}
    median = statistics.median(ratios.values()) if ratios else None
    judged, sm = "scvi-tools" not in skipped, workers.summarize(runs, TIMED, KEYS)
    out: dict[str, Any] = {"ratios": ratios, "median_ratio": median}
    out["time"] = {"passed": bool(median and median <= TIME_GOAL) if judged else None}
    return out | {"criteria": compare(sm[TIMED[0]], sm[TIMED[1]], ds, judged)}


def describe(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"FAILED: {run['error']}"
    values = ", ".join(f"{k} {fmt(run.get(k), f)}" for k, f in SPECS.items())
    seconds = fmt(run.get("wall_seconds") or run.get("train_seconds"), ".0f")
    return f"{seconds} s, {run.get('epochs_run')} epochs, {values} {run.get('errors') or ''}"


def failures(res: dict[str, Any]) -> list[str]:
    """Every failed dataset, run or scoring step, with its error verbatim."""
    out = []
    for d in [*res["datasets"], *res["time_to_quality"]]:
        out += [f"{d['name']}: {d['error']}"] if "error" in d else []
        for r in d.get("runs", []):
            where = f"{d['name']}, {r['implementation']}, seed {r['seed']}"
            if "error" in r and not r["error"].startswith("skipped"):
                out.append(f"{where}: {r['error']}")
            out += [f"{where}, {stage}: {msg}" for stage, msg in (r.get("errors") or {}).items()]
    return out


SPECS = {"ari": ".3f", "entropy_batch_mixing": ".3f", "heldout_log_px_per_cell": ".2f"}
PASS = {True: "**pass**", False: "**FAIL**", None: "n/a"}


def cell(v: dict[str, Any], f: str) -> str:
    """``pass (a / b, Δ)`` for a criterion's verdict."""
    if "values" not in v:
        return "—" if v["passed"] is None else f"FAIL ({v['detail']})"
    (a, b), word = v["values"], "pass" if v["passed"] else "FAIL"
    return f"{word} ({a:{f}} / {b:{f}}, {v['difference']:+{f}})"


def epochs(runs: list[dict], impl: str) -> str:
    """Epochs run per seed, ``*`` where pyro_scvi's rule stopped before max_epochs."""
    mine = [r for r in runs if r["implementation"] == impl and "error" not in r]
    stopped = (str(r.get("stop_reason")).startswith("converged") for r in mine)
    return " ".join(f"{r.get('epochs_run')}" + "*" * s for r, s in zip(mine, stopped, strict=True))


def markdown(res: dict[str, Any]) -> str:
    s, title = res["settings"], "Accuracy at the defaults, like for like: pyro_scvi vs scvi-tools"
    how = f"max_epochs {s['epochs'] or 'each its default'}, seeds {' '.join(map(str, s['seeds']))}"
    how += f", threads {s['threads']}, log p(x) with {s['ll_samples']} importance samples"
    how += f", every run in its own process; {s['subsample']} cells" * bool(s["subsample"])
    parts = {"accuracy": res["datasets"], "time to quality": res["time_to_quality"]}
    held = "; ".join(f"{p}: {held_seeds(ds)}" for p, ds in parts.items() if ds)
    lines = results.header(res, title, f"This run: {how}. Seeds in this file: {held}.")
    lines += [f"- **{n}**: {e}; the criteria are not judged." for n, e in res["skipped"].items()]
    rows, every, own = [], [], results.provenance(res)
    for d in res["datasets"]:
        name = d["name"] + " (earlier run†)" * any("from_run" in x for x in (d, *d["runs"]))
        if "error" in d:
            rows.append(f"{name} | {d['error']}" + " | " * 6)
            continue
        for pair, (a, b) in PAIRS.items():
            v, ok = d["verdict"][pair], f"{d['summary'][a]['n_ok']} / {d['summary'][b]['n_ok']}"
            marks = " | ".join(cell(v[k], f) for k, f in SPECS.items())
            stops = f"{epochs(d['runs'], a)} / {epochs(d['runs'], b)}"
            rows.append(f"{name} | {pair} | {ok} | {marks} | {stops} | {PASS[v['all_passed']]}")
        for r in d["runs"]:
            values = " | ".join(fmt(r.get(k), f) for k, f in SPECS.items())
            stop = str(r.get("stop_reason") or "").split(":")[0]
            made = (r.get("from_run") or d.get("from_run") or own)["commit"][:7]
            every.append(f"{d['name']} | {r['seed']} | {r['implementation']} | "
                         f"{r.get('epochs_run')} | {stop} | {values} | "
                         f"{fmt(r.get('train_seconds'), '.0f')} | {made}")  # fmt: skip
    columns = ["dataset", "pair", "runs ok", *CRITERIA.values(), "epochs (pyro_scvi / theirs)"]
    lines += ["## Criteria per pair (medians over seeds; pyro_scvi / scvi-tools, Δ)", ""]
    lines += [PAIR_NOTE, "", *results.md_table([*columns, "all"], rows)]
    columns = "dataset|seed|run|epochs:|stopped|ARI:|batch entropy:|log p(x):|train s:|made at"
    lines += results.section("Every run", columns, every) + time_section(res)
    failed = [f"- {f}" for f in failures(res)] or ["None: every run finished and scored."]
    lines += ["", "## Failures", "", *failed, "", "## Notes", "", f"- {NOTE}"]
    return "\n".join([*lines, *kept_notes(res), ""])


def held_seeds(part: list[dict]) -> str:  # "a 0 1 2, b 0" (a skipped run's seed None left out)
    seeds = [(d["name"], sorted({r["seed"] for r in d.get("runs", [])} - {None})) for d in part]
    return ", ".join(f"{name} {' '.join(map(str, s))}" for name, s in seeds)


def kept_notes(res: dict[str, Any]) -> list[str]:
    """Each earlier run (a run's ``from_run``, else its row's): what is kept from it."""
    kept: dict[str, set[str]] = {}
    for d in [*res["datasets"], *res["time_to_quality"]]:
        for r in d.get("runs") or [{"seed": None}]:
            if src := r.get("from_run") or d.get("from_run"):
                key = f"`{src['command']}` at commit {src['commit'][:7]}, {src['date']}"
                kept.setdefault(key, set()).add(f"{d['name']} seed {r['seed']}")
    return [f"- {k}: {', '.join(sorted(v))}." for k, v in kept.items()]


def time_section(res: dict[str, Any]) -> list[str]:
    """The time-to-quality tables, when the file has them."""
    rows, medians = [], []
    for d in res["time_to_quality"]:
        if "error" in d:
            medians.append(f"{d['name']} | {d['error']}" + " | " * 4)
            continue
        v, by = d["verdict"], {(r["implementation"], r["seed"]): r for r in d["runs"]}
        for seed in sorted({r["seed"] for r in d["runs"] if r["seed"] is not None}):
            a, b = by.get((TIMED[0], seed), {}), by.get((TIMED[1], seed), {})
            pair = [" / ".join(fmt(x.get(k), f) for x in (a, b)) for k, f in SPECS.items()]
            walls = " | ".join(fmt(x.get("wall_seconds"), ".0f") for x in (a, b))
            ratio = fmt(v["ratios"].get(seed, v["ratios"].get(str(seed))), ".2f")
            stop = f"{a.get('epochs_run')} ({str(a.get('stop_reason')).split(':')[0]})"
            first = "pyro_scvi" if a.get("first") else "scvi-tools"
            load = a.get("uptime", "").rpartition("average: ")[2]
            used = [f"{x['threads']}: {x['threads_used']}" for x in (a, b) if "threads" in x]
            pair.append(" / ".join(used) or "—")  # threads: setting, counts used; — where not kept
            rows.append(f"{d['name']} | {seed} | {first} | {walls} | {ratio} | {stop} | "
                        f"{b.get('epochs_run')} | {' | '.join(pair)} | {load}")  # fmt: skip
        crit = " | ".join(cell(v["criteria"][k], f) for k, f in SPECS.items())
        medians.append(f"{d['name']} | {fmt(v['median_ratio'], '.2f')} | "
                       f"{PASS[v['time']['passed']]} | {crit}")  # fmt: skip
    if not medians:
        return []
    columns = "dataset|seed|first|pyro-scvi fit s:|scvi-tools s:|ratio:|pyro_scvi epochs (stop)|"
    columns += "scvi-tools epochs:|ARI (pyro_scvi / scvi-tools)|batch entropy|log p(x ∣ library)|"
    columns += "threads: setting, counts used (pyro_scvi / theirs)|load after (1, 5, 15 min)"
    summary = ["dataset", "median ratio:", f"ratio ≤ {TIME_GOAL}", *CRITERIA.values()]
    head = results.section("Time to quality: whole default runs, alternating", summary, medians)
    return [*head, "", *results.md_table(columns, rows), "", TIME_NOTE]


PAIR_NOTE = ("latent library: pyro_scvi's default against scvi-tools with use_observed_lib_size="
             "False; observed library: pyro_scvi with it True against scvi-tools' default (log "
             "p(x | library)), each by its own importance sampling. `*`: early stopping ended it;"
             " †: runs kept (notes).")  # fmt: skip
NOTE = "Every run at its defaults (unless --epochs); log p(x) in nats per held-out cell."
TIME_NOTE = ("Wall seconds from each process's start until its outputs (latent, normalized "
             "expression where fit writes it, the model) are written, at default threads, who goes"
             " first alternating; ratio = pyro-scvi fit ÷ scvi-tools. Criteria on the same runs, "
             "log p(x | library) for both.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    modes = {"worker": worker, "timed_scvi_tools": timed_scvi_tools, "score_fit": score_fit}
    if (rc := workers.main(argv, **modes)) is not None:
        return rc
    args = parse_args(argv)
    start, skipped = time.perf_counter(), adapters.skipped(["pyro_scvi", "scvi-tools"])
    if "pyro_scvi" in skipped:
        return print(skipped["pyro_scvi"], file=sys.stderr) or 1
    warm = None
    if args.time_to_quality:  # default threads; the fused kernel compiled once, untimed
        for v in ("OMP", "MKL", "OPENBLAS"):
            os.environ.pop(f"{v}_NUM_THREADS", None)
        warm = workers.spawn(STUDY, "--warm-kernel", {})["exit_code"]
    stem = results.stem(STUDY, args.smoke)
    path = args.out_dir / f"{stem}.json"  # --merge into a new folder: from the committed file
    base = path if path.exists() or not args.merge else results.RESULTS / path.name
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.thread_count)}
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "data_dir")}
    res["settings"] = settings | {"tolerances": TOLERANCES}
    res |= {"skipped": skipped, "datasets": [], "time_to_quality": [], "warm_kernel_rc": warm}
    part, other = ("datasets", "time_to_quality")[:: -1 if args.time_to_quality else 1]
    earlier, redo = results.read(base) or {}, set(args.datasets)
    if args.merge:  # this part's other datasets; a redone dataset's other seeds, each marked
        res[part] = results.keep_not_redone(earlier.get(part, []), redo, "name", earlier)
    made = results.provenance(earlier)  # by the run that made it: its own mark, else its row's
    seeds = {d["name"]: [{"from_run": d.get("from_run", made)} | r for r in d["runs"]]
             for d in earlier.get(part, []) if args.merge and "runs" in d}  # fmt: skip

    def keep_other() -> None:  # the file's other part as on disk now: the modes may run at once
        now = results.read(path if path.exists() else base) or {}
        res[other] = results.keep_not_redone(now.get(other, []), set(), "name", now)

    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as tmp:
        prepared = []
        for name in args.datasets:
            more = {"data_dir": args.data_dir and str(args.data_dir), "subsample": args.subsample}
            info = workers.prepare(STUDY, name, Path(tmp), args.thread_count, **more)
            if "error" in info:
                print(f"{name}: {info['error']}", file=sys.stderr)
            (res[part] if "error" in info else prepared).append({"name": name, **info})
        prepared.sort(key=lambda d: d["n_cells"] * d["n_genes"])  # small first
        for turn, ds in enumerate(prepared):
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            runs = [r for r in seeds.get(ds["name"], []) if r["seed"] not in (*args.seeds, None)]
            run = run_timed if args.time_to_quality else run_dataset
            ds["turn"] = turn  # who goes first alternates (--time-to-quality)
            entry = ds | run(ds, args, skipped, Path(tmp), runs)
            Path(entry.pop("h5ad")).unlink(missing_ok=True)
            res[part].append(entry)
            res["elapsed_seconds"] = time.perf_counter() - start
            keep_other()
            results.write(args.out_dir, stem, res, markdown(res))
    res["total_seconds"] = time.perf_counter() - start
    keep_other()
    results.publish(args.out_dir, stem, res, markdown(res))
    if failures(res):
        return 1
    passed = [d["verdict"]["all_passed"] for d in res["datasets"] if "verdict" in d]
    for v in (d["verdict"] for d in res["time_to_quality"] if "verdict" in d):
        passed += [v["time"]["passed"], v["criteria"]["all_passed"]]
    return 2 if False in passed else 0


if __name__ == "__main__":
    sys.exit(main())
