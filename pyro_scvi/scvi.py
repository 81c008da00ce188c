"""The user-facing :class:`SCVI`: AnnData in, trained model and posterior queries out.

Method names follow scvi-tools, so its users feel at home; underneath, ``SCVI.model`` and
``SCVI.guide`` are a plain Pyro model and guide that can be run under any poutine handler
or SVI loop.

A facade: the work is done below it, each part in its layer. :mod:`~pyro_scvi.model.build`
builds the model and guide, :mod:`~pyro_scvi.model.surgery` widens them for query mapping,
:mod:`~pyro_scvi.train.run` keeps the training between calls, :mod:`~pyro_scvi.io.persistence`
saves and loads, and each query is a function of :mod:`~pyro_scvi.posterior.fitted_queries`
or :mod:`~pyro_scvi.analysis.de` with the model as its Fitted. Every way a model comes
into being ends in one method, ``SCVI._set_up``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro.infer import ELBO
from pyro.optim import PyroOptim

from ._docs import fill_doc
from .analysis import de
from .data.counts import CountData, check_batch_sizes, from_anndata, nonempty_cells
from .errors import InputError, TrainingError, TrainingInterrupted
from .io import persistence
from .model import build, surgery
from .model.generative import Dispersion
from .model.guides import GuideFactory
from .model.likelihoods import Likelihood
from .model.priors import Prior
from .model.schemes import Scheme
from .posterior import fitted_queries as queries
from .posterior.fitted import as_method, counts_for
from .train.device import resolve_device
from .train.engine import Engine
from .train.loop import TrainState, stop_on_signals, train_svi

if TYPE_CHECKING:
    import numpy as np

from .train.run import (
    RunSettings,
    TrainingRecord,
    TrainingRun,
    default_max_epochs,
    merge_history,
    next_epoch,
    run_ended,
    split_cells,
)


def _run_seed(run: TrainingRun) -> int | None:
    """The seed a training run was started with (``None``: not recorded)."""
    settings = run.settings if run.settings is not None else run.last
    return None if settings is None else settings.seed


@fill_doc
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
        ``"gene"``, ``"gene-batch"`` (needs ``batch_key``) or ``"gene-cell"``.
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
    {streamed}
    library_residual
        Centre the default guide's q(l) on each cell's observed log library size, so its
        encoder learns only the residual (:class:`~pyro_scvi.model.guides.ScviGuide`). ``None``
        (default): on wherever it applies, the default guide with a latent library;
        ``False``: the paper's guide, whose encoder outputs the whole mean of q(l) (the
        default before 2026-11-30; ``benchmarks/results/library_residual.md`` compares the two).
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

    # What a model holds, set in one place (``_set_up``) by __init__ and every loader.
    #: The AnnData the model was set up on; it is only read, never modified.
    adata: AnnData
    #: Its counts, batch codes and gene names as the model reads them.
    data: CountData
    #: The settings the model was built with; saved, and recorded with every result.
    settings: dict
    #: Layer holding the raw counts (``None``: ``adata.X``).
    layer: str | None
    #: Column of ``adata.obs`` with each cell's batch (``None``: one batch).
    batch_key: str | None
    #: The Pyro model (:class:`~pyro_scvi.model.generative.ScviModel`).
    model: torch.nn.Module
    #: The guide, with the model's signature.
    guide: torch.nn.Module
    #: The inference scheme of the global parameters (``None``: point estimates).
    scheme: Scheme | None
    #: One row per epoch trained; ``attrs`` hold the engine and the optimizer's settings.
    history: pd.DataFrame
    #: Whether the model has been trained.
    is_trained: bool
    #: Every automatic choice of the last run, and why (``RunEngine.as_dict``).
    engine: dict | None
    #: Positions of the training cells (``None``: not trained yet).
    train_indices: np.ndarray | None
    #: Positions of the held-out validation cells (``None``: not trained yet).
    validation_indices: np.ndarray | None
    #: What continues training: ``train()`` again, or :meth:`resume` when interrupted.
    training_run: TrainingRun | None
    #: The manifest of the folder this model was loaded from (``None``: not loaded).
    manifest: dict | None
    #: A query model's reference batches (:meth:`load_query_data`); ``None`` otherwise.
    reference_batches: tuple[str, ...] | None
    #: Where the model and guide live.
    device: torch.device

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
        build.check_arguments(n_latent, n_hidden, n_layers, dropout_rate, likelihood)
        if drop_empty_cells:
            keep = nonempty_cells(adata, layer)
            adata = adata[keep] if not keep.all() else adata
        data = from_anndata(adata, layer=layer, batch_key=batch_key, streamed=streamed)
        parts = build.new_components(
            data,
            layer=layer,
            batch_key=batch_key,
            likelihood=likelihood,
            prior=prior,
            library_prior=library_prior,
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            dispersion=dispersion,
            use_observed_lib_size=use_observed_lib_size,
            guide=guide,
            scheme=scheme,
            library_residual=library_residual,
        )
        self._set_up(adata, parts)

    def _set_up(
        self,
        adata: AnnData,
        parts: build.Components,
        record: TrainingRecord | None = None,
        *,
        device: str | torch.device = "cpu",
        manifest: dict | None = None,
        reference_batches: tuple[str, ...] | None = None,
    ) -> SCVI:
        """Give the model every attribute it has: the one constructor path.

        ``__init__`` and every loader end here, so no way of making an SCVI can miss an
        attribute or set one up differently.
        """
        self.adata, self.data, self.settings = adata, parts.data, parts.settings
        self.layer, self.batch_key = parts.settings["layer"], parts.settings["batch_key"]
        self.model, self.guide = parts.model, parts.guide
        self.scheme = parts.scheme
        record = record or TrainingRecord()
        self.history, self.is_trained = record.history, record.is_trained
        self.engine = record.engine
        self.train_indices = record.train_indices
        self.validation_indices = record.validation_indices
        self.training_run = record.run
        self.manifest = manifest
        self.reference_batches = reference_batches
        self.device = resolve_device(device)
        self.model.to(self.device), self.guide.to(self.device)
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    @fill_doc
    def load(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData,
        *,
        device: str = "auto",
        streamed: bool | None = None,
        trust: bool = False,
    ) -> SCVI:
        """Load a model saved with :meth:`save` (or a checkpoint), set up on ``adata``.

        Parameters
        ----------
        {dir_path}
        adata
            The model's genes (in any order: they are matched by name) and only known
            batches. The library prior is the saved one, not recomputed from ``adata``.
        {device}
        {streamed}
        {trust}
        """
        loaded = persistence.load(dir_path, adata, streamed=streamed, trust=trust)
        return cls.__new__(cls)._set_up(
            adata, loaded.components, loaded.record, device=device, manifest=loaded.manifest
        )

    @classmethod
    @fill_doc
    def load_checkpoint(
        cls,
        dir_path: str | os.PathLike,
        adata: AnnData,
        *,
        device: str = "auto",
        streamed: bool | None = None,
        trust: bool = False,
    ) -> SCVI:
        """Load a training checkpoint (see :meth:`train`), ready for :meth:`resume`.

        Parameters
        ----------
        {dir_path}
        adata
            The cells the run trained on, in the same order, with the same counts.
        {device}
        {streamed}
        {trust}

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
        loaded = persistence.load(dir_path, adata, streamed=streamed, checkpoint=True, trust=trust)
        return cls.__new__(cls)._set_up(
            adata, loaded.components, loaded.record, device=device, manifest=loaded.manifest
        )

    @classmethod
    @fill_doc
    def load_query_data(
        cls,
        adata: AnnData,
        reference_model: SCVI | str | os.PathLike,
        *,
        streamed: bool | None = None,
        trust: bool = False,
    ) -> SCVI:
        """A model of new batches mapped onto a trained reference (scArches-style).

        The query's batches are appended to the reference's; every reference weight is
        fixed, and only the weights the new batches feed (their columns of each network's
        first layer) train, so the reference cells' latent space and decoding are exactly
        the reference's. See :mod:`pyro_scvi.model.surgery` for the surgery and its
        reference.

        Parameters
        ----------
        adata
            The query's raw counts: the reference's genes, in order, and its ``batch_key``
            column, with at least one batch the reference does not know.
        reference_model
            A trained :class:`SCVI` set up with a ``batch_key``, or the directory it was
            saved to. It is not modified.
        {streamed}
        {trust}
            (For a reference given as a folder.)

        Returns
        -------
        SCVI
            A model of ``adata``'s cells; call :meth:`train` on it, then query it as any
            model (the reference's batches stay valid for ``transform_batch``; they are
            its :attr:`reference_batches`). Saved, it loads as an ordinary model of all
            the batches.

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
        reference = reference_model
        if not isinstance(reference, cls):
            cell = persistence.reference_placeholder(reference, adata.var_names, trust=trust)
            reference = cls.load(reference, cell, device="cpu", trust=trust)
        if not reference.is_trained:
            raise InputError("The reference model is not trained; train it (or load one) first.")
        parts = surgery.query_components(reference, adata, streamed=streamed)
        batches = reference.batch_categories
        return cls.__new__(cls)._set_up(adata, parts, reference_batches=batches)

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

    @property
    def interrupted(self) -> bool:
        """Whether the model holds an interrupted training run that :meth:`resume` finishes."""
        return self.training_run is not None and self.training_run.interrupted

    def __repr__(self) -> str:
        d = self.data
        return (
            f"SCVI({d.n_cells} cells x {d.n_genes} genes, {d.n_batch} batch(es), "
            f"likelihood={self.settings['likelihood']}, prior={self.settings['prior']}, "
            f"n_latent={self.settings['n_latent']}, trained={self.is_trained})"
        )

    # ------------------------------------------------------------------ training
    @fill_doc
    def train(
        self,
        max_epochs: int | None = None,
        *,
        batch_size: int = 128,
        lr: float = 1e-3,
        train_size: float = 0.9,
        early_stopping: bool = True,
        patience: int = 45,
        min_delta: float | None = None,
        restore_best_epoch: bool = False,
        kl_warmup_epochs: int = 100,
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
            The most passes over the training cells; default
            ``min(400, round(400 * 20000 / n_cells))`` as in scvi-tools. With
            ``early_stopping`` (the default) the run ends sooner once the held-out ELBO
            stops improving; ``early_stopping=False`` runs exactly ``max_epochs``.
        batch_size, lr
            Cells per minibatch and Adam's learning rate.
        train_size
            Fraction of cells to train on; the rest give the validation ELBO. Fixed by the
            first run.
        early_stopping, patience, min_delta
            Stop when the validation ELBO (a mean over 5 epochs) has not improved by more
            than ``min_delta`` nats per cell for ``patience`` epochs, counted from the end
            of the KL warm-up; ``min_delta=None`` (default): by more than its own
            epoch-to-epoch noise (:class:`pyro_scvi.train.hooks.EarlyStopping`). On by
            default; the last epoch and the reason the run ended are in
            ``history.attrs["stopping"]``, the settings in the saved run.
        restore_best_epoch
            At the end of the call, give the model the parameters of the epoch after the
            KL warm-up whose monitored value (the 5-epoch mean of the validation ELBO that
            early stopping judges) is best, with batch norm's statistics re-estimated for
            them, instead of the last epoch's (:class:`pyro_scvi.train.hooks.BestEpoch`).
            Off by default (why: ``benchmarks/results/stopping_rule.md``).
            ``history.attrs["stopping"]`` records ``best_epoch``, ``best_value`` and
            ``restored_epoch``. A later ``train()`` or :meth:`resume` continues the run
            from its last epoch (parameters, Adam's moments, streams: ``train(2);
            train(3)`` is still ``train(5)``) and restores the best epoch of the whole run
            at its end.
        kl_warmup_epochs
            Epochs of linear KL warm-up (0: none); early stopping never stops before it
            ends. Default 100 (scvi-tools: 400), so that convergence can end a 400-epoch
            run (``benchmarks/results/stopping_rule.md``).
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
        {device}
        seed
            Seeds a new run: the split, the initial parameters, the minibatch order and
            Pyro; CPU runs are then reproducible. A continued run keeps its own streams.
        {progress_bar}
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
        max_epochs = default_max_epochs(n) if max_epochs is None else max_epochs
        first_epoch = next_epoch(self.history)
        settings = RunSettings.for_call(
            first_epoch,
            max_epochs,
            batch_size=batch_size,
            lr=lr,
            train_size=train_size,
            early_stopping=early_stopping,
            patience=patience,
            kl_warmup_epochs=kl_warmup_epochs,
            min_delta=min_delta,
            restore_best_epoch=restore_best_epoch,
            elbo=elbo,
            optim=optim,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            guide=self.guide,
            # a continued run goes on with the streams of the seed it was started with
            seed=seed if self.training_run is None else _run_seed(self.training_run),
        )
        check_batch_sizes(self.data, batch_size)
        if checkpoint_dir is not None:
            persistence.check_checkpoint_dir(self, checkpoint_dir)
        if self.training_run is None:  # a new run
            if seed is not None:
                pyro.set_rng_seed(seed)
            if not self.is_trained:
                if seed is not None and self.reference_batches is None:
                    # Initialize the networks from the seed too, so a fresh model trained
                    # with the same seed gives the same result whatever ran before it (a
                    # query model keeps its reference's weights).
                    build.reset_parameters(self.model, self.guide)
                self.train_indices, self.validation_indices = split_cells(n, train_size, seed)
        state = TrainState.new(seed) if self.training_run is None else self.training_run.state
        self.device = resolve_device(device)
        self.model.to(self.device), self.guide.to(self.device)
        run = TrainingRun(state, settings)

        def write_checkpoint(state: TrainState, history: pd.DataFrame) -> str:
            run.settings.engine = history.attrs.get("engine")
            return persistence.write_checkpoint(self, checkpoint_dir, state, run.settings, history)

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
                    min_delta=min_delta,
                    restore_best_epoch=restore_best_epoch,
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
                self.training_run = None
                raise
            except TrainingInterrupted as err:
                self._append_history(err.history)
                run.settings.engine = self.engine
                self.training_run = run
                raise
            # inside the block: a signal passed on as it ends finds the model complete
            self._append_history(history)
            self.training_run = TrainingRun(state, last=settings)
        return self

    @fill_doc
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
        {device}
        {progress_bar}
        checkpoint_dir, checkpoint_every
            Default: as the interrupted run.
        """
        if not self.interrupted:
            ended = self.history.attrs.get("stopping") if self.is_trained else None
            if ended and run_ended(self.history):  # a finished run: say how it ended
                raise InputError(
                    f"Nothing to resume: the run finished at epoch {ended['epoch']} "
                    f"({ended['reason']}); call train() to train it further."
                )
            raise InputError(
                "Nothing to resume: this model has no interrupted training run (call train(), "
                "or load one with SCVI.load_checkpoint)."
            )
        run = self.training_run
        run.settings.check_components(elbo=elbo, optim=optim)
        remaining = run.settings.remaining(next_epoch(self.history))
        if remaining < 1:
            self.training_run = TrainingRun(run.state, last=run.settings)
            return self
        engine = Engine.for_resume(
            run.settings.engine, elbo_passed=elbo is not None, optim_passed=optim is not None
        )
        arguments = run.settings.train_arguments(checkpoint_dir, checkpoint_every)
        arguments.update(elbo=elbo, optim=optim, engine=engine, device=device)
        return self.train(remaining, **arguments, progress_bar=progress_bar)

    def _append_history(self, history: pd.DataFrame | None) -> None:
        if history is None:
            return
        if "engine" in history.attrs:
            self.engine = history.attrs["engine"]
        if len(history):
            self.history = merge_history(self.history, history, self.engine)
            self.is_trained = True

    # ------------------------------------------------------------------ queries
    @property
    def run_settings(self) -> RunSettings | None:
        """The settings the last training call used (its ``seed``, ``lr`` ...), or ``None``.

        For a resumed run, those it was started with. ``None`` for a model never trained
        here nor loaded from a checkpoint.

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=10, seed=0)
        >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
        >>> model.train(1, seed=3, progress_bar=False).run_settings.seed
        3
        """
        run = self.training_run
        if run is None:
            return None
        return run.settings if run.settings is not None else run.last

    def data_for(self, adata: AnnData | None = None) -> CountData:
        """The counts of ``adata`` (default: the model's cells) coded as the model codes them.

        The :class:`pyro_scvi.posterior.fitted.Fitted` contract the analyses rely on; see
        :func:`pyro_scvi.posterior.fitted.counts_for`.
        """
        return counts_for(self, adata)

    # Each query is the function of the same name with this model as its Fitted: its
    # documentation and argument checks live there.
    get_latent_representation = as_method(queries.get_latent_representation)
    get_normalized_expression = as_method(queries.get_normalized_expression)
    get_fit_statistics = as_method(queries.get_fit_statistics)
    get_elbo = as_method(queries.get_elbo)
    get_marginal_ll = as_method(queries.get_marginal_ll)
    get_marginal_ll_ais = as_method(queries.get_marginal_ll_ais)
    get_reconstruction_error = as_method(queries.get_reconstruction_error)
    get_amortization_gap = as_method(queries.get_amortization_gap)
    posterior_samples = as_method(queries.posterior_samples)
    get_likelihood_parameters = as_method(queries.get_likelihood_parameters)
    get_dropout_probability = as_method(queries.get_dropout_probability)
    get_latent_library_size = as_method(queries.get_latent_library_size)
    posterior_predictive_sample = as_method(queries.posterior_predictive_sample)
    impute = as_method(queries.impute)
    differential_expression = as_method(de.differential_expression)

    # ------------------------------------------------------------------ saving
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
        persistence.save(self, dir_path, overwrite=overwrite)
