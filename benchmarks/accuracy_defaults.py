"""Accuracy at the user's defaults: pyro_scvi vs scvi-tools 1.4.2 on every shared dataset.

The requirement: "as good as scvi-tools on data kept outside the repo", each dataset
against scvi-tools 1.4.2 at its defaults for the same epochs:

1. the default fit finishes (pyro_scvi, every seed);
2. KMeans ARI >= scvi-tools' - 0.02;
3. batch-entropy mixing >= scvi-tools' - 0.05 (datasets with more than one batch);
4. held-out log p(x) >= scvi-tools'.

Runs, for every ``.h5ad`` in ``../shared/data`` (fewest cells x genes first) x seeds (default
0 1 2), each in its own subprocess (``compare_scvi_tools.py``'s worker machinery), so a
failure is recorded and the benchmark goes on:

* **pyro_scvi**: ``pyro_scvi.SCVI(adata[, batch_key="batch"]).train(max_epochs=E,
  seed=s, progress_bar=False)``, everything else at its defaults (latent library size,
  90 % / 10 % train/validation split drawn from the seed, the engine's choices).
* **scvi-tools**: ``scvi.settings.seed = s``; ``scvi.model.SCVI.setup_anndata(adata[,
  batch_key="batch"])``; ``scvi.model.SCVI(adata).train(max_epochs=E,
  datasplitter_kwargs={"external_indexing": [train, held_out, []]},
  enable_progress_bar=False)``: its defaults (which condition on the *observed* library
  size), trained on exactly pyro_scvi's training cells of the same seed
  (``model.validation_indices`` of the pyro_scvi run, which runs first), so the held-out
  cells are unseen by both. scvi-tools would split 90 / 10 itself; here the 10 % it
  validates on are the held-out cells (it computes no validation loss by default).

``batch_key="batch"`` is passed on data with more than one ``obs["batch"]``; labels are
``obs["cell_type"]``. Cells without counts are dropped first (the same cells for both).

Metrics, the same function on the same cells for both implementations:

* KMeans ARI (k = number of cell types) and batch-entropy mixing (multi-batch data) of
  the posterior mean of z, from ``pyro_scvi.analysis.metrics.score_latent`` on at most
  ``--metric-cells`` (10,000) cells drawn from the seed (``compare_scvi_tools.
  latent_scores``; NMI, silhouettes and batch silhouette are in the JSON too);
* held-out log p(x) per cell, importance sampled with ``--ll-samples`` (100) draws on the
  held-out cells (at most ``--ll-cells``): pyro_scvi ``model.get_marginal_ll(adata[cells],
  n_samples=K, seed=s)``, scvi-tools ``m.get_marginal_ll(adata, indices=cells,
  n_mc_samples=K, return_mean=False)`` averaged over the cells (its ``return_mean=True``
  averages minibatch means, which weighs a short last minibatch more). Nats per cell,
  higher is better. scvi-tools' default model conditions on the observed library size,
  so its number is log p(x | observed library), pyro_scvi's integrates over a latent
  library: the comparison the requirement asks for, but not like for like;
* held-out log p(x | observed library): pyro_scvi's default model evaluated with ``l``
  fixed at each cell's log total count (``get_marginal_ll(..., observed_library=True)``,
  the same draws of z), scvi-tools the number above. Reported beside the criterion; it
  does not change the verdict.

A third run per seed, **pyro_scvi-observed-library**, fits scvi-tools' default model with
pyro_scvi: ``pyro_scvi.SCVI(adata[, batch_key], use_observed_lib_size=True)``, the same
seed, hence the same training and held-out cells (checked). Its log p(x) is log p(x |
observed library), the quantity scvi-tools reports, from the same model class: the like-
for-like comparison, reported (ARI, batch entropy, log p(x | library)) and not judged
(``--no-observed-library`` skips it).

Per dataset the tables give the median over seeds of each metric for both, the
differences of the medians, and pass / fail for each criterion; every failed run is listed
with its error verbatim.

Threads: ``--threads 1`` (the default) pins every worker to one thread
(``torch.set_num_threads(1)``, ``OMP/MKL/OPENBLAS_NUM_THREADS=1``; pyro_scvi's engine never
uses more threads than it finds, so its call stays the default one). This is an accuracy
benchmark: threads change the speed, not the model, and on a shared machine one thread
per run avoids oversubscription. ``--threads default`` sets nothing.

::

    python benchmarks/accuracy_defaults.py           # full run
    python benchmarks/accuracy_defaults.py --smoke   # seconds

Results: ``benchmarks/results/accuracy_defaults.{json,md}`` (``--smoke``:
``accuracy_defaults_smoke.*``, ignored by git), rewritten after every dataset. Exit code
0 when every run finished and every criterion is met, 2 when every run finished but a
criterion is not met, 1 when a run failed or a dataset could not be read. Without
scvi-tools importable its runs are skipped, marked so, and the criteria are not judged.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import compare_scvi_tools as cst  # noqa: E402
import speed_defaults  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
#: pyro_scvi fitting scvi-tools' default model (``use_observed_lib_size=True``): reported
#: beside the criteria, which judge pyro_scvi's own default (a latent library).
OBSERVED = "pyro_scvi-observed-library"
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools", OBSERVED)
#: The requirement's tolerances: pyro_scvi - scvi-tools must be at least these.
TOLERANCES = {"ari": -0.02, "entropy_batch_mixing": -0.05, "heldout_log_px_per_cell": 0.0}
CRITERIA = {
    "ari": "KMeans ARI ≥ scvi-tools − 0.02",
    "entropy_batch_mixing": "batch entropy ≥ scvi-tools − 0.05",
    "heldout_log_px_per_cell": "held-out log p(x) ≥ scvi-tools",
}
SUMMARY_KEYS = (
    "ari",
    "nmi",
    "entropy_batch_mixing",
    "heldout_log_px_per_cell",
    "heldout_log_px_given_library_per_cell",
    "train_seconds",
    "seconds_per_epoch",
)
SMOKE: dict[str, Any] = {
    "dataset": "cellbench_3cl_2tech.h5ad",  # two batches; synthetic:300x100 if it is absent
    "subsample": 300,
    "epochs": 1,
    "seeds": [0],
    "ll_samples": 10,
}


# ---------------------------------------------------------------------------- options
def default_datasets(data_dir: Path) -> list[str]:
    """Every ``.h5ad`` in ``data_dir`` (they run smallest first, see :func:`run_benchmark`)."""
    return sorted(p.name for p in data_dir.glob("*.h5ad"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Accuracy of pyro_scvi vs scvi-tools, both at their defaults, on every "
        "shared dataset and several seeds, each run in its own process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=100, help="max_epochs for both")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    p.add_argument("--data-dir", type=Path, default=cst.DEFAULT_DATA_DIR, help="Folder of .h5ad")
    p.add_argument("--datasets", nargs="+", help="names in --data-dir; None: every .h5ad there")
    p.add_argument(
        "--threads",
        default="1",
        help="'default' (set nothing) or a thread count for every worker",
    )
    p.add_argument("--subsample", type=int, default=None, help="Random cells per dataset (all)")
    p.add_argument(
        "--metric-cells", type=int, default=10000, help="at most this many cells for ARI etc."
    )
    p.add_argument("--ll-cells", type=int, default=10000, help="at most this many held-out cells")
    p.add_argument("--ll-samples", type=int, default=100, help="importance samples, log p(x)")
    p.add_argument("--out-dir", type=Path, default=cst.DEFAULT_OUT_DIR, help="Results folder")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the datasets of the results already in --out-dir that this run does not "
        "redo (each marked with the run that measured it)",
    )
    p.add_argument(
        "--reuse-reference",
        action="store_true",
        help="take each (dataset, seed)'s scvi-tools run from the results already in "
        "--out-dir when it was measured with the same settings on the same held-out cells "
        "(scvi-tools is unchanged; only pyro_scvi is re-run); otherwise run it",
    )
    p.add_argument(
        "--observed-library",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"also run {OBSERVED}: pyro_scvi with use_observed_lib_size=True, scvi-tools' "
        "default model (reported like for like, not judged)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"Quick check: {SMOKE['dataset']} (or synthetic:300x100) subsampled to "
        f"{SMOKE['subsample']} cells, {SMOKE['epochs']} epoch, seed 0, "
        f"{SMOKE['ll_samples']} importance samples; results under a _smoke name",
    )
    args = p.parse_args(argv)
    if args.smoke:
        found = (args.data_dir / SMOKE["dataset"]).exists()
        args.datasets = args.datasets or [SMOKE["dataset"] if found else "synthetic:300x100"]
        args.subsample, args.epochs, args.seeds = SMOKE["subsample"], SMOKE["epochs"], [0]
        args.ll_samples = SMOKE["ll_samples"]
    if args.datasets is None:
        args.datasets = default_datasets(args.data_dir)
    if not args.datasets:
        p.error(f"no .h5ad files in {args.data_dir}; pass --data-dir or --datasets")
    try:
        args.dataset_specs = [
            cst.parse_dataset(
                d if d.startswith("synthetic:") or d.endswith(".h5ad") else d + ".h5ad"
            )
            for d in args.datasets
        ]
        args.threads_setting = speed_defaults.parse_threads(args.threads)
    except ValueError as err:
        p.error(str(err))
    positive = ("epochs", "metric_cells", "ll_cells", "ll_samples")
    if any(getattr(args, k) < 1 for k in positive):
        p.error("--" + ", --".join(k.replace("_", "-") for k in positive) + " must be positive.")
    return args


# ---------------------------------------------------------------------------- worker
def run_accuracy_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one implementation at its defaults in this process, then score it."""
    import anndata
    import numpy as np
    import torch

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    impl, seed = spec["implementation"], spec["seed"]
    if impl == "scvi-tools":
        cst.quiet_libraries()
    adata = anndata.read_h5ad(spec["h5ad"])
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy() if spec["batch_key"] else None
    out = RUNNERS[impl](adata, spec)
    latent, heldout = out.pop("latent"), np.asarray(out.pop("heldout_cells"))
    ll_of = out.pop("marginal_ll_of")
    errors: dict[str, str] = {}
    cells = cst.some_cells(np.arange(adata.n_obs), spec["metric_cells"], seed)
    out["metric_cells"] = len(cells)
    try:
        out.update(cst.latent_scores(latent, labels, batches, cells, seed))
    except Exception as err:
        errors["metrics"] = f"{type(err).__name__}: {err}"
    use = cst.some_cells(heldout, spec["ll_cells"], seed)
    out["heldout_ll_cells"], out["ll_samples"] = len(use), spec["ll_samples"]
    given_library_of = out.pop("given_library_of")
    try:
        out["heldout_log_px_per_cell"] = ll_of(use)
        out["heldout_log_px_given_library_per_cell"] = given_library_of(
            use, out["heldout_log_px_per_cell"]
        )
    except Exception as err:
        errors["marginal_ll"] = f"{type(err).__name__}: {err}"
    if errors:
        out["errors"] = errors
    out["threads_after"] = torch.get_num_threads()
    out["seconds_per_epoch"] = out["train_seconds"] / out["epochs_run"]
    return out


def run_pyro_scvi(adata: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """``pyro_scvi.SCVI(adata, batch_key=...).train(max_epochs=E, seed=s, progress_bar=False)``."""
    import numpy as np

    import pyro_scvi

    observed = spec["implementation"] == OBSERVED
    # use_observed_lib_size passed only for the observed run: the default run's call
    # stays the user's default one
    kwargs = {"use_observed_lib_size": True} if observed else {}
    model = pyro_scvi.SCVI(adata, batch_key=spec["batch_key"], **kwargs)
    start = time.perf_counter()
    model.train(max_epochs=spec["epochs"], seed=spec["seed"], progress_bar=False)
    seconds = time.perf_counter() - start
    split = cst.make_split(adata.n_obs, cst.TRAINING["train_size"], spec["seed"])
    heldout = np.asarray(model.validation_indices)
    return {
        "train_seconds": seconds,
        "epochs_run": len(model.history),
        "final_validation_elbo": float(model.history["validation_elbo"].iloc[-1]),
        "engine": model.engine,
        "n_train": len(model.train_indices),
        "heldout_indices": [int(i) for i in heldout],
        "split_matches_make_split": bool(np.array_equal(heldout, split[1])),
        "latent": model.get_latent_representation(),
        "heldout_cells": heldout,
        "marginal_ll_of": lambda cells: cst.common_marginal_ll(
            model, adata, cells, spec["ll_samples"], spec["seed"]
        ),
        # Conditioned on the observed library, the model's log p(x) is log p(x | library).
        "given_library_of": (lambda cells, value: value)
        if observed
        else lambda cells, _: cst.common_marginal_ll(
            model, adata, cells, spec["ll_samples"], spec["seed"], observed_library=True
        ),
    }


def run_scvi_tools(adata: Any, spec: dict[str, Any]) -> dict[str, Any]:
    """scvi-tools at its defaults, trained on the training cells of pyro_scvi's split."""
    import numpy as np
    import scvi

    scvi.settings.seed = spec["seed"]
    scvi.model.SCVI.setup_anndata(adata, batch_key=spec["batch_key"])
    model = scvi.model.SCVI(adata)
    if spec["heldout_indices"] is not None:
        heldout, source = spec["heldout_indices"], "pyro_scvi model.validation_indices"
    else:  # the pyro_scvi run failed: the same rule, checked by run_pyro_scvi
        heldout = cst.make_split(adata.n_obs, cst.TRAINING["train_size"], spec["seed"])[1]
        source = "compare_scvi_tools.make_split (the pyro_scvi run failed)"
    heldout = np.asarray(heldout, dtype=np.int64)
    train = np.setdiff1d(np.arange(adata.n_obs), heldout)
    splitter: dict[str, Any] = {
        "external_indexing": [train, heldout.copy(), np.array([], dtype=np.int64)]
    }
    # A last training minibatch of one cell would break batch norm; scvi-tools' own split
    # would move it to validation, with given indices it must be dropped.
    if len(train) % scvi.settings.batch_size == 1:
        splitter["drop_last"] = True
    start = time.perf_counter()
    model.train(max_epochs=spec["epochs"], datasplitter_kwargs=splitter, enable_progress_bar=False)
    seconds = time.perf_counter() - start
    return {
        "train_seconds": seconds,
        "epochs_run": int(model.history["elbo_train"].shape[0]),
        "use_observed_lib_size": bool(getattr(model.module, "use_observed_lib_size", True)),
        "n_train": len(train),
        "heldout_cells_from": source,
        "drop_last": bool(splitter.get("drop_last", False)),
        "latent": model.get_latent_representation(),
        "heldout_cells": heldout,
        "marginal_ll_of": lambda cells: float(
            model.get_marginal_ll(
                adata, indices=cells, n_mc_samples=spec["ll_samples"], return_mean=False
            )
            .double()
            .mean()
        ),
        # With an observed library (its default) its log p(x) is already log p(x | library).
        "given_library_of": lambda cells, value: (
            value if getattr(model.module, "use_observed_lib_size", True) else None
        ),
    }


RUNNERS = {"pyro_scvi": run_pyro_scvi, "scvi-tools": run_scvi_tools, OBSERVED: run_pyro_scvi}


# ---------------------------------------------------------------------------- parent
def run_dataset(
    ds: dict[str, Any],
    args: argparse.Namespace,
    skipped: dict[str, str],
    tmp: Path,
    reference: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Every seed of both implementations on one prepared dataset; medians and verdict.

    ``reference``: scvi-tools runs of this dataset by seed from an earlier results file
    (``--reuse-reference``), each used instead of a new run when this seed's pyro_scvi run
    held out the same cells (see :func:`reusable_reference`).
    """
    runs: list[dict[str, Any]] = [
        {"implementation": impl, "seed": None, "error": reason} for impl, reason in skipped.items()
    ]
    implementations = [i for i in IMPLEMENTATIONS if i != OBSERVED or args.observed_library]
    for seed in args.seeds:
        heldout = None  # pyro_scvi's held-out cells of this seed, once it has run
        for impl in implementations:
            if impl in skipped:
                continue
            spec = {
                "implementation": impl,
                "h5ad": ds["h5ad"],
                "batch_key": ds["batch_key"],
                "epochs": args.epochs,
                "seed": seed,
                "threads": args.threads_setting,
                "metric_cells": args.metric_cells,
                "ll_cells": args.ll_cells,
                "ll_samples": args.ll_samples,
                "heldout_indices": heldout,
                "result": str(tmp / f"result_{ds['name']}_{impl}_{seed}.json"),
            }
            run = {"implementation": impl, "seed": seed}
            earlier = (reference or {}).get(seed)
            if (
                impl == "scvi-tools"
                and earlier is not None
                and same_split(runs, seed)
                and earlier["reused_from"].get("n_cells") == ds["n_cells"]
                and earlier["reused_from"].get("n_genes") == ds["n_genes"]
            ):
                runs.append(earlier)
                print(f"  seed {seed} {impl:10s}: reused, {describe(earlier)}", file=sys.stderr)
                continue
            run |= cst.spawn_worker(spec, args.threads_setting, SCRIPT)
            if impl == "pyro_scvi" and "heldout_indices" in run:
                heldout = run.pop("heldout_indices")
            elif impl == OBSERVED and "heldout_indices" in run:
                # the same seed draws the same split: scored on the same held-out cells
                run["split_matches_pyro_scvi"] = run.pop("heldout_indices") == heldout
            runs.append(run)
            print(f"  seed {seed} {impl:10s}: {describe(run)}", file=sys.stderr, flush=True)
    summary = cst.summarize(runs, implementations, SUMMARY_KEYS)
    return {"runs": runs, "summary": summary, "verdict": verdict(summary, runs, ds, skipped)}


def same_split(runs: list[dict[str, Any]], seed: int) -> bool:
    """Whether this run's pyro_scvi run of ``seed`` held out ``make_split``'s cells, the
    cells an earlier run's scvi-tools was scored on (checked in :func:`reusable_reference`)."""
    return any(
        r["implementation"] == "pyro_scvi"
        and r["seed"] == seed
        and r.get("split_matches_make_split")
        for r in runs
    )


def reusable_reference(
    path: Path, args: argparse.Namespace
) -> dict[str, dict[int, dict[str, Any]]]:
    """``--reuse-reference``: the earlier file's finished scvi-tools runs, by dataset and seed.

    Only runs measured as this run would measure them (as many epochs, importance samples
    and metric cells, the same thread setting; the same cells, checked by
    :func:`run_dataset`) on the held-out cells of
    ``make_split`` (that seed's pyro_scvi run held them out), so that scvi-tools trained
    and was scored on the cells this run holds out. Each reused run carries
    ``reused_from``: the date, commit and command that measured it.
    """
    if not path.exists():
        return {}
    import json

    earlier = json.loads(path.read_text())
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for d in earlier.get("datasets", []):
        source = d.get("from_run") or {
            "date": str(earlier.get("date")),
            "commit": str((earlier.get("git") or {}).get("pyro_scvi_commit")),
            "command": str(earlier.get("command")),
        }
        runs = d.get("runs", [])
        split_ok = {
            r["seed"]
            for r in runs
            if r["implementation"] == "pyro_scvi" and r.get("split_matches_make_split")
        }
        for r in runs:
            same = (
                r["implementation"] == "scvi-tools"
                and "error" not in r
                and not r.get("errors")
                and r["seed"] in split_ok
                and r.get("epochs_run") == args.epochs
                and r.get("ll_samples") == args.ll_samples
                and r.get("metric_cells") == min(d.get("n_cells", -1), args.metric_cells)
                and r.get("heldout_ll_cells", args.ll_cells + 1) <= args.ll_cells
                and (
                    args.threads_setting is None or r.get("threads_after") == args.threads_setting
                )
            )
            if not same:
                continue
            shape = {"n_cells": d.get("n_cells"), "n_genes": d.get("n_genes")}
            reused = {**r, "reused_from": r.get("reused_from", {**source, **shape})}
            if reused.get("use_observed_lib_size") and "heldout_log_px_per_cell" in reused:
                # runs from before the like-for-like column: with its observed library
                # scvi-tools' log p(x) is already log p(x | library)
                reused.setdefault(
                    "heldout_log_px_given_library_per_cell", reused["heldout_log_px_per_cell"]
                )
            out.setdefault(d["name"], {})[r["seed"]] = reused
    return out


def verdict(
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    ds: dict[str, Any],
    skipped: dict[str, str],
) -> dict[str, Any]:
    """Pass / fail of each criterion on the medians over seeds."""
    mine, theirs = summary["pyro_scvi"], summary["scvi-tools"]
    ours = [r for r in runs if r["implementation"] == "pyro_scvi"]
    done = [r for r in ours if "error" not in r and not r.get("errors")]
    out: dict[str, Any] = {
        "fit_finishes": {
            "passed": bool(done) and len(done) == len(ours),
            "detail": f"{len(done)} of {len(ours)} pyro_scvi runs trained and scored",
        }
    }
    for key, tol in TOLERANCES.items():
        if key == "entropy_batch_mixing" and ds["n_batches"] < 2:
            out[key] = {"passed": None, "detail": "one batch: not applicable"}
            continue
        a, b = mine.get(key), theirs.get(key)
        if "scvi-tools" in skipped:
            out[key] = {"passed": None, "detail": "scvi-tools skipped: not judged"}
        elif a is None or b is None:
            out[key] = {"passed": False, "detail": "no value (runs failed)"}
        else:
            out[key] = {"passed": a - b >= tol, "difference": a - b, "tolerance": tol}
    judged = [v["passed"] for v in out.values() if v["passed"] is not None]
    out["all_passed"] = all(judged) if len(judged) > 1 else None
    # Reported, not judged: the requirement compares each implementation's own log p(x).
    a = mine.get("heldout_log_px_given_library_per_cell")
    b = theirs.get("heldout_log_px_given_library_per_cell")
    out["like_for_like_log_px"] = (
        {"passed": None, "detail": "no value"}
        if a is None or b is None
        else {"passed": a - b >= 0.0, "difference": a - b, "tolerance": 0.0}
    )
    # Reported, not judged: pyro_scvi fitting scvi-tools' default model, against it.
    same = summary.get(OBSERVED)
    if same is not None and same.get("n_ok") and "scvi-tools" not in skipped:
        out["same_model"] = {}
        for key, tol in TOLERANCES.items():
            a, b = same.get(key), theirs.get(key)
            if a is not None and b is not None:
                out["same_model"][key] = {"passed": a - b >= tol, "difference": a - b}
    return out


def describe(run: dict[str, Any]) -> str:
    """One progress line for a finished run."""
    if "error" in run:
        return f"FAILED: {run['error']}"
    return (
        f"train {run['train_seconds']:.0f} s, ARI {cst._fmt(run.get('ari'), '.3f')}, "
        f"batch entropy {cst._fmt(run.get('entropy_batch_mixing'), '.3f')}, held-out log p(x) "
        f"{cst._fmt(run.get('heldout_log_px_per_cell'), '.2f')}"
        + (f", errors {run['errors']}" if run.get("errors") else "")
    )


def run_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Prepare each dataset, run every seed of both, write the tables after each dataset."""
    start = time.perf_counter()
    skipped = speed_defaults.unavailable(["pyro_scvi", "scvi-tools"])
    if "pyro_scvi" in skipped:
        print(skipped["pyro_scvi"], file=sys.stderr)
        return 1
    results: dict[str, Any] = {
        **_common.run_metadata(argv, args.threads_setting, script="accuracy_defaults.py"),
        "settings": {
            "datasets": args.datasets,
            "epochs": args.epochs,
            "seeds": args.seeds,
            "threads": args.threads,
            "subsample": args.subsample,
            "metric_cells": args.metric_cells,
            "ll_cells": args.ll_cells,
            "ll_samples": args.ll_samples,
            "smoke": args.smoke,
            "observed_library": args.observed_library,
            "criteria": CRITERIA,
            "tolerances": TOLERANCES,
        },
        "skipped": skipped,
        "notes": NOTES,
        "datasets": [],
    }
    stem = "accuracy_defaults" + ("_smoke" if args.smoke else "")
    if args.merge:
        results["datasets"] = earlier_datasets(
            args.out_dir / f"{stem}.json", {ds["name"] for ds in args.dataset_specs}
        )
    reference = (
        reusable_reference(args.out_dir / f"{stem}.json", args) if args.reuse_reference else {}
    )
    prep = argparse.Namespace(
        data_dir=args.data_dir, subsample=args.subsample, seed=0, threads=args.threads_setting
    )
    with tempfile.TemporaryDirectory(prefix="accuracy_defaults_") as tmp:
        prepared = []
        for ds in args.dataset_specs:
            info = cst.prepare_dataset(ds, prep, Path(tmp))
            if isinstance(info, str):
                print(f"{ds['name']}: {info}", file=sys.stderr)
                results["datasets"].append({"name": ds["name"], "error": info})
            else:
                prepared.append((ds, info))
        # Smallest (cells x genes) first, so that partial results come early.
        prepared.sort(key=lambda item: item[1]["n_cells"] * item[1]["n_genes"])
        for ds, info in prepared:
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            entry = {"name": ds["name"], **info}
            entry |= run_dataset(
                {**ds, **info}, args, skipped, Path(tmp), reference.get(ds["name"])
            )
            entry.pop("h5ad")
            Path(info["h5ad"]).unlink(missing_ok=True)
            results["datasets"].append(entry)
            results["elapsed_seconds"] = time.perf_counter() - start
            _common.write_results(args.out_dir, stem, results, markdown_table(results))
    results["total_seconds"] = time.perf_counter() - start
    table = markdown_table(results)
    print(table)
    _common.write_results(args.out_dir, stem, results, table)
    return exit_code(results)


def earlier_datasets(path: Path, redone: set[str]) -> list[dict[str, Any]]:
    """The datasets of the results file ``path`` that are not in ``redone``, each with
    ``from_run`` (the date, command and commit of the run that measured it)."""
    if not path.exists():
        return []
    import json

    earlier = json.loads(path.read_text())
    return _common.keep_not_redone(earlier["datasets"], redone, "name", earlier)


def exit_code(results: dict[str, Any]) -> int:
    """1: a dataset or a run failed; 2: all ran, a criterion is not met; 0: all met."""
    if failures(results):
        return 1
    verdicts = [d["verdict"]["all_passed"] for d in results["datasets"] if "verdict" in d]
    return 2 if False in verdicts else 0


def failures(results: dict[str, Any]) -> list[str]:
    """Every failed dataset, run or scoring step, with its error verbatim."""
    out = []
    for d in results["datasets"]:
        if "error" in d:
            out.append(f"{d['name']}: {d['error']}")
        for r in d.get("runs", []):
            if "error" in r and not r["error"].startswith("skipped"):
                out.append(f"{d['name']}, {r['implementation']}, seed {r['seed']}: {r['error']}")
            for stage, message in (r.get("errors") or {}).items():
                out.append(
                    f"{d['name']}, {r['implementation']}, seed {r['seed']}, {stage}: {message}"
                )
    return out


# ---------------------------------------------------------------------------- output
NOTES = [
    "Both at their defaults, max_epochs the same: pyro_scvi.SCVI(adata[, batch_key]).train("
    "max_epochs=E, seed=s, progress_bar=False); scvi.settings.seed = s, scvi.model.SCVI."
    "setup_anndata(adata[, batch_key]), scvi.model.SCVI(adata).train(max_epochs=E, "
    "datasplitter_kwargs={'external_indexing': [pyro_scvi's training cells, its held-out "
    "cells, []]}, enable_progress_bar=False). batch_key='batch' on data with more than one "
    "batch.",
    "ARI (higher is better): KMeans (k = number of cell types) on the posterior mean of z "
    "vs obs['cell_type']; batch entropy (higher is better mixing; natural log, 50 "
    "neighbours, 100 random cells, 50 repeats; ln(number of batches) is perfect mixing): "
    "pyro_scvi.analysis.metrics.score_latent on the same cells for both (at most --metric-cells, "
    "drawn from the seed).",
    "held-out log p(x): nats per cell, higher is better, importance sampled (K draws) on "
    "pyro_scvi's validation cells of the seed, which neither implementation trained on. "
    "scvi-tools' default model conditions on the observed library size: its value is "
    "log p(x | observed library), pyro_scvi's (latent library, integrated out) is "
    "log p(x). The requirement compares them as they are; they are not like for like.",
    "Medians over seeds; Δ = pyro_scvi median − scvi-tools median. A criterion passes when "
    "Δ ≥ its tolerance (ARI −0.02, batch entropy −0.05, log p(x) 0). 'fit finishes': every "
    "pyro_scvi run of the dataset trained and was scored.",
]


def _pass(v: dict[str, Any]) -> str:
    if v["passed"] is None:
        return "n/a"
    if "difference" not in v:
        return "pass" if v["passed"] else f"FAIL ({v['detail']})"
    return ("pass" if v["passed"] else "FAIL") + f" ({v['difference']:+.3f})"


def _like_for_like(d: dict[str, Any]) -> str:
    """The like-for-like log p(x | library) comparison, or '—' for results without it."""
    v = d["verdict"].get("like_for_like_log_px")
    if v is None or v["passed"] is None:
        return "—"
    mine = d["summary"]["pyro_scvi"]["heldout_log_px_given_library_per_cell"]
    theirs = d["summary"]["scvi-tools"]["heldout_log_px_given_library_per_cell"]
    return f"{'yes' if v['passed'] else 'no'} ({mine:.2f} / {theirs:.2f}, {v['difference']:+.2f})"


def _same_model_table(results: dict[str, Any]) -> list[str]:
    """pyro_scvi with scvi-tools' default model (observed library) against scvi-tools."""
    rows = [d for d in results["datasets"] if d.get("verdict", {}).get("same_model")]
    if not rows:
        return []
    lines = [
        "",
        "## The same model as scvi-tools' default (not judged)",
        "",
        f"{OBSERVED}: `pyro_scvi.SCVI(adata[, batch_key], use_observed_lib_size=True)`, the "
        "same seed, training and held-out cells as the pyro_scvi run. Both models condition "
        "on each cell's observed library, so both numbers are log p(x | library): like for "
        "like. pyro_scvi / scvi-tools (Δ), medians over seeds; a mark when Δ meets the "
        "criterion's tolerance.",
        "",
        "| dataset | runs ok | KMeans ARI | batch entropy | held-out log p(x \\| library) |",
        "|---|---|---|---|---|",
    ]
    for d in rows:
        same, theirs = d["summary"][OBSERVED], d["summary"]["scvi-tools"]
        cells = []
        for key, spec in (
            ("ari", ".3f"),
            ("entropy_batch_mixing", ".3f"),
            ("heldout_log_px_per_cell", ".2f"),
        ):
            v = d["verdict"]["same_model"].get(key)
            if v is None or (key == "entropy_batch_mixing" and d["n_batches"] < 2):
                cells.append("—")
                continue
            mark = "yes" if v["passed"] else "no"
            cells.append(
                f"{mark} ({same[key]:{spec}} / {theirs[key]:{spec}}, {v['difference']:+{spec}})"
            )
        lines.append(f"| {d['name']} | {same['n_ok']} | " + " | ".join(cells) + " |")
    return lines


def markdown_table(results: dict[str, Any]) -> str:
    """The metrics table, the verdict table, the failures and the notes."""
    s = results["settings"]
    fmt = cst._fmt
    how = (
        f"max_epochs {s['epochs']}, seeds {' '.join(map(str, s['seeds']))}, "
        f"threads {s['threads']}, "
        f"log p(x) with {s['ll_samples']} importance samples, every run in its own process"
        + (f", datasets subsampled to {s['subsample']} cells" if s["subsample"] else "")
    )
    if "total_seconds" not in results and "elapsed_seconds" in results:
        how += f"; {results['elapsed_seconds'] / 60:.1f} minutes so far"
    lines = cst.table_header(results, "Accuracy at the defaults: pyro_scvi vs scvi-tools", how)
    for name, reason in results["skipped"].items():
        lines.append(f"- **{name}**: {reason}; the criteria are not judged.")
    lines += [
        "",
        "## Medians over seeds",
        "",
        "| dataset | cells x genes | batches | runs ok (pyro_scvi / scvi-tools) | ARI pyro_scvi "
        "| ARI scvi-tools | Δ ARI | batch entropy pyro_scvi | batch entropy scvi-tools "
        "| Δ entropy | held-out log p(x) pyro_scvi | held-out log p(x) scvi-tools* "
        "| Δ log p(x) | train s (pyro_scvi / scvi-tools) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for d in results["datasets"]:
        if "error" in d:
            lines.append(f"| {d['name']} | {d['error']} |" + " |" * 12)
            continue
        mine, theirs = d["summary"]["pyro_scvi"], d["summary"]["scvi-tools"]

        def pair(key: str, spec: str, mine=mine, theirs=theirs) -> str:
            a, b = mine.get(key), theirs.get(key)
            diff = None if a is None or b is None else a - b
            return f"{fmt(a, spec)} | {fmt(b, spec)} | {fmt(diff, '+' + spec)}"

        multi = d["n_batches"] > 1
        name = d["name"] + (" (earlier run†)" if "from_run" in d else "")
        lines.append(
            f"| {name} | {d['n_cells']} x {d['n_genes']} | {d['n_batches']} "
            f"| {mine['n_ok']} / {theirs['n_ok']} | {pair('ari', '.3f')} "
            f"| {pair('entropy_batch_mixing', '.3f') if multi else '— | — | —'} "
            f"| {pair('heldout_log_px_per_cell', '.2f')} "
            f"| {fmt(mine.get('train_seconds'), '.0f')} / "
            f"{fmt(theirs.get('train_seconds'), '.0f')} |"
        )
    lines += [
        "",
        "\\* scvi-tools' default model conditions on the observed library size (log p(x | "
        "library)); pyro_scvi's integrates over a latent library (log p(x)). The last column "
        "of the criteria table evaluates pyro_scvi's model with l fixed at each cell's "
        "observed library (pyro_scvi / scvi-tools, Δ); the table after it fits scvi-tools' "
        "default model with pyro_scvi. † kept from an earlier run by --merge; see the notes.",
        "",
        "## Criteria (pyro_scvi against scvi-tools, medians over seeds)",
        "",
        "| dataset | default fit finishes | "
        + " | ".join(CRITERIA.values())
        + " | all | pyro_scvi's model at the observed library: log p(x \\| library) ≥ "
        "scvi-tools (not judged) |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in results["datasets"]:
        if "error" in d:
            lines.append(f"| {d['name']} | FAIL ({d['error']}) | | | | FAIL |")
            continue
        v = d["verdict"]
        overall = {True: "**pass**", False: "**FAIL**", None: "n/a"}[v["all_passed"]]
        lines.append(
            f"| {d['name']} | {_pass(v['fit_finishes'])} | "
            + " | ".join(_pass(v[k]) for k in CRITERIA)
            + f" | {overall} | {_like_for_like(d)} |"
        )
    lines += _same_model_table(results)
    failed = failures(results)
    lines += ["", "## Failures", ""]
    lines += [f"- {f}" for f in failed] if failed else ["None: every run finished and scored."]
    merged = [d for d in results["datasets"] if "from_run" in d]
    lines += ["", "## Notes", "", *(f"- {note}" for note in results["notes"])]
    lines += [
        f"- {d['name']}: kept from an earlier run (--merge): `{d['from_run']['command']}` "
        f"at commit {str(d['from_run']['commit'])[:7]}, {d['from_run']['date']}."
        for d in merged
    ]
    for d in results["datasets"]:
        reused = [r for r in d.get("runs", []) if "reused_from" in r]
        lines += [
            f"- {d['name']}: scvi-tools' run of seed {r['seed']} reused (--reuse-reference; "
            "same settings and held-out cells, scvi-tools unchanged) from "
            f"`{r['reused_from']['command']}` at commit {str(r['reused_from']['commit'])[:7]}, "
            f"{r['reused_from']['date']}."
            for r in reused
        ]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker``, one implementation, dataset and seed)."""
    raw = sys.argv[1:] if argv is None else argv
    if len(raw) == 2 and raw[0] == "--worker":
        return cst.worker_main(raw[1], run_accuracy_worker)
    return run_benchmark(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
