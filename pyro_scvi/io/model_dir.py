"""Model folders on disk: a versioned manifest, checks on reading, migration of old formats.

A model folder (written by :meth:`pyro_scvi.SCVI.save`, and by training checkpoints) holds

``manifest.json``
    What the folder is: ``format`` (``"pyro_scvi model"``), ``format_version``
    (:data:`FORMAT_VERSION`), ``kind`` (``"model"`` or ``"checkpoint"``), the writing
    ``package_version``, the model's ``settings``, its ``engine``, ``n_genes`` and
    ``batch_categories``, a ``run_id`` shared with the outputs of the same run, and every
    other file with its size and SHA-256.
``model.pt``
    Parameters, the pickled likelihood, priors, scheme and (non-default) guide, the genes,
    batches, history and the training/validation split (``torch.save``).
``train_state.pt``
    Checkpoints only: what continues the run (:class:`pyro_scvi.train.loop.TrainState`).

:func:`read_model_dir` checks all of it and raises one :class:`ModelFileError` naming the
problem: a folder without a model, a damaged file (empty, truncated, text; the checksum or
unpickling fails), a foreign one (another format, or not our keys), a future format, or
settings with keys missing. Folders of format 0 (``model.pt`` and ``settings.json``, no
manifest: pyro_scvi before versioned files) are migrated on reading.

Both files are read with ``torch.load(..., weights_only=True)``: plain values, tensors,
numpy arrays and pyro_scvi's own component classes (:mod:`pyro_scvi.io.pickling` says
which), so loading a folder runs no code from it, whoever wrote it; the checksums only
catch damage. A folder whose pickle needs more (a component class of your own module)
loads only with ``trust=True`` (``--trust-model``), with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFileError
from .pickling import load_file

FORMAT = "pyro_scvi model"
#: The format this version writes. 0: no manifest (read and migrated); 1: manifest.
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.pt"
STATE_FILE = "train_state.pt"
_LEGACY_SETTINGS = "settings.json"

#: Keys of ``model.pt`` that every format has.
STATE_KEYS = (
    "settings",
    "model_state",
    "guide_state",
    "likelihood",
    "prior",
    "var_names",
    "batch_categories",
    "history",
    "train_indices",
    "validation_indices",
    "is_trained",
)
#: Keys of the settings that building the model needs.
SETTINGS_KEYS = (
    "layer",
    "batch_key",
    "n_latent",
    "n_hidden",
    "n_layers",
    "dropout_rate",
    "dispersion",
    "use_observed_lib_size",
)


def package_version() -> str:
    """The installed pyro_scvi version."""
    from .._version import __version__

    return __version__


def new_run_id() -> str:
    """A random id tying one run's outputs together (model manifest, AnnData ``uns``)."""
    return uuid.uuid4().hex


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_model_dir(
    directory: str | os.PathLike,
    state: dict,
    *,
    manifest: dict[str, Any],
    train_state: dict | None = None,
) -> dict:
    """Write ``state`` (and a checkpoint's ``train_state``) into the existing ``directory``.

    The manifest is written last, with each file's size and checksum; it holds
    ``manifest`` plus the format fields. Returns the manifest.
    """
    directory = Path(directory)
    files = {MODEL_FILE: state}
    if train_state is not None:
        files[STATE_FILE] = train_state
    listed = {}
    for name, payload in files.items():
        torch.save(payload, directory / name)
        listed[name] = {
            "bytes": (directory / name).stat().st_size,
            "sha256": _sha256(directory / name),
        }
    full = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "package_version": package_version(),
        "kind": "checkpoint" if train_state is not None else "model",
        **manifest,
        "files": listed,
    }
    with open(directory / MANIFEST, "w") as f:
        json.dump(full, f, indent=2, default=str)
        f.write("\n")
    return full


def _read_manifest(directory: Path) -> dict | None:
    """The manifest, ``None`` for a format-0 folder; :class:`ModelFileError` if unusable."""
    path = directory / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelFileError(
            f"{path} is damaged ({type(err).__name__}); save the model again."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ModelFileError(
            f"{directory} is not a pyro_scvi model folder (its {MANIFEST} says format "
            f"{found!r}, expected {FORMAT!r})."
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ModelFileError(
            f"{path} is damaged (format_version {version!r}); save the model again."
        )
    if version > FORMAT_VERSION:
        raise ModelFileError(
            f"{directory} was written by pyro_scvi {manifest.get('package_version', '?')} in "
            f"model format {version}; this pyro_scvi ({package_version()}) reads formats up to "
            f"{FORMAT_VERSION}. Upgrade pyro_scvi to load it."
        )
    if not isinstance(manifest.get("files"), dict):
        raise ModelFileError(f"{path} is damaged (no file list); save the model again.")
    return manifest


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder of pyro_scvi's holding nothing but what it wrote.

    A folder with a manifest of ours (any version) and only the files it lists, or a
    format-0 folder (exactly ``model.pt`` and a ``settings.json`` of ours). Nothing is
    unpickled. A folder that passes may be replaced by a new save; anything else is not.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "notes.txt").write_text("mine")
    >>> is_model_dir(d)
    False
    """
    path = Path(path)
    # A concurrent save may swap the folder while it is read (its old copy is then being
    # deleted): read one folder through a descriptor, and trust the answer only if that
    # folder is still the one at ``path``; otherwise look again at its replacement.
    for _ in range(20):
        if path.is_symlink() or not path.is_dir():
            return False
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            continue
        except OSError:
            return False
        try:
            answer = _is_model_dir_at(fd, path)
            here = os.stat(path)
            mine = os.fstat(fd)
            same = (here.st_ino, here.st_dev) == (mine.st_ino, mine.st_dev)
        except FileNotFoundError:
            same = False
        finally:
            os.close(fd)
        if same:
            return answer
    return False


def _read_text_at(fd: int, path: Path, name: str) -> str:
    if os.open in os.supports_dir_fd:
        file = os.open(name, os.O_RDONLY, dir_fd=fd)
        with os.fdopen(file, encoding="utf-8") as f:
            return f.read()
    return (path / name).read_text()


def _is_model_dir_at(fd: int, path: Path) -> bool:
    """:func:`is_model_dir` for the folder open as ``fd`` (FileNotFoundError: it went)."""
    names = set(os.listdir(fd) if os.listdir in os.supports_fd else os.listdir(path))
    if MANIFEST in names:
        try:
            manifest = json.loads(_read_text_at(fd, path, MANIFEST))
        except FileNotFoundError:
            raise
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return False
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return False
        files = manifest.get("files")
        return isinstance(files, dict) and names <= {MANIFEST, *files}
    if names != {MODEL_FILE, _LEGACY_SETTINGS}:
        return False
    try:
        settings = json.loads(_read_text_at(fd, path, _LEGACY_SETTINGS))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(settings, dict) and set(SETTINGS_KEYS) <= set(settings)


def _load(path: Path, what: str, trust: bool) -> Any:
    """``path`` unpickled safely (:func:`pyro_scvi.io.pickling.load_file`)."""
    return load_file(path, what, trust=trust)


def read_model_dir(
    path: str | os.PathLike, *, train_state: bool = False, trust: bool = False
) -> tuple[dict, dict, dict | None]:
    """Read and check a model folder: ``(manifest, state, train_state or None)``.

    The state is migrated to the current format; a format-0 folder gets a manifest built
    from its contents (``format_version`` 0). ``model.pt`` (and ``train_state.pt``) are
    read with ``weights_only=True`` and the allow-list of :mod:`pyro_scvi.io.pickling`;
    a file that needs more raises :class:`ModelFileError` unless ``trust`` (then it is
    fully unpickled, with a warning: only for folders you trust).
    """
    directory = Path(path)
    model_path = directory / MODEL_FILE
    if not directory.is_dir():
        raise ModelFileError(
            f"No saved model at {directory}: it is not a folder written by save()."
        )
    manifest = _read_manifest(directory)
    if manifest is None and not model_path.exists():
        raise ModelFileError(f"No saved model at {model_path}; pass the folder given to save().")
    if manifest is not None:
        wanted = [MODEL_FILE] + ([STATE_FILE] if train_state else [])
        for name in wanted:
            entry = manifest["files"].get(name)
            if entry is None:
                kind = "checkpoint" if name == STATE_FILE else "model"
                raise ModelFileError(
                    f"{directory} holds no {kind} ({name} is not in its {MANIFEST}); "
                    + (
                        "it is a saved model, not a training checkpoint."
                        if name == STATE_FILE
                        else "save the model again."
                    )
                )
            file = directory / name
            if not file.exists():
                raise ModelFileError(f"{file} is missing; the folder is incomplete.")
            size = file.stat().st_size
            if size != entry.get("bytes") or _sha256(file) != entry.get("sha256"):
                raise ModelFileError(
                    f"{file} is damaged: {size} bytes where {entry.get('bytes')} were written, "
                    "or its checksum differs (a cut-short copy, or the file was changed). "
                    "Save the model again."
                )
    elif train_state:
        raise ModelFileError(f"{directory} is a saved model of an old format, not a checkpoint.")
    state = _load(model_path, "a pyro_scvi model", trust)
    version = 0 if manifest is None else manifest["format_version"]
    state = migrate(state, version, where=str(model_path))
    if manifest is None:
        manifest = {
            "format": FORMAT,
            "format_version": 0,
            "kind": "model",
            "package_version": "before 0.1.0 manifests",
            "settings": state["settings"],
            "engine": state.get("engine"),
        }
    extra = _load(directory / STATE_FILE, "a training checkpoint", trust) if train_state else None
    if train_state and not isinstance(extra, dict):
        raise ModelFileError(f"{directory / STATE_FILE} is not a pyro_scvi training checkpoint.")
    return manifest, state, extra


def migrate(state: Any, version: int, *, where: str = "model.pt") -> dict:
    """Check a ``model.pt`` payload of format ``version`` and bring it to the current one.

    Format 0 has the same payload as format 1, with some keys absent in the oldest saves
    (``engine``, ``engines``, ``guide``, ``library_prior``): they get their defaults.
    """
    if not isinstance(state, dict):
        raise ModelFileError(
            f"{where} holds a {type(state).__name__}, not a pyro_scvi model; it was written by "
            "another program."
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise ModelFileError(
            f"{where} is not a pyro_scvi model (keys {missing} are missing); it was written by "
            "another program or is damaged."
        )
    settings = state["settings"]
    if not isinstance(settings, dict):
        raise ModelFileError(f"{where} has settings of type {type(settings).__name__}; damaged.")
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if missing:
        raise ModelFileError(
            f"{where}: the model's settings lack {missing}; the file is damaged or was edited. "
            "Save the model again."
        )
    state = dict(state)
    if version < 1:
        for key, default in (("engine", None), ("engines", []), ("guide", None)):
            state.setdefault(key, default)
    return state
