"""A fused, compiled ZINB log-density for training: one loop forward, one loop backward.

Where a training step's time goes (``benchmarks/results/profile_step.md``): on 1,000 genes
and more, the eager ZINB log-density, forward and backward, takes about 60% as long as a
whole compiled step. Much of it is ``lgamma`` and its derivative ``digamma``, which torch
evaluates one element at a time (the "ZINB log-density alone" table gives nanoseconds per
float32 of ``torch.digamma``, ``torch.lgamma`` and ``torch.log``), the rest some twenty
more elementwise passes over the cells x genes block.

This module writes the density and its gradient out by hand and compiles each with
``torch.compile`` into one vectorized loop:

- ``lgamma`` and ``digamma`` of positive arguments by the recurrence
  ``f(y) = f(y + 6) - (terms in y, ..., y + 5)`` and Stirling's asymptotic series at
  ``y + 6 >= 6`` (:func:`lgamma_positive`, :func:`digamma_positive`; tested against torch);
- the gradient with respect to the mean, the inverse dispersion and the gate logits in
  closed form (:func:`zinb_log_prob_grads`; tested against autograd of
  :func:`~pyro_scvi.model.distributions.zinb_log_prob`), so that backward is one pass that
  needs no saved intermediates.

Both are registered as a torch custom operator, ``torch.ops.pyro_scvi.zinb_log_prob``, so
that Pyro's ``JitTrace_ELBO`` records it as one node of its compiled graph.

:class:`FusedLogProb` is the Pyro handler that uses it: under it, the observed sites whose
distribution is :class:`~pyro_scvi.model.distributions.ZeroInflatedNegativeBinomialMeanDispersion`
compute float32 log-densities with the operator. Nothing else switches it on: the training
engine (:mod:`pyro_scvi.train.engine`) applies the handler when it chooses the fused kernel,
and records that choice. Compiling takes seconds the first time in a process (longer the
first time on a machine; torch caches the result on disk) and needs a C++ compiler;
:func:`precompile` pays the compilation up front and says whether it worked.

Examples
--------
>>> import pyro, torch
>>> from pyro_scvi.model.distributions import ZeroInflatedNegativeBinomialMeanDispersion as ZINB
>>> d = ZINB(torch.full((2, 3), 2.0), torch.full((3,), 3.0), torch.zeros(2, 3))
>>> x = torch.tensor([[0.0, 1, 2], [3, 0, 5]])
>>> def model():
...     return pyro.sample("x", d, obs=x)
>>> with FusedLogProb(compile=False):  # the same kernels, uncompiled
...     tr = pyro.poutine.trace(model).get_trace()
>>> fused = tr.nodes["x"]["fn"].log_prob(x)
>>> # float32 rounding of terms of up to ~10 nats, a few of them per entry
>>> bool(torch.allclose(fused, d.log_prob(x), rtol=0, atol=64 * torch.finfo().eps * 10))
True
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
import shutil
import warnings
import weakref
from collections.abc import Callable, Iterator

import pyro.distributions as dist
import torch
from pyro.poutine.messenger import Messenger

from ..model import distributions
from ..model.distributions import EPS

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def lgamma_positive(y: torch.Tensor) -> torch.Tensor:
    """``lgamma(y)`` for ``y > 0`` from elementwise arithmetic, logarithms and divisions.

    ``lgamma(y) = lgamma(y + 6) - log(y (y + 1) ... (y + 5))``, and at ``z = y + 6 >= 6``
    Stirling's series ``(z - 1/2) log z - z + log(2 pi) / 2 + 1/(12 z) - 1/(360 z^3)
    + 1/(1260 z^5) - 1/(1680 z^7)``, whose first omitted term is below ``1e-9``. Written
    with torch operations only, it compiles into vectorized code, unlike ``torch.lgamma``.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([0.01, 1.0, 2.5, 1e4], dtype=torch.float64)
    >>> bool(torch.allclose(lgamma_positive(y), torch.lgamma(y), rtol=1e-9, atol=1e-9))
    True
    """
    z = y + 6.0
    r = 1.0 / z
    r2 = r * r
    series = r * (1 / 12 - r2 * (1 / 360 - r2 * (1 / 1260 - r2 / 1680)))
    # (z - 1/2)(log z - 1) - 1/2 == (z - 1/2) log z - z, without the large cancellation
    stirling = (z - 0.5) * (torch.log(z) - 1.0) + (_HALF_LOG_2PI - 0.5) + series
    # Two products of three factors: finite in float32 up to y ~ 1e12.
    return stirling - torch.log(y * (y + 1) * (y + 2)) - torch.log((y + 3) * (y + 4) * (y + 5))


def digamma_positive(y: torch.Tensor) -> torch.Tensor:
    """``digamma(y)`` for ``y > 0``, as :func:`lgamma_positive`: recurrence, then series.

    ``digamma(y) = digamma(y + 6) - sum_{k<6} 1/(y + k)`` and at ``z = y + 6``:
    ``log z - 1/(2z) - 1/(12 z^2) + 1/(120 z^4) - 1/(252 z^6) + 1/(240 z^8)``.

    Examples
    --------
    >>> import torch
    >>> y = torch.tensor([0.01, 1.0, 2.5, 1e4], dtype=torch.float64)
    >>> bool(torch.allclose(digamma_positive(y), torch.digamma(y), rtol=1e-9, atol=1e-9))
    True
    """
    z = y + 6.0
    r = 1.0 / z
    r2 = r * r
    series = torch.log(z) - 0.5 * r - r2 * (1 / 12 - r2 * (1 / 120 - r2 * (1 / 252 - r2 / 240)))
    shift = 1 / y + 1 / (y + 1) + 1 / (y + 2) + 1 / (y + 3) + 1 / (y + 4) + 1 / (y + 5)
    return series - shift


def zinb_log_prob_forward(
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    lgamma_theta: torch.Tensor,
) -> torch.Tensor:
    """:func:`~pyro_scvi.model.distributions.zinb_log_prob` with ``lgamma`` by series.

    ``lgamma_theta`` is ``lgamma(theta)`` at ``theta``'s own shape (per gene), passed in
    so that the elementwise loop does not repeat it per cell.
    """
    return distributions.zinb_log_prob(
        value, mu, theta, gate_logits, lgamma=lgamma_positive, lgamma_theta=lgamma_theta
    )


def zinb_log_prob_grads(
    grad: torch.Tensor,
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    digamma_theta: torch.Tensor,
    digamma: Callable[[torch.Tensor], torch.Tensor] = digamma_positive,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``grad`` times the ZINB log-density's derivatives in ``mu``, ``theta``, ``gate_logits``.

    With ``s = theta + mu``, ``nb0 = theta log(theta / s)`` (the NB's log-probability of a
    zero) and ``w = sigmoid(gate_logits - nb0)`` (the posterior probability that a zero
    came from the gate):

    - ``x == 0``: ``d/dmu = -(1 - w) theta / s``, ``d/dtheta = (1 - w) d nb0/d theta``,
      ``d/d gate_logits = w - sigmoid(gate_logits)``;
    - ``x > 0``: ``d/dmu = x / mu - (theta + x) / s``, ``d/dtheta = d nb0/d theta - x / s
      + digamma(x + theta) - digamma(theta)``, ``d/d gate_logits = -sigmoid(gate_logits)``;

    where ``d nb0/d theta = log(theta / s) + 1 - theta / s``, all with the same ``EPS``
    inside logarithms and denominators as the density. Results have the broadcast shape;
    the caller sums them to each parameter's shape.
    """
    s = theta + mu + EPS
    log_ratio = torch.log(theta + EPS) - torch.log(s)
    nb_zero = theta * log_ratio
    dnb_zero_dtheta = log_ratio + theta / (theta + EPS) - theta / s
    gate = torch.sigmoid(gate_logits)
    w = torch.sigmoid(gate_logits - nb_zero)
    zero = value == 0
    d_gate = torch.where(zero, w - gate, -gate)
    d_mu = torch.where(zero, (w - 1) * theta / s, value / (mu + EPS) - (theta + value) / s)
    d_theta = torch.where(
        zero,
        (1 - w) * dnb_zero_dtheta,
        dnb_zero_dtheta - value / s + digamma(value + theta) - digamma_theta,
    )
    return grad * d_mu, grad * d_theta, grad * d_gate


# --- the operator ---------------------------------------------------------------------


@functools.cache
def compiled_kernels() -> tuple[Callable, Callable]:
    """The forward and backward kernels under ``torch.compile`` (compiled at first call).

    ``dynamic``: one compilation serves every minibatch size. ``cpp.dynamic_threads``: the
    kernels' loops use torch's thread count at each call, not the count at compile time, so
    that the engine's thread policy applies to them too. The wrappers are made once per
    process and torch keeps what compiled; a compilation that fails is not remembered, so
    the next run that asks compiles again (:class:`FusedLogProb` records a failure for its
    own run only).

    This function is also the package's documented fault-injection seam for the compiler:
    a test that replaces it (``monkeypatch.setattr(kernels, "compiled_kernels", ...)``)
    with kernels that raise exercises the fallback, and with counting eager kernels checks
    the engine's switch without compiling anything.
    """
    options = {"cpp.dynamic_threads": True}
    return (
        torch.compile(zinb_log_prob_forward, dynamic=True, options=options),
        torch.compile(zinb_log_prob_grads, dynamic=True, options=options),
    )


#: The live :class:`FusedLogProb` handlers by key: the operator reaches its handler through
#: the key it is called with (an operator's arguments are tensors and numbers).
_HANDLERS: weakref.WeakValueDictionary[int, FusedLogProb] = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


def _run(which: int, compiled: bool, handler: int, *args) -> torch.Tensor | tuple:
    """Kernel ``which`` (0 forward, 1 backward), compiled or not.

    A compiled kernel that fails (no working compiler for these inputs) runs the eager
    formulas instead: for the rest of the run when the call comes from a
    :class:`FusedLogProb` handler (which records why), else for this call only, with a
    warning. Nothing is remembered for other handlers: each run decides for itself.

    The kernels run without autograd, on detached inputs: the operator's gradient is
    :func:`zinb_log_prob_grads`, registered with it, so nothing inside needs recording.
    ``torch.compile`` specializes a graph on the grad mode and on which inputs require
    grad, so otherwise a training step (inputs requiring grad) and a validation pass (no
    grad) would each compile their own forward graph; this way one graph serves both, and
    the one :func:`precompile` makes is the one the run uses.
    """
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    with _outside_jit_trace(), torch.no_grad():
        owner = _HANDLERS.get(handler) if handler else None
        if compiled and (owner is None or owner.compile):
            try:
                return compiled_kernels()[which](*args)
            except Exception as err:  # noqa: BLE001 - inductor raises many types
                why = f"{type(err).__name__}: {str(err)[:200]}"
                if owner is not None:
                    owner.compile_failed(why)
                else:
                    warnings.warn(
                        f"Compiling the fused ZINB kernel failed ({why}); this call runs "
                        "uncompiled.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        kernel = zinb_log_prob_forward if which == 0 else zinb_log_prob_grads
        return kernel(*args)


@contextlib.contextmanager
def _outside_jit_trace() -> Iterator[None]:
    # Pyro's JitTrace_ELBO runs torch.jit.trace, which records this operator as one node;
    # torch.compile refuses to run while a trace is being recorded, so the kernel runs
    # with the (thread-local) tracing state set aside. torch has no public API for this;
    # without these two functions (another torch) the kernel runs inside the trace.
    get_state = getattr(torch._C, "_get_tracing_state", None)
    set_state = getattr(torch._C, "_set_tracing_state", None)
    state = get_state() if get_state is not None else None
    if state is None or set_state is None:
        yield
        return
    set_state(None)
    try:
        yield
    finally:
        set_state(state)


@torch.library.custom_op("pyro_scvi::zinb_log_prob", mutates_args=())
def _zinb_op(
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    compiled: bool,
    handler: int,
) -> torch.Tensor:
    return _run(0, compiled, handler, value, mu, theta, gate_logits, torch.lgamma(theta))


@_zinb_op.register_fake
def _(value, mu, theta, gate_logits, compiled, handler):
    shape = torch.broadcast_shapes(value.shape, mu.shape, theta.shape, gate_logits.shape)
    return mu.new_empty(shape)


@torch.library.custom_op("pyro_scvi::zinb_log_prob_backward", mutates_args=())
def _zinb_backward_op(
    grad: torch.Tensor,
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    compiled: bool,
    handler: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_mu, d_theta, d_gate = _run(
        1, compiled, handler, grad, value, mu, theta, gate_logits, torch.digamma(theta)
    )
    # theta is usually one value per gene, broadcast over cells: sum its gradient back.
    return (
        d_mu.sum_to_size(mu.shape).contiguous(),
        d_theta.sum_to_size(theta.shape).contiguous(),
        d_gate.sum_to_size(gate_logits.shape).contiguous(),
    )


@_zinb_backward_op.register_fake
def _(grad, value, mu, theta, gate_logits, compiled, handler):
    return (
        mu.new_empty(mu.shape),
        theta.new_empty(theta.shape),
        gate_logits.new_empty(gate_logits.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[:4])
    ctx.compiled, ctx.handler = inputs[4], inputs[5]


def _backward(ctx, grad):
    value, mu, theta, gate_logits = ctx.saved_tensors
    # One memory layout for every caller (a compiled ELBO passes a block of its own, an
    # eager one may pass a broadcast view), so that one compiled backward serves them all.
    d_mu, d_theta, d_gate = _zinb_backward_op(
        grad.contiguous(), value, mu, theta, gate_logits, ctx.compiled, ctx.handler
    )
    return None, d_mu, d_theta, d_gate, None, None


_zinb_op.register_autograd(_backward, setup_context=_setup_context)


def zinb_log_prob_fused(
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
    *,
    compiled: bool = True,
) -> torch.Tensor:
    """The ZINB log-density as the fused operator, compiled unless ``compiled=False``.

    Same result as :func:`~pyro_scvi.model.distributions.zinb_log_prob` to float32 rounding, and
    differentiable in ``mu``, ``theta`` and ``gate_logits`` (not in ``value``). Outside a
    :class:`FusedLogProb` handler, a compiled kernel that fails runs the eager formulas for
    that call, with a warning.
    """
    return _zinb_op(value.to(mu.dtype), mu, theta, gate_logits, compiled, 0)


def precompile(device: torch.device | str = "cpu") -> bool:
    """Compile the fused kernel for ``device``, forward and backward, before its first use.

    Returns whether the compiled kernel works there: on a CPU a C++ compiler is on the
    PATH, on a GPU Triton is installed, and compiling worked. The training engine calls it
    when it chooses the compiled kernel, for each run (a failure here says nothing about
    later runs, which try again); it also fills torch's on-disk cache (later processes then
    load instead of compiling).

    Examples
    --------
    >>> isinstance(precompile(), bool)  # doctest: +SKIP
    True
    """
    device = torch.device(device)
    if not compiler_available(device):
        return False
    # As in training: every argument but the counts requires grad, and the gradient that
    # reaches the operator is a cells x genes block of its own (not a broadcast scalar,
    # whose strides the compiled backward would be specialized on).
    mu = torch.full((8, 600), 2.0, device=device, requires_grad=True)
    theta = torch.ones(600, device=device, requires_grad=True)
    gate = torch.zeros(8, 600, device=device, requires_grad=True)
    x = torch.ones(8, 600, device=device)
    probe = FusedLogProb(compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the answer says it
        density = probe.log_density(x, mu, theta, gate)
        density.backward(torch.ones_like(density))
    return probe.fallback is None


def compiler_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch.compile`` has its compiler for ``device``'s kernels.

    For a CPU a C++ compiler on the PATH; for a GPU the Triton package. A cheap check; a
    compilation that fails all the same falls back to the eager formulas with a warning.
    """
    if torch.device(device).type == "cpu":
        return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))
    return importlib.util.find_spec("triton") is not None


# --- the handler ------------------------------------------------------------------------


class FusedLogProb(Messenger):
    """Pyro handler: ZINB sites compute their float32 log-density with the fused operator.

    Every sample site whose distribution is a
    :class:`~pyro_scvi.model.distributions.ZeroInflatedNegativeBinomialMeanDispersion` (directly
    or inside ``.to_event``) gets it as its ``log_density``; other sites are untouched.
    Use it around a model (``FusedLogProb()(model)``) or as a context. One handler serves
    one training run (the engine makes it): should the compiled kernels fail under it, it
    runs the eager formulas from then on, warns once and says why in :attr:`fallback`,
    which the run copies into its engine record. Another handler compiles afresh.

    Parameters
    ----------
    compile
        Compile the kernels (the point); ``False`` runs the same formulas eagerly, which
        is slower than the default log-density and meant for checking.
    """

    def __init__(self, compile: bool = True) -> None:
        super().__init__()
        #: Whether the compiled kernels run under this handler (now).
        self.compile = bool(compile)
        #: Why they stopped running (``None``: they did not stop), e.g. a failed compilation.
        self.fallback: str | None = None
        self.key = next(_KEYS)
        _HANDLERS[self.key] = self

    def log_density(self, value, mu, theta, gate_logits) -> torch.Tensor:
        """The fused operator's ZINB log-density, as this handler computes it."""
        return _zinb_op(value.to(mu.dtype), mu, theta, gate_logits, self.compile, self.key)

    def compile_failed(self, why: str) -> None:
        """Run the eager formulas from now on, because the compiled kernels failed: ``why``."""
        self.compile = False
        if self.fallback is None:
            self.fallback = f"compiling it failed ({why})"
            warnings.warn(
                f"The fused ZINB kernel's {self.fallback}; this run computes it uncompiled "
                "from now on (recorded in its engine's reasons).",
                RuntimeWarning,
                stacklevel=2,
            )

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        fn = msg["fn"]
        if isinstance(fn, dist.Independent) and isinstance(
            fn.base_dist, distributions.ZeroInflatedNegativeBinomialMeanDispersion
        ):
            msg["fn"] = dist.Independent(
                fn.base_dist.with_log_density(self.log_density),
                fn.reinterpreted_batch_ndims,
            )
        elif isinstance(fn, distributions.ZeroInflatedNegativeBinomialMeanDispersion):
            msg["fn"] = fn.with_log_density(self.log_density)


def fused_log_prob(
    enabled: bool = True, *, compile: bool = True
) -> contextlib.AbstractContextManager:
    """:class:`FusedLogProb` as a context, or a no-op context when ``enabled`` is false.

    Examples
    --------
    >>> import pyro, torch
    >>> from pyro_scvi.model import ZeroInflatedNegativeBinomialMeanDispersion as ZINB
    >>> def model():
    ...     return pyro.sample("x", ZINB(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.0)),
    ...                        obs=torch.tensor(0.0))
    >>> with fused_log_prob(compile=False):
    ...     tr = pyro.poutine.trace(model).get_trace()
    >>> round(float(tr.log_prob_sum().exp()), 4)
    0.608
    """
    return FusedLogProb(compile=compile) if enabled else contextlib.nullcontext()
