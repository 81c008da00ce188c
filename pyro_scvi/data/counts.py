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

from ..errors import InputError

#: The largest count accepted: 2**32, beyond any read or UMI count of one gene in one cell.
#: Sums of such counts over a cell's genes stay finite in float32.
MAX_COUNT = 2.0**32


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
    source_reason
        Why the counts are in memory (a backed AnnData may be streamed instead:
        :class:`StreamedCounts`).
    """

    X: sp.csr_matrix | np.ndarray
    batch_index: np.ndarray
    batch_categories: tuple[str, ...]
    obs_names: pd.Index
    var_names: pd.Index
    source_reason: str = "memory: an in-memory AnnData"

    source = "memory"

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
        return _library_log_stats(self.total_counts(), self.batch_index, self.n_batch)

    def total_counts(self) -> np.ndarray:
        """Each cell's total count (library size), ``float64``."""
        return np.asarray(self.X.sum(axis=1), dtype=np.float64).ravel()

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

    def resident_bytes(self) -> int | None:
        """Bytes that :meth:`to_device` would place on a device (counts and batch codes).

        Every source of counts has this method (``None``: it cannot be held on a device);
        the training engine asks it when it decides where minibatches are gathered.
        """
        if sp.issparse(self.X):
            return int(self.X.nnz * (4 + 4) + (self.n_cells + 1) * 8 + self.n_cells * 8)
        return int(self.X.size * 4 + self.n_cells * 8)

    def dense_bytes(self) -> int:
        """Bytes of these counts as one dense ``float32`` block (``to_device(dense=True)``)."""
        return int(self.n_cells) * int(self.n_genes) * 4

    def to_device(self, device: torch.device | str, *, dense: bool = False) -> ResidentCounts:
        """These counts as tensors on ``device``, gathered there per minibatch.

        See :class:`ResidentCounts`; the training engine decides whether a run uses it
        (``data_placement`` of :class:`~pyro_scvi.train.engine.Engine`). ``dense``: held
        as one dense block (:meth:`dense_bytes`), as a CPU run holds small counts.
        """
        return ResidentCounts(self, device, dense=dense)


def _library_log_stats(
    totals: np.ndarray, batch_index: np.ndarray, n_batch: int
) -> tuple[np.ndarray, np.ndarray]:
    log_lib = np.log(totals)
    loc = np.zeros(n_batch, dtype=np.float32)
    scale = np.ones(n_batch, dtype=np.float32)
    for b in range(n_batch):
        vals = log_lib[batch_index == b]
        loc[b] = vals.mean()
        # A batch whose cells all have one library size has zero spread; keep the prior
        # proper with a small floor rather than fail.
        scale[b] = max(vals.std(), 1e-3)
    return loc, scale


#: Streamed counts are read in blocks of this many consecutive cells ...
BLOCK_CELLS = 1024
#: ... and this many blocks at a time, whose cells are shuffled together into minibatches.
READ_AHEAD_BLOCKS = 16


class StreamedCounts:
    """Counts read from a disk-backed AnnData, a block of cells at a time.

    For data larger than memory: the matrix stays in the ``.h5ad`` (anndata's backed mode)
    and memory holds the cells being read, not the data. Training minibatches are
    block-shuffled: each pass visits blocks of :data:`BLOCK_CELLS` consecutive cells in a
    random order, reads :data:`READ_AHEAD_BLOCKS` of them at once (contiguous reads), and
    shuffles their cells together into minibatches; in-order passes (validation,
    queries) read consecutive spans. Minibatches then mix cells from 16 random places
    of the file rather than from anywhere: for a file sorted by cell type, each step still
    sees many types, and the epoch visits every cell once.

    Built by :func:`from_anndata` for a backed AnnData whose counts the engine decides not
    to load (:func:`pyro_scvi.data.placement.choose_data_source`). The checks of
    :func:`from_anndata` run over the file in one streamed pass, which also records each
    cell's total count. Offers :class:`CountData`'s interface (``minibatches``,
    ``tensors``, ``library_log_stats``, ``total_counts``, ``resident_bytes``, names and
    sizes) except ``X``.
    """

    def __init__(
        self,
        adata: AnnData,
        batch_index: np.ndarray,
        batch_categories: tuple[str, ...],
        obs_names: pd.Index,
        var_names: pd.Index,
        totals: np.ndarray,
        *,
        reason: str = "",
        block_cells: int = BLOCK_CELLS,
        read_ahead_blocks: int = READ_AHEAD_BLOCKS,
        columns: np.ndarray | None = None,
    ) -> None:
        self._adata = adata
        # the file's columns holding var_names, in order (None: the file's own order);
        # every read goes through _columns, so the model sees its genes whatever the file's
        self._columns = columns
        self.batch_index = batch_index
        self.batch_categories = batch_categories
        self.obs_names = obs_names
        self.var_names = var_names
        self._totals = totals
        self.source = "streamed"
        self.source_reason = reason
        self.block_cells = block_cells
        self.read_ahead_blocks = read_ahead_blocks
        self._window_rows = np.empty(0, dtype=np.int64)
        self._window = None
        self._group_of_block: np.ndarray | None = None
        self._groups: list[np.ndarray] = []

    @property
    def matrix(self):
        """The backed ``X`` (anndata reopens the file if something closed it)."""
        return self._adata.X

    n_cells = property(lambda self: self.matrix.shape[0])
    n_genes = property(lambda self: len(self.var_names))
    n_batch = property(lambda self: len(self.batch_categories))

    @property
    def X(self):  # noqa: N802 -- CountData's name
        """Not available: the counts stay on disk (:class:`~pyro_scvi.errors.InputError`)."""
        raise InputError(
            "This analysis needs the counts in memory, and they are streamed from the "
            "backed .h5ad; load them with `adata = adata.to_memory()` (if they fit) and "
            "rebuild the model on it."
        )

    def library_log_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation of ``log(total counts)`` per batch."""
        return _library_log_stats(self._totals, self.batch_index, self.n_batch)

    def resident_bytes(self) -> None:
        """``None``: streamed counts are never held whole on a device (see :class:`CountData`)."""
        return None

    def total_counts(self) -> np.ndarray:
        """Each cell's total count (library size), ``float64``."""
        return self._totals

    def read(self, start: int, stop: int) -> sp.csr_matrix | np.ndarray:
        """Cells ``start:stop`` from the file, as float32 CSR (or dense)."""
        return self._columns_of(self.matrix[start:stop])

    def _columns_of(self, rows) -> sp.csr_matrix | np.ndarray:
        """Rows read from the file as float32, their genes in :attr:`var_names` order."""
        rows = sp.csr_matrix(rows, dtype=np.float32) if sp.issparse(rows) else np.asarray(rows)
        rows = rows if self._columns is None else rows[:, self._columns]
        return rows if sp.issparse(rows) else np.asarray(rows, dtype=np.float32)

    def minibatches(
        self,
        indices: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        drop_singleton: bool = False,
    ) -> Iterator[np.ndarray]:
        """As :meth:`CountData.minibatches`, block-shuffled when ``shuffle`` is true."""
        if not shuffle:
            # an in-order pass reads spans (tensors); a past shuffled pass's groups of
            # random blocks would make each of its minibatches read 32 blocks
            self._group_of_block = None
            yield from CountData.minibatches(self, indices, batch_size)
            return
        rng = rng or np.random.default_rng()
        indices = np.sort(np.asarray(indices))
        blocks = indices // self.block_cells
        order = rng.permutation(np.unique(blocks))
        # Which read-ahead group each block belongs to in this pass: tensors() loads a
        # minibatch's groups whole, so the minibatches may be listed ahead (a resumable
        # run does) and still be read a group at a time.
        n_blocks = -(-self.n_cells // self.block_cells)
        self._group_of_block = np.full(n_blocks, -1, dtype=np.int64)
        self._groups = []
        pending = np.empty(0, dtype=indices.dtype)
        for g in range(0, len(order), self.read_ahead_blocks):
            group = np.sort(order[g : g + self.read_ahead_blocks])
            self._group_of_block[group] = len(self._groups)
            self._groups.append(group)
            lo = np.searchsorted(blocks, group, side="left")
            hi = np.searchsorted(blocks, group, side="right")
            members = np.concatenate([indices[a:b] for a, b in zip(lo, hi, strict=True)])
            cells = np.concatenate([pending, rng.permutation(members)])
            n_full = len(cells) // batch_size * batch_size
            out = [cells[i : i + batch_size] for i in range(0, n_full, batch_size)]
            pending = cells[n_full:]
            if g + self.read_ahead_blocks >= len(order) and len(pending):  # the last group
                if drop_singleton and len(pending) == 1 and out:
                    out[-1] = np.concatenate([out[-1], pending])
                else:
                    out.append(pending)
            yield from out

    def _load_groups(self, groups: np.ndarray) -> None:
        """Read the blocks of these read-ahead groups (contiguous reads) into the window."""
        blocks = np.sort(np.concatenate([self._groups[g] for g in groups]))
        parts, rows = [], []
        for block in blocks:
            start = int(block) * self.block_cells
            stop = min(start + self.block_cells, self.n_cells)
            parts.append(self.read(start, stop))
            rows.append(np.arange(start, stop))
        stacked = sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.vstack(parts)
        self._window_rows, self._window = np.concatenate(rows), stacked

    def _in_window(self, idx: np.ndarray) -> bool:
        if not len(self._window_rows):
            return False
        pos = np.searchsorted(self._window_rows, idx)
        inside = (pos < len(self._window_rows)).all()
        return bool(inside and (self._window_rows[pos] == idx).all())

    def tensors(
        self, idx: np.ndarray, device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(x, batch_index)`` tensors for the cells ``idx``."""
        idx = np.asarray(idx)
        if not self._in_window(idx) and self._group_of_block is not None:
            groups = np.unique(self._group_of_block[idx // self.block_cells])
            if len(groups) <= 2 and (groups >= 0).all():  # a minibatch of a shuffled pass
                self._load_groups(groups)
        if self._in_window(idx):
            rows = self._window[np.searchsorted(self._window_rows, idx)]
        else:
            lo, hi = int(idx.min()), int(idx.max()) + 1
            if hi - lo <= 4 * len(idx) + self.block_cells:
                # a span of an in-order pass (validation, queries): read ahead as far as a
                # shuffled pass does, so the next minibatches come from memory
                stop = min(self.n_cells, max(hi, lo + self.block_cells * self.read_ahead_blocks))
                self._window_rows, self._window = np.arange(lo, stop), self.read(lo, stop)
                rows = self._window[idx - lo]
            else:  # scattered cells: read them sorted, then put them in order
                order = np.argsort(idx)
                rows = self._columns_of(self.matrix[idx[order]])
                rows = rows[np.argsort(order)]
        x = rows.toarray() if sp.issparse(rows) else np.asarray(rows)
        x = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
        b = torch.as_tensor(self.batch_index[idx], device=device)
        return x, b


class ResidentCounts:
    """The counts of a :class:`CountData` held on a device, and gathered there.

    On a GPU, gathering a minibatch on the host and copying it over costs more than the
    step's own work for scVI's small networks; here the CSR arrays (or the dense matrix)
    live on the device and a minibatch is assembled there without a round trip to the
    host. Rows are gathered as a fixed-width block (the widest row's number of stored
    values), so no step waits for the host to learn a minibatch's number of non-zeros.

    With ``dense=True`` sparse counts are held as one dense block instead, and a minibatch
    is one indexed copy: what a CPU run does with small counts (the training engine's
    ``data_placement``).

    It offers the same ``tensors``/``minibatches`` interface as :class:`CountData`, plus
    :meth:`gather` for cell indices already on the device.

    Examples
    --------
    >>> import numpy as np, scipy.sparse as sp, anndata
    >>> X = sp.random(6, 4, density=0.5, format="csr", random_state=0) * 10
    >>> X.data = np.ceil(X.data)
    >>> data = from_anndata(anndata.AnnData(X.astype(np.float32)), allow_empty_cells=True)
    >>> x, b = data.to_device("cpu").tensors(np.array([4, 1]))
    >>> bool((x.numpy() == data.X[[4, 1]].toarray()).all())
    True
    """

    def __init__(
        self, data: CountData, device: torch.device | str, *, dense: bool = False
    ) -> None:
        self.source = data
        self.device = torch.device(device)
        self.n_genes = data.n_genes
        self.batch_index = torch.as_tensor(data.batch_index, device=self.device)
        if dense and sp.issparse(data.X):
            # one dense block: a minibatch is then one indexed copy (a CPU run's choice for
            # small counts, where slicing the CSR matrix costs more; the same values)
            X = data.X.toarray().astype(np.float32, copy=False)
            self.dense = torch.as_tensor(X, device=self.device)
        elif sp.issparse(data.X):
            X = data.X
            self.indptr = torch.as_tensor(X.indptr.astype(np.int64), device=self.device)
            self.indices = torch.as_tensor(X.indices.astype(np.int32), device=self.device)
            self.values = torch.as_tensor(X.data, dtype=torch.float32, device=self.device)
            row_nnz = np.diff(X.indptr)
            self.width = int(row_nnz.max()) if len(row_nnz) else 0
            self._offsets = torch.arange(self.width, device=self.device)
            self.dense = None
        else:
            self.dense = torch.as_tensor(data.X, dtype=torch.float32, device=self.device)

    def __getattr__(self, name: str):
        # n_cells, batch_categories, minibatches, library_log_stats, ...: the source's
        return getattr(self.source, name)

    def gather(self, cell_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(x, batch_index)`` for the cells ``cell_index`` (a tensor on the device)."""
        b = self.batch_index[cell_index]
        if self.dense is not None:
            return self.dense[cell_index], b
        start = self.indptr[cell_index]
        length = self.indptr[cell_index + 1] - start
        # (cells, width) positions into the CSR arrays; those past a row's end are masked
        # to add 0 at column 0, which leaves the row unchanged.
        pos = start[:, None] + self._offsets[None, :]
        inside = self._offsets[None, :] < length[:, None]
        pos = torch.where(inside, pos, torch.zeros_like(pos))
        cols = torch.where(inside, self.indices[pos].long(), torch.zeros_like(pos))
        vals = torch.where(inside, self.values[pos], torch.zeros((), device=self.device))
        x = torch.zeros(len(cell_index), self.n_genes, device=self.device)
        # each (row, column) gets at most one stored value plus exact zeros: the sum is
        # the value whatever the order of the additions
        return x.scatter_add_(1, cols, vals), b

    def tensors(
        self, idx: np.ndarray, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(x, batch_index)`` tensors for the cells ``idx``, on this device."""
        del device  # always this object's device; the argument mirrors CountData.tensors
        return self.gather(torch.as_tensor(np.asarray(idx), device=self.device))


def from_anndata(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    batch_categories: Sequence[str] | None = None,
    var_names: Sequence[str] | None = None,
    allow_empty_cells: bool = False,
    streamed: bool | None = None,
) -> CountData | StreamedCounts:
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
        any order; the counts come out in this order (streamed counts too: each read is
        reordered). Results per gene go back to ``adata``'s order with :func:`gene_order`.
    allow_empty_cells
        Accept cells with zero total counts (used for queries, never for training).
    streamed
        For a backed AnnData (``anndata.read_h5ad(path, backed="r")``): stream the counts
        from the file (:class:`StreamedCounts`) rather than load them. ``None``: the
        engine decides from their size and the free memory
        (:func:`pyro_scvi.data.placement.choose_data_source`); an in-memory AnnData is never
        streamed.

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
    if adata.isbacked:
        from .placement import choose_data_source

        stream, source_reason = choose_data_source(adata, layer=layer, asked=streamed)
        if stream:
            return _streamed(
                adata,
                layer,
                batch_key,
                batch_categories,
                allow_empty_cells,
                source_reason,
                columns=columns,
                var_names=var_names,
            )
        adata = adata.to_memory()
    else:
        source_reason = CountData.source_reason
    if streamed and not adata.isbacked:
        raise InputError(
            "streamed=True needs a backed AnnData: open the file with "
            "`anndata.read_h5ad(path, backed='r')`."
        )
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
        source_reason=source_reason,
    )


#: Cells per read when checking a streamed file.
_CHECK_CELLS = 20_000


def _streamed(
    adata: AnnData,
    layer: str | None,
    batch_key: str | None,
    batch_categories: Sequence[str] | None,
    allow_empty_cells: bool,
    reason: str,
    *,
    columns: np.ndarray | None = None,
    var_names: Sequence[str] | None = None,
) -> StreamedCounts:
    """:class:`StreamedCounts` of a backed AnnData, after one streamed pass of checks."""
    if layer is not None:
        raise InputError(
            f"Streaming reads adata.X only (anndata's backed mode loads layers into memory); "
            f"store the raw counts of layer {layer!r} as X, or load the data with "
            "`adata = adata.to_memory()`."
        )
    matrix = adata.X
    n, g = matrix.shape
    if n == 0 or g == 0:
        raise InputError(f"adata.X is empty ({n} cells x {g} genes).")
    totals = np.empty(n, dtype=np.float64)
    for start in range(0, n, _CHECK_CELLS):
        rows = _check_counts(matrix[start : start + _CHECK_CELLS], f"adata.X (cells {start}+)")
        totals[start : start + rows.shape[0]] = np.asarray(rows.sum(axis=1)).ravel()
    n_empty = int((totals == 0).sum())
    if n_empty and not allow_empty_cells:
        raise InputError(
            f"{n_empty} of {n} cells have zero total counts in adata.X; their library size "
            "is 0, whose log is undefined. Write the file without them (e.g. "
            "`adata[np.asarray(adata.X.sum(1)).ravel() > 0].copy()` on the loaded data)."
        )
    batch_index, categories = _batch_codes(adata, batch_key, batch_categories)
    return StreamedCounts(
        adata,
        batch_index,
        categories,
        adata.obs_names.copy(),
        adata.var_names.copy() if columns is None else pd.Index(var_names),
        totals,
        reason=reason,
        columns=columns,
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
                f"training (known: {list(cats)}); the model cannot encode unseen batches: map "
                "them onto it with SCVI.load_query_data(adata, model)."
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


def gene_order(model_genes: Sequence[str], genes: Sequence[str]) -> np.ndarray | None:
    """Where each of ``genes`` is among ``model_genes``: how per-gene results follow ``genes``.

    A model computes per-gene values in its own gene order (``model_genes``, its
    ``var_names``); ``values[..., gene_order(model_genes, genes)]`` puts them in the order
    of ``genes`` (an AnnData's ``var_names``), so that results are keyed by name whatever
    the order of the AnnData's genes. ``None`` when the orders are the same (nothing to
    do).

    Raises
    ------
    InputError
        ``genes`` are not the model's genes (some missing or extra), naming the fix.

    Examples
    --------
    >>> gene_order(["a", "b", "c"], ["c", "a", "b"]).tolist()
    [2, 0, 1]
    >>> gene_order(["a", "b"], ["a", "b"]) is None
    True
    """
    model_genes = pd.Index(model_genes)
    genes = pd.Index(genes)
    if genes.equals(model_genes):
        return None
    if len(genes) != len(model_genes) or not genes.isin(model_genes).all():
        missing = model_genes.difference(genes)
        extra = genes.difference(model_genes)
        raise InputError(
            f"the AnnData's genes are not the model's ({len(missing)} missing, e.g. "
            f"{list(missing[:3])}; {len(extra)} extra, e.g. {list(extra[:3])}); results are "
            "written per gene by name, so give the model's genes: "
            "`adata = adata[:, model.var_names].copy()`."
        )
    return model_genes.get_indexer(genes)


def check_batch_sizes(data: CountData, batch_size: int) -> None:
    """Check that every batch has at least two cells and the minibatch at least two.

    Batch norm normalizes over a minibatch, which needs two cells, and a batch's
    library prior needs two cells for its spread.
    """
    if batch_size < 2:
        raise InputError(f"batch_size={batch_size}; batch norm needs minibatches of >= 2 cells.")
    counts = np.bincount(data.batch_index, minlength=data.n_batch)
    # a batch with no cells here is a reference's batch of a query model (SCVI.load_query_data)
    small = [(data.batch_categories[b], int(c)) for b, c in enumerate(counts) if 0 < c < 2]
    if small:
        raise InputError(
            f"Batches with fewer than 2 cells: {small}. Each batch needs at least 2 cells "
            "for its library-size prior; merge these into another batch or remove them."
        )


def check_indices(indices, n_cells: int) -> np.ndarray:
    """Cell positions from ``indices`` (integers, negative allowed, or a boolean mask).

    ``None`` means every cell. Raises :class:`~pyro_scvi.InputError` for an empty, out of
    range or ill-typed selection.

    Examples
    --------
    >>> check_indices([0, -1], 5).tolist()
    [0, 4]
    >>> check_indices([True, False, True], 3).tolist()
    [0, 2]
    """
    if indices is None:
        return np.arange(n_cells)
    idx = np.asarray(indices)
    if idx.dtype == bool:
        if idx.shape != (n_cells,):
            raise InputError(f"A boolean mask of cells needs {n_cells} entries, got {idx.shape}.")
        idx = np.flatnonzero(idx)
    if idx.ndim != 1 or len(idx) == 0 or not np.issubdtype(idx.dtype, np.integer):
        raise InputError("indices must be a non-empty 1-d array of integer cell positions.")
    if idx.min() < -n_cells or idx.max() >= n_cells:
        raise InputError(f"indices out of range for {n_cells} cells.")
    return idx % n_cells


def nonempty_cells(adata: AnnData, layer: str | None = None) -> np.ndarray:
    """Boolean mask of the cells with at least one count in ``layer`` (``None``: ``.X``).

    ``SCVI(drop_empty_cells=True)`` and ``pyro-scvi fit --drop-empty-cells`` keep these.

    Examples
    --------
    >>> import anndata, numpy as np
    >>> nonempty_cells(anndata.AnnData(np.array([[0.0, 1.0], [0.0, 0.0]]))).tolist()
    [True, False]
    """
    counts = adata.layers[layer] if layer is not None and layer in adata.layers else adata.X
    return np.asarray(counts.sum(axis=1)).ravel() > 0
