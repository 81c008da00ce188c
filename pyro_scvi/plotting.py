"""Plots: training curves."""

from __future__ import annotations

import os

import matplotlib.pyplot as plt
import pandas as pd

from .files import atomic_path


def plot_history(history: pd.DataFrame, path: str | os.PathLike | None = None):
    """Plot the train and validation ELBO per cell against the epoch.

    Parameters
    ----------
    history
        :attr:`pyro_scvi.SCVI.history`.
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
    fig.tight_layout()
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
    return fig
