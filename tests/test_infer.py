"""SVI training: the ELBO rises, clusters are recovered, failures keep the last good model."""

import numpy as np
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from pyro_scvi import SCVI, ZINB, TrainingError
from pyro_scvi.train.kl import Annealed, kl_weight
from pyro_scvi.train.passes import evaluate_elbo


@pytest.mark.parametrize(
    "epoch, warmup, expected",
    [(0, 10, 0.0), (5, 10, 0.5), (10, 10, 1.0), (50, 10, 1.0), (0, 0, 1.0)],
)
def test_kl_weight_schedule(epoch, warmup, expected):
    assert kl_weight(epoch, warmup) == pytest.approx(expected)


def _ari(z, labels):
    pred = KMeans(len(set(labels)), n_init=10, random_state=0).fit_predict(z)
    return adjusted_rand_score(labels, pred)


@pytest.mark.parametrize("seed", [0, 1])
def test_training_raises_elbo_and_recovers_clusters(seed):
    """Threshold: on this simulation KMeans on a PCA of log1p counts reaches ARI 0.94-0.97
    and an untrained encoder 0.13-0.42 (seeds 0-2); a fitted scVI latent should be close to
    the former, so we ask for ARI >= 0.85 and a gain of at least 0.3 over the untrained one."""
    adata = synthetic_zinb(n_cells=600, n_genes=60, n_clusters=3, seed=seed)
    labels = adata.obs["cell_type"].to_numpy()
    model = SCVI(adata, n_latent=5)
    everyone = np.arange(adata.n_obs)
    elbo_before = evaluate_elbo(model.model, model.guide, model.data, everyone)
    ari_before = _ari(model.get_latent_representation(), labels)
    model.train(max_epochs=30, kl_warmup_epochs=10, progress_bar=False, seed=seed)
    h = model.history
    assert len(h) == 30 and list(h["epoch"]) == list(range(30))
    # the untrained model scores about -320 nats per cell here, the trained one about -190
    assert evaluate_elbo(model.model, model.guide, model.data, everyone) > elbo_before + 80
    assert h["validation_elbo"].iloc[-1] > h["validation_elbo"].iloc[0]
    # once warm-up is over the train ELBO (now the true ELBO) keeps rising on average
    assert h["train_elbo"].iloc[-5:].mean() > h["train_elbo"].iloc[10:15].mean()
    ari_after = _ari(model.get_latent_representation(), labels)
    assert ari_after >= 0.85
    assert ari_after >= ari_before + 0.3


class PoisonAfter(ZINB):
    """ZINB whose log-probabilities become NaN after ``n`` calls."""

    def __init__(self, n):
        self.n, self.calls = n, 0

    def __call__(self, mu, theta, gate_logits):
        self.calls += 1
        if self.calls > self.n:
            mu = mu * torch.tensor(float("nan"))
        return super().__call__(mu, theta, gate_logits)


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # the point of the test
def test_non_finite_loss_stops_and_keeps_last_good_parameters(small_adata):
    model = SCVI(small_adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, progress_bar=False)
    z_good = model.get_latent_representation()
    state = {k: v.clone() for k, v in model.model.state_dict().items()}
    model.model.likelihood = PoisonAfter(3)
    with pytest.raises(TrainingError, match="restored.*smaller learning rate"):
        model.train(max_epochs=3, progress_bar=False)
    for k, v in model.model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    np.testing.assert_array_equal(model.get_latent_representation(), z_good)
    assert len(model.history) == 2  # the failed epoch is not recorded


def test_training_is_reproducible_under_a_seed(small_adata):
    runs = []
    for _ in range(2):
        m = SCVI(small_adata, n_latent=3, n_hidden=16)
        m.train(max_epochs=3, progress_bar=False, seed=7)
        runs.append((m.history["train_elbo"].to_numpy(), m.get_latent_representation()))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    other = SCVI(small_adata, n_latent=3, n_hidden=16).train(
        max_epochs=3, progress_bar=False, seed=8
    )
    assert not np.array_equal(other.history["train_elbo"].to_numpy(), runs[0][0])


def test_early_stopping_stops_before_max_epochs(small_adata):
    # a learning rate this small cannot improve the validation ELBO by 1e3 nats per epoch
    model = SCVI(small_adata, n_latent=3, n_hidden=16)
    model.train(
        max_epochs=50,
        lr=1e-6,
        early_stopping=True,
        patience=3,
        kl_warmup_epochs=0,
        progress_bar=False,
    )
    assert len(model.history) < 50


def test_continuing_training_extends_history_and_warmup(small_adata):
    model = SCVI(small_adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, kl_warmup_epochs=4, progress_bar=False)
    model.train(max_epochs=2, kl_warmup_epochs=4, progress_bar=False)
    assert list(model.history["epoch"]) == [0, 1, 2, 3]
    assert list(model.history["kl_weight"]) == [0.0, 0.25, 0.5, 0.75]
    assert set(model.validation_indices).isdisjoint(model.train_indices)


@pytest.mark.parametrize("bad", [{"max_epochs": 0}, {"lr": -1.0}, {"train_size": 0.0}])
def test_bad_training_arguments(small_adata, bad):
    from pyro_scvi import InputError

    with pytest.raises(InputError):
        SCVI(small_adata, n_latent=3).train(**({"max_epochs": 1} | bad), progress_bar=False)


def test_batch_norm_statistics_are_re_estimated_at_the_final_weights(small_adata):
    """After training, the first batch norm's running mean is the average of its inputs
    over the training cells at the final weights, not a lagging exponential average."""
    model = SCVI(small_adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=3, progress_bar=False, batch_size=64)
    enc = model.guide.z_encoder
    linear, norm = enc.body[0], enc.body[1]
    x, b = model.data.tensors(model.train_indices)
    with torch.no_grad():
        pre = linear(torch.log1p(x))  # one batch: no one-hot input
    # momentum None averages minibatch means with equal weights; minibatches differ in
    # size by at most 64 cells, so allow a small tolerance
    torch.testing.assert_close(norm.running_mean, pre.mean(0), rtol=0.05, atol=0.05)
    assert norm.momentum == 0.01  # restored for further training


def test_batch_norm_refresh_is_not_fooled_by_cells_sorted_by_type():
    """Files sorted by cell type must not give minibatches of one type: the running
    variance would then average within-type variances and come out several times small."""
    adata = synthetic_zinb(n_cells=400, n_genes=40, n_clusters=3, lfc_scale=3.0, seed=2)
    adata = adata[np.argsort(adata.obs["cell_type"].to_numpy(), kind="stable")].copy()
    model = SCVI(adata, n_latent=3, n_hidden=16)
    model.train(max_epochs=2, progress_bar=False, batch_size=64)
    linear, norm = model.guide.z_encoder.body[0], model.guide.z_encoder.body[1]
    x, _ = model.data.tensors(model.train_indices)
    with torch.no_grad():
        population_var = linear(torch.log1p(x)).var(0)
    ratio = (norm.running_var / population_var).median().item()
    assert 0.8 < ratio < 1.2


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_failed_run_keeps_the_history_of_its_completed_epochs(small_adata):
    model = SCVI(small_adata, n_latent=3, n_hidden=16)
    # epoch 0 calls the likelihood 3 times (training) + once (validation): fail in epoch 1
    model.model.likelihood = PoisonAfter(5)
    with pytest.raises(TrainingError) as info:
        model.train(max_epochs=5, progress_bar=False)
    assert list(info.value.history["epoch"]) == [0]
    assert list(model.history["epoch"]) == [0] and model.is_trained
    assert np.isfinite(model.get_latent_representation()).all()


@pytest.mark.parametrize("elbo_name", ["Trace_ELBO", "TraceMeanField_ELBO"])
def test_fused_adam_steps_match_pyro_svi_gradients_and_plain_adam(elbo_name):
    # FusedAdam holding the model's and guide's parameters (as a run's step does with these
    # ELBOs) skips re-registering them after its first step and differentiates the ELBO
    # itself: every parameter (the prior's too) must follow the update that Pyro's
    # loss_and_grads with a plain torch Adam gives.
    import copy

    import pyro
    from pyro import infer as pinfer

    from pyro_scvi import LogNormalLibrary, MixtureOfGaussians, ScviGuide, ScviModel
    from pyro_scvi.train.optim import FusedAdam

    torch.manual_seed(0)
    lib = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    # Both sides run in float64, so that the comparison is about the algorithm, not about
    # float32 rounding. It matters here: each Linear before a BatchNorm has a bias whose
    # gradient is exactly zero (the batch norm subtracts it again), so in floating point
    # that gradient is pure rounding noise, and Adam (eps=0.01) moves the bias by about
    # lr / eps times it. In float32 that is ~1e-4 and differs from CPU to CPU.
    model_a = ScviModel(20, 1, lib, prior=MixtureOfGaussians(3), n_hidden=16).double()
    guide_a = ScviGuide(20, 1, n_hidden=16).double()
    model_b, guide_b = copy.deepcopy(model_a), copy.deepcopy(guide_a)
    prior_loc_init = model_a.prior.loc.detach().clone()
    z_loc_weight_init = guide_a.z_encoder.loc.weight.detach().clone()
    x = torch.poisson(torch.full((16, 20), 2.0)).double()
    b = torch.zeros(16, dtype=torch.long)
    args = (x, b, torch.arange(16), 64, 0.5)
    settings = {"lr": 1e-2, "eps": 0.01, "weight_decay": 1e-6}
    n_steps = 4
    elbo = getattr(pinfer, elbo_name)()

    fused = FusedAdam(**settings, hold=(model_a, guide_a), differentiable=[elbo])
    losses_a, held = [], []
    model_a.register_forward_pre_hook(lambda module, inputs: held.append(module.parameters_held))
    with pyro.get_param_store().scope():
        for step in range(n_steps):
            pyro.set_rng_seed(step)
            losses_a.append(fused(elbo, Annealed(model_a), Annealed(guide_a), *args))
    # the first step registers the parameters; from then on the model is told it is held
    assert held == [False] + [True] * (n_steps - 1) and model_a.parameters_held is False
    params_b = [p for m in (model_b, guide_b) for p in m.parameters()]
    adam, losses_b, max_grad = torch.optim.Adam(params_b, foreach=True, **settings), [], 0.0
    with pyro.get_param_store().scope():
        for step in range(n_steps):
            pyro.set_rng_seed(step)
            losses_b.append(elbo.loss_and_grads(Annealed(model_b), Annealed(guide_b), *args))
            max_grad = max([max_grad] + [p.grad.abs().max().item() for p in params_b])
            adam.step()
            adam.zero_grad()
    # Tolerances from float64 arithmetic. A sum of n terms computed in another order differs
    # by at most n * eps64 * (sum of |terms|); every loss and gradient entry here sums at
    # most n = x.numel() per-count terms (plus a few KL terms) through the networks, and
    # we take |loss| and the largest gradient entry seen as the size of their summed terms.
    eps64, n = torch.finfo(torch.float64).eps, x.numel()
    np.testing.assert_allclose(losses_a, losses_b, rtol=n * eps64, atol=0)
    # Adam's update lr * m / (sqrt(v) + eps) changes by at most lr / eps times a change in
    # the gradient, and the rounding of the update itself is far below that (lr / eps = 1):
    # per step at most (lr / eps) * n * eps64 * max_grad, over n_steps steps.
    atol = n_steps * settings["lr"] / settings["eps"] * n * eps64 * max_grad  # ~8e-10
    # Observed: 2e-14 / 5e-13. A wrong update is far beyond the bound: an lr 0.1% off moves
    # parameters by 7e-5, a dropped weight decay (1e-6 * p in the gradient) by 4e-6.
    named_b = dict(model_b.named_parameters())
    for name, p in model_a.named_parameters():
        assert p.dtype == torch.float64
        torch.testing.assert_close(p, named_b[name], rtol=0, atol=atol)
    for pa, pb in zip(guide_a.parameters(), guide_b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol)
    # ...and the updates did happen, the prior's parameters included.
    assert not torch.equal(model_a.prior.loc, prior_loc_init)
    assert not torch.equal(guide_a.z_encoder.loc.weight, z_loc_weight_init)


def test_long_default_runs_are_compiled_and_train_like_trace_elbo(small_adata):
    # The default ELBO of a long run is JitTrace_ELBO: the same estimator, compiled. It must
    # train as the uncompiled Trace_ELBO does, batch-norm statistics included.
    import pyro

    fits = {}
    for name, elbo in (("default", None), ("eager", pyro.infer.Trace_ELBO())):
        m = SCVI(small_adata, batch_key="batch", n_hidden=16, n_latent=3)
        m.train(60, batch_size=32, elbo=elbo, progress_bar=False, seed=3)
        fits[name] = m
    assert fits["default"].engine["compiled"]  # 60 epochs x 9 steps
    assert fits["default"].engine["reasons"]["compiled"].startswith("on: static")
    assert not fits["eager"].engine["compiled"]
    # One graph: 270 training cells = 8 x 32 + 14, and the 14-cell minibatch runs uncompiled.
    assert fits["default"].engine["compiled_sizes"] == [32]
    assert fits["default"].history.attrs["engine"]["compiled_sizes"] == [32]
    assert fits["eager"].engine["compiled_sizes"] == []
    a, b = fits["default"].history, fits["eager"].history
    assert a["validation_elbo"].iloc[-1] > a["validation_elbo"].iloc[0] + 5
    # Per-epoch validation uses the running batch-norm statistics: were they not updated
    # inside the compiled graph, the compiled run's curve would sit far below.
    late_a, late_b = a["validation_elbo"].iloc[-20:].mean(), b["validation_elbo"].iloc[-20:].mean()
    assert abs(late_a - late_b) < 0.03 * abs(late_b)
    elbo_a = fits["default"].get_elbo(n_samples=5, seed=0)
    elbo_b = fits["eager"].get_elbo(n_samples=5, seed=0)
    assert abs(elbo_a - elbo_b) < 0.03 * abs(elbo_b)


def test_scaled_lr_follows_the_square_root_rule_and_rejects_bad_sizes():
    from pyro_scvi.errors import InputError
    from pyro_scvi.train.optim import scaled_lr

    assert scaled_lr(128) == pytest.approx(1e-3)
    assert scaled_lr(2048, base_lr=2e-3, base_batch_size=512) == pytest.approx(4e-3)
    assert scaled_lr(32) == pytest.approx(5e-4)
    with pytest.raises(InputError, match="batch sizes must be >= 1"):
        scaled_lr(0)


def test_deep_many_gene_batches_validate_finite_from_the_first_epoch():
    # Regression: three batches of very different depth (10^3 to 10^5 UMIs per cell) over
    # 11,000 genes. Adam's first steps move every weight by about lr, so the encoder's first
    # activations shift by about lr * sum_g log1p(x_g) per step, far faster than batch
    # norm's running averages (momentum 0.01) follow. Validated in eval mode on those stale
    # statistics, q(l) sat 80-120 nats above the data's log-library and exp(l) overflowed:
    # the epoch-0 validation ELBO was NaN, or 6x the training loss when it survived.
    from pyro_scvi.datasets import synthetic_zinb

    adata = synthetic_zinb(
        n_cells=542,
        n_genes=11_000,
        n_batches=3,
        library_log_mean=[7.6, 9.4, 11.2],
        library_log_sd=0.4,
        seed=0,
    )
    depth = np.asarray(adata.X.sum(axis=1)).ravel()
    assert depth.min() < 2e3 and np.median(depth) > 8e3 and depth.max() > 9e4
    m = SCVI(adata, batch_key="batch")
    m.train(2, progress_bar=False, seed=0, engine="eager")
    h = m.history
    assert np.isfinite(h["validation_elbo"]).all()
    # Validation cells are like training cells: their ELBO is of the training ELBO's size
    # (it was 6x worse on stale statistics).
    assert (h["validation_elbo"] > 1.5 * h["train_elbo"]).all(), h


@pytest.mark.parametrize("seed", [0, 4])
def test_one_outlier_cell_in_sparse_many_gene_data_trains(seed):
    # Regression (worm neurons, 13,488 genes at 98.6 % zeros, seed 2 of the default fit:
    # NaN at epoch 0, step 5): one cell with 30x the median library and 16x the non-zero
    # genes dominates its minibatch's batch-norm statistics, so its encoder activations
    # are extreme and its q(l) grew far wider than any other cell's within five steps; a
    # draw of l above 88.7 overflowed exp(l). Here: the same character, simulated.
    import scipy.sparse as sp
    from pyro_scvi.datasets import synthetic_zinb

    adata = synthetic_zinb(
        n_cells=300, n_genes=13_000, library_log_mean=5.5, library_log_sd=0.5, seed=0
    )
    X = sp.csr_matrix(adata.X)
    adata.X = sp.vstack([sp.csr_matrix(X[:30].sum(axis=0)), X[1:]]).tocsr()
    depth = np.asarray(adata.X.sum(axis=1)).ravel()
    assert depth[0] > 25 * np.median(depth) and 1 - adata.X.nnz / np.prod(adata.shape) > 0.98
    m = SCVI(adata, library_residual=False)
    x, b = m.data.tensors(np.arange(128))
    linear, batch_norm = m.guide.l_encoder.body[:2]
    with torch.no_grad():
        h = batch_norm.train()(linear(torch.log1p(x))).abs().amax(dim=-1)
    # normalized by its minibatch's statistics, the outlier's activations stand far out
    # (what this test exercises; one cell of 128 can reach sqrt(127) = 11.3)
    assert h[0] > 2 * h[1:].max()
    m.train(max_epochs=1, seed=seed, progress_bar=False)
    assert np.isfinite(m.history["validation_elbo"]).all()
