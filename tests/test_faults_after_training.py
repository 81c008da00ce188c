"""Faults between the end of training and the last output written (issue 27, items 4, 5, 8, 9).

- a signal (SIGINT, SIGTERM) at any point after the last training step leaves either the
  complete outputs or the trained model and the command that writes the outputs from it,
  exits ``128 + signal``, never 0, and leaves no temporary file (item 4);
- SIGTERM during ``ppc`` leaves all of the old files or all of the new (item 9);
- a checkpoint that cannot be written costs that checkpoint, not the run (item 9);
- a disk that fills during the ``.h5ad`` write gives one line and status 1, the old outputs
  intact, on a real small tmpfs where the machine can mount one and under a file size
  limit (``RLIMIT_FSIZE``) everywhere (item 5);
- two processes publishing to the same outputs leave one process's pair (item 8).

The signals are real: sent to the process with ``os.kill`` from a documented seam, or from
outside to a ``pyro-scvi`` subprocess.
"""

import functools
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
import weakref
from pathlib import Path

import anndata
import numpy as np
import pytest
from _cli import run_cli
from pyro_scvi.datasets import synthetic_zinb

import pyro_scvi.io.files as files
import pyro_scvi.io.outputs as outputs
import pyro_scvi.tl as tl
from pyro_scvi import SCVI
from pyro_scvi.io.files import TMP_TAG

# Stepper is the documented fault-injection seam of training (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

FAST = ["--max-epochs", "3", "--batch-size", "64", "--n-latent", "3", "--quiet"]
EXACT = ["--engine", "eager", "--threads", "1"]
REPO = Path(__file__).resolve().parents[1]


#: the CLI in-process; its stdout (reports) is not under test here
_run = functools.partial(run_cli, stdout="drop")


def _digests(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def _temporaries(folder):
    return [p for p in Path(folder).rglob("*") if TMP_TAG in p.name]


def _run_ids(folder, stem="out"):
    h5ad = anndata.read_h5ad(folder / f"{stem}.h5ad")
    manifest = json.loads((folder / f"{stem}_model" / "manifest.json").read_text())
    return h5ad.uns["pyro_scvi"]["params"]["run_id"], manifest["run_id"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src")
    synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0).write_h5ad(folder / "in.h5ad")
    return folder / "in.h5ad"


@pytest.fixture(scope="module")
def whole(source, tmp_path_factory):
    """A run nobody interrupted: the reference for the outputs written later."""
    folder = tmp_path_factory.mktemp("whole")
    status, stderr = _run(["fit", source, "-o", folder / "out.h5ad", *FAST, *EXACT])
    assert status == 0, stderr
    return folder


def _send(signum):
    os.kill(os.getpid(), signum)


def _swallowed(signum):
    """Send ``signum`` from inside a weakref callback, where Python drops any exception."""

    class Thing:
        pass

    def callback(_):
        _send(signum)
        sum(range(100))  # the handler runs here, in the callback: its exception is dropped

    thing = Thing()
    ref = weakref.ref(thing, callback)
    del thing
    return ref


def _at(monkeypatch, owner, name, action):
    real = getattr(owner, name)

    def hooked(*args, **kwargs):
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, hooked)


#: where the signal comes: (object, attribute wrapped to send it first, how)
POINTS = {
    # the run's last pass, after its last step and its last look for a signal
    "end of training": (Stepper, "refresh_batch_norm", _send),
    "computing the results": (tl, "write_results", _send),
    "writing the .h5ad": (outputs, "write_normalized", _send),
    "swallowed in a weakref callback": (outputs, "write_normalized", _swallowed),
}


@pytest.mark.parametrize(
    ("point", "signum"),
    [(point, signal.SIGTERM) for point in POINTS]
    + [(point, signal.SIGINT) for point in ("end of training", "swallowed in a weakref callback")],
)
def test_a_signal_after_training_keeps_the_model_and_says_how_to_write_the_outputs(
    source, whole, tmp_path, monkeypatch, point, signum
):
    # before: SIGTERM killed the run silently with three temporaries left; SIGINT threw
    # the trained model away without a resume command, or was swallowed and exited 0
    folder = tmp_path / "run"
    shutil.copytree(whole, folder)  # the old outputs, which must stay whole
    before = _digests(folder)
    owner, name, how = POINTS[point]
    _at(monkeypatch, owner, name, lambda: how(signum))
    status, stderr = _run(["fit", source, "-o", folder / "out.h5ad", *FAST, *EXACT])
    monkeypatch.undo()
    assert status == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert _temporaries(folder) == []
    kept = folder / "out_checkpoint"
    assert {k: v for k, v in _digests(folder).items() if not k.startswith("out_checkpoint")} == (
        before
    )
    assert "the trained model is kept in" in stderr and (kept / "manifest.json").is_file()
    words = shlex.split(stderr.split("Write the outputs from it with: ")[1].splitlines()[0])
    assert words[0] == "pyro-scvi" and words[-1] == "--resume"
    status, stderr = _run(words[1:])
    assert status == 0, stderr
    h5ad_id, model_id = _run_ids(folder)
    assert h5ad_id == model_id
    # the outputs are those the uninterrupted run wrote: the same model, the same results
    got, want = (anndata.read_h5ad(f / "out.h5ad") for f in (folder, whole))
    np.testing.assert_allclose(got.obsm["X_pyro_scvi"], want.obsm["X_pyro_scvi"], rtol=1e-6)
    assert got.uns["pyro_scvi"]["params"]["max_epochs"] == 3


@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_while_the_outputs_move_in_leaves_them_complete(
    source, whole, tmp_path, monkeypatch, signum
):
    folder = tmp_path / "run"
    shutil.copytree(whole, folder)
    old_id = _run_ids(folder)[0]
    _at(monkeypatch, files, "replace_dir", lambda: _send(signum))
    status, stderr = _run(["fit", source, "-o", folder / "out.h5ad", *FAST, *EXACT])
    monkeypatch.undo()
    assert status == 128 + signum, stderr  # never 0
    assert "they are complete" in stderr and "Traceback" not in stderr
    h5ad_id, model_id = _run_ids(folder)
    assert h5ad_id == model_id != old_id
    assert _temporaries(folder) == []


def test_a_second_ctrl_c_inside_a_step_still_stops_at_once(source, tmp_path, monkeypatch):
    """A signal before training ended is not mistaken for one after it: nothing is kept."""
    calls = []

    def twice():
        calls.append(1)
        if len(calls) == 2:
            _send(signal.SIGINT)
            _send(signal.SIGINT)

    _at(monkeypatch, Stepper, "step", twice)
    status, stderr = _run(["fit", source, "-o", tmp_path / "out.h5ad", *FAST, *EXACT])
    monkeypatch.undo()
    assert status == 130, stderr
    assert not (tmp_path / "out.h5ad").exists() and _temporaries(tmp_path) == []


def test_sigterm_from_outside_after_training_keeps_the_model(source, tmp_path):
    """A real ``pyro-scvi fit`` process, sent SIGTERM by another while it writes outputs."""
    # before: killed by the signal (status -15), the trained model lost, temporaries left
    driver = textwrap.dedent(
        """
        import sys, time
        import pyro_scvi.io.outputs as outputs
        from pyro_scvi.cli import main

        real = outputs.write_normalized
        def slow(*args, **kwargs):  # hold the write open until the signal comes
            print("WRITING", file=sys.stderr, flush=True)
            time.sleep(60)
            return real(*args, **kwargs)

        outputs.write_normalized = slow
        sys.exit(main(sys.argv[1:]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    argv = ["fit", str(source), "-o", str(tmp_path / "out.h5ad"), *FAST, *EXACT]
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, *argv], stderr=subprocess.PIPE, text=True, env=env
    )
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if line.startswith("WRITING"):
            proc.send_signal(signal.SIGTERM)
            break
    stderr = "".join(lines) + proc.stderr.read()
    assert proc.wait(timeout=120) == 143, stderr
    assert "Traceback" not in stderr and "the trained model is kept in" in stderr
    assert _temporaries(tmp_path) == [] and not (tmp_path / "out.h5ad").exists()
    words = shlex.split(stderr.split("Write the outputs from it with: ")[1].splitlines()[0])
    status, stderr = _run(words[1:])
    assert status == 0, stderr
    assert _run_ids(tmp_path)[0] == _run_ids(tmp_path)[1]


def test_resume_of_a_kept_model_checks_the_model_options(source, whole, tmp_path, monkeypatch):
    folder = tmp_path / "run"
    shutil.copytree(whole, folder)
    _at(monkeypatch, tl, "write_results", lambda: _send(signal.SIGTERM))
    status, _ = _run(["fit", source, "-o", folder / "out.h5ad", *FAST, *EXACT])
    monkeypatch.undo()
    assert status == 143
    argv = ["fit", source, "-o", folder / "out.h5ad", *FAST, *EXACT, "--resume"]
    status, stderr = _run([*argv, "--n-latent", "4"])
    assert status == 2 and "--n-latent 3 (given: 4)" in stderr


# ------------------------------------------------------------------------ ppc (item 9)


@pytest.fixture(scope="module")
def checked(source, whole, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ppc")
    argv = ["ppc", whole / "out_model", source, "-o", folder / "p.nc", "--n-samples", "3"]
    status, stderr = _run(argv)
    assert status == 0, stderr
    return folder, argv


def _ppc_again(checked, tmp_path):
    folder, argv = checked
    again = tmp_path / "ppc"
    shutil.copytree(folder, again)
    return again, [*argv[:-4], "-o", again / "p.nc", "--n-samples", "3", "--seed", "1"]


def test_sigterm_during_ppc_leaves_the_old_files_whole(checked, tmp_path, monkeypatch):
    # before: the .nc, tables and first plots new, the criticism files old
    import pyro_scvi.analysis.criticism as criticism

    folder, argv = _ppc_again(checked, tmp_path)
    before = _digests(folder)
    _at(monkeypatch, criticism, "compare", lambda: _send(signal.SIGTERM))
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 143, stderr
    assert _digests(folder) == before  # all old, no temporary


def test_sigterm_as_ppc_moves_its_files_in_leaves_all_new(checked, tmp_path, monkeypatch):
    folder, argv = _ppc_again(checked, tmp_path)
    before = _digests(folder)
    _at(monkeypatch, files, "publish_lock", lambda: _send(signal.SIGTERM))
    status, stderr = _run(argv)
    monkeypatch.undo()
    assert status == 143, stderr
    after = _digests(folder)
    assert set(after) == set(before)  # no temporary
    # all new: every file changed (the seed changed the draws, the plots and tables)
    assert [name for name in after if after[name] == before[name]] == []


# ------------------------------------------------------------- checkpoints (item 9)


def test_a_full_disk_at_a_checkpoint_costs_the_checkpoint_not_the_outputs(
    source, tmp_path, monkeypatch
):
    # before: the run stopped with the disk error, and no outputs were written
    import pyro_scvi.io.persistence as persistence

    real_stage = persistence.stage

    def full(model, target, **kwargs):
        if kwargs.get("train_state") is not None:  # checkpoints only
            raise OSError(28, "No space left on device", str(target))
        return real_stage(model, target, **kwargs)

    monkeypatch.setattr(persistence, "stage", full)
    checkpoints = ["--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        status, stderr = _run(
            ["fit", source, "-o", tmp_path / "out.h5ad", *FAST, *EXACT, *checkpoints]
        )
    assert status == 0, stderr
    assert any("checkpoint could not be written" in str(w.message) for w in caught)
    assert _run_ids(tmp_path)[0] == _run_ids(tmp_path)[1]


def test_a_full_disk_at_the_interrupt_checkpoint_still_writes_the_outputs(
    source, tmp_path, monkeypatch
):
    import pyro_scvi.io.persistence as persistence

    real_stage = persistence.stage

    def full(model, target, **kwargs):
        if kwargs.get("train_state") is not None:
            raise OSError(28, "No space left on device", str(target))
        return real_stage(model, target, **kwargs)

    monkeypatch.setattr(persistence, "stage", full)
    calls = []

    def at_fifth():
        calls.append(1)
        if len(calls) == 5:
            _send(signal.SIGTERM)

    _at(monkeypatch, Stepper, "step", at_fifth)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status, stderr = _run(["fit", source, "-o", tmp_path / "out.h5ad", *FAST, *EXACT])
    assert status == 143, stderr
    assert "no checkpoint could be written" in stderr and "No space left on device" in stderr
    params = anndata.read_h5ad(tmp_path / "out.h5ad").uns["pyro_scvi"]["params"]
    assert "stopped" in params


# ------------------------------------------------------------- a full disk (item 5)

#: Runs ``pyro-scvi`` with the free-space check told the disk is empty, so that the disk
#: fills during the write itself (files.free_bytes is the check's one reading of the disk).
FULL_DISK_DRIVER = textwrap.dedent(
    """
    import sys
    import pyro_scvi.io.files as files
    from pyro_scvi.cli import main

    files.free_bytes = lambda path: 2**50
    sys.exit(main(sys.argv[1:]))
    """
)


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """Old outputs whose .h5ad is by far the largest file a run writes."""
    folder = tmp_path_factory.mktemp("large")
    adata = synthetic_zinb(n_cells=1500, n_genes=40, n_batches=2, seed=0)
    adata.write_h5ad(folder / "in.h5ad")
    status, stderr = _run(["fit", folder / "in.h5ad", "-o", folder / "out.h5ad", *FAST, *EXACT])
    assert status == 0, stderr
    return folder


def _one_error_line(status, stderr):
    assert status == 1, stderr
    assert "Traceback" not in stderr and "Segmentation" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


def test_a_file_size_limit_during_the_h5ad_write_is_one_line_and_status_1(large, tmp_path):
    """RLIMIT_FSIZE makes writes past a size fail (EFBIG): a full disk, for one process."""
    # before: a crash in HDF5's finalizers (status 139 or -11), h5py __dealloc__ tracebacks
    import resource

    folder = tmp_path / "run"
    shutil.copytree(large, folder)
    before = _digests(folder)
    sizes = {name: os.path.getsize(folder / name) for name in before}
    limit = sizes["out.h5ad"] // 2
    assert limit > max(size for name, size in sizes.items() if name not in ("out.h5ad", "in.h5ad"))

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_scvi", "fit", "in.h5ad", "-o", "out.h5ad", *FAST, *EXACT],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=300,
    )
    _one_error_line(proc.returncode, proc.stderr)
    assert "File too large" in proc.stderr
    assert _digests(folder) == before  # the old outputs whole, no temporary


def _can_mount_tmpfs(where: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    cmd = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(where))}"
    try:
        probe = subprocess.run(
            ["unshare", "-rm", "sh", "-c", cmd], capture_output=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def test_a_disk_that_fills_during_the_h5ad_write_on_a_real_tmpfs(large, tmp_path):
    # before: exit 139 (a segfault) after h5py __dealloc__ tracebacks and a two-line error
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("no user namespace here to mount a small tmpfs in")
    old = tmp_path / "old"
    old.mkdir()
    for name in ("out.h5ad", "out_model", "out_training.png"):
        (shutil.copytree if (large / name).is_dir() else shutil.copy2)(large / name, old / name)
    before = _digests(old)
    # room for the old outputs and the new model and curves, not for a new .h5ad
    size = sum(os.path.getsize(old / n) for n in before) + 512 * 2**10
    after = tmp_path / "after"
    q = shlex.quote
    script = " && ".join(
        [
            f"mount -t tmpfs -o size={size} tmpfs {q(str(mnt))}",
            f"cp -a {q(str(old))}/. {q(str(mnt))}/",
            f"{{ {q(sys.executable)} -c {q(FULL_DISK_DRIVER)} fit {q(str(large / 'in.h5ad'))} "
            f"-o {q(str(mnt / 'out.h5ad'))} {' '.join(FAST + EXACT)} "
            f"2> {q(str(tmp_path / 'err'))}; "
            f"echo $? > {q(str(tmp_path / 'status'))}; }}",
            f"cp -a {q(str(mnt))}/. {q(str(after))}/",
        ]
    )
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    after.mkdir()
    subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, timeout=300, check=True)
    status = int((tmp_path / "status").read_text())
    stderr = (tmp_path / "err").read_text()
    _one_error_line(status, stderr)
    assert "No space left on device" in stderr
    assert _digests(after) == before  # the old outputs whole, no temporary


# ----------------------------------------------------------- concurrent writers (item 8)


def test_two_processes_publishing_at_once_leave_one_runs_pair():
    """200 rounds of two processes moving an .h5ad and a model folder into one place at
    once (``benchmarks/publish_race.py``; ``--step fit`` races fit's whole last step)."""
    # before: 2 rounds in 200 ended with one run's .h5ad beside the other's model
    from benchmarks.publish_race import race

    result = race(200, "publish")
    assert result["rounds"] == 200 and not result["worker_failures"], result
    assert result["mismatches"] == 0 and result["writer_errors"] == 0, result


def test_resume_of_a_finished_checkpoint_only_writes_the_outputs(source, tmp_path):
    # before: "the checkpoint ... has no run left to resume" (status 2)
    argv = ["fit", source, "-o", tmp_path / "out.h5ad", *FAST, *EXACT]
    argv += ["--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "2"]
    status, stderr = _run(argv)
    assert status == 0, stderr
    first = anndata.read_h5ad(tmp_path / "out.h5ad")
    (tmp_path / "out.h5ad").unlink()
    status, stderr = _run([*argv, "--resume"])
    assert status == 0, stderr
    again = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert again.uns["pyro_scvi"]["params"]["resumed"]
    assert len(again.uns["pyro_scvi"]["history"]["epoch"]) == 3  # no epoch more
    np.testing.assert_allclose(again.obsm["X_pyro_scvi"], first.obsm["X_pyro_scvi"], rtol=1e-6)


def test_resume_of_a_converged_runs_checkpoint_trains_nothing(source, tmp_path, monkeypatch):
    # before: the run stopped because it converged, its checkpoint loaded as interrupted
    # (its target was --max-epochs) and --resume trained one epoch more
    short_rule = dict(patience=2, kl_warmup_epochs=1, min_delta=1e9)  # converges at once
    monkeypatch.setattr(SCVI, "train", functools.partialmethod(SCVI.train, **short_rule))
    argv = ["fit", source, "-o", tmp_path / "out.h5ad", "--max-epochs", "10", *FAST[2:], *EXACT]
    argv += ["--checkpoint-dir", tmp_path / "ck", "--checkpoint-every", "1"]
    status, stderr = _run(argv)
    assert status == 0, stderr
    first = anndata.read_h5ad(tmp_path / "out.h5ad")
    params = first.uns["pyro_scvi"]["params"]
    assert params["stop_reason"].startswith("converged") and int(params["stopped_epoch"]) < 9
    (tmp_path / "out.h5ad").unlink()
    status, stderr = _run([*argv, "--resume"])
    assert status == 0, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    said = f"finished (converged at epoch {params['stopped_epoch']}): nothing was trained"
    assert said in stderr
    again = anndata.read_h5ad(tmp_path / "out.h5ad")
    history = again.uns["pyro_scvi"]["history"]["epoch"]
    assert len(history) == len(first.uns["pyro_scvi"]["history"]["epoch"])  # no epoch more
    np.testing.assert_allclose(again.obsm["X_pyro_scvi"], first.obsm["X_pyro_scvi"], rtol=1e-6)
