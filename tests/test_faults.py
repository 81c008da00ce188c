"""Fault injection: each way a run could lose or damage the user's files, as a test.

The cases follow issue 16's list (numbers in the test names' comments): outputs that would
destroy data, a full disk, unwritable outputs, damaged model files, interrupts, duplicated
names, failures in the first epoch, bad seeds and closed pipes.
"""

import errno
import functools
import hashlib
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from _cli import run_cli
from pyro_scvi.datasets import synthetic_zinb

import pyro_scvi
import pyro_scvi.io.files as files
import pyro_scvi.io.outputs as outputs
import pyro_scvi.io.persistence as persistence
from pyro_scvi import SCVI
from pyro_scvi.errors import TrainingError, TrainingWarning

# Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

FAST = ["--max-epochs", "3", "--batch-size", "64", "--n-latent", "3", "--quiet"]
EXACT = ["--engine", "eager", "--threads", "1"]


#: the CLI in-process; its stdout (reports) is not under test here
_run = functools.partial(run_cli, stdout="drop")


def _one_line(status, stderr, code=2):
    assert status == code, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def _digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


@pytest.fixture
def raw(tmp_path):
    """A user's folder: the input and a file of theirs."""
    folder = tmp_path / "raw"
    folder.mkdir()
    synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0).write_h5ad(folder / "in.h5ad")
    (folder / "notes.txt").write_text("lab notes")
    return folder


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if training starts: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started before the outputs were checked")

    monkeypatch.setattr(SCVI, "train", refuse)
    monkeypatch.setattr(SCVI, "resume", refuse)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fitted")
    src = tmp / "in.h5ad"
    synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0).write_h5ad(src)
    status, stderr = _run(["fit", src, "-o", tmp / "out.h5ad", *FAST])
    assert status == 0, stderr
    return tmp


# ------------------------------------------------------- 1. outputs that would destroy data


def test_model_dir_set_to_the_inputs_folder_is_refused(raw, tmp_path, no_training):
    # before: raw/ ended up holding only model.pt and settings.json (exit 0)
    before = {p: _digest(raw / p) for p in _listing(raw)}
    listed = _listing(tmp_path)
    status, stderr = _run(
        ["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", *FAST, "--model-dir", raw]
    )
    _one_line(status, stderr)
    assert "--model-dir" in stderr and "in.h5ad" in stderr
    assert {p: _digest(raw / p) for p in _listing(raw)} == before
    assert _listing(tmp_path) == listed  # nothing written beside it either


def test_model_dir_set_to_the_input_file_is_refused(raw, tmp_path, no_training):
    digest = _digest(raw / "in.h5ad")
    status, stderr = _run(
        ["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", *FAST, "--model-dir", raw / "in.h5ad"]
    )
    _one_line(status, stderr)
    assert (raw / "in.h5ad").is_file() and _digest(raw / "in.h5ad") == digest


def test_model_dir_dot_is_refused_before_training(raw, monkeypatch, no_training):
    # before: it failed after training, with a traceback
    monkeypatch.chdir(raw)
    status, stderr = _run(["fit", "in.h5ad", "-o", "o.h5ad", *FAST, "--model-dir", "."])
    _one_line(status, stderr)
    assert _listing(raw) == ["in.h5ad", "notes.txt"]


@pytest.mark.parametrize("option", ["--model-dir", "--checkpoint-dir"])
def test_the_current_folder_as_a_model_folder_is_refused(raw, tmp_path, monkeypatch, option):
    # before (issue 27): in an empty folder, training ran, then a traceback
    # "PosixPath('.') has an empty name"
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    monkeypatch.setattr(SCVI, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", *FAST, option, "."])
    _one_line(status, stderr)
    assert f"{option} . is the current folder" in stderr
    assert _listing(empty) == [] and not (tmp_path / "o.h5ad").exists()


def test_saving_into_the_current_folder_is_refused(tmp_path, monkeypatch):
    from pyro_scvi.errors import OutputError

    monkeypatch.chdir(tmp_path)
    model = SCVI(synthetic_zinb(n_cells=20, n_genes=10, seed=0), n_latent=2, n_hidden=8)
    with pytest.raises(OutputError, match="current folder"):
        model.save(".", overwrite=True)
    assert _listing(tmp_path) == []


def test_output_inside_the_model_dir_is_refused(raw, tmp_path, no_training):
    status, stderr = _run(
        [
            "fit",
            raw / "in.h5ad",
            "-o",
            tmp_path / "m" / "o.h5ad",
            *FAST,
            "--model-dir",
            tmp_path / "m",
        ]
    )
    _one_line(status, stderr)


# ----------------------------------------------------------------------- 2. a full disk


def test_a_disk_too_small_is_found_before_training(raw, tmp_path, monkeypatch, no_training):
    monkeypatch.setattr(files, "free_bytes", lambda path: 2**20)
    listed = _listing(tmp_path)
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", *FAST])
    _one_line(status, stderr)
    assert "not enough free space" in stderr
    assert _listing(tmp_path) == listed


def _outputs(folder):
    h5ad = anndata.read_h5ad(folder / "out.h5ad")
    manifest = json.loads((folder / "out_model" / "manifest.json").read_text())
    return h5ad.uns["pyro_scvi"]["params"]["run_id"], manifest["run_id"]


def test_a_disk_that_fills_while_writing_leaves_the_old_outputs_whole(
    fitted, tmp_path, monkeypatch
):
    # before: a segfault (exit 139), a hidden temporary left behind, and the new model
    # and PNG beside the old .h5ad
    folder = tmp_path / "run"
    import shutil

    shutil.copytree(fitted, folder)
    before = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}
    h5ad_id, model_id = _outputs(folder)
    assert h5ad_id == model_id

    def write_half_then_fail(adata, path, *args, **kwargs):
        Path(path).write_bytes(b"\x89HDF\r\n" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    # the .h5ad writer (a real full disk: tests/test_faults_after_training.py)
    monkeypatch.setattr(outputs, "write_h5ad", write_half_then_fail)
    status, stderr = _run(["fit", folder / "in.h5ad", "-o", folder / "out.h5ad", *FAST])
    _one_line(status, stderr, code=1)
    assert "No space left on device" in stderr
    after = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}
    assert after == before  # no temporary, nothing replaced
    monkeypatch.undo()
    assert _outputs(folder)[0] == _outputs(folder)[1]


def test_free_space_is_checked_again_before_the_hdf5_write(fitted, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    import shutil

    shutil.copytree(fitted, folder)
    before = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}
    real_stage = persistence.stage
    writing = []

    def stage(*args, **kwargs):
        writing.append(1)
        return real_stage(*args, **kwargs)

    monkeypatch.setattr(persistence, "stage", stage)
    # plenty of space until the outputs are written, then the disk is (nearly) full
    monkeypatch.setattr(files, "free_bytes", lambda p: 2**20 if len(writing) else 2**40)
    status, stderr = _run(["fit", folder / "in.h5ad", "-o", folder / "out.h5ad", *FAST])
    _one_line(status, stderr)
    assert "not enough free space" in stderr
    after = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}
    assert after == before


def test_a_failure_while_moving_outputs_in_keeps_the_old_set(fitted, tmp_path, monkeypatch):
    """The old .h5ad goes aside before the new model moves in; if that fails it comes
    back, so the .h5ad and model folder in place are always one run's."""
    folder = tmp_path / "run"
    import shutil

    shutil.copytree(fitted, folder)
    before = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}

    def refuse(tmp, target, **kwargs):
        raise files.OutputError(f"{target} was changed by another program while writing")

    monkeypatch.setattr(files, "replace_dir", refuse)
    status, stderr = _run(["fit", folder / "in.h5ad", "-o", folder / "out.h5ad", *FAST])
    _one_line(status, stderr)
    after = {p: _digest(folder / p) for p in _listing(folder) if (folder / p).is_file()}
    assert after == before
    monkeypatch.undo()
    assert _outputs(folder)[0] == _outputs(folder)[1]


def test_a_second_run_replaces_every_output_together(fitted, tmp_path):
    folder = tmp_path / "run"
    import shutil

    shutil.copytree(fitted, folder)
    old_id = _outputs(folder)[0]
    status, stderr = _run(
        ["fit", folder / "in.h5ad", "-o", folder / "out.h5ad", *FAST, "--seed", "1"]
    )
    assert status == 0, stderr
    new_h5ad, new_model = _outputs(folder)
    assert new_h5ad == new_model != old_id
    assert sorted(p.name for p in folder.iterdir()) == [
        "in.h5ad",
        "out.h5ad",
        "out_model",
        "out_training.png",
    ]


# ------------------------------------------------------------- 3. unwritable outputs


def test_output_naming_a_folder_is_refused_before_training(raw, tmp_path, no_training):
    (tmp_path / "dir.h5ad").mkdir()
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", tmp_path / "dir.h5ad", *FAST])
    _one_line(status, stderr)
    assert "is a folder" in stderr


def test_a_read_only_place_is_refused_before_training(raw, tmp_path, monkeypatch, no_training):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", *FAST])
    _one_line(status, stderr)
    assert "cannot write in" in stderr and "Read-only" in stderr


@pytest.mark.skipif(
    os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere"
)
def test_a_read_only_folder_is_refused_before_training(raw, tmp_path, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status, stderr = _run(["fit", raw / "in.h5ad", "-o", locked / "o.h5ad", *FAST])
    finally:
        locked.chmod(0o700)
    _one_line(status, stderr)


# ------------------------------- 3b. every command protects its inputs, checks outputs first


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command reads a model or computes an embedding: checks come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work before checking its outputs")

    for name in ("load", "load_query_data", "load_checkpoint"):
        monkeypatch.setattr(SCVI, name, refuse)
    import pyro_scvi.tl

    monkeypatch.setattr(pyro_scvi.tl, "embedding", refuse)


def _into_the_model(fitted, tmp_path, case):
    """argv of a command asked to write into the model folder it reads (issue 27, item 6)."""
    ref, data = fitted / "out_model", fitted / "in.h5ad"
    query = ["map-query", ref, data, "-o", tmp_path / "q.h5ad", "--model-dir"]
    return {
        # before: map-query replaced its own reference model with the query model (exit 0)
        "map-query --model-dir REF": [*query, ref],
        "map-query --model-dir REF spelled otherwise": [*query, ref / ".." / ref.name],
        "map-query --model-dir inside REF": [*query, ref / "query"],
        "map-query -o inside REF": ["map-query", ref, data, "-o", ref / "q.h5ad"],
        "evaluate --per-cell inside MODEL_DIR": [
            "evaluate",
            ref,
            data,
            "--per-cell",
            ref / "cells.csv",
        ],
        "de -o inside MODEL_DIR": ["de", ref, data, "--groupby", "batch", "-o", ref / "de.csv"],
        "ppc -o inside MODEL_DIR": ["ppc", ref, data, "-o", ref / "ppc.nc"],
        "ppc -o inside a --compare model": [
            "ppc",
            ref,
            data,
            "-o",
            tmp_path / "other" / "p.nc",
            "--compare",
            f"other={tmp_path / 'other'}",
        ],
    }[case]


CASES_INTO_THE_MODEL = [
    "map-query --model-dir REF",
    "map-query --model-dir REF spelled otherwise",
    "map-query --model-dir inside REF",
    "map-query -o inside REF",
    "evaluate --per-cell inside MODEL_DIR",
    "de -o inside MODEL_DIR",
    "ppc -o inside MODEL_DIR",
    "ppc -o inside a --compare model",
]


@pytest.mark.parametrize("case", CASES_INTO_THE_MODEL)
def test_no_command_writes_into_the_model_it_reads(fitted, tmp_path, case, no_work):
    if "--compare" in case:
        import shutil

        shutil.copytree(fitted / "out_model", tmp_path / "other")
    before = {p: _digest(fitted / "out_model" / p) for p in os.listdir(fitted / "out_model")}
    status, stderr = _run(_into_the_model(fitted, tmp_path, case))
    _one_line(status, stderr)
    assert "never overwritten" in stderr or "would hold or replace" in stderr, stderr
    after = {p: _digest(fitted / "out_model" / p) for p in os.listdir(fitted / "out_model")}
    assert after == before  # the reference/model folder is untouched


def _unwritable_argv(fitted, out):
    ref, data = fitted / "out_model", fitted / "in.h5ad"
    return {
        "evaluate": ["evaluate", ref, data, "--per-cell", out / "cells.csv"],
        "de": ["de", ref, data, "--groupby", "batch", "-o", out / "de.csv"],
        "ppc": ["ppc", ref, data, "-o", out / "p.nc"],
        "plot": ["plot", fitted / "out.h5ad", "-o", out / "u.png"],
        "map-query": ["map-query", ref, data, "-o", out / "q.h5ad"],
    }


@pytest.mark.parametrize("command", ["evaluate", "de", "ppc", "plot", "map-query"])
def test_every_command_checks_its_outputs_before_its_work(
    fitted, tmp_path, monkeypatch, command, no_work
):
    # before: de, ppc, evaluate and map-query found an unwritable output after the work
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    status, stderr = _run(_unwritable_argv(fitted, tmp_path)[command])
    _one_line(status, stderr)
    assert "cannot write in" in stderr and "Read-only" in stderr


@pytest.mark.parametrize("command", ["evaluate", "de", "ppc", "plot", "map-query"])
def test_an_output_naming_a_folder_is_refused_before_the_work(fitted, tmp_path, command, no_work):
    argv = _unwritable_argv(fitted, tmp_path)[command]
    target = Path(argv[argv.index("--per-cell" if command == "evaluate" else "-o") + 1])
    target.mkdir()
    status, stderr = _run(argv)
    _one_line(status, stderr)
    assert "is a folder" in stderr


def test_map_query_refuses_a_model_dir_of_foreign_files_before_training(fitted, tmp_path, no_work):
    # before: found by save() after the query had been trained
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("lab notes")
    argv = ["map-query", fitted / "out_model", fitted / "in.h5ad", "-o", tmp_path / "q.h5ad"]
    status, stderr = _run([*argv, "--model-dir", tmp_path / "mine"])
    _one_line(status, stderr)
    assert "--model-dir" in stderr and "notes.txt" in stderr


# -------------------------------------------------------- 4. damaged or foreign model files


@pytest.mark.parametrize("damage", ["truncated", "empty", "text", "settings", "architecture"])
@pytest.mark.parametrize("command", ["evaluate", "de", "ppc"])
def test_a_damaged_model_gives_one_line_and_status_2(fitted, tmp_path, command, damage):
    # before: a raw traceback, exit 1
    import shutil

    from pyro_scvi import io as model_io

    folder = tmp_path / "m"
    shutil.copytree(fitted / "out_model", folder)
    pt = folder / "model.pt"
    if damage == "truncated":
        pt.write_bytes(pt.read_bytes()[:1000])
    elif damage == "empty":
        pt.write_bytes(b"")
    elif damage == "text":
        pt.write_text("hello\n")
    else:
        state = torch.load(pt, weights_only=False)
        if damage == "settings":
            del state["settings"]["n_latent"]
        else:
            state["settings"]["n_hidden"] = 64
        shutil.rmtree(folder)
        folder.mkdir()
        model_io.write_model_dir(folder, state, manifest={})
    argv = {
        "evaluate": ["evaluate", folder, fitted / "in.h5ad", "--n-samples", "2"],
        "de": ["de", folder, fitted / "in.h5ad", "--groupby", "batch", "-o", tmp_path / "d.csv"],
        "ppc": ["ppc", folder, fitted / "in.h5ad", "-o", tmp_path / "p.nc"],
    }[command]
    status, stderr = _run(argv)
    _one_line(status, stderr)
    assert str(folder) in stderr


# ----------------------------------------------------------------------- 5. interrupts


def _signal_at_step(monkeypatch, step, signum):
    real, calls = Stepper.step, []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", hooked)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_fit_checkpoints_writes_so_far_and_resumes_exactly(
    raw, tmp_path, monkeypatch, signum
):
    # before: a KeyboardInterrupt traceback, nothing saved, no way to resume
    src = raw / "in.h5ad"
    whole = tmp_path / "whole"
    status, stderr = _run(["fit", src, "-o", whole / "out.h5ad", *FAST, *EXACT])
    assert status == 0, stderr
    part = tmp_path / "part"
    argv = ["fit", src, "-o", part / "out.h5ad", *FAST, *EXACT]
    _signal_at_step(monkeypatch, 5, signum)  # epoch 1, step 1 (3 steps an epoch)
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 128 + signum, stderr
    assert "Traceback" not in stderr and "Resume with:" in stderr
    assert "epoch 1, step 2" in stderr
    # the outputs so far: the model after epoch 0 and two steps of epoch 1
    assert "stopped" in anndata.read_h5ad(part / "out.h5ad").uns["pyro_scvi"]["params"]
    assert (part / "out_checkpoint" / "train_state.pt").exists()
    command = stderr.split("Resume with: ")[1].strip().splitlines()[0]
    words = shlex.split(command)
    assert words[0] == "pyro-scvi" and words[-1] == "--resume"
    status, stderr = _run(words[1:])
    assert status == 0, stderr
    a = SCVI.load(whole / "out_model", anndata.read_h5ad(src), device="cpu")
    b = SCVI.load(part / "out_model", anndata.read_h5ad(src), device="cpu")
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    for key, value in a.guide.state_dict().items():
        assert torch.equal(value, b.guide.state_dict()[key]), key
    assert a.history["train_elbo"].tolist() == b.history["train_elbo"].tolist()
    result = anndata.read_h5ad(part / "out.h5ad")
    assert (
        result.uns["pyro_scvi"]["params"]["resumed"]
        and "stopped" not in (result.uns["pyro_scvi"]["params"])
    )
    np.testing.assert_array_equal(
        result.obsm["X_pyro_scvi"], anndata.read_h5ad(whole / "out.h5ad").obsm["X_pyro_scvi"]
    )


def test_resume_with_other_training_options_is_refused(raw, tmp_path, monkeypatch):
    argv = [
        "fit",
        raw / "in.h5ad",
        "-o",
        tmp_path / "out.h5ad",
        *FAST,
        *EXACT,
        "--checkpoint-dir",
        tmp_path / "ck",
    ]
    _signal_at_step(monkeypatch, 2, signal.SIGINT)
    status, _ = _run(argv)
    monkeypatch.undo()
    assert status == 130
    status, stderr = _run([*argv, "--resume", "--lr", "0.01"])
    _one_line(status, stderr)
    assert "--lr 0.001 (given: 0.01)" in stderr
    # the guide's q(l): the checkpoint's default, not the paper's
    status, stderr = _run([*argv, "--resume", "--no-library-residual"])
    _one_line(status, stderr)
    assert "--library-residual True (given: False)" in stderr
    status, stderr = _run([*argv, "--resume", "--dispersion", "gene-cell"])
    _one_line(status, stderr)
    assert "--dispersion gene (given: gene-cell)" in stderr
    status, stderr = _run(
        [
            "fit",
            raw / "in.h5ad",
            "-o",
            tmp_path / "o2.h5ad",
            *FAST,
            "--resume",
            "--checkpoint-dir",
            tmp_path / "nothing",
        ]
    )
    _one_line(status, stderr)


# ------------------------------------------------------------------- 6. duplicated names


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicated_gene_names_are_refused(tmp_path, no_training):
    # before: accepted silently
    adata = synthetic_zinb(n_cells=100, n_genes=10, seed=0)
    adata.var_names = [f"g{i % 9}" for i in range(10)]
    adata.write_h5ad(tmp_path / "dup.h5ad")
    status, stderr = _run(["fit", tmp_path / "dup.h5ad", "-o", tmp_path / "o.h5ad", *FAST])
    _one_line(status, stderr)
    assert "adata.var_names_make_unique()" in stderr


def test_a_query_with_genes_in_another_order_gives_the_same_answer(fitted, tmp_path):
    # before: refused, and the suggested fix raised a pandas error with duplicated names
    adata = anndata.read_h5ad(fitted / "in.h5ad")
    adata[:, ::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    results = []
    for i, path in enumerate((fitted / "in.h5ad", tmp_path / "reversed.h5ad")):
        per_cell = tmp_path / f"cells{i}.csv"
        args = ["evaluate", fitted / "out_model", path, "--n-samples", "3", "--threads", "1"]
        status, stderr = _run([*args, "--per-cell", per_cell])
        assert status == 0, stderr
        results.append(pd.read_csv(per_cell, index_col="cell"))
    assert len(results[0]) > 0
    np.testing.assert_allclose(results[0]["elbo"], results[1]["elbo"], rtol=1e-5)


@pytest.mark.filterwarnings("ignore:Observation names are not unique")
def test_duplicated_cell_names_are_refused_where_results_are_keyed_by_them(fitted, tmp_path):
    adata = anndata.read_h5ad(fitted / "in.h5ad")
    adata.obs_names = ["c"] * adata.n_obs
    adata.write_h5ad(tmp_path / "dupcells.h5ad")
    per_cell = tmp_path / "cells.csv"  # keyed by cell name
    args = ["evaluate", fitted / "out_model", tmp_path / "dupcells.h5ad", "--per-cell", per_cell]
    status, stderr = _run(args)
    _one_line(status, stderr)
    assert "adata.obs_names_make_unique()" in stderr


# ------------------------------------------------------------ 7. honest failure


class _PoisonAfter:
    """Make the step loss NaN from the ``n``-th call on (training steps only)."""

    def __init__(self, monkeypatch, n):
        real, calls = Stepper.step, []

        def hooked(self, *args, **kwargs):
            calls.append(1)
            if len(calls) >= n:
                return float("nan")
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Stepper, "step", hooked)


def test_after_a_mid_run_failure_batch_norm_is_re_estimated(monkeypatch):
    # before: the restored weights kept the statistics of a 512-cell validation pass
    adata = synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, seed=0)
    model = SCVI(adata, n_latent=3, n_hidden=16)
    _PoisonAfter(monkeypatch, 12)  # 5 steps an epoch: fails in epoch 2
    with pytest.raises(TrainingError, match="end of epoch 1"):
        model.train(5, batch_size=64, progress_bar=False)
    linear, norm = model.guide.z_encoder.body[0], model.guide.z_encoder.body[1]
    x, _ = model.data.tensors(model.train_indices)
    with torch.no_grad():
        pre = linear(torch.log1p(x))
    torch.testing.assert_close(norm.running_mean, pre.mean(0), rtol=0.05, atol=0.05)


def test_a_failure_in_the_first_epoch_leaves_an_untrained_model(monkeypatch):
    adata = synthetic_zinb(n_cells=100, n_genes=10, seed=0)
    model = SCVI(adata, n_latent=2, n_hidden=8)
    _PoisonAfter(monkeypatch, 1)
    with pytest.raises(TrainingError, match="no epoch had completed.*untrained"):
        model.train(3, progress_bar=False)
    assert not model.is_trained and len(model.history) == 0


def _poison_the_last_norm_pass(monkeypatch):
    """Leave NaN statistics from the pass after the last epoch, as an overflow does."""
    real = Stepper.refresh_batch_norm

    def hooked(self, *args, **kwargs):
        real(self, *args, **kwargs)
        for net in (self.model, self.guide):
            for m in net.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_var.fill_(float("nan"))

    monkeypatch.setattr(Stepper, "refresh_batch_norm", hooked)


def test_non_finite_statistics_after_the_last_epoch_keep_the_last_good_model(monkeypatch):
    # before (issue 27, --lr 0.17): a 49-line traceback from the end-of-training pass
    adata = synthetic_zinb(n_cells=200, n_genes=30, seed=0)
    model = SCVI(adata, n_latent=3, n_hidden=16)
    _poison_the_last_norm_pass(monkeypatch)
    with pytest.raises(TrainingError, match=r"statistics became nan.*end of epoch 2.*--lr"):
        model.train(3, batch_size=64, progress_bar=False, engine="eager")
    assert model.is_trained and list(model.history["epoch"]) == [0, 1, 2]
    norms = [m for m in model.guide.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert norms and all(torch.isfinite(m.running_var).all() for m in norms)
    assert np.isfinite(model.get_latent_representation()).all()


def test_non_finite_statistics_after_the_last_epoch_in_the_cli(raw, tmp_path, monkeypatch):
    _poison_the_last_norm_pass(monkeypatch)
    out = tmp_path / "o.h5ad"
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", out, *FAST, *EXACT])
    _one_line(status, stderr, code=1)
    assert "--lr" in stderr and "end of epoch 2" in stderr and "outputs hold" in stderr
    result = anndata.read_h5ad(out)
    assert np.isfinite(result.obsm["X_pyro_scvi"]).all()
    assert "statistics became nan" in result.uns["pyro_scvi"]["params"]["stopped"]


def _pbmc(n_cells, seed):
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    return adata[np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False)].copy()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dataset", ["synthetic", "pbmc"])
def test_a_sane_fit_does_not_warn_of_divergence(dataset, seed):
    adata = _pbmc(600, seed) if dataset == "pbmc" else synthetic_zinb(300, 40, seed=seed)
    model = SCVI(adata, n_latent=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TrainingWarning)
        model.train(3, seed=seed, progress_bar=False)
    assert model.engine["diverged"] is None


@pytest.mark.filterwarnings("ignore:Encountered NaN")
@pytest.mark.parametrize(
    ("dataset", "seed", "lr"),
    [("synthetic", 0, 0.15), ("synthetic", 1, 0.15), ("pbmc", 0, 0.05), ("pbmc", 1, 0.05)],
)
def test_a_diverging_fit_warns_and_records_it(dataset, seed, lr):
    # before (issue 27): --lr 0.15 ended with a validation ELBO of -9e21 per cell, silently
    adata = _pbmc(600, seed) if dataset == "pbmc" else synthetic_zinb(200, 30, seed=seed)
    model = SCVI(adata)
    with pytest.warns(TrainingWarning, match=r"diverged.*smaller learning rate.*--lr") as got:
        model.train(1, lr=lr, seed=seed, progress_bar=False)
    assert model.engine["diverged"] == str(got[0].message)
    assert model.history.attrs["engine"]["diverged"] == model.engine["diverged"]


def test_a_diverging_fit_in_the_cli_warns_in_one_line_and_records_it(raw, tmp_path):
    out = tmp_path / "o.h5ad"
    argv = ["fit", raw / "in.h5ad", "-o", out, *FAST, "--max-epochs", "1", "--lr", "0.15"]
    status, stderr = _run(argv)
    assert status == 0 and "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("pyro-scvi fit: warning: The validation ELBO")
    assert "--lr" in lines[0] and "0.15" in lines[0] and lines[1].startswith("pyro-scvi: wrote")
    recorded = anndata.read_h5ad(out).uns["pyro_scvi"]["params"]["engine"]["diverged"]
    assert recorded in lines[0]


# ------------------------------------------------------- 8. seeds, pipes


@pytest.mark.parametrize("seed", ["-5", "4294967296", "1.5", "x"])
def test_bad_seeds_give_one_line_and_status_2(raw, tmp_path, seed, no_training):
    # before: a ValueError traceback
    status, stderr = _run(["fit", raw / "in.h5ad", "-o", tmp_path / "o.h5ad", "--seed", seed])
    _one_line(status, stderr)
    assert "--seed" in stderr


def test_the_largest_seed_is_accepted(raw, tmp_path):
    status, stderr = _run(
        [
            "fit",
            raw / "in.h5ad",
            "-o",
            tmp_path / "o.h5ad",
            *FAST,
            "--max-epochs",
            "1",
            "--seed",
            str(2**32 - 1),
        ]
    )
    assert status == 0, stderr


class _ClosedPipe(io.StringIO):
    def write(self, text):
        raise BrokenPipeError(errno.EPIPE, "Broken pipe")


def test_a_closed_pipe_ends_quietly(fitted):
    # before: a BrokenPipeError traceback
    status, stderr = _run(
        ["evaluate", fitted / "out_model", fitted / "in.h5ad", "--n-samples", "2"],
        stdout=_ClosedPipe(),
    )
    assert status == 141 and stderr == ""


def test_a_closed_pipe_ends_quietly_in_a_real_process(fitted):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone, as `| head` does after its lines
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pyro_scvi",
            "evaluate",
            str(fitted / "out_model"),
            str(fitted / "in.h5ad"),
            "--n-samples",
            "2",
            "--threads",
            "1",
        ],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=env,
        timeout=300,
    )
    os.close(write_end)
    assert proc.returncode == 141
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr, proc.stderr


def test_evaluate_with_stdout_closed_says_so_in_one_line(fitted, tmp_path):
    # before (issue 27): `pyro-scvi evaluate ... >&-` ended in an AttributeError traceback
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [
        sys.executable, "-m", "pyro_scvi", "evaluate", str(fitted / "out_model"),
        str(fitted / "in.h5ad"), "--n-samples", "2", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command],
        stderr=subprocess.PIPE,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "stdout is closed" in lines[0], proc.stderr


def test_other_commands_work_with_stdout_closed_and_drop_their_summary(fitted, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = tmp_path / "e.png"
    command = [
        sys.executable, "-m", "pyro_scvi", "plot", str(fitted / "out.h5ad"), "-o", str(out),
        "--method", "pca", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", *command], stderr=subprocess.PIPE, env=env, timeout=300
    )
    assert proc.returncode == 0 and proc.stderr == b"" and out.stat().st_size > 0


# ------------------------------------------------------------------------- 9. plot


@pytest.fixture
def embedded():
    adata = synthetic_zinb(n_cells=30, n_genes=10, seed=0)
    adata.obsm["X_pyro_scvi"] = np.random.default_rng(0).normal(size=(30, 3))
    return adata


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
def test_plot_of_non_finite_coordinates_is_refused_in_one_line(embedded, tmp_path, method):
    # before (issue 27): LinAlgError (pca), ValueError (tsne, umap) tracebacks
    embedded.obsm["X_pyro_scvi"][[3, 7]] = np.nan
    embedded.obsm["X_pyro_scvi"][9, 0] = np.inf
    embedded.write_h5ad(tmp_path / "nan.h5ad")
    status, stderr = _run(
        ["plot", tmp_path / "nan.h5ad", "-o", tmp_path / "p.png", "--method", method]
    )
    _one_line(status, stderr)
    assert "3 of 30 cells" in stderr and "'cell3'" in stderr and "refit" in stderr
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("method", ["pca", "tsne"])
def test_plot_of_a_representation_without_columns_is_refused(embedded, tmp_path, method):
    # before: t-SNE, a ValueError traceback; PCA, a picture of zeros
    embedded.obsm["X_pyro_scvi"] = np.zeros((30, 0))
    embedded.write_h5ad(tmp_path / "none.h5ad")
    argv = ["plot", tmp_path / "none.h5ad", "-o", tmp_path / "p.png", "--method", method]
    status, stderr = _run(argv)
    _one_line(status, stderr)
    assert "(30, 0)" in stderr and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(("method", "fewest"), [("umap", 4), ("tsne", 3), ("pca", 2)])
def test_plot_of_too_few_cells_says_the_minimum(embedded, tmp_path, method, fewest):
    # before (issue 27): 3 cells with UMAP, a TypeError traceback from its eigensolver
    embedded[: fewest - 1].copy().write_h5ad(tmp_path / "few.h5ad")
    status, stderr = _run(
        ["plot", tmp_path / "few.h5ad", "-o", tmp_path / "p.png", "--method", method]
    )
    _one_line(status, stderr)
    assert f"at least {fewest} cells" in stderr and f"has {fewest - 1}" in stderr
    embedded[:fewest].copy().write_h5ad(tmp_path / "enough.h5ad")
    if method != "umap":  # umap-learn is an extra, not installed everywhere
        status, stderr = _run(
            ["plot", tmp_path / "enough.h5ad", "-o", tmp_path / "p.png", "--method", method]
        )
        assert status == 0, stderr


@pytest.mark.parametrize("cells", ["all-zero", "one"])
def test_ppc_of_cells_without_positive_statistics_draws_its_pages(fitted, tmp_path, cells):
    # before: a 51-line traceback from matplotlib ("Data cannot be log-scaled because all
    # values are <= 0") after the checks had run
    adata = anndata.read_h5ad(fitted / "in.h5ad")
    if cells == "one":
        adata = adata[:1].copy()
    else:
        adata.X = adata.X * 0
    adata.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "p.nc"
    argv = ["ppc", fitted / "out_model", tmp_path / "in.h5ad", "-o", out, "--cells", "all"]
    status, stderr = _run([*argv, "--n-samples", "2"])
    assert status == 0 and stderr == "", stderr
    assert out.stat().st_size > 0
    assert [p for p in tmp_path.iterdir() if p.suffix == ".png"]
