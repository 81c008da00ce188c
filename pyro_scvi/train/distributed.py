"""Data-parallel training on ``torch.distributed``: one training loop, several processes.

Launch the same command once per process, e.g. on one machine with two processes::

    torchrun --nproc_per_node=2 -m pyro_scvi fit data.h5ad -o out.h5ad --batch-key batch

(several machines: add ``--nnodes``, ``--node_rank`` and ``--rdzv_endpoint``; see the
README). Each process (rank) trains on its own share of every global minibatch:

* every rank permutes the training cells with the same seed, cuts the permutation into
  global minibatches of ``batch_size x world_size`` cells, and takes its own disjoint
  slice of each, so together the ranks read every cell once per epoch;
* each rank's ELBO keeps the full-data scale (the ``cells`` plate's size is all training
  cells), so each rank's gradient is an unbiased estimate of the full gradient; the
  ranks' gradients and losses are averaged (one ``all_reduce`` per step) and every rank
  takes the same Adam step;
* the ranks draw different random numbers (``z`` and ``l`` samples, dropout): the torch
  generator of rank ``r`` is reseeded from the run's seed and ``r``;
* the validation ELBO is summed over the ranks' disjoint shares of the validation cells,
  so early stopping sees one value and every rank stops at the same epoch;
* batch-norm statistics re-estimated for validation are rank 0's (broadcast), those at
  the end the ranks' average over their shares of the training cells;
* rank 0 writes the outputs (:attr:`DataParallel.is_main`).

The backend is gloo on CPUs and NCCL on GPUs; :func:`init_from_env` starts the process
group from torchrun's environment variables, and :func:`process_group` also ends it (every
rank at a barrier, then ``destroy_process_group``). The engine
(:class:`~pyro_scvi.train.engine.Engine`, field ``data_parallel``) turns this on when a process
group of more than one rank is running, and records it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError


class DataParallel:
    """A process's place in a data-parallel run, and the collectives it needs.

    Parameters
    ----------
    rank, world_size
        This process's rank and the number of processes (from the default process group
        when ``None``).
    """

    def __init__(self, rank: int | None = None, world_size: int | None = None) -> None:
        self.rank = dist.get_rank() if rank is None else rank
        self.world_size = dist.get_world_size() if world_size is None else world_size

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes outputs."""
        return self.rank == 0

    def shard(self, cells: np.ndarray) -> np.ndarray:
        """The disjoint slice of a global minibatch for this rank (sizes differ by <= 1)."""
        return np.array_split(cells, self.world_size)[self.rank]

    def global_minibatches(self, cells: np.ndarray, batch_size: int) -> list[np.ndarray]:
        """``cells`` cut into global minibatches of ``batch_size`` cells per rank.

        A last global minibatch too small to give every rank two cells (batch norm
        normalizes over a rank's cells) joins the one before it.
        """
        size = batch_size * self.world_size
        chunks = [cells[i : i + size] for i in range(0, len(cells), size)]
        if len(chunks) > 1 and len(chunks[-1]) < 2 * self.world_size:
            last = chunks.pop()
            chunks[-1] = np.concatenate([chunks[-1], last])
        return chunks

    def average_gradients(self, params: list[torch.Tensor], loss: float) -> float:
        """Average the parameters' gradients and ``loss`` over the ranks; return the loss.

        One ``all_reduce`` of a flat buffer, so ``params`` must come in the same order on
        every rank (:class:`~pyro_scvi.train.optim.FusedAdam` sorts them by name). A parameter
        without a gradient counts as zeros. A rank whose loss is not finite makes the
        average not finite, so every rank skips the step together.
        """
        grads = [torch.zeros_like(p).ravel() if p.grad is None else p.grad.ravel() for p in params]
        device = params[0].device if params else torch.device("cpu")
        flat = torch.cat([*grads, torch.tensor([loss], dtype=torch.float32, device=device)])
        dist.all_reduce(flat)
        flat /= self.world_size
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return float(flat[-1])

    def sum(self, value: float, device: torch.device | str = "cpu") -> float:
        """``value`` summed over the ranks (the same float on every rank)."""
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t)

    def broadcast(self, *modules: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers."""
        with torch.no_grad():
            for m in modules:
                for t in [*m.parameters(), *m.buffers()]:
                    dist.broadcast(t.data, src=0)

    def average_buffers(self, *modules: nn.Module) -> None:
        """Average floating-point buffers (batch-norm statistics) over the ranks."""
        with torch.no_grad():
            for m in modules:
                for t in m.buffers():
                    if t.is_floating_point():
                        dist.all_reduce(t.data)
                        t.data /= self.world_size

    def seed_rank(self) -> None:
        """Reseed torch's generator from its current seed stream and this rank."""
        base = int(torch.randint(0, 2**31 - 1, (1,)))  # the same on every rank
        torch.manual_seed(base + 7919 * self.rank)


def current() -> DataParallel | None:
    """The running data-parallel group, or ``None`` (no process group, or one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return DataParallel()
    return None


def init_from_env(device: torch.device | str = "cpu") -> DataParallel | None:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1).

    The backend is NCCL for a CUDA device (each rank on GPU ``LOCAL_RANK``), gloo
    otherwise. Returns :func:`current`, or ``None`` when not launched that way.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return None
    if not dist.is_initialized():
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        try:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as err:
            raise InputError(
                f"Could not join the {world}-process group ({err}); launch every process "
                "with torchrun, e.g. `torchrun --nproc_per_node=2 -m pyro_scvi fit ...`."
            ) from err
    return current()


def shutdown(*, barrier: bool = True) -> None:
    """Destroy the default process group, if one is running; with ``barrier``, meet first.

    A rank that destroys its gloo pairs while another still uses them can bring that rank
    down (SIGABRT at teardown), so on a normal exit every rank waits at a barrier first.
    After an error the barrier is skipped: the other ranks may never reach it.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def process_group(device: torch.device | str = "cpu") -> Iterator[DataParallel | None]:
    """:func:`init_from_env` for the ``with`` block, the group it started ended after it.

    Yields what :func:`init_from_env` returns. A group this call started is destroyed
    at the end (:func:`shutdown`: at a barrier on a normal exit, at once after an
    error); a group that was already running is left to whoever started it.
    """
    started = not (dist.is_available() and dist.is_initialized())
    group = init_from_env(device)
    started = started and dist.is_available() and dist.is_initialized()
    try:
        yield group
    except BaseException:
        if started:
            shutdown(barrier=False)
        raise
    if started:
        shutdown()
