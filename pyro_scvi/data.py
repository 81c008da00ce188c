"""From AnnData to the tensors the model sees: counts, batch codes and library priors.

All checks on user data happen here, at the edge, and every error says how to fix the input.
The user's AnnData is only read: nothing is written to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

#: The largest count accepted: 2**32, beyond any read or UMI count of one gene in one cell.
#: Sums of such counts over a cell's genes stay finite in float32.
MAX_COUNT = 2.0**32


class InputError(ValueError):
    """Raised when user input (AnnData, arguments) cannot be used; the message says the fix."""


@dataclass(frozen=True)
class CountData:
    """Raw counts and batch codes of one AnnData, ready for minibatching.

    Attributes
    ----------
    X
        Counts, cells x genes: a CSR matrix or a dense ``float32`` array. Rows are gathered
        per minibatch, so the whole matrix is never densified.
    batch_index
        Batch code of each cell, ``int64``, indexing ``batch_categories``.
    batch_categories
        Names of the batches (one ``"0"`` batch when there is no ``batch_key``).
    obs_names, var_names
        Cell and gene names.
    """

    X: sp.csr_matrix | np.ndarray
    batch_index: np.ndarray
    batch_categories: tuple[str, ...]
    obs_names: pd.Index
    var_names: pd.Index

    @property
    def n_cells(self) -> int:  # noqa: D102
        return self.X.shape[0]

    @property
    def n_genes(self) -> int:  # noqa: D102
        return self.X.shape[1]

    @property
    def n_batch(self) -> int:  # noqa: D102
        return len(self.batch_categories)

    def library_log_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``log(total counts)`` per batch.

        These parametrize the log-normal library-size prior (Lopez et al., 2018).
        """
        log_lib = np.log(np.asarray(self.X.sum(axis=1)).ravel())
        loc = np.zeros(self.n_batch, dtype=np.float32)
        scale = np.ones(self.n_batch, dtype=np.float32)
        for b in range(self.n_batch):
            vals = log_lib[self.batch_index == b]
            loc[b] = vals.mean()
            # A batch whose cells all have one library size has zero spread; keep the prior
            # proper with a small floor rather than fail.
            scale[b] = max(vals.std(), 1e-3)
        return loc, scale

    def tensors(
        self, idx: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(x, batch_index)`` tensors for the cells ``idx``."""
        rows = self.X[idx]
        x = rows.toarray() if sp.issparse(rows) else rows
        x = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
        b = torch.as_tensor(self.batch_index[idx], device=device)
        return x, b

    def minibatches(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_singleton: bool = False,
    ) -> Iterator[np.ndarray]:
        """Split ``indices`` into minibatches (shuffled with ``rng`` if asked).

        ``drop_singleton`` merges a last minibatch of one cell into the previous one: batch
        norm cannot normalize a single cell during training.
        """
        if shuffle:
            indices = (rng or np.random.default_rng()).permutation(indices)
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        if drop_singleton and len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()  # pop first: chunks[-1] must then be the previous chunk
            chunks[-1] = np.concatenate([chunks[-1], last])
        yield from chunks


def from_anndata(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_categories: Sequence[str] | None = None,
    var_names: Sequence[str] | None = None,
    allow_empty_cells: bool = False,
) -> CountData:
    """Validate an AnnData of raw counts and extract :class:`CountData`.

    Parameters
    ----------
    adata
        Cells x genes AnnData with raw counts in ``.X`` or ``layers[layer]``.
    layer
        Layer holding the counts; ``None`` uses ``.X``.
    batch_key
        Column of ``obs`` holding the batch; ``None`` means one batch.
    batch_categories
        Known batches (for a trained model): every cell's batch must be one of them.
    var_names
        Known genes, in order (for a trained model): ``adata`` must have exactly these, in
        any order; the counts come out in this order.
    allow_empty_cells
        Accept cells with zero total counts (used for queries, never for training).

    Returns
    -------
    CountData
        The counts as CSR (sparse input) or dense ``float32`` (dense input), with batch codes.

    Raises
    ------
    InputError
        With a message naming the fix, for: a missing layer or batch key, an empty matrix,
        non-numeric, negative, non-integer, NaN or infinite values, cells with no counts,
        duplicated gene names, and genes or batches that a trained model does not know.
        (A trained model's genes in another order are matched by name.)

    Examples
    --------
    >>> import numpy as np, anndata
    >>> adata = anndata.AnnData(np.array([[1, 0, 3], [0, 2, 2]], dtype=np.float32))
    >>> data = from_anndata(adata)
    >>> data.n_cells, data.n_genes, data.batch_categories
    (2, 3, ('0',))
    """
    if not isinstance(adata, AnnData):
        raise InputError(
            f"Expected an AnnData, got {type(adata).__name__}; read one with anndata.read_h5ad."
        )
    _check_unique_genes(adata)
    columns = _gene_columns(adata, var_names) if var_names is not None else None
    X = _get_matrix(adata, layer)
    where = f"adata.layers[{layer!r}]" if layer is not None else "adata.X"
    if columns is not None:
        # the model's genes, in its order; indexing makes a new matrix, adata is untouched
        X = (sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X))[:, columns]
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise InputError(
            f"{where} is empty ({X.shape[0]} cells x {X.shape[1]} genes); "
            "the model needs at least one cell and one gene."
        )
    X = _check_counts(X, where)
    totals = np.asarray(X.sum(axis=1)).ravel()
    n_empty = int((totals == 0).sum())
    if n_empty and not allow_empty_cells:
        raise InputError(
            f"{n_empty} of {X.shape[0]} cells have zero total counts in {where}; their "
            "library size is 0, whose log is undefined. Remove them first, e.g. "
            "`adata = adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()` or "
            "`sc.pp.filter_cells(adata, min_counts=1)` (CLI: --drop-empty-cells)."
        )
    batch_index, categories = _batch_codes(adata, batch_key, batch_categories)
    return CountData(
        X=X,
        batch_index=batch_index,
        batch_categories=categories,
        obs_names=adata.obs_names.copy(),
        var_names=adata.var_names.copy() if columns is None else pd.Index(var_names),
    )


def _get_matrix(adata: AnnData, layer: str | None):
    if layer is None:
        if adata.X is None:
            raise InputError(
                "adata.X is empty (None); pass layer=... naming the layer with raw counts."
            )
        return adata.X
    if layer not in adata.layers:
        known = ", ".join(map(repr, adata.layers.keys())) or "none"
        raise InputError(
            f"Layer {layer!r} not found in adata.layers (available: {known}); "
            "pass the name of the layer holding raw counts, or layer=None for adata.X."
        )
    return adata.layers[layer]


def _check_counts(X, where: str) -> sp.csr_matrix | np.ndarray:
    """Return the counts as CSR or a dense float32 array, checking every stored value."""
    if sp.issparse(X):
        # CSR gathers rows fast; converting makes a new matrix, the user's is untouched.
        X = sp.csr_matrix(X)
        values = X.data
    else:
        X = np.asarray(X)
        values = X
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == bool):
        raise InputError(f"{where} has dtype {values.dtype}; the model needs numeric raw counts.")
    if np.issubdtype(values.dtype, np.floating):
        finite = np.isfinite(values)
        if not finite.all():
            n_bad = int((~finite).sum())
            raise InputError(
                f"{where} has {n_bad} NaN or infinite values; the model needs raw counts. "
                "Fill or remove them, or pass the layer that holds the raw counts."
            )
        fractional = values != np.round(values)
        if fractional.any():
            raise InputError(
                f"{where} holds non-integer values (e.g. {values[fractional][0]:g}); "
                "scVI models raw counts, not normalized or log-transformed data. Pass the raw "
                "counts, e.g. layer='counts', or adata.raw.to_adata()."
            )
    if values.size and values.max() > MAX_COUNT:
        raise InputError(
            f"{where} has values up to {values.max():.3g}; raw counts of one gene in one cell "
            f"stay far below {MAX_COUNT:.3g} (and larger values overflow the float32 the "
            "model computes in). Pass the raw counts."
        )
    if values.size and values.min() < 0:
        raise InputError(
            f"{where} has negative values (min {values.min():g}); raw counts are >= 0. "
            "Pass the raw counts, not scaled or centred data."
        )
    if sp.issparse(X):
        return X.astype(np.float32) if X.dtype != np.float32 else X
    return X.astype(np.float32, copy=X.dtype != np.float32)


def _batch_codes(
    adata: AnnData, batch_key: str | None, batch_categories: Sequence[str] | None
) -> tuple[np.ndarray, tuple[str, ...]]:
    if batch_key is None:
        cats = tuple(batch_categories) if batch_categories is not None else ("0",)
        if len(cats) > 1:
            raise InputError(
                f"The model was trained with {len(cats)} batches; pass the batch_key "
                "that tells each cell's batch."
            )
        return np.zeros(adata.n_obs, dtype=np.int64), cats
    if batch_key not in adata.obs:
        known = ", ".join(map(repr, adata.obs.columns[:10])) or "none"
        raise InputError(
            f"batch_key {batch_key!r} is not a column of adata.obs (columns include: {known}); "
            "pass the column that holds each cell's batch, or batch_key=None."
        )
    values = adata.obs[batch_key]
    if values.isna().any():
        raise InputError(
            f"adata.obs[{batch_key!r}] has {int(values.isna().sum())} missing values; "
            "give every cell a batch."
        )
    values = values.astype(str)
    if batch_categories is None:
        cats = tuple(pd.Categorical(values).categories)
    else:
        cats = tuple(batch_categories)
        unknown = sorted(set(values) - set(cats))
        if unknown:
            raise InputError(
                f"Batches {unknown[:5]} in adata.obs[{batch_key!r}] were not seen in "
                f"training (known: {list(cats)}); the model cannot encode unseen batches."
            )
    codes = pd.Categorical(values, categories=cats).codes.astype(np.int64)
    return codes, cats


def _check_unique_genes(adata: AnnData) -> None:
    names = adata.var_names
    if names.is_unique:
        return
    dups = list(names[names.duplicated()].unique()[:3])
    raise InputError(
        f"adata.var_names has {int(names.duplicated().sum())} duplicated gene names (e.g. "
        f"{dups}); genes are matched by name, so each name must be unique. Make them unique "
        "first: `adata.var_names_make_unique()`."
    )


def require_unique_obs_names(obs_names: pd.Index, what: str) -> None:
    """Refuse duplicated cell names where results are keyed by them (``what`` says where)."""
    if obs_names.is_unique:
        return
    dups = list(obs_names[obs_names.duplicated()].unique()[:3])
    raise InputError(
        f"adata.obs_names has {int(obs_names.duplicated().sum())} duplicated cell names (e.g. "
        f"{dups}), but {what} is keyed by cell name. Make them unique first: "
        "`adata.obs_names_make_unique()`."
    )


def _gene_columns(adata: AnnData, var_names: Sequence[str]) -> np.ndarray | None:
    """Columns of ``adata`` holding the model's genes in its order (``None``: as they are).

    Genes are matched by name, so a query with the model's genes in another order is
    reordered; missing or extra genes are an error naming the fix.
    """
    expected = pd.Index(var_names)
    if adata.var_names.equals(expected):
        return None
    missing = expected.difference(adata.var_names)
    extra = adata.var_names.difference(expected)
    if len(missing) == 0 and len(extra) == 0:
        return adata.var_names.get_indexer(expected)
    if len(missing):
        raise InputError(
            f"adata's genes differ from the model's: {len(missing)} of its {len(expected)} "
            f"genes are missing (e.g. "
            f"{list(missing[:3])}); the model needs every gene it was trained on. Query with "
            "an AnnData that has them all (e.g. the same gene selection as for training)."
        )
    raise InputError(
        f"adata's genes differ from the model's: {len(extra)} genes are extra (e.g. "
        f"{list(extra[:3])}). Select the model's genes first: "
        "`adata = adata[:, model.var_names].copy()`."
    )


def check_batch_sizes(data: CountData, batch_size: int) -> None:
    """Check that every batch has at least two cells and the minibatch at least two.

    Batch norm normalizes over a minibatch, which needs two cells, and a batch's
    library prior needs two cells for its spread.
    """
    if batch_size < 2:
        raise InputError(f"batch_size={batch_size}; batch norm needs minibatches of >= 2 cells.")
    counts = np.bincount(data.batch_index, minlength=data.n_batch)
    small = [(data.batch_categories[b], int(c)) for b, c in enumerate(counts) if c < 2]
    if small:
        raise InputError(
            f"Batches with fewer than 2 cells: {small}. Each batch needs at least 2 cells "
            "for its library-size prior; merge these into another batch or remove them."
        )
