"""Where q(l) is centred: the paper's encoder against ``library_residual=True`` (the default).

The paper's guide has an encoder output the whole mean of q(l), the cell's log-library
(``SCVI(library_residual=False)``). With ``library_residual=True``
(:class:`pyro_scvi.model.guides.ScviGuide`, the default since this comparison) the mean is
the cell's observed log library size plus the encoder's output, so the encoder learns only
a residual and starts at the observed depth. The model and its ELBO are the same; only the
variational family's parametrization differs. This script measures what that changes,
side by side in one run, at the user's defaults otherwise
(``SCVI(adata[, batch_key="batch"]).train(max_epochs=E, seed=s)``, latent library, ZINB,
90 % training cells), on every shared dataset and several seeds:

* KMeans ARI of the posterior mean of z against ``obs["cell_type"]`` and batch-entropy
  mixing (multi-batch data), from :func:`pyro_scvi.analysis.metrics.score_latent`;
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

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import _variants  # noqa: E402
from _variants import median  # noqa: E402

VARIANTS = (False, True)  # library_residual; False is the paper's guide, True the default


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


def main(argv: list[str] | None = None) -> int:
    return _variants.run(
        argv,
        _variants.parser(__doc__.splitlines()[0]),
        script="library_residual.py",
        key="library_residual",
        variants=VARIANTS,
        scvi_kwargs=lambda residual: {"library_residual": residual},
        markdown=markdown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
