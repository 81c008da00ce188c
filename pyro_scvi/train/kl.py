"""KL warm-up: the weight of the ``z`` terms each epoch, and the handler that applies it.

In epoch ``e`` (counting from 0) the ``z`` terms of the ELBO are scaled by
``min(1, e / kl_warmup_epochs)`` (:func:`kl_weight`). The weight is applied by the Pyro
handler :class:`KLWeight` around the model and the guide, so neither takes it as an
argument: :class:`Annealed` calls a model or guide under it, :class:`JitCall` does the
same with the calling convention of Pyro's JIT ELBOs (the weight a tensor input of the
compiled graph). A model may name other annealed sites in ``annealed_sites``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro.poutine.messenger import Messenger


def kl_weight(epoch: int, kl_warmup_epochs: int) -> float:
    """Weight of the ``z`` KL terms in epoch ``epoch`` (see the module docstring).

    Examples
    --------
    >>> [kl_weight(e, 4) for e in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if kl_warmup_epochs <= 0:
        return 1.0
    return min(1.0, epoch / kl_warmup_epochs)


class KLWeight(Messenger):
    """Pyro handler: scale the log-densities of the sites ``sites`` by ``weight`` (KL warm-up).

    Applied around both the model and the guide, it scales those sites' terms of the ELBO,
    their KL divergence, by ``weight``. ``poutine.scale`` rejects 0, so a zero weight masks
    the terms out instead. A tensor weight is an input of a compiled (JIT) ELBO and changes
    between calls of one compiled graph, so it cannot choose between mask and scale: 0
    becomes the smallest positive float, whose terms vanish below rounding (``1e-38``
    times a log-density).

    Examples
    --------
    >>> import pyro, pyro.distributions as dist, torch
    >>> def model():
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    ...     pyro.sample("l", dist.Normal(0.0, 1.0))
    >>> tr = pyro.poutine.trace(KLWeight(0.25)(model)).get_trace()
    >>> tr.nodes["z"]["scale"], tr.nodes["l"]["scale"]
    (0.25, 1.0)
    """

    def __init__(self, weight: float | torch.Tensor, sites: Sequence[str] = ("z",)) -> None:
        super().__init__()
        self.weight, self.sites = weight, frozenset(sites)

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample" or msg["name"] not in self.sites:
            return
        w = self.weight
        if isinstance(w, torch.Tensor):
            msg["scale"] = w.clamp_min(torch.finfo(w.dtype).tiny) * msg["scale"]
        elif w <= 0:
            msg["mask"] = False if msg["mask"] is None else msg["mask"] & False
        elif w != 1.0:
            msg["scale"] = w * msg["scale"]


def annealed_sites(fn: Callable) -> tuple[str, ...]:
    """The sites KL warm-up scales for a model or guide: ``fn.annealed_sites``, else ``z``."""
    return tuple(getattr(fn, "annealed_sites", ("z",)))


class Annealed:
    """A model or guide called as ``(x, batch_index, cell_index, num_cells, kl_weight)``.

    Runs ``fn(x, batch_index, cell_index, num_cells)`` under :class:`KLWeight`, for the
    sites ``fn.annealed_sites`` names (default ``z``): how the training step calls the
    model and the guide of an uncompiled ELBO.

    Examples
    --------
    >>> import pyro, pyro.distributions as dist
    >>> def model(x, batch_index, cell_index, num_cells):
    ...     pyro.sample("z", dist.Normal(0.0, 1.0))
    >>> tr = pyro.poutine.trace(Annealed(model)).get_trace(None, None, None, None, 0.5)
    >>> tr.nodes["z"]["scale"]
    0.5
    """

    def __init__(self, fn: Callable, sites: Sequence[str] | None = None) -> None:
        self.fn = fn
        self.sites = tuple(sites) if sites is not None else annealed_sites(fn)

    def __call__(self, x, batch_index, cell_index=None, num_cells=None, kl_weight=1.0):
        """``fn(x, batch_index, cell_index, num_cells)`` under the KL weight."""
        with KLWeight(kl_weight, self.sites):
            return self.fn(x, batch_index, cell_index, num_cells)


class JitCall:
    """A model or guide with the calling convention of Pyro's JIT ELBOs.

    Called as ``(x, batch_index, cell_index, kl_weight, *, num_cells, n_cells)``: tensors
    positionally (inputs of the compiled graph; ``kl_weight`` a 0-d tensor), the rest as
    keywords (the compiled-graph cache key). ``n_cells``, the minibatch size, is only
    there to give each minibatch size its own graph. ``fn`` runs as
    ``fn(x, batch_index, cell_index, num_cells)`` under :class:`KLWeight`.
    """

    def __init__(self, fn: Callable, sites: Sequence[str] | None = None) -> None:
        self.fn = fn
        self.sites = tuple(sites) if sites is not None else annealed_sites(fn)

    def __call__(self, x, batch_index, cell_index, kl_weight, *, num_cells, n_cells):
        """``fn(x, batch_index, cell_index, num_cells)`` under the KL weight."""
        with KLWeight(kl_weight, self.sites):
            return self.fn(x, batch_index, cell_index, num_cells)
