"""Posterior queries on :class:`pyro.infer.Predictive`, and what builds on them.

:mod:`~pyro_scvi.posterior.queries` answers latent, normalized and batch-corrected
expression, likelihood parameters and importance-sampled fit statistics; the functions
are re-exported here. :mod:`~pyro_scvi.posterior.arviz` exports to ArviZ,
:mod:`~pyro_scvi.posterior.ais` estimates ``log p(x)`` with a standard
error by annealed importance sampling, :mod:`~pyro_scvi.posterior.proposals` builds
importance-sampling proposals from q that keep Pareto ``k`` low,
:mod:`~pyro_scvi.posterior.gap` refines cells one by one (the amortization gap) and
:mod:`~pyro_scvi.posterior.mcmc` runs NUTS on a few cells. :class:`Fitted` is what every
analysis needs of a fitted model, and :mod:`~pyro_scvi.posterior.fitted_queries` asks the
queries above of one (they are :class:`~pyro_scvi.SCVI`'s query methods).
"""

from __future__ import annotations

from .._lazy import attach
from .fitted import Fitted, FittedModel, as_method
from .queries import (
    SHARED_GLOBALS,
    decode,
    dropout_probability,
    dropout_probability_given_zero,
    fit_statistics,
    iterate_cells,
    iterate_indexed_cells,
    latent_library_size,
    latent_mean,
    likelihood_parameters,
    log_importance_weights,
    normalized_expression,
    pareto_k,
    per_cell,
    posterior_predictive_counts,
    quantile_key,
    sample_guide,
    sample_posterior,
    seeded,
    shared_globals,
    summarize,
)

__all__ = [
    "SHARED_GLOBALS",
    "Fitted",
    "FittedModel",
    "ais",
    "arviz",
    "as_method",
    "decode",
    "dropout_probability",
    "dropout_probability_given_zero",
    "fit_statistics",
    "fitted_queries",
    "gap",
    "iterate_cells",
    "iterate_indexed_cells",
    "latent_library_size",
    "latent_mean",
    "likelihood_parameters",
    "log_importance_weights",
    "mcmc",
    "normalized_expression",
    "pareto_k",
    "per_cell",
    "posterior_predictive_counts",
    "proposals",
    "quantile_key",
    "queries",
    "sample_guide",
    "sample_posterior",
    "seeded",
    "shared_globals",
    "summarize",
]

__getattr__, __dir__ = attach(
    __name__, submodules=["ais", "arviz", "fitted_queries", "gap", "mcmc", "proposals", "queries"]
)
