"""Where one SVI training step's time goes: pyro_scvi against the pure-PyTorch floor.

For each dataset (PBMC8k, 200 genes; Zeisel, 1,000 genes; synthetic 10,000 x 2,000) and
minibatches of 128 cells, one torch thread, this times the phases of a pyro_scvi step as
:class:`pyro_scvi.train.optim.FusedAdam` runs it (parameters held after the first step):

* ``gather``: the minibatch's dense counts from the CSR matrix (``CountData.tensors``);
* ``guide``: running the guide under a Pyro trace (encoders, q(z), q(l), samples);
* ``model``: replaying the model on the guide's samples (decoder, prior, likelihood);
* ``log-densities``: ``compute_log_prob`` / ``compute_score_parts`` and the ELBO sum;
* ``backward`` and ``adam`` (one fused Adam kernel);

and the floor's step (``benchmarks/torch_floor.py``: same networks and ZINB, analytic KL,
no Pyro) as ``forward``, ``backward`` and ``adam``, and the whole compiled step
(``JitTrace_ELBO``, which ``train_svi`` uses by default on long runs). Each is measured
twice: with the eager ZINB log-density and with the fused, compiled one of
:mod:`pyro_scvi.train.kernels` (which long runs use from 500 genes). Each phase is the median
over steps of its wall time. Then ``torch.profiler`` lists the operators that take the
most self CPU time in 50 (uncompiled) pyro_scvi steps, with the kernel a long run of that
dataset would use.

First, the ZINB log-density alone: forward + backward on 128 cells, eager against fused,
torch's ``lgamma``/``digamma``/``log`` in ns per element, and the seconds of compiling the
fused kernel in a new process with and without torch's on-disk cache.

Run: ``python benchmarks/profile_step.py`` (about 1.5 minutes; ``--smoke`` for a few
seconds). Writes ``benchmarks/results/profile_step.{json,md}`` (``_smoke`` with
``--smoke``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import anndata
import numpy as np
import pyro
import torch
from _common import machine_line, run_metadata, write_results
from pyro import poutine
from torch_floor import FloorLoss

import pyro_scvi
from pyro_scvi.model import parameters_held
from pyro_scvi.train import kernels
from pyro_scvi.train.engine import FUSED_MIN_GENES

OUT_DIR = Path(__file__).resolve().parent / "results"
BATCH = 128


def _datasets(smoke: bool) -> list[tuple[str, anndata.AnnData, str | None]]:
    pbmc = pyro_scvi.datasets.pbmc8k_200hvg()
    if smoke:
        return [("pbmc8k_200hvg", pbmc[:600].copy(), None)]
    synthetic = pyro_scvi.datasets.synthetic_zinb(
        n_cells=10_000, n_genes=2_000, n_clusters=5, n_batches=2, batch_effect=0.3, seed=0
    )
    zeisel = pyro_scvi.datasets.zeisel_cortex_subset()
    return [
        ("pbmc8k_200hvg", pbmc, None),
        ("zeisel_cortex_subset_1464x1000", zeisel, None),
        ("synthetic 10000x2000", synthetic, "batch"),
    ]


def _clock() -> float:
    return time.perf_counter()


def _fresh_model(adata, batch_key) -> pyro_scvi.SCVI:
    """The same freshly initialized model for every measurement."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return pyro_scvi.SCVI(adata, batch_key=batch_key, use_observed_lib_size=False)


def profile_pyro_scvi(adata, batch_key, n_steps: int) -> dict[str, float]:
    """Median ms per phase of pyro_scvi's training step (with the fused kernel or not, as
    the caller's ``kernels.fused_log_prob`` context says)."""
    m = _fresh_model(adata, batch_key)
    model, guide, data = m.model, m.guide, m.data
    model.train(), guide.train()
    rng = np.random.default_rng(0)
    n_cells = data.n_cells
    phases: dict[str, list[float]] = {
        k: [] for k in ("gather", "guide", "model", "log-densities", "backward", "adam")
    }
    optim = None
    for step in range(n_steps + 5):
        idx = rng.choice(n_cells, BATCH, replace=False)
        t0 = _clock()
        x, b = data.tensors(idx)
        args = (x, b, torch.as_tensor(idx), n_cells, 0.5)
        t1 = _clock()
        with parameters_held(model, guide) if optim is not None else nullcontext():
            guide_trace = poutine.trace(guide).get_trace(*args)
            t2 = _clock()
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args)
        t3 = _clock()
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        loss = -(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        t4 = _clock()
        if optim is None:
            params = [p for net in (model, guide) for p in net.parameters()]
            optim = torch.optim.Adam(params, lr=1e-4, eps=0.01 * n_cells, fused=True)
        loss.backward()
        t5 = _clock()
        optim.step()
        optim.zero_grad(set_to_none=True)
        t6 = _clock()
        if step >= 5:  # warm-up steps excluded
            times = (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)
            for k, dt in zip(phases, times, strict=True):
                phases[k].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in phases.items()}


def profile_floor(adata, batch_key, n_steps: int, *, fused: bool) -> dict[str, float]:
    """Median ms per phase of the floor's step (dense gather, forward, backward, Adam);
    ``fused``: with the fused, compiled ZINB kernel."""
    m = _fresh_model(adata, batch_key)
    loss_fn = FloorLoss(m, fused=fused)
    x_all = torch.as_tensor(m.data.X.toarray(), dtype=torch.float32)
    b_all = torch.as_tensor(m.data.batch_index)
    params = [p for net in (m.model, m.guide) for p in net.parameters()]
    optim = torch.optim.Adam(params, lr=1e-4, eps=0.01, fused=True)
    m.model.train(), m.guide.train()
    rng = np.random.default_rng(0)
    phases: dict[str, list[float]] = {k: [] for k in ("gather", "forward", "backward", "adam")}
    for step in range(n_steps + 5):
        idx = torch.as_tensor(rng.choice(m.data.n_cells, BATCH, replace=False))
        t0 = _clock()
        x, b = x_all.index_select(0, idx), b_all.index_select(0, idx)
        t1 = _clock()
        loss = loss_fn(x, b, 0.5).mean()
        t2 = _clock()
        loss.backward()
        t3 = _clock()
        optim.step()
        optim.zero_grad(set_to_none=True)
        t4 = _clock()
        if step >= 5:
            for k, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                phases[k].append(dt * 1e3)
    return {k: statistics.median(v) for k, v in phases.items()}


def compiled_step(adata, batch_key, n_steps: int) -> float:
    """Median ms of a whole compiled step (JitTrace_ELBO + fused Adam, as on long runs)."""
    from pyro_scvi.train.kl import JitCall
    from pyro_scvi.train.optim import FusedAdam

    m = _fresh_model(adata, batch_key)
    m.model.train(), m.guide.train()
    elbo = pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True)
    model, guide = JitCall(m.model), JitCall(m.guide)
    step = FusedAdam(lr=1e-4, eps=0.01 * m.data.n_cells)
    rng = np.random.default_rng(0)
    w = torch.tensor(0.5)
    times = []
    for i in range(n_steps + 5):
        idx = rng.choice(m.data.n_cells, BATCH, replace=False)
        t0 = _clock()
        x, b = m.data.tensors(idx)
        step(
            elbo,
            model,
            guide,
            x,
            b,
            torch.as_tensor(idx),
            w,
            num_cells=m.data.n_cells,
            n_cells=BATCH,
        )
        if i >= 5:  # the first step compiles
            times.append((_clock() - t0) * 1e3)
    return statistics.median(times)


def top_operators(adata, batch_key, n_steps: int, top: int = 12) -> list[dict]:
    """torch.profiler: operators with the most self CPU time over ``n_steps`` SVI steps."""
    from torch.profiler import ProfilerActivity, profile

    from pyro_scvi.train.kl import Annealed
    from pyro_scvi.train.optim import FusedAdam

    m = _fresh_model(adata, batch_key)
    elbo = pyro.infer.Trace_ELBO()
    # as a run's step: the parameters held after the first step (RunEngine.stepper)
    step = FusedAdam(
        lr=1e-4, eps=0.01 * m.data.n_cells, hold=(m.model, m.guide), differentiable=[elbo]
    )
    model, guide = Annealed(m.model), Annealed(m.guide)
    rng = np.random.default_rng(0)

    def run(n):
        for _ in range(n):
            idx = rng.choice(m.data.n_cells, BATCH, replace=False)
            x, b = m.data.tensors(idx)
            step(elbo, model, guide, x, b, torch.as_tensor(idx), m.data.n_cells, 0.5)

    run(5)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(n_steps)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    return [
        {
            "operator": e.key,
            "calls_per_step": e.count / n_steps,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:top]
    ]


def _median_ms(fn, n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = _clock()
        fn()
        times.append((_clock() - t0) * 1e3)
    return statistics.median(times)


def kernel_timings(adata, n_steps: int) -> dict[str, float]:
    """The ZINB log-density alone, forward + backward, on the dataset's first 128 cells.

    Eager (``distributions.zinb_log_prob`` under autograd) against the fused compiled
    kernel, and the ns per float32 element of torch's ``lgamma``, ``digamma`` and ``log``
    that the eager density calls.
    """
    from pyro_scvi.model.distributions import zinb_log_prob

    x = torch.as_tensor(adata.X[:BATCH].toarray(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    shape = x.shape
    mu = (torch.rand(shape, generator=gen) * 4 + 0.01).requires_grad_()
    theta = (torch.rand(shape[1:], generator=gen) * 3 + 0.1).requires_grad_()
    gate = torch.randn(shape, generator=gen).requires_grad_()

    def step(fn):
        return lambda: fn(x, mu, theta, gate).sum().backward()

    eager = _median_ms(step(zinb_log_prob), n_steps)
    fused = _median_ms(step(kernels.zinb_log_prob_fused), n_steps)
    y = torch.rand(shape, generator=gen) * 5 + 0.1
    per_element = {
        f"torch_{op.__name__}_ns": _median_ms(lambda op=op: op(y), n_steps) * 1e6 / y.numel()
        for op in (torch.lgamma, torch.digamma, torch.log)
    }
    return {
        "eager_ms": eager,
        "fused_ms": fused,
        "saved_ns_per_element": (eager - fused) * 1e6 / x.numel(),
        **per_element,
    }


def compile_seconds(cold: bool) -> float | None:
    """Seconds of ``pyro_scvi.train.kernels.precompile()`` in a new process (imports excluded).

    ``cold``: with an empty on-disk compile cache (a temporary ``TORCHINDUCTOR_CACHE_DIR``),
    as the first run on a machine; otherwise with torch's own cache, as every later run.
    """
    code = (
        "import time, torch; torch.set_num_threads(1); from pyro_scvi import kernels; "
        "t = time.perf_counter(); ok = kernels.precompile(); "
        "print(time.perf_counter() - t if ok else 'none')"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, **({"TORCHINDUCTOR_CACHE_DIR": cache} if cold else {})}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
    return None if not out or out[-1] == "none" else float(out[-1])


def markdown(results: dict) -> str:
    meta = results["meta"]
    lines = [
        "# Where a training step's time goes",
        "",
        f"{meta['date']}; {machine_line(meta)}; 1 torch thread; torch "
        f"{meta['versions']['torch']}, pyro-ppl {meta['versions']['pyro-ppl']}, pyro_scvi "
        f"{meta['versions']['pyro_scvi']} at {(meta['git'].get('pyro_scvi_commit') or '?')[:7]}.",
        "",
        f"Minibatch of {BATCH} cells; median ms per step over {results['n_steps']} steps.",
        "",
    ]
    ck = results["compile_seconds"]
    lines += [
        "## The ZINB log-density alone",
        "",
        f"Forward + backward on the first {BATCH} cells, median ms; the fused kernel is "
        "`pyro_scvi.train.kernels` (compiled). Compiling it (`kernels.precompile()` in a new "
        f"process): {_fmt_s(ck['warm'])} with torch's on-disk cache, {_fmt_s(ck['cold'])} "
        "with an empty one (the first run on a machine).",
        "",
        "| dataset | eager ms | fused ms | speed-up | saved ns / element | torch.lgamma "
        "ns / element | torch.digamma ns / element | torch.log ns / element |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        k = d["kernel"]
        lines.append(
            f"| {d['name']} | {k['eager_ms']:.2f} | {k['fused_ms']:.2f} "
            f"| {k['eager_ms'] / k['fused_ms']:.2f}x | {k['saved_ns_per_element']:.1f} "
            f"| {k['torch_lgamma_ns']:.2f} | {k['torch_digamma_ns']:.2f} "
            f"| {k['torch_log_ns']:.2f} |"
        )
    lines.append("")
    for d in results["datasets"]:
        rows = [
            ("gather minibatch", "gather", "gather"),
            ("guide trace (encoders, q)", "guide", "forward"),
            ("model replay (decoder, p)", "model", None),
            ("log-densities + ELBO sum", "log-densities", None),
            ("backward", "backward", "backward"),
            ("Adam (fused)", "adam", "adam"),
        ]
        lines += [
            f"## {d['name']} ({d['shape']})",
            "",
            "ZINB log-density: *eager* (`distributions.zinb_log_prob`) or *fused* "
            "(`kernels`, compiled). The floor's forward is its whole forward pass.",
            "",
            "| phase | pyro_scvi eager | pyro_scvi fused | floor eager | floor fused |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, ours_key, floor_key in rows:
            cells = [f"{d[k]['pyro_scvi'][ours_key]:.2f}" for k in ("eager", "fused")]
            cells += [
                f"{d[k]['torch_floor'][floor_key]:.2f}" if floor_key else ""
                for k in ("eager", "fused")
            ]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        totals = {
            k: (sum(d[k]["pyro_scvi"].values()), sum(d[k]["torch_floor"].values()))
            for k in ("eager", "fused")
        }
        lines.append(
            "| **total (uncompiled ELBO)** | "
            + " | ".join(f"**{totals[k][0]:.2f}**" for k in ("eager", "fused"))
            + " | "
            + " | ".join(f"**{totals[k][1]:.2f}**" for k in ("eager", "fused"))
            + " |"
        )
        lines.append(
            "| **whole compiled step** (`JitTrace_ELBO`, incl. gather) | "
            + " | ".join(f"**{d[k]['pyro_scvi_compiled_ms']:.2f}**" for k in ("eager", "fused"))
            + " | | |"
        )
        lines += [
            "",
            "pyro_scvi / floor per step, same kernel: "
            + "; ".join(
                f"{k}: {totals[k][0] / totals[k][1]:.2f} uncompiled (`Trace_ELBO`), "
                f"{d[k]['pyro_scvi_compiled_ms'] / totals[k][1]:.2f} compiled"
                for k in ("eager", "fused")
            )
            + f". Fused kernel speed-up of the compiled step: "
            f"{d['eager']['pyro_scvi_compiled_ms'] / d['fused']['pyro_scvi_compiled_ms']:.2f}x.",
            "",
            f"Top operators by self CPU time (pyro_scvi, {d['top_operators_kernel']} kernel, "
            "torch.profiler):",
            "",
            "| operator | calls / step | self ms / step | share |",
            "|---|---:|---:|---:|",
        ]
        lines += [
            f"| `{o['operator']}` | {o['calls_per_step']:.1f} | {o['self_ms_per_step']:.2f} "
            f"| {o['share']:.0%} |"
            for o in d["top_operators"]
        ]
        lines.append("")
    return "\n".join(lines)


def _fmt_s(seconds: float | None) -> str:
    return "no compiler" if seconds is None else f"{seconds:.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps per dataset")
    p.add_argument("--smoke", action="store_true", help="a few steps on 600 PBMC cells")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps = 5
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    results = {"meta": run_metadata(argv, 1, {}), "n_steps": args.steps, "datasets": []}
    results["compile_seconds"] = {"cold": compile_seconds(True), "warm": compile_seconds(False)}
    for name, adata, batch_key in _datasets(args.smoke):
        print(f"{name}: ...", file=sys.stderr, flush=True)
        entry = {"name": name, "shape": f"{adata.n_obs} x {adata.n_vars}"}
        entry["kernel"] = kernel_timings(adata, args.steps)
        for kernel in ("eager", "fused"):
            fused = kernel == "fused"
            with kernels.fused_log_prob(fused):
                entry[kernel] = {
                    "pyro_scvi": profile_pyro_scvi(adata, batch_key, args.steps),
                    "torch_floor": profile_floor(adata, batch_key, args.steps, fused=fused),
                    "pyro_scvi_compiled_ms": compiled_step(adata, batch_key, args.steps),
                }
        # the kernel a long training run of this dataset uses (pyro_scvi's engine)
        entry["top_operators_kernel"] = "fused" if adata.n_vars >= FUSED_MIN_GENES else "eager"
        with kernels.fused_log_prob(entry["top_operators_kernel"] == "fused"):
            entry["top_operators"] = top_operators(adata, batch_key, min(args.steps, 50))
        results["datasets"].append(entry)
    text = markdown(results)
    print(text)
    stem = "profile_step" + ("_smoke" if args.smoke else "")
    write_results(args.out_dir, stem, results, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
