"""Proposals for the importance-sampled ``log p(x)``: what the yardstick draws from.

Importance sampling estimates ``log p(x) ~ log mean_k p(x, z_k, l_k) / r(z_k, l_k)`` with
draws from a proposal ``r``; it is trustworthy only where the weights' tail is light,
which PSIS's Pareto ``k`` diagnoses (``k <= 0.7``, Vehtari et al., 2024). The amortized q
is a poor proposal wherever it is too narrow or sits in the wrong place. Each object here
is a proposal built from q, passed as ``proposal=`` to
:func:`~pyro_scvi.posterior.fit_statistics` and the fitted model's queries
(:meth:`~pyro_scvi.SCVI.get_fit_statistics`, :meth:`~pyro_scvi.SCVI.get_marginal_ll`):

- :class:`GuideProposal`: q itself (the default; the same draws give the ELBO);
- :class:`DefensiveProposal`: q mixed with a Student-t twice as wide (helps where q is too
  narrow, not where it is misplaced);
- :class:`RefinedProposal`: q refined per cell with the model fixed
  (:mod:`~pyro_scvi.posterior.gap`'s amortization-gap refinement), then made defensive;
- :class:`MCMCProposal`: a multivariate Student-t fitted per cell to the end states of a
  short annealed MCMC run from q (:func:`~pyro_scvi.posterior.ais.ais_log_weights`), mixed
  with q. It sits where the posterior is and has its correlations.

A proposal of your own subclasses :class:`Proposal` and defines :meth:`Proposal.log_weights`.
Whatever the proposal, the estimate is unbiased for ``p(x)``; the proposal changes only
its variance and so its Pareto ``k``.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.distributions import MultivariateStudentT

from ..model.guides import PerCellGuide
from ..model.nn import eval_mode
from ..model.schemes import require_point_globals
from . import ais
from . import queries as posterior
from .gap import default_refine_elbo, frozen


class Proposal:
    """An importance-sampling proposal from q; subclasses define :meth:`log_weights`.

    Examples
    --------
    >>> GuideProposal().settings()
    {'proposal': 'GuideProposal'}
    """

    #: Whether the proposal is the guide itself: then the ELBO's own draws serve.
    is_guide = False

    def settings(self) -> dict:
        """The proposal's name and settings, recorded with every estimate made with it."""
        return {"proposal": type(self).__name__, **vars(self)}

    def log_weights(
        self,
        model,
        guide,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        n_samples: int,
        *,
        cell_index: torch.Tensor | None = None,
        observed_library: bool = False,
    ) -> torch.Tensor:
        """``log p(x, z, l) - log r(z, l)`` at ``n_samples`` draws of ``r`` per cell.

        Returns ``(n_samples, cells)`` for one minibatch; the model is held fixed.
        """
        raise NotImplementedError


class GuideProposal(Proposal):
    """The amortized q itself: plain importance sampling.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> GuideProposal().log_weights(model, guide, x, torch.zeros(3, dtype=torch.long), 5).shape
    torch.Size([5, 3])
    """

    is_guide = True

    def log_weights(self, model, guide, x, batch_index, n_samples, *, cell_index=None,
                    observed_library=False):  # fmt: skip
        """See :meth:`Proposal.log_weights`."""
        return posterior.log_importance_weights(
            model, guide, x, batch_index, n_samples, cell_index=cell_index,
            observed_library=observed_library,
        )  # fmt: skip


class DefensiveProposal(Proposal):
    """``(1 - mix) q + mix t``: ``t`` a Student-t at q's mean, ``widen`` times q's spread.

    See :func:`~pyro_scvi.posterior.ais.defensive_log_weights`.

    Examples
    --------
    >>> DefensiveProposal(mix=0.5).settings()["mix"]
    0.5
    """

    def __init__(self, mix: float = 0.3, df: float = 3.0, widen: float = 2.0) -> None:
        if not 0 < mix < 1 or not df > 0 or not widen > 0:
            raise ValueError(
                f"mix={mix}, df={df}, widen={widen}: need 0 < mix < 1, df, widen > 0."
            )
        self.mix, self.df, self.widen = float(mix), float(df), float(widen)

    def log_weights(self, model, guide, x, batch_index, n_samples, *, cell_index=None,
                    observed_library=False):  # fmt: skip
        """See :meth:`Proposal.log_weights`."""
        return ais.defensive_log_weights(
            model, guide, x, batch_index, n_samples, cell_index=cell_index, mix=self.mix,
            df=self.df, widen=self.widen, observed_library=observed_library,
        )  # fmt: skip


class RefinedProposal(DefensiveProposal):
    """q refined per cell with the model fixed, then made defensive around the refinement.

    Each minibatch's cells get a :class:`~pyro_scvi.model.guides.PerCellGuide` started at
    the guide's output and fitted by ``n_steps`` of Adam (learning rate ``lr``) on
    :func:`~pyro_scvi.posterior.gap.default_refine_elbo`, as
    :func:`~pyro_scvi.posterior.gap.refine` does for the amortization gap; the proposal
    is that guide mixed with a wider Student-t (``mix``, ``df``, ``widen``: see
    :class:`DefensiveProposal`). It closes the amortization gap, not the mean-field one:
    the refined q is still too narrow where the posterior is correlated.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> r = RefinedProposal(n_steps=5)
    >>> r.log_weights(model, guide, x, torch.zeros(3, dtype=torch.long), 7).shape
    torch.Size([7, 3])
    """

    def __init__(self, n_steps: int = 100, lr: float = 0.05, mix: float = 0.3, df: float = 3.0,
                 widen: float = 2.0) -> None:  # fmt: skip
        super().__init__(mix, df, widen)
        if int(n_steps) < 0 or not lr > 0:
            raise ValueError(f"n_steps={n_steps}, lr={lr}: need n_steps >= 0 and lr > 0.")
        self.n_steps, self.lr = int(n_steps), float(lr)

    def log_weights(self, model, guide, x, batch_index, n_samples, *, cell_index=None,
                    observed_library=False):  # fmt: skip
        """See :meth:`Proposal.log_weights`."""
        require_point_globals(model, "A refined proposal")
        refined = _refined_guide(model, guide, x, batch_index, cell_index, self.n_steps, self.lr)
        rows = torch.arange(x.shape[0], device=x.device)
        return ais.defensive_log_weights(
            model, refined, x, batch_index, n_samples, cell_index=rows, mix=self.mix,
            df=self.df, widen=self.widen, observed_library=observed_library,
        )  # fmt: skip


def _refined_guide(model, guide, x, b, cell_index, n_steps: int, lr: float) -> PerCellGuide:
    """A per-cell guide for the minibatch ``x``, started at ``guide`` and refined."""
    with torch.no_grad(), eval_mode(guide):
        new = PerCellGuide.from_encoded(guide.encode(x, b, cell_index))
    rows = torch.arange(x.shape[0], device=x.device)
    # called inside posterior queries' no_grad: refinement needs gradients in q's parameters
    with torch.enable_grad(), frozen(model, guide), pyro.get_param_store().scope():
        svi = pyro.infer.SVI(
            poutine.block(model, hide_types=["param"]), new, pyro.optim.Adam({"lr": lr}),
            loss=default_refine_elbo(),
        )  # fmt: skip
        for _ in range(n_steps):
            svi.step(x, b, rows)
    return new.eval()


class MCMCProposal(Proposal):
    """A multivariate Student-t fitted per cell to a short annealed MCMC run from q, mixed with q.

    :func:`~pyro_scvi.posterior.ais.ais_log_weights` moves ``n_chains`` draws of q per
    cell towards the posterior in ``n_steps`` HMC transitions; the chains' end states give
    the mean and covariance (shrunk towards its diagonal, ``shrink``) of a Student-t with
    ``df`` degrees of freedom, its covariance ``inflate`` times theirs, over all latent
    coordinates of the cell jointly (``z`` and ``l``), so it has the posterior's place and
    correlations and heavier tails. The proposal is ``(1 - mix) t + mix q``: the q part
    keeps the weights bounded where the chains missed some of the posterior. It costs the
    MCMC run, about ``n_chains x n_steps x (n_leapfrog + 1)`` passes of model and guide
    with gradients per cell, on top of the importance samples.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> r = MCMCProposal(n_steps=5, n_chains=8)
    >>> log_w = r.log_weights(model, guide, x, torch.zeros(3, dtype=torch.long), 9)
    >>> tuple(log_w.shape), bool(torch.isfinite(log_w).all())
    ((9, 3), True)
    """

    def __init__(self, n_steps: int = 50, n_chains: int = 64, n_leapfrog: int = 2,
                 df: float = 5.0, inflate: float = 1.5, shrink: float = 0.1,
                 mix: float = 0.2) -> None:  # fmt: skip
        if int(n_steps) < 1 or int(n_chains) < 2 or int(n_leapfrog) < 1:
            raise ValueError(f"n_steps={n_steps}, n_chains={n_chains}, n_leapfrog={n_leapfrog}: "
                             "need n_steps >= 1, n_chains >= 2, n_leapfrog >= 1.")  # fmt: skip
        if not df > 0 or not inflate > 0 or not 0 <= shrink <= 1 or not 0 < mix < 1:
            raise ValueError(f"df={df}, inflate={inflate}, shrink={shrink}, mix={mix}: need "
                             "df, inflate > 0, 0 <= shrink <= 1, 0 < mix < 1.")  # fmt: skip
        self.n_steps, self.n_chains, self.n_leapfrog = int(n_steps), int(n_chains), int(n_leapfrog)
        self.df, self.inflate, self.shrink, self.mix = (
            float(df),
            float(inflate),
            float(shrink),
            float(mix),
        )

    def log_weights(self, model, guide, x, batch_index, n_samples, *, cell_index=None,
                    observed_library=False):  # fmt: skip
        """See :meth:`Proposal.log_weights`."""
        require_point_globals(model, "An MCMC proposal")
        run = ais.ais_log_weights(
            model, guide, x, batch_index, cell_index=cell_index, n_chains=self.n_chains,
            n_steps=self.n_steps, n_leapfrog=self.n_leapfrog, observed_library=observed_library,
            return_states=True,
        )  # fmt: skip
        states = run["states"]
        flat = _flatten(states)  # (chains, cells, D)
        loc = flat.mean(0)
        dev = flat - loc
        cov = torch.einsum("kcd,kce->cde", dev, dev) / (flat.shape[0] - 1)
        diag = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
        cov = (1 - self.shrink) * cov + self.shrink * diag
        cov = self.inflate * cov + 1e-6 * torch.eye(
            cov.shape[-1], dtype=cov.dtype, device=cov.device
        )
        t = MultivariateStudentT(torch.tensor(self.df, dtype=cov.dtype, device=cov.device), loc,
                                 torch.linalg.cholesky(cov))  # fmt: skip
        k = int(n_samples)
        with torch.no_grad(), eval_mode(model, guide), pyro.get_param_store().scope():
            target = ais._Target(model, guide, x, batch_index, cell_index, k, observed_library)
            from_q = _flatten(target.sample(k))
            pick = torch.rand(k, x.shape[0], device=x.device) < self.mix
            v = torch.where(pick[..., None], from_q, t.sample((k,)).to(from_q.dtype))
            log_p, log_q = target.log_densities(_unflatten(v, states))
            log_t = t.log_prob(v.to(loc.dtype)).to(log_p.dtype)
            log_mix = torch.logaddexp(math.log1p(-self.mix) + log_t, math.log(self.mix) + log_q)
            return log_p - log_mix


def _flatten(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Latent sites ``(draws, cells, ...)`` as one ``(draws, cells, D)`` tensor, in name order."""
    return torch.cat([values[n].reshape(*values[n].shape[:2], -1) for n in sorted(values)], -1)


def _unflatten(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo :func:`_flatten` for draws shaped as ``like``'s sites (any number of draws)."""
    out, start = {}, 0
    for n in sorted(like):
        shape = like[n].shape[2:]
        size = math.prod(shape)
        out[n] = flat[..., start : start + size].reshape(*flat.shape[:2], *shape)
        start += size
    return out
