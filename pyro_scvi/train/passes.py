"""Passes over cells that change no parameter: their ELBO, and batch norm's statistics."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from torch import nn

from ..data.counts import CountData
from ..model.nn import eval_mode


def evaluate_elbo(
    model: Callable,
    guide: Callable,
    data: CountData,
    indices: np.ndarray,
    *,
    elbo: ELBO | None = None,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """ELBO per cell (nats, higher is better) of ``indices``, networks in eval mode.

    Each minibatch's ``cell_index`` (rows in ``data``) is passed on, for guides with
    per-cell parameters.
    """
    elbo = elbo if elbo is not None else Trace_ELBO()
    total = 0.0
    with torch.no_grad(), eval_mode(model, guide):
        for idx in data.minibatches(indices, batch_size):
            x, b = data.tensors(idx, device)
            total += elbo.loss(model, guide, x, b, torch.as_tensor(idx, device=device))
    return -total / max(len(indices), 1)


def norm_batches(
    data: CountData,
    indices: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The minibatches ``(x, batch_index, cell_index)`` of :func:`refresh_batch_norm`.

    Gathered once, they serve every pass over the same cells (``batches=``): the
    validation hook's fixed sample of cells is re-read and densified every epoch otherwise.

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=50, seed=0))
    >>> [tuple(x.shape) for x, _, _ in norm_batches(data, np.arange(30), batch_size=16)]
    [(16, 100), (14, 100)]
    """
    # Shuffled: files are often sorted by cell type, and minibatches of one type would
    # average within-type variances, several times too small.
    rng = np.random.default_rng(0)
    out = []
    for idx in data.minibatches(indices, batch_size, shuffle=True, rng=rng, drop_singleton=True):
        x, b = data.tensors(idx, device)
        # cell_index: a guide with per-cell parameters needs the cells' rows
        out.append((x, b, torch.as_tensor(idx, device=device)))
    return out


def refresh_batch_norm(
    model: nn.Module,
    guide: nn.Module,
    data: CountData,
    indices: np.ndarray,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Re-estimate batch-norm running statistics at the current weights.

    During training each running statistic is an exponential average (momentum 0.01) over
    the last ~100 steps of a moving weight trajectory, so in eval mode the networks see
    stale statistics: after a few hundred steps q(l) sits 10-20% too high and every query
    is biased. One forward pass over ``indices`` with a cumulative average (momentum None),
    as ``torch.optim.swa_utils.update_bn`` does, replaces them with statistics of the
    trained networks. No parameter changes, and no random numbers drawn from the caller's
    stream (the pass samples the guide and applies dropout under a forked torch RNG), so
    training draws the same numbers with or without it. ``batches``: the minibatches of
    ``indices``, gathered already (:func:`norm_batches`). A model with a
    ``batch_norm_pass(guide_trace, *args)`` method (:class:`~pyro_scvi.model.ScviModel`)
    runs that instead of the whole model: its batch norm's inputs only.
    """
    norms = [
        m
        for net in (model, guide)
        for m in net.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    ]
    if not norms or len(indices) < 2:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training, guide.training
    model.train(), guide.train()
    try:
        device = torch.device(device)
        forked = [device] if device.type == "cuda" else []
        with (
            torch.no_grad(),
            pyro.get_param_store().scope(),
            torch.random.fork_rng(devices=forked, device_type=device.type),
        ):
            if batches is None:
                batches = norm_batches(data, indices, batch_size=batch_size, device=device)
            own_pass = getattr(model, "batch_norm_pass", None)
            for args in batches:
                guide_trace = poutine.trace(guide).get_trace(*args)
                if own_pass is not None:
                    own_pass(guide_trace, *args)
                else:
                    poutine.replay(model, trace=guide_trace)(*args)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training[0]), guide.train(was_training[1])


def poisson_null_loglik(
    data: CountData,
    indices: np.ndarray,
    *,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
) -> float:
    """Log-likelihood per cell (nats) of ``indices`` under a model that learns no structure.

    Each count is Poisson with rate the cell's total times the gene's share of all the
    counts of ``indices`` (its maximum-likelihood value): the data's own scale of
    likelihood, against which an ELBO per cell can be judged whatever the depth and the
    number of genes. A fit that learned anything scores near or above it (the ELBO of an
    untrained scVI model is about 1.3-1.6 times it on the shipped and shared datasets).

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=50, seed=0))
    >>> poisson_null_loglik(data, np.arange(50)) < 0
    True
    """
    gene_totals = torch.zeros(data.n_genes, dtype=torch.float64)
    rest = 0.0  # sum over cells of n log n - n - sum_g log x_g!
    for idx in data.minibatches(np.asarray(indices), batch_size):
        x, _ = data.tensors(idx, device)
        x = x.to("cpu", torch.float64)
        n = x.sum(1)
        gene_totals += x.sum(0)
        rest += float((torch.xlogy(n, n) - n).sum() - torch.lgamma(x + 1).sum())
    share = gene_totals / gene_totals.sum().clamp(min=1.0)
    return (float(torch.xlogy(gene_totals, share).sum()) + rest) / max(len(indices), 1)
