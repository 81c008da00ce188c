"""Large synthetic count matrices, generated in chunks: in memory or written to ``.h5ad``.

:func:`nb_count_chunks` draws negative-binomial counts with cell types and batches, chunk
by chunk (on a CPU or a GPU, with torch); :func:`write_synthetic_h5ad` writes them to an
``.h5ad`` as they come, so a 1,000,000 x 2,000 file never sits in memory whole;
:func:`synthetic_counts` gathers them into an in-memory AnnData.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

#: Median UMIs per cell per gene: about 10 % of entries are non-zero at any gene count.
LIBRARY_PER_GENE = 0.15


def nb_count_chunks(
    n_cells: int,
    n_genes: int,
    *,
    n_types: int = 10,
    n_batches: int = 4,
    chunk: int = 50_000,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[sp.csr_matrix, np.ndarray, np.ndarray]]:
    """Yield ``(counts, cell_types, batches)`` for consecutive chunks of cells.

    Gene proportions are gamma-distributed (shape 0.3); each cell type shifts 10 % of the
    genes by normal log-fold changes (sd 1.5); each batch scales genes by log-normal
    factors (sd 0.2); library sizes are log-normal (median :data:`LIBRARY_PER_GENE` x
    genes, sd 0.4 on the log scale); counts are negative binomial with dispersion 2. Cells
    that draw no counts at all are kept (drop them before training).

    Examples
    --------
    >>> counts, types, batches = next(nb_count_chunks(100, 50, chunk=60))
    >>> counts.shape, types.shape, int(batches.max()) < 4
    ((60, 50), (60,), True)
    """
    g = torch.Generator(device=device).manual_seed(seed)

    def draw(*shape, fn=torch.rand):
        return fn(*shape, generator=g, device=device)

    base = torch._standard_gamma(torch.full((n_genes,), 0.3, device=device), generator=g)
    log_p = torch.log(base / base.sum() + 1e-12)
    shifts = draw(n_types, n_genes, fn=torch.randn) * 1.5 * (draw(n_types, n_genes) < 0.1)
    type_log_p = torch.log_softmax(log_p + shifts, dim=1)
    batch_log_factor = draw(n_batches, n_genes, fn=torch.randn) * 0.2
    log_median = math.log(LIBRARY_PER_GENE * n_genes)
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        types = torch.randint(n_types, (n,), generator=g, device=device)
        batches = torch.randint(n_batches, (n,), generator=g, device=device)
        log_lib = log_median + 0.4 * draw(n, 1, fn=torch.randn)
        rate = torch.exp(log_lib + type_log_p[types] + batch_log_factor[batches])
        noise = torch._standard_gamma(torch.full_like(rate, 2.0), generator=g) / 2.0
        counts = torch.poisson(rate * noise, generator=g)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            csr = counts.to_sparse_csr()
        yield (
            sp.csr_matrix(
                (
                    csr.values().float().cpu().numpy(),
                    csr.col_indices().cpu().numpy().astype(np.int32),
                    csr.crow_indices().cpu().numpy().astype(np.int64),
                ),
                shape=(n, n_genes),
            ),
            types.cpu().numpy(),
            batches.cpu().numpy(),
        )


def _annotations(types: np.ndarray, batches: np.ndarray, n_genes: int, offset: int = 0):
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{i}" for i in types]),
            "batch": pd.Categorical([f"batch{i}" for i in batches]),
        },
        index=[f"cell{offset + i}" for i in range(len(types))],
    )
    var = pd.DataFrame(index=[f"gene{j}" for j in range(n_genes)])
    return obs, var


def synthetic_counts(
    n_cells: int, n_genes: int, *, seed: int = 0, device: torch.device | str = "cpu", **kw
) -> anndata.AnnData:
    """:func:`nb_count_chunks` as one in-memory AnnData (CSR), cells without counts dropped.

    Examples
    --------
    >>> adata = synthetic_counts(200, 100)
    >>> 0.05 < adata.X.nnz / (adata.n_obs * adata.n_vars) < 0.2
    True
    """
    parts = list(nb_count_chunks(n_cells, n_genes, seed=seed, device=device, **kw))
    X = sp.vstack([p[0] for p in parts], format="csr")
    obs, var = _annotations(
        np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]), n_genes
    )
    keep = np.asarray(X.sum(axis=1)).ravel() > 0
    return anndata.AnnData(X[keep], obs=obs[keep], var=var)


def write_synthetic_h5ad(
    path: str | os.PathLike,
    n_cells: int,
    n_genes: int = 2000,
    *,
    seed: int = 0,
    chunk: int = 50_000,
    progress_bar: bool = False,
    **kw,
) -> Path:
    """Write :func:`nb_count_chunks` to an ``.h5ad`` chunk by chunk (memory: one chunk).

    ``X`` is CSR float32 raw counts; ``obs`` has ``cell_type`` and ``batch``. Cells that
    drew no counts are left out. The file is written under a temporary name and renamed
    into place.

    Examples
    --------
    >>> import tempfile, anndata
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = write_synthetic_h5ad(f"{d}/s.h5ad", 300, 40, chunk=100)
    ...     a = anndata.read_h5ad(p, backed="r")
    ...     a.n_vars, list(a.obs.columns)
    (40, ['cell_type', 'batch'])
    """
    import h5py
    from anndata.io import sparse_dataset, write_elem
    from tqdm.auto import tqdm

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    obs_parts, var = [], None
    try:
        with h5py.File(tmp, "w") as f:
            written = 0
            chunks = nb_count_chunks(n_cells, n_genes, seed=seed, chunk=chunk, **kw)
            total = math.ceil(n_cells / chunk)
            for counts, types, batches in tqdm(
                chunks, total=total, desc="Writing", unit="chunk", disable=not progress_bar
            ):
                keep = np.asarray(counts.sum(axis=1)).ravel() > 0
                counts = counts[keep]
                obs, var = _annotations(types[keep], batches[keep], n_genes, offset=written)
                obs_parts.append(obs)
                if written == 0:
                    write_elem(f, "X", counts)
                else:
                    sparse_dataset(f["X"]).append(counts)
                written += counts.shape[0]
            obs = pd.concat(obs_parts)
            # one set of categories for the whole file
            for col in ("cell_type", "batch"):
                obs[col] = pd.Categorical(obs[col].astype(str))
            write_elem(f, "obs", obs)
            write_elem(f, "var", var)
            for key in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
                write_elem(f, key, {})
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
