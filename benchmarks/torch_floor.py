"""A pure-PyTorch floor for scVI training: the same networks and loss, no Pyro, no framework.

It trains exactly pyro_scvi's encoder and decoder modules (plain ``torch.nn`` modules from
:mod:`pyro_scvi.model.nn`, initialized from the same seed) with a hand-written loop:

* minibatches of 128 shuffled training cells, gathered by ``index_select`` from a dense
  float32 tensor of all counts built once before the clock starts (the cheapest gather);
* the loss per cell: ``-log ZINB(x; exp(l) * rho, theta, gate)`` by
  :func:`pyro_scvi.model.distributions.zinb_log_prob`, the plain torch function behind pyro_scvi's
  ZINB distribution, plus the analytic KL of q(z) from N(0, I), scaled by the KL warm-up weight,
  plus the analytic KL of q(l) from the per-batch log-normal library prior; averaged over
  the minibatch;
* ``torch.optim.Adam(lr, eps=0.01, weight_decay=1e-6, fused=True)``, i.e. scvi-tools'
  settings on a per-cell mean loss, as one fused kernel (pyro_scvi uses the same);
* the validation ELBO after every epoch (eval mode, no gradients) and, after the last
  epoch, a re-estimate of the batch-norm statistics at the final weights -- the same
  per-epoch and end-of-run work pyro_scvi does.

No checks, no logging, no progress bar, no NaN guard: the time it takes is what the
arithmetic and autograd of one scVI step cost on this machine, so ``pyro_scvi time /
floor time`` is the overhead of Pyro and of pyro_scvi's loop.

``run_torch_floor`` has the interface of the runners in ``compare_scvi_tools.py``.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import anndata
import numpy as np
import torch
from torch.distributions import Normal, kl_divergence

from pyro_scvi.model.distributions import zinb_log_prob
from pyro_scvi.train import hooks, kernels
from pyro_scvi.train.engine import Engine


class FloorLoss:
    """Negative ELBO per cell of scVI for pyro_scvi's networks, in plain torch.

    ``fused``: the ZINB log-density is :func:`pyro_scvi.train.kernels.zinb_log_prob_fused`,
    called directly (compiled unless ``compiled=False``), else
    :func:`pyro_scvi.model.distributions.zinb_log_prob`.
    """

    def __init__(self, scvi: Any, fused: bool = False, *, compiled: bool = True) -> None:
        self.log_prob = (
            functools.partial(kernels.zinb_log_prob_fused, compiled=compiled)
            if fused
            else zinb_log_prob
        )
        self.z_encoder = scvi.guide.z_encoder
        self.l_encoder = scvi.guide.l_encoder
        self.decoder = scvi.model.decoder
        self.log_theta = scvi.model.log_theta
        self.lib_loc = scvi.model.library_prior.loc
        self.lib_scale = scvi.model.library_prior.scale
        self._standard = self._normal(torch.zeros(()), torch.ones(()))

    @staticmethod
    def _normal(loc: torch.Tensor, scale: torch.Tensor) -> Normal:
        return Normal(loc, scale, validate_args=False)  # no checks in the floor

    def __call__(self, x: torch.Tensor, b: torch.Tensor, kl_weight: float) -> torch.Tensor:
        """Per-cell loss ``(cells,)``; the reparametrized one-sample reconstruction term."""
        x_log1p = torch.log1p(x)
        z_loc, z_scale = self.z_encoder(x_log1p, b)
        l_loc, l_scale = self.l_encoder(x_log1p, b)
        z = z_loc + z_scale * torch.randn_like(z_scale)
        l = l_loc + l_scale * torch.randn_like(l_scale)
        decoded = self.decoder(z, b)
        mu = torch.exp(l) * torch.softmax(decoded["rho_logits"], -1)
        theta = self.log_theta.exp()
        reconstruction = -self.log_prob(x, mu, theta, decoded["gate_logits"]).sum(-1)
        kl_z = kl_divergence(self._normal(z_loc, z_scale), self._standard).sum(-1)
        lib_prior = self._normal(self.lib_loc[b].unsqueeze(-1), self.lib_scale[b].unsqueeze(-1))
        kl_l = kl_divergence(self._normal(l_loc, l_scale), lib_prior).sum(-1)
        return reconstruction + kl_weight * kl_z + kl_l


def minibatches(
    indices: np.ndarray, batch_size: int, rng: np.random.Generator
) -> list[torch.Tensor]:
    """Shuffled minibatches; a last one of a single cell joins the previous (batch norm)."""
    perm = torch.from_numpy(rng.permutation(indices))
    chunks = list(torch.split(perm, batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


def run_torch_floor(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    kl_warmup_epochs: int = 400,
    architecture: dict[str, Any] | None = None,
    fused: bool | None = None,
) -> dict[str, Any]:
    """Train the floor once; same outputs as ``run_pyro_scvi`` in ``compare_scvi_tools.py``.

    ``fused``: compute the ZINB log-density with pyro_scvi's fused kernel
    (:mod:`pyro_scvi.train.kernels`); ``None`` decides as pyro_scvi's training engine does for
    the same run (:meth:`pyro_scvi.train.engine.Engine.resolve`), so that both use the same
    kernel. The engine also compiles the kernel when it is used (uncompiled where no C++
    compiler works), inside the clock, as in pyro_scvi's ``train()``.

    A :class:`pyro_scvi.SCVI` is built only as the container of the networks (same
    initialization as pyro_scvi's run with this seed) and is returned, trained, as
    ``as_pyro_scvi`` so that the common estimators can score the floor's fit.
    """
    import pyro

    import pyro_scvi

    arch = {
        "n_latent": 10,
        "n_hidden": 128,
        "n_layers": 1,
        "dropout_rate": 0.1,
        "dispersion": "gene",
        **(architecture or {}),
    }
    torch.set_num_threads(threads)
    pyro.set_rng_seed(seed)
    scvi = pyro_scvi.SCVI(
        adata,
        batch_key=batch_key,
        likelihood=pyro_scvi.ZINB(),
        use_observed_lib_size=False,
        **{k: arch[k] for k in ("n_latent", "n_hidden", "n_layers", "dropout_rate")},
        dispersion=arch["dispersion"],
    )
    train_idx, val_idx = split
    norm_cells = np.random.default_rng(0).permutation(train_idx)[: hooks.VALIDATION_NORM_CELLS]
    modules = (scvi.model, scvi.guide)
    x_all = torch.as_tensor(
        np.asarray(scvi.data.X.toarray() if hasattr(scvi.data.X, "toarray") else scvi.data.X),
        dtype=torch.float32,
    )
    b_all = torch.as_tensor(scvi.data.batch_index, dtype=torch.long)
    val_t = torch.as_tensor(val_idx, dtype=torch.long)
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    rng = np.random.default_rng(seed)
    curve: list[float] = []
    w = 0.0

    start = time.perf_counter()
    # Inside the clock, as pyro_scvi's train() resolves its engine: the fused kernel's
    # choice (by pyro_scvi's rule unless given) and its compilation. FloorLoss calls the
    # kernel directly, with no Pyro handler.
    run = Engine(fused_kernel=fused).resolve(
        scvi.model,
        scvi.guide,
        n_steps=max_epochs * -(-len(train_idx) // batch_size),
        batch_size=min(batch_size, len(train_idx)),
        n_genes=adata.n_vars,
        device="cpu",
    )
    loss_fn = FloorLoss(scvi, fused=run.fused_kernel, compiled=run.compile_kernel)
    # Inside the clock, as in pyro_scvi's and scvi-tools' timings: a process's first torch
    # optimizer imports torch._dynamo.
    optim = torch.optim.Adam(params, lr=lr, eps=0.01, weight_decay=1e-6, fused=True)
    epoch_seconds: list[float] = []
    for epoch in range(max_epochs):
        epoch_start = time.perf_counter()
        w = min(1.0, epoch / kl_warmup_epochs) if kl_warmup_epochs > 0 else 1.0
        for m in modules:
            m.train()
        for idx in minibatches(train_idx, batch_size, rng):
            loss = loss_fn(x_all.index_select(0, idx), b_all.index_select(0, idx), w).mean()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
        if len(val_idx):
            # As pyro_scvi does before each validation pass (hooks.VALIDATION_NORM_CELLS).
            _refresh_batch_norm(loss_fn, modules, x_all, b_all, norm_cells, len(norm_cells))
            for m in modules:
                m.eval()
            with torch.no_grad():
                total = sum(
                    float(loss_fn(x_all.index_select(0, i), b_all.index_select(0, i), 1.0).sum())
                    for i in torch.split(val_t, 1024)
                )
            curve.append(-total / len(val_idx))
        epoch_seconds.append(time.perf_counter() - epoch_start)
    _refresh_batch_norm(loss_fn, modules, x_all, b_all, train_idx, batch_size)
    seconds = time.perf_counter() - start

    for m in modules:
        m.eval()
    scvi.is_trained = True
    return {
        "train_seconds": seconds,
        "epochs_run": max_epochs,
        "n_train": len(train_idx),
        "n_validation": len(val_idx),
        "split_matches": True,
        "validation_elbo_per_cell": curve[-1] if curve else float("nan"),
        "validation_elbo_curve": curve,
        "final_kl_weight": w,
        "threads_after": torch.get_num_threads(),
        "epoch_seconds": epoch_seconds,
        "fused_kernel_used": run.fused_kernel,
        "fused_kernel_compiled": run.compile_kernel,
        "fused_kernel_reason": run.reasons["fused_kernel"],
        "latent": scvi.get_latent_representation(),
        "as_pyro_scvi": scvi,
    }


def _refresh_batch_norm(loss_fn, modules, x_all, b_all, train_idx, batch_size) -> None:
    # One pass with cumulative averages, as pyro_scvi.train.passes.refresh_batch_norm does.
    norms = [m for net in modules for m in net.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    for net in modules:
        net.train()
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        for idx in minibatches(train_idx, batch_size, np.random.default_rng(0)):
            loss_fn(x_all.index_select(0, idx), b_all.index_select(0, idx), 1.0)
    for m in norms:
        m.momentum = 0.01
