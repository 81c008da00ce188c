"""Larger minibatches with a scaled learning rate: time per epoch against fit, side by side.

scVI's default is 128 cells per minibatch at learning rate 1e-3. Larger minibatches make an
epoch cheaper (fewer steps, better use of the CPU's vector units) but take fewer steps per
epoch. This trains pyro_scvi on the same cells, split and number of epochs with

* 128 cells at 1e-3 (the default),
* 512 and 1,024 cells at 1e-3, and
* 512 and 1,024 cells at ``pyro_scvi.train.optim.scaled_lr(batch_size)`` (square-root rule),

and records, per run: seconds per epoch (wall time around ``.train()``), the final
validation ELBO and the held-out log p(x) (importance sampling, ``get_marginal_ll``) of the
validation cells. All runs share one process, one after the other (after an untimed one-epoch
run and a compilation of the fused ZINB kernel, so that no timed run pays the process's
one-off costs), so the time ratios to the default run are the figures to read.

Run: ``python benchmarks/batch_size.py`` (about 6 minutes on 2 cores; ``--smoke`` for a few
seconds). Writes ``benchmarks/results/batch_size.{json,md}`` (``_smoke`` with ``--smoke``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pyro
import torch
from _common import data_dir, machine_line, run_metadata, write_results

import pyro_scvi
from pyro_scvi.train.engine import Engine
from pyro_scvi.train.optim import scaled_lr

DATA_DIR = data_dir()
OUT_DIR = Path(__file__).resolve().parent / "results"
DATASETS = ("pbmc8k_200hvg.h5ad", "zeisel_cortex_subset_1464x1000.h5ad")
SETTINGS = [(128, False), (512, False), (512, True), (1024, False), (1024, True)]


def run(adata: anndata.AnnData, batch_size: int, scaled: bool, epochs: int, args) -> dict:
    """Train once from the same initialization; time, ELBO and held-out log p(x)."""
    lr = scaled_lr(batch_size) if scaled else 1e-3
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    model = pyro_scvi.SCVI(adata, use_observed_lib_size=False)
    start = time.perf_counter()
    # --threads, fixed (the engine's default follows the free cores)
    engine = Engine(threads=args.threads)
    model.train(
        epochs, batch_size=batch_size, lr=lr, seed=args.seed, progress_bar=False, engine=engine
    )
    seconds = time.perf_counter() - start
    val = model.validation_indices[: args.ll_cells]
    ll = model.get_marginal_ll(adata[val], n_samples=args.ll_samples, seed=args.seed)
    return {
        "batch_size": batch_size,
        "lr": lr,
        "lr_rule": "sqrt-scaled" if scaled else "default 1e-3",
        "seconds_per_epoch": seconds / epochs,
        "validation_elbo_per_cell": float(model.history["validation_elbo"].iloc[-1]),
        "marginal_ll_per_cell": float(ll),
        "marginal_ll_cells": len(val),
        "engine": model.engine,
    }


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Minibatch size and learning rate",
        "",
        f"{meta['date']}; {machine_line(meta)}; {results['threads']} torch thread(s); torch "
        f"{meta['versions']['torch']}, pyro-ppl {meta['versions']['pyro-ppl']}, pyro_scvi at "
        f"{(meta['git'].get('pyro_scvi_commit') or '?')[:7]}."
        + (" SMOKE RUN: numbers are meaningless." if results["smoke"] else ""),
        "",
        f"Same cells, split, initialization and {results['epochs']} epochs per dataset; time "
        "÷ default is seconds per epoch over the 128-cell run's. Held-out log p(x): "
        f"importance sampling with {results['ll_samples']} draws on up to "
        f"{results['ll_cells']} validation cells. Higher ELBO and log p(x) are better.",
        "",
        "| dataset | batch size | lr | s / epoch | time ÷ default | validation ELBO "
        "| held-out log p(x) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        base = d["runs"][0]["seconds_per_epoch"]
        for r in d["runs"]:
            lines.append(
                f"| {d['name']} | {r['batch_size']} | {r['lr']:.4g} ({r['lr_rule']}) "
                f"| {r['seconds_per_epoch']:.3f} | {r['seconds_per_epoch'] / base:.2f} "
                f"| {r['validation_elbo_per_cell']:.2f} | {r['marginal_ll_per_cell']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ll-samples", type=int, default=100)
    p.add_argument("--ll-cells", type=int, default=500)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    p.add_argument("--smoke", action="store_true", help="2 epochs on 600 PBMC cells")
    args = p.parse_args(argv)
    if args.smoke:
        args.epochs, args.ll_samples, args.ll_cells = 2, 5, 50
    torch.set_num_threads(args.threads)
    # Runs that use the fused kernel (1,000 genes here) would otherwise charge its loading
    # and tracing, a few seconds once per process, to whichever of them comes first.
    pyro_scvi.train.kernels.precompile()
    results = {
        "meta": run_metadata(argv, args.threads),
        "threads": args.threads,
        "epochs": args.epochs,
        "ll_samples": args.ll_samples,
        "ll_cells": args.ll_cells,
        "smoke": args.smoke,
        "datasets": [],
    }
    for name in DATASETS[:1] if args.smoke else DATASETS:
        adata = anndata.read_h5ad(args.data_dir / name)
        if args.smoke:
            adata = adata[:600].copy()
        adata = adata[np.asarray(adata.X.sum(axis=1)).ravel() > 0].copy()
        run(adata, 128, False, 1, args)  # untimed: the process's one-off set-up costs
        runs = []
        for batch_size, scaled in SETTINGS:
            runs.append(run(adata, batch_size, scaled, args.epochs, args))
            r = runs[-1]
            print(
                f"{name}: batch {batch_size}, lr {r['lr']:.4g}: {r['seconds_per_epoch']:.3f} "
                f"s/epoch, val ELBO {r['validation_elbo_per_cell']:.2f}, log p(x) "
                f"{r['marginal_ll_per_cell']:.2f}",
                file=sys.stderr,
                flush=True,
            )
        results["datasets"].append({"name": name.removesuffix(".h5ad"), "runs": runs})
    text = markdown(results)
    print(text)
    stem = "batch_size" + ("_smoke" if args.smoke else "")
    write_results(args.out_dir, stem, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
