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

import torch

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
