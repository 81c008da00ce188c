"""Latent-space and imputation metrics of Lopez et al. (2018).

All functions take plain arrays (a latent representation ``(n_cells, n_dims)``, one cell-type
label and one batch per cell, count matrices) and return floats, so they score any method's
output, not only pyro_scvi's. :func:`score` reads the same from an AnnData.

Latent space
    - :func:`entropy_batch_mixing`: entropy of the batches among each cell's nearest
      neighbours, the paper's batch-correction score. ``log(n_batches)`` when batches are
      perfectly mixed, 0 when each cell's neighbours all share one batch.
    - :func:`batch_silhouette`: ``1 - |silhouette width of the batches|``, computed within
      each cell type (scib's "ASW batch"). 1 for mixed batches, 0 for separated ones.
    - :func:`silhouette`: silhouette width of the cell types (higher: types separate).
    - :func:`clustering_scores`: ARI and NMI between k-means clusters and the cell types.
    - :func:`score_latent` bundles these; :func:`score` reads them from an AnnData.

Imputation
    :func:`corrupt_counts` hides a fraction of the non-zero counts, a model is fitted to the
    corrupted matrix, and :func:`imputation_error` is the median absolute difference between
    its imputed values and the original counts at the hidden entries.

References
----------
- Lopez, Regier, Cole, Jordan, Yosef (2018). Deep generative modeling for single-cell
  transcriptomics. Nature Methods 15, 1053-1058. (Batch entropy mixing: 50 neighbours,
  100 random cells, 50 repeats; imputation by corruption and median L1 distance.)
- Haghverdi, Lun, Morgan, Marioni (2018). Batch effects in single-cell RNA-sequencing data
  are corrected by matching mutual nearest neighbors. Nature Biotechnology 36, 421-427.
- Luecken et al. (2022). Benchmarking atlas-level data integration in single-cell genomics.
  Nature Methods 19, 41-50. (ASW batch.)
- Rousseeuw (1987). Silhouettes: a graphical aid to the interpretation and validation of
  cluster analysis. Journal of Computational and Applied Mathematics 20, 53-65.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.metrics import (
    adjusted_rand_score,
    normalized_mutual_info_score,
    silhouette_samples,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "entropy_batch_mixing",
    "silhouette",
    "batch_silhouette",
    "clustering_scores",
    "corrupt_counts",
    "imputation_error",
    "score_latent",
    "score",
]

#: Names accepted by :func:`corrupt_counts`; "zero" is the benchmark harness's name.
_SCHEMES = {"uniform": "uniform", "zero": "uniform", "binomial": "binomial"}


# --------------------------------------------------------------------------------------
# Input validation: every public function checks its inputs here, so errors name the
# argument and the fix instead of surfacing as an sklearn or numpy traceback.
# --------------------------------------------------------------------------------------


def _as_latent(latent: Any) -> np.ndarray:
    """``latent`` as a finite float64 array of shape ``(n_cells, n_dims)``."""
    if sp.issparse(latent):
        raise ValueError(
            "latent is a sparse matrix; pass a dense (n_cells, n_dims) array, e.g. "
            "latent.toarray() (a latent representation is low-dimensional and dense)."
        )
    try:
        arr = np.asarray(latent, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"latent must be a numeric array of shape (n_cells, n_dims); could not convert "
            f"a {type(latent).__name__} to float ({err})."
        ) from err
    if arr.ndim != 2:
        raise ValueError(
            f"latent must be 2-D (n_cells, n_dims), got shape {arr.shape}; for a single "
            "dimension pass latent.reshape(-1, 1)."
        )
    if arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(
            f"latent has shape {arr.shape}; the metrics need at least 2 cells (rows) and "
            "1 dimension (column)."
        )
    finite = np.isfinite(arr)
    if not finite.all():
        bad_cells = int((~finite).any(axis=1).sum())
        raise ValueError(
            f"latent has non-finite values (NaN or inf) in {bad_cells} of {arr.shape[0]} "
            "cells; drop those cells (with their labels and batches) or fix the model that "
            "produced them (a diverged fit gives NaN)."
        )
    return arr


def _as_groups(values: Any, name: str, n_cells: int) -> np.ndarray:
    """Integer codes ``0..k-1`` for one label per cell (any hashable, sortable values)."""
    if values is None:
        raise ValueError(f"{name} is None; pass one {name} entry per cell.")
    arr = np.asarray(values)
    if arr.ndim == 2 and arr.shape[1] == 1:  # a one-column DataFrame or (n, 1) array
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per cell), got shape {arr.shape}.")
    if len(arr) != n_cells:
        raise ValueError(
            f"{name} has {len(arr)} entries but latent has {n_cells} cells (rows); pass one "
            f"{name} entry per row of latent, in the same order."
        )
    # pd.isna knows every missing marker (None, NaN, pd.NA, NaT); np.unique does not and
    # would make NaN a group of its own or fail to sort None against strings.
    missing = pd.isna(arr)
    if missing.any():
        raise ValueError(
            f"{name} has {int(missing.sum())} missing values (NaN/None); drop those cells "
            f"or give them a {name} of their own (e.g. 'unknown')."
        )
    try:
        _, codes = np.unique(arr, return_inverse=True)
    except TypeError:  # mixed types that do not sort (e.g. 1 and "a"): compare as text
        _, codes = np.unique(arr.astype(str), return_inverse=True)
    return codes.reshape(-1)


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _entropy(counts: np.ndarray) -> np.ndarray:
    """Natural-log entropy of each row of non-negative ``counts`` (proportions per row)."""
    p = counts / counts.sum(axis=1, keepdims=True)
    # 0 log 0 = 0: mask the zeros rather than adding an epsilon, which would bias the value.
    logp = np.log(p, out=np.zeros_like(p), where=p > 0)
    return -(p * logp).sum(axis=1)


# --------------------------------------------------------------------------------------
# Latent space
# --------------------------------------------------------------------------------------


def entropy_batch_mixing(
    latent: Any,
    batches: Any,
    *,
    n_neighbors: int = 50,
    n_cells: int = 100,
    n_repeats: int = 50,
    seed: int = 0,
) -> float:
    """Batch entropy mixing: how evenly batches are spread among each cell's neighbours.

    The score of Lopez et al. (2018), after Haghverdi et al. (2018). The ``n_neighbors``
    nearest neighbours (Euclidean) of a cell are found among all cells, excluding the cell
    itself; the cell's entropy is ``-sum_b p_b log p_b`` (natural log), ``p_b`` being the
    fraction of those neighbours from batch ``b``. The score averages this entropy over
    ``n_cells`` cells drawn at random without replacement, and over ``n_repeats`` such
    draws. Only the sampled cells' neighbours are computed, so large data cost little.

    The maximum is ``log(n_batches)`` (``log 2 = 0.693`` for two batches), reached when
    every neighbourhood holds all batches in equal shares; it is lower when batches differ
    in size even if they are perfectly mixed. 0 means each neighbourhood is a single batch.

    Parameters
    ----------
    latent
        Latent representation, shape ``(n_cells, n_dims)``.
    batches
        Batch of each cell (any hashable values), length ``n_cells``; at least 2 batches.
    n_neighbors
        Neighbours per cell (50 in the paper). Clipped to ``n_cells - 1``.
    n_cells
        Cells drawn per repeat (100 in the paper). Clipped to the number of cells.
    n_repeats
        Number of random draws of cells (50 in the paper).
    seed
        Seed of the cell draws.

    Returns
    -------
    float
        Mean entropy, in ``[0, log(n_batches)]``.

    Examples
    --------
    Three cells near 0 (batches a, b, a) far from three cells of batch a. With 2 neighbours
    only the first and third cell see both batches (entropy ``log 2``), so the mean over all
    six cells is ``log(2) / 3``:

    >>> import math, numpy as np
    >>> latent = np.array([[0.0], [1.0], [2.0], [100.0], [101.0], [102.0]])
    >>> h = entropy_batch_mixing(latent, ["a", "b", "a", "a", "a", "a"], n_neighbors=2, n_cells=6)
    >>> round(h, 4), round(math.log(2) / 3, 4)
    (0.231, 0.231)
    """
    x = _as_latent(latent)
    codes = _as_groups(batches, "batches", x.shape[0])
    n_batches = int(codes.max()) + 1
    if n_batches < 2:
        raise ValueError(
            "batches has a single value; entropy of batch mixing needs at least 2 batches "
            "(check that you passed the batch column, not e.g. a constant)."
        )
    n_total = x.shape[0]
    # Clip rather than fail: small test data and tiny datasets should still get a score.
    k = min(_check_int(n_neighbors, "n_neighbors", 1), n_total - 1)
    m = min(_check_int(n_cells, "n_cells", 1), n_total)
    repeats = _check_int(n_repeats, "n_repeats", 1)

    rng = np.random.default_rng(seed)
    draws = np.stack([rng.choice(n_total, size=m, replace=False) for _ in range(repeats)])
    # Query each sampled cell once, however many draws it appears in.
    queried, where = np.unique(draws, return_inverse=True)
    # One extra neighbour so the cell itself can be dropped. The cell is usually its own
    # first hit, but with duplicate points another cell at distance 0 may come first, so
    # drop it by index; if it was not returned at all, drop the farthest hit instead.
    nn = NearestNeighbors(n_neighbors=k + 1).fit(x)
    idx = nn.kneighbors(x[queried], return_distance=False)
    is_self = idx == queried[:, None]
    no_self = ~is_self.any(axis=1)
    is_self[no_self, -1] = True
    neighbours = idx[~is_self].reshape(len(queried), k)

    # Batch counts among each queried cell's neighbours: (n_queried, n_batches).
    counts = np.zeros((len(queried), n_batches))
    np.add.at(counts, (np.repeat(np.arange(len(queried)), k), codes[neighbours].ravel()), 1)
    entropy = _entropy(counts)
    # Average over cells within a repeat, then over repeats (equal sizes: same as overall).
    return float(entropy[where.reshape(draws.shape)].mean())


def silhouette(
    latent: Any, labels: Any, *, sample_size: int | None = None, seed: int = 0
) -> float:
    """Mean silhouette width of the cell-type labels on the latent space (Euclidean).

    ``sklearn.metrics.silhouette_score``: per cell, ``(b - a) / max(a, b)`` with ``a`` the
    mean distance to the cell's own type and ``b`` the mean distance to the nearest other
    type, averaged over cells. In ``[-1, 1]``; higher means cell types are separated.

    Parameters
    ----------
    latent
        Latent representation, shape ``(n_cells, n_dims)``.
    labels
        Cell type of each cell, length ``n_cells``; between 2 and ``n_cells - 1`` types.
    sample_size
        Score a random subset of this many cells (cost grows with the square of the number
        of cells: use a few thousand for large data). ``None`` uses all cells.
    seed
        Seed of the subset (sklearn's ``random_state``).

    Returns
    -------
    float
        Mean silhouette width.

    Examples
    --------
    >>> import numpy as np
    >>> latent = np.array([[0.0], [1.0], [10.0], [11.0]])
    >>> round(silhouette(latent, ["t", "t", "b", "b"]), 3)
    0.9
    """
    x = _as_latent(latent)
    codes = _as_groups(labels, "labels", x.shape[0])
    n_labels = int(codes.max()) + 1
    if not 2 <= n_labels <= x.shape[0] - 1:
        raise ValueError(
            f"labels has {n_labels} distinct values for {x.shape[0]} cells; the silhouette "
            "needs between 2 and n_cells - 1 cell types."
        )
    if sample_size is not None:
        sample_size = min(_check_int(sample_size, "sample_size", 2), x.shape[0])
    return float(
        silhouette_score(x, codes, metric="euclidean", sample_size=sample_size, random_state=seed)
    )


def _batch_asw_per_cell(x: np.ndarray, batch_codes: np.ndarray) -> np.ndarray | None:
    """``1 - |s_i|`` of the batches for these cells, or None when the silhouette is undefined."""
    n_batches = len(np.unique(batch_codes))
    # sklearn's silhouette needs 2 <= n_labels <= n_samples - 1.
    if n_batches < 2 or n_batches > len(batch_codes) - 1:
        return None
    return 1.0 - np.abs(silhouette_samples(x, batch_codes, metric="euclidean"))


def batch_silhouette(latent: Any, batches: Any, labels: Any = None, *, seed: int = 0) -> float:
    """Batch mixing by silhouette width, scib's "ASW batch" (Luecken et al. 2022).

    Within each cell type ``t`` (all cells at once when ``labels`` is None), compute for each
    cell ``i`` the silhouette width ``s_batch(i)`` of the *batch* labels, using only the
    cells of type ``t``; the cell's score is ``1 - |s_batch(i)|``. The score of type ``t``
    is the mean over its cells, and the result the unweighted mean over the cell types, so
    rare types count as much as common ones.

    1 means that, within each cell type, batches overlap completely (a cell is as close to
    other batches as to its own); 0 means they are fully separated. ``|s|`` makes a cell
    *closer* to another batch than to its own count as imperfect mixing too. Computing
    within types keeps real biological differences between batches that hold different
    cell types from counting against the mixing.

    Cell types in one batch only, and types whose cells each form a batch of their own
    (the silhouette is then undefined), are skipped. A batch with a single cell in a type
    gets sklearn's silhouette 0 for that cell, i.e. a score of 1. The cost grows with the
    square of the largest cell type's size.

    Parameters
    ----------
    latent
        Latent representation, shape ``(n_cells, n_dims)``.
    batches
        Batch of each cell, length ``n_cells``; at least 2 batches.
    labels
        Cell type of each cell, length ``n_cells``, or None to treat all cells as one type.
    seed
        Unused (the score is deterministic); kept so every metric takes a ``seed``.

    Returns
    -------
    float
        ASW batch in ``[0, 1]``.

    Examples
    --------
    Two batches on top of each other score near 1, side by side near 0:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(200, 2))
    >>> b = np.repeat(["b1", "b2"], 100)
    >>> batch_silhouette(z, b) > 0.9
    True
    >>> batch_silhouette(z + np.where(b == "b1", 0.0, 20.0)[:, None], b) < 0.1
    True
    """
    del seed  # deterministic; the keyword keeps the metrics' signatures uniform
    x = _as_latent(latent)
    batch_codes = _as_groups(batches, "batches", x.shape[0])
    if batch_codes.max() < 1:
        raise ValueError(
            "batches has a single value; batch mixing needs at least 2 batches (check that "
            "you passed the batch column, not e.g. a constant)."
        )
    if labels is None:
        type_codes = np.zeros(x.shape[0], dtype=np.intp)
    else:
        type_codes = _as_groups(labels, "labels", x.shape[0])

    per_type = []
    for t in range(int(type_codes.max()) + 1):
        cells = np.flatnonzero(type_codes == t)
        scores = _batch_asw_per_cell(x[cells], batch_codes[cells])
        if scores is not None:
            per_type.append(scores.mean())
    if not per_type:
        raise ValueError(
            "no cell type has cells from 2 or more batches (with more cells than batches), "
            "so batch mixing is undefined: batches and labels are confounded. Pass "
            "labels=None to score all cells together."
        )
    return float(np.mean(per_type))


def clustering_scores(
    latent: Any,
    labels: Any,
    *,
    n_clusters: int | None = None,
    n_init: int = 10,
    seed: int = 0,
) -> dict[str, float]:
    """Agreement between k-means clusters of the latent space and the cell types.

    Runs ``sklearn.cluster.KMeans`` (``n_init`` restarts, seeded) with one cluster per
    distinct label unless ``n_clusters`` is given, then compares clusters with labels.

    Parameters
    ----------
    latent
        Latent representation, shape ``(n_cells, n_dims)``.
    labels
        Cell type of each cell, length ``n_cells``.
    n_clusters
        Number of k-means clusters; default the number of distinct labels.
    n_init
        k-means restarts; the best (lowest inertia) is kept.
    seed
        k-means ``random_state``.

    Returns
    -------
    dict[str, float]
        ``"ari"``: adjusted Rand index (1 perfect, about 0 for chance, can be negative);
        ``"nmi"``: normalized mutual information (arithmetic normalization, in ``[0, 1]``).

    Examples
    --------
    >>> import numpy as np
    >>> latent = np.array([[0.0], [0.1], [0.2], [5.0], [5.1], [5.2]])
    >>> clustering_scores(latent, ["a", "a", "a", "b", "b", "b"])
    {'ari': 1.0, 'nmi': 1.0}
    """
    x = _as_latent(latent)
    codes = _as_groups(labels, "labels", x.shape[0])
    k = int(codes.max()) + 1 if n_clusters is None else n_clusters
    k = _check_int(k, "n_clusters", 1)
    if k > x.shape[0]:
        raise ValueError(f"n_clusters={k} exceeds the number of cells ({x.shape[0]}).")
    km = KMeans(n_clusters=k, n_init=_check_int(n_init, "n_init", 1), random_state=seed)
    clusters = km.fit_predict(x)
    return {
        "ari": float(adjusted_rand_score(codes, clusters)),
        "nmi": float(normalized_mutual_info_score(codes, clusters)),
    }


# --------------------------------------------------------------------------------------
# Imputation
# --------------------------------------------------------------------------------------


def _as_counts(x: Any, name: str) -> np.ndarray:
    """A dense float64 copy of a 2-D count matrix (dense or scipy sparse)."""
    # toarray()/np.array copy, so later writes never reach the caller's matrix.
    try:
        arr = x.toarray() if sp.issparse(x) else np.array(x)
        arr = arr.astype(np.float64, copy=False)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a numeric (cells, genes) matrix ({err}).") from err
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (cells, genes), got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or inf values; counts must be finite.")
    return arr


def corrupt_counts(
    x: Any,
    *,
    scheme: str = "uniform",
    rate: float = 0.1,
    binomial_p: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Hide a random fraction of the non-zero counts, for imputation benchmarks.

    ``round(rate * nnz)`` of the ``nnz`` non-zero entries of ``x`` are drawn uniformly at
    random without replacement, then

    - ``scheme="uniform"`` (alias ``"zero"``): set to 0, mimicking dropouts;
    - ``scheme="binomial"``: replaced by a draw of ``Binomial(x, binomial_p)``, mimicking a
      lower capture efficiency (the value may stay non-zero, but never grows).

    A model is then fitted to the corrupted matrix and its imputed values are compared with
    the original counts at the returned entries (:func:`imputation_error`).

    How this differs from the paper (Lopez et al. 2018, Methods, and the original scVI
    code): its uniform scheme multiplies each picked entry by a Bernoulli(0.9) draw, so
    only about one in ten picked entries actually changes, and its binomial scheme picks
    ``rate`` of *all* entries, most of them zeros that ``Binomial(0, p)`` leaves at 0. Here
    every returned entry is non-zero in ``x`` and, for "uniform", really hidden, so the
    error is measured only where there was something to recover. ``binomial_p=0.2`` is the
    paper's value (the benchmark harness uses 0.1). The draws are made in the same order as
    the harness's ``corrupt()`` made them (``benchmarks/results/heldout_and_imputation.md``),
    so the same ``seed``, ``rate`` and ``binomial_p`` give the same corrupted matrix.

    Parameters
    ----------
    x
        Counts, shape ``(cells, genes)``, dense or scipy sparse; non-negative and, for the
        binomial scheme, whole numbers. Never modified.
    scheme
        ``"uniform"`` (or ``"zero"``) or ``"binomial"``.
    rate
        Fraction of the non-zero entries to corrupt, in ``[0, 1]``.
    binomial_p
        Success probability of the binomial scheme, in ``[0, 1]``.
    seed
        Seed of the draws.

    Returns
    -------
    corrupted : numpy.ndarray
        A dense float32 copy of ``x`` with the picked entries corrupted.
    where : tuple[numpy.ndarray, numpy.ndarray]
        ``(rows, cols)`` of the picked entries, sorted by row then column; ``x[where]`` are
        the true values to score against.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.array([[0, 3, 1], [2, 0, 5]])
    >>> y, (rows, cols) = corrupt_counts(x, rate=0.5)
    >>> len(rows), bool((y[rows, cols] == 0).all()), int(y.sum() + x[rows, cols].sum())
    (2, True, 11)
    """
    if scheme not in _SCHEMES:
        raise ValueError(f"scheme={scheme!r}; choose one of {sorted(_SCHEMES)}.")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate={rate}; it is a fraction of the non-zero entries, in [0, 1].")
    if not 0.0 <= binomial_p <= 1.0:
        raise ValueError(f"binomial_p={binomial_p}; it is a probability, in [0, 1].")
    counts = _as_counts(x, "x")
    if (counts < 0).any():
        raise ValueError("x has negative values; pass raw counts, not normalized data.")

    rows, cols = np.nonzero(counts)  # row-major order, the same for dense and sparse input
    if _SCHEMES[scheme] == "binomial":
        values = counts[rows, cols]
        if not np.array_equal(values, np.round(values)):
            raise ValueError(
                "x has non-integer values; the binomial scheme needs raw counts (whole "
                "numbers). Pass raw counts or use scheme='uniform'."
            )

    rng = np.random.default_rng(seed)
    # Same draws, in the same order, as the benchmark harness's corrupt().
    pick = rng.choice(len(rows), int(round(rate * len(rows))), replace=False)
    hidden = (rows[pick], cols[pick])
    corrupted = counts.copy()
    if _SCHEMES[scheme] == "uniform":
        corrupted[hidden] = 0.0
    else:
        corrupted[hidden] = rng.binomial(counts[hidden].astype(np.int64), binomial_p)
    order = np.sort(pick)  # report entries in row-major order, easier to read and join
    return corrupted.astype(np.float32), (rows[order], cols[order])


def imputation_error(
    imputed: Any, original: Any, where: tuple[Sequence[int], Sequence[int]]
) -> float:
    """Median absolute error of imputed values at the hidden entries.

    The paper's imputation score: the median over the entries ``where = (rows, cols)`` of
    ``|imputed[r, c] - original[r, c]|`` (the median L1 distance). Lower is better. The
    median, unlike the mean, is not dominated by a few highly expressed genes.

    Parameters
    ----------
    imputed
        Imputed values, shape ``(cells, genes)``, dense or scipy sparse (e.g. a model's
        mean expression fitted to the output of :func:`corrupt_counts`).
    original
        The uncorrupted counts, same shape, dense or scipy sparse.
    where
        ``(rows, cols)`` of the hidden entries, as returned by :func:`corrupt_counts`.

    Returns
    -------
    float
        Median absolute error.

    Examples
    --------
    >>> import numpy as np
    >>> original = np.array([[4, 0], [2, 6]])
    >>> imputed = np.array([[3.0, 9.0], [2.5, 9.0]])
    >>> imputation_error(imputed, original, (np.array([0, 1, 1]), np.array([0, 0, 1])))
    1.0
    """
    if not (isinstance(where, (tuple, list)) and len(where) == 2):
        raise ValueError(
            "where must be a pair (rows, cols) of index arrays, as returned by corrupt_counts."
        )
    rows = np.asarray(where[0]).reshape(-1)
    cols = np.asarray(where[1]).reshape(-1)
    if rows.shape != cols.shape:
        raise ValueError(f"where has {rows.size} rows but {cols.size} cols; they must pair up.")
    if rows.size == 0:
        raise ValueError("where is empty; corrupt at least one entry (rate > 0).")
    if not (np.issubdtype(rows.dtype, np.integer) and np.issubdtype(cols.dtype, np.integer)):
        raise ValueError("where must hold integer indices (rows, cols).")

    def _shape(a: Any, name: str) -> tuple[int, ...]:
        shape = a.shape if hasattr(a, "shape") else np.shape(a)
        if len(shape) != 2:
            raise ValueError(f"{name} must be 2-D (cells, genes), got shape {tuple(shape)}.")
        return tuple(shape)

    shape = _shape(original, "original")
    if _shape(imputed, "imputed") != shape:
        raise ValueError(
            f"imputed has shape {_shape(imputed, 'imputed')} but original has {shape}; impute "
            "every cell and gene of the corrupted matrix."
        )
    if rows.min() < 0 or cols.min() < 0 or rows.max() >= shape[0] or cols.max() >= shape[1]:
        raise ValueError(f"where has indices outside the matrix shape {shape}.")

    def _at(a: Any) -> np.ndarray:
        # Read only the hidden entries: densifying a large sparse matrix is not needed.
        if sp.issparse(a):
            return np.asarray(sp.csr_array(a)[rows, cols], dtype=np.float64).reshape(-1)
        return np.asarray(a, dtype=np.float64)[rows, cols]

    err = np.abs(_at(imputed) - _at(original))
    if not np.isfinite(err).all():
        raise ValueError("imputed has NaN or inf values at the hidden entries.")
    return float(np.median(err))


# --------------------------------------------------------------------------------------
# Bundles
# --------------------------------------------------------------------------------------


def score_latent(
    latent: Any, labels: Any = None, batches: Any = None, *, seed: int = 0
) -> dict[str, float]:
    """All latent-space metrics at once, with their default settings.

    Parameters
    ----------
    latent
        Latent representation, shape ``(n_cells, n_dims)``.
    labels
        Cell type of each cell, or None to skip the cell-type metrics.
    batches
        Batch of each cell, or None to skip the batch metrics.
    seed
        Seed passed to every metric.

    Returns
    -------
    dict[str, float]
        With ``labels``: ``"ari"``, ``"nmi"`` (:func:`clustering_scores`) and
        ``"silhouette_label"`` (:func:`silhouette`). With ``batches`` holding 2 or more
        batches: ``"entropy_batch_mixing"`` and ``"batch_silhouette"`` (the latter within
        cell types when ``labels`` is given). The keys depend only on which inputs are
        given, so tables of several methods line up; a metric undefined for the data (the
        silhouette of a single cell type, ASW batch when no cell type spans two batches)
        is NaN.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> labels = np.repeat(["T", "B"], 50)
    >>> z = rng.normal(size=(100, 2)) + np.where(labels == "T", 0.0, 10.0)[:, None]
    >>> s = score_latent(z, labels, batches=np.tile(["b1", "b2"], 50))
    >>> sorted(s)
    ['ari', 'batch_silhouette', 'entropy_batch_mixing', 'nmi', 'silhouette_label']
    >>> s["ari"], s["entropy_batch_mixing"] > 0.6
    (1.0, True)
    """
    x = _as_latent(latent)
    out: dict[str, float] = {}
    label_codes = None
    if labels is not None:
        label_codes = _as_groups(labels, "labels", x.shape[0])
        out.update(clustering_scores(x, label_codes, seed=seed))
        n_labels = int(label_codes.max()) + 1
        out["silhouette_label"] = (
            silhouette(x, label_codes, seed=seed) if 2 <= n_labels < x.shape[0] else math.nan
        )
    if batches is not None:
        batch_codes = _as_groups(batches, "batches", x.shape[0])
        if batch_codes.max() >= 1:
            out["entropy_batch_mixing"] = entropy_batch_mixing(x, batch_codes, seed=seed)
            try:
                out["batch_silhouette"] = batch_silhouette(x, batch_codes, label_codes)
            except ValueError:  # only raised when no cell type spans two batches
                out["batch_silhouette"] = math.nan
    return out


def _obs_column(adata: AnnData, key: str | None, what: str) -> np.ndarray | None:
    if key is None:
        return None
    if key not in adata.obs.columns:
        raise KeyError(
            f"{what}={key!r} is not a column of adata.obs; available: "
            f"{list(adata.obs.columns)}. Pass {what}=None to skip it."
        )
    return adata.obs[key].to_numpy()


def score(
    adata: AnnData,
    *,
    use_rep: str = "X_pyro_scvi",
    label_key: str | None = "cell_type",
    batch_key: str | None = "batch",
    seed: int = 0,
) -> dict[str, float]:
    """:func:`score_latent` on an AnnData's latent representation; ``adata`` is not modified.

    Parameters
    ----------
    adata
        Annotated data with the latent representation in ``adata.obsm[use_rep]``.
    use_rep
        Key of the latent representation in ``adata.obsm`` (e.g. ``"X_pyro_scvi"``,
        ``"X_scVI"``, ``"X_pca"``).
    label_key
        Column of ``adata.obs`` with the cell types, or None to skip the cell-type metrics.
    batch_key
        Column of ``adata.obs`` with the batches, or None to skip the batch metrics.
    seed
        Seed passed to every metric.

    Returns
    -------
    dict[str, float]
        As :func:`score_latent`.

    Examples
    --------
    >>> import anndata, numpy as np, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> types = np.repeat(["T", "B"], 20)
    >>> adata = anndata.AnnData(obs=pd.DataFrame({"cell_type": types}, index=map(str, range(40))))
    >>> adata.obsm["X_pyro_scvi"] = rng.normal(size=(40, 2)) + 8.0 * (types == "B")[:, None]
    >>> score(adata, batch_key=None)["ari"]
    1.0
    """
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm; available: {list(adata.obsm.keys())}. "
            "Store a latent representation first, e.g. "
            "adata.obsm['X_pyro_scvi'] = model.get_latent_representation()."
        )
    latent = np.asarray(adata.obsm[use_rep])  # a DataFrame in obsm works too
    labels = _obs_column(adata, label_key, "label_key")
    batches = _obs_column(adata, batch_key, "batch_key")
    return score_latent(latent, labels, batches, seed=seed)
