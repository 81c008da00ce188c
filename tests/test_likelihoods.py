"""Likelihood objects beyond ZINB/NB/Poisson: the zero-inflated Poisson and the recipe."""

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from scipy import stats

import pyro_scvi
from pyro_scvi.cli import build_parser
from pyro_scvi.model.likelihoods import LIKELIHOODS, ZIP, Likelihood, Poisson

X = np.arange(0, 60)


@pytest.mark.parametrize("rate", [0.05, 1.0, 7.3, 40.0])
@pytest.mark.parametrize("gate", [1e-4, 0.2, 0.9])
def test_zip_log_prob_matches_scipy(rate, gate):
    # An independent formula: the mixture gate * 1[x = 0] + (1 - gate) * Poisson(x; rate).
    expected = np.log(gate * (X == 0) + (1 - gate) * stats.poisson.pmf(X, rate))
    d = ZIP()(
        torch.tensor(rate, dtype=torch.float64),
        None,
        torch.logit(torch.tensor(gate, dtype=torch.float64)),
    )
    got = d.log_prob(torch.tensor(X, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_zip_moments_and_sampling():
    rate, gate = 6.0, 0.3
    d = ZIP()(torch.tensor(rate), None, torch.logit(torch.tensor(gate)))
    assert d.mean.item() == pytest.approx((1 - gate) * rate, rel=1e-5)
    # Var = (1 - gate) * rate * (1 + gate * rate) for a zero-inflated Poisson
    assert d.variance.item() == pytest.approx((1 - gate) * rate * (1 + gate * rate), rel=1e-5)
    torch.manual_seed(0)
    s = d.sample((200_000,))
    assert (s == 0).float().mean().item() == pytest.approx(
        gate + (1 - gate) * np.exp(-rate), abs=0.005
    )


def test_zip_gate_limits_and_zero_rate():
    x = torch.arange(10.0)
    no_gate = ZIP()(torch.tensor(3.0), None, torch.tensor(-40.0))
    torch.testing.assert_close(no_gate.log_prob(x), Poisson()(torch.tensor(3.0)).log_prob(x))
    # softmax may underflow to a rate of exactly 0: still a valid distribution
    d = ZIP()(torch.zeros(3), None, torch.zeros(3))
    assert torch.isfinite(d.log_prob(torch.zeros(3))).all()


def test_zip_is_registered_for_the_cli():
    assert LIKELIHOODS["zip"] is ZIP and ZIP.name == "zip"
    assert ZIP.uses_gate and not ZIP.uses_dispersion
    args = build_parser().parse_args(["fit", "in.h5ad", "-o", "out.h5ad", "--likelihood", "zip"])
    assert args.likelihood == "zip"


def test_zip_model_has_a_gate_head_and_no_dispersion(small_adata):
    model = pyro_scvi.SCVI(small_adata, likelihood=ZIP(), n_latent=2, n_hidden=8)
    assert model.model.decoder.gate_logits is not None
    assert model.model.log_theta is None
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.history["validation_elbo"]).all()


def test_a_new_likelihood_written_from_the_recipe_trains(small_adata):
    # The module docstring's recipe, end to end: a class, flags, a Pyro distribution.
    class GammaPoisson(Likelihood):
        uses_dispersion = True
        name = "gamma-poisson"

        def __call__(self, mu, theta, gate_logits=None):
            return dist.GammaPoisson(concentration=theta, rate=theta / mu)

    model = pyro_scvi.SCVI(small_adata, likelihood=GammaPoisson(), n_latent=2, n_hidden=8)
    assert model.model.decoder.gate_logits is None and model.model.log_theta is not None
    model.train(max_epochs=1, progress_bar=False)
    assert np.isfinite(model.history["train_elbo"]).all()


@pytest.mark.parametrize("likelihood", [pyro_scvi.ZINB(), ZIP(), pyro_scvi.ZINB(0.3)])
def test_zero_inflation_gate_starts_at_initial_dropout(small_adata, likelihood):
    model = pyro_scvi.SCVI(small_adata, likelihood=likelihood, n_latent=2, n_hidden=16)
    model.train(max_epochs=1, seed=3, progress_bar=False)  # a new run resets the parameters
    fresh = pyro_scvi.SCVI(small_adata, likelihood=likelihood, n_latent=2, n_hidden=16)
    head = fresh.model.decoder.gate_logits
    expected = torch.logit(torch.tensor(likelihood.initial_dropout, dtype=torch.float64))
    np.testing.assert_allclose(head.bias.detach().double().numpy(), float(expected), rtol=1e-6)
    # the weights keep their own random start, so the gate varies around the bias
    z = torch.randn(64, 2)
    with torch.no_grad():
        gate = torch.sigmoid(fresh.model.decoder.eval()(z, torch.zeros(64))["gate_logits"])
    assert 0.5 * likelihood.initial_dropout < gate.median() < 2 * likelihood.initial_dropout


def test_initial_dropout_is_validated_saved_and_defaults_for_old_pickles(small_adata, tmp_path):
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="initial_dropout"):
            pyro_scvi.ZINB(initial_dropout=bad)
    model = pyro_scvi.SCVI(small_adata, likelihood=pyro_scvi.ZINB(0.2), n_latent=2, n_hidden=8)
    model.train(max_epochs=1, progress_bar=False)
    model.save(tmp_path / "m")
    loaded = pyro_scvi.SCVI.load(tmp_path / "m", small_adata)
    assert loaded.model.likelihood.initial_dropout == 0.2
    assert repr(loaded.model.likelihood) == "ZINB(initial_dropout=0.2)"
    # a ZINB pickled before the option existed has no instance attribute: the class default
    old = pyro_scvi.ZINB.__new__(pyro_scvi.ZINB)
    assert old.initial_dropout == 0.05 and repr(old) == "ZINB()"
    # a user's own gated likelihood, and initial_dropout=None, keep the layer's random start
    assert Likelihood.initial_dropout is None and Likelihood().gate_init_logit is None
    random_start = pyro_scvi.SCVI(
        small_adata, likelihood=pyro_scvi.ZINB(initial_dropout=None), n_latent=2, n_hidden=8
    )
    bias = random_start.model.decoder.gate_logits.bias.detach()
    assert repr(random_start.model.likelihood) == "ZINB(initial_dropout=None)"
    assert bias.std() > 0 and bias.abs().max() <= 8**-0.5  # nn.Linear's U(-1/sqrt(8), ...)
