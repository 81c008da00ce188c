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
- :class:`LaplaceProposal`: Student-t parts at each cell's posterior mode (shaped by the
  Hessian there), at a short HMC run started from that Laplace approximation and at the
  importance-weighted moments of one adaptive round, mixed with q. It also fits the very
  concentrated posteriors of cells with many counts, where the annealed run from q does
  not arrive.

A proposal of your own subclasses :class:`Proposal` and defines :meth:`Proposal.log_weights`.
Whatever the proposal, the estimate is unbiased for ``p(x)``; the proposal changes only
its variance and so its Pareto ``k``.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.distributions import MultivariateStudentT

from ..errors import InputError
from ..model.guides import PerCellGuide
from ..model.nn import eval_mode
from ..model.schemes import require_point_globals
from . import ais
from . import queries as posterior
from .gap import frozen, refine_rows


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
    return refine_rows(
        model, new, x, b, rows, n_steps=n_steps, lr=lr, frozen_modules=(guide,)
    ).eval()


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
        loc, cov = _chain_moments(_flatten(states), self.shrink)
        cov = self.inflate * cov + 1e-6 * torch.eye(
            cov.shape[-1], dtype=cov.dtype, device=cov.device
        )
        t = MultivariateStudentT(torch.tensor(self.df, dtype=cov.dtype, device=cov.device), loc,
                                 torch.linalg.cholesky(cov))  # fmt: skip
        return _mixed_with_q(t, self.mix, model, guide, x, batch_index, cell_index,
                             observed_library, int(n_samples), states)  # fmt: skip


def _mixed_with_q(t, mix, model, guide, x, b, cell_index, observed_library, k: int, like,
                  draws: bool = False):  # fmt: skip
    """Log weights of ``k`` draws per cell from ``(1 - mix) t + mix q``.

    ``t`` is over the flattened latents (:func:`_flatten`) of sites shaped as ``like``'s.
    ``draws``: return the draws ``(k, cells, D)`` too.
    """
    with torch.no_grad(), eval_mode(model, guide), pyro.get_param_store().scope():
        target = ais._Target(model, guide, x, b, cell_index, k, observed_library)
        from_q = _flatten(target.sample(k))
        pick = torch.rand(k, x.shape[0], device=x.device) < mix
        v = torch.where(pick[..., None], from_q, t.sample((k,)).to(from_q.dtype))
        log_p, log_q = target.log_densities(_unflatten(v, like))
        log_t = t.log_prob(v.to(t.loc.dtype)).to(log_p.dtype)
        log_mix = torch.logaddexp(math.log1p(-mix) + log_t, math.log(mix) + log_q)
        return (log_p - log_mix, v) if draws else log_p - log_mix


class LaplaceProposal(Proposal):
    """Student-t proposals at each cell's posterior mode and at a short MCMC run from there.

    Per cell, with the model fixed:

    1. Newton's method (damped, with a backtracking line search of at most
       ``n_backtrack`` step lengths 1, 1/2, 1/4, ...; at most ``n_newton`` steps from the
       mean of q) finds the mode of ``log p(x, z, l)`` over the cell's latents jointly;
       the Hessian ``H`` of ``-log p`` there is the precision of the Laplace
       approximation ``N(mode, H^-1)``.
    2. ``n_chains`` HMC chains (``n_steps`` transitions of ``n_leapfrog`` leapfrog steps,
       from ``step_size`` in the whitened coordinates, tuned per cell towards
       ``target_accept``) start at draws of that approximation and run on the posterior
       itself, preconditioned by ``H^-1``, so that they mix within a few transitions
       (the same HMC kernel as AIS's transitions). Their end states give the
       posterior's mean and covariance where it is skewed or not quite Gaussian: on the
       shared datasets ``log p`` falls off more slowly away from the mode than the
       curvature there predicts, and the mean is off the mode (a ReLU decoder makes
       ``log p`` only piecewise smooth). ``n_chains=0`` leaves this step out.
    3. ``adapt_rounds`` rounds of adaptive importance sampling: each draws ``n_adapt``
       times from the proposal so far and adds a part at the mean and covariance of the
       importance-weighted draws (blended ``1 - adapt_keep : adapt_keep`` with the previous
       part's covariance, which keeps it from collapsing where a few draws carry the
       weight). ``n_adapt=0`` leaves this step out. Where the posterior's mass sits away
       from the mode (on CellBench, up to 9 Laplace sds along the stiffest directions) and
       is skewed along the softest ones, a second round brings the proposal closer than the
       first; heavier tails (lower ``df``) or a wider part did not lower ``k`` there. Two
       rounds are the default (one before): on 25 CellBench held-out cells not used to
       choose it, ``k > 0.7`` in 0 (one round: 1) and ``k > 0.5`` in 1 (one round: 5), for
       at most 26 % more time; on 10 cells of each other shared dataset 0 either way
       (``benchmarks/results/ais_validation_rounds/``).

    The proposal is ``(1 - mix) t + mix q``, ``t`` an equal mixture of Student-t with
    ``df`` degrees of freedom, covariance ``inflate`` times each part's: at the mode with
    ``H^-1``; at the chains' mean with their covariance (shrunk by ``shrink`` towards its
    diagonal); at the weighted mean with the weighted covariance. The ``K`` importance
    samples are fresh draws of it, so the estimate stays unbiased. q keeps the weights
    bounded where every part misses some of the posterior. Where
    ``H`` is not positive definite (a cell not converged to a mode) its diagonal is raised
    until its smallest eigenvalue is ``eig_floor`` times its largest (Newton's steps floor
    the eigenvalues' sizes the same way); ``diagnostics`` counts those
    cells, and those whose last Newton step was still longer than ``tol`` (common with a
    ReLU decoder, whose kinks stall Newton near the mode; the next two steps make up for
    it), over the proposal's lifetime, and :meth:`settings` records them with every setting.

    The cost is about ``n_newton x (D + 3) + n_chains x n_steps x (n_leapfrog + 1)``
    passes of the model per cell (``D`` latent coordinates; with gradients) and
    ``adapt_rounds x n_adapt`` more without, on top of the importance samples.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> r = LaplaceProposal(n_chains=8, n_steps=3)
    >>> log_w = r.log_weights(model, guide, x, torch.zeros(3, dtype=torch.long), 9)
    >>> tuple(log_w.shape), bool(torch.isfinite(log_w).all()), r.diagnostics["cells"]
    ((9, 3), True, 3)
    """

    def __init__(self, n_newton: int = 20, n_chains: int = 64, n_steps: int = 10,
                 n_leapfrog: int = 3, n_adapt: int = 1000, df: float = 4.0,
                 inflate: float = 1.5, mix: float = 0.1, tol: float = 1e-3,
                 step_size: float = 0.5, target_accept: float = 0.75, shrink: float = 0.1,
                 adapt_keep: float = 0.2, eig_floor: float = 1e-4,
                 n_backtrack: int = 12, adapt_rounds: int = 2) -> None:  # fmt: skip
        if int(n_newton) < 0 or int(n_steps) < 1 or int(n_leapfrog) < 1:
            raise InputError(f"n_newton={n_newton}, n_steps={n_steps}, n_leapfrog={n_leapfrog}: "
                             "need n_newton >= 0, n_steps >= 1 and n_leapfrog >= 1.")  # fmt: skip
        if int(n_chains) < 0 or int(n_chains) == 1 or int(n_adapt) < 0 or int(n_adapt) == 1:
            raise InputError(f"n_chains={n_chains}, n_adapt={n_adapt}: need each 0 (left out) "
                             "or at least 2.")  # fmt: skip
        if not df > 0 or not inflate > 0 or not 0 < mix < 1 or not tol > 0:
            raise InputError(f"df={df}, inflate={inflate}, mix={mix}, tol={tol}: need df, "
                             "inflate, tol > 0 and 0 < mix < 1.")  # fmt: skip
        if not step_size > 0 or not 0 < target_accept < 1 or not 0 <= shrink <= 1:
            raise InputError(f"step_size={step_size}, target_accept={target_accept}, "
                             f"shrink={shrink}: need step_size > 0, 0 < target_accept < 1 "
                             "and 0 <= shrink <= 1.")  # fmt: skip
        if not 0 <= adapt_keep <= 1 or not 0 < eig_floor < 1 or int(n_backtrack) < 1:
            raise InputError(f"adapt_keep={adapt_keep}, eig_floor={eig_floor}, "
                             f"n_backtrack={n_backtrack}: need 0 <= adapt_keep <= 1, "
                             "0 < eig_floor < 1 and n_backtrack >= 1.")  # fmt: skip
        self.n_newton, self.n_chains = int(n_newton), int(n_chains)
        self.n_steps, self.n_leapfrog, self.n_adapt = int(n_steps), int(n_leapfrog), int(n_adapt)
        self.df, self.inflate = float(df), float(inflate)
        self.mix, self.tol = float(mix), float(tol)
        self.step_size, self.target_accept = float(step_size), float(target_accept)
        self.shrink, self.adapt_keep = float(shrink), float(adapt_keep)
        if int(adapt_rounds) < 1 or int(adapt_rounds) != adapt_rounds:
            raise InputError(f"adapt_rounds={adapt_rounds}: need a whole number >= 1 (n_adapt=0 "
                             "leaves the adaptive rounds out).")  # fmt: skip
        self.eig_floor, self.n_backtrack = float(eig_floor), int(n_backtrack)
        self.adapt_rounds = int(adapt_rounds)
        self.diagnostics = {"cells": 0, "cells_jittered": 0, "cells_unconverged": 0}

    def settings(self) -> dict:
        """Name, settings and ``diagnostics`` so far."""
        return super().settings() | {"diagnostics": dict(self.diagnostics)}

    def log_weights(self, model, guide, x, batch_index, n_samples, *, cell_index=None,
                    observed_library=False):  # fmt: skip
        """See :meth:`Proposal.log_weights`."""
        require_point_globals(model, "A Laplace proposal")
        args = (model, guide, x, batch_index, cell_index, observed_library)
        with eval_mode(model, guide), frozen(model, guide), pyro.get_param_store().scope():
            target = ais._Target(*args[:5], 1, observed_library)
            with torch.no_grad():
                like = target.sample(ais.PILOT_DRAWS)
            start = _flatten(like).mean(0)
            mode, precision, moved = _newton(target, start, like, self.n_newton, self.tol,
                                             self.eig_floor, self.n_backtrack)  # fmt: skip
            lam, vecs = torch.linalg.eigh(precision.double())
            floor = self.eig_floor * lam[:, -1:].abs().clamp_min(1e-12)
            raise_by = (floor - lam[:, :1]).clamp_min(0)  # the diagonal's rise, per cell
            cov = (vecs / (lam + raise_by)[:, None, :]) @ vecs.transpose(-1, -2)
            cov = (cov + cov.transpose(-1, -2)) / 2
            self.diagnostics["cells"] += x.shape[0]
            self.diagnostics["cells_jittered"] += int((raise_by[:, 0] > 0).sum())
            self.diagnostics["cells_unconverged"] += int((moved > self.tol).sum())
            parts = [(mode.double(), cov)]
            if self.n_chains:
                chains = ais._Target(*args[:5], self.n_chains, observed_library)
                ends = _hmc(chains, mode, torch.linalg.cholesky(cov).to(mode.dtype), like,
                            self.n_steps, self.n_leapfrog, self.step_size,
                            self.target_accept).double()  # fmt: skip
                loc, c = _chain_moments(ends, shrink=self.shrink)
                parts.append((loc, c + 1e-8 * torch.eye(c.shape[-1]).to(c)))
        df = torch.tensor(self.df, dtype=torch.float64, device=x.device)

        def mixture():
            return _EqualMixture([MultivariateStudentT(df, m, torch.linalg.cholesky(
                self.inflate * c)) for m, c in parts])  # fmt: skip

        for _round in range(self.adapt_rounds if self.n_adapt else 0):
            # adaptive importance sampling: a part at the weighted moments of the mixture so far
            log_w, v = _mixed_with_q(mixture(), self.mix, *args[:5], observed_library,
                                     self.n_adapt, like, draws=True)  # fmt: skip
            w = torch.softmax(log_w.double(), 0)[..., None]
            mean = (w * v.double()).sum(0)
            dev = v.double() - mean
            c = torch.einsum("kcd,kce->cde", w * dev, dev)
            # where a few draws carry the weight, their covariance is degenerate
            keep = self.adapt_keep
            parts.append((mean, (1 - keep) * c + keep * parts[-1][1]))
        return _mixed_with_q(mixture(), self.mix, *args[:5], observed_library,
                             int(n_samples), like)  # fmt: skip


class _EqualMixture:
    """An equal mixture of distributions over the same ``(cells, D)`` values."""

    def __init__(self, parts: list) -> None:
        self.parts, self.loc = parts, parts[0].loc

    def sample(self, shape: tuple) -> torch.Tensor:
        draws = torch.stack([p.sample(shape) for p in self.parts])
        pick = torch.randint(len(self.parts), shape + draws.shape[-2:-1], device=draws.device)
        return torch.gather(draws, 0, pick[None, ..., None].expand(1, *draws.shape[1:]))[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logs = torch.stack([p.log_prob(value) for p in self.parts])
        return torch.logsumexp(logs, 0) - math.log(len(self.parts))


def _hmc(
    target,
    mode: torch.Tensor,
    chol: torch.Tensor,
    like: dict,
    n_steps: int,
    n_leapfrog: int,
    step_size: float,
    target_accept: float,
) -> torch.Tensor:
    """End states ``(chains, cells, D)`` of HMC on ``log p(x, z, l)``, from the Laplace fit.

    The chains start at draws of ``N(mode, chol chol^T)`` and run
    :func:`~pyro_scvi.posterior.ais._hmc_step` in the coordinates
    ``u = chol^-1 (v - mode)``; a step size per cell, from ``step_size``, is tuned towards
    ``target_accept``. The states serve only to fit a proposal, so the tuning during the
    run does no harm.
    """

    def at(u):
        return mode + torch.einsum("cde,kce->kcd", chol, u)

    def densities(u):  # the Laplace fit as preconditioner: u whitened by its covariance
        return (target.log_density(target.model, _unflatten(at(u["u"]), like)),)

    u = torch.randn(target.n_chains, *mode.shape, dtype=mode.dtype, device=mode.device)
    point = ais._Point(densities, {"u": u})
    eps = mode.new_full((mode.shape[0],), float(step_size))
    for _ in range(n_steps):
        point, accept = ais._hmc_step(point, densities, eps, n_leapfrog)
        eps = eps * torch.exp(accept.to(u.dtype).mean(0) - target_accept)
    return at(point.u["u"]).detach()


def _newton(target, start: torch.Tensor, like: dict, n_steps: int, tol: float,
            eig_floor: float = 1e-4, n_backtrack: int = 12):  # fmt: skip
    """Each cell's mode of ``log p(x, z, l)`` from ``start`` ``(cells, D)``, by damped Newton.

    Stops after ``n_steps`` or once every cell's step is shorter than ``tol`` (max norm).
    Each step's Hessian eigenvalues are floored at ``eig_floor`` times the largest's size;
    ``n_backtrack`` step lengths (1, 1/2, ...) are tried until ``log p`` does not fall.
    Returns the mode, the Hessian of ``-log p`` there ``(cells, D, D)`` and the length of
    each cell's last step.
    """

    def log_p(v: torch.Tensor) -> torch.Tensor:
        return target.log_density(target.model, _unflatten(v[None], like))[0]

    v, moved = start.detach(), torch.full_like(start[:, 0], math.inf)
    for i in range(n_steps + 1):
        lp, grad, hess = _derivatives(log_p, v)
        if i == n_steps or bool((moved < tol).all()):
            break
        # saddle-free Newton: the Hessian's eigenvalues by their size, so the step ascends
        lam, vecs = torch.linalg.eigh(-hess.double())
        lam = lam.abs().clamp_min(eig_floor * lam.abs().max(-1, keepdim=True).values + 1e-12)
        step = vecs @ ((vecs.transpose(-1, -2) @ grad.double()[..., None]) / lam[..., None])
        step = step[..., 0].to(v.dtype)
        size = torch.ones_like(lp)
        for _halving in range(n_backtrack):  # backtrack per cell until log p does not fall
            with torch.no_grad():
                new_lp = log_p(v + size[:, None] * step)
            ok = torch.isfinite(new_lp) & (new_lp >= lp - 1e-6 * lp.abs())
            if bool(ok.all()):
                break
            size = torch.where(ok, size, size / 2)
        v = v + (size[:, None] * step) * ok[:, None]
        moved = (size[:, None] * step).abs().max(-1).values
    return v.detach(), -hess.detach(), moved


def _derivatives(fn, v: torch.Tensor):
    """``fn(v)`` ``(cells,)``, its gradient ``(cells, D)`` and Hessian ``(cells, D, D)``.

    ``fn``'s cells must not interact: then one backward pass per coordinate serves all.
    """
    v = v.detach().requires_grad_(True)
    with torch.enable_grad():
        y = fn(v)
        y_ok = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
        (grad,) = torch.autograd.grad(y_ok.sum(), v, create_graph=True)
        rows = []
        for d in range(v.shape[-1] if grad.requires_grad else 0):
            (row,) = torch.autograd.grad(grad[:, d].sum(), v, retain_graph=True,
                                         allow_unused=True)  # fmt: skip
            rows.append(torch.zeros_like(v) if row is None else row)
    hess = torch.stack(rows, -2) if rows else torch.zeros(*v.shape, v.shape[-1]).to(v)
    return y.detach(), grad.detach(), torch.nan_to_num(hess.detach())


def _chain_moments(flat: torch.Tensor, shrink: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(cells, D)`` and covariance ``(cells, D, D)`` of states ``(chains, cells, D)``.

    The covariance is shrunk by ``shrink`` towards its diagonal: a few dozen chains in
    ``D`` dimensions estimate the correlations less well than the variances.
    """
    loc = flat.mean(0)
    dev = flat - loc
    cov = torch.einsum("kcd,kce->cde", dev, dev) / (flat.shape[0] - 1)
    diag = torch.diag_embed(torch.diagonal(cov, dim1=-2, dim2=-1))
    return loc, (1 - shrink) * cov + shrink * diag


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
