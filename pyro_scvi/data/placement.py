"""The data-source rule: a backed AnnData's counts are held in memory or streamed.

The choice is made here, once per run, and recorded with it
(``model.engine["reasons"]["data_source"]``); ``asked`` overrides it.
"""

from __future__ import annotations

from typing import Any

#: A backed AnnData is streamed from its file by default when its counts would take more
#: than this share of the memory the system has available.
STREAM_MEMORY_FRACTION = 0.5


def choose_data_source(adata: Any, *, layer: str | None = None, asked: bool | None = None):
    """Whether a backed AnnData's counts are streamed from the file or loaded.

    Loaded when they fit (at most :data:`STREAM_MEMORY_FRACTION` of the available memory,
    ``MemAvailable`` in ``/proc/meminfo``), else streamed
    (:class:`~pyro_scvi.data.StreamedCounts`); ``asked`` (True or False) decides instead.
    Returns ``(streamed, reason)``; the reason is recorded with the run
    (``model.engine["reasons"]["data_source"]``).
    """
    if asked is not None:
        return bool(asked), f"{'streamed' if asked else 'memory'}: asked for"
    matrix = adata.X if layer is None else adata.layers[layer]
    group = getattr(matrix, "group", None)  # a backed sparse matrix: its h5py group
    nnz = getattr(matrix, "nnz", None) if group is None else group["data"].shape[0]
    if nnz is None:  # dense on disk
        nbytes = 4 * matrix.shape[0] * matrix.shape[1]
    else:
        nbytes = 8 * int(nnz) + 8 * (matrix.shape[0] + 1)
    available = available_memory()
    if available is None:
        return False, "memory: the available memory is unknown"
    budget = STREAM_MEMORY_FRACTION * available
    stream = nbytes > budget
    return stream, (
        f"{'streamed' if stream else 'memory'}: counts {nbytes / 2**30:.2f} GiB in memory, "
        f"{STREAM_MEMORY_FRACTION:g} x available {available / 2**30:.1f} GiB"
    )


def available_memory() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or ``None`` where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
