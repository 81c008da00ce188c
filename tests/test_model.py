"""The Pyro model and guide: sites, shapes, plates, subsampling and priors."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO

from pyro_scvi.model import ScviModel
from pyro_scvi.model.guides import ScviGuide
from pyro_scvi.model.likelihoods import NB, ZINB, Poisson
from pyro_scvi.model.priors import LogNormalLibrary, ObservedLibrary, Prior, StandardNormal
from pyro_scvi.train.loop import KLWeight

N_CELLS, N_GENES, N_BATCH, N_LATENT = 12, 9, 2, 3


def make_pair(likelihood=None, dispersion="gene", observed=False, prior=None):
    lib = (
        ObservedLibrary()
        if observed
        else LogNormalLibrary(torch.tensor([3.0, 3.5]), torch.tensor([0.4, 0.6]))
    )
    model = ScviModel(
        N_GENES,
        N_BATCH,
        lib,
        n_latent=N_LATENT,
        n_hidden=16,
        likelihood=likelihood,
        dispersion=dispersion,
        prior=prior,
    )
    guide = ScviGuide(N_GENES, N_BATCH, n_latent=N_LATENT, n_hidden=16, library=lib)
    return model, guide


@pytest.fixture
def data():
    torch.manual_seed(1)
    x = torch.poisson(torch.rand(N_CELLS, N_GENES) * 20)
    x[:, 0] += 1  # no empty cells
    b = torch.arange(N_CELLS) % N_BATCH
    return x, b


@pytest.mark.parametrize("likelihood", [ZINB(), NB(), Poisson()], ids=repr)
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch", "gene-cell"])
def test_sites_and_shapes(data, likelihood, dispersion):
    x, b = data
    model, guide = make_pair(likelihood, dispersion)
    guide_tr = poutine.trace(guide).get_trace(x, b)
    model_tr = poutine.trace(poutine.replay(model, guide_tr)).get_trace(x, b)
    nodes = model_tr.nodes
    assert nodes["z"]["value"].shape == (N_CELLS, 1, N_LATENT)
    assert nodes["l"]["value"].shape == (N_CELLS, 1)
    assert nodes["x"]["is_observed"] and nodes["x"]["fn"].batch_shape == (N_CELLS, N_GENES)
    rho = nodes["rho"]["value"]
    torch.testing.assert_close(rho.sum(-1), torch.ones(N_CELLS))
    frames = {f.name: f.dim for f in nodes["x"]["cond_indep_stack"]}
    assert frames == {"cells": -2, "genes": -1}
    assert {f.name for f in nodes["z"]["cond_indep_stack"]} == {"cells"}
    # every latent site of the model is in the guide, and vice versa
    assert set(guide_tr.stochastic_nodes) - {"cells"} == {"z", "l"}  # "cells": the plate


def test_observed_library_has_no_l_site(data):
    x, b = data
    model, guide = make_pair(observed=True)
    guide_tr = poutine.trace(guide).get_trace(x, b)
    model_tr = poutine.trace(poutine.replay(model, guide_tr)).get_trace(x, b)
    assert "l" not in guide_tr.nodes and "l" not in model_tr.nodes
    # the NB component's mean is exp(l) * rho with l the observed log library size
    rho = model_tr.nodes["rho"]["value"]
    zinb = model_tr.nodes["x"]["fn"]
    nb_mean = zinb.mean / (1 - torch.sigmoid(zinb.gate_logits))
    torch.testing.assert_close(nb_mean, x.sum(-1, keepdim=True) * rho, rtol=1e-4, atol=1e-4)


def _fixed_traces(model, guide, x, b, latents, **args):
    g = poutine.trace(poutine.condition(guide, data=latents)).get_trace(x, b, **args)
    m = poutine.trace(poutine.condition(model, data=latents)).get_trace(x, b, **args)
    return g, m


def _elbo_with_fixed_latents(model, guide, x, b, z, l, **plate_args):
    g, m = _fixed_traces(model, guide, x, b, {"z": z, "l": l}, **plate_args)
    return m.log_prob_sum() - g.log_prob_sum()


def test_subsampled_plate_is_unbiased_for_full_elbo(data):
    """Averaging minibatch ELBOs over a partition into equal minibatches is the full ELBO.

    A uniformly random minibatch from the partition is an unbiased estimator exactly when
    every cell-level term (z, l and x) is scaled by num_cells / batch_size.
    """
    x, b = data
    # float64, so that "is the full ELBO" holds to float64 rounding whatever order a CPU
    # sums in: two sums of the same n terms differ by at most n * eps64 times the sum of
    # the terms' magnitudes, here n log-probabilities (of x, z and l in model and guide).
    x = x.double()
    model, guide = (m.double() for m in make_pair())
    model.eval(), guide.eval()  # batch norm with running stats: cells do not interact
    with torch.no_grad():
        tr = poutine.trace(guide).get_trace(x, b)
        z, l = tr.nodes["z"]["value"], tr.nodes["l"]["value"]
        full = _elbo_with_fixed_latents(model, guide, x, b, z, l)
        traces = _fixed_traces(model, guide, x, b, {"z": z, "l": l})
        for t in traces:
            t.compute_log_prob()
        terms = [t.nodes[n]["log_prob"] for t in traces for n in ("z", "l", "x") if n in t.nodes]
        perm = torch.randperm(N_CELLS)
        minibatch = []
        for idx in perm.split(4):
            minibatch.append(
                _elbo_with_fixed_latents(
                    model, guide, x[idx], b[idx], z[idx], l[idx], cell_index=idx, num_cells=N_CELLS
                )
            )
    n, size = sum(t.numel() for t in terms), sum(t.abs().sum().item() for t in terms)
    tol = n * torch.finfo(torch.float64).eps * size
    assert torch.stack(minibatch).mean().item() == pytest.approx(full.item(), rel=0, abs=tol)
    # and a single minibatch alone is not the full ELBO (the check has power)
    assert minibatch[0].item() != pytest.approx(full.item(), rel=1e-3)


def test_kl_weight_handler_scales_only_z_terms(data):
    x, b = data
    model, guide = make_pair()
    model.eval(), guide.eval()
    with torch.no_grad():
        tr = poutine.trace(guide).get_trace(x, b)
        latents = {n: tr.nodes[n]["value"] for n in ("z", "l")}
        traces = {}
        for w in (1.0, 0.5, 0.0):
            g, m = _fixed_traces(KLWeight(w)(model), KLWeight(w)(guide), x, b, latents)
            for t in (g, m):
                t.compute_log_prob()
            traces[w] = (g, m)
    z_term = lambda g, m: (m.nodes["z"]["log_prob"] - g.nodes["z"]["log_prob"]).sum()  # noqa: E731
    full_term = lambda g, m: m.log_prob_sum() - g.log_prob_sum()  # noqa: E731
    kl1, kl_half = z_term(*traces[1.0]), z_term(*traces[0.5])
    torch.testing.assert_close(kl_half, 0.5 * kl1)
    torch.testing.assert_close(full_term(*traces[0.0]), full_term(*traces[1.0]) - kl1)


def test_trace_elbo_runs_under_validation(data):
    x, b = data
    model, guide = make_pair()
    loss = Trace_ELBO().loss(model, guide, x, b, torch.arange(N_CELLS), 100)
    assert np.isfinite(loss)


def test_vectorized_predictive_shapes(data):
    x, b = data
    model, guide = make_pair()
    model.eval(), guide.eval()
    pred = Predictive(
        model, guide=guide, num_samples=5, return_sites=["z", "l", "rho", "x"], parallel=True
    )
    with torch.no_grad():
        s = pred(x, b)
    assert s["z"].shape == (5, N_CELLS, 1, N_LATENT)
    assert s["l"].shape == (5, N_CELLS, 1)
    assert s["rho"].shape == (5, N_CELLS, N_GENES)
    assert s["x"].shape == (5, N_CELLS, N_GENES)


def test_model_samples_counts_without_data(data):
    _, b = data
    model, _ = make_pair()
    model.eval()
    tr = poutine.trace(model).get_trace(None, b)
    x = tr.nodes["x"]["value"]
    assert x.shape == (N_CELLS, N_GENES) and not tr.nodes["x"]["is_observed"]
    assert (x >= 0).all() and (x == x.round()).all()


class WrongShapePrior(Prior):
    def forward(self):
        return dist.Normal(torch.zeros(self.n_latent), 1.0)  # forgot .to_event(1)


def test_prior_with_wrong_event_shape_is_a_clear_error():
    with pytest.raises(ValueError, match=r"event_shape \(3,\).*to_event\(1\)"):
        make_pair(prior=WrongShapePrior())


def test_prior_object_is_used(data):
    class Shifted(StandardNormal):
        def forward(self):
            return dist.Normal(torch.full((self.n_latent,), 5.0), 0.01).to_event(1)

    x, b = data
    model, _ = make_pair(prior=Shifted())
    z = poutine.trace(model).get_trace(x, b).nodes["z"]["value"]
    assert (z - 5.0).abs().max() < 0.1


def test_bad_dispersion_is_a_clear_error():
    with pytest.raises(ValueError, match="gene-batch"):
        make_pair(dispersion="cell")


def test_params_registered_under_model_and_guide(data):
    x, b = data
    model, guide = make_pair()
    Trace_ELBO().loss(model, guide, x, b)
    names = set(pyro.get_param_store().keys())
    assert "model$$$log_theta" in names
    assert any(n.startswith("guide$$$z_encoder") for n in names)


@pytest.mark.parametrize("likelihood", [ZINB(), NB(), Poisson()], ids=repr)
def test_a_draw_of_l_past_float32s_exp_gives_a_finite_loss(data, likelihood, monkeypatch):
    # A guide far off (in training, one outlier cell's q(l) in a batch-norm minibatch) can
    # draw l above 88.7, where exp(l) overflows float32: mu = inf made the loss NaN and
    # training stopped. exp is taken at min(l, L_MAX), so the loss is finite and poor.
    from pyro_scvi.model import generative as model_module

    x, b = data
    model, guide = make_pair(likelihood)
    with torch.no_grad():
        guide.l_encoder.loc.weight.zero_()
        guide.l_encoder.loc.bias.fill_(100.0)  # every draw of l near 100
    pyro.set_rng_seed(0)
    loss = Trace_ELBO().differentiable_loss(model, guide, x, b)
    assert torch.isfinite(loss) and loss > 1e3
    loss.backward()
    params = [*model.parameters(), *guide.parameters()]
    assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    # without the bound, the same draws give NaN (this test would catch its removal)
    monkeypatch.setattr(model_module, "L_MAX", float("inf"))
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pyro's "Encountered NaN"
        assert not torch.isfinite(Trace_ELBO().differentiable_loss(model, guide, x, b))
