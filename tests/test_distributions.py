"""The mean/dispersion -> Pyro-logits helper and the likelihood objects, against scipy."""

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_scvi.model.distributions import nb_logits
from pyro_scvi.model.likelihoods import LIKELIHOODS, NB, ZINB, Poisson

MU = [0.05, 1.0, 7.3, 250.0]
THETA = [0.1, 1.0, 12.0, 1e3]
X = np.arange(0, 40)


def nb_logpmf_scipy(x, mu, theta):
    # scipy's nbinom counts failures before `n` successes with success probability p:
    # mean n (1 - p) / p = mu  <=>  p = theta / (theta + mu). An independent parametrization.
    return stats.nbinom.logpmf(x, theta, theta / (theta + mu))


@pytest.mark.parametrize("mu", MU)
@pytest.mark.parametrize("theta", THETA)
def test_nb_logits_moments(mu, theta):
    d = NB()(torch.tensor(mu, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64))
    assert d.mean.item() == pytest.approx(mu, rel=1e-6)
    assert d.variance.item() == pytest.approx(mu + mu**2 / theta, rel=1e-6)


def test_nb_logits_formula():
    mu, theta = torch.tensor([2.0, 0.0]), torch.tensor([4.0, 1.0])
    out = nb_logits(mu, theta)
    assert out[0].item() == pytest.approx(np.log(0.5), rel=1e-6)
    assert torch.isfinite(out[1]) and out[1] < -15  # mu = 0 stays finite


@pytest.mark.parametrize("mu", MU)
@pytest.mark.parametrize("theta", THETA)
def test_nb_log_prob_matches_scipy(mu, theta):
    x = torch.tensor(X, dtype=torch.float64)
    d = NB()(torch.tensor(mu, dtype=torch.float64), torch.tensor(theta, dtype=torch.float64))
    np.testing.assert_allclose(d.log_prob(x).numpy(), nb_logpmf_scipy(X, mu, theta), rtol=1e-6)


@pytest.mark.parametrize("mu", MU)
@pytest.mark.parametrize("theta", [0.5, 12.0])
@pytest.mark.parametrize("gate", [0.01, 0.3, 0.9])
def test_zinb_log_prob_matches_mixture(mu, theta, gate):
    x = torch.tensor(X, dtype=torch.float64)
    d = ZINB()(
        torch.tensor(mu, dtype=torch.float64),
        torch.tensor(theta, dtype=torch.float64),
        torch.logit(torch.tensor(gate, dtype=torch.float64)),
    )
    nb = np.exp(nb_logpmf_scipy(X, mu, theta))
    expected = np.log(gate * (X == 0) + (1 - gate) * nb)
    np.testing.assert_allclose(d.log_prob(x).numpy(), expected, rtol=1e-6)


def test_zinb_gate_limits():
    mu, theta = torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    x = torch.arange(10.0, dtype=torch.float64)
    no_gate = ZINB()(mu, theta, torch.tensor(-60.0, dtype=torch.float64))
    np.testing.assert_allclose(no_gate.log_prob(x), NB()(mu, theta).log_prob(x), atol=1e-10)
    all_gate = ZINB()(mu, theta, torch.tensor(60.0, dtype=torch.float64))
    assert all_gate.log_prob(torch.tensor(0.0)).item() == pytest.approx(0.0, abs=1e-10)
    assert all_gate.log_prob(torch.tensor(3.0)).item() < -50


def test_zinb_monte_carlo_mean():
    torch.manual_seed(0)
    mu, theta, gate = torch.tensor(6.0), torch.tensor(3.0), 0.25
    d = ZINB()(mu, theta, torch.logit(torch.tensor(gate)))
    s = d.sample((200_000,))
    assert s.mean().item() == pytest.approx((1 - gate) * 6.0, rel=0.02)


def test_poisson_matches_scipy():
    d = Poisson()(torch.tensor(4.5, dtype=torch.float64))
    np.testing.assert_allclose(
        d.log_prob(torch.tensor(X, dtype=torch.float64)).numpy(),
        stats.poisson.logpmf(X, 4.5),
        rtol=1e-10,
    )


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_likelihood_shapes_and_flags(name):
    lik = LIKELIHOODS[name]()
    mu = torch.rand(5, 7) + 0.1
    theta = torch.rand(7) + 0.5 if lik.uses_dispersion else None
    gate = torch.zeros(5, 7) if lik.uses_gate else None
    d = lik(mu, theta, gate)
    assert tuple(d.batch_shape) == (5, 7)
    assert d.log_prob(torch.ones(5, 7)).shape == (5, 7)
    assert lik.name == name


@pytest.mark.parametrize("gate_logit", [-30.0, -2.0, 0.0, 3.0])
def test_fused_zinb_matches_pyro_mixture_values_and_gradients(gate_logit):
    import pyro.distributions as dist

    from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion

    torch.manual_seed(0)
    mu = (torch.rand(6, 30, dtype=torch.float64) * 20 + 1e-3).requires_grad_()
    theta = (torch.rand(30, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    pi = torch.full((6, 30), gate_logit, dtype=torch.float64).requires_grad_()
    x = torch.poisson(mu.detach())
    x[:, ::3] = 0
    fused = ZeroInflatedNegativeBinomialMeanDispersion(mu, theta, pi).log_prob(x)
    mixture = dist.ZeroInflatedNegativeBinomial(
        total_count=theta, logits=nb_logits(mu, theta), gate_logits=pi
    ).log_prob(x)
    torch.testing.assert_close(fused, mixture, rtol=1e-7, atol=1e-7)
    g_fused = torch.autograd.grad(fused.sum(), (mu, theta, pi))
    g_mixture = torch.autograd.grad(mixture.sum(), (mu, theta, pi))
    for a, b in zip(g_fused, g_mixture, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_zinb_shapes_sampling_and_validation():
    from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion

    d = ZeroInflatedNegativeBinomialMeanDispersion(torch.ones(4, 1), torch.ones(3), torch.zeros(1))
    assert d.batch_shape == (4, 3)
    assert d.expand((2, 4, 3)).batch_shape == (2, 4, 3)
    assert d.sample((5,)).shape == (5, 4, 3)
    torch.testing.assert_close(d.mean, torch.full((4, 3), 0.5))
    with pytest.raises(ValueError):
        d.log_prob(torch.full((4, 3), 0.5))  # not a count
    with pytest.raises(ValueError):
        ZeroInflatedNegativeBinomialMeanDispersion(-torch.ones(2), torch.ones(2), torch.zeros(2))


def test_fused_zinb_accepts_an_underflowed_zero_mean():
    from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion

    d = ZeroInflatedNegativeBinomialMeanDispersion(
        torch.tensor([0.0, 1.0]), torch.tensor([2.0, 2.0]), torch.zeros(2)
    )
    lp = d.log_prob(torch.tensor([0.0, 0.0]))
    assert torch.isfinite(lp).all() and lp[0].item() == pytest.approx(0.0, abs=1e-6)


def test_fused_zinb_expand_keeps_parameter_shapes():
    # Pyro's plates expand every site's distribution; a per-gene theta must stay per gene
    # (lgamma(theta) per gene, not per entry) while the values match a full expansion.
    from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion

    torch.manual_seed(0)
    mu, theta, pi = torch.rand(4, 3) * 5, torch.rand(3) + 0.5, torch.randn(4, 3)
    d = ZeroInflatedNegativeBinomialMeanDispersion(mu, theta, pi)
    e = d.expand((2, 4, 3))
    assert e.theta.shape == (3,) and e.batch_shape == (2, 4, 3)
    full = ZeroInflatedNegativeBinomialMeanDispersion(
        mu.expand(2, 4, 3), theta.expand(2, 4, 3), pi.expand(2, 4, 3)
    )
    x = torch.poisson(full.mean.detach() + 1)
    torch.testing.assert_close(e.log_prob(x), full.log_prob(x))
    assert e.sample().shape == (2, 4, 3) and e.mean.shape == (2, 4, 3)
    with pytest.raises(ValueError, match="Cannot expand"):
        d.expand((5, 3))
