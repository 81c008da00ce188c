"""Speed at the user's defaults: pyro_scvi vs scvi-tools 1.4.2 vs the torch floor.

Each implementation's adapter with ``matched=False``. Details: ``benchmarks/README.md``.

    python -m benchmarks.speed_defaults            # about 30 minutes on 2 cores
    python -m benchmarks.speed_defaults --smoke    # about 20 s
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, workers
from .lib.results import fmt

STUDY = "speed_defaults"
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools", "torch-floor")
DATASETS = (
    "synthetic:10000x2000=3,20 pbmc8k_200hvg=20 zeisel_cortex_subset_1464x1000=20 "
    "cellbench_3cl_2tech=20"
).split()
#: The floor's goal (per step). The 3- and 20-epoch speed-up goals are retired (issue 29):
#: the speed goal is time to quality, ``accuracy_defaults --time-to-quality``.
FLOOR_GOAL = 1.1
KEYS = ("train_seconds", "script_seconds", "seconds_per_epoch", "first_epoch_seconds")
KEYS += ("median_epoch_seconds",)
#: Columns of ratios: pyro_scvi ÷ floor, then the steady state's speed-up and ÷ floor.
RATIOS = ("time_ratio_pyro_over_torch_floor", "steady_speedup_pyro_vs_scvi_tools")
RATIOS += ("steady_time_ratio_pyro_over_torch_floor",)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p, add = results.parser(__doc__, "synthetic:300x100, 1 epoch, 1 repeat")
    add("--datasets", nargs="+", default=list(DATASETS), help="NAME[=EPOCHS[,EPOCHS...]]")
    add("--epochs", type=int, nargs="+", default=None, help="epochs for every dataset")
    add("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    add("--repeats", type=int, default=3)
    add("--threads", nargs="+", default=["default", "1"], help="'default' and/or counts")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.repeats, args.threads = ["synthetic:300x100=1"], 1, ["default"]
    try:
        args.specs = []
        for token in args.datasets:
            name, _, given = token.partition("=")
            epochs = args.epochs or [int(e) for e in given.split(",") if e] or [20]
            args.specs.append(data.parse(name) | {"epoch_counts": epochs})
        args.thread_settings = [None if t == "default" else int(t) for t in args.threads]
    except ValueError as err:
        p.error(f"{err}: datasets NAME[=EPOCHS,...], threads 'default' or a count")
    args.implementations = [i for i in IMPLEMENTATIONS if i in args.implementations]
    return args


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run at the defaults; ``script_seconds``: from before the imports."""
    start = time.perf_counter()
    import anndata
    import torch

    impl, threads = spec["implementation"], spec["threads"]
    if threads is not None:  # pinned here; the library's own call stays its default one
        torch.set_num_threads(threads)
    adata = anndata.read_h5ad(spec["h5ad"])
    before = torch.get_num_threads()
    if impl == "torch-floor":  # pyro_scvi's default model, split and seed; its kernel choice
        fit = adapters.TorchFloor(adata, spec["batch_key"], seed=0, fused=spec["fused"])
        fit.fit(spec["epochs"], data.make_split(adata.n_obs, 0))
    else:
        fit = adapters.ADAPTERS[impl](adata, spec["batch_key"], quiet=False).fit(spec["epochs"])
    run = fit.run
    keep = ("train_seconds", "epochs_run", "epoch_seconds", "engine", "fused_kernel_used")
    out = {k: run[k] for k in keep if k in run} | {"script_seconds": run["train_done_at"] - start}
    out |= {"threads_before": before, "threads_after": torch.get_num_threads()}
    out["threads_per_epoch"] = run.get("threads_per_epoch")
    out["seconds_per_epoch"] = run["train_seconds"] / run["epochs_run"]
    return out | workers.steady_state(run["epoch_seconds"])


def time_row(ds: dict, epochs: int, threads: int | None, args, skipped, tmp: Path) -> dict:
    """Every repeat of every implementation on one dataset, epochs and thread setting."""
    runs = [{"implementation": i, "repeat": None, "error": e} for i, e in skipped.items()]
    label = "default" if threads is None else threads
    for repeat in range(args.repeats):
        fused = None  # the kernel pyro_scvi's engine chose in this repeat, for the floor
        for impl in (i for i in args.implementations if i not in skipped):
            spec = {"implementation": impl, "threads": threads, "epochs": epochs, "fused": fused}
            spec |= {k: ds[k] for k in ("h5ad", "batch_key")} | {"result": str(tmp / "r.json")}
            run = {"implementation": impl, "repeat": repeat, "seed": 0}
            run |= workers.spawn(STUDY, "--worker", spec, threads)
            runs.append(run)
            if impl == "pyro_scvi" and isinstance(run.get("engine"), dict):
                fused = run["engine"].get("fused_kernel")
            done = "error" not in run and f"train() {run['train_seconds']:.2f} s"
            done = done or "FAILED: " + run["error"]
            where = f"{epochs} epochs, threads {label}, {impl:11s} repeat {repeat}"
            print(f"  {where}: {done}", file=sys.stderr, flush=True)
    row = {"dataset": ds["name"], "epochs": epochs, "threads": label}
    row |= {k: ds[k] for k in ("n_cells", "n_genes", "n_batches", "batch_key")}
    row |= {"runs": runs}
    return row | {"summary": workers.summarize(runs, args.implementations, KEYS)}


def markdown(res: dict[str, Any]) -> str:
    s, impls = res["settings"], res["settings"]["implementations"]
    how = f"Every run in its own process, alternating, medians of {s['repeats']} repeat(s)."
    title = "Speed at the user's defaults: pyro_scvi vs scvi-tools vs the torch floor"
    lines = results.header(res, title, how)
    lines += [f"- **{name}**: {reason}." for name, reason in res["skipped"].items()]
    lines += [f"- **{d['name']}**: {d['error']}." for d in res["datasets"] if "error" in d]
    for label in s["threads"]:
        title = "Default threads (none set)" if label == "default" else f"{label} thread(s)"
        rows = []
        for r in (r for r in res["rows"] if str(r["threads"]) == label):
            sm = r["summary"]
            speedup = sm["speedup_pyro_vs_scvi_tools"]
            mine, theirs = (sm.get(i, {}).get("script_seconds") for i in IMPLEMENTATIONS[:2])
            script_speedup = mine and theirs and theirs / mine
            ok = [x for x in r["runs"] if "error" not in x]
            by = {i: [x for x in ok if x["implementation"] == i] for i in impls}
            floor, *steady = (fmt(sm[k], ".2f") for k in RATIOS)
            rows.append(
                [r["dataset"], f"{r['n_cells']} x {r['n_genes']}", r["epochs"]]
                + [each(sm, impls, "train_seconds", ".2f"), fmt(speedup, ".2f")]
                + [floor]
                + [each(sm, impls, "median_epoch_seconds", ".3f"), *steady]
                + [f"{fmt(mine, '.2f')} / {fmt(theirs, '.2f')}", fmt(script_speedup, ".2f")]
                + [" / ".join(distinct([threads_text(x) for x in by[i]]) for i in impls)]
                + [distinct([engine_text(x.get("engine")) for x in by.get("pyro_scvi", [])])]
            )
        columns = (
            f"dataset|cells x genes|epochs:|train() s ({' / '.join(impls)})|speed-up vs "
            "scvi-tools (x):|pyro_scvi ÷ floor:|median epoch s (same)|steady speed-up:|"
            "steady ÷ floor:|script s (pyro_scvi / scvi-tools)|script speed-up:|threads used "
            "(same)|pyro_scvi engine"
        )
        lines += ["", f"## {title}", "", *results.md_table(columns, rows)]
    lines += ["", NOTE, ""]
    return "\n".join(lines)


NOTE = (
    "train() s: median wall seconds of the train() call (floor: its loop and batch-norm "
    "refresh); speed-up = scvi-tools' over pyro_scvi's; ÷ floor = pyro_scvi's over the "
    f"floor's (goal at most {FLOOR_GOAL}); median epoch s: the epochs after the first; script "
    "s: a user's whole script in a new process (imports, reading, set-up, training). The "
    "defaults differ: scvi-tools observes the library size and computes no validation ELBO. "
    "threads used: torch threads before -> after training (pyro_scvi: per epoch). The "
    "columns in full: benchmarks/README.md."
)


def each(summary: dict, impls: list[str], key: str, spec: str) -> str:
    def one(impl: str) -> str:
        m = summary.get(impl, {})
        return "skipped" if "skipped" in m.get("error", "") else fmt(m.get(key), spec)

    return " / ".join(one(i) for i in impls)


def distinct(values: list[Any]) -> str:
    return " | ".join(str(v) for v in dict.fromkeys(values)) or "—"


def threads_text(run: dict[str, Any]) -> str:
    if per_epoch := run.get("threads_per_epoch"):
        lo, hi = min(per_epoch), max(per_epoch)
        return str(lo) if lo == hi else f"{lo}-{hi}"
    return f"{run.get('threads_before')}->{run.get('threads_after')}"


def engine_text(engine: Any) -> str:
    if not isinstance(engine, dict):
        return "—" if engine is None else str(engine)
    return ", ".join(f"{k}={v}" for k, v in engine.items() if not isinstance(v, (dict, list)))


def main(argv: list[str] | None = None) -> int:
    if (rc := workers.main(argv, worker=worker)) is not None:
        return rc
    args = parse_args(argv)
    start, skipped = time.perf_counter(), adapters.skipped(args.implementations)
    settings = {k: v for k, v in vars(args).items() if k not in ("specs", "thread_settings")}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.threads)}
    settings |= {"floor_goal": FLOOR_GOAL, "synthetic": data.SYNTHETIC}
    res |= {"settings": settings, "skipped": skipped, "datasets": [], "rows": []}
    warm = {"pyro_scvi", "torch-floor"} & (set(args.implementations) - set(skipped))
    stem = results.stem(STUDY, args.smoke)
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as tmp:
        for ds in args.specs:
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            folder = args.data_dir and str(args.data_dir)
            info = workers.prepare(STUDY, ds["spec"], Path(tmp), data_dir=folder)
            res["datasets"].append({"name": ds["name"], **info})
            if "error" in info:
                continue
            if warm and info["n_genes"] >= 500:  # pyro_scvi's fused kernel: compile it once
                t, warm = time.perf_counter(), set()
                rc = workers.spawn(STUDY, "--warm-kernel", {})["exit_code"]
                res["warm_kernel_exit_code"] = rc
                res["warm_kernel_cache_seconds"] = time.perf_counter() - t
            for threads in args.thread_settings:
                for epochs in ds["epoch_counts"]:
                    row = time_row(ds | info, epochs, threads, args, skipped, Path(tmp))
                    res["rows"].append(row)
            Path(res["datasets"][-1].pop("h5ad")).unlink(missing_ok=True)
            results.write(args.out_dir, stem, res)
    res["total_seconds"] = time.perf_counter() - start
    results.publish(args.out_dir, stem, res, markdown(res))
    ran = [i for i in args.implementations if i not in skipped]
    failed = any(r["summary"][i]["n_failed"] for r in res["rows"] for i in ran)

    return 1 if failed or any("error" in d for d in res["datasets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
