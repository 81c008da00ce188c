"""Posterior predictive checks (pyro_scvi.analysis.ppc), their plots and ``pyro-scvi ppc``."""

import anndata
import arviz as az
import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch
from _cli import run_cli_output as _run
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import NB, SCVI
from pyro_scvi.analysis.plotting import plot_ppc_scatter, plot_ppp_histograms
from pyro_scvi.analysis.ppc import (
    CELL_STATISTICS,
    GENE_STATISTICS,
    TABLE_COLUMNS,
    calibration_summary,
    cell_statistics,
    gene_statistics,
    posterior_predictive_check,
    ppc_table,
    ppp_values,
)
from pyro_scvi.model import ScviModel
from pyro_scvi.model.priors import LogNormalLibrary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _poisson_idata(rng, n_draws=30, n_cells=25, n_genes=6):
    observed = rng.poisson(2.0, (n_cells, n_genes))
    observed[:, 0] = 0  # an all-zero gene: its cv is undefined
    return az.from_dict(
        posterior_predictive={"x": rng.poisson(2.0, (1, n_draws, n_cells, n_genes))},
        observed_data={"x": observed},
        coords={"cells": [f"c{i}" for i in range(n_cells)], "genes": list("abcdef")},
        dims={"x": ["cells", "genes"]},
    )


# ---------------------------------------------------------------------------- statistics


def test_statistics_equal_numpy(rng):
    x = rng.negative_binomial(2, 0.3, (50, 8)).astype(float)
    x[:, 3] = 0
    g, c = gene_statistics(x), cell_statistics(x)
    assert set(g) == set(GENE_STATISTICS) and set(c) == set(CELL_STATISTICS)
    np.testing.assert_allclose(g["mean"], x.mean(0))
    np.testing.assert_allclose(g["variance"], x.var(0))
    cv = np.array([x[:, j].std() / x[:, j].mean() if j != 3 else np.nan for j in range(8)])
    np.testing.assert_allclose(g["cv"], cv)
    assert np.isnan(g["cv"][3])
    np.testing.assert_allclose(g["zero_fraction"], [np.mean(x[:, j] == 0) for j in range(8)])
    np.testing.assert_allclose(c["library_size"], x.sum(1))
    np.testing.assert_allclose(c["zero_fraction"], [np.mean(row == 0) for row in x])


def test_ppp_counts_ties_half():
    obs = np.array([2.0, 2.0, 2.0, 2.0, np.nan, 1.0])
    rep = np.array(
        [
            [1.0, 3.0, 2.0, 1.0, 1.0, np.nan],
            [2.0, 3.0, 2.0, 3.0, 1.0, np.nan],
            [3.0, 3.0, 2.0, np.nan, 1.0, np.nan],
        ]
    )
    # above + 0.5 * ties, over the draws where T(x~) is defined
    np.testing.assert_allclose(ppp_values(obs, rep), [0.5, 1.0, 0.5, 0.5, np.nan, np.nan])
    np.testing.assert_allclose(ppp_values(np.array([5.0]), np.array([[1.0], [2.0]])), [0.0])


def test_ppc_table_matches_recomputation(rng):
    idata = _poisson_idata(rng)
    table = ppc_table(idata)
    assert list(table.columns) == TABLE_COLUMNS
    obs = idata.observed_data["x"].values.astype(float)
    rep = idata.posterior_predictive["x"].values[0].astype(float)
    for level, fn, names in [
        ("gene", gene_statistics, list("abcdef")),
        ("cell", cell_statistics, [f"c{i}" for i in range(25)]),
    ]:
        for s in fn(obs):
            rows = table[(table["level"] == level) & (table["statistic"] == s)]
            assert list(rows["name"]) == names
            t_obs = fn(obs)[s]
            t_rep = np.stack([fn(r)[s] for r in rep])
            np.testing.assert_allclose(rows["observed"], t_obs)
            with np.errstate(invalid="ignore"):
                np.testing.assert_allclose(rows["replicated_mean"], np.nanmean(t_rep, 0))
            ok = np.isfinite(t_obs)
            manual = (t_rep > t_obs).mean(0) + 0.5 * (t_rep == t_obs).mean(0)
            np.testing.assert_allclose(rows["ppp"].to_numpy()[ok], manual[ok])
            lower = rows["replicated_lower"].to_numpy()[ok]
            upper = rows["replicated_upper"].to_numpy()[ok]
            np.testing.assert_allclose(lower, np.quantile(t_rep[:, ok], 0.025, axis=0))
            assert (lower <= upper).all()
    defined = table["ppp"].dropna()
    assert defined.between(0, 1).all()
    # only the cv of the all-zero gene is undefined
    undefined = table[table["ppp"].isna()]
    assert list(zip(undefined["statistic"], undefined["name"], strict=True)) == [("cv", "a")]


def test_ppc_table_refuses_wrong_dims(rng):
    idata = az.from_dict(
        posterior_predictive={"x": rng.poisson(2.0, (1, 5, 4, 3))},
        observed_data={"x": rng.poisson(2.0, (4, 3))},
    )
    with pytest.raises(ValueError, match="dims"):
        ppc_table(idata)


def test_calibration_summary_fractions_and_ks():
    p = np.array([0.01, 0.3, 0.5, 0.5, 0.7, 0.99, 0.999, np.nan])
    table = pd.DataFrame({"level": "gene", "statistic": "mean", "ppp": p})
    row = calibration_summary(table).iloc[0]
    assert row["n"] == 8 and row["n_defined"] == 7
    assert row["frac_below"] == pytest.approx(1 / 7)
    assert row["frac_above"] == pytest.approx(2 / 7)
    assert row["frac_outside"] == pytest.approx(3 / 7)
    q = np.sort(p[:7])
    ecdf_hi, ecdf_lo = np.arange(1, 8) / 7, np.arange(7) / 7
    ks = max((ecdf_hi - q).max(), (q - ecdf_lo).max())
    assert row["ks_uniform"] == pytest.approx(ks)


# ------------------------------------------------------------------- calibration on a fit


def _simulate(n_cells=400, n_genes=40, n_latent=2, seed=0):
    """Counts from a freshly initialized NB ScviModel in eval mode, and its true l."""
    pyro.set_rng_seed(seed)
    gen = ScviModel(
        n_genes,
        1,
        LogNormalLibrary(torch.tensor([np.log(1500.0)]), torch.tensor([0.3])),
        n_latent=n_latent,
        n_hidden=32,
        likelihood=NB(),
    )
    with torch.no_grad():
        gen.log_theta.fill_(np.log(3.0))
    gen.eval()
    with torch.no_grad(), pyro.get_param_store().scope():
        trace = pyro.poutine.trace(gen).get_trace(None, torch.zeros(n_cells, dtype=torch.long))
    x = trace.nodes["x"]["value"].numpy().astype(np.float32)
    adata = anndata.AnnData(sp.csr_matrix(x))
    adata.obs_names = [f"cell{i}" for i in range(n_cells)]
    adata.var_names = [f"gene{j}" for j in range(n_genes)]
    return adata


@pytest.fixture(scope="module")
def self_simulated():
    return _simulate()


def _fit(adata, epochs, seed=0):
    m = SCVI(adata, n_latent=2, n_hidden=32, likelihood=NB())
    # Adam with a decaying step (0.02 -> 0.001 over the ~400 steps) ends near an optimum
    # instead of jittering around it: enough for a converged fit in a few seconds.
    optim = pyro.optim.ClippedAdam({"lr": 0.02, "lrd": 0.9925, "eps": 0.01})
    m.train(
        epochs,
        batch_size=128,
        train_size=1.0,
        kl_warmup_epochs=25,
        optim=optim,
        seed=seed,
        progress_bar=False,
    )
    return m


def test_ppp_values_are_not_piled_up_when_the_model_fits_its_own_simulation(self_simulated):
    """Fit scVI to counts simulated from scVI: ppp-values must not pile up near 0 or 1.

    The data come from the generative process of an NB ScviModel (NB rather than ZINB, so
    that scVI's library prior, computed from the observed library sizes, is also the
    generator's prior for l). Under a correct model, ppp-values are conservative: they are
    concentrated around 0.5 and fall outside [0.025, 0.975] with probability at most about
    5% (Meng 1994). For 40 genes the number outside is then at most about Binomial(40,
    0.05): mean 2, P(>= 9) < 1e-3, so a bound of 20% (8 genes) leaves room for the
    variational approximation while a misfit gives 50-100% (see the next test). With 400
    cells, 5% is a bound with room to spare for the per-cell statistics. Seen over six
    seeds: at most 7.5% for every statistic.
    """
    model = _fit(self_simulated, epochs=100)
    idata, table, calibration = posterior_predictive_check(model, n_samples=50, seed=0)
    cal = calibration.set_index(["level", "statistic"])
    assert table["ppp"].dropna().between(0, 1).all()
    for statistic in GENE_STATISTICS:
        assert cal.loc[("gene", statistic), "frac_outside"] <= 0.2, cal
        assert 0.15 <= cal.loc[("gene", statistic), "median_ppp"] <= 0.85, cal
    assert cal.loc[("cell", "library_size"), "frac_outside"] <= 0.05, cal
    assert cal.loc[("cell", "zero_fraction"), "frac_outside"] <= 0.1, cal


def test_an_underfitted_model_fails_the_check(self_simulated):
    """The same data and model after two epochs: the check must flag the gene means."""
    model = _fit(self_simulated, epochs=2)
    _, _, calibration = posterior_predictive_check(model, n_samples=20, seed=0)
    cal = calibration.set_index(["level", "statistic"])
    assert cal.loc[("gene", "mean"), "frac_outside"] > 0.5, cal


# --------------------------------------------------------------------------------- plots


def test_plots_write_png_with_a_panel_per_statistic(rng, tmp_path):
    table = ppc_table(_poisson_idata(rng))
    n_panels = len(GENE_STATISTICS) + len(CELL_STATISTICS)
    for plot, name in [(plot_ppp_histograms, "h.png"), (plot_ppc_scatter, "s.png")]:
        fig = plot(table)
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        assert len(titles) == n_panels
        assert titles[0].startswith("gene mean") and titles[-1].startswith("cell zero_fraction")
        plot(table, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["h.png", "s.png"]  # no temp files


# ----------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ppc")
    adata = synthetic_zinb(n_cells=80, n_genes=12, n_batches=2, seed=0)
    adata.write_h5ad(tmp / "in.h5ad")
    m = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=16)
    m.train(max_epochs=2, progress_bar=False)
    m.save(tmp / "model")
    return tmp


def test_cli_writes_netcdf_csv_and_png(saved):
    out = saved / "res" / "check.nc"
    status, stdout, stderr = _run(
        ["ppc", saved / "model", saved / "in.h5ad", "-o", out, "--n-samples", "6", "--seed", "1"]
    )
    assert status == 0, stderr
    idata = az.from_netcdf(str(out))
    assert idata.posterior_predictive["x"].shape == (1, 6, 80, 12)
    table = pd.read_csv(saved / "res" / "check.csv")
    assert list(table.columns) == TABLE_COLUMNS and len(table) == 4 * 12 + 2 * 80
    calibration = pd.read_csv(saved / "res" / "check_calibration.csv")
    assert len(calibration) == 6
    for png in ("check_ppp.png", "check_scatter.png"):
        assert (saved / "res" / png).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in (saved / "res").iterdir()) == [
        "check.csv",
        "check.nc",
        "check_calibration.csv",
        "check_criticism.csv",
        "check_criticism.png",
        "check_ppp.png",
        "check_scatter.png",
    ]
    # one paragraph naming what it checked and wrote
    assert stdout.strip() and "\n\n" not in stdout.strip()
    assert "80 cells x 12 genes" in stdout and "check_scatter.png" in stdout


def test_cli_max_cells_subsamples(saved):
    out = saved / "sub.nc"
    status, _, stderr = _run(
        ["ppc", saved / "model", saved / "in.h5ad", "-o", out, "--n-samples", "2"]
        + ["--max-cells", "10"]
    )
    assert status == 0, stderr
    assert az.from_netcdf(str(out)).observed_data.sizes["cells"] == 10


def test_cli_missing_model_dir_fails_cleanly(saved, tmp_path):
    out = tmp_path / "x.nc"
    status, stdout, stderr = _run(["ppc", tmp_path / "nope", saved / "in.h5ad", "-o", out])
    assert status == 2
    assert len(stderr.strip().splitlines()) == 1 and "nope" in stderr
    assert "Traceback" not in stderr and not stdout
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_output_without_nc_suffix(saved, tmp_path):
    status, _, stderr = _run(["ppc", saved / "model", saved / "in.h5ad", "-o", tmp_path / "x.h5"])
    assert status == 2 and ".nc" in stderr and len(stderr.strip().splitlines()) == 1
