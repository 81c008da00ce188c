"""The SCVI user API: queries, batch correction, save/load, and the public model/guide."""

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro_scvi.datasets import synthetic_zinb
from sklearn.decomposition import PCA
from sklearn.neighbors import NearestNeighbors

from pyro_scvi import NB, SCVI, InputError


@pytest.fixture(scope="module")
def trained():
    adata = synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=3)
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(max_epochs=5, progress_bar=False)
    return model


def test_latent_representation_shapes(trained):
    z = trained.get_latent_representation()
    assert z.shape == (300, 4) and np.isfinite(z).all()
    torch.manual_seed(0)
    zs = trained.get_latent_representation(give_mean=False, n_samples=200)
    assert zs.shape == (200, 300, 4)
    # samples scatter around the posterior mean: within 5 standard errors everywhere
    se = zs.std(0) / np.sqrt(200)
    assert (np.abs(zs.mean(0) - z) < 5 * se).all()
    assert zs.std(0).mean() > 0.01


def test_normalized_expression(trained):
    ne = trained.get_normalized_expression(n_samples=3)
    assert ne.shape == (300, 40)
    assert list(ne.index) == list(trained.adata.obs_names)
    assert list(ne.columns) == list(trained.adata.var_names)
    np.testing.assert_allclose(ne.sum(1), 1.0, rtol=1e-5)
    scaled = trained.get_normalized_expression(library_size=1e4, n_samples=2, return_mean=False)
    assert scaled.shape == (2, 300, 40)
    np.testing.assert_allclose(scaled.sum(-1), 1e4, rtol=1e-4)
    latent = trained.get_normalized_expression(library_size="latent", n_samples=2)
    lib = np.asarray(trained.adata.X.sum(1)).ravel()
    # exp(l) estimates the library size: after 5 epochs, within a factor 3 for most cells
    ratio = latent.sum(1).to_numpy() / lib
    assert np.median(np.abs(np.log(ratio))) < np.log(3)


def test_latent_library_with_observed_library_is_the_observed_one(small_adata):
    m = SCVI(small_adata, use_observed_lib_size=True, n_latent=3, n_hidden=16)
    m.train(max_epochs=1, progress_bar=False)
    out = m.get_normalized_expression(library_size="latent", n_samples=2)
    lib = np.asarray(small_adata.X.sum(1)).ravel()
    np.testing.assert_allclose(out.sum(1).to_numpy(), lib, rtol=1e-4)


def test_normalized_expression_bad_arguments(trained):
    with pytest.raises(InputError, match="not a known batch"):
        trained.get_normalized_expression(transform_batch="nope")
    with pytest.raises(InputError, match="library_size"):
        trained.get_normalized_expression(library_size=-1)


def test_queries_on_new_cells_need_the_models_genes(trained):
    sub = trained.adata[:10]
    assert trained.get_latent_representation(sub).shape == (10, 4)
    with pytest.raises(InputError, match="genes differ"):
        trained.get_latent_representation(trained.adata[:, :30])


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "m")
    loaded = SCVI.load(tmp_path / "m", trained.adata)
    np.testing.assert_array_equal(
        loaded.get_latent_representation(), trained.get_latent_representation()
    )
    outputs = []
    for m in (trained, loaded):
        torch.manual_seed(11)
        outputs.append(m.get_normalized_expression(transform_batch="batch1", n_samples=2))
    np.testing.assert_array_equal(outputs[0].to_numpy(), outputs[1].to_numpy())
    assert loaded.history.equals(trained.history)
    assert loaded.settings == trained.settings
    np.testing.assert_array_equal(loaded.train_indices, trained.train_indices)


def test_save_is_atomic_and_refuses_to_clobber(trained, tmp_path):
    target = tmp_path / "m"
    trained.save(target)
    with pytest.raises(InputError, match="overwrite=True"):
        trained.save(target)
    trained.save(target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary left over
    assert sorted(p.name for p in target.iterdir()) == ["manifest.json", "model.pt"]


def test_load_errors(trained, tmp_path):
    with pytest.raises(InputError, match="No saved model"):
        SCVI.load(tmp_path / "missing", trained.adata)
    trained.save(tmp_path / "m")
    with pytest.raises(InputError, match="genes differ"):
        SCVI.load(tmp_path / "m", trained.adata[:, 5:])
    # genes in another order are matched by name
    reordered = SCVI.load(tmp_path / "m", trained.adata[:, ::-1])
    np.testing.assert_allclose(
        reordered.get_latent_representation(), trained.get_latent_representation(), rtol=1e-5
    )


def test_save_load_keeps_likelihood_and_dispersion(tmp_path, small_adata):
    m = SCVI(small_adata, likelihood=NB(), dispersion="gene-batch", batch_key="batch", n_latent=3)
    m.train(max_epochs=1, progress_bar=False)
    m.save(tmp_path / "nb")
    loaded = SCVI.load(tmp_path / "nb", small_adata)
    assert isinstance(loaded.model.likelihood, NB)
    assert loaded.model.log_theta.shape == (2, small_adata.n_vars)


def test_gene_batch_dispersion_without_batches_is_refused(small_adata):
    # per gene and batch with no batch key would silently be per gene
    with pytest.raises(InputError, match="batch_key=.*dispersion='gene'"):
        SCVI(small_adata, dispersion="gene-batch", n_latent=3)
    one = SCVI(small_adata, dispersion="gene-batch", batch_key="batch", n_latent=3)
    assert one.settings["dispersion"] == "gene-batch"


def _same_batch_fraction(v, batches, k=15):
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(v).kneighbors(v)
    return (batches[idx[:, 1:]] == batches[:, None]).mean()


def test_batch_correction():
    """With the batch as a covariate, the latent space mixes batches and decoding a cell
    under another batch reproduces the simulated batch effect.

    Chance level for the same-batch neighbour fraction is 0.5; PCA on log1p counts gives
    about 0.9 on this simulation, scVI without batch 0.9-0.96, scVI with batch 0.66-0.67
    (seeds 0-1, 100 epochs); the decoded batch shift correlates 0.97 with the truth.
    """
    adata = synthetic_zinb(
        n_cells=800, n_genes=60, n_clusters=3, n_batches=2, batch_effect=0.5, seed=0
    )
    batches = adata.obs["batch"].cat.codes.to_numpy()
    model = SCVI(adata, batch_key="batch", n_latent=5)
    model.train(max_epochs=80, kl_warmup_epochs=20, early_stopping=False, progress_bar=False)
    pca = PCA(5, random_state=0).fit_transform(np.log1p(adata.X.toarray()))
    mixed = _same_batch_fraction(model.get_latent_representation(), batches)
    assert mixed < _same_batch_fraction(pca, batches) - 0.15
    assert mixed < 0.8

    cells = adata[batches == 0]
    torch.manual_seed(0)
    as0 = model.get_normalized_expression(cells, transform_batch="batch0", n_samples=5)
    torch.manual_seed(0)
    as1 = model.get_normalized_expression(cells, transform_batch="batch1", n_samples=5)
    decoded_shift = np.log(as1.to_numpy() / as0.to_numpy()).mean(0)
    shift = adata.uns["simulation"]["batch_shift"]
    true_shift = shift[1] - shift[0]
    # softmax normalization removes the overall level, so compare centred shifts
    r = np.corrcoef(decoded_shift - decoded_shift.mean(), true_shift - true_shift.mean())[0, 1]
    assert r > 0.9
    # averaging over both batches lands half-way: its shift from batch0 is half the effect
    both = model.get_normalized_expression(
        cells, transform_batch=["batch0", "batch1"], n_samples=5
    )
    half = np.log(both.to_numpy() / as0.to_numpy()).mean(0)
    slope = np.polyfit(decoded_shift - decoded_shift.mean(), half - half.mean(), 1)[0]
    assert 0.3 < slope < 0.7


def test_two_models_in_one_process_train_independently(small_adata):
    a = SCVI(small_adata, n_latent=3, n_hidden=16)
    b = SCVI(small_adata, n_latent=3, n_hidden=16)
    b_before = {k: v.clone() for k, v in b.model.state_dict().items()}
    a.train(max_epochs=2, progress_bar=False)
    for k, v in b.model.state_dict().items():
        torch.testing.assert_close(v, b_before[k])  # training a did not move b
    b.train(max_epochs=2, progress_bar=False)
    assert not torch.equal(b.model.log_theta, b_before["log_theta"])
    assert len(pyro.get_param_store()) == 0  # the global store is left clean


def test_model_and_guide_run_in_a_users_svi_loop(small_adata):
    m = SCVI(small_adata, n_latent=3, n_hidden=16)
    x, b = m.data.tensors(np.arange(64))
    svi = SVI(m.model, m.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x, b) for _ in range(30)]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_latent": 0}, "n_latent"),
        ({"dropout_rate": 1.0}, "dropout_rate"),
        ({"likelihood": "zinb"}, "pass an object"),
        ({"batch_key": "nope"}, "batch_key"),
    ],
)
def test_bad_constructor_arguments(small_adata, kwargs, match):
    with pytest.raises(InputError, match=match):
        SCVI(small_adata, **kwargs)


# ------------------------------------------------------------------- when training ends


def _quick(n_cells=100):
    adata = synthetic_zinb(n_cells=n_cells, n_genes=20, seed=0)
    return SCVI(adata, n_latent=2, n_hidden=8)


def test_default_training_stops_once_converged_and_records_why(tmp_path):
    # the default rule, with a short warm-up and patience so that it converges quickly
    model = _quick().train(kl_warmup_epochs=5, patience=5, progress_bar=False)
    stopping = model.history.attrs["stopping"]
    assert 5 + 5 <= len(model.history) < 400  # not before the warm-up ends; under the cap
    assert stopping["early_stopping"] is True and stopping["max_epochs"] == 400
    assert stopping["epoch"] == model.history["epoch"].iloc[-1]
    assert stopping["reason"].startswith("converged") and stopping["threshold"] > 0
    assert (stopping["warmup_end"], stopping["patience"]) == (5, 5)
    model.save(tmp_path / "m")  # the record goes with the model
    assert SCVI.load(tmp_path / "m", model.adata).history.attrs["stopping"] == stopping


def test_without_early_stopping_exactly_max_epochs_run():
    model = _quick().train(
        30, kl_warmup_epochs=0, patience=1, early_stopping=False, progress_bar=False
    )
    stopping = model.history.attrs["stopping"]
    assert len(model.history) == 30 and stopping["early_stopping"] is False
    assert stopping["reason"].startswith("max_epochs") and stopping["epoch"] == 29


def test_early_stopping_arguments_are_checked():
    with pytest.raises(InputError, match="patience"):
        _quick().train(2, patience=0, progress_bar=False)
    with pytest.raises(InputError, match="min_delta"):
        _quick().train(2, min_delta=-1.0, progress_bar=False)
