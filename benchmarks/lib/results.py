"""Results files: the header every run records, markdown tables, atomic writes, ``--merge``."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from pyro_scvi.io.files import atomic_path

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results"
#: Distributions whose versions every results file records.
VERSIONS = ("pyro-scvi", "torch", "pyro-ppl", "scvi-tools", "lightning", "anndata", "scikit-learn")


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def git(*cmd: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(REPO), *cmd], capture_output=True, text=True)
    except OSError:
        return None
    return done.stdout.rstrip() if done.returncode == 0 else None


def git_state() -> dict[str, Any]:
    """The commit measured; ``dirty`` when ``pyro_scvi/`` has uncommitted changes (then
    ``pyro_scvi_diff_sha256`` identifies them)."""
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


def machine() -> dict[str, Any]:
    """Platform, CPU model and count, total RAM, Python."""
    cpu = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            names = (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
            cpu = next(names, cpu)
    except OSError:
        pass
    try:
        ram = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        ram = None
    out = {"platform": platform.platform(), "machine": platform.machine()}
    out |= {"processor": platform.processor(), "cpu_model": cpu}
    return out | {"python": platform.python_version(), "cpu_count": os.cpu_count(), "ram_gib": ram}


def metadata(
    study: str, argv: Sequence[str] | None, *, threads: Any = None, versions: Sequence[str] = ()
) -> dict[str, Any]:
    """The header of a results file: date, command, machine, threads, versions, git state."""
    args = list(sys.argv[1:] if argv is None else argv)
    found = {n: package_version(n) for n in (*VERSIONS, *versions)}
    found["pyro_scvi"] = found.pop("pyro-scvi")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    out = {"date": now, "command": " ".join(["python -m", f"benchmarks.{study}", *args])}
    return out | {"machine": machine(), "threads": threads, "versions": found, "git": git_state()}


def header(results: dict[str, Any], title: str, how: str = "") -> list[str]:
    """A table's title, then date, machine, versions and commit, the command and ``how``."""
    meta = results.get("meta") or results  # (older files: at the top level)
    v, g, m = meta["versions"], meta["git"], meta["machine"]
    ram = f", {m['ram_gib']:.0f} GiB RAM" if m.get("ram_gib") else ""
    where = f"{m.get('cpu_model') or m['platform']}, {m['cpu_count']} CPUs{ram} ({m['platform']})"
    commit = str(g["pyro_scvi_commit"])[:7] + (" + uncommitted changes" if g["dirty"] else "")
    shown = ", ".join(f"{k} {v[k]}" for k in v if k != "pyro_scvi" and v[k] != "not installed")
    smoke = (results.get("settings") or {}).get("smoke")
    return [
        f"# {title}",
        "",
        f"{meta['date']}; {where}; {shown}; pyro_scvi {v['pyro_scvi']} at commit "
        f"{commit}." + (" SMOKE RUN: numbers are meaningless." if smoke else ""),
        "",
        f"Command: `{meta['command']}`." + (f" {how}" if how else ""),
        "",
    ]


def md_table(columns: str | Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Markdown table lines. ``columns``: a list, or one string ``"a|b:|c"``; a name ending
    in ``:`` is right-aligned. A row: a list of cells, or a string ``"a | b | c"``."""
    columns = columns.split("|") if isinstance(columns, str) else columns
    names = [c.removesuffix(":") for c in columns]
    align = ["---:" if c.endswith(":") else "---" for c in columns]
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join(align) + "|"]
    cells = (row if isinstance(row, str) else " | ".join(map(str, row)) for row in rows)
    return lines + [f"| {c} |" for c in cells]


def section(title: str, columns: str | Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A blank line, ``## title``, a blank line and the table (:func:`md_table`)."""
    return ["", f"## {title}", "", *md_table(columns, rows)]


def fmt(value: Any, spec: str = ".3f") -> str:
    """``value`` formatted; ``—`` for None and non-finite numbers."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become None, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path``, atomically (:func:`pyro_scvi.io.files.atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


_NAME, _SEP = r"[^\\/\s`'\"]+", r"[\\/]+"  # one folder's name; a separator (doubled in JSON)
#: Scratch folders of Linux, macOS, Windows and this project; homes. ([x]: not a path here)
_SCRATCH = (
    rf"/(?:private/)?va[r]/folders/{_NAME}/{_NAME}(?:/[CT])?|/(?:private/|var/)?tm[p]|/work|"
    rf"[A-Za-z]:{_SEP}(?:Windows|User[s]{_SEP}{_NAME}{_SEP}AppData{_SEP}Local){_SEP}Temp"
)
_HOME = rf"/hom[e]/{_NAME}|/roo[t]|/User[s]/{_NAME}|[A-Za-z]:{_SEP}User[s]{_SEP}{_NAME}"


def portable(text: str) -> str:
    """``text`` naming no folder of this machine (records are kept in the repository): the
    checkout becomes relative paths, the data folder ``$PYRO_SCVI_DATA``, temporary folders
    (``tempfile.gettempdir()``, Linux's, macOS's, Windows') ``$TMPDIR``, homes ``~``."""
    text = text.replace(f"{REPO}/", "").replace(str(REPO), ".")
    data, tmp = os.environ.get("PYRO_SCVI_DATA"), tempfile.gettempdir()
    folders = [(f, "$PYRO_SCVI_DATA") for f in ((os.path.realpath(data), data) if data else ())]
    folders += [(f, "$TMPDIR") for f in (os.path.realpath(tmp), tmp)]
    folders = [(re.escape(f), i) for f, i in folders] + [(_SCRATCH, "$TMPDIR"), (_HOME, "~")]
    for folder, instead in folders:
        text = re.sub(rf"(?<![\w.~/\\-])(?:{folder})(?![\w.-])", instead, text)
    return text


def write(out_dir: Path, stem: str, results: dict[str, Any], table: str | None = None) -> None:
    """``out_dir/stem.json`` (every number) and ``out_dir/stem.md`` (the tables), portable."""
    text = json.dumps(finite(results), indent=2, default=str)
    write_text(Path(out_dir) / f"{stem}.json", portable(text))
    if table is not None:
        write_text(Path(out_dir) / f"{stem}.md", portable(table))
        print(f"Wrote {Path(out_dir) / stem}.json and .md", file=sys.stderr)


def publish(out_dir: Path, stem: str, results: dict[str, Any], table: str) -> None:
    """:func:`write` both files and print ``table``."""
    write(out_dir, stem, results, table)
    print(table)


def read(path: Path) -> dict[str, Any] | None:
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def provenance(results: dict[str, Any], note: str = "") -> dict[str, str]:
    """Date, commit and command of the run that wrote ``results`` (marks kept rows)."""
    meta = results.get("meta") or results
    commit = str((meta.get("git") or {}).get("pyro_scvi_commit"))
    out = {"date": str(meta.get("date")), "commit": commit, "command": str(meta.get("command"))}
    return out | ({"note": note} if note else {})


def keep_not_redone(
    rows: Sequence[dict[str, Any]], redone: set[Any], key: str, earlier: dict[str, Any], note=""
) -> list[dict[str, Any]]:
    """``--merge``: the earlier rows whose ``row[key]`` this run does not redo, each marked
    ``from_run`` with the run that measured it (a row kept before keeps its own)."""
    source = provenance(earlier, note)
    return [{**r, "from_run": r.get("from_run", source)} for r in rows if r[key] not in redone]


def parser(
    doc: str, smoke: str = "", *, out: str = "--out-dir", data_dir: bool = True, merge: str = ""
) -> tuple[argparse.ArgumentParser, Callable[..., Any]]:
    """A study's parser and its ``add_argument``, with the options the studies share:
    ``--data-dir``, ``out`` (the results folder), ``--smoke`` and (given its help) ``--merge``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if data_dir:
        p.add_argument("--data-dir", type=Path, help="folder of .h5ad ($PYRO_SCVI_DATA, cache)")
    p.add_argument(out, type=Path, default=RESULTS, help="results folder")
    p.add_argument("--smoke", action="store_true", help=smoke or None)
    if merge:
        p.add_argument("--merge", action="store_true", help=merge)
    return p, p.add_argument


def stem(study: str, smoke: bool) -> str:
    return study + ("_smoke" if smoke else "")
