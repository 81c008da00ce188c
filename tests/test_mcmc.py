"""NUTS gold standard: NUTS and a fitted per-cell guide against a closed-form posterior.

The model is linear-Gaussian with scVI's plates and site names:
``z_n ~ N(0, I)``, ``x_n ~ N(W z_n + c, sigma^2 I)``. Its posterior is Gaussian with
precision ``Lambda = I + W'W / sigma^2``, covariance ``Sigma = Lambda^-1`` and mean
``Sigma W'(x_n - c) / sigma^2``, the same covariance for every cell. The optimal
mean-field Normal has the exact means and variances ``1 / Lambda_dd`` (not ``Sigma_dd``):
equal when ``W'W`` is diagonal ("orthogonal"), smaller when the posterior is correlated.
"""

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from scipy.stats import norm
from torch import nn

from pyro_scvi.data import CountData
from pyro_scvi.model import cells_plate
from pyro_scvi.model.guides import PerCellGuide
from pyro_scvi.model.priors import ObservedLibrary
from pyro_scvi.posterior.mcmc import agreement, compare_to_nuts, sample_nuts

N_CELLS, N_GENES, N_LATENT, SIGMA = 3, 6, 2, 1.0


class LinearGaussian(nn.Module):
    def __init__(self, W, c, sigma):
        super().__init__()
        self.register_buffer("W", W)
        self.register_buffer("c", c)
        self.sigma = sigma

    def forward(self, x, batch_index, cell_index=None, num_cells=None):
        with cells_plate(batch_index, cell_index, num_cells):
            z = pyro.sample("z", dist.Normal(self.W.new_zeros(N_LATENT), 1.0).to_event(1))
            mean = z.squeeze(-2) @ self.W.T + self.c
            with pyro.plate("genes", N_GENES, dim=-1):
                pyro.sample("x", dist.Normal(mean, self.sigma), obs=x)


def make_problem(kind):
    g = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(N_GENES, N_LATENT, generator=g))
    # orthonormal columns times a diagonal: W'W diagonal; times a triangle: correlated
    mix = (
        torch.diag(torch.tensor([2.0, 1.0]))
        if kind == "orthogonal"
        else torch.tensor([[2.0, 1.6], [0.0, 0.6]])
    )
    W = q @ mix
    c = torch.randn(N_GENES, generator=g)
    x = torch.randn(N_CELLS, N_LATENT, generator=g) @ W.T + c
    x = x + SIGMA * torch.randn(N_CELLS, N_GENES, generator=g)
    precision = torch.eye(N_LATENT) + W.T @ W / SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = (x - c) @ W @ cov / SIGMA**2
    data = CountData(
        X=x.numpy(),
        batch_index=np.zeros(N_CELLS, dtype=np.int64),
        batch_categories=("0",),
        obs_names=pd.Index([f"cell{i}" for i in range(N_CELLS)]),
        var_names=pd.Index([f"gene{j}" for j in range(N_GENES)]),
    )
    return LinearGaussian(W, c, SIGMA), data, mean.numpy(), cov.numpy(), precision.numpy()


def fit_guide(model, data):
    x, b = data.tensors(np.arange(N_CELLS))
    guide = PerCellGuide(N_CELLS, N_LATENT, library=ObservedLibrary())
    elbo = TraceMeanField_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=2)
    svi = SVI(model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.99}), elbo)
    for _ in range(400):
        svi.step(x, b)
    return guide


# jit_compile: Pyro's NUTS compiles the potential with torch.jit.trace (about 2x faster
# here), which torch now marks deprecated.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["orthogonal", "correlated"])
def test_nuts_and_guide_match_the_exact_posterior(kind):
    model, data, mean, cov, precision = make_problem(kind)
    sd = np.sqrt(np.diag(cov))
    s = sample_nuts(
        model, data, np.arange(N_CELLS), num_samples=300, warmup_steps=200, jit_compile=True
    )
    z = s["z"]
    assert z.shape == (300, N_CELLS, N_LATENT)
    ess = s["_ess"].reshape(N_CELLS, N_LATENT)
    assert ess.min() > 80  # otherwise the tolerances below are meaningless
    # NUTS means: each within 4 Monte-Carlo standard errors (sd / sqrt(ESS)).
    assert (np.abs(z.mean(0) - mean) / (sd / np.sqrt(ess)) < 4).all()
    # NUTS variances and correlation, pooled over cells (they share one covariance):
    # the relative standard error of a variance from n effective draws is sqrt(2 / n),
    # about 0.07 here, so 0.25 is over 3 standard errors.
    centred = (z - mean).reshape(-1, N_LATENT)
    np.testing.assert_allclose(centred.var(0) / np.diag(cov), 1.0, atol=0.25)
    exact_corr = cov[0, 1] / (sd[0] * sd[1])
    assert abs(np.corrcoef(centred.T)[0, 1] - exact_corr) < 0.15

    guide = fit_guide(model, data)
    table = compare_to_nuts(model, guide, data, np.arange(N_CELLS), samples=s)
    q_mean = table["q_mean"].to_numpy().reshape(N_CELLS, N_LATENT)
    q_var = table["q_sd"].to_numpy().reshape(N_CELLS, N_LATENT) ** 2
    # The optimal mean-field Normal: exact means, variances 1 / Lambda_dd. SVI ends within
    # a few percent of it (its last steps are noisy; the learning rate has decayed 50x).
    assert (np.abs(q_mean - mean) / sd < 0.1).all()
    np.testing.assert_allclose(q_var * np.diag(precision), 1.0, atol=0.15)

    # Coverage of q's central 90% interval under the posterior, measured with the NUTS
    # draws, against its closed form 2 Phi(1.645 sd_q / sd_p) - 1.
    summary = agreement(table).loc["z"]
    ratio = np.sqrt(1.0 / np.diag(precision) / np.diag(cov))
    expected = float(np.mean(2 * norm.cdf(norm.ppf(0.95) * ratio) - 1))
    assert abs(summary["coverage_0.9"] - expected) < 0.06
    if kind == "orthogonal":
        # mean-field is exact here: q and NUTS agree, and q's intervals have their level
        assert summary["abs_mean_error"] < 0.25
        assert 0.75 < summary["variance_ratio"] < 1.3
        assert abs(summary["coverage_0.9"] - 0.9) < 0.06
    else:
        # correlated posterior: mean-field is over-confident, and the comparison shows it
        assert summary["variance_ratio"] < 0.6
        assert summary["coverage_0.9"] < 0.8


def test_compare_to_nuts_needs_matching_sites():
    model, data, *_ = make_problem("orthogonal")
    guide = PerCellGuide(N_CELLS, N_LATENT)  # guides an ``l`` the model does not have
    fake = {"z": np.random.default_rng(0).normal(size=(5, N_CELLS, N_LATENT))}
    with pytest.raises(ValueError, match="'l' site"):
        compare_to_nuts(model, guide, data, np.arange(N_CELLS), samples=fake)
