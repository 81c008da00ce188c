"""Parametrization helpers between scVI's (mean, inverse dispersion) and Pyro's NB.

scVI writes the negative binomial as NB(mu, theta): mean ``mu`` and inverse dispersion
``theta``, so that Var = mu + mu**2 / theta. ``torch``/``pyro`` write it as
``NegativeBinomial(total_count, logits)``, counting successes before ``total_count``
failures, with mean ``total_count * exp(logits)``. Setting ``total_count = theta``
gives ``logits = log(mu) - log(theta)``. That conversion lives here and only here.

References
----------
Lopez, R., Regier, J., Cole, M. B., Jordan, M. I. & Yosef, N. Deep generative modeling for
single-cell transcriptomics. Nature Methods 15, 1053-1058 (2018).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from pyro.distributions import TorchDistribution, constraints

#: Keeps ``log`` finite when a decoder drives a mean or dispersion to exactly zero.
EPS = 1e-8


def nb_logits(mu: torch.Tensor, theta: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """Pyro/torch negative-binomial ``logits`` for mean ``mu`` and inverse dispersion ``theta``.

    Parameters
    ----------
    mu
        Mean of the negative binomial, ``> 0``.
    theta
        Inverse dispersion (``total_count`` in torch), ``> 0``.
    eps
        Added inside both logarithms so that ``mu == 0`` gives a very negative logit
        instead of ``-inf``.

    Returns
    -------
    torch.Tensor
        ``log(mu + eps) - log(theta + eps)``, broadcast over ``mu`` and ``theta``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> mu, theta = torch.tensor(5.0), torch.tensor(2.0)
    >>> d = dist.NegativeBinomial(total_count=theta, logits=nb_logits(mu, theta))
    >>> round(float(d.mean), 4), round(float(d.variance), 4)
    (5.0, 17.5)
    """
    # total_count * exp(logits) is torch's NB mean; solve it for logits with total_count=theta.
    return torch.log(mu + eps) - torch.log(theta + eps)


def zinb_log_prob(
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    *,
    lgamma: Callable[[torch.Tensor], torch.Tensor] = torch.lgamma,
    lgamma_theta: torch.Tensor | None = None,
) -> torch.Tensor:
    """Elementwise log ZINB(value; mean ``mu``, inverse dispersion ``theta``, gate logits).

    The closed form of :class:`ZeroInflatedNegativeBinomialMeanDispersion` (its docstring
    derives it), as a plain torch function so that a loop without Pyro can share it.
    ``lgamma`` is the log-gamma function used per entry (:mod:`pyro_scvi.train.kernels` passes
    a series that compiles into vectorized code) and ``lgamma_theta``, if given, is
    ``lgamma(theta)`` already computed at ``theta``'s own shape.

    With torch's ``lgamma`` the terms that only non-zero counts have
    (``lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)``) are computed at the non-zero
    entries alone: torch evaluates ``lgamma`` and its derivative ``digamma`` one element
    at a time, and single-cell counts are 55-99% zeros.

    Examples
    --------
    >>> import torch
    >>> x = torch.tensor(0.0)
    >>> round(float(zinb_log_prob(x, torch.tensor(2.0), torch.tensor(3.0), x).exp()), 4)
    0.608
    """
    pi = gate_logits
    log_theta_mu = torch.log(theta + mu + EPS)
    # theta * log(theta / (theta + mu)): the NB's log-probability of a zero
    nb_zero = theta * (torch.log(theta + EPS) - log_theta_mu)
    softplus_pi = torch.nn.functional.softplus(pi)
    zero_case = torch.logaddexp(pi, nb_zero) - softplus_pi
    nonzero_case = nb_zero - softplus_pi + value * (torch.log(mu + EPS) - log_theta_mu)
    lgamma_theta = torch.lgamma(theta) if lgamma_theta is None else lgamma_theta
    out = torch.where(value == 0, zero_case, nonzero_case)
    if lgamma is torch.lgamma and value.dim() > 0 and value.shape == out.shape:
        nz = value.nonzero(as_tuple=True)
        x_nz = value[nz]
        count_terms = (
            lgamma(x_nz + theta.expand(out.shape)[nz])
            - lgamma_theta.expand(out.shape)[nz]
            - lgamma(x_nz + 1)
        )
        return out.index_put(nz, count_terms, accumulate=True)
    # x == 0 makes these terms vanish: lgamma(theta) - lgamma(theta) - lgamma(1)
    return out + torch.where(
        value == 0, 0.0, lgamma(value + theta) - lgamma_theta - lgamma(value + 1)
    )


class ZeroInflatedNegativeBinomialMeanDispersion(TorchDistribution):
    """ZINB in scVI's parametrization, with a fused log-density.

    ``x ~ gate * Delta(0) + (1 - gate) * NB(mu, theta)``, ``gate = sigmoid(gate_logits)``.
    Sampling, mean and variance defer to :class:`pyro.distributions.ZeroInflatedNegativeBinomial`
    (via :func:`nb_logits`); :meth:`log_prob` is written out so that one pass computes it:

    - ``x == 0``: ``log(gate + (1 - gate) * (theta / (theta + mu))**theta)``
      ``= logaddexp(gate_logits, theta * log(theta / (theta + mu))) - softplus(gate_logits)``;
    - ``x > 0``: ``-softplus(gate_logits) + log NB(x; mu, theta)`` with
      ``log NB = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
      + theta * log(theta / (theta + mu)) + x * log(mu / (theta + mu))``.

    It avoids the generic mixture's two full log-densities and its ``logsumexp`` over a
    stacked tensor; ``lgamma(theta)`` is evaluated at ``theta``'s own shape (one value per
    gene for gene-wise dispersion), not per entry. The formula is :func:`zinb_log_prob`.

    Parameters
    ----------
    mu, theta, gate_logits
        Mean (>= 0), inverse dispersion (> 0) and zero-inflation logits, broadcastable.
    log_density
        What computes the log-density instead of :func:`zinb_log_prob` (see
        :meth:`with_log_density`); ``None``: :func:`zinb_log_prob`.

    Examples
    --------
    >>> import torch
    >>> d = ZeroInflatedNegativeBinomialMeanDispersion(
    ...     torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.0))
    >>> round(float(d.log_prob(torch.tensor(0.0)).exp()), 4)  # 0.5 + 0.5 * 0.6**3
    0.608
    """

    arg_constraints = {
        # softmax can underflow to exactly 0 in float32; EPS keeps the logs finite there
        "mu": constraints.nonnegative,
        "theta": constraints.positive,
        "gate_logits": constraints.real,
    }
    support = constraints.nonnegative_integer

    def __init__(
        self,
        mu: torch.Tensor,
        theta: torch.Tensor,
        gate_logits: torch.Tensor,
        validate_args: bool | None = None,
        *,
        log_density: Callable | None = None,
    ) -> None:
        self.mu, self.theta, self.gate_logits = mu, theta, gate_logits
        self.log_density = log_density
        batch_shape = torch.broadcast_shapes(mu.shape, theta.shape, gate_logits.shape)
        super().__init__(batch_shape, validate_args=validate_args)

    def _pyro_zinb(self) -> dist.ZeroInflatedNegativeBinomial:
        return dist.ZeroInflatedNegativeBinomial(
            total_count=self.theta,
            logits=nb_logits(self.mu, self.theta),
            gate_logits=self.gate_logits,
            validate_args=False,
        ).expand(self.batch_shape)

    def expand(self, batch_shape, _instance=None):  # noqa: D102
        # Only the batch shape changes: the parameters stay as they are, broadcasting in
        # log_prob. Pyro's plates expand every sample site's distribution, and an expanded
        # theta would cost lgamma(theta), and its digamma backward, per entry instead of
        # per gene.
        batch_shape = torch.Size(batch_shape)
        try:
            compatible = torch.broadcast_shapes(self.batch_shape, batch_shape) == batch_shape
        except RuntimeError:
            compatible = False
        if not compatible:
            raise ValueError(
                f"Cannot expand batch shape {tuple(self.batch_shape)} to {tuple(batch_shape)}."
            )
        new = self._get_checked_instance(ZeroInflatedNegativeBinomialMeanDispersion, _instance)
        new.mu, new.theta, new.gate_logits = self.mu, self.theta, self.gate_logits
        new.log_density = self.log_density
        super(ZeroInflatedNegativeBinomialMeanDispersion, new).__init__(
            batch_shape, validate_args=False
        )
        return new

    def sample(self, sample_shape=()):  # noqa: D102
        return self._pyro_zinb().sample(torch.Size(sample_shape))

    @property
    def mean(self) -> torch.Tensor:  # noqa: D102
        return (torch.sigmoid(-self.gate_logits) * self.mu).expand(self.batch_shape)

    @property
    def variance(self) -> torch.Tensor:  # noqa: D102
        return self._pyro_zinb().variance

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Log-density of the counts ``value``: the closed form above, or ``log_density``."""
        if self._validate_args:
            self._validate_sample(value)
        if self.log_density is not None:
            return self.log_density(value, self.mu, self.theta, self.gate_logits)
        return zinb_log_prob(value, self.mu, self.theta, self.gate_logits)

    def with_log_density(
        self, log_density: Callable | None
    ) -> ZeroInflatedNegativeBinomialMeanDispersion:
        """The same distribution, its ``log_prob`` computed by ``log_density``.

        ``log_density(value, mu, theta, gate_logits)`` must equal :func:`zinb_log_prob` to
        rounding, e.g. the fused operator of :mod:`pyro_scvi.train.kernels`. ``None`` restores
        the default.
        """
        new = self.expand(self.batch_shape)
        new.log_density = log_density
        new._validate_args = self._validate_args
        return new
