"""Where one SVI training step's time goes: pyro_scvi against the PyTorch floor.

Per dataset (PBMC8k, Zeisel, simulated 10,000 x 2,000; minibatches of 128, one thread): the
phases of a pyro_scvi step and of the floor's, the whole compiled step, each with the eager
and the fused ZINB kernel; ``torch.profiler``'s top operators; the ZINB log-density alone and
the seconds of compiling its kernel. Details: ``benchmarks/README.md``.

    python -m benchmarks.profile_step            # about 1.5 minutes
    python -m benchmarks.profile_step --smoke    # seconds
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
from typing import Any

from .lib import adapters, results

STUDY, BATCH = "profile_step", 128
PHASES = ("gather", "guide", "model", "log-densities", "backward", "adam")


def fresh_model(adata: Any, batch_key: str | None) -> Any:
    """The same freshly initialized model for every measurement."""
    import pyro

    import pyro_scvi

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    return pyro_scvi.SCVI(adata, batch_key=batch_key, use_observed_lib_size=False)


def medians(phases: dict[str, list[float]]) -> dict[str, float]:
    return {k: statistics.median(v[5:]) for k, v in phases.items()}  # 5 warm-up steps left out


def profile_pyro_scvi(adata: Any, batch_key: str | None, n_steps: int) -> dict[str, float]:
    """Median ms per phase of pyro_scvi's step (with the kernel the caller chose)."""
    import numpy as np
    import torch
    from pyro import poutine

    from pyro_scvi.model import parameters_held
    from pyro_scvi.train.kl import Annealed

    m = fresh_model(adata, batch_key)
    model, guide, cells = m.model, m.guide, m.data
    annealed_model, annealed_guide = Annealed(model), Annealed(guide)  # as a training step
    model.train(), guide.train()
    rng, phases, optim = np.random.default_rng(0), {k: [] for k in PHASES}, None
    for _ in range(n_steps + 5):
        idx = rng.choice(cells.n_cells, BATCH, replace=False)
        t = [time.perf_counter()]
        x, b = cells.tensors(idx)
        step_args = (x, b, torch.as_tensor(idx), cells.n_cells, 0.5)
        t.append(time.perf_counter())
        with parameters_held(model, guide) if optim is not None else nullcontext():
            guide_trace = poutine.trace(annealed_guide).get_trace(*step_args)
            t.append(time.perf_counter())
            model_trace = poutine.trace(
                poutine.replay(annealed_model, trace=guide_trace)
            ).get_trace(*step_args)
        t.append(time.perf_counter())
        model_trace.compute_log_prob()
        guide_trace.compute_score_parts()
        loss = -(model_trace.log_prob_sum() - guide_trace.log_prob_sum())
        t.append(time.perf_counter())
        if optim is None:
            params = [p for net in (model, guide) for p in net.parameters()]
            optim = torch.optim.Adam(params, lr=1e-4, eps=0.01 * cells.n_cells, fused=True)
        loss.backward()
        t.append(time.perf_counter())
        optim.step()
        optim.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        for k, a, b in zip(PHASES, t[:-1], t[1:], strict=True):
            phases[k].append((b - a) * 1e3)
    return medians(phases)


def profile_floor(
    adata: Any, batch_key: str | None, n_steps: int, fused: bool
) -> dict[str, float]:
    """Median ms per phase of the floor's step (dense gather, forward, backward, Adam)."""
    import numpy as np
    import torch

    m = fresh_model(adata, batch_key)
    loss_fn = adapters.FloorLoss(m, fused=fused)
    x_all = torch.as_tensor(m.data.X.toarray(), dtype=torch.float32)
    b_all = torch.as_tensor(m.data.batch_index)
    params = [p for net in (m.model, m.guide) for p in net.parameters()]
    optim = torch.optim.Adam(params, lr=1e-4, eps=0.01, fused=True)
    m.model.train(), m.guide.train()
    rng, phases = (
        np.random.default_rng(0),
        {k: [] for k in ("gather", "forward", "backward", "adam")},
    )
    for _ in range(n_steps + 5):
        idx = torch.as_tensor(rng.choice(m.data.n_cells, BATCH, replace=False))
        t = [time.perf_counter()]
        x, b = x_all.index_select(0, idx), b_all.index_select(0, idx)
        t.append(time.perf_counter())
        loss = loss_fn(x, b, 0.5).mean()
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        optim.step()
        optim.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        for k, a, b in zip(phases, t[:-1], t[1:], strict=True):
            phases[k].append((b - a) * 1e3)
    return medians(phases)


def compiled_step(adata: Any, batch_key: str | None, n_steps: int) -> float:
    """Median ms of a whole compiled step (JitTrace_ELBO + fused Adam, as on long runs)."""
    import numpy as np
    import pyro
    import torch

    from pyro_scvi.train.kl import JitCall
    from pyro_scvi.train.optim import FusedAdam

    m = fresh_model(adata, batch_key)
    m.model.train(), m.guide.train()
    elbo, model, guide = (
        pyro.infer.JitTrace_ELBO(ignore_jit_warnings=True),
        JitCall(m.model),
        JitCall(m.guide),
    )
    step, rng, times = FusedAdam(lr=1e-4, eps=0.01 * m.data.n_cells), np.random.default_rng(0), []
    for _ in range(n_steps + 5):
        idx = rng.choice(m.data.n_cells, BATCH, replace=False)
        t = time.perf_counter()
        x, b = m.data.tensors(idx)
        step(
            elbo,
            model,
            guide,
            x,
            b,
            torch.as_tensor(idx),
            torch.tensor(0.5),
            num_cells=m.data.n_cells,
            n_cells=BATCH,
        )
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times[5:])  # the first steps compile


def top_operators(adata: Any, batch_key: str | None, n_steps: int, top: int = 12) -> list[dict]:
    """``torch.profiler``: the operators with the most self CPU time over ``n_steps`` steps."""
    import numpy as np
    import pyro
    import torch
    from torch.profiler import ProfilerActivity, profile

    from pyro_scvi.train.kl import Annealed
    from pyro_scvi.train.optim import FusedAdam

    m = fresh_model(adata, batch_key)
    elbo = pyro.infer.Trace_ELBO()  # as a run's step: the parameters held after the first step
    step = FusedAdam(
        lr=1e-4, eps=0.01 * m.data.n_cells, hold=(m.model, m.guide), differentiable=[elbo]
    )
    model, guide, rng = Annealed(m.model), Annealed(m.guide), np.random.default_rng(0)

    def run(n: int) -> None:
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
            "share": e.self_cpu_time_total / total,
            "self_ms_per_step": e.self_cpu_time_total / 1e3 / n_steps,
        }
        for e in events[:top]
    ]


def kernel_timings(adata: Any, n_steps: int) -> dict[str, float]:
    """The ZINB log-density alone, forward + backward, on the first 128 cells: eager against
    the fused kernel, and ns per float32 element of ``lgamma``, ``digamma`` and ``log``."""
    import torch

    from pyro_scvi.model.distributions import zinb_log_prob
    from pyro_scvi.train import kernels

    def median_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(n_steps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    x = torch.as_tensor(adata.X[:BATCH].toarray(), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    mu = (torch.rand(x.shape, generator=gen) * 4 + 0.01).requires_grad_()
    theta = (torch.rand(x.shape[1:], generator=gen) * 3 + 0.1).requires_grad_()
    gate = torch.randn(x.shape, generator=gen).requires_grad_()
    eager, fused = (
        median_ms(lambda f=f: f(x, mu, theta, gate).sum().backward())
        for f in (zinb_log_prob, kernels.zinb_log_prob_fused)
    )
    y = torch.rand(x.shape, generator=gen) * 5 + 0.1
    ops = (torch.lgamma, torch.digamma, torch.log)
    per_element = {
        f"torch_{op.__name__}_ns": median_ms(lambda op=op: op(y)) * 1e6 / y.numel() for op in ops
    }
    return {
        "eager_ms": eager,
        "fused_ms": fused,
        "saved_ns_per_element": (eager - fused) * 1e6 / x.numel(),
    } | per_element


def compile_seconds(cold: bool) -> float | None:
    """Seconds of ``kernels.precompile()`` in a new process (imports excluded); ``cold``: with
    an empty on-disk compile cache, as the first run on a machine."""
    code = (
        "import time, torch; torch.set_num_threads(1); from pyro_scvi.train import kernels; "
        "t = time.perf_counter(); ok = kernels.precompile(); print(time.perf_counter() - t if ok "
        "else 'none')"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | ({"TORCHINDUCTOR_CACHE_DIR": cache} if cold else {})
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
    words = out.stdout.split()
    return None if not words or words[-1] == "none" else float(words[-1])


def markdown(res: dict[str, Any]) -> str:
    ck = res["compile_seconds"]
    compiled = {k: "no compiler" if v is None else f"{v:.1f} s" for k, v in ck.items()}
    lines = results.header(
        res,
        "Where a training step's time goes",
        f"Minibatch of {BATCH} cells, 1 torch thread; median ms per step over {res['n_steps']} "
        "steps.",
    )
    lines += [
        "## The ZINB log-density alone",
        "",
        f"Forward + backward on the first {BATCH} cells, median ms; the fused kernel is "
        "`pyro_scvi.train.kernels` (compiled). Compiling it (`kernels.precompile()` in a new "
        f"process): {compiled['warm']} with torch's on-disk cache, {compiled['cold']} with an "
        "empty one (the first run on a machine).",
        "",
    ]
    rows = [
        f"{d['name']} | {k['eager_ms']:.2f} | {k['fused_ms']:.2f} | "
        f"{k['eager_ms'] / k['fused_ms']:.2f}x | "
        f"{k['saved_ns_per_element']:.1f} | {k['torch_lgamma_ns']:.2f} | "
        f"{k['torch_digamma_ns']:.2f} | "
        f"{k['torch_log_ns']:.2f}"
        for d in res["datasets"]
        for k in [d["kernel"]]
    ]
    lines += results.md_table(
        "dataset|eager ms:|fused ms:|speed-up:|saved ns / element:|torch.lgamma ns / "
        "element:|torch.digamma ns / element:|torch.log ns / element:",
        rows,
    )
    lines.append("")
    labels = (
        ("gather minibatch", "gather", "gather"),
        ("guide trace (encoders, q)", "guide", "forward"),
        ("model replay (decoder, p)", "model", None),
        ("log-densities + ELBO sum", "log-densities", None),
        ("backward", "backward", "backward"),
        ("Adam (fused)", "adam", "adam"),
    )
    for d in res["datasets"]:
        kinds = ("eager", "fused")
        rows = [
            f"{label} | "
            + " | ".join(f"{d[k]['pyro_scvi'][ours]:.2f}" for k in kinds)
            + " | "
            + " | ".join(f"{d[k]['torch_floor'][floor]:.2f}" if floor else "" for k in kinds)
            for label, ours, floor in labels
        ]
        totals = {
            k: (sum(d[k]["pyro_scvi"].values()), sum(d[k]["torch_floor"].values())) for k in kinds
        }
        rows.append(
            "**total (uncompiled ELBO)** | "
            + " | ".join(f"**{totals[k][i]:.2f}**" for i in (0, 1) for k in kinds)
        )
        rows.append(
            "**whole compiled step** (`JitTrace_ELBO`, incl. gather) | "
            + " | ".join(f"**{d[k]['pyro_scvi_compiled_ms']:.2f}**" for k in kinds)
            + " | |"
        )
        ratios = "; ".join(
            f"{k}: {totals[k][0] / totals[k][1]:.2f} uncompiled (`Trace_ELBO`), "
            f"{d[k]['pyro_scvi_compiled_ms'] / totals[k][1]:.2f} compiled"
            for k in kinds
        )
        speedup = d["eager"]["pyro_scvi_compiled_ms"] / d["fused"]["pyro_scvi_compiled_ms"]
        lines += [
            f"## {d['name']} ({d['shape']})",
            "",
            "ZINB log-density: *eager* (`distributions.zinb_log_prob`) "
            "or *fused* (`kernels`, compiled). The floor's forward is its whole forward pass.",
            "",
        ]
        lines += results.md_table(
            "phase|pyro_scvi eager:|pyro_scvi fused:|floor eager:|floor fused:", rows
        )
        lines += [
            "",
            f"pyro_scvi / floor per step, same kernel: {ratios}. Fused kernel speed-up of the "
            f"compiled step: {speedup:.2f}x.",
            "",
            f"Top operators by self CPU time (pyro_scvi, {d['top_operators_kernel']} kernel, "
            "torch.profiler):",
            "",
        ]
        rows = [
            f"`{o['operator']}` | {o['calls_per_step']:.1f} | {o['self_ms_per_step']:.2f} | "
            f"{o['share']:.0%}"
            for o in d["top_operators"]
        ]
        lines += [*results.md_table("operator|calls / step:|self ms / step:|share:", rows), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import pyro
    import torch

    import pyro_scvi
    from pyro_scvi.train import kernels
    from pyro_scvi.train.engine import FUSED_MIN_GENES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="timed steps per dataset")
    p.add_argument("--smoke", action="store_true", help="a few steps on 600 PBMC cells")
    p.add_argument("--out-dir", type=Path, default=results.RESULTS)
    args = p.parse_args(argv)
    args.steps = 5 if args.smoke else args.steps
    torch.set_num_threads(1)
    pyro.enable_validation(False)
    pbmc = pyro_scvi.datasets.pbmc8k_200hvg()
    if args.smoke:
        datasets = [("pbmc8k_200hvg", pbmc[:600].copy(), None)]
    else:
        sim = {"n_clusters": 5, "n_batches": 2, "batch_effect": 0.3, "seed": 0}
        synthetic = pyro_scvi.datasets.synthetic_zinb(n_cells=10_000, n_genes=2_000, **sim)
        zeisel = pyro_scvi.datasets.zeisel_cortex_subset()
        datasets = [
            ("pbmc8k_200hvg", pbmc, None),
            ("zeisel_cortex_subset_1464x1000", zeisel, None),
            ("synthetic 10000x2000", synthetic, "batch"),
        ]
    res = {"meta": results.metadata(STUDY, argv, threads=1), "n_steps": args.steps, "datasets": []}
    res["compile_seconds"] = {"cold": compile_seconds(True), "warm": compile_seconds(False)}
    for name, adata, batch_key in datasets:
        print(f"{name}: ...", file=sys.stderr, flush=True)
        entry = {
            "name": name,
            "shape": f"{adata.n_obs} x {adata.n_vars}",
            "kernel": kernel_timings(adata, args.steps),
        }
        for kernel in ("eager", "fused"):
            with kernels.fused_log_prob(kernel == "fused"):
                entry[kernel] = {
                    "pyro_scvi": profile_pyro_scvi(adata, batch_key, args.steps),
                    "torch_floor": profile_floor(adata, batch_key, args.steps, kernel == "fused"),
                    "pyro_scvi_compiled_ms": compiled_step(adata, batch_key, args.steps),
                }
        # the kernel a long training run of this dataset uses (pyro_scvi's engine)
        entry["top_operators_kernel"] = "fused" if adata.n_vars >= FUSED_MIN_GENES else "eager"
        with kernels.fused_log_prob(entry["top_operators_kernel"] == "fused"):
            entry["top_operators"] = top_operators(adata, batch_key, min(args.steps, 50))
        res["datasets"].append(entry)
    text = markdown(res)
    print(text)
    results.write(args.out_dir, results.stem(STUDY, args.smoke), res, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
