"""Settings to modules: the one place where the model and guide of an SCVI are built.

:func:`build_components` turns settings (the dictionary a saved model keeps) and data into
a model and guide; :func:`new_components` first turns the arguments of
:class:`~pyro_scvi.SCVI` into those settings. Every way an SCVI comes into being builds
through :func:`build_components`: ``SCVI(...)``, :meth:`~pyro_scvi.SCVI.load` and
:meth:`~pyro_scvi.SCVI.load_checkpoint` (which then load the saved parameters), and
:meth:`~pyro_scvi.SCVI.load_query_data` (whose reference was built so, and which
:mod:`~pyro_scvi.model.surgery` then copies and widens).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.counts import CountData
from ..errors import InputError
from .generative import Dispersion, ScviModel
from .guides import GuideFactory, ScviGuide, build_guide
from .likelihoods import ZINB, Likelihood
from .priors import (
    ObservedLibrary,
    Prior,
    VampPrior,
    as_library_prior,
    as_prior,
    is_latent_library,
)
from .schemes import Scheme


@dataclass
class Components:
    """A model and guide set up on data, and the settings that describe them.

    Attributes
    ----------
    settings
        The architecture and the components' descriptions, as saved with the model
        (:data:`pyro_scvi.io.SETTINGS_KEYS`).
    data
        The counts the model is set up on.
    model, guide
        The Pyro model and guide.
    scheme
        The inference scheme of the global parameters (``None``: point estimates).
    """

    settings: dict[str, Any]
    data: CountData
    model: ScviModel
    guide: nn.Module
    scheme: Scheme | None = None


def check_arguments(
    n_latent: int, n_hidden: int, n_layers: int, dropout_rate: float, likelihood: Any
) -> None:
    """Raise :class:`~pyro_scvi.InputError` for an architecture or likelihood SCVI cannot use.

    Called before any data is read, so a typo costs nothing.

    Examples
    --------
    >>> check_arguments(n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1, likelihood=None)
    >>> check_arguments(10, 128, 1, 1.0, None)
    Traceback (most recent call last):
    ...
    pyro_scvi.errors.InputError: dropout_rate=1.0; it must be in [0, 1).
    """
    for name, value in [("n_latent", n_latent), ("n_hidden", n_hidden)]:
        if int(value) < 1:
            raise InputError(f"{name}={value}; it must be a positive integer.")
    if n_layers < 1:
        raise InputError(f"n_layers={n_layers}; use at least one hidden layer.")
    if not 0 <= dropout_rate < 1:
        raise InputError(f"dropout_rate={dropout_rate}; it must be in [0, 1).")
    if likelihood is not None and not isinstance(likelihood, Likelihood):
        raise InputError(
            f"likelihood={likelihood!r}: pass an object such as pyro_scvi.ZINB(), "
            "pyro_scvi.NB() or pyro_scvi.Poisson()."
        )


def library_object(
    library_prior: nn.Module | Callable | None,
    use_observed_lib_size: bool | None,
    loc: np.ndarray,
    scale: np.ndarray,
) -> nn.Module:
    """The library object of ``SCVI(library_prior=..., use_observed_lib_size=...)``.

    ``use_observed_lib_size`` is a thin alias, mapped here once: ``True`` stands for
    :class:`~pyro_scvi.model.priors.ObservedLibrary`, ``False`` insists on a latent library,
    ``None`` leaves it to ``library_prior``. A contradicting pair is an error.

    Examples
    --------
    >>> import numpy as np
    >>> library_object(None, True, np.zeros(1), np.ones(1))
    ObservedLibrary()
    """
    spec = library_prior
    if use_observed_lib_size and library_prior is None:
        spec = ObservedLibrary()
    library = as_library_prior(spec, torch.from_numpy(loc), torch.from_numpy(scale))
    if use_observed_lib_size is not None and bool(use_observed_lib_size) == is_latent_library(
        library
    ):
        raise InputError(
            f"use_observed_lib_size={use_observed_lib_size!r} contradicts "
            f"library_prior={library!r}, which makes the library "
            f"{'latent' if is_latent_library(library) else 'observed'}. Pass one of the two: "
            "library_prior=pyro_scvi.ObservedLibrary() is what use_observed_lib_size=True "
            "stands for, and any other library prior makes the library latent."
        )
    return library


def new_components(
    data: CountData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    likelihood: Likelihood | None = None,
    prior: Prior | Callable | None = None,
    library_prior: nn.Module | Callable | None = None,
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    dropout_rate: float = 0.1,
    dispersion: Dispersion = "gene",
    use_observed_lib_size: bool | None = None,
    guide: nn.Module | GuideFactory | None = None,
    scheme: Scheme | None = None,
    library_residual: bool | None = None,
) -> Components:
    """The components of a new model of ``data``, from the arguments of :class:`~pyro_scvi.SCVI`.

    The library prior starts at the data's per-batch log library size, and the default
    guide's q(l) at its mean; the settings record what each argument resolved to. The
    arguments are :class:`~pyro_scvi.SCVI`'s, documented there.

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=8))
    >>> parts = new_components(data, n_latent=2, n_hidden=8)
    >>> parts.settings["guide"], parts.settings["library_residual"], parts.model.n_latent
    ('ScviGuide', True, 2)
    """
    if dispersion == "gene-batch" and batch_key is None:
        # one dispersion per gene and batch with no batches would silently be per gene
        raise InputError(
            "dispersion='gene-batch' fits one dispersion per gene and batch and needs "
            "batch_key=...; without batches use dispersion='gene'."
        )
    loc, scale = data.library_log_stats()
    prior = as_prior(prior)
    library = library_object(library_prior, use_observed_lib_size, loc, scale)
    applies = guide is None and is_latent_library(library)
    if library_residual and not applies:
        raise InputError(
            "library_residual=True centres the default guide's q(l), but "
            + ("guide= replaces that guide" if guide is not None else "the library is observed")
            + "; drop library_residual, or use the default guide with a latent library."
        )
    settings = {
        "layer": layer,
        "batch_key": batch_key,
        "n_latent": int(n_latent),
        "n_hidden": int(n_hidden),
        "n_layers": int(n_layers),
        "dropout_rate": float(dropout_rate),
        "dispersion": dispersion,
        "use_observed_lib_size": not is_latent_library(library),
        "library_residual": applies if library_residual is None else bool(library_residual),
        "likelihood": repr(likelihood or ZINB()),
        "prior": repr(prior),
    }
    parts = build_components(
        settings,
        data,
        library_prior=library,
        prior=prior,
        likelihood=likelihood,
        guide=guide,
        l_loc_init=float(np.mean(loc)),
        scheme=scheme,
    )
    settings["scheme"] = repr(scheme)
    settings["guide"] = type(parts.guide).__name__
    return parts


def build_components(
    settings: dict[str, Any],
    data: CountData,
    *,
    library_prior: nn.Module | Callable,
    prior: nn.Module,
    likelihood: Likelihood | None,
    guide: nn.Module | GuideFactory | None,
    l_loc_init: float = 0.0,
    scheme: Scheme | None = None,
    restore: bool = False,
) -> Components:
    """The model and guide that ``settings`` describe, set up for ``data``.

    The components that settings name only by ``repr`` (library prior, prior, likelihood,
    a guide other than the default) come as objects. ``guide=None`` is the default
    :class:`~pyro_scvi.model.guides.ScviGuide`, with ``q(l)`` starting at ``l_loc_init``.
    A :class:`~pyro_scvi.model.priors.VampPrior` is wired to the guide's z encoder. An
    inference ``scheme`` (e.g. :class:`~pyro_scvi.model.schemes.BayesianDecoder`) then
    changes the model and wraps the guide; with ``restore`` the guide is a saved one that
    already holds the scheme's part, so only the model is changed.

    Parameters
    ----------
    settings
        ``n_latent``, ``n_hidden``, ``n_layers``, ``dropout_rate``, ``dispersion`` and
        (optionally) ``library_residual``; kept in the result as they are.
    data
        The counts: their genes and batches size the networks.
    library_prior, prior, likelihood, guide, scheme
        The components' objects.
    l_loc_init
        Where the default guide's q(l) starts.
    restore
        Whether ``guide`` is a saved guide that already holds the scheme's part.

    Returns
    -------
    Components
        ``settings``, ``data``, the model, the guide and the scheme.

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=8))
    >>> arch = dict(n_latent=2, n_hidden=8, n_layers=1, dropout_rate=0.1, dispersion="gene")
    >>> parts = build_components(arch, data, library_prior=pyro_scvi.ObservedLibrary(),
    ...                          prior=pyro_scvi.StandardNormal(), likelihood=None, guide=None)
    >>> type(parts.guide).__name__, parts.guide.l_encoder is None
    ('ScviGuide', True)
    """
    arch = {k: int(settings[k]) for k in ("n_latent", "n_hidden", "n_layers")}
    model = ScviModel(
        data.n_genes,
        data.n_batch,
        library_prior,
        prior=prior,
        likelihood=likelihood,
        dispersion=settings["dispersion"],
        **arch,
    )
    if guide is None:
        guide = ScviGuide(
            data.n_genes,
            data.n_batch,
            dropout_rate=float(settings["dropout_rate"]),
            library=model.library_prior,
            l_loc_init=l_loc_init,
            # saves from before the option hold no key: the paper's guide
            library_residual=bool(settings.get("library_residual", False)),
            **arch,
        )
    else:
        try:
            guide = build_guide(
                guide, data, n_latent=arch["n_latent"], library=model.library_prior
            )
        except (TypeError, ValueError) as err:
            raise InputError(str(err)) from err
    if isinstance(model.prior, VampPrior):
        _attach_vamp_prior(model.prior, guide, data)
    if scheme is not None:
        if restore:
            scheme.setup_model(model)
        else:
            try:
                guide = scheme.setup(model, guide)
            except (TypeError, ValueError) as err:
                raise InputError(str(err)) from err
    return Components(settings, data, model, guide, scheme)


def reset_parameters(*modules: nn.Module) -> None:
    """Re-initialize every submodule of ``modules`` that can (from torch's random state).

    Examples
    --------
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> _ = torch.manual_seed(0); reset_parameters(layer); first = layer.weight.clone()
    >>> _ = torch.manual_seed(0); reset_parameters(layer); torch.equal(first, layer.weight)
    True
    """
    for module in modules:
        # children first, so a parent's own reset_parameters (e.g. the guide's q(l)
        # initialization) has the last word
        for m in reversed(list(module.modules())):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _attach_vamp_prior(prior: VampPrior, guide: nn.Module, data: CountData) -> None:
    """Give a VampPrior the guide's z encoder and pseudo-inputs at random cells' log1p counts.

    Each pseudo-input takes the batch of its cell. The seed is fixed: the pseudo-inputs are
    set up from the data, like the library prior, not drawn by training's randomness. A
    prior that has pseudo-inputs (loaded, or reused) keeps them.
    """
    encoder = getattr(guide, "z_encoder", None)
    if encoder is None:
        raise InputError(
            "VampPrior needs an amortized guide with a z encoder (guide.z_encoder); "
            f"{type(guide).__name__} has none."
        )
    if hasattr(prior, "pseudo_inputs"):
        prior.attach_encoder(encoder)
        return
    n, k = data.n_cells, prior.n_components
    cells = np.sort(np.random.default_rng(0).choice(n, size=k, replace=n < k))
    x, b = data.tensors(cells)
    prior.attach_encoder(encoder, torch.log1p(x), b)
