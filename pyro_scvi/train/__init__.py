"""Training: the engine that decides and records how a run steps, and the SVI loop.

:class:`~pyro_scvi.train.engine.Engine` is the one place where every automatic choice of
a run is made (compiled or eager, fused kernel, threads, data placement, data
parallelism); :func:`~pyro_scvi.train.loop.train_svi` runs the epochs.
"""

from __future__ import annotations

from .._lazy import attach

__all__ = ["Engine", "RunEngine", "TrainState", "distributed", "engine", "kernels", "loop"]
__all__ += ["train_svi"]

__getattr__, __dir__ = attach(
    __name__,
    submodules=["distributed", "engine", "kernels", "loop"],
    names={"Engine": "engine", "RunEngine": "engine", "TrainState": "loop", "train_svi": "loop"},
)
