"""What a saved model pickles, and which of it loads without running the file's code.

A saved model pickles its prior, library prior, likelihood, scheme and any non-default
guide (:func:`pyro_scvi.io.persistence.stage`). Two things follow.

Loading runs no code from the file
----------------------------------
Full unpickling runs whatever a pickle names (``os.system`` included), and whoever writes
a ``model.pt`` also writes its manifest and checksum. So every ``model.pt`` and
``train_state.pt`` is read with ``torch.load(..., weights_only=True)``: tensors, numbers,
strings, lists, dicts, slices, numpy arrays of numbers, and only those classes that
:func:`safe_global` allows (the allow-list is built for each file, from the names its
pickle holds; nothing is listed by hand):

- any class defined in :mod:`pyro_scvi.model`, where every component lives (priors,
  likelihoods, guides, schemes and their networks), also under the module paths of
  before 0.2 (``pyro_scvi.priors.StandardNormal``), and a component class added there
  later;
- the layers of :mod:`torch.nn` and :mod:`pyro.nn` and Pyro's flows (``nn.Module``
  subclasses) and the constraint classes of distributions, which a pickled guide may
  hold;
- whatever the user registered with ``torch.serialization.add_safe_globals``.

Such a class is built by ``cls.__new__`` and given its saved attributes; no function of
the file runs. A file that names anything else (a prior class of your own module, a
function) loads only with ``trust=True`` (``--trust-model`` on the command line), with a
warning: :func:`load_file` raises :class:`~pyro_scvi.errors.UnsafeModelFileError` (a
``ModelFileError``) otherwise, before anything of the file is unpickled.

Components from ``__main__``
----------------------------
A pickle stores a class or function by module and name, so one defined in ``__main__``
(a script, a notebook, ``python -c``) saves without complaint but cannot be loaded in any
other process, whose ``__main__`` is different. :func:`main_module_names` finds such
references so that :meth:`pyro_scvi.SCVI.save` can say so when it saves, not when a load
fails later.
"""

from __future__ import annotations

import functools
import importlib
import io
import os
import pickle
import re
import threading
import warnings
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnsafeModelFileError

#: The subpackage whose classes load without trust: where the components are defined.
COMPONENT_PACKAGE = "pyro_scvi.model"
#: Modules whose ``nn.Module`` subclasses (layers, flows) load too: plain layers only, not
#: e.g. ``torch.nn.parallel``'s wrappers, whose unpickling joins a process group.
_LAYER_PACKAGES = ("torch.nn.modules.", "pyro.nn.", "pyro.distributions.")
#: Modules whose distribution constraints load too.
_CONSTRAINT_MODULES = ("torch.distributions.constraints", "pyro.distributions.constraints")
#: Where a name must point for :func:`safe_global` to import its module and look.
_RESOLVED = ("pyro_scvi.", *_LAYER_PACKAGES, *(f"{m}." for m in _CONSTRAINT_MODULES))
#: torch's allow-list is global state: one safe load at a time in this process.
_LOADING = threading.Lock()
#: The command-line flag and the argument that allow full unpickling, for messages.
TRUST_FLAG = "--trust-model"
TRUST_ARGUMENT = "trust=True"


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


# ------------------------------------------------------------------ loading safely
@functools.lru_cache(maxsize=1)
def _data_globals() -> dict[str, Any]:
    """Plain values beyond torch's own list: numpy arrays and scalars (numpy 1 and 2), bytes."""
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1
        from numpy.core import multiarray
    found: dict[str, Any] = {}
    for package in ("numpy.core.multiarray", "numpy._core.multiarray"):
        found[f"{package}._reconstruct"] = multiarray._reconstruct
        found[f"{package}.scalar"] = multiarray.scalar
    found["numpy.ndarray"] = np.ndarray
    # protocol 2 pickles empty bytes (an empty array's data) as a call of bytes(); slices
    # (Pyro's autoregressive networks hold some), ranges and frozensets are plain values
    for plain in (bytes, slice, range, frozenset):
        found[f"builtins.{plain.__name__}"] = plain
    found["numpy.dtype"] = np.dtype
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25 pickles a dtype's class by name
    for name in dir(dtypes) if dtypes is not None else ():
        cls = getattr(dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            found[f"numpy.dtypes.{name}"] = cls
    return found


def _resolve(name: str) -> Any:
    """The object ``module.qualname`` names, importing only the module part; else None."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            with warnings.catch_warnings():
                # a model saved before 0.2 names its classes by their old module paths
                # (pyro_scvi._moved); loading it is not the user's use of a deprecated path
                warnings.simplefilter("ignore", DeprecationWarning)
                obj: Any = importlib.import_module(".".join(parts[:cut]))
        except Exception:  # no such module, or it fails to import: try a shorter one
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj
    return None


def _is_layer(obj: Any) -> bool:
    """A layer or constraint class of torch or pyro (what a pickled guide holds)."""
    import torch

    if not isinstance(obj, type):
        return False
    if obj.__module__.startswith(_LAYER_PACKAGES) and issubclass(obj, torch.nn.Module):
        return True
    constraint = issubclass(obj, torch.distributions.constraints.Constraint)
    return constraint and obj.__module__ in _CONSTRAINT_MODULES


def safe_global(name: str) -> Any:
    """The object a pickle's global ``name`` stands for, if loading it runs no foreign code.

    ``None`` when ``name`` is not allowed: it is allowed if it is a class defined in
    :mod:`pyro_scvi.model` (under any module path that imports it, as the old flat ones
    do), a layer or constraint class of torch or pyro, a name numpy pickles arrays and
    scalars through, or a plain builtin value type (bytes, slice, range, frozenset). Only
    modules of ``pyro_scvi``, ``torch`` and ``pyro`` are imported to decide, never one the
    name points elsewhere.

    Examples
    --------
    >>> safe_global("pyro_scvi.model.priors.StandardNormal").__name__
    'StandardNormal'
    >>> safe_global("pyro_scvi.priors.MixtureOfGaussians").__module__  # the 0.1 path
    'pyro_scvi.model.priors'
    >>> safe_global("torch.nn.modules.linear.Linear").__name__
    'Linear'
    >>> safe_global("posix.system") is None, safe_global("builtins.eval") is None
    (True, True)
    >>> safe_global("pyro_scvi.io.files.remove_path") is None  # a function, not a class
    True
    """
    data_names = _data_globals()
    if name in data_names:
        return data_names[name]
    # only modules that may hold an allowed class are imported to look
    if not name.startswith(_RESOLVED):
        return None
    obj = _resolve(name)
    if not isinstance(obj, type):
        return None
    module = obj.__module__ or ""
    if module == COMPONENT_PACKAGE or module.startswith(COMPONENT_PACKAGE + "."):
        return obj
    return obj if _is_layer(obj) else None


def _globals_in(path: Path) -> list[str]:
    """The names of classes and functions the pickle of ``path`` holds, not yet allowed."""
    import torch

    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def load_safely(path: str | os.PathLike) -> Any:
    """``torch.load`` of ``path`` with ``weights_only=True`` and :func:`safe_global`'s classes.

    Raises :class:`~pyro_scvi.errors.UnsafeModelFileError` naming what the file needs
    beyond them (nothing of the file has then been unpickled; the message names
    ``trust=True`` and ``--trust-model``); any other exception means the file is damaged.

    Examples
    --------
    >>> import tempfile, torch, pyro_scvi
    >>> path = tempfile.mkdtemp() + "/prior.pt"
    >>> torch.save({"prior": pyro_scvi.StandardNormal()}, path)
    >>> load_safely(path)["prior"]
    StandardNormal()
    """
    import torch

    path = Path(path)
    needed = _globals_in(path)
    allowed = {name: safe_global(name) for name in needed}
    foreign = [name for name, obj in allowed.items() if obj is None]
    if foreign:
        raise _unsafe(path, foreign)
    if any(name in _data_globals() for name in needed):
        # an array's dtype is built as an instance of its numpy.dtypes class, a name the
        # pickle does not hold
        allowed.update(_data_globals())
    registered = [(obj, name) for name, obj in allowed.items()]
    with _LOADING, torch.serialization.safe_globals(registered):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            # a name pushed while unpickling, which the scan above cannot see
            if "Weights only load failed" in str(err):
                raise _unsafe(path, [_refused_name(err)]) from err
            raise


def _unsafe(path: Path, names: list[str]) -> UnsafeModelFileError:
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return UnsafeModelFileError(
        f"{path} needs {shown}, which loading it safely does not allow: full unpickling "
        "would run code from the file. Only if you trust the folder (you or a colleague "
        f"wrote it), load it with {TRUST_ARGUMENT} (command line: {TRUST_FLAG}).",
        names,
    )


def _refused_name(err: BaseException) -> str:
    text = " ".join(str(err).split())
    found = re.search(r"<class '([^']+)'>|GLOBAL (\S+)|unrecognized function (\S+)", text)
    if found:
        return next(g for g in found.groups() if g)
    return "an object outside the allow-list"


def load_file(path: str | os.PathLike, what: str, *, trust: bool = False) -> Any:
    """Read the ``torch.save`` file ``path`` (``what`` names it), running none of its code.

    Parameters
    ----------
    path
        A ``model.pt`` or ``train_state.pt``.
    what
        What the file is, for messages ("a pyro_scvi model").
    trust
        Allow full unpickling of a file that needs more than the allow-list (see the
        module docstring), with a warning. Only for a folder you trust: its pickle can run
        any code.

    Raises
    ------
    UnsafeModelFileError
        The file needs classes or functions outside the allow-list and ``trust`` is
        False (nothing of it was unpickled). A :class:`~pyro_scvi.errors.ModelFileError`.
    ModelFileError
        The file is damaged.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = tempfile.mkdtemp() + "/model.pt"
    >>> torch.save({"f": print}, path)
    >>> try:
    ...     load_file(path, "a pyro_scvi model")
    ... except ModelFileError as err:
    ...     print("needs builtins.print" in str(err), "--trust-model" in str(err))
    True True
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     load_file(path, "a pyro_scvi model", trust=True)["f"] is print
    True
    >>> "full unpickling" in str(caught[0].message)
    True
    """
    import torch

    path = Path(path)
    try:
        return load_safely(path)
    except UnsafeModelFileError as unsafe:
        if not trust:
            raise
        names = ", ".join(unsafe.names[:4]) + (", ..." if len(unsafe.names) > 4 else "")
        warnings.warn(
            f"{path} was loaded with full unpickling ({TRUST_ARGUMENT} / {TRUST_FLAG}) for "
            f"{names}: the file can run any code, so do this only for folders you trust. A "
            "model of pyro_scvi's own components loads without it.",
            UserWarning,
            stacklevel=6,  # the caller of SCVI.load (via read_model_dir, persistence.load)
        )
        return _load_damaged_as(path, what, lambda: torch.load(path, weights_only=False))
    except Exception as err:  # torch/zip/pickle raise many types for a bad file
        raise _damaged(path, what, err) from err


def _load_damaged_as(path: Path, what: str, load) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "pyro_scvi\\.\\w+ moved to", DeprecationWarning)
            return load()
    except Exception as err:  # torch/pickle raise many types for a bad file
        raise _damaged(path, what, err) from err


def _damaged(path: Path, what: str, err: BaseException) -> ModelFileError:
    reason = " ".join(str(err).split())[:200]
    return ModelFileError(
        f"{path} cannot be read as {what} ({type(err).__name__}: {reason}); the file is "
        "damaged or was not written by pyro_scvi. Save the model again."
    )


def needs_trust(path: str | os.PathLike) -> list[str]:
    """The names in the ``torch.save`` file ``path`` that only a trusted load allows.

    Nothing is unpickled. :meth:`pyro_scvi.SCVI.save` uses it to warn that a model of
    components from outside :mod:`pyro_scvi.model` will need ``trust=True`` to load.

    Examples
    --------
    >>> import tempfile, torch, pyro_scvi
    >>> path = tempfile.mkdtemp() + "/m.pt"
    >>> torch.save({"prior": pyro_scvi.StandardNormal(), "f": print}, path)
    >>> needs_trust(path)
    ['builtins.print']
    """
    return [name for name in _globals_in(Path(path)) if safe_global(name) is None]
