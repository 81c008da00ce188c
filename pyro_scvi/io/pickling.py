"""Which parts of a saved model another Python process could not re-import.

A saved model pickles its prior, library prior, likelihood and any non-default guide. A
pickle stores a class or function by module and name, so one defined in ``__main__`` (a
script, a notebook, ``python -c``) saves without complaint but cannot be loaded in any
other process, whose ``__main__`` is different. :func:`main_module_names` finds such
references so that :meth:`pyro_scvi.SCVI.save` can say so when it saves, not when a load
fails later.
"""

from __future__ import annotations

import io
import pickle
from typing import Any


class _Finder(pickle.Pickler):
    """A pickler that writes nowhere and notes every class or function from ``__main__``."""

    def __init__(self) -> None:
        super().__init__(io.BytesIO(), protocol=pickle.HIGHEST_PROTOCOL)
        self.found: list[str] = []

    def persistent_id(self, obj: Any) -> None:
        # called for every object pickled: instances (their class), classes and functions
        target = (
            obj
            if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__")
            else type(obj)
        )
        if getattr(target, "__module__", None) == "__main__":
            name = f"__main__.{getattr(target, '__qualname__', repr(target))}"
            if name not in self.found:
                self.found.append(name)
        return None


def main_module_names(obj: Any) -> list[str]:
    """Qualified names of the classes and functions from ``__main__`` that ``obj`` pickles.

    Examples
    --------
    >>> import pyro_scvi
    >>> main_module_names(pyro_scvi.StandardNormal())
    []
    >>> class Local:  # in a doctest, as in a script, this is not importable by name
    ...     pass
    >>> Local.__module__ = "__main__"
    >>> main_module_names([Local])
    ['__main__.Local']
    """
    finder = _Finder()
    try:
        finder.dump(obj)
    except (pickle.PicklingError, AttributeError, TypeError):
        pass  # what cannot be pickled at all is the caller's error to report
    return finder.found
