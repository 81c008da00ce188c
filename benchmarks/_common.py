"""Pieces every benchmark script shares: atomic writes, versions, git state, run metadata.

The scripts run as ``python benchmarks/<script>.py``, so this folder is on ``sys.path`` and
they import this file as ``import _common``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

#: Distributions whose versions every result file records (``pyro-scvi`` as ``pyro_scvi``).
VERSIONS = ("torch", "pyro-ppl", "scvi-tools", "lightning", "anndata", "scikit-learn")


def data_dir() -> Path:
    """Default folder of the real datasets' ``.h5ad`` files.

    ``$PYRO_SCVI_DATA`` where set, else pyro_scvi's download cache, which
    ``python -c "from pyro_scvi import datasets; datasets.fetch_all()"`` fills once (see
    ``pyro_scvi.datasets``).
    """
    from pyro_scvi.datasets import DATA_ENV, cache_dir

    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else cache_dir()


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_results(out_dir: Path, stem: str, results: dict[str, Any], table: str) -> None:
    """``out_dir/stem.json`` (the results) and ``out_dir/stem.md`` (the table), atomically."""
    write_atomic(Path(out_dir) / f"{stem}.json", json.dumps(results, indent=2, default=str) + "\n")
    write_atomic(Path(out_dir) / f"{stem}.md", table)
    print(f"Wrote {Path(out_dir) / stem}.json and .md", file=sys.stderr)


def package_version(name: str) -> str:
    """Installed version of a distribution, or ``"not installed"``."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git(*cmd: str) -> str | None:
    """Output of ``git -C <repository> <cmd>``, or ``None`` when git fails."""
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *cmd], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.rstrip()


def git_state() -> dict[str, Any]:
    """Commit of the checkout the benchmark runs from, and what changed since in the package.

    ``dirty`` is true when ``pyro_scvi/`` has uncommitted changes (then the commit alone
    does not identify the code measured; ``pyro_scvi_diff_sha256`` does).
    """
    changed = git("status", "--porcelain", "--", "pyro_scvi")
    diff = git("diff", "HEAD", "--", "pyro_scvi")
    bench = git("status", "--porcelain", "--", "benchmarks")
    return {
        "pyro_scvi_commit": git("rev-parse", "HEAD"),
        "dirty": bool(changed),
        "pyro_scvi_uncommitted_changes": None if changed is None else changed.splitlines(),
        "pyro_scvi_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
        "benchmarks_uncommitted_changes": None if bench is None else bench.splitlines(),
    }


def cpu_model() -> str | None:
    """CPU model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def total_ram_gib() -> float | None:
    """Total physical memory in GiB, or ``None`` where it cannot be read."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine_info() -> dict[str, Any]:
    """Platform, processor, Python, CPU count and model, total RAM."""
    ram = total_ram_gib()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "ram_gib": None if ram is None else round(ram, 1),
    }


def machine_line(meta: dict[str, Any]) -> str:
    """One line for a markdown header: CPU model, cores, RAM and platform."""
    m = meta["machine"]
    ram = f", {m['ram_gib']:.0f} GiB RAM" if m.get("ram_gib") else ""
    return f"{m.get('cpu_model') or m['platform']}, {m['cpu_count']} CPUs{ram} ({m['platform']})"


def run_metadata(
    argv: Sequence[str] | None,
    threads: int | None,
    extra_versions: Sequence[str] = (),
    *,
    script: str | None = None,
) -> dict[str, Any]:
    """What a result file records about its run: date, command, machine, versions, git.

    Parameters
    ----------
    argv
        The script's arguments (without the program name); ``None``: ``sys.argv[1:]``.
    threads
        ``torch.set_num_threads`` of the run, recorded as given.
    extra_versions
        More distributions whose versions to record, e.g. ``("scanpy",)``.
    script
        Name of the script for the command line; default: ``sys.argv[0]``'s file name.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    name = script or Path(sys.argv[0]).name
    versions = {n: package_version(n) for n in (*VERSIONS, *extra_versions)}
    versions["pyro_scvi"] = package_version("pyro-scvi")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", f"benchmarks/{name}", *args]),
        "machine": machine_info(),
        "threads": threads,
        "versions": versions,
        "git": git_state(),
    }


def keep_not_redone(
    rows: Sequence[dict[str, Any]],
    redone: set[Any],
    key: str,
    meta: dict[str, Any],
    note: str = "",
) -> list[dict[str, Any]]:
    """``--merge``: the earlier ``rows`` whose ``row[key]`` this run does not redo.

    Each kept row carries ``from_run``, the date, commit, command (and ``note``) of the
    run that measured it, from that run's :func:`run_metadata` ``meta``; a row kept
    before keeps its own.
    """
    provenance = {
        "date": str(meta.get("date")),
        "commit": str((meta.get("git") or {}).get("pyro_scvi_commit")),
        "command": str(meta.get("command")),
        "note": note,
    }
    return [{**r, "from_run": r.get("from_run", provenance)} for r in rows if r[key] not in redone]


def peak_rss_mib() -> float:
    """Peak resident set size of this process, MiB (``getrusage(RUSAGE_SELF).ru_maxrss``).

    On Linux a child process starts with its parent's peak at the time it was spawned (the
    kernel carries it across ``exec``), so measure in processes spawned by a small parent,
    or after :func:`reset_peak_rss`.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_mib() -> float | None:
    """Resident set size of this process now, MiB (``VmRSS``; Linux only, else ``None``)."""
    return _proc_status_mib("VmRSS")


def high_water_rss_mib() -> float | None:
    """This process's own peak RSS, MiB (``VmHWM``; Linux only, else ``None``)."""
    return _proc_status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); ``True`` if done.

    After it, ``VmHWM`` reports the peak since the reset, and so does ``ru_maxrss`` unless
    the parent's peak at spawn time (see :func:`peak_rss_mib`) is larger.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
