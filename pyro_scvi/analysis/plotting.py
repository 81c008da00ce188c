"""Plots: training curves, posterior predictive checks, volcano plots and embeddings."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io.files import atomic_path


def plot_history(history: pd.DataFrame, path: str | os.PathLike | None = None):
    """Plot the train and validation ELBO per cell against the epoch.

    Parameters
    ----------
    history
        A fitted model's ``history`` (:class:`~pyro_scvi.SCVI`), one row per epoch.
    path
        If given, save the figure there (PNG), atomically, and close it.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (closed if it was saved).

    Examples
    --------
    >>> import pandas as pd
    >>> h = pd.DataFrame({"epoch": [0, 1], "train_elbo": [-9.0, -8.0],
    ...                   "validation_elbo": [-9.5, -8.5], "kl_weight": [0.0, 0.5]})
    >>> fig = plot_history(h)
    >>> [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    ['train (KL-annealed)', 'validation']
    """
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(history["epoch"], history["train_elbo"], label="train (KL-annealed)")
    if history["validation_elbo"].notna().any():
        ax.plot(history["epoch"], history["validation_elbo"], label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO per cell (nats)")
    ax.set_title("pyro_scvi training")
    ax.legend()
    finite = history[["train_elbo", "validation_elbo"]].stack()
    if len(finite) > 10:
        # The first epochs dwarf the rest; show the range where training settles.
        lo, hi = finite.quantile(0.02), finite.max()
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    return _save(fig, path)


#: Statistics drawn on log axes in :func:`plot_ppc_scatter`: they span orders of magnitude.
_LOG_STATISTICS = {"mean", "variance", "library_size"}


def _panel_grid(n: int, ncols: int, width: float, height: float, dpi: int = 120):
    """A figure of ``n`` panels, ``ncols`` a row, each ``width x height`` inches.

    Returns the figure and its axes, row by row; the axes past the ``n``-th are hidden.
    """
    nrows = max(1, -(-n // ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(width * ncols, height * nrows), dpi=dpi, squeeze=False
    )
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _ppc_panels(table: pd.DataFrame, ncols: int = 3):
    """A figure with one axis per (level, statistic) of a PPC table, in table order."""
    keys = list(dict.fromkeys(zip(table["level"], table["statistic"], strict=True)))
    fig, axes = _panel_grid(len(keys), ncols, 4, 3.4)
    return fig, list(zip(keys, axes, strict=False))


def _save(fig, path: str | os.PathLike | None):
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    return fig


def plot_ppp_histograms(
    table: pd.DataFrame,
    path: str | os.PathLike | None = None,
    *,
    bins: int = 20,
    lower: float = 0.025,
    upper: float = 0.975,
):
    """Histogram of the posterior predictive p-values of each statistic.

    A well-fitting model gives a hump around 0.5 (ppp-values are conservative) and few
    values below ``lower`` or above ``upper`` (shaded); piles at 0 or 1 flag misfit.

    Parameters
    ----------
    table
        Output of :func:`pyro_scvi.analysis.ppc.ppc_table`.
    path
        If given, save the figure there (PNG), atomically, and close it.
    bins
        Bins over ``[0, 1]``.
    lower, upper
        Limits of the shaded extreme regions; the titles give the fraction outside them.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per level and statistic (closed if it was saved).

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"level": ["gene"] * 3 + ["cell"] * 2,
    ...                   "statistic": ["mean"] * 3 + ["library_size"] * 2,
    ...                   "ppp": [0.1, 0.5, 0.99, 0.4, 0.6]})
    >>> fig = plot_ppp_histograms(t)
    >>> [ax.get_title() for ax in fig.axes if ax.get_visible()]
    ['gene mean (33% outside)', 'cell library_size (0% outside)']
    """
    fig, panels = _ppc_panels(table)
    for (level, statistic), ax in panels:
        p = table.loc[(table["level"] == level) & (table["statistic"] == statistic), "ppp"]
        p = p.dropna().to_numpy(dtype=float)
        if len(p):  # a density of nothing divides by zero (e.g. every count zero)
            ax.hist(p, bins=bins, range=(0, 1), density=True, color="tab:blue", alpha=0.8)
        ax.axhline(1.0, color="k", ls="--", lw=0.8, label="Uniform(0, 1)")
        ax.axvspan(0, lower, color="tab:red", alpha=0.12, lw=0)
        ax.axvspan(upper, 1, color="tab:red", alpha=0.12, lw=0)
        outside = float(((p < lower) | (p > upper)).mean()) if len(p) else float("nan")
        ax.set_title(f"{level} {statistic} ({outside:.0%} outside)")
        ax.set_xlim(0, 1)
        ax.set_xlabel("posterior predictive p-value")
        ax.set_ylabel("density")
    return _save(fig, path)


def plot_ppc_scatter(
    table: pd.DataFrame,
    path: str | os.PathLike | None = None,
    *,
    max_points: int = 2000,
    lower: float = 0.025,
    upper: float = 0.975,
    seed: int = 0,
):
    """Observed against replicated statistic, one panel per statistic, with the interval.

    Each point is a gene or cell: the observed ``T(x)`` against the mean of the replicated
    ``T(x~)``, with a bar over the replicated interval (``replicated_lower`` to
    ``replicated_upper``); points on the diagonal are
    reproduced. Points whose ppp-value is outside ``[lower, upper]`` are red.

    Parameters
    ----------
    table
        Output of :func:`pyro_scvi.analysis.ppc.ppc_table`.
    path
        If given, save the figure there (PNG), atomically, and close it.
    max_points
        Draw at most this many points per panel, a random subset (seeded by ``seed``),
        so plots of many cells stay readable.
    lower, upper
        ppp-values outside count as extreme.
    seed
        Seed of the subset.

    Returns
    -------
    matplotlib.figure.Figure
        One panel per level and statistic (closed if it was saved). Means, variances and
        library sizes are on log axes; values that are not positive are left out there.

    Examples
    --------
    >>> import pandas as pd
    >>> t = pd.DataFrame({"level": "gene", "statistic": "zero_fraction",
    ...                   "observed": [0.2, 0.5], "replicated_mean": [0.25, 0.5],
    ...                   "replicated_lower": [0.1, 0.4], "replicated_upper": [0.4, 0.6],
    ...                   "ppp": [0.6, 0.5]})
    >>> fig = plot_ppc_scatter(t)
    >>> fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()
    ('observed', 'replicated (mean and interval)')
    """
    rng = np.random.default_rng(seed)
    fig, panels = _ppc_panels(table)
    for (level, statistic), ax in panels:
        rows = table[(table["level"] == level) & (table["statistic"] == statistic)]
        cols = ["observed", "replicated_mean", "replicated_lower", "replicated_upper"]
        rows = rows[np.isfinite(rows[cols].to_numpy(dtype=float)).all(axis=1)]
        log = statistic in _LOG_STATISTICS
        if log:
            rows = rows[(rows[cols] > 0).all(axis=1)]
        title = f"{level} {statistic}"
        if len(rows) > max_points:
            title += f" ({max_points} of {len(rows)} shown)"
            rows = rows.iloc[np.sort(rng.choice(len(rows), max_points, replace=False))]
        obs, mean = rows["observed"].to_numpy(float), rows["replicated_mean"].to_numpy(float)
        lo_err = mean - rows["replicated_lower"].to_numpy(float)
        hi_err = rows["replicated_upper"].to_numpy(float) - mean
        # A skewed replicate distribution can put its mean outside the central interval;
        # matplotlib refuses negative error bars.
        err = np.clip(np.stack([lo_err, hi_err]), 0, None)
        extreme = ((rows["ppp"] < lower) | (rows["ppp"] > upper)).to_numpy()
        for mask, color, label in [
            (~extreme, "tab:blue", "ppp in range"),
            (extreme, "tab:red", "extreme ppp"),
        ]:
            if mask.any():
                ax.errorbar(
                    obs[mask],
                    mean[mask],
                    yerr=err[:, mask],
                    fmt="o",
                    ms=2.5,
                    lw=0.6,
                    alpha=0.6,
                    color=color,
                    label=label,
                )
        if len(rows):
            lo = min(obs.min(), rows["replicated_lower"].min())
            hi = max(obs.max(), rows["replicated_upper"].max())
            ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("observed")
        ax.set_ylabel("replicated (mean and interval)")
        if len(rows):
            ax.legend(fontsize="small", loc="upper left")
    return _save(fig, path)


def plot_volcano(
    results: pd.DataFrame,
    path: str | os.PathLike | None = None,
    *,
    label_top: int = 8,
    ncols: int = 3,
    max_panels: int = 12,
):
    """Volcano plot of differential expression: LFC against the evidence for DE.

    One panel per comparison: each gene's posterior mean log2 fold change against its
    log Bayes factor for DE, ``log proba_de - log proba_not_de`` (in vanilla mode this is
    ``|bayes_factor|``). Genes called DE (``is_de_fdr``) are red; dashed lines mark
    ``+-delta`` in change mode; the ``label_top`` highest-ranked genes are named.

    Parameters
    ----------
    results
        Output of :func:`pyro_scvi.analysis.de.differential_expression`.
    path
        If given, save the figure there (PNG), atomically, and close it.
    label_top
        Genes to name per panel.
    ncols, max_panels
        Panels per row, and the most comparisons drawn (the first ones).

    Returns
    -------
    matplotlib.figure.Figure
        The figure (closed if it was saved).

    Examples
    --------
    >>> import pandas as pd
    >>> r = pd.DataFrame({"proba_de": [0.99, 0.6], "proba_not_de": [0.01, 0.4],
    ...                   "lfc_mean": [1.5, 0.1], "is_de_fdr": [True, False],
    ...                   "comparison": "A vs rest"}, index=["g1", "g2"])
    >>> fig = plot_volcano(r)
    >>> fig.axes[0].get_title(), fig.axes[0].get_xlabel()
    ('A vs rest (1 DE)', 'log2 fold change (posterior mean)')
    """
    comparisons = list(dict.fromkeys(results["comparison"]))[:max_panels]
    ncols = max(1, min(ncols, len(comparisons)))
    fig, axes = _panel_grid(len(comparisons), ncols, 4.2, 3.6)
    params = results.attrs.get("params", {})
    for name, ax in zip(comparisons, axes, strict=False):
        rows = results[results["comparison"] == name]
        lfc = rows["lfc_mean"].to_numpy(dtype=float)
        evidence = np.log(rows["proba_de"].to_numpy(float)) - np.log(
            rows["proba_not_de"].to_numpy(float)
        )
        called = rows["is_de_fdr"].to_numpy(dtype=bool)
        ax.scatter(lfc[~called], evidence[~called], s=6, color="0.6", label="not DE")
        ax.scatter(lfc[called], evidence[called], s=8, color="tab:red", label="DE (FDR)")
        if params.get("mode") == "change":
            for x in (-params["delta"], params["delta"]):
                ax.axvline(x, color="k", ls="--", lw=0.7)
        # rows come sorted by rank, most significant first; many share the top Bayes
        # factor, so stagger the labels to keep neighbours legible
        top = list(zip(rows.index, lfc, evidence, strict=True))[:label_top]
        for i, (gene, x, y) in enumerate(top):
            offset = (2, -10 * (i % 4) - 2)
            ax.annotate(str(gene), (x, y), fontsize=6, xytext=offset, textcoords="offset points")
        ax.set_title(f"{name} ({int(called.sum())} DE)")
        ax.set_xlabel("log2 fold change (posterior mean)")
        ax.set_ylabel("log Bayes factor of DE")
    axes[0].legend(fontsize="small", loc="lower left")
    return _save(fig, path)


def plot_embedding(
    adata,
    path: str | os.PathLike | None = None,
    *,
    basis: str | None = None,
    color: str | list[str] | None = None,
    ncols: int = 2,
    point_size: float | None = None,
    max_legend: int = 25,
):
    """Scatter a 2-D embedding, one panel per ``obs`` column to colour by.

    Compute the embedding first with :func:`pyro_scvi.tl.embedding`.

    Parameters
    ----------
    adata
        Holds the embedding in ``obsm[basis]``.
    path
        If given, save the figure there (PNG), atomically, and close it.
    basis
        ``obsm`` key of the 2-D coordinates; default the first of ``X_umap``, ``X_tsne``
        and ``X_pca2`` (:func:`pyro_scvi.tl.embedding`'s keys) that ``adata`` holds.
    color
        ``obs`` column(s): categories get a legend, numbers a colour bar. Default: those
        of ``cell_type`` and ``batch`` present.
    ncols
        Panels per row.
    point_size
        Marker size (default: smaller for more cells).
    max_legend
        Categories listed in a legend; more are drawn but not listed.

    Returns
    -------
    matplotlib.figure.Figure
        The figure (closed if it was saved).

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> obs = pd.DataFrame({"cell_type": list("ABAB"), "batch": list("xxyy")}, index=list("abcd"))
    >>> adata = anndata.AnnData(np.zeros((4, 1)), obs=obs)
    >>> adata.obsm["X_umap"] = np.arange(8.0).reshape(4, 2)
    >>> fig = plot_embedding(adata)
    >>> [ax.get_title() for ax in fig.axes]
    ['cell_type', 'batch']
    """
    if basis is None:
        basis = next((k for k in ("X_umap", "X_tsne", "X_pca2") if k in adata.obsm), "X_umap")
    if basis not in adata.obsm:
        raise KeyError(
            f"basis={basis!r} is not in adata.obsm ({list(adata.obsm.keys())}); compute it "
            "with pyro_scvi.tl.embedding(adata)."
        )
    coords = np.asarray(adata.obsm[basis])[:, :2]
    keys = [color] if isinstance(color, str) else color
    if keys is None:
        keys = [k for k in ("cell_type", "batch") if k in adata.obs]
    missing = [k for k in keys if k not in adata.obs]
    if missing:
        raise KeyError(f"color {missing} not in adata.obs ({list(adata.obs.columns)}).")
    panels = keys or [None]
    ncols = max(1, min(ncols, len(panels)))
    fig, axes = _panel_grid(len(panels), ncols, 5.2, 4.4, dpi=110)
    size = point_size or float(np.clip(3000 / max(len(coords), 1), 1.0, 30.0))
    # a fixed random drawing order: files are often sorted by a category, whose last
    # group would otherwise cover the rest
    order = np.random.default_rng(0).permutation(len(coords))
    for ax, key in zip(axes, panels, strict=False):
        if key is None:
            ax.scatter(*coords[order].T, s=size, linewidths=0)
        else:
            values = adata.obs[key]
            if pd.api.types.is_numeric_dtype(values) and not isinstance(
                values.dtype, pd.CategoricalDtype
            ):
                points = ax.scatter(
                    *coords[order].T, c=values.to_numpy()[order], s=size, linewidths=0
                )
                fig.colorbar(points, ax=ax, shrink=0.8)
            else:
                labels = values.astype(str).to_numpy()
                names = list(dict.fromkeys(sorted(set(labels))))
                cmap = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
                codes = np.array([names.index(v) for v in labels])
                ax.scatter(
                    *coords[order].T,
                    c=[cmap(c % cmap.N) for c in codes[order]],
                    s=size,
                    linewidths=0,
                )
                handles = [
                    plt.Line2D([], [], ls="", marker="o", color=cmap(i % cmap.N), label=name)
                    for i, name in enumerate(names[:max_legend])
                ]
                ax.legend(
                    handles=handles,
                    loc="center left",
                    bbox_to_anchor=(1.0, 0.5),
                    fontsize=7,
                    frameon=False,
                    title=None if len(names) <= max_legend else f"first {max_legend}",
                )
            ax.set_title(key)
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_xlabel(f"{basis}1"), ax.set_ylabel(f"{basis}2")
    return _save(fig, path)


#: Panels of :func:`plot_criticism` after the PIT and coverage panels: (table, statistic).
_CRITICISM_PANELS = [
    ("gene", "mean"),
    ("gene", "cv"),
    ("gene", "zero_fraction"),
    ("cell", "library_size"),
    ("cell", "detected_genes"),
]


def plot_criticism(results, path: str | os.PathLike | None = None, *, max_points: int = 1500):
    """One page of model criticism for one fit or several side by side.

    Panels: the randomized PIT histogram of every entry (flat at 1 when calibrated; the
    title gives each fit's TV distance from uniform and the noise floor); coverage of
    central predictive intervals against their nominal level (on the diagonal when
    calibrated); observed against replicated gene mean, CV and zero fraction and cell
    library size and detected genes (on the diagonal when reproduced; the legend gives
    ``r2`` about the diagonal); and each cell's Pareto ``k`` of the held-out PSIS estimate
    (reliable below 0.7).

    Parameters
    ----------
    results
        A :class:`pyro_scvi.analysis.criticism.Criticism`, or a mapping name -> Criticism
        (:func:`pyro_scvi.analysis.criticism.compare`).
    path
        If given, save the figure there (PNG), atomically, and close it.
    max_points
        At most this many points per fit and scatter panel (a fixed random subset).

    Returns
    -------
    matplotlib.figure.Figure
        Eight panels (closed if it was saved).
    """
    from .criticism import PARETO_K_THRESHOLD, Criticism, pit_histogram

    if isinstance(results, Criticism):
        results = {results.name: results}
    fig, axes = plt.subplots(2, 4, figsize=(17, 8), dpi=110)
    ax_pit, ax_cov, *ax_stats = axes.flat
    ax_k = ax_stats.pop()
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rng = np.random.default_rng(0)
    first = next(iter(results.values()))
    bounds = {key: [np.inf, -np.inf] for key in _CRITICISM_PANELS}
    for i, (name, c) in enumerate(results.items()):
        color = colors[i % len(colors)]
        s = c.summary
        h = pit_histogram(c.pit, c.n_bins) * c.n_bins
        edges = np.linspace(0, 1, c.n_bins + 1)
        ax_pit.stairs(h, edges, color=color, lw=1.5, label=f"{name}: TV {s['pit_tv']:.3f}")
        ax_cov.plot(
            c.coverage["nominal"],
            c.coverage["coverage"],
            "o-",
            ms=3,
            color=color,
            label=f"{name}: error {s['calibration_error']:.3f}",
        )
        for ax, (level, statistic) in zip(ax_stats, _CRITICISM_PANELS, strict=True):
            table = c.gene_table if level == "gene" else c.cell_table
            rows = table[table["statistic"] == statistic]
            obs = rows["observed"].to_numpy(float)
            rep = rows["replicated_mean"].to_numpy(float)
            ok = np.isfinite(obs) & np.isfinite(rep)
            if statistic in _LOG_STATISTICS | {"cv"}:
                ok &= (obs > 0) & (rep > 0)
            keep = np.flatnonzero(ok)
            if len(keep) > max_points:
                keep = np.sort(rng.choice(keep, max_points, replace=False))
            if len(keep):
                b = bounds[(level, statistic)]
                b[0] = min(b[0], obs[keep].min(), rep[keep].min())
                b[1] = max(b[1], obs[keep].max(), rep[keep].max())
            ax.scatter(
                obs[keep],
                rep[keep],
                s=5,
                alpha=0.5,
                color=color,
                label=f"{name}: r2 {s.get(f'r2_{statistic}', np.nan):.2f}",
            )
        # k far above 1 says no more than "unreliable": pile those up at the right edge
        k = np.clip(c.elpd["pareto_k"].to_numpy(float), None, 2.0)
        ax_k.hist(
            k[np.isfinite(k)],
            bins=np.linspace(-0.5, 2.0, 26),
            histtype="step",
            lw=1.5,
            color=color,
            label=f"{name}: {s['frac_pareto_k_high']:.0%} > {PARETO_K_THRESHOLD}",
        )
    ax_pit.axhline(1.0, color="k", ls="--", lw=0.8)
    ax_pit.set(
        xlim=(0, 1),
        xlabel="randomized PIT",
        ylabel="density",
        title=f"Per-entry PIT ({first.cells} cells; floor {first.summary['pit_tv_null']:.3f})",
    )
    ax_cov.plot([0, 1], [0, 1], color="k", ls="--", lw=0.8)
    ax_cov.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="nominal level of central interval",
        ylabel="coverage",
        title="Predictive interval coverage",
    )
    for ax, (level, statistic) in zip(ax_stats, _CRITICISM_PANELS, strict=True):
        lo, hi = bounds[(level, statistic)]
        if np.isfinite(lo) and statistic in _LOG_STATISTICS | {"cv"}:
            # only with points to show: an empty log axis fails when the figure is laid
            # out (all-zero counts, a single cell)
            ax.set_xscale("log")
            ax.set_yscale("log")
        if np.isfinite(lo):
            ax.plot([lo, hi], [lo, hi], color="k", ls="--", lw=0.8)
        else:
            ax.text(0.5, 0.5, "no positive values", ha="center", transform=ax.transAxes)
        ax.set(
            xlabel="observed",
            ylabel="replicated (posterior predictive mean)",
            title=f"{level} {statistic.replace('_', ' ')}",
        )
    ax_k.axvline(PARETO_K_THRESHOLD, color="tab:red", ls="--", lw=0.8)
    ax_k.set(
        xlabel="Pareto k (2 = 2 or more)",
        ylabel="cells",
        title="PSIS reliability of held-out log p(x)",
    )
    for ax in axes.flat:
        ax.legend(fontsize="small")
    return _save(fig, path)
