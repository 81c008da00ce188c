"""Are a BayesianDecoder fit's posterior scales at the ELBO's optimum, or where Adam left them?

Training steps the networks with an Adam whose ``eps`` is scaled to the number of
training cells (scvi-tools' settings for a per-cell mean loss, see ``pyro_scvi.train.loop``).
The gradient of a global's log-scale has an O(1) entropy part, far below that ``eps``, so
with it a scale stops short of its optimum; q's parameters therefore have a param group of
their own (``GlobalsGuide.optim_groups``: ``eps`` 1e-8, no weight decay), and this checks
that a fit's scales have settled. This script takes a fitted model, freezes everything
but q's log-scales, and trains those alone with a plain Adam (``eps`` 1e-8, ``--lr``) on
the same minibatch ELBO, reporting the mean posterior standard deviation of each site as it
goes. A scale that keeps moving was not at its optimum.

Run::

    PYTHONPATH=. python benchmarks/bayesian_decoder_scales.py --model DIR   # a saved fit
    PYTHONPATH=. python benchmarks/bayesian_decoder_scales.py --smoke

``--model`` is a folder that ``bayesian_decoder.py --cache DIR`` wrote (``DIR/bd``).
Results: ``benchmarks/results/bayesian_decoder_scales.{json,md}`` (``_smoke``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pyro
import torch
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import pyro_scvi  # noqa: E402
from pyro_scvi.model.schemes import BayesianDecoder  # noqa: E402


def _sds(guide) -> dict[str, float]:
    with torch.no_grad():
        return {s: float(guide.posterior(s).scale.mean()) for s in guide.sites}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a saved BayesianDecoder fit")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    steps, every = args.steps, 100
    if args.smoke:
        adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
        model = pyro_scvi.SCVI(adata, scheme=BayesianDecoder())
        model.train(max_epochs=2, progress_bar=False)
        steps, every = 4, 2
    else:
        if args.model is None:
            parser.error("--model DIR (a saved BayesianDecoder fit) or --smoke")
        model = pyro_scvi.SCVI.load(args.model, adata, device="cpu")
    guide = model.guide
    if not hasattr(guide, "sample_globals"):
        parser.error(f"{args.model} is not a BayesianDecoder fit")
    scales = [guide.log_scale[s] for s in guide.sites]
    for p in [*model.model.parameters(), *guide.parameters()]:
        p.requires_grad_(False)
    for p in scales:
        p.requires_grad_(True)
    optim = torch.optim.Adam(scales, lr=args.lr, eps=1e-8)
    elbo = Trace_ELBO()
    idx = np.asarray(model.train_indices)
    rng = np.random.default_rng(0)
    pyro.set_rng_seed(0)
    model.model.eval(), guide.eval()
    trajectory = [{"step": 0, **_sds(guide)}]
    for step in range(1, steps + 1):
        cells = rng.choice(idx, min(args.batch_size, len(idx)), replace=False)
        x, b = model.data.tensors(cells)
        with pyro.get_param_store().scope():
            loss = elbo.differentiable_loss(
                model.model, guide, x, b, torch.as_tensor(cells), len(idx)
            )
        optim.zero_grad()
        loss.backward()
        optim.step()
        if step % every == 0 or step == steps:
            trajectory.append({"step": step, **_sds(guide)})
            print(trajectory[-1], file=sys.stderr)
    results = {
        "meta": _common.run_metadata(argv, None),
        "settings": {
            "model": None if args.model is None else str(args.model),
            "scheme": repr(model.scheme),
            "steps": steps,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "smoke": args.smoke,
        },
        "trajectory": trajectory,
    }
    lines = [
        "# BayesianDecoder: q's scales trained alone",
        "",
        f"pbmc8k_200hvg ({adata.n_obs} cells), the fit `{model.scheme!r}` "
        f"({len(model.history)} epochs). Everything but q's log-scales frozen; those "
        f"trained with Adam (lr {args.lr}, eps 1e-8, minibatches of {args.batch_size} "
        "cells, the ELBO scaled to the training cells). Mean posterior standard deviation:",
        "",
        "| step | W (rho_weight) | b (rho_bias) | log theta |",
        "|---|---|---|---|",
    ]
    for row in trajectory:
        lines.append(
            f"| {row['step']} | {row['rho_weight']:.4f} | {row['rho_bias']:.4f} | "
            f"{row['log_theta']:.4f} |"
        )
    lines.append("")
    stem = "bayesian_decoder_scales_smoke" if args.smoke else "bayesian_decoder_scales"
    table = "\n".join(lines) + "\n"
    _common.write_results(args.out_dir, stem, results, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
