"""The user-facing :class:`SCVI`: AnnData in, trained model and posterior queries out.

Method names follow scvi-tools, so its users feel at home; underneath, ``SCVI.model`` and
``SCVI.guide`` are a plain Pyro model and guide that can be run under any poutine handler
or SVI loop.
"""

from __future__ import annotations

import copy
import hashlib
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyro
import scipy.sparse as sp
import torch
from anndata import AnnData
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from .data.counts import CountData, check_batch_sizes, from_anndata, nonempty_cells
from .errors import InputError, ModelFileError, TrainingError, TrainingInterrupted
from .io.files import check_free_space, check_output_dir, make_temp_dir, replace_dir
from .io.model_dir import is_model_dir, new_run_id, read_model_dir, write_model_dir
from .model.generative import Dispersion, ScviModel
from .model.guides import GuideFactory, ScviGuide, build_guide
from .model.likelihoods import ZINB, Likelihood
from .model.nn import eval_mode
from .model.priors import (
    LogNormalLibrary,
    ObservedLibrary,
    Prior,
    VampPrior,
    as_library_prior,
    as_prior,
    is_latent_library,
)
from .model.schemes import Scheme
from .posterior import queries as posterior
from .posterior.gap import amortization_gap
from .train.engine import Engine
from .train.loop import HISTORY_COLUMNS, TrainState, stop_on_signals, train_svi


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; other values pass to ``torch.device``."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return device


def _reset_parameters(*modules: torch.nn.Module) -> None:
    for module in modules:
        # children first, so a parent's own reset_parameters (e.g. the guide's q(l)
        # initialization) has the last word
        for m in reversed(list(module.modules())):
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if int(value) < 1:
            raise InputError(f"{name}={value}; it must be a positive integer.")


def _attach_vamp_prior(prior: VampPrior, guide: torch.nn.Module, data: CountData) -> None:
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


def _library_object(
    library_prior: torch.nn.Module | Callable | None,
    use_observed_lib_size: bool | None,
    loc: np.ndarray,
    scale: np.ndarray,
) -> torch.nn.Module:
    """The library object of ``SCVI(library_prior=..., use_observed_lib_size=...)``.

    ``use_observed_lib_size`` is a thin alias, mapped here once: ``True`` stands for
    :class:`~pyro_scvi.model.priors.ObservedLibrary`, ``False`` insists on a latent library,
    ``None`` leaves it to ``library_prior``. A contradicting pair is an error.
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


def _build_components(
    settings: dict,
    data: CountData,
    *,
    library_prior: torch.nn.Module | Callable,
    prior: torch.nn.Module,
    likelihood: Likelihood | None,
    guide: torch.nn.Module | GuideFactory | None,
    l_loc_init: float = 0.0,
    scheme: Scheme | None = None,
    restore: bool = False,
) -> tuple[ScviModel, torch.nn.Module]:
    """The model and guide that ``settings`` describe, set up for ``data``.

    The one place settings become modules: :class:`SCVI` builds with it, and
    :meth:`SCVI.load` and :meth:`SCVI.load_checkpoint` rebuild with it (then load the saved
    parameters); a query model (:meth:`SCVI.load_query_data`) copies the reference's. The
    components that settings name only by ``repr`` (library prior, prior, likelihood, a
    guide other than the default) come as objects. ``guide=None`` is the default
    :class:`~pyro_scvi.model.guides.ScviGuide`, with ``q(l)`` starting at ``l_loc_init``.
    An inference ``scheme`` (e.g. :class:`~pyro_scvi.model.schemes.BayesianDecoder`) then changes
    the model and wraps the guide; with ``restore`` the guide is a saved one that already
    holds the scheme's part, so only the model is changed.
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
    return model, guide


def _gene_columns(data: CountData, gene_list: Sequence[str] | None) -> np.ndarray | None:
    """Column positions of ``gene_list`` in ``data`` (``None``: all genes), or an InputError."""
    if gene_list is None:
        return None
    unknown = [g for g in gene_list if g not in data.var_names]
    if unknown:
        raise InputError(f"gene_list has genes the model does not know: {unknown[:5]}.")
    return data.var_names.get_indexer(list(gene_list))


def _warn_unimportable(model: SCVI) -> None:
    """Warn when a saved component's class or function lives in ``__main__``."""
    from .io.pickling import main_module_names

    pickled = [model.model.prior, model.model.library_prior, model.model.likelihood]
    pickled.append(getattr(model, "scheme", None))
    if type(model.guide) is not ScviGuide:
        pickled.append(model.guide)
    names = main_module_names(pickled)
    if names:
        warnings.warn(
            f"The model is saved, but {', '.join(names)} is defined in __main__ (a script, "
            "notebook or `python -c`), so no other process can load it: pickle stores it by "
            "module and name. Move it to a module you can import (e.g. my_priors.py) and "
            "import it from there before saving.",
            UserWarning,
            stacklevel=3,
        )


class SCVI:
    """scVI (Lopez et al., 2018) fitted by stochastic variational inference in Pyro.

    Parameters
    ----------
    adata
        AnnData of raw counts (cells x genes). It is only read, never modified.
    layer
        Layer holding the raw counts; ``None`` uses ``adata.X``.
    batch_key
        Column of ``adata.obs`` with each cell's batch; ``None`` for one batch.
    likelihood
        Observation model object; default :class:`~pyro_scvi.model.likelihoods.ZINB`.
    prior
        Prior on ``z``; default :class:`~pyro_scvi.model.priors.StandardNormal`. Also
        :class:`~pyro_scvi.model.priors.MixtureOfGaussians`,
        :class:`~pyro_scvi.model.priors.VampPrior`
        (wired here to this model's encoder), your own :class:`~pyro_scvi.model.priors.Prior`,
        or any callable returning a Pyro distribution with ``event_shape (n_latent,)``.
    library_prior
        Prior on the log-library ``l``: an ``nn.Module`` called with the cells' batch
        codes, or a factory called with the data's per-batch ``(loc, scale)`` of the log
        library size that returns one; default
        :class:`~pyro_scvi.model.priors.LogNormalLibrary` at those values. See
        :func:`~pyro_scvi.model.priors.as_library_prior`.
        :class:`~pyro_scvi.model.priors.ObservedLibrary`
        makes ``l`` the observed log total count instead (no ``l`` to guide).
    n_latent, n_hidden, n_layers, dropout_rate
        Architecture (paper defaults 10, 128, 1, 0.1).
    dispersion
        ``"gene"``, ``"gene-batch"`` or ``"gene-cell"``.
    use_observed_lib_size
        A thin alias kept for scvi-tools users: ``True`` stands for
        ``library_prior=pyro_scvi.ObservedLibrary()`` (plug in the observed library size
        instead of the latent ``l`` of the paper), ``False`` insists on a latent library,
        ``None`` (default) leaves it to ``library_prior``. A ``library_prior`` that
        contradicts it is an ``InputError``. ``settings["use_observed_lib_size"]`` records
        which the model has.
    drop_empty_cells
        Set the model up on the cells with non-zero total counts only (``self.adata`` is
        then a view of those cells); otherwise such cells are an error.
    guide
        The variational family; default the amortized
        :class:`~pyro_scvi.model.guides.ScviGuide`. A guide module with the model's signature, or
        a factory ``f(data, n_latent=..., library=...)`` returning one (``library``: the
        model's library object), e.g.
        ``guide=PerCellGuide.from_data`` for non-amortized per-cell mean-field inference
        (then train with ``train_size=1.0``; queries answer for the training cells only).
    streamed
        For a backed AnnData (``anndata.read_h5ad(path, backed="r")``): read the counts
        from the file as training goes (:class:`~pyro_scvi.data.StreamedCounts`) instead
        of loading them; ``None`` lets the engine decide from their size and the free
        memory (:func:`pyro_scvi.data.placement.choose_data_source`).
    library_residual
        Centre the default guide's q(l) on each cell's observed log library size, so its
        encoder learns only the residual (:class:`~pyro_scvi.model.guides.ScviGuide`). ``None``
        (default): on wherever it applies, the default guide with a latent library;
        ``False``: the paper's guide, whose encoder outputs the whole mean of q(l) (the
        default before 2026-11-30; ``benchmarks/library_residual.py`` compares the two).
        The model is the same either way. ``True`` with an observed library or a guide
        of your own is an ``InputError``. ``settings["library_residual"]`` records which
        the model has.
    scheme
        How the global parameters are inferred; default ``None``, point estimates of the
        decoder and ``theta``. :class:`~pyro_scvi.model.schemes.BayesianDecoder` puts a prior and
        a Normal posterior on the decoder's output layer and ``theta`` instead.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=30, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=4)
    >>> model = model.train(max_epochs=2, progress_bar=False)
    >>> model.get_latent_representation().shape
    (200, 4)

    The observed library size, as an object or by its scvi-tools name:

    >>> observed = pyro_scvi.SCVI(adata, library_prior=pyro_scvi.ObservedLibrary())
    >>> observed.model.library_prior, observed.settings["use_observed_lib_size"]
    (ObservedLibrary(), True)
    >>> pyro_scvi.SCVI(adata, use_observed_lib_size=True).model.library_prior
    ObservedLibrary()
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        likelihood: Likelihood | None = None,
        prior: Prior | Callable | None = None,
        library_prior: torch.nn.Module | Callable | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: Dispersion = "gene",
        use_observed_lib_size: bool | None = None,
        drop_empty_cells: bool = False,
        guide: torch.nn.Module | GuideFactory | None = None,
        streamed: bool | None = None,
        scheme: Scheme | None = None,
        library_residual: bool | None = None,
    ) -> None:
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
        if drop_empty_cells:
            keep = nonempty_cells(adata, layer)
            adata = adata[keep] if not keep.all() else adata
        self.adata = adata
        self.layer, self.batch_key = layer, batch_key
        self.data = from_anndata(adata, layer=layer, batch_key=batch_key, streamed=streamed)
        loc, scale = self.data.library_log_stats()
        prior = as_prior(prior)
        library = _library_object(library_prior, use_observed_lib_size, loc, scale)
        applies = guide is None and is_latent_library(library)
        if library_residual and not applies:
            raise InputError(
                "library_residual=True centres the default guide's q(l), but "
                + (
                    "guide= replaces that guide"
                    if guide is not None
                    else "the library is observed"
                )
                + "; drop library_residual, or use the default guide with a latent library."
            )
        self.settings = {
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
        self.model, self.guide = _build_components(
            self.settings,
            self.data,
            library_prior=library,
            prior=prior,
            likelihood=likelihood,
            guide=guide,
            l_loc_init=float(np.mean(loc)),
            scheme=scheme,
        )
        #: The inference scheme (``None``: point-estimated globals).
        self.scheme = scheme
        self.settings["scheme"] = repr(scheme)
        self.settings["guide"] = type(self.guide).__name__
        self.device = torch.device("cpu")
        self.history = pd.DataFrame(columns=HISTORY_COLUMNS)
        #: How the last training run stepped (:meth:`pyro_scvi.train.engine.RunEngine.as_dict`).
        self.engine: dict | None = None
        self.train_indices = np.arange(0)
        self.validation_indices = np.arange(0)
        self.is_trained = False
        # what continues training (train() again, resume()): see pyro_scvi.train.loop.TrainState
        self._train_state: TrainState | None = None
        self._run: dict | None = None
        #: The manifest of the folder this model was loaded from (``None``: not loaded).
        self.manifest: dict | None = None

    @classmethod
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: SCVI | str | os.PathLike,
        *,
        streamed: bool | None = None,
    ) -> SCVI:
        """A model of new batches mapped onto a trained reference (scArches-style).

        The query's batches are appended to the reference's; every reference weight is
        fixed, and only the weights the new batches feed (their columns of each network's
        first layer) train, so the reference cells' latent space and decoding are exactly
        the reference's. See :mod:`pyro_scvi.query` for the surgery and its reference.

        Parameters
        ----------
        adata
            The query's raw counts: the reference's genes, in order, and its ``batch_key``
            column, with at least one batch the reference does not know.
        reference_model
            A trained :class:`SCVI` set up with a ``batch_key``, or the directory it was
            saved to. It is not modified.
        streamed
            For a backed ``adata``: stream its counts from the file (``None``: the engine
            decides), as in :class:`SCVI`.

        Returns
        -------
        SCVI
            A model of ``adata``'s cells; call :meth:`train` on it, then query it as any
            model (the reference's batches stay valid for ``transform_batch``). Saved,
            it loads as an ordinary model of all the batches.

        Examples
        --------
        >>> import numpy as np, pyro_scvi
        >>> sim = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=20, n_batches=3)
        >>> is_query = (sim.obs["batch"] == "batch2").to_numpy()
        >>> ref, query = sim[~is_query].copy(), sim[is_query].copy()
        >>> reference = pyro_scvi.SCVI(ref, batch_key="batch", n_latent=2, n_hidden=16)
        >>> reference = reference.train(max_epochs=2, progress_bar=False)
        >>> mapped = pyro_scvi.SCVI.load_query_data(query, reference)
        >>> mapped = mapped.train(max_epochs=2, progress_bar=False)
        >>> mapped.batch_categories, [n for n, _ in mapped.guide.named_parameters()][:1]
        (('batch0', 'batch1', 'batch2'), ['z_encoder.body.0.weight_new'])
        >>> bool(np.allclose(mapped.get_latent_representation(ref),
        ...                  reference.get_latent_representation(ref), atol=1e-6))
        True
        """
        from .query import load_query_data

        return load_query_data(cls, adata, reference_model, streamed=streamed)

    # ------------------------------------------------------------------ properties
    @property
    def var_names(self) -> pd.Index:
        """Genes the model was set up with, in order."""
        return self.data.var_names

    @property
    def batch_categories(self) -> tuple[str, ...]:
        """Batches the model knows, in code order."""
        return self.data.batch_categories

    @property
    def heldout_adata(self) -> AnnData:
        """The cells :meth:`train` held out for validation, as a view of :attr:`adata`.

        Empty before training or with ``train_size=1``. A view costs no memory; call
        ``.copy()`` on it before writing to it.

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=50, n_genes=10, seed=0)
        >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> model = model.train(max_epochs=1, train_size=0.8, progress_bar=False)
        >>> model.heldout_adata.n_obs
        10
        """
        return self.adata[self.validation_indices]

    def __repr__(self) -> str:
        d = self.data
        return (
            f"SCVI({d.n_cells} cells x {d.n_genes} genes, {d.n_batch} batch(es), "
            f"likelihood={self.settings['likelihood']}, prior={self.settings['prior']}, "
            f"n_latent={self.settings['n_latent']}, trained={self.is_trained})"
        )

    # ------------------------------------------------------------------ training
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        early_stopping: bool = False,
        patience: int = 45,
        kl_warmup_epochs: int = 400,
        elbo: ELBO | None = None,
        optim: PyroOptim | None = None,
        engine: Engine | str | None = None,
        device: str | torch.device = "auto",
        seed: int | None = 0,
        progress_bar: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
    ) -> SCVI:
        """Fit the model with SVI (Adam) on minibatches; see :mod:`pyro_scvi.train.loop`.

        Calling ``train`` again continues the same run: the epochs, KL warm-up, Adam's
        moments, the minibatch order and the random streams go on where they stopped, so
        ``train(2); train(3)`` is ``train(5)`` (with the same engine). SIGINT (Ctrl-C) or
        SIGTERM stop it cleanly after the step in progress.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; default ``min(400, round(400 * 20000 / n_cells))``
            as in scvi-tools.
        batch_size, lr
            Cells per minibatch and Adam's learning rate.
        train_size
            Fraction of cells to train on; the rest give the validation ELBO. Fixed by the
            first run.
        early_stopping, patience
            Stop when the validation ELBO has not improved for ``patience`` epochs.
        kl_warmup_epochs
            Epochs of linear KL warm-up (0: none).
        elbo, optim
            Pyro ELBO (default ``Trace_ELBO``, compiled on long runs by the engine) and
            optimizer (default: Adam with scvi-tools' settings, as one fused torch
            optimizer; see :class:`pyro_scvi.train.loop.FusedAdam`). A ``pyro.optim`` optimizer
            runs through :class:`pyro.infer.SVI` instead.
        engine
            How the run steps: compiled or eager ELBO, fused ZINB kernel, fused Adam, CPU
            threads (:class:`pyro_scvi.train.engine.Engine` or a preset name such as ``"eager"``;
            default: decided from the run, see :mod:`pyro_scvi.train.engine`). The choice made
            is in :attr:`engine` and ``history.attrs["engine"]``, and is saved.
        device
            ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        seed
            Seeds a new run: the split, the initial parameters, the minibatch order and
            Pyro; CPU runs are then reproducible. A continued run keeps its own streams.
        progress_bar
            Show a progress bar.
        checkpoint_dir, checkpoint_every
            Write a checkpoint (a model folder plus the training state; see
            :mod:`pyro_scvi.io`) to ``checkpoint_dir`` every ``checkpoint_every`` epochs
            (0: never) and when the run is interrupted. :meth:`load_checkpoint` and
            :meth:`resume` continue from it.

        Returns
        -------
        SCVI
            ``self``, with :attr:`history` extended by one row per epoch.

        Raises
        ------
        pyro_scvi.TrainingError
            On a non-finite loss; the parameters of the last complete epoch are kept (none
            completed: the model stays untrained, ``is_trained`` False).
        pyro_scvi.TrainingInterrupted
            On SIGINT or SIGTERM, after the step in progress and the checkpoint; the model
            holds the parameters of that step (usable for queries), and :meth:`resume`
            or ``train`` continue.

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=10, seed=0)
        >>> import numpy as np
        >>> a, b = (pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8) for _ in range(2))
        >>> kw = dict(progress_bar=False, engine=pyro_scvi.Engine(threads=1))
        >>> _ = a.train(1, **kw).train(2, **kw)  # in two calls
        >>> _ = b.train(3, **kw)  # in one
        >>> np.array_equal(a.get_latent_representation(), b.get_latent_representation())
        True
        """
        n = self.data.n_cells
        if max_epochs is None:
            max_epochs = int(min(400, round(400 * 20000 / n)))
        if max_epochs < 1:
            raise InputError(f"max_epochs={max_epochs}; train for at least one epoch.")
        if lr <= 0:
            raise InputError(f"lr={lr}; the learning rate must be positive.")
        if not 0 < train_size <= 1:
            raise InputError(f"train_size={train_size}; it must be in (0, 1].")
        if train_size < 1 and not getattr(self.guide, "amortized", True):
            raise InputError(
                f"train_size={train_size}, but a {type(self.guide).__name__} fits parameters "
                "per cell and cannot score validation cells it is not trained on; pass "
                "train_size=1.0 (held-out cells: pyro_scvi.posterior.gap.refine)."
            )
        if checkpoint_every < 0:
            raise InputError(f"checkpoint_every={checkpoint_every}; use 0 (never) or more.")
        check_batch_sizes(self.data, batch_size)
        if checkpoint_dir is not None:
            check_output_dir(checkpoint_dir, owned=is_model_dir, what="checkpoint folder")
            check_free_space({checkpoint_dir: self._checkpoint_bytes()})
        continuing = self._train_state is not None
        if not continuing:
            if seed is not None:
                pyro.set_rng_seed(seed)
            if not self.is_trained:
                if seed is not None and getattr(self, "_reset_on_first_train", True):
                    # Initialize the networks from the seed too, so a fresh model trained
                    # with the same seed gives the same result whatever ran before it (a
                    # query model keeps its reference's weights).
                    _reset_parameters(self.model, self.guide)
                perm = np.random.default_rng(seed).permutation(n)
                n_train = max(2, int(round(train_size * n)))
                if n_train > n:
                    raise InputError(f"Only {n} cells: training needs at least 2.")
                self.train_indices = np.sort(perm[:n_train])
                self.validation_indices = np.sort(perm[n_train:])
        state = self._train_state or TrainState.new(seed)
        self.device = resolve_device(device)
        self.model.to(self.device), self.guide.to(self.device)
        first_epoch = int(self.history["epoch"].iloc[-1]) + 1 if len(self.history) else 0
        self._run = {
            "target_epoch": first_epoch + int(max_epochs),
            "batch_size": int(batch_size),
            "lr": float(lr),
            "train_size": float(train_size),
            "early_stopping": bool(early_stopping),
            "patience": int(patience),
            "kl_warmup_epochs": int(kl_warmup_epochs),
            "elbo": None if elbo is None else type(elbo).__name__,
            "optim": None if optim is None else type(optim).__name__,
            "engine": None,
            "checkpoint_dir": None if checkpoint_dir is None else str(checkpoint_dir),
            "checkpoint_every": int(checkpoint_every),
        }

        def write_checkpoint(state: TrainState, history: pd.DataFrame) -> str:
            self._run["engine"] = history.attrs.get("engine")
            merged = self._merged_history(history)
            extra = {"state": state.to_dict(), "run": dict(self._run), "data": self._fingerprint()}
            tmp = self._stage(
                checkpoint_dir,
                history=merged,
                is_trained=self.is_trained or bool(len(history)),
                train_state=extra,
            )
            replace_dir(tmp, checkpoint_dir, owned=is_model_dir)
            return str(checkpoint_dir)

        # A private parameter store: two SCVI objects in one process would otherwise
        # share Pyro's global store and silently train each other's parameters.
        with pyro.get_param_store().scope(), stop_on_signals() as stop:
            try:
                history = train_svi(
                    self.model,
                    self.guide,
                    self.data,
                    self.train_indices,
                    self.validation_indices,
                    max_epochs=max_epochs,
                    batch_size=min(batch_size, len(self.train_indices)),
                    optim=optim,
                    lr=lr,
                    elbo=elbo,
                    engine=engine,
                    kl_warmup_epochs=kl_warmup_epochs,
                    early_stopping=early_stopping,
                    patience=patience,
                    device=self.device,
                    seed=seed,
                    progress_bar=progress_bar,
                    first_epoch=first_epoch,
                    state=state,
                    checkpoint=write_checkpoint if checkpoint_dir is not None else None,
                    checkpoint_every=checkpoint_every,
                    stop=stop,
                )
            except TrainingError as err:
                # the parameters are those of the last complete epoch: keep its history too;
                # the optimizer's and streams' state ran past them, so a next train() starts
                # those afresh
                self._append_history(err.history)
                self._train_state, self._run = None, None
                raise
            except TrainingInterrupted as err:
                self._append_history(err.history)
                self._train_state = state
                self._run["engine"] = self.engine
                raise
        self._append_history(history)
        self._train_state, self._run = state, None
        return self

    def resume(
        self,
        *,
        elbo: ELBO | None = None,
        optim: PyroOptim | None = None,
        device: str | torch.device = "auto",
        progress_bar: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int | None = None,
    ) -> SCVI:
        """Finish an interrupted run: its remaining epochs, with its own settings.

        After :class:`~pyro_scvi.TrainingInterrupted` in this process, or on a model
        from :meth:`load_checkpoint`. The result equals the run that was never
        interrupted: on CPU with the same threads and an uncompiled engine, bit for bit;
        a compiled ELBO is recompiled, which may change the last bits.

        Parameters
        ----------
        elbo, optim
            Pass again the ELBO or optimizer the run was started with, if it was not the
            default (they are objects, not saved).
        device
            Where to train.
        progress_bar
            Show a progress bar.
        checkpoint_dir, checkpoint_every
            Default: as the interrupted run.
        """
        run = self._run
        if run is None or self._train_state is None:
            raise InputError(
                "Nothing to resume: this model has no interrupted training run (call train(), "
                "or load one with SCVI.load_checkpoint)."
            )
        for name, given in (("elbo", elbo), ("optim", optim)):
            if run[name] is not None and type(given).__name__ != run[name]:
                raise InputError(
                    f"The run was started with {name}={run[name]}(); pass {name}= a new "
                    f"{run[name]} with the same settings to resume it."
                )
        first_epoch = int(self.history["epoch"].iloc[-1]) + 1 if len(self.history) else 0
        remaining = run["target_epoch"] - first_epoch
        if remaining < 1:
            self._run = None
            return self
        engine = Engine.for_resume(
            run["engine"], elbo_passed=elbo is not None, optim_passed=optim is not None
        )
        folder = checkpoint_dir if checkpoint_dir is not None else run["checkpoint_dir"]
        return self.train(
            remaining,
            batch_size=run["batch_size"],
            lr=run["lr"],
            train_size=run["train_size"],
            early_stopping=run["early_stopping"],
            patience=run["patience"],
            kl_warmup_epochs=run["kl_warmup_epochs"],
            elbo=elbo,
            optim=optim,
            engine=engine,
            device=device,
            progress_bar=progress_bar,
            checkpoint_dir=folder,
            checkpoint_every=run["checkpoint_every"]
            if checkpoint_every is None
            else checkpoint_every,
        )

    @property
    def interrupted(self) -> bool:
        """Whether the model holds an interrupted training run that :meth:`resume` finishes."""
        return self._run is not None and self._train_state is not None

    def _merged_history(self, history: pd.DataFrame) -> pd.DataFrame:
        if not len(history):
            return self.history
        merged = (
            pd.concat([self.history, history], ignore_index=True) if len(self.history) else history
        )
        merged.attrs.update(
            engine=history.attrs.get("engine"),
            engines=[*self.history.attrs.get("engines", []), history.attrs.get("engine")],
        )
        return merged

    def _fingerprint(self) -> dict:
        """What a checkpoint checks the data against: the cells, in order, and the counts."""
        names = "\n".join(map(str, self.data.obs_names)).encode()
        return {
            "n_cells": int(self.data.n_cells),
            "obs_names_sha256": hashlib.sha256(names).hexdigest(),
            # from each cell's total: streamed counts have no X in memory
            "total_counts": float(self.data.total_counts().sum()),
        }

    def _append_history(self, history: pd.DataFrame | None) -> None:
        if history is None:
            return
        if "engine" in history.attrs:
            self.engine = history.attrs["engine"]
        if not len(history):
            return
        runs = [*self.history.attrs.get("engines", []), history.attrs.get("engine")]
        self.history = (
            pd.concat([self.history, history], ignore_index=True) if len(self.history) else history
        )
        # the last run's engine, and every run's in order (train() may be called again)
        self.history.attrs.update(engine=self.engine, engines=runs)
        self.is_trained = True

    # ------------------------------------------------------------------ queries
    def data_for(self, adata: AnnData | None = None) -> CountData:
        """The counts of ``adata`` (default: the model's cells) coded as the model codes them.

        ``adata`` needs the model's genes, in order, and only batches it knows. This is
        the :class:`pyro_scvi.posterior.fitted.Fitted` contract the analyses rely on.
        """
        if adata is None or adata is self.adata:
            return self.data
        if not getattr(self.guide, "amortized", True):
            raise InputError(
                f"The {type(self.guide).__name__} has parameters only for the model's own "
                f"{self.data.n_cells} cells; query those with adata=None, or score other "
                "cells with an amortized guide or with SCVI.get_amortization_gap's refined "
                "per-cell fit."
            )
        return from_anndata(
            adata,
            layer=self.layer,
            batch_key=self.batch_key,
            batch_categories=self.batch_categories,
            var_names=self.var_names,
            allow_empty_cells=True,
        )

    def _batch_codes(self, transform_batch) -> list[int] | None:
        if transform_batch is None:
            return None
        names = [transform_batch] if isinstance(transform_batch, str | int) else transform_batch
        codes = []
        for name in names:
            if str(name) not in self.batch_categories:
                raise InputError(
                    f"transform_batch={name!r} is not a known batch "
                    f"(known: {list(self.batch_categories)})."
                )
            codes.append(self.batch_categories.index(str(name)))
        return codes

    def get_latent_representation(
        self,
        adata: AnnData | None = None,
        *,
        give_mean: bool = True,
        n_samples: int = 1,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Latent ``z`` of each cell: posterior mean, or posterior samples.

        Parameters
        ----------
        adata
            Cells to embed (default: the training AnnData); needs the model's genes.
        give_mean
            Return the mean of q(z | x); otherwise ``n_samples`` draws from it.
        n_samples
            Draws when ``give_mean`` is false.
        batch_size
            Cells per forward pass.

        Returns
        -------
        numpy.ndarray
            ``(cells, n_latent)``, or ``(n_samples, cells, n_latent)`` when sampling.
            Store it as ``adata.obsm["X_pyro_scvi"]``.
        """
        data = self.data_for(adata)
        idx = np.arange(data.n_cells)
        if give_mean:
            return posterior.latent_mean(
                self.guide, data, idx, batch_size=batch_size, device=self.device
            )
        out = []
        with torch.no_grad(), eval_mode(self.model, self.guide):
            with pyro.get_param_store().scope():
                for x, b, cells in posterior.iterate_indexed_cells(
                    data, idx, batch_size, self.device
                ):
                    z = posterior.sample_guide(self.model, self.guide, x, b, n_samples, cells)
                    z = z["z"]
                    out.append(z.squeeze(-2).cpu().numpy())
        return np.concatenate(out, axis=1)

    def get_normalized_expression(
        self,
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
        adata
            Cells to query (default: the training AnnData).
        transform_batch
            Batch name (or names, averaged) to decode every cell under: batch-corrected
            expression. ``None`` decodes each cell in its own batch.
        library_size
            Scale so each cell sums to this many counts, or ``"latent"`` for the cell's own
            (latent or observed) library size.
        n_samples, return_mean
            Posterior draws of ``z`` (and ``l``), and whether to average them.
        batch_size
            Cells per forward pass.

        Returns
        -------
        pandas.DataFrame or numpy.ndarray
            Cells x genes DataFrame (the posterior mean), or an array
            ``(n_samples, cells, genes)`` when ``return_mean`` is false.
        """
        if not (library_size == "latent" or float(library_size) > 0):
            raise InputError(f"library_size={library_size!r}; use a positive number or 'latent'.")
        data = self.data_for(adata)
        samples = posterior.normalized_expression(
            self.model,
            self.guide,
            data,
            np.arange(data.n_cells),
            transform_batch=self._batch_codes(transform_batch),
            library_size=library_size,
            n_samples=n_samples,
            batch_size=batch_size,
            device=self.device,
        )
        if not return_mean:
            return samples
        return pd.DataFrame(samples.mean(0), index=data.obs_names, columns=data.var_names)

    # ------------------------------------------------------------------ held-out fit
    def get_fit_statistics(
        self,
        adata: AnnData | None = None,
        *,
        indices: Sequence[int] | np.ndarray | None = None,
        n_samples: int = 100,
        batch_size: int = 64,
        seed: int | None = None,
        observed_library: bool = False,
    ) -> pd.DataFrame:
        """ELBO, marginal log-likelihood and reconstruction error of each cell, in one pass.

        All three come from the same ``n_samples`` draws of q(z, l | x) per cell, so
        ``marginal_ll >= elbo`` cell by cell; see :mod:`pyro_scvi.posterior`.

        Parameters
        ----------
        adata
            Cells to evaluate (default: the training AnnData), e.g. held-out cells.
        indices
            Positions (or a boolean mask) of the cells of ``adata`` to evaluate, in this
            order (default: all), e.g. ``model.validation_indices``. Unlike a view such as
            :attr:`heldout_adata`, these read the cells where the counts are: a streamed
            model's from its file, a minibatch at a time.
        n_samples
            Importance samples ``K`` per cell.
        batch_size
            Cells per pass; memory grows as ``batch_size x n_samples x genes``.
        seed
            Seed for the draws; the global random state is left as it was.
        observed_library
            Condition on each cell's observed library ``l = log sum_g x_g`` instead of
            integrating over the latent ``l``: ``marginal_ll`` then estimates
            ``log p(x | l)``, the quantity a model with an observed library (scvi-tools'
            default) reports, so the two compare like for like. A model that observes its
            library (:class:`~pyro_scvi.model.priors.ObservedLibrary`) gives the same numbers
            either way.

        Returns
        -------
        pandas.DataFrame
            Indexed by cell, columns ``elbo``, ``marginal_ll`` (nats, higher is better) and
            ``reconstruction_error`` (nats, lower is better).

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=15, seed=0)
        >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> list(model.get_fit_statistics(n_samples=5, seed=0).columns)
        ['elbo', 'marginal_ll', 'reconstruction_error']
        """
        from .data.counts import check_indices

        _check_positive(n_samples=n_samples, batch_size=batch_size)
        data = self.data_for(adata)
        idx = check_indices(indices, data.n_cells)  # None: every cell
        with posterior.seeded(seed, self.device):
            stats = posterior.fit_statistics(
                self.model,
                self.guide,
                data,
                idx,
                n_samples=n_samples,
                batch_size=batch_size,
                device=self.device,
                observed_library=observed_library,
            )
        return pd.DataFrame(stats, index=data.obs_names[idx])

    def _fit_statistic(
        self, name: str, adata, n_samples, batch_size, per_cell, seed, observed_library=False
    ) -> float | np.ndarray:
        values = self.get_fit_statistics(
            adata,
            n_samples=n_samples,
            batch_size=batch_size,
            seed=seed,
            observed_library=observed_library,
        )[name].to_numpy()
        return values if per_cell else float(values.mean())

    def get_elbo(
        self,
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
        adata
            Cells to evaluate (default: the training AnnData).
        n_samples, batch_size, seed
            As in :meth:`get_fit_statistics`.
        per_cell
            Return one value per cell instead of the mean over cells.

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
        return self._fit_statistic("elbo", adata, n_samples, batch_size, per_cell, seed)

    def get_marginal_ll(
        self,
        adata: AnnData | None = None,
        *,
        n_samples: int = 1000,
        batch_size: int = 32,
        per_cell: bool = False,
        seed: int | None = None,
        observed_library: bool = False,
    ) -> float | np.ndarray:
        """Importance-sampled marginal log-likelihood ``log p(x)`` per cell.

        ``log (1/K) sum_k p(x, z_k, l_k) / q(z_k, l_k | x)`` with ``K = n_samples`` draws
        of q: a lower bound in expectation that tightens as ``K`` grows (nats, higher is
        better). It is the usual measure of held-out fit.

        Parameters
        ----------
        adata
            Cells to evaluate (default: the training AnnData).
        n_samples, batch_size, seed
            As in :meth:`get_fit_statistics`.
        per_cell
            Return one value per cell instead of the mean over cells.
        observed_library
            Estimate ``log p(x | l)`` at each cell's observed library ``l = log sum_g x_g``
            instead, the number scvi-tools' default model (an observed library) reports;
            see :meth:`get_fit_statistics`.

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
        return self._fit_statistic(
            "marginal_ll", adata, n_samples, batch_size, per_cell, seed, observed_library
        )

    def get_reconstruction_error(
        self,
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
        adata
            Cells to evaluate (default: the training AnnData).
        n_samples, batch_size, seed
            As in :meth:`get_fit_statistics`.
        per_cell
            Return one value per cell instead of the mean over cells.

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
        return self._fit_statistic(
            "reconstruction_error", adata, n_samples, batch_size, per_cell, seed
        )

    def get_amortization_gap(
        self,
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
        adata
            Cells to measure; default the validation cells held out in :meth:`train`.
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
        >>> gap = model.get_amortization_gap(n_steps=20, n_samples=10)
        >>> len(gap), bool(gap["gap"].mean() > 0)
        (12, True)
        """
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        if not getattr(self.guide, "amortized", True):
            raise InputError(
                f"The {type(self.guide).__name__} is not amortized: it has no encoder output "
                "to start from. Use pyro_scvi.posterior.gap.refine to fit held-out cells."
            )
        if adata is None:
            if not len(self.validation_indices):
                raise InputError(
                    "No held-out cells: train with train_size < 1, or pass adata=held-out cells."
                )
            data, idx = self.data, self.validation_indices
        else:
            data = self.data_for(adata)
            idx = np.arange(data.n_cells)
        with pyro.get_param_store().scope():
            return amortization_gap(
                self.model,
                self.guide,
                data,
                idx,
                n_steps=n_steps,
                lr=lr,
                n_samples=n_samples,
                batch_size=batch_size,
                seed=seed,
                device=self.device,
            )

    # ------------------------------------------------------------------ posterior samples
    def posterior_samples(
        self,
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
        adata
            Cells to query (default: the training AnnData).
        n_samples
            Draws per cell.
        sites
            Any of ``"z"``, ``"l"``, ``"rho"``, ``"x"``. A model with
            ``use_observed_lib_size`` has no ``l``; it is then left out of the result.
        transform_batch
            Batch name to decode every cell under (``None``: each cell's own batch).
        batch_size
            Cells per pass; memory grows as ``batch_size x n_samples x genes``.
        seed
            Seed for the draws; the global random state is left as it was.

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
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        unknown = sorted(set(sites) - {"z", "l", "rho", "x"})
        if unknown:
            raise InputError(f"Unknown sites {unknown}; choose from 'z', 'l', 'rho', 'x'.")
        codes = self._batch_codes(transform_batch)
        if codes is not None and len(codes) != 1:
            raise InputError(
                f"transform_batch={transform_batch!r}: posterior samples decode under one "
                "batch; pass a single batch name."
            )
        data = self.data_for(adata)
        with posterior.seeded(seed, self.device):
            return posterior.sample_posterior(
                self.model,
                self.guide,
                data,
                np.arange(data.n_cells),
                n_samples=n_samples,
                sites=tuple(sites),
                transform_batch=None if codes is None else codes[0],
                batch_size=batch_size,
                device=self.device,
            )

    def get_likelihood_parameters(
        self,
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
        adata
            Cells to query (default: the training AnnData).
        n_samples
            Draws of ``z`` (and ``l``) from the guide.
        give_mean
            Average over the draws.
        batch_size
            Cells per pass.
        seed
            Seed for the draws; the global random state is left as it was.

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
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        data = self.data_for(adata)
        with posterior.seeded(seed, self.device):
            params = posterior.likelihood_parameters(
                self.model,
                self.guide,
                data,
                np.arange(data.n_cells),
                n_samples=n_samples,
                batch_size=batch_size,
                device=self.device,
            )
        if give_mean or n_samples == 1:
            return {k: v.mean(0) for k, v in params.items()}
        return params

    def get_dropout_probability(
        self,
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
        adata
            Cells to query (default: the training AnnData).
        indices
            Positions of the cells of ``adata`` to query (default: all).
        n_samples
            Posterior draws of ``z`` (and ``l``) per cell.
        gene_list
            Genes to return (default: all), in the order given.
        zeros_only
            ``True``: entries with ``x > 0`` are ``NaN``. A positive count is certainly
            not a dropout, so the answer there is not informative, and ``NaN`` keeps
            ``numpy.nanmean`` over a gene or cell an average over its zeros. ``False``:
            every entry holds the probability that it would be a dropout were it zero,
            which describes the model's gate against its count distribution everywhere.
        batch_size
            Cells per pass.
        seed
            Seed for the draws; the global random state is left as it was.

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
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        likelihood = self.model.likelihood
        if not getattr(likelihood, "uses_gate", False):
            raise InputError(
                f"get_dropout_probability needs a zero-inflated likelihood, and this model "
                f"uses {likelihood!r}, under which no zero is a dropout. Fit with "
                "likelihood=pyro_scvi.ZINB() (the default) or pyro_scvi.ZIP()."
            )
        from .data.counts import check_indices

        data = self.data_for(adata)
        idx = check_indices(indices, data.n_cells)
        columns = _gene_columns(data, gene_list)
        with posterior.seeded(seed, self.device):
            return posterior.dropout_probability(
                self.model,
                self.guide,
                data,
                idx,
                n_samples=n_samples,
                genes=columns,
                zeros_only=zeros_only,
                batch_size=batch_size,
                device=self.device,
            )

    def get_latent_library_size(
        self,
        adata: AnnData | None = None,
        *,
        give_mean: bool = True,
        batch_size: int = 1024,
        seed: int | None = None,
    ) -> np.ndarray:
        """Each cell's library size ``exp(l)`` under the posterior (scvi-tools' name).

        Parameters
        ----------
        adata
            Cells to query (default: the training AnnData).
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
        _check_positive(batch_size=batch_size)
        data = self.data_for(adata)
        with posterior.seeded(seed, self.device):
            return posterior.latent_library_size(
                self.model,
                self.guide,
                data,
                np.arange(data.n_cells),
                give_mean=give_mean,
                batch_size=batch_size,
                device=self.device,
            )

    def posterior_predictive_sample(
        self,
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
        adata
            Cells to replicate (default: the training AnnData).
        n_samples
            Replicate datasets.
        gene_list
            Genes to keep (default: all), in the order given.
        batch_size
            Cells per pass; memory holds one pass dense.
        seed
            Seed for the draws; the global random state is left as it was.

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
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        data = self.data_for(adata)
        columns = _gene_columns(data, gene_list)
        with posterior.seeded(seed, self.device):
            draws = posterior.posterior_predictive_counts(
                self.model,
                self.guide,
                data,
                np.arange(data.n_cells),
                n_samples=n_samples,
                batch_size=batch_size,
                device=self.device,
            )
        if columns is not None:
            draws = [d[:, columns] for d in draws]
        return draws[0] if n_samples == 1 else draws

    def impute(
        self,
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
        adata
            Cells to impute (default: the training AnnData).
        n_samples
            Posterior draws of ``z`` (and ``l``) per cell.
        transform_batch
            Batch name (or names, whose ``rho`` is averaged) to decode every cell under.
        credible_level
            Mass of the central interval ``[lower, upper]``, in (0, 1).
        batch_size
            Cells per pass; the samples of one pass are summarized before the next.
        seed
            Seed for the draws; the global random state is left as it was.

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
        _check_positive(n_samples=n_samples, batch_size=batch_size)
        if not 0 < credible_level < 1:
            raise InputError(f"credible_level={credible_level}; it must be in (0, 1).")
        codes = self._batch_codes(transform_batch)
        data = self.data_for(adata)
        tail = (1.0 - credible_level) / 2
        keys = {"lower": posterior.quantile_key(tail), "upper": posterior.quantile_key(1 - tail)}
        parts: dict[str, list[np.ndarray]] = {"mean": [], "lower": [], "upper": []}
        with posterior.seeded(seed, self.device):
            # Summarize pass by pass: quantiles are per cell, so this is exact, and memory
            # stays at one pass's samples rather than n_samples x cells x genes.
            for idx in data.minibatches(np.arange(data.n_cells), batch_size):
                mu = posterior.normalized_expression(
                    self.model,
                    self.guide,
                    data,
                    idx,
                    transform_batch=codes,
                    library_size="latent",
                    n_samples=n_samples,
                    batch_size=batch_size,
                    device=self.device,
                )
                summary = posterior.summarize(mu, quantiles=(tail, 1 - tail))
                parts["mean"].append(summary["mean"])
                parts["lower"].append(summary[keys["lower"]])
                parts["upper"].append(summary[keys["upper"]])
        return {
            k: pd.DataFrame(np.concatenate(v), index=data.obs_names, columns=data.var_names)
            for k, v in parts.items()
        }

    # ------------------------------------------------------------------ differential expression
    def differential_expression(
        self,
        adata: AnnData | None = None,
        *,
        groupby: str,
        group1: str | Sequence[str] | None = None,
        group2: str | None = None,
        mode: str = "change",
        delta: float = 0.25,
        fdr_target: float = 0.05,
        batch_correction: bool = True,
        n_samples: int = 1000,
        **kwargs,
    ) -> pd.DataFrame:
        """Differential expression between groups of cells, with Bayes factors.

        ``mode="vanilla"`` is the test of Lopez et al. (2018); ``mode="change"`` tests
        ``|LFC| >= delta`` and calls genes at a posterior expected FDR of ``fdr_target``.
        ``group2=None`` compares with all other cells; ``group1=None`` tests every group.
        See :func:`pyro_scvi.analysis.de.differential_expression` for the method, the columns of
        the result and the other keyword arguments (``pseudocount``, ``credible_level``,
        ``batch_size``, ``seed``, ``key_added``). The AnnData is written to only when
        ``key_added`` is given.

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=120, n_genes=12, n_clusters=2)
        >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> de = model.differential_expression(groupby="cell_type", n_samples=50)
        >>> sorted(de["comparison"].unique())
        ['type0 vs rest', 'type1 vs rest']
        """
        from .analysis.de import differential_expression

        return differential_expression(
            self,
            adata,
            groupby=groupby,
            group1=group1,
            group2=group2,
            mode=mode,
            delta=delta,
            fdr_target=fdr_target,
            batch_correction=batch_correction,
            n_samples=n_samples,
            **kwargs,
        )

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
        """Save parameters, settings and history to the folder ``dir_path``, atomically.

        The folder is written under a temporary name and swapped into place in one rename
        (where the system allows; see :func:`pyro_scvi.io.files.replace_dir`), so an
        interrupted save never leaves a half-written model nor loses the old one. With
        ``overwrite=True`` an existing folder is replaced only if it holds a pyro_scvi
        model and nothing else (or is empty): other files are never deleted. The folder
        holds a ``manifest.json`` (format version, package version, settings, engine,
        checksums) and ``model.pt``; see :mod:`pyro_scvi.io`.

        Examples
        --------
        >>> import tempfile, pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=10, seed=0)
        >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> folder = tempfile.mkdtemp() + "/model"
        >>> model.save(folder)
        >>> pyro_scvi.SCVI.load(folder, adata, device="cpu").var_names.equals(model.var_names)
        True
        """
        target = Path(dir_path)
        if os.path.lexists(target) and not overwrite:
            raise InputError(f"{target} exists; pass overwrite=True or choose another path.")
        check_output_dir(target, owned=is_model_dir, what="model folder")
        tmp = self._stage(target)
        try:
            replace_dir(tmp, target, owned=is_model_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _model_bytes(self) -> int:
        tensors = [*self.model.state_dict().values(), *self.guide.state_dict().values()]
        return sum(t.numel() * t.element_size() for t in tensors) + 256 * 2**10

    def _checkpoint_bytes(self) -> int:
        # parameters, Adam's two moments, the last good epoch's copy, the epoch's order
        return 4 * self._model_bytes() + 8 * self.data.n_cells

    def _check_picklable(self) -> None:
        for name in ("prior", "library_prior"):
            try:
                pickle.dumps(getattr(self.model, name))
            except (pickle.PicklingError, AttributeError, TypeError) as err:
                raise InputError(
                    f"The {name} {getattr(self.model, name)!r} cannot be pickled ({err}), so "
                    "the model cannot be saved: define its function at module level, or "
                    "subclass pyro_scvi.Prior / LibraryPrior."
                ) from err

    def _stage(
        self,
        target: str | os.PathLike,
        *,
        history: pd.DataFrame | None = None,
        is_trained: bool | None = None,
        train_state: dict | None = None,
        run_id: str | None = None,
    ) -> Path:
        """Write the model to a temporary folder beside ``target``; return the folder.

        With ``train_state``, a checkpoint. The caller moves it into place or removes it.
        """
        self._check_picklable()
        if train_state is None:
            _warn_unimportable(self)  # a checkpoint is resumed in this process, mostly
        check_free_space(
            {target: self._checkpoint_bytes() if train_state else self._model_bytes()}
        )
        history = self.history if history is None else history
        tmp = make_temp_dir(target)
        try:
            state = {
                "settings": self.settings,
                "model_state": {k: v.cpu() for k, v in self.model.state_dict().items()},
                "guide_state": {k: v.cpu() for k, v in self.guide.state_dict().items()},
                # Another guide than the default is pickled whole, as the prior is.
                "guide": None
                if type(self.guide) is ScviGuide
                else copy.deepcopy(self.guide).cpu(),
                "likelihood": self.model.likelihood,
                "scheme": getattr(self, "scheme", None),
                "prior": copy.deepcopy(self.model.prior).cpu(),
                "library_prior": copy.deepcopy(self.model.library_prior).cpu(),
                "var_names": list(self.var_names),
                "batch_categories": list(self.batch_categories),
                "history": history.to_dict(orient="list"),
                "engine": history.attrs.get("engine", self.engine),
                "engines": history.attrs.get("engines", []),
                "train_indices": self.train_indices,
                "validation_indices": self.validation_indices,
                "is_trained": self.is_trained if is_trained is None else is_trained,
            }
            write_model_dir(
                tmp,
                state,
                manifest={
                    "run_id": run_id or new_run_id(),
                    "settings": self.settings,
                    "engine": state["engine"],
                    "n_genes": len(self.var_names),
                    "batch_categories": list(self.batch_categories),
                    "is_trained": state["is_trained"],
                    "epochs": len(history),
                },
                train_state=train_state,
            )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp

    @classmethod
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData,
        *,
        device: str = "auto",
        streamed: bool | None = None,
    ) -> SCVI:
        """Load a model saved with :meth:`save` (or a checkpoint), set up on ``adata``.

        ``adata`` must have the model's genes (in any order: they are matched by name)
        and only known batches; the library prior is the saved one, not recomputed from
        ``adata``. A backed ``adata`` (``anndata.read_h5ad(path, backed="r")``) is
        streamed or loaded as ``streamed`` says (``None``: the engine decides), as in
        :class:`SCVI`. The folder is checked first (:func:`pyro_scvi.io.read_model_dir`): a
        missing, damaged, foreign or newer-format model raises
        :class:`pyro_scvi.io.ModelFileError` (an ``InputError``); folders of an older
        format are migrated. Load only folders you trust: ``model.pt`` is a pickle.
        """
        manifest, state, _ = read_model_dir(dir_path)
        self = cls._from_state(
            state, adata, device=device, where=Path(dir_path), streamed=streamed
        )
        self.manifest = manifest
        return self

    @classmethod
    def load_checkpoint(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData,
        *,
        device: str = "auto",
        streamed: bool | None = None,
    ) -> SCVI:
        """Load a training checkpoint (see :meth:`train`), ready for :meth:`resume`.

        ``adata`` must hold the cells the run trained on, in the same order, with the
        same counts; ``streamed`` as in :meth:`load`.

        Examples
        --------
        >>> import tempfile, pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=10, seed=0)
        >>> folder = tempfile.mkdtemp() + "/ckpt"
        >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> _ = m.train(2, checkpoint_dir=folder, checkpoint_every=1, progress_bar=False)
        >>> again = pyro_scvi.SCVI.load_checkpoint(folder, adata, device="cpu")
        >>> len(again.history), again.interrupted  # the run had finished: nothing to resume
        (2, False)
        >>> len(again.train(1, progress_bar=False).history)  # but training goes on from it
        3
        """
        manifest, state, extra = read_model_dir(dir_path, train_state=True)
        self = cls._from_state(
            state, adata, device=device, where=Path(dir_path), streamed=streamed
        )
        self.manifest = manifest
        try:
            saved, run = extra["data"], extra["run"]
            train_state = TrainState.from_dict(extra["state"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(
                f"{dir_path} holds a damaged training state ({type(err).__name__}: {err})."
            ) from err
        now = self._fingerprint()
        if saved != now:
            what = [k for k in now if saved.get(k) != now[k]]
            raise InputError(
                f"adata is not the data the checkpoint in {dir_path} was trained on "
                f"({', '.join(what)} differ); resume with the same AnnData, cells in the same "
                "order."
            )
        self._train_state = train_state
        next_epoch = int(self.history["epoch"].iloc[-1]) + 1 if len(self.history) else 0
        finished = train_state.batches is None and next_epoch >= run.get("target_epoch", 0)
        # a finished run's checkpoint continues with train(), not resume()
        self._run = None if finished else run
        return self

    @classmethod
    def _from_state(
        cls,
        state: dict,
        adata: AnnData,
        *,
        device: str,
        where: Path,
        streamed: bool | None = None,
    ) -> SCVI:
        s = state["settings"]
        self = cls.__new__(cls)
        self.adata = adata
        self.layer, self.batch_key = s["layer"], s["batch_key"]
        self.data = from_anndata(
            adata,
            layer=self.layer,
            batch_key=self.batch_key,
            batch_categories=state["batch_categories"],
            var_names=state["var_names"],
            allow_empty_cells=True,
            streamed=streamed,
        )
        self.settings = s
        saved_guide = state.get("guide")
        if getattr(saved_guide, "n_cells", self.data.n_cells) != self.data.n_cells:
            raise InputError(
                f"The saved {type(saved_guide).__name__} has parameters for "
                f"{saved_guide.n_cells} cells, but adata has {self.data.n_cells}; load it with "
                "the AnnData it was trained on."
            )
        try:
            library = state.get("library_prior")
            if library is None:
                # older saves hold no object for an observed library, and some only the
                # latent library prior's buffers
                library = (
                    ObservedLibrary()
                    if s["use_observed_lib_size"]
                    else LogNormalLibrary(
                        state["model_state"]["library_prior.loc"],
                        state["model_state"]["library_prior.scale"],
                    )
                )
            if bool(s["use_observed_lib_size"]) == is_latent_library(library):
                raise ValueError(
                    f"settings say use_observed_lib_size={s['use_observed_lib_size']} but the "
                    f"saved library is {library!r}"
                )
            self.model, self.guide = _build_components(
                s,
                self.data,
                library_prior=library,
                prior=state["prior"],
                likelihood=state["likelihood"],
                guide=saved_guide,
                scheme=state.get("scheme"),
                restore=True,
            )
            self.scheme = state.get("scheme")
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
            raise ModelFileError(
                f"The model in {where} cannot be rebuilt from its settings "
                f"({type(err).__name__}: {_one_line(err)}); the file is damaged or edited."
            ) from err
        try:
            self.model.load_state_dict(state["model_state"])
            self.guide.load_state_dict(state["guide_state"])
        except (RuntimeError, KeyError, TypeError, AttributeError) as err:
            raise ModelFileError(
                f"The parameters in {where} do not fit the architecture its settings describe "
                f"({_one_line(err)}); the file was written for another architecture or edited."
            ) from err
        self.history = pd.DataFrame(state["history"], columns=None)
        if not len(self.history):
            self.history = pd.DataFrame(columns=HISTORY_COLUMNS)
        self.engine = state.get("engine")
        self.history.attrs.update(engine=self.engine, engines=state.get("engines", []))
        self.train_indices = np.asarray(state["train_indices"])
        self.validation_indices = np.asarray(state["validation_indices"])
        self.is_trained = bool(state["is_trained"])
        self._train_state, self._run, self.manifest = None, None, None
        self.device = resolve_device(device)
        self.model.to(self.device), self.guide.to(self.device)
        return self


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]
