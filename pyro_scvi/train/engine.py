"""How a training run steps: one explicit choice, made once per run and recorded.

Every run of :func:`~pyro_scvi.train.loop.train_svi` steps in one of a few ways that compute the
same estimator (``tests/test_engine.py`` checks that loss and gradients agree with plain
``pyro.infer.SVI`` + ``Trace_ELBO``) at different speeds:

``compiled``
    The ELBO of full minibatches runs as Pyro's ``JitTrace_ELBO`` (one compiled graph;
    the epoch's smaller last minibatch runs uncompiled). Needs a model and guide whose
    structure does not change between calls: they declare it with ``static_structure``.
``fused_kernel``
    The ZINB log-density is the fused, ``torch.compile``'d operator of
    :mod:`pyro_scvi.train.kernels` (applied as the Pyro handler
    :class:`~pyro_scvi.train.kernels.FusedLogProb`). Needs a likelihood that declares
    ``fused_kernel`` and, to pay off, a C++ compiler and enough work to amortize compiling.
``fused_adam``
    One ``torch.optim.Adam`` over all parameters (:class:`~pyro_scvi.train.loop.FusedAdam`)
    instead of a Pyro optimizer through :class:`pyro.infer.SVI`.
``data_placement``
    Where minibatches are gathered: ``"host"`` (rows sliced from the CSR matrix in host
    memory, then copied to the run's device) or ``"device"`` (the whole matrix held on the
    run's device and gathered there, :class:`~pyro_scvi.data.ResidentCounts`). By default
    ``"device"`` on a GPU when the counts take at most :data:`RESIDENT_MAX_FRACTION` of
    its free memory, else ``"host"``.
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
    busy process makes every step several times slower (``benchmarks/shared_cores.py``).

:class:`Engine` holds the user's wishes (``None``: decide); :meth:`Engine.resolve` turns
them into a :class:`RunEngine` with every field decided and the reason for each.
``SCVI.train(engine=...)`` and the CLI (``--compile``, ``--fused-kernel``,
``--fused-adam``, ``--threads``) take it; the resolved engine is stored in
``history.attrs["engine"]``, in ``SCVI.engine``, in the saved model and in the CLI's
``uns["pyro_scvi"]["params"]``, and the threads of each epoch in ``history["threads"]``.

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

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from pyro.infer import (
    ELBO,
    JitTrace_ELBO,
    JitTraceEnum_ELBO,
    JitTraceGraph_ELBO,
    JitTraceMeanField_ELBO,
)

from ..errors import InputError
from . import distributed, kernels

#: Runs of at least this many steps compile the ELBO by default: tracing costs about a
#: second, and ``benchmarks/profile_step.py`` measured a compiled step 14-22% shorter.
COMPILE_MIN_STEPS = 300

#: The fused kernel is chosen by default from this many genes: ``benchmarks/profile_step.py``
#: measured it making a compiled step 1.49-1.72x faster on 1,000 and 2,000 genes but 1.06x
#: on 200, where the rest of the step dominates.
FUSED_MIN_GENES = 500

#: ... and from this many (steps x cells per minibatch x genes): compiling costs 3-4 s in
#: a new process (about 13 s the first time on a machine, before torch's on-disk cache
#: holds the kernels) and saves 24-39 ns per element and step at one thread.
FUSED_MIN_ELEMENTS = 1e8

#: A GPU run holds the counts on the device by default when they take at most this share
#: of its free memory: the rest is left for activations, optimizer state and queries.
RESIDENT_MAX_FRACTION = 0.5

MATMUL_PRECISIONS = ("highest", "high", "medium")

_JIT_ELBOS = (JitTrace_ELBO, JitTraceMeanField_ELBO, JitTraceGraph_ELBO, JitTraceEnum_ELBO)


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
            unknown = set(engine) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise InputError(
                    f"engine has unknown fields {sorted(unknown)}; the fields are "
                    f"{', '.join(f.name for f in dataclasses.fields(cls))}."
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
        everything). An ELBO passed again fixes ``compiled`` and an optimizer
        ``fused_adam``, so those fields are then left to them.

        Examples
        --------
        >>> Engine.for_resume({"compiled": False, "fused_kernel": False, "fused_adam": True,
        ...                    "threads": 2}).threads
        2
        """
        done = dict(record or {})
        threads = done.get("threads")
        engine = cls(
            compiled=done.get("compiled"),
            fused_kernel=done.get("fused_kernel"),
            fused_adam=done.get("fused_adam"),
            threads=None if threads in (None, "auto") else int(threads),
        )
        if elbo_passed or optim_passed:
            # the ELBO fixes compiled, an optim fused_adam: leave those fields to them
            engine = cls(threads=engine.threads, fused_kernel=engine.fused_kernel)
        return engine

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
            decided when the data were read: :func:`choose_data_source`); recorded.
        """
        reasons: dict[str, str] = {}
        device = torch.device(device)
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
            reasons["fused_adam"] = f"{'on' if fused_adam else 'off'}: asked for"
        else:
            fused_adam, reasons["fused_adam"] = True, "on: default optimizer"
        # compiled ELBO
        static, why_not = static_structure(model, guide)
        if elbo is not None:
            compiled = isinstance(elbo, _JIT_ELBOS)
            if self.compiled is not None and self.compiled != compiled:
                raise InputError(
                    f"Engine(compiled={self.compiled}) contradicts elbo={type(elbo).__name__}(); "
                    "pass a JIT ELBO to compile, another ELBO not to, or leave compiled=None."
                )
            reasons["compiled"] = f"{'on' if compiled else 'off'}: the ELBO passed is " + (
                "a JIT ELBO" if compiled else type(elbo).__name__
            )
        elif self.compiled is not None:
            compiled = self.compiled
            if compiled and not static:
                raise InputError(
                    f"Engine(compiled=True), but {why_not}: a compiled graph would freeze its "
                    "first call. Declare static_structure = True on a component whose "
                    "structure does not change between calls, or use compiled=False."
                )
            reasons["compiled"] = f"{'on' if compiled else 'off'}: asked for"
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
        if self.fused_kernel is False:
            reasons["fused_kernel"] = "off: asked for"
        elif not can_fuse:
            if self.fused_kernel:
                raise InputError(
                    f"Engine(fused_kernel=True), but the likelihood {likelihood!r} has no fused "
                    "kernel (only ZINB has); use fused_kernel=None or False."
                )
            reasons["fused_kernel"] = f"off: the likelihood {likelihood!r} has no fused kernel"
        elif self.fused_kernel:
            fused_kernel = True
            compile_kernel = kernels.precompile(device)
            reasons["fused_kernel"] = "on: asked for" + (
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
                "asked for" if self.threads else f"torch's count, held ({device.type} run)"
            )
        elif self.threads is not None:
            threads, reasons["threads"] = self.threads, "asked for"
        else:
            threads, reasons["threads"] = None, "follow the cores that other processes leave free"
        reasons["data_source"] = data_source or "memory: in-memory counts"
        # data placement
        if reasons["data_source"].startswith("streamed") and self.data_placement == "device":
            raise InputError(
                "data_placement='device' holds all counts on the device, but they are "
                "streamed from the file; use data_placement='host' or None."
            )
        if self.data_placement is not None:
            placement, reasons["data_placement"] = self.data_placement, "asked for"
        elif device.type == "cpu":
            placement = "host"
            reasons["data_placement"] = "host: a CPU run reads the host's counts directly"
        elif data_bytes is None:
            placement = "host"
            reasons["data_placement"] = "host: the counts' size on the device is unknown"
        else:
            free = _device_free_bytes(device)
            budget = RESIDENT_MAX_FRACTION * free if free is not None else 0.0
            placement = "device" if data_bytes <= budget else "host"
            reasons["data_placement"] = f"{placement}: counts {data_bytes / 2**30:.2f} GiB, " + (
                f"{RESIDENT_MAX_FRACTION:g} x free {device.type} memory {budget / 2**30:.2f} GiB"
                if free is not None
                else f"free {device.type} memory unknown"
            )
        # data parallelism
        group = distributed.current()
        if self.data_parallel is False:
            data_parallel, reasons["data_parallel"] = False, "off: asked for"
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
            precision, reasons["matmul_precision"] = self.matmul_precision, "asked for"
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
            reasons=reasons,
        )


@dataclasses.dataclass(frozen=True)
class RunEngine:
    """An :class:`Engine` with every choice made, and why (see :meth:`Engine.resolve`).

    ``threads`` is ``None`` when the run follows the free cores (:class:`ThreadPolicy`);
    the threads of each epoch are then in the run's ``history["threads"]``.
    """

    compiled: bool
    fused_kernel: bool
    compile_kernel: bool
    fused_adam: bool
    threads: int | None
    data_placement: str
    matmul_precision: str
    data_parallel: bool
    reasons: dict[str, str]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for ``history.attrs``, saved settings and AnnData's ``uns``."""
        out = dataclasses.asdict(self)
        out["threads"] = "auto" if self.threads is None else int(self.threads)
        out["reasons"] = dict(self.reasons)
        return out

    def wrap_model(self, model: Callable) -> Callable:
        """The model under the handlers this engine applies (the fused kernel, if on)."""
        if not self.fused_kernel:
            return model
        return kernels.FusedLogProb(compile=self.compile_kernel)(model)

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
    likelihood do. Returns ``(ok, why_not)``.
    """
    for role, part in (("the model", model), ("the guide", guide)):
        if not getattr(part, "static_structure", False):
            return False, f"{role} ({type(part).__name__}) does not declare static_structure"
    return True, ""


class ThreadPolicy:
    """torch's CPU threads during a run: fixed, or following the free cores.

    With ``threads=None`` it counts the cores that other processes keep busy (from
    ``/proc/stat`` less this process's own time in ``/proc/self/stat``) and uses the
    rest, at least one and at most torch's thread count when the run started; it measures
    for 0.1 s at the start and then over each epoch, and changes the count at most every
    ``min_interval`` seconds. Where ``/proc`` is missing (not Linux) it keeps torch's
    count. :meth:`close` restores the count the run found.
    """

    def __init__(self, threads: int | None, *, min_interval: float = 2.0) -> None:
        self.fixed = threads
        self.min_interval = min_interval
        self.original = torch.get_num_threads()
        self.max_threads = self.original
        self.current = self.original
        self._last: tuple[float, int, int, int] | None = None

    def start(self) -> int:
        """Set the run's first thread count and return it."""
        if self.fixed is not None:
            self._set(self.fixed)
            return self.current
        sample = _cpu_sample()
        if sample is None:
            return self.current
        time.sleep(0.1)
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
        now = _cpu_sample()
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
        n_cpus = _system_cpus()
        # cores' worth of time that other processes used in the interval
        others = max(0.0, (busy - own) / total * n_cpus)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else n_cpus
        # a core counts as taken once another process uses a quarter of it: a thread that
        # shares a core stalls every step, while one thread fewer costs at most 1/threads
        free = cores - math.ceil(others - 0.25) if others > 0.25 else cores
        self._set(max(1, min(self.max_threads, free)))

    def _set(self, n: int) -> None:
        if n != torch.get_num_threads():
            torch.set_num_threads(n)
        self.current = n


def _device_free_bytes(device: torch.device) -> int | None:
    """Free memory on an accelerator, or ``None`` where torch cannot say."""
    if device.type != "cuda":
        return None
    try:
        return int(torch.cuda.mem_get_info(device)[0])
    except (RuntimeError, AssertionError):  # no driver, or not initializable
        return None


def _system_cpus() -> int:
    return os.cpu_count() or 1


def _cpu_sample() -> tuple[float, int, int, int] | None:
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
