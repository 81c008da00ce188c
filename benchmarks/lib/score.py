"""Scores the studies share: latent space, imputation, differential expression."""

from __future__ import annotations

from typing import Any

#: DE settings of `de_truth`: change-mode threshold and target FDR.
DELTA, FDR_TARGET = 0.25, 0.05


def latent_scores(latent: Any, adata: Any, cells: Any, seed: int) -> dict[str, Any]:
    """:func:`pyro_scvi.analysis.metrics.score_latent` of ``cells`` against ``obs["cell_type"]``
    (and ``obs["batch"]`` on multi-batch data): KMeans ARI and NMI, silhouettes, batch entropy."""
    from pyro_scvi.analysis.metrics import score_latent

    from .data import batch_key_for

    labels = adata.obs["cell_type"].astype(str).to_numpy()[cells]
    batches = adata.obs["batch"].astype(str).to_numpy()[cells] if batch_key_for(adata) else None
    return dict(score_latent(latent[cells], labels, batches, seed=seed))


def corrupted(adata: Any, scheme: str, rate: float, seed: int, binomial_p: float = 0.1):
    """``(copy of adata with hidden entries, dense original counts, hidden entries)``: ``rate``
    of the non-zero entries hidden by :func:`pyro_scvi.analysis.metrics.corrupt_counts`."""
    import numpy as np
    import scipy.sparse as sp

    from pyro_scvi.analysis.metrics import corrupt_counts

    x = np.asarray(adata.X.toarray(), dtype=np.float32)
    y, hidden = corrupt_counts(x, scheme=scheme, rate=rate, binomial_p=binomial_p, seed=seed)
    out = adata.copy()
    out.X = sp.csr_matrix(y)
    return out, x, hidden


def imputation_errors(pred: Any, x: Any, hidden: Any) -> dict[str, float]:
    """Median and mean |imputed - original count| over the hidden entries."""
    import numpy as np

    err = np.abs(np.asarray(pred)[hidden] - x[hidden])
    return {"median_abs_error": float(np.median(err)), "mean_abs_error": float(err.mean())}


def knn_impute(y: Any, seed: int, pcs: int = 30, k: int = 15, target_sum: float = 1e4) -> Any:
    """kNN smoothing: log1p of counts per ``target_sum``, PCA, the ``k`` nearest other cells;
    the mean of their count / library times the cell's own library."""
    import numpy as np
    from sklearn.decomposition import PCA
    from sklearn.neighbors import NearestNeighbors

    lib = y.sum(1, keepdims=True)
    freq = y / np.maximum(lib, 1.0)
    logx = np.log1p(freq * target_sum)
    z = PCA(n_components=min(pcs, min(logx.shape) - 1), random_state=seed).fit_transform(logx)
    k = min(k, y.shape[0] - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(z).kneighbors(z)
    return freq[idx[:, 1:]].mean(axis=1) * lib  # idx[:, 0] is the cell itself


def tie_broken_score(primary: Any, secondary: Any) -> Any:
    """Ranks ordering genes by ``primary``, ties broken by ``|secondary|``."""
    import numpy as np

    order = np.lexsort((np.abs(secondary), primary))
    score = np.empty(len(primary))
    score[order] = np.arange(len(primary))
    return score


def fdr_calls(proba_de: Any, target: float = FDR_TARGET) -> Any:
    """The posterior expected FDR rule on ``proba_de`` (in gene order)."""
    import numpy as np

    from pyro_scvi.analysis.de import posterior_fdr

    order = np.argsort(-proba_de, kind="stable")
    calls = np.zeros(len(proba_de), dtype=bool)
    calls[order] = posterior_fdr(proba_de[order]) <= target
    return calls


def benjamini_hochberg(p: Any) -> Any:
    import numpy as np

    n, order = len(p), np.argsort(p)
    adjusted = np.minimum.accumulate((p[order] * n / np.arange(1, n + 1))[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(adjusted, 1.0)
    return out


def wilcoxon(adata: Any, groupby: str, g1: str, g2: str) -> tuple[Any, Any, Any]:
    """Rank-sum test on ``log1p(10^4 * counts / total)`` (scanpy's ``rank_genes_groups``
    with ``method="wilcoxon"``: tie-corrected z, Benjamini-Hochberg): ``(|z|, calls at
    FDR_TARGET, mean log1p difference)``."""
    import numpy as np
    import scipy.sparse as sp
    from scipy import stats

    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    labels = adata.obs[groupby].astype(object).to_numpy()
    a, b = labels == g1, labels == g2
    x, in_a = x[a | b], a[a | b]
    x = np.log1p(1e4 * x / np.maximum(x.sum(1, keepdims=True), 1))
    n1, n2 = in_a.sum(), (~in_a).sum()
    n = n1 + n2
    u = stats.rankdata(x, axis=0)[in_a].sum(0) - n1 * (n1 + 1) / 2
    tied = (np.unique(col, return_counts=True)[1].astype(float) for col in x.T)
    ties = np.array([np.sum(c**3 - c) for c in tied])
    var = n1 * n2 / 12 * ((n + 1) - ties / (n * (n - 1)))
    z = (u - n1 * n2 / 2) / np.sqrt(np.maximum(var, 1e-12))
    p = 2 * stats.norm.sf(np.abs(z))
    lfc = x[in_a].mean(0) - x[~in_a].mean(0)
    return np.abs(z), benjamini_hochberg(p) < FDR_TARGET, lfc


def de_pyro(model: Any, adata: Any, groupby: str, g1: str, g2: str, **kw: Any):
    """pyro_scvi's ``differential_expression`` (delta :data:`DELTA`, target
    :data:`FDR_TARGET`): ``(score, is_de_fdr, lfc_mean)`` in gene order, scored by the order
    of its table."""
    import numpy as np
    import pandas as pd

    kw |= {"groupby": groupby, "group1": g1, "group2": g2}
    res = model.differential_expression(adata, delta=DELTA, fdr_target=FDR_TARGET, **kw)
    position = pd.Series(np.arange(len(res))[::-1], index=res.index, dtype=float)
    score, res = position.loc[adata.var_names].to_numpy(), res.loc[adata.var_names]
    return score, res["is_de_fdr"].to_numpy().astype(bool), res["lfc_mean"].to_numpy()


def de_scvi_tools(fit: Any, groupby: str, g1: str, g2: str, mode: str, batch: bool, seed=0):
    """scvi-tools' ``differential_expression`` on an adapter's fit, its sampling seeded:
    ``(score, calls, effect)``. Change mode: ``proba_de`` (ties ``|lfc_mean|``),
    ``is_de_fdr_0.05``; vanilla mode makes no calls itself: ``max(proba_m1, proba_m2)`` and
    the same posterior expected FDR rule (ties ``|bayes_factor|``)."""
    import numpy as np
    import scvi

    scvi.settings.seed = seed  # its cells and posterior draws: unseeded, AUROCs move ~0.005
    kw = {"groupby": groupby, "group1": g1, "group2": g2, "mode": mode, "delta": DELTA}
    kw |= {"fdr_target": FDR_TARGET, "batch_correction": batch, "silent": True}
    res = fit.model.differential_expression(fit.adata, **kw).loc[fit.adata.var_names]
    effect = (res["lfc_mean"] if "lfc_mean" in res else res["bayes_factor"]).to_numpy()
    if mode == "change":
        proba, calls = res["proba_de"].to_numpy(), res[f"is_de_fdr_{FDR_TARGET}"].to_numpy()
    else:
        proba = np.maximum(res["proba_m1"], res["proba_m2"]).to_numpy()
        calls = fdr_calls(proba)
    return tie_broken_score(proba, effect), calls.astype(bool), effect


def auroc(truth: Any, score: Any) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth, score)) if 0 < truth.sum() < len(truth) else None
