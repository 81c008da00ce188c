"""Per-cell outputs at scale: which normalized expression to write, and writing it in chunks.

``pyro-scvi fit`` writes the latent space for every cell; the posterior-mean normalized
expression is a dense cells x genes matrix (8 GB of float32 at 1,000,000 x 2,000), so
:func:`plan_normalized` decides, in one place, what of it to write:

- ``"auto"`` (the default): the dense layer ``layers["pyro_scvi_normalized"]`` when
  cells x genes is at most :data:`DENSE_NORMALIZED_MAX_ENTRIES`, nothing above;
- ``"all"``: the dense layer whatever its size;
- ``"none"``: no normalized expression;
- chosen genes: only those genes' normalized expression, as a DataFrame
  ``obsm["pyro_scvi_normalized_genes"]`` (cells x chosen genes, one column per gene, indexed
  by the cells' names: AnnData's shape for per-cell values with named columns).

The decision and its reason are recorded (:meth:`NormalizedPlan.record`, in
``uns["pyro_scvi"]["params"]``). :func:`write_normalized` computes what the plan asks for a
chunk of cells at a time and writes each chunk into an ``.h5ad`` already on disk, so neither
the posterior samples nor the dense matrix are ever held whole; :func:`append_elements` adds
in-memory elements (the latent space, ``uns``) to such a file, and :func:`copy_h5ad` copies
an input file byte for byte (for a streamed input, whose counts are never loaded).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError, OutputError
from .files import h5_file

#: Cells x genes above which ``"auto"`` writes no dense normalized layer: 50 million
#: entries, 200 MB of float32 (e.g. 25,000 cells x 2,000 genes). At about 10 % non-zero,
#: sparse counts cost about 8 bytes per non-zero (value and index), so the dense layer is
#: about 5x the counts themselves; at this size it already outweighs the rest of a typical
#: output file, and every ``anndata.read_h5ad`` of the output loads it into memory. Below
#: it (every shipped dataset; PBMC 8k x 200 is 1.6 million) the layer costs little and is
#: written as before. Above it, ask for it (``--normalized all``) or for the genes you need.
DENSE_NORMALIZED_MAX_ENTRIES = 50_000_000

#: Where the outputs go in the ``.h5ad``.
LAYER_KEY = "pyro_scvi_normalized"
GENES_KEY = "pyro_scvi_normalized_genes"

#: Memory for one chunk's posterior samples of ``rho`` (``n_samples x cells x genes``
#: float32); the chunk's cell count follows from it.
CHUNK_BYTES = 64 * 2**20

MODES = ("auto", "all", "none")


@dataclass(frozen=True)
class NormalizedPlan:
    """What normalized expression a run writes, and why.

    Attributes
    ----------
    mode
        ``"auto"``, ``"all"`` or ``"none"`` as asked.
    layer
        Whether the dense cells x genes layer ``layers["pyro_scvi_normalized"]`` is written.
    genes
        The chosen genes written to ``obsm["pyro_scvi_normalized_genes"]`` (empty: none).
    reason
        One sentence: the decision and what led to it.
    """

    mode: str
    layer: bool
    genes: tuple[str, ...]
    reason: str

    @property
    def writes_any(self) -> bool:
        """Whether any normalized expression is written."""
        return self.layer or bool(self.genes)

    def dense_columns(self, n_genes: int) -> int:
        """Float32 values per cell that the plan writes (for disk-space estimates)."""
        return (n_genes if self.layer else 0) + len(self.genes)

    def record(self) -> dict[str, Any]:
        """Entries for ``uns["pyro_scvi"]["params"]``.

        Examples
        --------
        >>> plan = plan_normalized(10, 5, mode="none")
        >>> plan.record()["normalized_layer"], plan.record()["normalized_mode"]
        (False, 'none')
        """
        return {
            "normalized_mode": self.mode,
            "normalized_layer": self.layer,
            "normalized_genes": list(self.genes),
            "normalized_reason": self.reason,
            "normalized_max_entries": int(DENSE_NORMALIZED_MAX_ENTRIES),
        }


def plan_normalized(
    n_cells: int,
    n_genes: int,
    *,
    mode: str = "auto",
    genes: Sequence[str] | None = None,
    var_names: Sequence[str] | None = None,
) -> NormalizedPlan:
    """Decide what normalized expression to write for ``n_cells`` x ``n_genes``.

    Parameters
    ----------
    n_cells, n_genes
        The output's shape.
    mode
        ``"auto"``: the dense layer up to :data:`DENSE_NORMALIZED_MAX_ENTRIES` entries,
        none above; ``"all"``: the dense layer; ``"none"``: nothing.
    genes
        Write only these genes (an ``obsm`` DataFrame); needs ``mode="auto"``. Duplicates
        are dropped, the order kept.
    var_names
        The data's gene names, to check ``genes`` against.

    Returns
    -------
    NormalizedPlan
        The decision and its reason.

    Raises
    ------
    InputError
        An unknown mode, genes given with ``"all"`` or ``"none"``, or genes that are not
        among ``var_names`` (named in the message).

    Examples
    --------
    >>> plan_normalized(1_000, 2_000).layer
    True
    >>> plan = plan_normalized(1_000_000, 2_000)
    >>> plan.layer, plan.reason.split(":")[0]
    (False, 'no dense normalized layer')
    >>> plan_normalized(100, 3, genes=["b"], var_names=["a", "b", "c"]).genes
    ('b',)
    """
    if mode not in MODES:
        raise InputError(f"normalized mode {mode!r}; use one of {', '.join(MODES)}.")
    entries = int(n_cells) * int(n_genes)
    size = f"{n_cells:,} cells x {n_genes:,} genes = {entries:,} entries"
    limit = int(DENSE_NORMALIZED_MAX_ENTRIES)
    if genes:
        if mode != "auto":
            raise InputError(
                f"--normalized {mode} and chosen genes contradict each other: chosen genes "
                "write only those genes; drop --normalized, or the genes."
            )
        chosen = tuple(dict.fromkeys(str(g) for g in genes))
        if var_names is not None:
            known = set(map(str, var_names))
            unknown = [g for g in chosen if g not in known]
            if unknown:
                shown = ", ".join(map(repr, unknown[:5])) + (" ..." if len(unknown) > 5 else "")
                raise InputError(
                    f"{len(unknown)} chosen gene(s) not among INPUT's genes (var_names): "
                    f"{shown}; names must match var_names exactly."
                )
        slashed = [g for g in chosen if "/" in g]
        if slashed:
            raise InputError(
                f"chosen gene(s) {', '.join(map(repr, slashed[:5]))} contain '/', which an "
                ".h5ad cannot hold as a column name; ask for the dense layer instead "
                "(--normalized all)."
            )
        return NormalizedPlan(
            mode,
            False,
            chosen,
            f"chosen genes only: {len(chosen)} gene(s) in obsm[{GENES_KEY!r}] ({size})",
        )
    if mode == "none":
        return NormalizedPlan(mode, False, (), "none: asked for (--normalized none)")
    if mode == "all":
        return NormalizedPlan(mode, True, (), f"dense layer: asked for ({size})")
    if entries <= limit:
        return NormalizedPlan(
            mode, True, (), f"dense layer: {size} <= {limit:,} (DENSE_NORMALIZED_MAX_ENTRIES)"
        )
    return NormalizedPlan(
        mode,
        False,
        (),
        f"no dense normalized layer: {size} ({4 * entries / 1e9:.1f} GB as float32) > "
        f"{limit:,} (DENSE_NORMALIZED_MAX_ENTRIES); ask for it with --normalized all, or for "
        "chosen genes with --normalized-genes GENE ... / --normalized-genes-file FILE",
    )


def read_gene_file(path: str | os.PathLike) -> list[str]:
    r"""Gene names from a text file: one a line; blank lines and ``#`` comments skipped.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "genes.txt"
    >>> _ = p.write_text("# markers\nCD3E\n\nMS4A1\n")
    >>> read_gene_file(p)
    ['CD3E', 'MS4A1']
    """
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise InputError(
            f"cannot read the gene file {path} ({err.strerror or err}); give a text file "
            "with one gene name a line."
        ) from err
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise InputError(f"the gene file {path} names no genes; put one gene name a line.")
    return names


def chunk_cells(n_genes: int, n_samples: int, batch_size: int) -> int:
    """Cells per output chunk: a multiple of ``batch_size`` whose samples fit :data:`CHUNK_BYTES`.

    A multiple of the query's minibatch, so that chunks cut the cells into the same
    minibatches, and draw the same random numbers, as one pass over all cells would.

    Examples
    --------
    >>> chunk_cells(2_000, 10, 256)
    768
    >>> chunk_cells(50_000, 10, 256)  # never below one minibatch
    256
    """
    per_cell = 4 * max(1, n_genes) * max(1, n_samples)
    return max(1, CHUNK_BYTES // per_cell // batch_size) * batch_size


def normalized_chunks(
    model: Any,
    data: Any,
    *,
    library_size: float,
    n_samples: int,
    columns: np.ndarray | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[slice, np.ndarray]]:
    """Posterior-mean normalized expression, one chunk of cells at a time.

    Parameters
    ----------
    model
        A fitted :class:`~pyro_scvi.SCVI` (its ``model``, ``guide`` and ``device``).
    data
        The cells, as the model codes them (``model.data_for(adata)``).
    library_size
        Counts each cell is scaled to.
    n_samples
        Posterior draws averaged.
    columns
        Gene positions to keep (default: all genes).
    batch_size
        Cells per forward pass.

    Yields
    ------
    (slice, numpy.ndarray)
        The chunk's rows and its float32 values, ``(rows, genes or len(columns))``.

    Notes
    -----
    Each minibatch's samples are averaged as they are drawn (``mean=True`` of
    :func:`~pyro_scvi.posterior.queries.normalized_expression`: the same draws and values
    as averaging them all at the end). The query runs with Pyro's argument checks off:
    it computes no log-density, so they would only check the decoder's outputs against
    the distributions' constraints, on every sample of every cell and gene (about a
    quarter of the time on 13,000 genes, ``benchmarks/results/time_to_quality_cellbench.md``);
    the values are the same. Non-finite values (a model whose parameters are not finite)
    are an :class:`~pyro_scvi.InputError` here instead, before anything is written.
    """
    import pyro

    from ..posterior import queries as posterior

    n = data.n_cells
    step = chunk_cells(data.n_genes, n_samples, batch_size)
    for start in range(0, n, step):
        stop = min(n, start + step)
        with pyro.validation_enabled(False):
            values = posterior.normalized_expression(
                model.model,
                model.guide,
                data,
                np.arange(start, stop),
                library_size=library_size,
                n_samples=n_samples,
                batch_size=batch_size,
                device=model.device,
                mean=True,
            )
        if not np.isfinite(values).all():
            raise InputError(
                f"The model's normalized expression of cells {start}-{stop - 1} is not "
                "finite: its parameters are not. Train it again (a run that fails keeps "
                "its last good epoch), or load an earlier save or checkpoint."
            )
        yield slice(start, stop), values if columns is None else values[:, columns]


def write_h5ad(adata: Any, path: str | os.PathLike) -> None:
    """Write the in-memory ``adata`` to a new ``.h5ad`` at ``path``, safely on a full disk.

    As ``adata.write_h5ad(path)`` (its strings become categoricals, as there), but through
    :func:`pyro_scvi.io.files.h5_file`: a disk that fills raises one :class:`OSError`
    instead of leaving HDF5 with a half-written file that can crash the process.

    Examples
    --------
    >>> import tempfile, anndata, numpy as np
    >>> out = Path(tempfile.mkdtemp()) / "a.h5ad"
    >>> adata = anndata.AnnData(np.ones((2, 3), dtype=np.float32))
    >>> adata.raw = adata
    >>> write_h5ad(adata, out)
    >>> back = anndata.read_h5ad(out)
    >>> back.shape, back.raw.shape
    ((2, 3), (2, 3))
    """
    from anndata.io import write_elem

    adata.strings_to_categoricals()
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    with h5_file(path, "w") as f:
        # the elements anndata's own write_h5ad writes, in its order
        f.attrs["encoding-type"], f.attrs["encoding-version"] = "anndata", "0.1.0"
        if adata.X is not None:
            write_elem(f, "X", adata.X)
        if adata.raw is not None:
            write_elem(f, "raw", adata.raw)
        for key in ("obs", "var"):
            write_elem(f, key, getattr(adata, key))
        for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            write_elem(f, key, dict(getattr(adata, key)))


def copy_h5ad(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy the file ``src`` to ``dst`` byte for byte, in bounded memory; ``src`` is only read."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        shutil.copyfileobj(fin, fout, length=16 * 2**20)


def _index(f: Any, slot: str) -> pd.Index:
    """The names of an ``.h5ad``'s ``obs`` or ``var`` (its dataframe's index), as strings."""
    group = f[slot]
    values = group[group.attrs["_index"]][()]
    return pd.Index([v.decode() if isinstance(v, bytes) else str(v) for v in values])


def _drop(group: Any, key: str) -> None:
    if key in group:
        del group[key]


def append_elements(path: str | os.PathLike, elements: Mapping[str, Mapping[str, Any]]) -> None:
    """Write in-memory elements into an ``.h5ad`` on disk, replacing any of the same name.

    ``elements`` maps a slot (``"obsm"``, ``"uns"``) to ``{key: value}``; values are written
    with :func:`anndata.io.write_elem`, so the file reads back as if ``adata.write_h5ad``
    had written them.
    """
    from anndata.io import write_elem

    with h5_file(path, "r+") as f:  # a full disk: one OSError, never a crash
        for slot, items in elements.items():
            group = f.require_group(slot)
            if "encoding-type" not in group.attrs:  # a slot the writer left out
                group.attrs["encoding-type"] = "dict"
                group.attrs["encoding-version"] = "0.1.0"
            for key, value in items.items():
                _drop(group, key)
                write_elem(group, key, value)


def write_normalized(
    path: str | os.PathLike,
    model: Any,
    plan: NormalizedPlan,
    *,
    library_size: float,
    n_samples: int,
    data: Any = None,
    batch_size: int = 256,
) -> None:
    """Write the normalized expression ``plan`` asks for into the ``.h5ad`` at ``path``.

    Computed and written a chunk of cells at a time (:func:`normalized_chunks`): the dense
    layer as ``layers["pyro_scvi_normalized"]`` (float32), chosen genes as the DataFrame
    ``obsm["pyro_scvi_normalized_genes"]``. Either output left in the file by an earlier run
    is removed first, so the file holds only what this plan says.

    Parameters
    ----------
    path
        An ``.h5ad`` holding the model's cells, in order, and its genes in any order: the
        dense layer's columns follow the file's ``var_names`` by name.
    model
        The fitted :class:`~pyro_scvi.SCVI`.
    plan
        From :func:`plan_normalized`.
    library_size, n_samples, batch_size
        As in :func:`normalized_chunks`.
    data
        The cells as the model codes them (default: the model's own, ``model.data``).
    """
    from anndata.io import write_elem

    from ..data import gene_order

    data = model.data if data is None else data
    n, n_genes = data.n_cells, data.n_genes
    var_names = [str(v) for v in data.var_names]
    columns = np.array([var_names.index(g) for g in plan.genes], dtype=np.int64)
    with h5_file(path, "r+") as f:  # a full disk: one OSError, never a crash
        # Rows and columns are matched by name to what the file holds: the model's values
        # come in its own cell and gene order, the file may have its genes in another.
        cells = _index(f, "obs")
        if len(cells) != n or not cells.equals(pd.Index(data.obs_names).astype(str)):
            raise OutputError(
                f"{path} does not hold the model's {n} cells in its order; nothing of the "
                "normalized expression was written (write it from the model's own AnnData)."
            )
        order = gene_order(data.var_names.astype(str), _index(f, "var")) if plan.layer else None
        layers, obsm = f.require_group("layers"), f.require_group("obsm")
        for group in (layers, obsm):
            if "encoding-type" not in group.attrs:
                group.attrs["encoding-type"] = "dict"
                group.attrs["encoding-version"] = "0.1.0"
        _drop(layers, LAYER_KEY)
        _drop(obsm, GENES_KEY)
        if not plan.writes_any:
            return
        dense = gene_sets = None
        if plan.layer:
            rows = max(1, min(n, 2**20 // max(1, n_genes)))  # HDF5 chunks of about 4 MB
            dense = layers.create_dataset(
                LAYER_KEY, shape=(n, n_genes), dtype=np.float32, chunks=(rows, n_genes)
            )
            dense.attrs["encoding-type"] = "array"
            dense.attrs["encoding-version"] = "0.2.0"
        if plan.genes:
            frame = obsm.create_group(GENES_KEY)
            frame.attrs["encoding-type"] = "dataframe"
            frame.attrs["encoding-version"] = "0.2.0"
            frame.attrs["_index"] = "_index"
            frame.attrs["column-order"] = np.array(plan.genes, dtype=object)
            write_elem(frame, "_index", np.asarray(data.obs_names, dtype=object).astype(str))
            gene_sets = []
            for gene in plan.genes:
                column = frame.create_dataset(gene, shape=(n,), dtype=np.float32)
                column.attrs["encoding-type"] = "array"
                column.attrs["encoding-version"] = "0.2.0"
                gene_sets.append(column)
        for rows, values in normalized_chunks(
            model,
            data,
            library_size=library_size,
            n_samples=n_samples,
            batch_size=batch_size,
        ):
            if dense is not None:
                dense[rows] = values if order is None else values[:, order]
            if gene_sets is not None:
                picked = values[:, columns]
                for j, column in enumerate(gene_sets):
                    column[rows] = picked[:, j]
