"""The README and the documentation's pages are tested artifacts: their code runs as written.

Every ```python block of a page runs in order in one namespace, as a user pasting a page's
blocks into a fresh session would run them; then every line of the page's ```bash blocks
that starts with ``pyro-scvi`` runs through the console script's entry point, in the same
directory (so it sees the files the Python blocks wrote). The pages are the README, then
``docs/getting-started.md``, then the user guide in the order of its table of contents,
then any other hand-written page of ``docs/`` with code; they share one working directory,
so a later page may use the files of an earlier one (the command-line page maps a query
with the files of the query-mapping page). Only the sizes shrink: the shipped PBMC data
becomes a 600-cell subset, simulated data at most 600 cells, and every training run at
most 2 epochs. A block that imports an optional extra (scanpy, umap-learn) runs where that
extra is installed and is counted as skipped elsewhere.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import traceback
from pathlib import Path

import matplotlib
import numpy as np
import pytest

import pyro_scvi
from pyro_scvi import _moved, cli, datasets
from pyro_scvi.scvi import SCVI

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: docs/ folders that the build writes (generated pages) or that link to files kept elsewhere
NOT_HAND_WRITTEN = ("_build", "api/generated", "benchmarks/results", "tutorials/notebooks")
SMOKE_CELLS, SMOKE_EPOCHS = 600, 2
#: module imported by a block -> the extra that installs it
OPTIONAL = {"scanpy": "scanpy", "umap": "umap"}
#: a page -> pages whose files it uses (run first when the page is run alone)
NEEDS = {"docs/guide/cli.md": ["docs/guide/query-mapping.md"]}
MAX_README_LINES = 250


def fences(path: Path) -> list[tuple[str, str, str]]:
    """``(heading, info string, code)`` of each fenced block of a Markdown file, in order.

    Fences nest as in CommonMark and MyST: a block opened by N backticks closes at a line of
    at least N backticks alone, so a ```` ```` ```` block may hold ```` ``` ```` lines.
    """
    out, heading, open_fence, info, body = [], "", None, "", []
    for line in path.read_text().splitlines():
        fence = re.match(r"^(`{3,})(.*)$", line)
        if open_fence is None:
            if fence:
                open_fence, info, body = fence.group(1), fence.group(2).strip(), []
            elif line.startswith("#"):
                heading = line
        elif fence and fence.group(1).startswith(open_fence) and not fence.group(2).strip():
            out.append((heading, info, "\n".join(body) + "\n"))
            open_fence = None
        else:
            body.append(line)
    return out


def blocks(path: Path, language: str) -> list[tuple[str, str]]:
    """``(heading, code)`` of each fenced block of ``language`` (```` ```python ````)."""
    return [(h, code) for h, info, code in fences(path) if info == language]


def cli_lines(path: Path) -> list[str]:
    return [
        line
        for _, code in blocks(path, "bash")
        for line in code.splitlines()
        if line.startswith("pyro-scvi ")
    ]


def guide_order() -> list[str]:
    """The user guide's pages in the order of its ``toctree``."""
    index = DOCS / "guide" / "index.md"
    (toctree,) = [code for _, info, code in fences(index) if info == "{toctree}"]
    names = [line.strip() for line in toctree.splitlines()]
    return [f"guide/{n}.md" for n in names if n and not n.startswith(":")]


def hand_written_pages() -> list[Path]:
    """Every Markdown page of ``docs/`` that a person writes (not generated, not linked)."""
    pages = []
    for path in sorted(DOCS.rglob("*.md")):
        rel = path.relative_to(DOCS).as_posix()
        if not any(rel.startswith(prefix) for prefix in NOT_HAND_WRITTEN):
            pages.append(path)
    return pages


def pages() -> list[Path]:
    """The README, getting started, the guide in order, then the other pages with code."""
    ordered = [README, DOCS / "getting-started.md", *(DOCS / p for p in guide_order())]
    rest = [p for p in hand_written_pages() if p not in ordered]
    return ordered + [p for p in rest if blocks(p, "python") or cli_lines(p)]


def page_id(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def needs(code: str) -> list[str]:
    """Optional modules a block imports that are not installed here."""
    imported = re.findall(r"^\s*(?:import|from) (\w+)", code, re.M)
    return [m for m in imported if m in OPTIONAL and importlib.util.find_spec(m) is None]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One directory for every page: later pages may read the files of earlier ones."""
    return tmp_path_factory.mktemp("pages")


@pytest.fixture
def smoke(monkeypatch, workdir):
    """Shrink data and epochs; run in the pages' shared directory."""
    full_pbmc, full_sim, full_train = datasets.pbmc8k_200hvg, datasets.synthetic_zinb, SCVI.train

    def pbmc8k_200hvg():
        adata = full_pbmc()
        keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, SMOKE_CELLS, replace=False))
        return adata[keep].copy()

    def synthetic_zinb(n_cells=1000, *args, **kwargs):
        return full_sim(min(n_cells, SMOKE_CELLS), *args, **kwargs)

    def train(self, max_epochs=None, **kwargs):
        kwargs.setdefault("progress_bar", False)
        return full_train(self, min(max_epochs or SMOKE_EPOCHS, SMOKE_EPOCHS), **kwargs)

    monkeypatch.setattr(datasets, "pbmc8k_200hvg", pbmc8k_200hvg)
    monkeypatch.setattr(datasets, "synthetic_zinb", synthetic_zinb)
    monkeypatch.setattr(SCVI, "train", train)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(workdir)
    return workdir


_RAN: set[str] = set()


def run_page(path: Path, capsys) -> tuple[dict, list, list]:
    """Run a page's Python blocks in a fresh namespace, then its ``pyro-scvi`` lines."""
    namespace: dict = {"__name__": "__page__"}
    ran, skipped = [], []
    for i, (heading, code) in enumerate(blocks(path, "python")):
        missing = needs(code)
        if missing:
            skipped.append((i, heading, missing))
            continue
        try:
            exec(compile(code, f"{page_id(path)} python block {i} ({heading})", "exec"), namespace)
        except Exception:
            pytest.fail(
                f"{page_id(path)} python block {i} under {heading!r} failed:\n"
                f"{traceback.format_exc()}"
            )
        ran.append(i)
    for line in cli_lines(path):
        argv = shlex.split(line, comments=True)[1:]
        status = cli.main(argv)
        assert status == 0, (
            f"{page_id(path)}: {line!r} exited with {status}:\n{capsys.readouterr().err}"
        )
        ran.append(line)
    _RAN.add(page_id(path))
    return namespace, ran, skipped


#: page -> what its blocks promise, checked where a silent failure would hide
CHECKS = {
    "README.md": lambda ns, d: (
        ns["adata"].obsm["X_pyro_scvi"].shape == (SMOKE_CELLS, 10) and (d / "pbmc.h5ad").exists()
    ),
    "docs/getting-started.md": lambda ns, d: (
        ns["adata"].obsm["X_pyro_scvi"].shape == (SMOKE_CELLS, 10)
        and (d / "pbmc_model").is_dir()
        and (d / "pbmc_embedding.png").exists()
    ),
    "docs/guide/resuming.md": lambda ns, d: (d / "ckpt").is_dir(),
    "docs/guide/saving.md": lambda ns, d: (d / "pbmc_model" / "manifest.json").exists(),
    "docs/guide/posterior.md": lambda ns, d: (
        ns["test_adata"].n_obs == SMOKE_CELLS - round(0.9 * SMOKE_CELLS)
        and (d / "ppc.nc").exists()
    ),
    "docs/guide/de.md": lambda ns, d: "is_de_fdr" in ns["de"] and (d / "volcano.png").exists(),
    "docs/guide/criticism.md": lambda ns, d: (d / "criticism.png").exists(),
    "docs/guide/metrics.md": lambda ns, d: set(ns["scores"]) == {"ari", "nmi", "silhouette_label"},
    "docs/guide/extending.md": lambda ns, d: ns["hier"].model.prior.m.abs().sum() > 0,
    "docs/guide/query-mapping.md": lambda ns, d: (
        (d / "ref_model").is_dir() and ns["query"].obsm["X_pyro_scvi"].shape[1] == 10
    ),
    "docs/guide/data-checks.md": lambda ns, d: "count" in ns["message"].lower(),
    "docs/guide/cli.md": lambda ns, d: (
        (d / "pbmc.h5ad").exists() and (d / "pbmc_umap.png").exists()
    ),
}


@pytest.mark.parametrize("path", pages(), ids=page_id)
def test_page_runs_as_written(path, smoke, capsys):
    for earlier in NEEDS.get(page_id(path), []):
        if earlier not in _RAN:
            run_page(ROOT / earlier, capsys)
    namespace, ran, skipped = run_page(path, capsys)
    n_python = len(blocks(path, "python"))
    assert len(ran) == n_python - len(skipped) + len(cli_lines(path))
    # an optional block is skipped only for a missing extra, never silently
    assert all(set(m) <= set(OPTIONAL) for _, _, m in skipped)
    check = CHECKS.get(page_id(path))
    if check is not None:
        assert check(namespace, smoke), f"{page_id(path)}: its results are not what it promises"
    print(
        f"{page_id(path)}: ran {n_python - len(skipped)} of {n_python} python blocks, skipped "
        f"{[(h, m) for _, h, m in skipped]}, and {len(cli_lines(path))} pyro-scvi lines"
    )


def test_pages_have_the_blocks_they_promise():
    every = pages()
    assert blocks(README, "python"), "the README's quickstart"
    assert sum(len(blocks(p, "python")) for p in every) >= 15
    lines = [line for p in every for line in cli_lines(p)]
    assert {line.split()[1] for line in lines} >= {
        "fit",
        "evaluate",
        "plot",
        "de",
        "ppc",
        "map-query",
    }
    # every page with a check is run, and every hand-written page with code is in pages()
    assert {page_id(p) for p in every} >= set(CHECKS)
    with_code = [p for p in hand_written_pages() if blocks(p, "python") or cli_lines(p)]
    assert set(with_code) <= set(every)


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    setup = [code.strip() for _, code in blocks(README, "bash") if "pytest" in code]
    assert setup == [ci]


def test_getting_started_quotes_the_readme_set_up_commands():
    """The two set-up commands are the project's contract: the docs show them unchanged."""
    readme = [code for _, code in blocks(README, "bash") if "pip install" in code]
    docs = [
        code for _, code in blocks(DOCS / "getting-started.md", "bash") if "pip install" in code
    ]
    assert len(readme) == 2 and docs == readme


def test_readme_is_short_and_links_into_the_docs():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if not re.match(r"\w+://", link)]
    assert any(link.startswith("docs/") for link in local)
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_pyro_scvi_namespace_in_pages_exists():
    """Every ``pyro_scvi.X`` the README and the docs name is an attribute of the package."""
    names = set()
    for path in [README, *hand_written_pages()]:
        names |= set(re.findall(r"\bpyro_scvi\.([A-Za-z_]\w*)", path.read_text()))
    names -= set(_moved.MOVED)  # old paths, named as such
    missing = sorted(n for n in names if not hasattr(pyro_scvi, n))
    assert not missing
