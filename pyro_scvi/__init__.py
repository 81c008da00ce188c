"""pyro_scvi: scVI (Lopez et al., 2018) as a Pyro model and guide.

Quick start::

    import pyro_scvi
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    model = pyro_scvi.SCVI(adata).train(max_epochs=50)
    adata.obsm["X_pyro_scvi"] = model.get_latent_representation()
"""

from . import convert, datasets, de, engine, files, io, kernels, metrics, plotting, posterior, ppc
from .data import CountData, InputError, from_anndata
from .engine import Engine
from .guide import PerCellGuide, ScviGuide
from .infer import TrainingError, TrainingInterrupted, train_svi
from .io import ModelFileError
from .likelihoods import NB, ZINB, ZIP, Likelihood, Poisson
from .model import ScviModel
from .priors import (
    LibraryPrior,
    LogNormalLibrary,
    MixtureOfGaussians,
    Prior,
    StandardNormal,
    VampPrior,
)
from .scvi import SCVI

__version__ = "0.1.0"

__all__ = [
    "SCVI",
    "Engine",
    "ScviModel",
    "ScviGuide",
    "PerCellGuide",
    "Likelihood",
    "ZINB",
    "NB",
    "Poisson",
    "ZIP",
    "Prior",
    "StandardNormal",
    "MixtureOfGaussians",
    "VampPrior",
    "LibraryPrior",
    "LogNormalLibrary",
    "CountData",
    "InputError",
    "TrainingError",
    "TrainingInterrupted",
    "ModelFileError",
    "from_anndata",
    "train_svi",
    "convert",
    "datasets",
    "de",
    "engine",
    "files",
    "io",
    "kernels",
    "metrics",
    "posterior",
    "ppc",
    "plotting",
]
