"""The functional, scanpy-style API (pyro_scvi.tl) and the embedding picture."""

import inspect

import anndata
import numpy as np
import pytest

import pyro_scvi
from pyro_scvi import SCVI, tl
from pyro_scvi.analysis.plotting import plot_embedding
from pyro_scvi.cli import main

FAST = dict(max_epochs=2, progress_bar=False)
ARCH = {"n_latent": 3, "n_hidden": 16}


@pytest.mark.parametrize("fn", [tl.scvi, tl.embedding], ids=lambda f: f.__name__)
def test_signature_follows_scanpy(fn):
    """As scanpy's test_sig_conventions: adata first, the rest keyword-only, copy=False."""
    params = list(inspect.signature(fn).parameters.values())
    assert params[0].name == "adata" and params[0].annotation == "AnnData"
    positional = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
    assert len(positional) <= 3
    assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params[1:])
    copy = inspect.signature(fn).parameters["copy"]
    assert copy.default is False
    assert inspect.signature(fn).return_annotation == "AnnData | None"


def test_scvi_copy_leaves_the_input_untouched(small_adata):
    before = (set(small_adata.obsm), set(small_adata.uns), set(small_adata.layers))
    out = tl.scvi(small_adata, batch_key="batch", model_kwargs=ARCH, copy=True, **FAST)
    assert out is not small_adata
    assert (set(small_adata.obsm), set(small_adata.uns), set(small_adata.layers)) == before
    assert out.obsm["X_pyro_scvi"].shape == (300, 3)
    params = out.uns["pyro_scvi"]["params"]
    assert params["batch_key"] == "batch" and params["n_latent"] == 3 and params["epochs"] == 2
    assert len(out.uns["pyro_scvi"]["history"]["validation_elbo"]) == 2


def test_scvi_in_place_writes_every_documented_field(small_adata, tmp_path):
    ret = tl.scvi(
        small_adata,
        key_added="X_mine",
        normalized_key="mine_normalized",
        model_dir=tmp_path / "model",
        model_kwargs=ARCH,
        seed=1,
        **FAST,
    )
    assert ret is None
    z = small_adata.obsm["X_mine"]
    assert z.shape == (300, 3) and np.isfinite(z).all()
    norm = small_adata.layers["mine_normalized"]
    library = float(np.median(np.asarray(small_adata.X.sum(1)).ravel()))
    np.testing.assert_allclose(norm.sum(1), library, rtol=1e-3)
    params = small_adata.uns["mine"]["params"]
    assert params["model_dir"] == str(tmp_path / "model")
    assert params["normalized_library_size"] == pytest.approx(library)
    # the saved model is the one that wrote the latent space
    loaded = SCVI.load(tmp_path / "model", small_adata)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, rtol=1e-5, atol=1e-6)
    small_adata.write_h5ad(tmp_path / "out.h5ad")  # every field is writable


def test_scvi_rejects_dropping_cells(small_adata):
    with pytest.raises(TypeError, match="drop empty cells first"):
        tl.scvi(small_adata, model_kwargs={"drop_empty_cells": True}, **FAST)


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_embedding_is_2d_and_separates_clusters(method):
    rng = np.random.default_rng(0)
    labels = np.repeat(["a", "b"], 40)
    adata = anndata.AnnData(np.zeros((80, 1)))
    adata.obs["cell_type"] = labels
    adata.obsm["X_pyro_scvi"] = rng.normal(size=(80, 6)) + 10.0 * (labels == "b")[:, None]
    out = tl.embedding(adata, method=method, copy=True)
    assert "X_pca2" not in adata.obsm and "X_tsne" not in adata.obsm
    coords = out.obsm[tl.EMBEDDINGS[method]]
    assert coords.shape == (80, 2) and np.isfinite(coords).all()
    # the two clusters stay apart: every point is nearer its own cluster's centre
    centres = np.stack([coords[labels == g].mean(0) for g in ("a", "b")])
    nearest = np.linalg.norm(coords[:, None] - centres[None], axis=-1).argmin(1)
    assert (nearest == (labels == "b")).all()
    assert out.uns[tl.EMBEDDINGS[method][2:]]["params"]["method"] == method


def test_plot_embedding_colours_by_label_and_batch(small_adata, tmp_path):
    small_adata.obsm["X_umap"] = np.random.default_rng(0).normal(size=(300, 2))
    small_adata.obs["depth"] = np.asarray(small_adata.X.sum(1)).ravel()
    fig = plot_embedding(small_adata, color=["cell_type", "batch", "depth"])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["cell_type", "batch", "depth"]
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == sorted(small_adata.obs["cell_type"].unique())
    plot_embedding(small_adata, tmp_path / "e.png")
    assert (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(KeyError, match="not in adata.obs"):
        plot_embedding(small_adata, color="nope")


def test_cli_plot_writes_the_picture(small_adata, tmp_path):
    fitted = tmp_path / "fitted.h5ad"
    tl.scvi(small_adata, batch_key="batch", model_kwargs=ARCH, **FAST)
    small_adata.write_h5ad(fitted)
    out = tmp_path / "umap.png"
    assert main(["plot", str(fitted), "-o", str(out), "--method", "pca"]) == 0
    assert out.stat().st_size > 1000
    assert main(["plot", str(fitted), "-o", str(out), "--use-rep", "X_none"]) == 2
    assert main(["plot", str(fitted), "-o", str(tmp_path / "x.pdf")]) == 2
    assert anndata.read_h5ad(fitted).obsm.keys() == small_adata.obsm.keys()  # input unchanged


def test_tl_is_in_the_package_namespace():
    assert pyro_scvi.tl.scvi is tl.scvi
