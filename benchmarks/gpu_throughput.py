"""Training throughput on one GPU: pyro_scvi against scvi-tools, side by side, one process.

Synthetic counts of ``--genes`` genes (negative binomial, 10 cell types, 4 batches, about
10 % non-zero) at each ``--cells`` size are generated on the GPU in chunks and held as a
CSR AnnData in host memory, as a user's data would be. On each size, runs alternate
between the implementations:

* pyro_scvi at its defaults (``SCVI(adata, batch_key="batch").train(device="cuda")``:
  minibatch 128, the engine's choices) and tuned (a larger minibatch with the learning
  rate scaled by :func:`pyro_scvi.train.optim.scaled_lr`; other engines);
* scvi-tools 1.4.2 at its defaults (minibatch 128) and with the same larger minibatch
  (its learning rate scaled the same way);
* on the smallest size, pyro_scvi under ``matmul_precision`` ``high`` (TF32) and
  ``medium`` (bf16 products): seconds and the final ELBO against ``highest``.

Each run reports training cells per second over its epochs after the first (the first
carries compilation; with one epoch, that epoch), and its final validation ELBO per cell.
Results go to ``benchmarks/results/gpu_throughput.{json,md}`` (``--out`` elsewhere),
rewritten after every run so a run cut short keeps what it measured.

Run on a GPU machine with ``bash benchmarks/gpu_check.sh``; ``--smoke`` runs a tiny
version on the CPU for the test suite.
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
import time
from pathlib import Path
from typing import Any

import _common
from pyro_scvi.datasets.synthetic_large import synthetic_counts

RESULTS = _common.REPO / "benchmarks" / "results"


def _cells_per_second(n_train: int, epoch_seconds: list[float]) -> float:
    steady = epoch_seconds[1:] or epoch_seconds
    return n_train * len(steady) / sum(steady)


def run_pyro_scvi(adata, *, epochs, batch_size, engine, device, lr=None) -> dict[str, Any]:
    """``pyro_scvi.SCVI(adata, batch_key="batch").train(...)`` on ``device``, timed."""
    import torch

    import pyro_scvi
    from pyro_scvi.train.optim import scaled_lr

    lr = lr if lr is not None else scaled_lr(batch_size)
    model = pyro_scvi.SCVI(adata, batch_key="batch")
    _sync(device)
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        engine=engine,
        seed=0,
        progress_bar=False,
    )
    _sync(device)
    seconds = time.perf_counter() - start
    epoch_seconds = [float(v) for v in model.history["seconds"]]
    out = {
        "train_seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "train_cells_per_second": _cells_per_second(len(model.train_indices), epoch_seconds),
        "validation_elbo_per_cell": float(model.history["validation_elbo"].iloc[-1]),
        "engine": model.engine,
        "lr": lr,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    del model
    _free(device)
    return out


def run_scvi_tools(adata, *, epochs, batch_size, device, lr=None) -> dict[str, Any]:
    """``scvi.model.SCVI(adata).train(...)`` on ``device`` (Lightning), timed per epoch."""
    import scvi
    import torch
    from lightning.pytorch.callbacks import Callback

    from pyro_scvi.train.optim import scaled_lr

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            now = time.perf_counter()
            if self.starts:
                self.seconds.append(now - self.starts[-1])
            self.starts.append(now)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.starts:
                self.seconds.append(time.perf_counter() - self.starts[-1])

    lr = lr if lr is not None else scaled_lr(batch_size)
    adata = adata.copy()  # setup_anndata writes into the AnnData
    scvi.settings.seed = 0
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata)
    timer = EpochTimer()
    accelerator = "gpu" if device == "cuda" else "cpu"
    start = time.perf_counter()
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        accelerator=accelerator,
        devices=1,
        plan_kwargs={"lr": lr},
        callbacks=[timer],
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    n_train = len(model.train_indices)
    history = model.history
    val = history.get("elbo_validation")
    out = {
        "train_seconds": seconds,
        "epoch_seconds": timer.seconds,
        "train_cells_per_second": _cells_per_second(n_train, timer.seconds),
        # scvi-tools reports the mean loss per cell: the negative ELBO
        "validation_elbo_per_cell": None if val is None else -float(val.iloc[-1, 0]),
        "lr": lr,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None,
    }
    del model, adata
    _free(device)
    return out


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _free(device: str) -> None:
    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs, in order: per size, pyro_scvi and scvi-tools alternating."""
    runs = []
    smallest = min(args.cells)
    for n in args.cells:
        size = dict(cells=n, epochs=args.epochs_small if n == smallest else args.epochs_large)
        for bs in args.batch_sizes:
            runs.append(dict(size, impl="pyro_scvi", batch_size=bs, engine="auto"))
            if not args.no_scvi_tools:
                runs.append(dict(size, impl="scvi-tools", batch_size=bs))
        if n == smallest:
            for engine in args.engines:
                runs.append(dict(size, impl="pyro_scvi", batch_size=128, engine=engine))
            for precision in ("high", "medium"):
                engine = {"matmul_precision": precision}
                bs = max(args.batch_sizes)
                runs.append(dict(size, impl="pyro_scvi", batch_size=bs, engine=engine))
    return runs


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Training throughput on one GPU: pyro_scvi and scvi-tools",
        "",
        f"Device: {meta.get('gpu') or 'cpu'}; host {_common.machine_line(meta)}.",
        f"Command: `{meta.get('command')}`",
        "",
        "Train cells/s over the epochs after the first (with one epoch: that epoch, "
        "compilation included). Ratio: pyro_scvi / scvi-tools at the same size and minibatch.",
        "",
        "| cells | implementation | minibatch | engine | epochs | train cells/s | ratio | "
        "validation ELBO/cell | peak GPU MiB |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    by_key = {
        (r["cells"], r["batch_size"]): r
        for r in results["runs"]
        if r["impl"] == "scvi-tools" and "train_cells_per_second" in r
    }
    for r in results["runs"]:
        if "error" in r:
            lines.append(
                f"| {r['cells']:,} | {r['impl']} | {r['batch_size']} | {_engine(r)} | "
                f"{r['epochs']} | failed: {r['error'][:80]} | | | |"
            )
            continue
        ref = by_key.get((r["cells"], r["batch_size"]))
        ratio = (
            f"{r['train_cells_per_second'] / ref['train_cells_per_second']:.2f}x"
            if ref is not None and r["impl"] == "pyro_scvi" and r.get("engine") == "auto"
            else ""
        )
        elbo = r.get("validation_elbo_per_cell")
        peak = r.get("peak_gpu_mib")
        lines.append(
            f"| {r['cells']:,} | {r['impl']} | {r['batch_size']} | {_engine(r)} | "
            f"{r['epochs']} | {r['train_cells_per_second']:,.0f} | {ratio} | "
            f"{'' if elbo is None else f'{elbo:.2f}'} | "
            f"{'' if peak is None else f'{peak:,.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def _engine(r: dict[str, Any]) -> str:
    if r["impl"] != "pyro_scvi":
        return ""
    e = r.get("engine_used") or {}
    parts = [str(r["engine"])]
    if e:
        parts.append(
            f"(compiled={e.get('compiled')}, fused={e.get('fused_kernel')}, "
            f"data={e.get('data_placement')}, matmul={e.get('matmul_precision')})"
        )
    return " ".join(parts)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--engines", nargs="*", default=["eager", "fused"])
    p.add_argument("--epochs-small", type=int, default=3)
    p.add_argument("--epochs-large", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-scvi-tools", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="gpu_throughput")
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on the CPU (for the test suite)"
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.batch_sizes = [300, 400], 50, [32, 64]
        args.epochs_small, args.epochs_large, args.device = 2, 1, "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU visible: run this on a GPU machine.", file=sys.stderr)
        return 2
    meta = _common.run_metadata(argv, None, script="gpu_throughput.py")
    meta["gpu"] = torch.cuda.get_device_name() if args.device == "cuda" else None
    meta["torch_cuda"] = torch.version.cuda
    results: dict[str, Any] = {"meta": meta, "args": vars(args), "runs": []}
    data: dict[int, Any] = {}
    for spec in plan(args):
        n = spec["cells"]
        if n not in data:
            data.clear()
            gc.collect()
            start = time.perf_counter()
            data[n] = synthetic_counts(n, args.genes, device=args.device)
            density = data[n].X.nnz / math.prod(data[n].shape)
            results.setdefault("data", []).append(
                {
                    "cells": n,
                    "genes": args.genes,
                    "density": density,
                    "seconds": time.perf_counter() - start,
                }
            )
            print(f"data {n:,} x {args.genes}: {density:.3f} non-zero", file=sys.stderr)
        row = dict(spec)
        try:
            if spec["impl"] == "pyro_scvi":
                out = run_pyro_scvi(
                    data[n],
                    epochs=spec["epochs"],
                    batch_size=spec["batch_size"],
                    engine=spec["engine"],
                    device=args.device,
                )
                out["engine_used"] = out.pop("engine")
            else:
                out = run_scvi_tools(
                    data[n],
                    epochs=spec["epochs"],
                    batch_size=spec["batch_size"],
                    device=args.device,
                )
            row.update(out)
        except Exception as err:  # noqa: BLE001 -- one failed run must not lose the others
            row["error"] = f"{type(err).__name__}: {err}"
        results["runs"].append(row)
        print(
            f"{row['impl']:>10} {n:>9,} bs {row['batch_size']:>5} {row.get('engine', '')!s:>10}: "
            + (
                f"{row['train_cells_per_second']:,.0f} cells/s"
                if "error" not in row
                else row["error"][:200]
            ),
            file=sys.stderr,
        )
        _common.write_results(args.out, args.stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
