"""How a training run steps: one explicit choice, made once per run and recorded.

Every run of :func:`~pyro_scvi.train.loop.train_svi` steps in one of a few ways that compute the
same estimator (``tests/test_engine.py`` checks that loss and gradients agree with plain
``pyro.infer.SVI`` + ``Trace_ELBO``) at different speeds:

``compiled``
    The ELBO of full minibatches runs as Pyro's ``JitTrace_ELBO`` (one compiled graph;
    the epoch's smaller last minibatch runs uncompiled). Needs a model and guide whose
    structure does not change between calls: they declare it with ``static_structure``.
    A component whose random draws TorchScript's optimization passes reorder declares
    ``jit_optimize = False``: its graphs run unoptimized, drawing as eager does.
``fused_kernel``
    The ZINB log-density is the fused, ``torch.compile``'d operator of
    :mod:`pyro_scvi.train.kernels` (applied as the Pyro handler
    :class:`~pyro_scvi.train.kernels.FusedLogProb`). Needs a likelihood that declares
    ``fused_kernel`` and, to pay off, a C++ compiler and enough work to amortize compiling.
``fused_adam``
    One ``torch.optim.Adam`` over all parameters (:class:`~pyro_scvi.train.optim.FusedAdam`)
    instead of a Pyro optimizer through :class:`pyro.infer.SVI`.
``data_placement``
    Where minibatches are gathered: ``"host"`` (rows sliced from the CSR matrix in host
    memory, then copied to the run's device) or ``"device"`` (the whole matrix held on the
    run's device and gathered there, :class:`~pyro_scvi.data.ResidentCounts`). By default
    ``"device"`` on a GPU when the counts take at most :data:`RESIDENT_MAX_FRACTION` of
    its free memory, and on a CPU when in-memory counts take at most
    :data:`~pyro_scvi.data.placement.DENSE_GATHER_MAX_BYTES` as one dense block (held
    that way: :func:`~pyro_scvi.data.placement.dense_gather`), else ``"host"``.
``matmul_precision``
    torch's float32 matrix-product precision during the run
    (:func:`torch.set_float32_matmul_precision`): ``"highest"`` (default, float32 itself),
    ``"high"`` (TensorFloat-32 on GPUs that have it) or ``"medium"`` (bfloat16 products).
``data_parallel``
    Train as one rank of a data-parallel group on ``torch.distributed``
    (:mod:`pyro_scvi.train.distributed`): on by default when such a group of more than one
    process is running (launched by ``torchrun``).
``threads``
    CPU threads for torch. By default they follow the cores that other processes leave
    free (:class:`ThreadPolicy`), re-measured as the run goes: a training step of scVI's
    networks waits for its slowest thread, so a thread that shares a core with another
    busy process makes every step several times slower (``benchmarks/results/shared_cores.md``).

:class:`Engine` holds the user's wishes (``None``: decide); :meth:`Engine.resolve` turns
them into a :class:`RunEngine` with every field decided and the reason for each, and
:meth:`RunEngine.stepper` assembles the run's training step from it
(:class:`~pyro_scvi.train.stepper.Stepper`: the ELBO, the optimizer, the kernel handler and
the data-parallel group). What the engine needs to know of a component it asks the
component: ``static_structure`` and ``fused_kernel`` of the model's parts, an ELBO's
:class:`ElboCapabilities` (Pyro's own ELBO classes, which cannot declare anything, from the
one table :data:`PYRO_ELBOS`), the counts' ``resident_bytes()``.
:meth:`Engine.for_resume` rebuilds the engine of an interrupted run from its record.
``SCVI.train(engine=...)`` and the CLI (``--compile``, ``--fused-kernel``,
``--fused-adam``, ``--threads``) take it; the resolved engine is stored in
``history.attrs["engine"]``, in ``SCVI.engine``, in the saved model and in the CLI's
``uns["pyro_scvi"]["params"]``, and the threads of each epoch in ``history["threads"]``.
The record also holds what the run learned as it went (the stepper adds it): the minibatch
sizes a compiled ELBO compiled graphs for (``compiled_sizes``), who registers the
parameters (``reasons["parameters"]``), and a fused kernel whose compilation failed during
the run (``compile_kernel`` false, ``reasons["fused_kernel"]`` says why), and, once it
has finished, whether its ELBO diverged (``diverged``: ``None`` or the warning given, see
:class:`~pyro_scvi.train.hooks.Divergence`). Nothing of one
run's choices stays in the process for the next: each run decides for itself.

Examples
--------
>>> import torch
>>> from pyro_scvi import ScviGuide, ScviModel, LogNormalLibrary
>>> m = ScviModel(600, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
>>> run = Engine(fused_kernel=False, threads=1).resolve(
...     m, ScviGuide(600, 1), n_steps=10_000, batch_size=128, n_genes=600, device="cpu")
>>> run.compiled, run.fused_kernel, run.fused_adam, run.threads
(True, False, True, 1)
>>> run.reasons["fused_kernel"]
'off: asked for'
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import time
import weakref
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyro.ops.jit
import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
    RenyiELBO,
    Trace_ELBO,
    TraceMeanField_ELBO,
)

from ..data.placement import DENSE_GATHER_MAX_BYTES, dense_gather
from ..errors import InputError
from . import distributed, kernels
from .stepper import Stepper

if TYPE_CHECKING:
    from .distributed import DataParallel

#: Runs of at least this many steps compile the ELBO by default: tracing costs about a
#: second, and ``benchmarks/results/profile_step.md`` measured a compiled step 14-22% shorter.
COMPILE_MIN_STEPS = 300

#: The fused kernel is chosen by default from this many genes: a step's profile
#: (``benchmarks/results/profile_step.md``) measured it making a compiled step 1.49-1.72x
#: faster on 1,000 and 2,000 genes but 1.06x on 200, where the rest of the step dominates.
FUSED_MIN_GENES = 500

#: ... and from this many (steps x cells per minibatch x genes): compiling costs 3-4 s in
#: a new process (about 13 s the first time on a machine, before torch's on-disk cache
#: holds the kernels) and saves 24-39 ns per element and step at one thread.
FUSED_MIN_ELEMENTS = 1e8

#: A GPU run holds the counts on the device by default when they take at most this share
#: of its free memory: the rest is left for activations, optimizer state and queries.
RESIDENT_MAX_FRACTION = 0.5

MATMUL_PRECISIONS = ("highest", "high", "medium")

#: The fields of an engine, in order.
FIELDS = (
    "compiled",
    "fused_kernel",
    "fused_adam",
    "threads",
    "data_placement",
    "matmul_precision",
    "data_parallel",
)

#: How a reason says that a field came from the record of the run being resumed.
KEPT = "kept from the interrupted run"


@dataclasses.dataclass(frozen=True)
class ElboCapabilities:
    """What training needs to know of an ELBO, declared rather than read from its type.

    An ELBO of one's own declares them with a ``capabilities`` attribute holding one of
    these; Pyro's classes, which cannot, have theirs in :data:`PYRO_ELBOS`
    (:func:`elbo_capabilities` looks them up).

    Attributes
    ----------
    compiled
        It compiles its loss at first use (Pyro's JIT ELBOs): positional arguments are the
        graph's inputs, keywords its cache key, and one object serves one run's model.
    sums_site_terms
        It is linear in each site's log-density scale, so a minibatch rescaled to the full
        data is an unbiased estimate and ranks' estimates can be averaged (``RenyiELBO``,
        a log-mean-exp over particles, is not).
    differentiable_loss
        Its ``differentiable_loss`` is its loss and needs no ``param`` sites: an optimizer
        that holds the parameters may stop registering them
        (:class:`~pyro_scvi.train.optim.FusedAdam`'s ``hold``).
    """

    compiled: bool = False
    sums_site_terms: bool = True
    differentiable_loss: bool = False


#: Pyro's ELBO classes and their capabilities: the one place the engine reads an ELBO's type.
PYRO_ELBOS: dict[type, ElboCapabilities] = {
    Trace_ELBO: ElboCapabilities(differentiable_loss=True),
    TraceMeanField_ELBO: ElboCapabilities(differentiable_loss=True),
    RenyiELBO: ElboCapabilities(sums_site_terms=False),
    JitTrace_ELBO: ElboCapabilities(compiled=True),
    JitTraceMeanField_ELBO: ElboCapabilities(compiled=True),
    JitTraceGraph_ELBO: ElboCapabilities(compiled=True),
    JitTraceEnum_ELBO: ElboCapabilities(compiled=True),
}


class MeanFieldLossCompiledOnce:
    """``differentiable_loss`` for a ``JitTraceMeanField_ELBO`` that keeps its compiled graphs.

    Pyro 1.9's own ``JitTraceMeanField_ELBO.differentiable_loss`` tests for an attribute it
    never sets, so it wraps the loss in a new :func:`pyro.ops.jit.trace` on every call:
    every step traces a new graph, and ``torch.jit`` keeps every traced function in its
    global compilation unit. A run's memory grew by about 2.5 MB a step (PBMC, 200 genes,
    minibatches of 128: 1.8 GB after 10 epochs) and its epochs took 8x longer. This one
    makes the wrapper once per model and guide, as Pyro's ``JitTrace_ELBO`` does, so each
    distinct set of keywords (in a run: each minibatch size) compiles one graph. The loss
    is Pyro's: the same per-particle terms (:class:`~pyro.infer.TraceMeanField_ELBO`,
    closed-form KL where there is one) summed over particles.
    :meth:`RunEngine.stepper` sets it on a run's copy of the ELBO
    (:func:`compile_mean_field_once`).
    """

    def __init__(self, elbo: JitTraceMeanField_ELBO) -> None:
        self._elbo = weakref.ref(elbo)  # the ELBO holds this object: no cycle
        self._compiled: dict[tuple[int, int], Callable] = {}

    def __call__(self, model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        """The surrogate loss of ``model`` and ``guide`` at ``args``, through a kept graph."""
        key = (id(model), id(guide))
        if key not in self._compiled:
            elbo = self._elbo()
            owner = self._elbo

            def loss(*args, **kwargs):
                # model and guide stay referenced here, so their ids stay theirs
                elbo = owner()
                total = 0.0
                for model_trace, guide_trace in elbo._get_traces(model, guide, args, kwargs):
                    _, surrogate = elbo._differentiable_loss_particle(model_trace, guide_trace)
                    total = total + surrogate / elbo.num_particles
                return total

            self._compiled[key] = pyro.ops.jit.trace(
                loss, ignore_warnings=elbo.ignore_jit_warnings, jit_options=elbo.jit_options
            )
        return self._compiled[key](*args, **kwargs)


def compile_mean_field_once(elbo: ELBO) -> str | None:
    """Make ``elbo`` keep its compiled graphs if it is Pyro's ``JitTraceMeanField_ELBO``.

    Sets :class:`MeanFieldLossCompiledOnce` as the ``differentiable_loss`` of ``elbo`` (a
    run's own copy) when its class uses Pyro's, and returns the reason to record; any
    other ELBO, including a subclass with a ``differentiable_loss`` of its own (the way to
    keep Pyro's), is left as it is (``None``).

    Examples
    --------
    >>> elbo = JitTraceMeanField_ELBO()
    >>> compile_mean_field_once(elbo).startswith("JitTraceMeanField_ELBO compiled once")
    True
    >>> compile_mean_field_once(JitTrace_ELBO()) is None
    True
    """
    pyros = JitTraceMeanField_ELBO.differentiable_loss
    if not isinstance(elbo, JitTraceMeanField_ELBO) or type(elbo).differentiable_loss is not pyros:
        return None
    elbo.differentiable_loss = MeanFieldLossCompiledOnce(elbo)
    return (
        "JitTraceMeanField_ELBO compiled once per minibatch size (Pyro's re-traces on every "
        "step and torch keeps every graph: memory grew about 2.5 MB a step)"
    )


def elbo_capabilities(elbo: ELBO) -> ElboCapabilities:
    """The capabilities ``elbo`` declares, else those :data:`PYRO_ELBOS` gives its class.

    A subclass of a class in the table gets the nearest one's ``compiled`` and
    ``sums_site_terms`` but not ``differentiable_loss`` (it may change the loss); any other
    ELBO the defaults: uncompiled, a sum of site terms, registering its parameters.

    Examples
    --------
    >>> elbo_capabilities(RenyiELBO()).sums_site_terms, elbo_capabilities(JitTrace_ELBO()).compiled
    (False, True)
    >>> class Mine(Trace_ELBO):
    ...     capabilities = ElboCapabilities(differentiable_loss=True)
    >>> elbo_capabilities(Mine()).differentiable_loss
    True
    """
    declared = getattr(elbo, "capabilities", None)
    if isinstance(declared, ElboCapabilities):
        return declared
    if type(elbo) in PYRO_ELBOS:
        return PYRO_ELBOS[type(elbo)]
    for cls in type(elbo).__mro__[1:]:
        if cls in PYRO_ELBOS:
            return dataclasses.replace(PYRO_ELBOS[cls], differentiable_loss=False)
    return ElboCapabilities()


@dataclasses.dataclass(frozen=True)
class Engine:
    """How a training run should step; ``None`` fields are decided by :meth:`resolve`.

    Parameters
    ----------
    compiled
        Compile the ELBO of full minibatches (``JitTrace_ELBO``).
    fused_kernel
        Compute the ZINB log-density with the fused kernel of :mod:`pyro_scvi.train.kernels`.
    fused_adam
        Step with one fused torch Adam (else a Pyro optimizer through ``pyro.infer.SVI``).
    threads
        CPU threads for torch during the run (``None``: follow the free cores).
    data_placement
        ``"host"`` or ``"device"``: where minibatches are gathered (``None``: on the GPU
        when the counts fit, see :data:`RESIDENT_MAX_FRACTION`).
    matmul_precision
        ``"highest"``, ``"high"`` (TF32) or ``"medium"`` (bf16) float32 matrix products
        (``None``: ``"highest"``).
    data_parallel
        Train as one rank of the running ``torch.distributed`` group (``None``: when one
        of more than one process is running).
    resumed_from
        The record (:meth:`RunEngine.as_dict`) of the interrupted run this engine finishes
        (set by :meth:`for_resume`): a field this machine cannot honour is then decided
        anew, and its reason says why, instead of an error.

    Examples
    --------
    >>> eager = Engine.preset("eager")
    >>> eager.compiled, eager.fused_kernel, eager.fused_adam, eager.data_placement
    (False, False, True, None)
    """

    compiled: bool | None = None
    fused_kernel: bool | None = None
    fused_adam: bool | None = None
    threads: int | None = None
    data_placement: str | None = None
    matmul_precision: str | None = None
    data_parallel: bool | None = None
    resumed_from: Mapping[str, Any] | None = dataclasses.field(
        default=None, compare=False, repr=False, kw_only=True
    )

    #: Named engines: ``auto`` decides everything; the others fix the stepping path.
    PRESETS = ("auto", "eager", "compiled", "fused", "pyro")

    def __post_init__(self) -> None:
        for name in ("compiled", "fused_kernel", "fused_adam", "data_parallel"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, bool):
                raise InputError(f"Engine({name}={value!r}): use True, False or None (decide).")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1
        ):
            raise InputError(
                f"Engine(threads={self.threads!r}): use a positive integer, or None to follow "
                "the free cores."
            )
        if self.data_placement not in (None, "host", "device"):
            raise InputError(
                f"Engine(data_placement={self.data_placement!r}): use 'host', 'device' or "
                "None (decide)."
            )
        if self.matmul_precision not in (None, *MATMUL_PRECISIONS):
            raise InputError(
                f"Engine(matmul_precision={self.matmul_precision!r}): use one of "
                f"{', '.join(MATMUL_PRECISIONS)}, or None (highest)."
            )

    @classmethod
    def preset(cls, name: str, *, threads: int | None = None) -> Engine:
        """A named engine.

        ``auto`` (decide everything), ``eager`` (fused Adam, nothing compiled),
        ``compiled`` (compiled ELBO, eager density), ``fused`` (compiled ELBO and fused
        kernel) or ``pyro`` (plain ``pyro.infer.SVI`` with Pyro's Adam).
        """
        table = {
            "auto": cls(threads=threads),
            "eager": cls(False, False, True, threads),
            "compiled": cls(True, False, True, threads),
            "fused": cls(True, True, True, threads),
            "pyro": cls(False, False, False, threads),
        }
        if name not in table:
            raise InputError(f"engine={name!r}; use one of {', '.join(cls.PRESETS)}.")
        return table[name]

    @classmethod
    def coerce(cls, engine: Engine | str | Mapping | None) -> Engine:
        """An :class:`Engine` from an engine, a preset name, a dict of fields or ``None``."""
        if engine is None:
            return cls()
        if isinstance(engine, Engine):
            return engine
        if isinstance(engine, str):
            return cls.preset(engine)
        if isinstance(engine, Mapping):
            unknown = set(engine) - set(FIELDS)
            if unknown:
                raise InputError(
                    f"engine has unknown fields {sorted(unknown)}; the fields are "
                    f"{', '.join(FIELDS)}."
                )
            return cls(**engine)
        raise InputError(
            f"engine={engine!r}; pass a pyro_scvi.train.engine.Engine, a preset name "
            f"({', '.join(cls.PRESETS)}) or None."
        )

    @classmethod
    def for_resume(
        cls,
        record: Mapping[str, Any] | None,
        *,
        elbo_passed: bool = False,
        optim_passed: bool = False,
    ) -> Engine:
        """The engine that finishes an interrupted run, from the run's engine record.

        ``record`` is :meth:`RunEngine.as_dict` of the interrupted run (``None``: decide
        everything). Every field is carried over: compiled, fused_kernel, fused_adam,
        threads, data_placement, matmul_precision and data_parallel. An ELBO passed again
        fixes ``compiled`` and an optimizer ``fused_adam``, so those fields are then left to
        them. What this machine cannot honour (a ``"device"`` placement recorded on another
        kind of device or for streamed counts, data parallelism with no process group, a
        kernel or compilation the components no longer allow) :meth:`resolve` decides anew,
        saying so in the reasons; the rest keeps the record's value and says where it came
        from (``"kept from the interrupted run (...)"``).

        Examples
        --------
        >>> old = {"compiled": False, "fused_kernel": False, "fused_adam": True, "threads": 2,
        ...        "data_placement": "host", "matmul_precision": "high", "data_parallel": False}
        >>> e = Engine.for_resume(old)
        >>> e.threads, e.data_placement, e.matmul_precision, e.data_parallel
        (2, 'host', 'high', False)
        >>> Engine.for_resume(old, elbo_passed=True).compiled is None
        True
        """
        done = dict(record or {})
        fields = {name: done.get(name) for name in FIELDS}
        if fields["threads"] in ("auto",):
            fields["threads"] = None
        elif fields["threads"] is not None:
            fields["threads"] = int(fields["threads"])
        for name in ("compiled", "fused_kernel", "fused_adam", "data_parallel"):
            if fields[name] is not None:
                fields[name] = bool(fields[name])  # e.g. numpy booleans read from AnnData
        for name in ("data_placement", "matmul_precision"):
            if fields[name] is not None:
                fields[name] = str(fields[name])
        if elbo_passed:
            fields["compiled"] = None  # the ELBO fixes it
        if optim_passed:
            fields["fused_adam"] = None  # the optimizer fixes it
        return cls(**fields, resumed_from=done)

    def _given(self, name: str) -> str:
        """Why a field that was given holds: asked for, or kept from the resumed run."""
        if self.resumed_from is None:
            return "asked for"
        old = str((self.resumed_from.get("reasons") or {}).get(name, ""))
        if KEPT in old:  # resumed before: keep the first run's reason
            return old[old.index(KEPT) :]
        return f"{KEPT} ({old})" if old else KEPT

    def resolve(
        self,
        model: Callable,
        guide: Callable,
        *,
        n_steps: int,
        batch_size: int,
        n_genes: int,
        device: torch.device | str,
        elbo: ELBO | None = None,
        optim: Any = None,
        data_bytes: int | None = None,
        data_source: str | None = None,
        dense_bytes: int | None = None,
    ) -> RunEngine:
        """Decide every field for one run, from the components' declared capabilities.

        Parameters
        ----------
        model, guide
            The run's model and guide; ``static_structure`` (on the model, its prior,
            library prior and likelihood, and on the guide) says a compiled graph is
            valid for them, the likelihood's ``fused_kernel`` that it can use the kernel.
        n_steps, batch_size, n_genes, device
            The run's length in steps, cells per minibatch, genes and device.
        elbo, optim
            What the user passed to ``train``: an ELBO fixes ``compiled`` (a JIT ELBO is
            compiled, any other is not), a Pyro optimizer means ``fused_adam=False``.
        data_bytes
            What the counts would take on the device
            (:meth:`~pyro_scvi.data.CountData.resident_bytes`); ``None``: unknown, so a
            GPU run gathers on the host unless ``data_placement="device"``.
        data_source
            Where the counts come from and why (``"memory: ..."`` or ``"streamed: ..."``,
            decided when the data were read:
            :func:`~pyro_scvi.data.placement.choose_data_source`); recorded.
        dense_bytes
            What the counts take as one dense block
            (:meth:`~pyro_scvi.data.CountData.dense_bytes`; ``None``: unknown). A CPU run
            holds in-memory counts that way (``data_placement="device"``) up to
            :data:`~pyro_scvi.data.placement.DENSE_GATHER_MAX_BYTES`.
        """
        reasons: dict[str, str] = {}
        device = torch.device(device)
        kept = self._given
        # On resume a field this machine cannot honour is decided anew (else: an error).
        resuming = self.resumed_from is not None
        # optimizer
        if optim is not None:
            if self.fused_adam:
                raise InputError(
                    "Engine(fused_adam=True) steps with its own Adam, but an optim was "
                    "passed too; drop one of them."
                )
            fused_adam, reasons["fused_adam"] = False, "off: a Pyro optimizer was passed"
        elif self.fused_adam is not None:
            fused_adam = self.fused_adam
            reasons["fused_adam"] = f"{'on' if fused_adam else 'off'}: {kept('fused_adam')}"
        else:
            fused_adam, reasons["fused_adam"] = True, "on: default optimizer"
        # compiled ELBO
        static, why_not = static_structure(model, guide)
        if elbo is not None:
            compiled = elbo_capabilities(elbo).compiled
            if self.compiled is not None and self.compiled != compiled:
                raise InputError(
                    f"Engine(compiled={self.compiled}) contradicts elbo={type(elbo).__name__}(); "
                    "pass a JIT ELBO to compile, another ELBO not to, or leave compiled=None."
                )
            reasons["compiled"] = f"{'on' if compiled else 'off'}: the ELBO passed is " + (
                "a JIT ELBO" if compiled else type(elbo).__name__
            )
        elif self.compiled and not static and resuming:
            compiled, reasons["compiled"] = False, f"off: re-decided on resume: {why_not}"
        elif self.compiled is not None:
            compiled = self.compiled
            if compiled and not static:
                raise InputError(
                    f"Engine(compiled=True), but {why_not}: a compiled graph would freeze its "
                    "first call. Declare static_structure = True on a component whose "
                    "structure does not change between calls, or use compiled=False."
                )
            reasons["compiled"] = f"{'on' if compiled else 'off'}: {kept('compiled')}"
        elif not static:
            compiled, reasons["compiled"] = False, f"off: {why_not}"
        elif n_steps < COMPILE_MIN_STEPS:
            compiled = False
            reasons["compiled"] = f"off: {n_steps} steps < {COMPILE_MIN_STEPS}"
        else:
            compiled = True
            reasons["compiled"] = f"on: static model and guide, {n_steps} steps"
        # fused ZINB kernel
        likelihood = getattr(model, "likelihood", None)
        can_fuse = bool(getattr(likelihood, "fused_kernel", False))
        fused_kernel, compile_kernel = False, False
        no_kernel = f"the likelihood {likelihood!r} has no fused kernel"
        if self.fused_kernel is False:
            reasons["fused_kernel"] = f"off: {kept('fused_kernel')}"
        elif not can_fuse:
            if self.fused_kernel and resuming:
                reasons["fused_kernel"] = f"off: re-decided on resume: {no_kernel}"
            elif self.fused_kernel:
                raise InputError(
                    f"Engine(fused_kernel=True), but the likelihood {likelihood!r} has no fused "
                    "kernel (only ZINB has); use fused_kernel=None or False."
                )
            else:
                reasons["fused_kernel"] = f"off: {no_kernel}"
        elif self.fused_kernel:
            fused_kernel = True
            compile_kernel = kernels.precompile(device)
            reasons["fused_kernel"] = f"on: {kept('fused_kernel')}" + (
                "" if compile_kernel else f" (uncompiled: no working compiler for {device.type})"
            )
        else:
            elements = n_steps * batch_size * n_genes
            if device.type != "cpu":
                reasons["fused_kernel"] = f"off: not measured on {device.type}"
            elif n_genes < FUSED_MIN_GENES:
                reasons["fused_kernel"] = f"off: {n_genes} genes < {FUSED_MIN_GENES}"
            elif elements < FUSED_MIN_ELEMENTS:
                reasons["fused_kernel"] = (
                    f"off: {elements:.3g} steps x cells x genes < {FUSED_MIN_ELEMENTS:.0e}"
                )
            elif not kernels.precompile(device):
                reasons["fused_kernel"] = "off: compiling it failed (no working C++ compiler)"
            else:
                fused_kernel = compile_kernel = True
                reasons["fused_kernel"] = f"on: {n_genes} genes, {elements:.3g} elements"
        # threads
        if device.type != "cpu":
            # the accelerator does the work: keep torch's CPU threads as they are, fixed
            threads = self.threads or torch.get_num_threads()
            reasons["threads"] = (
                kept("threads") if self.threads else f"torch's count, held ({device.type} run)"
            )
        elif self.threads is not None:
            threads, reasons["threads"] = self.threads, kept("threads")
        else:
            threads, reasons["threads"] = None, "follow the cores that other processes leave free"
        reasons["data_source"] = data_source or "memory: in-memory counts"
        # data placement
        streamed = reasons["data_source"].startswith("streamed")
        asked_placement, why = self.data_placement, None
        if asked_placement == "device":
            why = self._placement_elsewhere(device, streamed)
            if why is not None:
                asked_placement = None  # decided below, and the reason says why
            elif streamed:
                raise InputError(
                    "data_placement='device' holds all counts on the device, but they are "
                    "streamed from the file; use data_placement='host' or None."
                )
        if asked_placement is not None:
            placement, reasons["data_placement"] = asked_placement, kept("data_placement")
        elif dense_gather(device.type, dense_bytes, streamed):
            placement = "device"
            reasons["data_placement"] = (
                f"device: a CPU run gathers minibatches from a dense copy of the counts, "
                f"{dense_bytes / 2**20:.1f} MiB <= {DENSE_GATHER_MAX_BYTES / 2**20:.0f} MiB "
                "(DENSE_GATHER_MAX_BYTES)"
            )
        elif device.type == "cpu":
            placement = "host"
            reasons["data_placement"] = "host: a CPU run reads the host's counts directly" + (
                ""
                if streamed or dense_bytes is None
                else f" (dense they would take {dense_bytes / 2**20:.0f} MiB "
                f"> {DENSE_GATHER_MAX_BYTES / 2**20:.0f} MiB)"
            )
        elif data_bytes is None:
            placement = "host"
            reasons["data_placement"] = "host: the counts' size on the device is unknown"
        else:
            free = device_free_bytes(device)
            budget = RESIDENT_MAX_FRACTION * free if free is not None else 0.0
            placement = "device" if data_bytes <= budget else "host"
            reasons["data_placement"] = f"{placement}: counts {data_bytes / 2**30:.2f} GiB, " + (
                f"{RESIDENT_MAX_FRACTION:g} x free {device.type} memory {budget / 2**30:.2f} GiB"
                if free is not None
                else f"free {device.type} memory unknown"
            )
        if why is not None:
            reasons["data_placement"] += f" (re-decided on resume: {why})"
        # data parallelism: the group is read here, once, and travels in the RunEngine
        group = distributed.current()
        alone = "no torch.distributed group of more than one process is running"
        if self.data_parallel is False:
            data_parallel, reasons["data_parallel"] = False, f"off: {kept('data_parallel')}"
        elif group is None and self.data_parallel and resuming:
            data_parallel, reasons["data_parallel"] = False, f"off: re-decided on resume: {alone}"
        elif group is None:
            if self.data_parallel:
                raise InputError(
                    "Engine(data_parallel=True), but no torch.distributed group of more than "
                    "one process is running; launch with torchrun, e.g. `torchrun "
                    "--nproc_per_node=2 -m pyro_scvi fit ...`, or use data_parallel=None."
                )
            data_parallel, reasons["data_parallel"] = False, "off: a single process"
        elif not fused_adam:
            raise InputError(
                "Data-parallel training averages gradients inside the engine's own Adam; "
                "drop the optim argument (and fused_adam=False) to train with "
                f"{group.world_size} processes."
            )
        else:
            data_parallel = True
            reasons["data_parallel"] = (
                f"on: rank {group.rank} of {group.world_size} ({torch.distributed.get_backend()})"
            )
        # matrix products
        if self.matmul_precision is not None:
            precision = self.matmul_precision
            reasons["matmul_precision"] = kept("matmul_precision")
        else:
            precision = "highest"
            reasons["matmul_precision"] = "highest: float32 products (torch's default)"
        return RunEngine(
            compiled=compiled,
            fused_kernel=fused_kernel,
            compile_kernel=compile_kernel,
            fused_adam=fused_adam,
            threads=threads,
            data_placement=placement,
            matmul_precision=precision,
            data_parallel=data_parallel,
            device=str(device),
            reasons=reasons,
            group=group if data_parallel else None,
        )

    def _placement_elsewhere(self, device: torch.device, streamed: bool) -> str | None:
        """On resume: why a recorded ``"device"`` placement cannot hold here (else ``None``)."""
        if self.resumed_from is None:
            return None
        if streamed:
            return "the counts are streamed from the file now"
        before = self.resumed_from.get("device")
        if before is None:
            if device.type == "cpu":
                return "the interrupted run's device is not recorded, and this run is on cpu"
            return None
        if torch.device(before).type != device.type:
            return f"the interrupted run held the counts on {before}; this run is on {device}"
        return None


@dataclasses.dataclass(frozen=True)
class RunEngine:
    """An :class:`Engine` with every choice made, and why (see :meth:`Engine.resolve`).

    ``threads`` is ``None`` when the run follows the free cores (:class:`ThreadPolicy`);
    the threads of each epoch are then in the run's ``history["threads"]``. ``device`` is
    the run's device; ``group`` the data-parallel group this process trains in
    (:class:`~pyro_scvi.train.distributed.DataParallel`, ``None`` unless
    ``data_parallel``), read once by :meth:`Engine.resolve` and handed to the step.
    """

    compiled: bool
    fused_kernel: bool
    compile_kernel: bool
    fused_adam: bool
    threads: int | None
    data_placement: str
    matmul_precision: str
    data_parallel: bool
    device: str
    reasons: dict[str, str]
    group: DataParallel | None = dataclasses.field(default=None, compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``history.attrs``, saved settings and AnnData's ``uns``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del out["group"]
        out["threads"] = "auto" if self.threads is None else int(self.threads)
        out["reasons"] = dict(self.reasons)
        return out

    def stepper(
        self,
        model: Callable,
        guide: Callable,
        *,
        n_train: int,
        batch_size: int,
        elbo: ELBO | None = None,
        optim: Any = None,
        lr: float = 1e-3,
        param_groups: bool = True,
    ) -> Stepper:
        """The run's training step, assembled as this engine decided.

        The ELBO (``elbo``, else ``Trace_ELBO``, compiled as ``JitTrace_ELBO`` when
        ``compiled``, with an uncompiled one for the epoch's smaller last minibatch), its
        capabilities (:func:`elbo_capabilities`), the fused kernel's handler, the optimizer
        (:class:`~pyro_scvi.train.optim.FusedAdam` over the cell-scaled settings, or ``optim``
        or :func:`~pyro_scvi.train.optim.default_optim` through ``pyro.infer.SVI``) and the
        data-parallel group. ``n_train`` training cells, full minibatches of ``batch_size``.
        A compiled ELBO passed in is copied, so that each run compiles its own graphs
        (Pyro's JIT ELBOs keep the model they first compiled); the object passed in stays
        unused and may be passed to another run.

        Examples
        --------
        >>> import torch
        >>> from pyro_scvi import ScviGuide, ScviModel, LogNormalLibrary
        >>> m = ScviModel(30, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
        >>> g = ScviGuide(30, 1)
        >>> run = Engine.preset("eager", threads=1).resolve(
        ...     m, g, n_steps=10, batch_size=8, n_genes=30, device="cpu")
        >>> step = run.stepper(m, g, n_train=64, batch_size=8)
        >>> step.record["reasons"]["parameters"]
        'held by fused Adam after the first step (Trace_ELBO differentiates without param sites)'
        """
        tail_elbo = None
        if elbo is None:
            elbo = JitTrace_ELBO(ignore_jit_warnings=True) if self.compiled else Trace_ELBO()
            if self.compiled:
                # One compiled graph, for full minibatches: the smaller last minibatch of
                # each epoch runs uncompiled (the same estimator) instead of compiling again.
                tail_elbo = Trace_ELBO()
        capabilities = elbo_capabilities(elbo)
        record = self.as_dict()
        if capabilities.compiled:
            elbo = copy.copy(elbo)  # this run's own compiled graphs
            kept = compile_mean_field_once(elbo)
            if kept is not None:
                record["reasons"]["compiled"] += f"; {kept}"
        if self.group is not None and not capabilities.sums_site_terms:
            raise InputError(
                f"Data-parallel training averages the ranks' full-data ELBO estimates, which "
                f"{type(elbo).__name__} does not give; use Trace_ELBO (the default) or "
                "another ELBO that sums the sites' log-densities."
            )
        kernel = kernels.FusedLogProb(compile=self.compile_kernel) if self.fused_kernel else None
        return Stepper(
            model,
            guide,
            elbo=elbo,
            tail_elbo=tail_elbo,
            capabilities=capabilities,
            # the ELBOs whose differentiable_loss an optimizer holding the parameters may use
            differentiable=[
                e
                for e in (elbo, tail_elbo)
                if e is not None and elbo_capabilities(e).differentiable_loss
            ],
            kernel=kernel,
            group=self.group,
            device=self.device,
            data_placement=self.data_placement,
            fused_adam=self.fused_adam,
            optim=optim,
            lr=lr,
            param_groups=param_groups,
            n_train=n_train,
            batch_size=batch_size,
            record=record,
        )

    def set_matmul_precision(self) -> str:
        """Set torch's float32 matrix-product precision to this engine's; return the old one."""
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.matmul_precision)
        return before

    def thread_policy(self) -> ThreadPolicy:
        """The run's thread policy (fixed count, or following the free cores)."""
        return ThreadPolicy(self.threads)


def static_structure(model: Callable, guide: Callable) -> tuple[bool, str]:
    """Whether ``model`` and ``guide`` declare a structure that a compiled graph can hold.

    A component declares it with a true ``static_structure`` attribute: the same sample
    sites, shapes and Python control flow on every call, given tensors of the same shapes.
    :class:`~pyro_scvi.model.ScviModel` declares it when its prior, library prior and
    likelihood do. Returns ``(ok, why_not)``; a component that says why it is not static
    (``static_structure_reason``) has its reason in ``why_not``.
    """
    for role, part in (("the model", model), ("the guide", guide)):
        if not getattr(part, "static_structure", False):
            why = f"{role} ({type(part).__name__}) does not declare static_structure"
            reason = getattr(part, "static_structure_reason", None)
            return False, why + (f": {reason}" if reason else "")
    return True, ""


class ThreadPolicy:
    """torch's CPU threads during a run: fixed, or following the free cores.

    With ``threads=None`` it counts the cores that other processes keep busy (from
    ``/proc/stat`` less this process's own time in ``/proc/self/stat``, as
    :class:`CpuMeter` reads them) and uses the rest, at least one and at most torch's
    thread count when the run started; it measures for 0.1 s at the start and then over
    each epoch, and changes the count at most every ``min_interval`` seconds. Where
    ``/proc`` is missing (not Linux) it keeps torch's count. :meth:`close` restores the
    count the run found. ``meter`` measures something else than this machine (e.g. a
    test's made-up load): an object with :class:`CpuMeter`'s four methods.
    """

    def __init__(
        self, threads: int | None, *, min_interval: float = 2.0, meter: CpuMeter | None = None
    ) -> None:
        self.fixed = threads
        self.min_interval = min_interval
        self.meter = meter if meter is not None else CpuMeter()
        self.original = torch.get_num_threads()
        self.max_threads = self.original
        self.current = self.original
        self._last: tuple[float, int, int, int] | None = None

    def start(self) -> int:
        """Set the run's first thread count and return it."""
        if self.fixed is not None:
            self._set(self.fixed)
            return self.current
        sample = self.meter.sample()
        if sample is None:
            return self.current
        self.meter.settle()
        self._last = sample
        self._adjust(force=True)
        return self.current

    def update(self) -> int:
        """Between epochs: re-measure and adjust if due; return the thread count."""
        if self.fixed is None and self._last is not None:
            self._adjust(force=False)
        return self.current

    def close(self) -> None:
        """Restore the thread count the run found."""
        self._set(self.original)

    def _adjust(self, *, force: bool) -> None:
        now = self.meter.sample()
        if now is None or self._last is None:
            return
        seconds = now[0] - self._last[0]
        if not force and seconds < self.min_interval:
            return
        total = now[1] - self._last[1]
        busy = now[2] - self._last[2]
        own = now[3] - self._last[3]
        self._last = now
        if total <= 0:
            return
        # cores' worth of time that other processes used in the interval
        others = max(0.0, (busy - own) / total * self.meter.cpus())
        cores = self.meter.cores()
        # a core counts as taken once another process uses a quarter of it: a thread that
        # shares a core stalls every step, while one thread fewer costs at most 1/threads
        free = cores - math.ceil(others - 0.25) if others > 0.25 else cores
        self._set(max(1, min(self.max_threads, free)))

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.current = n


class CpuMeter:
    """What :class:`ThreadPolicy` measures of this machine: CPU time, from ``/proc``."""

    def sample(self) -> tuple[float, int, int, int] | None:
        """(wall time, all cpus' jiffies, busy jiffies, this process's jiffies), or None."""
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
            with open("/proc/self/stat") as f:
                own_fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, ValueError, IndexError):
            return None
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        total = sum(fields[:8])
        idle = fields[3] + fields[4]
        own = int(own_fields[11]) + int(own_fields[12])  # utime, stime
        return time.monotonic(), total, total - idle, own

    def cpus(self) -> int:
        """The machine's CPUs (those ``/proc/stat`` counts)."""
        return os.cpu_count() or 1

    def cores(self) -> int:
        """The CPUs this process may run on."""
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else self.cpus()

    def settle(self) -> None:
        """Let a first measurement's interval pass (0.1 s)."""
        time.sleep(0.1)


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator, or ``None`` where torch cannot say.

    What :meth:`Engine.resolve` budgets a ``"device"`` data placement from
    (:data:`RESIDENT_MAX_FRACTION` of it); a test that replaces this function runs the
    decision for a GPU of any size.
    """
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):  # no driver, or not initializable
        return None
