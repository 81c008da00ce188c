"""Runs in processes of their own, memory readings, and medians over repeated runs.

:func:`spawn` starts ``python -m benchmarks.<study> --worker SPEC`` (or ``--prepare``, ...),
:func:`main` answers it; its result (or error) goes to ``spec["result"]``. The parent imports
no numerical library: on Linux a child's ``ru_maxrss`` starts at its parent's peak.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import data, results


def spawn(study: str, mode: str, spec: dict[str, Any], threads: int | None = None) -> dict:
    """``python -m benchmarks.<study> <mode> SPEC`` in a new process (``threads``: its
    ``OMP/MKL/OPENBLAS_NUM_THREADS``); its result file, wall time and load average around it."""
    env = dict(os.environ)
    if threads is not None:
        env |= {f"{v}_NUM_THREADS": str(threads) for v in ("OMP", "MKL", "OPENBLAS")}
    load, start = os.getloadavg()[0], time.perf_counter()
    cmd = [sys.executable, "-m", f"benchmarks.{study}", mode, json.dumps(spec)]
    # the child's stdout (libraries' notices) goes to stderr: stdout is the table
    rc = subprocess.run(cmd, env=env, stdout=sys.stderr, cwd=results.REPO).returncode
    out = {"exit_code": rc}
    path = Path(spec["result"]) if "result" in spec else None
    if path is not None:
        if path.exists():
            out = json.loads(path.read_text())
            path.unlink()
        else:
            out = {"error": f"worker exited with code {rc} and wrote no result"}
    out["worker_wall_seconds"] = time.perf_counter() - start
    return out | {"loadavg_1min_before": load, "loadavg_1min_after": os.getloadavg()[0]}


def main(argv: Sequence[str] | None, **modes: Callable[[dict[str, Any]], Any]) -> int | None:
    """Answer ``--worker SPEC`` (and the other ``modes``, e.g. ``prepare=...``) in a worker
    process, its return value (an error as ``{"error": ...}``) to ``spec["result"]``;
    ``None`` when ``argv`` is a study's own command line."""
    raw = list(sys.argv[1:] if argv is None else argv)
    modes = {"warm_kernel": warm_kernel, "prepare": data.prepare, **modes}
    mode = raw[0].removeprefix("--").replace("-", "_") if len(raw) == 2 else None
    if mode not in modes:
        return None
    spec = json.loads(raw[1])
    try:
        out = modes[mode](spec)
    except Exception as err:  # the parent records it and goes on
        traceback.print_exc()
        out = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    if "result" in spec:
        results.write_text(Path(spec["result"]), json.dumps(results.finite(out)) + "\n")
    return 0


def prepare(study: str, dataset: str, tmp: Path, threads: int | None = None, **spec: Any) -> dict:
    """The dataset written to ``tmp`` by a ``--prepare`` process (:func:`.data.prepare`, given
    ``spec``): its description and ``h5ad``, or ``{"error": ...}``."""
    name = data.parse(dataset)["name"]
    spec |= {"dataset": dataset, "h5ad": str(tmp / f"{name}.h5ad")}
    out = spawn(study, "--prepare", spec | {"result": str(tmp / f"{name}.json")}, threads)
    return {k: v for k, v in out.items() if not k.startswith(("worker_", "loadavg"))}


def attempt(errors: dict[str, str], stage: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``; on an exception ``None``, its message kept as ``errors[stage]``, so
    that one failed stage of a run is recorded and the others go on."""
    try:
        return fn(*args)
    except Exception as err:
        errors[stage] = f"{type(err).__name__}: {err}"
        return None


def warm_kernel(spec: dict[str, Any]) -> None:
    """Compile pyro_scvi's fused ZINB kernel once, untimed, so that timed runs find torch's
    on-disk compile cache as every run after a user's first does."""
    from pyro_scvi.train import kernels

    if not kernels.precompile():
        print("  no compiled kernel: the fused ZINB kernel runs uncompiled", file=sys.stderr)


def peak_rss_mib() -> float:
    """Peak RSS of this process (``ru_maxrss``), MiB; see :func:`reset_peak_rss`."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS


def status_mib(field: str) -> float | None:
    """``VmRSS`` (now) or ``VmHWM`` (this process's own peak) in MiB; Linux only."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 2**10 for ln in f if ln.startswith(field + ":"))
    except (OSError, StopIteration):
        return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``; ``ru_maxrss`` too, unless the parent's was
    larger at spawn time) to its current RSS (Linux >= 4.0); ``True`` if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def steady_state(epoch_seconds: Sequence[float]) -> dict[str, float | None]:
    """The first epoch (it carries compilation and set-up) and the median of the others."""
    if not epoch_seconds:
        return {"first_epoch_seconds": None, "median_epoch_seconds": None}
    median = statistics.median(epoch_seconds[1:] or epoch_seconds)
    return {"first_epoch_seconds": epoch_seconds[0], "median_epoch_seconds": median}


def rotate(items: Sequence[str], repeat: int) -> list[str]:
    """``items`` rotated by ``repeat``, so that none always runs first."""
    k = repeat % len(items)
    return [*items[k:], *items[:k]]


def summarize(runs: list[dict[str, Any]], impls: Sequence[str], keys: Sequence[str]) -> dict:
    """Medians of ``keys`` over runs per implementation, the runs that failed, and the speed
    ratios of pyro_scvi, scvi-tools and the floor (:data:`RATIOS`)."""
    out: dict[str, Any] = {}
    for impl in impls:
        mine = [r for r in runs if r["implementation"] == impl]
        ok = [r for r in mine if "error" not in r]
        values = {k: [r[k] for r in ok if r.get(k) is not None] for k in keys}
        out[impl] = {k: statistics.median(v) if v else None for k, v in values.items()}
        out[impl] |= {"n_ok": len(ok), "n_failed": len(mine) - len(ok)}
        if len(ok) < len(mine):
            out[impl]["error"] = next(r["error"] for r in mine if "error" in r)

    def ratio(a: str, b: str, key: str) -> float | None:
        x, y = out.get(a, {}).get(key), out.get(b, {}).get(key)
        return x / y if x is not None and y else None

    time = "seconds_per_epoch" if "seconds_per_epoch" in keys else "train_seconds"
    return out | {name: ratio(a, b, key or time) for name, (a, b, key) in RATIOS.items()}


#: The speed ratios :func:`summarize` reports: (numerator, denominator, the time compared;
#: ``None``: ``seconds_per_epoch``, or ``train_seconds``; ``STEADY``: the median epoch).
STEADY = "median_epoch_seconds"
RATIOS = {
    "time_ratio_pyro_over_scvi_tools": ("pyro_scvi", "scvi-tools", None),
    "speedup_pyro_vs_scvi_tools": ("scvi-tools", "pyro_scvi", None),
    "time_ratio_pyro_over_torch_floor": ("pyro_scvi", "torch-floor", None),
    "time_ratio_scvi_tools_over_torch_floor": ("scvi-tools", "torch-floor", None),
    "steady_speedup_pyro_vs_scvi_tools": ("scvi-tools", "pyro_scvi", STEADY),
    "steady_time_ratio_pyro_over_torch_floor": ("pyro_scvi", "torch-floor", STEADY),
}
