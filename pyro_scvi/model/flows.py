"""Conditional normalizing-flow layers for guides, with plain tensor state.

A layer is an :class:`torch.nn.Module` with ``transform(context)``, returning a bijective
:class:`torch.distributions.Transform` on vectors (``event_dim=1``) for the given context;
:class:`~pyro_scvi.model.guides.FlowGuide` stacks layers between a standard Normal and the
encoder's Gaussian. The layers keep only parameters and buffers (the transform objects are
made per call), so a saved guide holds nothing but pyro_scvi modules and tensors.

:class:`ConditionalAffineAutoregressive` is an inverse autoregressive flow layer (Kingma et
al., 2016) whose shift and log-scale come from a MADE network (Germain et al., 2015) of the
input and the context: sampling is one pass, the density of a given value ``D`` passes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Transform, constraints

#: Bound on a layer's log-scale: ``3 tanh(raw / 3)`` keeps each layer's stretch within
#: ``e^-3..e^3``, so one bad step cannot blow a draw up.
LOG_SCALE_BOUND = 3.0


class ConditionalAffineAutoregressive(nn.Module):
    """``y = x * exp(s(x_<i, c)) + m(x_<i, c)`` coordinate by coordinate, given context ``c``.

    Parameters
    ----------
    dim
        Dimension of ``x``.
    context_dim
        Dimension of the context ``c`` (e.g. an encoder's hidden layer).
    n_hidden
        Hidden units of the MADE network.
    reverse
        Order the coordinates last to first, so stacked layers alternate their order.

    The output layers start at zero: a new layer is the identity.

    Examples
    --------
    >>> import torch
    >>> layer = ConditionalAffineAutoregressive(3, 4)
    >>> x, c = torch.randn(5, 3), torch.randn(5, 4)
    >>> t = layer.transform(c)
    >>> bool(torch.equal(t(x), x))  # the identity at first
    True
    >>> with torch.no_grad():
    ...     _ = layer.shift.weight.normal_()
    >>> t = layer.transform(c)
    >>> torch.allclose(t.inv(t(x)), x, atol=1e-5)
    True
    """

    def __init__(self, dim: int, context_dim: int, n_hidden: int = 32, reverse: bool = False):
        super().__init__()
        self.dim, self.reverse = int(dim), bool(reverse)
        # MADE degrees: input i has degree i + 1, hidden units 1..dim-1 in turn (0 for a
        # 1-d input: then only the context drives the shift and scale)
        d_in = torch.arange(1, dim + 1)
        d_hidden = torch.arange(n_hidden) % max(dim - 1, 1) + (1 if dim > 1 else 0)
        self.register_buffer("mask_in", (d_hidden[:, None] >= d_in[None, :]).float())
        self.register_buffer("mask_out", (d_in[:, None] > d_hidden[None, :]).float())
        self.inner = nn.Linear(dim, n_hidden)
        self.context = nn.Linear(context_dim, n_hidden)
        self.shift = nn.Linear(n_hidden, dim)
        self.log_scale = nn.Linear(n_hidden, dim)
        for head in (self.shift, self.log_scale):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def extra_repr(self) -> str:  # noqa: D102
        return f"dim={self.dim}, reverse={self.reverse}"

    def params(self, x: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shift and log-scale of every coordinate, each from the coordinates before it."""
        if self.reverse:
            x = x.flip(-1)
        c = c.expand(x.shape[:-1] + c.shape[-1:])
        h = torch.relu(nn.functional.linear(x, self.inner.weight * self.mask_in, self.inner.bias))
        h = h + self.context(c)
        m = nn.functional.linear(h, self.shift.weight * self.mask_out, self.shift.bias)
        s = nn.functional.linear(h, self.log_scale.weight * self.mask_out, self.log_scale.bias)
        s = LOG_SCALE_BOUND * torch.tanh(s / LOG_SCALE_BOUND)
        return (m.flip(-1), s.flip(-1)) if self.reverse else (m, s)

    def transform(self, context: torch.Tensor) -> Transform:
        """The layer's bijection for ``context`` (broadcast against the input's leading axes)."""
        return _AffineAutoregressiveTransform(self, context)


class _AffineAutoregressiveTransform(Transform):
    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, layer: ConditionalAffineAutoregressive, context: torch.Tensor) -> None:
        super().__init__(cache_size=1)  # a draw's density needs no inversion
        self.layer, self.c = layer, context

    def __eq__(self, other) -> bool:
        return self is other

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        m, s = self.layer.params(x, self.c)
        return x * torch.exp(s) + m

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        # coordinate i is exact after pass i: dim passes in all
        x = torch.zeros_like(y)
        for _ in range(self.layer.dim):
            m, s = self.layer.params(x, self.c)
            x = (y - m) * torch.exp(-s)
        return x

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.layer.params(x, self.c)[1].sum(-1)
