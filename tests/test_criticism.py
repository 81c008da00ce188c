"""Model criticism (pyro_scvi.analysis.criticism): count CDFs, PIT, coverage, the page."""

import contextlib
import io
import warnings

import numpy as np
import pandas as pd
import pyro.distributions as dist
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb
from scipy import stats

from pyro_scvi import SCVI, Poisson
from pyro_scvi.analysis import criticism as cr
from pyro_scvi.analysis.plotting import plot_criticism
from pyro_scvi.cli import main
from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion, nb_logits
from pyro_scvi.posterior.arviz import to_inference_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
K = torch.tensor([-1.0, 0.0, 1.0, 3.0, 10.0, 40.0])


# ---------------------------------------------------------------------------- count CDFs


def _nb_reference(mu, theta):
    # scipy's nbinom(n, p) counts failures before n successes with success probability p
    return stats.nbinom(theta, theta / (theta + mu))


@pytest.mark.parametrize("mu,theta", [(0.3, 0.5), (4.0, 2.0), (25.0, 12.0)])
def test_nb_cdfs_match_scipy(mu, theta):
    ref = _nb_reference(mu, theta).cdf(K.numpy())
    mu_t, theta_t = torch.tensor(mu), torch.tensor(theta)
    nb = dist.NegativeBinomial(total_count=theta_t, logits=nb_logits(mu_t, theta_t, eps=0.0))
    gp = dist.GammaPoisson(theta_t, theta_t / mu_t)
    for d in (nb, gp):
        np.testing.assert_allclose(cr.count_cdf(d, K), ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gate", [0.0, 0.3, 1.0])
def test_zero_inflated_cdfs_match_mixture_formula(gate):
    mu, theta = torch.tensor(6.0), torch.tensor(1.5)
    logit = torch.logit(torch.tensor(gate), eps=1e-12)
    nb = _nb_reference(6.0, 1.5).cdf(K.numpy())
    pois = stats.poisson(6.0).cdf(K.numpy())
    expected_nb = np.where(K.numpy() >= 0, gate + (1 - gate) * nb, 0.0)
    expected_pois = np.where(K.numpy() >= 0, gate + (1 - gate) * pois, 0.0)
    ours = ZeroInflatedNegativeBinomialMeanDispersion(mu, theta, logit)
    pyro_zinb = dist.ZeroInflatedNegativeBinomial(
        total_count=theta, logits=nb_logits(mu, theta, eps=0.0), gate_logits=logit
    )
    zip_ = dist.ZeroInflatedPoisson(rate=mu, gate_logits=logit)
    np.testing.assert_allclose(cr.count_cdf(ours, K), expected_nb, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cr.count_cdf(pyro_zinb, K), expected_nb, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(cr.count_cdf(zip_, K), expected_pois, rtol=1e-5, atol=1e-7)


def test_cdf_broadcasts_and_looks_through_wrappers():
    rate = torch.tensor([[1.0, 5.0, 20.0]])
    d = dist.Poisson(rate).expand((4, 3)).to_event(1)
    value = torch.tensor([[0.0, 5.0, 12.0]]).expand(4, 3)
    out = cr.count_cdf(d, value)
    assert out.shape == (4, 3)
    np.testing.assert_allclose(out[2], stats.poisson([1.0, 5.0, 20.0]).cdf([0, 5, 12]), rtol=1e-6)


def test_cdf_of_an_unknown_distribution_is_estimated_with_a_warning():
    d = dist.Binomial(total_count=10, probs=torch.tensor(0.3))
    with pytest.warns(UserWarning, match="No closed-form CDF"):
        out = cr.count_cdf(d, torch.tensor(3.0))
    assert abs(float(out) - stats.binom(10, 0.3).cdf(3)) < 0.06


# ---------------------------------------------------------------------------- PIT, coverage


def _pit_under(d, x, rng):
    return cr.randomized_pit(cr.count_cdf(d, x - 1.0), cr.count_cdf(d, x), rng)


def test_pit_under_the_true_distribution_is_uniform(rng):
    # 20,000 independent NB counts with varied means, low counts included (where the
    # randomization matters most): PIT under the truth is Uniform(0, 1)
    n = 20_000
    mu = torch.as_tensor(rng.gamma(1.0, 3.0, n))
    theta = torch.as_tensor(rng.uniform(0.3, 5.0, n))
    d = dist.GammaPoisson(theta, theta / mu)
    x = d.sample()
    u = _pit_under(d, x, rng)
    floor = cr.pit_tv_null(n)
    # E[TV] is floor and its sd about 0.2 floor for 20 bins: 2.5 floor is far out
    assert cr.pit_tv(u) < 2.5 * floor
    cov = cr.interval_coverage(u)
    assert cr.calibration_error(cov) < 0.01
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # the same counts under a Poisson with the right means: too narrow, U-shaped
    u_pois = _pit_under(dist.Poisson(mu), x, rng)
    hist = cr.pit_histogram(u_pois)
    assert cr.pit_tv(u_pois) > 10 * floor
    assert hist[0] + hist[-1] > 4 * hist[8:12].mean()
    assert cr.interval_coverage(u_pois, [0.5])["coverage"].iloc[0] < 0.4


def test_pit_tv_null_matches_simulation(rng):
    tvs = [cr.pit_tv(rng.random(5000)) for _ in range(200)]
    assert abs(np.mean(tvs) / cr.pit_tv_null(5000) - 1) < 0.1


def test_coverage_and_calibration_error_by_hand():
    u = np.array([0.01, 0.3, 0.5, 0.6, 0.99])
    cov = cr.interval_coverage(u, [0.5, 0.95])
    assert cov["coverage"].tolist() == [0.6, 0.6]
    assert cr.calibration_error(cov) == pytest.approx((0.1 + 0.35) / 2)


def test_r_squared_penalizes_bias_unlike_correlation():
    obs = np.array([1.0, 10.0, 100.0, np.nan])
    r = cr.r_squared(obs, obs * 10, log=True)
    assert r["n"] == 3 and r["pearson_r2"] == pytest.approx(1.0)
    assert r["r2"] == pytest.approx(1 - 3 / 2)  # log10 residuals all 1, variance 2/3 * 3
    assert cr.r_squared(obs, obs)["r2"] == pytest.approx(1.0)


def test_psis_elpd_of_equal_weights_is_their_value():
    log_w = np.full((50, 3), -12.5)
    out = cr.psis_elpd(log_w, np.array(["a", "b", "c"]))
    np.testing.assert_allclose(out["elpd"], -12.5)
    assert out.index.tolist() == ["a", "b", "c"]
    # heavy-tailed weights: one draw dominates, k is high
    heavy = np.random.default_rng(0).standard_cauchy((200, 1)) * 30
    assert cr.psis_elpd(heavy, np.array(["d"]))["pareto_k"].iloc[0] > 0.7


# ---------------------------------------------------------------------------- on fitted models


# Short, but long enough for q(z | x) to be a fair posterior (warm-up over 20 epochs, not
# the default 400: an encoder left without its KL term misplaces z, and a check of the
# predictive would then measure the encoder instead of the model).
TRAIN = dict(max_epochs=60, kl_warmup_epochs=20, lr=3e-3, train_size=0.67, progress_bar=False)


@pytest.fixture(scope="module")
def overdispersed():
    return synthetic_zinb(n_cells=600, n_genes=30, gate_max=0.0, seed=0)


@pytest.fixture(scope="module")
def zinb_fit(overdispersed):
    return SCVI(overdispersed, n_latent=3, n_hidden=32).train(**TRAIN)


@pytest.fixture(scope="module")
def poisson_fit(overdispersed):
    return SCVI(overdispersed, n_latent=3, n_hidden=32, likelihood=Poisson()).train(**TRAIN)


def test_pit_is_uniform_on_data_simulated_from_the_fitted_model(zinb_fit):
    # The model's own generative process: z ~ p(z), l ~ p(l), x ~ p(x | z, l). Cells are
    # independent but a cell's entries share its z, so the noise floor lies between the
    # floor of n_cells x n_genes independent values and that of n_cells values: the bound
    # takes the cells as the independent units.
    sim = cr.simulate(zinb_fit, latent="prior", seed=1)
    c = cr.criticize(zinb_fit, sim, n_samples=20)
    assert c.cells == "held-out" and c.pit.shape == (600, 30)
    assert c.summary["pit_tv"] < cr.pit_tv_null(600)
    assert c.summary["calibration_error"] < 0.03
    assert abs(c.summary["coverage_90"] - 0.9) < 0.05


def test_poisson_on_overdispersed_counts_is_miscalibrated(zinb_fit, poisson_fit):
    both = cr.compare({"ZINB": zinb_fit, "Poisson": poisson_fit}, n_samples=20)
    zinb, pois = both["ZINB"].summary, both["Poisson"].summary
    assert zinb["cells"] == pois["cells"] == "held-out" and pois["n_cells"] == 198
    bound = cr.pit_tv_null(pois["n_cells"])  # cells as the independent units, as above
    assert pois["pit_tv"] > 2 * bound and pois["pit_tv"] > 1.5 * zinb["pit_tv"]
    hist = cr.pit_histogram(both["Poisson"].pit)
    assert hist[0] + hist[-1] > 4 * hist[8:12].mean()  # U-shaped: too narrow
    assert pois["coverage_90"] < 0.8
    assert pois["calibration_error"] > 2 * zinb["calibration_error"]
    elpd = cr.compare_elpd(both)
    assert (
        elpd.index[0] == "ZINB"
        and elpd.loc["Poisson", "elpd_diff"] > 2 * (elpd.loc["Poisson", "dse"])
    )


def test_criticize_checks_held_out_cells_and_fills_its_tables(zinb_fit):
    c = cr.criticize(zinb_fit, n_samples=10, seed=3)
    np.testing.assert_array_equal(
        c.obs_names, np.asarray(zinb_fit.adata.obs_names[zinb_fit.validation_indices])
    )
    assert set(c.gene_table["statistic"]) == set(cr.GENE_STATISTICS)
    assert set(c.cell_table["statistic"]) == set(cr.CELL_STATISTICS)
    x = zinb_fit.adata.X[zinb_fit.validation_indices].toarray()
    lib = c.cell_table[c.cell_table["statistic"] == "library_size"]["observed"]
    np.testing.assert_allclose(lib, x.sum(1))
    zf = c.gene_table[c.gene_table["statistic"] == "zero_fraction"]["observed"]
    np.testing.assert_allclose(zf, (x == 0).mean(0))
    assert c.gene_table["ppp"].dropna().between(0, 1).all()
    assert np.isfinite(c.elpd["elpd"]).all() and len(c.elpd) == len(c.obs_names)
    # the same seed gives the same PIT values
    np.testing.assert_array_equal(cr.criticize(zinb_fit, n_samples=10, seed=3).pit, c.pit)
    training = cr.criticize(zinb_fit, cells="training", n_samples=10)
    assert training.cells == "training" and len(training.obs_names) == 402


def test_criticize_without_held_out_cells_warns(overdispersed):
    m = SCVI(overdispersed[:80], n_latent=2, n_hidden=8).train(
        max_epochs=1, train_size=1.0, progress_bar=False
    )
    with pytest.warns(UserWarning, match="no held-out"):
        c = cr.criticize(m, n_samples=4)
    assert c.cells == "training"
    with pytest.raises(Exception, match="n_samples"):
        cr.criticize(m, n_samples=1)


def test_simulate_keeps_cells_and_changes_counts(zinb_fit):
    sim = cr.simulate(zinb_fit, seed=0)
    assert list(sim.obs_names) == list(zinb_fit.adata.obs_names)
    assert list(sim.var_names) == list(zinb_fit.var_names)
    assert sim.X.dtype == np.int32 and sim.X.sum() > 0
    assert (sim.X != zinb_fit.adata.X).nnz > 0


def test_plot_criticism_and_summary_table(tmp_path, zinb_fit, poisson_fit):
    both = cr.compare({"ZINB": zinb_fit, "Poisson": poisson_fit}, n_samples=5)
    table = cr.summary_table(both)
    assert table.index.tolist() == ["ZINB", "Poisson"]
    assert {"pit_tv", "calibration_error", "r2_mean", "r2_cv", "elpd_mean"} <= set(table)
    path = tmp_path / "page.png"
    plot_criticism(both, path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    fig = plot_criticism(both["ZINB"])
    assert len(fig.axes) == 8
    assert fig.axes[0].get_legend().get_texts()[0].get_text().startswith("ZINB: TV")


def test_psis_loo_reports_validity(zinb_fit):
    idata = to_inference_data(zinb_fit, n_samples=30, indices=np.arange(40), seed=0)
    out = cr.psis_loo(idata)
    assert out["pareto_k"].shape == (40,)
    assert out["valid"] == bool((out["pareto_k"] <= 0.7).all())
    assert np.isfinite(out["elpd_loo"])


def test_cli_ppc_writes_the_criticism_page(tmp_path, zinb_fit, overdispersed):
    model_dir, data_path = tmp_path / "model", tmp_path / "data.h5ad"
    zinb_fit.save(model_dir)
    overdispersed.write_h5ad(data_path)
    out = tmp_path / "check.nc"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = ["ppc", str(model_dir), str(data_path), "-o", str(out), "--n-samples", "5"]
        status = main([*args, "--device", "cpu", "--compare", f"again={model_dir}"])
        bad = main([*args, "--compare", "no-equals-sign"])
    assert status == 0 and bad == 2
    page = tmp_path / "check_criticism.png"
    assert page.read_bytes()[:8] == PNG_MAGIC
    summary = pd.read_csv(tmp_path / "check_criticism.csv", index_col=0)
    assert summary.loc["model", "cells"] == "held-out"
    assert summary.loc["model", "n_cells"] == len(zinb_fit.validation_indices)
    # the same fit twice, side by side, on the same cells and draws
    assert summary.loc["again", "pit_tv"] == summary.loc["model", "pit_tv"]
    assert "PIT" in buf.getvalue()
