"""Tests of outputs at scale (pyro_scvi.io.outputs) and of ``pyro-scvi fit``'s use of them."""

import hashlib
import json
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from _cli import run_cli as _run
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI
from pyro_scvi.data import placement
from pyro_scvi.errors import InputError
from pyro_scvi.io import outputs
from pyro_scvi.io.outputs import (
    GENES_KEY,
    LAYER_KEY,
    normalized_chunks,
    plan_normalized,
    read_gene_file,
)

N_CELLS, N_GENES = 300, 30
FAST = ["--max-epochs", "2", "--batch-size", "64", "--n-latent", "3", "--quiet", "--seed", "1"]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("outputs") / "in.h5ad"
    synthetic_zinb(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def dense_run(src, tmp_path_factory):
    """The default run (the dense layer, well below the threshold), in memory."""
    out = tmp_path_factory.mktemp("dense") / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST])
    assert status == 0, stderr
    return anndata.read_h5ad(out)


# ------------------------------------------------------------------------ the decision


def test_plan_threshold_is_inclusive_and_read_at_call_time(monkeypatch):
    monkeypatch.setattr(outputs, "DENSE_NORMALIZED_MAX_ENTRIES", 100)
    assert plan_normalized(10, 10).layer
    plan = plan_normalized(10, 11)
    assert not plan.layer and not plan.genes
    assert "110 entries" in plan.reason and "--normalized all" in plan.reason
    assert plan.record()["normalized_max_entries"] == 100


def test_plan_modes_override_the_threshold(monkeypatch):
    monkeypatch.setattr(outputs, "DENSE_NORMALIZED_MAX_ENTRIES", 100)
    assert plan_normalized(1000, 1000, mode="all").layer
    assert not plan_normalized(2, 2, mode="none").writes_any
    with pytest.raises(InputError, match="use one of auto, all, none"):
        plan_normalized(2, 2, mode="some")


def test_plan_chosen_genes_dedupe_and_refuse_unknown_or_contradictions():
    names = ["a", "b", "c"]
    plan = plan_normalized(5, 3, genes=["c", "a", "c"], var_names=names)
    assert plan.genes == ("c", "a") and not plan.layer
    assert plan.dense_columns(3) == 2
    with pytest.raises(InputError, match=r"'zz'.*var_names exactly"):
        plan_normalized(5, 3, genes=["a", "zz"], var_names=names)
    with pytest.raises(InputError, match="contradict"):
        plan_normalized(5, 3, mode="all", genes=["a"], var_names=names)


def test_read_gene_file(tmp_path):
    path = tmp_path / "g.txt"
    path.write_text("# header\n gene1 \n\ngene2\n")
    assert read_gene_file(path) == ["gene1", "gene2"]
    path.write_text("# nothing\n")
    with pytest.raises(InputError, match="names no genes"):
        read_gene_file(path)
    with pytest.raises(InputError, match="cannot read the gene file"):
        read_gene_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------ chunked values


def test_the_mean_of_normalized_expression_is_the_mean_of_the_same_draws():
    from pyro_scvi.posterior import queries

    adata = synthetic_zinb(n_cells=70, n_genes=9, seed=2)
    model = SCVI(adata, n_latent=2, n_hidden=8).train(1, progress_bar=False, seed=0)
    args = (model.model, model.guide, model.data, np.arange(70))
    settings = {"library_size": 50.0, "n_samples": 4, "batch_size": 32}
    torch.manual_seed(3)
    samples = queries.normalized_expression(*args, **settings)
    torch.manual_seed(3)
    mean = queries.normalized_expression(*args, **settings, mean=True)
    assert samples.shape == (4, 70, 9) and mean.shape == (70, 9) and mean.dtype == np.float32
    np.testing.assert_array_equal(mean, samples.mean(0, dtype=np.float64).astype(np.float32))


def test_a_model_with_non_finite_parameters_writes_no_normalized_expression():
    from pyro_scvi.io.outputs import normalized_chunks

    adata = synthetic_zinb(n_cells=30, n_genes=9, seed=2)
    model = SCVI(adata, n_latent=2, n_hidden=8)
    with torch.no_grad():
        model.model.decoder.rho_logits.bias.fill_(float("nan"))
    with pytest.raises(InputError, match="not finite"):
        list(normalized_chunks(model, model.data, library_size=1e4, n_samples=2))


def test_chunks_reproduce_the_one_pass_normalized_expression(monkeypatch):
    adata = synthetic_zinb(n_cells=200, n_genes=12, seed=3)
    model = SCVI(adata, n_latent=2, n_hidden=8).train(1, progress_bar=False, seed=0)
    # room for 64 cells' samples per chunk: 4 chunks of two 32-cell minibatches
    monkeypatch.setattr(outputs, "CHUNK_BYTES", 4 * 12 * 5 * 64)
    torch.manual_seed(7)
    whole = model.get_normalized_expression(library_size=100.0, n_samples=5, batch_size=32)
    torch.manual_seed(7)
    parts = list(
        normalized_chunks(model, model.data, library_size=100.0, n_samples=5, batch_size=32)
    )
    assert [(rows.start, rows.stop) for rows, _ in parts] == [
        (0, 64),
        (64, 128),
        (128, 192),
        (192, 200),
    ]
    chunked = np.concatenate([values for _, values in parts])
    assert chunked.dtype == np.float32
    np.testing.assert_allclose(chunked, whole.to_numpy(), rtol=1e-6)
    # and a column subset is those columns
    torch.manual_seed(7)
    picked = normalized_chunks(
        model,
        model.data,
        library_size=100.0,
        n_samples=5,
        batch_size=32,
        columns=np.array([5, 1]),
    )
    np.testing.assert_allclose(next(picked)[1], whole.to_numpy()[:64, [5, 1]], rtol=1e-6)


# ------------------------------------------------------------------------ the CLI


def test_above_the_threshold_no_dense_layer_and_the_decision_is_said_and_recorded(
    src, tmp_path, monkeypatch
):
    monkeypatch.setattr(outputs, "DENSE_NORMALIZED_MAX_ENTRIES", 1000)
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST])
    assert status == 0, stderr
    first, last = stderr.strip().splitlines()
    assert "no dense normalized layer" in first and "9,000 entries" in first
    assert "--normalized all" in first  # how to ask for it
    assert LAYER_KEY not in last and "no dense normalized layer" in last
    result = anndata.read_h5ad(out)
    assert LAYER_KEY not in result.layers and GENES_KEY not in result.obsm
    params = result.uns["pyro_scvi"]["params"]
    assert params["normalized_mode"] == "auto"
    assert not params["normalized_layer"]
    assert "DENSE_NORMALIZED_MAX_ENTRIES" in params["normalized_reason"]
    assert params["normalized_max_entries"] == 1000


def test_normalized_all_forces_the_layer(src, tmp_path, monkeypatch, dense_run):
    monkeypatch.setattr(outputs, "DENSE_NORMALIZED_MAX_ENTRIES", 1000)
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST, "--normalized", "all"])
    assert status == 0, stderr
    result = anndata.read_h5ad(out)
    assert result.uns["pyro_scvi"]["params"]["normalized_layer"]
    # the same seed: the values of the default run, written chunk by chunk
    np.testing.assert_allclose(result.layers[LAYER_KEY], dense_run.layers[LAYER_KEY], rtol=1e-6)


def test_normalized_none_writes_none_even_below_the_threshold(src, tmp_path):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST, "--normalized", "none"])
    assert status == 0, stderr
    result = anndata.read_h5ad(out)
    assert LAYER_KEY not in result.layers
    assert result.uns["pyro_scvi"]["params"]["normalized_reason"].startswith("none")


def test_chosen_genes_are_exactly_those_and_match_the_dense_values(src, tmp_path, dense_run):
    genes = [str(dense_run.var_names[7]), str(dense_run.var_names[2])]
    listed = tmp_path / "genes.txt"
    listed.write_text(f"# markers\n{dense_run.var_names[11]}\n")
    out = tmp_path / "out.h5ad"
    argv = ["fit", src, "-o", out, *FAST, "--normalized-genes", *genes]
    status, stderr = _run([*argv, "--normalized-genes-file", listed])
    assert status == 0, stderr
    result = anndata.read_h5ad(out)
    assert LAYER_KEY not in result.layers
    frame = result.obsm[GENES_KEY]
    wanted = [*genes, str(dense_run.var_names[11])]
    assert list(frame.columns) == wanted
    assert list(frame.index) == list(result.obs_names)
    dense = dense_run[:, wanted].layers[LAYER_KEY]
    np.testing.assert_allclose(frame.to_numpy(), dense, rtol=1e-6)
    assert result.uns["pyro_scvi"]["params"]["normalized_genes"].tolist() == wanted


def test_unknown_gene_is_refused_naming_it(src, tmp_path):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST, "--normalized-genes", "NOPE1"])
    assert status == 2
    assert "'NOPE1'" in stderr and "var_names" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_streamed_input_is_never_loaded_and_gives_the_models_latent(src, tmp_path, monkeypatch):
    digest = _sha256(src)

    def refuse(self, *args, **kwargs):
        raise AssertionError("the streamed CLI loaded the counts into memory")

    # the engine's own rule decides (counts above this share of free memory: streamed)
    monkeypatch.setattr(placement, "STREAM_MEMORY_FRACTION", 1e-12)
    monkeypatch.setattr(anndata.AnnData, "to_memory", refuse)
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST])
    monkeypatch.undo()
    assert status == 0, stderr
    assert _sha256(src) == digest  # the input is byte-identical
    result = anndata.read_h5ad(out)
    params = result.uns["pyro_scvi"]["params"]
    assert params["data_source"].startswith("streamed: counts")
    source = anndata.read_h5ad(src)
    assert (result.X != source.X).nnz == 0  # the counts, copied
    assert list(result.obs.columns) == list(source.obs.columns)
    # the latent space written equals the saved model's on the in-memory data
    model = SCVI.load(params["model_dir"], source, device="cpu")
    np.testing.assert_allclose(
        result.obsm["X_pyro_scvi"], model.get_latent_representation(), rtol=1e-5, atol=1e-6
    )
    norm = result.layers[LAYER_KEY]
    np.testing.assert_allclose(norm.sum(1), params["normalized_library_size"], rtol=1e-3)


def test_streamed_and_in_memory_runs_write_the_same_outputs(src, tmp_path, dense_run):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST, "--data-source", "streamed"])
    assert status == 0, stderr
    result = anndata.read_h5ad(out)
    assert result.uns["pyro_scvi"]["params"]["data_source"] == "streamed: asked for"
    assert dense_run.uns["pyro_scvi"]["params"]["data_source"].startswith("memory")
    np.testing.assert_allclose(
        result.obsm["X_pyro_scvi"], dense_run.obsm["X_pyro_scvi"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(result.layers[LAYER_KEY], dense_run.layers[LAYER_KEY], rtol=1e-4)


@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_outputs_of_an_earlier_run_in_the_input_are_replaced(source, tmp_path, dense_run):
    # an earlier output as input: its layer must not survive a run that writes none
    earlier = tmp_path / "earlier.h5ad"
    dense_run.write_h5ad(earlier)
    out = tmp_path / "out.h5ad"
    argv = ["fit", earlier, "-o", out, *FAST, "--data-source", source]
    status, stderr = _run([*argv, "--normalized-genes", str(dense_run.var_names[0])])
    assert status == 0, stderr
    result = anndata.read_h5ad(out)
    assert LAYER_KEY not in result.layers
    assert list(result.obsm[GENES_KEY].columns) == [str(dense_run.var_names[0])]
    assert result.uns["pyro_scvi"]["params"]["data_source"].startswith(source)


def test_drop_empty_cells_with_a_streamed_input_is_refused(src, tmp_path):
    out = tmp_path / "out.h5ad"
    argv = ["fit", src, "-o", out, *FAST, "--data-source", "streamed", "--drop-empty-cells"]
    status, stderr = _run(argv)
    assert status == 2 and "--data-source memory" in stderr
    assert not out.exists()


# ------------------------------------------------ the query commands on a streamed input


@pytest.fixture
def loads(monkeypatch):
    """Spy on ``AnnData.to_memory``: the number of cells of each load, in order."""
    calls = []
    original = anndata.AnnData.to_memory

    def spy(self, *args, **kwargs):
        calls.append(self.n_obs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(anndata.AnnData, "to_memory", spy)
    return calls


def _run_out(argv, capsys):
    """main(argv) in-process: (exit status, stdout, stderr)."""
    capsys.readouterr()
    status, stderr = _run(argv)
    return status, capsys.readouterr().out, stderr


@pytest.fixture(scope="module")
def model_dir(dense_run):
    return dense_run.uns["pyro_scvi"]["params"]["model_dir"]


def test_evaluate_streamed_equals_in_memory_and_loads_no_counts(
    src, model_dir, tmp_path, capsys, loads
):
    results = {}
    for source in ("memory", "streamed"):
        per_cell = tmp_path / f"{source}.csv"
        argv = ["evaluate", model_dir, src, "--n-samples", "5", "--seed", "3", "--device", "cpu"]
        loads.clear()
        status, out, stderr = _run_out(
            [*argv, "--per-cell", per_cell, "--data-source", source], capsys
        )
        assert status == 0, stderr
        results[source] = (json.loads(out), pd.read_csv(per_cell, index_col="cell"), list(loads))
    memory, streamed = results["memory"], results["streamed"]
    assert memory[2] == [N_CELLS] and streamed[2] == []  # only the memory run loaded the file
    assert memory[0]["data_source"] == "memory: asked for"
    assert streamed[0]["data_source"] == "streamed: asked for"
    assert streamed[0]["n_cells"] == memory[0]["n_cells"] == len(memory[1]) > 0
    pd.testing.assert_frame_equal(streamed[1], memory[1], rtol=1e-6)


def test_evaluate_streamed_per_cell_h5ad_loads_only_the_scored_cells(
    src, model_dir, tmp_path, loads
):
    out = tmp_path / "cells.h5ad"
    argv = ["evaluate", model_dir, src, "--n-samples", "2", "--data-source", "streamed"]
    status, stderr = _run([*argv, "--per-cell", out])
    assert status == 0, stderr
    scored = anndata.read_h5ad(out)
    assert loads == [scored.n_obs] and scored.n_obs < N_CELLS  # the held-out cells only
    assert "pyro_scvi_elbo" in scored.obs
    # every cell's counts would be loaded: refused, naming the options
    status, stderr = _run([*argv, "--per-cell", out, "--cells", "all"])
    assert status == 2 and ".csv" in stderr and "--data-source memory" in stderr


def test_ppc_streamed_equals_in_memory_and_needs_max_cells(src, model_dir, tmp_path, loads):
    argv = ["ppc", model_dir, src, "--n-samples", "4", "--seed", "2", "--device", "cpu"]
    status, stderr = _run([*argv, "-o", tmp_path / "x.nc", "--data-source", "streamed"])
    assert status == 2 and "--max-cells" in stderr and "--data-source memory" in stderr
    assert not (tmp_path / "x.nc").exists()
    tables = {}
    for source in ("memory", "streamed"):
        loads.clear()
        out = tmp_path / f"{source}.nc"
        status, stderr = _run([*argv, "-o", out, "--max-cells", "20", "--data-source", source])
        assert status == 0, stderr
        assert loads == ([N_CELLS] if source == "memory" else [])
        tables[source] = [
            pd.read_csv(tmp_path / f"{source}{suffix}.csv") for suffix in ("", "_criticism")
        ]
    for streamed, memory in zip(tables["streamed"], tables["memory"], strict=True):
        pd.testing.assert_frame_equal(streamed, memory, rtol=1e-5)
    table, criticism = tables["streamed"]
    assert table["ppp"].notna().any()
    assert (criticism["n_cells"] <= 20).all()  # --max-cells caps the criticism page too


def test_de_streamed_equals_in_memory(src, model_dir, tmp_path, capsys, loads):
    results = {}
    for source in ("memory", "streamed"):
        loads.clear()
        out = tmp_path / f"{source}.csv"
        argv = ["de", model_dir, src, "--groupby", "cell_type", "--n-samples", "40"]
        status, stdout, stderr = _run_out(
            [*argv, "--seed", "4", "-o", out, "--data-source", source], capsys
        )
        assert status == 0, stderr
        assert loads == ([N_CELLS] if source == "memory" else [])
        assert f"counts {source}: asked for" in stdout
        results[source] = pd.read_csv(out, index_col="gene")
    assert len(results["memory"]) >= N_GENES
    pd.testing.assert_frame_equal(results["streamed"], results["memory"], rtol=1e-5)


def test_plot_streamed_reads_only_obsm(dense_run, tmp_path, capsys, loads, monkeypatch):
    from pyro_scvi.analysis import plotting

    fitted = tmp_path / "fitted.h5ad"
    dense_run.write_h5ad(fitted)
    drawn = {}

    def capture(adata, path, *, basis, **kwargs):
        drawn[source] = (adata.isbacked, np.array(adata.obsm[basis]))
        Path(path).write_bytes(b"")

    monkeypatch.setattr(plotting, "plot_embedding", capture)
    for source in ("memory", "streamed"):
        status, stdout, stderr = _run_out(
            ["plot", fitted, "-o", tmp_path / "e.png", "--method", "pca", "--data-source", source],
            capsys,
        )
        assert status == 0, stderr
        assert f"counts {source}: asked for" in stdout
    assert loads == [N_CELLS]  # the memory run's
    assert drawn["streamed"][0] and not drawn["memory"][0]
    assert drawn["memory"][1].shape == (N_CELLS, 2)
    np.testing.assert_array_equal(drawn["streamed"][1], drawn["memory"][1])


def test_map_query_streamed_equals_in_memory(tmp_path, loads):
    sim = synthetic_zinb(n_cells=240, n_genes=N_GENES, n_batches=3, seed=5)
    is_query = (sim.obs["batch"] == "batch2").to_numpy()
    ref, query = tmp_path / "ref.h5ad", tmp_path / "query.h5ad"
    sim[~is_query].copy().write_h5ad(ref)
    sim[is_query].copy().write_h5ad(query)
    status, stderr = _run(
        ["fit", ref, "-o", tmp_path / "ref_out.h5ad", *FAST, "--batch-key", "batch"]
    )
    assert status == 0, stderr
    digest = _sha256(query)
    mapped = {}
    for source in ("memory", "streamed"):
        loads.clear()
        out = tmp_path / f"{source}.h5ad"
        argv = ["map-query", tmp_path / "ref_out_model", query, "-o", out]
        status, stderr = _run(
            [*argv, "--max-epochs", "2", "--seed", "1", "--quiet", "--data-source", source]
        )
        assert status == 0, stderr
        assert f"counts {source}: asked for" in stderr
        assert loads == ([int(is_query.sum())] if source == "memory" else [])
        mapped[source] = anndata.read_h5ad(out)
    assert _sha256(query) == digest
    streamed, memory = mapped["streamed"], mapped["memory"]
    assert streamed.uns["pyro_scvi"]["params"]["data_source"] == "streamed: asked for"
    assert (streamed.X != memory.X).nnz == 0  # the query's counts, copied
    assert streamed.obsm["X_pyro_scvi"].shape == (int(is_query.sum()), 3)
    np.testing.assert_allclose(
        streamed.obsm["X_pyro_scvi"], memory.obsm["X_pyro_scvi"], rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("command", ["evaluate", "ppc", "de", "plot", "map-query"])
def test_streamed_shipped_dataset_is_refused_as_by_fit(command, tmp_path):
    (tmp_path / "model").mkdir()  # a folder of its own: outputs never go into a model read
    first = {"plot": []}.get(command, [tmp_path / "model"])
    argv = [command, *first, "pbmc8k_200hvg", "--data-source", "streamed"]
    extra = {
        "ppc": ["-o", tmp_path / "x.nc", "--max-cells", "5"],
        "de": ["--groupby", "cell_type", "-o", tmp_path / "x.csv"],
        "plot": ["-o", tmp_path / "x.png"],
        "map-query": ["-o", tmp_path / "x.h5ad"],
    }.get(command, [])
    status, stderr = _run([*argv, *extra])
    fit_status, fit_stderr = _run(
        ["fit", "pbmc8k_200hvg", "-o", tmp_path / "f.h5ad", "--data-source", "streamed"]
    )
    assert status == fit_status == 2
    message = "--data-source streamed reads an .h5ad file; INPUT is a shipped dataset"
    assert message in stderr and message in fit_stderr
    assert len(stderr.strip().splitlines()) == 1
