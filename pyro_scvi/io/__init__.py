"""Files: model folders with their manifest, safe (atomic) output, outputs at scale.

:mod:`~pyro_scvi.io.model_dir` reads and writes model folders (its names are re-exported
here), :mod:`~pyro_scvi.io.files` writes any output atomically and checks free space
first, :mod:`~pyro_scvi.io.outputs` plans and writes normalized expression in chunks, and
:mod:`~pyro_scvi.io.pickling` reads model files without running code from them
(``weights_only=True`` and an allow-list of pyro_scvi's components; ``trust=True`` for
anything else) and finds what a saved model could not re-import elsewhere.
:mod:`~pyro_scvi.io.persistence` saves and loads whole models and training checkpoints.
"""

from __future__ import annotations

from .._lazy import attach
from ..errors import ModelFileError

_MODEL_DIR_NAMES = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "SETTINGS_KEYS",
    "STATE_FILE",
    "STATE_KEYS",
    "is_model_dir",
    "migrate",
    "new_run_id",
    "package_version",
    "read_model_dir",
    "write_model_dir",
]

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "MODEL_FILE",
    "SETTINGS_KEYS",
    "STATE_FILE",
    "STATE_KEYS",
    "ModelFileError",
    "files",
    "is_model_dir",
    "migrate",
    "model_dir",
    "new_run_id",
    "outputs",
    "package_version",
    "persistence",
    "pickling",
    "read_model_dir",
    "write_model_dir",
]

# lazy: the command line reads model folders' paths before it knows it needs torch
__getattr__, __dir__ = attach(
    __name__,
    submodules=["files", "model_dir", "outputs", "persistence", "pickling"],
    names=dict.fromkeys(_MODEL_DIR_NAMES, "model_dir"),
)
