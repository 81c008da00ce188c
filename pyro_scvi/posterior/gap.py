"""The amortization gap: what the encoder leaves on the table, cell by cell.

An amortized guide computes each cell's variational parameters with one network,
``lambda_n = f(x_n)``. With the model (decoder, dispersion, priors) fixed, the best
mean-field Normal for cell ``n`` is instead ``lambda_n* = argmax ELBO(x_n; lambda)``. The
amortization gap (Cremer, Li & Duvenaud, 2018, *Inference suboptimality in variational
autoencoders*) is ``ELBO(x_n; lambda_n*) - ELBO(x_n; f(x_n)) >= 0``, in nats per cell. What
remains between ``ELBO(x_n; lambda_n*)`` and ``log p(x_n)`` is the approximation gap of
the mean-field family itself.

:func:`refine` estimates ``lambda_n*`` by SVI on the cells' own parameters
(:class:`~pyro_scvi.model.guides.PerCellGuide`) starting exactly at the encoder's output, with
every parameter of the model frozen; :func:`amortization_gap` scores both guides with one
estimator, :func:`pyro_scvi.posterior.fit_statistics`, on the same draws' seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, SVI, TraceMeanField_ELBO
from torch import nn

from ..data.counts import CountData
from ..model.guides import PerCellGuide
from ..model.schemes import require_point_globals
from . import queries as posterior


@contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Hold ``modules`` fixed: eval mode and no gradients, restored on exit.

    Eval mode makes the decoder a deterministic function (batch-norm running statistics,
    no dropout), as in every posterior query; without gradients ``pyro.module`` registers
    none of their parameters, so no optimizer can move them.

    Examples
    --------
    >>> from torch import nn
    >>> net = nn.Linear(2, 2)
    >>> with frozen(net):
    ...     net.training, net.weight.requires_grad
    (False, False)
    >>> net.training, net.weight.requires_grad
    (True, True)
    """
    params = [p for m in modules for p in m.parameters()]
    requires = [p.requires_grad for p in params]
    training = [m.training for m in modules]
    try:
        for p in params:
            p.requires_grad_(False)
        for m in modules:
            m.eval()
        yield
    finally:
        for p, r in zip(params, requires, strict=True):
            p.requires_grad_(r)
        for m, t in zip(modules, training, strict=True):
            m.train(t)


def default_refine_elbo(n_particles: int = 8) -> ELBO:
    """``TraceMeanField_ELBO`` with ``n_particles`` vectorized particles.

    Analytic KL terms where Pyro has them (the Normal priors of ``z`` and ``l``) leave only
    the reconstruction term to Monte Carlo, so per-cell gradients are far less noisy; a
    prior without an analytic KL (e.g. a mixture) falls back to sampling.
    """
    return TraceMeanField_ELBO(
        num_particles=int(n_particles), vectorize_particles=True, max_plate_nesting=2
    )


def refine(
    model: nn.Module,
    guide: PerCellGuide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_steps: int = 300,
    lr: float = 1e-2,
    elbo: ELBO | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    frozen_modules: tuple[nn.Module, ...] = (),
) -> PerCellGuide:
    """Fit ``guide``'s per-cell parameters to the cells ``indices`` with the model fixed.

    Row ``i`` of ``guide`` belongs to cell ``indices[i]`` of ``data``, as
    :meth:`PerCellGuide.from_guide <pyro_scvi.model.guides.PerCellGuide.from_guide>` builds it.
    With the model fixed the ELBO is a sum of independent per-cell terms, so cells are
    refined ``batch_size`` at a time, each chunk by ``n_steps`` of :class:`pyro.infer.SVI`
    with a fresh :class:`pyro.optim.Adam`: the model runs under
    ``poutine.block(hide_types=["param"])`` (the optimizer sees only the guide's
    parameters) and :func:`frozen` (eval mode, no gradients).

    Parameters
    ----------
    model
        A trained model with :class:`~pyro_scvi.model.ScviModel`'s signature.
    guide
        The per-cell guide to refine, in place; it is also returned.
    data, indices
        The cells; ``len(indices) == guide.n_cells``.
    n_steps, lr
        SVI steps per chunk of cells, and Adam's learning rate.
    elbo
        Objective (default :func:`default_refine_elbo`).
    batch_size
        Cells per chunk.
    device
        Where ``model`` and ``guide`` are.
    frozen_modules
        Other modules to hold fixed too, e.g. the amortized guide when the prior uses its
        encoder (a VampPrior).

    Returns
    -------
    PerCellGuide
        ``guide``, refined.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> from pyro_scvi.model.guides import PerCellGuide
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> cells = np.arange(10)
    >>> g = PerCellGuide.from_guide(m.guide, m.data, cells)
    >>> before = m.model.decoder.rho_logits.weight.clone()
    >>> g = refine(m.model, g, m.data, cells, n_steps=5)
    >>> bool((m.model.decoder.rho_logits.weight == before).all())  # the decoder is fixed
    True
    """
    require_point_globals(model, "Refining q with the model fixed")
    indices = np.asarray(indices)
    if len(indices) != guide.n_cells:
        raise ValueError(f"{len(indices)} cells for a guide with {guide.n_cells} rows.")
    if int(n_steps) < 0 or not lr > 0:
        raise ValueError(f"n_steps={n_steps}, lr={lr}: need n_steps >= 0 and lr > 0.")
    guide.train()
    for start in range(0, len(indices), batch_size):
        rows = np.arange(start, min(start + batch_size, len(indices)))
        x, b = data.tensors(indices[rows], device)
        rows_t = torch.as_tensor(rows, device=device)
        refine_rows(model, guide, x, b, rows_t, n_steps=n_steps, lr=lr, elbo=elbo,
                    frozen_modules=frozen_modules)  # fmt: skip
    return guide


def refine_rows(
    model: nn.Module,
    guide: PerCellGuide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    rows: torch.Tensor,
    *,
    n_steps: int,
    lr: float,
    elbo: ELBO | None = None,
    frozen_modules: tuple[nn.Module, ...] = (),
) -> PerCellGuide:
    """Fit the rows ``rows`` of ``guide`` to the cells ``x`` with the model fixed: one chunk.

    ``n_steps`` of :class:`pyro.infer.SVI` with a fresh :class:`pyro.optim.Adam` (the other
    rows get zero gradients and, with no momentum yet, zero updates), the model under
    ``poutine.block(hide_types=["param"])`` and :func:`frozen` with ``frozen_modules``.
    Gradients are on inside, so it also serves within a ``torch.no_grad`` query.
    :func:`refine` runs it chunk by chunk; so does
    :class:`~pyro_scvi.posterior.proposals.RefinedProposal`, per minibatch.

    Examples
    --------
    >>> import torch, pyro_scvi
    >>> from pyro_scvi.model.guides import PerCellGuide
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=6, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> x, b = m.data.tensors(range(6))
    >>> g = PerCellGuide.from_guide(m.guide, m.data, range(6))
    >>> before = g.z_loc.detach().clone()
    >>> g = refine_rows(m.model, g, x, b, torch.arange(6), n_steps=3, lr=0.1)
    >>> bool((g.z_loc != before).any())
    True
    """
    elbo = elbo if elbo is not None else default_refine_elbo()
    with torch.enable_grad(), frozen(model, *frozen_modules), pyro.get_param_store().scope():
        svi = SVI(poutine.block(model, hide_types=["param"]), guide,
                  pyro.optim.Adam({"lr": lr}), loss=elbo)  # fmt: skip
        for _ in range(int(n_steps)):
            svi.step(x, batch_index, rows)
    return guide


def amortization_gap(
    model: nn.Module,
    guide: nn.Module,
    data: CountData,
    indices: np.ndarray,
    *,
    n_steps: int = 300,
    lr: float = 1e-2,
    elbo: ELBO | None = None,
    n_samples: int = 100,
    batch_size: int = 256,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Per-cell ELBO of the amortized guide and of its refinement; their difference.

    The refined guide starts at ``guide``'s output for each cell
    (:meth:`PerCellGuide.from_guide <pyro_scvi.model.guides.PerCellGuide.from_guide>`) and is
    fitted by :func:`refine` with the model fixed. Both are then scored by
    :func:`pyro_scvi.posterior.fit_statistics` with ``n_samples`` draws per cell under the
    same ``seed``.

    Parameters
    ----------
    model, guide
        A trained model and its amortized guide (anything with ``encode``).
    data, indices
        The cells to measure, typically held out from training.
    n_steps, lr, elbo, batch_size
        As in :func:`refine`.
    n_samples, seed
        Draws per cell for the ELBO and marginal-likelihood estimates, and their seed.
    device
        Where ``model`` and ``guide`` are.

    Returns
    -------
    pandas.DataFrame
        One row per cell (in the order of ``indices``): ``elbo_amortized``,
        ``elbo_refined``, ``gap`` (their difference: the amortization gap, nats),
        ``marginal_ll_amortized`` and ``marginal_ll_refined`` (importance-sampled
        ``log p(x)`` with each guide as proposal; both estimate the same quantity).

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> gap = amortization_gap(m.model, m.guide, m.data, np.arange(20), n_steps=100, n_samples=20)
    >>> list(gap.columns)
    ['elbo_amortized', 'elbo_refined', 'gap', 'marginal_ll_amortized', 'marginal_ll_refined']
    >>> bool(gap["gap"].mean() > 0)  # an untrained encoder leaves a lot to refine
    True
    """
    indices = np.asarray(indices)
    refined = PerCellGuide.from_guide(guide, data, indices, batch_size=batch_size, device=device)
    refine(
        model,
        refined,
        data,
        indices,
        n_steps=n_steps,
        lr=lr,
        elbo=elbo,
        batch_size=batch_size,
        device=device,
        frozen_modules=(guide,),
    )
    scores = {}
    # The refined guide's row i is cell indices[i]: score it on a view of those cells.
    cells = _subset(data, indices)
    for name, g, d, idx in (
        ("amortized", guide, data, indices),
        ("refined", refined, cells, np.arange(len(indices))),
    ):
        with posterior.seeded(seed, device):
            scores[name] = posterior.fit_statistics(
                model, g, d, idx, n_samples=n_samples, batch_size=64, device=device
            )
    out = pd.DataFrame(
        {
            "elbo_amortized": scores["amortized"]["elbo"],
            "elbo_refined": scores["refined"]["elbo"],
            "marginal_ll_amortized": scores["amortized"]["marginal_ll"],
            "marginal_ll_refined": scores["refined"]["marginal_ll"],
        },
        index=data.obs_names[indices],
    )
    out.insert(2, "gap", out["elbo_refined"] - out["elbo_amortized"])
    return out


def _subset(data: CountData, indices: np.ndarray) -> CountData:
    """The cells ``indices`` of ``data`` as their own :class:`CountData`, rows in order."""
    return CountData(
        X=data.X[indices],
        batch_index=data.batch_index[indices],
        batch_categories=data.batch_categories,
        obs_names=data.obs_names[indices],
        var_names=data.var_names,
    )
