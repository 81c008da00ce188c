"""Posterior predictive checks (PPCs) of count models exported to ArviZ.

A test statistic ``T`` summarizes a gene (over cells) or a cell (over genes). For each gene
or cell we compare ``T(x)`` of the observed counts with the ``S`` values ``T(x~_s)`` of the
replicated counts ``x~_s ~ p(x | z_s, l_s)``, ``(z_s, l_s) ~ q(z, l | x)``:

- per gene: ``mean``, ``variance`` (over cells, ``ddof=0``), ``cv`` (coefficient of
  variation, ``sqrt(variance) / mean``; undefined for an all-zero gene) and
  ``zero_fraction``;
- per cell: ``library_size`` (total counts) and ``zero_fraction``.

The posterior predictive p-value (ppp) is ``P(T(x~) >= T(x))``, estimated over the draws as
a *mid-p value*: ``mean(T(x~_s) > T(x)) + 0.5 * mean(T(x~_s) == T(x))``. Counting ties half
matters for discrete statistics (a zero fraction, a library size, the mean of a sparse gene),
whose replicates often equal the observed value exactly: counting them fully would push
every p-value up, not at all would push them down. Values within a relative ``1e-9`` count
as ties (two orderings of the same counts can differ in the last bits of a variance).
Replicates where ``T`` is undefined (``cv`` of an all-zero replicate) are left out.

Reading the p-values: ppp-values near 0 or 1 flag genes or cells the model does not
reproduce. Under a correct model they are *not* uniform but conservative, concentrated
around 0.5, because the data are used twice, to fit and to check (Meng 1994; Bayarri and
Berger 2000); this is strongest for statistics the posterior pins down directly, such as a
cell's library size, which the model infers through ``l``. So the fraction of p-values
outside ``[0.025, 0.975]`` should be at most about 5% for a well-fitting model, and much
more than that signals misfit, while a large KS distance to Uniform(0, 1) with few extreme
p-values is expected.

That reading assumes the replicates carry the uncertainty about everything fitted. Here
the decoder and the dispersions are point estimates and q(z | x) is approximate, and a
gene's mean over thousands of cells has a replicate spread smaller than their errors. On
pbmc8k_200hvg (default model, 400 epochs, 7,448 cells) 36.5 % of gene means are outside
[0.025, 0.975]; a model refitted to counts simulated from the fitted one, so right by
construction, gives 34.5 % (``benchmarks/results/pbmc_ppc_diagnosis.md``). So the gene-wise
p-values rank the genes the model reproduces worst but are not calibrated tests; per-entry
calibration on held-out cells (:mod:`pyro_scvi.analysis.criticism`) is.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import stats

from ..posterior.arviz import az, to_inference_data

#: Statistics per gene, computed over the cells axis of a ``(cells, genes)`` array.
GENE_STATISTICS = ("mean", "variance", "cv", "zero_fraction")
#: Statistics per cell, computed over the genes axis.
CELL_STATISTICS = ("library_size", "zero_fraction")
#: Columns of the table returned by :func:`ppc_table`.
TABLE_COLUMNS = [
    "level",
    "statistic",
    "name",
    "observed",
    "replicated_mean",
    "replicated_lower",
    "replicated_upper",
    "ppp",
]


def gene_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene statistics of counts ``x`` ``(cells, genes)``: each an array ``(genes,)``.

    Examples
    --------
    >>> import numpy as np
    >>> s = gene_statistics(np.array([[0, 2], [0, 4]]))
    >>> s["mean"].tolist(), s["variance"].tolist(), s["zero_fraction"].tolist()
    ([0.0, 3.0], [0.0, 1.0], [1.0, 0.0])
    >>> s["cv"].round(3).tolist()  # undefined (NaN) for the all-zero gene
    [nan, 0.333]
    """
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    variance = x.var(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cv = np.where(mean > 0, np.sqrt(variance) / mean, np.nan)
    return {
        "mean": mean,
        "variance": variance,
        "cv": cv,
        "zero_fraction": (x == 0).mean(axis=0),
    }


def cell_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-cell statistics of counts ``x`` ``(cells, genes)``: each an array ``(cells,)``.

    Examples
    --------
    >>> import numpy as np
    >>> s = cell_statistics(np.array([[0, 2], [1, 4]]))
    >>> s["library_size"].tolist(), s["zero_fraction"].tolist()
    ([2.0, 5.0], [0.5, 0.0])
    """
    x = np.asarray(x, dtype=np.float64)
    return {"library_size": x.sum(axis=1), "zero_fraction": (x == 0).mean(axis=1)}


def ppp_values(observed: np.ndarray, replicated: np.ndarray) -> np.ndarray:
    """Mid-p posterior predictive p-values ``P(T(x~) >= T(x))``, ties counted half.

    Parameters
    ----------
    observed
        ``T(x)``, any shape.
    replicated
        ``T(x~_s)``, the same shape with a leading axis of draws.

    Returns
    -------
    numpy.ndarray
        p-values in ``[0, 1]``, shaped like ``observed``; NaN where ``T(x)`` is undefined
        or no replicate defines ``T``.

    Examples
    --------
    >>> import numpy as np
    >>> ppp_values(np.array([2.0, 2.0]), np.array([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]]))
    array([0.5, 1. ])
    """
    observed = np.asarray(observed, dtype=np.float64)
    replicated = np.asarray(replicated, dtype=np.float64)
    if replicated.shape[1:] != observed.shape:
        raise ValueError(
            f"replicated {replicated.shape} must be observed {observed.shape} with a leading "
            "axis of draws."
        )
    defined = np.isfinite(replicated)
    tie = defined & np.isclose(replicated, observed, rtol=1e-9, atol=0.0)
    above = defined & (replicated > observed) & ~tie
    n = defined.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = (above.sum(axis=0) + 0.5 * tie.sum(axis=0)) / n
    return np.where(np.isfinite(observed) & (n > 0), p, np.nan)


def ppc_table(
    idata: az.InferenceData,
    *,
    var_name: str = "x",
    cell_dim: str = "cells",
    gene_dim: str = "genes",
    interval: float = 0.95,
) -> pd.DataFrame:
    """Observed and replicated statistics, and their ppp-values, for every gene and cell.

    Works on any InferenceData with counts ``var_name`` in ``observed_data``
    ``(cell_dim, gene_dim)`` and in ``posterior_predictive``
    ``(chain, draw, cell_dim, gene_dim)``, such as
    :func:`~pyro_scvi.posterior.arviz.to_inference_data` writes; all chains are pooled.

    Parameters
    ----------
    idata
        The InferenceData.
    var_name, cell_dim, gene_dim
        Name of the counts variable and of its cell and gene dimensions.
    interval
        Probability of the central interval of the replicated statistic.

    Returns
    -------
    pandas.DataFrame
        One row per statistic and gene or cell (tidy), columns :data:`TABLE_COLUMNS`:
        ``level`` (``"gene"`` or ``"cell"``), ``statistic``, ``name`` (gene or cell name),
        ``observed`` ``T(x)``, ``replicated_mean``, ``replicated_lower`` and
        ``replicated_upper`` (the central ``interval`` of ``T(x~)``) and ``ppp``.

    Examples
    --------
    >>> import numpy as np, arviz as az
    >>> rng = np.random.default_rng(0)
    >>> idata = az.from_dict(
    ...     posterior_predictive={"x": rng.poisson(3.0, (1, 40, 30, 5))},
    ...     observed_data={"x": rng.poisson(3.0, (30, 5))},
    ...     dims={"x": ["cells", "genes"]},
    ... )
    >>> table = ppc_table(idata)
    >>> table.groupby(["level", "statistic"], sort=False).size().tolist()
    [5, 5, 5, 5, 30, 30]
    >>> bool(table["ppp"].between(0, 1).all())
    True
    """
    if not 0 < interval < 1:
        raise ValueError(f"interval={interval}; it must be in (0, 1).")
    for group in ("observed_data", "posterior_predictive"):
        if group not in idata.groups() or var_name not in idata[group]:
            raise ValueError(f"idata has no {group} variable {var_name!r}.")
    pp = idata.posterior_predictive[var_name]
    expected = {"chain", "draw", cell_dim, gene_dim}
    if set(pp.dims) != expected or set(idata.observed_data[var_name].dims) != {
        cell_dim,
        gene_dim,
    }:
        raise ValueError(
            f"Expected posterior_predictive {var_name!r} with dims {sorted(expected)} and "
            f"observed_data with ({cell_dim}, {gene_dim}); got {pp.dims} and "
            f"{idata.observed_data[var_name].dims}."
        )
    observed = idata.observed_data[var_name].transpose(cell_dim, gene_dim)
    replicated = pp.transpose("chain", "draw", cell_dim, gene_dim)
    n_chain, n_draw = replicated.sizes["chain"], replicated.sizes["draw"]
    names = {
        "gene": np.asarray(observed[gene_dim].values).astype(str),
        "cell": np.asarray(observed[cell_dim].values).astype(str),
    }
    x_obs = observed.values
    obs_stats = {"gene": gene_statistics(x_obs), "cell": cell_statistics(x_obs)}
    # One draw at a time, so memory stays at one (cells, genes) array in float64.
    rep_stats: dict[str, dict[str, list[np.ndarray]]] = {
        "gene": {s: [] for s in GENE_STATISTICS},
        "cell": {s: [] for s in CELL_STATISTICS},
    }
    for c in range(n_chain):
        for d in range(n_draw):
            x_rep = replicated.isel(chain=c, draw=d).values
            for level, fn in (("gene", gene_statistics), ("cell", cell_statistics)):
                for s, v in fn(x_rep).items():
                    rep_stats[level][s].append(v)
    tail = (1 - interval) / 2
    frames = []
    for level in ("gene", "cell"):
        for s, reps in rep_stats[level].items():
            rep = np.stack(reps)
            obs = obs_stats[level][s]
            lower, upper = _nan_quantiles(rep, [tail, 1 - tail])
            frames.append(
                pd.DataFrame(
                    {
                        "level": level,
                        "statistic": s,
                        "name": names[level],
                        "observed": obs,
                        "replicated_mean": _nan_mean(rep),
                        "replicated_lower": lower,
                        "replicated_upper": upper,
                        "ppp": ppp_values(obs, rep),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)[TABLE_COLUMNS]


def calibration_summary(
    table: pd.DataFrame, *, lower: float = 0.025, upper: float = 0.975
) -> pd.DataFrame:
    """How the ppp-values of each statistic are spread, from :func:`ppc_table`'s table.

    Parameters
    ----------
    table
        Output of :func:`ppc_table`.
    lower, upper
        p-values outside ``[lower, upper]`` count as extreme.

    Returns
    -------
    pandas.DataFrame
        One row per ``level`` and ``statistic``: ``n`` (genes or cells), ``n_defined``
        (with a ppp-value), ``frac_below`` (``ppp < lower``), ``frac_above``
        (``ppp > upper``), ``frac_outside`` (their sum), ``median_ppp`` and ``ks_uniform``,
        the Kolmogorov-Smirnov distance of the ppp-values to Uniform(0, 1). Fractions are
        of ``n_defined``. See the module docstring on reading them.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"level": "gene", "statistic": "mean", "ppp": [0.01, 0.5, 0.5, 0.99]})
    >>> calibration_summary(t)[["frac_below", "frac_above", "frac_outside"]].iloc[0].tolist()
    [0.25, 0.25, 0.5]
    """
    if not 0 <= lower < upper <= 1:
        raise ValueError(f"Need 0 <= lower < upper <= 1, got {lower}, {upper}.")
    rows = []
    for (level, statistic), group in table.groupby(["level", "statistic"], sort=False):
        p = group["ppp"].to_numpy(dtype=float)
        p = p[np.isfinite(p)]
        n = len(p)
        below = float((p < lower).mean()) if n else np.nan
        above = float((p > upper).mean()) if n else np.nan
        rows.append(
            {
                "level": level,
                "statistic": statistic,
                "n": len(group),
                "n_defined": n,
                "frac_below": below,
                "frac_above": above,
                "frac_outside": below + above,
                "median_ppp": float(np.median(p)) if n else np.nan,
                "ks_uniform": float(stats.kstest(p, "uniform").statistic) if n else np.nan,
            }
        )
    return pd.DataFrame(rows)


class PPCResult(NamedTuple):
    """What :func:`posterior_predictive_check` returns."""

    idata: az.InferenceData
    table: pd.DataFrame
    calibration: pd.DataFrame


def posterior_predictive_check(
    model,
    adata=None,
    *,
    n_samples: int = 50,
    indices=None,
    batch_size: int = 256,
    seed: int | None = None,
) -> PPCResult:
    """Export ``model`` with :func:`~pyro_scvi.posterior.arviz.to_inference_data` and check it.

    Parameters
    ----------
    model
        A trained :class:`~pyro_scvi.SCVI`, or any :class:`~pyro_scvi.posterior.fitted.Fitted`.
    adata, n_samples, indices, batch_size, seed
        Passed to :func:`~pyro_scvi.posterior.arviz.to_inference_data`.

    Returns
    -------
    PPCResult
        ``(idata, table, calibration)``: the InferenceData, :func:`ppc_table` and
        :func:`calibration_summary`.

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=12, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2).train(max_epochs=1, progress_bar=False)
    >>> idata, table, calibration = posterior_predictive_check(m, n_samples=10, seed=0)
    >>> len(table) == 4 * 12 + 2 * 60, list(calibration["statistic"])
    (True, ['mean', 'variance', 'cv', 'zero_fraction', 'library_size', 'zero_fraction'])
    """
    idata = to_inference_data(
        model, adata, n_samples=n_samples, indices=indices, batch_size=batch_size, seed=seed
    )
    table = ppc_table(idata)
    return PPCResult(idata, table, calibration_summary(table))


def _nan_mean(a: np.ndarray) -> np.ndarray:
    # nanmean warns on all-NaN columns (cv of an all-zero gene); those are NaN by design.
    n = np.isfinite(a).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, np.nansum(a, axis=0) / n, np.nan)


def _nan_quantiles(a: np.ndarray, q: list[float]) -> list[np.ndarray]:
    out = np.full((len(q),) + a.shape[1:], np.nan)
    ok = np.isfinite(a).any(axis=0)
    if ok.any():
        out[:, ok] = np.nanquantile(a[:, ok], q, axis=0)
    return list(out)
