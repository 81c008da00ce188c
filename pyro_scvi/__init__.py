"""pyro_scvi: scVI (Lopez et al., 2018) as a Pyro model and guide.

Quick start::

    import pyro_scvi
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    model = pyro_scvi.SCVI(adata).train(max_epochs=50)
    adata.obsm["X_pyro_scvi"] = model.get_latent_representation()

The subpackages follow the pipeline, and each imports only from those before it:
:mod:`~pyro_scvi.data` → :mod:`~pyro_scvi.model` → :mod:`~pyro_scvi.train` →
:mod:`~pyro_scvi.posterior` → :mod:`~pyro_scvi.io` → :mod:`~pyro_scvi.analysis` → the
facade (:class:`SCVI`, :mod:`~pyro_scvi.tl`) → :mod:`~pyro_scvi.cli`.

Names are imported on first use (PEP 562), so ``import pyro_scvi`` and ``pyro-scvi
--help`` do not pay for torch and Pyro until something needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _moved
from ._lazy import attach
from ._version import __version__

#: public name -> the module defining it
_NAMES = {
    "SCVI": "scvi",
    "Engine": "train.engine",
    "ScviModel": "model",
    "ScviGuide": "model",
    "PerCellGuide": "model",
    "FullCovarianceGuide": "model",
    "FlowGuide": "model",
    "Guide": "model",
    "Likelihood": "model",
    "ZINB": "model",
    "NB": "model",
    "Poisson": "model",
    "ZIP": "model",
    "Prior": "model",
    "StandardNormal": "model",
    "MixtureOfGaussians": "model",
    "VampPrior": "model",
    "LibraryPrior": "model",
    "LogNormalLibrary": "model",
    "ObservedLibrary": "model",
    "BayesianDecoder": "model.schemes",
    "CountData": "data",
    "from_anndata": "data",
    "InputError": "errors",
    "TrainingError": "errors",
    "TrainingInterrupted": "errors",
    "TrainingWarning": "errors",
    "ModelFileError": "errors",
    "train_svi": "train.loop",
}
_SUBPACKAGES = ("data", "model", "train", "posterior", "io", "analysis", "cli")
_FACADE = ("scvi", "tl", "errors")

__all__ = [*_NAMES, *_SUBPACKAGES, "__version__", "datasets", "tl"]

_getattr, __dir__ = attach(__name__, submodules=(*_SUBPACKAGES, *_FACADE), names=_NAMES)
_moved.install()


def __getattr__(name: str) -> Any:
    if _moved.new_home(f"{__name__}.{name}") is not None:  # an old path, or datasets
        value = _moved.resolve(f"{__name__}.{name}")
        if name in _moved.ALIASES:
            globals()[name] = value  # a public alias: later lookups skip this function
        return value
    return _getattr(name)


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import analysis, cli, data, io, model, posterior, scvi, tl, train  # noqa: F401
    from .data import CountData, datasets, from_anndata  # noqa: F401
    from .errors import (  # noqa: F401
        InputError,
        ModelFileError,
        TrainingError,
        TrainingInterrupted,
        TrainingWarning,
    )
    from .model import (  # noqa: F401
        NB,
        ZINB,
        ZIP,
        FlowGuide,
        FullCovarianceGuide,
        Guide,
        LibraryPrior,
        Likelihood,
        LogNormalLibrary,
        MixtureOfGaussians,
        ObservedLibrary,
        PerCellGuide,
        Poisson,
        Prior,
        ScviGuide,
        ScviModel,
        StandardNormal,
        VampPrior,
    )
    from .model.schemes import BayesianDecoder  # noqa: F401
    from .scvi import SCVI  # noqa: F401
    from .train.engine import Engine  # noqa: F401
    from .train.loop import train_svi  # noqa: F401
