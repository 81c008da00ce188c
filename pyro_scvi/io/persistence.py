"""Saving and loading models: what a model folder holds, checkpoints, and what they cost.

:func:`save` writes a model folder atomically and :func:`write_checkpoint` a training
checkpoint (a model folder plus the run's state); both go through :func:`stage`.
:func:`load` reads either back as the :class:`~pyro_scvi.model.build.Components` and
:class:`~pyro_scvi.train.run.TrainingRecord` that :class:`~pyro_scvi.SCVI` is made of,
rebuilding the modules with :func:`~pyro_scvi.model.build.build_components` as a new model
builds them. The folder's format (manifest, checksums, migration of older formats) is
:mod:`pyro_scvi.io.model_dir`'s.
"""

from __future__ import annotations

import copy
import os
import pickle
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch

from ..data.counts import CountData, from_anndata
from ..errors import InputError, ModelFileError
from ..model.build import Components, build_components
from ..model.guides import ScviGuide
from ..model.priors import LogNormalLibrary, ObservedLibrary, is_latent_library
from ..train.loop import TrainState
from ..train.run import (
    RunSettings,
    TrainingRecord,
    TrainingRun,
    check_fingerprint,
    empty_history,
    fingerprint,
    merge_history,
    next_epoch,
    run_ended,
)
from .files import check_free_space, check_output_dir, make_temp_dir, replace_dir
from .model_dir import MODEL_FILE, is_model_dir, new_run_id, read_model_dir, write_model_dir
from .pickling import main_module_names, needs_trust

if TYPE_CHECKING:
    from anndata import AnnData
    from torch import nn


class Saveable(Protocol):
    """What saving reads of a model; :class:`~pyro_scvi.SCVI` has it."""

    settings: dict[str, Any]
    data: CountData
    model: nn.Module
    guide: nn.Module
    scheme: Any
    history: pd.DataFrame
    engine: dict | None
    train_indices: np.ndarray
    validation_indices: np.ndarray
    is_trained: bool


@dataclass
class Loaded:
    """A model read from its folder: what :class:`~pyro_scvi.SCVI` is made of.

    Attributes
    ----------
    components
        The settings, the data and the rebuilt model and guide, holding the saved
        parameters.
    record
        The training so far; a checkpoint's ``record.run`` continues it.
    manifest
        The folder's manifest (:func:`pyro_scvi.io.read_model_dir`).
    """

    components: Components
    record: TrainingRecord
    manifest: dict[str, Any]


def model_bytes(model: Saveable) -> int:
    """About how many bytes a saved ``model`` takes: its tensors and 256 kB more.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> model_bytes(pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)) > 256 * 2**10
    True
    """
    tensors = [*model.model.state_dict().values(), *model.guide.state_dict().values()]
    return sum(t.numel() * t.element_size() for t in tensors) + 256 * 2**10


def checkpoint_bytes(model: Saveable) -> int:
    """About how many bytes a checkpoint of ``model`` takes (:func:`write_checkpoint`).

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> checkpoint_bytes(m) == 5 * model_bytes(m) + 8 * 20
    True
    """
    # at most: parameters, Adam's two moments, the last good epoch's copy, the best (or,
    # after a restore, the last) epoch's copy of a run that restores, the epoch's order
    return 5 * model_bytes(model) + 8 * model.data.n_cells


def _portable(module: nn.Module) -> nn.Module:
    """A CPU copy of ``module`` to pickle, without Pyro's links to its param store.

    While a run trains, Pyro gives each parameter an ``unconstrained`` weak reference
    (``pyro.module``), which no pickle can hold: a checkpoint written mid-run with a
    learnable prior (MixtureOfGaussians, VampPrior) failed on it.
    """
    copied = copy.deepcopy(module).cpu()
    for param in copied.parameters():
        vars(param).pop("unconstrained", None)
    return copied


def _index_tensor(indices: Any) -> torch.Tensor:
    return torch.as_tensor(np.asarray(indices, dtype=np.int64))


def _check_picklable(components: dict[str, Any]) -> None:
    for name in ("prior", "library_prior"):
        try:
            pickle.dumps(components[name])
        except (pickle.PicklingError, AttributeError, TypeError) as err:
            raise InputError(
                f"The {name} {components[name]!r} cannot be pickled ({err}), so "
                "the model cannot be saved: define its function at module level, or "
                "subclass pyro_scvi.Prior / LibraryPrior."
            ) from err


def _warn_unimportable(model: Saveable) -> list[str]:
    """Warn when a saved component's class or function lives in ``__main__``; return them."""
    pickled = [model.model.prior, model.model.library_prior, model.model.likelihood]
    pickled.append(model.scheme)
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
            stacklevel=5,  # the caller of SCVI.save
        )
    return names


def _warn_needs_trust(path: Path, reported: list[str]) -> None:
    """Warn when the saved ``path`` will load only with ``trust=True``."""
    names = [n for n in needs_trust(path) if n not in reported]
    if names:
        warnings.warn(
            f"The model is saved, but it pickles {', '.join(names)}, which is not part of "
            "pyro_scvi.model: loading it runs code from the file, so SCVI.load will need "
            "trust=True (command line: --trust-model), or the loading process to register "
            "the class first (torch.serialization.add_safe_globals([TheClass])).",
            UserWarning,
            stacklevel=5,  # the caller of SCVI.save
        )


def stage(
    model: Saveable,
    target: str | os.PathLike,
    *,
    history: pd.DataFrame | None = None,
    is_trained: bool | None = None,
    train_state: dict | None = None,
    run_id: str | None = None,
) -> Path:
    """Write ``model`` to a temporary folder beside ``target``; return the folder.

    With ``train_state``, a checkpoint. The caller moves the folder into place
    (:func:`pyro_scvi.io.files.replace_dir`) or removes it. Free space is checked first.

    Parameters
    ----------
    model
        The model to write.
    target
        The folder the model is meant for.
    history, is_trained
        Written in place of the model's own (a checkpoint's run is still going).
    train_state
        A checkpoint's training state (see :func:`write_checkpoint`).
    run_id
        The manifest's ``run_id`` (default: a new one), e.g. to match other outputs.

    Returns
    -------
    pathlib.Path
        The temporary folder, a complete model folder.

    Examples
    --------
    >>> import shutil, tempfile, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> tmp = stage(model, tempfile.mkdtemp() + "/model", run_id="run-1")
    >>> sorted(p.name for p in tmp.iterdir())
    ['manifest.json', 'model.pt']
    >>> shutil.rmtree(tmp)
    """
    pickled = {
        # Another guide than the default is pickled whole, as the prior is.
        "guide": None if type(model.guide) is ScviGuide else _portable(model.guide),
        "likelihood": model.model.likelihood,
        "scheme": model.scheme,
        "prior": _portable(model.model.prior),
        "library_prior": _portable(model.model.library_prior),
    }
    _check_picklable(pickled)
    # a checkpoint is resumed in this process, mostly
    reported = _warn_unimportable(model) if train_state is None else []
    check_free_space({target: checkpoint_bytes(model) if train_state else model_bytes(model)})
    history = model.history if history is None else history
    var_names, batches = list(model.data.var_names), list(model.data.batch_categories)
    tmp = make_temp_dir(target)
    try:
        state = {
            "settings": model.settings,
            "model_state": {k: v.cpu() for k, v in model.model.state_dict().items()},
            "guide_state": {k: v.cpu() for k, v in model.guide.state_dict().items()},
            **pickled,
            "var_names": var_names,
            "batch_categories": batches,
            "history": history.to_dict(orient="list"),
            "engine": history.attrs.get("engine", model.engine),
            "engines": history.attrs.get("engines", []),
            "stopping": history.attrs.get("stopping"),  # how the last run ended
            # tensors, not numpy arrays: plain values for a weights_only load
            "train_indices": _index_tensor(model.train_indices),
            "validation_indices": _index_tensor(model.validation_indices),
            "is_trained": model.is_trained if is_trained is None else is_trained,
        }
        write_model_dir(
            tmp,
            state,
            manifest={
                "run_id": run_id or new_run_id(),
                "settings": model.settings,
                "engine": state["engine"],
                "n_genes": len(var_names),
                "batch_categories": batches,
                "is_trained": state["is_trained"],
                "epochs": len(history),
            },
            train_state=train_state,
        )
        if train_state is None:
            _warn_needs_trust(tmp / MODEL_FILE, reported)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def save(model: Saveable, dir_path: str | os.PathLike, *, overwrite: bool = False) -> None:
    """Save ``model`` to the folder ``dir_path``, atomically; see :meth:`pyro_scvi.SCVI.save`.

    Examples
    --------
    >>> import tempfile, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> folder = tempfile.mkdtemp() + "/model"
    >>> save(pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8), folder)
    >>> load(folder, adata).record.is_trained
    False
    """
    target = Path(dir_path)
    if os.path.lexists(target) and not overwrite:
        raise InputError(f"{target} exists; pass overwrite=True or choose another path.")
    check_output_dir(target, owned=is_model_dir, what="model folder")
    tmp = stage(model, target)
    try:
        replace_dir(tmp, target, owned=is_model_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_checkpoint_dir(model: Saveable, folder: str | os.PathLike) -> None:
    """Raise before training if ``folder`` cannot take ``model``'s checkpoints.

    Examples
    --------
    >>> import tempfile, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> check_checkpoint_dir(pyro_scvi.SCVI(adata, n_latent=2), tempfile.mkdtemp() + "/c")
    """
    check_output_dir(folder, owned=is_model_dir, what="checkpoint folder")
    check_free_space({folder: checkpoint_bytes(model)})


def write_checkpoint(
    model: Saveable,
    folder: str | os.PathLike,
    state: TrainState,
    settings: RunSettings,
    history: pd.DataFrame,
) -> str:
    """Replace ``folder`` with a checkpoint of a run in progress; return the folder's path.

    The checkpoint is a model folder (the model's history followed by the run's rows so
    far, ``history``) with the run's ``state``, ``settings`` and the data's
    :func:`~pyro_scvi.train.run.fingerprint`: :func:`load` with ``checkpoint=True``
    continues the run from it. It is written beside ``folder`` and swapped in whole.

    Examples
    --------
    >>> import tempfile, pyro_scvi
    >>> from pyro_scvi.train.loop import TrainState
    >>> from pyro_scvi.train.run import RunSettings
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> run = RunSettings(3, 128, 1e-3, 0.9, False, 45, 400)
    >>> folder = write_checkpoint(model, tempfile.mkdtemp() + "/c", TrainState.new(0), run,
    ...                           model.history)
    >>> load(folder, adata, checkpoint=True).record.run.settings.target_epoch
    3
    """
    merged = merge_history(model.history, history, history.attrs.get("engine"))
    extra = {"state": state.to_dict(), "run": settings.to_dict(), "data": fingerprint(model.data)}
    tmp = stage(
        model,
        folder,
        history=merged,
        is_trained=model.is_trained or bool(len(history)),
        train_state=extra,
    )
    replace_dir(tmp, folder, owned=is_model_dir)
    return str(folder)


def load(
    dir_path: str | os.PathLike,
    adata: AnnData,
    *,
    streamed: bool | None = None,
    checkpoint: bool = False,
    trust: bool = False,
) -> Loaded:
    """Read the model folder ``dir_path`` and set the model up on ``adata``.

    ``adata`` must have the model's genes (matched by name) and only known batches. With
    ``checkpoint``, the folder must be a training checkpoint of ``adata``'s cells, in the
    same order; its run continues from ``record.run`` (``settings`` ``None`` when the run
    had finished). See :meth:`pyro_scvi.SCVI.load` for the checks, and for ``trust``
    (nothing of the folder runs unless it is given: :mod:`pyro_scvi.io.pickling`).

    Examples
    --------
    >>> import tempfile, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, seed=0)
    >>> folder = tempfile.mkdtemp() + "/model"
    >>> pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8).save(folder)
    >>> loaded = load(folder, adata)
    >>> loaded.components.settings["n_latent"], loaded.manifest["kind"]
    (2, 'model')
    """
    manifest, state, extra = read_model_dir(dir_path, train_state=checkpoint, trust=trust)
    components = _rebuild(state, adata, Path(dir_path), streamed)
    history = pd.DataFrame(state["history"], columns=None)
    if not len(history):
        history = empty_history()
    history.attrs.update(engine=state.get("engine"), engines=state.get("engines", []))
    if state.get("stopping") is not None:
        history.attrs["stopping"] = state["stopping"]
    record = TrainingRecord(
        history=history,
        engine=state.get("engine"),
        train_indices=np.asarray(state["train_indices"]),
        validation_indices=np.asarray(state["validation_indices"]),
        is_trained=bool(state["is_trained"]),
    )
    if checkpoint:
        try:
            saved = extra["data"]
            settings = RunSettings.from_dict(extra["run"])
            train_state = TrainState.from_dict(extra["state"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelFileError(
                f"{dir_path} holds a damaged training state ({type(err).__name__}: {err})."
            ) from err
        check_fingerprint(saved, components.data, dir_path)
        # a run that converged before its max_epochs ended there too (its end's record)
        done = next_epoch(history) >= settings.target_epoch or run_ended(history)
        # a finished run's checkpoint continues with train(), not resume()
        finished = train_state.batches is None and done
        record.run = TrainingRun(train_state, None if finished else settings, last=settings)
    return Loaded(components, record, manifest)


def _rebuild(state: dict, adata: AnnData, where: Path, streamed: bool | None) -> Components:
    """The components a saved ``state`` describes, set up on ``adata``, with its parameters."""
    s = state["settings"]
    data = from_anndata(
        adata,
        layer=s["layer"],
        batch_key=s["batch_key"],
        batch_categories=state["batch_categories"],
        var_names=state["var_names"],
        allow_empty_cells=True,
        streamed=streamed,
    )
    saved_guide = state.get("guide")
    if getattr(saved_guide, "n_cells", data.n_cells) != data.n_cells:
        raise InputError(
            f"The saved {type(saved_guide).__name__} has parameters for "
            f"{saved_guide.n_cells} cells, but adata has {data.n_cells}; load it with "
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
        parts = build_components(
            s,
            data,
            library_prior=library,
            prior=state["prior"],
            likelihood=state["likelihood"],
            guide=saved_guide,
            scheme=state.get("scheme"),
            restore=True,
        )
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as err:
        raise ModelFileError(
            f"The model in {where} cannot be rebuilt from its settings "
            f"({type(err).__name__}: {_one_line(err)}); the file is damaged or edited."
        ) from err
    try:
        parts.model.load_state_dict(state["model_state"])
        parts.guide.load_state_dict(state["guide_state"])
    except (RuntimeError, KeyError, TypeError, AttributeError) as err:
        raise ModelFileError(
            f"The parameters in {where} do not fit the architecture its settings describe "
            f"({_one_line(err)}); the file was written for another architecture or edited."
        ) from err
    return parts


def reference_placeholder(
    dir_path: str | os.PathLike, var_names: Sequence[str], *, trust: bool = False
) -> AnnData:
    """One cell of the first batch of the model in ``dir_path``, with genes ``var_names``.

    :func:`load` sets a model up on data of batches it knows; a query's batches are new,
    so a saved reference of query mapping is loaded on this placeholder instead (only its
    parameters and settings are used). ``trust`` as in :func:`load`.

    Examples
    --------
    >>> import tempfile, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=20, n_genes=10, n_batches=2)
    >>> folder = tempfile.mkdtemp() + "/ref"
    >>> pyro_scvi.SCVI(adata, batch_key="batch", n_latent=2).save(folder)
    >>> cell = reference_placeholder(folder, adata.var_names)
    >>> cell.shape, cell.obs["batch"].tolist()
    ((1, 10), ['batch0'])
    """
    import anndata
    import scipy.sparse as sp

    # the settings and batches the folder was saved with (any format version)
    _, state, _ = read_model_dir(dir_path, trust=trust)
    settings = dict(state["settings"], batch_categories=state["batch_categories"])
    counts = sp.csr_matrix(np.ones((1, len(var_names)), dtype=np.float32))
    obs = pd.DataFrame(index=["placeholder"])
    if settings.get("batch_key") is not None:
        obs[settings["batch_key"]] = [settings["batch_categories"][0]]
    placeholder = anndata.AnnData(counts, obs=obs, var=pd.DataFrame(index=var_names))
    if settings.get("layer") is not None:
        placeholder.layers[settings["layer"]] = counts
    return placeholder


def _one_line(err: BaseException, limit: int = 200) -> str:
    return " ".join(str(err).split())[:limit]
