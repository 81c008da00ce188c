"""Annealed importance sampling (pyro_scvi.posterior.ais) against exact log p(x).

The truth: a model with a 1-d ``z`` and a latent library ``l``, small enough that
``log p(x) = log int int p(x | z, l) p(z) p(l) dz dl`` is a sum over a fine grid
(computed here from the decoder and the likelihood directly, not through the traces AIS
uses). Every bound on the AIS error is a z-score against its own standard error, with a
Bonferroni threshold over the cells, not a tuned tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm

import pyro_scvi
from pyro_scvi.analysis.criticism import PARETO_K_THRESHOLD, psis_elpd
from pyro_scvi.data.counts import CountData
from pyro_scvi.model.guides import PerCellGuide
from pyro_scvi.model.priors import LogNormalLibrary, ObservedLibrary
from pyro_scvi.posterior import ais, log_importance_weights, proposals

N_CELLS, N_GENES = 6, 8
#: Two-sided Bonferroni threshold at family-wise level 0.001 over the cells
Z_BOUND = float(norm.isf(0.001 / (2 * N_CELLS)))


def tiny_model(observed_library: bool = False) -> pyro_scvi.ScviModel:
    torch.manual_seed(0)
    library = (
        ObservedLibrary()
        if observed_library
        else LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    )
    model = pyro_scvi.ScviModel(N_GENES, 1, library, n_latent=1, n_hidden=4).double()
    with torch.no_grad():  # a decoder that makes z matter: a curved, skewed posterior
        for p in model.decoder.parameters():
            p.mul_(3.0)
        model.log_theta.fill_(1.0)
    return model.eval()


def simulate(model: pyro_scvi.ScviModel, seed: int = 1) -> CountData:
    torch.manual_seed(seed)
    b = torch.zeros(N_CELLS, dtype=torch.long)
    z = torch.randn(N_CELLS, 1, 1, dtype=torch.float64)
    l = 3.0 + 0.5 * torch.randn(N_CELLS, 1, dtype=torch.float64)
    x = exact_likelihood(model, z.reshape(-1, 1), l, None, b).sample()
    return CountData(
        X=x.numpy().astype(np.float64),
        batch_index=np.zeros(N_CELLS, dtype=np.int64),
        batch_categories=("0",),
        obs_names=pd.Index([f"c{i}" for i in range(N_CELLS)]),
        var_names=pd.Index([f"g{i}" for i in range(N_GENES)]),
    )


def exact_likelihood(model, z, l, x, b):
    """p(x | z, l) from the decoder; z ``(n, 1)``, l ``(n, 1)``."""
    out = model.decoder(z, b)
    mu = torch.exp(l) * torch.softmax(out["rho_logits"], -1)
    return model.likelihood(mu, model.log_theta.exp(), out["gate_logits"])


def exact_log_px(model, data: CountData, observed_library: bool = False):
    """log p(x) per cell by quadrature on a fine grid, and the posterior's moments."""
    x, b = data.tensors(np.arange(data.n_cells))
    out = ais.quadrature_log_px(
        model,
        x,
        b,
        torch.linspace(-8, 8, 801, dtype=torch.float64),
        None if observed_library else torch.linspace(-1.0, 7.0, 401, dtype=torch.float64),
    )
    return out["log_px"].numpy(), out["mean"].numpy(), out["sd"].numpy()


def guide_at(model, data, moments, loc_shift: float = 0.0, scale_factor: float = 1.0):
    """A per-cell Normal guide at the posterior's moments, its mean shifted by
    ``loc_shift`` posterior sds and its sds multiplied by ``scale_factor``."""
    means, sds = moments
    guide = PerCellGuide(data.n_cells, 1, library=model.library_prior).double()
    with torch.no_grad():
        guide.z_loc.copy_(torch.as_tensor(means[:, :1] + loc_shift * sds[:, :1]))
        guide.z_log_scale.copy_(torch.as_tensor(np.log(sds[:, :1] * scale_factor)))
        guide.l_loc.copy_(torch.as_tensor(means[:, 1:] + loc_shift * sds[:, 1:]))
        guide.l_log_scale.copy_(torch.as_tensor(np.log(sds[:, 1:] * scale_factor)))
    return guide


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    data = simulate(model)
    exact, means, sds = exact_log_px(model, data)
    return model, data, exact, (means, sds)


def z_scores(result: dict, exact: np.ndarray) -> np.ndarray:
    return (result["marginal_ll"] - exact) / result["se"]


def test_ais_agrees_with_exact_log_px_within_its_standard_error(setup):
    model, data, exact, moments = setup
    guide = guide_at(model, data, moments)
    torch.manual_seed(0)
    out = ais.ais_marginal_ll(model, guide, data, np.arange(N_CELLS), n_chains=16, n_steps=30)
    assert np.all(out["se"] > 0) and np.all(out["se"] < 0.5)
    assert np.abs(z_scores(out, exact)).max() < Z_BOUND, (out, exact)
    assert np.all((out["acceptance"] > 0.3) & (out["acceptance"] <= 1.0))


def test_is_and_ais_agree_where_pareto_k_is_small(setup):
    model, data, exact, moments = setup
    guide = guide_at(model, data, moments, scale_factor=1.3)  # a slightly wide proposal: k small
    x, b = data.tensors(np.arange(N_CELLS))
    cells = torch.arange(N_CELLS)
    torch.manual_seed(0)
    log_w = log_importance_weights(model, guide, x, b, 4000, cell_index=cells)
    k = psis_elpd(log_w.numpy())["pareto_k"].to_numpy()
    assert np.all(k < 0.5)
    is_est, is_se, _ = ais.log_mean_exp_se(log_w)
    torch.manual_seed(1)
    out = ais.ais_marginal_ll(model, guide, data, np.arange(N_CELLS), n_chains=16, n_steps=30)
    diff = out["marginal_ll"] - is_est.numpy()
    assert np.abs(diff / np.hypot(out["se"], is_se.numpy())).max() < Z_BOUND
    assert np.abs((is_est.numpy() - exact) / is_se.numpy()).max() < Z_BOUND


def test_ais_stays_calibrated_where_importance_sampling_breaks(setup):
    """A proposal 3 sds off and 3 times too narrow: IS's k is far above 0.7 and its
    estimate far below the truth; AIS, started from it, still finds log p(x)."""
    model, data, exact, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    torch.manual_seed(0)
    log_w = log_importance_weights(model, bad, x, b, 1000, cell_index=torch.arange(N_CELLS))
    k = psis_elpd(log_w.numpy())["pareto_k"].to_numpy()
    assert np.mean(k > PARETO_K_THRESHOLD) >= 0.5
    is_err = exact - ais.log_mean_exp_se(log_w)[0].numpy()
    assert is_err.max() > 1.0  # IS misses by more than a nat somewhere
    torch.manual_seed(0)
    out = ais.ais_marginal_ll(model, bad, data, np.arange(N_CELLS), n_chains=16, n_steps=100)
    assert np.abs(z_scores(out, exact)).max() < Z_BOUND, (out, exact)
    assert np.abs(out["marginal_ll"] - exact).max() < is_err.min()  # nearer every cell


def test_ais_on_an_observed_library_model_has_no_l():
    model = tiny_model(observed_library=True)
    data = simulate(tiny_model())
    exact = exact_log_px(model, data, observed_library=True)[0]
    # a crude q(z): Normal(0, 0.5) for every cell; 100 steps carry it to the posterior
    g = PerCellGuide(N_CELLS, 1, library=ObservedLibrary()).double()
    with torch.no_grad():
        g.z_log_scale.fill_(math.log(0.5))
    torch.manual_seed(0)
    out = ais.ais_marginal_ll(model, g, data, np.arange(N_CELLS), n_chains=16, n_steps=100)
    assert np.abs(z_scores(out, exact)).max() < Z_BOUND, (out, exact)


def test_ais_query_on_a_fitted_model_is_above_the_elbo_and_reports_its_error():
    adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    model.train(max_epochs=3, progress_bar=False)
    table = model.get_marginal_ll_ais(indices=np.arange(5), n_chains=4, n_steps=10, seed=0)
    assert list(table.columns) == ["marginal_ll", "se", "ess", "acceptance"]
    assert list(table.index) == list(adata.obs_names[:5])
    elbo = model.get_elbo(per_cell=True, n_samples=50, seed=0)[:5]
    assert np.all(table["marginal_ll"].to_numpy() > elbo)
    again = model.get_marginal_ll_ais(indices=np.arange(5), n_chains=4, n_steps=10, seed=0)
    pd.testing.assert_frame_equal(table, again)  # seeded
    # every setting is recorded, the fixed ones too, and the tuning target is live
    assert table.attrs["settings"] == {
        "n_chains": 4, "n_steps": 10, "n_leapfrog": 4, "step_size": 0.25,
        "target_accept": 0.65, "schedule": "sigmoid", "sharpness": 4.0, "pilot_draws": 64,
        "observed_library": False,
    }  # fmt: skip
    other = model.get_marginal_ll_ais(indices=np.arange(5), n_chains=4, n_steps=10, seed=0,
                                      target_accept=0.2)  # fmt: skip
    assert other.attrs["settings"]["target_accept"] == 0.2
    assert not np.array_equal(other["acceptance"], table["acceptance"])


def test_ais_refuses_bad_settings():
    adata = pyro_scvi.datasets.synthetic_zinb(n_cells=10, n_genes=5, seed=0)
    model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=4)
    with pytest.raises(pyro_scvi.InputError, match="n_chains"):
        model.get_marginal_ll_ais(n_chains=1)
    with pytest.raises(pyro_scvi.InputError, match="n_steps"):
        model.get_marginal_ll_ais(n_steps=0)
    with pytest.raises(pyro_scvi.InputError, match="target_accept"):
        model.get_marginal_ll_ais(target_accept=1.0)


def test_a_defensive_mixture_keeps_pareto_k_low_where_q_is_too_narrow(setup):
    """q 3 times too narrow: its own weights are heavy-tailed (k > 0.7 in several cells);
    mixed with a Student-t twice as wide, every cell's k is below 0.7 and the estimate
    agrees with the exact log p(x) within its standard error."""
    model, data, exact, moments = setup
    narrow = guide_at(model, data, moments, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    cells = torch.arange(N_CELLS)
    torch.manual_seed(0)
    plain = log_importance_weights(model, narrow, x, b, 1000, cell_index=cells)
    assert np.mean(ais.pareto_k(plain) > PARETO_K_THRESHOLD) >= 1 / 3
    torch.manual_seed(0)
    mixed = ais.defensive_log_weights(model, narrow, x, b, 1000, cell_index=cells)
    assert np.all(ais.pareto_k(mixed) < PARETO_K_THRESHOLD)
    est, se, _ = ais.log_mean_exp_se(mixed)
    assert np.abs((est.numpy() - exact) / se.numpy()).max() < Z_BOUND


def test_an_mcmc_proposal_keeps_pareto_k_low_where_q_is_misplaced(setup):
    """q 3 posterior sds off and 3 times too narrow: its weights are heavy-tailed in most
    cells, and the defensive mixture cannot fix a misplaced q. A Student-t fitted to a
    short annealed MCMC run from q sits on the posterior: every cell's k is below 0.7 at
    the same K, and the estimate agrees with the exact log p(x) within its standard error."""
    model, data, exact, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    cells = torch.arange(N_CELLS)
    k = {}
    for name, proposal in (
        ("q", proposals.GuideProposal()),
        ("mcmc", proposals.MCMCProposal(n_steps=30, n_chains=32)),
    ):
        torch.manual_seed(0)
        log_w = proposal.log_weights(model, bad, x, b, 1000, cell_index=cells)
        k[name] = ais.pareto_k(log_w)
    assert np.mean(k["q"] > PARETO_K_THRESHOLD) >= 2 / 3
    assert np.all(k["mcmc"] < PARETO_K_THRESHOLD)
    est, se, _ = ais.log_mean_exp_se(log_w)
    assert np.abs((est.numpy() - exact) / se.numpy()).max() < Z_BOUND


def test_a_laplace_proposal_keeps_pareto_k_low_where_q_is_misplaced(setup):
    """q 3 posterior sds off and 3 times too narrow: a Student-t at each cell's posterior
    mode, scaled by the inverse Hessian there, brings every cell's k under 0.7 at the same
    K, and its estimate agrees with the exact log p(x) within its standard error."""
    model, data, exact, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    cells = torch.arange(N_CELLS)
    laplace = proposals.LaplaceProposal()
    torch.manual_seed(0)
    plain = proposals.GuideProposal().log_weights(model, bad, x, b, 1000, cell_index=cells)
    torch.manual_seed(0)
    log_w = laplace.log_weights(model, bad, x, b, 1000, cell_index=cells)
    assert np.mean(ais.pareto_k(plain) > PARETO_K_THRESHOLD) >= 2 / 3
    assert np.all(ais.pareto_k(log_w) < PARETO_K_THRESHOLD)
    est, se, _ = ais.log_mean_exp_se(log_w)
    assert np.abs((est.numpy() - exact) / se.numpy()).max() < Z_BOUND
    # every cell reached its mode, where the curvature was positive definite
    assert laplace.settings()["diagnostics"] == {
        "cells": N_CELLS, "cells_jittered": 0, "cells_unconverged": 0
    }  # fmt: skip


def test_more_adaptive_rounds_keep_the_laplace_estimate_unbiased(setup):
    """Each adaptive round adds a part fitted to weighted draws; the importance samples are
    fresh draws of the final mixture, so with three rounds the estimate still agrees with
    the exact log p(x) within its standard error, every k below 0.7, and the settings say
    how many rounds ran."""
    model, data, exact, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    laplace = proposals.LaplaceProposal(adapt_rounds=3)
    torch.manual_seed(0)
    log_w = laplace.log_weights(model, bad, x, b, 1000, cell_index=torch.arange(N_CELLS))
    assert np.all(ais.pareto_k(log_w) < PARETO_K_THRESHOLD)
    est, se, _ = ais.log_mean_exp_se(log_w)
    assert np.abs((est.numpy() - exact) / se.numpy()).max() < Z_BOUND
    assert laplace.settings()["adapt_rounds"] == 3


def test_a_laplace_proposal_without_newton_steps_reports_its_cells_unconverged(setup):
    """No Newton step: the Student-t sits at q's mean, 3 sds off, and the proposal says
    that no cell reached its mode; its weights stay finite (q's share bounds them)."""
    model, data, _, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    laplace = proposals.LaplaceProposal(n_newton=0, n_chains=0)
    torch.manual_seed(0)
    log_w = laplace.log_weights(model, bad, x, b, 100, cell_index=torch.arange(N_CELLS))
    assert torch.isfinite(log_w).all()
    assert laplace.diagnostics["cells_unconverged"] == N_CELLS


def test_a_refined_proposal_moves_a_misplaced_q_and_lowers_k(setup):
    """Refining q per cell with the model fixed moves it onto the posterior: fewer cells
    with k > 0.7 than q's own, and an estimate that agrees with the exact one."""
    model, data, exact, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    cells = torch.arange(N_CELLS)
    torch.manual_seed(0)
    plain = proposals.GuideProposal().log_weights(model, bad, x, b, 1000, cell_index=cells)
    torch.manual_seed(0)
    refined = proposals.RefinedProposal(n_steps=100).log_weights(
        model, bad, x, b, 1000, cell_index=cells
    )
    k_plain, k_refined = ais.pareto_k(plain), ais.pareto_k(refined)
    assert np.mean(k_refined > PARETO_K_THRESHOLD) < np.mean(k_plain > PARETO_K_THRESHOLD)
    est, se, _ = ais.log_mean_exp_se(refined)
    assert np.abs((est.numpy() - exact) / se.numpy()).max() < Z_BOUND


def test_proposals_refuse_bad_settings_and_record_theirs():
    with pytest.raises(ValueError, match="n_chains"):
        proposals.MCMCProposal(n_chains=1)
    with pytest.raises(ValueError, match="mix"):
        proposals.RefinedProposal(mix=1.0)
    assert proposals.MCMCProposal(n_steps=7).settings() | {"n_steps": 7} == (
        proposals.MCMCProposal(n_steps=7).settings()
    )
    assert proposals.DefensiveProposal().settings()["proposal"] == "DefensiveProposal"
    for bad in ({"mix": 0.0}, {"df": 0}, {"n_newton": -1}, {"n_chains": 1}, {"n_steps": 0},
                {"step_size": 0.0}, {"target_accept": 1.0}, {"shrink": 1.5},
                {"adapt_keep": -0.1}, {"eig_floor": 0.0}, {"n_backtrack": 0},
                {"adapt_rounds": 0}, {"adapt_rounds": 1.5}):  # fmt: skip
        with pytest.raises(pyro_scvi.InputError, match=next(iter(bad))):
            proposals.LaplaceProposal(**bad)
    assert proposals.LaplaceProposal(df=3).settings() == {
        "proposal": "LaplaceProposal", "n_newton": 20, "n_chains": 64, "n_steps": 10,
        "n_leapfrog": 3, "n_adapt": 1000, "df": 3.0, "inflate": 1.5, "mix": 0.1, "tol": 1e-3,
        "step_size": 0.5, "target_accept": 0.75, "shrink": 0.1, "adapt_keep": 0.2,
        "eig_floor": 1e-4, "n_backtrack": 12, "adapt_rounds": 2,
        "diagnostics": {"cells": 0, "cells_jittered": 0, "cells_unconverged": 0},
    }  # fmt: skip


@pytest.mark.parametrize(
    "setting",
    [{"step_size": 0.1}, {"target_accept": 0.3}, {"shrink": 0.9}, {"adapt_keep": 0.9},
     {"eig_floor": 0.5}, {"n_backtrack": 1}, {"adapt_rounds": 1}, {"adapt_rounds": 3}],
)  # fmt: skip
def test_every_laplace_setting_it_records_changes_the_proposal(setup, setting):
    """The inner constants settings() records are the ones used: changing one, with the
    same seed, changes the log weights (a recorded but dead setting would not)."""
    model, data, _, moments = setup
    bad = guide_at(model, data, moments, loc_shift=3.0, scale_factor=1 / 3)
    x, b = data.tensors(np.arange(N_CELLS))
    small = {"n_chains": 8, "n_steps": 3, "n_adapt": 50, "n_newton": 3}
    runs = []
    for kw in (small, small | setting):
        torch.manual_seed(0)
        prop = proposals.LaplaceProposal(**kw)
        runs.append(prop.log_weights(model, bad, x, b, 20, cell_index=torch.arange(N_CELLS)))
    assert prop.settings() | setting == prop.settings()
    assert not torch.equal(*runs)
