"""Query mapping (SCVI.load_query_data): new batches onto a fixed reference, scArches-style."""

import anndata
import numpy as np
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb
from sklearn.neighbors import KNeighborsClassifier

from pyro_scvi import SCVI, InputError
from pyro_scvi.cli import main

ARCH = dict(n_latent=4, n_hidden=32)


@pytest.fixture(scope="module")
def split():
    """Three batches with batch effects; the third is the query."""
    sim = synthetic_zinb(
        n_cells=900, n_genes=60, n_clusters=3, n_batches=3, batch_effect=0.5, seed=4
    )
    is_query = (sim.obs["batch"] == "batch2").to_numpy()
    return sim[~is_query].copy(), sim[is_query].copy()


@pytest.fixture(scope="module")
def reference(split):
    ref, _ = split
    model = SCVI(ref, batch_key="batch", **ARCH)
    return model.train(max_epochs=40, lr=1e-2, kl_warmup_epochs=10, progress_bar=False)


@pytest.fixture(scope="module")
def mapped(split, reference):
    _, query = split
    before = {k: v.clone() for k, v in reference.guide.state_dict().items()}
    model = SCVI.load_query_data(query, reference)
    model.train(max_epochs=40, lr=1e-2, kl_warmup_epochs=10, progress_bar=False)
    return model, before


def test_only_the_new_batches_weights_train(mapped, reference):
    model, before = mapped
    trainable = sorted(n for m in (model.model, model.guide) for n, _ in m.named_parameters())
    assert trainable == [
        "decoder.body.0.weight_new",
        "l_encoder.body.0.weight_new",
        "z_encoder.body.0.weight_new",
    ]
    assert model.guide.z_encoder.body[0].weight_new.shape == (32, 1)
    assert model.guide.z_encoder.body[0].weight_new.abs().sum() > 0  # it trained
    # the reference object is untouched, and the query model's reference part equals it
    after = reference.guide.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    mapped_state = model.guide.state_dict()
    for key, value in after.items():
        if key.endswith("body.0.weight"):
            assert torch.equal(mapped_state[key][:, : value.shape[1]], value), key
        else:
            assert torch.equal(mapped_state[key], value), key


def test_reference_cells_keep_their_latent_space_and_decoding(mapped, reference, split):
    model, _ = mapped
    ref, _ = split
    np.testing.assert_allclose(
        model.get_latent_representation(ref), reference.get_latent_representation(ref), atol=1e-6
    )
    p_ref = reference.get_likelihood_parameters(ref, seed=0)
    p_map = model.get_likelihood_parameters(ref, seed=0)
    np.testing.assert_allclose(p_map["mean"], p_ref["mean"], rtol=1e-5)


def test_query_cells_land_among_their_cell_type(mapped, reference, split):
    model, _ = mapped
    ref, query = split
    z_ref = reference.get_latent_representation(ref)
    z_query = model.get_latent_representation()
    knn = KNeighborsClassifier(15).fit(z_ref, ref.obs["cell_type"])
    accuracy = (knn.predict(z_query) == query.obs["cell_type"].to_numpy()).mean()
    assert accuracy > 0.9, accuracy
    # the library prior of the new batch comes from the query's cells
    log_lib = np.log(np.asarray(query.X.sum(1)).ravel())
    prior = model.model.library_prior
    assert prior.loc.shape == (3,)
    assert float(prior.loc[2]) == pytest.approx(log_lib.mean(), rel=1e-5)
    assert torch.equal(prior.loc[:2], reference.model.library_prior.loc)


def test_saved_query_model_loads_as_an_ordinary_model(mapped, split, tmp_path):
    model, _ = mapped
    _, query = split
    model.save(tmp_path / "q")
    loaded = SCVI.load(tmp_path / "q", query)
    assert loaded.batch_categories == ("batch0", "batch1", "batch2")
    np.testing.assert_allclose(
        loaded.get_latent_representation(), model.get_latent_representation(), atol=1e-6
    )


def test_reference_can_be_a_saved_directory(reference, split, tmp_path):
    _, query = split
    reference.save(tmp_path / "ref")
    from_dir = SCVI.load_query_data(query, tmp_path / "ref")
    from_obj = SCVI.load_query_data(query, reference)
    np.testing.assert_allclose(
        from_dir.get_latent_representation(), from_obj.get_latent_representation(), atol=1e-6
    )


def test_query_mapping_errors_name_the_fix(reference, split, small_adata):
    ref, query = split
    with pytest.raises(InputError, match="known to the reference"):
        SCVI.load_query_data(ref, reference)
    untrained = SCVI(ref, batch_key="batch", **ARCH)
    with pytest.raises(InputError, match="not trained"):
        SCVI.load_query_data(query, untrained)
    no_batch = SCVI(ref, **ARCH).train(max_epochs=1, progress_bar=False)
    with pytest.raises(InputError, match="without batch_key"):
        SCVI.load_query_data(query, no_batch)
    gene_batch = SCVI(ref, batch_key="batch", dispersion="gene-batch", **ARCH)
    gene_batch.train(max_epochs=1, progress_bar=False)
    with pytest.raises(InputError, match="gene-batch"):
        SCVI.load_query_data(query, gene_batch)
    with pytest.raises(InputError, match="genes"):
        SCVI.load_query_data(query[:, :30].copy(), reference)
    # an unknown batch in an ordinary query names load_query_data
    with pytest.raises(InputError, match="load_query_data"):
        reference.get_latent_representation(query)


def test_one_batch_reference_gains_a_batch_input(split):
    ref, query = split
    one = ref[ref.obs["batch"] == "batch0"].copy()
    reference = SCVI(one, batch_key="batch", **ARCH).train(max_epochs=2, progress_bar=False)
    assert reference.guide.z_encoder.n_batch == 0  # no batch input with one batch
    model = SCVI.load_query_data(query, reference).train(max_epochs=2, progress_bar=False)
    assert model.guide.z_encoder.n_batch == 2
    np.testing.assert_allclose(
        model.get_latent_representation(one), reference.get_latent_representation(one), atol=1e-6
    )


def test_map_query_cli(reference, split, tmp_path):
    _, query = split
    reference.save(tmp_path / "ref")
    query.write_h5ad(tmp_path / "query.h5ad")
    out = tmp_path / "mapped.h5ad"
    argv = ["map-query", tmp_path / "ref", tmp_path / "query.h5ad", "-o", out]
    assert main([str(a) for a in [*argv, "--max-epochs", "2", "--quiet"]]) == 0
    result = anndata.read_h5ad(out)
    assert result.obsm["X_pyro_scvi"].shape == (query.n_obs, 4)
    assert result.uns["pyro_scvi"]["params"]["reference"] == str(tmp_path / "ref")
    loaded = SCVI.load(tmp_path / "mapped_model", query)
    np.testing.assert_allclose(
        loaded.get_latent_representation(), result.obsm["X_pyro_scvi"], atol=1e-6
    )
    assert (
        main(
            ["map-query", str(tmp_path / "nothing"), str(tmp_path / "query.h5ad"), "-o", str(out)]
        )
        == 2
    )
