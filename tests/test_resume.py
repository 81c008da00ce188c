"""Continuing training: train() twice, checkpoints, interrupts by signal, resume.

The promise under test: a run that stops (a second train() call, SIGINT/SIGTERM, a
checkpoint loaded in a new object) and continues ends with the same parameters, bit for
bit on CPU with the same threads and an uncompiled engine, as one that never stopped.
"""

import os
import signal

import numpy as np
import pandas as pd
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import SCVI, Engine, InputError
from pyro_scvi.errors import TrainingInterrupted

# Stepper.step is the documented fault-injection seam (pyro_scvi.train.stepper)
from pyro_scvi.train.stepper import Stepper

EPOCHS = 4
# 300 cells, train_size 0.9: 270 training cells, minibatches of 64 -> 5 steps per epoch
STEPS_PER_EPOCH = 5


@pytest.fixture(scope="module")
def adata():
    return synthetic_zinb(n_cells=300, n_genes=40, n_clusters=3, n_batches=2, seed=0)


def _new(adata):
    return SCVI(adata, batch_key="batch", n_latent=3, n_hidden=16)


def _kw(engine="eager"):
    return dict(
        batch_size=64,
        kl_warmup_epochs=3,
        progress_bar=False,
        engine=Engine.preset(engine, threads=1),
        seed=3,
    )


def _state(m):
    return {
        **{f"model.{k}": v for k, v in m.model.state_dict().items()},
        **{f"guide.{k}": v for k, v in m.guide.state_dict().items()},
    }


def _assert_same_run(a, b):
    sa, sb = _state(a), _state(b)
    assert sa.keys() == sb.keys()
    different = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not different, f"parameters differ: {different[:5]}"
    cols = ["epoch", "train_elbo", "validation_elbo", "kl_weight"]
    pd.testing.assert_frame_equal(
        a.history[cols].reset_index(drop=True), b.history[cols].reset_index(drop=True)
    )


def _signal_at_step(monkeypatch, step, signum=signal.SIGINT):
    """Send ``signum`` to this process from inside training step number ``step`` (from 1)."""
    real, calls = Stepper.step, []

    def hooked(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            os.kill(os.getpid(), signum)  # handled at once, before the step runs
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Stepper, "step", hooked)


@pytest.fixture(scope="module")
def reference(adata):
    return _new(adata).train(EPOCHS, **_kw())


# Interrupt at random steps (drawn once, reproducibly) and at an epoch's last step, so
# the run stops mid-epoch and at an epoch boundary.
_rng = np.random.default_rng(16)
RANDOM_STEPS = sorted(_rng.choice(np.arange(1, EPOCHS * STEPS_PER_EPOCH), 3, replace=False))


@pytest.mark.parametrize("step", [*map(int, RANDOM_STEPS), STEPS_PER_EPOCH])
def test_a_resumed_run_equals_an_uninterrupted_one(adata, reference, tmp_path, monkeypatch, step):
    """SIGINT at ``step``; the checkpoint is loaded into a new object and resumed; the
    parameters, batch-norm buffers and history equal the uninterrupted run's exactly."""
    _signal_at_step(monkeypatch, step)
    m = _new(adata)
    with pytest.raises(TrainingInterrupted) as info:
        m.train(EPOCHS, checkpoint_dir=tmp_path / "ckpt", **_kw())
    stop = info.value
    assert stop.signal == signal.SIGINT and stop.checkpoint == str(tmp_path / "ckpt")
    assert (stop.epoch, stop.step) == divmod(step, STEPS_PER_EPOCH)
    monkeypatch.undo()
    resumed = SCVI.load_checkpoint(tmp_path / "ckpt", adata, device="cpu")
    assert resumed.interrupted
    resumed.resume(progress_bar=False)
    _assert_same_run(resumed, reference)
    assert not resumed.interrupted


def test_resume_in_the_same_process_after_an_interrupt(adata, reference, monkeypatch):
    _signal_at_step(monkeypatch, 7, signal.SIGTERM)
    m = _new(adata)
    with pytest.raises(TrainingInterrupted, match="SIGTERM at epoch 1, step 2"):
        m.train(EPOCHS, **_kw())
    monkeypatch.undo()
    # the interrupted model answers queries (one complete epoch, then two steps)
    assert m.is_trained and len(m.history) == 1
    assert np.isfinite(m.get_latent_representation()).all()
    m.resume(progress_bar=False)
    _assert_same_run(m, reference)


def test_an_interrupt_in_the_first_epoch_leaves_an_untrained_but_resumable_model(
    adata, reference, monkeypatch
):
    _signal_at_step(monkeypatch, 2)
    m = _new(adata)
    with pytest.raises(TrainingInterrupted):
        m.train(EPOCHS, **_kw())
    monkeypatch.undo()
    assert not m.is_trained and len(m.history) == 0
    m.resume(progress_bar=False)
    _assert_same_run(m, reference)


@pytest.mark.parametrize("engine", ["eager", "pyro"])
def test_train_twice_is_one_longer_run(adata, engine):
    """Adam's moments and the minibatch stream continue across train() calls (they
    restarted before: the first epochs' minibatch order repeated)."""
    one = _new(adata).train(EPOCHS, **_kw(engine))
    two = _new(adata).train(1, **_kw(engine))
    # queries between the calls draw random numbers: the run must not see them
    two.get_latent_representation()
    two.get_normalized_expression(n_samples=2)
    two.train(EPOCHS - 1, **_kw(engine))
    _assert_same_run(two, one)


def test_train_twice_continues_adam_state(adata):
    m = _new(adata).train(1, **_kw())
    steps = m.training_run.state.optim["state"]["adam"]["state"][0]["step"]
    assert float(steps) == STEPS_PER_EPOCH
    m.train(1, **_kw())
    assert (
        float(m.training_run.state.optim["state"]["adam"]["state"][0]["step"])
        == 2 * STEPS_PER_EPOCH
    )


def test_adam_state_is_matched_by_name_across_elbos(adata):
    """A compiled ELBO meets the parameters in another order than the eager one: the
    moments follow the names (mapping them by position crashed fused Adam)."""
    m = _new(adata).train(1, **_kw("eager"))
    before = m.training_run.state.optim["state"]
    m.train(1, **_kw("compiled"))
    after = m.training_run.state.optim["state"]
    assert float(after["adam"]["state"][0]["step"]) == 2 * STEPS_PER_EPOCH
    assert sorted(before["names"]) == sorted(after["names"])
    assert np.isfinite(m.history["train_elbo"]).all()


def test_a_resumed_compiled_run_matches_within_float_tolerance(adata, tmp_path, monkeypatch):
    # The compiled graph is traced again on resuming, which may change the last bits.
    one = _new(adata).train(3, **_kw("compiled"))
    _signal_at_step(monkeypatch, 6)
    m = _new(adata)
    with pytest.raises(TrainingInterrupted):
        m.train(3, checkpoint_dir=tmp_path / "c", **_kw("compiled"))
    monkeypatch.undo()
    m = SCVI.load_checkpoint(tmp_path / "c", adata, device="cpu").resume(progress_bar=False)
    for key, value in _state(one).items():
        torch.testing.assert_close(_state(m)[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_periodic_checkpoints(adata, tmp_path):
    m = _new(adata).train(EPOCHS, checkpoint_dir=tmp_path / "c", checkpoint_every=2, **_kw())
    saved = SCVI.load_checkpoint(tmp_path / "c", adata, device="cpu")
    assert len(saved.history) == EPOCHS and not saved.interrupted  # the run had finished
    manifest = saved.manifest
    assert manifest["kind"] == "checkpoint" and "train_state.pt" in manifest["files"]
    # a checkpoint is a model too
    as_model = SCVI.load(tmp_path / "c", adata, device="cpu")
    assert as_model.is_trained and len(as_model.history) == EPOCHS
    with pytest.raises(InputError, match="Nothing to resume"):
        saved.resume()
    assert len(m.history) == EPOCHS


def test_a_checkpoint_refuses_other_data(adata, tmp_path, monkeypatch):
    _signal_at_step(monkeypatch, 3)
    with pytest.raises(TrainingInterrupted):
        _new(adata).train(EPOCHS, checkpoint_dir=tmp_path / "c", **_kw())
    monkeypatch.undo()
    shuffled = adata[::-1].copy()
    with pytest.raises(InputError, match="not the data the checkpoint"):
        SCVI.load_checkpoint(tmp_path / "c", shuffled, device="cpu")
    with pytest.raises(InputError, match="not a training checkpoint|holds no checkpoint"):
        _new(adata).save(tmp_path / "m") or SCVI.load_checkpoint(tmp_path / "m", adata)


def test_resume_needs_the_runs_own_elbo(adata, monkeypatch):
    from pyro.infer import TraceMeanField_ELBO

    _signal_at_step(monkeypatch, 3)
    m = _new(adata)
    kw = _kw()
    kw.pop("engine")
    with pytest.raises(TrainingInterrupted):
        m.train(2, elbo=TraceMeanField_ELBO(), engine=Engine(threads=1), **kw)
    monkeypatch.undo()
    with pytest.raises(InputError, match="TraceMeanField_ELBO"):
        m.resume(progress_bar=False)
    m.resume(elbo=TraceMeanField_ELBO(), progress_bar=False)
    assert len(m.history) == 2


@pytest.mark.parametrize("engine", ["eager", "pyro"])
def test_bayesian_decoder_train_twice_and_checkpoint_resume(adata, tmp_path, engine):
    """q of the globals has a param group of its own (its own eps): Adam's state of both
    groups carries over a second train() call and a checkpoint loaded in a new object."""
    from pyro_scvi.model.schemes import BayesianDecoder

    def new():
        return SCVI(adata, batch_key="batch", n_latent=3, n_hidden=16, scheme=BayesianDecoder())

    one = new().train(2, **_kw(engine))
    two = new().train(1, **_kw(engine))
    two.train(1, **_kw(engine))
    _assert_same_run(two, one)
    if engine == "eager":
        saved = two.training_run.state.optim["state"]["adam"]
        assert len(saved["param_groups"]) == 2
        assert saved["param_groups"][1]["eps"] == 1e-8
    else:
        store = two.training_run.state.optim["state"]
        eps = {name: s["param_groups"][0]["eps"] for name, s in store.items()}
        assert sorted(set(eps.values())) == [1e-8, pytest.approx(0.01 * len(two.train_indices))]
    # a checkpoint written after the first epoch, resumed in a new object
    ckpt = tmp_path / "ckpt"
    new().train(1, checkpoint_dir=ckpt, checkpoint_every=1, **_kw(engine))
    resumed = SCVI.load_checkpoint(ckpt, adata, device="cpu")
    resumed.train(1, **_kw(engine))
    _assert_same_run(resumed, one)


def test_a_resumed_run_keeps_every_field_of_its_engine(adata, tmp_path, monkeypatch):
    # Resume once rebuilt the engine from 4 of its 7 fields: data placement, matmul
    # precision and data parallelism were decided anew. Now every field carries over,
    # in this process and from a checkpoint, and the reasons say where each came from.
    from pyro_scvi.train.engine import FIELDS

    engine = Engine(compiled=False, threads=1, data_placement="device", matmul_precision="high")
    kw = {**_kw(), "engine": engine}
    _signal_at_step(monkeypatch, 3)
    m = _new(adata)
    with pytest.raises(TrainingInterrupted):
        m.train(2, checkpoint_dir=tmp_path / "c", **kw)
    monkeypatch.undo()
    first = dict(m.engine)
    assert first["data_placement"] == "device" and first["matmul_precision"] == "high"
    loaded = SCVI.load_checkpoint(tmp_path / "c", adata, device="cpu")
    for model in (m, loaded):
        model.resume(progress_bar=False)
        assert {f: model.engine[f] for f in FIELDS} == {f: first[f] for f in FIELDS}
        reasons = model.engine["reasons"]
        assert reasons["data_placement"] == "kept from the interrupted run (asked for)"
        assert reasons["matmul_precision"] == "kept from the interrupted run (asked for)"
        assert (
            reasons["data_parallel"]
            == "off: kept from the interrupted run (off: a single process)"
        )
        assert len(model.history) == 2
    _assert_same_run(loaded, m)


def test_a_converged_runs_checkpoint_is_finished_and_an_interrupted_one_resumes(
    adata, tmp_path, monkeypatch
):
    # before: a run that stopped because it converged left a checkpoint whose target was
    # max_epochs, so it loaded as interrupted and resume() trained on
    stop = dict(_kw(), early_stopping=True, patience=2, kl_warmup_epochs=1, min_delta=1e9)
    m = _new(adata).train(30, checkpoint_dir=tmp_path / "c", checkpoint_every=1, **stop)
    ended = m.history.attrs["stopping"]
    assert ended["reason"].startswith("converged") and len(m.history) < 30
    saved = SCVI.load_checkpoint(tmp_path / "c", adata, device="cpu")
    assert not saved.interrupted and len(saved.history) == len(m.history)
    with pytest.raises(InputError, match=f"finished at epoch {ended['epoch']} .converged"):
        saved.resume()
    assert len(saved.history) == len(m.history)
    np.testing.assert_array_equal(saved.get_latent_representation(), m.get_latent_representation())
    # the same rule interrupted before it stops still resumes, to the same end
    _signal_at_step(monkeypatch, 2 * STEPS_PER_EPOCH + 2)
    with pytest.raises(TrainingInterrupted):
        _new(adata).train(30, checkpoint_dir=tmp_path / "i", checkpoint_every=1, **stop)
    monkeypatch.undo()
    resumed = SCVI.load_checkpoint(tmp_path / "i", adata, device="cpu")
    assert resumed.interrupted
    _assert_same_run(resumed.resume(progress_bar=False), m)
    assert resumed.history.attrs["stopping"]["epoch"] == ended["epoch"]


# ------------------------------------------------------------------ restored best epoch


@pytest.fixture(scope="module")
def overfit():
    """60 cells of 300 genes: at lr 0.03 the validation ELBO's 5-epoch mean peaks well
    before epoch 30 (at epoch 19), then falls."""
    return synthetic_zinb(n_cells=60, n_genes=300, n_clusters=3, n_batches=2, seed=0)


def _wide(adata):
    return SCVI(adata, batch_key="batch", n_latent=3, n_hidden=64)


def _restore_kw(**more):
    kw = dict(_kw(), batch_size=16, kl_warmup_epochs=1, lr=0.03, restore_best_epoch=True)
    return kw | more


@pytest.fixture(scope="module")
def restored(overfit):
    return _wide(overfit).train(30, **_restore_kw())


def _is_norm_statistic(name):
    return any(k in name for k in ("running_mean", "running_var", "num_batches_tracked"))


def test_the_restored_epoch_is_the_best_smoothed_one_after_the_warm_up(overfit, restored):
    ended, h = restored.history.attrs["stopping"], restored.history
    smoothed = h["validation_elbo"].rolling(5, min_periods=1).mean()[h["epoch"] >= 1]
    best = int(h["epoch"][smoothed.idxmax()])
    assert ended["restored_epoch"] == ended["best_epoch"] == best < ended["epoch"] == 29
    assert ended["best_value"] == pytest.approx(smoothed.max())
    # its parameters are those of a run that ended at that epoch (batch norm's statistics
    # are re-estimated at each end, from other random draws)
    short = _wide(overfit).train(best + 1, **_restore_kw(restore_best_epoch=False))
    mine, theirs = _state(restored), _state(short)
    same = [torch.equal(v, theirs[k]) for k, v in mine.items() if not _is_norm_statistic(k)]
    assert all(same)
    # the last epoch's parameters, kept for a next call, are others
    last = restored.training_run.state.last_params[0]["log_theta"]
    assert not torch.equal(last, mine["model.log_theta"])


def test_a_call_after_a_restore_continues_from_the_last_epoch(overfit, restored, tmp_path):
    """train(25); train(5) is train(30) with restores: the second call goes on from epoch
    24's parameters and Adam's moments, and ends on the best epoch of both calls; so does a
    finished call's checkpoint, loaded and trained on."""
    two = _wide(overfit).train(25, **_restore_kw())
    assert two.history.attrs["stopping"]["restored_epoch"] < 24  # restored in the first call
    _assert_same_run(two.train(5, **_restore_kw()), restored)
    first = _wide(overfit).train(
        25, checkpoint_dir=tmp_path / "c", checkpoint_every=25, **_restore_kw()
    )
    loaded = SCVI.load_checkpoint(tmp_path / "c", overfit, device="cpu")
    _assert_same_run(loaded, first)  # the checkpoint holds the restored model
    _assert_same_run(loaded.train(5, **_restore_kw()), restored)


def test_a_run_resumed_after_its_best_epoch_restores_it(overfit, restored, tmp_path, monkeypatch):
    _signal_at_step(monkeypatch, 22 * 4 + 2)  # 54 training cells: 4 steps an epoch
    with pytest.raises(TrainingInterrupted):
        _wide(overfit).train(30, checkpoint_dir=tmp_path / "c", **_restore_kw())
    monkeypatch.undo()
    resumed = SCVI.load_checkpoint(tmp_path / "c", overfit, device="cpu")
    _assert_same_run(resumed.resume(progress_bar=False), restored)
    assert resumed.run_settings.restore_best_epoch is True
