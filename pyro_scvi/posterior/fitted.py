"""What the analyses need of a fitted scVI: a model, a guide, and the cells' data.

Differential expression (:mod:`pyro_scvi.analysis.de`), the ArviZ export
(:mod:`pyro_scvi.posterior.arviz`) and the posterior predictive checks
(:mod:`pyro_scvi.analysis.ppc`) take any object with the attributes of :class:`Fitted`, so
they depend on this small contract rather than on the :class:`~pyro_scvi.SCVI` facade.
:class:`~pyro_scvi.SCVI` has them; :class:`FittedModel` holds them for a model and guide
built or trained without the facade. :func:`as_method` turns a function of a
:class:`Fitted` into a method of a fitted model's class: the queries of
:mod:`~pyro_scvi.posterior.fitted_queries` are :class:`~pyro_scvi.SCVI`'s methods that way.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from ..data.counts import CountData, from_anndata
from ..errors import InputError

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn


@runtime_checkable
class Fitted(Protocol):
    """A fitted model, guide and data, as the analyses read them."""

    #: The Pyro model (e.g. :class:`~pyro_scvi.model.ScviModel`).
    model: nn.Module
    #: The guide, with ``encode(x, batch_index, cell_index)`` and the model's signature.
    guide: nn.Module
    #: Where the model and guide live.
    device: torch.device
    #: Layer holding the raw counts (``None``: ``.X``).
    layer: str | None
    #: The AnnData the model was set up on.
    adata: AnnData | None
    #: Settings recorded with results.
    settings: dict[str, Any]

    def data_for(self, adata: AnnData | None = None) -> CountData:
        """The counts of ``adata`` (default: the model's own cells) in the model's coding."""
        ...


@dataclass
class FittedModel:
    """A model, guide and data satisfying :class:`Fitted`, without the SCVI facade.

    Examples
    --------
    >>> import torch, pyro_scvi
    >>> from pyro_scvi.analysis import de
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=80, n_genes=10, n_clusters=2)
    >>> data = pyro_scvi.from_anndata(adata)
    >>> loc, scale = (torch.from_numpy(v) for v in data.library_log_stats())
    >>> model = pyro_scvi.ScviModel(10, 1, pyro_scvi.LogNormalLibrary(loc, scale), n_latent=2)
    >>> guide = pyro_scvi.ScviGuide(10, 1, n_latent=2)
    >>> fitted = FittedModel(model, guide, data, adata=adata)
    >>> table = de.differential_expression(fitted, groupby="cell_type", group1="type0",
    ...                                    n_samples=20)
    >>> len(table)
    10
    """

    model: nn.Module
    guide: nn.Module
    data: CountData
    adata: AnnData | None = None
    batch_key: str | None = None
    layer: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    settings: dict[str, Any] = field(default_factory=dict)

    def data_for(self, adata: AnnData | None = None) -> CountData:
        """``data`` for ``adata=None`` (or the same AnnData), else ``adata``'s counts."""
        return counts_for(self, adata)


def counts_for(fitted: Any, adata: AnnData | None = None) -> CountData:
    """The counts of ``adata`` coded as ``fitted`` codes them (``None``: its own cells).

    ``fitted`` has ``data``, ``adata``, ``layer``, ``batch_key`` and ``guide`` (a
    :class:`FittedModel`, an :class:`~pyro_scvi.SCVI`); this is how both answer
    :meth:`Fitted.data_for`. ``adata`` needs the model's genes (matched by name) and only
    batches it knows; a guide that is not amortized can answer for its own cells only.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=30, n_genes=8, n_batches=2)
    >>> fitted = FittedModel(None, None, pyro_scvi.from_anndata(adata, batch_key="batch"),
    ...                      adata=adata, batch_key="batch")
    >>> counts_for(fitted, adata[:5].copy()).n_cells
    5
    """
    if adata is None or adata is fitted.adata:
        return fitted.data
    if not getattr(fitted.guide, "amortized", True):
        raise InputError(
            f"The {type(fitted.guide).__name__} has parameters only for the model's own "
            f"{fitted.data.n_cells} cells; query those with adata=None, or score other "
            "cells with an amortized guide or with SCVI.get_amortization_gap's refined "
            "per-cell fit."
        )
    return from_anndata(
        adata,
        layer=fitted.layer,
        batch_key=fitted.batch_key,
        batch_categories=fitted.data.batch_categories,
        var_names=fitted.data.var_names,
        allow_empty_cells=True,
    )


def as_method(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function(fitted, ...)`` as a method: ``model.name(...)`` is ``function(model, ...)``.

    The method has the function's name and signature (its first parameter called
    ``self``) and its docstring less the entry of that first parameter, so ``help()``,
    Sphinx and an IDE show the method as if it had been written out in the class.

    Parameters
    ----------
    function
        A function whose first parameter is a :class:`Fitted`.

    Returns
    -------
    callable
        The method, to assign in a class body.

    Examples
    --------
    >>> def n_cells(fitted, adata=None):
    ...     '''Cells of ``adata``.
    ...
    ...     Parameters
    ...     ----------
    ...     fitted
    ...         The model.
    ...     adata
    ...         Cells (default: the model's).
    ...     '''
    ...     return fitted.data_for(adata).n_cells
    >>> class Counted(FittedModel):
    ...     n_cells = as_method(n_cells)
    >>> import inspect
    >>> str(inspect.signature(Counted.n_cells)), "fitted" in Counted.n_cells.__doc__
    ('(self, adata=None)', False)
    """

    @functools.wraps(function)
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return function(self, *args, **kwargs)

    signature = inspect.signature(function)
    first, *rest = signature.parameters.values()
    receiver = first.replace(name="self", annotation=inspect.Parameter.empty)
    method.__signature__ = signature.replace(parameters=[receiver, *rest])
    method.__doc__ = _without_entry(function.__doc__ or "", first.name)
    return method


def _without_entry(doc: str, name: str) -> str:
    """``doc`` less the numpydoc entry of parameter ``name`` (its line and description)."""
    lines = doc.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.strip() == name:
            indent = len(line) - len(line.lstrip())
            end = i + 1
            while end < len(lines) and lines[end].strip():
                if len(lines[end]) - len(lines[end].lstrip()) <= indent:
                    break
                end += 1
            return "".join(lines[:i] + lines[end:])
    return doc
