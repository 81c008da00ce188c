"""The training engine: its choices, their records, and that every path is one estimator."""

import json

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO, TraceMeanField_ELBO

from pyro_scvi import (
    NB,
    SCVI,
    ZINB,
    ZIP,
    FlowGuide,
    FullCovarianceGuide,
    InputError,
    MixtureOfGaussians,
    Poisson,
    Prior,
    StandardNormal,
    VampPrior,
)
from pyro_scvi.train import engine, kernels
from pyro_scvi.train.engine import Engine, ThreadPolicy
from pyro_scvi.train.kl import Annealed

# --- choices ----------------------------------------------------------------------------


def _resolve(m, eng=None, **kw):
    eng = eng or Engine()
    run = dict(n_steps=10_000, batch_size=128, n_genes=m.data.n_genes, device="cpu")
    run.update(kw)
    return eng.resolve(m.model, m.guide, **run)


def test_long_runs_of_static_components_compile_and_short_ones_do_not(small_adata):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    long, short = _resolve(m), _resolve(m, n_steps=engine.COMPILE_MIN_STEPS - 1)
    assert long.compiled and long.fused_adam
    assert not short.compiled and short.reasons["compiled"].startswith("off: 299 steps")
    # 40 genes: the fused kernel does not pay for its compilation
    assert not long.fused_kernel and "40 genes" in long.reasons["fused_kernel"]


class _UserPrior(Prior):
    def forward(self):
        return pyro.distributions.Laplace(torch.zeros(self.n_latent), 1.0).to_event(1)


class _StaticUserPrior(_UserPrior):
    static_structure = True


def test_a_user_prior_runs_uncompiled_unless_it_declares_a_static_structure(small_adata):
    plain = _resolve(SCVI(small_adata, prior=_UserPrior(), n_hidden=8, n_latent=2))
    assert not plain.compiled
    assert plain.reasons["compiled"] == (
        "off: the model (ScviModel) does not declare static_structure"
    )
    declared = _resolve(SCVI(small_adata, prior=_StaticUserPrior(), n_hidden=8, n_latent=2))
    assert declared.compiled

    # a plain function as prior cannot declare anything
    def laplace():
        return pyro.distributions.Laplace(torch.zeros(2), 1.0).to_event(1)

    assert not _resolve(SCVI(small_adata, prior=laplace, n_hidden=8, n_latent=2)).compiled


def test_the_fused_kernel_follows_genes_elements_compiler_and_likelihood(small_adata, monkeypatch):
    monkeypatch.setattr(engine, "FUSED_MIN_GENES", 10)
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    monkeypatch.setattr(kernels, "precompile", lambda device="cpu": True)
    assert _resolve(m, n_steps=100_000).fused_kernel  # 40 genes x 128 x 1e5 = 5e8 elements
    assert not _resolve(m, n_steps=10).fused_kernel  # too few elements to pay off
    on_gpu = _resolve(m, device="cuda")
    assert not on_gpu.fused_kernel  # not measured there
    # the CPU only feeds the accelerator: torch's thread count, held and said so
    assert on_gpu.threads == torch.get_num_threads() and "held" in on_gpu.reasons["threads"]
    monkeypatch.setattr(kernels, "precompile", lambda device="cpu": False)
    run = _resolve(m, n_steps=100_000)
    assert not run.fused_kernel and "compiling it failed" in run.reasons["fused_kernel"]
    asked = _resolve(m, Engine(fused_kernel=True))  # asked for: runs, uncompiled, says so
    assert asked.fused_kernel and not asked.compile_kernel
    assert "uncompiled" in asked.reasons["fused_kernel"]
    nb = SCVI(small_adata, likelihood=NB(), n_hidden=8, n_latent=2)
    assert "has no fused kernel" in _resolve(nb).reasons["fused_kernel"]
    with pytest.raises(InputError, match="has no fused kernel"):
        _resolve(nb, Engine(fused_kernel=True))


def test_what_the_user_passes_decides_and_contradictions_are_errors(small_adata):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    assert not _resolve(m, elbo=Trace_ELBO()).compiled
    jit = _resolve(m, elbo=JitTrace_ELBO(), n_steps=10)
    assert jit.compiled and jit.reasons["compiled"] == "on: the ELBO passed is a JIT ELBO"
    with pytest.raises(InputError, match="contradicts elbo=Trace_ELBO"):
        _resolve(m, Engine(compiled=True), elbo=Trace_ELBO())
    optim = pyro.optim.Adam({"lr": 1e-3})
    assert not _resolve(m, optim=optim).fused_adam
    with pytest.raises(InputError, match="drop one of them"):
        _resolve(m, Engine(fused_adam=True), optim=optim)
    with pytest.raises(InputError, match="does not declare static_structure"):
        _resolve(SCVI(small_adata, prior=_UserPrior()), Engine(compiled=True))


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(threads=0), "positive integer"),
        (dict(compiled="yes"), "True, False or None"),
        (dict(data_placement="gpu"), "'host', 'device' or None"),
        (dict(matmul_precision="low"), "highest, high, medium"),
    ],
)
def test_engine_fields_are_validated(bad, match):
    with pytest.raises(InputError, match=match):
        Engine(**bad)


def test_presets_and_coercion():
    assert Engine.coerce("pyro") == Engine(False, False, False)
    assert Engine.coerce({"threads": 2}) == Engine(threads=2)
    assert Engine.coerce(None) == Engine()
    with pytest.raises(InputError, match="use one of auto, eager"):
        Engine.coerce("fast")
    with pytest.raises(InputError, match="unknown fields"):
        Engine.coerce({"thread": 2})


def test_gpu_runs_hold_the_counts_on_the_device_when_they_fit(small_adata, monkeypatch):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    nbytes = m.data.resident_bytes()
    free = {"bytes": 4 * nbytes}
    monkeypatch.setattr(engine, "device_free_bytes", lambda device: free["bytes"])
    gpu = dict(device="cuda")
    eng = Engine(fused_kernel=False)
    fits = _resolve(m, eng, data_bytes=nbytes, **gpu)
    assert fits.data_placement == "device" and fits.reasons["data_placement"].startswith("device")
    free["bytes"] = nbytes  # the counts would take all of it: more than RESIDENT_MAX_FRACTION
    assert _resolve(m, eng, data_bytes=nbytes, **gpu).data_placement == "host"
    assert _resolve(m, eng, **gpu).data_placement == "host"  # size unknown
    # CPU runs read the host's counts unless asked (or small: test_cpu_runs_gather_small_...);
    # asking is honoured on any device
    assert _resolve(m, eng, data_bytes=nbytes).data_placement == "host"
    asked = _resolve(m, Engine(data_placement="device"), data_bytes=nbytes)
    assert asked.data_placement == "device" and asked.reasons["data_placement"] == "asked for"
    assert _resolve(m).matmul_precision == "highest"
    assert _resolve(m, Engine(matmul_precision="high")).matmul_precision == "high"


def test_cpu_runs_gather_small_counts_from_a_dense_copy_and_train_the_same_run(small_adata):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    limit = engine.DENSE_GATHER_MAX_BYTES
    small = _resolve(m, dense_bytes=m.data.dense_bytes())
    assert small.data_placement == "device" and "dense copy" in small.reasons["data_placement"]
    big = _resolve(m, dense_bytes=limit + 1)
    assert big.data_placement == "host" and "MiB" in big.reasons["data_placement"]
    assert _resolve(m).data_placement == "host"  # size unknown
    streamed = _resolve(m, dense_bytes=1, data_source="streamed: a big file")
    assert streamed.data_placement == "host"
    assert _resolve(m, Engine(data_placement="host"), dense_bytes=1).data_placement == "host"
    # a run decides it, records why, and trains bit for bit as one that reads the CSR rows
    runs = []
    for eng in (
        Engine(compiled=False, threads=1),
        Engine(compiled=False, threads=1, data_placement="host"),
    ):
        m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
        m.train(3, progress_bar=False, seed=1, engine=eng)
        runs.append(m)
    dense, host = runs
    assert dense.engine["data_placement"] == "device", dense.engine["reasons"]
    assert dense.engine["reasons"]["data_placement"].startswith("device: a CPU run gathers")
    assert host.engine["data_placement"] == "host"
    for column in ("train_elbo", "validation_elbo"):
        np.testing.assert_array_equal(dense.history[column], host.history[column])
    pairs = zip(dense.model.state_dict().values(), host.model.state_dict().values(), strict=True)
    for a, b in pairs:
        assert torch.equal(a, b)


def test_gathering_on_the_device_trains_the_same_run_as_gathering_on_the_host(small_adata):
    histories, params = [], []
    for placement in ("host", "device"):
        m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
        m.train(3, progress_bar=False, seed=1, engine=Engine.preset("eager", threads=1))
        eng = Engine(compiled=False, threads=1, data_placement=placement)
        m.train(2, progress_bar=False, engine=eng)
        assert m.engine["data_placement"] == placement
        histories.append(m.history[["train_elbo", "validation_elbo"]].to_numpy())
        modules = [*m.model.parameters(), *m.guide.parameters()]
        params.append(torch.cat([p.detach().ravel() for p in modules]))
    # the same minibatches, bit for bit: the same arithmetic in the same order
    np.testing.assert_array_equal(histories[0], histories[1])
    assert torch.equal(params[0], params[1])


def test_the_matmul_precision_applies_during_the_run_only(small_adata):
    seen = []
    before = torch.get_float32_matmul_precision()
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    # every forward of the model (training steps, validation) sees the run's precision
    m.model.register_forward_hook(
        lambda module, inputs, output: seen.append(torch.get_float32_matmul_precision())
    )
    m.train(1, progress_bar=False, engine=Engine(matmul_precision="medium", threads=1))
    assert seen and set(seen) == {"medium"}
    assert torch.get_float32_matmul_precision() == before
    assert m.engine["matmul_precision"] == "medium"


# --- threads ----------------------------------------------------------------------------


class _FakeCpu:
    """A CpuMeter whose other processes keep ``others`` cores busy (mutable) of ``n_cpus``."""

    def __init__(self, others: float, n_cpus: int = 2):
        self.others, self.n_cpus = others, n_cpus
        self.clock = {"t": 0.0, "total": 0, "busy": 0}

    def sample(self):
        c = self.clock
        c["t"] += 3.0
        c["total"] += 300 * self.n_cpus  # 3 s of jiffies on every cpu
        c["busy"] += int(300 * self.others)
        return c["t"], c["total"], c["busy"], 0

    def cpus(self):
        return self.n_cpus

    def cores(self):
        return self.n_cpus

    def settle(self):
        pass


@pytest.mark.parametrize("others, expected", [(0.0, 2), (0.1, 2), (0.6, 1), (1.0, 1), (2.0, 1)])
def test_threads_follow_the_cores_other_processes_leave_free(others, expected):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = ThreadPolicy(None, meter=_FakeCpu(others))
        assert policy.start() == expected == torch.get_num_threads()
        policy.close()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_adapt_when_another_process_starts_during_the_run():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        meter = _FakeCpu(0.0)
        policy = ThreadPolicy(None, min_interval=1.0, meter=meter)
        assert policy.start() == 2
        meter.others = 1.0  # a busy neighbour appears
        assert policy.update() == 1
        meter.others = 0.0  # ... and goes
        assert policy.update() == 2
        fixed = ThreadPolicy(2, meter=_FakeCpu(1.0))
        assert fixed.start() == 2 and fixed.update() == 2  # asked for: never changed
    finally:
        torch.set_num_threads(before)


# --- records ----------------------------------------------------------------------------


def test_the_choice_is_recorded_in_history_model_and_saved_files(small_adata, tmp_path):
    m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
    m.train(2, progress_bar=False, engine=Engine.preset("pyro", threads=1))
    m.train(1, progress_bar=False, engine="eager")
    assert m.engine["fused_adam"] is True and m.engine["threads"] == "auto"
    assert [e["fused_adam"] for e in m.history.attrs["engines"]] == [False, True]
    assert list(m.history["threads"][:2]) == [1, 1]
    m.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["engine"] == m.engine
    loaded = SCVI.load(tmp_path / "m", small_adata)
    assert loaded.engine == m.engine
    assert loaded.history.attrs["engines"][0]["reasons"]["fused_adam"] == "off: asked for"


# --- capabilities -----------------------------------------------------------------------


def test_elbo_capabilities_come_from_the_elbo_or_the_one_table():
    from pyro.infer import JitTraceMeanField_ELBO, RenyiELBO, TraceGraph_ELBO

    from pyro_scvi.train.engine import ElboCapabilities, elbo_capabilities

    assert elbo_capabilities(Trace_ELBO()) == ElboCapabilities(differentiable_loss=True)
    assert elbo_capabilities(TraceMeanField_ELBO()).differentiable_loss
    jit = elbo_capabilities(JitTraceMeanField_ELBO())
    assert jit.compiled and jit.sums_site_terms and not jit.differentiable_loss
    assert not elbo_capabilities(RenyiELBO()).sums_site_terms
    assert elbo_capabilities(TraceGraph_ELBO()) == ElboCapabilities()  # not in the table

    class Sub(Trace_ELBO):  # may change the loss: not differentiable_loss
        pass

    class SubJit(JitTrace_ELBO):
        pass

    class Declared(RenyiELBO):
        capabilities = ElboCapabilities(sums_site_terms=True)

    assert elbo_capabilities(Sub()) == ElboCapabilities()
    assert elbo_capabilities(SubJit()).compiled
    assert elbo_capabilities(Declared()).sums_site_terms


def test_the_engine_acts_on_declared_capabilities(small_adata):
    from pyro.infer import RenyiELBO

    from pyro_scvi.train.engine import ElboCapabilities

    class Compiled(Trace_ELBO):
        capabilities = ElboCapabilities(compiled=True)

    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    assert _resolve(m, elbo=Compiled()).compiled  # declared, not read from its type
    # the step asks the ELBO too: a sum of site terms is rescaled to the training cells,
    # an IWAE bound is not; Trace_ELBO lets fused Adam hold the parameters
    run = _resolve(m, Engine.preset("eager", threads=1))
    plain = run.stepper(m.model, m.guide, n_train=100, batch_size=10)
    iwae = run.stepper(m.model, m.guide, n_train=100, batch_size=10, elbo=RenyiELBO())
    assert plain.num_cells == 100 and iwae.num_cells is None
    assert plain.record["reasons"]["parameters"].startswith("held by fused Adam")
    assert iwae.record["reasons"]["parameters"] == (
        "registered every step (RenyiELBO reads param sites)"
    )
    assert plain.group is None and run.group is None  # one process: no group, decided once


def test_fused_adam_tells_the_modules_that_it_holds_their_parameters(small_adata):
    # The choice is explicit: the step's optimizer sets the modules' parameters_held while
    # it holds them (not a process-wide switch), and the record says who registers them.
    seen = {}
    for preset in ("eager", "pyro"):
        m = SCVI(small_adata, n_hidden=8, n_latent=2)
        held = seen[preset] = []

        def record(module, inputs, held=held):
            held.append(module.parameters_held)

        m.model.register_forward_pre_hook(record)
        m.train(1, engine=Engine.preset(preset, threads=1), progress_bar=False)
        assert m.model.parameters_held is False and m.guide.parameters_held is False
        assert (
            m.engine["reasons"]["parameters"]
            == {
                "eager": "held by fused Adam after the first step "
                "(Trace_ELBO differentiates without param sites)",
                "pyro": "registered every step (a Pyro optimizer reads the store)",
            }[preset]
        )
    # the first step registers them; later steps hold them (validation and batch-norm
    # passes, outside the step, register as any call does)
    assert seen["eager"][0] is False and seen["eager"][1] is True
    assert not any(seen["pyro"])


# --- resume -------------------------------------------------------------------------------


def test_resume_carries_every_field_of_the_interrupted_runs_engine(small_adata):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    asked = Engine(False, False, True, 2, "device", "high", False)
    record = _resolve(m, asked, data_bytes=m.data.resident_bytes()).as_dict()
    resumed = Engine.for_resume(record)
    assert {f: getattr(resumed, f) for f in engine.FIELDS} == {f: record[f] for f in engine.FIELDS}
    run = _resolve(m, resumed, n_steps=10, data_bytes=m.data.resident_bytes())
    assert {f: getattr(run, f) for f in engine.FIELDS} == {f: record[f] for f in engine.FIELDS}
    assert run.reasons["data_placement"] == "kept from the interrupted run (asked for)"
    assert run.reasons["compiled"] == "off: kept from the interrupted run (off: asked for)"
    # decided automatically the first time: kept, and the reason names the first decision
    auto = _resolve(m, Engine(threads=1)).as_dict()
    again = _resolve(m, Engine.for_resume(auto), n_steps=10)  # too short to compile now
    assert again.compiled and again.reasons["compiled"] == (
        "on: kept from the interrupted run (on: static model and guide, 10000 steps)"
    )
    # a second resume keeps the first run's reason
    third = _resolve(m, Engine.for_resume(again.as_dict()), n_steps=10)
    assert third.reasons["compiled"] == again.reasons["compiled"]
    # an ELBO or optimizer passed again decides its own field, and only that one
    elbo_again = Engine.for_resume(record, elbo_passed=True)
    assert elbo_again.compiled is None and elbo_again.fused_adam is True
    optim_again = Engine.for_resume(record, optim_passed=True)
    assert optim_again.fused_adam is None and optim_again.compiled is False
    assert optim_again.matmul_precision == "high"


def test_resume_re_decides_only_what_this_machine_cannot_honour(small_adata):
    m = SCVI(small_adata, n_hidden=8, n_latent=2)
    record = _resolve(m, Engine(threads=1)).as_dict()
    # a GPU run of several ranks, resumed on this CPU in one process
    record.update(device="cuda:0", data_placement="device", data_parallel=True)
    run = _resolve(m, Engine.for_resume(record), data_bytes=m.data.resident_bytes())
    assert run.data_placement == "host" and run.reasons["data_placement"] == (
        "host: a CPU run reads the host's counts directly (re-decided on resume: the "
        "interrupted run held the counts on cuda:0; this run is on cpu)"
    )
    assert not run.data_parallel and run.reasons["data_parallel"] == (
        "off: re-decided on resume: no torch.distributed group of more than one process is running"
    )
    assert run.threads == 1 and run.matmul_precision == "highest"  # the rest is kept
    # now streamed counts: they cannot be held on the device any more
    record.update(device="cpu")
    streamed = _resolve(m, Engine.for_resume(record), data_source="streamed: a big file")
    assert streamed.data_placement == "host"
    assert "re-decided on resume: the counts are streamed" in streamed.reasons["data_placement"]
    # a likelihood without the kernel now
    nb = SCVI(small_adata, likelihood=NB(), n_hidden=8, n_latent=2)
    lost = _resolve(nb, Engine.for_resume({**record, "fused_kernel": True}))
    assert not lost.fused_kernel and lost.reasons["fused_kernel"].startswith(
        "off: re-decided on resume: the likelihood"
    )
    # asked for by a user (not a resume), the same fields are errors
    with pytest.raises(InputError, match="torchrun"):
        _resolve(m, Engine(data_parallel=True))
    with pytest.raises(InputError, match="streamed from the file"):
        _resolve(m, Engine(data_placement="device"), data_source="streamed: a big file")
    with pytest.raises(InputError, match="has no fused kernel"):
        _resolve(nb, Engine(fused_kernel=True))


# --- one estimator ----------------------------------------------------------------------

# (likelihood, dispersion, prior, other SCVI arguments) cases: every likelihood and
# dispersion with the default prior, every shipped prior with the default likelihood, and
# the paper's q(l) (the default guide centres it on the observed library).
CASES = [
    (ZINB, "gene", StandardNormal, {}),
    (ZINB, "gene-batch", StandardNormal, {}),
    (ZINB, "gene-cell", StandardNormal, {}),
    (NB, "gene", StandardNormal, {}),
    (Poisson, "gene", StandardNormal, {}),
    (ZIP, "gene", StandardNormal, {}),
    (ZINB, "gene", lambda: MixtureOfGaussians(3), {}),
    (ZINB, "gene", lambda: VampPrior(4), {}),
    (ZINB, "gene", StandardNormal, {"library_residual": False}),
    (ZINB, "gene", StandardNormal, {"guide": FullCovarianceGuide.from_data}),
    (ZINB, "gene", StandardNormal, {"guide": FlowGuide.from_data}),
]


def _loss_and_grads(step, params, buffers, *args, **kwargs):
    """``step(*args, **kwargs)`` seeded, from fixed batch-norm statistics: loss, gradients."""
    # Every call starts from the same batch-norm statistics (a training-mode pass updates
    # them, and the VampPrior's components are the encoder in eval mode, which reads them).
    with torch.no_grad():
        for saved, b in buffers:
            b.copy_(saved)
    for p in params:
        p.grad = None
    pyro.set_rng_seed(3)
    loss = step(*args, **kwargs)
    return loss, [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]


def _steppers(m, *, compiled, fused, n_train, batch_size):
    """A run engine's assembled step for ``m`` (eager fused Adam, compiled or not)."""
    eng = Engine(compiled=compiled, fused_kernel=fused, fused_adam=True, threads=1)
    run = eng.resolve(
        m.model, m.guide, n_steps=10, batch_size=batch_size, n_genes=m.data.n_genes, device="cpu"
    )
    return run.stepper(m.model, m.guide, n_train=n_train, batch_size=batch_size)


@pytest.mark.parametrize("n_batches", [1, 3])
@pytest.mark.parametrize("likelihood, dispersion, prior, other", CASES)
def test_every_engine_path_is_the_same_estimator_as_plain_svi(
    likelihood, dispersion, prior, other, n_batches, monkeypatch
):
    # In float64, so that the comparison is about the estimator, not rounding. On the same
    # random draws (seeded before each call; a compiled graph draws in the traced order,
    # the same as eager), each path's loss and gradients must equal plain Pyro
    # Trace_ELBO's. Paths sum the same terms in other orders (the compiled graph) or, with
    # the fused kernel, use lgamma/digamma series whose truncation error is below 1e-9
    # per entry (test_kernels checks them against scipy): at most a few thousand entries
    # here, so 1e-9 (1e-6 fused) of the largest gradient entry bounds rounding and
    # truncation, while a wrong estimator (missing minibatch scale, KL weight, dispersion
    # or prior term) is off by O(1) of it. Each path is the step a run engine assembles
    # (RunEngine.stepper), asked for its loss and gradients without the update.
    from pyro_scvi.datasets import synthetic_zinb

    # the fused kernel's formulas uncompiled: float64, and no compiler needed
    monkeypatch.setattr(kernels, "precompile", lambda device="cpu": False)
    adata = synthetic_zinb(n_cells=100, n_genes=30, n_batches=n_batches, seed=1)
    m = SCVI(
        adata,
        # gene-batch needs a batch key, one batch included (its one level: per gene)
        batch_key="batch" if n_batches > 1 or dispersion == "gene-batch" else None,
        likelihood=likelihood(),
        dispersion=dispersion,
        prior=prior(),
        n_hidden=16,
        n_latent=3,
        **other,
    )
    m.model.double(), m.guide.double()
    # called with the KL weight as the engine calls them
    model, guide = Annealed(m.model), Annealed(m.guide)
    params = [p for mod in (m.model, m.guide) for p in mod.parameters()]
    buffers = [(b.clone(), b) for mod in (m.model, m.guide) for b in mod.buffers()]
    fusable = likelihood is ZINB
    # a component that is not static has no compiled path to compare
    static = engine.static_structure(m.model, m.guide)[0]
    # A full minibatch and a smaller last one. The plate's size is a multiple of the
    # minibatch's: a compiled graph holds the minibatch scale num_cells / size as a float32
    # constant, and 100 / 36 would differ from its float64 value by 1e-8 relative, swamping
    # this float64 comparison (in float32 training that rounding is the terms' own).
    for size, num_cells in ((64, 128), (36, 72)):
        x, b = m.data.tensors(np.arange(size))
        x, cells = x.double(), torch.arange(size)
        state = (params, buffers)
        ref = _loss_and_grads(
            Trace_ELBO().loss_and_grads, *state, model, guide, x, b, cells, num_cells, 0.5
        )
        scale = max(float(g.abs().max()) for g in ref[1])
        paths = {}
        for fused in (False, True) if fusable else (False,):
            tag = "fused " if fused else ""
            for compiled in (False, True) if static else (False,):
                step = _steppers(
                    m, compiled=compiled, fused=fused, n_train=num_cells, batch_size=size
                )
                assert step.record["fused_kernel"] is fused and not step.record["compile_kernel"]
                assert step.record["compiled"] is compiled
                # eager: registers parameters, then holds them; compiled: compiles (which
                # runs the model more than once, so it is not compared), then runs
                calls = ("compile", "run 1", "run 2") if compiled else ("first", "held")
                for call in calls:
                    out = _loss_and_grads(step.loss_and_grads, *state, x, b, cells, 0.5)
                    if call != "compile":
                        paths[f"{tag}{'compiled' if compiled else 'eager'} {call}"] = out
                assert step.record["compiled_sizes"] == ([size] if compiled else [])
        assert len(paths) == (2 if fusable else 1) * (4 if static else 2)
        for name, (loss, grads) in paths.items():
            tol = 1e-6 if name.startswith("fused") else 1e-9
            assert loss == pytest.approx(ref[0], rel=tol), (name, size)
            for g, r in zip(grads, ref[1], strict=True):
                torch.testing.assert_close(g, r, rtol=0, atol=tol * scale, msg=(name, size))


@pytest.mark.parametrize("guide", [FullCovarianceGuide, FlowGuide])
def test_a_guide_whose_draws_torchscript_reorders_compiles_and_trains_as_eager(guide):
    # TorchScript's optimization passes would move the guide's independent draws of l (and
    # the dropout masks) past z's, so an optimized compiled graph draws other numbers than
    # eager from one seed. The guide declares it; its compiled run, unoptimized, follows the
    # eager run's trajectory step for step in float32 (a different draw would move the
    # first epoch's ELBO by far more than float32 rounding of the sums).
    from pyro_scvi.datasets import synthetic_zinb

    adata = synthetic_zinb(n_cells=96, n_genes=30, seed=2)
    runs = {}
    for compiled in (False, True):
        m = SCVI(adata, guide=guide.from_data, n_hidden=16, n_latent=3)
        eng = Engine(compiled=compiled, fused_kernel=False, fused_adam=True, threads=1)
        m.train(3, batch_size=32, engine=eng, early_stopping=False, progress_bar=False, seed=0)
        runs[compiled] = m
    eager, jit = (runs[c].history["train_elbo"].to_numpy() for c in (False, True))
    np.testing.assert_allclose(jit, eager, rtol=1e-5)
    assert runs[True].engine["compiled"] and runs[True].engine["compiled_sizes"] == [32]
    assert "without TorchScript optimization" in runs[True].engine["reasons"]["compiled"]
    z = [runs[c].get_latent_representation() for c in (False, True)]
    np.testing.assert_allclose(z[1], z[0], rtol=1e-3, atol=1e-4)


def test_mean_field_elbo_runs_through_the_engine_and_matches_its_pyro_run(small_adata):
    # A user's ELBO fixes "uncompiled"; fused Adam and Pyro's SVI then follow the same
    # trajectory from the same seed (the same update; compare test_infer's float64 check).
    histories = []
    for eng in ("eager", "pyro"):
        m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
        m.train(2, elbo=TraceMeanField_ELBO(), engine=eng, progress_bar=False, seed=0)
        assert not m.engine["compiled"]
        histories.append(m.history["train_elbo"].to_numpy())
    np.testing.assert_allclose(histories[0], histories[1], rtol=1e-3)


def test_the_compiled_mean_field_elbo_keeps_one_graph_per_minibatch_size():
    # Pyro 1.9's JitTraceMeanField_ELBO traced a new graph on every step, and torch keeps
    # every traced graph: a PBMC run grew by about 2.5 MB a step. A compiled graph runs
    # without the model's Python, so the model's forward runs only while a graph is
    # traced: a fixed number of times per minibatch size, however many steps and KL
    # weights follow.
    from pyro_scvi.datasets import synthetic_zinb

    m = SCVI(synthetic_zinb(n_cells=40, n_genes=20, seed=0), n_hidden=8, n_latent=2)
    elbo = JitTraceMeanField_ELBO(ignore_jit_warnings=True)
    run = Engine(fused_kernel=False, threads=1).resolve(
        m.model, m.guide, n_steps=12, batch_size=16, n_genes=20, device="cpu", elbo=elbo
    )
    step = run.stepper(m.model, m.guide, n_train=40, batch_size=16, elbo=elbo)
    python_runs = []
    m.model.register_forward_pre_hook(lambda module, args: python_runs.append(len(args[0])))
    x, b = m.data.tensors(np.arange(40))

    def steps(sizes, weights):
        for n, w in zip(sizes, weights, strict=True):
            assert np.isfinite(step.step(x[:n], b[:n], torch.arange(n), float(w)))

    steps([16, 8], [0.0, 0.0])  # compiles a graph for each size
    traced = len(python_runs)
    assert sorted(set(python_runs)) == [8, 16]
    steps([16, 8] * 5, np.linspace(0.1, 1.0, 10))
    assert len(python_runs) == traced  # every later step ran a kept graph
    assert step.record["compiled_sizes"] == [16, 8]
    assert "JitTraceMeanField_ELBO compiled once" in step.record["reasons"]["compiled"]


def test_the_compiled_mean_field_elbo_trains_as_its_uncompiled_one(small_adata):
    # Kept graphs draw one set of random numbers a step, as eager does (re-tracing on
    # every step drew three and went another way): across a KL warm-up the compiled run
    # follows the uncompiled one step for step in float32.
    histories = {}
    for name, elbo in (
        ("eager", TraceMeanField_ELBO()),
        ("jit", JitTraceMeanField_ELBO(ignore_jit_warnings=True)),
    ):
        m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
        m.train(3, batch_size=128, kl_warmup_epochs=2, elbo=elbo, progress_bar=False, seed=0)
        histories[name] = m.history
    assert list(histories["jit"]["kl_weight"]) == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(
        histories["jit"]["train_elbo"], histories["eager"]["train_elbo"], rtol=1e-5
    )
    assert m.engine["compiled_sizes"] == [128, 14]  # 270 training cells


def test_a_compiled_graph_serves_minibatches_with_other_zero_patterns():
    # The eager density evaluates lgamma at the non-zero counts only (a data-dependent
    # shape): the graph traced on one minibatch must give the eager loss on another.
    from pyro_scvi.datasets import synthetic_zinb

    adata = synthetic_zinb(n_cells=96, n_genes=30, seed=2)
    m = SCVI(adata, n_hidden=16, n_latent=3)
    m.model.double(), m.guide.double()
    params = [p for mod in (m.model, m.guide) for p in mod.parameters()]
    buffers = [(b.clone(), b) for mod in (m.model, m.guide) for b in mod.buffers()]
    step = _steppers(m, compiled=True, fused=False, n_train=96, batch_size=48)
    # the first call compiles on the first minibatch (and draws extra numbers)
    for i, cells in enumerate((torch.arange(48), torch.arange(48), torch.arange(48, 96))):
        x, b = m.data.tensors(cells.numpy())
        x = x.double()
        compiled = _loss_and_grads(step.loss_and_grads, params, buffers, x, b, cells, 1.0)
        eager = _loss_and_grads(
            Trace_ELBO().loss_and_grads,
            params,
            buffers,
            Annealed(m.model),
            Annealed(m.guide),
            x,
            b,
            cells,
            96,
            1.0,
        )
        if i > 0:
            assert compiled[0] == pytest.approx(eager[0], rel=1e-9), i
    assert step.record["compiled_sizes"] == [48]  # one graph served both minibatches
    assert (m.data.tensors(np.arange(48))[0] > 0).sum() != (
        m.data.tensors(np.arange(48, 96))[0] > 0
    ).sum()


def test_validation_runs_the_networks_in_eval_mode_on_every_path(monkeypatch):
    # The fused path's model is the model under a handler, not an nn.Module: validation
    # once left its decoder in training mode, which fails on a minibatch of one cell (and
    # normalized validation cells by their own statistics otherwise).
    from pyro_scvi.datasets import synthetic_zinb

    monkeypatch.setattr(kernels, "precompile", lambda device="cpu": False)  # eager formulas: fast
    adata = synthetic_zinb(n_cells=12, n_genes=20, seed=0)
    for preset in ("fused", "eager"):
        # the step's own ELBO of cells (Stepper.loss, which validation calls): eval mode
        m = SCVI(adata, n_hidden=8, n_latent=2)
        run = Engine.preset(preset, threads=1).resolve(
            m.model, m.guide, n_steps=10, batch_size=11, n_genes=20, device="cpu"
        )
        step = run.stepper(m.model, m.guide, n_train=11, batch_size=11)
        assert (step.run_model is not m.model) is (preset == "fused")  # under the handler
        modes: list[bool] = []

        def record(module, inputs, output, modes=modes):
            modes.append(module.training)

        for net in (m.model, m.guide, m.model.decoder):
            net.register_forward_hook(record)
        m.model.train(), m.guide.train()
        value = step.loss(m.data, np.array([3]))  # one cell: batch norm fails in train mode
        assert np.isfinite(value) and modes and not any(modes)
        assert m.model.training and m.guide.training  # restored afterwards
        # and a whole run with one validation cell
        m = SCVI(adata, n_hidden=8, n_latent=2)
        m.train(2, engine=preset, progress_bar=False)  # 11 training cells, 1 validation
        assert len(m.validation_indices) == 1
        assert np.isfinite(m.history["validation_elbo"]).all()
        assert m.engine["fused_kernel"] is (preset == "fused")
