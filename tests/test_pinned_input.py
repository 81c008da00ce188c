"""A streamed input is pinned, and a resumed run records what it used (issue 27, items 3, 9).

``pyro-scvi fit`` on a streamed ``.h5ad`` reads the file while training and copies it
into the output; the file is replaced or deleted here from the training loop (the
documented fault-injection seam :meth:`pyro_scvi.train.stepper.Stepper.step`), and the run
must stop with one line, write no output paired with the wrong cells, and keep the trained
model as a checkpoint whose ``--resume`` writes the outputs.
"""

import functools
import os
import shlex
import signal

import anndata
import numpy as np
import pytest
from _cli import run_cli
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi.data.identity import FileIdentity

# Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

FAST = ["--max-epochs", "3", "--batch-size", "64", "--n-latent", "3", "--quiet"]
EXACT = ["--engine", "eager", "--threads", "1"]
STREAMED = ["--data-source", "streamed"]


#: the CLI in-process; its stdout is not under test here, and a status of 2 must be the
#: command's own refusal: an argparse usage error (SystemExit) fails the test
_run = functools.partial(run_cli, stdout="drop", catch_exit=False)


def _at_step(monkeypatch, step, action):
    real, calls = Stepper.step, []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            action()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", hooked)


@pytest.fixture(scope="module")
def cells():
    return synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0)


@pytest.fixture(scope="module")
def whole(tmp_path_factory, cells):
    """The outputs of an undisturbed streamed fit."""
    tmp = tmp_path_factory.mktemp("whole")
    cells.write_h5ad(tmp / "in.h5ad")
    status, stderr = _run(
        ["fit", tmp / "in.h5ad", "-o", tmp / "out.h5ad", *FAST, *EXACT, *STREAMED]
    )
    assert status == 0, stderr
    return anndata.read_h5ad(tmp / "out.h5ad")


def _replace(src, adata):
    def action():
        tmp = src.with_name("new.h5ad")
        adata.write_h5ad(tmp)
        os.replace(tmp, src)  # as most tools save a file

    return action


def _rewrite(src, adata):
    tmp = src.with_name("new.h5ad")
    adata.write_h5ad(tmp)
    with open(src, "r+b") as f:
        f.write(tmp.read_bytes())
        f.truncate()


@pytest.mark.parametrize("change", ["reordered", "other shape", "deleted", "rewritten"])
def test_a_streamed_input_changed_during_training_keeps_the_model(
    tmp_path, monkeypatch, cells, whole, change
):
    # before: reordered -> exit 0, obs of the new file beside the old rows' results;
    # other shape -> raw ValueError traceback, the trained run lost; deleted -> exit 1,
    # the trained run lost
    src = tmp_path / "in.h5ad"
    cells.write_h5ad(src)
    original = src.read_bytes()
    actions = {
        "reordered": _replace(src, cells[::-1].copy()),
        "other shape": _replace(src, cells[:150].copy()),
        "deleted": lambda: os.remove(src),
        "rewritten": lambda: _rewrite(src, cells[::-1].copy()),  # in place, same inode
    }
    argv = ["fit", src, "-o", tmp_path / "out.h5ad", *FAST, *EXACT, *STREAMED]
    _at_step(monkeypatch, 5, actions[change])  # epoch 1 of 3
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 1, stderr
    assert "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert "changed while the run used it" in stderr
    # nothing paired with the wrong cells: no output at all
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "out_model").exists()
    assert (tmp_path / "out_checkpoint").is_dir()
    command = shlex.split(stderr.split("write the outputs with: ")[1].strip())
    assert command[0] == "pyro-scvi" and command[-1] == "--resume"
    if change != "deleted":
        # the changed file is refused by the checkpoint's check of the cells
        status, again = _run(command[1:])
        assert status == 2 and "Traceback" not in again, again
        assert not (tmp_path / "out.h5ad").exists()
    # INPUT put back: the kept model writes the undisturbed run's outputs
    src.write_bytes(original)
    status, stderr = _run(command[1:])
    assert status == 0, stderr
    result = anndata.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(result.obs_names, whole.obs_names)
    np.testing.assert_array_equal(result.obsm["X_pyro_scvi"], whole.obsm["X_pyro_scvi"])
    np.testing.assert_array_equal(
        result.layers["pyro_scvi_normalized"], whole.layers["pyro_scvi_normalized"]
    )


def test_the_identity_names_what_changed(tmp_path):
    path = tmp_path / "in.h5ad"
    path.write_bytes(b"cells")
    pinned = FileIdentity.of(path)
    assert pinned.changes() is None
    tmp = tmp_path / "other"
    tmp.write_bytes(b"cells")
    os.replace(tmp, path)  # same size, another file
    assert "replaced by another file" in pinned.changes()
    path.unlink()
    assert pinned.changes() == "it was deleted"


# -------------------------------------------------- item 9: a resume records its own seed


def _interrupted(tmp_path, monkeypatch, src, seed):
    argv = ["fit", src, "-o", tmp_path / "out.h5ad", *FAST, *EXACT, "--seed", str(seed)]
    _at_step(monkeypatch, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 130, stderr
    return shlex.split(stderr.split("Resume with: ")[1].strip().splitlines()[0])[1:]


def test_resume_records_the_seed_the_run_used(tmp_path, monkeypatch, cells):
    # before: `--resume` without --seed recorded seed 0, with --seed 9 recorded 9, though
    # the run went on with the streams of seed 3
    src = tmp_path / "in.h5ad"
    cells.write_h5ad(src)
    whole = tmp_path / "whole.h5ad"
    status, stderr = _run(["fit", src, "-o", whole, *FAST, *EXACT, "--seed", "3"])
    assert status == 0, stderr
    command = _interrupted(tmp_path, monkeypatch, src, 3)
    without_seed = [w for i, w in enumerate(command) if "--seed" not in command[i - 1 : i + 1]]
    status, stderr = _run([*without_seed, "--seed", "9"])
    assert status == 2 and "--seed 3 (given: 9)" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    status, stderr = _run(without_seed)  # no --seed: the run's own
    assert status == 0, stderr
    result = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert result.uns["pyro_scvi"]["params"]["seed"] == 3
    # and the outputs are the uninterrupted run's, posterior draws included
    np.testing.assert_array_equal(
        result.layers["pyro_scvi_normalized"],
        anndata.read_h5ad(whole).layers["pyro_scvi_normalized"],
    )


def test_a_streamed_input_replaced_just_before_it_is_copied_writes_nothing(
    tmp_path, monkeypatch, cells
):
    # the last window: INPUT replaced after the check before the outputs, just as the
    # output .h5ad is copied from it; the copy is checked again before anything moves in
    import pyro_scvi.io.outputs as outputs

    src = tmp_path / "in.h5ad"
    cells.write_h5ad(src)
    real = outputs.copy_h5ad

    def replace_then_copy(a, b):
        _replace(src, cells[::-1].copy())()
        real(a, b)

    monkeypatch.setattr(outputs, "copy_h5ad", replace_then_copy)
    status, stderr = _run(["fit", src, "-o", tmp_path / "out.h5ad", *FAST, *EXACT, *STREAMED])
    monkeypatch.undo()
    assert status == 1 and "changed while the run used it" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out_checkpoint"]


@pytest.mark.parametrize("change", ["replaced", "deleted"])
def test_map_query_with_a_streamed_input_changed_during_training_writes_nothing(
    tmp_path, monkeypatch, cells, change
):
    # the reference: batch 0's cells; the query, streamed: batch 1's
    reference, query = (cells[cells.obs["batch"] == b].copy() for b in ("batch0", "batch1"))
    reference.write_h5ad(tmp_path / "ref.h5ad")
    status, stderr = _run(
        ["fit", tmp_path / "ref.h5ad", "-o", tmp_path / "ref_out.h5ad", *FAST, *EXACT]
        + ["--model-dir", tmp_path / "ref_model", "--batch-key", "batch"]
    )
    assert status == 0, stderr
    src = tmp_path / "query.h5ad"
    query.write_h5ad(src)
    reversed_cells = query[::-1].copy()
    action = _replace(src, reversed_cells) if change == "replaced" else src.unlink
    _at_step(monkeypatch, 2, action)
    out = tmp_path / "mapped.h5ad"
    argv = ["map-query", tmp_path / "ref_model", src, "-o", out, "--max-epochs", "2"]
    status, stderr = _run(argv + ["--quiet", "--model-dir", tmp_path / "q_model", *STREAMED])
    assert status == 1, stderr
    line = stderr.strip()
    assert "\n" not in line and "changed while the run used it" in line
    assert "Nothing was written" in line and str(tmp_path / "q_model") in line
    assert not out.exists()  # never rows paired with another file's cells
    assert (tmp_path / "q_model").is_dir()  # the trained query model is kept
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".mapped")]
