"""The queries of a fitted model, as functions of a :class:`~pyro_scvi.posterior.fitted.Fitted`.

Each function is also the method of :class:`~pyro_scvi.SCVI` by the same name
(:func:`~pyro_scvi.posterior.fitted.as_method`): ``model.get_elbo()`` is
``get_elbo(model)``, and the same call works on a
:class:`~pyro_scvi.posterior.fitted.FittedModel`. A function here checks its arguments,
codes the cells as the model codes them (``fitted.data_for(adata)``) and calls the
estimators of :mod:`~pyro_scvi.posterior.queries` and :mod:`~pyro_scvi.posterior.gap`,
which work on counts and cell positions and know nothing of AnnData.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch

from .._docs import fill_doc
from ..data.counts import CountData, check_indices, gene_order
from ..errors import InputError
from ..model.nn import eval_mode
from . import ais, gap
from . import queries as q
from .fitted import Fitted
from .proposals import GuideProposal, Proposal

if TYPE_CHECKING:
    from anndata import AnnData


def check_positive(**values: int) -> None:
    """Raise :class:`~pyro_scvi.InputError` unless every value is a positive integer.

    Examples
    --------
    >>> check_positive(n_samples=3, batch_size=1)
    >>> check_positive(n_samples=0)
    Traceback (most recent call last):
    ...
    pyro_scvi.errors.InputError: n_samples=0; it must be a positive integer.
    """
    for name, value in values.items():
        if int(value) < 1:
            raise InputError(f"{name}={value}; it must be a positive integer.")


def batch_codes(
    categories: Sequence[str], transform_batch: str | int | Sequence[str] | None
) -> list[int] | None:
    """The codes of the batches ``transform_batch`` names (``None``: each cell's own).

    Examples
    --------
    >>> batch_codes(("a", "b"), ["b", "a"]), batch_codes(("a", "b"), None)
    ([1, 0], None)
    """
    if transform_batch is None:
        return None
    names = [transform_batch] if isinstance(transform_batch, str | int) else transform_batch
    codes = []
    for name in names:
        if str(name) not in categories:
            raise InputError(
                f"transform_batch={name!r} is not a known batch (known: {list(categories)})."
            )
        codes.append(list(categories).index(str(name)))
    return codes


def gene_columns(data: CountData, gene_list: Sequence[str] | None) -> np.ndarray | None:
    """Column positions of ``gene_list`` in ``data`` (``None``: all genes).

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=5, n_genes=4))
    >>> gene_columns(data, [data.var_names[3], data.var_names[0]]).tolist()
    [3, 0]
    """
    if gene_list is None:
        return None
    unknown = [g for g in gene_list if g not in data.var_names]
    if unknown:
        raise InputError(f"gene_list has genes the model does not know: {unknown[:5]}.")
    return data.var_names.get_indexer(list(gene_list))


def output_genes(
    fitted: Fitted, adata: AnnData | None, data: CountData, gene_list: Sequence[str] | None = None
) -> np.ndarray | None:
    """Columns of the model's per-gene values that a query returns, in the order it returns.

    ``gene_list`` when given (its order); otherwise the genes of ``adata`` (default: the
    model's AnnData, ``fitted.adata``) in that AnnData's order, matched by name, so a
    cells x genes result lines up with the ``var_names`` of the AnnData it was asked for
    even when the model knows its genes in another order. ``None``: the model's own
    order (the AnnData's, or the model's AnnData has other genes than its data).

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=5, n_genes=4)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> reversed_genes = adata[:, ::-1].copy()
    >>> output_genes(model, reversed_genes, model.data_for(reversed_genes)).tolist()
    [3, 2, 1, 0]
    """
    if gene_list is not None:
        return gene_columns(data, gene_list)
    if adata is not None:
        return gene_order(data.var_names, adata.var_names)
    own = getattr(fitted, "adata", None)
    if own is None:
        return None
    try:
        return gene_order(data.var_names, own.var_names)
    except InputError:  # a model's data taken from a gene subset of its AnnData
        return None


def _genes_last(values: np.ndarray, columns: np.ndarray | None) -> np.ndarray:
    return values if columns is None else values[..., columns]


def _cells_by_genes(values: np.ndarray, data: CountData, columns: np.ndarray | None):
    """A cells x genes DataFrame of per-gene ``values``, its genes ``columns`` of ``data``."""
    names = data.var_names if columns is None else data.var_names[columns]
    return pd.DataFrame(_genes_last(values, columns), index=data.obs_names, columns=names)


def _estimate(fitted: Fitted, estimator, data: CountData, idx: np.ndarray, seed, **settings):
    """``estimator`` run on the cells ``idx`` with ``fitted``'s model, guide and device.

    Its draws are seeded by ``seed`` (:func:`~pyro_scvi.posterior.queries.seeded`), which
    leaves the global random state as it was.
    """
    with q.seeded(seed, fitted.device):
        return estimator(fitted.model, fitted.guide, data, idx, device=fitted.device, **settings)


@fill_doc
def get_latent_representation(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    give_mean: bool = True,
    n_samples: int = 1,
    batch_size: int = 1024,
) -> np.ndarray:
    """Latent ``z`` of each cell: posterior mean, or posterior samples.

    Parameters
    ----------
    {fitted}
    {adata}
    give_mean
        Return the mean of q(z | x); otherwise ``n_samples`` draws from it.
    n_samples
        Draws when ``give_mean`` is false.
    {batch_size}

    Returns
    -------
    numpy.ndarray
        ``(cells, n_latent)``, or ``(n_samples, cells, n_latent)`` when sampling.
        Store it as ``adata.obsm["X_pyro_scvi"]``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> model.get_latent_representation(give_mean=False, n_samples=3).shape
    (3, 40, 2)
    """
    data = fitted.data_for(adata)
    idx = np.arange(data.n_cells)
    if give_mean:
        return q.latent_mean(fitted.guide, data, idx, batch_size=batch_size, device=fitted.device)
    out = []
    with torch.no_grad(), eval_mode(fitted.model, fitted.guide):
        with pyro.get_param_store().scope():
            for x, b, cells in q.iterate_indexed_cells(data, idx, batch_size, fitted.device):
                z = q.sample_guide(fitted.model, fitted.guide, x, b, n_samples, cells)["z"]
                out.append(z.squeeze(-2).cpu().numpy())
    return np.concatenate(out, axis=1)


@fill_doc
def get_normalized_expression(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    transform_batch: str | Sequence[str] | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    return_mean: bool = True,
    batch_size: int = 256,
) -> pd.DataFrame | np.ndarray:
    """Normalized (denoised) expression ``library_size * rho`` of each cell.

    Parameters
    ----------
    {fitted}
    {adata}
    {transform_batch}
    library_size
        Scale so each cell sums to this many counts, or ``"latent"`` for the cell's own
        (latent or observed) library size.
    n_samples, return_mean
        Posterior draws of ``z`` (and ``l``), and whether to average them.
    {batch_size}

    Returns
    -------
    pandas.DataFrame or numpy.ndarray
        Cells x genes DataFrame (the posterior mean), or an array
        ``(n_samples, cells, genes)`` when ``return_mean`` is false.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, n_batches=2)
    >>> model = pyro_scvi.SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8)
    >>> rho = model.get_normalized_expression(transform_batch="batch0")
    >>> rho.shape, bool(abs(rho.sum(axis=1) - 1).max() < 1e-4)
    ((40, 15), True)
    """
    if not (library_size == "latent" or float(library_size) > 0):
        raise InputError(f"library_size={library_size!r}; use a positive number or 'latent'.")
    data = fitted.data_for(adata)
    samples = q.normalized_expression(
        fitted.model,
        fitted.guide,
        data,
        np.arange(data.n_cells),
        transform_batch=batch_codes(fitted.data_for().batch_categories, transform_batch),
        library_size=library_size,
        n_samples=n_samples,
        batch_size=batch_size,
        device=fitted.device,
    )
    columns = output_genes(fitted, adata, data)
    if not return_mean:
        return _genes_last(samples, columns)
    return _cells_by_genes(samples.mean(0), data, columns)


@fill_doc
def get_fit_statistics(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    n_samples: int = 100,
    batch_size: int = 64,
    seed: int | None = None,
    observed_library: bool = False,
    proposal: Proposal | None = None,
) -> pd.DataFrame:
    """ELBO, marginal log-likelihood and reconstruction error of each cell, in one pass.

    All three come from the same ``n_samples`` draws of q(z, l | x) per cell, so
    ``marginal_ll >= elbo`` cell by cell; see :mod:`pyro_scvi.posterior`. Beside
    ``marginal_ll`` stands the Pareto ``k`` of its importance weights: where it is above
    0.7 the estimate may be far off. A ``proposal`` built from q
    (:mod:`pyro_scvi.posterior.proposals`) draws the importance samples instead and keeps
    ``k`` low where q alone does not.

    Parameters
    ----------
    {fitted}
    {adata}
    {indices}
    n_samples
        Importance samples ``K`` per cell.
    {batch_size}
    {seed}
    {observed_library}
    proposal
        Importance-sampling proposal for ``marginal_ll``
        (:class:`~pyro_scvi.posterior.proposals.Proposal`); None: q itself.

    Returns
    -------
    pandas.DataFrame
        Indexed by cell, columns ``elbo``, ``marginal_ll`` (nats, higher is better),
        ``reconstruction_error`` (nats, lower is better) and ``pareto_k`` (of
        ``marginal_ll``'s weights; ``inf`` with fewer than about 25 samples).
        ``attrs["proposal"]`` records the proposal and its settings, ``attrs["n_samples"]``
        the ``K`` that ``k`` was estimated from.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> stats = model.get_fit_statistics(n_samples=50, seed=0)
    >>> list(stats.columns), stats.attrs["proposal"]
    (['elbo', 'marginal_ll', 'reconstruction_error', 'pareto_k'], {'proposal': 'GuideProposal'})
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    data = fitted.data_for(adata)
    idx = check_indices(indices, data.n_cells)  # None: every cell
    stats = _estimate(
        fitted,
        q.fit_statistics,
        data,
        idx,
        seed,
        n_samples=n_samples,
        batch_size=batch_size,
        observed_library=observed_library,
        proposal=proposal,
    )
    out = pd.DataFrame(stats, index=data.obs_names[idx])
    out.attrs["proposal"] = (proposal or GuideProposal()).settings()
    out.attrs["n_samples"] = int(n_samples)
    return out


def _fit_statistic(
    name: str, fitted, adata, n_samples, batch_size, per_cell, seed, observed_library=False,
    proposal=None,
) -> float | np.ndarray:  # fmt: skip
    values = get_fit_statistics(
        fitted,
        adata,
        n_samples=n_samples,
        batch_size=batch_size,
        seed=seed,
        observed_library=observed_library,
        proposal=proposal,
    )[name].to_numpy()
    return values if per_cell else float(values.mean())


@fill_doc
def get_elbo(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 1,
    batch_size: int = 256,
    per_cell: bool = False,
    seed: int | None = None,
) -> float | np.ndarray:
    """Evidence lower bound ``E_q[log p(x, z, l) - log q(z, l | x)]`` per cell.

    Nats, higher is better (not the negative ELBO); estimated with ``n_samples`` draws
    of q per cell. The model's networks run in eval mode, so on the training cells
    this is the validation-style ELBO, not the training loss.

    Parameters
    ----------
    {fitted}
    {adata}
    {fit_samples}
    {per_cell}

    Returns
    -------
    float or numpy.ndarray
        The mean ELBO per cell, or the ``(cells,)`` array with ``per_cell``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> isinstance(model.get_elbo(), float), model.get_elbo(per_cell=True).shape
    (True, (40,))
    """
    return _fit_statistic("elbo", fitted, adata, n_samples, batch_size, per_cell, seed)


@fill_doc
def get_marginal_ll(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 1000,
    batch_size: int = 32,
    per_cell: bool = False,
    seed: int | None = None,
    observed_library: bool = False,
    proposal: Proposal | None = None,
) -> float | np.ndarray:
    """Importance-sampled marginal log-likelihood ``log p(x)`` per cell.

    ``log (1/K) sum_k p(x, z_k, l_k) / q(z_k, l_k | x)`` with ``K = n_samples`` draws
    of q: a lower bound in expectation that tightens as ``K`` grows (nats, higher is
    better). It is the usual measure of held-out fit. Its Pareto ``k`` per cell is in
    :func:`get_fit_statistics`.

    Parameters
    ----------
    {fitted}
    {adata}
    {fit_samples}
    {per_cell}
    {observed_library}
    proposal
        Draw the ``K`` samples from this proposal instead of q
        (:mod:`pyro_scvi.posterior.proposals`).

    Returns
    -------
    float or numpy.ndarray
        The mean per cell, or the ``(cells,)`` array with ``per_cell``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> model.get_marginal_ll(n_samples=20, seed=0) >= model.get_elbo(n_samples=20, seed=0)
    True
    """
    return _fit_statistic(
        "marginal_ll", fitted, adata, n_samples, batch_size, per_cell, seed, observed_library,
        proposal,
    )  # fmt: skip


@fill_doc
def get_marginal_ll_ais(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    n_chains: int = 16,
    n_steps: int = 100,
    n_leapfrog: int = 4,
    step_size: float = 0.25,
    target_accept: float = 0.65,
    batch_size: int = 64,
    seed: int | None = None,
    observed_library: bool = False,
) -> pd.DataFrame:
    """``log p(x)`` per cell by annealed importance sampling, with its standard error.

    Each of ``n_chains`` independent chains per cell starts at a draw of q(z, l | x) and
    moves to the posterior through ``n_steps`` distributions
    ``q^(1 - beta) p(x, z, l)^beta`` by Hamiltonian Monte Carlo, the model held fixed;
    ``log mean_c w_c`` of the chains' weights estimates ``log p(x)``, and the spread of
    the weights gives its standard error (see :mod:`pyro_scvi.posterior.ais`). Unlike
    :func:`get_marginal_ll` it stays reliable where q is far from the posterior (Pareto
    ``k > 0.7``); it costs ``n_chains x n_steps x n_leapfrog`` passes of the model and
    guide, with their gradients, per cell.

    Parameters
    ----------
    {fitted}
    {adata}
    {indices}
    n_chains
        Independent chains per cell (at least 2, for the standard error).
    n_steps
        Intermediate distributions (HMC transitions) on the path from q to the posterior.
    n_leapfrog
        Leapfrog steps per transition (1: Metropolis-adjusted Langevin).
    step_size
        Initial leapfrog step, in units of q's spread; tuned per cell towards
        ``target_accept``.
    target_accept
        The acceptance rate each cell's step size is tuned towards after every transition.
    {batch_size}
    {seed}
    {observed_library}

    Returns
    -------
    pandas.DataFrame
        Indexed by cell: ``marginal_ll`` (nats), ``se`` (its standard error), ``ess``
        (effective number of chains, at most ``n_chains``) and ``acceptance`` (HMC's
        mean acceptance rate). ``attrs["settings"]`` records every setting, the fixed ones
        included: the sigmoid schedule's sharpness and the draws of q that set the scale
        of each coordinate.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> t = model.get_marginal_ll_ais(indices=[0, 1], n_chains=4, n_steps=5, seed=0)
    >>> list(t.columns), bool((t["se"] > 0).all()), t.attrs["settings"]["target_accept"]
    (['marginal_ll', 'se', 'ess', 'acceptance'], True, 0.65)
    """
    check_positive(n_steps=n_steps, n_leapfrog=n_leapfrog, batch_size=batch_size)
    if int(n_chains) < 2:
        raise InputError(f"n_chains={n_chains}; use at least 2 chains for a standard error.")
    if not step_size > 0:
        raise InputError(f"step_size={step_size}; it must be positive.")
    if not 0 < target_accept < 1:
        raise InputError(f"target_accept={target_accept}; it must be between 0 and 1.")
    data = fitted.data_for(adata)
    idx = check_indices(indices, data.n_cells)
    out = _estimate(
        fitted,
        ais.ais_marginal_ll,
        data,
        idx,
        seed,
        n_chains=n_chains,
        n_steps=n_steps,
        n_leapfrog=n_leapfrog,
        step_size=step_size,
        target_accept=target_accept,
        batch_size=batch_size,
        observed_library=observed_library,
    )
    table = pd.DataFrame(out, index=data.obs_names[idx])
    table.attrs["settings"] = {
        "n_chains": int(n_chains), "n_steps": int(n_steps), "n_leapfrog": int(n_leapfrog),
        "step_size": float(step_size), "target_accept": float(target_accept),
        "schedule": "sigmoid", "sharpness": ais.SIGMOID_SHARPNESS,
        "pilot_draws": max(ais.PILOT_DRAWS, int(n_chains)),
        "observed_library": bool(observed_library),
    }  # fmt: skip
    return table


@fill_doc
def get_reconstruction_error(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 1,
    batch_size: int = 256,
    per_cell: bool = False,
    seed: int | None = None,
) -> float | np.ndarray:
    """Reconstruction error ``-E_q[log p(x | z, l)]`` per cell (nats, lower is better).

    Parameters
    ----------
    {fitted}
    {adata}
    {fit_samples}
    {per_cell}

    Returns
    -------
    float or numpy.ndarray
        The mean per cell, or the ``(cells,)`` array with ``per_cell``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> model.get_reconstruction_error() > 0
    True
    """
    return _fit_statistic(
        "reconstruction_error", fitted, adata, n_samples, batch_size, per_cell, seed
    )


@fill_doc
def get_amortization_gap(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_steps: int = 300,
    lr: float = 1e-2,
    n_samples: int = 100,
    batch_size: int = 256,
    seed: int | None = 0,
) -> pd.DataFrame:
    """How much ELBO the encoder leaves on held-out cells; see :mod:`pyro_scvi.posterior.gap`.

    Each cell's q(z, l) starts at the encoder's output and is refined by SVI on its own
    parameters with the model fixed; both are scored by one estimator.

    Parameters
    ----------
    {fitted}
    adata
        Cells to measure; default the validation cells the model held out in training
        (its ``validation_indices``).
    n_steps, lr
        SVI steps per chunk of ``batch_size`` cells, and Adam's learning rate.
    n_samples, seed
        Draws per cell for the ELBO and marginal-likelihood estimates, and their seed.
    batch_size
        Cells refined together.

    Returns
    -------
    pandas.DataFrame
        Indexed by cell: ``elbo_amortized``, ``elbo_refined``, ``gap`` (nats; its mean
        is the amortization gap per cell), ``marginal_ll_amortized`` and
        ``marginal_ll_refined``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> model = model.train(max_epochs=2, train_size=0.8, progress_bar=False)
    >>> result = model.get_amortization_gap(n_steps=20, n_samples=10)
    >>> len(result), bool(result["gap"].mean() > 0)
    (12, True)
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    if not getattr(fitted.guide, "amortized", True):
        raise InputError(
            f"The {type(fitted.guide).__name__} is not amortized: it has no encoder output "
            "to start from. Use pyro_scvi.posterior.gap.refine to fit held-out cells."
        )
    if adata is None:
        # a FittedModel holds no split: it has no held-out cells of its own
        held_out = getattr(fitted, "validation_indices", np.arange(0))
        if not len(held_out):
            raise InputError(
                "No held-out cells: train with train_size < 1, or pass adata=held-out cells."
            )
        data, idx = fitted.data_for(), held_out
    else:
        data = fitted.data_for(adata)
        idx = np.arange(data.n_cells)
    with pyro.get_param_store().scope():
        return gap.amortization_gap(
            fitted.model,
            fitted.guide,
            data,
            idx,
            n_steps=n_steps,
            lr=lr,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
            device=fitted.device,
        )


@fill_doc
def posterior_samples(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 25,
    sites: Sequence[str] = ("z", "l", "rho", "x"),
    transform_batch: str | None = None,
    batch_size: int = 256,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Posterior draws of ``z`` and ``l`` and posterior predictive ``rho`` and ``x``.

    ``z`` and ``l`` are drawn from the guide, ``rho`` and replicated counts ``x`` from the
    model at those draws; see :func:`pyro_scvi.posterior.sample_posterior`.

    Parameters
    ----------
    {fitted}
    {adata}
    n_samples
        Draws per cell.
    sites
        Any of ``"z"``, ``"l"``, ``"rho"``, ``"x"``. A model with
        ``use_observed_lib_size`` has no ``l``; it is then left out of the result.
    transform_batch
        Batch name to decode every cell under (``None``: each cell's own batch).
    {batch_size}
    {seed}

    Returns
    -------
    dict
        Arrays with a leading sample axis: ``z`` ``(S, cells, n_latent)``, ``l``
        ``(S, cells)``, ``rho`` and ``x`` ``(S, cells, genes)``. Summarize them with
        :func:`pyro_scvi.posterior.summarize`.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> s = model.posterior_samples(n_samples=3, sites=("z", "x"), seed=0)
    >>> s["z"].shape, s["x"].shape
    ((3, 40, 2), (3, 40, 15))
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    unknown = sorted(set(sites) - {"z", "l", "rho", "x"})
    if unknown:
        raise InputError(f"Unknown sites {unknown}; choose from 'z', 'l', 'rho', 'x'.")
    codes = batch_codes(fitted.data_for().batch_categories, transform_batch)
    if codes is not None and len(codes) != 1:
        raise InputError(
            f"transform_batch={transform_batch!r}: posterior samples decode under one "
            "batch; pass a single batch name."
        )
    data = fitted.data_for(adata)
    return _estimate(
        fitted,
        q.sample_posterior,
        data,
        np.arange(data.n_cells),
        seed,
        n_samples=n_samples,
        sites=tuple(sites),
        transform_batch=None if codes is None else codes[0],
        batch_size=batch_size,
    )


@fill_doc
def get_likelihood_parameters(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 1,
    give_mean: bool = False,
    batch_size: int = 256,
    seed: int | None = None,
) -> dict[str, np.ndarray]:
    """Parameters of each cell's count distribution at posterior draws (scvi-tools' name).

    Parameters
    ----------
    {fitted}
    {adata}
    n_samples
        Draws of ``z`` (and ``l``) from the guide.
    give_mean
        Average over the draws.
    {batch_size}
    {seed}

    Returns
    -------
    dict
        ``mean`` (``exp(l) * rho``, the count mean before zero inflation),
        ``dispersions`` (inverse dispersion ``theta``; NB and ZINB) and ``dropout``
        (zero-inflation logits; ZINB and ZIP): ``(cells, genes)`` arrays when
        ``n_samples == 1`` or ``give_mean``, else ``(n_samples, cells, genes)``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> p = model.get_likelihood_parameters(seed=0)
    >>> sorted(p), p["mean"].shape
    (['dispersions', 'dropout', 'mean'], (40, 15))
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    data = fitted.data_for(adata)
    params = _estimate(
        fitted,
        q.likelihood_parameters,
        data,
        np.arange(data.n_cells),
        seed,
        n_samples=n_samples,
        batch_size=batch_size,
    )
    # (cells, genes) values in the genes' order of the AnnData asked about
    columns = output_genes(fitted, adata, data)
    params = {k: _genes_last(v, columns) for k, v in params.items()}
    if give_mean or n_samples == 1:
        return {k: v.mean(0) for k, v in params.items()}
    return params


@fill_doc
def get_dropout_probability(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    indices: Sequence[int] | np.ndarray | None = None,
    n_samples: int = 25,
    gene_list: Sequence[str] | None = None,
    zeros_only: bool = True,
    batch_size: int = 256,
    seed: int | None = None,
) -> np.ndarray:
    """Posterior probability that each zero count is a technical dropout (zero decomposition).

    Under zero inflation a zero comes either from the gate (a technical dropout, with
    probability ``pi``) or from the count distribution itself (a gene not expressed,
    or expressed and not sampled). Given ``x = 0``, Bayes' rule gives
    ``pi / (pi + (1 - pi) NB(0 | mu, theta))`` (ZINB; ``exp(-mu)`` in place of the NB
    term for ZIP), averaged here over posterior draws of ``z`` and ``l``
    (Lopez et al. 2018, supplementary figure 14). See
    :func:`pyro_scvi.posterior.dropout_probability`.

    Parameters
    ----------
    {fitted}
    {adata}
    {indices}
    n_samples
        Posterior draws of ``z`` (and ``l``) per cell.
    {gene_list}
    zeros_only
        ``True``: entries with ``x > 0`` are ``NaN``. A positive count is certainly
        not a dropout, so the answer there is not informative, and ``NaN`` keeps
        ``numpy.nanmean`` over a gene or cell an average over its zeros. ``False``:
        every entry holds the probability that it would be a dropout were it zero,
        which describes the model's gate against its count distribution everywhere.
    {batch_size}
    {seed}

    Returns
    -------
    numpy.ndarray
        float32 ``(cells, genes)`` with values in [0, 1] (``NaN`` where ``x > 0`` when
        ``zeros_only``).

    Raises
    ------
    InputError
        When the likelihood has no zero-inflation gate (NB, Poisson), for unknown
        genes, and for out-of-range ``indices``.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> p = model.get_dropout_probability(n_samples=5, seed=0)
    >>> zero = adata.X.toarray() == 0
    >>> p.shape, bool(((p[zero] >= 0) & (p[zero] <= 1)).all()), bool(np.isnan(p[~zero]).all())
    ((40, 15), True, True)
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    likelihood = fitted.model.likelihood
    if not getattr(likelihood, "uses_gate", False):
        raise InputError(
            f"get_dropout_probability needs a zero-inflated likelihood, and this model "
            f"uses {likelihood!r}, under which no zero is a dropout. Fit with "
            "likelihood=pyro_scvi.ZINB() (the default) or pyro_scvi.ZIP()."
        )
    data = fitted.data_for(adata)
    idx = check_indices(indices, data.n_cells)
    columns = output_genes(fitted, adata, data, gene_list)
    return _estimate(
        fitted,
        q.dropout_probability,
        data,
        idx,
        seed,
        n_samples=n_samples,
        genes=columns,
        zeros_only=zeros_only,
        batch_size=batch_size,
    )


@fill_doc
def get_latent_library_size(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    give_mean: bool = True,
    batch_size: int = 1024,
    seed: int | None = None,
) -> np.ndarray:
    """Each cell's library size ``exp(l)`` under the posterior (scvi-tools' name).

    Parameters
    ----------
    {fitted}
    {adata}
    give_mean
        The posterior mean ``E_q[exp(l)]``; otherwise one draw from q.
    batch_size
        Cells per pass.
    seed
        Seed for the draw (``give_mean=False``).

    Returns
    -------
    numpy.ndarray
        ``(cells,)``, in counts. With ``use_observed_lib_size``, the observed totals.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> size = model.get_latent_library_size()
    >>> size.shape, bool((size > 0).all())
    ((40,), True)
    """
    check_positive(batch_size=batch_size)
    data = fitted.data_for(adata)
    return _estimate(
        fitted,
        q.latent_library_size,
        data,
        np.arange(data.n_cells),
        seed,
        give_mean=give_mean,
        batch_size=batch_size,
    )


@fill_doc
def posterior_predictive_sample(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 1,
    gene_list: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int | None = None,
) -> sp.csr_matrix | list[sp.csr_matrix]:
    """Replicated count matrices from the posterior predictive, sparse (scvi-tools' name).

    Each draw takes ``(z, l) ~ q(z, l | x)`` and then ``x~ ~ p(x | z, l)``, with
    :class:`pyro.infer.Predictive` (see :func:`pyro_scvi.posterior.sample_posterior`).

    Parameters
    ----------
    {fitted}
    {adata}
    n_samples
        Replicate datasets.
    {gene_list}
    batch_size
        Cells per pass; memory holds one pass dense.
    {seed}

    Returns
    -------
    scipy.sparse.csr_matrix or list of them
        ``(cells, genes)`` counts: one matrix when ``n_samples == 1``, else a list of
        ``n_samples``. Put one in an AnnData with ``anndata.AnnData(x,
        obs=adata.obs, var=adata.var)``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> x = model.posterior_predictive_sample(seed=0)
    >>> x.shape, x.format
    ((40, 15), 'csr')
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    data = fitted.data_for(adata)
    columns = output_genes(fitted, adata, data, gene_list)
    draws = _estimate(
        fitted,
        q.posterior_predictive_counts,
        data,
        np.arange(data.n_cells),
        seed,
        n_samples=n_samples,
        batch_size=batch_size,
    )
    if columns is not None:
        draws = [d[:, columns] for d in draws]
    return draws[0] if n_samples == 1 else draws


@fill_doc
def impute(
    fitted: Fitted,
    adata: AnnData | None = None,
    *,
    n_samples: int = 25,
    transform_batch: str | Sequence[str] | None = None,
    credible_level: float = 0.95,
    batch_size: int = 256,
    seed: int | None = None,
) -> dict[str, pd.DataFrame]:
    """Denoised expected counts ``mu = exp(l) * rho`` with a credible interval.

    ``mu`` is the mean of the count distribution before zero inflation and sampling
    noise, so it imputes dropouts: a gene the cell's neighbours express gets a
    positive value even where the cell's count is 0. With ``use_observed_lib_size``
    the observed library size takes the place of ``exp(l)``.

    Parameters
    ----------
    {fitted}
    {adata}
    n_samples
        Posterior draws of ``z`` (and ``l``) per cell.
    {transform_batch}
    credible_level
        Mass of the central interval ``[lower, upper]``, in (0, 1).
    batch_size
        Cells per pass; the samples of one pass are summarized before the next.
    {seed}

    Returns
    -------
    dict
        ``mean``, ``lower`` and ``upper``: cells x genes DataFrames of the posterior mean
        and the central ``credible_level`` interval of ``mu``.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> out = model.impute(n_samples=5, seed=0)
    >>> sorted(out), out["mean"].shape
    (['lower', 'mean', 'upper'], (40, 15))
    """
    check_positive(n_samples=n_samples, batch_size=batch_size)
    if not 0 < credible_level < 1:
        raise InputError(f"credible_level={credible_level}; it must be in (0, 1).")
    codes = batch_codes(fitted.data_for().batch_categories, transform_batch)
    data = fitted.data_for(adata)
    tail = (1.0 - credible_level) / 2
    keys = {"lower": q.quantile_key(tail), "upper": q.quantile_key(1 - tail)}
    parts: dict[str, list[np.ndarray]] = {"mean": [], "lower": [], "upper": []}
    with q.seeded(seed, fitted.device):
        # Summarize pass by pass: quantiles are per cell, so this is exact, and memory
        # stays at one pass's samples rather than n_samples x cells x genes.
        for idx in data.minibatches(np.arange(data.n_cells), batch_size):
            mu = q.normalized_expression(
                fitted.model,
                fitted.guide,
                data,
                idx,
                transform_batch=codes,
                library_size="latent",
                n_samples=n_samples,
                batch_size=batch_size,
                device=fitted.device,
            )
            summary = q.summarize(mu, quantiles=(tail, 1 - tail))
            parts["mean"].append(summary["mean"])
            parts["lower"].append(summary[keys["lower"]])
            parts["upper"].append(summary[keys["upper"]])
    columns = output_genes(fitted, adata, data)
    return {k: _cells_by_genes(np.concatenate(v), data, columns) for k, v in parts.items()}
