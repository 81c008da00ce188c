"""Data-parallel training on torch.distributed (gloo, CPU): shards, equivalence, the CLI."""

import os
import socket
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
import torch.multiprocessing as mp
from pyro.infer import Trace_ELBO
from pyro_scvi.datasets import synthetic_zinb

from pyro_scvi import InputError, LogNormalLibrary, ScviGuide, ScviModel, from_anndata
from pyro_scvi.train.distributed import DataParallel
from pyro_scvi.train.engine import Engine
from pyro_scvi.train.kl import Annealed, annealed_sites, kl_weight
from pyro_scvi.train.loop import train_svi
from pyro_scvi.train.optim import FusedAdam

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch built without torch.distributed"
)

EPOCHS, BATCH, WARMUP, LR = 2, 16, 3, 1e-2


def test_ranks_read_disjoint_shares_that_cover_every_cell():
    cells = np.random.default_rng(0).permutation(103)
    for world in (1, 2, 3):
        ranks = [DataParallel(r, world) for r in range(world)]
        chunks = ranks[0].global_minibatches(cells, 10)
        assert np.array_equal(np.concatenate(chunks), cells)
        for chunk in chunks:
            shares = [g.shard(chunk) for g in ranks]
            assert np.array_equal(np.concatenate(shares), chunk)  # disjoint, complete
            assert min(len(s) for s in shares) >= 2  # batch norm needs two cells per rank
            assert max(len(s) for s in shares) - min(len(s) for s in shares) <= 1
        # full global minibatches: batch_size cells per rank
        assert all(len(c) == 10 * world for c in chunks[:-1])


def _setup(seed=0):
    adata = synthetic_zinb(n_cells=160, n_genes=30, n_batches=2, seed=1)
    data = from_anndata(adata, batch_key="batch")
    pyro.set_rng_seed(seed)
    loc, scale = data.library_log_stats()
    library = LogNormalLibrary(torch.as_tensor(loc), torch.as_tensor(scale))
    model = ScviModel(data.n_genes, data.n_batch, library, n_hidden=16, n_latent=3)
    guide = ScviGuide(data.n_genes, data.n_batch, n_hidden=16, n_latent=3)
    return data, model, guide


def _parameters(model, guide):
    return [p.detach().clone() for p in (*model.parameters(), *guide.parameters())]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        data, model, guide = _setup()
        with pyro.get_param_store().scope():
            history = train_svi(
                model,
                guide,
                data,
                np.arange(data.n_cells),
                np.array([], dtype=np.int64),
                max_epochs=EPOCHS,
                batch_size=BATCH,
                lr=LR,
                engine=Engine.preset("eager", threads=1),
                kl_warmup_epochs=WARMUP,
                seed=0,
                progress_bar=False,
            )
        torch.save(
            {
                "params": _parameters(model, guide),
                "elbo": list(history["train_elbo"]),
                "engine": history.attrs["engine"],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # Tear down together: a rank destroying its gloo pairs while the other still runs
        # can abort the other's process at exit (seen once on a loaded machine).
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def _one_process_fed_the_same_minibatches(world):
    """The ranks' steps replayed in one process: each rank's share with that rank's random
    numbers, gradients and losses averaged, one Adam step (as pyro_scvi.train.distributed does)."""
    data, model, guide = _setup()
    n = data.n_cells
    sites = annealed_sites(model)
    rng = np.random.default_rng(0)
    base = int(torch.randint(0, 2**31 - 1, (1,)))  # DataParallel.seed_rank's draw
    states = []
    for r in range(world):
        torch.manual_seed(base + 7919 * r)
        states.append(torch.get_rng_state())
    elbo = Trace_ELBO()
    # as a run's step holds them (RunEngine.stepper): Trace_ELBO differentiates without
    # param sites, so after the first step the parameters are held, not re-registered
    fused = FusedAdam(
        lr=LR, eps=0.01 * n, weight_decay=1e-6 * n, hold=(model, guide), differentiable=[elbo]
    )
    ranks = [DataParallel(r, world) for r in range(world)]
    elbos = []
    with pyro.get_param_store().scope():
        for epoch in range(EPOCHS):
            w, total = kl_weight(epoch, WARMUP), 0.0
            for chunk in ranks[0].global_minibatches(rng.permutation(np.arange(n)), BATCH):
                grads, losses = [], []
                for r, group in enumerate(ranks):
                    torch.set_rng_state(states[r])
                    idx = group.shard(chunk)
                    x, b = data.tensors(idx)
                    losses.append(
                        fused.loss_and_grads(
                            elbo,
                            Annealed(model, sites),
                            Annealed(guide, sites),
                            x,
                            b,
                            torch.as_tensor(idx),
                            n,
                            w,
                        )
                    )
                    states[r] = torch.get_rng_state()
                    params = [p for g in fused.optim.param_groups for p in g["params"]]
                    grads.append([p.grad.clone() for p in params])
                    fused.optim.zero_grad(set_to_none=True)
                for p, *gs in zip(params, *grads, strict=True):
                    p.grad = sum(gs) / world
                fused.optim.step()
                fused.optim.zero_grad(set_to_none=True)
                total += (
                    float(np.float32(sum(np.float32(v) for v in losses)) / world) * len(chunk) / n
                )
            elbos.append(-total / n)
    return _parameters(model, guide), elbos


def test_two_processes_reach_the_parameters_of_one_process_fed_the_same_minibatches(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert ranks[0]["engine"]["data_parallel"] is True
    assert ranks[0]["engine"]["reasons"]["data_parallel"].startswith("on: rank 0 of 2")
    # every rank took the same steps
    for a, b in zip(ranks[0]["params"], ranks[1]["params"], strict=True):
        assert torch.equal(a, b)
    assert ranks[0]["elbo"] == ranks[1]["elbo"]
    expected, elbos = _one_process_fed_the_same_minibatches(world)
    # The same float32 operations in the same order; the all-reduce adds two values, so
    # only its rounding could differ from the replay's sum: one float32 rounding per step.
    eps32 = torch.finfo(torch.float32).eps
    steps = EPOCHS * int(np.ceil(160 / (BATCH * world)))
    for got, want in zip(ranks[0]["params"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=steps * eps32, atol=steps * eps32 * 1e-2)
    np.testing.assert_allclose(ranks[0]["elbo"], elbos, rtol=1e-6)


def test_data_parallel_needs_a_running_group():
    data, model, guide = _setup()
    with pytest.raises(InputError, match="torchrun"):
        Engine(data_parallel=True).resolve(
            model, guide, n_steps=10, batch_size=16, n_genes=data.n_genes, device="cpu"
        )
    run = Engine().resolve(model, guide, n_steps=10, batch_size=16, n_genes=30, device="cpu")
    assert run.data_parallel is False and run.reasons["data_parallel"] == "off: a single process"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_fit_trains_on_two_processes_and_rank_0_writes(tmp_path):
    adata = synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0)
    src = tmp_path / "in.h5ad"
    adata.write_h5ad(src)
    out = tmp_path / "out.h5ad"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        "-m",
        "pyro_scvi",
        "fit",
        str(src),
        "-o",
        str(out),
        "--batch-key",
        "batch",
        "--max-epochs",
        "2",
        "--batch-size",
        "32",
        "--quiet",
        "--threads",
        "1",
        "--n-samples",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    import anndata

    result = anndata.read_h5ad(out)
    engine = result.uns["pyro_scvi"]["params"]["engine"]
    assert bool(engine["data_parallel"]) and "of 2 (gloo)" in engine["reasons"]["data_parallel"]
    assert result.obsm["X_pyro_scvi"].shape == (200, 10)


def _start_one_rank_group(init_file):
    """A one-process gloo group, as init_from_env starts a torchrun group."""

    def start(device="cpu"):
        if not torch.distributed.is_initialized():  # as init_from_env: join a running one
            torch.distributed.init_process_group(
                "gloo", init_method=f"file://{init_file}", rank=0, world_size=1
            )
        return None  # one rank: no data parallelism, as init_from_env says

    return start


def test_process_group_ends_the_group_it_started_and_only_that(tmp_path, monkeypatch):
    from pyro_scvi.train import distributed

    dist = torch.distributed
    monkeypatch.setattr(distributed, "init_from_env", _start_one_rank_group(tmp_path / "a"))
    with distributed.process_group():
        assert dist.is_initialized()
    assert not dist.is_initialized()
    monkeypatch.setattr(distributed, "init_from_env", _start_one_rank_group(tmp_path / "b"))
    with pytest.raises(KeyError), distributed.process_group():  # ended after an error too
        raise KeyError("boom")
    assert not dist.is_initialized()
    _start_one_rank_group(tmp_path / "c")()  # a group the caller started is theirs to end
    with distributed.process_group():
        pass
    assert dist.is_initialized()
    distributed.shutdown()
    assert not dist.is_initialized()
    distributed.shutdown()  # no group: nothing to do


def test_fit_destroys_the_process_group_it_started(tmp_path, monkeypatch):
    from pyro_scvi.cli import main
    from pyro_scvi.train import distributed

    src = tmp_path / "in.h5ad"
    synthetic_zinb(n_cells=60, n_genes=10, seed=0).write_h5ad(src)
    monkeypatch.setattr(distributed, "init_from_env", _start_one_rank_group(tmp_path / "init"))
    argv = ["fit", src, "-o", tmp_path / "out.h5ad", "--max-epochs", "1", "--quiet"]
    assert main([str(a) for a in [*argv, "--n-latent", "2", "--n-samples", "1"]]) == 0
    assert not torch.distributed.is_initialized()


def test_fused_adam_hands_the_all_reduce_its_parameters_in_name_order():
    """The all-reduce adds gradients by position, so every rank must list the parameters
    in one order. The order a first step meets them in may differ between processes (a
    compiled ELBO's follows Python's per-process string hashing); sorting by name does not.
    """

    class Recorder:
        world_size = 1

        def __init__(self):
            self.calls = []

        def average_gradients(self, params, loss):
            self.calls.append([id(p) for p in params])
            return loss

    pyro.clear_param_store()
    prior = LogNormalLibrary(torch.tensor([2.0]), torch.tensor([0.5]))
    model, guide = (
        ScviModel(12, 1, prior, n_latent=2, n_hidden=4),
        ScviGuide(12, 1, n_latent=2, n_hidden=4),
    )
    x, b = torch.poisson(torch.full((8, 12), 2.0)), torch.zeros(8, dtype=torch.long)
    step = FusedAdam()
    step(Trace_ELBO(), model, guide, x, b)  # the first step finds the parameters
    step.data_parallel = recorder = Recorder()
    by_name = [id(p) for _, p in sorted(zip(step.names, step.params, strict=True))]
    step(Trace_ELBO(), model, guide, x, b)
    # the same parameters met in another order (another process's first step)
    step.names, step.params = step.names[::-1], step.params[::-1]
    step(Trace_ELBO(), model, guide, x, b)
    assert recorder.calls == [by_name, by_name]
