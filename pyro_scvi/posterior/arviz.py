"""Export a fitted :class:`~pyro_scvi.SCVI` to an ArviZ :class:`~arviz.InferenceData`.

The object holds, for the chosen cells, draws from the approximate posterior, replicated
counts from the posterior predictive distribution, the observed counts and the pointwise
log-likelihood, so that ArviZ (and :mod:`pyro_scvi.analysis.ppc`) can check the model without
knowing anything about Pyro. Groups, variables and dimensions:

====================== ========= ==================================== =====================
group                  variable  dims                                 meaning
====================== ========= ==================================== =====================
posterior              z         (chain, draw, cells, latent)         draws of q(z | x)
posterior              l         (chain, draw, cells)                 draws of q(l | x) [1]
posterior_predictive   x         (chain, draw, cells, genes)          x~ ~ p(x | z, l)
observed_data          x         (cells, genes)                       the counts
log_likelihood         x         (chain, draw, cells)                 sum_g log p(x_g|z,l)
constant_data          batch     (cells)                              each cell's batch
====================== ========= ==================================== =====================

[1] only when the model has a latent library (not ``ObservedLibrary``).

Coordinates: ``cells`` are the cells' ``obs_names``, ``genes`` the model's ``var_names`` and
``latent`` ``0 .. n_latent - 1``; there is one chain (``chain = 0``) of independent draws.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro import poutine

from ..data.counts import CountData, check_indices, require_unique_obs_names
from ..errors import InputError
from ..model.nn import eval_mode
from ..model.priors import is_latent_library
from . import queries as posterior

if TYPE_CHECKING:
    from .fitted import Fitted

with warnings.catch_warnings():
    # arviz 0.23 announces its 1.0 refactor on import; pyro_scvi supports 0.23.
    warnings.filterwarnings("ignore", message="\nArviZ is undergoing", category=FutureWarning)
    import arviz as az


def to_inference_data(
    model: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 50,
    indices: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 256,
    seed: int | None = None,
    genes: Sequence[str] | Sequence[int] | np.ndarray | None = None,
    thin: int = 1,
    dtype: str = "float32",
) -> az.InferenceData:
    """Posterior, posterior predictive, observed data and log-likelihood as InferenceData.

    Parameters
    ----------
    model
        A trained :class:`~pyro_scvi.SCVI`, or any :class:`~pyro_scvi.posterior.fitted.Fitted`.
    adata
        Cells to export (default: the training AnnData); needs the model's genes.
    n_samples
        Posterior draws per cell. Posterior predictive p-values computed from the result
        have a resolution of ``1 / n_samples``.
    indices
        Positions (or a boolean mask) of the cells of ``adata`` to export (default: all),
        e.g. a random subset
        of a large dataset: the replicated counts take ``n_samples x cells x genes`` floats.
    batch_size
        Cells per forward pass; memory grows with ``batch_size x n_samples x genes``.
    seed
        Seed of the draws; the global torch random state is left as it was.
    genes
        Names (or positions) of the genes whose replicated and observed counts to keep
        (default: all). The replicated counts are ``draws x cells x genes`` values, by far
        the largest group; the posterior and the per-cell log-likelihood (summed over
        *all* genes) are kept whole.
    thin
        Keep every ``thin``-th draw in ``posterior`` and ``posterior_predictive`` (their
        ``draw`` coordinate keeps the original draw numbers); the log-likelihood keeps all
        ``n_samples`` draws, which PSIS-LOO needs, at ``8 x cells`` bytes per draw.
    dtype
        Of the replicated and observed counts: ``"float32"`` (default, as the model sees
        them), ``"int32"``, or ``"auto"``: the smallest unsigned integer type holding the
        largest count (``uint8``, ``uint16`` or ``uint32``), which also compresses best.

    Returns
    -------
    arviz.InferenceData
        See the module docstring for the groups, dims and coords. Save it with
        ``idata.to_netcdf(path)`` (zlib-compressed), read it back with
        ``arviz.from_netcdf(path)``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=12, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2).train(max_epochs=1, progress_bar=False)
    >>> idata = to_inference_data(m, n_samples=5, seed=0)
    >>> sorted(idata.groups())
    ['constant_data', 'log_likelihood', 'observed_data', 'posterior', 'posterior_predictive']
    >>> dict(idata.posterior_predictive["x"].sizes)
    {'chain': 1, 'draw': 5, 'cells': 60, 'genes': 12}
    >>> idata.log_likelihood["x"].dims
    ('chain', 'draw', 'cells')
    >>> small = to_inference_data(m, n_samples=6, seed=0, genes=["gene3"], thin=2, dtype="auto")
    >>> dict(small.posterior_predictive["x"].sizes), small.observed_data["x"].dtype.kind
    ({'chain': 1, 'draw': 3, 'cells': 60, 'genes': 1}, 'u')
    """
    from .._version import __version__

    if int(n_samples) < 1:
        raise InputError(f"n_samples={n_samples}; draw at least one sample.")
    if int(batch_size) < 1:
        raise InputError(f"batch_size={batch_size}; it must be a positive integer.")
    if int(thin) < 1 or int(thin) > int(n_samples):
        raise InputError(f"thin={thin}; it must be between 1 and n_samples ({n_samples}).")
    if dtype not in ("float32", "int32", "auto"):
        raise InputError(f"dtype={dtype!r}; use 'float32', 'int32' or 'auto'.")
    data = model.data_for(adata)
    idx = check_indices(indices, data.n_cells)
    require_unique_obs_names(data.obs_names[idx], "the InferenceData's cells coordinate")
    gene_idx = _check_genes(genes, data.var_names)
    latent_library = is_latent_library(model.model.library_prior)
    sites = ("z", "l", "x") if latent_library else ("z", "x")
    devices = [model.device] if model.device.type == "cuda" else []
    # A private random stream: a seed makes the export reproducible without resetting the
    # caller's global torch state.
    with torch.random.fork_rng(devices=devices):
        if seed is not None:
            torch.manual_seed(seed)
        # a guide's global sites: one draw per sample, for the replicates and log_lik alike
        with posterior.shared_globals(model.guide, int(n_samples)) as shared:
            draws = posterior.sample_posterior(
                model.model,
                model.guide,
                data,
                idx,
                n_samples=int(n_samples),
                sites=sites,
                batch_size=int(batch_size),
                device=model.device,
            )
    log_lik = log_likelihood(
        model.model,
        data,
        idx,
        draws["z"],
        draws.get("l"),
        batch_size=int(batch_size),
        device=model.device,
        global_draws=shared,
    )
    observed = np.vstack(
        [data.tensors(i)[0].numpy()[:, gene_idx] for i in data.minibatches(idx, 4096)]
    )
    replicated = draws["x"][:: int(thin)][..., gene_idx]
    count_type = _count_dtype(dtype, max(float(observed.max()), float(replicated.max())))
    observed, replicated = observed.astype(count_type), replicated.astype(count_type)
    step = int(thin)
    posterior_vars = {"z": draws["z"][::step][None]}
    if latent_library:
        posterior_vars["l"] = draws["l"][::step][None]
    coords = {
        "cells": np.asarray(data.obs_names[idx], dtype=str),
        "genes": np.asarray(data.var_names, dtype=str)[gene_idx],
        "latent": np.arange(draws["z"].shape[-1]),
    }
    # The log-likelihood reuses x's dims; ArviZ drops the trailing ``genes`` dim for it
    # (skip_event_dims), which matches the per-cell sum below.
    dims = {"z": ["cells", "latent"], "l": ["cells"], "x": ["cells", "genes"], "batch": ["cells"]}
    attrs = {
        "inference_library": "pyro",
        "inference_library_version": pyro.__version__,
        "pyro_scvi_version": __version__,
        "model": f"pyro_scvi.{type(model).__name__}",
        "settings": json.dumps(model.settings, default=str),
    }
    idata = az.from_dict(
        posterior=posterior_vars,
        posterior_predictive={"x": replicated[None]},
        observed_data={"x": observed},
        log_likelihood={"x": log_lik[None]},
        constant_data={"batch": np.asarray(data.batch_categories)[data.batch_index[idx]]},
        coords=coords,
        dims=dims,
        attrs=attrs,
        # ArviZ reads the inference library from the posterior group's attributes.
        posterior_attrs=attrs,
    )
    if step > 1:
        # label the kept draws with their numbers among the log-likelihood's draws
        kept = np.arange(0, int(n_samples), step)
        idata.posterior = idata.posterior.assign_coords(draw=kept)
        idata.posterior_predictive = idata.posterior_predictive.assign_coords(draw=kept)
    return idata


def _count_dtype(dtype: str, largest: float) -> np.dtype:
    if dtype != "auto":
        return np.dtype(dtype)
    for candidate in (np.uint8, np.uint16, np.uint32):
        if largest <= np.iinfo(candidate).max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def _check_genes(genes, var_names) -> np.ndarray:
    if genes is None:
        return np.arange(len(var_names))
    genes = np.atleast_1d(np.asarray(genes))
    if len(genes) == 0:
        raise InputError("genes is empty; pass at least one gene, or None for all.")
    if np.issubdtype(genes.dtype, np.integer):
        if genes.min() < 0 or genes.max() >= len(var_names):
            raise InputError(f"gene positions out of range for {len(var_names)} genes.")
        return genes
    positions = pd.Index(var_names).get_indexer(genes.astype(str))
    if (positions < 0).any():
        missing = list(genes[positions < 0][:5])
        raise InputError(f"genes {missing} are not among the model's genes.")
    return positions


def log_likelihood(
    model,
    data: CountData,
    indices: np.ndarray,
    z: np.ndarray,
    l: np.ndarray | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    global_draws: dict[str, torch.Tensor] | None = None,
) -> np.ndarray:
    """``log p(x_n | z_sn, l_sn)`` of each cell at each posterior draw, summed over genes.

    The model is traced with ``z`` (and ``l``) conditioned on the given draws and ``x`` on
    the observed counts; the draws are vectorized in a plate left of the model's plates.

    Parameters
    ----------
    model
        A :class:`~pyro_scvi.model.ScviModel`.
    data, indices
        The counts and the cells (rows of ``z``, ``l``) to score.
    z, l
        Draws ``(S, cells, n_latent)`` and ``(S, cells)``; ``l`` is ``None`` when the model
        uses the observed library size.
    batch_size
        Cells per forward pass; memory grows with ``batch_size x S x genes``.
    device
        Where the model lives.
    global_draws
        Draws of a scheme's global sites (:func:`pyro_scvi.posterior.shared_globals`), one
        per draw of ``z``; required when the model has global sites.

    Returns
    -------
    numpy.ndarray
        ``(S, cells)``, ``float64``. Summed over genes because a per-entry array would be
        ``S x cells x genes``, as large as the replicated counts, while model comparison
        (PSIS-LOO, WAIC) treats the cell as the unit of observation.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=8, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2)
    >>> z, l = np.zeros((3, 20, 2), np.float32), np.full((3, 20), 7.0, np.float32)
    >>> log_likelihood(m.model, m.data, np.arange(20), z, l).shape
    (3, 20)
    """
    indices = np.asarray(indices)
    if z.shape[1] != len(indices) or (l is not None and l.shape != z.shape[:2]):
        raise ValueError(
            f"z {z.shape} and l {None if l is None else l.shape} must have one row per cell "
            f"of indices ({len(indices)})."
        )
    n_draws = z.shape[0]
    if getattr(model, "globals", None) is not None and not global_draws:
        raise ValueError(
            "The model has global sites (an inference scheme's); pass their draws as "
            "global_draws (pyro_scvi.posterior.shared_globals gives them)."
        )
    out = []
    start = 0
    with torch.no_grad(), eval_mode(model), pyro.get_param_store().scope():
        for idx in data.minibatches(indices, batch_size):
            x, b = data.tensors(idx, device)
            rows = slice(start, start + len(idx))
            start += len(idx)
            # Shapes the model's sites have: z (S, cells, 1, K), l (S, cells, 1).
            values = dict(global_draws or {})
            values["z"] = torch.as_tensor(z[:, rows], device=device).unsqueeze(-2)
            if l is not None:
                values["l"] = torch.as_tensor(l[:, rows], device=device).unsqueeze(-1)
            with pyro.plate("draws", n_draws, dim=-3):
                trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, b)
            site = trace.nodes["x"]
            out.append(site["fn"].log_prob(site["value"]).sum(-1).double().cpu().numpy())
    return np.concatenate(out, axis=1)
