"""Export to ArviZ (pyro_scvi.posterior.arviz): groups, dims, coords, netCDF, log-likelihood."""

import arviz as az
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from pyro_scvi.datasets import synthetic_zinb
from scipy import special, stats

from pyro_scvi import SCVI, InputError
from pyro_scvi.posterior.arviz import to_inference_data

N_CELLS, N_GENES, N_LATENT, N_SAMPLES = 120, 15, 3, 7


@pytest.fixture(scope="module")
def model():
    adata = synthetic_zinb(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, seed=1)
    m = SCVI(adata, batch_key="batch", n_latent=N_LATENT, n_hidden=16)
    return m.train(max_epochs=3, progress_bar=False)


@pytest.fixture(scope="module")
def idata(model):
    return to_inference_data(model, n_samples=N_SAMPLES, seed=0)


def _dense(X):
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def test_groups_and_variables(idata):
    assert set(idata.groups()) == {
        "posterior",
        "posterior_predictive",
        "observed_data",
        "log_likelihood",
        "constant_data",
    }
    assert set(idata.posterior.data_vars) == {"z", "l"}
    assert set(idata.posterior_predictive.data_vars) == {"x"}
    assert set(idata.observed_data.data_vars) == {"x"}
    assert set(idata.log_likelihood.data_vars) == {"x"}
    assert idata.posterior.attrs["inference_library"] == "pyro"


def test_dims_and_shapes(idata):
    expected = {
        ("posterior", "z"): (("chain", "draw", "cells", "latent"), (1, N_SAMPLES, N_CELLS, 3)),
        ("posterior", "l"): (("chain", "draw", "cells"), (1, N_SAMPLES, N_CELLS)),
        ("posterior_predictive", "x"): (
            ("chain", "draw", "cells", "genes"),
            (1, N_SAMPLES, N_CELLS, N_GENES),
        ),
        ("observed_data", "x"): (("cells", "genes"), (N_CELLS, N_GENES)),
        ("log_likelihood", "x"): (("chain", "draw", "cells"), (1, N_SAMPLES, N_CELLS)),
        ("constant_data", "batch"): (("cells",), (N_CELLS,)),
    }
    for (group, var), (dims, shape) in expected.items():
        da = idata[group][var]
        assert da.dims == dims, (group, var)
        assert da.shape == shape, (group, var)


def test_coords_are_cell_gene_and_latent_names(idata, model):
    assert list(idata.posterior["cells"].values) == list(model.adata.obs_names)
    assert list(idata.observed_data["genes"].values) == list(model.adata.var_names)
    assert list(idata.posterior["latent"].values) == list(range(N_LATENT))
    assert list(idata.posterior["chain"].values) == [0]


def test_values_are_the_data_and_counts(idata, model):
    np.testing.assert_array_equal(idata.observed_data["x"].values, _dense(model.adata.X))
    assert list(idata.constant_data["batch"].values) == list(model.adata.obs["batch"])
    x_rep = idata.posterior_predictive["x"].values
    assert np.isfinite(x_rep).all() and (x_rep >= 0).all()
    np.testing.assert_array_equal(x_rep, np.round(x_rep))
    # replicated counts are draws, not the data
    assert not np.array_equal(x_rep[0, 0], idata.observed_data["x"].values)
    # draws differ from each other
    assert idata.posterior["z"].values[0].std(axis=0).mean() > 0
    assert np.isfinite(idata.log_likelihood["x"].values).all()
    assert (idata.log_likelihood["x"].values < 0).all()


def test_netcdf_round_trip(idata, tmp_path):
    path = tmp_path / "idata.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        a, b = idata[group], back[group]
        assert set(a.data_vars) == set(b.data_vars)
        for var in a.data_vars:
            assert a[var].dims == b[var].dims
            np.testing.assert_array_equal(a[var].values, b[var].values)
        for name in a.coords:
            np.testing.assert_array_equal(a[name].values, b[name].values)
    assert back.posterior.attrs["settings"] == idata.posterior.attrs["settings"]


def test_log_likelihood_matches_scipy_recomputation(idata, model):
    """Draw 3, decoded by hand and scored with scipy's NB and the ZINB mixture formula."""
    s = 3
    z = torch.as_tensor(idata.posterior["z"].values[0, s])
    l = idata.posterior["l"].values[0, s].astype(np.float64)
    b = torch.as_tensor(model.data.batch_index)
    x = idata.observed_data["x"].values.astype(np.float64)
    model.model.eval()
    with torch.no_grad():
        decoded = model.model.decoder(z, b)
    rho = torch.softmax(decoded["rho_logits"], -1).double().numpy()
    gate = torch.sigmoid(decoded["gate_logits"]).double().numpy()
    theta = model.model.log_theta.exp().detach().double().numpy()
    mu = np.exp(l)[:, None] * rho
    nb = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    zinb = np.where(x == 0, np.log(gate + (1 - gate) * np.exp(nb)), np.log1p(-gate) + nb)
    # The stored values are float32 sums over genes of a density whose terms (the lgammas of
    # counts and theta, ...) largely cancel: each entry is within a few float32
    # roundings (8 * eps32) of the size of its terms, and the sum over G genes adds at most
    # G * eps32 * sum |log p|. Observed: about 0.2 eps32 x the terms' size.
    log_s, logit = np.abs(np.log(theta + mu)), decoded["gate_logits"].double().numpy()
    size = (
        np.abs(special.gammaln(x + theta))
        + np.abs(special.gammaln(theta))
        + np.abs(special.gammaln(x + 1))
        + theta * (np.abs(np.log(theta)) + log_s + 1)
        + x * (np.abs(np.log(mu)) + log_s + 1)
        + np.abs(logit)
        + np.logaddexp(0, logit)
    )
    eps32 = np.finfo(np.float32).eps
    tol = eps32 * (8 * size.sum(1) + x.shape[1] * np.abs(zinb).sum(1))
    got = idata.log_likelihood["x"].values[0, s]
    assert (np.abs(got - zinb.sum(1)) <= tol).all()


def test_seed_reproduces_and_leaves_global_rng_alone(model):
    state = torch.get_rng_state()
    a = to_inference_data(model, n_samples=2, seed=5)
    assert torch.equal(state, torch.get_rng_state())
    b = to_inference_data(model, n_samples=2, seed=5)
    c = to_inference_data(model, n_samples=2, seed=6)
    np.testing.assert_array_equal(a.posterior_predictive["x"], b.posterior_predictive["x"])
    np.testing.assert_array_equal(a.log_likelihood["x"], b.log_likelihood["x"])
    assert not np.array_equal(a.posterior["z"], c.posterior["z"])


def test_indices_select_cells_in_order(model, idata):
    idx = [7, 2, 50]
    sub = to_inference_data(model, n_samples=2, indices=idx, seed=0)
    assert list(sub.posterior["cells"].values) == list(model.adata.obs_names[idx])
    np.testing.assert_array_equal(sub.observed_data["x"].values, _dense(model.adata.X)[idx])
    mask = np.zeros(N_CELLS, dtype=bool)
    mask[idx] = True
    by_mask = to_inference_data(model, n_samples=2, indices=mask, seed=0)
    assert list(by_mask.posterior["cells"].values) == list(model.adata.obs_names[sorted(idx)])


def test_new_cells_via_adata(model):
    other = synthetic_zinb(n_cells=30, n_genes=N_GENES, n_batches=2, seed=9)
    other.obs_names = [f"new{i}" for i in range(30)]
    out = to_inference_data(model, other, n_samples=2, seed=0)
    assert list(out.posterior["cells"].values) == list(other.obs_names)
    np.testing.assert_array_equal(out.observed_data["x"].values, _dense(other.X))


def test_observed_library_size_model_has_no_l():
    adata = synthetic_zinb(n_cells=60, n_genes=10, seed=2)
    m = SCVI(adata, n_latent=2, n_hidden=8, use_observed_lib_size=True)
    m.train(max_epochs=1, progress_bar=False)
    out = to_inference_data(m, n_samples=3, seed=0)
    assert set(out.posterior.data_vars) == {"z"}
    assert np.isfinite(out.log_likelihood["x"].values).all()


@pytest.mark.parametrize(
    "kwargs",
    [{"n_samples": 0}, {"batch_size": 0}, {"indices": [0, N_CELLS]}, {"indices": []}],
)
def test_bad_arguments_raise_input_error(model, kwargs):
    with pytest.raises(InputError):
        to_inference_data(model, **kwargs)


def test_adata_without_the_model_genes_is_refused(model):
    other = synthetic_zinb(n_cells=20, n_genes=N_GENES + 1, seed=0)
    with pytest.raises(InputError):
        to_inference_data(model, other, n_samples=2)


def test_export_of_chosen_genes_thinned_and_as_integers_keeps_the_values():
    import pyro_scvi
    from pyro_scvi.posterior.arviz import to_inference_data

    adata = pyro_scvi.datasets.synthetic_zinb(n_cells=50, n_genes=10, seed=0)
    m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8).train(max_epochs=1, progress_bar=False)
    full = to_inference_data(m, n_samples=6, seed=0)
    small = to_inference_data(
        m, n_samples=6, seed=0, genes=["gene2", "gene7"], thin=3, dtype="auto"
    )
    pp = small.posterior_predictive["x"]
    assert list(pp["genes"].values) == ["gene2", "gene7"]
    assert list(pp["draw"].values) == [0, 3] and pp.dtype.kind == "u"
    expected = full.posterior_predictive["x"].sel(genes=["gene2", "gene7"]).isel(draw=[0, 3])
    np.testing.assert_array_equal(pp.values, expected.values)
    np.testing.assert_array_equal(
        small.observed_data["x"].values, full.observed_data["x"].values[:, [2, 7]]
    )
    # thinned posterior draws are the same draws; the log-likelihood (over all genes)
    # keeps every draw
    np.testing.assert_array_equal(small.posterior["z"].values, full.posterior["z"].values[:, ::3])
    assert list(small.posterior["draw"].values) == [0, 3]
    np.testing.assert_allclose(small.log_likelihood["x"].values, full.log_likelihood["x"].values)
    by_position = to_inference_data(m, n_samples=6, seed=0, genes=[2, 7], dtype="int32")
    assert by_position.observed_data["x"].dtype == np.int32
    for bad in ({"genes": ["nope"]}, {"genes": [10]}, {"thin": 7}, {"dtype": "float16"}):
        with pytest.raises(pyro_scvi.InputError):
            to_inference_data(m, n_samples=6, **bad)
