"""Counts with known differential expression, from designs unlike scVI's generative model.

Differential expression (DE) tested on data drawn from the model that the method assumes
says little about data that are not. These generators build truth from other families:

:func:`splatter_like`
    The design of Splatter (Zappia et al., 2017): gamma gene means with high-expression
    outliers, log-normal library sizes, a Gamma-Poisson count whose biological coefficient
    of variation falls with the mean (``bcv = (common + 1/sqrt(mu)) * sqrt(df/chi2_df)``),
    logistic dropout on the log-mean, per-gene batch factors, and groups that each move
    their own DE genes by known log2 fold changes.
:func:`poisson_lognormal_samples`
    A multi-sample, multi-condition design in the spirit of muscat (Crowell et al., 2020):
    replicate samples per condition with their own per-gene offsets, a cell-level
    log-normal noise (Poisson-lognormal, not Gamma-Poisson), sample-specific depth, and
    optionally sequencing runs (batches) partly confounded with the condition. Samples are
    replicates, so pseudobulk tests apply.
:func:`composition_shift`
    Programmes that move the make-up of the libraries: many genes up (2-8 fold) in one
    group and few down, optionally among the most expressed genes, with sequencing depth
    independent of the group, so every unchanged gene's share of a cell's counts moves
    by one common factor. Comparing shares then turns the programme into a fold change
    of every other gene.
:func:`plant_fold_changes`
    Semi-synthetic: split real cells of one type at random into two halves and plant known
    fold changes by binomial thinning of chosen genes in one half; all other variation is
    the data's own. With ``up_share`` near 1 the planted programme is one-sided and moves
    the libraries too.

Every generator returns an :class:`~anndata.AnnData` of integer counts with
``obs["group"]`` (the groups compared), ``obs["batch"]`` and, in ``uns["truth"]``,
``log2_fold_change``: the designed log2 fold change of group ``"A"`` over group ``"B"``
per gene (0 for genes that are not DE) and ``is_de``.

References
----------
Zappia, Phipson and Oshlack (2017). Splatter: simulation of single-cell RNA sequencing
data. Genome Biology 18:174.
Crowell et al. (2020). muscat detects subpopulation-specific state transitions from
multi-sample multi-condition single-cell transcriptomics data. Nat. Commun. 11:6077.
Gerard (2020). Data-based RNA-seq simulations by binomial thinning. BMC Bioinformatics
21:206.
"""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = [
    "composition_shift",
    "plant_fold_changes",
    "poisson_lognormal_samples",
    "splatter_like",
]


def _de_factors(
    rng: np.random.Generator,
    genes: np.ndarray,
    lfc_range: tuple[float, float],
    up_share: float = 0.5,
) -> np.ndarray:
    """Signed log2 fold changes, uniform in magnitude over ``lfc_range``; ``up_share`` up."""
    size = rng.uniform(*lfc_range, len(genes))
    # down where the uniform draw is below 1 - up_share: the draws of up_share=0.5 are those
    # of the earlier "half of them down", so seeded data sets did not change
    return np.where(rng.random(len(genes)) < 1 - up_share, -size, size)


def _assemble(
    counts: np.ndarray,
    obs: dict[str, np.ndarray],
    lfc: np.ndarray,
    extra: dict,
    prefix: str = "gene",
) -> anndata.AnnData:
    n_cells, n_genes = counts.shape
    frame = pd.DataFrame(
        {k: pd.Categorical(v) for k, v in obs.items()}, index=[f"cell{i}" for i in range(n_cells)]
    )
    var = pd.DataFrame(index=[f"{prefix}{g}" for g in range(n_genes)])
    adata = anndata.AnnData(sp.csr_matrix(counts.astype(np.int32)), obs=frame, var=var)
    adata.uns["truth"] = {"log2_fold_change": lfc, "is_de": lfc != 0, **extra}
    return adata


def _batches(
    rng: np.random.Generator, group: np.ndarray, n_batches: int, confounding: float
) -> np.ndarray:
    """Batch of each cell: A leans to the first batch and B to the last by ``confounding``."""
    if n_batches == 1:
        return np.zeros(len(group), dtype=int)
    # share of a group's cells in the last batch: 1/2 -+ confounding/2 for A and B
    lean = {"A": -confounding / 2, "B": confounding / 2}
    p_last = np.array([0.5 + lean.get(g, 0.0) for g in group])
    last = rng.random(len(group)) < p_last
    return np.where(last, n_batches - 1, rng.integers(0, n_batches - 1, len(group)))


def splatter_like(
    n_cells: int = 3000,
    n_genes: int = 2000,
    *,
    n_groups: int = 3,
    de_fraction: float = 0.05,
    lfc_range: tuple[float, float] = (0.6, 2.0),
    n_batches: int = 1,
    batch_confounding: float = 0.6,
    mean_shape: float = 0.6,
    mean_rate: float = 0.3,
    outlier_probability: float = 0.05,
    library_size: float = 3000.0,
    library_log_sd: float = 0.3,
    bcv_common: float = 0.1,
    bcv_df: float = 60.0,
    dropout_midpoint: float = -1.0,
    dropout_shape: float = -1.0,
    batch_factor_sd: float = 0.2,
    seed: int = 0,
) -> anndata.AnnData:
    """Splatter-style counts: groups ``"A"``, ``"B"``, ... with their own DE genes.

    Each group moves its own ``de_fraction`` of the genes (disjoint between groups) by a
    log2 fold change of random sign and magnitude uniform in ``lfc_range``, so ``"A"`` and
    ``"B"`` differ on ``2 * de_fraction`` of the genes. With ``n_batches > 1`` every gene
    gets a log-normal factor per batch, and ``batch_confounding`` (0: none, 1: complete)
    puts group A's cells in the first batch and B's in the last more often than chance.

    The truth is the designed fold change of the gene's mean before the means are rescaled
    to each cell's library size; the rescaling moves every gene's share of the library by
    one common factor (``uns["truth"]["composition_shift_log2"]``), small here because up
    and down changes are equally likely and outlier genes are never DE.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix.
    n_groups
        Number of groups (at least 2); the first two are the compared ``"A"`` and ``"B"``.
    de_fraction
        Fraction of the genes each group moves.
    lfc_range
        Range of the magnitude of the designed log2 fold changes.
    n_batches, batch_confounding
        Batches, and how unevenly groups A and B are spread over them.
    mean_shape, mean_rate
        Gamma distribution of the genes' base means (Splatter's defaults).
    outlier_probability
        Fraction of genes whose mean is multiplied by a log-normal factor (high expressers).
    library_size, library_log_sd
        Median and log-scale spread of the cells' total counts.
    bcv_common, bcv_df
        Biological coefficient of variation: its floor, and the degrees of freedom of its
        per-gene scaled inverse chi-square spread.
    dropout_midpoint, dropout_shape
        Logistic dropout: a count is zeroed with probability
        ``1 / (1 + exp(-shape * (log(mu) - midpoint)))``; a negative shape drops low means.
    batch_factor_sd
        Standard deviation of the log batch factors.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        CSR integer counts; ``obs["group"]``, ``obs["batch"]``; ``uns["truth"]`` with
        ``log2_fold_change`` (A over B), ``is_de`` and ``group_log2_fold_change``
        (groups x genes, each against the base).

    Examples
    --------
    >>> adata = splatter_like(n_cells=300, n_genes=200, seed=1)
    >>> adata.shape, sorted(adata.obs["group"].unique())
    ((300, 200), ['A', 'B', 'C'])
    >>> int(adata.uns["truth"]["is_de"].sum())  # 5 % of the genes in each of A and B
    20
    """
    if n_groups < 2:
        raise ValueError(f"n_groups={n_groups}; need at least 2 groups to compare.")
    if n_groups * int(round(de_fraction * n_genes)) > n_genes:
        raise ValueError("de_fraction * n_groups exceeds 1: not enough genes for the DE sets.")
    rng = np.random.default_rng(seed)
    base = rng.gamma(mean_shape, 1 / mean_rate, n_genes)
    outlier = rng.random(n_genes) < outlier_probability
    # Splatter multiplies outliers by a log-normal factor around the median mean
    base[outlier] = np.median(base) * np.exp(rng.normal(4.0, 0.5, outlier.sum()))
    n_de = int(round(de_fraction * n_genes))
    # Outliers are left out of the DE sets: one gene with 50 times the median mean moving
    # 4-fold would rescale every other gene of its group (their share of the library).
    order = np.r_[rng.permutation(np.flatnonzero(~outlier)), np.flatnonzero(outlier)]
    group_lfc = np.zeros((n_groups, n_genes))
    for k in range(n_groups):
        genes = order[k * n_de : (k + 1) * n_de]
        group_lfc[k, genes] = _de_factors(rng, genes, lfc_range)
    names = np.array([chr(ord("A") + k) for k in range(n_groups)])
    group = rng.integers(0, n_groups, n_cells)
    batch = _batches(rng, names[group], n_batches, batch_confounding)
    batch_log = rng.normal(0.0, batch_factor_sd, (n_batches, n_genes))
    means = base * 2.0 ** group_lfc[group] * np.exp(batch_log[batch])
    library = library_size * np.exp(rng.normal(0.0, library_log_sd, n_cells))
    mu = library[:, None] * means / means.sum(1, keepdims=True)
    # Biological CV falls with the mean towards bcv_common; a per-gene scaled inverse
    # chi-square factor spreads it, as in Splatter.
    bcv = (bcv_common + 1 / np.sqrt(mu)) * np.sqrt(bcv_df / rng.chisquare(bcv_df, n_genes))
    shape = 1 / bcv**2
    counts = rng.poisson(rng.gamma(shape, mu / shape))
    drop = 1 / (1 + np.exp(-dropout_shape * (np.log(mu) - dropout_midpoint)))
    counts[rng.random(counts.shape) < drop] = 0
    share = (base * 2.0**group_lfc).sum(1)
    return _assemble(
        counts,
        {"group": names[group], "batch": np.array([f"batch{b}" for b in batch])},
        group_lfc[0] - group_lfc[1],
        {
            "group_log2_fold_change": group_lfc,
            # every gene's log2 share of the library moves by this between A and B
            "composition_shift_log2": float(np.log2(share[1] / share[0])),
            "design": "splatter_like",
        },
    )


def poisson_lognormal_samples(
    n_cells: int = 3000,
    n_genes: int = 1000,
    *,
    samples_per_condition: int = 3,
    de_fraction: float = 0.1,
    lfc_range: tuple[float, float] = (0.6, 2.0),
    sample_sd: float = 0.1,
    cell_sd: float = 0.4,
    log_mean_loc: float = -1.0,
    log_mean_scale: float = 2.0,
    library_size: float = 1500.0,
    library_log_sd: float = 0.25,
    n_batches: int = 1,
    batch_confounding: float = 1 / 3,
    batch_factor_sd: float = 0.2,
    seed: int = 0,
) -> anndata.AnnData:
    """Multi-sample Poisson-lognormal counts: conditions ``"A"`` and ``"B"`` with replicates.

    Every cell belongs to one of ``samples_per_condition`` samples of its condition. A
    gene's log mean in a cell is its base (normal, ``log_mean_loc``, ``log_mean_scale``)
    plus its condition's fold change, a per-gene offset of the sample (``sample_sd``: the
    replicate-to-replicate variation a pseudobulk test models), a per-gene offset of the
    sequencing run (batch), and a cell-level normal term with a per-gene sd around
    ``cell_sd``; the count is Poisson given that mean times the cell's depth. Each sample
    has its own depth. With ``n_batches > 1`` the samples of A go to the first run and
    those of B to the last in the share ``1/2 + batch_confounding/2`` (rounded; samples,
    not cells, are assigned, as in a real experiment: with 3 samples per condition, the
    default puts 2 of A's in the first run and 2 of B's in the last).

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix (cells spread evenly over the samples).
    samples_per_condition
        Replicates per condition.
    de_fraction, lfc_range
        Fraction of the genes that differ between A and B (in pairs, one up and one down by
        the same amount from the same base), and the range of the magnitude of their log2
        fold changes.
    sample_sd, cell_sd
        Standard deviations (natural log) of the sample and cell-level terms.
    log_mean_loc, log_mean_scale
        Normal distribution of the genes' base log expression.
    library_size, library_log_sd
        Median total counts of a cell, and the log-scale spread of cells and of samples.
    n_batches, batch_confounding, batch_factor_sd
        Sequencing runs, how unevenly the conditions' samples are spread over them, and the
        sd of their per-gene log factors.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        CSR integer counts; ``obs["group"]`` (condition), ``obs["sample"]``,
        ``obs["batch"]``; ``uns["truth"]`` with ``log2_fold_change``, ``is_de`` and
        ``sample_log2_fold_change``: per gene, A's mean sample offset over B's (log2), the
        difference that these replicates make between the conditions by chance.

    Examples
    --------
    >>> adata = poisson_lognormal_samples(n_cells=240, n_genes=100, seed=2)
    >>> adata.obs["sample"].nunique(), int(adata.uns["truth"]["is_de"].sum())
    (6, 10)
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(log_mean_loc, log_mean_scale, n_genes)
    lfc = np.zeros(n_genes)
    n_pairs = int(round(de_fraction * n_genes / 2))
    genes = rng.choice(n_genes, 2 * n_pairs, replace=False)
    up, down = genes[:n_pairs], genes[n_pairs:]
    # DE genes come in pairs of one base level, one up and one down by the same amount,
    # so that A's and B's libraries have the same make-up and every other gene keeps its
    # share (log-normal means are heavy-tailed: one unpaired high expresser moving 4-fold
    # would shift the share of all others by a third of a log2 unit).
    size = rng.uniform(*lfc_range, n_pairs)
    lfc[up], lfc[down] = size, -size
    base[down] = base[up]
    n_samples = 2 * samples_per_condition
    condition = np.repeat(["A", "B"], samples_per_condition)
    sample_names = np.array(
        [f"{c}{i % samples_per_condition + 1}" for i, c in enumerate(condition)]
    )
    # Runs are assigned to samples, not cells, and in fixed shares (a random draw of six
    # samples can put every replicate of a condition in one run).
    in_first = int(np.floor(samples_per_condition * (0.5 + batch_confounding / 2) + 0.5))
    lean = np.arange(samples_per_condition) < in_first
    sample_run = np.r_[np.where(lean, 0, n_batches - 1), np.where(lean, n_batches - 1, 0)]
    sample_log = rng.normal(0.0, sample_sd, (n_samples, n_genes))
    sample_depth = np.exp(rng.normal(0.0, library_log_sd, n_samples))
    run_log = rng.normal(0.0, batch_factor_sd, (n_batches, n_genes))
    run_log[0] = 0.0
    gene_cell_sd = cell_sd * np.exp(rng.normal(0.0, 0.25, n_genes))
    sample = rng.permutation(np.arange(n_cells) % n_samples)
    # A condition's change halves up and down on average, so its genes' mean share of the
    # library moves little; the design's fold changes are then close to the realized ones.
    log_mu = (
        base
        + np.log(2) * np.where(condition[sample] == "A", 0.5, -0.5)[:, None] * lfc
        + sample_log[sample]
        + run_log[sample_run[sample]]
        + rng.normal(0.0, 1.0, (n_cells, n_genes)) * gene_cell_sd
    )
    freq = np.exp(log_mu - log_mu.max(1, keepdims=True))
    freq /= freq.sum(1, keepdims=True)
    depth = library_size * sample_depth[sample] * np.exp(rng.normal(0, library_log_sd, n_cells))
    counts = rng.poisson(depth[:, None] * freq)
    return _assemble(
        counts,
        {
            "group": condition[sample],
            "sample": sample_names[sample],
            "batch": np.array([f"batch{b}" for b in sample_run[sample]]),
        },
        lfc,
        {
            "design": "poisson_lognormal_samples",
            "sample_log2_fold_change": (
                sample_log[condition == "A"].mean(0) - sample_log[condition == "B"].mean(0)
            )
            / np.log(2),
        },
    )


def composition_shift(
    n_cells: int = 3000,
    n_genes: int = 2000,
    *,
    up_fraction: float = 0.15,
    down_fraction: float = 0.01,
    lfc_range: tuple[float, float] = (1.0, 3.0),
    among_top: float = 1.0,
    n_batches: int = 1,
    batch_factor_sd: float = 0.2,
    mean_shape: float = 0.6,
    mean_rate: float = 0.3,
    theta_median: float = 3.0,
    library_size: float = 3000.0,
    library_log_sd: float = 0.3,
    seed: int = 0,
) -> anndata.AnnData:
    """Negative binomial counts whose DE programme shifts the libraries' composition.

    Gene means are Gamma(``mean_shape``, ``mean_rate``) (Splatter's defaults). In group
    ``"A"`` an ``up_fraction`` of the genes is multiplied by ``2**lfc`` and a
    ``down_fraction`` divided by it, ``lfc`` uniform in ``lfc_range`` (default 2-8
    fold); the DE genes are drawn from the ``among_top`` most expressed fraction of the
    genes (``1``: from all; ``0.2`` with ``up_fraction=0.1``: a large programme among
    the high expressers). A cell's depth is log-normal around ``library_size`` whatever
    its group, so the expected count of gene ``g`` is ``depth * m_g / sum(m)``: an
    unchanged gene's share of the counts in A is that of B times
    ``2**composition_shift_log2`` (negative when A's programme is mostly up). Counts are
    negative binomial with a log-normal inverse dispersion per gene around
    ``theta_median``. With ``n_batches > 1``, batches are crossed with the groups (each
    cell's batch at random, independent of its group) and every gene gets a log-normal
    factor per batch.

    The truth is the designed fold change of a gene's expression per cell (0 for genes
    outside the programme): what a method that reads shares must correct for the
    composition to find.

    Parameters
    ----------
    n_cells, n_genes
        Size of the count matrix; the cells are split at random between A and B.
    up_fraction, down_fraction
        Fractions of all the genes moved up and down in A.
    lfc_range
        Range of the magnitude of the log2 fold changes.
    among_top
        The DE genes are drawn from this top fraction of the genes by mean; it must hold
        ``up_fraction + down_fraction`` of them.
    n_batches, batch_factor_sd
        Batches crossed with the groups, and the sd of their per-gene log factors.
    mean_shape, mean_rate
        Gamma distribution of the genes' means.
    theta_median
        Median inverse dispersion of the negative binomial (log-sd 0.5 across genes).
    library_size, library_log_sd
        Median and log-scale spread of the cells' depth.
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        CSR integer counts; ``obs["group"]`` (``"A"``, ``"B"``), ``obs["batch"]``;
        ``uns["truth"]`` with ``log2_fold_change`` (A over B), ``is_de`` and
        ``composition_shift_log2`` (log2 of A's over B's share of an unchanged gene).

    Examples
    --------
    >>> adata = composition_shift(n_cells=200, n_genes=100, seed=0)
    >>> lfc = adata.uns["truth"]["log2_fold_change"]
    >>> int((lfc > 0).sum()), int((lfc < 0).sum())
    (15, 1)
    >>> bool(adata.uns["truth"]["composition_shift_log2"] < -0.2)
    True
    """
    n_up, n_down = int(round(up_fraction * n_genes)), int(round(down_fraction * n_genes))
    pool = int(round(among_top * n_genes))
    if n_up + n_down > pool:
        raise ValueError(
            f"up_fraction + down_fraction = {up_fraction + down_fraction} exceeds "
            f"among_top={among_top}: not enough genes to draw the programme from."
        )
    rng = np.random.default_rng(seed)
    base = rng.gamma(mean_shape, 1 / mean_rate, n_genes)
    top = np.argsort(-base)[:pool]
    genes = rng.choice(top, n_up + n_down, replace=False)
    lfc = np.zeros(n_genes)
    lfc[genes] = rng.uniform(*lfc_range, len(genes)) * np.r_[np.ones(n_up), -np.ones(n_down)]
    group = np.where(rng.random(n_cells) < 0.5, "A", "B")
    batch = _batches(rng, group, n_batches, 0.0)
    batch_log = rng.normal(0.0, batch_factor_sd, (n_batches, n_genes))
    means = base * 2.0 ** (np.where(group == "A", 1.0, 0.0)[:, None] * lfc)
    means = means * np.exp(batch_log[batch])
    depth = library_size * np.exp(rng.normal(0.0, library_log_sd, n_cells))
    mu = depth[:, None] * means / means.sum(1, keepdims=True)
    theta = theta_median * np.exp(rng.normal(0.0, 0.5, n_genes))
    counts = rng.poisson(rng.gamma(theta, mu / theta))
    shift = float(np.log2(base.sum() / (base * 2.0**lfc).sum()))
    return _assemble(
        counts,
        {"group": group, "batch": np.array([f"batch{b}" for b in batch])},
        lfc,
        {"composition_shift_log2": shift, "design": "composition_shift"},
    )


def plant_fold_changes(
    adata: anndata.AnnData,
    *,
    cells: np.ndarray,
    de_fraction: float = 0.1,
    lfc_range: tuple[float, float] = (0.6, 2.0),
    min_mean: float = 0.0,
    up_share: float = 0.5,
    seed: int = 0,
) -> anndata.AnnData:
    """Semi-synthetic DE: halves ``"A"``/``"B"`` of real ``cells``, fold changes by thinning.

    ``cells`` (indices into ``adata``, one cell type say) are split at random into two
    halves. A random ``de_fraction`` of the genes with mean count at least ``min_mean`` in
    those cells gets a log2 fold change, up in A with probability ``up_share`` (down
    otherwise) and of magnitude uniform in ``lfc_range``: every count of the gene in the
    half that goes *down* is replaced by a ``Binomial(count, 2**-|lfc|)`` draw. Thinning a
    count keeps its kind of noise (a Poisson stays Poisson, a negative binomial stays
    negative binomial with the same shape), so apart from the planted changes everything
    is the data's own variation. Cells outside
    ``cells`` keep their counts and get the group ``"other"``.

    A one-sided programme (``up_share`` near 1) thins B's counts of many genes, so B's
    libraries shrink and every unchanged gene's share of B's counts grows, as when a
    stimulation switches genes on in A: ``uns["truth"]["composition_shift_log2"]`` is the
    log2 ratio of A's to B's mean share of the unchanged genes' counts.

    Parameters
    ----------
    adata
        Real counts (integers in ``.X``).
    cells
        Integer indices of the cells to split.
    de_fraction, lfc_range
        Fraction of the eligible genes made DE, and the magnitude range of their log2 fold
        changes (A over B).
    min_mean
        Only genes with at least this mean count in ``cells`` are made DE.
    up_share
        Probability that a DE gene goes up in A (0.5: balanced).
    seed
        Random seed.

    Returns
    -------
    anndata.AnnData
        A copy with thinned counts, ``obs["group"]`` and ``uns["truth"]``; other
        ``obs`` columns are kept.

    Examples
    --------
    >>> from pyro_scvi.datasets import pbmc8k_200hvg
    >>> pbmc = pbmc8k_200hvg()
    >>> b_cells = np.flatnonzero(pbmc.obs["cell_type"] == "B-cells")
    >>> planted = plant_fold_changes(pbmc, cells=b_cells, seed=0)
    >>> int(planted.uns["truth"]["is_de"].sum()), int((planted.obs["group"] == "other").sum())
    (20, 6281)
    """
    rng = np.random.default_rng(seed)
    cells = np.asarray(cells)
    counts = sp.csr_matrix(adata.X, dtype=np.int64).toarray()
    if not np.array_equal(counts, adata.X.toarray() if sp.issparse(adata.X) else adata.X):
        raise ValueError("adata.X must hold integer counts.")
    eligible = np.flatnonzero(counts[cells].mean(0) >= min_mean)
    genes = rng.choice(eligible, int(round(de_fraction * len(eligible))), replace=False)
    lfc = np.zeros(adata.n_vars)
    lfc[genes] = _de_factors(rng, genes, lfc_range, up_share)
    half = rng.permutation(len(cells)) < len(cells) // 2
    a_cells, b_cells = cells[half], cells[~half]
    for g in genes:
        down = b_cells if lfc[g] > 0 else a_cells
        counts[down, g] = rng.binomial(counts[down, g], 2.0 ** -abs(lfc[g]))
    group = np.full(adata.n_obs, "other", dtype=object)
    group[a_cells], group[b_cells] = "A", "B"
    out = anndata.AnnData(
        sp.csr_matrix(counts.astype(np.int32)),
        obs=adata.obs.copy(),
        var=pd.DataFrame(index=adata.var_names.copy()),
    )
    out.obs["group"] = pd.Categorical(group, categories=["A", "B", "other"])
    share = counts[:, lfc == 0].sum(1) / np.maximum(counts.sum(1), 1)
    shift = float(np.log2(share[a_cells].mean() / share[b_cells].mean()))
    out.uns["truth"] = {
        "log2_fold_change": lfc,
        "is_de": lfc != 0,
        "composition_shift_log2": shift,
        "design": "binomial_thinning",
    }
    return out
