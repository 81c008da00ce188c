"""Posterior queries on a trained model and guide, built on :class:`pyro.infer.Predictive`.

Every query runs over cells in minibatches, so memory stays bounded by
``batch_size x n_samples x n_genes``; networks run in eval mode (batch-norm running
statistics, no dropout), and Pyro's global parameter store is left untouched.

Held-out fit
------------
For ``K`` draws ``(z_k, l_k) ~ q(z, l | x)`` the importance weights
``log w_k = log p(x, z_k, l_k) - log q(z_k, l_k | x)`` give, per cell,

- the ELBO estimate ``mean_k log w_k``;
- the importance-sampled marginal log-likelihood ``log mean_k w_k``, a stochastic lower
  bound on ``log p(x)`` that tightens as ``K`` grows (Burda et al., 2016);
- the reconstruction error ``-mean_k log p(x | z_k, l_k)``.

The ``K`` draws are vectorized by a plate over samples at dim -3, outside the model's
``cells`` (-2) and ``genes`` (-1) plates.

With ``observed_library=True`` the same estimators condition on each cell's observed
library, ``l = log sum_g x_g``: the site ``l`` is fixed there in the model and the guide
and its densities are left out, so ``log w_k = log p(x | z_k, l) + log p(z_k) -
log q(z_k | x, l)`` and ``log mean_k w_k`` estimates ``log p(x | l)``. That is the number
a model with an observed library (:class:`~pyro_scvi.model.priors.ObservedLibrary`, scvi-tools'
default) reports as its ``log p(x)``, so the two kinds of model compare like for like;
it assumes, as scVI's model does, that ``z`` and ``l`` are independent a priori.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np
import pyro
import pyro.distributions as dist
import scipy.sparse as sp
import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.poutine.util import site_is_subsample

from ..data.counts import CountData
from ..model.distributions import nb_logits
from ..model.nn import eval_mode
from ..model.priors import ObservedLibrary, is_latent_library
from ..model.schemes import is_global


def iterate_cells(
    data: CountData, indices: np.ndarray, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, batch_index)`` tensors for consecutive minibatches of ``indices``."""
    for idx in data.minibatches(indices, batch_size):
        yield data.tensors(idx, device)


def iterate_indexed_cells(
    data: CountData, indices: np.ndarray, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Like :func:`iterate_cells`, plus ``cell_index``: the cells' rows in ``data``.

    Queries pass ``cell_index`` to the model and guide so that a guide with per-cell
    parameters (:class:`~pyro_scvi.model.guides.PerCellGuide`) finds each cell's own; an amortized
    guide ignores it.
    """
    for idx in data.minibatches(indices, batch_size):
        x, b = data.tensors(idx, device)
        yield x, b, torch.as_tensor(idx, device=device)


def latent_mean(
    guide, data: CountData, indices: np.ndarray, *, batch_size: int = 1024, device="cpu"
) -> np.ndarray:
    """Posterior mean of ``z`` (the guide's ``z_loc``) for each cell, ``(cells, n_latent)``."""
    out = []
    with torch.no_grad(), eval_mode(guide):
        for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
            out.append(guide.encode(x, b, cells)["z_loc"].cpu().numpy())
    return np.concatenate(out)


SHARED_GLOBALS: ContextVar[dict[str, torch.Tensor] | None] = ContextVar(
    "pyro_scvi_shared_globals", default=None
)


@contextmanager
def shared_globals(guide, n_samples: int) -> Iterator[dict[str, torch.Tensor]]:
    """Draw a guide's global sites once for a whole query; yield the draws.

    A guide with global sites (:class:`~pyro_scvi.model.schemes.GlobalsGuide`) would otherwise
    draw them anew for every minibatch of cells, so replicate ``s`` of a dataset would mix
    several draws of the decoder and ``theta``, and statistics over all cells (a gene's
    mean) would lose the globals' spread. Inside this block :func:`sample_guide` and the
    queries built on it use draw ``s`` of these for sample ``s`` of every minibatch. A
    guide without globals yields ``{}``; an enclosing block's draws are kept.

    Examples
    --------
    >>> import pyro_scvi
    >>> from pyro_scvi.model.schemes import BayesianDecoder
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=30, n_genes=6, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=4, scheme=BayesianDecoder())
    >>> with shared_globals(m.guide, 5) as draws:
    ...     {k: tuple(v.shape) for k, v in draws.items()}
    {'rho_weight': (5, 1, 6, 4), 'rho_bias': (5, 1, 6), 'log_theta': (5, 1, 6)}
    """
    current = SHARED_GLOBALS.get()
    draw = getattr(guide, "sample_globals", None)
    if current is not None:
        size = next(iter(current.values())).shape[0]
        if size != int(n_samples):
            raise ValueError(
                f"A query with {n_samples} samples inside one with {size} shared global draws."
            )
        yield current
        return
    if draw is None:
        yield {}
        return
    with torch.no_grad():
        values = draw(int(n_samples))
    token = SHARED_GLOBALS.set(values)
    try:
        yield values
    finally:
        SHARED_GLOBALS.reset(token)


def sample_guide(
    model,
    guide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    n_samples: int,
    cell_index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``n_samples`` draws of the guide's latent sites for one minibatch of cells.

    Returns ``z`` of shape ``(n_samples, cells, 1, n_latent)`` and, for a latent library,
    ``l`` of shape ``(n_samples, cells, 1)``; a guide with global sites adds their draws
    (those of an enclosing :func:`shared_globals` block, if any). ``cell_index`` (the
    cells' rows in the data) is passed on for guides with per-cell parameters.
    """
    sites = ["z", "l"] if is_latent_library(getattr(model, "library_prior", None)) else ["z"]
    predictive = Predictive(
        model, guide=guide, num_samples=n_samples, return_sites=sites, parallel=True
    )
    # a guide's global sites: the enclosing query's draws, else this minibatch's own
    with shared_globals(guide, n_samples) as shared:
        return {**predictive(x, batch_index, cell_index), **shared}


@contextmanager
def _posterior_draws(model, guide, n_samples: int) -> Iterator[None]:
    """The setting of a query that draws ``n_samples`` posterior samples per cell.

    No gradients, networks in eval mode, a scope that leaves Pyro's parameter store as it
    was, and one draw of the guide's global sites for the whole query
    (:func:`shared_globals`), so every minibatch decodes under the same globals.
    """
    with (
        torch.no_grad(),
        eval_mode(model, guide),
        pyro.get_param_store().scope(),
        shared_globals(guide, n_samples),
    ):
        yield


def decode(
    model,
    samples: dict[str, torch.Tensor],
    x: torch.Tensor,
    batch_index: torch.Tensor,
    sites: Sequence[str] = ("rho",),
) -> dict[str, torch.Tensor]:
    """Run the model at the given latent ``samples`` and return ``sites``.

    Passing another ``batch_index`` than the cells' own decodes them as if they had been
    measured in that batch: the basis of batch-corrected expression.
    """
    n = next(iter(samples.values())).shape[0]
    predictive = Predictive(
        model, posterior_samples=samples, num_samples=n, return_sites=list(sites), parallel=True
    )
    return predictive(x, batch_index)


def sample_posterior(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 25,
    sites: Sequence[str] = ("z", "l", "rho", "x"),
    transform_batch: int | None = None,
    batch_size: int = 256,
    device="cpu",
) -> dict[str, np.ndarray]:
    """Posterior and posterior predictive samples for the cells ``indices``.

    ``z`` (and ``l``) are drawn from the guide; ``rho`` and the replicated counts ``x`` are
    then drawn from the model at those draws (``x`` is unconditioned, so it is a new
    sample x~ from p(x | z, l), not the data). With ``transform_batch`` the model decodes
    every cell as if measured in that batch.

    Returns
    -------
    dict
        numpy arrays with a leading sample axis: ``z`` ``(S, cells, n_latent)``, ``l``
        ``(S, cells)``, ``rho`` and ``x`` ``(S, cells, genes)``; only the requested sites.
    """
    unknown = set(sites) - {"z", "l", "rho", "x"}
    if unknown:
        raise ValueError(f"Unknown sites {sorted(unknown)}; choose from z, l, rho, x.")
    out: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    model_sites = [s for s in sites if s in ("rho", "x")]
    with _posterior_draws(model, guide, n_samples):
        for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
            latent = sample_guide(model, guide, x, b, n_samples, cells)
            decoded = {}
            if model_sites:
                bb = b if transform_batch is None else torch.full_like(b, transform_batch)
                decoded = decode(poutine.uncondition(model), latent, x, bb, model_sites)
            for s in sites:
                if s in ("z", "l"):
                    if s in latent:
                        out[s].append(latent[s].squeeze(-2 if s == "z" else -1).cpu().numpy())
                else:
                    out[s].append(decoded[s].cpu().numpy())
    return {s: np.concatenate(v, axis=1) for s, v in out.items() if v}


class _RecordingLikelihood:
    """A likelihood that records the arguments of each call and answers as ``inner``."""

    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, []

    def __getattr__(self, name: str):  # uses_dispersion, uses_gate, ...
        return getattr(self.inner, name)

    def __call__(self, mu, theta, gate_logits):
        self.calls.append((mu, theta, gate_logits))
        return self.inner(mu, theta, gate_logits)


def _likelihood_arguments(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int,
    batch_size: int,
    device,
) -> Iterator[tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]]:
    """Per minibatch: the counts ``x`` and what the model hands its likelihood.

    For ``n_samples`` draws of ``z`` (and ``l``) from the guide the model is run and the
    arguments ``(mu, theta, gate_logits)`` of its ``likelihood`` call are recorded (each
    ``None`` or broadcastable to ``(n_samples, cells, genes)``), so this works for any
    :class:`~pyro_scvi.model.likelihoods.Likelihood`. The caller consumes each minibatch before
    asking for the next.
    """
    original = model.likelihood
    recording = _RecordingLikelihood(original)
    with _posterior_draws(model, guide, n_samples):
        model.likelihood = recording
        try:
            for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
                latent = sample_guide(model, guide, x, b, n_samples, cells)
                recording.calls.clear()
                decode(model, latent, x, b, ("x",))
                yield x, recording.calls[-1]
        finally:
            model.likelihood = original


def likelihood_parameters(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 1,
    batch_size: int = 256,
    device="cpu",
) -> dict[str, np.ndarray]:
    """The parameters the model hands its count likelihood, at posterior draws.

    For each of ``n_samples`` draws of ``z`` (and ``l``) from the guide, the model is run and
    the arguments of its ``likelihood(mu, theta, gate_logits)`` call are recorded, so this
    works for any :class:`~pyro_scvi.model.likelihoods.Likelihood`.

    Returns
    -------
    dict
        ``mean`` (``mu = exp(l) * rho``), ``dispersions`` (``theta``, if the likelihood
        uses it) and ``dropout`` (the zero-inflation logits, if it uses them), each
        ``(n_samples, cells, genes)``; scvi-tools' names.
    """
    keys = ("mean", "dispersions", "dropout")
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    for _, call in _likelihood_arguments(
        model, guide, data, indices, n_samples=n_samples, batch_size=batch_size, device=device
    ):
        mu = call[0]
        for key, value in zip(keys, call, strict=True):
            if value is not None:
                out[key].append(value.expand_as(mu).cpu().numpy())
    return {k: np.concatenate(v, axis=1) for k, v in out.items() if v}


def dropout_probability_given_zero(
    mu: torch.Tensor, theta: torch.Tensor | None, gate_logits: torch.Tensor
) -> torch.Tensor:
    """P(a zero count is a technical dropout | x = 0) under ZINB or ZIP, elementwise.

    With ``pi = sigmoid(gate_logits)`` and ``p0`` the probability that the count
    distribution without the gate gives 0, Bayes' rule gives
    ``pi / (pi + (1 - pi) p0) = sigmoid(gate_logits - log p0)``, computed in that form so
    that neither a tiny ``pi`` nor a tiny ``p0`` loses precision. ``p0`` is
    ``(theta / (theta + mu))**theta`` for the negative binomial (ZINB) and ``exp(-mu)``
    for the Poisson (ZIP; pass ``theta=None``).

    Parameters
    ----------
    mu
        Mean of the count distribution before zero inflation (``>= 0``).
    theta
        Inverse dispersion of the negative binomial, or ``None`` for a Poisson.
    gate_logits
        Logits of the zero-inflation probability ``pi``.

    Returns
    -------
    torch.Tensor
        The broadcast of the arguments, in [0, 1].

    Examples
    --------
    >>> import torch
    >>> mu, theta, gate_logits = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.0)
    >>> round(float(dropout_probability_given_zero(mu, theta, gate_logits)), 4)  # .5 / .608
    0.8224
    >>> round(float(dropout_probability_given_zero(mu, None, gate_logits)), 4)  # Poisson
    0.8808
    """
    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
    if theta is None:
        log_p0 = dist.Poisson(mu).log_prob(zero)
    else:
        log_p0 = dist.NegativeBinomial(total_count=theta, logits=nb_logits(mu, theta)).log_prob(
            zero
        )
    return torch.sigmoid(gate_logits - log_p0)


def dropout_probability(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 25,
    genes: np.ndarray | None = None,
    zeros_only: bool = True,
    batch_size: int = 256,
    device="cpu",
) -> np.ndarray:
    """Posterior probability that each zero count is a technical dropout, ``(cells, genes)``.

    ``P(dropout | x) = E_q(z, l | x)[dropout_probability_given_zero(mu, theta, gate)]``,
    averaged over ``n_samples`` guide draws; the guide conditions on the cell's counts,
    zeros included, so the average is the posterior probability of the mixture component.

    Parameters
    ----------
    model, guide
        A model whose likelihood is zero-inflated (``uses_gate``): ZINB or ZIP.
    data, indices
        The cells to query, by position in ``data``.
    n_samples
        Guide draws per cell.
    genes
        Column positions of the genes to return (default: all).
    zeros_only
        Entries with ``x > 0`` are ``NaN`` (the question is about zeros, and a positive
        count cannot be a dropout); ``False`` gives every entry the probability that it
        would be a dropout were it zero.
    batch_size, device
        Cells per pass, and where to compute.

    Returns
    -------
    numpy.ndarray
        float32 ``(len(indices), len(genes))`` in [0, 1], ``NaN`` where ``x > 0`` when
        ``zeros_only``.
    """
    likelihood = model.likelihood
    if not getattr(likelihood, "uses_gate", False):
        raise ValueError(
            f"The model's likelihood {likelihood!r} has no zero-inflation gate, so no zero "
            "is a dropout; fit with likelihood=pyro_scvi.ZINB() or pyro_scvi.ZIP()."
        )
    out = []
    for x, (mu, theta, gate_logits) in _likelihood_arguments(
        model, guide, data, indices, n_samples=n_samples, batch_size=batch_size, device=device
    ):
        if not likelihood.uses_dispersion:
            theta = None
        p = dropout_probability_given_zero(mu, theta, gate_logits).mean(0)
        p = p.expand(x.shape)
        if zeros_only:
            p = torch.where(x == 0, p, torch.nan)
        if genes is not None:
            p = p[:, torch.as_tensor(genes, device=p.device)]
        out.append(p.float().cpu().numpy())
    return np.concatenate(out)


def latent_library_size(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    give_mean: bool = True,
    batch_size: int = 1024,
    device="cpu",
) -> np.ndarray:
    """Library size ``exp(l)`` of each cell under the guide, ``(cells,)``.

    ``give_mean``: the posterior mean ``E_q[exp(l)] = exp(l_loc + l_scale**2 / 2)`` (q(l)
    is Normal, so exp(l) is log-normal); otherwise one draw. A model that observes the
    library size (:class:`~pyro_scvi.model.priors.ObservedLibrary`) returns each cell's total
    count.
    """
    out = []
    with torch.no_grad(), eval_mode(model, guide):
        for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
            if not is_latent_library(getattr(model, "library_prior", None)):
                size = x.sum(-1)
            else:
                q = guide.encode(x, b, cells)
                loc, scale = q["l_loc"].squeeze(-1), q["l_scale"].squeeze(-1)
                if give_mean:
                    size = torch.exp(loc + scale**2 / 2)
                else:
                    size = torch.exp(loc + scale * torch.randn_like(loc))
            out.append(size.cpu().numpy())
    return np.concatenate(out)


def posterior_predictive_counts(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 1,
    batch_size: int = 256,
    device="cpu",
) -> list[sp.csr_matrix]:
    """Replicated counts ``x~ ~ p(x~ | z, l)``, ``(z, l) ~ q``, as sparse matrices.

    One CSR matrix ``(cells, genes)`` per draw. Each pass's draws are made sparse before the
    next pass, so memory holds one pass dense (``batch_size x n_samples x genes``) plus
    the non-zero counts.
    """
    parts: list[list[sp.csr_matrix]] = [[] for _ in range(n_samples)]
    # one draw of the globals (if any) per replicate, shared by every chunk of cells
    with shared_globals(guide, n_samples):
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            x = sample_posterior(
                model,
                guide,
                data,
                chunk,
                n_samples=n_samples,
                sites=("x",),
                batch_size=batch_size,
                device=device,
            )["x"]
            for s in range(n_samples):
                parts[s].append(sp.csr_matrix(x[s].astype(np.float32)))
    return [sp.vstack(p, format="csr") for p in parts]


def normalized_expression(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    transform_batch: Sequence[int] | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    batch_size: int = 256,
    device="cpu",
    mean: bool = False,
) -> np.ndarray:
    """Posterior samples of normalized expression, ``(n_samples, cells, genes)``.

    ``rho`` is decoded under each batch code in ``transform_batch`` and averaged over them
    (``None``: each cell's own batch), then scaled to ``library_size`` counts per cell or,
    with ``library_size="latent"``, multiplied by the cell's library ``exp(l)``. With
    ``mean``, the samples' mean instead, ``(cells, genes)`` float32, summed in float64 one
    minibatch at a time: the same draws, without holding every sample of every cell.
    """
    out = []
    with _posterior_draws(model, guide, n_samples):
        for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
            samples = sample_guide(model, guide, x, b, n_samples, cells)
            codes = [None] if transform_batch is None else list(transform_batch)
            rho = 0.0
            for code in codes:
                bb = b if code is None else torch.full_like(b, code)
                rho = rho + decode(model, samples, x, bb)["rho"]
            rho = rho / len(codes)
            if library_size == "latent":
                lib = (
                    x.sum(-1, keepdim=True).expand(rho.shape[:-1] + (1,))
                    if "l" not in samples
                    else samples["l"].exp()
                )
                rho = rho * lib
            else:
                rho = rho * float(library_size)
            if mean:
                rho = _sample_mean(rho)
            out.append(rho.cpu().numpy())
    return np.concatenate(out, axis=0 if mean else 1)


def _sample_mean(samples: torch.Tensor) -> torch.Tensor:
    """The mean over the leading (sample) axis, summed in float64 one sample at a time.

    As ``samples.mean(0, dtype=torch.float64)``, without a float64 copy of every sample;
    returned as float32.
    """
    total = torch.zeros(samples.shape[1:], dtype=torch.float64, device=samples.device)
    for sample in samples:
        total += sample
    return (total / samples.shape[0]).to(torch.float32)


# ---------------------------------------------------------------------- held-out fit
#: Name of the plate that vectorizes importance samples; private so it cannot clash with a
#: user's own plate names.
_SAMPLES_PLATE = "_importance_samples"


def per_cell(log_prob: torch.Tensor, n_samples: int, n_cells: int) -> torch.Tensor:
    """Reduce a site's log-density, shaped like ``(samples, cells, genes-or-1)``, per cell."""
    if log_prob.dim() > 3:
        raise ValueError(
            f"A log-density of shape {tuple(log_prob.shape)} does not fit the plates "
            "(samples, cells, genes); is the model's max plate nesting above 2?"
        )
    log_prob = log_prob.reshape((1,) * (3 - log_prob.dim()) + tuple(log_prob.shape))
    return log_prob.sum(-1).expand(n_samples, n_cells)


def _conditioned_on_library(model, guide, x: torch.Tensor, observed_library: bool):
    """``(model, guide, skip)``; with ``observed_library``, conditioned on the cells' library.

    Each cell's ``l`` is then fixed at its observed log library in both, and ``skip``
    (``{"l"}``) names the site whose density is left out (see the module docstring).
    """
    if not observed_library:
        return model, guide, set()
    fixed = {"l": ObservedLibrary().observed(x)}
    return poutine.condition(model, data=fixed), poutine.condition(guide, data=fixed), {"l"}


def _cell_log_probs(
    tr, n_samples: int, n_cells: int, skip: set
) -> Iterator[tuple[dict, torch.Tensor]]:
    """Each site of a scored trace with a density per cell, and that density per cell.

    The densities are ``(samples, cells)`` (:func:`per_cell`). Left out: what is not a
    sample site, ``pyro.deterministic`` sites (rho: masked Deltas), a plate's subsample
    site (density 0), global sites (:func:`pyro_scvi.model.schemes.is_global`: a cell's
    density is conditional on them) and the sites named in ``skip``. Importance sampling
    (:func:`log_importance_weights`) and AIS (:mod:`pyro_scvi.posterior.ais`) sum these.
    """
    for site in tr.nodes.values():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        if is_global(site) or site["name"] in skip or site_is_subsample(site):
            continue
        yield site, per_cell(site["log_prob"], n_samples, n_cells)


def _log_densities(
    model,
    guide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    n_samples: int,
    cell_index: torch.Tensor | None = None,
    observed_library: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log w, log p(x | z, l))``, each ``(n_samples, cells)``, for one minibatch.

    The caller sets eval mode, ``no_grad`` and the parameter-store scope. Global sites
    (:func:`pyro_scvi.model.schemes.is_global`) are drawn with the cells' latents but their
    density is left out: a cell's weight is ``log p(x, z, l | globals) - log q(z, l)``
    at a draw of the globals from ``q``. ``observed_library``: see the module docstring.
    """
    n_cells = x.shape[0]
    args = (x, batch_index, cell_index)
    model, guide, skip = _conditioned_on_library(model, guide, x, observed_library)
    with pyro.plate(_SAMPLES_PLATE, n_samples, dim=-3):
        guide_tr = poutine.trace(guide).get_trace(*args)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args)
    log_w = x.new_zeros(n_samples, n_cells)
    log_px = x.new_zeros(n_samples, n_cells)
    for sign, tr in ((1.0, model_tr), (-1.0, guide_tr)):
        tr.compute_log_prob()
        for site, lp in _cell_log_probs(tr, n_samples, n_cells, skip):
            log_w = log_w + sign * lp
            if sign > 0 and site["is_observed"]:
                log_px = log_px + lp
    return log_w, log_px


def log_importance_weights(
    model,
    guide,
    x: torch.Tensor,
    batch_index: torch.Tensor,
    n_samples: int,
    *,
    batch_size: int | None = None,
    cell_index: torch.Tensor | None = None,
    observed_library: bool = False,
) -> torch.Tensor:
    """Per-cell log importance weights ``log p(x, z, l) - log q(z, l | x)``.

    Parameters
    ----------
    model, guide
        A model and guide with the signature of :class:`~pyro_scvi.model.ScviModel`
        (plates ``cells`` at dim -2 and ``genes`` at dim -1). Models that observe the
        library size have no ``l`` site; the weight is then over ``z`` alone.
    x, batch_index
        Counts ``(cells, genes)`` and batch codes ``(cells,)``.
    n_samples
        Guide draws ``K`` per cell, vectorized by a plate at dim -3.
    batch_size
        Cells per pass (default: all); memory grows as ``batch_size x K x genes``.
    cell_index
        The cells' rows in the data, for a guide with per-cell parameters.
    observed_library
        Condition on each cell's observed library instead (see the module docstring):
        ``log p(x | z, l) + log p(z) - log q(z | x, l)``.

    Returns
    -------
    torch.Tensor
        ``(n_samples, cells)``: summed over genes for the observation term, over latent
        dimensions for ``z``.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi import ScviGuide, ScviModel
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> prior = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    >>> model, guide = ScviModel(20, 1, prior, n_latent=3), ScviGuide(20, 1, n_latent=3)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> log_w = log_importance_weights(model, guide, x, torch.zeros(8, dtype=torch.long), 5)
    >>> tuple(log_w.shape), bool(torch.isfinite(log_w).all())
    ((5, 8), True)
    """
    n_cells = x.shape[0]
    step = n_cells if batch_size is None else max(int(batch_size), 1)
    out = []
    with torch.no_grad(), eval_mode(model, guide), pyro.get_param_store().scope():
        for start in range(0, n_cells, step):
            sl = slice(start, start + step)
            cells = None if cell_index is None else cell_index[sl]
            log_w, _ = _log_densities(
                model, guide, x[sl], batch_index[sl], n_samples, cells, observed_library
            )
            out.append(log_w)
    return torch.cat(out, dim=1)


def fit_statistics(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 100,
    batch_size: int = 64,
    device="cpu",
    observed_library: bool = False,
    proposal=None,
) -> dict[str, np.ndarray]:
    """ELBO, marginal log-likelihood and reconstruction error of each cell, in one pass.

    All three come from the same ``n_samples`` guide draws per cell (see the module
    docstring), so ``marginal_ll >= elbo`` holds cell by cell (Jensen's inequality).
    ``observed_library=True`` conditions all three on each cell's observed library (the
    module docstring says how). ``proposal`` (a
    :class:`~pyro_scvi.posterior.proposals.Proposal`; None: q itself) draws the
    ``n_samples`` importance samples of ``marginal_ll`` instead; the ELBO and the
    reconstruction error still come from q, and ``marginal_ll >= elbo`` then holds only in
    expectation.

    Returns
    -------
    dict
        ``elbo``, ``marginal_ll`` (nats, higher is better), ``reconstruction_error``
        (``-E_q[log p(x | z, l)]``, lower is better) and ``pareto_k`` (PSIS Pareto ``k`` of
        the importance weights behind ``marginal_ll``: above 0.7 it is not to be trusted),
        each ``(len(indices),)``.

    Examples
    --------
    >>> import numpy as np, pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=30, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> stats = fit_statistics(m.model, m.guide, m.data, np.arange(30), n_samples=4)
    >>> stats["marginal_ll"].shape, bool((stats["marginal_ll"] >= stats["elbo"]).all())
    ((30,), True)
    >>> bool(np.isinf(stats["pareto_k"]).all())  # 4 samples are too few to judge the tail
    True
    """
    out: dict[str, list[np.ndarray]] = {
        "elbo": [], "marginal_ll": [], "reconstruction_error": [], "pareto_k": []
    }  # fmt: skip
    log_k = math.log(n_samples)
    with torch.no_grad(), eval_mode(model, guide), pyro.get_param_store().scope():
        for x, b, cells in iterate_indexed_cells(data, indices, batch_size, device):
            log_w, log_px = _log_densities(
                model, guide, x, b, n_samples, cells, observed_library=observed_library
            )
            out["elbo"].append(log_w.mean(0).cpu().numpy())
            out["reconstruction_error"].append((-log_px.mean(0)).cpu().numpy())
            if proposal is not None and not proposal.is_guide:
                log_w = proposal.log_weights(
                    model, guide, x, b, n_samples, cell_index=cells,
                    observed_library=observed_library,
                )  # fmt: skip
            out["marginal_ll"].append((torch.logsumexp(log_w, 0) - log_k).cpu().numpy())
            out["pareto_k"].append(pareto_k(log_w))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def pareto_k(log_w: torch.Tensor) -> np.ndarray:
    """PSIS Pareto ``k`` of each cell's importance weights ``(samples, cells)`` (ArviZ).

    Above 0.7 the weights' tail is too heavy for their mean to be trusted (Vehtari et al.,
    2024). ``k`` is itself estimated from the largest weights, so it depends on the number
    of samples: compare proposals at the same ``K``. With too few samples to fit a tail
    (fewer than about 25) it is ``inf``: nothing can be trusted.

    Examples
    --------
    >>> import torch
    >>> bool(pareto_k(torch.randn(500, 2) * 0.1).max() < 0.7)
    True
    """
    if log_w.shape[0] < 2:
        return np.full(log_w.shape[1], np.inf)
    import arviz as az

    with np.errstate(invalid="ignore"):  # a cell whose weights are all zero: k = inf
        _, k = az.psislw(log_w.detach().cpu().double().numpy().T.copy(), normalize=False)
    return np.asarray(k, dtype=np.float64).reshape(-1)


# ---------------------------------------------------------------------- summaries
def quantile_key(q: float) -> str:
    """Key of quantile ``q`` in :func:`summarize`'s result, e.g. ``"2.5%"``.

    Examples
    --------
    >>> quantile_key(0.025), quantile_key(0.5)
    ('2.5%', '50%')
    """
    return f"{100 * q:g}%"


def summarize(
    samples: np.ndarray, quantiles: Sequence[float] = (0.025, 0.5, 0.975)
) -> dict[str, np.ndarray]:
    """Mean, standard deviation and quantiles over the leading (sample) axis.

    Parameters
    ----------
    samples
        Array ``(n_samples, ...)``, e.g. from :func:`sample_posterior`.
    quantiles
        Levels in [0, 1]; each is keyed by :func:`quantile_key`.

    Returns
    -------
    dict
        ``mean``, ``sd`` (with ``ddof=1``, as Pyro's own summaries; 0 for a single sample)
        and one entry per quantile (linear interpolation), each of shape ``samples.shape[1:]``.

    Examples
    --------
    >>> import numpy as np
    >>> s = summarize(np.arange(5.0)[:, None], quantiles=(0.25, 0.5))
    >>> sorted(s), float(s["mean"][0]), float(s["25%"][0]), round(float(s["sd"][0]) ** 2, 6)
    (['25%', '50%', 'mean', 'sd'], 2.0, 1.0, 2.5)
    """
    samples = np.asarray(samples)
    if samples.ndim == 0 or samples.shape[0] == 0:
        raise ValueError("summarize needs a leading sample axis with at least one sample.")
    qs = [float(q) for q in quantiles]
    if any(not 0.0 <= q <= 1.0 for q in qs):
        raise ValueError(f"quantiles={tuple(quantiles)}; each must be in [0, 1].")
    out = {
        "mean": samples.mean(0),
        "sd": samples.std(0, ddof=1) if samples.shape[0] > 1 else np.zeros(samples.shape[1:]),
    }
    for q, values in zip(qs, np.quantile(samples, qs, axis=0), strict=True):
        out[quantile_key(q)] = values
    return out


@contextmanager
def seeded(seed: int | None, device: torch.device | str = "cpu") -> Iterator[None]:
    """Seed torch's RNG (which Pyro samples from) inside the block, then restore it.

    The caller's random stream is left as it was, so a seeded query does not change what
    later unseeded code draws. ``None`` does nothing.

    Examples
    --------
    >>> import torch
    >>> with seeded(1):
    ...     a = torch.rand(2)
    >>> with seeded(1):
    ...     b = torch.rand(2)
    >>> bool(torch.equal(a, b))
    True
    """
    if seed is None:
        yield
        return
    # Fork the CUDA generators only when sampling there: forking touches every device.
    devices = None if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield
