"""Data-parallel training throughput: torchrun processes against one process, same global batch.

On synthetic counts (``--cells`` x ``--genes``), alternating, ``--repeats`` times: one
process at the global minibatch (``--batch-size`` x ``--procs``); ``torchrun`` with
``--procs`` ranks of ``--batch-size`` cells each (gloo, CPU); one process at the default
minibatch; one process on one thread at the global minibatch (so that the torchrun row, one
thread per rank, reads as scaling over cores). Same learning rate (``scaled_lr`` of the
global batch), seed and epochs; throughput over the epochs after the first.

    python -m benchmarks.data_parallel
    python -m benchmarks.data_parallel --smoke   # a tiny run (the test suite's)
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import results

STUDY = "data_parallel"


def train_once(args: argparse.Namespace) -> None:
    """Train on the synthetic data (also as one torchrun rank); rank 0 writes ``--worker``."""
    import numpy as np
    import torch
    from pyro_scvi.datasets.synthetic_large import synthetic_counts

    import pyro_scvi
    from pyro_scvi.train import distributed
    from pyro_scvi.train.optim import scaled_lr

    group = distributed.init_from_env("cpu")
    adata = synthetic_counts(args.cells, args.genes, device="cpu", seed=0, chunk=5_000)
    model = pyro_scvi.SCVI(adata, batch_key="batch")
    engine = pyro_scvi.Engine.preset("auto", threads=args.worker_threads)
    kw = {"batch_size": args.worker_batch_size, "lr": scaled_lr(args.global_batch), "seed": 0}
    start = time.perf_counter()
    model.train(max_epochs=args.epochs, engine=engine, progress_bar=False, **kw)
    seconds = time.perf_counter() - start
    if group is not None and not group.is_main:
        return
    h = model.history
    epochs = [float(v) for v in h["seconds"]]
    steady = epochs[1:] or epochs
    result = {"train_seconds": seconds, "epoch_seconds": epochs}
    result["train_cells_per_second"] = len(model.train_indices) * len(steady) / sum(steady)
    result["validation_elbo_per_cell"] = float(h["validation_elbo"].iloc[-1])
    result["threads_per_epoch"] = [int(v) for v in h["threads"]]
    result |= {"engine": model.engine, "processes": 1 if group is None else group.world_size}
    result["torch_threads_at_start"] = torch.get_num_threads()
    result["finite"] = bool(np.isfinite(h["validation_elbo"]).all())
    results.write_text(args.worker, json.dumps(result, default=str))


def launch(args: argparse.Namespace, procs: int, batch_size: int, threads=None) -> dict:
    """One run in new processes (``torchrun`` when ``procs`` > 1); its rank 0's result. Run
    again once if a rank died by a signal (SIGABRT in 2 of 7 fresh-clone test runs, cause not
    found); the first failure's stderr stays as ``first_failure``."""
    result = _launch_once(args, procs, batch_size, threads)
    if procs > 1 and "error" in result and "Signal" in result["error"]:
        first = result
        result = _launch_once(args, procs, batch_size, threads) | {"first_failure": first["error"]}
    return result


def _launch_once(args: argparse.Namespace, procs: int, batch_size: int, threads) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        worker = ["-m", f"benchmarks.{STUDY}", "--worker", str(out)]
        worker += [f"--worker-batch-size={batch_size}", f"--batch-size={args.batch_size}"]
        worker += [f"--{k}={getattr(args, k)}" for k in ("cells", "genes", "epochs", "procs")]
        worker += [f"--worker-threads={threads}"] if threads else []
        cmd = [sys.executable, *worker]
        if procs > 1:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            run = f"-m torch.distributed.run --nproc_per_node={procs} --master_port={port}"
            cmd = [sys.executable, *run.split(), "--no-python", *cmd]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=results.REPO)
        wall = time.perf_counter() - start
        if done.returncode != 0:  # a rank's traceback comes first, torchrun's summary last
            err = done.stderr
            err = err if len(err) <= 6000 else err[:3000] + "\n[...]\n" + err[-3000:]
            return {"error": err, "wall_seconds": wall}
        return json.loads(out.read_text()) | {"wall_seconds": wall}


def markdown(res: dict[str, Any]) -> str:
    a = res["args"]
    how = (f"{a['cells']:,} cells x {a['genes']:,} genes (synthetic), {a['epochs']} epochs, "
           f"{a['repeats']} alternating repeats; throughput over the epochs after the first; "
           "medians over repeats.")  # fmt: skip
    title = "Data-parallel training on CPU: torchrun processes against one process"
    lines = results.header(res, title, how)
    rows = [f"{name} | {r['processes']} | {results.fmt(r['threads_per_process'], 'g')} | "
            f"{r['per_process']} | {r['global']} | {r['cells_per_second']:,.0f} | "
            f"{r['ratio']:.2f}x | {results.fmt(r.get('ratio_vs_one_thread'), '.2f')}x | "
            f"{r['elbo']:.2f}" for name, r in res["summary"].items()]  # fmt: skip
    columns = "run|processes:|threads per process:|minibatch per process:|global minibatch:|"
    columns += "train cells/s:|vs one process, same global batch:|vs one process on one thread:|"
    lines += results.md_table(columns + "validation ELBO/cell:", rows)
    lines += ["", "Threads per process: the engine's per epoch (median). On a machine with as "
              "many cores as processes each rank runs one thread, so the torchrun row against the "
              "one-thread row is the scaling over cores; against the default one-process row it "
              "is the gain over what one process already gets from every core."]  # fmt: skip
    retried = [f"{n}, repeat {i}" for n, rs in res["runs"].items() for i, r in enumerate(rs)
               if "first_failure" in r]  # fmt: skip
    if retried:
        where = "the first failure's stderr is in the JSON, runs[...][i]['first_failure']"
        lines += ["", f"Run again after a rank died by a signal ({where}): {'; '.join(retried)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p, _ = results.parser(__doc__, "a tiny run (for the test suite)", out="--out", data_dir=False)
    defaults = {"cells": 20_000, "genes": 2000, "epochs": 4, "batch-size": 128, "procs": 2}
    for name, default in (defaults | {"repeats": 2}).items():
        p.add_argument(f"--{name}", type=int, default=default)
    for name in ("worker", "worker-batch-size", "worker-threads"):  # a torchrun rank's
        p.add_argument(f"--{name}", type=Path if name == "worker" else int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.epochs, args.repeats, args.batch_size = 400, 40, 2, 1, 32
    args.global_batch = args.batch_size * args.procs
    if args.worker is not None:
        train_once(args)
        return 0
    meta = results.metadata(STUDY, argv)
    runs = {  # name: (processes, minibatch per process, pinned threads)
        "one process, global minibatch": (1, args.global_batch, None),
        f"torchrun, {args.procs} processes": (args.procs, args.batch_size, None),
        "one process, default minibatch": (1, args.batch_size, None),
        "one process, one thread, global minibatch": (1, args.global_batch, 1),
    }
    raw: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (procs, bs, threads) in runs.items():
            raw[name].append(result := launch(args, procs, bs, threads))
            again = "a rank died by a signal; run again. First failure's stderr:\n"
            rate = result.get("train_cells_per_second")  # a failure in full: the rank's first
            done = f"{rate:,.0f} cells/s" if rate else result["error"]
            if "first_failure" in result:
                done = f"{again}{result['first_failure']}\nrepeat {repeat} {name}: {done}"
            print(f"repeat {repeat} {name}: {done}", file=sys.stderr)
    if failed := [name for name, rs in raw.items() for r in rs if "error" in r]:
        print(f"failed runs: {failed}", file=sys.stderr)
        return 1

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in raw[name])

    base = median("one process, global minibatch", "train_cells_per_second")
    one_core = median("one process, one thread, global minibatch", "train_cells_per_second")
    summary = {}
    for name, (procs, bs, _) in runs.items():
        rate = median(name, "train_cells_per_second")
        threads = statistics.median(statistics.median(r["threads_per_epoch"]) for r in raw[name])
        summary[name] = {"processes": procs, "threads_per_process": threads}
        summary[name] |= {"ratio_vs_one_thread": rate / one_core, "per_process": bs}
        summary[name] |= {"global": bs * procs, "cells_per_second": rate, "ratio": rate / base}
        summary[name]["elbo"] = median(name, "validation_elbo_per_cell")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    res = {"meta": meta, "args": settings, "runs": raw, "summary": summary}
    results.publish(args.out, results.stem(STUDY, args.smoke), res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
