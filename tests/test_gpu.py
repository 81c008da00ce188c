"""The GPU path: kernels, gathering, training and queries on CUDA (skipped without a GPU).

CI has no GPU; these run in ``benchmarks/gpu_check.sh`` on a machine that has one.
Tolerances come from float32 arithmetic, as in ``test_kernels``: a GPU rounds differently
from a CPU (fused multiply-adds, other reduction orders), never by more than that.
"""

import numpy as np
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb
from test_kernels import C_ROUND, EPS32, _zinb_inputs, _zinb_terms

from pyro_scvi import SCVI
from pyro_scvi.model.distributions import zinb_log_prob
from pyro_scvi.train import kernels

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fused", [False, True])
def test_the_zinb_density_on_the_gpu_is_float32_accurate(fused):
    x, mu, theta, gate = _zinb_inputs((11,))
    exact = zinb_log_prob(x, mu, theta, gate)
    args = [t.float().cuda() for t in (x, mu, theta, gate)]
    if fused:
        assert kernels.precompile("cuda"), "Triton could not compile the fused kernel"
        got = kernels.zinb_log_prob_fused(*args)
    else:
        got = zinb_log_prob(*args)
    assert got.device.type == "cuda"
    err = (got.double().cpu() - exact).abs()
    bound = C_ROUND * EPS32 * _zinb_terms(x, mu, theta, gate)
    assert (err <= bound).all(), (err / (EPS32 * _zinb_terms(x, mu, theta, gate))).max()


def test_the_fused_kernel_gradients_on_the_gpu_match_autograd():
    x, mu, theta, gate = _zinb_inputs((11,))
    grads = []
    for fn in (zinb_log_prob, kernels.zinb_log_prob_fused):
        params = [t.float().cuda().requires_grad_() for t in (mu, theta, gate)]
        fn(x.float().cuda(), *params).sum().backward()
        grads.append([p.grad.double().cpu() for p in params])
    for ours, autograd in zip(*grads, strict=True):
        # each gradient entry sums a few float32 terms of the density's size
        scale = autograd.abs() + _zinb_terms(x, mu, theta, gate).sum(0).max()
        assert ((ours - autograd).abs() <= C_ROUND * EPS32 * scale).all()


def test_counts_gathered_on_the_gpu_equal_the_host_gather():
    adata = synthetic_zinb(n_cells=500, n_genes=300, n_batches=2, seed=0)
    model = SCVI(adata, batch_key="batch")
    resident = model.data.to_device("cuda")
    idx = np.random.default_rng(0).permutation(500)[:200]
    x, b = resident.tensors(idx)
    x_host, b_host = model.data.tensors(idx)
    assert x.device.type == "cuda"
    assert torch.equal(x.cpu(), x_host) and torch.equal(b.cpu(), b_host)


@pytest.fixture(scope="module")
def gpu_fit():
    adata = synthetic_zinb(n_cells=3000, n_genes=600, n_clusters=4, n_batches=2, seed=0)
    model = SCVI(adata, batch_key="batch")
    model.train(max_epochs=25, device="cuda", seed=0, progress_bar=False)
    return adata, model


def test_default_training_on_the_gpu_gathers_there_and_fits_like_the_cpu(gpu_fit):
    adata, gpu = gpu_fit
    assert gpu.engine["data_placement"] == "device", gpu.engine["reasons"]
    assert gpu.engine["compiled"], gpu.engine["reasons"]  # 25 epochs x 22 steps >= 300
    assert np.isfinite(gpu.history["validation_elbo"]).all()
    # The GPU rounds differently, so its trajectory is another draw of the same
    # optimization: compare it with the spread between two CPU seeds.
    final = []
    for seed in (0, 1):
        cpu = SCVI(adata, batch_key="batch")
        cpu.train(max_epochs=25, device="cpu", seed=seed, progress_bar=False)
        final.append(cpu.history["validation_elbo"].iloc[-1])
    spread = abs(final[0] - final[1])
    gap = abs(gpu.history["validation_elbo"].iloc[-1] - final[0])
    assert gap <= 3 * spread + 1e-3 * abs(final[0]), (gap, spread)


def test_queries_on_the_gpu_match_the_same_weights_on_the_cpu(gpu_fit, tmp_path):
    adata, gpu = gpu_fit
    gpu.save(tmp_path / "m")
    cpu = SCVI.load(tmp_path / "m", adata, device="cpu")
    z_gpu = gpu.get_latent_representation()
    z_cpu = cpu.get_latent_representation()
    # the encoder's widest float32 dot product has 600 terms: n * eps32 relative at worst
    np.testing.assert_allclose(z_gpu, z_cpu, rtol=600 * EPS32, atol=600 * EPS32)


@pytest.mark.parametrize("engine", ["fused", "eager", "pyro"])
def test_every_engine_trains_on_the_gpu(engine):
    adata = synthetic_zinb(n_cells=600, n_genes=600, n_batches=2, seed=1)
    model = SCVI(adata, batch_key="batch")
    model.train(max_epochs=3, device="cuda", seed=0, progress_bar=False, engine=engine)
    assert np.isfinite(model.history["validation_elbo"]).all()
    if engine == "fused":
        assert model.engine["fused_kernel"] and model.engine["compile_kernel"]
