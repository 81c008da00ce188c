"""Lazy attributes for the package and its subpackages (PEP 562).

A name is imported from its module on first use, so ``import pyro_scvi`` and
``pyro-scvi --help`` do not pay for torch and Pyro until something needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def attach(
    package: str, *, submodules: Iterable[str] = (), names: Mapping[str, str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: submodules and ``name -> module`` on use.

    Examples
    --------
    >>> getattr_, dir_ = attach("pyro_scvi", names={"InputError": "errors"})
    >>> getattr_("InputError").__name__
    'InputError'
    """
    submodules = frozenset(submodules)
    names = dict(names or {})

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(f".{names[name]}", package), name)
        elif name in submodules:
            value = importlib.import_module(f".{name}", package)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # later lookups find the value and skip __getattr__
        setattr(importlib.import_module(package), name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(importlib.import_module(package)), *names, *submodules})

    return __getattr__, __dir__


class LazyModule:
    """A module imported on its first attribute lookup: ``stats = LazyModule("scipy.stats")``.

    For a heavy dependency that only some functions of a module use: ``scipy.stats`` takes
    about half a second to import, which every ``pyro-scvi fit`` paid through
    :mod:`pyro_scvi.analysis.de` without calling it.

    Examples
    --------
    >>> stats = LazyModule("scipy.stats")
    >>> round(float(stats.norm.cdf(0.0)), 2)
    0.5
    """

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"LazyModule({self._name!r})"
