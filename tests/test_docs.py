"""The documentation builds as documented, with no warning, and documents every public name.

One build per session, the documented command into a temporary folder:
``python -m sphinx -W --keep-going -n -b html docs OUT``. ``-n`` (nitpicky) makes every
unresolved cross-reference a warning and ``-W`` every warning an error, so a broken
reference in a docstring or a page fails here (``docs/conf.py`` says which third-party
references go unchecked, and why). Then the build's inventory (``objects.inv``) must hold
every public name: each class and function of ``pyro_scvi.__all__``, every name of every
``__all__`` of the package's modules and subpackages, and every public module.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

import pyro_scvi

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
BUILD_SECONDS = 600  # about 40 s on 2 idle cores; generous for a shared machine


def public_modules(name: str = "pyro_scvi") -> list[ModuleType]:
    """The package and every module under it whose name has no leading underscore."""
    module = importlib.import_module(name)
    found = [module]
    for sub in pkgutil.iter_modules(getattr(module, "__path__", [])):
        if not sub.name.startswith("_"):
            found += public_modules(f"{name}.{sub.name}")
    return found


def public_names() -> dict[str, str]:
    """Every public dotted name -> where it is declared public."""
    names = {}
    for name in pyro_scvi.__all__:
        obj = getattr(pyro_scvi, name)
        if inspect.isclass(obj) or inspect.isroutine(obj):
            names[f"pyro_scvi.{name}"] = "pyro_scvi.__all__"
    for module in public_modules():
        names[module.__name__] = "a public module"
        if module.__name__ == "pyro_scvi":
            continue
        for name in getattr(module, "__all__", ()):
            names[f"{module.__name__}.{name}"] = f"{module.__name__}.__all__"
    return names


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """Build the docs once; ``(completed process, output folder)``."""
    missing = [
        m for m in ("sphinx", "myst_nb", "numpydoc", "furo") if not importlib.util.find_spec(m)
    ]
    assert not missing, f"{missing} not installed: pip install -e '.[test]' (or '.[docs]')"
    out = tmp_path_factory.mktemp("docs_html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-q", "-b", "html"]
    done = subprocess.run(
        [*command, str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=BUILD_SECONDS,
    )
    return done, out


def warnings_of(done: subprocess.CompletedProcess) -> list[str]:
    return [
        line for line in done.stderr.splitlines() if re.search(r"(WARNING|ERROR|CRITICAL):", line)
    ]


def test_docs_build_without_warnings(build):
    done, out = build
    found = warnings_of(done)
    assert not found, f"{len(found)} warnings (sphinx -W -n):\n" + "\n".join(found)
    assert done.returncode == 0, done.stderr[-4000:]
    assert (out / "index.html").exists()


def test_every_public_name_is_in_the_reference(build):
    from sphinx.util.inventory import InventoryFile

    done, out = build
    assert (out / "objects.inv").exists(), done.stderr[-4000:]
    with open(out / "objects.inv", "rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {
        name for kind, entries in inventory.items() if kind.startswith("py:") for name in entries
    }
    missing = {name: why for name, why in public_names().items() if name not in documented}
    assert not missing, f"public names missing from the API reference: {missing}"


def test_every_notebook_is_a_tutorial(build):
    _, out = build
    notebooks = sorted((ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    pages = out / "tutorials" / "notebooks"
    missing = [nb.name for nb in notebooks if not (pages / f"{nb.stem}.html").exists()]
    assert not missing, f"add these to docs/tutorials/index.md: {missing}"


def test_every_results_table_has_a_page(build):
    _, out = build
    results = ROOT / "benchmarks" / "results"
    tables = sorted(results.rglob("*.md"))
    assert tables
    pages = out / "benchmarks" / "results"
    missing = [
        t for t in tables if not (pages / t.relative_to(results)).with_suffix(".html").exists()
    ]
    assert not missing
