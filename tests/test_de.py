"""Differential expression: recovery of known DE genes, null calibration, symmetry, seeds,
batch correction, errors, the scanpy-style uns record, the volcano plot and the CLI."""

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_scvi import NB, SCVI, ZINB, InputError, Poisson
from pyro_scvi.analysis.de import (
    COLUMNS,
    composition_factor,
    differential_expression,
    posterior_fdr,
)
from pyro_scvi.analysis.plotting import plot_volcano
from pyro_scvi.cli import main

N_DE = 5  # genes up in A, and as many up in B
N_GENES = 30


def simulate(n_cells=400, lfc=1.5, batch_effect=1.0, seed=0):
    """Two cell types, two batches; genes 0-4 up in A, genes 5-9 up in B, the rest equal.

    The two DE sets have the same baselines, so both types have the same total expression
    and every other gene's normalized expression is exactly equal between the types. The
    batch effect is a per-gene factor exp(N(0, batch_effect)) in batch b1.
    """
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 0.5, N_GENES)
    base[N_DE : 2 * N_DE] = base[:N_DE]
    up = np.zeros((2, N_GENES))
    up[0, :N_DE] = lfc
    up[1, N_DE : 2 * N_DE] = lfc
    shift = np.stack([np.zeros(N_GENES), rng.normal(0, batch_effect, N_GENES)])
    cell_type, batch = rng.integers(0, 2, n_cells), rng.integers(0, 2, n_cells)
    logits = base + up[cell_type] + shift[batch]
    freq = np.exp(logits)
    freq /= freq.sum(1, keepdims=True)
    mu = np.exp(rng.normal(6.0, 0.3, n_cells))[:, None] * freq
    counts = rng.poisson(rng.gamma(5.0, mu / 5.0)).astype(np.float32)
    halves = np.where(rng.random(n_cells) < 0.5, "h1", "h2")
    obs = pd.DataFrame(
        {
            "cell_type": pd.Categorical(np.array(["A", "B"])[cell_type]),
            "batch": pd.Categorical(np.array(["b0", "b1"])[batch]),
            # random halves of type A; type B cells belong to neither half
            "halves": pd.Categorical(np.where(cell_type == 0, halves, None)),
        },
        index=[f"c{i}" for i in range(n_cells)],
    )
    var = pd.DataFrame(index=[f"g{i}" for i in range(N_GENES)])
    return anndata.AnnData(sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="module")
def trained():
    adata = simulate()
    model = SCVI(adata, batch_key="batch", n_latent=4, n_hidden=32)
    model.train(max_epochs=100, kl_warmup_epochs=10, early_stopping=False, progress_bar=False)
    return model


DE_GENES = {f"g{i}" for i in range(2 * N_DE)}


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_known_de_genes_rank_at_the_top(trained, mode):
    res = trained.differential_expression(
        groupby="cell_type", group1="A", group2="B", mode=mode, n_samples=500
    )
    assert list(res.columns) == list(COLUMNS) and len(res) == N_GENES
    assert set(res.index[: 2 * N_DE]) == DE_GENES
    # direction: g0-g4 are higher in A, g5-g9 in B
    lfc = res["lfc_mean"]
    assert (lfc[[f"g{i}" for i in range(N_DE)]] > 0.25).all()
    assert (lfc[[f"g{i}" for i in range(N_DE, 2 * N_DE)]] < -0.25).all()
    if mode == "vanilla":
        bf = res["bayes_factor"]
        assert (bf[[f"g{i}" for i in range(N_DE)]] > 0).all()
        assert (bf[[f"g{i}" for i in range(N_DE, 2 * N_DE)]] < 0).all()


def test_change_mode_calls_the_de_genes_and_no_others(trained):
    res = trained.differential_expression(
        groupby="cell_type", group1="A", group2="B", n_samples=500
    )
    called = set(res.index[res["is_de_fdr"]])
    assert DE_GENES <= called and len(called - DE_GENES) <= 1
    # the called list meets its own posterior FDR target, and the next gene would not
    assert res["posterior_fdr"][res["is_de_fdr"]].max() <= 0.05
    assert (res["proba_de"].to_numpy()[: len(called)] > 0.9).all()
    assert np.allclose(res["proba_de"] + res["proba_not_de"], 1)
    assert np.allclose(res["bayes_factor"], np.log(res["proba_de"] / res["proba_not_de"]))
    assert (res["lfc_lower"] <= res["lfc_median"]).all()
    assert (res["lfc_median"] <= res["lfc_upper"]).all()


def test_lfc_posterior_is_about_as_wide_as_the_error_of_null_genes(trained):
    # Non-DE genes have a true LFC of exactly 0, so lfc_mean is their estimation error.
    # Without each cell's count noise in the group means, the posterior sd was ~0.03
    # here and these z-scores had an rms of ~2.6: far too sure of a noisy estimate.
    res = trained.differential_expression(
        groupby="cell_type", group1="A", group2="B", n_samples=500
    )
    null = res.loc[[g for g in res.index if g not in DE_GENES]]
    rms_z = np.sqrt(np.mean((null["lfc_mean"] / null["lfc_std"]) ** 2))
    assert 0.2 < rms_z < 1.5


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_null_halves_call_almost_nothing(trained, mode):
    res = trained.differential_expression(
        groupby="halves", group1="h1", group2="h2", mode=mode, n_samples=500
    )
    assert res["is_de_fdr"].sum() <= 1
    if mode == "change":
        # halves of one population differ only by the noise their LFC posterior carries
        assert (res["lfc_mean"].abs() / res["lfc_std"]).max() < 3.5
    # cells outside both halves (type B, missing label) take no part
    a = trained.adata
    # Reference in float64 (a float32 mean is only as good as its summation order): counts
    # are integers whose per-gene sums stay far below 2**24, so they sum exactly in the
    # package's float32 and its mean is exact to one float64 division.
    half2 = a.X[(a.obs["halves"] == "h2").to_numpy()].toarray().mean(0, dtype=np.float64)
    eps64 = np.finfo(np.float64).eps
    np.testing.assert_allclose(res.loc[a.var_names, "raw_mean2"], half2, rtol=4 * eps64)


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_swapping_the_groups_flips_the_signs(trained, mode):
    kw = dict(groupby="cell_type", mode=mode, n_samples=300, seed=3)
    ab = trained.differential_expression(group1="A", group2="B", **kw)
    ba = trained.differential_expression(group1="B", group2="A", **kw).loc[ab.index]
    np.testing.assert_allclose(ba["lfc_mean"], -ab["lfc_mean"], atol=1e-10)
    np.testing.assert_allclose(ba["lfc_median"], -ab["lfc_median"], atol=1e-10)
    np.testing.assert_allclose(ba["lfc_lower"], -ab["lfc_upper"], atol=1e-10)
    np.testing.assert_allclose(
        ba["bayes_factor"], -ab["bayes_factor"] if mode == "vanilla" else ab["bayes_factor"]
    )
    np.testing.assert_allclose(ba["proba_de"], ab["proba_de"])
    np.testing.assert_allclose(ba["scale1"], ab["scale2"])
    np.testing.assert_allclose(ba["raw_mean1"], ab["raw_mean2"])
    np.testing.assert_allclose(ba["non_zeros_proportion1"], ab["non_zeros_proportion2"])
    assert (ab["lfc_mean"].abs() > 0.25).sum() >= 2 * N_DE  # the flip is not of zeros


def test_results_are_reproducible_under_a_seed(trained):
    kw = dict(groupby="cell_type", group1="A", n_samples=200)
    first = trained.differential_expression(seed=7, **kw)
    pd.testing.assert_frame_equal(first, trained.differential_expression(seed=7, **kw))
    other = trained.differential_expression(seed=8, **kw)
    assert not np.allclose(first["lfc_mean"], other.loc[first.index, "lfc_mean"])
    # ... yet a new seed changes the answer only by Monte-Carlo noise
    np.testing.assert_allclose(other.loc[first.index, "lfc_mean"], first["lfc_mean"], atol=0.1)


@pytest.mark.parametrize("mode", ["change", "vanilla"])
def test_batch_correction_removes_a_pure_batch_effect(trained, mode):
    # Both cell types are spread evenly over the batches, so batch b0 against b1 differs
    # only by the simulated batch effect.
    kw = dict(groupby="batch", group1="b0", group2="b1", mode=mode, n_samples=500)
    corrected = trained.differential_expression(**kw)
    raw = trained.differential_expression(batch_correction=False, **kw)
    if mode == "change":
        assert corrected["is_de_fdr"].sum() <= 1
        assert raw["is_de_fdr"].sum() >= 10
    else:  # vanilla makes no calls; its Bayes factors tell the batches apart
        assert (corrected["bayes_factor"].abs() > 3).sum() <= 1
        assert (raw["bayes_factor"].abs() > 3).sum() >= 10


def test_one_vs_rest_over_every_group(trained):
    a = trained.adata
    res = trained.differential_expression(groupby="batch", n_samples=100)
    assert list(dict.fromkeys(res["comparison"])) == ["b0 vs rest", "b1 vs rest"]
    assert set(res["group2"]) == {"rest"}
    b0 = res[res["group1"] == "b0"].loc[a.var_names]
    in_b1 = (a.obs["batch"] == "b1").to_numpy()
    counts = a.X.toarray()
    # float64 reference; integer counts sum exactly (see test_null_halves_call_almost_nothing)
    rtol = 4 * np.finfo(np.float64).eps
    np.testing.assert_allclose(b0["raw_mean2"], counts[in_b1].mean(0, dtype=np.float64), rtol=rtol)
    np.testing.assert_allclose(b0["non_zeros_proportion2"], (counts[in_b1] > 0).mean(0))
    # scale1 is the group's mean share of a cell's counts, corrected by the group's own
    # counts: decoded in their own batches, times the mean library, it gives back the
    # mean count of the well-expressed genes
    own = trained.differential_expression(
        groupby="cell_type", group1="A", n_samples=100, batch_correction=False
    ).loc[a.var_names]
    in_a = (a.obs["cell_type"] == "A").to_numpy()
    high = own["raw_mean1"] > 2
    expected = own["scale1"][high] * counts[in_a].sum(1).mean()
    np.testing.assert_allclose(expected, own["raw_mean1"][high], rtol=0.1)


def test_rest_is_the_cell_weighted_mixture_of_the_other_groups(trained):
    # "A vs rest" on cell_type is "A vs B": the rest is B alone, so the draws are identical.
    kw = dict(groupby="cell_type", group1="A", n_samples=100, seed=1)
    rest = trained.differential_expression(**kw)
    b = trained.differential_expression(group2="B", **kw).loc[rest.index]
    np.testing.assert_allclose(rest["lfc_mean"], b["lfc_mean"])
    assert set(rest["comparison"]) == {"A vs rest"}


@pytest.mark.parametrize("likelihood", [NB(), Poisson(), ZINB()], ids=repr)
@pytest.mark.parametrize("observed_library", [False, True])
def test_every_likelihood_and_observed_library_size(likelihood, observed_library):
    adata = simulate(n_cells=60)
    model = SCVI(
        adata,
        batch_key="batch",
        likelihood=likelihood,
        use_observed_lib_size=observed_library,
        n_latent=2,
        n_hidden=8,
    )
    for mode in ("change", "vanilla"):
        res = model.differential_expression(groupby="cell_type", mode=mode, n_samples=20)
        values = res.select_dtypes(float)
        assert values.shape == (2 * N_GENES, 15)
        # vanilla mode has no posterior FDR (it makes no calls)
        finite = values.drop(columns=["posterior_fdr"] if mode == "vanilla" else [])
        assert np.isfinite(finite.to_numpy()).all()
        assert ((res["proba_de"] > 0) & (res["proba_de"] < 1)).all()


def test_unknown_groupby_or_group_is_a_clear_error(trained):
    with pytest.raises(InputError, match="'celltype' is not a column of adata.obs"):
        trained.differential_expression(groupby="celltype")
    with pytest.raises(InputError, match=r"'C' is not a group of adata.obs\['cell_type'\]"):
        trained.differential_expression(groupby="cell_type", group1="C")
    with pytest.raises(InputError, match="groups: 'A', 'B'"):
        trained.differential_expression(groupby="cell_type", group1="A", group2="Z")
    with pytest.raises(InputError, match="both 'A'"):
        trained.differential_expression(groupby="cell_type", group1="A", group2="A")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"mode": "bayes"}, "mode='bayes'"),
        ({"delta": 0.0}, "delta=0.0"),
        ({"fdr_target": 1.5}, "fdr_target=1.5"),
        ({"n_samples": 1}, "n_samples=1"),
        ({"credible_level": 1.0}, "credible_level=1.0"),
        ({"pseudocount": -1.0}, "pseudocount=-1.0"),
    ],
)
def test_bad_arguments_are_input_errors(trained, kwargs, fragment):
    with pytest.raises(InputError, match=fragment):
        trained.differential_expression(groupby="cell_type", **kwargs)


def test_only_one_group_cannot_be_tested_against_the_rest(trained):
    a = trained.adata.copy()
    a.obs["one"] = "x"
    with pytest.raises(InputError, match="only the group 'x'"):
        trained.differential_expression(a, groupby="one")


def test_adata_is_written_only_with_key_added(trained, tmp_path):
    a = trained.adata
    before = set(a.uns)
    res = trained.differential_expression(groupby="cell_type", n_samples=100)
    assert set(a.uns) == before
    copy = a.copy()
    res = trained.differential_expression(
        copy, groupby="cell_type", n_samples=100, key_added="de_pyro"
    )
    assert set(a.uns) == before and "de_pyro" in copy.uns
    uns = copy.uns["de_pyro"]
    assert uns["names"].dtype.names == ("A", "B")
    a_vs_rest = res[res["group1"] == "A"].loc[list(uns["names"]["A"])]
    assert set(uns["names"]["A"]) == set(a_vs_rest.index)
    np.testing.assert_allclose(uns["logfoldchanges"]["A"], a_vs_rest["lfc_mean"], rtol=1e-6)
    np.testing.assert_allclose(uns["pvals_adj"]["A"], a_vs_rest["posterior_fdr"])
    assert uns["params"]["groupby"] == "cell_type" and uns["params"]["reference"] == "rest"
    assert uns["params"]["method"] == "pyro_scvi_change"
    # the record writes to and reads back from .h5ad
    copy.write_h5ad(tmp_path / "de.h5ad")
    back = anndata.read_h5ad(tmp_path / "de.h5ad").uns["de_pyro"]
    assert list(back["names"]["B"]) == list(uns["names"]["B"])
    np.testing.assert_allclose(back["pts"]["A"], uns["pts"]["A"])


def test_posterior_fdr_is_the_running_mean_of_proba_not_de():
    p = np.array([0.999, 0.99, 0.9, 0.6, 0.2])
    np.testing.assert_allclose(posterior_fdr(p), np.cumsum(1 - p) / np.arange(1, 6))
    assert (np.diff(posterior_fdr(p)) >= 0).all()


def test_volcano_plot_has_a_panel_per_comparison(trained, tmp_path):
    res = differential_expression(trained, groupby="batch", n_samples=100)
    fig = plot_volcano(res)
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert len(titles) == 2 and titles[0].startswith("b0 vs rest (")
    # the +-delta lines of change mode
    assert len(fig.axes[0].lines) == 2
    plot_volcano(res, tmp_path / "v.png")
    assert (tmp_path / "v.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("de_cli")
    trained.save(folder / "model")
    trained.adata.write_h5ad(folder / "data.h5ad")
    return folder


def test_cli_writes_csv_and_volcano_png(saved, capsys):
    out = saved / "de.csv"
    status = main(
        [
            "de",
            str(saved / "model"),
            str(saved / "data.h5ad"),
            "--groupby",
            "cell_type",
            "--group1",
            "A",
            "--group2",
            "B",
            "--n-samples",
            "300",
            "-o",
            str(out),
        ]
    )
    assert status == 0
    table = pd.read_csv(out, index_col="gene")
    assert list(table.columns) == list(COLUMNS) and len(table) == N_GENES
    called = set(table.index[table["is_de_fdr"]])
    assert DE_GENES <= called and len(called - DE_GENES) <= 1
    png = saved / "de_volcano.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"A vs B: {len(called)}." in capsys.readouterr().out


def test_cli_sample_key_gives_the_api_table(saved, trained, capsys):
    out = saved / "de_samples.csv"
    args = ["de", str(saved / "model"), str(saved / "data.h5ad"), "--groupby", "cell_type"]
    args += ["--group1", "A", "--group2", "B", "--n-samples", "200", "--seed", "3"]
    assert main(args + ["--sample-key", "batch", "-o", str(out)]) == 0
    table = pd.read_csv(out, index_col="gene")
    api = differential_expression(
        trained,
        groupby="cell_type",
        group1="A",
        group2="B",
        n_samples=200,
        seed=3,
        sample_key="batch",
    )
    plain = differential_expression(
        trained, groupby="cell_type", group1="A", group2="B", n_samples=200, seed=3
    )
    np.testing.assert_allclose(
        table.loc[api.index, "proba_de"].to_numpy(), api["proba_de"].to_numpy(), rtol=1e-6
    )
    # the option reaches the analysis: replicates resampled give other probabilities
    assert not np.allclose(table.loc[plain.index, "proba_de"], plain["proba_de"])


def test_cli_spread_uncertainty_gives_the_api_table(saved, trained):
    out = saved / "de_spread.csv"
    args = ["de", str(saved / "model"), str(saved / "data.h5ad"), "--groupby", "cell_type"]
    args += ["--group1", "A", "--group2", "B", "--n-samples", "200", "--seed", "3"]
    assert main(args + ["--spread-uncertainty", "-o", str(out)]) == 0
    table = pd.read_csv(out, index_col="gene")
    kw = dict(groupby="cell_type", group1="A", group2="B", n_samples=200, seed=3)
    api = differential_expression(trained, spread_uncertainty=True, **kw)
    np.testing.assert_allclose(
        table.loc[api.index, "lfc_std"].to_numpy(), api["lfc_std"].to_numpy(), rtol=1e-6
    )
    plain = differential_expression(trained, **kw)
    assert not np.allclose(table.loc[plain.index, "lfc_std"], plain["lfc_std"])


@pytest.mark.parametrize(
    "extra, fragment",
    [
        (["--groupby", "nope"], "'nope' is not a column"),
        (["--groupby", "cell_type", "--sample-key", "donor"], "sample_key='donor'"),
        (["--groupby", "cell_type", "--group1", "Z"], "'Z' is not a group"),
        (["--groupby", "cell_type", "--mode", "bayes"], "invalid choice"),
        (["--groupby", "cell_type", "--fdr-target", "2"], "fdr_target=2.0"),
        (["--groupby", "cell_type", "--delta", "0"], "expected a positive"),
    ],
)
def test_cli_bad_arguments_give_one_line_and_status_2(saved, capsys, extra, fragment):
    args = ["de", str(saved / "model"), str(saved / "data.h5ad"), "-o", str(saved / "x.csv")]
    try:
        status = main(args + extra)
    except SystemExit as exit_:  # argparse errors exit directly
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2
    assert fragment in err and len(err.strip().splitlines()) == 1
    assert not (saved / "x.csv").exists()


def test_cli_output_must_be_csv_and_model_dir_must_exist(saved, capsys):
    base = ["de", str(saved / "model"), str(saved / "data.h5ad"), "--groupby", "cell_type"]
    assert main(base + ["-o", str(saved / "x.txt")]) == 2
    assert "must end in .csv" in capsys.readouterr().err
    missing = ["de", str(saved / "none"), str(saved / "data.h5ad"), "--groupby", "cell_type"]
    assert main(missing + ["-o", str(saved / "x.csv")]) == 2
    assert "not a directory" in capsys.readouterr().err


# ---------------------------------------------------------------------- truth from elsewhere
@pytest.fixture(scope="module")
def splatter():
    """A Splatter-style dataset (not scVI's generative model) and a model trained on it.

    Gene ``OFF`` (up in A) is switched off in every B cell: the "obvious" DE gene whose
    group mean is near zero.
    """
    from pyro_scvi.datasets.de_truth import splatter_like

    adata = splatter_like(n_cells=900, n_genes=200, de_fraction=0.1, seed=3)
    truth = adata.uns["truth"]["log2_fold_change"]
    counts = adata.X.toarray()
    in_b = (adata.obs["group"] == "B").to_numpy()
    mean_a = counts[(adata.obs["group"] == "A").to_numpy()].mean(0)
    # a non-DE gene expressed in most cells; B loses it entirely
    off = int(np.argmax(np.where(truth == 0, mean_a, 0)))
    counts[in_b, off] = 0
    truth = truth.copy()
    truth[off] = np.inf
    adata.X = sp.csr_matrix(counts)
    adata.uns["truth"]["log2_fold_change"] = truth
    adata.uns["off"] = adata.var_names[off]
    rng = np.random.default_rng(0)
    halves = np.where(rng.random(adata.n_obs) < 0.5, "h1", "h2")
    adata.obs["halves"] = pd.Categorical(np.where(adata.obs["group"] == "C", halves, None))
    model = SCVI(adata, n_latent=5, n_hidden=64)
    model.train(
        max_epochs=80, kl_warmup_epochs=20, early_stopping=False, progress_bar=False, seed=0
    )
    return model


def test_change_mode_ranks_and_calibrates_on_a_splatter_simulation(splatter):
    from sklearn.metrics import roc_auc_score

    a = splatter.adata
    table = splatter.differential_expression(groupby="group", group1="A", group2="B")
    res = table.loc[a.var_names]
    truth = a.uns["truth"]["log2_fold_change"] != 0
    compared = a.obs["group"].isin(["A", "B"]).to_numpy()
    expressed = np.asarray((a.X[compared] > 0).mean(0)).ravel() >= 0.05
    # the table's own order is the ranking
    rank = -pd.Series(np.arange(len(table)), index=table.index).loc[a.var_names].to_numpy()
    assert roc_auc_score(truth[expressed], rank[expressed]) >= 0.95
    calls = res["is_de_fdr"].to_numpy()
    assert calls.sum() >= 0.5 * truth.sum()  # power
    assert (calls & ~truth).sum() <= max(2, 0.15 * calls.sum())  # empirical FDR


def test_a_gene_switched_off_in_one_group_is_among_the_surest(splatter):
    # A symmetric noise term on a group mean near zero made such genes the least certain.
    res = splatter.differential_expression(groupby="group", group1="A", group2="B")
    off = splatter.adata.uns["off"]
    assert res.loc[off, "proba_de"] >= res["proba_de"].max() - 1e-12
    assert res.loc[off, "lfc_mean"] > 2 and res.loc[off, "is_de_fdr"]
    assert list(res.index).index(off) < 0.1 * len(res)


def test_null_halves_of_a_splatter_group_call_nothing(splatter):
    res = splatter.differential_expression(groupby="halves", group1="h1", group2="h2")
    assert res["is_de_fdr"].sum() <= 1  # <= 0.5 % of 200 genes


def test_spread_uncertainty_widens_only_genes_that_few_cells_detect(splatter):
    # The residuals' spread of a gene detected in a handful of cells rests on those cells:
    # drawn from its posterior, it widens their LFC posterior; hundreds of cells fix it.
    kw = dict(groupby="group", group1="A", group2="B", n_samples=400)
    default = splatter.differential_expression(**kw)
    eps = default.attrs["params"]["pseudocount"]
    on = splatter.differential_expression(spread_uncertainty=True, **kw)
    same_eps = splatter.differential_expression(spread_uncertainty=True, pseudocount=eps, **kw)
    assert default.attrs["params"]["spread_uncertainty"] is False
    assert on.attrs["params"]["spread_uncertainty"] is True
    # with it, the default pseudocount is ten times smaller (and recorded)
    assert on.attrs["params"]["pseudocount"] == pytest.approx(eps / 10)
    on, same_eps = on.loc[default.index], same_eps.loc[default.index]
    detecting = np.minimum(
        on["non_zeros_proportion1"] * on["n_cells1"], on["non_zeros_proportion2"] * on["n_cells2"]
    )
    ratio = same_eps["lfc_std"] / default["lfc_std"]
    few, many = detecting.between(1, 10), detecting >= 150
    assert few.sum() >= 5 and many.sum() >= 20
    assert ratio[few].median() > 1.1
    assert abs(ratio[many].median() - 1) < 0.03
    # the smaller pseudocount shrinks the LFCs of the sparse genes less
    sparse = few & (default["lfc_mean"].abs() > 0.1)
    assert (on["lfc_mean"].abs() > default["lfc_mean"].abs())[sparse].mean() > 0.8


# ---------------------------------------------------------------------- small groups
def test_a_group_of_one_cell_gets_a_warning_its_size_and_no_confident_call(trained):
    a = trained.adata.copy()
    single = np.where(a.obs["cell_type"] == "B", "B", None).astype(object)
    single[np.flatnonzero(a.obs["cell_type"] == "A")[0]] = "one"
    a.obs["single"] = pd.Categorical(single)
    with pytest.warns(UserWarning, match=r"fewer than 10 cells: 'one' \(1\)"):
        res = trained.differential_expression(a, groupby="single", group1="one", group2="B")
    assert (res["n_cells1"] == 1).all() and (
        res["n_cells2"] == (a.obs["single"] == "B").sum()
    ).all()
    assert res["proba_de"].max() <= 0.75 and not res["is_de_fdr"].any()


def test_pbmc8k_erythrocytes_a_group_of_one_cell_gets_no_calls():
    from pyro_scvi.datasets import pbmc8k_200hvg

    adata = pbmc8k_200hvg()
    model = SCVI(adata, n_latent=5, n_hidden=32)
    model.train(max_epochs=2, progress_bar=False, seed=0)
    with pytest.warns(UserWarning, match=r"'Erythrocytes' \(1\)"):
        res = model.differential_expression(
            groupby="cell_type", group1="Erythrocytes", n_samples=200
        )
    assert res["is_de_fdr"].sum() == 0 and res["proba_de"].max() <= 0.75
    assert (res["n_cells1"] == 1).all() and (res["n_cells2"] == adata.n_obs - 1).all()


# ---------------------------------------------------------------------- scanpy record
def test_rank_genes_groups_record_lists_up_regulated_genes_first(trained):
    a = trained.adata.copy()
    trained.differential_expression(
        a, groupby="cell_type", group1="A", group2="B", n_samples=500, key_added="de"
    )
    uns = a.uns["de"]
    names, scores = list(uns["names"]["A"]), np.asarray(uns["scores"]["A"], dtype=float)
    lfc = np.asarray(uns["logfoldchanges"]["A"], dtype=float)
    # sorted high to low, no ties (the DE genes saturate proba_de), direction in the sign
    assert (np.diff(scores) < 0).all()
    assert np.array_equal(np.sign(scores[np.abs(lfc) > 0.5]), np.sign(lfc[np.abs(lfc) > 0.5]))
    up, down = {f"g{i}" for i in range(N_DE)}, {f"g{i}" for i in range(N_DE, 2 * N_DE)}
    assert set(names[:N_DE]) == up and set(names[-N_DE:]) == down
    sc = pytest.importorskip("scanpy")
    df = sc.get.rank_genes_groups_df(a, "A", key="de")
    assert set(df["names"][:N_DE]) == up and (df["logfoldchanges"][:N_DE] > 0).all()


# ---------------------------------------------------------------------- replicates
def test_sample_key_takes_replicate_variation_into_account():
    from pyro_scvi.datasets.de_truth import poisson_lognormal_samples

    # replicates differ a lot (sd 0.4 per gene and sample), conditions on 10 % of genes
    adata = poisson_lognormal_samples(n_cells=600, n_genes=100, sample_sd=0.4, seed=1)
    model = SCVI(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=40, progress_bar=False, seed=0)
    truth = adata.uns["truth"]["is_de"]
    kw = dict(groupby="group", group1="A", group2="B", n_samples=300)
    cells = model.differential_expression(**kw).loc[adata.var_names]
    replicates = model.differential_expression(sample_key="sample", **kw).loc[adata.var_names]
    # taking cells as the units, genes that differ only between replicates are called
    false_cells = int((cells["is_de_fdr"] & ~truth).sum())
    false_replicates = int((replicates["is_de_fdr"] & ~truth).sum())
    assert false_cells >= 5 and false_replicates <= false_cells // 3
    # they are the genes whose replicates differ between the conditions by chance
    drift = adata.uns["truth"]["sample_log2_fold_change"][cells["is_de_fdr"] & ~truth]
    lfc = cells["lfc_mean"][cells["is_de_fdr"] & ~truth]
    assert np.abs(drift).min() > 0.125 and (np.sign(drift) == np.sign(lfc)).mean() >= 0.9
    assert (replicates["lfc_std"] > cells["lfc_std"]).mean() > 0.9
    assert replicates.attrs["params"]["sample_key"] == "sample"
    with pytest.raises(InputError, match="sample_key applies to mode='change'"):
        model.differential_expression(sample_key="sample", mode="vanilla", **kw)
    with pytest.raises(InputError, match="'donor' is not a column"):
        model.differential_expression(sample_key="donor", **kw)


def test_a_small_group_spread_over_batches_is_compared_where_it_has_cells(trained):
    # 11 cells of A in b0 and 1 in b1: b1 is decoded counterfactually for this group
    a = trained.adata.copy()
    in_a = (a.obs["cell_type"] == "A").to_numpy()
    b0 = np.flatnonzero(in_a & (a.obs["batch"] == "b0").to_numpy())[:11]
    b1 = np.flatnonzero(in_a & (a.obs["batch"] == "b1").to_numpy())[:1]
    label = np.where(a.obs["cell_type"] == "B", "B", None).astype(object)
    label[np.r_[b0, b1]] = "few"
    a.obs["few"] = pd.Categorical(label)
    res = trained.differential_expression(a, groupby="few", group1="few", group2="B")
    assert np.isfinite(res.select_dtypes(float).to_numpy()).all()
    assert (res["n_cells1"] == 12).all()
    # the DE genes still lead, with at most the certainty 12 cells allow
    assert len(set(res.index[:N_DE]) & DE_GENES) >= N_DE - 1
    assert res["proba_de"].max() <= 1 - 0.5 / 13 + 1e-12


def test_raw_columns_read_in_chunks_equal_the_direct_sums(small_adata, monkeypatch):
    import pyro_scvi.analysis.de as de
    from pyro_scvi.data import CountData

    a = small_adata.copy()
    a.obs["group"] = pd.Categorical(np.random.default_rng(0).choice(["a", "b", "c"], a.n_obs))
    model = SCVI(a, n_latent=2, n_hidden=8)
    reads, real = [], CountData.tensors

    def spy(self, idx, *args, **kwargs):
        reads.append(len(idx))
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(CountData, "tensors", spy)
    # 3 cells per read: many chunks per group, the last one short
    monkeypatch.setattr(de, "RAW_CHUNK_ENTRIES", 3 * a.n_vars)
    res = differential_expression(model, groupby="group", group1="a", n_samples=20, batch_size=64)
    res = res.loc[a.var_names]
    sizes = a.obs["group"].value_counts()
    assert sizes.mod(3).ne(0).any()
    assert reads.count(3) >= (sizes // 3).sum()  # the raw counts came 3 cells at a time
    x = a.X.toarray() if sp.issparse(a.X) else a.X
    for side, cells in ((1, a.obs["group"] == "a"), (2, a.obs["group"] != "a")):
        rows = x[cells.to_numpy()]
        np.testing.assert_allclose(
            res[f"raw_mean{side}"], rows.sum(0, dtype=np.float64) / len(rows), rtol=1e-12
        )
        np.testing.assert_allclose(
            res[f"non_zeros_proportion{side}"], (rows > 0).sum(0) / len(rows), rtol=1e-12
        )


def test_vanilla_mode_ranks_but_makes_no_calls(trained):
    res = trained.differential_expression(
        groupby="cell_type", group1="A", group2="B", mode="vanilla", n_samples=500
    )
    # p = P(rho1 > rho2) is an effect size, not a probability that the means differ:
    # no FDR can be controlled with it, so no gene is called and no FDR reported ...
    assert not res["is_de_fdr"].any() and res["posterior_fdr"].isna().all()
    assert res.attrs["params"]["calls"].startswith("none")
    # ... but the signed Bayes factors still rank and orient the DE genes
    bf = res["bayes_factor"]
    assert set(res.index[: 2 * N_DE]) == DE_GENES
    assert (bf[[f"g{i}" for i in range(N_DE)]] > 2).all()
    assert (bf[[f"g{i}" for i in range(N_DE, 2 * N_DE)]] < -2).all()
    change = trained.differential_expression(groupby="cell_type", group1="A", group2="B")
    assert change.attrs["params"]["calls"] == "is_de_fdr" and change["is_de_fdr"].sum() >= 10


# ---------------------------------------------------------------------- composition shifts
@pytest.fixture(scope="module")
def shifted():
    """20 % of the genes 2-8 fold up in A at the same sequencing depth: every other gene's
    share of A's counts falls by the factor ``uns["truth"]["composition_shift_log2"]``."""
    from pyro_scvi.datasets.de_truth import composition_shift

    adata = composition_shift(n_cells=600, n_genes=100, up_fraction=0.2, down_fraction=0.0)
    adata.X = adata.X.astype(np.float32)
    model = SCVI(adata, n_latent=4, n_hidden=32)
    model.train(max_epochs=40, kl_warmup_epochs=10, progress_bar=False, seed=0)
    return model


def _unchanged_lfc(model, **kw):
    a = model.adata
    res = model.differential_expression(
        groupby="group", group1="A", group2="B", n_samples=300, **kw
    )
    truth = a.uns["truth"]["is_de"]
    expressed = np.asarray((a.X > 0).mean(0)).ravel() >= 0.05
    lfc = res.loc[a.var_names, "lfc_mean"].to_numpy()
    return res, float(np.median(lfc[expressed & ~truth])), truth


def test_composition_correction_finds_the_unchanged_genes_unchanged(shifted):
    shift = shifted.adata.uns["truth"]["composition_shift_log2"]
    assert shift < -0.5  # the programme moves every other gene's share by this much
    on, centred, truth = _unchanged_lfc(shifted)
    off, shares, _ = _unchanged_lfc(shifted, composition_correction=False)
    # as ratios of shares, the unchanged genes go down by about the shift ...
    assert shares < 0.5 * shift
    # ... measured against the unchanged genes, they do not change
    assert abs(centred) < 0.1
    # the factor is recorded per comparison, with the setting
    assert on.attrs["params"]["composition_correction"] is True
    assert off.attrs["params"]["composition_correction"] is False
    assert off.attrs["composition"] == {}
    record = on.attrs["composition"]["A vs B"]
    assert record["applied"] and abs(record["log2_factor"] - shift) < 0.2
    assert 0.5 * (~truth).sum() <= record["n_reference_genes"] <= (~truth).sum()
    # calls: the shift passes for DE in shares, not against the unchanged genes
    false_on = int((on.loc[shifted.adata.var_names, "is_de_fdr"] & ~truth).sum())
    false_off = int((off.loc[shifted.adata.var_names, "is_de_fdr"] & ~truth).sum())
    assert false_off >= 10 and false_on <= max(2, 0.1 * on["is_de_fdr"].sum())


def test_composition_correction_off_gives_the_ratio_of_shares(shifted):
    # Without a pseudocount, the LFC samples differ by exactly the per-sample factor, so the
    # mean LFCs differ by its mean: both use the same draws, one measured against the
    # unchanged genes and one as the ratio of shares (the tables before the correction).
    kw = dict(groupby="group", group1="A", group2="B", n_samples=200, pseudocount=0.0, seed=4)
    on = shifted.differential_expression(**kw)
    off = shifted.differential_expression(composition_correction=False, **kw).loc[on.index]
    factor = on.attrs["composition"]["A vs B"]["log2_factor"]
    np.testing.assert_allclose(off["lfc_mean"] - on["lfc_mean"], factor, atol=1e-9)
    np.testing.assert_allclose(off["scale1"], on["scale1"])
    assert not np.allclose(off["proba_de"], on["proba_de"])


def test_no_composition_factor_where_most_genes_change():
    # 70 of 100 genes move by 1-3 log2 units either way: no centre stands for the
    # unchanged genes, so the factor is not applied; with 10 movers it is.
    rng = np.random.default_rng(1)
    b = rng.gamma(20.0, 1.0, (300, 100)) / 2000
    for movers, applied in ((70, False), (10, True)):
        lfc = np.r_[
            rng.uniform(1, 3, movers) * rng.choice([-1, 1], movers), np.zeros(100 - movers)
        ]
        a = b * 2.0**lfc * 2.0**-0.5  # plus a composition shift of -0.5
        factor, reference, done = composition_factor(a, b, eps=1e-4)
        assert done is applied
        if applied:
            assert abs(factor.mean() + 0.5) < 0.01 and reference[movers:].all()
        else:
            assert (factor == 0).all()
