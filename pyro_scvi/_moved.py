"""Import paths of the flat layout (before 0.2), kept working for one release.

``import pyro_scvi.engine`` and ``pyro_scvi.engine`` give the module's new home
(:mod:`pyro_scvi.train.engine`) with a :class:`DeprecationWarning` that names it. The
module object is the same, so state set through the old path is seen through the new one.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

from ._version import REMOVED_IN

#: old module (under ``pyro_scvi.``) -> its home now
MOVED = {
    "convert": "posterior.arviz",
    "criticism": "analysis.criticism",
    "de": "analysis.de",
    "distributed": "train.distributed",
    "distributions": "model.distributions",
    "engine": "train.engine",
    "files": "io.files",
    "fitted": "posterior.fitted",
    "gap": "posterior.gap",
    "guide": "model.guides",
    "infer": "train.loop",
    "kernels": "train.kernels",
    "likelihoods": "model.likelihoods",
    "mcmc": "posterior.mcmc",
    "metrics": "analysis.metrics",
    "nn": "model.nn",
    "outputs": "io.outputs",
    "pickling": "io.pickling",
    "plotting": "analysis.plotting",
    "ppc": "analysis.ppc",
    "priors": "model.priors",
    "query": "model.surgery",
    "schemes": "model.schemes",
}

#: old paths that stay public without a warning, as ``scanpy.datasets`` does
ALIASES = {"datasets": "data.datasets"}

_PACKAGE = __name__.rpartition(".")[0]


def new_home(old: str) -> tuple[str, bool] | None:
    """``(new dotted name, deprecated)`` for a name under the package, else ``None``.

    Examples
    --------
    >>> new_home("pyro_scvi.engine")
    ('pyro_scvi.train.engine', True)
    >>> new_home("pyro_scvi.datasets.de_truth")
    ('pyro_scvi.data.datasets.de_truth', False)
    >>> new_home("pyro_scvi.scvi") is None
    True
    """
    prefix = f"{_PACKAGE}."
    if not old.startswith(prefix):
        return None
    head, _, rest = old[len(prefix) :].partition(".")
    for table, deprecated in ((MOVED, True), (ALIASES, False)):
        if head in table:
            return prefix + table[head] + (f".{rest}" if rest else ""), deprecated
    return None


def resolve(old: str, *, stacklevel: int = 3) -> ModuleType:
    """The module now at ``old``'s home, warning when the old path is deprecated."""
    new, deprecated = new_home(old)  # type: ignore[misc]
    if deprecated:
        warnings.warn(
            f"{old} moved to {new}; import it from there (the old path goes in {REMOVED_IN}).",
            DeprecationWarning,
            stacklevel=stacklevel,
        )
    return importlib.import_module(new)


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves an old import path with the module at its new home."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if new_home(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):  # noqa: D102
        # the module itself, not a copy: the import system then files it under the old name
        module = resolve(spec.name, stacklevel=3)
        spec.loader_state = module.__spec__
        return module

    def exec_module(self, module):  # noqa: D102
        # the import system gave the module the old path's spec; its own keeps relative
        # imports, pickling and reloads pointing at its real home
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder on :data:`sys.meta_path` once."""
    if not any(isinstance(f, MovedModuleFinder) for f in sys.meta_path):
        # first: a submodule of a moved package (pyro_scvi.datasets.de_truth) would otherwise
        # be found again on the package's path and loaded twice
        sys.meta_path.insert(0, MovedModuleFinder())
