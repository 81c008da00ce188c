"""Counts in: AnnData checks, count sources (in memory, streamed), the data-source rule.

The first stage of the pipeline; it imports nothing from the later ones.
:mod:`~pyro_scvi.data.datasets` ships and simulates datasets.
"""

from __future__ import annotations

from .._lazy import attach
from .counts import (
    BLOCK_CELLS,
    MAX_COUNT,
    READ_AHEAD_BLOCKS,
    CountData,
    ResidentCounts,
    StreamedCounts,
    check_batch_sizes,
    check_indices,
    from_anndata,
    gene_order,
    nonempty_cells,
    require_unique_obs_names,
)
from .placement import STREAM_MEMORY_FRACTION, choose_data_source

__all__ = [
    "BLOCK_CELLS",
    "MAX_COUNT",
    "READ_AHEAD_BLOCKS",
    "STREAM_MEMORY_FRACTION",
    "CountData",
    "ResidentCounts",
    "StreamedCounts",
    "check_batch_sizes",
    "check_indices",
    "choose_data_source",
    "datasets",
    "from_anndata",
    "gene_order",
    "nonempty_cells",
    "require_unique_obs_names",
]

__getattr__, __dir__ = attach(__name__, submodules=["datasets"])
