"""pyro_scvi: scVI (Lopez et al., 2018) as a Pyro model and guide.

Quick start::

    import pyro_scvi
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    model = pyro_scvi.SCVI(adata).train(max_epochs=50)
    adata.obsm["X_pyro_scvi"] = model.get_latent_representation()

Names are imported on first use (PEP 562), so ``import pyro_scvi`` and ``pyro-scvi
--help`` do not pay for torch and Pyro until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> the submodule defining it
_NAMES = {
    "SCVI": "scvi",
    "Engine": "engine",
    "ScviModel": "model",
    "ScviGuide": "guide",
    "PerCellGuide": "guide",
    "Guide": "guide",
    "Likelihood": "likelihoods",
    "ZINB": "likelihoods",
    "NB": "likelihoods",
    "Poisson": "likelihoods",
    "ZIP": "likelihoods",
    "Prior": "priors",
    "StandardNormal": "priors",
    "MixtureOfGaussians": "priors",
    "VampPrior": "priors",
    "LibraryPrior": "priors",
    "LogNormalLibrary": "priors",
    "ObservedLibrary": "priors",
    "BayesianDecoder": "schemes",
    "CountData": "data",
    "InputError": "errors",
    "TrainingError": "infer",
    "TrainingInterrupted": "infer",
    "ModelFileError": "io",
    "from_anndata": "data",
    "train_svi": "infer",
}
_SUBMODULES = (
    "convert",
    "data",
    "datasets",
    "de",
    "distributions",
    "distributed",
    "engine",
    "errors",
    "files",
    "gap",
    "guide",
    "infer",
    "io",
    "kernels",
    "likelihoods",
    "mcmc",
    "metrics",
    "model",
    "nn",
    "plotting",
    "posterior",
    "ppc",
    "priors",
    "schemes",
    "scvi",
    "tl",
)

__all__ = [*_NAMES, "convert", "datasets", "de", "engine", "kernels", "mcmc", "metrics"]
__all__ += ["posterior", "ppc", "plotting", "tl", "distributed", "files", "io", "schemes"]


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        value = getattr(importlib.import_module(f".{_NAMES[name]}", __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMES, *_SUBMODULES})


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import (  # noqa: F401
        convert,
        datasets,
        de,
        distributed,
        engine,
        files,
        io,
        kernels,
        mcmc,
        metrics,
        plotting,
        posterior,
        ppc,
        schemes,
        tl,
    )
    from .data import CountData, from_anndata  # noqa: F401
    from .engine import Engine  # noqa: F401
    from .errors import InputError  # noqa: F401
    from .guide import Guide, PerCellGuide, ScviGuide  # noqa: F401
    from .infer import TrainingError, TrainingInterrupted, train_svi  # noqa: F401
    from .io import ModelFileError  # noqa: F401
    from .likelihoods import NB, ZINB, ZIP, Likelihood, Poisson  # noqa: F401
    from .model import ScviModel  # noqa: F401
    from .priors import (  # noqa: F401
        LibraryPrior,
        LogNormalLibrary,
        MixtureOfGaussians,
        ObservedLibrary,
        Prior,
        StandardNormal,
        VampPrior,
    )
    from .schemes import BayesianDecoder  # noqa: F401
    from .scvi import SCVI  # noqa: F401
