"""Model criticism on held-out cells: per-entry calibration, summary statistics, held-out fit.

One pass over the chosen cells draws ``S`` latents ``(z_s, l_s) ~ q(z, l | x)`` per cell and
scores everything a statistician asks of a count model against the same draws:

Per-entry calibration (randomized PIT)
    The posterior predictive distribution of an entry ``x_ng`` is the mixture
    ``F(k) = (1/S) sum_s F_s(k)`` of the likelihood's CDFs at the draws. For counts the PIT
    is made continuous by randomizing within the jump (Czado, Gneiting and Held 2009):
    ``u = F(x - 1) + V * (F(x) - F(x - 1))``, ``V ~ Uniform(0, 1)``. Under a calibrated
    predictive the ``u`` are Uniform(0, 1). We report the total-variation (TV) distance of
    their histogram from uniform, ``0.5 * sum_b |p_b - 1/B|``, beside the value it takes for
    ``N`` truly uniform draws, ``E[TV] ~ sqrt((B - 1) / (2 pi N))``, so a reader can tell
    noise from misfit. A U-shaped histogram means the predictive is too narrow, a hump too
    wide, a slope a biased mean.
Interval coverage
    The central ``c`` interval of entry ``ng`` covers ``x_ng`` when
    ``(1 - c)/2 <= u <= (1 + c)/2``: with the randomized PIT the coverage of a calibrated
    predictive is exactly ``c`` even for discrete counts (without randomization the
    intervals of a count are conservative). ``calibration_error`` is the mean absolute
    difference between coverage and nominal over ``c = 0.1, 0.2, ..., 0.9, 0.95``, in units
    of probability (scvi-tools sums squared differences; an average of absolute gaps reads
    directly as "off by so many percentage points").
Summary statistics
    Per gene (over the cells): ``mean``, ``variance``, ``cv``, ``zero_fraction``; per cell
    (over the genes): ``library_size`` and ``detected_genes`` (number of non-zero genes).
    Observed against the posterior predictive mean of the statistic over the ``S``
    replicates, with central 95 % intervals, mid-p posterior predictive p-values
    (:func:`pyro_scvi.analysis.ppc.ppp_values`) and ``r2``: the coefficient of determination of the
    observed values by the replicated means *about the identity line*,
    ``1 - sum (obs - rep)^2 / sum (obs - mean(obs))^2`` (can be negative; unlike a squared
    correlation it is penalized by a systematic bias), on a log10 scale for statistics that
    span orders of magnitude. ``pearson_r2`` (squared correlation, same scale) is beside it.
Held-out fit (PSIS)
    The same draws give importance weights ``log w_s = log p(x, z_s, l_s) - log q(z_s, l_s | x)``
    and their Pareto-smoothed estimate of each cell's log predictive density
    ``log p(x_n)`` (global parameters plugged in), with the Pareto ``k`` of the weights
    (Vehtari et al. 2024; Yao et al. 2018): below 0.7 the estimate is reliable; above it the
    guide is too far from the posterior of that cell for ``S`` draws (:func:`psis_elpd`).

Why held-out cells
    The fitted decoder and dispersions have seen the training cells. On cells outside
    training the check asks the question a user cares about (does the model predict new
    cells?), and is not flattered by the data being used twice. Each cell's own ``z`` is
    still inferred from its counts, as it is whenever the model is used.

References
----------
Czado, C., Gneiting, T. & Held, L. Predictive model assessment for count data.
Biometrics 65, 1254-1261 (2009).
Vehtari, A., Simpson, D., Gelman, A., Yao, Y. & Gabry, J. Pareto smoothed importance
sampling. JMLR 25(72), 1-58 (2024).
Yao, Y., Vehtari, A., Simpson, D. & Gelman, A. Yes, but did it work?: Evaluating
variational inference. ICML (2018).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyro
import pyro.distributions as dist
import torch
from anndata import AnnData
from pyro import poutine
from scipy import special

from ..data.counts import CountData
from ..errors import InputError
from ..model.distributions import ZeroInflatedNegativeBinomialMeanDispersion
from ..model.nn import eval_mode
from ..model.priors import is_latent_library
from ..model.schemes import is_global
from ..posterior.queries import (
    SHARED_GLOBALS,
    iterate_indexed_cells,
    per_cell,
    seeded,
    shared_globals,
)
from .ppc import ppp_values

#: Nominal levels of the central predictive intervals whose coverage is reported.
COVERAGE_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: Statistics compared observed against replicated, per gene and per cell.
GENE_STATISTICS = ("mean", "variance", "cv", "zero_fraction")
CELL_STATISTICS = ("library_size", "detected_genes")
#: Statistics whose r2 is computed on log10 values: they span orders of magnitude.
LOG_SCALE = frozenset({"mean", "variance", "cv", "library_size"})
#: Pareto k above which a PSIS estimate is unreliable (Vehtari et al. 2024).
PARETO_K_THRESHOLD = 0.7

_DRAWS_PLATE = "_criticism_draws"


# ------------------------------------------------------------------ count CDFs
def count_cdf(d: dist.Distribution, value: torch.Tensor) -> np.ndarray:
    """CDF ``P(X <= value)`` of a count distribution, elementwise, in float64.

    Exact for Poisson, negative binomial (``NegativeBinomial``, ``GammaPoisson``), their
    zero-inflated versions and
    :class:`~pyro_scvi.model.distributions.ZeroInflatedNegativeBinomialMeanDispersion`;
    ``P(X <= k) = 0`` for ``k < 0``. Any other distribution falls back to a Monte-Carlo
    estimate from 1,000 of its samples, with a warning.

    Parameters
    ----------
    d
        The distribution; ``Independent`` and expanded wrappers are looked through.
    value
        Integer-valued tensor broadcastable to ``d.batch_shape`` (may hold ``-1``).

    Returns
    -------
    numpy.ndarray
        ``F(value)``, shaped like the broadcast of ``value`` and the batch shape.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> from scipy import stats
    >>> k = torch.tensor([-1.0, 0.0, 3.0])
    >>> count_cdf(dist.Poisson(torch.tensor(2.0)), k).round(6).tolist()
    [0.0, 0.135335, 0.857123]
    >>> nb = dist.NegativeBinomial(total_count=torch.tensor(2.5), probs=torch.tensor(0.4))
    >>> bool(abs(count_cdf(nb, torch.tensor(3.0)) - stats.nbinom(2.5, 0.6).cdf(3)) < 1e-6)
    True
    """
    while isinstance(d, dist.Independent | dist.ExpandedDistribution):
        d = d.base_dist
    shape = torch.broadcast_shapes(value.shape, d.batch_shape)
    k = value.detach().double().expand(shape).cpu().numpy()
    params = _count_params(d)
    if params is None:
        warnings.warn(
            f"No closed-form CDF for {type(d).__name__}; estimating it from 1,000 samples.",
            stacklevel=2,
        )
        draws = d.sample((1000,)).double()
        return (draws <= value.double()).double().mean(0).expand(shape).cpu().numpy()
    kind, arrays = params
    arrays = {n: np.broadcast_to(a, shape) for n, a in arrays.items()}
    out = np.zeros(shape)
    zero, pos = k == 0, k > 0
    if kind == "poisson":
        rate = arrays["rate"]
        out[zero] = np.exp(-rate[zero])
        out[pos] = special.gammaincc(k[pos] + 1.0, rate[pos])
    else:  # negative binomial: F(k) = I_q(r, k + 1), q = P(failure) = theta / (theta + mu)
        r, q = arrays["r"], arrays["q"]
        out[zero] = np.exp(r[zero] * np.log(q[zero]))
        out[pos] = special.betainc(r[pos], k[pos] + 1.0, q[pos])
    if "gate" in arrays:
        gate = arrays["gate"]
        nonneg = k >= 0
        out[nonneg] = gate[nonneg] + (1.0 - gate[nonneg]) * out[nonneg]
    return out


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _count_params(d: dist.Distribution) -> tuple[str, dict[str, np.ndarray]] | None:
    """``("poisson", {rate[, gate]})`` or ``("nb", {r, q[, gate]})``; ``None`` if unknown."""
    if isinstance(d, ZeroInflatedNegativeBinomialMeanDispersion):
        mu, theta = _np(d.mu), _np(d.theta)
        return "nb", {
            "r": theta,
            # float64 from here on: the jump F(x) - F(x-1) of a large count is tiny
            "q": theta / (theta + mu),
            "gate": special.expit(_np(d.gate_logits)),
        }
    if isinstance(d, dist.ZeroInflatedDistribution):
        base = _count_params(d.base_dist)
        if base is None:
            return None
        kind, arrays = base
        return kind, {**arrays, "gate": _np(d.gate)}
    if isinstance(d, dist.GammaPoisson):
        rate = _np(d.rate)
        return "nb", {"r": _np(d.concentration), "q": rate / (1.0 + rate)}
    if isinstance(d, dist.NegativeBinomial):
        # torch's logits are of the success probability; q = sigmoid(-logits) stays exact
        return "nb", {"r": _np(d.total_count), "q": special.expit(-_np(d.logits))}
    if isinstance(d, dist.Poisson):
        return "poisson", {"rate": _np(d.rate)}
    return None


# ------------------------------------------------------------------ PIT and coverage
def randomized_pit(
    cdf_below: np.ndarray, cdf_at: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``u = F(x - 1) + V (F(x) - F(x - 1))`` with ``V ~ Uniform(0, 1)`` per entry.

    Examples
    --------
    >>> import numpy as np
    >>> u = randomized_pit(np.array([0.2]), np.array([0.6]), np.random.default_rng(0))
    >>> bool(0.2 <= u[0] <= 0.6)
    True
    """
    v = rng.random(np.shape(cdf_at))
    return np.clip(cdf_below + v * (cdf_at - cdf_below), 0.0, 1.0)


def pit_histogram(u: np.ndarray, n_bins: int = 20) -> np.ndarray:
    """Fractions of ``u`` in ``n_bins`` equal bins of ``[0, 1]`` (they sum to 1).

    Examples
    --------
    >>> pit_histogram(np.array([0.1, 0.2, 0.7, 0.9]), n_bins=2).tolist()
    [0.5, 0.5]
    """
    u = np.asarray(u, dtype=np.float64).ravel()
    u = u[np.isfinite(u)]
    counts = np.histogram(u, bins=n_bins, range=(0.0, 1.0))[0]
    return counts / max(len(u), 1)


def pit_tv(u: np.ndarray, n_bins: int = 20) -> float:
    """Total-variation distance of the PIT histogram from uniform, ``0.5 sum_b |p_b - 1/B|``.

    Examples
    --------
    >>> pit_tv(np.array([0.1, 0.2, 0.3, 0.4]), n_bins=2)  # all in the first half
    0.5
    """
    p = pit_histogram(u, n_bins)
    return float(0.5 * np.abs(p - 1.0 / n_bins).sum())


def pit_tv_null(n: int, n_bins: int = 20) -> float:
    """Expected :func:`pit_tv` of ``n`` independent Uniform(0, 1) values.

    Each bin's fraction is approximately normal with sd ``sqrt(p (1 - p) / n)``, ``p = 1/B``,
    and ``E|N(0, s^2)| = s sqrt(2 / pi)``, so ``E[TV] ~ sqrt((B - 1) / (2 pi n))``. Entries of
    one cell share its latent draws, so their PIT values are not independent and the noise
    floor of real checks is somewhat above this.

    Examples
    --------
    >>> round(pit_tv_null(100_000), 4)
    0.0055
    """
    return math.sqrt((n_bins - 1) / (2 * math.pi * max(n, 1)))


def interval_coverage(u: np.ndarray, levels: Sequence[float] = COVERAGE_LEVELS) -> pd.DataFrame:
    """Share of entries inside their central predictive interval, at each nominal level.

    Returns
    -------
    pandas.DataFrame
        Columns ``nominal`` and ``coverage``, one row per level.

    Examples
    --------
    >>> u = np.linspace(0.0005, 0.9995, 1000)
    >>> interval_coverage(u, [0.5, 0.9])["coverage"].tolist()
    [0.5, 0.9]
    """
    u = np.asarray(u, dtype=np.float64).ravel()
    u = u[np.isfinite(u)]
    rows = []
    for c in levels:
        lo, hi = (1 - c) / 2, (1 + c) / 2
        rows.append({"nominal": float(c), "coverage": float(((u >= lo) & (u <= hi)).mean())})
    return pd.DataFrame(rows)


def calibration_error(coverage: pd.DataFrame) -> float:
    """Mean absolute difference between coverage and nominal level.

    Examples
    --------
    >>> import pandas as pd
    >>> calibration_error(pd.DataFrame({"nominal": [0.5, 0.9], "coverage": [0.55, 0.9]}))
    0.025...
    """
    return float((coverage["coverage"] - coverage["nominal"]).abs().mean())


def r_squared(observed: np.ndarray, replicated: np.ndarray, log: bool = False) -> dict:
    """Coefficient of determination about the identity line, and squared correlation.

    Entries where either value is undefined (or not positive, on the log scale) are left
    out. Returns ``{"r2", "pearson_r2", "n"}``.

    Examples
    --------
    >>> r = r_squared(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0]))
    >>> r["r2"], round(r["pearson_r2"], 6)  # perfectly correlated but biased
    (-0.5, 1.0)
    """
    o, r = np.asarray(observed, float), np.asarray(replicated, float)
    ok = np.isfinite(o) & np.isfinite(r)
    if log:
        ok &= (o > 0) & (r > 0)
        o, r = np.log10(np.where(ok, o, 1.0)), np.log10(np.where(ok, r, 1.0))
    o, r = o[ok], r[ok]
    if len(o) < 2 or np.var(o) == 0:
        return {"r2": float("nan"), "pearson_r2": float("nan"), "n": int(len(o))}
    r2 = 1.0 - float(((o - r) ** 2).sum() / ((o - o.mean()) ** 2).sum())
    pearson = float(np.corrcoef(o, r)[0, 1] ** 2) if np.var(r) > 0 else float("nan")
    return {"r2": r2, "pearson_r2": pearson, "n": int(len(o))}


def psis_elpd(log_w: np.ndarray, obs_names: Sequence[str] | None = None) -> pd.DataFrame:
    """Each cell's log predictive density by Pareto-smoothed importance sampling, and its ``k``.

    With draws ``(z_s, l_s) ~ q(z, l | x)`` of the guide, ``log w_s = log p(x, z_s, l_s) -
    log q(z_s, l_s | x)`` and ``log p(x) ~ log mean_s w_s``. PSIS (Vehtari et al. 2024)
    replaces the largest weights by quantiles of a generalized Pareto distribution fitted to
    their tail (:func:`arviz.psislw`), which steadies the estimate; the shape ``k`` of that
    fit says whether to trust it: below :data:`PARETO_K_THRESHOLD` (0.7) the estimate is
    reliable, above it the guide is too far from the cell's posterior for ``S`` draws.
    :func:`criticize` reports it as ``Criticism.elpd``.

    Parameters
    ----------
    log_w
        Log importance weights, ``(S, cells)``: one row per draw, one column per cell.
    obs_names
        The cells' names, the index of the result (default ``0, 1, ...``).

    Returns
    -------
    pandas.DataFrame
        One row per cell: ``elpd`` (the estimate of ``log p(x_n)``, nats) and ``pareto_k``.

    Examples
    --------
    >>> equal = np.full((50, 2), -12.5)  # equal weights: the estimate is their value
    >>> psis_elpd(equal, ["a", "b"])["elpd"].round(6).tolist()
    [-12.5, -12.5]
    >>> heavy = np.random.default_rng(0).standard_cauchy((200, 1)) * 30  # one draw dominates
    >>> bool(psis_elpd(heavy)["pareto_k"].iloc[0] > PARETO_K_THRESHOLD)
    True
    """
    from ..posterior.arviz import az

    log_w = np.asarray(log_w)
    s = log_w.shape[0]
    with warnings.catch_warnings():
        # ArviZ warns per call when k is high; the table reports k for every cell instead
        warnings.simplefilter("ignore")
        smoothed, k = az.psislw(log_w.T.copy(), normalize=False)
    # unnormalized smoothed weights are on the scale of log_w: average them
    elpd = special.logsumexp(smoothed, axis=1) - math.log(s)
    return pd.DataFrame({"elpd": elpd, "pareto_k": np.asarray(k)}, index=obs_names)


# ------------------------------------------------------------------ the pass over cells
@dataclass
class Criticism:
    """What :func:`criticize` returns for one fit.

    Attributes
    ----------
    name
        Label of the fit (used in tables and legends).
    cells
        ``"held-out"`` (the model's validation cells, or an AnnData other than its own) or
        ``"training"``.
    obs_names, var_names
        The cells and genes checked.
    pit
        Randomized PIT values ``(cells, genes)``, float32.
    coverage
        :func:`interval_coverage` of ``pit``.
    gene_table, cell_table
        Tidy tables: ``statistic``, ``name``, ``observed``, ``replicated_mean``,
        ``replicated_lower``, ``replicated_upper`` (central 95 %), ``ppp``.
    elpd
        Per cell: ``elpd`` (PSIS estimate of ``log p(x_n)``, nats) and ``pareto_k``.
    n_samples
        Draws per cell.
    summary
        One flat dict of the headline numbers (see :func:`summary_table`).
    """

    name: str
    cells: str
    obs_names: np.ndarray
    var_names: np.ndarray
    pit: np.ndarray
    coverage: pd.DataFrame
    gene_table: pd.DataFrame
    cell_table: pd.DataFrame
    elpd: pd.DataFrame
    n_samples: int
    n_bins: int = 20
    summary: dict = field(default_factory=dict)


def _choose_cells(model, adata: AnnData | None, indices, cells: str) -> tuple:
    if cells not in ("held-out", "training", "all"):
        raise InputError(f"cells={cells!r}; use 'held-out', 'training' or 'all'.")
    data: CountData = model.data_for(adata)
    own = adata is None or adata is model.adata
    if indices is not None:
        from ..data.counts import check_indices

        idx = check_indices(indices, data.n_cells)
        if not own or np.isin(idx, model.validation_indices).all():
            return data, idx, "held-out"
        return data, idx, "training" if np.isin(idx, model.train_indices).all() else "mixed"
    if not own or cells == "all":
        return data, np.arange(data.n_cells), "held-out" if not own else "all"
    if cells == "training":
        return data, np.asarray(model.train_indices), "training"
    if not len(model.validation_indices):
        warnings.warn(
            "The model has no held-out (validation) cells (train_size=1.0), so the check "
            "runs on its training cells; pass other cells as adata= for a held-out check.",
            stacklevel=3,
        )
        return data, np.arange(data.n_cells), "training"
    return data, np.asarray(model.validation_indices), "held-out"


def _draws_and_distribution(model, guide, x, b, cells, n_samples):
    """Guide draws for one minibatch, the model's ``x`` distribution at them, and ``log w``."""
    args = (x, b, cells)
    # a guide's global sites: the query's shared draws (see posterior.shared_globals)
    shared = SHARED_GLOBALS.get() or {}
    with pyro.plate(_DRAWS_PLATE, n_samples, dim=-3):
        guide_tr = poutine.trace(poutine.condition(guide, data=shared)).get_trace(*args)
        model_fn = poutine.replay(poutine.condition(model, data=shared), trace=guide_tr)
        model_tr = poutine.trace(model_fn).get_trace(*args)
    n_cells = x.shape[0]
    log_w = x.new_zeros(n_samples, n_cells)
    for sign, tr in ((1.0, model_tr), (-1.0, guide_tr)):
        tr.compute_log_prob()
        for site in tr.nodes.values():
            if site["type"] != "sample" or site["infer"].get("_deterministic"):
                continue
            if is_global(site):  # a dataset-level term, not a cell's
                continue
            log_w = log_w + sign * per_cell(site["log_prob"], n_samples, n_cells)
    return model_tr.nodes["x"]["fn"], log_w


def criticize(
    model,
    adata: AnnData | None = None,
    *,
    cells: str = "held-out",
    indices: Sequence[int] | np.ndarray | None = None,
    n_samples: int = 50,
    n_bins: int = 20,
    batch_size: int | None = None,
    seed: int = 0,
    name: str | None = None,
) -> Criticism:
    """Calibration, summary statistics and held-out fit of a trained model on one page.

    See the module docstring for what is computed and how to read it.

    Parameters
    ----------
    model
        A trained :class:`~pyro_scvi.SCVI`.
    adata
        Cells to check (default: the model's own AnnData). Cells other than the training
        AnnData are held-out by construction.
    cells
        On the model's own AnnData: ``"held-out"`` (default, its validation cells),
        ``"training"`` or ``"all"``.
    indices
        Explicit positions of cells of ``adata`` to check (overrides ``cells``).
    n_samples
        Posterior draws per cell: the predictive mixture's components and the PSIS
        importance samples (Pareto ``k`` needs about 20 or more).
    n_bins
        Bins of the PIT histogram.
    batch_size
        Cells per pass (default: bounded so one pass holds about 4 million entries).
    seed
        Seeds the draws and the PIT randomization; the global random state is kept.
    name
        Label of the fit; default the likelihood's name.

    Returns
    -------
    Criticism

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2).train(max_epochs=2, progress_bar=False)
    >>> c = criticize(m, n_samples=20)
    >>> c.cells, c.pit.shape, 0 <= c.summary["pit_tv"] <= 1
    ('held-out', (20, 15), True)
    """
    if int(n_samples) < 2:
        raise InputError(f"n_samples={n_samples}; draw at least 2 samples per cell.")
    if int(n_bins) < 2:
        raise InputError(f"n_bins={n_bins}; use at least 2 bins.")
    data, idx, which = _choose_cells(model, adata, indices, cells)
    n_genes, s = data.n_genes, int(n_samples)
    if batch_size is None:
        batch_size = max(1, 4_000_000 // (s * n_genes))
    rng = np.random.default_rng(seed)
    pit_parts, log_w_parts, x_parts = [], [], []
    # per draw: gene sums, sums of squares and zero counts; per cell: totals and detected
    g_sum = np.zeros((s, n_genes))
    g_sq = np.zeros((s, n_genes))
    g_zero = np.zeros((s, n_genes))
    c_lib, c_det = [], []
    device = model.device
    with (
        seeded(seed, device),
        torch.no_grad(),
        eval_mode(model.model, model.guide),
        pyro.get_param_store().scope(),
        shared_globals(model.guide, s),
    ):
        for x, b, cell_index in iterate_indexed_cells(data, idx, batch_size, device):
            fn, log_w = _draws_and_distribution(model.model, model.guide, x, b, cell_index, s)
            value = x.unsqueeze(0)
            f_at = count_cdf(fn, value).mean(0)
            f_below = count_cdf(fn, value - 1.0).mean(0)
            pit_parts.append(randomized_pit(f_below, f_at, rng).astype(np.float32))
            log_w_parts.append(log_w.double().cpu().numpy())
            rep = fn.sample().double().cpu().numpy()  # (S, cells, genes)
            g_sum += rep.sum(1)
            g_sq += (rep**2).sum(1)
            g_zero += (rep == 0).sum(1)
            c_lib.append(rep.sum(2))
            c_det.append((rep > 0).sum(2))
            x_parts.append(x.double().cpu().numpy())
    x_obs = np.concatenate(x_parts)
    pit = np.concatenate(pit_parts)
    log_w = np.concatenate(log_w_parts, axis=1)
    n = len(idx)
    rep_mean = g_sum / n
    rep_var = np.maximum(g_sq / n - rep_mean**2, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        rep_cv = np.where(rep_mean > 0, np.sqrt(rep_var) / rep_mean, np.nan)
        obs_mean, obs_var = x_obs.mean(0), x_obs.var(0)
        obs_cv = np.where(obs_mean > 0, np.sqrt(obs_var) / obs_mean, np.nan)
    var_names = np.asarray(data.var_names, dtype=str)
    obs_names = np.asarray(data.obs_names[idx], dtype=str)
    gene_table = _stat_table(
        {
            "mean": (obs_mean, rep_mean),
            "variance": (obs_var, rep_var),
            "cv": (obs_cv, rep_cv),
            "zero_fraction": ((x_obs == 0).mean(0), g_zero / n),
        },
        var_names,
    )
    cell_table = _stat_table(
        {
            "library_size": (x_obs.sum(1), np.concatenate(c_lib, axis=1)),
            "detected_genes": ((x_obs > 0).sum(1).astype(float), np.concatenate(c_det, axis=1)),
        },
        obs_names,
    )
    elpd = psis_elpd(log_w, obs_names)
    coverage = interval_coverage(pit)
    result = Criticism(
        name=name or getattr(model.model.likelihood, "name", "model"),
        cells=which,
        obs_names=obs_names,
        var_names=var_names,
        pit=pit,
        coverage=coverage,
        gene_table=gene_table,
        cell_table=cell_table,
        elpd=elpd,
        n_samples=s,
        n_bins=int(n_bins),
    )
    result.summary = _summarize(result)
    return result


def _stat_table(
    stats: dict[str, tuple[np.ndarray, np.ndarray]], names: np.ndarray
) -> pd.DataFrame:
    frames = []
    for statistic, (obs, rep) in stats.items():
        finite = np.isfinite(rep)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN cv of all-zero genes
            lower, upper = np.nanquantile(np.where(finite, rep, np.nan), [0.025, 0.975], axis=0)
            mean = np.nanmean(np.where(finite, rep, np.nan), axis=0)
        frames.append(
            pd.DataFrame(
                {
                    "statistic": statistic,
                    "name": names,
                    "observed": obs,
                    "replicated_mean": mean,
                    "replicated_lower": lower,
                    "replicated_upper": upper,
                    "ppp": ppp_values(obs, rep),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _summarize(c: Criticism) -> dict:
    out = {
        "name": c.name,
        "cells": c.cells,
        "n_cells": int(len(c.obs_names)),
        "n_genes": int(len(c.var_names)),
        "n_samples": c.n_samples,
        "pit_tv": pit_tv(c.pit, c.n_bins),
        "pit_tv_null": pit_tv_null(int(np.isfinite(c.pit).sum()), c.n_bins),
        "calibration_error": calibration_error(c.coverage),
    }
    for row in c.coverage.itertuples():
        if round(row.nominal * 100) in (50, 80, 90, 95):
            out[f"coverage_{round(row.nominal * 100)}"] = row.coverage
    for table in (c.gene_table, c.cell_table):
        for statistic, group in table.groupby("statistic", sort=False):
            r = r_squared(group["observed"], group["replicated_mean"], statistic in LOG_SCALE)
            out[f"r2_{statistic}"] = r["r2"]
            out[f"pearson_r2_{statistic}"] = r["pearson_r2"]
            p = group["ppp"].to_numpy(float)
            p = p[np.isfinite(p)]
            out[f"ppp_extreme_{statistic}"] = (
                float(((p < 0.025) | (p > 0.975)).mean()) if len(p) else float("nan")
            )
    elpd = c.elpd["elpd"].to_numpy()
    out["elpd_mean"] = float(np.mean(elpd))
    out["elpd_se"] = float(np.std(elpd, ddof=1) / math.sqrt(len(elpd))) if len(elpd) > 1 else 0.0
    out["frac_pareto_k_high"] = float((c.elpd["pareto_k"] > PARETO_K_THRESHOLD).mean())
    return out


def summary_table(results: Criticism | Mapping[str, Criticism]) -> pd.DataFrame:
    """Headline numbers of one or several fits, one row per fit.

    Columns: ``cells``, ``n_cells``, ``n_genes``, ``n_samples``; ``pit_tv`` and
    ``pit_tv_null`` (its value for perfectly uniform PIT values, the noise floor);
    ``calibration_error`` and ``coverage_50/80/90/95``; for each statistic ``r2_*``,
    ``pearson_r2_*`` and ``ppp_extreme_*`` (share of p-values outside [0.025, 0.975]);
    ``elpd_mean`` and ``elpd_se`` (held-out log predictive density per cell, nats) and
    ``frac_pareto_k_high`` (cells with ``k > 0.7``).

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=15, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2).train(max_epochs=2, progress_bar=False)
    >>> t = summary_table(criticize(m, n_samples=20))
    >>> t.index.tolist(), "calibration_error" in t
    (['zinb'], True)
    """
    if isinstance(results, Criticism):
        results = {results.name: results}
    rows = {
        name: {k: v for k, v in c.summary.items() if k != "name"} for name, c in results.items()
    }
    return pd.DataFrame.from_dict(rows, orient="index")


def compare_elpd(results: Mapping[str, Criticism]) -> pd.DataFrame:
    """Held-out ELPD of several fits on the same cells, with paired standard errors.

    The difference to the best fit is summed over cells and its standard error is
    ``sqrt(n) * sd`` of the per-cell differences (the cells are shared, so pairing removes
    the cell-to-cell spread that every fit has in common).

    Returns
    -------
    pandas.DataFrame
        Indexed by fit, best first: ``elpd`` (sum over cells), ``elpd_diff`` and ``dse``
        (against the best), ``frac_pareto_k_high``.
    """
    names = list(results)
    cells = results[names[0]].obs_names
    for n in names[1:]:
        if not np.array_equal(results[n].obs_names, cells):
            raise ValueError(f"Fit {n!r} was checked on other cells than {names[0]!r}.")
    per_cell = pd.DataFrame({n: results[n].elpd["elpd"].to_numpy() for n in names})
    best = per_cell.sum().idxmax()
    rows = []
    for n in names:
        d = per_cell[best] - per_cell[n]
        rows.append(
            {
                "fit": n,
                "elpd": float(per_cell[n].sum()),
                "elpd_diff": float(d.sum()),
                "dse": float(math.sqrt(len(d)) * d.std(ddof=1)) if len(d) > 1 else 0.0,
                "frac_pareto_k_high": results[n].summary["frac_pareto_k_high"],
            }
        )
    return pd.DataFrame(rows).set_index("fit").sort_values("elpd", ascending=False)


def compare(
    models: Mapping[str, object],
    adata: AnnData | None = None,
    *,
    max_cells: int | None = None,
    **kwargs,
) -> dict[str, Criticism]:
    """:func:`criticize` each fit in ``models`` (name -> trained SCVI) on the same cells.

    With ``adata=None`` the cells are the first model's held-out cells, used for every fit
    (the models must share their AnnData; fits trained with the same ``seed`` and
    ``train_size`` share their split, and each result's ``cells`` says whether the cells
    were held out from that fit). ``max_cells`` caps the cells so chosen at a random subset
    of that many (drawn with ``seed``): the page holds its cells' counts and replicates in
    memory. Other keyword arguments go to :func:`criticize`.
    """
    if not models:
        raise InputError("compare needs at least one model.")
    first = next(iter(models.values()))
    if adata is None and kwargs.get("indices") is None:
        chosen = _choose_cells(first, None, None, kwargs.pop("cells", "held-out"))[1]
        if max_cells is not None and len(chosen) > max_cells:
            rng = np.random.default_rng(kwargs.get("seed", 0))
            chosen = np.sort(rng.choice(chosen, int(max_cells), replace=False))
        kwargs["indices"] = chosen
    return {name: criticize(m, adata, name=name, **kwargs) for name, m in models.items()}


def psis_loo(idata) -> dict:
    """PSIS-LOO of an InferenceData's per-cell log-likelihood (ArviZ), with its caveat.

    :func:`pyro_scvi.posterior.arviz.to_inference_data` stores ``log p(x_n | z_s, l_s)`` at
    draws of each cell's *own* posterior. Leaving cell ``n`` out then removes the only data that
    inform its latent ``z_n``, so the importance ratios are the ratio of a cell's posterior
    to its prior: Pareto ``k`` is usually far above 0.7 and ArviZ's ``elpd_loo`` is then
    unreliable. Held-out cells do not need leaving out: use :func:`criticize`'s ``elpd``
    (importance sampling with the guide as proposal, which PSIS diagnoses in the same way).

    Returns
    -------
    dict
        ``elpd_loo`` (sum over cells), ``se``, ``p_loo``, ``pareto_k`` (per cell),
        ``frac_pareto_k_high`` and ``valid`` (no ``k`` above 0.7).
    """
    from ..posterior.arviz import az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    k = np.asarray(loo.pareto_k)
    return {
        "elpd_loo": float(loo.elpd_loo),
        "se": float(loo.se),
        "p_loo": float(loo.p_loo),
        "pareto_k": k,
        "frac_pareto_k_high": float((k > PARETO_K_THRESHOLD).mean()),
        "valid": bool((k <= PARETO_K_THRESHOLD).all()),
    }


def simulate(
    model, adata: AnnData | None = None, *, latent: str = "posterior", seed: int = 0
) -> AnnData:
    """Counts drawn from a fitted model: a dataset on which the model is right.

    ``latent="posterior"``: one draw ``(z, l) ~ q(z, l | x)`` per cell of ``adata``, then
    ``x~ ~ p(x | z, l)``, so the cells keep their types and depths. ``latent="prior"``: the
    model's own generative process, ``z ~ p(z)``, ``l ~ p(l | batch)``, ``x~ ~ p(x | z, l)``.
    Either way the result has ``adata``'s cells, batches and ``obs``, with new counts. A
    check of the model on these counts (or of a model refitted to them) shows how the check
    behaves when the model holds.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=10, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2).train(max_epochs=1, progress_bar=False)
    >>> simulate(m, seed=0).shape, simulate(m, latent="prior", seed=0).shape
    ((40, 10), (40, 10))
    """
    import scipy.sparse as sp

    from ..posterior import queries as posterior

    if latent not in ("posterior", "prior"):
        raise InputError(f"latent={latent!r}; use 'posterior' or 'prior'.")
    if latent == "prior" and not is_latent_library(model.model.library_prior):
        raise InputError(
            "latent='prior' needs a latent library (not ObservedLibrary / "
            "use_observed_lib_size=True)."
        )
    data = model.data_for(adata)
    source = model.adata if adata is None else adata
    idx = np.arange(data.n_cells)
    with posterior.seeded(seed, model.device):
        if latent == "posterior":
            x = posterior.sample_posterior(
                model.model, model.guide, data, idx, n_samples=1, sites=("x",), device=model.device
            )["x"][0]
        else:
            parts = []
            with torch.no_grad(), eval_mode(model.model), pyro.get_param_store().scope():
                for _, b in posterior.iterate_cells(data, idx, 1024, model.device):
                    tr = poutine.trace(model.model).get_trace(None, b)
                    parts.append(tr.nodes["x"]["value"].cpu().numpy())
            x = np.concatenate(parts)
    out = AnnData(
        sp.csr_matrix(np.rint(x).astype(np.int32)),
        obs=source.obs.copy(),
        var=pd.DataFrame(index=np.asarray(data.var_names, dtype=str)),
    )
    out.uns["source"] = f"simulated from a fitted pyro_scvi model ({latent} latents, seed {seed})"
    return out
