"""A gold standard for the guide: NUTS on the per-cell latents with the model fixed.

With the model's parameters (decoder, dispersion, priors) held fixed, the exact posterior
``p(z, l | x)`` of a few cells can be sampled by Hamiltonian Monte Carlo. :func:`sample_nuts`
runs Pyro's :class:`~pyro.infer.mcmc.NUTS` through :class:`~pyro.infer.mcmc.MCMC` on the
model conditioned on the cells' counts; :func:`compare_to_nuts` sets a guide's marginals
``q(z_d | x)`` (and ``q(l | x)``) beside the samples:

- means, as the error in posterior standard deviations ``(mean_q - mean_p) / sd_p``;
- variances, as the ratio ``var_q / var_p`` (below 1: the guide is over-confident);
- coverage: the posterior mass inside the guide's central credible interval at each level
  (equal to the level when q is exact; below it when q is too narrow or off-centre).

:func:`agreement` condenses the per-coordinate table into those few numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import init_to_sample
from pyro.infer.mcmc import MCMC, NUTS
from pyro.ops.stats import effective_sample_size
from scipy.stats import norm
from torch import nn

from ..data.counts import CountData
from ..model.schemes import require_point_globals
from . import queries as posterior
from .gap import frozen


def sample_nuts(
    model: nn.Module,
    data: CountData,
    indices: np.ndarray,
    *,
    num_samples: int = 300,
    warmup_steps: int = 300,
    seed: int | None = 0,
    device: torch.device | str = "cpu",
    init_strategy: Callable = init_to_sample,
    progress_bar: bool = False,
    jit_compile: bool = False,
) -> dict[str, np.ndarray]:
    """NUTS draws of every latent site of ``model`` for the cells ``indices``, model fixed.

    The cells are sampled jointly in one chain (their posteriors are independent given the
    model; NUTS adapts a diagonal mass matrix, so each coordinate gets its own scale).
    Keep it to a few cells: the cost grows with cells x latent dimensions.

    Parameters
    ----------
    model
        A trained model with :class:`~pyro_scvi.model.ScviModel`'s signature; run in eval
        mode with its parameters frozen (:func:`pyro_scvi.posterior.gap.frozen`).
    data, indices
        The cells.
    num_samples, warmup_steps
        Kept draws and adaptation steps of the single chain.
    seed
        Seed for the chain; the global random state is left as it was.
    device
        Where ``model`` is.
    init_strategy
        Pyro initialization strategy (default: a draw from the prior).
    progress_bar, jit_compile
        Passed to :class:`~pyro.infer.mcmc.MCMC` and :class:`~pyro.infer.mcmc.NUTS`.

    Returns
    -------
    dict
        Per latent site, draws with a leading sample axis and the singleton gene axis
        dropped: ``z`` ``(num_samples, cells, n_latent)``, ``l`` ``(num_samples, cells)``;
        plus ``"_ess"``, the effective sample size of every coordinate of every site,
        concatenated (Pyro's estimator).

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> s = sample_nuts(m.model, m.data, np.arange(3), num_samples=10, warmup_steps=10)
    >>> s["z"].shape, s["l"].shape
    ((10, 3, 2), (10, 3))
    """
    require_point_globals(model, "NUTS on the cells' latents")
    indices = np.asarray(indices)
    x, b = data.tensors(indices, device)
    with frozen(model), posterior.seeded(seed, device), pyro.get_param_store().scope():
        kernel = NUTS(
            poutine.block(model, hide_types=["param"]),
            max_plate_nesting=2,
            init_strategy=init_strategy,
            jit_compile=jit_compile,
            ignore_jit_warnings=True,
        )
        mcmc = MCMC(
            kernel,
            num_samples=int(num_samples),
            warmup_steps=int(warmup_steps),
            num_chains=1,
            disable_progbar=not progress_bar,
        )
        mcmc.run(x, b)
        draws = mcmc.get_samples()
    out: dict[str, np.ndarray] = {}
    ess = []
    for name, value in draws.items():
        value = value.detach()
        # (S, cells, 1, K) -> (S, cells, K); (S, cells, 1) -> (S, cells)
        flat = value.squeeze(-2) if value.dim() == 4 else value.squeeze(-1)
        out[name] = flat.cpu().numpy()
        # Pyro's estimator wants (chains, draws, ...).
        ess.append(effective_sample_size(flat.unsqueeze(0)).reshape(-1).cpu().numpy())
    out["_ess"] = np.concatenate(ess)
    return out


def compare_to_nuts(
    model: nn.Module,
    guide: nn.Module,
    data: CountData,
    indices: np.ndarray,
    *,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
    samples: dict[str, np.ndarray] | None = None,
    device: torch.device | str = "cpu",
    **nuts_kwargs,
) -> pd.DataFrame:
    """The guide's marginals beside NUTS posterior draws, one row per cell and coordinate.

    Parameters
    ----------
    model, guide
        A trained model and a mean-field Normal guide with ``encode(x, batch_index,
        cell_index)`` (:class:`~pyro_scvi.model.guides.ScviGuide` or
        :class:`~pyro_scvi.model.guides.PerCellGuide`; a per-cell guide's ``cell_index`` is
        ``indices``).
    data, indices
        The cells (a few: see :func:`sample_nuts`).
    levels
        Central credible levels whose coverage is measured.
    samples
        Draws from :func:`sample_nuts` to reuse (e.g. to compare several guides with one
        chain); by default they are drawn with ``nuts_kwargs``.
    device
        Where ``model`` and ``guide`` are.
    **nuts_kwargs
        Passed to :func:`sample_nuts`.

    Returns
    -------
    pandas.DataFrame
        Columns ``cell``, ``site`` (``"z"`` or ``"l"``), ``dim``, ``q_mean``, ``q_sd``,
        ``mcmc_mean``, ``mcmc_sd``, ``mean_error`` (``(q_mean - mcmc_mean) / mcmc_sd``),
        ``variance_ratio`` (``q_sd**2 / mcmc_sd**2``) and ``coverage_<level>``: the
        fraction of the NUTS draws inside q's central interval of that level.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> s = sample_nuts(m.model, m.data, np.arange(3), num_samples=10, warmup_steps=10)
    >>> table = compare_to_nuts(m.model, m.guide, m.data, np.arange(3), samples=s)
    >>> len(table), list(table.columns[-3:])
    (9, ['coverage_0.5', 'coverage_0.9', 'coverage_0.95'])
    """
    indices = np.asarray(indices)
    if samples is None:
        samples = sample_nuts(model, data, indices, device=device, **nuts_kwargs)
    x, b = data.tensors(indices, device)
    with torch.no_grad(), frozen(guide):
        q = guide.encode(x, b, torch.as_tensor(indices, device=device))
    rows = []
    for site in ("z", "l"):
        if f"{site}_loc" not in q:
            continue
        if site not in samples:
            raise ValueError(f"The guide has a {site!r} site but the NUTS samples do not.")
        loc = q[f"{site}_loc"].cpu().numpy().reshape(len(indices), -1)
        scale = q[f"{site}_scale"].cpu().numpy().reshape(len(indices), -1)
        draws = samples[site].reshape(samples[site].shape[0], len(indices), -1)
        p_mean, p_sd = draws.mean(0), draws.std(0, ddof=1)
        row = {
            "cell": np.repeat(np.asarray(data.obs_names[indices]), loc.shape[1]),
            "site": site,
            "dim": np.tile(np.arange(loc.shape[1]), len(indices)),
            "q_mean": loc.ravel(),
            "q_sd": scale.ravel(),
            "mcmc_mean": p_mean.ravel(),
            "mcmc_sd": p_sd.ravel(),
            "mean_error": ((loc - p_mean) / p_sd).ravel(),
            "variance_ratio": (scale**2 / p_sd**2).ravel(),
        }
        for level in levels:
            half = norm.ppf(0.5 + level / 2) * scale
            inside = (draws >= loc - half) & (draws <= loc + half)
            row[f"coverage_{level:g}"] = inside.mean(0).ravel()
        rows.append(pd.DataFrame(row))
    return pd.concat(rows, ignore_index=True)


def agreement(table: pd.DataFrame) -> pd.DataFrame:
    """Per site: mean absolute mean error, median variance ratio and mean coverage at each level.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"site": ["z", "z"], "mean_error": [0.1, -0.3],
    ...                   "variance_ratio": [0.5, 1.0], "coverage_0.9": [0.8, 0.9]})
    >>> agreement(t).round(2).to_dict("index")
    {'z': {'abs_mean_error': 0.2, 'variance_ratio': 0.75, 'coverage_0.9': 0.85}}
    """
    coverage = [c for c in table.columns if c.startswith("coverage_")]
    grouped = table.groupby("site", sort=False)
    out = pd.DataFrame(
        {
            "abs_mean_error": grouped["mean_error"].apply(lambda s: s.abs().mean()),
            "variance_ratio": grouped["variance_ratio"].median(),
        }
    )
    for c in coverage:
        out[c] = grouped[c].mean()
    out.index.name = None
    return out
