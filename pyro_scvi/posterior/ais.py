"""Annealed importance sampling (AIS): ``log p(x)`` per cell with a standard error.

Importance sampling with the amortized guide as proposal
(:func:`~pyro_scvi.posterior.fit_statistics`) is unreliable where q is far from the
posterior: its weights then have a heavy tail (Pareto ``k > 0.7``) and its estimate no
useful error bar. AIS (Neal, 2001) moves each draw of q towards the posterior through a
sequence of distributions on the geometric path

    ``f_t(z, l) = q(z, l | x)^(1 - beta_t) p(x, z, l)^beta_t``,  ``0 = beta_0 < ... < beta_T = 1``,

with a Markov transition that leaves ``f_t`` invariant at each step, and accumulates the
log weight ``sum_t (beta_t - beta_{t-1}) (log p(x, z_{t-1}, l_{t-1}) - log q(z_{t-1},
l_{t-1} | x))``. Its exponential is an unbiased estimate of ``p(x)`` for any number of
steps; the more steps, the smaller its variance. Several independent chains per cell give
``log p(x) ~ log mean_c w_c`` and, by the delta method, the standard error
``sd_c(w_c) / (sqrt(C) mean_c w_c)`` of that log.

The transitions are Hamiltonian Monte Carlo (one leapfrog step is
the Metropolis-adjusted Langevin algorithm) in coordinates scaled by q's spread per cell
and coordinate, with a step size per cell tuned during the run towards an acceptance rate:
each transition is still exact for its ``f_t`` given the step size chosen before it, so the
weights stay unbiased. Cells and chains are vectorized: a plate over chains at dim -3,
outside the model's ``cells`` (-2) and ``genes`` (-1) plates, as in importance sampling.
Any guide works whose sites Pyro can score at given values (``poutine.condition``), and
the latent sites are whatever the guide samples: ``z`` and ``l``, or ``z`` alone with an
observed library. The model is held fixed (eval mode, no gradients on its parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..data.counts import CountData
from ..model.nn import eval_mode
from ..model.schemes import is_global, require_point_globals
from . import queries as posterior
from .gap import frozen
from .queries import (
    _cell_log_probs,
    _conditioned_on_library,
    pareto_k,  # noqa: F401  (ais.pareto_k: where it was first)
)

#: Name of the plate over AIS chains (private so it cannot clash with a user's plates).
_CHAINS_PLATE = "_ais_chains"
#: Draws of q per cell that set the scale of each coordinate for the transitions.
PILOT_DRAWS = 64
#: The default schedule's sharpness (:func:`sigmoid_schedule`).
SIGMOID_SHARPNESS = 4.0


def sigmoid_schedule(n_steps: int, sharpness: float = SIGMOID_SHARPNESS) -> torch.Tensor:
    """``n_steps + 1`` inverse temperatures from 0 to 1, dense at both ends.

    The sigmoidal schedule of Grosse, Maddison & Salakhutdinov (2013): a logistic
    function on ``[-sharpness, sharpness]``, rescaled to start at 0 and end at 1. Most of
    the variance of AIS comes from the ends of the path, where it takes small steps.

    Examples
    --------
    >>> b = sigmoid_schedule(4)
    >>> b[0].item(), b[-1].item(), bool((b[1:] > b[:-1]).all())
    (0.0, 1.0, True)
    """
    if int(n_steps) < 1:
        raise ValueError(f"n_steps={n_steps}; it must be a positive integer.")
    s = torch.sigmoid(torch.linspace(-sharpness, sharpness, int(n_steps) + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def _per_cell_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a ``(chains, cells, ...)`` tensor to ``(chains, cells)``."""
    return value.reshape(value.shape[0], value.shape[1], -1).sum(-1)


class _Target:
    """``log p(x, z, l)`` and ``log q(z, l | x)`` of one minibatch at given latent values."""

    def __init__(self, model, guide, x, batch_index, cell_index, n_chains, observed_library):
        self.args = (x, batch_index, cell_index)
        self.n_chains, self.n_cells = n_chains, x.shape[0]
        self.model, self.guide, self.skip = _conditioned_on_library(
            model, guide, x, observed_library
        )

    def sample(self, n_chains: int) -> dict[str, torch.Tensor]:
        """``n_chains`` draws of q's latent sites per cell, each ``(n_chains, cells, ...)``."""
        with pyro.plate(_CHAINS_PLATE, n_chains, dim=-3):
            tr = poutine.trace(self.guide).get_trace(*self.args)
        return {
            name: site["value"].detach()
            for name, site in tr.nodes.items()
            if site["type"] == "sample"
            and not site["is_observed"]
            and not site_is_subsample(site)
            and not is_global(site)
            and name not in self.skip
        }

    def log_densities(self, values: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(x, z, l), log q(z, l | x))`` at ``values``, each ``(chains, cells)``."""
        return self.log_density(self.model, values), self.log_density(self.guide, values)

    def log_density(self, fn, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``fn``'s (the model's or guide's) log density per cell, ``(chains, cells)``."""
        with pyro.plate(_CHAINS_PLATE, self.n_chains, dim=-3):
            tr = poutine.trace(poutine.condition(fn, data=values)).get_trace(*self.args)
        tr.compute_log_prob()
        return sum(lp for _, lp in _cell_log_probs(tr, self.n_chains, self.n_cells, self.skip))


class _Point:
    """A point ``u`` of the chains: its log densities ``(chains, cells)`` and their gradients.

    ``densities(u)`` maps the chains' coordinates ``u`` (a dict of ``(chains, cells, ...)``
    tensors) to ``(log p,)`` or, on a tempered path, ``(log p, log q)``; the caller's map
    from ``u`` to the latents inside it is the sampler's preconditioner.
    """

    def __init__(self, densities, u: dict[str, torch.Tensor]) -> None:
        self.u = {k: v.detach() for k, v in u.items()}
        leaves = {k: v.detach().requires_grad_(True) for k, v in self.u.items()}
        with torch.enable_grad():
            logs = densities(leaves)
            # separate graphs (model, guide): one backward pass each, keeping the graph to the last
            grads = [_grad(y, leaves, retain=i < len(logs) - 1) for i, y in enumerate(logs)]
        self.log_p, self.grad_p = logs[0].detach(), grads[0]
        self.log_q, self.grad_q = (logs[1].detach(), grads[1]) if len(logs) > 1 else (None, None)

    def energy(self, beta: float) -> torch.Tensor:
        """``-log f_beta``, ``(chains, cells)``; not finite where either density is not.

        ``f_beta = q^(1 - beta) p^beta`` on a tempered path, else ``p`` (``beta`` unused).
        """
        if self.log_q is None:
            return -self.log_p
        return -(beta * self.log_p + (1.0 - beta) * self.log_q)

    def grad(self, beta: float) -> dict[str, torch.Tensor]:
        """The gradient of :meth:`energy` in ``u``."""
        if self.grad_q is None:
            return {k: -g for k, g in self.grad_p.items()}
        return {k: -(beta * self.grad_p[k] + (1.0 - beta) * self.grad_q[k]) for k in self.grad_p}

    def select(self, accept: torch.Tensor, other: _Point) -> _Point:
        """Where ``accept``: this point; elsewhere ``other``."""
        new = object.__new__(_Point)
        new.u = {k: _where(accept, v, other.u[k]) for k, v in self.u.items()}
        new.log_p = torch.where(accept, self.log_p, other.log_p)
        new.grad_p = {k: _where(accept, v, other.grad_p[k]) for k, v in self.grad_p.items()}
        new.log_q = new.grad_q = None
        if self.log_q is not None:
            new.log_q = torch.where(accept, self.log_q, other.log_q)
            new.grad_q = {k: _where(accept, v, other.grad_q[k]) for k, v in self.grad_q.items()}
        return new


def _grad(y: torch.Tensor, u: dict, retain: bool) -> dict[str, torch.Tensor]:
    # a non-finite density (a chain far out) must not poison the other chains' gradients
    y = torch.where(torch.isfinite(y), y, torch.zeros_like(y))
    grads = torch.autograd.grad(y.sum(), list(u.values()), allow_unused=True, retain_graph=retain)
    return {
        k: torch.zeros_like(v) if g is None else torch.nan_to_num(g.detach())
        for (k, v), g in zip(u.items(), grads, strict=True)
    }


def _where(accept: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(accept.reshape(accept.shape + (1,) * (a.dim() - 2)), a, b)


def _hmc_step(
    point: _Point,
    densities,
    step_size: torch.Tensor,
    n_leapfrog: int,
    beta: float = 1.0,
) -> tuple[_Point, torch.Tensor]:
    """One HMC transition per (chain, cell) that leaves ``f_beta`` invariant.

    The one kernel of this package's samplers: AIS's transitions (:func:`ais_log_weights`,
    a tempered target, ``u`` the latents over q's spread per coordinate) and
    :class:`~pyro_scvi.posterior.proposals.LaplaceProposal`'s chains (``log p`` alone, ``u``
    whitened by the Laplace covariance's Cholesky factor). It runs in ``u`` with a unit
    mass matrix; the preconditioner is the caller's map from ``u`` to the latents, inside
    ``densities`` (see :class:`_Point`). ``step_size`` is ``(cells,)``; ``n_leapfrog``
    leapfrog steps. Returns the new point and the acceptance indicator
    ``(chains, cells)``. A proposal whose energy is not finite is rejected; a chain whose
    own energy is not finite (density 0) moves to any proposal whose energy is.
    """
    u = point.u
    eps = {k: step_size.reshape((1, -1) + (1,) * (v.dim() - 2)) for k, v in u.items()}
    p0 = {k: torch.randn_like(v) for k, v in u.items()}
    grad = point.grad(beta)
    p = {k: p0[k] - 0.5 * eps[k] * grad[k] for k in u}
    q_, new = dict(u), point
    for i in range(int(n_leapfrog)):
        q_ = {k: q_[k] + eps[k] * p[k] for k in u}
        new = _Point(densities, q_)
        grad = new.grad(beta)
        w = 1.0 if i < n_leapfrog - 1 else 0.5  # full momentum steps inside, half at the end
        p = {k: p[k] - w * eps[k] * grad[k] for k in u}
    kinetic0 = sum(_per_cell_sum(v**2) for v in p0.values()) / 2
    kinetic1 = sum(_per_cell_sum(v**2) for v in p.values()) / 2
    energy1 = new.energy(beta)
    log_accept = point.energy(beta) + kinetic0 - energy1 - kinetic1
    ok = torch.isfinite(energy1) & ~torch.isnan(log_accept)
    log_accept = torch.where(ok, log_accept, -math.inf)
    accept = torch.rand_like(log_accept).log() < log_accept
    return new.select(accept, point), accept


def ais_log_weights(
    model,
    guide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    *,
    cell_index: torch.Tensor | None = None,
    n_chains: int = 16,
    n_steps: int = 100,
    n_leapfrog: int = 4,
    step_size: float = 0.25,
    target_accept: float = 0.65,
    betas: Sequence[float] | torch.Tensor | None = None,
    observed_library: bool = False,
    return_states: bool = False,
) -> dict[str, torch.Tensor]:
    """AIS log weights of ``n_chains`` independent chains for each cell of one minibatch.

    Parameters
    ----------
    model, guide
        A trained model (held fixed here) and its guide, the proposal at ``beta = 0``.
    x, batch_index, cell_index
        The cells, as the model takes them.
    n_chains
        Independent chains per cell.
    n_steps
        Transitions ``T``, one per intermediate distribution (``T + 1`` inverse
        temperatures on :func:`sigmoid_schedule`, unless ``betas``).
    n_leapfrog
        Leapfrog steps per HMC transition (1: Metropolis-adjusted Langevin).
    step_size
        Initial leapfrog step in units of q's spread; tuned per cell towards
        ``target_accept`` (the mean acceptance over its chains) after every transition.
    target_accept
        The acceptance rate the step size is tuned towards.
    betas
        An inverse-temperature schedule of your own, from 0 to 1.
    observed_library
        Condition on each cell's observed library instead of integrating over ``l``,
        as :func:`~pyro_scvi.posterior.log_importance_weights` does.
    return_states
        Also return the chains' end states (``states``: the guide's latent sites, each
        ``(n_chains, cells, ...)``), e.g. to fit a proposal to them
        (:class:`~pyro_scvi.posterior.proposals.MCMCProposal`).

    Returns
    -------
    dict
        ``log_w`` ``(n_chains, cells)``, ``acceptance`` (mean over chains and steps,
        ``(cells,)``) and ``step_size`` (the tuned one, ``(cells,)``).

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> out = ais_log_weights(model, guide, x, torch.zeros(3, dtype=torch.long),
    ...                       n_chains=4, n_steps=5)
    >>> tuple(out["log_w"].shape), bool(torch.isfinite(out["log_w"]).all())
    ((4, 3), True)
    """
    require_point_globals(model, "Annealed importance sampling")
    if betas is None:
        betas = sigmoid_schedule(n_steps)
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if len(betas) < 2 or betas[0] != 0 or betas[-1] != 1 or bool((betas[1:] < betas[:-1]).any()):
        raise ValueError("betas must rise from 0 to 1.")
    if int(n_chains) < 2 or int(n_leapfrog) < 1 or not step_size > 0:
        raise ValueError(
            f"n_chains={n_chains}, n_leapfrog={n_leapfrog}, step_size={step_size}: need "
            "n_chains >= 2 (for a standard error), n_leapfrog >= 1 and step_size > 0."
        )
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept={target_accept}: it must be between 0 and 1.")
    n_chains = int(n_chains)
    with eval_mode(model, guide), frozen(model, guide), pyro.get_param_store().scope():
        target = _Target(model, guide, x, batch_index, cell_index, n_chains, observed_library)
        with torch.no_grad():
            pilot = target.sample(max(PILOT_DRAWS, n_chains))
            # q's spread per cell and coordinate: the transitions' units
            scale = {k: v.std(0, keepdim=True).clamp_min(1e-4) for k, v in pilot.items()}
            start = target.sample(n_chains)

        def densities(u):  # AIS's preconditioner: the latents in units of q's spread
            return target.log_densities({k: scale[k] * v for k, v in u.items()})

        point = _Point(densities, {k: v / scale[k] for k, v in start.items()})
        n_cells = x.shape[0]
        eps = x.new_full((n_cells,), float(step_size))
        log_w = x.new_zeros(n_chains, n_cells)
        accepted = x.new_zeros(n_cells)
        for t in range(1, len(betas)):
            beta = float(betas[t])
            log_w = log_w + float(betas[t] - betas[t - 1]) * (point.log_p - point.log_q)
            point, accept = _hmc_step(point, densities, eps, n_leapfrog, beta)
            rate = accept.to(x.dtype).mean(0)
            accepted = accepted + rate
            # a step per cell: larger while its chains accept more often than the target
            eps = eps * torch.exp(rate - target_accept)
    out = {"log_w": log_w.detach(), "acceptance": accepted / (len(betas) - 1), "step_size": eps}
    if return_states:
        out["states"] = {k: (scale[k] * v).detach() for k, v in point.u.items()}
    return out


def log_mean_exp_se(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``log mean_c w_c``, its delta-method standard error and the chains' ESS, per cell.

    ``log_w`` is ``(chains, cells)``. The standard error of ``log mean w`` is
    ``sd(w) / (sqrt(C) mean(w))`` (the relative error of the mean); the effective sample
    size is ``(sum w)^2 / sum w^2``.

    Examples
    --------
    >>> import torch
    >>> est, se, ess = log_mean_exp_se(torch.zeros(8, 2))
    >>> est.tolist(), se.tolist(), ess.tolist()
    ([0.0, 0.0], [0.0, 0.0], [8.0, 8.0])
    """
    n = log_w.shape[0]
    est = torch.logsumexp(log_w, 0) - math.log(n)
    w = torch.exp(log_w - est)  # mean 1 per cell
    se = w.std(0, unbiased=True) / math.sqrt(n)
    ess = w.sum(0) ** 2 / (w**2).sum(0)
    return est, se, ess


def ais_marginal_ll(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_chains: int = 16,
    n_steps: int = 100,
    n_leapfrog: int = 4,
    step_size: float = 0.25,
    target_accept: float = 0.65,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    observed_library: bool = False,
) -> dict[str, np.ndarray]:
    """AIS ``log p(x)`` of the cells ``indices`` with a standard error, a minibatch at a time.

    See :func:`ais_log_weights` for the settings.

    Returns
    -------
    dict
        Each ``(len(indices),)``: ``marginal_ll`` (nats), ``se`` (its standard error),
        ``ess`` (effective number of chains) and ``acceptance`` (HMC's mean acceptance).

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=10, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> out = ais_marginal_ll(m.model, m.guide, m.data, np.arange(4), n_chains=4, n_steps=5)
    >>> sorted(out), out["se"].shape
    (['acceptance', 'ess', 'marginal_ll', 'se'], (4,))
    """
    parts: dict[str, list[np.ndarray]] = {"marginal_ll": [], "se": [], "ess": [], "acceptance": []}
    for x, b, cells in posterior.iterate_indexed_cells(data, indices, batch_size, device):
        out = ais_log_weights(
            model,
            guide,
            x,
            b,
            cell_index=cells,
            n_chains=n_chains,
            n_steps=n_steps,
            n_leapfrog=n_leapfrog,
            step_size=step_size,
            target_accept=target_accept,
            observed_library=observed_library,
        )
        est, se, ess = log_mean_exp_se(out["log_w"])
        for k, v in (
            ("marginal_ll", est),
            ("se", se),
            ("ess", ess),
            ("acceptance", out["acceptance"]),
        ):
            parts[k].append(v.cpu().numpy())
    return {k: np.concatenate(v).astype(np.float64) for k, v in parts.items()}


def quadrature_log_px(
    model,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    z_grid: torch.Tensor,
    l_grid: torch.Tensor | None = None,
    *,
    refine: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Exact ``log p(x)`` of a model with a 1-d ``z``, by a sum over a fine grid.

    The truth against which :func:`ais_log_weights` and importance sampling are checked.

    ``log p(x) = log sum_{z, l} p(x | z, l) p(z) p(l) dz dl`` over the uniform grids
    ``z_grid`` and ``l_grid`` (the latter left out with an observed library), from the
    model's decoder, likelihood and priors directly, not through Pyro traces. A uniform
    Riemann sum of a smooth integrand that vanishes at the grid's ends is accurate far
    beyond its spacing; make the grids cover the posterior and resolve it.

    Parameters
    ----------
    model
        A :class:`~pyro_scvi.model.ScviModel` with ``n_latent == 1`` and no scheme's
        global sites, in eval mode.
    x, batch_index
        The cells.
    z_grid, l_grid
        Uniform 1-d grids; ``l_grid`` may also be ``(cells, points)``, a grid per cell
        (around each cell's own log library).
    refine
        If positive, sum a second time over a grid of as many points spanning the first
        sum's posterior mean +- ``refine`` posterior sds, per cell: a posterior narrow
        against the first grid, or near its edge, is then resolved (10 is ample).

    Returns
    -------
    dict
        ``log_px`` ``(cells,)``; ``mean`` and ``sd`` ``(cells, 2)`` (or ``(cells, 1)``
        with an observed library): the posterior moments of ``z`` and ``l``.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> m = ScviModel(5, 1, LogNormalLibrary(torch.tensor([2.0]), torch.tensor([0.5])),
    ...               n_latent=1, n_hidden=4).eval()
    >>> x = torch.poisson(torch.full((2, 5), 2.0))
    >>> out = quadrature_log_px(m, x, torch.zeros(2, dtype=torch.long),
    ...                         torch.linspace(-8, 8, 401), torch.linspace(-2, 6, 401))
    >>> tuple(out["log_px"].shape), tuple(out["mean"].shape)
    ((2,), (2, 2))
    """
    require_point_globals(model, "Quadrature")
    if model.n_latent != 1:
        raise ValueError(f"Quadrature needs a 1-d z; the model has n_latent={model.n_latent}.")
    latent_l = not model.use_observed_lib_size
    if latent_l == (l_grid is None):
        raise ValueError("Pass l_grid exactly when the model's library is latent.")
    dtype = next(model.decoder.parameters()).dtype  # the model's precision, not the data's
    x = x.to(dtype)
    z_grid = torch.as_tensor(z_grid, dtype=dtype)
    log_px, means, sds = [], [], []
    with torch.no_grad(), eval_mode(model):
        for i in range(x.shape[0]):
            xi, bi = x[i], batch_index[i : i + 1]
            grid_z = z_grid
            if latent_l:
                grid_l = torch.as_tensor(l_grid, dtype=dtype)
                grid_l = grid_l[i] if grid_l.dim() == 2 else grid_l
            else:
                grid_l = model.library_prior.observed(xi[None]).reshape(1)
            for sweep in range(2 if refine else 1):
                if sweep:  # again, on a box of +-refine sds around the first sweep's mean
                    half = refine * sds.pop()
                    centre = means.pop()
                    log_px.pop()
                    grid_z = centre[0] + half[0] * torch.linspace(-1, 1, len(z_grid), dtype=dtype)
                    if latent_l:
                        grid_l = centre[1] + half[1] * torch.linspace(
                            -1, 1, len(grid_l), dtype=dtype
                        )
                _quadrature_sweep(model, xi, bi, grid_z, grid_l, latent_l, log_px, means, sds)
    return {"log_px": torch.stack(log_px), "mean": torch.stack(means), "sd": torch.stack(sds)}


def _quadrature_sweep(model, xi, bi, z_grid, grid_l, latent_l, log_px, means, sds) -> None:
    """One grid's log p(x) and posterior moments for one cell, appended to the lists."""
    dz = float(z_grid[1] - z_grid[0])
    cell = dz * float(grid_l[1] - grid_l[0]) if latent_l else dz
    z, l = (g.reshape(-1, 1) for g in torch.meshgrid(z_grid, grid_l, indexing="ij"))
    b = bi.expand(len(z))
    decoded = model.decoder(z, b)
    mu = torch.exp(l.clamp(max=80.0)) * torch.softmax(decoded["rho_logits"], -1)
    theta = model.theta(b, decoded)
    lp = model.likelihood(mu, theta, decoded["gate_logits"]).log_prob(xi).sum(-1)
    lp = lp + model.prior().log_prob(z)
    if latent_l:
        lp = lp + model.library_prior(b).log_prob(l).reshape(-1)
    log_px.append(torch.logsumexp(lp, 0) + math.log(cell))
    w = torch.softmax(lp, 0)[:, None]
    v = torch.cat([z, l], 1) if latent_l else z
    m = (w * v).sum(0)
    means.append(m)
    sds.append((w * (v - m) ** 2).sum(0).sqrt())


def defensive_log_weights(
    model,
    guide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    n_samples: int,
    *,
    cell_index: torch.Tensor | None = None,
    mix: float = 0.3,
    df: float = 3.0,
    widen: float = 2.0,
    observed_library: bool = False,
) -> torch.Tensor:
    """Importance weights under a defensive mixture of q and a heavy-tailed version of it.

    The proposal is ``(1 - mix) q(z, l | x) + mix t(z, l)``, ``t`` a product of Student-t
    distributions with ``df`` degrees of freedom at q's mean and ``widen`` times q's
    standard deviation per cell and coordinate (from :data:`PILOT_DRAWS` draws of q). Its
    tails are heavier than the posterior's wherever q is too narrow or off-centre, which
    bounds the weights ``p / proposal <= p / (mix t)`` (Hesterberg, 1995), so their Pareto
    ``k`` stays low where q's alone is above 0.7; where q is good the mixture costs at
    most ``-log(1 - mix)`` nats of efficiency per draw.

    Returns
    -------
    torch.Tensor
        ``log p(x, z, l) - log proposal(z, l)``, ``(n_samples, cells)``: their log-mean-exp
        estimates ``log p(x)`` (:func:`log_mean_exp_se`), :func:`pareto_k` diagnoses them.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=2), ScviGuide(20, 1, n_latent=2)
    >>> x = torch.poisson(torch.full((3, 20), 2.0))
    >>> log_w = defensive_log_weights(model, guide, x, torch.zeros(3, dtype=torch.long), 50)
    >>> tuple(log_w.shape), bool(torch.isfinite(log_w).all())
    ((50, 3), True)
    """
    require_point_globals(model, "Defensive importance sampling")
    if not 0 < mix < 1 or not df > 0 or not widen > 0:
        raise ValueError(f"mix={mix}, df={df}, widen={widen}: need 0 < mix < 1, df, widen > 0.")
    k = int(n_samples)
    with torch.no_grad(), eval_mode(model, guide), pyro.get_param_store().scope():
        target = _Target(model, guide, x, batch_index, cell_index, k, observed_library)
        pilot = target.sample(max(PILOT_DRAWS, 2))
        heavy = {
            name: torch.distributions.StudentT(
                df, v.mean(0, keepdim=True), widen * v.std(0, keepdim=True).clamp_min(1e-4)
            )
            for name, v in pilot.items()
        }
        from_q = target.sample(k)
        pick = torch.rand(k, x.shape[0], device=x.device) < mix
        values = {
            name: _where(pick, heavy[name].sample((k,)).reshape(v.shape), v)
            for name, v in from_q.items()
        }
        log_p, log_q = target.log_densities(values)
        log_t = sum(_per_cell_sum(heavy[n].log_prob(v)) for n, v in values.items())
        log_mix = torch.logaddexp(math.log1p(-mix) + log_q, math.log(mix) + log_t)
        return log_p - log_mix
