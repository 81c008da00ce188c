"""Training throughput on one GPU: pyro_scvi against scvi-tools, side by side, one process.

Synthetic counts (``--genes`` genes, 10 cell types, 4 batches, about 10 % non-zero) at each
``--cells`` size, generated on the device in chunks and held as a CSR AnnData in host
memory; runs alternate: pyro_scvi at its defaults and with a larger minibatch (learning rate
by :func:`pyro_scvi.train.optim.scaled_lr`), scvi-tools 1.4.2 the same, and on the smallest
size pyro_scvi's other engines and ``matmul_precision`` high (TF32) and medium (bf16).
Cells per second over the epochs after the first; results rewritten after every run.
``bash benchmarks/gpu_check.sh`` runs it on a GPU machine; ``--smoke`` runs tiny sizes on
the CPU (the test suite's).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

from .lib import adapters, results

STUDY = "gpu_throughput"


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs, in order: per size, pyro_scvi and scvi-tools alternating."""
    runs, smallest = [], min(args.cells)
    for n in args.cells:
        size = {"cells": n, "epochs": args.epochs_small if n == smallest else args.epochs_large}
        for bs in args.batch_sizes:
            runs.append(size | {"impl": "pyro_scvi", "batch_size": bs, "engine": "auto"})
            runs += [size | {"impl": "scvi-tools", "batch_size": bs}] * (not args.no_scvi_tools)
        if n == smallest:
            mine = size | {"impl": "pyro_scvi"}
            runs += [mine | {"batch_size": 128, "engine": e} for e in args.engines]
            large = mine | {"batch_size": max(args.batch_sizes)}
            runs += [large | {"engine": {"matmul_precision": p}} for p in ("high", "medium")]
    return runs


def run(adata: Any, spec: dict[str, Any], device: str) -> dict[str, Any]:
    """One timed training run on ``device`` (pyro_scvi with the run's engine)."""
    import torch

    from pyro_scvi.train.optim import scaled_lr

    lr = scaled_lr(spec["batch_size"])
    opts = {"seed": 0, "device": device, "batch_size": spec["batch_size"], "lr": lr}
    if spec["impl"] == "pyro_scvi":
        train = {"batch_size": spec["batch_size"], "lr": lr, "device": device}
        fit = adapters.PyroScvi(adata, "batch", seed=0, engine=spec["engine"], train=train)
    else:
        fit = adapters.ScviTools(adata, "batch", **opts)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    fit.fit(spec["epochs"])
    sync()
    steady = fit.run["epoch_seconds"][1:] or fit.run["epoch_seconds"]
    out = {k: fit.run.get(k) for k in ("train_seconds", "epoch_seconds")}
    out["validation_elbo_per_cell"] = fit.run.get("validation_elbo_per_cell")
    out |= {"train_cells_per_second": fit.run["n_train"] * len(steady) / sum(steady), "lr": lr}
    out |= {"engine_used": fit.run.get("engine")} if spec["impl"] == "pyro_scvi" else {}
    out["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
    del fit
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return out


def engine_text(r: dict[str, Any]) -> str:
    if r["impl"] != "pyro_scvi":
        return ""
    e = r.get("engine_used") or {}
    keys = {"compiled": "compiled", "fused": "fused_kernel", "data": "data_placement"}
    used = ", ".join(f"{k}={e.get(v)}" for k, v in (keys | {"matmul": "matmul_precision"}).items())
    return f"{r['engine']} ({used})" if e else str(r["engine"])


def markdown(res: dict[str, Any]) -> str:
    how = (
        f"Device: {res['meta'].get('gpu') or 'cpu'}. Train cells/s over the epochs after the "
        "first (with one epoch: that epoch, compilation included). Ratio: pyro_scvi / "
        "scvi-tools at the same size and minibatch."
    )
    lines = results.header(res, "Training throughput on one GPU: pyro_scvi and scvi-tools", how)
    theirs = [r for r in res["runs"] if r["impl"] == "scvi-tools"]
    ref = {(r["cells"], r["batch_size"]): r.get("train_cells_per_second") for r in theirs}
    rows = []
    for r in res["runs"]:
        head = f"{r['cells']:,} | {r['impl']} | {r['batch_size']} | {engine_text(r)} | "
        head += str(r["epochs"])
        if "error" in r:
            rows.append(f"{head} | failed: {r['error'][:80]} | | | |")
            continue
        theirs = ref.get((r["cells"], r["batch_size"])) if r.get("engine") == "auto" else None
        ratio = f"{r['train_cells_per_second'] / theirs:.2f}x" if theirs else ""
        peak = results.fmt(r.get("peak_gpu_mib"), ",.0f")
        elbo = results.fmt(r.get("validation_elbo_per_cell"), ".2f")
        rows.append(f"{head} | {r['train_cells_per_second']:,.0f} | {ratio} | {elbo} | {peak}")
    columns = "cells:|implementation|minibatch:|engine|epochs:|train cells/s:|ratio:|"
    lines += results.md_table(columns + "validation ELBO/cell:|peak GPU MiB:", rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import torch
    from pyro_scvi.datasets.synthetic_large import synthetic_counts

    smoke = "tiny sizes on the CPU (the tests')"
    p, add = results.parser(__doc__, smoke, out="--out", data_dir=False)
    add("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    add("--genes", type=int, default=2000)
    add("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    add("--engines", nargs="*", default=["eager", "fused"])
    add("--epochs-small", type=int, default=3)
    add("--epochs-large", type=int, default=1)
    add("--device", default="cuda")
    add("--no-scvi-tools", action="store_true")
    add("--stem", default=STUDY)
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.batch_sizes = [300, 400], 50, [32, 64]
        args.epochs_small, args.epochs_large, args.device = 2, 1, "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU visible: run this on a GPU machine.", file=sys.stderr)
        return 2
    meta = results.metadata(STUDY, argv) | {"torch_cuda": torch.version.cuda}
    meta["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else None
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    res: dict[str, Any] = {"meta": meta, "args": settings, "runs": [], "data": []}
    data: dict[int, Any] = {}
    for spec in plan(args):
        n = spec["cells"]
        if n not in data:
            data.clear()
            gc.collect()
            start = time.perf_counter()
            data[n] = synthetic_counts(n, args.genes, device=args.device)
            density = data[n].X.nnz / math.prod(data[n].shape)
            row = {"cells": n, "genes": args.genes, "density": density}
            res["data"].append(row | {"seconds": time.perf_counter() - start})
            print(f"data {n:,} x {args.genes}: {density:.3f} non-zero", file=sys.stderr)
        try:
            row = spec | run(data[n], spec, args.device)
        except Exception as err:  # one failed run must not lose the others
            row = spec | {"error": f"{type(err).__name__}: {err}"}
        res["runs"].append(row)
        done = row.get("error", "")[:200] or f"{row['train_cells_per_second']:,.0f} cells/s"
        head = f"{row['impl']:>10} {n:>9,} bs {row['batch_size']:>5} {row.get('engine', '')!s:>10}"
        print(f"{head}: {done}", file=sys.stderr)
        results.write(args.out, args.stem, res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
