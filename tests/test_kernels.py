"""The fused ZINB kernel: its special functions, closed-form gradient, operator and switch."""

import shutil
import warnings

import numpy as np
import pyro
import pytest
import torch
from scipy import special

from pyro_scvi import SCVI
from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion, zinb_log_prob
from pyro_scvi.train import kernels
from pyro_scvi.train.engine import Engine

# From near 0 (where the recurrence does all the work) to large counts (the series alone).
Y = np.concatenate([np.logspace(-4, 7, 500), np.linspace(0.05, 12, 500)])
needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")), reason="no C++ compiler"
)


@pytest.mark.parametrize(
    "ours, reference",
    [(kernels.lgamma_positive, special.gammaln), (kernels.digamma_positive, special.digamma)],
)
def test_special_functions_match_scipy_in_float64(ours, reference):
    got = ours(torch.tensor(Y, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, reference(Y), rtol=1e-10, atol=1e-10)


EPS32 = torch.finfo(torch.float32).eps


def _lgamma_terms(y):
    """Size of the terms :func:`kernels.lgamma_positive` adds up (float64, elementwise).

    Stirling's part at ``z = y + 6`` (``z (|log z| + 1)`` also bounds what rounding ``z``
    itself costs: its derivative is ``log z``) and the two logarithms of the recurrence.
    A float32 evaluation, ours or torch's, is within a few ``EPS32`` times this of exact.
    """
    y = torch.as_tensor(y, dtype=torch.float64)
    z = y + 6
    p1, p2 = y * (y + 1) * (y + 2), (y + 3) * (y + 4) * (y + 5)
    return z * (torch.log(z).abs() + 1) + torch.log(p1).abs() + torch.log(p2).abs()


def _digamma_terms(y):
    """As :func:`_lgamma_terms` for :func:`kernels.digamma_positive`: ``log z`` and 1/(y+k)."""
    y = torch.as_tensor(y, dtype=torch.float64)
    return torch.log(y + 6).abs() + sum(1 / (y + k) for k in range(7))


def _zinb_terms(x, mu, theta, gate_logits):
    """Size of the terms of the ZINB log-density (float64, elementwise, broadcast).

    Every logarithm, product and ``lgamma`` of :func:`zinb_log_prob`, counted at its
    magnitude (plus ``x`` and ``theta`` for rounding the arguments of the logarithms they
    multiply): two float32 evaluations of the density differ by a few ``EPS32`` times this.
    """
    x, mu, theta, gate = (t.double() for t in (x, mu, theta, gate_logits))
    log_s, log_theta = torch.log(theta + mu + 1e-8).abs(), torch.log(theta + 1e-8).abs()
    shared = gate.abs() + torch.nn.functional.softplus(gate) + theta * (log_theta + log_s + 1)
    counts = x * (torch.log(mu + 1e-8).abs() + log_s + 1)
    lgammas = _lgamma_terms(x + theta) + _lgamma_terms(theta) + _lgamma_terms(x + 1)
    return torch.where(x == 0, shared + 1, shared + counts + lgammas)


# Tolerances of float32 results: C_ROUND roundings (each at most EPS32 / 2 of its value)
# per term, times the terms' summed magnitudes above. Observed here: at most 1.5 (special
# functions; torch's own float32 lgamma 0.3, digamma 2.0) and 0.5 (densities).
C_ROUND = 8


@pytest.mark.parametrize(
    "ours, reference, terms",
    [
        (kernels.lgamma_positive, special.gammaln, _lgamma_terms),
        (kernels.digamma_positive, special.digamma, _digamma_terms),
    ],
)
def test_special_functions_in_float32_are_accurate_to_float32_rounding(ours, reference, terms):
    # As accurate as float32 arithmetic allows (the recurrence subtracts values near 6.6
    # where lgamma is near 0, so the bound is on the terms, not on the result), the
    # bound that torch's own lgamma and digamma meet too.
    y32 = torch.tensor(Y, dtype=torch.float32)
    exact = reference(y32.double().numpy())
    ours_err = np.abs(ours(y32).double().numpy() - exact)
    bound = C_ROUND * EPS32 * terms(y32).numpy()
    assert (ours_err <= bound).all(), (ours_err / (EPS32 * terms(y32).numpy())).max()


def _zinb_inputs(theta_shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (7, 11)
    x = torch.poisson(torch.rand(shape, generator=g, dtype=dtype) * 4)
    x[0, :3] = torch.tensor([0.0, 1.0, 250.0], dtype=dtype)  # a large count too
    mu = torch.rand(shape, generator=g, dtype=dtype) * 5 + 1e-3
    mu[1, 0] = 0.0  # softmax underflow: EPS keeps it finite
    theta = torch.rand(theta_shape, generator=g, dtype=dtype) * 3 + 0.05
    gate = torch.randn(shape, generator=g, dtype=dtype) * 2
    return x, mu, theta, gate


@pytest.mark.parametrize("theta_shape", [(11,), (7, 11), (1, 11)])
def test_forward_formula_matches_the_distribution(theta_shape):
    x, mu, theta, gate = _zinb_inputs(theta_shape)
    got = kernels.zinb_log_prob_forward(x, mu, theta, gate, torch.lgamma(theta))
    torch.testing.assert_close(got, zinb_log_prob(x, mu, theta, gate), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("theta_shape", [(11,), (7, 11)])
def test_closed_form_gradient_matches_autograd(theta_shape):
    x, mu, theta, gate = _zinb_inputs(theta_shape)
    params = [t.clone().requires_grad_() for t in (mu, theta, gate)]
    upstream = torch.randn(x.shape, dtype=torch.float64)
    (zinb_log_prob(x, *params) * upstream).sum().backward()
    d_mu, d_theta, d_gate = kernels.zinb_log_prob_grads(
        upstream, x, mu, theta, gate, torch.digamma(theta), digamma=torch.digamma
    )
    for ours, p in zip((d_mu, d_theta.sum_to_size(theta.shape), d_gate), params, strict=True):
        torch.testing.assert_close(ours, p.grad, rtol=1e-8, atol=1e-10)


def test_operator_passes_gradcheck_uncompiled():
    x, mu, theta, gate = _zinb_inputs((11,))
    args = [t.clone().requires_grad_() for t in (mu, theta, gate)]
    assert torch.autograd.gradcheck(
        lambda m, t, g: kernels.zinb_log_prob_fused(x, m, t, g, compiled=False),
        args,
        eps=1e-6,
        atol=1e-5,
    )


def test_handler_swaps_the_density_of_zinb_sites_only():
    x, mu, theta, gate = _zinb_inputs((11,), dtype=torch.float32)

    def model():
        d = ZeroInflatedNegativeBinomialMeanDispersion(mu, theta, gate)
        pyro.sample("x", d, obs=x)
        pyro.sample("x_event", d.to_event(1), obs=x)
        pyro.sample("other", pyro.distributions.Poisson(mu), obs=x)

    def density_of(trace, name):
        fn = trace.nodes[name]["fn"]
        return getattr(getattr(fn, "base_dist", fn), "log_density", None)

    eager = pyro.poutine.trace(model).get_trace()
    eager.compute_log_prob()
    # no handler, no operator: nothing global switches it on
    assert density_of(eager, "x") is None and density_of(eager, "x_event") is None
    handler = kernels.FusedLogProb(compile=False)
    fused = pyro.poutine.trace(handler(model)).get_trace()
    fused.compute_log_prob()
    # x and x_event (inside to_event) compute theirs with the handler's operator, not other
    assert density_of(fused, "x") == handler.log_density
    assert density_of(fused, "x_event") == handler.log_density
    assert density_of(fused, "other") is None
    # Within float32 rounding of the density's terms; x_event sums 11 of them (a float32
    # sum of n terms: at most n * EPS32 times their summed magnitude more).
    terms = _zinb_terms(x, mu, theta, gate)
    bounds = {"x": C_ROUND * terms, "x_event": (C_ROUND + x.shape[-1]) * terms.sum(-1)}
    for name, bound in bounds.items():
        diff = fused.nodes[name]["log_prob"].double() - eager.nodes[name]["log_prob"].double()
        assert (diff.abs() <= EPS32 * bound).all(), name
    torch.testing.assert_close(fused.nodes["other"]["log_prob"], eager.nodes["other"]["log_prob"])
    with kernels.fused_log_prob(False):  # the disabled form is a no-op context
        assert density_of(pyro.poutine.trace(model).get_trace(), "x") is None


def _counting_kernels(calls, fail=False):
    """Stand-ins for the compiled kernels (the documented seam ``kernels.compiled_kernels``):
    the eager formulas, counted; or, with ``fail``, kernels that raise as a broken compiler."""

    def wrap(fn):
        def kernel(*args):
            calls.append(fn.__name__)
            if fail:
                raise RuntimeError("no compiler for you")
            return fn(*args)

        return kernel

    kernel_pair = (wrap(kernels.zinb_log_prob_forward), wrap(kernels.zinb_log_prob_grads))
    return lambda: kernel_pair


def test_long_zinb_training_runs_switch_the_kernel_on_by_themselves(small_adata, monkeypatch):
    # Thresholds lowered to this tiny run; the "compiled" kernels swapped for counting eager
    # ones through the documented seam, so that the test checks the engine's choice, not
    # the compiler.
    from pyro_scvi.train import engine

    monkeypatch.setattr(engine, "FUSED_MIN_GENES", 10)
    monkeypatch.setattr(engine, "FUSED_MIN_ELEMENTS", 1)
    monkeypatch.setattr(kernels, "compiler_available", lambda device="cpu": True)
    calls = []
    monkeypatch.setattr(kernels, "compiled_kernels", _counting_kernels(calls))
    m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
    m.train(2, batch_size=64, progress_bar=False, seed=0)
    assert {"zinb_log_prob_forward", "zinb_log_prob_grads"} <= set(calls)
    assert m.engine["fused_kernel"] and m.history.attrs["engine"]["fused_kernel"]
    assert m.engine["compile_kernel"] and m.engine["reasons"]["fused_kernel"].startswith("on: ")
    calls.clear()
    m.train(1, batch_size=64, progress_bar=False, seed=0, engine=Engine(fused_kernel=False))
    assert calls == []
    assert m.engine["fused_kernel"] is False
    assert m.engine["reasons"]["fused_kernel"] == "off: asked for"


def test_a_failing_compilation_falls_back_to_the_eager_formulas(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "compiled_kernels", _counting_kernels(calls, fail=True))
    monkeypatch.setattr(kernels, "compiler_available", lambda device="cpu": True)
    x, mu, theta, gate = _zinb_inputs((11,), dtype=torch.float32)
    expected = zinb_log_prob(x, mu, theta, gate).double()
    bound = C_ROUND * EPS32 * _zinb_terms(x, mu, theta, gate)
    # a call outside a handler: the eager formulas for that call, with a warning
    with pytest.warns(RuntimeWarning, match="this call runs uncompiled"):
        got = kernels.zinb_log_prob_fused(x, mu, theta, gate)
    assert ((got.double() - expected).abs() <= bound).all()
    assert kernels.precompile() is False  # and precompile says so
    # a handler (one run) falls back for the rest of its run, once, and says why
    handler = kernels.FusedLogProb()
    calls.clear()
    with pytest.warns(RuntimeWarning, match="compiling it failed"):
        first = handler.log_density(x, mu, theta, gate)
    second = handler.log_density(x, mu, theta, gate)
    assert calls == ["zinb_log_prob_forward"]  # tried once, then uncompiled
    assert ((first.double() - expected).abs() <= bound).all() and torch.equal(first, second)
    assert not handler.compile and "no compiler for you" in handler.fallback
    # ... and nothing of it stays in the process: with a working compiler, a new handler
    # (the next run) and precompile use the compiled kernels again
    monkeypatch.setattr(kernels, "compiled_kernels", _counting_kernels(calls))
    calls.clear()
    later = kernels.FusedLogProb()
    later.log_density(x, mu, theta, gate)
    assert calls == ["zinb_log_prob_forward"] and later.compile and later.fallback is None
    assert handler.fallback is not None and not handler.compile  # the failed run's own
    assert kernels.precompile() is True


def test_training_and_validation_calls_reach_the_kernels_as_precompile_compiled_them(
    monkeypatch,
):
    # torch.compile specializes a graph on the grad mode, on which inputs require grad and
    # on memory layout: calls that differ from precompile's in any of these compile again
    # during the run. What each call hands the kernels is recorded through the documented
    # seam; every training and validation call must look like one of precompile's.
    seen = []

    def recording(kernel):
        def call(*args):
            tensors = [a for a in args if torch.is_tensor(a)]
            seen.append(
                (
                    kernel.__name__,
                    torch.is_grad_enabled(),
                    tuple(t.requires_grad for t in tensors),
                    tuple(t.is_contiguous() for t in tensors),
                )
            )
            return kernel(*args)

        return call

    kernel_pair = (
        recording(kernels.zinb_log_prob_forward),
        recording(kernels.zinb_log_prob_grads),
    )
    monkeypatch.setattr(kernels, "compiled_kernels", lambda: kernel_pair)
    monkeypatch.setattr(kernels, "compiler_available", lambda device="cpu": True)
    assert kernels.precompile()
    compiled = set(seen)
    assert {name for name, *_ in compiled} == {"zinb_log_prob_forward", "zinb_log_prob_grads"}
    seen.clear()
    handler = kernels.FusedLogProb()
    x = torch.poisson(torch.full((6, 5), 2.0))
    mu = torch.rand(6, 5, requires_grad=True)
    theta = torch.rand(5, requires_grad=True)
    gate = torch.randn(6, 5, requires_grad=True)
    # training steps: a compiled ELBO's gradient reaches the operator as a block of its
    # own, an eager ELBO's (the density summed over genes) as a broadcast view
    density = handler.log_density(x, mu, theta, gate)
    density.backward(torch.rand_like(density))
    handler.log_density(x, mu, theta, gate).sum(-1).sum().backward()
    # ... and a validation pass, whose decoder outputs carry no grad
    with torch.no_grad():
        handler.log_density(x, mu.detach(), theta.detach(), gate.detach())
    assert len(seen) == 5 and set(seen) <= compiled


def test_a_run_whose_kernel_stops_compiling_records_it_and_the_next_run_compiles(
    small_adata, monkeypatch
):
    # precompile works (the kernels compile on its inputs), then the run's kernels fail:
    # the run finishes on the eager formulas and its engine record says so; a later run
    # in the same process decides for itself and compiles.
    monkeypatch.setattr(kernels, "compiler_available", lambda device="cpu": True)
    calls, broken = [], []
    good = _counting_kernels(calls)
    monkeypatch.setattr(kernels, "compiled_kernels", good)
    real_precompile = kernels.precompile

    def precompile_then_break(device="cpu"):
        ok = real_precompile(device)
        monkeypatch.setattr(kernels, "compiled_kernels", _counting_kernels(broken, fail=True))
        return ok

    monkeypatch.setattr(kernels, "precompile", precompile_then_break)
    eager = Engine(compiled=False, fused_kernel=True, threads=1)
    m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
    with pytest.warns(RuntimeWarning, match="compiling it failed"):
        m.train(2, batch_size=64, progress_bar=False, seed=0, engine=eager)
    assert len(broken) == 1  # one failed try; the rest of the run uncompiled
    assert np.isfinite(m.history["train_elbo"]).all()
    for record in (m.engine, m.history.attrs["engine"]):
        assert record["fused_kernel"] and record["compile_kernel"] is False
        assert (
            "compiling it failed (RuntimeError: no compiler for you)"
            in (record["reasons"]["fused_kernel"])
        )
    monkeypatch.setattr(kernels, "precompile", real_precompile)
    monkeypatch.setattr(kernels, "compiled_kernels", good)
    calls.clear()
    m.train(1, batch_size=64, progress_bar=False, seed=0, engine=eager)
    assert "zinb_log_prob_grads" in calls  # compiled again
    assert m.engine["compile_kernel"] is True
    assert m.engine["reasons"]["fused_kernel"] == "on: asked for"


@needs_compiler
def test_compiled_operator_inside_jit_trace_elbo_matches_the_eager_density(small_adata):
    # The real thing: torch.compile'd kernels, recorded as one node of Pyro's JitTrace_ELBO
    # graph, give the loss and gradients of the same graph with the eager density. (Compared
    # JIT to JIT, on the same random draws: the JIT consumes the RNG in its own order.)
    from pyro_scvi.train.kl import JitCall

    assert kernels.precompile()  # a working compiler: the compiled kernels, not the fallback
    m = SCVI(small_adata, batch_key="batch", n_hidden=8, n_latent=2)
    x, b = m.data.tensors(np.arange(64), "cpu")
    args = (x, b, torch.arange(64), torch.tensor(1.0))
    kwargs = {"num_cells": None, "n_cells": 64}
    params = [p for mod in (m.model, m.guide) for p in mod.parameters()]
    results = {}
    for fused in (False, True):
        jit = pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True)
        model, guide = JitCall(m.model), JitCall(m.guide)  # the graph cache keys on them
        with (
            kernels.fused_log_prob(fused),
            torch.jit.optimized_execution(False),  # run the graph as traced
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore", DeprecationWarning)
            for _ in range(2):  # trace, then run the compiled graph
                for p in params:
                    p.grad = None
                pyro.set_rng_seed(5)
                loss = jit.loss_and_grads(model, guide, *args, **kwargs)
        results[fused] = loss, [p.grad.clone() for p in params]
    # torch.jit.trace, as the JIT ELBO uses it, records the operator as one node
    handler = kernels.FusedLogProb()
    mu, theta = torch.full((4, 600), 2.0), torch.ones(600)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(
            lambda mu, theta, gate: handler.log_density(torch.ones(4, 600), mu, theta, gate),
            (mu, theta, torch.zeros(4, 600)),
        )
    assert "pyro_scvi::zinb_log_prob" in str(traced.graph)
    # float32, both: the loss and each gradient entry sum at most n = x.numel() per-count
    # terms through the same networks, and two float32 sums of n terms differ by at most
    # n * EPS32 * (sum of |terms|), taken as |loss| and as the largest gradient entry (this
    # also covers the density's own rounding, C_ROUND * EPS32 per count's terms). Gradient
    # entries that are exactly zero (biases before a batch norm) are pure rounding noise,
    # hence one absolute bound for all. Observed: loss 1.5e-7 relative (bound 3e-4),
    # gradients 7e-5 (bound 0.3, against entries up to 1e3).
    n = x.numel()
    assert abs(results[True][0] - results[False][0]) <= n * EPS32 * abs(results[False][0])
    largest = max(g.abs().max().item() for g in results[False][1])
    for a, e in zip(results[True][1], results[False][1], strict=True):
        torch.testing.assert_close(a, e, rtol=0, atol=n * EPS32 * largest)


def test_the_kernel_runs_where_torch_lacks_the_private_tracing_state_api(monkeypatch):
    # _outside_jit_trace uses torch._C._get/_set_tracing_state, which torch does not
    # promise to keep: without them the operator must still work (outside a JIT trace).
    monkeypatch.delattr(torch._C, "_get_tracing_state")
    x, mu, theta, gate = _zinb_inputs((11,), dtype=torch.float32)
    diff = kernels.zinb_log_prob_fused(x, mu, theta, gate, compiled=False) - zinb_log_prob(
        x, mu, theta, gate
    )
    assert (diff.abs() <= C_ROUND * EPS32 * _zinb_terms(x, mu, theta, gate)).all()
