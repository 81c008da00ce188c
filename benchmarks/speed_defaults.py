"""Speed at the user's default settings: pyro_scvi vs scvi-tools 1.4.2 vs the torch floor.

``compare_scvi_tools.py`` matches every setting between the implementations. This script
instead times what a user gets who sets nothing but the data and the epochs:

* **pyro_scvi**: ``pyro_scvi.SCVI(adata[, batch_key="batch"]).train(max_epochs=E)``;
  everything else at its default (device, seed 0, progress bar, the engine's choice of
  compiled ELBO, fused ZINB kernel, fused Adam and CPU threads).
* **scvi-tools**: ``scvi.model.SCVI.setup_anndata(adata[, batch_key="batch"])``,
  ``scvi.model.SCVI(adata).train(max_epochs=E)``: its defaults, which differ from
  pyro_scvi's: the *observed* library size (no library encoder) and no validation ELBO
  during training, while pyro_scvi fits a latent library and computes the validation ELBO
  after every epoch. The only additions are a Lightning callback that records the epochs'
  wall times and its logging set to warnings (progress bar left on).
* **torch-floor** (``torch_floor.py``): pyro_scvi's default model (its own networks, latent
  library, validation every epoch, the same fused-kernel rule) trained by a hand-written
  PyTorch loop with no Pyro: ``pyro_scvi time / floor time`` is what Pyro and pyro_scvi's
  loop cost at the defaults (goal: at most 1.1).

``batch_key="batch"`` is passed on data with more than one ``obs["batch"]``. With
``--threads default`` the benchmark sets no thread count anywhere (each library decides;
the floor keeps torch's); ``--threads 1`` pins every worker to one thread
(``torch.set_num_threads(1)`` and ``OMP/MKL/OPENBLAS_NUM_THREADS=1``). The default runs
both, one table each.

Measured per run (each in its own subprocess, by ``compare_scvi_tools.py``'s worker
machinery): the wall time of the whole ``train()`` call (what a user waits for; the
floor: its training loop and batch-norm refresh), the epochs' own wall times (first epoch
and the median of the others), the thread count before and after training (pyro_scvi: per
epoch, ``history["threads"]``), and the engine pyro_scvi chose (``model.engine``). Runs
alternate pyro_scvi, scvi-tools, torch-floor, pyro_scvi, ... (``--repeats``, default 3, all
with seed 0, so repeats differ only by timing noise); tables report medians and the
speed-up = scvi-tools time / pyro_scvi time.

Default datasets: simulated ZINB data of 10,000 cells x 2,000 genes (``pyro_scvi.datasets.
synthetic_zinb``, as in ``compare_scvi_tools.py``) at 3 and at 20 epochs, the goals being a
speed-up of at least 1.5 and 2; and the three shared datasets in ``../shared/data`` at 20
epochs. Before the first dataset with at least 500 genes one subprocess compiles
pyro_scvi's fused ZINB kernel once, so that the timed runs find torch's on-disk compile
cache as every run after a user's first does.

::

    python benchmarks/speed_defaults.py            # full run
    python benchmarks/speed_defaults.py --smoke    # seconds

Results: ``benchmarks/results/speed_defaults.{json,md}`` (``--smoke``:
``speed_defaults_smoke.{json,md}``), rewritten after every dataset, atomically.
Implementations that cannot be imported (scvi-tools outside the benchmark environment) are
skipped and marked so in the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import compare_scvi_tools as cst  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
IMPLEMENTATIONS = cst.IMPLEMENTATIONS
#: The module each implementation needs (checked without importing it).
MODULES = {"pyro_scvi": "pyro_scvi", "scvi-tools": "scvi", "torch-floor": "torch_floor"}
DEFAULT_DATASETS = (
    "synthetic:10000x2000=3,20",
    "pbmc8k_200hvg=20",
    "zeisel_cortex_subset_1464x1000=20",
    "cellbench_3cl_2tech=20",
)
DEFAULT_EPOCHS = 20
DEFAULT_THREADS = ("default", "1")
SEED = 0  # pyro_scvi's default seed; the floor and its split use it too
#: Speed-up goals (scvi-tools time / pyro_scvi time) by (dataset, epochs).
SPEEDUP_GOALS = {("synthetic_10000x2000", 3): 1.5, ("synthetic_10000x2000", 20): 2.0}
FLOOR_GOAL = 1.1  # pyro_scvi time / floor time, at most
#: pyro_scvi.train.engine.FUSED_MIN_GENES (copied: this parent process imports no numerical
#: library); below it the engine never chooses the fused kernel, so no warm-up is needed.
FUSED_MIN_GENES = 500
SMOKE = {"datasets": ["synthetic:300x100=1"], "repeats": 1, "threads": ["default"]}
SUMMARY_KEYS = (
    "train_seconds",
    "script_seconds",
    "seconds_per_epoch",
    "first_epoch_seconds",
    "median_epoch_seconds",
)


# ---------------------------------------------------------------------------- options
def parse_entry(token: str, epochs: list[int] | None) -> dict[str, Any]:
    """``NAME[=E1,E2,...]`` -> a dataset of ``compare_scvi_tools.parse_dataset`` and its
    epoch counts (``--epochs`` overrides them; without either: :data:`DEFAULT_EPOCHS`)."""
    spec, _, given = token.partition("=")
    if not spec.startswith("synthetic:") and not spec.endswith(".h5ad"):
        spec += ".h5ad"
    ds = cst.parse_dataset(spec)
    try:
        counts = epochs or ([int(e) for e in given.split(",")] if given else [DEFAULT_EPOCHS])
    except ValueError:
        raise ValueError(
            f"{token!r}: write NAME=EPOCHS[,EPOCHS...], e.g. pbmc8k_200hvg=20"
        ) from None
    if any(e < 1 for e in counts):
        raise ValueError(f"{token!r}: epochs must be positive")
    return {**ds, "epoch_counts": counts}


def parse_threads(token: str) -> int | None:
    """``"default"`` -> ``None`` (nothing set), else a positive thread count."""
    if token == "default":
        return None
    if not token.isdigit() or int(token) < 1:
        raise ValueError(f"--threads {token!r}: 'default' or a positive integer")
    return int(token)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Time pyro_scvi, scvi-tools and the torch floor at the user's default "
        "settings, side by side, each run in its own process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=cst.DEFAULT_DATA_DIR, help="Folder of .h5ad")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="NAME[=EPOCHS[,EPOCHS...]]: a file in --data-dir (.h5ad optional) or "
        f"synthetic:<cells>x<genes>; default {' '.join(DEFAULT_DATASETS)}",
    )
    p.add_argument("--epochs", type=int, nargs="+", default=None, help="Epochs for every dataset")
    p.add_argument(
        "--implementations",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS,
        help="which implementations to run",
    )
    p.add_argument("--repeats", type=int, default=None, help="Runs per implementation (3)")
    p.add_argument(
        "--threads",
        nargs="+",
        default=None,
        help="thread settings, one table each: 'default' (set nothing) and/or a count for "
        f"every worker; default {' '.join(DEFAULT_THREADS)}",
    )
    p.add_argument("--out-dir", type=Path, default=cst.DEFAULT_OUT_DIR, help="Results folder")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="Quick check: synthetic:300x100, 1 epoch, 1 repeat, default threads; results "
        "under a _smoke name",
    )
    args = p.parse_args(argv)
    smoke = SMOKE if args.smoke else {}
    args.datasets = args.datasets or smoke.get("datasets") or list(DEFAULT_DATASETS)
    args.repeats = args.repeats or smoke.get("repeats") or 3
    args.threads = args.threads or smoke.get("threads") or list(DEFAULT_THREADS)
    try:
        args.dataset_specs = [parse_entry(d, args.epochs) for d in args.datasets]
        args.thread_settings = [parse_threads(t) for t in args.threads]
    except ValueError as err:
        p.error(str(err))
    if args.repeats < 1:
        p.error("--repeats must be positive")
    args.implementations = [i for i in IMPLEMENTATIONS if i in args.implementations]
    return args


# ---------------------------------------------------------------------------- worker
def run_speed_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One timed run at the defaults in this process (``--worker``)."""
    start = time.perf_counter()  # before torch, anndata and the implementation are imported
    import anndata
    import torch

    threads = spec["threads"]
    if threads is not None:
        torch.set_num_threads(threads)
    if spec["implementation"] == "scvi-tools":
        cst.quiet_libraries()
    adata = anndata.read_h5ad(spec["h5ad"])
    threads_before = torch.get_num_threads()
    out = RUNNERS[spec["implementation"]](adata, spec)
    done = out.pop("train_done_at", None)
    return {
        **out,
        "script_seconds": None if done is None else done - start,
        "threads_before": threads_before,
        "threads_after": torch.get_num_threads(),
        "seconds_per_epoch": out["train_seconds"] / out["epochs_run"],
        **cst.steady_state(out["epoch_seconds"]),
    }


def run_pyro_scvi(adata: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """``pyro_scvi.SCVI(adata, batch_key=...).train(max_epochs=epochs)``, timed."""
    import pyro_scvi

    model = pyro_scvi.SCVI(adata, batch_key=spec["batch_key"])
    start = time.perf_counter()
    model.train(max_epochs=spec["epochs"])
    done = time.perf_counter()
    history = model.history
    return {
        "train_seconds": done - start,
        "train_done_at": done,
        "epochs_run": len(history),
        "epoch_seconds": [float(v) for v in history["seconds"]],
        "engine": model.engine,
        "fused_kernel_used": model.engine["fused_kernel"],
        "threads_per_epoch": [int(v) for v in history["threads"]],
    }


def run_scvi_tools(adata: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """``scvi.model.SCVI.setup_anndata``; ``SCVI(adata).train(max_epochs=epochs)``, timed."""
    import scvi

    scvi.model.SCVI.setup_anndata(adata, batch_key=spec["batch_key"])
    model = scvi.model.SCVI(adata)
    timer = cst._epoch_timer()
    start = time.perf_counter()
    model.train(max_epochs=spec["epochs"], callbacks=[timer])
    done = time.perf_counter()
    return {
        "train_seconds": done - start,
        "train_done_at": done,
        "epochs_run": int(model.history["elbo_train"].shape[0]),
        "epoch_seconds": timer.epoch_seconds,
        "use_observed_lib_size": bool(getattr(model.module, "use_observed_lib_size", True)),
    }


def run_floor(adata: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """The floor with pyro_scvi's default model, split and seed; torch's threads unless set;
    the ZINB kernel pyro_scvi's engine chose in the same repeat (``spec["fused"]``), if known.
    """
    import torch

    split = cst.make_split(adata.n_obs, cst.TRAINING["train_size"], SEED)
    threads = spec["threads"] if spec["threads"] is not None else torch.get_num_threads()
    out = cst.run_floor(
        adata, spec["batch_key"], spec["epochs"], SEED, split, threads, spec.get("fused")
    )
    return {k: out[k] for k in ("train_seconds", "epochs_run", "epoch_seconds")} | {
        "fused_kernel_used": out.get("fused_kernel_used")
    }


RUNNERS = {"pyro_scvi": run_pyro_scvi, "scvi-tools": run_scvi_tools, "torch-floor": run_floor}


def script_speedup(summary: dict[str, Any]) -> float | None:
    """scvi-tools' median script seconds / pyro_scvi's (None if either is missing)."""
    mine = summary.get("pyro_scvi", {}).get("script_seconds")
    theirs = summary.get("scvi-tools", {}).get("script_seconds")
    return theirs / mine if mine and theirs else None


def script_text(summary: dict[str, Any]) -> str:
    """``pyro_scvi / scvi-tools`` median script seconds."""
    return " / ".join(
        cst._fmt(summary.get(i, {}).get("script_seconds"), ".2f")
        for i in ("pyro_scvi", "scvi-tools")
    )


# ---------------------------------------------------------------------------- parent
def unavailable(implementations: list[str]) -> dict[str, str]:
    """Implementations whose module cannot be found, with the reason."""
    return {
        impl: f"skipped: not importable (no module {MODULES[impl]!r} in this environment)"
        for impl in implementations
        if importlib.util.find_spec(MODULES[impl]) is None
    }


def time_row(
    ds: dict[str, Any],
    epochs: int,
    threads: int | None,
    args: argparse.Namespace,
    skipped: dict[str, str],
    tmp: Path,
) -> dict[str, Any]:
    """Every repeat of every implementation on one dataset, epochs and thread setting."""
    runs: list[dict[str, Any]] = [
        {"implementation": impl, "repeat": None, "error": skipped[impl]}
        for impl in args.implementations
        if impl in skipped
    ]
    label = "default" if threads is None else threads
    for repeat in range(args.repeats):
        fused = None  # the kernel pyro_scvi's engine chose in this repeat, for the floor
        for impl in args.implementations:
            if impl in skipped:
                continue
            spec = {
                "implementation": impl,
                "h5ad": ds["h5ad"],
                "batch_key": ds["batch_key"],
                "epochs": epochs,
                "threads": threads,
                "fused": fused,
                "result": str(tmp / f"result_{ds['name']}_{impl}.json"),
            }
            run = {"implementation": impl, "repeat": repeat, "seed": SEED}
            run |= cst.spawn_worker(spec, threads, SCRIPT)
            runs.append(run)
            if impl == "pyro_scvi" and isinstance(run.get("engine"), dict):
                fused = run["engine"].get("fused_kernel")
            print(
                f"  {epochs} epochs, threads {label}, {impl:11s} repeat {repeat}: "
                + (
                    f"FAILED: {run['error']}"
                    if "error" in run
                    else f"train() {run['train_seconds']:.2f} s, "
                    f"median epoch {cst._fmt(run['median_epoch_seconds'], '.3f')} s"
                ),
                file=sys.stderr,
                flush=True,
            )
    return {
        "dataset": ds["name"],
        "epochs": epochs,
        "threads": label,
        **{k: ds[k] for k in ("n_cells", "n_genes", "n_batches", "batch_key")},
        "speedup_goal": SPEEDUP_GOALS.get((ds["name"], epochs)),
        "runs": runs,
        "summary": cst.summarize(runs, args.implementations, SUMMARY_KEYS),
    }


def run_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Prepare each dataset once, time every row, write the tables."""
    start = time.perf_counter()
    skipped = unavailable(args.implementations)
    results: dict[str, Any] = {
        **_common.run_metadata(argv, args.threads, script="speed_defaults.py"),
        "settings": {
            "datasets": args.datasets,
            "implementations": args.implementations,
            "repeats": args.repeats,
            "threads": args.threads,
            "seed": SEED,
            "smoke": args.smoke,
            "run_order": "per dataset, epochs and thread setting: the implementations in "
            "turn, repeat after repeat",
            "speedup_goals": {f"{d} {e} epochs": g for (d, e), g in SPEEDUP_GOALS.items()},
            "floor_goal": FLOOR_GOAL,
            "synthetic": cst.SYNTHETIC,
        },
        "skipped": skipped,
        "notes": NOTES,
        "datasets": [],
        "rows": [],
    }
    stem = "speed_defaults" + ("_smoke" if args.smoke else "")
    prep = argparse.Namespace(data_dir=args.data_dir, subsample=None, seed=SEED, threads=None)
    warm = {"pyro_scvi", "torch-floor"} & (set(args.implementations) - set(skipped))
    failed = False
    with tempfile.TemporaryDirectory(prefix="speed_defaults_") as tmp:
        for ds in args.dataset_specs:
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            info = cst.prepare_dataset(ds, prep, Path(tmp))
            if isinstance(info, str):
                print(f"  {info}", file=sys.stderr)
                results["datasets"].append({"name": ds["name"], "error": info})
                failed = True
                continue
            results["datasets"].append({"name": ds["name"], **info})
            if warm and info["n_genes"] >= FUSED_MIN_GENES:
                t = time.perf_counter()
                rc = cst._subprocess("--warm-kernel", {}, None)
                results["warm_kernel_cache_seconds"] = time.perf_counter() - t
                results["warm_kernel_cache_exit_code"] = rc
                warm = set()
            entry = {**ds, **info}
            for threads in args.thread_settings:
                for epochs in ds["epoch_counts"]:
                    results["rows"].append(
                        time_row(entry, epochs, threads, args, skipped, Path(tmp))
                    )
            Path(info["h5ad"]).unlink(missing_ok=True)
            results["datasets"][-1].pop("h5ad")
            _common.write_atomic(args.out_dir / f"{stem}.json", json.dumps(results, indent=2))
    results["total_seconds"] = time.perf_counter() - start
    table = markdown_table(results)
    print(table)
    _common.write_results(args.out_dir, stem, results, table)
    failed |= any(
        r["summary"].get(i, {}).get("n_failed")
        for r in results["rows"]
        for i in args.implementations
        if i not in skipped
    )
    return 1 if failed else 0


# ---------------------------------------------------------------------------- output
NOTES = [
    "train() s: median wall seconds of the whole train() call (floor: its training loop "
    "and batch-norm refresh), what a user waits for; lower is better. median epoch s: the "
    "median over epochs after the first (the first carries compilation and set-up) of the "
    "epochs' own wall times (pyro_scvi: history['seconds']; scvi-tools: a Lightning "
    "callback, epoch start to next epoch start), median over repeats.",
    "speed-up = scvi-tools train() s / pyro_scvi train() s (above 1: pyro_scvi is faster); "
    "steady speed-up: the same for median epoch s. ÷ floor = pyro_scvi time / floor time "
    f"(goal at most {FLOOR_GOAL}).",
    "Defaults differ: scvi-tools uses the observed library size and computes no validation "
    "ELBO during training; pyro_scvi (and the floor, which trains pyro_scvi's default "
    "model) fit a latent library and compute the validation ELBO after every epoch.",
    "threads: 'default' sets no thread count (pyro_scvi's engine follows the free cores, "
    "scvi-tools and the floor keep torch's count); threads used = torch.get_num_threads() "
    "before training -> after training (pyro_scvi: per epoch, from history['threads']). "
    "A number pins every worker (torch.set_num_threads and "
    "OMP/MKL/OPENBLAS_NUM_THREADS).",
    "pyro_scvi engine: model.engine (pyro_scvi.train.engine.RunEngine.as_dict()) as the run "
    "chose it; the reasons for each choice are in the JSON, rows[].runs[].engine.",
    "script s: median wall seconds of a user's whole script in a new process, from before "
    "torch, anndata and the library are imported to the end of train(): the imports, "
    "reading the .h5ad, setting up the model and training (Python's own start-up, the same "
    "for both, excluded). Libraries pay some costs at import (scvi-tools imports Lightning, "
    "which loads torch._dynamo) and others inside train() (pyro_scvi's first torch.optim "
    "optimizer loads torch._dynamo, about 1-2 s here); script speed-up = scvi-tools script "
    "s / pyro_scvi script s. The goals are judged on train() s.",
]


def _distinct(values: list[Any]) -> str:
    seen = [v for i, v in enumerate(values) if v not in values[:i]]
    return " | ".join(str(v) for v in seen) if seen else "—"


def _engine_text(engine: Any) -> str:
    if isinstance(engine, dict):
        return ", ".join(f"{k}={v}" for k, v in engine.items() if not isinstance(v, (dict, list)))
    return "—" if engine is None else str(engine)


def _threads_text(run: dict[str, Any]) -> str:
    per_epoch = run.get("threads_per_epoch")
    if per_epoch:
        lo, hi = min(per_epoch), max(per_epoch)
        return str(lo) if lo == hi else f"{lo}-{hi}"
    return f"{run.get('threads_before')}->{run.get('threads_after')}"


def markdown_table(results: dict[str, Any]) -> str:
    """One speed table per thread setting, with a header, the skipped and the notes."""
    s = results["settings"]
    impls = s["implementations"]
    fmt = cst._fmt
    lines = cst.table_header(
        results,
        "Speed at the user's defaults: pyro_scvi vs scvi-tools vs the torch floor",
        "Every run in its own process, implementations alternating, medians of "
        f"{s['repeats']} repeat(s)",
    )
    for name, reason in results["skipped"].items():
        lines.append(f"- **{name}**: {reason}.")
    for d in results["datasets"]:
        if "error" in d:
            lines.append(f"- **{d['name']}**: {d['error']}.")
    for threads in s["threads"]:
        rows = [r for r in results["rows"] if str(r["threads"]) == threads]
        title = "default threads (none set)" if threads == "default" else f"{threads} thread(s)"
        lines += [
            "",
            f"## {title[0].upper() + title[1:]}",
            "",
            "| dataset | cells x genes | epochs | train() s (" + " / ".join(impls) + ") "
            "| speed-up vs scvi-tools (x) | goal | pyro_scvi ÷ floor | median epoch s (same) "
            "| steady speed-up | steady ÷ floor | script s (pyro_scvi / scvi-tools) "
            "| script speed-up | threads used (same) | pyro_scvi engine |",
            "|---|---|---:|---|---:|---|---:|---|---:|---:|---|---:|---|---|",
        ]
        for r in rows:
            sm = r["summary"]
            shape = f"{r['n_cells']} x {r['n_genes']}" + (
                f" ({r['n_batches']} batches)" if r["n_batches"] > 1 else ""
            )

            def each(key: str, spec: str, sm=sm) -> str:
                return " / ".join(
                    "skipped" if "skipped" in sm[i].get("error", "") else fmt(sm[i][key], spec)
                    for i in impls
                )

            speedup, floor = (
                sm["speedup_pyro_vs_scvi_tools"],
                sm["time_ratio_pyro_over_torch_floor"],
            )
            goal = r["speedup_goal"]
            goal_text = (
                ""
                if goal is None
                else f"≥ {goal}"
                + ("" if speedup is None else (": met" if speedup >= goal else ": not met"))
            )
            by_impl = {i: [x for x in r["runs"] if x["implementation"] == i] for i in impls}
            threads_used = " / ".join(
                _distinct([_threads_text(x) for x in by_impl[i] if "error" not in x])
                for i in impls
            )
            engines = _distinct(
                [
                    _engine_text(x.get("engine"))
                    for x in by_impl.get("pyro_scvi", [])
                    if "error" not in x
                ]
            )
            lines.append(
                f"| {r['dataset']} | {shape} | {r['epochs']} | {each('train_seconds', '.2f')} "
                f"| {fmt(speedup, '.2f')} | {goal_text} | {fmt(floor, '.2f')} "
                f"| {each('median_epoch_seconds', '.3f')} "
                f"| {fmt(sm['steady_speedup_pyro_vs_scvi_tools'], '.2f')} "
                f"| {fmt(sm['steady_time_ratio_pyro_over_torch_floor'], '.2f')} "
                f"| {script_text(sm)} | {fmt(script_speedup(sm), '.2f')} "
                f"| {threads_used} | {engines} |"
            )
    lines += ["", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one timed run)."""
    raw = sys.argv[1:] if argv is None else argv
    if len(raw) == 2 and raw[0] == "--worker":
        return cst.worker_main(raw[1], run_speed_worker)
    return run_benchmark(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
