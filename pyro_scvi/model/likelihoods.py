"""Observation models p(x | mu, theta, gate) for counts, as objects passed to the model.

A likelihood turns the decoder's outputs into a Pyro distribution over the counts of a
cell-by-gene block. Each declares which decoder outputs it needs, so the decoder builds
only those heads.

Shipped: :class:`ZINB` (scVI's default), :class:`NB`, :class:`Poisson` and :class:`ZIP`.

Adding a likelihood
-------------------
Subclass :class:`Likelihood`, set ``uses_dispersion`` (the decoder then provides the
inverse dispersion ``theta``) and ``uses_gate`` (zero-inflation ``gate_logits``), give it a
``name``, and implement ``__call__(mu, theta, gate_logits)`` returning a Pyro distribution
with ``batch_shape`` equal to the broadcast shape of its arguments; arguments it does not
use arrive as ``None``. Set ``static_structure = True`` if ``__call__`` has no Python
branches on tensor values, so that long runs may compile the ELBO
(:mod:`pyro_scvi.train.engine`). For example the negative binomial as Pyro's Gamma-Poisson mixture:

>>> import pyro.distributions as dist
>>> class GammaPoisson(Likelihood):
...     uses_dispersion = True
...     name = "gamma-poisson"
...
...     def __call__(self, mu, theta, gate_logits=None):
...         # Gamma(theta, theta / mu) has mean mu; mixing a Poisson over it gives NB(mu, theta)
...         return dist.GammaPoisson(concentration=theta, rate=theta / mu)
>>> import torch
>>> d = GammaPoisson()(torch.full((2, 3), 4.0), torch.full((3,), 2.0), None)
>>> tuple(d.batch_shape), float(d.variance[0, 0])  # mu + mu**2 / theta
((2, 3), 12.0)

Pass an instance as ``SCVI(adata, likelihood=GammaPoisson())``. To offer it on the command
line (``pyro-scvi fit --likelihood``), add the class to :data:`LIKELIHOODS` below.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from scipy import special

from .distributions import EPS, ZeroInflatedNegativeBinomialMeanDispersion, nb_logits


class Likelihood:
    """Base class of count likelihoods.

    Attributes
    ----------
    uses_dispersion
        Whether the distribution needs the inverse dispersion ``theta``.
    uses_gate
        Whether the distribution needs zero-inflation ``gate_logits``.
    """

    uses_dispersion: bool = False
    uses_gate: bool = False
    #: Dropout probability every cell and gene starts with (zero-inflated likelihoods);
    #: None leaves the gate head's bias at its layer's random initialization.
    initial_dropout: float | None = None
    #: Whether ``__call__`` builds the same distribution structure on every call (no
    #: Python control flow on tensor values), so that a compiled (JIT) ELBO may hold it.
    static_structure: bool = False
    #: Whether its distribution can compute the log-density with the fused kernel of
    #: :mod:`pyro_scvi.train.kernels` (the training engine decides whether it does).
    fused_kernel: bool = False
    #: Short name used by the CLI and in saved settings.
    name: str = "likelihood"

    def __call__(
        self, mu: torch.Tensor, theta: torch.Tensor | None, gate_logits: torch.Tensor | None
    ) -> dist.TorchDistribution:
        """Return the distribution of counts with mean ``mu``."""
        raise NotImplementedError

    @property
    def gate_init_logit(self) -> float | None:
        """``logit(initial_dropout)``: the initial bias of the decoder's zero-inflation head."""
        if self.initial_dropout is None:
            return None
        return float(special.logit(self.initial_dropout))

    def __repr__(self) -> str:
        default = type(self).initial_dropout
        if self.uses_gate and self.initial_dropout != default:
            return f"{type(self).__name__}(initial_dropout={self.initial_dropout!r})"
        return f"{type(self).__name__}()"


class _ZeroInflated(Likelihood):
    """Shared by :class:`ZINB` and :class:`ZIP`: the initial dropout probability.

    The gate starts at ``initial_dropout`` (default 0.05) for every cell and gene, so a
    fit starts close to its count distribution without zero inflation and gives zeros to
    the gate where the data call for it. A freshly initialised layer (``None``, the start
    before this option existed) puts the gate near 0.5: half of every gene's mass is a
    dropout at first; on some data (the Zeisel cortex subset) that start gave clearly
    worse clusters, with a held-out log p(x) within 0.2% of the new start's
    (``benchmarks/results/gate_init.md``).

    Examples
    --------
    >>> ZINB().initial_dropout, round(ZINB().gate_init_logit, 3), ZINB(initial_dropout=0.2)
    (0.05, -2.944, ZINB(initial_dropout=0.2))
    """

    uses_gate = True
    initial_dropout: float | None = 0.05

    def __init__(self, initial_dropout: float | None = 0.05) -> None:
        if initial_dropout is not None:
            if not 0.0 < float(initial_dropout) < 1.0:
                raise ValueError(
                    f"initial_dropout={initial_dropout!r}; it is a probability strictly "
                    "between 0 and 1, e.g. 0.05 (or None: the layer's random start)."
                )
            initial_dropout = float(initial_dropout)
        self.initial_dropout = initial_dropout


class ZINB(_ZeroInflated):
    """Zero-inflated negative binomial, scVI's default.

    ``x ~ gate * Delta(0) + (1 - gate) * NB(mu, theta)`` with ``gate = sigmoid(gate_logits)``,
    as :class:`~pyro_scvi.model.distributions.ZeroInflatedNegativeBinomialMeanDispersion`, whose
    fused log-density is about 1.5x faster than the generic mixture's.

    Parameters
    ----------
    initial_dropout
        The gate's starting value for every cell and gene (``None``: a fresh layer's
        random start, near 0.5; ``benchmarks/results/gate_init.md`` compares the two).

    Examples
    --------
    >>> import torch
    >>> d = ZINB()(torch.ones(2, 3), torch.ones(3), torch.zeros(2, 3))
    >>> tuple(d.batch_shape)
    (2, 3)
    """

    uses_dispersion = True
    static_structure = True
    fused_kernel = True
    name = "zinb"

    def __call__(self, mu, theta, gate_logits):  # noqa: D102
        return ZeroInflatedNegativeBinomialMeanDispersion(mu, theta, gate_logits)


class NB(Likelihood):
    """Negative binomial with mean ``mu`` and inverse dispersion ``theta``.

    Examples
    --------
    >>> import torch
    >>> float(NB()(torch.tensor(4.0), torch.tensor(2.0), None).variance)
    12.0
    """

    uses_dispersion = True
    static_structure = True
    name = "nb"

    def __call__(self, mu, theta, gate_logits=None):  # noqa: D102
        return dist.NegativeBinomial(total_count=theta, logits=nb_logits(mu, theta))


class Poisson(Likelihood):
    """Poisson with rate ``mu``; no dispersion, no zero inflation.

    Examples
    --------
    >>> import torch
    >>> float(Poisson()(torch.tensor(3.0), None, None).mean)
    3.0
    """

    static_structure = True
    name = "poisson"

    def __call__(self, mu, theta=None, gate_logits=None):  # noqa: D102
        return dist.Poisson(mu)


class ZIP(_ZeroInflated):
    """Zero-inflated Poisson, Pyro's :class:`~pyro.distributions.ZeroInflatedPoisson`.

    ``x ~ gate * Delta(0) + (1 - gate) * Poisson(mu)`` with ``gate = sigmoid(gate_logits)``:
    zero inflation without overdispersion.

    Examples
    --------
    >>> import torch
    >>> d = ZIP()(torch.tensor(3.0), None, torch.tensor(0.0))
    >>> round(float(d.mean), 4), round(float(d.log_prob(torch.tensor(0.0)).exp()), 4)
    (1.5, 0.5249)
    """

    static_structure = True
    name = "zip"

    def __call__(self, mu, theta=None, gate_logits=None):  # noqa: D102
        # Pyro's rate must be strictly positive; softmax can underflow to exactly 0 in float32.
        return dist.ZeroInflatedPoisson(rate=mu + EPS, gate_logits=gate_logits)


#: The likelihoods the CLI knows by name.
LIKELIHOODS: dict[str, type[Likelihood]] = {cls.name: cls for cls in (ZINB, NB, Poisson, ZIP)}
