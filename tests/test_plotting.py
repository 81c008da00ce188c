"""Plots: the panel grid each plot lays out, and saving (atomic PNG, figure closed)."""

import anndata
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from pyro_scvi.analysis.plotting import (
    plot_embedding,
    plot_history,
    plot_ppp_histograms,
    plot_volcano,
)

matplotlib.use("Agg")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _layout(fig):
    """(width, height) in inches and, per axis, whether it is shown."""
    size = tuple(round(float(v), 6) for v in fig.get_size_inches())
    return size, [ax.get_visible() for ax in fig.axes]


def _history(n=30):
    epochs = np.arange(n)
    return pd.DataFrame(
        {
            "epoch": epochs,
            "train_elbo": -20.0 + 0.5 * epochs,
            "validation_elbo": -21.0 + 0.5 * epochs,
            "kl_weight": 1.0,
        }
    )


def test_plot_history_saved_is_a_png_and_closed_unsaved_stays_open(tmp_path):
    fig = plot_history(_history())
    assert plt.fignum_exists(fig.number)
    plt.close(fig)
    path = tmp_path / "h.png"
    fig = plot_history(_history(), path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert not plt.fignum_exists(fig.number)
    assert [p.name for p in tmp_path.iterdir()] == ["h.png"]  # no temporary file left


def test_ppc_histograms_lay_out_three_panels_a_row_and_hide_the_spare():
    table = pd.DataFrame(
        {"level": ["gene"] * 4 + ["cell"] * 4, "statistic": ["mean"] * 4 + ["library_size"] * 4}
    )
    table["ppp"] = np.linspace(0.05, 0.95, 8)
    fig = plot_ppp_histograms(table)
    assert _layout(fig) == ((12.0, 3.4), [True, True, False])
    plt.close(fig)


@pytest.mark.parametrize(
    ("n", "kwargs", "layout"),
    [
        (4, {}, ((12.6, 7.2), [True, True, True, True, False, False])),
        (4, {"ncols": 2, "max_panels": 3}, ((8.4, 7.2), [True, True, True, False])),
        (1, {}, ((4.2, 3.6), [True])),
    ],
)
def test_volcano_lays_out_one_panel_per_comparison(n, kwargs, layout):
    names = [f"{c} vs rest" for c in "ABCD"[:n]]
    results = pd.DataFrame(
        {
            "proba_de": np.tile([0.99, 0.4], n),
            "lfc_mean": np.tile([1.5, 0.1], n),
            "is_de_fdr": np.tile([True, False], n),
            "comparison": np.repeat(names, 2),
        },
        index=[f"g{i}" for i in range(2 * n)],
    )
    results["proba_not_de"] = 1 - results["proba_de"]
    fig = plot_volcano(results, **kwargs)
    assert _layout(fig) == layout
    assert fig.axes[0].get_title() == "A vs rest (1 DE)"
    plt.close(fig)


@pytest.mark.parametrize(
    ("color", "ncols", "layout"),
    [
        (["cell_type", "batch", "depth"], 2, ((10.4, 8.8), [True, True, True, False])),
        ("cell_type", 2, ((5.2, 4.4), [True])),
        ([], 3, ((5.2, 4.4), [True])),
    ],
)
def test_embedding_lays_out_one_panel_per_colour(color, ncols, layout):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {
            "cell_type": rng.choice(list("ABC"), 20),
            "batch": rng.choice(["x", "y"], 20),
            "depth": rng.normal(size=20),
        },
        index=[f"c{i}" for i in range(20)],
    )
    adata = anndata.AnnData(np.zeros((20, 1)), obs=obs)
    adata.obsm["X_umap"] = rng.normal(size=(20, 2))
    fig = plot_embedding(adata, color=color, ncols=ncols)
    shown, visible = _layout(fig)
    # the colour bar of a numeric column is an axis of its own, after the panels
    assert (shown, visible[: len(layout[1])]) == layout
    plt.close(fig)
