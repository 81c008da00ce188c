"""Generate the API reference from the package itself, at every build.

Nothing here lists modules or names by hand: the modules are found by walking the package
(:func:`pkgutil.iter_modules`, every public module at any depth), the names by each module's
``__all__`` (or, without one, the classes and functions it defines and the data it documents
with ``#:``). Each object is documented in full once, in the module that defines it; every
other public path to it (``pyro_scvi.ZINB``, ``pyro_scvi.model.ZINB``) is an index target
placed right before that documentation, so that cross-references and the inventory
(``objects.inv``) know every public name. The pages are written to ``api/generated/``,
which git ignores.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

PACKAGE = "pyro_scvi"
#: the top-level subpackages and modules in pipeline order; a new one is appended after them
PIPELINE = (
    "errors",
    "data",
    "model",
    "train",
    "posterior",
    "io",
    "analysis",
    "scvi",
    "tl",
    "query",
)
PIPELINE += ("cli",)
OUT = "api/generated"


@dataclass
class Page:
    """One module's page: its own members and the aliases that point into them."""

    name: str
    module: ModuleType
    is_package: bool
    own: list[str] = field(default_factory=list)
    submodules: list[str] = field(default_factory=list)


def walk(name: str) -> list[str]:
    """``name`` and every public module under it, parents before children."""
    module = importlib.import_module(name)
    found = [name]
    if hasattr(module, "__path__"):
        subs = [
            m.name for m in pkgutil.iter_modules(module.__path__) if not m.name.startswith("_")
        ]
        if name == PACKAGE:
            subs.sort(key=lambda s: (PIPELINE.index(s) if s in PIPELINE else len(PIPELINE), s))
        for sub in subs:
            found.extend(walk(f"{name}.{sub}"))
    return found


def kind(obj: Any) -> str:
    """The Python-domain object type that documents ``obj``."""
    if isinstance(obj, ModuleType):
        return "module"
    if isinstance(obj, type):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"


def assigned_names(module: ModuleType) -> dict[str, int]:
    """Names a module assigns at its top level (not imports), with their line numbers."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError):
        return {}
    names: dict[str, int] = {}
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if isinstance(sub, ast.Name):
                    names.setdefault(sub.id, node.lineno)
    return names


def attr_docs(modname: str) -> set[str]:
    """Top-level names documented with ``#:`` comments or a docstring after them."""
    from sphinx.pycode import ModuleAnalyzer

    try:
        docs = ModuleAnalyzer.for_module(modname).find_attr_docs()
    except Exception:
        return set()
    return {name for (scope, name) in docs if scope == ""}


def line_of(module: ModuleType, name: str, assigned: dict[str, int]) -> int:
    """Where ``name`` is defined in ``module``, to keep source order."""
    obj = getattr(module, name)
    if name in assigned:
        return assigned[name]
    try:
        return inspect.getsourcelines(inspect.unwrap(obj))[1]
    except (OSError, TypeError):
        return 10**9


class Reference:
    """The package's public names, where each is documented, and the pages to write."""

    def __init__(self) -> None:
        self.modules = walk(PACKAGE)
        self.pages = {
            name: Page(
                name,
                importlib.import_module(name),
                hasattr(importlib.import_module(name), "__path__"),
            )
            for name in self.modules
        }
        self.assigned = {name: assigned_names(p.module) for name, p in self.pages.items()}
        #: (id(obj), name) -> the full name it is documented under; the name too, since
        #: equal small constants of two modules may be one object
        self.home: dict[tuple[int, str], str] = {}
        self.aliases: dict[str, list[tuple[str, str]]] = {}  # home -> [(alias, kind)]
        self.public: dict[str, str] = {}  # every public dotted name -> its kind
        self.module_aliases: dict[str, str] = {}  # pyro_scvi.datasets -> pyro_scvi.data.datasets
        for name, page in self.pages.items():
            for sub in self.modules:
                if sub.rpartition(".")[0] == name:
                    page.submodules.append(sub)
            page.own = self._own(page)
            for member in page.own:
                self.home[id(getattr(page.module, member)), member] = f"{name}.{member}"
        for page in self.pages.values():
            for member in self._declared(page.module):
                self._alias(page, member)

    # which names a module documents in full ------------------------------------------------

    def _declared(self, module: ModuleType) -> list[str]:
        names = getattr(module, "__all__", None)
        return list(names) if names is not None else []

    def _defined_here(self, page: Page, member: str) -> bool:
        obj = getattr(page.module, member, None)
        if kind(obj) in ("class", "exception", "function"):
            return (
                getattr(obj, "__module__", None) == page.name
                and getattr(obj, "__qualname__", "") == member
            )
        return member in self.assigned[page.name] and kind(obj) == "data"

    def _own(self, page: Page) -> list[str]:
        declared = getattr(page.module, "__all__", None)
        if declared is not None:
            names = [n for n in declared if self._defined_here(page, n)]
        else:
            documented = attr_docs(page.name)
            names = [
                n
                for n in vars(page.module)
                if not n.startswith("_")
                and self._defined_here(page, n)
                and (kind(getattr(page.module, n)) != "data" or n in documented)
            ]
        assigned = self.assigned[page.name]
        return sorted(names, key=lambda n: line_of(page.module, n, assigned))

    def _alias(self, page: Page, member: str) -> None:
        obj = getattr(page.module, member)
        path = f"{page.name}.{member}"
        what = kind(obj)
        self.public[path] = what
        if what == "module":
            if obj.__name__ != path:
                self.module_aliases[path] = obj.__name__
            return
        home = self.home.get((id(obj), member))
        if home is None:  # defined somewhere undocumented: document it here
            page.own.append(member)
            self.home[id(obj), member] = path
        elif home != path:
            self.aliases.setdefault(home, []).append((path, what))

    # writing ------------------------------------------------------------------------------

    def summary(self, path: str) -> str:
        """The first sentence of an object's documentation, with roles made literal."""
        modname, _, member = path.rpartition(".")
        obj = getattr(importlib.import_module(modname), member)
        if kind(obj) == "data":
            home = self.home.get((id(obj), member), path)
            from sphinx.pycode import ModuleAnalyzer

            hmod, _, hname = home.rpartition(".")
            try:
                lines = ModuleAnalyzer.for_module(hmod).find_attr_docs().get(("", hname), [])
            except Exception:
                lines = []
            doc = " ".join(lines)
        else:
            doc = inspect.getdoc(obj) or ""
        first = doc.strip().split("\n\n")[0].replace("\n", " ")
        first = re.sub(r":[\w:]+:`(?:[^`<]*<)?~?([^`>]+)>?`", lambda m: f"``{m.group(1)}``", first)
        return first or "(undocumented)"

    def page_text(self, page: Page) -> str:
        """The reStructuredText of a module's page."""
        title = f"``{page.name}``"
        out = [title, "=" * len(title), "", f".. automodule:: {page.name}", ""]
        declared = self._declared(page.module)
        if page.is_package and declared:
            out += ["Public names", "-" * 12, "", ".. list-table::", "   :widths: 30 70", ""]
            for member in declared:
                path = f"{page.name}.{member}"
                role = "py:mod" if self.public[path] == "module" else "py:obj"
                target = getattr(page.module, member).__name__ if role == "py:mod" else path
                out += [f"   * - :{role}:`{member} <{target}>`", f"     - {self.summary(path)}"]
            out.append("")
        if page.own:
            if page.is_package:
                out += ["Defined here", "-" * 12, ""]
            for member in page.own:
                out += self.member_text(page, member)
        if page.submodules:
            out += ["Modules", "-" * 7, "", ".. toctree::", "   :maxdepth: 1", ""]
            out += [f"   {sub}" for sub in page.submodules]
            out.append("")
        return "\n".join(out) + "\n"

    def member_text(self, page: Page, member: str) -> list[str]:
        """The directives documenting one member, after the targets of its other paths."""
        path = f"{page.name}.{member}"
        obj = getattr(page.module, member)
        what = kind(obj)
        out = []
        for alias, alias_kind in self.aliases.get(path, []):
            modname, _, name = alias.rpartition(".")
            out += [
                f".. py:{alias_kind}:: {name}",
                f"   :module: {modname}",
                "   :no-typesetting:",
                "",
            ]
        out.append(f".. auto{what}:: {path}")
        if what in ("class", "exception"):
            out += ["   :members:", "   :show-inheritance:"]
        elif what == "data" and len(repr(obj)) > 60:
            out.append("   :no-value:")
        out.append("")
        return out


def generate(srcdir: Path) -> Reference:
    """Write the reference's pages under ``srcdir / OUT``; leave unchanged files alone."""
    ref = Reference()
    out = srcdir / OUT
    out.mkdir(parents=True, exist_ok=True)
    wanted = {}
    for name, page in ref.pages.items():
        wanted[f"{name}.rst"] = ref.page_text(page)
    rows = ["| module | what it holds |", "|---|---|"]
    for name, page in ref.pages.items():
        doc = (inspect.getdoc(page.module) or "").strip().split("\n")[0]
        doc = re.sub(r":[\w:]+:`(?:[^`<]*<)?~?([^`>]+)>?`", lambda m: f"`{m.group(1)}`", doc)
        cell = doc.replace("|", "\\|")
        rows.append(f"| {{mod}}`{name}` | {cell} |")
    modules_table = "\n".join(rows) + "\n"
    table_path = out / "modules.txt"
    if not table_path.exists() or table_path.read_text() != modules_table:
        table_path.write_text(modules_table)
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:
            stale.unlink()
    for filename, text in wanted.items():
        path = out / filename
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    return ref


def _builder_inited(app) -> None:
    ref = generate(Path(app.srcdir))
    # plain data only: the environment is pickled between builds
    app.env.pyro_scvi_aliases = (ref.aliases, ref.module_aliases)  # type: ignore[attr-defined]


def _register_aliases(app, env) -> None:
    """Make every public path of an object resolve to its one full documentation.

    Runs once all pages are read. An alias is entered as Sphinx enters ``:canonical:``
    names: ``aliased``, so a short reference (``Fitted``) still finds one canonical object,
    and the inventory lists the alias beside it. A class's alias carries its members
    (``pyro_scvi.SCVI.save``). A public name whose home was not documented gets no alias,
    which the docs test reports.
    """
    from sphinx.domains.python import ModuleEntry, ObjectEntry

    aliases, module_aliases = getattr(env, "pyro_scvi_aliases", ({}, {}))
    domain = env.get_domain("py")
    objects, modules = domain.objects, domain.modules
    for home, names in aliases.items():
        entry = objects.get(home)
        if entry is None:
            continue
        members = [(k, v) for k, v in objects.items() if k.startswith(home + ".")]
        for alias, _ in names:
            objects[alias] = ObjectEntry(entry.docname, entry.node_id, entry.objtype, True)
            for name, member in members:
                objects.setdefault(
                    alias + name[len(home) :],
                    ObjectEntry(member.docname, member.node_id, member.objtype, True),
                )
    for alias, home in module_aliases.items():  # pyro_scvi.datasets, and all under it
        for name, entry in list(modules.items()):
            if name == home or name.startswith(home + "."):
                modules.setdefault(
                    alias + name[len(home) :],
                    ModuleEntry(entry.docname, entry.node_id, f"alias of {name}", "", False),
                )
        for name, entry in list(objects.items()):
            if name == home or name.startswith(home + "."):
                objects.setdefault(
                    alias + name[len(home) :],
                    ObjectEntry(entry.docname, entry.node_id, entry.objtype, True),
                )


@functools.cache
def _module_imports(modname: str) -> dict[str, str]:
    """Local name -> dotted origin of every import in a module (TYPE_CHECKING ones too)."""
    try:
        module = importlib.import_module(modname)
        tree = ast.parse(inspect.getsource(module))
    except Exception:
        return {}
    package = modname if hasattr(module, "__path__") else modname.rpartition(".")[0]
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = (
                    a.name if a.asname else a.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for a in node.names:
                names[a.asname or a.name] = f"{base}.{a.name}"
    return names


def _imported_name(app, env, node, contnode):
    """Resolve a reference by what its module imported under that name.

    A docstring may name an object as its module sees it: ``:class:`OutputError``` in a
    module that does ``from ..errors import OutputError``, or, in a string annotation,
    ``AnnData`` or ``nn.Module`` imported (often under ``TYPE_CHECKING``) from a library.
    Sphinx does not read imports, so the module's own imports say what the name is: a
    package object is linked to its documentation (a reference to a name the module does not
    import, or to one not documented, still fails); a third-party (or standard-library) name
    matched by ``nitpick_ignore_regex`` is shown as plain code, as every other third-party
    reference is here (``docs/conf.py`` says why).
    """
    if node.get("refdomain") != "py":
        return None
    modname, target = node.get("py:module"), node.get("reftarget", "")
    if not modname or not target:
        return None
    head, _, rest = target.partition(".")
    origin = _module_imports(modname).get(head)
    if origin is None:
        return None
    full = f"{origin}.{rest}" if rest else origin
    if full.split(".")[0] == PACKAGE:
        if full == target:
            return None
        domain = env.get_domain("py")
        return domain.resolve_xref(
            env, node["refdoc"], app.builder, node["reftype"], full, node, contnode
        )
    for domain_pattern, pattern in app.config.nitpick_ignore_regex:
        if re.fullmatch(domain_pattern, f"py:{node.get('reftype')}") and re.fullmatch(
            pattern, full
        ):
            return contnode
    return None


def _public_bases(app, name, obj, options, bases: list) -> None:
    """Show a class's nearest public ancestors instead of a private base class."""
    out, todo = [], list(bases)
    while todo:
        base = todo.pop(0)
        if isinstance(base, type) and base.__name__.startswith("_"):
            todo[:0] = [b for b in base.__bases__ if b is not object]
        elif base not in out:
            out.append(base)
    bases[:] = out or [object]


def _undocumented_override(app, what, name, obj, skip, options):
    """Skip a method that would only show a third-party base's docstring.

    ``forward`` of every ``nn.Module`` would otherwise repeat torch's text ("Define the
    computation performed at every call"). An override without a docstring of its own still
    inherits its documentation from a base class of this package (``Prior.forward``).
    """
    func = getattr(obj, "fget", obj)
    if getattr(func, "__doc__", None) or not inspect.isroutine(func):
        return None
    modname, qualname = getattr(func, "__module__", "") or "", getattr(func, "__qualname__", "")
    if not modname.startswith(PACKAGE) or qualname.count(".") != 1:
        return None
    owner = getattr(importlib.import_module(modname), qualname.split(".")[0], None)
    for base in getattr(owner, "__mro__", ())[1:]:
        inherited = base.__dict__.get(name)
        if inherited is not None and getattr(
            getattr(inherited, "fget", inherited), "__doc__", None
        ):
            return True if not base.__module__.startswith(PACKAGE) else None
    return None


def _signature(app, what, name, obj, options, signature, return_annotation):
    """A dataclass field's ``default_factory`` reads ``<factory>``, which is not Python."""
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def setup(app) -> dict[str, Any]:
    """Sphinx extension entry point."""
    app.connect("builder-inited", _builder_inited)
    app.connect("env-updated", _register_aliases)
    app.connect("missing-reference", _imported_name)
    app.connect("autodoc-process-bases", _public_bases)
    app.connect("autodoc-process-signature", _signature)
    app.connect("autodoc-skip-member", _undocumented_override)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
