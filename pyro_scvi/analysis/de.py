"""Differential expression between groups of cells, with Bayes factors.

Two tests compare the expression of two groups of cells, gene by gene:

``mode="change"`` (the default)
    A test on the log fold change (LFC) between the groups' *mean* expression with a
    threshold ``delta``: a gene is DE when ``|LFC| >= delta`` (log2 units). A cell's
    expression is its expected share of the counts, ``E[x] / library``: the decoder's
    ``rho`` times ``1 - gate`` under zero inflation, since a ZINB decoder puts part of a
    real change into its gate (on a Splatter-style simulation, whose dropout rises as a
    gene's mean falls, the decoded ``rho`` alone missed half the changes and got some
    backwards). A posterior sample of a group's mean is ``c * sum_i w_i rho_i``:

    * a Bayesian bootstrap of the group's cells (Dirichlet(1, ..., 1) weights ``w``), one
      posterior draw of ``rho`` per cell: the uncertainty about each cell and the
      sampling of cells;
    * times the decoder's correction factor ``c`` from the group's own counts: with the
      summed counts ``X``, the likelihood's expected sum ``E`` and its variance ``V``
      (scaled by the residuals' own spread, ``_dispersion``), ``c`` has the
      posterior ``Gamma(1/2 + k X, 1/2 + k E)``, ``k = E / V`` (``_count_correction``).

    The decoder is a point estimate that smooths across genes: a gene that moves in a
    group without moving the latent space is decoded with too small a change, and its
    estimate of a group's mean is off by at least the counts' sampling noise. ``c``
    answers both from the data: it is ``X / E`` to within that noise, and its spread is
    that noise. For a group that barely expresses a gene, few counts where many were
    expected bound ``c`` firmly from above, so a gene switched off in one group is among
    the surest DE genes; a symmetric noise term on the log of a mean near zero made it
    among the least sure.

    With ``batch_correction`` each group's mean is found batch by batch in the cells'
    own batches and averaged with weights common to all groups (each batch's share of
    the compared cells): groups are compared within the batches they share, so a batch
    effect cancels whether the decoder models it or not. Decoding a cell in a batch it
    was not measured in is used only where a group has fewer than 10 cells in a batch:
    when groups and batches are confounded, ``z`` still carries some of the batch.

    Shares move together: when a programme switches many genes on in one group (a
    stimulation, a cell cycle), every other gene's share of that group's counts falls,
    and a ratio of shares calls them all down. With ``composition_correction`` (the
    default) each posterior sample's LFCs are measured against the genes that do not
    change: the median LFC of the expressed genes near the centre of the LFC
    distribution (:func:`composition_factor`), half of it taken from each group's mean
    before the logs, so the LFC, its interval, ``proba_de`` and the posterior FDR all
    follow, and swapping the groups flips the signs. The factor per comparison is in
    ``DataFrame.attrs["composition"]``. It assumes that most expressed genes do not
    change between the groups: where fewer than half of them lie near the centre (two
    unrelated cell types on a few hundred highly variable genes), the factor is not
    applied (``"applied": False`` there). Where the assumption is wrong in a way the
    data cannot show (a global rise in transcription that should count as DE), pass
    ``composition_correction=False`` for ratios of shares, the tables of earlier
    versions. On the composition benchmarks of ``benchmarks/de_truth.py`` (5-20 % of
    the genes up 2-8 fold in one group, a programme among the high expressers, a
    balanced one, a one-sided programme thinned into real counts), ratios of shares gave
    the unchanged genes a median LFC of -0.16 to -0.90 and empirical FDRs of 13-91 % at
    a 5 % target; measured against the unchanged genes, the median was within 0.006 of 0
    and the FDR 3-7 %, at the same power.

    The LFC samples give ``lfc_mean``, ``lfc_std`` and the credible interval;
    ``proba_de = P(|LFC| >= delta)`` comes from those estimates under a prior on the LFCs
    fitted to all the genes (:func:`shrinkage_proba_de`), which knows that most genes are
    not DE. The Bayes factor is ``log proba_de - log(1 - proba_de)``.
``mode="vanilla"``
    The test of Lopez et al. (2018). Draw a random cell of each group and one posterior
    sample of ``z`` for each, decode ``rho``, and repeat ``n_samples`` times. Then
    ``p = P(rho1 > rho2)`` and the Bayes factor is ``log p - log(1 - p)`` (signed:
    positive when group 1 is higher); ``proba_de = max(p, 1 - p)``. ``p`` is the
    probability that a random cell of one group out-expresses a random cell of the other
    (an effect size, like the AUC of a rank-sum test), not the probability that the
    groups' means differ: it does not approach 1 with more cells, only with less overlap.
    Between two similar cell types (CD4+ and CD8+ T-cells of pbmc8k) whose cells overlap
    on every gene, ``p`` stays below about 0.9, so the FDR rule below calls nothing,
    however many cells there are; the decoder's small but consistent shifts, on the other
    hand, can push ``p`` towards 1 for genes that do not change. Vanilla mode therefore
    makes no calls: ``is_de_fdr`` is ``False`` and ``posterior_fdr`` is NaN for every
    gene (its calls had empirical FDRs of 17-25 % on ``benchmarks/de_truth.py``, and no
    rule on an effect size controls an FDR). Its ``proba_de`` and signed Bayes factors
    rank genes by how well they separate single cells; use change mode for calls.

Why change mode's calls are calibrated: every source of error in a group's mean is in its
posterior (cells, the latent posterior, the decoder's error measured against the counts,
with a variance checked against the residuals), the prior on LFCs is fitted to all the
genes, and only the comparison within shared batches enters. On simulations from outside
the model (``benchmarks/de_truth.py``: Splatter-style, multi-sample Poisson-lognormal,
fold changes planted in real counts by binomial thinning, with and without confounded
batches, and the composition designs above) the empirical FDR of the calls at a 5 %
target was 3-10 %, with power 0.79-1.0 (scvi-tools 1.4.2 on the same data: FDR 0-90 %,
power 0.01-0.86), and two random halves of one group called nothing. Where cells come
from a few replicates (samples, donors), pass ``sample_key``: taking the cells as
independent, differences between replicates pass for differences between groups (FDR
9-10 % on the Poisson-lognormal designs with 3 replicates per group, most false calls on
genes whose replicates differ between the groups by chance; 1-7 % with it). No
correction on the cells can remove that: use ``sample_key`` whenever each group's cells
come from samples of its own.

Change mode calls genes DE by controlling the posterior expected false discovery rate:
sort genes by ``proba_de`` and take the longest list whose mean ``1 - proba_de``
(``posterior_fdr``) is at most ``fdr_target``.

Probabilities rest on ``S = n_samples`` Monte-Carlo samples and on the ``n`` cells of the
smaller group, and are kept within ``[1/2, m + 1/2] / (m + 1)`` with ``m = min(S, n)``
(vanilla: ``(k + 1/2) / (S + 1)`` for ``k`` hits), so a Bayes factor is never infinite
and a group of one cell makes no gene more than 75 % likely DE: the bootstrap of one cell
has nothing to resample, and ``n`` cells leave about ``1 / (2 (n + 1))`` of their
population unseen. Groups under 10 cells get a warning (and no calls at a 5 % target).

LFCs are ``log2(a + eps) - log2(b + eps)`` with a pseudocount ``eps`` that defaults to
0.1 counts per cell at the median library size (0.01 with ``spread_uncertainty``: see
:data:`SPARSE_PSEUDOCOUNT`), so genes that neither group expresses get
LFCs near 0 rather than ratios of two tiny numbers.

Memory does not grow with the number of cells: cells are decoded ``batch_size`` at a time
and reduced at once; what is kept is ``n_samples x genes`` values per group. The raw
counts behind ``raw_mean*`` and ``non_zeros_proportion*`` are read
:data:`RAW_CHUNK_ENTRIES` entries at a time.

References
----------
Lopez et al. (2018). Deep generative modeling for single-cell transcriptomics. Nat.
Methods 15:1053-1058.
Stephens (2017). False discovery rates: a new deal. Biostatistics 18:275-294.
Rubin (1981). The Bayesian bootstrap. Ann. Stat. 9:130-134.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
import pyro
import torch
from anndata import AnnData
from pyro import poutine

from .._lazy import LazyModule
from ..data.counts import CountData
from ..errors import InputError
from ..model.nn import eval_mode
from ..posterior import queries as posterior

# imported on first use: half a second that every `pyro-scvi fit` paid for nothing
stats = LazyModule("scipy.stats")

if TYPE_CHECKING:
    from ..posterior.fitted import Fitted

#: Name of the second group in one-vs-rest comparisons.
REST = "rest"
#: Posterior draws of ``rho`` per cell in change mode. Bootstrap sample ``s`` of a group
#: mean uses draw ``s % DRAWS_PER_CELL`` of every cell, so the decoding cost is fixed per
#: cell however many samples are asked for. The count noise dominates the spread of a
#: group mean: on simulated data 2, 5 and 20 draws gave the same calls and widths.
DRAWS_PER_CELL = 5
#: Columns of the result, in order.
COLUMNS = (
    "proba_de",
    "proba_not_de",
    "bayes_factor",
    "lfc_mean",
    "lfc_median",
    "lfc_std",
    "lfc_lower",
    "lfc_upper",
    "posterior_fdr",
    "is_de_fdr",
    "scale1",
    "scale2",
    "raw_mean1",
    "raw_mean2",
    "non_zeros_proportion1",
    "non_zeros_proportion2",
    "comparison",
    "group1",
    "group2",
    "n_cells1",
    "n_cells2",
)
#: Default pseudocount of the LFCs, in counts per cell at the median library size (see
#: ``differential_expression``'s ``pseudocount``); :data:`SPARSE_PSEUDOCOUNT` with
#: ``spread_uncertainty``.
PSEUDOCOUNT = 0.1
#: With ``spread_uncertainty`` the posterior of a sparse gene is wide enough to stand on its
#: own, and a pseudocount 10 times smaller keeps its fold change: 0.1 counts per cell is
#: 2.4-2.9 times the share of a gene detected in 1-5 % of the cells (de_truth's Splatter
#: designs) and shrank such genes' LFCs to 0.3-0.5 of the truth. Chosen on de_truth's
#: 1000 x 600 designs among 0.1 to 0.001 (benchmarks/README.md, issue 28).
SPARSE_PSEUDOCOUNT = 0.01
#: Groups smaller than this get a warning: their results speak for a handful of cells.
SMALL_GROUP = 10
#: Count-matrix entries (cells x genes) read at a time for the raw columns (``raw_mean*``,
#: ``non_zeros_proportion*``): ``2**23``, 32 MiB of dense float32, whatever the size of a
#: group, so the counts of streamed data are never all in memory. Read at call time.
RAW_CHUNK_ENTRIES = 2**23


def differential_expression(
    model: Fitted,
    adata: AnnData | None = None,
    *,
    groupby: str,
    group1: str | Sequence[str] | None = None,
    group2: str | None = None,
    mode: Literal["vanilla", "change"] = "change",
    delta: float = 0.25,
    fdr_target: float = 0.05,
    batch_correction: bool = True,
    composition_correction: bool = True,
    spread_uncertainty: bool = False,
    n_samples: int = 1000,
    pseudocount: float | None = None,
    credible_level: float = 0.95,
    batch_size: int = 256,
    seed: int | None = 0,
    key_added: str | None = None,
    sample_key: str | None = None,
) -> pd.DataFrame:
    """Differential expression between groups of cells, gene by gene.

    See the module docstring for the two tests, the FDR control and batch correction.

    Parameters
    ----------
    model
        A trained :class:`~pyro_scvi.SCVI`, or any :class:`~pyro_scvi.posterior.fitted.Fitted`.
    adata
        Cells to compare (default: the model's AnnData); needs the model's genes.
    groupby
        Column of ``adata.obs`` holding each cell's group; cells with a missing value take
        part in no comparison.
    group1
        Group (or groups, each compared in turn) to test; ``None`` compares every group.
    group2
        Reference group; ``None`` compares against all other cells (one-vs-rest).
    mode
        ``"change"`` (LFC with threshold ``delta``) or ``"vanilla"`` (the paper's test).
    delta
        LFC threshold (log2 units, positive) of change mode.
    fdr_target
        Posterior expected false discovery rate that ``is_de_fdr`` controls, in (0, 1)
        (change mode; vanilla mode makes no calls).
    batch_correction
        Average ``rho`` over all batches (``True``) or decode each cell in its own batch.
    composition_correction
        Change mode: measure each LFC against the genes that do not change (``True``,
        see :func:`~pyro_scvi.analysis.de.composition_factor`) rather than as a ratio
        of shares of the counts (``False``). It assumes that most expressed genes do not
        change between the groups (where fewer than half of them lie near the centre,
        the factor is not applied, and ``attrs["composition"]`` says so); turn it off
        where the assumption is wrong in a way the data cannot show (a global shift in
        transcription that should count as DE). Vanilla mode compares the decoded
        shares of single cells and ignores it.
    spread_uncertainty
        Change mode: draw the spread of each group's counts around the decoder from its posterior,
        whose degrees of freedom are the cells that detect the gene (``True``), rather than plug in
        its estimate (``False``, the default). It widens the LFC posterior of genes that few cells
        detect, where the estimate rests on a handful of counts, leaves genes detected in hundreds
        of cells as they were, and lowers the default pseudocount tenfold
        (:data:`~pyro_scvi.analysis.de.SPARSE_PSEUDOCOUNT`), so that genes detected in 1-5 % of the
        cells keep their fold changes. It assumes each detecting cell adds one degree of freedom to
        the estimate. Off by default, by this rule: it becomes the default only if, on every
        benchmark of ``benchmarks/de_truth.py`` (1,000 x 600 and 2,000 x 1,000 cells x genes,
        3 seeds) and with ``sample_key`` where cells come from replicates, it keeps the FDR at
        or under 0.10 wherever the default does, loses no more than 0.01 of power and no more
        than 0.005 of AUROC in any expression stratum. It keeps the FDR (0.070 against 0.071
        with ``sample_key`` on the confounded Poisson-lognormal design) and ranks genes
        detected in 1-5 % of the cells about as well as a Wilcoxon test at 2,000 cells, but
        with 340-500 cells per group it calls fewer true genes (power 0.789 to 0.733 on the
        confounded Splatter design; with ``sample_key`` 0.639 to 0.606 and 0.767 to 0.744 on
        the Poisson-lognormal ones): neither always on nor on with ``sample_key`` passes.
        Fitted for the default training length instead of 50 epochs, it also lifts the FDR
        above 0.10 on the Splatter design (0.104, against 0.087 without) and, without
        ``sample_key``, on the confounded Poisson-lognormal one (0.131, against 0.113).
        Turn it on where genes that few cells detect matter, and pass ``sample_key`` where
        cells come from replicates: without it, chance differences between a few replicates
        get through more often (FDR 0.147 instead of 0.099 on the confounded
        Poisson-lognormal design).
    n_samples
        Posterior samples per group: random cells (vanilla) or bootstrap group means
        (change). Probabilities stay ``1 / (2 n_samples + 2)`` or more away from 0 and 1.
    pseudocount
        ``eps`` added to normalized expression before taking logs; default 0.1 (0.01 with
        ``spread_uncertainty``) divided by
        the median library size of ``adata``.
    credible_level
        Mass of the central LFC credible interval ``[lfc_lower, lfc_upper]``.
    batch_size
        Cells decoded per pass; memory grows as ``batch_size x 5 x genes`` per pass.
    seed
        Seed of every random choice (cells, posterior draws, bootstrap weights): the same
        seed gives the same table. The global random state is left as it was.
    key_added
        If given, also store the results in ``adata.uns[key_added]`` (``adata``, or the
        model's AnnData when ``adata`` is ``None``) in the layout of scanpy's
        ``rank_genes_groups`` (:func:`~pyro_scvi.analysis.de.to_rank_genes_groups`: genes up
        in the group first).
        Nothing is written to any AnnData otherwise.
    sample_key
        Column of ``adata.obs`` naming each cell's replicate (donor, sample). Change mode
        then resamples replicates as well as cells, so that differences between
        replicates are not taken for differences between groups (pseudoreplication).
        Without it, the cells of a group are taken as one population.

    Returns
    -------
    pandas.DataFrame
        One row per gene and comparison, indexed by gene, sorted within each comparison
        by ``proba_de`` (ties by ``|lfc_mean| / lfc_std``), most significant first. Columns:

        - ``proba_de``, ``proba_not_de``, ``bayes_factor`` (natural log; signed in vanilla
          mode, ``log proba_de - log proba_not_de`` in change mode);
        - ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_lower``, ``lfc_upper``: the
          posterior of the log2 fold change of group 1 over group 2 (in vanilla mode, of
          random cell pairs);
        - ``posterior_fdr`` (expected FDR of the list down to this gene) and ``is_de_fdr``
          (change mode; NaN and ``False`` in vanilla mode, which makes no calls);
        - ``scale1``, ``scale2``: each group's mean expression, the expected share of a
          cell's counts (change mode: corrected by the group's counts; vanilla mode: the
          decoder's ``rho``);
        - ``raw_mean1``, ``raw_mean2``, ``non_zeros_proportion1``,
          ``non_zeros_proportion2``: mean raw count and fraction of cells with a non-zero
          count in each group;
        - ``comparison`` (``"A vs B"``), ``group1``, ``group2`` (``"rest"`` for
          one-vs-rest), ``n_cells1``, ``n_cells2``: the groups' numbers of cells.

        ``DataFrame.attrs["params"]`` holds the parameters; ``attrs["composition"]``,
        per comparison, the log2 factor the LFCs were measured against (whether it was
        ``applied``, its posterior mean and sd, and the number of reference genes;
        empty without ``composition_correction``).

    Raises
    ------
    InputError
        For an unknown ``groupby`` column or group, a group compared with itself, a group
        with no cells, and out-of-range arguments.

    Warns
    -----
    UserWarning
        When a compared group has fewer than 10 cells (it names them, with their sizes).

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=120, n_genes=12, n_clusters=2)
    >>> model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    >>> de = differential_expression(model, groupby="cell_type", group1="type0", n_samples=50)
    >>> de.shape, de["comparison"].iloc[0]
    ((12, 21), 'type0 vs rest')
    >>> bool(((de["proba_de"] > 0) & (de["proba_de"] < 1)).all())
    True
    """
    _check_arguments(mode, delta, fdr_target, n_samples, credible_level, batch_size, pseudocount)
    target = adata if adata is not None else model.adata
    data = model.data_for(adata)
    labels, present = _labels(target, groupby)
    tested, reference = _resolve_groups(labels, present, groupby, group1, group2)
    # Sample the groups in one fixed order whatever the comparison, so that swapping
    # group1 and group2 under one seed reuses exactly the same draws.
    needed = present if reference is None else [g for g in present if g in {*tested, reference}]
    cells = {g: np.flatnonzero(labels == g) for g in needed}
    codes = list(range(data.n_batch)) if batch_correction else None
    if pseudocount is None:
        library = data.total_counts()  # streamed counts have no X in memory
        sparse = spread_uncertainty and mode == "change"
        per_cell = SPARSE_PSEUDOCOUNT if sparse else PSEUDOCOUNT
        pseudocount = per_cell / max(float(np.median(library)), 1.0)
    rng = np.random.default_rng(seed)
    samples = _sample_codes(target, sample_key, mode)
    with posterior.seeded(seed, model.device):
        if mode == "change":
            draws = _bootstrap_means(
                model, data, cells, n_samples, codes, batch_size, rng, samples, spread_uncertainty
            )
        else:
            draws = _cell_pools(model, data, cells, n_samples, codes, batch_size, rng)
    raw = _raw_statistics(data, cells)

    _warn_small_groups(cells, tested, reference, groupby)

    frames, composition = [], {}
    for g in tested:
        others = [h for h in needed if h != g] if reference is None else [reference]
        weights = np.array([len(cells[h]) for h in others], dtype=float)
        weights /= weights.sum()
        n_other = sum(raw[h][0] for h in others)
        # no more certainty than the smaller group's cells resolve (see _floor)
        floor = _floor(n_samples, min(len(cells[g]), n_other))
        name = f"{g} vs {REST if reference is None else reference}"
        if mode == "change":
            # The rest's mean is the cell-weighted mixture of the other groups' means.
            b = sum(w * draws[h] for w, h in zip(weights, others, strict=True))
            a = draws[g]
            if composition_correction:
                factor, reference_genes, applied = composition_factor(a, b, pseudocount, delta)
                composition[name] = {
                    "applied": applied,
                    "log2_factor": float(factor.mean()),
                    "log2_factor_sd": float(factor.std()),
                    "n_reference_genes": int(reference_genes.sum()),
                }
                # half of the factor on each side, so swapping the groups flips the signs
                a = a * 2.0 ** (-factor[:, None] / 2)
                b_lfc = b * 2.0 ** (factor[:, None] / 2)
            else:
                b_lfc = b
            columns = _change_columns(a, b_lfc, delta, pseudocount, credible_level, floor)
        else:
            b = _mixture_pool(draws, others, weights, n_samples, rng)
            columns = _vanilla_columns(draws[g], b, pseudocount, credible_level, floor)
        columns.update(
            scale1=draws[g].mean(0),  # shares of the counts, before composition_correction
            scale2=b.mean(0),
            raw_mean1=raw[g][1] / raw[g][0],
            raw_mean2=sum(raw[h][1] for h in others) / n_other,
            non_zeros_proportion1=raw[g][2] / raw[g][0],
            non_zeros_proportion2=sum(raw[h][2] for h in others) / n_other,
        )
        columns.update(n_cells1=len(cells[g]), n_cells2=n_other)
        frames.append(_finish(columns, data.var_names, g, reference, fdr_target, mode))
    result = pd.concat(frames)
    result.attrs["params"] = {
        "groupby": groupby,
        "reference": REST if reference is None else reference,
        "mode": mode,
        "delta": float(delta),
        "fdr_target": float(fdr_target),
        "batch_correction": bool(batch_correction),
        "composition_correction": bool(composition_correction and mode == "change"),
        "spread_uncertainty": bool(spread_uncertainty and mode == "change"),
        "n_samples": int(n_samples),
        "pseudocount": float(pseudocount),
        "credible_level": float(credible_level),
        "seed": "None" if seed is None else int(seed),
        "sample_key": "None" if sample_key is None else sample_key,
        "layer": "None" if model.layer is None else model.layer,
        "calls": "is_de_fdr" if mode == "change" else "none (vanilla mode makes no calls)",
    }
    # per comparison: the log2 factor the LFCs were measured against (composition_factor)
    result.attrs["composition"] = composition
    if key_added is not None:
        target.uns[key_added] = to_rank_genes_groups(result, data.var_names)
    return result


# ---------------------------------------------------------------------- arguments, groups
def _check_arguments(mode, delta, fdr_target, n_samples, credible_level, batch_size, eps):
    if mode not in ("vanilla", "change"):
        raise InputError(f"mode={mode!r}; use 'vanilla' (the paper's test) or 'change'.")
    if not (math.isfinite(delta) and delta > 0):
        raise InputError(f"delta={delta}; the LFC threshold must be a positive number.")
    if not 0 < fdr_target < 1:
        raise InputError(f"fdr_target={fdr_target}; it must be in (0, 1), e.g. 0.05.")
    if int(n_samples) != n_samples or n_samples < 2:
        raise InputError(f"n_samples={n_samples}; use an integer of at least 2 (e.g. 1000).")
    if not 0 < credible_level < 1:
        raise InputError(f"credible_level={credible_level}; it must be in (0, 1).")
    if int(batch_size) != batch_size or batch_size < 1:
        raise InputError(f"batch_size={batch_size}; it must be a positive integer.")
    if eps is not None and not (math.isfinite(eps) and eps >= 0):
        raise InputError(f"pseudocount={eps}; it must be a finite number >= 0.")


def _sample_codes(adata: AnnData, sample_key: str | None, mode: str) -> np.ndarray | None:
    """Each cell's replicate as an integer code, or ``None``."""
    if sample_key is None:
        return None
    if mode != "change":
        raise InputError("sample_key applies to mode='change'; vanilla mode compares cells.")
    if not isinstance(sample_key, str) or sample_key not in adata.obs:
        raise InputError(
            f"sample_key={sample_key!r} is not a column of adata.obs; pass the column that "
            "names each cell's replicate (donor, sample), or None."
        )
    return pd.factorize(adata.obs[sample_key].astype(str))[0]


def _labels(adata: AnnData, groupby: str) -> tuple[np.ndarray, list[str]]:
    """Each cell's group as a string (``None`` where missing) and the groups with cells."""
    if not isinstance(groupby, str) or groupby not in adata.obs:
        known = ", ".join(map(repr, adata.obs.columns[:10])) or "none"
        raise InputError(
            f"groupby={groupby!r} is not a column of adata.obs (columns include: {known}); "
            "pass the column that holds each cell's group, e.g. groupby='cell_type'."
        )
    column = adata.obs[groupby]
    missing = column.isna().to_numpy()
    labels = np.where(missing, None, column.astype(str).to_numpy(dtype=object))
    if isinstance(column.dtype, pd.CategoricalDtype):
        order = [str(c) for c in column.cat.categories]
    else:
        order = sorted({str(v) for v in labels[~missing]})
    present = [g for g in order if (labels == g).any()]
    return labels, present


def _resolve_groups(
    labels: np.ndarray,
    present: list[str],
    groupby: str,
    group1: str | Sequence[str] | None,
    group2: str | None,
) -> tuple[list[str], str | None]:
    def check(name) -> str:
        if str(name) not in present:
            shown = ", ".join(map(repr, present[:20])) + (" ..." if len(present) > 20 else "")
            raise InputError(
                f"{name!r} is not a group of adata.obs[{groupby!r}] with cells "
                f"(groups: {shown or 'none'})."
            )
        return str(name)

    reference = None if group2 is None else check(group2)
    if group1 is None:
        tested = [g for g in present if g != reference]
    else:
        names = [group1] if isinstance(group1, str | int) else list(group1)
        tested = list(dict.fromkeys(check(g) for g in names))
    if not tested:
        raise InputError("No group to test: pass group1, or a groupby column with 2+ groups.")
    if reference is not None and reference in tested:
        raise InputError(f"group1 and group2 are both {reference!r}; compare different groups.")
    if reference is None and len(present) < 2:
        raise InputError(
            f"adata.obs[{groupby!r}] has only the group {present[0]!r}: one-vs-rest needs "
            "cells in at least two groups."
        )
    return tested, reference


# ---------------------------------------------------------------------- sampling
def _bootstrap_means(
    model: Fitted,
    data: CountData,
    cells: dict[str, np.ndarray],
    n_samples: int,
    codes: list[int] | None,
    batch_size: int,
    rng: np.random.Generator,
    samples: np.ndarray | None = None,
    spread_uncertainty: bool = False,
) -> dict[str, np.ndarray]:
    """``n_samples`` posterior samples of each group's mean expression, ``(n_samples, genes)``.

    Within a batch, sample ``s`` of a group's mean is ``c * sum_i w_i rho_i``: a Bayesian
    bootstrap of the group's cells there (Dirichlet(1, ..., 1) weights ``w``, each cell
    contributing one posterior draw of its expected share ``rho`` in its own batch) times
    a correction factor ``c`` of the decoder from those cells' observed counts (see
    ``_count_correction``). Without batch correction (``codes`` is ``None``) all the
    group's cells form one such stratum.

    With batch correction the group's mean is the average of its batches' means with
    weights shared by every group, each batch's share of all the compared cells (direct
    standardization). Each group is then compared with the others within the batches
    they share: a batch effect, whether or not the decoder models it, moves every group
    in a batch alike and cancels, where a group's own mix of batches, or the decoder's
    counterfactual decoding of a cell in a batch it was not measured in (its ``z`` may
    still carry the batch when groups and batches are confounded), would carry it into
    the comparison. A group with fewer than ``SMALL_GROUP`` cells in a batch is decoded
    there counterfactually, all its cells under that batch, with the correction factor
    of all its cells.

    With ``samples`` (each cell's replicate, as integer codes) the bootstrap is
    hierarchical: within a batch, each replicate's mean (its cells' bootstrap and its own
    correction factor) gets a Dirichlet weight over the ``n`` replicates, so that the
    replicate-to-replicate variation enters the posterior, as in a pseudobulk test. The
    Dirichlet's concentration ``(n - 2) / n`` (at least ``1 / (2 n)``) makes the variance
    of the weighted mean the unbiased ``s**2 / n``: with a handful of replicates, the
    plain Bayesian bootstrap's ``(n - 1) / (n + 1)`` of it is far too sure.
    """
    strata = [None] if codes is None else list(codes)
    if codes is None:
        standard = np.ones(1)
    else:
        everyone = data.batch_index[np.concatenate(list(cells.values()))]
        standard = np.bincount(everyone, minlength=data.n_batch)[codes] / len(everyone)
    n_draws = min(n_samples, DRAWS_PER_CELL)
    out = {}
    # Reduce in torch, where the draws are: it keeps them on the model's device and
    # follows torch's thread setting (small multi-threaded BLAS calls from numpy stalled
    # for 100x their cost on busy machines).
    zeros = {"dtype": torch.float64, "device": model.device}
    # one draw of a Bayesian decoder's globals per draw index, shared by every group
    with posterior.shared_globals(model.guide, n_draws):
        for name, idx in cells.items():
            own = np.zeros(len(idx), dtype=int) if codes is None else data.batch_index[idx]
            sizes = np.bincount(own, minlength=max(data.n_batch, 1))
            # A batch with fewer than SMALL_GROUP of the group's cells is decoded
            # counterfactually; the batch with most of them never is.
            enough = min(SMALL_GROUP, sizes.max())
            unit = np.zeros(len(idx), dtype=int) if samples is None else samples[idx]
            pooled_counts = [0.0] * 4  # observed, expected, variance, detections: all cells
            total = np.zeros((n_samples, data.n_genes))
            missing = []
            for k, b in enumerate(strata):
                here = own == (b or 0)
                if sizes[b or 0] < enough:
                    missing.append(k)
                    continue
                numerator = np.zeros((n_samples, data.n_genes))
                denominator = np.zeros(n_samples)
                replicates = np.unique(unit[here])
                # Dirichlet(a, ..., a) weights over the replicates with a = (n - 2) / n give
                # their weighted mean the unbiased variance s**2 / n; Dirichlet(1, ...)
                # gives (n - 1) / (n + 1) of it, half for 3 replicates, and calls
                # differences between a few replicates significant.
                concentration = max(len(replicates) - 2, 0.5) / len(replicates)
                for u in replicates:
                    members = idx[here & (unit == u)]
                    mean_rho, sums = _unit_mean(
                        model, data, members, n_samples, n_draws, batch_size, rng, zeros
                    )
                    pooled_counts = [p + q for p, q in zip(pooled_counts, sums, strict=True)]
                    factor = _count_correction(*sums, n_samples, rng, spread_uncertainty)
                    # a replicate's weight: Dirichlet(a, ..., a) over the batch's replicates
                    weight = (
                        np.ones(n_samples)
                        if samples is None
                        else rng.gamma(concentration, size=n_samples)
                    )
                    numerator += weight[:, None] * factor * mean_rho
                    denominator += weight
                total += standard[k] * numerator / denominator[:, None]
            if missing:
                pooled = _count_correction(*pooled_counts, n_samples, rng, spread_uncertainty)
            for k in missing:  # counterfactual: all the group's cells decoded in batch k
                mean_rho = _unit_mean(
                    model, data, idx, n_samples, n_draws, batch_size, rng, zeros, strata[k]
                )[0]
                total += standard[k] * pooled * mean_rho
            out[name] = total
    return out


def _unit_mean(
    model: Fitted,
    data: CountData,
    idx: np.ndarray,
    n_samples: int,
    n_draws: int,
    batch_size: int,
    rng: np.random.Generator,
    zeros: dict,
    code: int | None = None,
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Bayesian bootstrap of the mean ``rho`` of the cells ``idx``, and their count sums.

    Returns the ``(n_samples, genes)`` bootstrap samples of the mean, decoded in batch
    ``code`` (``None``: the cells' own), and, summed over the cells in their own batch:
    the observed counts ``(genes,)``, the likelihood's expected counts and its variance
    scaled by ``_dispersion`` (each ``(draws, genes)``), and the cells with a non-zero
    count ``(genes,)``.
    """
    sums = torch.zeros((n_samples, data.n_genes), **zeros)
    totals = torch.zeros(n_samples, **zeros)
    expected = torch.zeros((n_draws, data.n_genes), **zeros)
    variance = torch.zeros((n_draws, data.n_genes), **zeros)
    observed = torch.zeros(data.n_genes, **zeros)
    squares = torch.zeros(data.n_genes, **zeros)
    detections = torch.zeros(data.n_genes, **zeros)
    for chunk in data.minibatches(idx, batch_size):
        rho, mean, var, x = _decode(model, data, chunk, n_draws, code)
        # Unnormalized Dirichlet(1, ..., 1) weights: the Bayesian bootstrap of the cells,
        # normalized over all of them below.
        w = torch.as_tensor(rng.standard_exponential((n_samples, len(chunk))), **zeros)
        for d in range(n_draws):
            # sample s takes draw s % n_draws of every cell
            sums[d::n_draws] += w[d::n_draws] @ rho[d]
        totals += w.sum(1)
        if code is None:
            expected += mean.sum(1)
            variance += var.sum(1)
            observed += x.sum(0)
            squares += (x - mean).square().mean(0).sum(0)
            detections += (x > 0).sum(0)
    mean_rho = (sums / totals[:, None]).cpu().numpy()
    variance = variance.cpu().numpy()
    variance = variance * _dispersion(squares.cpu().numpy(), variance.mean(0), len(idx))
    sums = (observed.cpu().numpy(), expected.cpu().numpy(), variance, detections.cpu().numpy())
    return mean_rho, sums


#: Weight, in cells, of the likelihood's variance against the residuals' own in
#: ``_dispersion``.
PRIOR_CELLS = 10.0


def _dispersion(squares: np.ndarray, variance: np.ndarray, n_cells: int) -> np.ndarray:
    """Ratio of the counts' spread around the decoder to the likelihood's variance.

    ``squares`` is ``sum_i (x_i - E[x_i])**2`` over a group's cells, ``variance`` the
    likelihood's ``sum_i Var[x_i]`` and ``n_cells`` the number of cells, per gene. The
    variance of a group's total around what the decoder expects is best told by the
    residuals themselves (a sandwich estimate): a likelihood whose dispersion is fitted
    to all cells, or that misses some biological variation, would otherwise make a
    group's mean look surer than its counts allow. The ratio is moderated towards 1 with
    the weight of ``PRIOR_CELLS`` cells, so that a few cells do not swing it, and a
    group whose counts fit better than the likelihood says gains from it too.
    """
    ratio = squares / np.maximum(variance, 1e-30)
    return (PRIOR_CELLS + ratio * n_cells) / (PRIOR_CELLS + n_cells)


#: Weight, in counts, of the decoder's own estimate of a group's expression against the
#: group's observed counts: the prior ``Gamma(PRIOR_COUNTS, PRIOR_COUNTS)`` of the
#: correction factor (mean 1). Half a count, as in Jeffreys' prior for a Poisson rate.
PRIOR_COUNTS = 0.5


def _count_correction(
    observed: np.ndarray,
    expected: np.ndarray,
    variance: np.ndarray,
    detections: np.ndarray,
    n_samples: int,
    rng: np.random.Generator,
    spread_uncertainty: bool = False,
) -> np.ndarray:
    """Posterior samples of the factor ``c`` between a group's true and decoded expression.

    The decoder is a point estimate that smooths over genes: a gene that moves in a group
    without moving the latent space much is decoded with too small a change. The group's
    counts say by how much: summed over the group's cells, ``observed`` counts against
    the likelihood's ``expected`` counts (in each cell's own batch) with model
    ``variance``. Taken as ``n = expected**2 / variance`` effective Poisson counts (a
    quasi-Poisson likelihood, so the negative binomial's extra variance counts), the
    observed total gives ``c`` a likelihood ``c**(k X) exp(-c k E)`` with ``k = E / V``,
    and with the prior ``Gamma(a, a)`` (``a = PRIOR_COUNTS``) the posterior is
    ``Gamma(a + k X, a + k E)``.

    Where the decoder agrees with the counts, ``c`` is about 1 with relative variance
    ``1 / n``: the counts' sampling noise, which the decoded means alone do not carry.
    Where a group barely expresses a gene, ``X`` is near 0 and the posterior puts ``c``
    firmly below a known bound (few counts seen in many expected) instead of making the
    group's mean maximally uncertain in log space, as a symmetric noise term does.

    ``V`` is scaled by the residuals' spread (``_dispersion``), which for a gene that few
    cells detect rests on those few cells: sums of squares of rare, heavy-tailed counts
    fall short of their expectation more often than not, and a plug-in ``V`` made the
    posteriors of such genes too narrow (on Splatter-style counts, the LFC z-scores of
    unchanged genes detected in under 5 % of the cells had a spread of 1.1-1.4 instead of
    1). With ``spread_uncertainty`` each sample draws ``V`` from a scaled inverse
    chi-square around it with as many degrees of freedom as the group's ``detections``
    (cells with a non-zero count), as a t-test does for an estimated variance: heavier
    tails where few cells detect the gene, nothing changed where hundreds do.

    ``expected`` and ``variance`` are ``(draws, genes)``, ``observed`` and ``detections``
    ``(genes,)``; sample ``s`` uses draw ``s % draws``. Returns ``(n_samples, genes)``.
    """
    n_draws = expected.shape[0]
    draw = np.arange(n_samples) % n_draws
    k = (expected / np.maximum(variance, 1e-30))[draw]
    if spread_uncertainty:
        df = np.maximum(detections, 1.0)
        k = k * rng.chisquare(df, size=k.shape) / df
    shape = PRIOR_COUNTS + k * observed
    rate = PRIOR_COUNTS + k * expected[draw]
    return rng.gamma(shape, 1.0 / rate)


def _decode(
    model: Fitted, data: CountData, idx: np.ndarray, n_draws: int, code: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Posterior draws of the expected share ``rho``, and of the likelihood's mean and variance.

    Decodes the cells ``idx`` in batch ``code`` (``None``: each cell's own batch) and
    returns ``rho``, the mean and variance of the likelihood of ``x`` (each ``(draws,
    cells, genes)``) and the observed counts ``x`` (``(cells, genes)``). ``rho`` is the
    expected share of the cell's library, ``E[x] / library``: the decoder's softmax
    output times ``1 - gate`` under zero inflation, since a ZINB decoder may put part of
    a real change into its gate.
    """
    with posterior.shared_globals(model.guide, n_draws) as shared:
        latent = posterior.sample_posterior(
            model.model,
            model.guide,
            data,
            idx,
            n_samples=n_draws,
            sites=("z", "l"),
            batch_size=len(idx),
            device=model.device,
        )
    x, own = data.tensors(idx, model.device)
    # the global sites (a BayesianDecoder's) at the draws the latents were sampled with
    conditioned = dict(shared)
    conditioned["z"] = torch.as_tensor(latent["z"], device=model.device).unsqueeze(-2)
    if "l" in latent:
        conditioned["l"] = torch.as_tensor(latent["l"], device=model.device).unsqueeze(-1)
    model_fn = poutine.condition(model.model, data=conditioned)
    batch = own if code is None else torch.full_like(own, code)
    with (
        torch.no_grad(),
        eval_mode(model.model, model.guide),
        pyro.get_param_store().scope(),
        pyro.plate("_de_draws", n_draws, dim=-3),
    ):
        trace = poutine.trace(model_fn).get_trace(x, batch)
    fn = trace.nodes["x"]["fn"]
    mean = fn.mean.expand(trace.nodes["rho"]["value"].shape)
    try:
        var = fn.variance.expand(mean.shape)
    except NotImplementedError:  # a likelihood without a variance: Poisson's
        var = mean
    # an observed library (ObservedLibrary) has no "l" site: its library is the observed total
    library = trace.nodes["l"]["value"] if "l" in trace.nodes else x.sum(-1, keepdim=True).log()
    rho = mean / library.exp().clamp_min(1e-30)
    return rho.double(), mean.double(), var.double(), x.double()


def _cell_pools(
    model: Fitted,
    data: CountData,
    cells: dict[str, np.ndarray],
    n_samples: int,
    codes: list[int] | None,
    batch_size: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """``rho`` of ``n_samples`` random cells of each group, one posterior draw each."""
    picks = [rng.choice(idx, size=n_samples, replace=True) for idx in cells.values()]
    rho = posterior.normalized_expression(
        model.model,
        model.guide,
        data,
        np.concatenate(picks),
        transform_batch=codes,
        n_samples=1,
        batch_size=batch_size,
        device=model.device,
    )[0]
    return {
        name: rho[i * n_samples : (i + 1) * n_samples].astype(np.float64)
        for i, name in enumerate(cells)
    }


def _mixture_pool(
    pools: dict[str, np.ndarray],
    names: list[str],
    weights: np.ndarray,
    n_samples: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Random cells of the union of ``names``: each from group j with its share of cells."""
    if len(names) == 1:
        return pools[names[0]]
    which = rng.choice(len(names), size=n_samples, p=weights)
    rows = rng.integers(0, n_samples, size=n_samples)
    out = np.empty((n_samples, pools[names[0]].shape[1]))
    for j, name in enumerate(names):
        mask = which == j
        out[mask] = pools[name][rows[mask]]
    return out


def _raw_statistics(data: CountData, cells: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Per group: number of cells, summed counts and cells with a non-zero count, per gene.

    Read :data:`RAW_CHUNK_ENTRIES` entries (whole cells) at a time through ``data.tensors``,
    so streamed counts (:class:`~pyro_scvi.data.StreamedCounts`) are never all in memory.
    """
    out = {}
    for name, idx in cells.items():
        sums = np.zeros(data.n_genes, dtype=np.float64)
        nnz = np.zeros(data.n_genes, dtype=np.float64)
        for chunk in data.minibatches(np.sort(idx), max(1, RAW_CHUNK_ENTRIES // data.n_genes)):
            rows = data.tensors(chunk)[0].numpy()
            sums += rows.sum(0, dtype=np.float64)
            nnz += (rows > 0).sum(0)
        out[name] = (len(idx), sums, nnz)
    return out


# ---------------------------------------------------------------------- statistics
def _smoothed(hits: np.ndarray, n: int) -> np.ndarray:
    # (k + 1/2) / (n + 1): inside (0, 1) at any Monte-Carlo sample size, so log odds stay
    # finite and no gene is called with certainty that n samples cannot resolve.
    return (hits + 0.5) / (n + 1)


def _floor(n_samples: int, n_cells: int) -> float:
    """Least ``proba_not_de`` (and ``proba_de``) that ``n_samples`` and ``n_cells`` resolve.

    ``1/2 / (n + 1)``, as :func:`_smoothed` gives for 0 hits in ``n`` tries, with ``n``
    the number of Monte-Carlo samples or of cells in the smaller group, whichever is
    fewer. ``n`` cells of a group say nothing about the share of its population that they
    did not sample, which under the Jeffreys-smoothed count is ``1/2 / (n + 1)`` at least:
    one cell cannot make a gene more than 75 % likely DE, and since the posterior FDR of a
    list is its mean ``proba_not_de``, no group of fewer than 10 cells can be called at a
    5 % target. The bootstrap of a group's cells cannot see this: with one cell it has
    nothing to resample.
    """
    return 0.5 / (min(n_samples, n_cells) + 1)


def _warn_small_groups(
    cells: dict[str, np.ndarray], tested: list[str], reference: str | None, groupby: str
) -> None:
    compared = tested if reference is None else [*tested, reference]
    small = [f"{g!r} ({len(cells[g])})" for g in compared if len(cells[g]) < SMALL_GROUP]
    if small:
        warnings.warn(
            f"Groups of adata.obs[{groupby!r}] with fewer than {SMALL_GROUP} cells: "
            f"{', '.join(small)}. Their results speak for those cells more than for the "
            "population, and proba_de stays below 1 - 1/(2 (n + 1)) for n cells, so they "
            "get no calls at a 5 % target; merge or drop them, or treat them as anecdotes.",
            UserWarning,
            stacklevel=3,
        )


def _lfc_columns(lfc: np.ndarray, credible_level: float) -> dict[str, np.ndarray]:
    tail = (1 - credible_level) / 2
    s = posterior.summarize(lfc, quantiles=(tail, 0.5, 1 - tail))
    return {
        "lfc_mean": s["mean"],
        "lfc_median": s[posterior.quantile_key(0.5)],
        "lfc_std": s["sd"],
        "lfc_lower": s[posterior.quantile_key(tail)],
        "lfc_upper": s[posterior.quantile_key(1 - tail)],
    }


def _change_columns(
    a: np.ndarray, b: np.ndarray, delta: float, eps: float, credible_level: float, floor: float
) -> dict[str, np.ndarray]:
    lfc = _lfc_columns(np.log2(a + eps) - np.log2(b + eps), credible_level)
    proba = shrinkage_proba_de(lfc["lfc_mean"], lfc["lfc_std"], delta)
    proba = np.clip(proba, floor, 1 - floor)
    return {
        "proba_de": proba,
        "proba_not_de": 1 - proba,
        "bayes_factor": np.log(proba) - np.log1p(-proba),
        **lfc,
    }


#: Least half-width (log2) of the window around the centre of the LFCs whose genes set
#: the composition factor (:func:`composition_factor`); ``delta``, or twice the median
#: posterior sd of the expressed genes' LFCs, when that is wider.
REFERENCE_WINDOW = 0.25
#: Least share of the expressed genes that must lie in that window for the composition
#: factor to be applied: "most genes do not change", as the correction assumes.
MIN_REFERENCE_SHARE = 0.5


def composition_factor(
    a: np.ndarray, b: np.ndarray, eps: float, delta: float = 0.25, *, max_iter: int = 50
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Per posterior sample, the log2 factor between two groups' shares of unchanged genes.

    ``a`` and ``b`` are posterior samples ``(n_samples, genes)`` of two groups' mean
    expression as shares of a cell's counts. When many genes go up in one group, the
    share of every other gene falls there, and the ratio of shares calls them down
    (likewise when many go down). Assuming that most expressed genes do not change, the
    centre of the genes' LFC distribution measures that shift, as the median of ratios
    does for bulk libraries (Anders and Huber, 2010):

    1. expressed genes: posterior mean share ``>= eps`` in both groups (all genes if
       none is);
    2. the median ``c`` of their posterior mean LFCs ``log2 a - log2 b``, then, until it
       settles, the median over the reference genes, those within a window of ``c``
       (half-width the largest of ``delta``, :data:`REFERENCE_WINDOW` and twice the
       median posterior sd of the expressed genes' LFCs): genes that move by more than
       the DE threshold leave the reference, so a one-sided programme does not drag the
       centre towards itself, and unchanged genes stay in it despite their noise;
    3. per posterior sample, the median LFC of the reference genes: the factor carries
       its own uncertainty into every gene's LFC.

    If fewer than :data:`MIN_REFERENCE_SHARE` of the expressed genes are reference genes,
    most genes change and no centre stands for the unchanged ones (two unrelated cell
    types on a few hundred highly variable genes): the factor is then 0 and ``applied``
    is ``False``.

    :func:`differential_expression` divides ``a`` by ``2**(factor / 2)`` and multiplies
    ``b`` by it before taking LFCs, so the LFC, its interval, ``proba_de`` and the
    posterior FDR are all measured against the reference genes.

    Parameters
    ----------
    a, b
        Posterior samples of the two groups' mean shares, ``(n_samples, genes)``.
    eps
        Least mean share of an expressed gene (the DE pseudocount).
    delta
        The DE threshold (log2), the least half-width of the window.
    max_iter
        Iterations of step 2 at most.

    Returns
    -------
    factor : numpy.ndarray
        ``(n_samples,)`` log2 factors, A's share of an unchanged gene over B's.
    reference : numpy.ndarray
        Boolean mask of the reference genes.
    applied : bool
        Whether the reference genes were enough (else ``factor`` is 0).

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> b = rng.gamma(5.0, 1.0, (200, 100)) / 500
    >>> a = b * np.r_[np.full(20, 8.0), np.ones(80)]  # 20 of 100 genes up 8-fold in A...
    >>> a /= a.sum(1, keepdims=True) / b.sum(1, keepdims=True)  # ...at equal library sizes
    >>> factor, reference, applied = composition_factor(a, b, eps=1e-4)
    >>> round(float(factor.mean()), 1), int(reference.sum()), applied  # log2(100/240)=-1.26
    (-1.3, 80, True)
    """
    lfc = np.log2(np.maximum(a, 1e-300)) - np.log2(np.maximum(b, 1e-300))
    expressed = np.minimum(a.mean(0), b.mean(0)) >= eps
    if not expressed.any():
        expressed = np.ones(lfc.shape[1], dtype=bool)
    mean = lfc.mean(0)
    spread = float(np.median(lfc[:, expressed].std(0)))
    window = max(delta, REFERENCE_WINDOW, 2 * spread)
    centre, reference = float(np.median(mean[expressed])), expressed
    for _ in range(max_iter):
        near = expressed & (np.abs(mean - centre) < window)
        if not near.any():
            break
        reference = near
        new = float(np.median(mean[reference]))
        if new == centre:
            break
        centre = new
    if reference.sum() < MIN_REFERENCE_SHARE * expressed.sum():
        return np.zeros(len(lfc)), reference, False
    return np.median(lfc[:, reference], axis=1), reference, True


def shrinkage_proba_de(
    lfc_mean: np.ndarray,
    lfc_std: np.ndarray,
    delta: float,
    *,
    null_weight: float = 10.0,
    max_iter: int = 1000,
) -> np.ndarray:
    """``P(|LFC| >= delta)`` per gene under a prior on LFCs fitted to all the genes.

    Empirical Bayes as in adaptive shrinkage (Stephens, 2017): each gene's estimate
    ``lfc_mean`` is taken as Normal around its true LFC with standard error ``lfc_std``,
    and the true LFCs share a prior ``pi_0 * delta_0 + sum_k pi_k * Normal(0, sigma_k**2)``
    over a grid of ``sigma_k``, whose weights are fitted by maximum likelihood (EM) with a
    Dirichlet(``null_weight``, 1, ..., 1) penalty that leans towards the null. Under a flat
    prior a null gene whose noisy estimate lands near ``delta`` gets a probability of DE
    near one half; when most genes are null, that overstates it, and FDR control on such
    probabilities calls too many. Here the fitted ``pi_0`` tells how many genes are null.

    Parameters
    ----------
    lfc_mean, lfc_std
        Estimates and their standard errors (log2), one per gene.
    delta
        The threshold.
    null_weight
        Dirichlet weight on the null component (ash's default 10 is conservative).
    max_iter
        EM iterations at most.

    Returns
    -------
    numpy.ndarray
        The posterior probability that ``|LFC| >= delta``, per gene.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> true = np.r_[np.zeros(450), rng.choice([-1.5, 1.5], 50)]
    >>> est = true + rng.normal(0, 0.1, 500)
    >>> p = shrinkage_proba_de(est, np.full(500, 0.1), 0.25)
    >>> flat = stats.norm.sf((0.25 - est) / 0.1) + stats.norm.cdf((-0.25 - est) / 0.1)
    >>> # summed probabilities of DE of the 450 null genes: flat prior, fitted prior
    >>> round(float(flat[:450].sum()), 1), round(float(p[:450].sum()), 1)
    (35.1, 3.8)
    >>> bool(p[450:].min() > 0.99)
    True
    """
    est = np.asarray(lfc_mean, dtype=float)
    se = np.maximum(np.asarray(lfc_std, dtype=float), 1e-8)
    # The grid spans the smallest standard error to twice the largest signal (ash's rule).
    lo = se.min() / 10
    hi = 2 * np.sqrt(max(float(np.max(est**2 - se**2)), lo**2))
    sigma = np.r_[0.0, lo * np.sqrt(2) ** np.arange(int(np.ceil(2 * np.log2(hi / lo))) + 1)]
    loglik = stats.norm.logpdf(est[:, None], 0, np.sqrt(sigma**2 + se[:, None] ** 2))
    loglik -= loglik.max(1, keepdims=True)
    lik = np.exp(loglik)
    penalty = np.ones(len(sigma))
    penalty[0] = null_weight
    pi = np.full(len(sigma), 1 / len(sigma))
    for _ in range(max_iter):
        resp = lik * pi
        resp /= resp.sum(1, keepdims=True)
        new = resp.sum(0) + penalty - 1
        new /= new.sum()
        done = np.abs(new - pi).max() < 1e-10
        pi = new
        if done:
            break
    resp = lik * pi
    resp /= resp.sum(1, keepdims=True)
    # Normal(0, sigma_k**2) prior x Normal likelihood: a Normal posterior per component;
    # the null component (sigma 0) puts all its mass at 0, inside the threshold.
    var = 1 / (1 / sigma[None, 1:] ** 2 + 1 / se[:, None] ** 2)
    loc = var * est[:, None] / se[:, None] ** 2
    sd = np.sqrt(var)
    beyond = stats.norm.sf((delta - loc) / sd) + stats.norm.cdf((-delta - loc) / sd)
    return (resp[:, 1:] * beyond).sum(1)


def _vanilla_columns(
    a: np.ndarray, b: np.ndarray, eps: float, credible_level: float, floor: float
) -> dict[str, np.ndarray]:
    p = np.clip(_smoothed((a > b).sum(0), len(a)), floor, 1 - floor)
    proba = np.maximum(p, 1 - p)
    return {
        "proba_de": proba,
        "proba_not_de": 1 - proba,
        "bayes_factor": np.log(p) - np.log1p(-p),
        **_lfc_columns(np.log2(a + eps) - np.log2(b + eps), credible_level),
    }


def _finish(
    columns: dict[str, np.ndarray],
    var_names: pd.Index,
    group1: str,
    group2: str | None,
    fdr_target: float,
    mode: str = "change",
) -> pd.DataFrame:
    frame = pd.DataFrame(columns, index=pd.Index(var_names, name=None))
    # Ties in proba_de (at its floor and ceiling) are broken by the evidence of a change,
    # |lfc_mean| / lfc_std: it orders the many genes at the floor, unlike |lfc_mean|,
    # which is largest for the noisiest, least expressed genes.
    evidence = np.abs(frame["lfc_mean"].to_numpy()) / np.maximum(frame["lfc_std"], 1e-12)
    order = np.lexsort((-evidence, -frame["proba_de"].to_numpy()))
    frame = frame.iloc[order]
    if mode == "change":
        frame["posterior_fdr"] = posterior_fdr(frame["proba_de"].to_numpy())
        frame["is_de_fdr"] = frame["posterior_fdr"] <= fdr_target
    else:
        # vanilla's proba_de is an effect size, not a probability of DE: no FDR, no calls
        frame["posterior_fdr"] = np.nan
        frame["is_de_fdr"] = False
    name2 = REST if group2 is None else group2
    frame["comparison"] = f"{group1} vs {name2}"
    frame["group1"], frame["group2"] = group1, name2
    return frame[list(COLUMNS)]


def posterior_fdr(proba_de: np.ndarray) -> np.ndarray:
    """Posterior expected FDR of the top-``i`` lists of genes sorted by ``proba_de``.

    Entry ``i`` is the mean ``1 - proba_de`` of the first ``i + 1`` genes: the expected
    fraction of false discoveries if they are all called DE. Genes must be sorted by
    ``proba_de``, highest first; the result then never decreases, so calling every gene
    whose value is at most the target calls the longest list that meets it.

    Examples
    --------
    >>> posterior_fdr(np.array([0.99, 0.97, 0.9, 0.5])).round(3).tolist()
    [0.01, 0.02, 0.047, 0.16]
    """
    proba_de = np.asarray(proba_de, dtype=float)
    return np.cumsum(1 - proba_de) / np.arange(1, len(proba_de) + 1)


# ---------------------------------------------------------------------- scanpy layout
def rank_score(results: pd.DataFrame) -> np.ndarray:
    """Signed scores that order genes as scanpy users read ``rank_genes_groups``.

    ``direction * (-log proba_not_de + |lfc_mean| / 1000)``: the direction of the change
    (the sign of ``lfc_mean`` in change mode, of the Bayes factor in vanilla mode) times
    the evidence, which is near 0 for genes unlikely to be DE and grows to
    ``log(2 n + 1)`` at the ceiling of ``proba_de``. The small effect-size term breaks the
    ties between genes at that ceiling, larger changes first. Sorted from high to low,
    genes up in the group come first, the genes that do not change in the middle and the
    genes down in the group last.

    Examples
    --------
    >>> r = pd.DataFrame({"proba_not_de": [0.001, 0.001, 0.6, 0.001],
    ...                   "lfc_mean": [1.0, 3.0, 0.1, -2.0],
    ...                   "bayes_factor": [6.9, 6.9, -0.4, 6.9]})
    >>> rank_score(r).round(3).tolist()
    [6.909, 6.911, 0.511, -6.91]
    """
    mode = results.attrs.get("params", {}).get("mode", "change")
    effect = results["lfc_mean"].to_numpy()
    direction = np.sign(results["bayes_factor"].to_numpy() if mode == "vanilla" else effect)
    evidence = -np.log(results["proba_not_de"].to_numpy())
    return np.where(direction == 0, 1.0, direction) * (evidence + np.abs(effect) / 1000)


def to_rank_genes_groups(results: pd.DataFrame, var_names: Sequence[str]) -> dict:
    """The results in the layout of scanpy's ``adata.uns["rank_genes_groups"]``.

    One field per tested group (``group1``) in record arrays, genes sorted by
    :func:`rank_score` from high to low, so that genes up in the group come first, as in
    scanpy's own tests: ``names``, ``scores`` (:func:`rank_score`), ``logfoldchanges``
    (``lfc_mean``, log2), ``pvals`` (``proba_not_de``) and ``pvals_adj``
    (``posterior_fdr``), with ``pts`` and ``pts_rest`` (fractions of cells expressing each
    gene) and ``params``. ``pvals`` and ``pvals_adj`` are posterior probabilities, not
    frequentist p-values, stored under those names so that scanpy's tools read them:
    ``sc.get.rank_genes_groups_df(adata, None, key=key, pval_cutoff=fdr_target)`` lists
    the genes with ``is_de_fdr``.

    Parameters
    ----------
    results
        Output of :func:`differential_expression` (its ``attrs`` hold the parameters).
    var_names
        The genes, in the AnnData's order (the index of ``pts``).

    Returns
    -------
    dict
        Ready to assign to ``adata.uns[key]``; it writes to ``.h5ad``.

    Examples
    --------
    >>> import pandas as pd
    >>> r = pd.DataFrame({"group1": ["A", "A"], "bayes_factor": [3.0, 3.0],
    ...                   "lfc_mean": [-1.2, 0.9], "proba_not_de": [0.05, 0.05],
    ...                   "posterior_fdr": [0.05, 0.05], "non_zeros_proportion1": [0.1, 0.9],
    ...                   "non_zeros_proportion2": [0.9, 0.1]}, index=["g2", "g1"])
    >>> uns = to_rank_genes_groups(r, ["g1", "g2"])
    >>> uns["names"]["A"].tolist(), uns["scores"]["A"].round(2).tolist()
    (['g1', 'g2'], [3.0, -3.0])
    """
    groups = list(dict.fromkeys(results["group1"]))
    blocks = []
    for g in groups:
        block = results[results["group1"] == g]
        block.attrs = results.attrs
        score = rank_score(block)
        blocks.append(block.assign(_score=score).iloc[np.argsort(-score, kind="stable")])

    def rec(column: str | None, dtype) -> np.recarray:
        arrays = [(b.index if column is None else b[column]).to_numpy(dtype=dtype) for b in blocks]
        return np.rec.fromarrays(arrays, names=[str(g) for g in groups])

    def pts(column: str) -> pd.DataFrame:
        frame = pd.DataFrame({str(g): b[column] for g, b in zip(groups, blocks, strict=True)})
        return frame.reindex(pd.Index(var_names, dtype=str)).astype(np.float64)

    params = dict(results.attrs.get("params", {}))
    params.update(
        method=f"pyro_scvi_{params.get('mode', 'de')}",
        use_raw=False,
        corr_method="posterior expected FDR",
    )
    return {
        "params": params,
        "names": rec(None, str),
        "scores": rec("_score", np.float64),
        "logfoldchanges": rec("lfc_mean", np.float32),
        "pvals": rec("proba_not_de", np.float64),
        "pvals_adj": rec("posterior_fdr", np.float64),
        "pts": pts("non_zeros_proportion1"),
        "pts_rest": pts("non_zeros_proportion2"),
    }
