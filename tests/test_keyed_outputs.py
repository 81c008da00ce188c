"""Outputs keyed by name (issue 27, item 1): permuted genes or cells never move a result.

A model computes per-gene values in its own gene order; every output goes back to the
AnnData's ``var_names`` by name, and per-cell outputs follow the AnnData's cells. The
property test permutes the genes and cells of the input of a fitted model and checks each
output against the unpermuted one, through the Python API (``SCVI.load`` then
``tl.write_results`` and the queries) and through ``pyro-scvi fit --resume``.
"""

import functools
import os
import shlex
import signal

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from _cli import run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyro_scvi.datasets import synthetic_zinb

import pyro_scvi
from pyro_scvi import SCVI, InputError

# Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

N_CELLS, N_GENES = 60, 12
FAST = ["--max-epochs", "3", "--batch-size", "64", "--n-latent", "3", "--quiet"]
EXACT = ["--engine", "eager", "--threads", "1"]


#: the CLI in-process; its stdout is not under test here, and a status of 2 must be the
#: command's own refusal: an argparse usage error (SystemExit) fails the test
_run = functools.partial(run_cli, stdout="drop", catch_exit=False)


def _by_name(values, adata):
    return pd.DataFrame(np.asarray(values), index=adata.obs_names, columns=adata.var_names)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A trained model's folder and the AnnData it was trained on."""
    adata = synthetic_zinb(n_cells=N_CELLS, n_genes=N_GENES, n_batches=2, n_clusters=2, seed=0)
    model = SCVI(adata, batch_key="batch", n_latent=2, n_hidden=8)
    model.train(3, progress_bar=False, engine=pyro_scvi.Engine(threads=1))
    folder = tmp_path_factory.mktemp("keyed") / "model"
    model.save(folder)
    return folder, adata


def _outputs(model, adata):
    """Every per-gene and per-cell output of ``model`` on ``adata``, as name-keyed frames."""
    out = {}
    target = adata.copy()
    torch.manual_seed(0)
    pyro_scvi.tl.write_results(model, target, normalized_key="norm", n_samples=2)
    out["latent"] = pd.DataFrame(target.obsm["X_pyro_scvi"], index=adata.obs_names)
    out["layer"] = _by_name(target.layers["norm"], adata)
    torch.manual_seed(1)
    out["normalized"] = model.get_normalized_expression(adata, n_samples=2)
    torch.manual_seed(1)
    samples = model.get_normalized_expression(adata, n_samples=2, return_mean=False)
    out["samples"] = _by_name(samples[1], adata)
    params = model.get_likelihood_parameters(adata, n_samples=2, give_mean=True, seed=2)
    for key, value in params.items():
        out[f"params_{key}"] = _by_name(value, adata)
    out["dropout"] = _by_name(model.get_dropout_probability(adata, n_samples=2, seed=3), adata)
    for key, frame in model.impute(adata, n_samples=3, seed=4).items():
        out[f"impute_{key}"] = frame
    out["elbo"] = pd.DataFrame(model.get_elbo(adata, per_cell=True, seed=5), index=adata.obs_names)
    table = model.differential_expression(
        adata, groupby="cell_type", group1="type0", n_samples=30, seed=6
    )
    out["de"] = table.drop(columns=[c for c in table.columns if table[c].dtype == object])
    return out


def _compare(candidate, reference, cells):
    """Each of ``candidate`` equals ``reference`` matched by cell and gene name."""
    for key, frame in candidate.items():
        want = reference[key]
        if key == "de":  # genes are its rows
            want = want.loc[frame.index]
        else:
            want = want.loc[frame.index]
            if key != "latent" and key != "elbo":
                assert list(frame.columns) == list(cells.var_names), key
                want = want[frame.columns]
        np.testing.assert_allclose(
            frame.to_numpy(dtype=float), want.to_numpy(dtype=float), rtol=2e-5, atol=1e-6,
            err_msg=key,
        )  # fmt: skip


@settings(
    max_examples=6,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    genes=st.permutations(range(N_GENES)),
    cells=st.permutations(range(N_CELLS)),
)
def test_permuted_genes_and_cells_give_every_output_by_name(saved, genes, cells):
    # before: tl.write_results after SCVI.load(model, reordered) wrote the normalized layer
    # in the model's gene order under the AnnData's var_names (max error 243 on this data);
    # queries returned arrays in the model's order
    folder, adata = saved
    genes, cells = np.asarray(genes), np.asarray(cells)
    # the reference: the model on the genes as it knows them, the cells in the new order
    # (per-cell random draws follow the cells' positions, so those are kept alike)
    same_genes = adata[cells].copy()
    reference = _outputs(SCVI.load(folder, same_genes, device="cpu"), same_genes)
    permuted = adata[cells][:, genes].copy()
    model = SCVI.load(folder, permuted, device="cpu")
    candidate = _outputs(model, permuted)
    _compare(candidate, reference, permuted)
    # the cells' order moves no cell's latent space or ELBO either
    base = _outputs(SCVI.load(folder, adata, device="cpu"), adata)
    for key in ("latent",):
        np.testing.assert_allclose(
            candidate[key].to_numpy(), base[key].loc[candidate[key].index].to_numpy(), rtol=1e-5
        )


def test_a_query_on_other_genes_is_one_line_naming_the_fix(saved):
    folder, adata = saved
    model = SCVI.load(folder, adata, device="cpu")
    other = adata[:, 1:].copy()
    with pytest.raises(InputError, match=r"needs every gene it was trained on"):
        model.get_normalized_expression(other)
    target = adata[:, ::-1].copy()
    target.var_names = [f"x{i}" for i in range(N_GENES)]
    with pytest.raises(InputError, match=r"genes differ from the model's"):
        pyro_scvi.tl.write_results(model, target, normalized_key="norm")


# ----------------------------------------------------------------- the command line


def _interrupt_at_step(step):
    real, calls = Stepper.step, []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    return hooked


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """An uninterrupted fit of the input, with a checkpoint of its end."""
    tmp = tmp_path_factory.mktemp("whole")
    synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0).write_h5ad(tmp / "in.h5ad")
    argv = ["fit", tmp / "in.h5ad", "-o", tmp / "out.h5ad", *FAST, *EXACT]
    status, stderr = _run([*argv, "--checkpoint-dir", tmp / "ck", "--checkpoint-every", "3"])
    assert status == 0, stderr
    return tmp


def _same_by_name(result_path, whole_path):
    got, want = anndata.read_h5ad(result_path), anndata.read_h5ad(whole_path)
    got_layer = _by_name(got.layers["pyro_scvi_normalized"], got)
    want_layer = _by_name(want.layers["pyro_scvi_normalized"], want)
    np.testing.assert_array_equal(
        got_layer.to_numpy(), want_layer.loc[got.obs_names, got.var_names].to_numpy()
    )
    np.testing.assert_array_equal(got.obsm["X_pyro_scvi"], want.obsm["X_pyro_scvi"])
    # the counts beside it are the file's own, in its gene order
    x = got.X.toarray() if hasattr(got.X, "toarray") else np.asarray(got.X)
    wx = want.X.toarray() if hasattr(want.X, "toarray") else np.asarray(want.X)
    np.testing.assert_array_equal(x, _by_name(wx, want)[got.var_names].to_numpy())


@pytest.mark.parametrize("source", ["memory", "streamed"])
@pytest.mark.parametrize("seed", [0, 1])
def test_fit_resume_on_permuted_genes_writes_every_output_by_name(whole, tmp_path, source, seed):
    # before: exit 0 with layers["pyro_scvi_normalized"] in the model's gene order under
    # the file's var_names (max error 94 here); streamed, the file was refused
    genes = np.random.default_rng(seed).permutation(30)
    permuted = tmp_path / "permuted.h5ad"
    anndata.read_h5ad(whole / "in.h5ad")[:, genes].copy().write_h5ad(permuted)
    # a finished run's checkpoint: --resume writes the outputs from it
    argv = ["fit", permuted, "-o", tmp_path / "out.h5ad", *FAST, *EXACT]
    argv += ["--data-source", source, "--checkpoint-dir", whole / "ck", "--resume"]
    status, stderr = _run(argv)
    assert status == 0, stderr
    _same_by_name(tmp_path / "out.h5ad", whole / "out.h5ad")


def test_an_interrupted_fit_resumed_on_reversed_genes_matches_the_whole_run(
    whole, tmp_path, monkeypatch
):
    # the resumed training reads the counts by name too: the same model, the same outputs
    argv = ["fit", whole / "in.h5ad", "-o", tmp_path / "out.h5ad", *FAST, *EXACT]
    monkeypatch.setattr(Stepper, "step", _interrupt_at_step(5))
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 130, stderr
    command = shlex.split(stderr.split("Resume with: ")[1].strip().splitlines()[0])
    reversed_genes = tmp_path / "reversed.h5ad"
    anndata.read_h5ad(whole / "in.h5ad")[:, ::-1].copy().write_h5ad(reversed_genes)
    command[command.index(str(whole / "in.h5ad"))] = str(reversed_genes)
    status, stderr = _run(command[1:])
    assert status == 0, stderr
    _same_by_name(tmp_path / "out.h5ad", whole / "out.h5ad")


@pytest.mark.parametrize("source", ["memory", "streamed"])
def test_fit_resume_on_other_genes_is_one_line(whole, tmp_path, source):
    # a different set of genes is not a permutation: refused, naming the fix
    fewer = tmp_path / "fewer.h5ad"
    anndata.read_h5ad(whole / "in.h5ad")[:, 1:].copy().write_h5ad(fewer)
    argv = ["fit", fewer, "-o", tmp_path / "out.h5ad", *FAST, *EXACT]
    status, stderr = _run(
        [*argv, "--data-source", source, "--checkpoint-dir", whole / "ck", "--resume"]
    )
    assert status == 2 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "genes are missing" in stderr
    assert not (tmp_path / "out.h5ad").exists()
