"""Tests of pyro_scvi.datasets: the shipped PBMC data and the ZINB simulator."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pyro_scvi.datasets import pbmc8k_200hvg, synthetic_zinb

from pyro_scvi import datasets, from_anndata


def test_pbmc8k_200hvg_loads_raw_counts():
    adata = pbmc8k_200hvg()
    assert adata.shape == (7448, 200)
    assert {"cell_type", "batch"} <= set(adata.obs.columns)
    assert adata.obs["cell_type"].notna().all() and adata.obs["batch"].notna().all()
    assert adata.obs["cell_type"].nunique() > 1
    values = adata.X.data if sp.issparse(adata.X) else np.asarray(adata.X)
    assert (values >= 0).all()
    np.testing.assert_array_equal(values, np.round(values))
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Usable as is: the validation at the edge accepts it.
    data = from_anndata(adata, batch_key="batch")
    assert data.n_cells == 7448 and data.n_genes == 200


def test_path_of_shipped_dataset():
    p = datasets.path("pbmc8k_200hvg")
    assert p == datasets.path()
    assert p.is_file() and p.suffix == ".h5ad"
    assert p.read_bytes()[:8] == b"\x89HDF\r\n\x1a\n"


@pytest.mark.parametrize("name", ["pbmc3k", "", "PBMC8K_200HVG"])
def test_path_unknown_name_raises_key_error(name):
    with pytest.raises(KeyError, match="pbmc8k_200hvg"):
        datasets.path(name)


def _sim(**kw):
    args = {"n_cells": 300, "n_genes": 30, "n_clusters": 3, "n_batches": 2, "seed": 0}
    return synthetic_zinb(**{**args, **kw})


def test_synthetic_zinb_is_reproducible_under_a_seed():
    a, b = _sim(seed=7, batch_effect=0.5), _sim(seed=7, batch_effect=0.5)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    pd.testing.assert_frame_equal(a.obs, b.obs)
    for key in ("log_fold_change", "batch_shift"):
        np.testing.assert_array_equal(a.uns["simulation"][key], b.uns["simulation"][key])


def test_synthetic_zinb_differs_across_seeds():
    a, b = _sim(seed=1), _sim(seed=2)
    assert (a.X.toarray() != b.X.toarray()).mean() > 0.3
    assert not a.obs["cell_type"].equals(b.obs["cell_type"])
    assert not np.array_equal(
        a.uns["simulation"]["log_fold_change"], b.uns["simulation"]["log_fold_change"]
    )


@pytest.mark.parametrize(
    ("n_cells", "n_genes", "n_clusters", "n_batches"),
    [(200, 30, 3, 1), (150, 17, 2, 3), (400, 40, 5, 2)],
)
def test_synthetic_zinb_shape_batches_clusters(n_cells, n_genes, n_clusters, n_batches):
    adata = synthetic_zinb(n_cells, n_genes, n_clusters=n_clusters, n_batches=n_batches, seed=3)
    assert adata.shape == (n_cells, n_genes)
    assert sp.issparse(adata.X) and adata.X.format == "csr"
    assert np.issubdtype(adata.X.dtype, np.integer)
    assert adata.X.data.min() >= 0
    assert sorted(adata.obs["batch"].unique()) == [f"batch{b}" for b in range(n_batches)]
    assert sorted(adata.obs["cell_type"].unique()) == sorted(f"type{k}" for k in range(n_clusters))
    sim = adata.uns["simulation"]
    assert sim["log_fold_change"].shape == (n_clusters, n_genes)
    assert sim["batch_shift"].shape == (n_batches, n_genes)
    assert not sim["batch_shift"].any()  # batch_effect=0 by default
    assert adata.obs_names.is_unique and adata.var_names.is_unique
    # Every simulated cell has counts, so the data are valid model input as is.
    from_anndata(adata, batch_key="batch")


def test_synthetic_zinb_de_fraction():
    lfc = _sim(n_genes=40, de_fraction=0.25).uns["simulation"]["log_fold_change"]
    assert ((lfc != 0).sum(1) == 10).all()


def _log_cluster_means(adata):
    X = adata.X.toarray().astype(float)
    freq = X / X.sum(1, keepdims=True)
    types = adata.obs["cell_type"].astype(str).to_numpy()
    k = adata.uns["simulation"]["log_fold_change"].shape[0]
    return np.log(np.stack([freq[types == f"type{c}"].mean(0) for c in range(k)]) + 1e-6)


def test_synthetic_zinb_cluster_structure_is_real():
    adata = synthetic_zinb(2000, 40, n_clusters=3, lfc_scale=1.5, gate_max=0.1, seed=0)
    lfc = adata.uns["simulation"]["log_fold_change"]
    de = (lfc != 0).any(0)
    assert 0 < de.sum() < len(de)
    means = _log_cluster_means(adata)
    spread = means.max(0) - means.min(0)
    # Genes with a fold change differ between clusters far more than genes without.
    assert np.median(spread[de]) > 4 * np.median(spread[~de])
    # And in the right direction: observed cluster contrasts track the true ones.
    observed = means - means.mean(0)
    true = lfc - lfc.mean(0)
    r = np.corrcoef(observed[:, de].ravel(), true[:, de].ravel())[0, 1]
    assert r > 0.8


def test_synthetic_zinb_batch_effect_shifts_expression():
    adata = synthetic_zinb(2000, 30, n_clusters=1, n_batches=2, batch_effect=1.0, seed=0)
    shift = adata.uns["simulation"]["batch_shift"]
    assert shift.shape == (2, 30) and shift.std() > 0.3
    X = adata.X.toarray().astype(float)
    freq = X / X.sum(1, keepdims=True)
    batch = adata.obs["batch"].astype(str).to_numpy()
    observed = np.log(freq[batch == "batch1"].mean(0) + 1e-6) - np.log(
        freq[batch == "batch0"].mean(0) + 1e-6
    )
    true = shift[1] - shift[0]
    assert np.corrcoef(observed, true)[0, 1] > 0.8
