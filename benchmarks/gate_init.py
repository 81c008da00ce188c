"""Where the zero-inflation gate starts: ``ZINB(initial_dropout=0.05)`` against a layer's start.

A decoder head left at a fresh ``torch.nn.Linear``'s random start (``initial_dropout=None``,
pyro_scvi's start before the option existed) gives every cell and gene a dropout
probability near 0.5 at the first step. pyro_scvi's ZINB starts it at 0.05
instead (:class:`pyro_scvi.model.likelihoods.ZINB`, ``initial_dropout``), so the fit starts near
the plain negative binomial and gives zeros to the gate where the data ask for it. This
script measures what that start changes, at the user's defaults otherwise
(``SCVI(adata[, batch_key="batch"]).train(max_epochs=E, seed=s)``, latent library, 90 %
training cells), on every shared dataset and several seeds:

* KMeans ARI of the posterior mean of z against ``obs["cell_type"]`` and batch-entropy
  mixing (multi-batch data), from :func:`pyro_scvi.analysis.metrics.score_latent`;
* held-out log p(x) per cell (``get_marginal_ll`` on the validation cells, at most
  ``--ll-cells``, ``--ll-samples`` importance draws);
* how much of the cells' log library size z explains within a cell type (the median over
  cell types of the R² of a linear regression of log library size on z), a diagnostic of
  how much sequencing depth z carries.

::

    python benchmarks/gate_init.py                      # every shared dataset, seeds 0 1 2
    python benchmarks/gate_init.py --datasets zeisel_cortex_subset_1464x1000 --seeds 0
    python benchmarks/gate_init.py --smoke              # seconds (the test suite runs it)

``--merge`` keeps the results file's datasets this run does not redo (``_variants.run``).

One thread per run (``torch.set_num_threads(1)``): this measures accuracy, not speed.
Results: ``benchmarks/results/gate_init.{json,md}`` (``--smoke``: ``gate_init_smoke.*``).
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

STARTS = (0.05, None)  # None: the layer's random start, a gate near 0.5


def markdown(results: dict[str, Any]) -> str:
    """The results as a table: medians per dataset and start, then every run."""
    how = (
        f"max_epochs {results['settings']['epochs']}, seeds {results['settings']['seeds']}, "
        f"1 thread, log p(x) with {results['settings']['ll_samples']} importance samples"
    )
    lines = [
        "# Where the zero-inflation gate starts: initial dropout 0.05 (default) vs None "
        "(a fresh layer's random start, near 0.5; the default before)",
        "",
        f"{results['date']}; {_common.machine_line(results)}; pyro_scvi commit "
        f"{str(results['git']['pyro_scvi_commit'])[:7]}."
        + (" SMOKE RUN: numbers are meaningless." if results["settings"]["smoke"] else ""),
        "",
        f"Command: `{results['command']}`. {how}; {results['total_seconds'] / 60:.1f} minutes.",
        "",
        "## Medians over seeds",
        "",
        "| dataset | initial dropout | ARI | batch entropy | held-out log p(x) | "
        "R² of depth on z within types |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def fmt(v: float | None, spec: str) -> str:
        return "—" if v is None or not np.isfinite(v) else format(v, spec)

    for d in results["datasets"]:
        for start in STARTS:
            rows = [r for r in d["runs"] if r["initial_dropout"] == start]
            lines.append(
                f"| {d['name']} | {start} | {fmt(median(rows, 'ari'), '.3f')} | "
                f"{fmt(median(rows, 'entropy_batch_mixing'), '.3f')} | "
                f"{fmt(median(rows, 'heldout_log_px_per_cell'), '.2f')} | "
                f"{fmt(median(rows, 'depth_r2_within_types'), '.2f')} |"
            )
    lines += [
        "",
        "## Every run",
        "",
        "| dataset | seed | initial dropout | ARI | batch entropy | held-out log p(x) "
        "| R² depth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        for r in sorted(d["runs"], key=lambda r: r["seed"]):
            lines.append(
                f"| {d['name']} | {r['seed']} | {r['initial_dropout']} | {fmt(r['ari'], '.3f')} | "
                f"{fmt(r['entropy_batch_mixing'], '.3f')} | "
                f"{fmt(r['heldout_log_px_per_cell'], '.2f')} | "
                f"{fmt(r['depth_r2_within_types'], '.2f')} |"
            )
    lines += [
        "",
        "- ARI (higher is better): KMeans with k = number of cell types on the posterior mean "
        "of z; batch entropy (higher is better mixing, multi-batch data only); held-out log "
        "p(x): nats per cell on the validation cells of the seed, higher is better.",
        "- R² of depth on z: the median over cell types of the R² of log library size "
        "regressed linearly on z; lower means z carries less of the cells' sequencing depth.",
        "- Both starts train the same model (latent library, ZINB) with the same seed, split "
        "and everything else at the defaults; only the gate head's initial bias differs "
        "(logit of the initial dropout).",
    ]
    lines += [
        f"- {d['name']}: kept from another run (--merge): `{d['from_run']['command']}` at "
        f"commit {d['from_run']['commit'][:7]}, {d['from_run']['date']}."
        for d in results["datasets"]
        if "from_run" in d
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pyro_scvi

    return _variants.run(
        argv,
        _variants.parser(__doc__.splitlines()[0]),
        script="gate_init.py",
        key="initial_dropout",
        variants=STARTS,
        scvi_kwargs=lambda start: {"likelihood": pyro_scvi.ZINB(initial_dropout=start)},
        markdown=markdown,
    )


if __name__ == "__main__":
    raise SystemExit(main())
