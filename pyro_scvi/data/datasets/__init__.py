"""Datasets: six small real datasets, a ZINB simulator and simulators with known truth.

Real data, each returned in the package's AnnData contract (raw integer counts in ``.X`` as
CSR, ``obs["cell_type"]``, ``obs["batch"]``, a provenance note in ``uns["source"]``):

- :func:`pbmc8k_200hvg`: 7,448 x 200, one batch (ships with the package);
- :func:`cellbench_3cl_2tech`: 450 x 13,033, two technologies;
- :func:`zeisel_cortex_subset`: 1,464 x 1,000, one batch;
- :func:`baron_pancreas`: 2,812 x 2,000, two donors;
- :func:`worm_neurons`: 4,186 x 13,488, one batch, 98.6 % zeros;
- :func:`onek1k_pbmc_40donors`: 7,811 x 1,000, 40 donors.

A dataset is read from the ``data_dir`` argument, else ``$PYRO_SCVI_DATA``, else the
package (PBMC only), else the user cache; where it is in none of them, its original files
are downloaded from their public repository at a pinned commit, checked against their
SHA-256, converted and cached (see ``_registry.py`` beside this file). A local
``.h5ad`` must have the SHA-256 of the registry (:data:`REGISTRY`).

``synthetic_zinb()`` simulates counts from a ZINB model with known clusters and batches;
:mod:`~pyro_scvi.data.datasets.de_truth` and
:mod:`~pyro_scvi.data.datasets.synthetic_large` hold more simulators.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..._docs import fill
from ._registry import (
    CACHE_ENV,
    DATA_ENV,
    REGISTRY,
    ChecksumError,
    Dataset,
    DatasetError,
    DatasetUnavailableError,
    Source,
    cache_dir,
    content_sha256,
    entry,
    fetch,
    fetch_all,
    load,
    names,
    sha256,
)

__all__ = [
    "CACHE_ENV",
    "DATA_ENV",
    "REGISTRY",
    "SHIPPED",
    "ChecksumError",
    "Dataset",
    "DatasetError",
    "DatasetUnavailableError",
    "Source",
    "baron_pancreas",
    "cache_dir",
    "cellbench_3cl_2tech",
    "content_sha256",
    "entry",
    "fetch",
    "fetch_all",
    "load",
    "names",
    "onek1k_pbmc_40donors",
    "path",
    "pbmc8k_200hvg",
    "sha256",
    "synthetic_zinb",
    "worm_neurons",
    "zeisel_cortex_subset",
]

#: Shipped datasets, by name.
SHIPPED = {"pbmc8k_200hvg": "pbmc8k_200hvg.h5ad"}

_Folder = str | os.PathLike | None

#: Docstring entries the loaders share, filled in by :func:`_loader_doc`.
_LOADER_DOCS = {
    "data_dir": """data_dir
    A folder searched first for the dataset's ``.h5ad``; then ``$PYRO_SCVI_DATA``,
    the user cache; else the source is downloaded (see :func:`fetch`).""",
    "download": """download
    ``False``: never download; raise :class:`DatasetUnavailableError` instead.""",
    "contract": """anndata.AnnData
    Raw integer counts in ``.X`` (CSR, int32), ``obs["cell_type"]``,
    ``obs["batch"]``, ``uns["source"]``.""",
}


def _loader_doc(loader):
    """Fill the ``{data_dir}``, ``{download}`` and ``{contract}`` lines of a loader's docstring."""
    if loader.__doc__:  # None under python -OO
        loader.__doc__ = fill(loader.__doc__, _LOADER_DOCS)
    return loader


def path(name: str = "pbmc8k_200hvg") -> Path:
    """Path of a shipped dataset's ``.h5ad`` file (see :func:`fetch` for all datasets)."""
    if name not in SHIPPED:
        raise KeyError(f"No shipped dataset {name!r}; available: {sorted(SHIPPED)}.")
    return Path(str(files(__name__) / SHIPPED[name]))


@_loader_doc
def pbmc8k_200hvg(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """7,448 PBMCs x 200 highly variable genes, raw UMI counts; ships with the package.

    Source: the GitHub repository ``maren-ha/scVI.jl``, file ``data/pbmc.h5ad`` (commit
    28963f7b), from 10x Genomics' PBMC8k, preprocessed with the Bioconductor OSCA workflow
    (whose labels ``cell_type`` are) and cut to 200 highly variable genes; the 32 cells
    labelled "NA" are dropped. ``batch``: one batch, ``"pbmc8k"``.

    Shape 7,448 x 200, 1,947,145 counts, 81.8 % zeros. ``cell_type``: CD8+ T-cells 2,740,
    Monocytes 1,583, CD4+ T-cells 1,541, B-cells 1,167, NK cells 408, HSC 8,
    Erythrocytes 1.

    Licence: scVI.jl is BSD-3-Clause; 10x Genomics' public datasets are CC BY 4.0.

    Parameters
    ----------
    data_dir
        A folder searched first for the dataset's ``.h5ad``; then ``$PYRO_SCVI_DATA``,
        the package, the user cache; else the source is downloaded (see :func:`fetch`).
    {download}

    Returns
    -------
    {contract}

    References
    ----------
    Zheng, G. X. Y. et al. (2017). Massively parallel digital transcriptional profiling of
    single cells. Nat. Commun. 8:14049.

    Examples
    --------
    >>> adata = pbmc8k_200hvg()
    >>> adata.shape
    (7448, 200)
    """
    return load("pbmc8k_200hvg", data_dir=data_dir, download=download)


@_loader_doc
def cellbench_3cl_2tech(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """CellBench: three lung adenocarcinoma cell lines, each sequenced by two technologies.

    A batch-correction dataset: ``cell_type`` is the cell line (H1975 182, HCC827 136,
    H2228 132), ``batch`` the technology (CEL-seq2 240, Drop-seq 210), and every cell line
    is in both batches. Shape 450 x 13,033 (gene symbols), 13,611,243 counts, 54.9 % zeros.

    Source: the GitHub repository ``LuyiTian/sc_mixology`` (commit 19667e11), files
    ``data/csv/sc_celseq2.count.csv.gz``, ``sc_celseq2.metadata.csv.gz``,
    ``sc_dropseq.count.csv.gz`` and ``sc_dropseq.metadata.csv.gz`` (GEO GSE118767). Kept:
    the cells that demuxlet calls singlets and that are not QC outliers; the genes
    measured by both technologies. Their Ensembl IDs are mapped to symbols by the table
    ``cellbench_genes.csv`` shipped with the package (Bioconductor ``org.Hs.eg.db``);
    unmapped IDs are dropped and the counts of IDs sharing a symbol summed.

    Licence: the sc_mixology repository is MIT.

    Parameters
    ----------
    {data_dir}
    {download}

    Returns
    -------
    {contract}

    References
    ----------
    Tian, L. et al. (2019). Benchmarking single cell RNA-sequencing analysis pipelines
    using mixture control experiments. Nat. Methods 16:479-487.

    Examples
    --------
    >>> adata = cellbench_3cl_2tech()  # doctest: +SKIP
    >>> adata.obs.groupby(["batch", "cell_type"], observed=True).size()  # doctest: +SKIP
    """
    return load("cellbench_3cl_2tech", data_dir=data_dir, download=download)


@_loader_doc
def zeisel_cortex_subset(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """1,464 mouse cortex and hippocampus cells x 1,000 genes (Zeisel et al. 2015), UMIs.

    A subset, not the full CORTEX set of the scVI paper (3,005 cells x 19,972 genes, 7
    types): 3 cell types, ``cell_type``: pyramidal CA1 939, interneurons 290,
    endothelial-mural 235. ``batch``: one batch, ``"zeisel2015"``. Shape 1,464 x 1,000,
    2,369,066 counts, 56.1 % zeros.

    Source: the example data of the R package ``descend``, GitHub repository
    ``jingshuw/descend`` (commit 18afd4cf), file ``data/zeisel.rda``, object
    ``count.matrix.large`` of the list ``zeisel`` (read with the ``rdata`` package). The
    data are public in GEO (GSE60361).

    Licence: descend is GPL (>= 2).

    Parameters
    ----------
    {data_dir}
    {download}

    Returns
    -------
    {contract}

    References
    ----------
    Zeisel, A. et al. (2015). Cell types in the mouse cortex and hippocampus revealed by
    single-cell RNA-seq. Science 347:1138-1142.
    Wang, J. et al. (2018). Gene expression distribution deconvolution in single-cell RNA
    sequencing. PNAS 115:E6437-E6446 (descend).

    Examples
    --------
    >>> zeisel_cortex_subset().shape  # doctest: +SKIP
    (1464, 1000)
    """
    return load("zeisel_cortex_subset", data_dir=data_dir, download=download)


@_loader_doc
def baron_pancreas(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """2,812 human pancreas cells x 2,000 genes of two donors (Baron et al. 2016), inDrop UMIs.

    ``cell_type``: alpha 960, beta 866, ductal 581, delta 226, gamma 149, endothelial 30.
    ``batch``: the donor, read from the cell's name (human2 1,582, human4 1,230);
    ``library``: the five inDrop libraries. Shape 2,812 x 2,000 (gene symbols chosen by
    the NeuCA authors), 12,180,895 counts, 54.0 % zeros.

    Source: the GitHub repository ``haoharryfeng/NeuCA`` (commit 239179ab), file
    ``data/Baron_scRNA.RData``, objects ``Baron_counts`` and ``Baron_true_cell_label``
    (read with the ``rdata`` package); GEO GSE84133.

    Licence: NeuCA is GPL-2; no separate licence for the data is stated.

    Parameters
    ----------
    {data_dir}
    {download}

    Returns
    -------
    anndata.AnnData
        Raw integer counts in ``.X`` (CSR, int32), ``obs["cell_type"]``,
        ``obs["batch"]``, ``obs["library"]``, ``uns["source"]``.

    References
    ----------
    Baron, M. et al. (2016). A single-cell transcriptomic map of the human and mouse
    pancreas reveals inter- and intra-cell population structure. Cell Systems 3:346-360.

    Examples
    --------
    >>> baron_pancreas().obs["batch"].value_counts()  # doctest: +SKIP
    """
    return load("baron_pancreas", data_dir=data_dir, download=download)


@_loader_doc
def worm_neurons(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """4,186 C. elegans neurons x 13,488 genes, sci-RNA-seq (Cao et al. 2017); very sparse.

    As preprocessed for scDeepCluster. The source names neither genes nor labels:
    ``var_names`` are ``gene_00000``..., ``cell_type`` the source's integer labels
    ``"1"``..``"10"`` (842, 334, 1,015, 443, 400, 314, 305, 224, 239, 70 cells).
    ``batch``: one batch, ``"batch0"``. Shape 4,186 x 13,488, 1,376,141 counts, 98.6 %
    zeros.

    Source: the GitHub repository ``ttgump/scDeepCluster``, file
    ``scRNA-seq data/worm_neuron_cell.h5`` of commit ae033d7e (since removed from the
    repository's head), datasets ``X`` and ``Y`` (read with ``h5py``).

    Licence: scDeepCluster is Apache-2.0; no separate licence for the data is stated.

    Parameters
    ----------
    {data_dir}
    {download}

    Returns
    -------
    {contract}

    References
    ----------
    Cao, J. et al. (2017). Comprehensive single-cell transcriptional profiling of a
    multicellular organism. Science 357:661-667.
    Tian, T., Wan, J., Song, Q. and Wei, Z. (2019). Clustering single-cell RNA-seq data
    with a model-based deep learning approach. Nat. Mach. Intell. 1:191-198.

    Examples
    --------
    >>> worm_neurons().shape  # doctest: +SKIP
    (4186, 13488)
    """
    return load("worm_neurons", data_dir=data_dir, download=download)


@_loader_doc
def onek1k_pbmc_40donors(*, data_dir: _Folder = None, download: bool = True) -> anndata.AnnData:
    """7,811 PBMCs x 1,000 genes of 40 donors from OneK1K (Yazar et al. 2022), 10x UMIs.

    Many batches: ``batch`` is the donor (``SAMP1``..``SAMP40``, 85-318 cells each).
    ``cell_type``: cd4nc 3,606, bmem 1,766, monoc 1,750, mononc 689 (OneK1K's labels: CD4
    naive/central memory T, memory B, classical and non-classical monocytes). ``sex``
    (coded 1/2 in the source, coding undocumented) and ``age`` as strings. Genes are
    Ensembl IDs (the source has no symbols). Shape 7,811 x 1,000, 5,527,545 counts, 88.6 %
    zeros.

    Source: the GitHub repository ``chrisycd/scDesignPop`` (commit 2622d1d6), file
    ``data/example_sce.rda``, the ``SingleCellExperiment`` ``example_sce``: its ``counts``
    assay and ``colData`` (read with the ``rdata`` package).

    Licence: scDesignPop is MIT; no separate licence for the data is stated.

    Parameters
    ----------
    {data_dir}
    {download}

    Returns
    -------
    anndata.AnnData
        Raw integer counts in ``.X`` (CSR, int32), ``obs["cell_type"]``,
        ``obs["batch"]``, ``obs["sex"]``, ``obs["age"]``, ``uns["source"]``.

    References
    ----------
    Yazar, S. et al. (2022). Single-cell eQTL mapping identifies cell type-specific
    genetic control of autoimmune disease. Science 376:eabf3041.

    Examples
    --------
    >>> onek1k_pbmc_40donors().obs["batch"].nunique()  # doctest: +SKIP
    40
    """
    return load("onek1k_pbmc_40donors", data_dir=data_dir, download=download)


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
