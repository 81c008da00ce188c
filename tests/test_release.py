"""A release a user can install (issue 26, item 6).

``python -m build`` makes an sdist and, from it, a wheel; the wheel is installed into a new
virtual environment and used there as a user would, from a folder outside the repository:
``pyro-scvi --help``, the shipped dataset, a two-epoch fit.

Isolation: the package is built from a copy of its sources in a temporary folder (nothing
is written into the repository, no stale ``build/`` can slip into the wheel), and installed
with ``--no-deps`` and no index into a venv created without system site-packages. The
dependencies (torch, Pyro, AnnData, ...) are this interpreter's: a ``.pth`` file in the new
venv lists this interpreter's site-packages folders as plain paths. Python appends those
folders to ``sys.path`` after the venv's own site-packages and does not read the ``.pth``
files inside them, so the editable install of the repository (its finder is installed by
such a ``.pth``) stays inactive, and a non-editable copy there comes after the wheel's.
``PYTHONPATH`` and ``PYRO_SCVI_DATA`` are removed from the environment and the download
cache is an empty folder, so ``pyro_scvi`` and its dataset can come only from the wheel;
the test checks that they did.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

from pyro_scvi import _version
from pyro_scvi.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
VERSION = _version.__version__
#: what the build reads: the project file, the texts it ships, the package
SOURCES = ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", "MANIFEST.in", "pyro_scvi")
DATA_FILES = (
    "pyro_scvi/data/datasets/pbmc8k_200hvg.h5ad",
    "pyro_scvi/data/datasets/cellbench_genes.csv",
    "pyro_scvi/data/datasets/README.md",
)
FAST_FIT = [
    "--max-epochs", "2", "--batch-size", "512", "--n-latent", "4", "--n-samples", "1",
    "--normalized", "none", "--engine", "eager", "--device", "cpu", "--threads", "1",
    "--quiet",
]  # fmt: skip


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> dict[str, Path]:
    """The sdist and the wheel ``python -m build`` makes from a copy of the sources."""
    tmp = tmp_path_factory.mktemp("release")
    src = tmp / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, src / name)
    out = tmp / "dist"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the sdist first, then the wheel built from the sdist: the sdist must hold everything
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], env=env)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel, "tmp": tmp}


def test_the_wheel_carries_the_package_its_data_and_the_command(dist):
    wheel = dist["wheel"]
    assert wheel.name == f"pyro_scvi-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"pyro_scvi-{VERSION}.dist-info"
        metadata = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    for name in DATA_FILES:
        assert name in names
    modules = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "pyro_scvi").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert modules and modules <= names, sorted(modules - names)
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "docs")]
    assert f"\nVersion: {VERSION}\n" in metadata
    assert "pyro-scvi = pyro_scvi.cli:main" in entry_points
    assert f"{info}/licenses/LICENSE" in names and "License-Expression: BSD-3-Clause" in metadata


def test_the_sdist_carries_what_a_build_needs(dist):
    with tarfile.open(dist["sdist"]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE", *DATA_FILES):
        assert name in names


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A new venv with the wheel installed and this interpreter's packages visible."""
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False, system_site_packages=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    # pip runs on the new interpreter, before it can see anything else: nothing to replace
    # (nor a checkout on PYTHONPATH, whose metadata would pass for the wheel installed)
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", "--quiet", "--disable-pip-version-check", wheel], env=clean)  # fmt: skip
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    ours = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    ours += [sysconfig.get_paths()["platlib"]]
    lines = list(dict.fromkeys(p for p in ours if Path(p).is_dir()))
    assert not [p for p in lines if Path(p).resolve() == ROOT.resolve()]
    (Path(purelib.stdout.strip()) / "_pyro_scvi_test_deps.pth").write_text("\n".join(lines))
    return env_dir


def test_the_installed_wheel_runs_help_the_shipped_dataset_and_a_fit(dist):
    tmp = dist["tmp"]
    env_dir = _venv_with_wheel(tmp, dist["wheel"])
    python, script = env_dir / "bin" / "python", env_dir / "bin" / "pyro-scvi"
    user = tmp / "user"  # a user's folder, outside the repository
    user.mkdir()
    drop = ("PYTHONPATH", "PYRO_SCVI_DATA", "PYTHONSTARTUP", "PYTHONHOME")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYRO_SCVI_CACHE=str(tmp / "empty_cache"), MPLBACKEND="Agg")
    run = {"cwd": user, "env": env}

    assert script.read_text().splitlines()[0] == f"#!{python}"
    helped = _run([script, "--help"], **run)
    assert helped.stdout.startswith("usage: pyro-scvi")
    for command in COMMANDS:
        assert command in helped.stdout

    code = (
        "import importlib.metadata as md, json, sys\n"
        "import pyro_scvi\n"
        "from pyro_scvi import datasets\n"
        "adata = datasets.pbmc8k_200hvg(download=False)\n"
        "print(json.dumps({'file': pyro_scvi.__file__, 'version': pyro_scvi.__version__,\n"
        "    'dist': md.version('pyro-scvi'), 'data': str(datasets.path('pbmc8k_200hvg')),\n"
        "    'shape': list(adata.shape), 'editable': [m for m in sys.modules\n"
        "    if m.startswith('__editable__')]}))\n"
    )
    found = json.loads(_run([python, "-c", code], **run).stdout)
    site_dir = (env_dir / "lib").resolve()
    assert Path(found["file"]).resolve().is_relative_to(site_dir), found["file"]
    assert Path(found["data"]).resolve().is_relative_to(site_dir), found["data"]
    assert found["version"] == found["dist"] == VERSION
    assert found["shape"] == [7448, 200] and found["editable"] == []

    fitted = _run([script, "fit", "pbmc8k_200hvg", "-o", "out.h5ad", *FAST_FIT], **run)
    assert "wrote out.h5ad" in fitted.stderr
    for name in ("out.h5ad", "out_training.png", "out_model/manifest.json"):
        assert (user / name).is_file(), name
    check = (
        "import anndata, json\n"
        "a = anndata.read_h5ad('out.h5ad')\n"
        "print(json.dumps({'z': list(a.obsm['X_pyro_scvi'].shape),\n"
        "    'epochs': int(a.uns['pyro_scvi']['params']['max_epochs'])}))\n"
    )
    assert json.loads(_run([python, "-c", check], **run).stdout) == {
        "z": [7448, 4],
        "epochs": 2,
    }


# ------------------------------------------------------------------ one version, a changelog
def test_the_version_is_written_in_one_place():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "pyro_scvi._version.__version__"}
    import pyro_scvi

    assert pyro_scvi.__version__ is _version.__version__
    # a version number assigned anywhere else (encoding versions of file formats are not ours)
    assigned = re.compile(r"""(?:__version__|\bversion|\brelease)\s*=\s*["']\d+\.\d+""")
    files = [ROOT / "pyproject.toml", ROOT / "docs" / "conf.py", *ROOT.glob("pyro_scvi/**/*.py")]
    written = [p.relative_to(ROOT).as_posix() for p in files if assigned.search(p.read_text())]
    assert written == ["pyro_scvi/_version.py"]


def test_the_changelog_starts_with_this_release():
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = [line[3:].split()[0] for line in text.splitlines() if line.startswith("## ")]
    assert releases[0] == VERSION
    assert tuple(map(int, _version.REMOVED_IN.split("."))) > tuple(
        map(int, VERSION.split(".")[:2])
    )
    assert f"removed in {_version.REMOVED_IN}" in text
