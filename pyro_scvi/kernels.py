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
  :func:`~pyro_scvi.distributions.zinb_log_prob`), so that backward is one pass that
  needs no saved intermediates.

Both are registered as a torch custom operator, ``torch.ops.pyro_scvi.zinb_log_prob``, so
that Pyro's ``JitTrace_ELBO`` records it as one node of its compiled graph.

:func:`fused_log_prob` switches it on: inside the context,
:class:`~pyro_scvi.distributions.ZeroInflatedNegativeBinomialMeanDispersion` computes
float32 log-densities with it. :func:`~pyro_scvi.infer.train_svi` does so by itself on
long CPU runs (see :func:`use_fused_by_default`). Compiling takes seconds the first time
in a process (longer the first time on a machine; torch caches the result on disk) and
needs a C++ compiler; without one, the context warns and the eager formulas run.
:func:`precompile` pays the compilation up front.

Examples
--------
>>> import torch
>>> from pyro_scvi.distributions import ZeroInflatedNegativeBinomialMeanDispersion as ZINB
>>> d = ZINB(torch.full((2, 3), 2.0), torch.full((3,), 3.0), torch.zeros(2, 3))
>>> x = torch.tensor([[0.0, 1, 2], [3, 0, 5]])
>>> with fused_log_prob(compile=False):  # the same kernels, uncompiled
...     fused = d.log_prob(x)
>>> bool(torch.allclose(fused, d.log_prob(x), atol=1e-5))
True
"""

from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from collections.abc import Callable, Iterator

import torch

from . import distributions
from .distributions import EPS

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)

#: Training runs switch the fused kernel on by themselves (:func:`use_fused_by_default`)
#: from this many genes: ``benchmarks/profile_step.py`` measured it making a compiled step
#: 1.49-1.72x faster on 1,000 and 2,000 genes but 1.06x on 200, where the rest of the
#: step dominates.
FUSED_MIN_GENES = 500

#: ... and from this many (steps x cells per minibatch x genes): compiling costs 3-4 s in
#: a new process (about 13 s the first time on a machine, before torch's on-disk cache
#: holds the kernels) and saves 24-39 ns per element and step at one thread
#: (``benchmarks/profile_step.py``, its "ZINB log-density alone" table).
FUSED_MIN_ELEMENTS = 1e8


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
    """:func:`~pyro_scvi.distributions.zinb_log_prob` with ``lgamma`` by series.

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


# --- the operator -----------------------------------------------------------------------

_kernels: dict[bool, tuple[Callable, Callable]] = {}


def _run(which: int, *args) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Kernel ``which`` (0 forward, 1 backward), compiled if switched on.

    A compilation that fails (no working compiler for these inputs) warns once and
    falls back to the eager formulas for the rest of the process.
    """
    compiled = _compile_flag["on"]
    with _outside_jit_trace():
        if not compiled:
            return _get_kernels(False)[which](*args)
        try:
            return _get_kernels(True)[which](*args)
        except Exception as err:  # noqa: BLE001 - inductor raises many types
            warnings.warn(
                f"Compiling the fused ZINB kernel failed ({type(err).__name__}: "
                f"{str(err)[:200]}); it runs uncompiled from now on.",
                RuntimeWarning,
                stacklevel=2,
            )
            _kernels[True] = _get_kernels(False)
            return _kernels[True][which](*args)


def _get_kernels(compiled: bool) -> tuple[Callable, Callable]:
    if compiled not in _kernels:
        if compiled:
            # dynamic: one compilation serves every minibatch size
            _kernels[compiled] = (
                torch.compile(zinb_log_prob_forward, dynamic=True),
                torch.compile(zinb_log_prob_grads, dynamic=True),
            )
        else:
            _kernels[compiled] = (zinb_log_prob_forward, zinb_log_prob_grads)
    return _kernels[compiled]


@contextlib.contextmanager
def _outside_jit_trace() -> Iterator[None]:
    # Pyro's JitTrace_ELBO runs torch.jit.trace, which records this operator as one node;
    # torch.compile refuses to run while a trace is being recorded, so the kernel runs
    # with the (thread-local) tracing state set aside.
    state = torch._C._get_tracing_state()
    if state is None:
        yield
        return
    torch._C._set_tracing_state(None)
    try:
        yield
    finally:
        torch._C._set_tracing_state(state)


_compile_flag = {"on": True}
#: The innermost fused_log_prob(enabled) in force, None outside any: training runs only
#: decide by themselves when the user has not.
_user_choice: dict[str, bool | None] = {"enabled": None}


@torch.library.custom_op("pyro_scvi::zinb_log_prob", mutates_args=())
def _zinb_op(
    value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    return _run(0, value, mu, theta, gate_logits, torch.lgamma(theta))


@_zinb_op.register_fake
def _(value, mu, theta, gate_logits):
    shape = torch.broadcast_shapes(value.shape, mu.shape, theta.shape, gate_logits.shape)
    return mu.new_empty(shape)


@torch.library.custom_op("pyro_scvi::zinb_log_prob_backward", mutates_args=())
def _zinb_backward_op(
    grad: torch.Tensor,
    value: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    gate_logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d_mu, d_theta, d_gate = _run(1, grad, value, mu, theta, gate_logits, torch.digamma(theta))
    # theta is usually one value per gene, broadcast over cells: sum its gradient back.
    return (
        d_mu.sum_to_size(mu.shape).contiguous(),
        d_theta.sum_to_size(theta.shape).contiguous(),
        d_gate.sum_to_size(gate_logits.shape).contiguous(),
    )


@_zinb_backward_op.register_fake
def _(grad, value, mu, theta, gate_logits):
    return (
        mu.new_empty(mu.shape),
        theta.new_empty(theta.shape),
        gate_logits.new_empty(gate_logits.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    value, mu, theta, gate_logits = ctx.saved_tensors
    d_mu, d_theta, d_gate = _zinb_backward_op(grad, value, mu, theta, gate_logits)
    return None, d_mu, d_theta, d_gate


_zinb_op.register_autograd(_backward, setup_context=_setup_context)


def zinb_log_prob_fused(
    value: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, gate_logits: torch.Tensor
) -> torch.Tensor:
    """The ZINB log-density as the fused operator (compiled unless switched off).

    Same result as :func:`~pyro_scvi.distributions.zinb_log_prob` to float32 rounding, and
    differentiable in ``mu``, ``theta`` and ``gate_logits`` (not in ``value``).
    """
    return _zinb_op(value.to(mu.dtype), mu, theta, gate_logits)


def precompile() -> bool:
    """Compile the fused kernel, forward and backward, now rather than at its first use.

    Returns whether the compiled kernel is available (a C++ compiler is on the PATH and
    compiling worked). For timing training runs apart from compilation, or to fill torch's
    on-disk cache (later processes then load instead of compiling).

    Examples
    --------
    >>> isinstance(precompile(), bool)  # doctest: +SKIP
    True
    """
    if not compiler_available():
        return False
    mu = torch.full((8, 600), 2.0, requires_grad=True)
    x, theta, gate = torch.ones(8, 600), torch.ones(600), torch.zeros(8, 600)
    with fused_log_prob():
        zinb_log_prob_fused(x, mu, theta, gate).sum().backward()
    # a failed compilation leaves the eager kernels in the compiled slot
    return _kernels[True] is not _kernels.get(False)


# --- switching it on --------------------------------------------------------------------


def compiler_available() -> bool:
    """Whether a C++ compiler, which ``torch.compile`` needs for CPU kernels, is on the PATH.

    A cheap check; a compilation that fails all the same falls back to the eager
    formulas with a warning.
    """
    return any(shutil.which(cxx) for cxx in ("g++", "c++", "clang++"))


@contextlib.contextmanager
def fused_log_prob(enabled: bool = True, *, compile: bool = True) -> Iterator[None]:
    """Within the context, ZINB log-densities of float32 tensors use the fused operator.

    Parameters
    ----------
    enabled
        ``False`` switches it off inside the context (e.g. around a training run that
        would otherwise use it by default).
    compile
        Compile the kernels (the point); ``False`` runs the same formulas eagerly, which
        is slower than the default log-density and meant for checking.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi.distributions import ZeroInflatedNegativeBinomialMeanDispersion as ZINB
    >>> with fused_log_prob(compile=False):
    ...     lp = ZINB(torch.tensor(2.0), torch.tensor(3.0), torch.tensor(0.0)).log_prob(
    ...         torch.tensor(0.0))
    >>> round(float(lp.exp()), 4)
    0.608
    """
    previous = distributions._zinb_kernel, _compile_flag["on"], _user_choice["enabled"]
    _user_choice["enabled"] = bool(enabled)
    if enabled:
        if compile and not compiler_available():
            warnings.warn(
                "No C++ compiler (g++, c++ or clang++) on the PATH, which torch.compile needs, "
                "so the fused ZINB log-density runs uncompiled (slower). Install one, e.g. "
                "gcc, to get the compiled kernel.",
                RuntimeWarning,
                stacklevel=3,
            )
        _compile_flag["on"] = compile and compiler_available()
        distributions._zinb_kernel = zinb_log_prob_fused
    else:
        distributions._zinb_kernel = None
    try:
        yield
    finally:
        distributions._zinb_kernel, _compile_flag["on"], _user_choice["enabled"] = previous


def fused_active() -> bool:
    """Whether ZINB log-densities currently use the fused operator."""
    return distributions._zinb_kernel is not None


def use_fused_by_default(
    n_steps: int, batch_size: int, n_genes: int, device: torch.device | str
) -> bool:
    """Whether a training run of ZINB counts switches the fused kernel on by itself.

    Not when the caller has decided (inside a :func:`fused_log_prob` context, on or off);
    otherwise on the CPU, for at least :data:`FUSED_MIN_GENES` genes and
    :data:`FUSED_MIN_ELEMENTS` elements (``n_steps * batch_size * n_genes``), where a C++
    compiler is on the PATH. On a GPU only when asked for with :func:`fused_log_prob` (it
    has not been measured there).

    Examples
    --------
    >>> use_fused_by_default(100, 128, 200, "cpu")  # too few genes to pay for compiling
    False
    >>> with fused_log_prob(False):  # the caller decides
    ...     use_fused_by_default(10_000, 128, 2_000, "cpu")
    False
    """
    return (
        _user_choice["enabled"] is None
        and torch.device(device).type == "cpu"
        and n_genes >= FUSED_MIN_GENES
        and n_steps * batch_size * n_genes >= FUSED_MIN_ELEMENTS
        and compiler_available()
    )
