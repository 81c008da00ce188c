"""Priors of the model's latent variables, as objects passed to the model.

A prior on ``z`` is an :class:`torch.nn.Module` whose ``forward()`` returns a Pyro
distribution with ``event_shape == (n_latent,)`` and an empty (or broadcastable)
``batch_shape``; the model samples it inside the ``cells`` plate. Learnable priors keep their
parameters as module parameters, so the optimizer trains them with everything else.

The prior of the log-library ``l`` is per batch: ``l ~ Normal(loc[batch], scale[batch])``,
with ``loc`` and ``scale`` the mean and standard deviation of the log total counts of each
batch's cells (Lopez et al., 2018).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn


class Prior(nn.Module):
    """Base class of priors on ``z``.

    Subclasses implement :meth:`forward`; :meth:`setup` is called once with the latent
    dimension before training, and is where a learnable prior creates its parameters.
    """

    n_latent: int | None = None

    def setup(self, n_latent: int) -> None:
        """Fix the latent dimension; learnable priors create their parameters here."""
        self.n_latent = int(n_latent)

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        raise NotImplementedError


class StandardNormal(Prior):
    """``z ~ Normal(0, I)``, the prior of the scVI paper.

    Examples
    --------
    >>> p = StandardNormal()
    >>> p.setup(10)
    >>> tuple(p().event_shape)
    (10,)
    """

    def __init__(self) -> None:
        super().__init__()
        # A buffer, not a constant, so that ``.to(device)`` moves the prior with the model.
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        if self.n_latent is None:
            raise RuntimeError("Call StandardNormal.setup(n_latent) before sampling from it.")
        loc = self._zero.expand(self.n_latent)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def __repr__(self) -> str:
        return "StandardNormal()"


class LogNormalLibrary(nn.Module):
    """Per-batch prior of the log-library ``l = log(library size)``.

    Parameters
    ----------
    loc, scale
        Mean and standard deviation of ``l`` for each batch, shape ``(n_batch,)``.

    Examples
    --------
    >>> import torch
    >>> p = LogNormalLibrary(torch.tensor([7.0, 8.0]), torch.tensor([0.5, 0.4]))
    >>> tuple(p(torch.tensor([0, 1, 1])).batch_shape)
    (3, 1)
    """

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        loc, scale = torch.as_tensor(loc).float(), torch.as_tensor(scale).float()
        if loc.shape != scale.shape or loc.dim() != 1:
            raise ValueError("loc and scale must both have shape (n_batch,).")
        if not (scale > 0).all():
            raise ValueError("Every batch needs a positive library-size scale.")
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def forward(self, batch_index: torch.Tensor) -> dist.TorchDistribution:
        """Distribution of ``l`` for each cell, shape ``(cells, 1)`` to broadcast over genes."""
        return dist.Normal(
            self.loc[batch_index].unsqueeze(-1), self.scale[batch_index].unsqueeze(-1)
        )
