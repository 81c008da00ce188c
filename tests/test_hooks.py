"""The training loop's hooks, each alone: validation, early stopping, checkpoints,
interrupts, the last good epoch (pyro_scvi.train.hooks)."""

import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import LogNormalLibrary, ScviGuide, ScviModel, TrainingError, from_anndata
from pyro_scvi.errors import TrainingInterrupted
from pyro_scvi.train.hooks import (
    DIVERGED_RATIO,
    DROP_FROM_BEST,
    HISTORY_COLUMNS,
    BestEpoch,
    Checkpoints,
    Divergence,
    EarlyStopping,
    Interrupts,
    LastGoodEpoch,
    RunHistory,
    Validation,
    stop_on_signals,
)
from pyro_scvi.train.loop import TrainState
from pyro_scvi.train.passes import norm_batches, poisson_null_loglik, refresh_batch_norm


def _modules(n_genes=20):
    model = ScviModel(n_genes, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
    return model, ScviGuide(n_genes, 1)


def _history(*epochs):
    h = RunHistory({"engine": {"compiled": False}})
    for e in epochs:
        h.append({"epoch": e, "train_elbo": -1.0, "validation_elbo": -1.0, "kl_weight": 1.0})
    return h


# --------------------------------------------------------------------------- history


def test_run_history_is_a_frame_with_the_columns_and_attrs():
    h = _history(0, 1)
    frame = h.frame()
    assert list(frame.columns) == HISTORY_COLUMNS and list(frame["epoch"]) == [0, 1]
    assert frame.attrs == {"engine": {"compiled": False}} and h.last_epoch == 1
    assert RunHistory().last_epoch is None and len(RunHistory().frame()) == 0


# ------------------------------------------------------------------------ validation


class _FakeStep:
    """The parts of a Stepper that Validation uses; records the networks' modes."""

    def __init__(self, model, guide, group=None, value=-7.0):
        self.model, self.guide, self.device, self.group = model, guide, torch.device("cpu"), group
        self.value, self.calls = value, []

    def shard(self, cells):
        return cells if self.group is None else self.group.shard(cells)

    def loss(self, data, cells):
        self.calls.append((list(cells), self.model.training, self.guide.training))
        return self.value


def test_validation_scores_the_cells_in_eval_mode_on_fresh_batch_norm_statistics():
    adata = synthetic_zinb(n_cells=60, n_genes=20, seed=0)
    data = from_anndata(adata)
    model, guide = _modules()
    norm = guide.z_encoder.body[1]
    with torch.no_grad():
        norm.running_mean.fill_(100.0)  # stale statistics
    step = _FakeStep(model, guide)
    hook = Validation(step, data, np.arange(50), np.arange(50, 60), norm_cells=30)
    assert len(hook.norm_cells) == 30 and set(hook.norm_cells) <= set(range(50))
    model.train(), guide.train()
    assert hook() == -7.0
    assert step.calls == [(list(range(50, 60)), False, False)]  # eval mode, every cell
    assert model.training and guide.training  # restored
    assert norm.running_mean.abs().max() < 100.0  # re-estimated before scoring
    # no validation cells: NaN, and nothing is computed
    empty = Validation(step, data, np.arange(50), np.array([], dtype=int))
    assert np.isnan(empty()) and len(step.calls) == 1


class _Whole(torch.nn.Module):
    """A model without ``batch_norm_pass``: the refresh replays all of it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model(*args)


def _norm_buffers(*modules):
    return [
        b.clone()
        for m in modules
        for n in m.modules()
        if isinstance(n, torch.nn.BatchNorm1d)
        for b in (n.running_mean, n.running_var)
    ]


@pytest.mark.parametrize("n_batch", [1, 2])
def test_the_batch_norm_pass_gives_the_statistics_of_the_whole_model(n_batch):
    # The refresh runs only the model's batch-norm inputs (ScviModel.batch_norm_pass), from
    # minibatches gathered once (norm_batches): the same statistics, bit for bit, as
    # replaying the whole model on minibatches gathered anew
    adata = synthetic_zinb(n_cells=90, n_genes=30, n_batches=n_batch, seed=1)
    data = from_anndata(adata, batch_key="batch" if n_batch > 1 else None)
    library = LogNormalLibrary(torch.full((n_batch,), 3.0), torch.full((n_batch,), 0.5))
    model, guide = ScviModel(30, n_batch, library), ScviGuide(30, n_batch)
    cells = np.arange(5, 85)
    refresh_batch_norm(_Whole(model), guide, data, cells, batch_size=32)
    whole = _norm_buffers(model, guide)
    batches = norm_batches(data, cells, batch_size=32)
    for _ in range(2):  # the gathered minibatches serve again
        refresh_batch_norm(model, guide, data, cells, batch_size=32, batches=batches)
        assert all(map(torch.equal, _norm_buffers(model, guide), whole))
    assert int(model.decoder.body[1].num_batches_tracked) == len(batches) == 3


def test_the_batch_norm_pass_replays_the_whole_model_when_another_part_keeps_statistics():
    model, guide = _modules()
    model.prior.extra = torch.nn.BatchNorm1d(10)  # a prior with a network of its own
    seen = []
    model.prior.register_forward_pre_hook(lambda *args: seen.append("prior"))
    data = from_anndata(synthetic_zinb(n_cells=40, n_genes=20, seed=0))
    refresh_batch_norm(model, guide, data, np.arange(40), batch_size=20)
    assert seen == ["prior", "prior"]  # the model ran, once per minibatch
    del model.prior.extra
    refresh_batch_norm(model, guide, data, np.arange(40), batch_size=20)
    assert seen == ["prior", "prior"]  # only its batch norm's inputs


def test_validation_of_a_data_parallel_rank_sums_the_ranks_shares():
    adata = synthetic_zinb(n_cells=60, n_genes=20, seed=0)
    data = from_anndata(adata)
    model, guide = _modules()
    seen = []
    group = SimpleNamespace(
        shard=lambda cells: cells[:4],  # this rank's share: 4 of 10 cells
        broadcast=lambda *modules: seen.append("broadcast"),
        sum=lambda value: seen.append(value) or value + 3 * (-2.0),  # another rank: 6 x -1
    )
    hook = Validation(_FakeStep(model, guide, group=group, value=-2.0), data, np.arange(50),
                      np.arange(50, 60))  # fmt: skip
    # per cell over all 10: (4 cells x -2 + 6 cells x -1) / 10
    assert hook() == pytest.approx((4 * -2.0 - 6.0) / 10)
    assert seen == ["broadcast", 4 * -2.0]


# -------------------------------------------------------------------- early stopping


def test_early_stopping_counts_epochs_without_improvement_in_the_state():
    state, said = TrainState.new(0), []
    hook = EarlyStopping(state, enabled=True, patience=2, min_delta=0.5, window=1, say=said.append)
    assert hook.update(0, -10.0) is False and state.best == -10.0
    assert hook.update(1, -9.8) is False and state.since_best == 1  # not by > min_delta
    assert hook.update(2, -9.0) is False and state.since_best == 0 and state.best == -9.0
    assert [hook.update(3, -9.0), hook.update(4, -9.1)] == [False, True]
    assert said == [
        "Early stopping at epoch 4: the ELBO has not improved by more than 0.5 for 2 epochs."
    ]
    assert hook.record(4, 10)["reason"].startswith("converged")
    # off: it never stops, but keeps counting for a later run that turns it on
    off = EarlyStopping(TrainState.new(0), enabled=False, patience=1, window=1)
    assert [off.update(e, v) for e, v in enumerate((-1.0, -2.0, -3.0))] == [False] * 3
    assert off.state.since_best == 2 and off.record(2, 3)["reason"].startswith("max_epochs")
    resumed = EarlyStopping(off.state, enabled=True, patience=3, window=1)
    assert resumed.update(3, -4.0) is True


def test_early_stopping_never_counts_the_epochs_of_the_kl_warm_up():
    # an ELBO that only gets worse: it stops exactly `patience` epochs after the warm-up
    hook = EarlyStopping(TrainState.new(0), enabled=True, patience=3, warmup_end=10)
    stops = [hook.update(e, -float(e)) for e in range(20)]
    assert stops.index(True) == 12  # epochs 10, 11, 12 without improvement


def _noisy_plateau(n=200, turn=60):
    """An ELBO that rises until epoch ``turn``, then stays flat, with epoch-to-epoch noise."""
    noise = np.random.default_rng(0).normal(0, 1.0, n)
    return np.minimum(np.arange(n), turn) * 0.5 + noise


def test_early_stopping_threshold_is_the_elbos_own_noise_so_it_is_scale_free():
    stops = []
    for scale, shift in [(1.0, 0.0), (1000.0, -5e5), (0.01, 3.0)]:
        hook = EarlyStopping(TrainState.new(0), enabled=True, patience=20, warmup_end=5)
        values = shift + scale * _noisy_plateau()
        stop = next(e for e, v in enumerate(values) if hook.update(e, v))
        # a mean of 5 epochs of unit noise: standard error about 1 / sqrt(5)
        assert hook.threshold / scale == pytest.approx(1 / np.sqrt(5), rel=0.5)
        stops.append(stop)
    # the same epoch whatever the ELBO's units; after the rise ends, within ~patience
    assert len(set(stops)) == 1 and 60 + 20 <= stops[0] < 60 + 50


# -------------------------------------------------------------------------- best epoch


def _epoch_params(model, epoch):
    with torch.no_grad():
        model.log_theta.fill_(float(epoch))


def _theta(model):
    return float(model.log_theta.detach()[0])


def test_the_best_epoch_after_the_warm_up_is_restored_and_a_next_call_goes_on_from_the_last():
    model, guide = _modules()
    state = TrainState.new(0)
    best = BestEpoch(model, guide, state, enabled=True, warmup_end=2)
    # epoch 0 is the best of all, but of the warm-up: it never counts
    for epoch, value in enumerate((-1.0, -2.0, -5.0, -3.0, -4.0)):
        _epoch_params(model, epoch)
        best.update(epoch, value)
    assert (state.best_epoch, state.best_value) == (3, -3.0)
    assert best.restore(last_epoch=4) is True
    assert _theta(model) == 3.0  # epoch 3's parameters
    assert float(state.last_params[0]["log_theta"][0]) == 4.0 and state.best_params is None
    assert best.record() == {
        "restore_best_epoch": True,
        "best_epoch": 3,
        "best_value": -3.0,
        "restored_epoch": 3,
    }
    # the next call starts from the last epoch; the best is kept for its end
    again = BestEpoch(model, guide, state, enabled=True, warmup_end=2)
    assert _theta(model) == 4.0 and state.last_params is None
    assert float(state.best_params[0]["log_theta"][0]) == 3.0
    _epoch_params(model, 5)
    again.update(5, -3.5)  # not better than epoch 3
    assert again.restore(last_epoch=5) is True and _theta(model) == 3.0


def test_without_restoring_the_best_epoch_is_followed_and_the_model_kept():
    model, guide = _modules()
    state = TrainState.new(0)
    off = BestEpoch(model, guide, state, enabled=False, warmup_end=3)
    for epoch in range(3):
        off.update(epoch, 0.0)
    assert state.best_epoch is None and off.record()["best_epoch"] is None  # all warm-up
    for epoch, value in ((3, -9.0), (4, -10.0), (5, float("nan"))):
        _epoch_params(model, epoch)
        off.update(epoch, value)
    assert off.restore(last_epoch=5) is False and state.last_params is None
    assert _theta(model) == 5.0
    assert off.record() == {
        "restore_best_epoch": False,
        "best_epoch": 3,
        "best_value": -9.0,
        "restored_epoch": None,
    }
    # off, no copy of the model is kept; a call that restores after it counts its own epochs
    assert state.best_params is None
    on = BestEpoch(model, guide, state, enabled=True, warmup_end=3)
    assert state.best_epoch is None
    for epoch, value in ((6, -12.0), (7, -11.0), (8, -13.0)):
        _epoch_params(model, epoch)
        on.update(epoch, value)
    assert on.restore(last_epoch=8) is True and _theta(model) == 7.0
    # on, but no epoch after the warm-up yet: nothing to restore
    on = BestEpoch(model, guide, TrainState.new(0), enabled=True, warmup_end=10)
    on.update(0, -1.0)
    assert on.restore(last_epoch=0) is False and on.record()["restored_epoch"] is None


def test_early_stopping_exposes_the_smoothed_value_it_judges():
    hook = EarlyStopping(TrainState.new(0), enabled=False, patience=3, window=2)
    hook.update(0, -4.0)
    hook.update(1, -2.0)
    assert hook.value == -3.0


# ----------------------------------------------------------------------- checkpoints


def test_checkpoints_are_written_every_few_epochs_and_at_the_end():
    written, kept = [], []
    state = TrainState.new(0)

    def write(st, history):
        assert st is state
        written.append(int(history["epoch"].iloc[-1]))
        return "here"

    hook = Checkpoints(write, every=2, state=state, keep=kept.append)
    h = RunHistory()
    for epoch in range(5):
        h.append({"epoch": epoch})
        hook.after_epoch(epoch, h)
    assert written == [1, 3] and kept == [False, False] and hook.written == 3
    hook.at_end(h)  # epoch 4 was not written yet
    assert written == [1, 3, 4]
    h2 = _history(0, 1)
    done = Checkpoints(write, every=2, state=state)
    done.after_epoch(1, h2)
    # the last epoch was written, but the run's end changed batch norm since: again
    done.at_end(h2)
    assert written == [1, 3, 4, 1, 1]
    assert done.now(h2.frame()) == "here"
    # none: on a rank other than 0, or no folder; every=0: only now()
    off = Checkpoints(None, every=1, state=state)
    off.after_epoch(0, h2), off.at_end(h2)
    assert not off.enabled and off.now(h2.frame()) is None
    never = Checkpoints(write, every=0, state=state)
    never.after_epoch(0, h2), never.at_end(h2)
    assert written == [1, 3, 4, 1, 1, 1]


# ------------------------------------------------------------------------ interrupts


def test_an_interrupt_keeps_the_state_refreshes_and_writes_a_checkpoint():
    calls = []
    state = TrainState.new(0)
    checkpoints = Checkpoints(
        lambda st, h: calls.append(("write", len(h))) or "ckpt", every=0, state=state
    )
    hook = Interrupts(
        lambda: signal.SIGINT,
        keep=lambda mid: calls.append(("keep", mid)),
        checkpoints=checkpoints,
        refresh=lambda: calls.append(("refresh",)),
    )
    assert hook.requested() == signal.SIGINT
    err = hook.interrupt(2, 3, mid_epoch=True, history=_history(0, 1))
    assert isinstance(err, TrainingInterrupted)
    assert str(err) == "Training interrupted by SIGINT at epoch 2, step 3."
    assert (err.signal, err.epoch, err.step, err.checkpoint) == (signal.SIGINT, 2, 3, "ckpt")
    assert calls == [("keep", True), ("refresh",), ("write", 2)]
    assert list(err.history["epoch"]) == [0, 1]
    # at an epoch's end: resumes at the next epoch; no checkpoints, no refresh
    calls.clear()
    quiet = Interrupts(lambda: 15, keep=lambda mid: calls.append(("keep", mid)))
    err = quiet.interrupt(2, 0, mid_epoch=False, history=_history(0, 1, 2))
    assert str(err) == "Training interrupted by SIGTERM at the end of epoch 2."
    assert (err.epoch, err.step) == (3, 0) and calls == [("keep", False)]
    assert Interrupts().requested() == 0  # no stop function: never


def test_stop_on_signals_turns_the_first_signal_into_a_request():
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as stop:
        assert stop() == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop() == signal.SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM: still the first request
        assert stop() == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # ... but a second SIGINT aborts at once
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------ last good epoch


def test_the_last_good_epoch_is_saved_in_place_and_restored_on_failure():
    model, guide = _modules()
    refreshed = []
    state = TrainState.new(0)
    guard = LastGoodEpoch(model, guide, state, refresh=lambda: refreshed.append(1))
    buffers = [id(v) for s in guard.snapshot for v in s.values()]
    with torch.no_grad():
        model.log_theta.add_(1.0)
        guide.z_encoder.loc.bias.add_(2.0)
    guard.save()  # the end of a good epoch
    assert [id(v) for s in guard.snapshot for v in s.values()] == buffers  # same buffers
    expected = [{k: v.clone() for k, v in m.state_dict().items()} for m in (model, guide)]
    with torch.no_grad():  # a failed epoch
        model.log_theta.fill_(float("nan"))
        guide.z_encoder.loc.bias.fill_(float("nan"))
    err = guard.fail(float("nan"), "epoch 1, step 2", _history(0))
    assert isinstance(err, TrainingError) and "epoch 1, step 2" in str(err)
    assert "restored to the end of epoch 0" in str(err) and list(err.history["epoch"]) == [0]
    for m, saved in zip((model, guide), expected, strict=True):
        for k, v in m.state_dict().items():
            torch.testing.assert_close(v, saved[k])
    assert refreshed == [1]  # batch norm's statistics of the restored weights


def test_a_failure_before_any_epoch_says_the_model_is_untrained():
    model, guide = _modules()
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def broken_refresh():
        raise RuntimeError("the refresh fails too")

    # a state stopped inside an epoch carries the snapshot; its statistics are stale
    carried = TrainState.new(0)
    carried.good_state = LastGoodEpoch(model, guide, TrainState.new(0), refresh=None).snapshot
    guard = LastGoodEpoch(model, guide, carried, refresh=broken_refresh, completed_before=3)
    assert guard.stale_norms and carried.good_state is None
    with torch.no_grad():
        model.log_theta.fill_(float("nan"))
    err = guard.fail(float("inf"), "epoch 3, step 0", RunHistory())
    assert "restored to the end of epoch 2" in str(err)  # the earlier call's last epoch
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    fresh = LastGoodEpoch(model, guide, TrainState.new(0), refresh=broken_refresh)
    assert "no epoch had completed" in str(fresh.fail(float("nan"), "epoch 0", RunHistory()))


# ------------------------------------------------------------------------ divergence


def _elbos(*values):
    h = RunHistory()
    for epoch, value in enumerate(values):
        h.append({"epoch": epoch, "validation_elbo": value})
    return h


@pytest.mark.parametrize("depth", [1.0, 30.0])  # the rule has no scale of its own
def test_divergence_is_judged_in_units_of_the_data_s_poisson_likelihood(depth):
    adata = synthetic_zinb(n_cells=60, n_genes=15, seed=0)
    adata.X = adata.X * int(depth)
    data = from_anndata(adata)
    cells = np.arange(60)
    unit = -poisson_null_loglik(data, cells)
    x = data.X.toarray()
    n, share = x.sum(1, keepdims=True), x.sum(0) / x.sum()
    from scipy.stats import poisson

    assert unit == pytest.approx(-poisson.logpmf(x, n * share).sum(1).mean())
    hook = Divergence(data, cells, column="validation_elbo", lr=0.15)
    fine = [-1.5 * unit, -0.6 * unit, -0.65 * unit, -0.55 * unit]
    assert hook.check(_elbos(*fine)) is None
    # an early excursion that comes back is not a divergence
    assert hook.check(_elbos(-1e3 * unit, -0.9 * unit, -0.6 * unit)) is None
    grown = hook.check(_elbos(*fine, -1.01 * DIVERGED_RATIO * unit))
    assert grown.startswith("The validation ELBO diverged") and "--lr" in grown
    assert "0.15" in grown
    fell = hook.check(_elbos(*fine, -(0.55 + 1.01 * DROP_FROM_BEST) * unit))
    assert "down from" in fell and "epoch 3" in fell and "--lr" in fell


def test_stop_on_signals_passes_on_a_signal_nobody_looked_at():
    """A signal after the loop's last look (the end-of-run pass) is sent again on the way
    out, to the handler that was there before: never dropped (issue 27, item 4)."""
    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    try:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)  # arrives, nobody polls
            assert got == []  # held while the block runs
        assert got == [signal.SIGTERM]
        got.clear()
        with stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop() == signal.SIGTERM  # seen: the caller acts on it, not sent again
        assert got == []
    finally:
        signal.signal(signal.SIGTERM, before)
