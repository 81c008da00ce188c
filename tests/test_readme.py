"""The README is a tested artifact: its Python blocks and `pyro-scvi` lines run as written.

Every ```python block runs in order in one namespace, in an empty directory, as a user
pasting them into one session would run them; then every line of the ```bash blocks that
starts with ``pyro-scvi`` runs through the console script's entry point, in the same
directory (so it sees the files the Python blocks wrote). Only the sizes shrink: the shipped
PBMC data becomes a 600-cell subset, simulated data at most 600 cells, and every training
run at most 2 epochs. A block that imports an optional extra (scanpy, umap-learn) runs
where that extra is installed and is counted as skipped elsewhere.
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
from pyro_scvi import cli, datasets
from pyro_scvi.scvi import SCVI

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"
SMOKE_CELLS, SMOKE_EPOCHS = 600, 2
#: module imported by a block -> the extra that installs it
OPTIONAL = {"scanpy": "scanpy", "umap": "umap"}


def blocks(language: str) -> list[tuple[str, str]]:
    """``(heading, code)`` of each fenced block of ``language``, in README order."""
    text = README.read_text()
    out, heading = [], ""
    for match in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if match.group(1):
            heading = match.group(1)
        elif match.group(2) == language:
            out.append((heading, match.group(3)))
    return out


def needs(code: str) -> list[str]:
    """Optional modules a block imports that are not installed here."""
    imported = re.findall(r"^\s*(?:import|from) (\w+)", code, re.M)
    return [m for m in imported if m in OPTIONAL and importlib.util.find_spec(m) is None]


def cli_lines() -> list[str]:
    lines = []
    for _, code in blocks("bash"):
        for line in code.splitlines():
            if line.startswith("pyro-scvi "):
                lines.append(line)
    return lines


@pytest.fixture
def smoke(monkeypatch, tmp_path):
    """Shrink data and epochs; run in an empty directory."""
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
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_has_the_blocks_it_promises():
    python, lines = blocks("python"), cli_lines()
    assert len(python) >= 11, [h for h, _ in python]
    assert {line.split()[1] for line in lines} >= {
        "fit",
        "evaluate",
        "plot",
        "de",
        "ppc",
        "map-query",
    }


def test_readme_runs_as_written(smoke, capsys):
    namespace: dict = {"__name__": "__readme__"}
    ran, skipped = [], []
    for i, (heading, code) in enumerate(blocks("python")):
        missing = needs(code)
        if missing:
            skipped.append((i, heading, missing))
            continue
        try:
            exec(compile(code, f"README.md python block {i} ({heading})", "exec"), namespace)
        except Exception:
            pytest.fail(
                f"README python block {i} under {heading!r} failed:\n{traceback.format_exc()}"
            )
        ran.append(i)
    # what the blocks promise, checked where a silent failure would hide
    assert namespace["adata"].obsm["X_pyro_scvi"].shape == (SMOKE_CELLS, 10)
    assert set(namespace["scores"]) == {"ari", "nmi", "silhouette_label"}
    assert namespace["test_adata"].n_obs == SMOKE_CELLS - round(0.9 * SMOKE_CELLS)
    assert namespace["hier"].model.prior.m.abs().sum() > 0
    assert (smoke / "pbmc_model").is_dir() and (smoke / "ppc.nc").exists()

    for line in cli_lines():
        argv = shlex.split(line, comments=True)[1:]
        status = cli.main(argv)
        assert status == 0, f"{line!r} exited with {status}:\n{capsys.readouterr().err}"
        ran.append(line)
    assert (smoke / "pbmc.h5ad").exists() and (smoke / "pbmc_umap.png").exists()
    n_python = len(blocks("python"))
    assert len(ran) == n_python - len(skipped) + len(cli_lines())
    # an optional block is skipped only for a missing extra, never silently
    assert all(set(m) <= set(OPTIONAL) for _, _, m in skipped)
    print(
        f"README: ran {n_python - len(skipped)} of {n_python} python blocks, skipped "
        f"{[(h, m) for _, h, m in skipped]}, and {len(cli_lines())} pyro-scvi lines"
    )


def test_readme_test_command_is_what_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text().strip().splitlines()[-1]
    setup = [code.strip() for _, code in blocks("bash") if "pytest" in code]
    assert setup == [ci]


def test_pyro_scvi_namespace_in_readme_exists():
    """Every ``pyro_scvi.X`` the README names is an attribute of the package."""
    names = set(re.findall(r"\bpyro_scvi\.([A-Za-z_]\w*)", README.read_text()))
    missing = sorted(n for n in names if not hasattr(pyro_scvi, n))
    assert not missing
