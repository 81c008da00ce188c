"""A page for every benchmark results table, written at each build.

Every ``benchmarks/results/**/*.md`` (written by a study of ``benchmarks/``; a decided
study's file, whose script is gone, starts with a header naming the decision) gets a page
under ``benchmarks/results/`` that includes it as it is, followed by the command that made
it, read from the JSON beside it (``command`` or ``meta.command``),
and the figure of the same name where there is one. New results files get pages without
any change here; the pages are generated, and git ignores them.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

OUT = "benchmarks/results"
#: an absolute path in a recorded command: a folder of the machine that ran it
ABSOLUTE = re.compile(r"(--data-dir[ =])?(?<![\w.])/\S*/([^/\s]+)")


def _portable(match: re.Match) -> str:
    """A recorded machine's folder as the reader's: the data folder or a scratch one."""
    if match.group(1):
        return f"{match.group(1)}$PYRO_SCVI_DATA"
    return f"$SCRATCH/{match.group(2)}"


def provenance(table: Path, root: Path) -> list[str]:
    """Lines saying which command wrote ``table``, from the JSON of the same name."""
    data_file = table.with_suffix(".json")
    if not data_file.exists():
        return []
    try:
        data = json.loads(data_file.read_text())
    except ValueError:
        return []
    meta = data.get("meta", {}) if isinstance(data, dict) else {}
    command = (data.get("command") if isinstance(data, dict) else None) or meta.get("command")
    git = meta.get("git") if isinstance(meta.get("git"), dict) else {}
    commit = (git.get("pyro_scvi_commit") or "")[:7]
    date = meta.get("date") or (data.get("date") if isinstance(data, dict) else None)
    rel = data_file.relative_to(root)
    lines = ["", "## How this table was made", ""]
    if command:
        shown, n = ABSOLUTE.subn(_portable, str(command))
        lines += ["```bash", shown, "```", ""]
        if n:
            lines += [
                "(The run's own folders are shown as `$PYRO_SCVI_DATA`, its data, and "
                "`$SCRATCH`, a scratch folder of your choice.)",
                "",
            ]
    made = [f"every run's numbers are in `{rel.as_posix()}`"]
    if commit:
        made.append(f"pyro_scvi commit `{commit}`")
    if date:
        made.append(f"{date}")
    lines.append("Written by the command above; " * bool(command) + "; ".join(made) + ".")
    lines += [
        "",
        "What each script does: {doc}`the benchmark scripts </benchmarks/scripts>`.",
    ]
    return lines


def generate(srcdir: Path) -> list[str]:
    """Write one page per results table; return their document names, in order."""
    root = srcdir.parent
    results = root / "benchmarks" / "results"
    out = srcdir / OUT
    wanted: dict[Path, str] = {}
    tables = sorted(results.rglob("*.md"), key=lambda p: (len(p.relative_to(results).parts), p))
    for table in tables:
        rel = table.relative_to(results)
        page = out / rel
        include = os.path.relpath(table, page.parent)
        text = [f"```{{include}} {include}", "```"]
        text += provenance(table, root)
        figure = table.with_suffix(".png")
        if figure.exists():
            image = os.path.relpath(figure, page.parent)
            text += ["", f"![{table.stem}]({image})"]
        wanted[page] = "\n".join(text) + "\n"
    docnames = [str((Path(OUT) / p.relative_to(results)).with_suffix("")) for p in tables]
    index = ["# Every results table", ""]
    index += ["Each page shows one file of `benchmarks/results/` as the script wrote it, and the"]
    index += ["command that wrote it.", "", "```{toctree}", ":maxdepth: 1", ""]
    index += [str(Path(d).relative_to(OUT)) for d in docnames]
    index += ["```"]
    wanted[out / "index.md"] = "\n".join(index) + "\n"
    for stale in out.rglob("*.md") if out.exists() else []:
        if stale not in wanted:
            stale.unlink()
    for path, text in wanted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return docnames


def _builder_inited(app) -> None:
    generate(Path(app.srcdir))


def setup(app) -> dict[str, Any]:
    """Sphinx extension entry point."""
    app.connect("builder-inited", _builder_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
