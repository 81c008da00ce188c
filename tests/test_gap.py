"""The amortization gap: refining per-cell q with the model fixed."""

import numpy as np
import pandas as pd
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI, InputError
from pyro_scvi.model.guides import PerCellGuide
from pyro_scvi.posterior.gap import amortization_gap, frozen, refine


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    adata = synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=1)
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(max_epochs=15, train_size=0.8, kl_warmup_epochs=5, progress_bar=False)
    return model


def test_refined_elbo_beats_the_amortized_one(trained):
    gap = trained.get_amortization_gap(n_steps=150, n_samples=50, seed=0)
    val = trained.adata.obs_names[trained.validation_indices]
    assert list(gap.index) == list(val)
    assert np.isfinite(gap.to_numpy()).all()
    # on average refinement gains (the amortization gap is positive) ...
    assert gap["gap"].mean() > 5  # nats per cell; about 16 after only 15 epochs
    np.testing.assert_allclose(gap["gap"], gap["elbo_refined"] - gap["elbo_amortized"])
    # ... and it is a per-cell gain, not an average of wins and losses; the 50-draw
    # estimates' own noise is about 0.3 nats, so allow a few cells a small loss
    assert (gap["gap"] > -1.0).all() and (gap["gap"] > 0).mean() > 0.8
    # both importance-sampled marginal likelihoods estimate the same log p(x), within a
    # few nats, and each bound sits above its ELBO
    assert abs(gap["marginal_ll_refined"] - gap["marginal_ll_amortized"]).mean() < 3
    assert (gap["marginal_ll_refined"] >= gap["elbo_refined"]).all()
    # refinement closes the gap from below: the refined ELBO stays under log p(x)
    best_ll = gap[["marginal_ll_amortized", "marginal_ll_refined"]].max(1)
    assert (gap["elbo_refined"] <= best_ll + 0.5).mean() > 0.95


def test_zero_steps_is_no_gap(trained):
    gap = trained.get_amortization_gap(n_steps=0, n_samples=10, seed=3)
    np.testing.assert_allclose(gap["gap"], 0.0, atol=1e-3)


def test_refine_leaves_the_model_and_the_encoder_alone(trained):
    trained.model.train()
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    enc_before = {k: v.clone() for k, v in trained.guide.state_dict().items()}
    cells = trained.validation_indices[:10]
    g = PerCellGuide.from_guide(trained.guide, trained.data, cells)
    start = g.z_loc.detach().clone()
    # chunks of 4 cells, each with its own optimizer: every chunk's rows move
    refine(trained.model, g, trained.data, cells, n_steps=20, batch_size=4)
    assert ((g.z_loc.detach() - start).abs().sum(-1) > 0).all()
    for k, v in trained.model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    for k, v in trained.guide.state_dict().items():
        torch.testing.assert_close(v, enc_before[k], rtol=0, atol=0)
    assert trained.model.training  # restored after the frozen (eval-mode) refinement
    assert all(p.requires_grad for p in trained.model.parameters())


def test_frozen_restores_state():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5))
    net[0].bias.requires_grad_(False)
    net.eval()
    with frozen(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert net[0].weight.requires_grad and not net[0].bias.requires_grad
    assert not net.training
    with pytest.raises(RuntimeError), frozen(net):
        raise RuntimeError
    assert net[0].weight.requires_grad


def test_gap_on_another_adata_and_errors(trained):
    held_out = synthetic_zinb(n_cells=20, n_genes=40, n_clusters=3, n_batches=2, seed=9)
    gap = trained.get_amortization_gap(held_out, n_steps=30, n_samples=10)
    assert isinstance(gap, pd.DataFrame) and list(gap.index) == list(held_out.obs_names)
    no_val = SCVI(synthetic_zinb(n_cells=40, n_genes=10, seed=0), n_latent=2, n_hidden=8)
    no_val.train(max_epochs=1, train_size=1.0, progress_bar=False)
    with pytest.raises(InputError, match="No held-out cells"):
        no_val.get_amortization_gap()


def test_amortization_gap_function_matches_the_method(trained):
    cells = trained.validation_indices[:8]
    gap = amortization_gap(
        trained.model, trained.guide, trained.data, cells, n_steps=0, n_samples=10, seed=1
    )
    # the same cells in one pass under the same seed: the same draws
    stats = trained.get_fit_statistics(trained.adata[cells].copy(), n_samples=10, seed=1)
    np.testing.assert_allclose(gap["elbo_amortized"], stats["elbo"], rtol=1e-5)
