"""The package's architecture: subpackages in pipeline order, imports pointing one way.

data → model → train → posterior → io → analysis → facade (scvi, tl) → cli. A
module imports from its own layer or the layers below it; no two modules import each
other in a circle; no ``_private`` name crosses from one subpackage into another.
"""

from __future__ import annotations

import ast
import shutil
import textwrap
from pathlib import Path

import pytest

import pyro_scvi

PACKAGE = Path(pyro_scvi.__file__).parent

#: first dotted part under the package -> its layer; lower layers never import higher ones
LAYERS = {
    "errors": 0,
    "_lazy": 0,
    "_moved": 0,
    "_version": 0,
    "_docs": 0,
    "data": 1,
    "model": 2,
    "train": 3,
    "posterior": 4,
    "io": 5,
    "analysis": 6,
    "scvi": 7,
    "tl": 7,
    "cli": 8,
    "__main__": 9,
    "__init__": 9,
}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts)  # "data.counts", "data.__init__", "__init__"


def _package_of(module: str) -> list[str]:
    parts = module.split(".")
    return parts[:-1]  # a package's __init__ resolves relative imports in the package too


def _in_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(root: Path) -> list[tuple[str, str, str, bool, int]]:
    """``(module, target module, imported name or "", under TYPE_CHECKING, line)``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            checking = _in_type_checking(node, parents)
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(module)[: len(_package_of(module)) - (node.level - 1)]
                elif (node.module or "").split(".")[0] == root.name:
                    base = []
                    node_module = node.module.split(".", 1)[1] if "." in node.module else ""
                    found.extend(
                        (module, node_module, a.name, checking, node.lineno) for a in node.names
                    )
                    continue
                else:
                    continue
                target = ".".join(base + ([node.module] if node.module else []))
                found.extend((module, target, a.name, checking, node.lineno) for a in node.names)
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == root.name and "." in a.name:
                        found.append((module, a.name.split(".", 1)[1], "", checking, node.lineno))
    return found


def _resolve(root: Path, target: str, name: str) -> str:
    """The module an import reaches: ``from .data import counts`` reaches ``data.counts``."""
    if name:
        sub = root.joinpath(*filter(None, target.split(".")), name)
        if sub.with_suffix(".py").exists() or (sub / "__init__.py").exists():
            return f"{target}.{name}" if target else name
    return target or "__init__"


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def _unit(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    """Every breach of the layering rules under ``root`` (a copy of the package)."""
    out = []
    graph: dict[str, set[str]] = {}
    for module, target, name, checking, line in imports(root):
        reached = _resolve(root, target, name)
        where = f"{module} (line {line})"
        if _unit(module) not in LAYERS:
            out.append(f"{where}: {_unit(module)!r} has no layer; add it to LAYERS")
            continue
        if _layer(reached) > _layer(module):
            out.append(f"{where} imports {reached} from a later layer")
        if (
            name.startswith("_")
            and not name.startswith("__")
            and _layer(reached) > 0  # the package's own foundation modules (_lazy, _moved)
            and _unit(reached) != _unit(module)
        ):
            out.append(f"{where} imports the private {reached}.{name}")
        if not checking and reached != module:
            graph.setdefault(module, set()).add(reached)
    # private attributes of a module imported from another subpackage: `posterior._x`
    for path in sorted(root.rglob("*.py")):
        module = _module_name(root, path)
        tree = ast.parse(path.read_text())
        foreign = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = _package_of(module)[: len(_package_of(module)) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                for a in node.names:
                    reached = _resolve(root, target, a.name)
                    if reached != target and _unit(reached) != _unit(module):
                        foreign.add(a.asname or a.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in foreign
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                out.append(f"{module} (line {node.lineno}) uses {node.value.id}.{node.attr}")
    out.extend(f"circle: {' -> '.join(c)}" for c in _cycles(graph))
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def test_every_part_of_the_package_has_a_layer():
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()}
    units = {u for u in units if not u.startswith(".") and u not in ("__pycache__",)}
    assert units <= set(LAYERS) | {"README"}, sorted(units - set(LAYERS))


@pytest.mark.parametrize(
    "where, code, expected",
    [
        ("data/counts.py", "from ..train.engine import Engine\n", "from a later layer"),
        ("model/nn.py", "from ..posterior import queries\n", "from a later layer"),
        ("analysis/de.py", "from ..posterior.queries import _log_densities\n", "private"),
        ("analysis/de.py", "from ..posterior import queries\nqueries._log_densities\n", "uses"),
        ("data/placement.py", "from .counts import CountData\n", "circle"),
        ("posterior/queries.py", "import pyro_scvi.scvi\n", "from a later layer"),
    ],
)
def test_a_planted_violation_is_caught(tmp_path, where, code, expected):
    copy = tmp_path / "pyro_scvi"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.h5ad", "__pycache__"))
    before = set(violations(copy))
    target = copy / where
    target.write_text(target.read_text() + "\n" + textwrap.dedent(code))
    found = set(violations(copy)) - before
    assert any(expected in v for v in found), found


def test_old_import_paths_warn_and_give_the_same_module():
    import importlib
    import sys

    from pyro_scvi.train import engine

    sys.modules.pop("pyro_scvi.engine", None)
    with pytest.warns(DeprecationWarning, match=r"pyro_scvi.engine moved to pyro_scvi.train"):
        old = importlib.import_module("pyro_scvi.engine")
    assert old is engine and engine.__spec__.name == "pyro_scvi.train.engine"
    with pytest.warns(DeprecationWarning, match="pyro_scvi.de moved to pyro_scvi.analysis.de"):
        assert pyro_scvi.de is importlib.import_module("pyro_scvi.analysis.de")
    # scanpy's convention: datasets stays public at the top, without a warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pyro_scvi.datasets is importlib.import_module("pyro_scvi.data.datasets")


def test_exceptions_are_defined_in_errors_only():
    # one place to find every error a user can catch (InputError and friends)
    defined = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", "")).endswith(
                    ("Error", "Exception", "Interrupt", "Interrupted")
                )
                for base in node.bases
            ):
                defined.append(f"{path.relative_to(PACKAGE)}:{node.name}")
    assert defined and all(d.startswith("errors.py:") for d in defined), defined
