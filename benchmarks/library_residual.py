"""Where q(l) is centred: the paper's encoder against ``library_residual=True`` (the default).

The paper's guide has an encoder output the whole mean of q(l), the cell's log-library
(``SCVI(library_residual=False)``). With ``library_residual=True``
(:class:`pyro_scvi.guide.ScviGuide`, the default since this comparison) the mean is the cell's
observed log library size plus the encoder's output, so the encoder learns only a residual
and starts at the observed depth. The model and its ELBO are the same; only the variational
family's parametrization differs. This script measures what that changes, side by side in
one run, at the user's defaults otherwise (``SCVI(adata[, batch_key="batch"]).train(
max_epochs=E, seed=s)``, latent library, ZINB, 90 % training cells), on every shared
dataset and several seeds:

* KMeans ARI of the posterior mean of z against ``obs["cell_type"]`` and batch-entropy
  mixing (multi-batch data), from :func:`pyro_scvi.metrics.score_latent`;
* held-out log p(x) per cell (``get_marginal_ll`` on the validation cells, at most
  ``--ll-cells``, ``--ll-samples`` importance draws);
* the median over cell types of the R² of log library size regressed on z, a diagnostic
  of how much sequencing depth z carries (as in ``gate_init.py``).

::

    python benchmarks/library_residual.py                      # every shared dataset, seeds 0 1 2
    python benchmarks/library_residual.py --datasets worm_neuron_scirnaseq_scdeepcluster --merge
    python benchmarks/library_residual.py --smoke              # seconds (the test suite runs it)

``--merge`` keeps the results file's datasets that this run does not redo, read again at
every write, so two runs on disjoint datasets may share one file. One thread per run
(``torch.set_num_threads(1)``): this measures accuracy, not speed. Results:
``benchmarks/results/library_residual.{json,md}`` (``--smoke``: ``library_residual_smoke.*``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from gate_init import DATA_DIR, depth_r2, load, median  # noqa: E402

VARIANTS = (False, True)  # library_residual; False is the paper's guide, True the default


def run_one(adata: Any, residual: bool, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train the default model with ``library_residual=residual``; score it."""
    import pyro_scvi
    from pyro_scvi.metrics import score_latent

    multi = adata.obs["batch"].nunique() > 1
    model = pyro_scvi.SCVI(adata, batch_key="batch" if multi else None, library_residual=residual)
    t0 = time.perf_counter()
    model.train(max_epochs=args.epochs, seed=seed, progress_bar=False)
    seconds = time.perf_counter() - t0
    z = model.get_latent_representation()
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    scores = score_latent(z, labels, adata.obs["batch"].to_numpy() if multi else None, seed=0)
    cells = model.validation_indices[: args.ll_cells]
    log_px = model.get_marginal_ll(adata[cells], n_samples=args.ll_samples, seed=seed)
    return {
        "library_residual": residual,
        "seed": seed,
        "ari": scores["ari"],
        "entropy_batch_mixing": scores.get("entropy_batch_mixing"),
        "heldout_log_px_per_cell": float(log_px),
        "depth_r2_within_types": depth_r2(z, adata.X, labels),
        "heldout_cells": int(len(cells)),
        "train_seconds": seconds,
        "final_validation_elbo": float(model.history["validation_elbo"].iloc[-1]),
    }


def markdown(results: dict[str, Any]) -> str:
    """The results as a table: medians and paired differences per dataset, then every run."""
    s = results["settings"]
    how = (
        f"max_epochs {s['epochs']}, seeds {s['seeds']}, 1 thread, log p(x) with "
        f"{s['ll_samples']} importance samples on at most {s['ll_cells']} validation cells"
    )
    lines = [
        "# Where q(l) is centred: the paper's encoder (library_residual=False) vs "
        "library_residual=True (the default since 2026-11-30)",
        "",
        f"{results['date']}; {_common.machine_line(results)}; pyro_scvi commit "
        f"{str(results['git']['pyro_scvi_commit'])[:7]}."
        + (" SMOKE RUN: numbers are meaningless." if s["smoke"] else ""),
        "",
        f"Command: `{results['command']}`. {how}; {results['total_seconds'] / 60:.1f} minutes "
        "in this run.",
        "",
        "## Medians over seeds",
        "",
        "| dataset | cells x genes | library_residual | seeds | ARI | batch entropy | "
        "held-out log p(x) | R² of depth on z within types |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]

    fmt = _fmt
    for d in results["datasets"]:
        for residual in VARIANTS:
            rows = [r for r in d["runs"] if r["library_residual"] == residual]
            lines.append(
                f"| {d['name']} | {d['n_cells']} x {d['n_genes']} | {residual} | {len(rows)} | "
                f"{fmt(median(rows, 'ari'), '.3f')} | "
                f"{fmt(median(rows, 'entropy_batch_mixing'), '.3f')} | "
                f"{fmt(median(rows, 'heldout_log_px_per_cell'), '.2f')} | "
                f"{fmt(median(rows, 'depth_r2_within_types'), '.2f')} |"
            )
    lines += [
        "",
        "## Paired by seed: library_residual=True minus False",
        "",
        "| dataset | seeds | Δ ARI per seed | Δ batch entropy per seed | Δ log p(x) per seed |",
        "|---|---:|---|---|---|",
    ]
    for d in results["datasets"]:
        pairs = paired(d["runs"])
        if not pairs:
            continue

        lines.append(
            f"| {d['name']} | {len(pairs)} | {deltas(pairs, 'ari', '+.3f')} | "
            f"{deltas(pairs, 'entropy_batch_mixing', '+.3f')} | "
            f"{deltas(pairs, 'heldout_log_px_per_cell', '+.2f')} |"
        )
    lines += [
        "",
        "## Every run",
        "",
        "| dataset | seed | library_residual | ARI | batch entropy | held-out log p(x) | "
        "R² depth | train s |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        for r in sorted(d["runs"], key=lambda r: (r["seed"], r["library_residual"])):
            lines.append(
                f"| {d['name']} | {r['seed']} | {r['library_residual']} | "
                f"{fmt(r['ari'], '.3f')} | {fmt(r['entropy_batch_mixing'], '.3f')} | "
                f"{fmt(r['heldout_log_px_per_cell'], '.2f')} | "
                f"{fmt(r['depth_r2_within_types'], '.2f')} | {r['train_seconds']:.0f} |"
            )
    lines += [
        "",
        "- ARI (higher is better): KMeans with k = number of cell types on the posterior mean "
        "of z; batch entropy (higher is better mixing, multi-batch data only); held-out log "
        "p(x): nats per cell on the validation cells of the seed, higher is better; the same "
        "cells for both variants of a seed.",
        "- R² of depth on z: the median over cell types of the R² of log library size "
        "regressed linearly on z; lower means z carries less of the cells' sequencing depth.",
        "- Both variants train the same model with the same seed, split and everything else "
        "at the defaults; only q(l)'s mean differs: the encoder's output (False), or the "
        "cell's observed log library plus the encoder's output, whose bias starts at 0 (True).",
    ]
    merged = [d for d in results["datasets"] if "from_run" in d]
    lines += [
        f"- {d['name']}: kept from another run (--merge): `{d['from_run']['command']}` at "
        f"commit {d['from_run']['commit'][:7]}, {d['from_run']['date']}."
        for d in merged
    ]
    return "\n".join(lines) + "\n"


def _fmt(v: float | None, spec: str) -> str:
    return "—" if v is None or not np.isfinite(v) else format(v, spec)


def deltas(pairs: list[tuple[dict[str, Any], dict[str, Any]]], key: str, spec: str) -> str:
    """``True`` minus ``False`` of ``key`` for each seed's pair, comma separated."""
    return ", ".join(
        _fmt(b[key] - a[key], spec) if a.get(key) is not None else "—" for a, b in pairs
    )


def paired(runs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """``(False run, True run)`` for every seed that has both."""
    by = {(r["seed"], r["library_residual"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    return [(by[s, False], by[s, True]) for s in seeds if (s, False) in by and (s, True) in by]


def write(args: argparse.Namespace, stem: str, results: dict[str, Any]) -> str:
    """Write both files; with ``--merge`` first add the file's datasets not redone here."""
    out = dict(results)
    path = args.out_dir / f"{stem}.json"
    if args.merge and path.exists():
        earlier = json.loads(path.read_text())
        mine = {d["name"] for d in results["datasets"]}
        out["datasets"] = results["datasets"] + _common.keep_not_redone(
            earlier["datasets"], mine, "name", earlier
        )
    table = markdown(out)
    _common.write_results(args.out_dir, stem, out, table)
    return table


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", help="names in --data-dir (default: every .h5ad)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--ll-cells", type=int, default=1000)
    p.add_argument("--ll-samples", type=int, default=100)
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    p.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    p.add_argument("--merge", action="store_true", help="keep the file's other datasets")
    p.add_argument("--smoke", action="store_true", help="synthetic data, 1 epoch, 1 seed")
    args = p.parse_args(argv)
    if args.smoke:
        args.datasets, args.seeds, args.epochs, args.ll_samples = ["synthetic"], [0], 1, 5
    names = args.datasets or sorted(p.stem for p in args.data_dir.glob("*.h5ad"))
    if not names:
        p.error(f"no .h5ad in {args.data_dir}; pass --data-dir or --smoke")

    import torch

    torch.set_num_threads(1)
    results = _common.run_metadata(argv, 1, script="library_residual.py")
    results["settings"] = {
        "epochs": args.epochs,
        "seeds": args.seeds,
        "ll_samples": args.ll_samples,
        "ll_cells": args.ll_cells,
        "smoke": args.smoke,
    }
    results["datasets"] = []
    stem = "library_residual_smoke" if args.smoke else "library_residual"
    t0 = time.perf_counter()
    table = ""
    for name in names:
        adata = load(name, args)
        entry = {"name": name, "n_cells": adata.n_obs, "n_genes": adata.n_vars, "runs": []}
        results["datasets"].append(entry)
        for seed in args.seeds:
            for residual in VARIANTS:
                run = run_one(adata, residual, seed, args)
                entry["runs"].append(run)
                print(
                    f"{name} seed {seed} library_residual {residual}: ARI {run['ari']:.3f}, "
                    f"log p(x) {run['heldout_log_px_per_cell']:.2f}, "
                    f"{run['train_seconds']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
                results["total_seconds"] = time.perf_counter() - t0
                table = write(args, stem, results)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
