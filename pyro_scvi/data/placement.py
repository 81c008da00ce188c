"""The data-source rule: a backed AnnData's counts are held in memory or streamed.

The choice is made here, once per run, and recorded with it
(``model.engine["reasons"]["data_source"]``); ``asked`` overrides it.
"""

from __future__ import annotations

from typing import Any

#: A backed AnnData is streamed from its file by default when its counts would take more
#: than this share of the memory the system has available.
STREAM_MEMORY_FRACTION = 0.5


#: A CPU run holds in-memory counts as one dense block, and gathers its minibatches from it,
#: when that block takes at most this many bytes (:func:`dense_gather`): an indexed copy of
#: dense rows costs a third to a half less than slicing a CSR matrix and densifying the
#: slice (per 128 cells at one thread, 0.07 ms instead of 0.10 ms on 200 genes, 2 ms
#: instead of 4 ms on 13,033 genes), with the same values. CellBench's 450 x 13,033 counts
#: take 23 MiB.
DENSE_GATHER_MAX_BYTES = 2**28


def dense_gather(device_type: str, dense_bytes: int | None, streamed: bool) -> bool:
    """Whether a run holds its counts as one dense block and gathers minibatches from it.

    On a CPU (``device_type`` ``"cpu"``), for in-memory counts of at most
    :data:`DENSE_GATHER_MAX_BYTES` as a dense block (``dense_bytes``, from
    :meth:`~pyro_scvi.data.CountData.dense_bytes`; ``None``: unknown, so no). The training
    engine decides ``data_placement="device"`` by it, and the run's step
    (:meth:`~pyro_scvi.train.stepper.Stepper.place`) holds the block by it; the choice is
    recorded in ``model.engine["reasons"]["data_placement"]``.

    Examples
    --------
    >>> dense_gather("cpu", 23 * 2**20, streamed=False), dense_gather("cpu", 2**30, False)
    (True, False)
    """
    return (
        device_type == "cpu"
        and not streamed
        and dense_bytes is not None
        and dense_bytes <= DENSE_GATHER_MAX_BYTES
    )


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
