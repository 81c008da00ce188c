"""Inference schemes: prior x likelihood x ELBO; analytic KL; IW bound; JIT; BayesianDecoder."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.infer.trace_mean_field_elbo as tmf_module
import pytest
import torch
from pyro import poutine
from pyro.infer import (
    JitTrace_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI, Engine, InputError
from pyro_scvi.model import ScviModel
from pyro_scvi.model.guides import ScviGuide
from pyro_scvi.model.likelihoods import NB, ZINB, ZIP, Poisson
from pyro_scvi.model.priors import LogNormalLibrary, MixtureOfGaussians, StandardNormal, VampPrior
from pyro_scvi.model.schemes import BayesianDecoder, is_global
from pyro_scvi.posterior import fit_statistics
from pyro_scvi.train.kl import Annealed, JitCall

# torch 2.13 deprecates torch.jit.trace, which Pyro's JIT ELBOs are built on
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.trace` is deprecated:DeprecationWarning"
)

N_LATENT = 2


def laplace_prior():
    return dist.Laplace(torch.zeros(N_LATENT), 1.0).to_event(1)


PRIORS = {
    "normal": StandardNormal,
    "mog": lambda: MixtureOfGaussians(3),
    "vamp": lambda: VampPrior(4),
    "callable": lambda: laplace_prior,
}
LIKELIHOODS = {"zinb": ZINB, "nb": NB, "poisson": Poisson, "zip": ZIP}
ELBOS = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "iwae": lambda: RenyiELBO(alpha=0, num_particles=3, vectorize_particles=True),
    "jit": lambda: JitTrace_ELBO(ignore_jit_warnings=True),
    "jit-meanfield": lambda: JitTraceMeanField_ELBO(ignore_jit_warnings=True),
}


@pytest.fixture(scope="module")
def tiny_adata():
    return synthetic_zinb(n_cells=40, n_genes=12, n_batches=2, seed=0)


@pytest.mark.parametrize("elbo", ELBOS)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("prior", PRIORS)
def test_every_prior_likelihood_and_elbo_trains(tiny_adata, prior, likelihood, elbo):
    m = SCVI(
        tiny_adata,
        batch_key="batch",
        prior=PRIORS[prior](),
        likelihood=LIKELIHOODS[likelihood](),
        n_latent=N_LATENT,
        n_hidden=8,
    )
    # two epochs: KL weight 0 then 1 (both warm-up paths); 30 training cells in minibatches
    # of 16 and 14 (two minibatch sizes, two compiled graphs under JIT); 10 validation cells
    m.train(
        max_epochs=2,
        batch_size=16,
        train_size=0.75,
        kl_warmup_epochs=1,
        elbo=ELBOS[elbo](),
        progress_bar=False,
    )
    h = m.history
    assert list(h["kl_weight"]) == [0.0, 1.0]
    assert np.isfinite(h[["train_elbo", "validation_elbo"]].to_numpy()).all()
    assert m.get_latent_representation().shape == (40, N_LATENT)
    s = m.posterior_samples(n_samples=2, sites=("z", "x"), seed=0)
    assert s["z"].shape == (2, 40, N_LATENT) and s["x"].shape == (2, 40, 12)


# ---------------------------------------------------------------------- fixed model/guide
def make_pair(prior=None, n_genes=15, n_batch=2, dispersion="gene"):
    torch.manual_seed(0)
    lib = LogNormalLibrary(torch.full((n_batch,), 4.0), torch.full((n_batch,), 0.5))
    guide = ScviGuide(n_genes, n_batch, n_latent=N_LATENT, n_hidden=16)
    if isinstance(prior, VampPrior):
        prior.attach_encoder(guide.z_encoder, torch.rand(prior.n_components, n_genes))
    model = ScviModel(
        n_genes, n_batch, lib, n_latent=N_LATENT, n_hidden=16, prior=prior, dispersion=dispersion
    )
    return model.eval(), guide.eval()


@pytest.fixture
def counts():
    torch.manual_seed(1)
    x = torch.poisson(torch.rand(20, 15) * 80)
    return x, torch.arange(20) % 2


@pytest.mark.parametrize("prior", ["normal", "mog", "vamp"])
def test_model_and_guide_under_vectorized_particles(counts, prior):
    # RenyiELBO/vectorized Trace_ELBO put a particle plate at dim -3, left of cells (-2)
    # and genes (-1); the decoder flattens the extra leading dimension.
    x, b = counts
    model, guide = make_pair(PRIORS[prior](), dispersion="gene-cell")
    with torch.no_grad(), pyro.plate("particles", 5, dim=-3):
        g = poutine.trace(guide).get_trace(x, b)
        m = poutine.trace(poutine.replay(model, trace=g)).get_trace(x, b)
    m.compute_log_prob()
    assert m.nodes["z"]["value"].shape == (5, 20, 1, N_LATENT)
    assert m.nodes["z"]["log_prob"].shape == (5, 20, 1)
    assert m.nodes["rho"]["value"].shape == (5, 20, 15)
    assert m.nodes["x"]["log_prob"].shape == (5, 20, 15)
    assert torch.isfinite(m.nodes["x"]["log_prob"]).all()


def test_mean_field_elbo_uses_the_analytic_kl_for_z_and_l(counts, monkeypatch):
    x, b = counts
    calls = []
    real_kl = tmf_module.kl_divergence

    def spy(q, p):
        try:
            out = real_kl(q, p)
        except NotImplementedError:
            calls.append((q.event_shape, "fallback"))
            raise
        calls.append((q.event_shape, "analytic"))
        return out

    monkeypatch.setattr(tmf_module, "kl_divergence", spy)
    model, guide = make_pair()
    TraceMeanField_ELBO().loss(model, guide, x, b)
    # z (event_shape (N_LATENT,)) and l (event_shape ()) both took the closed form
    assert sorted(calls) == sorted(
        [(torch.Size([N_LATENT]), "analytic"), (torch.Size([]), "analytic")]
    )
    # a mixture prior has no closed-form KL: Pyro falls back to sampling for z only
    calls.clear()
    model, guide = make_pair(MixtureOfGaussians(3))
    TraceMeanField_ELBO().loss(model, guide, x, b)
    assert sorted(calls) == sorted(
        [(torch.Size([N_LATENT]), "fallback"), (torch.Size([]), "analytic")]
    )


def test_analytic_kl_estimates_the_same_elbo_with_less_noise(counts):
    x, b = counts
    model, guide = make_pair()
    with torch.no_grad():
        mc = np.array([Trace_ELBO().loss(model, guide, x, b) for _ in range(200)])
        kl = np.array([TraceMeanField_ELBO().loss(model, guide, x, b) for _ in range(200)])
    se = math.sqrt(mc.var() / len(mc) + kl.var() / len(kl))
    assert abs(mc.mean() - kl.mean()) < 4 * se  # both unbiased for the same ELBO
    assert kl.std() < mc.std()


def test_importance_weighted_bound_is_at_least_the_elbo(counts):
    """IWAE_K >= ELBO for the same model and guide (Burda et al., 2016), K = 16.

    Both estimators are averaged over 40 independent evaluations at fixed parameters, so
    the comparison is of their expectations up to Monte Carlo error; the tolerance is four
    standard errors of the difference (a 3e-5 false-alarm rate for Gaussian noise). At an
    untrained guide the gap is several nats per cell, so the test also asserts it is
    clearly positive: the check has power.
    """
    x, b = counts
    model, guide = make_pair()
    iwae = RenyiELBO(alpha=0, num_particles=16, vectorize_particles=True, max_plate_nesting=2)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=2)
    with torch.no_grad():
        iw = -np.array([iwae.loss(model, guide, x, b) for _ in range(40)]) / len(x)
        el = -np.array([elbo.loss(model, guide, x, b) for _ in range(40)]) / len(x)
    se = math.sqrt(iw.var(ddof=1) / len(iw) + el.var(ddof=1) / len(el))
    assert iw.mean() >= el.mean() - 4 * se
    assert iw.mean() - el.mean() > 4 * se


def test_renyi_minibatch_objective_is_the_per_cell_bound(counts):
    """train_svi calls RenyiELBO without the minibatch rescaling (num_cells=None).

    Then its loss is the sum over cells of each cell's K-sample bound, the same quantity
    as the importance-sampled marginal likelihood of :func:`fit_statistics` with K draws
    (an independent implementation); both averaged over 60 evaluations, compared within
    four standard errors.
    """
    x, b = counts
    model, guide = make_pair()
    k, reps, cells = 8, 60, torch.arange(20)
    iwae = RenyiELBO(alpha=0, num_particles=k, vectorize_particles=True, max_plate_nesting=2)

    class Data:  # the two methods of CountData that fit_statistics uses
        n_cells = 20

        def minibatches(self, indices, batch_size):
            yield indices

        def tensors(self, idx, device="cpu"):
            return x[idx], b[idx]

    with torch.no_grad():
        renyi = np.array([-iwae.loss(model, guide, x, b, cells, None) for _ in range(reps)])
        ref = np.array(
            [
                fit_statistics(model, guide, Data(), np.arange(20), n_samples=k)[
                    "marginal_ll"
                ].sum()
                for _ in range(reps)
            ]
        )
    se = math.sqrt(renyi.var(ddof=1) / reps + ref.var(ddof=1) / reps)
    assert abs(renyi.mean() - ref.mean()) < 4 * se


# ---------------------------------------------------------------------- JIT
@pytest.mark.parametrize("jit_cls", [JitTrace_ELBO], ids=lambda c: c.__name__)
def test_jit_elbo_applies_the_kl_weight_it_is_given(counts, jit_cls):
    """One compiled graph, three KL weights: each loss equals the uncompiled Trace_ELBO's.

    Compiled with weight 0, a graph that froze the weight would return the weight-0 loss
    for all three; with the same seed the compiled graph draws the same samples as the
    uncompiled ELBO, so the losses must agree to float precision.
    """
    x, b = counts
    # float64 throughout, so that "agree" means to float64 rounding: the losses sum
    # n = x.numel() per-count terms, and two float64 sums of n terms differ by at most
    # n * eps64 times the sum of their magnitudes, which is |loss| (log-probabilities of
    # counts are all negative; the KL terms are a small part).
    x = x.double()
    model, guide = (m.double() for m in make_pair())
    rel = x.numel() * torch.finfo(torch.float64).eps
    elbo = jit_cls(ignore_jit_warnings=True)
    jit_model, jit_guide = JitCall(model), JitCall(guide)
    cells = torch.arange(20)

    def jit_loss(w):
        args = (x, b, cells, torch.tensor(w, dtype=torch.float64))
        return elbo.loss_and_grads(jit_model, jit_guide, *args, num_cells=40, n_cells=20)

    jit_loss(0.0)  # compile (tracing draws extra samples, so it is not compared)
    losses = {}
    for w in (0.0, 0.5, 1.0):
        pyro.set_rng_seed(3)
        compiled = jit_loss(w)
        pyro.set_rng_seed(3)
        reference = Trace_ELBO().loss_and_grads(
            Annealed(model), Annealed(guide), x, b, cells, 40, w
        )
        assert compiled == pytest.approx(reference, rel=rel, abs=0)
        losses[w] = compiled
    assert losses[1.0] != pytest.approx(losses[0.0], rel=1e-4)  # the weight matters
    assert losses[0.5] == pytest.approx((losses[0.0] + losses[1.0]) / 2, rel=rel, abs=0)


def test_train_svi_passes_the_kl_weight_to_jit_elbos_as_a_tensor(monkeypatch):
    adata = synthetic_zinb(n_cells=40, n_genes=12, seed=0)
    m = SCVI(adata, n_latent=N_LATENT, n_hidden=8)
    seen = []
    real = JitTrace_ELBO.loss_and_grads

    def spy(self, model, guide, *args, **kwargs):
        seen.append((args[3], dict(kwargs)))
        return real(self, model, guide, *args, **kwargs)

    monkeypatch.setattr(JitTrace_ELBO, "loss_and_grads", spy)
    m.train(
        max_epochs=3,
        batch_size=16,
        kl_warmup_epochs=2,
        elbo=JitTrace_ELBO(ignore_jit_warnings=True),
        progress_bar=False,
    )
    weights = [float(w) for w, _ in seen]
    assert all(isinstance(w, torch.Tensor) for w, _ in seen)
    assert sorted(set(weights)) == [0.0, 0.5, 1.0]
    n_train = len(m.train_indices)
    assert {kw["num_cells"] for _, kw in seen} == {n_train}
    assert {kw["n_cells"] for _, kw in seen} == {16, n_train - 32}


def test_a_jit_elbo_passed_to_several_runs_compiles_for_each(tiny_adata):
    # Pyro's JIT ELBOs keep the model, guide and parameters they first compiled: a run
    # compiles its own copy of the ELBO passed, so the object may serve several runs, each
    # training its own model (it once trained the first model again, or failed).
    elbo = JitTrace_ELBO(ignore_jit_warnings=True)

    def new():
        return SCVI(tiny_adata, n_latent=N_LATENT, n_hidden=8)

    a = new().train(max_epochs=1, elbo=elbo, progress_bar=False, seed=0)
    a.train(max_epochs=1, elbo=elbo, progress_bar=False)  # continue, the same object
    assert len(a.history) == 2 and np.isfinite(a.history["train_elbo"]).all()
    assert a.engine["compiled"] and a.engine["compiled_sizes"]
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    shared = new().train(max_epochs=2, elbo=elbo, progress_bar=False, seed=1)  # another model
    fresh = new().train(
        max_epochs=2, elbo=JitTrace_ELBO(ignore_jit_warnings=True), progress_bar=False, seed=1
    )
    assert all(torch.equal(v, before[k]) for k, v in a.model.state_dict().items())
    # the shared ELBO trained the new model as a new ELBO does (recompiled: float tolerance)
    np.testing.assert_allclose(
        shared.history["train_elbo"], fresh.history["train_elbo"], rtol=1e-5
    )
    for key, value in fresh.model.state_dict().items():
        torch.testing.assert_close(shared.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)


def test_jit_training_matches_uncompiled_training(tiny_adata):
    # Not the same random draws (compilation consumes some), so compare what training
    # achieves: from the same initial networks, the same schedule improves the ELBO by a
    # similar amount with and without compilation.
    gain = {}
    for name, elbo in (("plain", Trace_ELBO()), ("jit", JitTrace_ELBO(ignore_jit_warnings=True))):
        m = SCVI(tiny_adata, n_latent=N_LATENT, n_hidden=8)
        kwargs = dict(batch_size=16, lr=1e-2, kl_warmup_epochs=5, elbo=elbo, progress_bar=False)
        m.train(max_epochs=1, **dict(kwargs, elbo=Trace_ELBO(), lr=1e-12))  # seeded init
        before = m.get_elbo(n_samples=50, seed=0)
        m.train(max_epochs=20, **kwargs)
        gain[name] = m.get_elbo(n_samples=50, seed=0) - before
    assert gain["plain"] > 5  # training helps: the comparison has power
    assert gain["jit"] > 0.5 * gain["plain"]


@pytest.mark.parametrize("elbo", ["trace", "iwae"])
def test_default_adam_is_scaled_to_the_cells_a_step_sums_over(tiny_adata, monkeypatch, elbo):
    # eps and weight decay follow scvi-tools' per-cell mean loss: times the number of cells
    # the loss sums over, all training cells (rescaled minibatches) or one minibatch (IWAE)
    m = SCVI(tiny_adata, n_latent=N_LATENT, n_hidden=8)
    m.train(max_epochs=1, batch_size=16, elbo=ELBOS[elbo](), progress_bar=False)
    n = len(m.train_indices) if elbo == "trace" else 16
    assert m.engine["fused_adam"]
    settings = m.history.attrs["optim"]["settings"]
    assert settings["eps"] == pytest.approx(0.01 * n)
    assert settings["weight_decay"] == pytest.approx(1e-6 * n)
    # ... and the optimizer that stepped had them (its saved state)
    (group,) = m.training_run.state.optim["state"]["adam"]["param_groups"]
    assert group["eps"] == pytest.approx(0.01 * n)


# ---------------------------------------------------------------- BayesianDecoder

GLOBAL_SITES = ("rho_weight", "rho_bias", "log_theta")


def bayesian(adata, **kwargs):
    return SCVI(adata, n_latent=N_LATENT, n_hidden=8, scheme=BayesianDecoder(), **kwargs)


def test_bayesian_decoder_globals_are_sample_sites_outside_the_cells_plate(tiny_adata):
    m = bayesian(tiny_adata, batch_key="batch")
    x, b = m.data.tensors(np.arange(8))
    cells = torch.arange(8)
    guide_tr = poutine.trace(m.guide).get_trace(x, b, cells, 40)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(x, b, cells, 40)
    n_genes, n_hidden = tiny_adata.n_vars, 8
    shapes = {"rho_weight": (n_genes, n_hidden), "rho_bias": (n_genes,), "log_theta": (n_genes,)}
    for tr in (guide_tr, model_tr):
        for site, shape in shapes.items():
            node = tr.nodes[site]
            assert node["type"] == "sample" and not node["is_observed"] and is_global(node)
            assert tuple(node["value"].shape) == shape
            assert [f.name for f in node["cond_indep_stack"]] == ["genes"]
            assert node["scale"] == 1.0  # not rescaled with the subsampled cells
        assert tr.nodes["z"]["scale"] == pytest.approx(40 / 8)
    for site in shapes:  # the model uses the guide's draw
        assert torch.equal(model_tr.nodes[site]["value"], guide_tr.nodes[site]["value"])
    # the point-estimated parameters it replaces are gone, not left unused
    assert m.model.log_theta is None and m.model.decoder.rho_logits is None
    assert not any("rho_logits" in n or n == "log_theta" for n, _ in m.model.named_parameters())


def test_bayesian_decoder_globals_kl_is_analytic_and_counted_once(tiny_adata):
    # TraceMeanField_ELBO: loss(N) = (N / B) * cells' terms + KL(globals). Two values of
    # N with the same draws separate the two; the constant part must be the globals' KL.
    m = bayesian(tiny_adata)
    with torch.no_grad():
        for site in GLOBAL_SITES:  # a posterior away from the prior
            m.guide.loc[site].normal_(0.3, 0.5)
            m.guide.log_scale[site].uniform_(-2.0, 0.5)
    x, b = m.data.tensors(np.arange(8))
    losses = {}
    for n in (40, 400):
        pyro.set_rng_seed(0)
        elbo = TraceMeanField_ELBO()
        loss = elbo.differentiable_loss(m.model, m.guide, x, b, torch.arange(8), n)
        losses[n] = float(loss.detach())
    a1, a2 = 40 / 8, 400 / 8
    constant = (a2 * losses[40] - a1 * losses[400]) / (a2 - a1)
    prior = {"rho_weight": 1.0, "rho_bias": 1.0, "log_theta": 1.0}
    with torch.no_grad():
        expected = sum(
            float(
                torch.distributions.kl_divergence(
                    torch.distributions.Normal(m.guide.loc[s], m.guide.log_scale[s].exp()),
                    torch.distributions.Normal(torch.zeros(()), prior[s]),
                ).sum()
            )
            for s in GLOBAL_SITES
        )
    assert expected > 10  # the test has power: a KL scaled by N / B would give 0 here
    assert constant == pytest.approx(expected, rel=1e-3)


def test_bayesian_decoder_posterior_draws_carry_the_globals(tiny_adata):
    point = SCVI(tiny_adata, n_latent=N_LATENT, n_hidden=8).train(max_epochs=2, progress_bar=False)
    m = bayesian(tiny_adata).train(max_epochs=2, progress_bar=False)
    # small query minibatches: draw s of theta must be the same for every cell
    theta = m.get_likelihood_parameters(n_samples=4, batch_size=7, seed=0)["dispersions"]
    assert np.allclose(theta, theta[:, :1, :])  # one draw of the globals per sample
    assert not np.allclose(theta[0], theta[1])  # differs across draws
    spread = theta[:, 0, :].std(0) / theta[:, 0, :].mean(0)
    assert spread.min() > 1e-3
    fixed = point.get_likelihood_parameters(n_samples=4, seed=0)["dispersions"]
    assert np.allclose(fixed, fixed[:1])  # point estimates: the same in every draw


def test_bayesian_decoder_per_cell_fit_leaves_out_the_globals_density(tiny_adata):
    m = bayesian(tiny_adata)
    before = m.get_elbo(per_cell=True, n_samples=5, seed=0)
    m.model.globals.prior_scale.fill_(1e-3)  # a prior the globals' draws are far outside
    after = m.get_elbo(per_cell=True, n_samples=5, seed=0)
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_bayesian_decoder_trains_on_every_engine_path(tiny_adata):
    results = {}
    for name, engine in (
        ("eager", Engine(compiled=False, fused_adam=True)),
        ("compiled", Engine(compiled=True, fused_adam=True)),
        ("pyro-optim", Engine(compiled=False, fused_adam=False)),
    ):
        m = bayesian(tiny_adata)
        m.train(max_epochs=3, batch_size=16, progress_bar=False, engine=engine)
        h = m.history
        assert np.isfinite(h["train_elbo"]).all() and np.isfinite(h["validation_elbo"]).all()
        moved = (m.guide.log_scale["log_theta"] - math.log(m.guide.init_scale)).abs().max()
        assert float(moved.detach()) > 0  # the posterior's scales train
        results[name] = float(h["train_elbo"].iloc[-1])
    assert results["compiled"] == pytest.approx(results["eager"], rel=1e-4)
    assert results["pyro-optim"] == pytest.approx(results["eager"], rel=1e-4)


def test_bayesian_decoder_save_load_round_trip(tiny_adata, tmp_path):
    m = bayesian(tiny_adata).train(max_epochs=2, progress_bar=False)
    m.save(tmp_path / "bd")
    loaded = SCVI.load(tmp_path / "bd", tiny_adata)
    assert isinstance(loaded.scheme, BayesianDecoder)
    assert loaded.settings["scheme"] == repr(BayesianDecoder())
    for site in GLOBAL_SITES:
        assert torch.equal(loaded.guide.loc[site], m.guide.loc[site])
    a = m.posterior_predictive_sample(n_samples=2, seed=1)
    b = loaded.posterior_predictive_sample(n_samples=2, seed=1)
    assert all((p != q).nnz == 0 for p, q in zip(a, b, strict=True))


def test_bayesian_decoder_refuses_what_it_does_not_support(tiny_adata):
    with pytest.raises(InputError, match="dispersion='gene'"):
        SCVI(tiny_adata, dispersion="gene-batch", batch_key="batch", scheme=BayesianDecoder())
    with pytest.raises(ValueError, match="prior_scale"):
        BayesianDecoder(prior_scale=0)
    ref = bayesian(tiny_adata, batch_key="batch").train(max_epochs=1, progress_bar=False)
    query = tiny_adata[:10].copy()
    query.obs["batch"] = "new"
    with pytest.raises(InputError, match="GlobalsGuide"):
        SCVI.load_query_data(query, ref)


def test_bayesian_decoder_is_refused_where_the_model_is_held_fixed(tiny_adata):
    from pyro_scvi.posterior.mcmc import sample_nuts

    m = bayesian(tiny_adata).train(max_epochs=1, train_size=0.75, progress_bar=False)
    with pytest.raises(InputError, match="rho_weight, rho_bias, log_theta"):
        m.get_amortization_gap(n_steps=2)
    with pytest.raises(InputError, match="without scheme="):
        sample_nuts(m.model, m.data, np.arange(2), num_samples=2, warmup_steps=2)


def test_bayesian_decoder_without_a_dispersion_has_no_theta_site(tiny_adata):
    m = SCVI(
        tiny_adata, likelihood=Poisson(), n_latent=N_LATENT, n_hidden=8, scheme=BayesianDecoder()
    )
    assert m.guide.sites == ("rho_weight", "rho_bias")
    m.train(max_epochs=2, progress_bar=False)
    assert np.isfinite(m.history["train_elbo"]).all()
    mean = m.get_likelihood_parameters(n_samples=3, seed=0)["mean"]
    assert not np.allclose(mean[0], mean[1])


def _train_directly(
    adata, param_groups, engine="eager", epochs=3, batch_size=16, scheme=None, with_state=False
):
    """Train a BayesianDecoder model through train_svi (seed 0); return it and the history
    (and, ``with_state``, the TrainState the run left)."""
    from pyro_scvi.train.loop import TrainState, train_svi

    m = SCVI(adata, n_latent=N_LATENT, n_hidden=8, scheme=scheme or BayesianDecoder())
    cells = np.random.default_rng(0).permutation(adata.n_obs)
    n_val = max(adata.n_obs // 10, 1)
    m.train_indices, val = np.sort(cells[n_val:]), np.sort(cells[:n_val])
    state = TrainState.new(0)
    with pyro.get_param_store().scope():
        history = train_svi(
            m.model,
            m.guide,
            m.data,
            m.train_indices,
            val,
            max_epochs=epochs,
            batch_size=batch_size,
            engine=engine,
            param_groups=param_groups,
            seed=0,
            progress_bar=False,
            state=state,
        )
    return (m, history, state) if with_state else (m, history)


def test_bayesian_decoder_q_parameters_get_their_own_adam_group(tiny_adata):
    # read from the optimizer's saved state (TrainState.optim): its torch param groups,
    # the parameters by name
    m, history, state = _train_directly(tiny_adata, param_groups=True, epochs=1, with_state=True)
    saved = state.optim["state"]
    groups = saved["adam"]["param_groups"]
    assert len(groups) == 2
    names = [[saved["names"][i] for i in g["params"]] for g in groups]
    q_names = {
        f"guide$$${name}"
        for name, _ in m.guide.named_parameters()
        if name.startswith(("loc.", "log_scale."))
    }
    assert len(q_names) == 3 * 2 and set(names[1]) == q_names
    assert groups[1]["eps"] == 1e-8 and groups[1]["weight_decay"] == 0.0
    n = len(m.train_indices)
    assert groups[0]["eps"] == pytest.approx(0.01 * n)
    assert not q_names & set(names[0])
    record = history.attrs["optim"]
    assert record["groups_reason"].startswith("on")
    assert record["groups"][0]["settings"]["eps"] == 1e-8
    assert record["groups"][0]["n_tensors"] == len(q_names)

    # a model without a scheme: one group, nothing declared
    plain = SCVI(tiny_adata, n_latent=N_LATENT, n_hidden=8)
    plain.train(max_epochs=1, batch_size=16, progress_bar=False, engine="eager")
    assert len(plain.training_run.state.optim["state"]["adam"]["param_groups"]) == 1
    assert plain.history.attrs["optim"]["groups"] == []
    assert plain.history.attrs["optim"]["groups_reason"].startswith("none declared")


@pytest.mark.parametrize("engine", ["eager", Engine(compiled=False, fused_adam=False)])
def test_bayesian_decoder_log_scales_move_with_their_own_eps(engine):
    # q far narrower than the prior-dominated posterior (sd 1e-4): the globals' KL pulls
    # each log-scale up with a gradient of about -1, and the likelihood's part (sd times
    # a draw times dL/dw) is small. With the cell-scaled eps (0.01 x 900 cells = 9) Adam
    # takes about lr / 10 per step; with q's own group (eps 1e-8) about lr.
    adata = synthetic_zinb(n_cells=1000, n_genes=12, n_batches=1, seed=0)
    scheme = BayesianDecoder(init_scale=1e-4)

    def moved(param_groups):
        m, history = _train_directly(
            adata, param_groups, engine=engine, epochs=3, batch_size=100, scheme=scheme
        )
        start = math.log(m.guide.init_scale)
        shift = [(m.guide.log_scale[s].detach() - start).mean() for s in GLOBAL_SITES]
        return float(torch.stack(shift).mean()), history

    own, history = moved(True)
    scaled, history_off = moved(False)
    assert history_off.attrs["optim"]["groups_reason"].startswith("off")
    assert len(history.attrs["optim"]["groups"]) == 1
    # 3 epochs x 9 steps at lr 1e-3: at most about 0.027
    assert own > 0.02
    assert own > 5 * scaled
