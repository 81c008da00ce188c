"""Peak memory of streamed queries under glibc's malloc settings.

On a disk-backed (streamed) ``.h5ad`` every minibatch allocates, and frees, buffers of a
few MB: the dense counts, their ``log1p``, the read-ahead window of CSR rows. glibc's
malloc returns such buffers to the system only while they are above its mmap threshold,
and that threshold rises (up to 32 MiB) each time a larger mmapped buffer is freed; after
that the buffers come from the heap, which fragments and keeps its pages. Resident memory
then creeps up over a pass although nothing is kept. ``MALLOC_MMAP_THRESHOLD_`` (an
environment variable of glibc, read at process start) fixes the threshold and turns that
off.

For each setting (the environment as it is, then each ``--env NAME=VALUE``), a new
process loads a saved model over the streamed file and runs, in turn, what ``pyro-scvi
fit`` and ``pyro-scvi evaluate`` do after training: the posterior mean of ``z`` for every
cell (:meth:`pyro_scvi.SCVI.get_latent_representation`) and the fit statistics of the
held-out cells (:meth:`pyro_scvi.SCVI.get_fit_statistics`, K = ``--n-samples``). It
records the peak RSS (``VmHWM``) after each step and checks that every setting gives the
same latent space (the allocator changes where memory comes from, not the numbers).

::

    python benchmarks/allocator_rss.py --h5ad "$DATA/synthetic_1000000x2000.h5ad" \\
        --model-dir "$DATA/fit1m_trace/out_model"   # $DATA: out_of_core.py's --data-dir
    python benchmarks/allocator_rss.py --smoke     # seconds: a small file and model it makes

Results: ``benchmarks/results/allocator_rss.{json,md}`` (``--smoke``:
``allocator_rss_smoke.*``). Linux only (``VmHWM``); the settings are glibc's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

RESULTS = _common.REPO / "benchmarks" / "results"
DEFAULT_ENV = ("MALLOC_MMAP_THRESHOLD_=4194304",)  # 4 MiB


def worker(h5ad: str, model_dir: str, n_samples: int, out: str) -> None:
    """One setting: load, embed every cell, score the held-out cells; peaks after each."""
    import anndata
    import numpy as np

    from pyro_scvi import SCVI

    steps: dict[str, Any] = {}

    def mark(step: str, start: float) -> None:
        steps[step] = {
            "peak_rss_mib": _common.high_water_rss_mib(),
            "rss_mib": _common.current_rss_mib(),
            "seconds": time.perf_counter() - start,
        }

    start = time.perf_counter()
    adata = anndata.read_h5ad(h5ad, backed="r")
    model = SCVI.load(model_dir, adata, streamed=True)
    mark("load", start)
    start = time.perf_counter()
    latent = model.get_latent_representation()
    mark("latent (every cell)", start)
    start = time.perf_counter()
    stats = model.get_fit_statistics(
        indices=np.asarray(model.validation_indices), n_samples=n_samples, seed=0
    )
    mark(f"fit statistics (held-out cells, K={n_samples})", start)
    result = {
        "steps": steps,
        "data_source": model.data.source,
        "n_cells": int(model.data.n_cells),
        "n_scored": len(stats),
        "latent_checksum": float(np.abs(latent).sum(dtype=np.float64)),
        "elbo_mean": float(stats["elbo"].mean()),
    }
    _common.write_atomic(Path(out), json.dumps(result) + "\n")


def run_setting(args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    """One setting in a new process (its own peak), with ``env`` added to the environment."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable, __file__, "--worker", str(out), "--h5ad", str(args.h5ad),
            "--model-dir", str(args.model_dir), "--n-samples", str(args.n_samples),
        ]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
        if done.returncode != 0 or not out.exists():
            return {"env": env, "error": done.stderr[-2000:]}
        return {"env": env, **json.loads(out.read_text())}


def make_small(tmp: Path) -> tuple[Path, Path]:
    """``--smoke``: a 3,000-cell file and a model trained on it for one epoch, streamed."""
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    from pyro_scvi import SCVI

    h5ad = write_synthetic_h5ad(tmp / "small.h5ad", 3000, 60, seed=0, chunk=1000)
    import anndata

    adata = anndata.read_h5ad(h5ad, backed="r")
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=16, streamed=True)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp / "model")
    return h5ad, tmp / "model"


def markdown(results: dict[str, Any]) -> str:
    meta, args = results["meta"], results["args"]
    lines = [
        "# Peak memory of streamed queries under glibc's malloc settings",
        "",
        f"{meta['date']}; {_common.machine_line(meta)}. Command: `{meta['command']}`",
        "",
        f"{args['h5ad']} ({results['rows'][0].get('n_cells', '?'):,} cells), model "
        f"{args['model_dir']}; each setting in a new process: load the model over the "
        "streamed file, embed every cell, score the held-out cells. Peak RSS (VmHWM) after "
        "each step, MiB.",
        "",
    ]
    steps = next((list(r["steps"]) for r in results["rows"] if "steps" in r), [])
    lines += [
        "| setting | " + " | ".join(steps) + " | seconds (all steps) | same latent |",
        "|---|" + "---:|" * len(steps) + "---:|---|",
    ]
    base = results["rows"][0].get("latent_checksum")
    for r in results["rows"]:
        name = " ".join(f"{k}={v}" for k, v in r["env"].items()) or "environment as it is"
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][-200:]} |")
            continue
        peaks = " | ".join(f"{r['steps'][s]['peak_rss_mib']:,.0f}" for s in steps)
        seconds = sum(v["seconds"] for v in r["steps"].values())
        same = (
            "yes" if base is not None and abs(r["latent_checksum"] - base) <= 1e-6 * base else "NO"
        )
        lines.append(f"| {name} | {peaks} | {seconds:,.0f} | {same} |")
    lines += [
        "",
        "Peaks are cumulative (each step's column includes the steps before it). "
        "MALLOC_MMAP_THRESHOLD_ is read by glibc when a process starts: set it in the shell "
        "(`MALLOC_MMAP_THRESHOLD_=4194304 pyro-scvi fit ...`); pyro_scvi sets nothing.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--h5ad", type=Path, help="a disk-backed .h5ad of raw counts")
    p.add_argument("--model-dir", type=Path, help="a model saved on that file's cells")
    p.add_argument("--n-samples", type=int, default=10, help="K for the fit statistics")
    p.add_argument(
        "--env",
        nargs="*",
        default=list(DEFAULT_ENV),
        help="settings to compare with the environment as it is, each NAME=VALUE",
    )
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--smoke", action="store_true", help="a small file and model, seconds")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(str(args.h5ad), str(args.model_dir), args.n_samples, args.worker)
        return 0
    bad = [e for e in args.env if "=" not in e]
    if bad:
        p.error(f"--env takes NAME=VALUE, got {bad}")
    meta = _common.run_metadata(argv, None, script="allocator_rss.py")
    with tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            args.h5ad, args.model_dir = make_small(Path(tmp))
        elif args.h5ad is None or args.model_dir is None:
            p.error("pass --h5ad and --model-dir (or --smoke)")
        settings = [{}] + [dict([e.split("=", 1)]) for e in args.env]
        rows = []
        for env in settings:
            rows.append(run_setting(args, env))
            print(json.dumps(rows[-1])[:300], file=sys.stderr, flush=True)
    results = {"meta": meta, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    stem = "allocator_rss_smoke" if args.smoke else "allocator_rss"
    table = markdown(results)
    _common.write_results(args.out, stem, results, table)
    print(table)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
