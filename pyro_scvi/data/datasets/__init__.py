"""Datasets: a small real dataset shipped with the package, and a ZINB simulator.

``pbmc8k_200hvg()`` loads 7,448 PBMCs x 200 highly variable genes (10x Genomics, Zheng et al.
2017); provenance and license are in ``README.md`` beside this file.
``synthetic_zinb()`` simulates counts from a ZINB model with known clusters and batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Shipped datasets, by name.
SHIPPED = {"pbmc8k_200hvg": "pbmc8k_200hvg.h5ad"}


def path(name: str = "pbmc8k_200hvg") -> Path:
    """Path of a shipped dataset's ``.h5ad`` file."""
    if name not in SHIPPED:
        raise KeyError(f"No shipped dataset {name!r}; available: {sorted(SHIPPED)}.")
    return Path(str(files(__name__) / SHIPPED[name]))


def pbmc8k_200hvg() -> anndata.AnnData:
    """7,448 PBMCs x 200 HVGs of raw UMI counts, with ``obs['cell_type']`` and ``obs['batch']``.

    Examples
    --------
    >>> adata = pbmc8k_200hvg()
    >>> adata.shape
    (7448, 200)
    """
    return anndata.read_h5ad(path("pbmc8k_200hvg"))


def synthetic_zinb(
    n_cells: int = 1000,
    n_genes: int = 100,
    *,
    n_clusters: int = 3,
    n_batches: int = 1,
    de_fraction: float = 0.3,
    lfc_scale: float = 1.5,
    batch_effect: float = 0.0,
    library_log_mean: float | Sequence[float] = 7.0,
    library_log_sd: float = 0.3,
    gate_max: float = 0.2,
    seed: int = 0,
) -> anndata.AnnData:
    """Simulate raw counts from a ZINB model with known clusters and batches.

    Each cluster up- or down-regulates a random ``de_fraction`` of genes by
    ``N(0, lfc_scale)`` log fold changes around a shared baseline; each batch multiplies
    every gene by ``exp(N(0, batch_effect))``. Counts are NB(mu, theta) (a Gamma-Poisson
    mixture) with ``mu = library * frequency``, then zeroed with a per-gene probability up
    to ``gate_max``. Library sizes are log-normal with mean ``library_log_mean`` (one value,
    or one per batch: batches of very different sequencing depth) and sd ``library_log_sd``.

    Returns
    -------
    anndata.AnnData
        CSR integer counts in ``.X``; ``obs['cell_type']``, ``obs['batch']``; the truth in
        ``uns['simulation']``: ``log_fold_change`` (clusters x genes) and ``batch_shift``.

    Examples
    --------
    >>> adata = synthetic_zinb(n_cells=50, n_genes=20, n_batches=2, seed=1)
    >>> adata.shape, sorted(adata.obs["batch"].unique())
    ((50, 20), ['batch0', 'batch1'])
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.0, n_genes)
    lfc = np.zeros((n_clusters, n_genes))
    for k in range(n_clusters):
        genes = rng.choice(n_genes, max(1, int(de_fraction * n_genes)), replace=False)
        lfc[k, genes] = rng.normal(0.0, lfc_scale, len(genes))
    batch_shift = (
        rng.normal(0.0, batch_effect, (n_batches, n_genes))
        if batch_effect
        else (np.zeros((n_batches, n_genes)))
    )
    cluster = rng.integers(0, n_clusters, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    logits = base + lfc[cluster] + batch_shift[batch]
    freq = np.exp(logits - logits.max(1, keepdims=True))
    freq /= freq.sum(1, keepdims=True)
    log_means = np.atleast_1d(np.asarray(library_log_mean, dtype=float))
    if len(log_means) not in (1, n_batches):
        raise ValueError(
            f"library_log_mean has {len(log_means)} values; give one, or one per batch "
            f"({n_batches})."
        )
    log_means = np.broadcast_to(log_means, (n_batches,))
    library = np.exp(rng.normal(log_means[batch], library_log_sd))
    mu = library[:, None] * freq
    theta = np.exp(rng.normal(1.0, 0.5, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    gate = rng.uniform(0.0, gate_max, n_genes)
    counts[rng.random(counts.shape) < gate] = 0
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical([f"type{k}" for k in cluster]),
            "batch": pd.Categorical([f"batch{b}" for b in batch]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.int32)), obs=obs, var=var)
    adata.uns["simulation"] = {"log_fold_change": lfc, "batch_shift": batch_shift}
    return adata
