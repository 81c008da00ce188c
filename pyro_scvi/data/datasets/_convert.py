"""Converters from each dataset's original file format to the package's AnnData contract.

The contract: raw integer counts in ``.X`` (CSR, int32, cells x genes), ``obs["cell_type"]``
and ``obs["batch"]`` as categoricals of strings (other ``obs`` columns where the source has
them), an empty ``var`` indexed by the gene names. ``uns["source"]`` is set by the caller
from the registry. Every converter takes the paths of its source files, in the order that
the registry lists them, and reproduces the ``.h5ad`` that the registry's SHA-256 names.

R data (``.rda``/``.RData``) are read with the ``rdata`` package, HDF5 with ``h5py``,
CSV with pandas: no format is parsed here by hand.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from importlib.resources import files
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

#: Ensembl ID -> gene symbol for the CellBench genes (see :func:`sc_mixology_csv`).
CELLBENCH_GENES = "cellbench_genes.csv"


def contract(
    counts, obs_names: Sequence[str], var_names: Sequence[str], obs: Mapping[str, Sequence]
) -> anndata.AnnData:
    """An AnnData of the contract from cells x genes ``counts`` and ``obs`` columns.

    ``counts`` (dense or sparse) must be non-negative and integer-valued; ``obs`` values
    become categoricals of their string forms, in the order given.

    Examples
    --------
    >>> a = contract(np.array([[1, 0], [2, 3]]), ["c1", "c2"], ["g1", "g2"],
    ...              {"cell_type": ["t", "u"], "batch": [0, 0]})
    >>> a.X.format, a.X.dtype.name, list(a.obs["batch"].cat.categories)
    ('csr', 'int32', ['0'])
    """
    X = sp.csr_matrix(counts)
    if X.nnz and (X.data.min() < 0 or not np.array_equal(X.data, np.round(X.data))):
        raise ValueError("the source's counts are not non-negative integers")
    if X.nnz and X.data.max() > np.iinfo(np.int32).max:
        raise ValueError("the source's counts do not fit in int32")
    X = sp.csr_matrix(X, dtype=np.int32)
    X.eliminate_zeros()
    X.sort_indices()
    frame = pd.DataFrame(
        {key: pd.Categorical(np.asarray(values).astype(str)) for key, values in obs.items()},
        index=pd.Index(np.asarray(obs_names).astype(str)),
    )
    var = pd.DataFrame(index=pd.Index(np.asarray(var_names).astype(str)))
    return anndata.AnnData(X, obs=frame, var=var)


def _read_r(path: Path) -> dict:
    """The objects of an R data file, read by ``rdata``.

    Bioconductor's S4 classes come back as namespaces of their slots; ``rdata`` warns that
    it has no Python class for them, which is expected here.
    """
    import rdata

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Missing constructor for R class", UserWarning)
        return rdata.read_rda(path)


def scvi_jl_h5ad(paths: Sequence[Path]) -> anndata.AnnData:
    """PBMC8k of ``maren-ha/scVI.jl`` (``data/pbmc.h5ad``): drop the cells labelled "NA".

    The source holds the counts in ``.X`` and ``layers["counts"]`` (float, dense) and
    ``obs["cell_type"]``; the batch is the single ``"pbmc8k"``.
    """
    src = anndata.read_h5ad(paths[0])
    keep = (src.obs["cell_type"].astype(str) != "NA").to_numpy()
    counts = np.asarray(src.layers["counts"])[keep]
    labels = src.obs["cell_type"].astype(str).to_numpy()[keep]
    return contract(
        counts,
        src.obs_names[keep],
        src.var_names,
        {"cell_type": labels, "batch": np.full(keep.sum(), "pbmc8k")},
    )


def sc_mixology_csv(paths: Sequence[Path]) -> anndata.AnnData:
    """CellBench 3 cell lines from ``LuyiTian/sc_mixology``: CEL-seq2 and Drop-seq.

    ``paths``: the CEL-seq2 counts and metadata, then the Drop-seq counts and metadata
    (``data/csv/sc_celseq2.count.csv.gz`` ...; genes x cells, Ensembl IDs). Kept: cells
    that demuxlet calls singlets (``demuxlet_cls == "SNG"``) and that are not QC outliers;
    ``cell_type`` is the cell line, ``batch`` the technology, and cells are named
    ``"<technology>:<barcode>"``. Genes: the Ensembl IDs measured by both technologies, in
    sorted order, mapped to symbols by the table ``cellbench_genes.csv`` shipped beside
    this file (Bioconductor ``org.Hs.eg.db``, as used for the shared ``.h5ad``; unmapped
    IDs dropped); counts of IDs with the same symbol are summed, the symbol placed where
    its first ID falls.
    """
    techs = {"CEL-seq2": paths[0:2], "Drop-seq": paths[2:4]}
    parts, names, lines = [], [], []
    for tech, (count_path, meta_path) in techs.items():
        counts = pd.read_csv(count_path, index_col=0)
        meta = pd.read_csv(meta_path, index_col=0)
        outlier = meta["outliers"].astype(str).str.upper() == "TRUE"
        singlets = (meta["demuxlet_cls"] == "SNG") & ~outlier
        cells = meta.index[singlets.to_numpy()]
        parts.append(counts[cells])
        names.extend(f"{tech}:{cell}" for cell in cells)
        lines.extend(meta.loc[cells, "cell_line"].astype(str))
    common = parts[0].index.intersection(parts[1].index).sort_values()
    table = pd.read_csv(
        Path(str(files(__package__) / CELLBENCH_GENES)), index_col=0, keep_default_na=False
    )
    symbols = table["symbol"].reindex(common)
    mapped = common[symbols.notna().to_numpy()]
    symbols = symbols.dropna().to_numpy()
    cells_x_ids = np.concatenate([p.loc[mapped].to_numpy().T for p in parts], axis=0)
    order = pd.unique(symbols)
    column = pd.Series(np.arange(len(order)), index=order)[symbols].to_numpy()
    summing = sp.csr_matrix(
        (np.ones(len(mapped), dtype=np.int64), (np.arange(len(mapped)), column)),
        shape=(len(mapped), len(order)),
    )
    counts = sp.csr_matrix(cells_x_ids.astype(np.int64)) @ summing
    techs_of_cells = [name.split(":", 1)[0] for name in names]
    return contract(counts, names, order, {"cell_type": lines, "batch": techs_of_cells})


def descend_rda(paths: Sequence[Path]) -> anndata.AnnData:
    """Zeisel's cortex subset of ``jingshuw/descend`` (``data/zeisel.rda``).

    The R list ``zeisel``: ``count.matrix.large`` (1,000 genes x 1,464 cells, with gene and
    cell names) and ``labels``; the batch is the single ``"zeisel2015"``.
    """
    zeisel = _read_r(paths[0])["zeisel"]
    matrix = zeisel["count.matrix.large"]  # an xarray.DataArray, genes x cells
    genes, cells = (matrix.coords[d].to_numpy() for d in matrix.dims)
    return contract(
        matrix.to_numpy().T,
        cells,
        genes,
        {"cell_type": zeisel["labels"], "batch": np.full(len(cells), "zeisel2015")},
    )


def neuca_rdata(paths: Sequence[Path]) -> anndata.AnnData:
    """Baron's pancreas subset of ``haoharryfeng/NeuCA`` (``data/Baron_scRNA.RData``).

    Objects ``Baron_counts`` (2,000 genes x 2,812 cells) and ``Baron_true_cell_label``.
    A cell's name, ``human2_lib1.final_cell_0001``, gives its donor (``batch``,
    ``"human2"``) and its inDrop library (``library``, ``"human2_lib1"``).
    """
    objects = _read_r(paths[0])
    matrix = objects["Baron_counts"]
    genes, cells = (matrix.coords[d].to_numpy() for d in matrix.dims)
    library = np.array([str(c).split(".", 1)[0] for c in cells])
    donor = np.array([lib.split("_", 1)[0] for lib in library])
    return contract(
        matrix.to_numpy().T,
        cells,
        genes,
        {"cell_type": objects["Baron_true_cell_label"], "batch": donor, "library": library},
    )


def scdeepcluster_h5(paths: Sequence[Path]) -> anndata.AnnData:
    """C. elegans neurons of ``ttgump/scDeepCluster`` (``worm_neuron_cell.h5``).

    Datasets ``X`` (cells x genes counts, stored as float) and ``Y`` (integer labels, as
    float). The file names neither genes nor cells nor labels: genes become
    ``gene_00000``..., cells ``cell_00000``..., ``cell_type`` the label's integer as a
    string; the batch is the single ``"batch0"``.
    """
    import h5py

    with h5py.File(paths[0], "r") as f:
        counts = f["X"][()]
        labels = f["Y"][()]
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError("the source's labels are not integers")
    n_cells, n_genes = counts.shape
    return contract(
        counts,
        [f"cell_{i:05d}" for i in range(n_cells)],
        [f"gene_{j:05d}" for j in range(n_genes)],
        {"cell_type": labels.astype(np.int64), "batch": np.full(n_cells, "batch0")},
    )


def scdesignpop_rda(paths: Sequence[Path]) -> anndata.AnnData:
    """OneK1K subset of ``chrisycd/scDesignPop`` (``data/example_sce.rda``).

    A Bioconductor ``SingleCellExperiment`` ``example_sce``: the ``counts`` assay (a
    ``dgCMatrix``, genes x cells) and ``colData`` columns ``indiv`` (the donor: ``batch``),
    ``cell_type``, ``sex`` and ``age``.
    """
    sce = _read_r(paths[0])["example_sce"]
    counts = sce.assays.data.listData["counts"]  # dgCMatrix slots: compressed columns
    n_genes, n_cells = (int(n) for n in counts.Dim)
    genes, cells = counts.Dimnames
    matrix = sp.csc_matrix((counts.x, counts.i, counts.p), shape=(n_genes, n_cells)).T
    col = sce.colData.listData
    return contract(
        matrix,
        cells,
        genes,
        {
            "cell_type": np.asarray(col["cell_type"]).astype(str),
            "batch": col["indiv"],
            "sex": col["sex"],
            "age": col["age"],
        },
    )
