"""Posterior queries: held-out fit (ELBO, importance-sampled log p(x), reconstruction),
posterior samples, summaries, imputation and the ``evaluate`` CLI."""

import json
import math

import anndata
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch
from _cli import run_cli_output as _run
from pyro import poutine
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI, InputError, posterior
from pyro_scvi.model.nn import eval_mode
from pyro_scvi.posterior.proposals import DefensiveProposal
from pyro_scvi.train.loop import evaluate_elbo


@pytest.fixture(scope="module")
def trained():
    adata = synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=3)
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(
        max_epochs=40,
        lr=1e-2,
        batch_size=128,
        kl_warmup_epochs=10,
        train_size=1.0,
        progress_bar=False,
    )
    return model


@pytest.fixture(scope="module")
def one_dim():
    """z is the only latent (observed library) and one-dimensional: log p(x) is a 1-D
    integral that quadrature computes to high accuracy."""
    adata = synthetic_zinb(n_cells=150, n_genes=20, n_clusters=2, seed=0)
    model = SCVI(adata, n_latent=1, n_hidden=16, use_observed_lib_size=True)
    model.train(
        max_epochs=40,
        lr=3e-3,
        batch_size=64,
        kl_warmup_epochs=10,
        train_size=1.0,
        progress_bar=False,
    )
    return model


def _se(values):
    return values.std(ddof=1) / math.sqrt(len(values))


# ---------------------------------------------------------------------- held-out fit
def test_marginal_ll_bounds_the_elbo_and_tightens_with_k(trained):
    """log mean_k w_k is a lower bound on log p(x) that tightens with K (Burda et al., 2016):
    at K=1 it is an ELBO estimate; it rises with K and ends above the ELBO.

    Each K's per-cell estimate is averaged over 4 seeds (same expectation, half the noise);
    every comparison must clear 4 standard errors of the paired per-cell differences.
    Observed (mean per cell): ELBO -133.3; marginal LL at K = 1, 10, 100: -133.3, -132.6,
    -132.5, increments 0.69 and 0.12 nats at 14 and 7.5 standard errors. (Before
    batch-norm statistics were refreshed after training, the same model gave -149.7 and
    -149.7, -146.9, -145.1, at over 20 standard errors.)
    """
    elbo = trained.get_elbo(n_samples=100, per_cell=True, seed=1)
    mll = {
        k: np.mean(
            [
                trained.get_marginal_ll(n_samples=k, per_cell=True, seed=100 * r + k)
                for r in range(4)
            ],
            axis=0,
        )
        for k in (1, 10, 100)
    }
    # K = 1: the same estimator as the ELBO, so equal up to noise
    assert abs((mll[1] - elbo).mean()) < 4 * _se(mll[1] - elbo)
    for small, large in [(1, 10), (10, 100)]:
        gain = mll[large] - mll[small]
        assert gain.mean() > 4 * _se(gain), (small, large, gain.mean(), _se(gain))
    gap = mll[100] - elbo
    assert gap.mean() > 4 * _se(gap)


def test_fit_statistics_share_their_draws(trained):
    stats = trained.get_fit_statistics(n_samples=20, seed=0)
    assert list(stats.index) == list(trained.adata.obs_names)
    assert list(stats.columns) == ["elbo", "marginal_ll", "reconstruction_error", "pareto_k"]
    assert np.isfinite(stats.drop(columns="pareto_k").to_numpy()).all()
    assert (stats["pareto_k"] == np.inf).all()  # 20 draws are too few to judge a tail
    # log-mean-exp >= mean of the same weights (Jensen), cell by cell
    assert (stats["marginal_ll"] >= stats["elbo"] - 1e-4).all()
    # ELBO = -reconstruction error - KL, and the KL of q from the prior is positive
    assert stats["elbo"].mean() < -stats["reconstruction_error"].mean()


def test_elbo_agrees_with_pyros_trace_elbo(trained):
    """The per-cell ELBO matches Pyro's own Trace_ELBO (an independent implementation)."""
    ours = trained.get_elbo(n_samples=50, seed=0)
    idx = np.arange(trained.data.n_cells)
    theirs = [evaluate_elbo(trained.model, trained.guide, trained.data, idx) for _ in range(20)]
    # Trace_ELBO with one particle: its average over 20 runs has a spread of ~0.1 nats
    assert abs(ours - np.mean(theirs)) < 0.5, (ours, np.mean(theirs), np.std(theirs))


def test_get_methods_return_a_float_or_one_value_per_cell(trained):
    n = trained.data.n_cells
    for method in (
        trained.get_elbo,
        trained.get_marginal_ll,
        trained.get_reconstruction_error,
    ):
        mean = method(n_samples=3, seed=0)
        per_cell = method(n_samples=3, seed=0, per_cell=True)
        assert isinstance(mean, float) and math.isfinite(mean)
        assert per_cell.shape == (n,)
        assert mean == pytest.approx(per_cell.mean(), rel=1e-9)
    assert trained.get_reconstruction_error(n_samples=3, seed=0) > 0
    sub = trained.adata[:25]
    assert trained.get_marginal_ll(sub, n_samples=5, per_cell=True).shape == (25,)


def test_seed_reproduces_and_leaves_the_global_stream_alone(trained):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = trained.get_marginal_ll(n_samples=5, per_cell=True, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = trained.get_marginal_ll(n_samples=5, per_cell=True, seed=7)
    c = trained.get_marginal_ll(n_samples=5, per_cell=True, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fit_queries_refuse_unknown_genes_and_batches(trained):
    with pytest.raises(InputError, match="genes differ"):
        trained.get_elbo(trained.adata[:, :30])
    other = trained.adata[:20].copy()
    other.obs["batch"] = "batch9"
    with pytest.raises(InputError, match="not seen in training"):
        trained.get_marginal_ll(other, n_samples=2)
    with pytest.raises(InputError, match="n_samples"):
        trained.get_elbo(n_samples=0)


def _quadrature_log_px(model, x, b, grid):
    """log ∫ p(x | z) N(z; 0, 1) dz by a Riemann sum on ``grid``, evaluating the joint
    through the model itself: z conditioned to every grid point at once (a plate at -3)."""
    with torch.no_grad(), eval_mode(model), pyro.get_param_store().scope():
        z = grid.reshape(-1, 1, 1, 1).expand(-1, x.shape[0], 1, 1)
        with pyro.plate("grid", len(grid), dim=-3):
            tr = poutine.trace(poutine.condition(model, data={"z": z})).get_trace(x, b)
        tr.compute_log_prob()
    log_joint = tr.nodes["z"]["log_prob"].squeeze(-1) + tr.nodes["x"]["log_prob"].sum(-1)
    dz = float(grid[1] - grid[0])
    return torch.logsumexp(log_joint, 0) + math.log(dz), torch.softmax(log_joint, 0)


def test_marginal_ll_matches_quadrature_in_one_dimension(one_dim):
    """With a one-dimensional z and an observed library, log p(x) = log ∫ p(x|z) N(z) dz is
    computed by quadrature on a grid over [-8, 8] with spacing 0.01 (posterior sds here are
    0.4-1.7, so the Riemann sum of this smooth integrand is exact far below the tolerance;
    the test checks that the posterior mass near the grid's ends is negligible).

    The IS estimate is averaged over R = 4 repeats of K = 1000. Its per-cell standard
    error ``se`` (spread across repeats / sqrt(R)) sets the tolerance: for a correct
    estimator ``|IS - quadrature|`` is a few ``se`` (plus the O(1/K) downward bias). Cells
    whose posterior lies in the tail of q have heavy-tailed weights, whose spread
    understates the error, so the per-cell check is on 85% of cells, and the median
    error must be within 3 median ``se``. Observed: median |error| 0.009 nats, median
    se 0.014, all cells within 4 se (before batch-norm statistics were refreshed after
    training: 0.013, 0.016, 97%, largest overshoot 4 se + 0.06 nats). A bookkeeping error
    (a missing log q, log K or gene sum) would be off by nats in every cell.
    """
    data = one_dim.data
    idx = np.arange(data.n_cells)
    x, b = data.tensors(idx)
    quad, post = _quadrature_log_px(one_dim.model, x, b, torch.linspace(-8, 8, 1601))
    assert float(post[:50].sum(0).max() + post[-50:].sum(0).max()) < 1e-6
    quad = quad.numpy()
    reps = np.stack(
        [one_dim.get_marginal_ll(n_samples=1000, per_cell=True, seed=r) for r in range(4)]
    )
    err = reps.mean(0) - quad
    se = reps.std(0, ddof=1) / 2
    assert np.median(np.abs(err)) < 3 * np.median(se) + 1e-3, (np.median(err), np.median(se))
    assert np.mean(np.abs(err) <= 4 * se + 0.01) >= 0.85
    # IS underestimates in expectation (Jensen) and never overshoots beyond its noise
    assert np.mean(err) < 0
    assert np.max(err - 4 * se) < 0.2


def test_log_importance_weights_without_a_library_site(one_dim):
    x, b = one_dim.data.tensors(np.arange(30))
    log_w = posterior.log_importance_weights(one_dim.model, one_dim.guide, x, b, 7)
    assert log_w.shape == (7, 30) and torch.isfinite(log_w).all()
    chunked = posterior.log_importance_weights(one_dim.model, one_dim.guide, x, b, 7, batch_size=8)
    assert chunked.shape == (7, 30)
    # different draws, but the same per-cell distribution: the means agree within noise
    diff = (log_w.mean(0) - chunked.mean(0)).numpy()
    assert abs(diff.mean()) < 4 * _se(diff) + 1e-3


def test_importance_weights_of_fixed_latents_are_what_the_traces_sum():
    # Importance sampling weighs the guide's draws by log p(x, z, l) - log q(z, l | x)
    # (AIS sums the same sites, and tests/test_ais.py checks it against exact log p(x)).
    # With the draws fixed, the weights must be, per cell, what Pyro's own traces of one
    # cell at a time sum: every model site minus every guide site (the plate's subsample
    # site has density 0). With the observed library, l is fixed at it in both and its
    # densities drop out. Both sum the same float32 terms in other orders, with vector
    # or scalar math: about 20 terms per cell of at most tens of nats, totals of about
    # 60, so rounding is below 20 * 6e-8 * 20 / 60 relative, a few ulp of libm aside;
    # rtol 1e-5 covers it on any CPU, while a site counted twice, left out or scaled is
    # off by nats.
    adata = synthetic_zinb(n_cells=6, n_genes=12, n_batches=2, seed=0)
    m = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8)
    x, b = m.data.tensors(np.arange(6))
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, 6, 1, 2, generator=generator)  # (draws, cells, 1, latent)
    observed_l = torch.log(x.sum(-1, keepdim=True))
    for observed in (False, True):
        shift = 0.0 if observed else 0.3 * torch.randn(2, 6, 1, generator=generator)
        l = (observed_l + shift).expand(2, 6, 1)
        model = poutine.condition(m.model, data={"z": z, "l": l})
        guide = poutine.condition(m.guide, data={"z": z, "l": l})
        with eval_mode(m.model, m.guide):  # what it sets on its arguments, on the modules
            log_w = posterior.log_importance_weights(
                model, guide, x, b, 2, observed_library=observed
            )
        expected = torch.empty(2, 6)
        with torch.no_grad(), eval_mode(m.model, m.guide):
            for k in range(2):
                for i in range(6):
                    one = {"z": z[k, i : i + 1], "l": l[k, i : i + 1]}
                    args = (x[i : i + 1], b[i : i + 1])
                    g = poutine.trace(poutine.condition(m.guide, data=one)).get_trace(*args)
                    tr = poutine.trace(poutine.condition(m.model, data=one)).get_trace(*args)
                    total = tr.log_prob_sum() - g.log_prob_sum()
                    if observed:
                        total -= tr.nodes["l"]["log_prob_sum"] - g.nodes["l"]["log_prob_sum"]
                    expected[k, i] = total
        torch.testing.assert_close(log_w, expected, rtol=1e-5, atol=0.0, msg=f"{observed=}")


# ---------------------------------------------------------------------- posterior samples
def test_posterior_samples_shapes(trained):
    n, g = trained.data.n_cells, trained.data.n_genes
    s = trained.posterior_samples(n_samples=6, seed=0)
    assert sorted(s) == ["l", "rho", "x", "z"]
    assert s["z"].shape == (6, n, 4) and s["l"].shape == (6, n)
    assert s["rho"].shape == s["x"].shape == (6, n, g)
    np.testing.assert_allclose(s["rho"].sum(-1), 1.0, rtol=1e-5)
    assert (s["x"] >= 0).all() and (s["x"] == np.round(s["x"])).all()
    # decoding under one batch moves rho but not the latent draws (same seed, one pass: the
    # model's rejection samplers for x use a data-dependent number of random numbers, so
    # the draws of later passes would differ)
    s = trained.posterior_samples(n_samples=6, sites=("z", "rho"), batch_size=n, seed=0)
    t = trained.posterior_samples(
        n_samples=6, sites=("z", "rho"), transform_batch="batch1", batch_size=n, seed=0
    )
    np.testing.assert_array_equal(t["z"], s["z"])
    in_batch0 = trained.data.batch_index == 0
    assert not np.allclose(t["rho"][:, in_batch0], s["rho"][:, in_batch0])
    np.testing.assert_allclose(t["rho"][:, ~in_batch0], s["rho"][:, ~in_batch0], rtol=1e-5)
    only_z = trained.posterior_samples(trained.adata[:10], n_samples=2, sites=("z",))
    assert list(only_z) == ["z"] and only_z["z"].shape == (2, 10, 4)


def test_posterior_samples_bad_arguments(trained, one_dim):
    with pytest.raises(InputError, match="Unknown sites"):
        trained.posterior_samples(sites=("z", "theta"))
    with pytest.raises(InputError, match="single batch"):
        trained.posterior_samples(transform_batch=["batch0", "batch1"])
    with pytest.raises(InputError, match="not a known batch"):
        trained.posterior_samples(transform_batch="nope")
    # an observed library has no l site
    s = one_dim.posterior_samples(n_samples=2, seed=0)
    assert sorted(s) == ["rho", "x", "z"]


def test_sampling_queries_leave_the_networks_the_store_and_grad_mode_as_they_were():
    """The queries that draw from q run without gradients, in eval mode and a store scope,
    and restore all three: train mode stays on, nothing is added to the param store."""
    from pyro_scvi.model.schemes import BayesianDecoder

    adata = synthetic_zinb(n_cells=30, n_genes=6, n_batches=2, seed=0)
    m = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=4, scheme=BayesianDecoder())
    m.model.train(), m.guide.train()
    store = sorted(pyro.get_param_store().keys())
    queries = {
        "posterior_samples": lambda: m.posterior_samples(n_samples=2, batch_size=7, seed=0),
        "get_likelihood_parameters": lambda: m.get_likelihood_parameters(batch_size=7, seed=0),
        "get_normalized_expression": lambda: m.get_normalized_expression(batch_size=7),
    }
    for name, query in queries.items():
        out = query()
        assert len(out) > 0, name
        assert m.model.training and m.guide.training, name
        assert torch.is_grad_enabled(), name
        assert sorted(pyro.get_param_store().keys()) == store, name


@pytest.mark.parametrize(
    "query",
    [
        lambda m, seed: m.posterior_samples(n_samples=2, seed=seed)["x"],
        lambda m, seed: m.get_likelihood_parameters(n_samples=2, seed=seed)["mean"],
        lambda m, seed: m.get_dropout_probability(n_samples=2, zeros_only=False, seed=seed),
        lambda m, seed: m.get_latent_library_size(give_mean=False, seed=seed),
        lambda m, seed: m.posterior_predictive_sample(seed=seed).toarray(),
        lambda m, seed: m.get_fit_statistics(n_samples=3, seed=seed)["elbo"].to_numpy(),
        lambda m, seed: m.get_marginal_ll_ais(indices=[0, 1], n_chains=2, n_steps=2, seed=seed)[
            "marginal_ll"
        ].to_numpy(),
    ],
    ids=["samples", "likelihood", "dropout", "library", "predictive", "fit", "ais"],
)
def test_every_seeded_query_reproduces_and_leaves_the_global_stream_alone(query):
    adata = synthetic_zinb(n_cells=20, n_genes=6, seed=0)
    m = SCVI(adata, n_latent=2, n_hidden=4)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = query(m, 7)
    assert torch.equal(torch.get_rng_state(), state)
    np.testing.assert_array_equal(a, query(m, 7))
    assert not np.array_equal(a, query(m, 8))


def test_summarize_matches_numpy(rng):
    samples = rng.gamma(2.0, size=(40, 5, 3))
    s = posterior.summarize(samples, quantiles=(0.1, 0.5, 0.9))
    assert sorted(s) == ["10%", "50%", "90%", "mean", "sd"]
    np.testing.assert_allclose(s["mean"], samples.mean(0))
    np.testing.assert_allclose(s["sd"], samples.std(0, ddof=1))
    for key, q in [("10%", 0.1), ("50%", 0.5), ("90%", 0.9)]:
        assert s[key].shape == (5, 3)
        np.testing.assert_allclose(s[key], np.quantile(samples, q, axis=0))
    assert (s["10%"] <= s["50%"]).all() and (s["50%"] <= s["90%"]).all()
    single = posterior.summarize(samples[:1])
    np.testing.assert_array_equal(single["sd"], 0.0)
    np.testing.assert_array_equal(single["2.5%"], samples[0])
    with pytest.raises(ValueError, match="quantiles"):
        posterior.summarize(samples, quantiles=(1.5,))


# ---------------------------------------------------------------------- imputation
def test_impute_interval_and_labels(trained):
    out = trained.impute(n_samples=20, seed=0)
    assert sorted(out) == ["lower", "mean", "upper"]
    for frame in out.values():
        assert frame.shape == (trained.data.n_cells, trained.data.n_genes)
        assert list(frame.index) == list(trained.adata.obs_names)
        assert list(frame.columns) == list(trained.adata.var_names)
    lower, mean, upper = (out[k].to_numpy() for k in ("lower", "mean", "upper"))
    assert (lower <= mean).all() and (mean <= upper).all() and (lower > 0).all()
    assert (upper > lower).mean() > 0.99  # a real interval, not a point
    # the same draws with a smaller credible level: a nested, narrower interval
    narrow = trained.impute(n_samples=20, seed=0, credible_level=0.5)
    np.testing.assert_allclose(narrow["mean"], out["mean"])
    assert (narrow["lower"].to_numpy() >= lower - 1e-6).all()
    assert (narrow["upper"].to_numpy() <= upper + 1e-6).all()
    # the mean is exp(l) * rho averaged over draws: the latent-library normalized expression
    torch.manual_seed(0)
    ne = trained.get_normalized_expression(library_size="latent", n_samples=20)
    np.testing.assert_allclose(mean, ne.to_numpy(), rtol=1e-5)


def test_impute_bad_arguments(trained):
    with pytest.raises(InputError, match="credible_level"):
        trained.impute(credible_level=1.0)
    with pytest.raises(InputError, match="genes differ"):
        trained.impute(trained.adata[:, 5:])
    with pytest.raises(InputError, match="not a known batch"):
        trained.impute(transform_batch="nope")


def test_imputation_beats_the_gene_mean_on_hidden_entries():
    """Hide 10% of the non-zero counts (set them to 0), train on the corrupted matrix, and
    predict the hidden values. The baselines are the per-gene mean of the corrupted matrix,
    plain and scaled to each cell's library (``library_n * sum_n x_ng / sum x``, in the
    units of ``mu = exp(l) * rho``).

    Observed median absolute errors (data seeds 0-3): scVI 2.2-3.8, gene mean 3.9-6.5,
    library-scaled gene mean 4.0-6.6 (this seed: 3.5, 6.5, 6.6); the test asks for 15%
    better than the best baseline.
    """
    adata = synthetic_zinb(
        n_cells=400, n_genes=50, n_clusters=3, de_fraction=0.5, lfc_scale=2.0, seed=0
    )
    truth = adata.X.toarray()
    rng = np.random.default_rng(0)
    nonzero = np.flatnonzero(truth)
    hidden = rng.choice(nonzero, len(nonzero) // 10, replace=False)
    corrupted = truth.copy().ravel()
    corrupted[hidden] = 0
    corrupted = corrupted.reshape(truth.shape)
    assert (corrupted.sum(1) > 0).all()
    train = adata.copy()
    train.X = sp.csr_matrix(corrupted)
    model = SCVI(train, n_latent=4, n_hidden=32)
    model.train(
        max_epochs=100,
        lr=1e-2,
        batch_size=128,
        kl_warmup_epochs=10,
        train_size=1.0,
        early_stopping=False,
        progress_bar=False,
    )
    rows, cols = np.unravel_index(hidden, truth.shape)
    target = truth[rows, cols]

    def mae(pred):
        return np.median(np.abs(pred - target))

    imputed = model.impute(n_samples=10, seed=0)["mean"].to_numpy()[rows, cols]
    gene_mean = corrupted.mean(0)[cols]
    library = corrupted.sum(1)
    scaled = (library[:, None] * corrupted.sum(0) / corrupted.sum())[rows, cols]
    assert mae(imputed) < 0.85 * min(mae(gene_mean), mae(scaled)), (
        mae(imputed),
        mae(gene_mean),
        mae(scaled),
    )


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    trained.save(tmp / "model")
    h5ad = tmp / "cells.h5ad"
    trained.adata.write_h5ad(h5ad)
    return tmp / "model", h5ad


def test_evaluate_cli_prints_a_summary_of_all_cells(saved, trained, tmp_path):
    model_dir, h5ad = saved
    per_cell = tmp_path / "per_cell.csv"
    argv = ["evaluate", model_dir, h5ad, "--n-samples", "20", "--device", "cpu", "--cells", "all"]
    status, out, err = _run([*argv, "--per-cell", per_cell])
    assert status == 0, err
    assert len(out) < 2000  # a summary, not a per-cell dump
    result = json.loads(out)
    n = trained.data.n_cells
    assert result["n_cells"] == n and result["n_samples"] == 20 and result["cells"] == "all"
    for key in ("elbo", "marginal_ll", "reconstruction_error"):
        for stat in ("mean", "sd", "sem"):
            value = result[f"{key}_{stat}"]
            assert isinstance(value, float) and math.isfinite(value), (key, stat)
    assert result["marginal_ll_mean"] >= result["elbo_mean"]
    table = pd.read_csv(per_cell, index_col="cell")
    assert list(table.index) == list(trained.adata.obs_names)
    assert np.isfinite(table.drop(columns="pareto_k").to_numpy()).all()
    assert result["frac_pareto_k_high"] == 1.0  # k = inf at 20 draws: nothing trusted
    # the same numbers as the Python API with the CLI's defaults (seed 0, 64 cells a pass)
    api = trained.get_fit_statistics(n_samples=20, seed=0)
    np.testing.assert_allclose(table["marginal_ll"], api["marginal_ll"], rtol=1e-6)
    assert result["elbo_mean"] == pytest.approx(api["elbo"].mean(), rel=1e-6)
    assert result["elbo_sem"] == pytest.approx(api["elbo"].std() / np.sqrt(n), rel=1e-6)
    assert result["observed_library"] is False
    # --observed-library: the API's log p(x | library)
    status, out, err = _run([*argv, "--observed-library"])
    assert status == 0, err
    given = json.loads(out)
    api = trained.get_fit_statistics(n_samples=20, seed=0, observed_library=True)
    assert given["observed_library"] is True
    assert given["marginal_ll_mean"] == pytest.approx(api["marginal_ll"].mean(), rel=1e-6)
    assert given["marginal_ll_mean"] != pytest.approx(result["marginal_ll_mean"], rel=1e-6)


def test_fit_statistics_report_pareto_k_and_the_proposal_beside_log_px(trained):
    cells = np.arange(12)
    plain = trained.get_fit_statistics(trained.adata[cells].copy(), n_samples=200, seed=0)
    k = plain["pareto_k"].to_numpy()
    assert np.isfinite(k).all() and (k > -np.inf).all()  # 200 draws: a tail to judge
    assert plain.attrs == {"proposal": {"proposal": "GuideProposal"}, "n_samples": 200}
    mixed = trained.get_fit_statistics(
        trained.adata[cells].copy(), n_samples=200, seed=0, proposal=DefensiveProposal(mix=0.5)
    )
    assert mixed.attrs["proposal"] == {
        "proposal": "DefensiveProposal", "mix": 0.5, "df": 3.0, "widen": 2.0
    }  # fmt: skip
    # the ELBO still comes from q's draws; log p(x) from the proposal's
    np.testing.assert_allclose(mixed["elbo"], plain["elbo"], rtol=1e-6)
    assert not np.allclose(mixed["marginal_ll"], plain["marginal_ll"])
    assert np.isfinite(mixed["pareto_k"]).all()
    # both estimate the same log p(x): close on a well-fitted tiny model
    assert abs(mixed["marginal_ll"].mean() - plain["marginal_ll"].mean()) < 1.0


def test_evaluate_cli_reports_k_a_proposal_and_ais_with_its_error(saved, trained, tmp_path):
    model_dir, h5ad = saved
    per_cell = tmp_path / "ais.csv"
    argv = ["evaluate", model_dir, h5ad, "--n-samples", "100", "--device", "cpu", "--cells", "all"]
    argv += ["--proposal", "defensive", "--ais", "--ais-steps", "3", "--per-cell", per_cell]
    status, out, err = _run(argv)
    assert status == 0, err
    result = json.loads(out)
    assert result["proposal"]["proposal"] == "DefensiveProposal" and result["ais_steps"] == 3
    assert result["ais_settings"]["n_steps"] == 3 and result["ais_settings"]["n_chains"] == 16
    assert 0.0 <= result["frac_pareto_k_high"] <= 1.0
    assert result["ais_se_mean"] > 0 and math.isfinite(result["ais_marginal_ll_mean"])
    table = pd.read_csv(per_cell, index_col="cell")
    api = trained.get_marginal_ll_ais(n_steps=3, batch_size=64, seed=0)
    np.testing.assert_allclose(table["ais_marginal_ll"], api["marginal_ll"], rtol=1e-5)
    np.testing.assert_allclose(table["ais_se"], api["se"], rtol=1e-5)
    assert np.isfinite(table["pareto_k"]).all()
    status, out, err = _run([*argv[:-2], "--ais-steps", "0"])
    assert status == 2 and "--ais-steps" in err


def test_evaluate_cli_draws_from_a_laplace_proposal_and_records_its_diagnostics(
    saved, trained, tmp_path
):
    model_dir, _ = saved
    h5ad = tmp_path / "few.h5ad"  # new cells of the same genes
    trained.adata[:8].copy().write_h5ad(h5ad)
    argv = ["evaluate", model_dir, h5ad, "--n-samples", "50", "--device", "cpu", "--cells", "all"]
    status, out, err = _run([*argv, "--proposal", "laplace"])
    assert status == 0, err
    result = json.loads(out)
    assert result["proposal"]["proposal"] == "LaplaceProposal"
    assert result["proposal"]["diagnostics"]["cells"] == 8
    assert result["marginal_ll_mean"] > result["elbo_mean"]  # the ELBO still from q's draws
    assert 0.0 <= result["frac_pareto_k_high"] <= 1.0


def test_evaluate_cli_scores_heldout_cells_by_default(tmp_path):
    adata = synthetic_zinb(n_cells=100, n_genes=20, n_batches=2, seed=1)
    trained = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=16)
    trained.train(max_epochs=2, train_size=0.8, progress_bar=False)
    model_dir, h5ad = tmp_path / "model", tmp_path / "cells.h5ad"
    trained.save(model_dir)
    adata.write_h5ad(h5ad)
    out_h5ad = tmp_path / "heldout.h5ad"
    argv = ["evaluate", model_dir, h5ad, "--n-samples", "20", "--per-cell", out_h5ad]
    status, out, err = _run(argv)
    assert status == 0, err
    result = json.loads(out)
    heldout = trained.adata.obs_names[trained.validation_indices]
    assert result["cells"] == "held-out" and result["n_cells"] == len(heldout) > 0
    scored = anndata.read_h5ad(out_h5ad)
    assert list(scored.obs_names) == list(heldout)
    api = trained.get_fit_statistics(trained.heldout_adata, n_samples=20, seed=0)
    np.testing.assert_allclose(scored.obs["pyro_scvi_elbo"], api["elbo"], rtol=1e-6)
    assert result["marginal_ll_mean"] == pytest.approx(api["marginal_ll"].mean(), rel=1e-6)
    # held-out scoring needs the data the model was fitted to
    other = tmp_path / "other.h5ad"
    trained.adata[:10].copy().write_h5ad(other)
    status, out, err = _run(["evaluate", model_dir, other])
    assert status == 2 and out == "" and "--cells all" in err


def test_evaluate_cli_errors_cleanly(saved, trained, tmp_path):
    model_dir, h5ad = saved
    fewer_genes = tmp_path / "fewer.h5ad"
    trained.adata[:, :30].copy().write_h5ad(fewer_genes)
    status, out, err = _run(["evaluate", model_dir, fewer_genes])
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "genes differ" in err
    status, out, err = _run(["evaluate", tmp_path / "nothing", h5ad])
    assert status == 2 and out == "" and "No saved model" in err
    status, out, err = _run(["evaluate", model_dir, h5ad, "--n-samples", "0"])
    assert status == 2 and out == "" and err.count("\n") == 1


# ---------------------------------------------------------------------- scvi-tools names
def test_likelihood_parameters_are_what_the_model_hands_its_likelihood(trained):
    p = trained.get_likelihood_parameters(n_samples=200, give_mean=True, seed=0)
    n, g = trained.data.n_cells, trained.data.n_genes
    assert {k: v.shape for k, v in p.items()} == {k: (n, g) for k in p}
    assert sorted(p) == ["dispersions", "dropout", "mean"]
    # gene dispersion: theta is the model's parameter, the same for every cell
    theta = trained.model.log_theta.detach().exp().numpy()
    np.testing.assert_allclose(p["dispersions"], np.broadcast_to(theta, (n, g)), rtol=1e-5)
    # mu = exp(l) * rho sums over genes to exp(l): its posterior mean is E_q[exp(l)]
    library = trained.get_latent_library_size()
    np.testing.assert_allclose(p["mean"].sum(1), library, rtol=0.05)
    draws = trained.get_likelihood_parameters(n_samples=3, seed=0)
    assert draws["mean"].shape == (3, n, g)
    again = trained.get_likelihood_parameters(n_samples=3, seed=0)
    np.testing.assert_array_equal(draws["dropout"], again["dropout"])


def test_likelihood_parameters_follow_the_likelihood(small_adata):
    from pyro_scvi import Poisson

    m = SCVI(small_adata, likelihood=Poisson(), n_latent=2, n_hidden=8)
    assert sorted(m.get_likelihood_parameters(seed=0)) == ["mean"]


def test_latent_library_size_tracks_observed_totals(trained):
    observed = np.asarray(trained.adata.X.sum(1)).ravel()
    size = trained.get_latent_library_size()
    assert size.shape == observed.shape and (size > 0).all()
    # E_q[exp(l)] of q(l) = Normal(l_loc, l_scale): the log-normal mean
    x, b = trained.data.tensors(np.arange(trained.data.n_cells))
    trained.guide.eval()
    with torch.no_grad():
        q = trained.guide.encode(x, b)
    trained.guide.train()
    expected = torch.exp(q["l_loc"] + q["l_scale"] ** 2 / 2).squeeze(-1).numpy()
    np.testing.assert_allclose(size, expected, rtol=1e-5)
    assert 0.8 < np.median(size / observed) < 1.25
    assert np.corrcoef(np.log(size), np.log(observed))[0, 1] > 0.5
    drawn = trained.get_latent_library_size(give_mean=False, seed=0)
    assert not np.allclose(drawn, size) and np.corrcoef(drawn, size)[0, 1] > 0.5


def test_posterior_predictive_sample_is_sparse_counts_like_the_data(trained):
    x = trained.posterior_predictive_sample(seed=0)
    assert sp.isspmatrix_csr(x) and x.shape == trained.adata.shape
    assert np.array_equal(x.data, np.round(x.data)) and (x.data > 0).all()
    draws = trained.posterior_predictive_sample(n_samples=20, seed=1)
    assert len(draws) == 20 and all(d.shape == x.shape for d in draws)
    replicated = np.mean([np.asarray(d.mean(0)).ravel() for d in draws], axis=0)
    observed = np.asarray(trained.adata.X.mean(0)).ravel()
    assert np.corrcoef(np.log1p(replicated), np.log1p(observed))[0, 1] > 0.95
    genes = list(trained.adata.var_names[[5, 2]])
    sub = trained.posterior_predictive_sample(gene_list=genes, seed=0)
    np.testing.assert_array_equal(sub.toarray(), x[:, [5, 2]].toarray())
    with pytest.raises(InputError, match="does not know"):
        trained.posterior_predictive_sample(gene_list=["nope"])


# ---------------------------------------------------------------------- zero decomposition
def test_dropout_probability_given_zero_matches_scipy(rng):
    from scipy import stats

    mu = rng.gamma(1.0, 3.0, 50)
    theta = rng.gamma(2.0, 1.0, 50)
    gate_logits = rng.normal(0.0, 2.0, 50)
    pi = 1 / (1 + np.exp(-gate_logits))
    t = {k: torch.tensor(v) for k, v in dict(mu=mu, theta=theta, g=gate_logits).items()}
    nb0 = stats.nbinom.pmf(0, theta, theta / (theta + mu))  # scipy: n failures, p success
    expected = pi / (pi + (1 - pi) * nb0)
    got = posterior.dropout_probability_given_zero(t["mu"], t["theta"], t["g"]).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    poisson0 = stats.poisson.pmf(0, mu)
    got = posterior.dropout_probability_given_zero(t["mu"], None, t["g"]).numpy()
    np.testing.assert_allclose(got, pi / (pi + (1 - pi) * poisson0), rtol=1e-6)
    # gate limits: no gate -> no dropout; a sure gate -> every zero is one
    limits = torch.tensor([-200.0, 200.0])
    out = posterior.dropout_probability_given_zero(torch.tensor(2.0), torch.tensor(3.0), limits)
    assert out.tolist() == [0.0, 1.0]


def test_get_dropout_probability_averages_the_formula_over_posterior_draws(trained):
    from scipy import stats

    p = trained.get_dropout_probability(n_samples=4, seed=0)
    x = trained.adata.X.toarray()
    assert p.shape == x.shape and p.dtype == np.float32
    assert np.isnan(p[x > 0]).all() and ((p[x == 0] >= 0) & (p[x == 0] <= 1)).all()
    # the same seed draws the same (z, l): recompute from the likelihood's parameters
    params = trained.get_likelihood_parameters(n_samples=4, seed=0)
    mu, theta = params["mean"].astype(float), params["dispersions"].astype(float)
    pi = 1 / (1 + np.exp(-params["dropout"].astype(float)))
    nb0 = stats.nbinom.pmf(0, theta, theta / (theta + mu))
    expected = (pi / (pi + (1 - pi) * nb0)).mean(0)
    np.testing.assert_allclose(p[x == 0], expected[x == 0], rtol=1e-4, atol=1e-6)
    every = trained.get_dropout_probability(n_samples=4, seed=0, zeros_only=False)
    assert np.isfinite(every).all()
    np.testing.assert_allclose(every, expected, rtol=1e-4, atol=1e-6)
    genes = list(trained.var_names[[5, 0, 7]])
    sub = trained.get_dropout_probability(n_samples=4, seed=0, gene_list=genes)
    np.testing.assert_array_equal(sub, p[:, [5, 0, 7]])
    idx = np.array([3, 10, 42, 7])
    rows = trained.get_dropout_probability(indices=idx, n_samples=4, seed=1)
    view = trained.get_dropout_probability(trained.adata[idx], n_samples=4, seed=1)
    np.testing.assert_array_equal(rows, view)
    assert rows.shape == (4, x.shape[1])


def test_dropout_probability_needs_a_zero_inflated_likelihood(small_adata):
    from pyro_scvi import NB, ZIP, Poisson

    for likelihood in (NB(), Poisson()):
        m = SCVI(small_adata, likelihood=likelihood, n_latent=2, n_hidden=8)
        with pytest.raises(InputError, match="zero-inflated likelihood.*ZINB.*ZIP"):
            m.get_dropout_probability()
    m = SCVI(small_adata, likelihood=ZIP(), n_latent=2, n_hidden=8)
    p = m.get_dropout_probability(n_samples=2, seed=0)
    x = small_adata.X.toarray()
    assert ((p[x == 0] >= 0) & (p[x == 0] <= 1)).all() and np.isnan(p[x > 0]).all()
    with pytest.raises(InputError, match="genes the model does not know"):
        m.get_dropout_probability(gene_list=["nope"])
    with pytest.raises(InputError, match="indices out of range"):
        m.get_dropout_probability(indices=[0, 10_000])
    with pytest.raises(InputError, match="n_samples"):
        m.get_dropout_probability(n_samples=0)


def test_dropout_probability_tracks_the_true_share_of_structural_zeros():
    """ZINB data with a known gate per gene: among each gene's zeros, the share that the
    gate made is known; the model's mean P(dropout | x = 0) must rank genes by it."""
    from scipy import stats

    rng = np.random.default_rng(0)
    n_cells, n_genes = 600, 40
    cluster = rng.integers(0, 3, n_cells)
    logits = rng.normal(0, 1, n_genes) + rng.normal(0, 1, (3, n_genes))[cluster]
    freq = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    mu = np.exp(rng.normal(np.log(20 * n_genes), 0.3, n_cells))[:, None] * freq
    theta = np.exp(rng.normal(1.0, 0.3, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    structural = rng.random(counts.shape) < rng.uniform(0, 0.7, n_genes)
    counts[structural] = 0
    zeros = counts == 0
    true_share = (structural & zeros).sum(0) / zeros.sum(0)
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.int32)))
    model = SCVI(adata, n_latent=3, n_hidden=32)
    model.train(max_epochs=60, lr=1e-2, batch_size=128, train_size=1.0, progress_bar=False)
    estimate = np.nanmean(model.get_dropout_probability(n_samples=10, seed=0), axis=0)
    rho = stats.spearmanr(estimate, true_share).statistic
    shuffled = [
        stats.spearmanr(rng.permutation(estimate), true_share).statistic for _ in range(200)
    ]
    assert rho > 0.5, rho
    assert rho > np.quantile(shuffled, 0.95) + 0.3, (rho, np.quantile(shuffled, 0.95))
    # and on the probability scale, not only in rank
    assert np.abs(estimate - true_share).mean() < 0.15


def test_observed_library_weights_equal_an_observed_library_twins():
    """``observed_library=True`` on a latent-library model gives the weights of the model
    that observes its library, with the same networks: ``log p(x | z, l_obs) + log p(z) -
    log q(z | x)``, computed there without any conditioning."""
    from pyro_scvi import ScviGuide, ScviModel
    from pyro_scvi.model.priors import LogNormalLibrary, ObservedLibrary

    torch.manual_seed(0)
    n_genes, n_batch = 12, 2
    prior = LogNormalLibrary(torch.tensor([3.0, 3.5]), torch.tensor([0.5, 0.3]))
    latent = ScviModel(n_genes, n_batch, prior, n_latent=3, n_hidden=8)
    latent_guide = ScviGuide(n_genes, n_batch, n_latent=3, n_hidden=8)
    twin = ScviModel(n_genes, n_batch, ObservedLibrary(), n_latent=3, n_hidden=8)
    missing, unexpected = twin.load_state_dict(latent.state_dict(), strict=False)
    assert not missing and all(k.startswith("library_prior.") for k in unexpected)
    twin_guide = ScviGuide(n_genes, n_batch, n_latent=3, n_hidden=8, library=ObservedLibrary())
    twin_guide.load_state_dict(latent_guide.state_dict(), strict=False)
    x = torch.poisson(torch.full((9, n_genes), 3.0)) + 1.0
    b = torch.tensor([0, 1] * 4 + [0])

    def weights(model, guide, **kw):
        pyro.set_rng_seed(1)
        return posterior.log_importance_weights(model, guide, x, b, 5, **kw)

    given = weights(latent, latent_guide, observed_library=True)
    torch.testing.assert_close(given, weights(twin, twin_guide))
    torch.testing.assert_close(weights(twin, twin_guide, observed_library=True), given)
    # integrating over l is a different number (it adds log p(l) - log q(l) at a draw of l)
    assert not torch.allclose(weights(latent, latent_guide), given)
