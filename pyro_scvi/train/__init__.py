"""Training: the engine that decides how a run steps and assembles the step; the SVI loop.

In the order a run meets them: :class:`~pyro_scvi.train.engine.Engine` is the one place
where every automatic choice of a run is made (compiled or eager, fused kernel, threads,
data placement, data parallelism), and its resolved
:class:`~pyro_scvi.train.engine.RunEngine` assembles the run's step
(:class:`~pyro_scvi.train.stepper.Stepper`: ELBO, optimizer, kernel handler,
data-parallel group); :func:`~pyro_scvi.train.loop.train_svi` runs the epochs and calls
the named hooks of :mod:`~pyro_scvi.train.hooks` (validation, early stopping,
checkpoints, interrupts, the last good epoch). :mod:`~pyro_scvi.train.kl` (KL warm-up),
:mod:`~pyro_scvi.train.optim` (Adam), :mod:`~pyro_scvi.train.passes` (passes that change
no parameter), :mod:`~pyro_scvi.train.kernels` (the fused ZINB kernel) and
:mod:`~pyro_scvi.train.distributed` (data parallelism) are the parts.
"""

from __future__ import annotations

from .._lazy import attach

_SUBMODULES = ["distributed", "engine", "hooks", "kernels", "kl", "loop", "optim", "passes"]
_SUBMODULES += ["stepper"]

__all__ = ["Engine", "RunEngine", "Stepper", "TrainState", *_SUBMODULES, "train_svi"]

__getattr__, __dir__ = attach(
    __name__,
    submodules=_SUBMODULES,
    names={
        "Engine": "engine",
        "RunEngine": "engine",
        "Stepper": "stepper",
        "TrainState": "loop",
        "train_svi": "loop",
    },
)
