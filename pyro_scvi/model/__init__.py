"""The generative model and its parts: priors, likelihoods, networks, guides, schemes.

scVI's model reads as the paper's equations in :mod:`~pyro_scvi.model.generative`; what
varies between analyses (the prior of ``z``, the library prior, the likelihood of ``x``,
the guide, a Bayesian decoder) are objects passed in. :mod:`~pyro_scvi.model.build` builds a
model and guide from settings, and :mod:`~pyro_scvi.model.surgery` widens them for new
batches (query mapping).
"""

from __future__ import annotations

from .._lazy import attach
from .distributions import EPS, ZeroInflatedNegativeBinomialMeanDispersion, nb_logits
from .generative import (
    L_MAX,
    Dispersion,
    ScviModel,
    cells_plate,
    parameters_held,
    register_module,
)
from .guides import (
    FlowGuide,
    FullCovarianceGuide,
    Guide,
    GuideFactory,
    LatentParams,
    PerCellGuide,
    ScviGuide,
    build_guide,
)
from .likelihoods import LIKELIHOODS, NB, ZINB, ZIP, Likelihood, Poisson
from .nn import Decoder, Encoder, eval_mode
from .priors import (
    LibraryPrior,
    LogNormalLibrary,
    MixtureOfGaussians,
    ObservedLibrary,
    Prior,
    StandardNormal,
    VampPrior,
    is_latent_library,
)

__all__ = [
    "EPS",
    "L_MAX",
    "LIKELIHOODS",
    "NB",
    "ZINB",
    "ZIP",
    "Decoder",
    "Dispersion",
    "Encoder",
    "FlowGuide",
    "FullCovarianceGuide",
    "Guide",
    "GuideFactory",
    "LatentParams",
    "LibraryPrior",
    "Likelihood",
    "LogNormalLibrary",
    "MixtureOfGaussians",
    "ObservedLibrary",
    "PerCellGuide",
    "Poisson",
    "Prior",
    "ScviGuide",
    "ScviModel",
    "StandardNormal",
    "VampPrior",
    "ZeroInflatedNegativeBinomialMeanDispersion",
    "build",
    "build_guide",
    "cells_plate",
    "eval_mode",
    "is_latent_library",
    "nb_logits",
    "parameters_held",
    "register_module",
    "schemes",
    "surgery",
]

__getattr__, __dir__ = attach(__name__, submodules=["build", "schemes", "surgery"])
