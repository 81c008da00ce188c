"""Analyses of a fitted model: DE, criticism, predictive checks, metrics and plots.

Each module takes any :class:`~pyro_scvi.posterior.Fitted` (the :class:`~pyro_scvi.SCVI`
facade is one), so analyses do not depend on the facade.
"""

from __future__ import annotations

from .._lazy import attach

__all__ = ["criticism", "de", "metrics", "plotting", "ppc"]

__getattr__, __dir__ = attach(__name__, submodules=__all__)
