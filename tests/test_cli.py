"""Tests of the pyro-scvi command line (pyro_scvi.cli)."""

import hashlib
import json
import subprocess
import sys
import typing
from pathlib import Path

import anndata
import numpy as np
import pytest
import scipy.sparse as sp
from _cli import run_cli as _run
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import NB, SCVI, Poisson, datasets

N_CELLS, N_GENES = 200, 30
FAST = ["--max-epochs", "2", "--batch-size", "64", "--n-latent", "3", "--quiet"]


def _tiny(seed=0, n_batches=2):
    return synthetic_zinb(n_cells=N_CELLS, n_genes=N_GENES, n_batches=n_batches, seed=seed)


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def h5ad(tmp_path):
    path = tmp_path / "in.h5ad"
    _tiny().write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One default end-to-end run, shared by the checks on its outputs."""
    tmp = tmp_path_factory.mktemp("fit")
    src = tmp / "in.h5ad"
    _tiny().write_h5ad(src)
    digest = _sha256(src)
    out = tmp / "out.h5ad"
    status, stderr = _run(["fit", src, "-o", out, *FAST])
    return {
        "src": src,
        "digest": digest,
        "out": out,
        "status": status,
        "stderr": stderr,
        "adata": anndata.read_h5ad(out) if out.exists() else None,
    }


# ---------------------------------------------------------------------------- end to end


def test_fit_exits_zero_and_reports_what_it_wrote(fitted):
    assert fitted["status"] == 0, fitted["stderr"]
    lines = fitted["stderr"].strip().splitlines()
    assert len(lines) == 1
    assert "wrote" in lines[0] and str(fitted["out"]) in lines[0]
    assert "Traceback" not in fitted["stderr"]


def test_fit_output_has_latent_space(fitted):
    adata = fitted["adata"]
    assert adata.shape == (N_CELLS, N_GENES)
    z = adata.obsm["X_pyro_scvi"]
    assert z.shape == (N_CELLS, 3)
    assert np.isfinite(z).all()
    assert z.std(0).min() > 0  # not a constant embedding


def test_fit_output_has_normalized_expression(fitted):
    adata = fitted["adata"]
    norm = np.asarray(adata.layers["pyro_scvi_normalized"])
    assert norm.shape == (N_CELLS, N_GENES)
    assert np.isfinite(norm).all() and (norm >= 0).all()
    params = adata.uns["pyro_scvi"]["params"]
    library = float(params["normalized_library_size"])
    np.testing.assert_allclose(norm.sum(1), library, rtol=1e-3)
    # Scaled to the median library size of the input counts.
    totals = np.asarray(adata.X.sum(1)).ravel()
    assert library == pytest.approx(float(np.median(totals)))


def test_fit_output_records_params_and_history(fitted):
    uns = fitted["adata"].uns["pyro_scvi"]
    params = uns["params"]
    assert params["n_latent"] == 3
    assert params["max_epochs"] == 2
    assert params["batch_size"] == 64
    assert params["likelihood"] == "ZINB()"
    assert params["batch_key"] == "None"
    assert params["input"] == str(fitted["src"])
    history = uns["history"]
    assert {"epoch", "train_elbo", "validation_elbo"} <= set(history)
    for column in history.values():
        assert len(column) == 2
    np.testing.assert_array_equal(history["epoch"], [0, 1])
    assert np.isfinite(history["train_elbo"]).all()


def test_fit_writes_a_png_training_curve(fitted):
    png = fitted["out"].with_name("out_training.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 1000


def test_fit_saves_a_loadable_model_with_the_stored_latent_space(fitted):
    model_dir = fitted["out"].with_name("out_model")
    manifest = json.loads((model_dir / "manifest.json").read_text())
    assert manifest["n_genes"] == N_GENES and manifest["settings"]["n_latent"] == 3
    adata = fitted["adata"]
    model = SCVI.load(model_dir, adata, device="cpu")
    assert model.is_trained and len(model.history) == 2
    np.testing.assert_allclose(
        model.get_latent_representation(), adata.obsm["X_pyro_scvi"], rtol=1e-4, atol=1e-5
    )


def test_fit_leaves_the_input_file_byte_identical(fitted):
    assert fitted["status"] == 0
    assert _sha256(fitted["src"]) == fitted["digest"]
    # Nothing but the documented outputs was written beside the input.
    names = sorted(p.name for p in fitted["src"].parent.iterdir())
    assert names == ["in.h5ad", "out.h5ad", "out_model", "out_training.png"]


# ---------------------------------------------------------------------------- options


def test_batch_key_and_nb_likelihood(h5ad, tmp_path):
    out = tmp_path / "res" / "nb.h5ad"
    status, stderr = _run(
        ["fit", h5ad, "-o", out, "--batch-key", "batch", "--likelihood", "nb", *FAST]
    )
    assert status == 0, stderr
    adata = anndata.read_h5ad(out)
    params = adata.uns["pyro_scvi"]["params"]
    assert params["batch_key"] == "batch"
    assert params["likelihood"] == "NB()"
    model = SCVI.load(out.with_name("nb_model"), adata, device="cpu")
    assert model.batch_categories == ("batch0", "batch1")
    assert isinstance(model.model.likelihood, NB)
    assert model.settings["batch_key"] == "batch"


def test_dispersion_per_batch_is_fitted_saved_and_checked_on_resume(h5ad, tmp_path):
    out = tmp_path / "gb.h5ad"
    argv = ["fit", h5ad, "-o", out, "--batch-key", "batch", "--dispersion", "gene-batch"]
    status, stderr = _run([*argv, *FAST])
    assert status == 0, stderr
    adata = anndata.read_h5ad(out)
    model = SCVI.load(out.with_name("gb_model"), adata, device="cpu")
    assert model.settings["dispersion"] == "gene-batch"
    # one theta per gene and batch: a (batches, genes) parameter, the same in every cell of a batch
    assert dict(model.model.named_parameters())["log_theta"].shape == (2, N_GENES)
    theta = model.get_likelihood_parameters(n_samples=1, give_mean=True)["dispersions"]
    codes = adata.obs["batch"].cat.codes.to_numpy()
    for code in (0, 1):
        assert np.array_equal(
            theta[codes == code], np.repeat(theta[codes == code][:1], (codes == code).sum(), 0)
        )
    status, stderr = _run(["fit", h5ad, "-o", tmp_path / "bad.h5ad", "--dispersion", "gene-gene"])
    assert status == 2 and "--dispersion" in stderr and "gene-batch" in stderr
    status, stderr = _run(["fit", h5ad, "-o", tmp_path / "nb.h5ad", "--dispersion", "gene-batch"])
    assert status == 2 and "needs --batch-key KEY" in stderr
    assert not (tmp_path / "nb.h5ad").exists()


def test_dispersion_choices_match_the_model():
    from pyro_scvi.cli import DISPERSION_NAMES
    from pyro_scvi.model.generative import Dispersion

    assert sorted(DISPERSION_NAMES) == sorted(typing.get_args(Dispersion))


def test_layer_poisson_and_model_dir(tmp_path):
    adata = _tiny()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))  # normalized in .X, as users do
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    model_dir = tmp_path / "models" / "mine"
    status, stderr = _run(
        [
            "fit",
            src,
            "-o",
            out,
            "--layer",
            "counts",
            "--likelihood",
            "poisson",
            "--model-dir",
            model_dir,
            *FAST,
        ]
    )
    assert status == 0, stderr
    assert (model_dir / "model.pt").exists()
    assert not (tmp_path / "out_model").exists()
    result = anndata.read_h5ad(out)
    params = result.uns["pyro_scvi"]["params"]
    assert params["layer"] == "counts" and params["likelihood"] == "Poisson()"
    assert params["model_dir"] == str(model_dir)
    # Library scaled to the median of the counts layer, not of the log data in .X.
    totals = np.asarray(result.layers["counts"].sum(1)).ravel()
    assert params["normalized_library_size"] == pytest.approx(float(np.median(totals)))
    np.testing.assert_allclose(
        result.layers["pyro_scvi_normalized"].sum(1), np.median(totals), rtol=1e-4
    )
    model = SCVI.load(model_dir, result, device="cpu")
    assert isinstance(model.model.likelihood, Poisson)
    np.testing.assert_allclose(
        model.get_latent_representation(), result.obsm["X_pyro_scvi"], rtol=1e-4, atol=1e-5
    )


def test_drop_empty_cells(tmp_path):
    adata = _tiny()
    X = adata.X.toarray()
    X[[0, 5, 17]] = 0
    adata.X = sp.csr_matrix(X)
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"

    status, stderr = _run(["fit", src, "-o", out, *FAST])
    assert status == 2
    assert "3 of 200 cells have zero total counts" in stderr
    assert not out.exists()

    status, stderr = _run(["fit", src, "-o", out, "--drop-empty-cells", *FAST])
    assert status == 0, stderr
    assert "dropping 3 cells" in stderr
    result = anndata.read_h5ad(out)
    assert result.n_obs == 197
    expected = [name for i, name in enumerate(adata.obs_names) if i not in (0, 5, 17)]
    assert list(result.obs_names) == expected
    assert result.obsm["X_pyro_scvi"].shape == (197, 3)
    assert (np.asarray(result.X.sum(1)).ravel() > 0).all()


# ---------------------------------------------------------------------------- bad arguments


def _check_one_line_error(status, stderr, *fragments):
    assert status == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("pyro-scvi")
    assert "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--likelihood", "gaussian"], "invalid choice: 'gaussian'"),
        (["--n-latent", "0"], "--n-latent"),
        (["--n-latent", "-2"], "--n-latent"),
        (["--n-latent", "two"], "--n-latent"),
        (["--lr", "0"], "--lr"),
        (["--lr", "-0.01"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--max-epochs", "0"], "--max-epochs"),
        (["--batch-size", "0"], "--batch-size"),
        (["--threads", "0"], "--threads"),
        (["--layer", "counts"], "Layer 'counts' not found"),
        (["--batch-key", "sample"], "batch_key 'sample'"),
        (["--no-such-option"], "unrecognized arguments"),
    ],
)
def test_bad_options_give_one_line_and_status_2(h5ad, tmp_path, extra, fragment):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, "--quiet", "--max-epochs", "1", *extra])
    _check_one_line_error(status, stderr, fragment)
    assert not out.exists()
    assert not (tmp_path / "out_model").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--n-latent", "two", "argument --n-latent: expected a positive integer, got 'two'"),
        ("--n-latent", "0", "argument --n-latent: expected a positive integer, got '0'"),
        ("--lr", "fast", "argument --lr: expected a positive number, got 'fast'"),
        ("--lr", "inf", "argument --lr: expected a positive finite number, got 'inf'"),
        ("--lr", "-1", "argument --lr: expected a positive finite number, got '-1'"),
        ("--seed", "one", "argument --seed: expected an integer seed, got 'one'"),
        ("--seed", "-1", "argument --seed: the seed must be in 0..4294967295, got '-1'"),
        ("--seed", str(2**32), f"the seed must be in 0..4294967295, got '{2**32}'"),
        ("--checkpoint-every", "x", "--checkpoint-every: expected an integer >= 0, got 'x'"),
        ("--checkpoint-every", "-1", "--checkpoint-every: expected an integer >= 0, got '-1'"),
    ],
)
def test_option_types_name_the_value_they_refuse(h5ad, tmp_path, option, value, message):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, "--quiet", option, value])
    _check_one_line_error(status, stderr, message)
    assert not out.exists()


def test_missing_input_file(tmp_path):
    status, stderr = _run(["fit", tmp_path / "nope.h5ad", "-o", tmp_path / "out.h5ad"])
    _check_one_line_error(status, stderr, "neither an existing file nor a shipped dataset")


@pytest.mark.parametrize("spelling", ["same", "dotdot"])
def test_output_equal_to_input_is_refused(h5ad, spelling):
    digest = _sha256(h5ad)
    out = h5ad if spelling == "same" else h5ad.parent / "sub" / ".." / h5ad.name
    (h5ad.parent / "sub").mkdir()
    status, stderr = _run(["fit", h5ad, "-o", out, "--quiet"])
    _check_one_line_error(status, stderr, "never overwritten")
    assert _sha256(h5ad) == digest


@pytest.mark.parametrize("name", ["out.csv", "out", "out.h5"])
def test_output_must_end_in_h5ad(h5ad, tmp_path, name):
    status, stderr = _run(["fit", h5ad, "-o", tmp_path / name, "--quiet"])
    _check_one_line_error(status, stderr, "must end in .h5ad")
    assert not (tmp_path / name).exists()


def test_missing_output_option(h5ad):
    status, stderr = _run(["fit", h5ad])
    _check_one_line_error(status, stderr, "-o/--output")


def test_non_integer_counts_in_the_file(tmp_path):
    adata = _tiny()
    adata.X = sp.csr_matrix(np.log1p(adata.X.toarray()))
    src = tmp_path / "log.h5ad"
    adata.write_h5ad(src)
    status, stderr = _run(["fit", src, "-o", tmp_path / "out.h5ad", "--quiet"])
    _check_one_line_error(status, stderr, "non-integer values", "raw counts")


@pytest.mark.parametrize(
    "kind",
    [
        "text",
        pytest.param(
            "hdf5-not-anndata",
            marks=pytest.mark.filterwarnings("ignore:Element '/foo' was written without"),
        ),
        "truncated",
        "directory",
    ],
)
def test_file_that_is_not_h5ad(h5ad, tmp_path, kind):
    bad = tmp_path / "bad.h5ad"
    if kind == "text":
        bad.write_text("cell,gene\n1,2\n")
    elif kind == "hdf5-not-anndata":
        import h5py

        with h5py.File(bad, "w") as f:
            f["foo"] = np.arange(3)
    elif kind == "truncated":
        data = h5ad.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    else:
        bad.mkdir()
    status, stderr = _run(["fit", bad, "-o", tmp_path / "out.h5ad", "--quiet"])
    _check_one_line_error(status, stderr, "cannot read", "as .h5ad")


def test_infinite_learning_rate_is_refused(h5ad, tmp_path):
    status, stderr = _run(["fit", h5ad, "-o", tmp_path / "out.h5ad", "--lr", "inf", *FAST])
    _check_one_line_error(status, stderr, "--lr")


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # the point of the test
def test_training_that_fails_in_its_first_epoch_writes_nothing(h5ad, tmp_path):
    # before: the untrained initialization was saved as "the last good model", exit 1
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, "--lr", "1e10", *FAST])
    assert status == 1
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert "no epoch had completed" in stderr and "Nothing was written" in stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_training_that_fails_later_writes_the_last_complete_epoch(h5ad, tmp_path, monkeypatch):
    # Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
    from pyro_scvi.train.stepper import Stepper

    real, calls = Stepper.step, []

    def poison_second_epoch(self, *args, **kwargs):
        calls.append(1)  # 3 steps per epoch: the 5th is epoch 1, step 1
        return float("nan") if len(calls) == 5 else real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", poison_second_epoch)
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, *FAST])
    assert status == 1, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert "end of epoch 0" in stderr
    result = anndata.read_h5ad(out)
    assert "epoch 1, step 1" in result.uns["pyro_scvi"]["params"]["stopped"]
    model = SCVI.load(tmp_path / "out_model", result, device="cpu")
    assert model.is_trained and list(model.history["epoch"]) == [0]
    assert np.isfinite(model.get_latent_representation()).all()
    manifest = json.loads((tmp_path / "out_model" / "manifest.json").read_text())
    assert manifest["run_id"] == result.uns["pyro_scvi"]["params"]["run_id"]


def test_output_equal_to_a_shipped_dataset_is_refused(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.h5ad"
    _tiny().write_h5ad(shipped)
    digest = _sha256(shipped)
    monkeypatch.setitem(datasets.SHIPPED, "tiny_shipped", shipped.name)
    monkeypatch.setattr(datasets, "path", lambda name="tiny_shipped": shipped)
    status, stderr = _run(["fit", "tiny_shipped", "-o", shipped, *FAST])
    assert _sha256(shipped) == digest
    _check_one_line_error(status, stderr, "never overwritten")


def test_shipped_dataset_name_is_accepted_as_input(tmp_path, monkeypatch):
    shipped = tmp_path / "elsewhere" / "tiny.h5ad"
    shipped.parent.mkdir()
    _tiny(n_batches=1).write_h5ad(shipped)
    monkeypatch.setitem(datasets.SHIPPED, "tiny_shipped", shipped.name)
    monkeypatch.setattr(datasets, "path", lambda name="tiny_shipped": shipped)
    monkeypatch.chdir(tmp_path)
    status, stderr = _run(["fit", "tiny_shipped", "-o", "out.h5ad", *FAST])
    assert status == 0, stderr
    result = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert result.obsm["X_pyro_scvi"].shape == (N_CELLS, 3)
    assert result.uns["pyro_scvi"]["params"]["input"] == "tiny_shipped"


# ---------------------------------------------------------------------------- console script


def test_console_script(tmp_path):
    script = Path(sys.executable).parent / "pyro-scvi"
    assert script.exists()
    # Run both at once: each pays for importing torch and pyro.
    help_proc = subprocess.Popen(
        [str(script), "fit", "--help"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    fail_proc = subprocess.Popen(
        [str(script), "fit", str(tmp_path / "missing.h5ad"), "-o", str(tmp_path / "o.h5ad")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    help_out, help_err = help_proc.communicate(timeout=120)
    fail_out, fail_err = fail_proc.communicate(timeout=120)

    assert help_proc.returncode == 0, help_err
    assert "usage: pyro-scvi fit" in help_out
    for option in ["--batch-key", "--likelihood", "--layer", "--drop-empty-cells"]:
        assert option in help_out
    assert "Traceback" not in help_err

    assert fail_proc.returncode == 2
    assert "Traceback" not in fail_err
    lines = fail_err.strip().splitlines()
    assert len(lines) == 1 and "missing.h5ad" in lines[0]
    assert fail_out == ""


def test_threads_option_sets_torch_threads(h5ad, tmp_path):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        status, _ = _run(["fit", h5ad, "-o", tmp_path / "out.h5ad", *FAST, "--threads", "1"])
        assert status == 0 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("choice, expected_calls", [("on", True), ("off", False)])
def test_fit_fused_kernel_option_switches_the_zinb_kernel(
    h5ad, tmp_path, monkeypatch, choice, expected_calls
):
    # The compiled kernels are swapped for counting eager ones through the documented seam
    # kernels.compiled_kernels (the switch is under test, not the compiler), and the
    # automatic rule is made to say "on" for this tiny run, so that "off" has something
    # to override.
    from pyro_scvi.train import engine, kernels

    monkeypatch.setattr(engine, "FUSED_MIN_GENES", 1)
    monkeypatch.setattr(engine, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "precompile", lambda device="cpu": True)
    calls = []
    forward, grads = kernels.zinb_log_prob_forward, kernels.zinb_log_prob_grads
    counting = (lambda *a: calls.append(1) or forward(*a), grads)
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: counting)
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, *FAST, "--fused-kernel", choice])
    assert status == 0, stderr
    assert bool(calls) is expected_calls
    recorded = anndata.read_h5ad(out).uns["pyro_scvi"]["params"]["engine"]
    assert bool(recorded["fused_kernel"]) is expected_calls
    assert recorded["reasons"]["fused_kernel"] == f"{choice}: asked for"


def test_fit_engine_options_are_recorded_with_the_run(h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    args = ["fit", h5ad, "-o", out, *FAST, "--engine", "pyro", "--threads", "1"]
    status, stderr = _run(args)
    assert status == 0, stderr
    recorded = anndata.read_h5ad(out).uns["pyro_scvi"]["params"]["engine"]
    assert not recorded["fused_adam"] and not recorded["compiled"]
    assert int(recorded["threads"]) == 1
    saved = json.loads((tmp_path / "out_model" / "manifest.json").read_text())
    assert saved["engine"]["fused_adam"] is False


def test_fit_observed_library_option_conditions_on_the_totals(h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, *FAST, "--observed-library"])
    assert status == 0, stderr
    saved = json.loads((tmp_path / "out_model" / "manifest.json").read_text())
    assert saved["settings"]["use_observed_lib_size"] is True
    model = SCVI.load(tmp_path / "out_model", anndata.read_h5ad(h5ad))
    assert not model.model.library_prior.latent  # no l site: the totals are observed
    default = tmp_path / "default.h5ad"
    assert _run(["fit", h5ad, "-o", default, *FAST])[0] == 0
    saved = json.loads((tmp_path / "default_model" / "manifest.json").read_text())
    assert saved["settings"]["use_observed_lib_size"] is False


def test_fit_library_residual_option_reaches_the_guide_and_the_record(h5ad, tmp_path):
    adata = anndata.read_h5ad(h5ad)
    for flag, expected in ((None, True), ("--no-library-residual", False)):
        out = tmp_path / f"{expected}.h5ad"
        status, stderr = _run(["fit", h5ad, "-o", out, *FAST, *([flag] if flag else [])])
        assert status == 0, stderr
        assert anndata.read_h5ad(out).uns["pyro_scvi"]["params"]["library_residual"] == expected
        model = SCVI.load(tmp_path / f"{expected}_model", adata)
        assert model.guide.library_residual is expected
    # it centres q(l) on the observed library, which an observed library does not have
    status, stderr = _run(
        ["fit", h5ad, "-o", tmp_path / "o.h5ad", *FAST, "--observed-library", "--library-residual"]
    )
    assert status != 0 and "library_residual" in stderr


def test_help_imports_nothing_heavy():
    """`pyro-scvi --help` answers without importing torch, Pyro, numpy or AnnData."""
    code = (
        "import sys, contextlib, io\n"
        "from pyro_scvi.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted(m for m in ('torch', 'pyro', 'numpy', 'anndata') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_fit_imports_scipy_stats_only_when_de_needs_it():
    """The facade, tl and fit leave scipy.stats (half a second) to the DE code that uses it."""
    code = (
        "import sys\n"
        "import pyro_scvi.cli.fit, pyro_scvi.scvi, pyro_scvi.tl, pyro_scvi.io.outputs\n"
        "print('scipy.stats' in sys.modules)\n"
        "from pyro_scvi.analysis import de\n"
        "print(round(float(de.stats.norm.sf(0.0)), 2), 'scipy.stats' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["False", "0.5", "True"]


def test_likelihood_choices_match_the_likelihoods():
    from pyro_scvi.cli import LIKELIHOOD_NAMES
    from pyro_scvi.model.likelihoods import LIKELIHOODS

    assert sorted(LIKELIHOOD_NAMES) == sorted(LIKELIHOODS)


def test_fit_records_how_training_ended(fitted):
    params = fitted["adata"].uns["pyro_scvi"]["params"]
    # early stopping is on by default; --max-epochs 2 ends the run first
    assert bool(params["stopping_early_stopping"]) is True
    assert int(params["stopped_epoch"]) == 1 and params["stop_reason"].startswith("max_epochs")
    assert "after 2 epochs (max_epochs)" in fitted["stderr"]


def test_fit_restore_best_epoch_is_recorded(fitted, h5ad, tmp_path):
    assert bool(fitted["adata"].uns["pyro_scvi"]["params"]["restore_best_epoch"]) is False
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, *FAST, "--restore-best-epoch"])
    assert status == 0, stderr
    params = anndata.read_h5ad(out).uns["pyro_scvi"]["params"]
    # two epochs, both of the KL warm-up: none counts, so none is restored
    assert bool(params["restore_best_epoch"]) is True and "restored_epoch" not in params


def test_fit_no_early_stopping_is_recorded(h5ad, tmp_path):
    out = tmp_path / "out.h5ad"
    status, stderr = _run(["fit", h5ad, "-o", out, *FAST, "--no-early-stopping"])
    assert status == 0, stderr
    params = anndata.read_h5ad(out).uns["pyro_scvi"]["params"]
    assert bool(params["stopping_early_stopping"]) is False
