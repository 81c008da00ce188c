"""Robustness matrix: every dataset x seed x engine path x thread setting must train.

Each run is ``pyro_scvi.SCVI(adata, batch_key=...).train(max_epochs=E,
engine=Engine.preset(path, threads=t), seed=s, progress_bar=False)`` in its own
subprocess (``compare_scvi_tools.py``'s worker machinery), on:

* every dataset in ``../shared/data`` (``pbmc8k_200hvg``, ``cellbench_3cl_2tech``,
  ``zeisel_cortex_subset_1464x1000``, ``baron_pancreas_indrop_neuca``,
  ``worm_neuron_scirnaseq_scdeepcluster``, ``onek1k_pbmc_40donors_scdesignpop``), read as
  they are, with ``batch_key="batch"`` where ``obs["batch"]`` has more than one value;
* stress cases simulated here from ``pyro_scvi.datasets.synthetic_zinb`` (fixed seeds, see
  :data:`STRESS`): library sizes from 10^2 to 10^6 per cell in one batch, one gene holding
  30 % of all counts, 20,000 genes of which 10 % are all zero, 60 cells, 40 batches of 50
  cells, a batch of 2 cells; and one more, 10,250 cells, whose 1,025 validation cells end
  in a validation minibatch of one cell.

Engine paths (``pyro_scvi.train.engine.Engine.preset``): ``auto`` (the default: the engine
decides; the resolved choice, ``model.engine``, is recorded), ``eager``, ``compiled``,
``fused`` (compiled ELBO and the fused ZINB kernel) and ``pyro`` (``pyro.infer.SVI`` with
Pyro's Adam). Threads: ``1`` and ``all`` (every core this process may use, pinned through
the engine); ``auto`` (the engine follows the free cores) can be asked for.

Outcome of a run:

* **finished**: training ended and both held-out ELBOs below are finite;
* **rejected**: pyro_scvi raised ``pyro_scvi.InputError`` (bad input, with a message
  naming the fix) -- recorded with its message, not a failure;
* **failed**: anything else: ``TrainingError`` (a non-finite loss), another exception, a
  non-finite ELBO, a worker that died.

Held-out ELBO, two ways, on the run's validation cells (10 % of the cells, chosen by the
seed, the same for every path and thread setting of one seed): **val ELBO**, the final
epoch's ``history["validation_elbo"]`` (the training loop's own one-draw estimate, on the
path's own density: the fused kernel where the path uses it), and **held-out ELBO**,
``SCVI.get_fit_statistics(validation cells, n_samples=K, seed=0)["elbo"]`` averaged over
cells (K draws per cell, eager density, one estimator for every path; that call's
importance-sampled log p(x) is recorded too). Agreement: per (dataset, seed, threads), the
relative spread ``(max - min) / |mean|`` of the held-out ELBO over the finished paths must
be at most 1 % (the val ELBO's spread is shown too). Paths may draw other random numbers
or round differently (compiled graphs, the fused kernel), so they are different training
trajectories of one estimator; the spread over seeds of one path, per (dataset, path,
threads), is printed beside it as the natural yardstick (it also changes the validation
cells).

::

    python benchmarks/robustness.py                      # full matrix (hours: see README)
    python benchmarks/robustness.py --datasets stress --seeds 0 --paths eager fused \\
        --threads 1 --epochs 5                           # a partial run
    python benchmarks/robustness.py --smoke              # about a minute

Results: ``benchmarks/results/robustness.{json,md}`` (``--smoke``: ``robustness_smoke.*``),
rewritten after every dataset. Exit code 0 when every run finished or was rejected and the
paths agree, 2 when they all finished or were rejected but some spread exceeds 1 %, 1 when
a run failed or a dataset could not be read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
import compare_scvi_tools as cst  # noqa: E402

SCRIPT = str(Path(__file__).resolve())
REAL = (
    "pbmc8k_200hvg",
    "cellbench_3cl_2tech",
    "zeisel_cortex_subset_1464x1000",
    "baron_pancreas_indrop_neuca",
    "worm_neuron_scirnaseq_scdeepcluster",
    "onek1k_pbmc_40donors_scdesignpop",
)
#: Simulated stress cases: name -> what it stresses (built by :func:`simulate`).
STRESS = {
    "stress_library_1e2_to_1e6": "1,000 cells x 500 genes, one batch, library sizes "
    "log-uniform from 10^2 to 10^6 counts per cell (deep ZINB data binomially thinned)",
    "stress_gene_30pct": "1,000 cells x 500 genes, gene 0 holds 30 % of every cell's "
    "counts (Poisson, 3/7 of the other genes' total)",
    "stress_20000_genes_10pct_zero": "300 cells x 20,000 genes (about 10^4 counts per "
    "cell), 2,000 random genes set to zero in every cell",
    "stress_60_cells": "60 cells x 500 genes",
    "stress_40_batches_of_50": "40 batches x 50 cells (2,000 cells) x 500 genes, batch "
    "effect sd 0.5 per gene",
    "stress_batch_of_2_cells": "two batches of about 300 cells and one of 2 cells, 500 "
    "genes, batch effect sd 0.5",
    # Not in the list: a data size, not a data defect. 10 % of 10,250 cells are
    # 1,025 validation cells, scored in minibatches of 1,024: the last holds one cell.
    "stress_1025_validation_cells": "10,250 cells x 200 genes: the validation pass's last "
    "minibatch (of 1,024 cells) holds one cell",
}
#: ``--smoke``: the two smallest cases, shrunk to 100 genes, 2 epochs, 2 paths, 1 seed.
SMOKE = {
    "datasets": ["stress_60_cells", "stress_batch_of_2_cells"],
    "seeds": [0],
    "paths": ["eager", "fused"],
    "threads": ["1"],
    "epochs": 2,
    "elbo_samples": 2,
}
PATHS = ("auto", "eager", "compiled", "fused", "pyro")
TOLERANCE = 0.01  # relative spread of the held-out ELBO across paths
STATUSES = ("finished", "rejected", "failed")


# ---------------------------------------------------------------------------- options
def parse_threads(token: str) -> str:
    """``1`` (any positive integer), ``all`` or ``auto``; kept as the label."""
    if token in ("all", "auto") or (token.isdigit() and int(token) >= 1):
        return token
    raise ValueError(f"--threads {token!r}: a positive integer, 'all' or 'auto'")


def expand_datasets(tokens: list[str]) -> list[str]:
    """Dataset names, with ``real`` and ``stress`` standing for their groups."""
    out: list[str] = []
    for token in tokens:
        name = token.removesuffix(".h5ad")
        group = {"real": list(REAL), "stress": list(STRESS)}.get(name, [name])
        out += [n for n in group if n not in out]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Robustness matrix: datasets x seeds x engine paths x threads, each run "
        "in its own process; every run must end with a finite validation ELBO and the paths "
        "must agree on the held-out ELBO within 1 %.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["real", "stress"],
        help="names of files in --data-dir (.h5ad optional) and/or stress cases ("
        + ", ".join(STRESS)
        + "); 'real' and 'stress' stand for all of each",
    )
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, help="engines")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds")
    p.add_argument(
        "--threads",
        nargs="+",
        default=["1", "all"],
        help="thread settings: a count, 'all' (this process's cores, pinned) or 'auto' "
        "(the engine follows the free cores)",
    )
    p.add_argument("--epochs", type=int, default=20, help="epochs per run")
    p.add_argument(
        "--elbo-samples", type=int, default=10, help="draws per cell for the held-out ELBO"
    )
    p.add_argument("--data-dir", type=Path, default=cst.DEFAULT_DATA_DIR, help=".h5ad folder")
    p.add_argument("--out", type=Path, default=cst.DEFAULT_OUT_DIR, help="results folder")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the datasets (and their runs) of the earlier results file in --out that "
        "this run does not redo, each marked with the run that measured it",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="2 tiny stress cases (100 genes), seed 0, paths eager and fused, 1 thread, "
        "2 epochs; writes robustness_smoke.*",
    )
    args = p.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    try:
        args.threads = [parse_threads(t) for t in args.threads]
    except ValueError as err:
        p.error(str(err))
    args.datasets = expand_datasets(args.datasets)
    unknown = [d for d in args.datasets if d.startswith("stress_") and d not in STRESS]
    if unknown:
        p.error(f"unknown stress cases {unknown}; choose from {', '.join(STRESS)}")
    if args.epochs < 1 or args.elbo_samples < 1:
        p.error("--epochs and --elbo-samples must be positive")
    args.paths = [x for x in PATHS if x in args.paths]
    return args


# ---------------------------------------------------------------------------- data
def simulate(name: str, smoke: bool = False) -> Any:
    """The stress case ``name`` (see :data:`STRESS`) as an AnnData of CSR integer counts.

    ``smoke`` shrinks it to 100 genes (and the batch-of-2 case to about 100 cells a batch).
    """
    import numpy as np
    import scipy.sparse as sp
    from pyro_scvi.datasets import synthetic_zinb

    genes = 100 if smoke else 500
    seed = list(STRESS).index(name)  # fixed, one per case
    rng = np.random.default_rng(1000 + seed)
    sim = {"n_clusters": 5, "seed": seed}
    if name == "stress_library_1e2_to_1e6":
        adata = synthetic_zinb(1000, genes, library_log_mean=math.log(2e6), **sim)
        x = adata.X.toarray()
        target = 10.0 ** rng.permutation(np.linspace(2, 6, adata.n_obs))
        x = rng.binomial(x, np.minimum(1.0, target / x.sum(1))[:, None])
    elif name == "stress_gene_30pct":
        adata = synthetic_zinb(1000, genes, **sim)
        x = adata.X.toarray()
        x[:, 0] = rng.poisson(3 / 7 * x[:, 1:].sum(1))
    elif name == "stress_20000_genes_10pct_zero":
        n_genes = 2000 if smoke else 20000
        adata = synthetic_zinb(300, n_genes, library_log_mean=math.log(1e4), **sim)
        x = adata.X.toarray()
        x[:, rng.choice(n_genes, n_genes // 10, replace=False)] = 0
    elif name == "stress_1025_validation_cells":
        adata = synthetic_zinb(10250, 40 if smoke else 200, **sim)
        x = adata.X.toarray()
    elif name == "stress_60_cells":
        adata = synthetic_zinb(60, genes, **sim)
        x = adata.X.toarray()
    elif name == "stress_40_batches_of_50":
        adata = synthetic_zinb(4000, genes, n_batches=40, batch_effect=0.5, **sim)
        batch = adata.obs["batch"].astype(str).to_numpy()
        keep = [np.flatnonzero(batch == b)[:50] for b in sorted(set(batch))]
        if min(len(k) for k in keep) < 50:
            raise RuntimeError("simulate more cells: a batch has fewer than 50")
        adata = adata[np.sort(np.concatenate(keep))].copy()
        x = adata.X.toarray()
    elif name == "stress_batch_of_2_cells":
        adata = synthetic_zinb(300 if smoke else 900, genes, n_batches=3, batch_effect=0.5, **sim)
        batch = adata.obs["batch"].astype(str).to_numpy()
        keep = np.flatnonzero(batch != "batch2")
        adata = adata[np.sort(np.concatenate([keep, np.flatnonzero(batch == "batch2")[:2]]))]
        adata = adata.copy()
        x = adata.X.toarray()
    else:
        raise ValueError(f"unknown stress case {name!r}")
    if name == "stress_library_1e2_to_1e6":  # depth groups are not batches here
        adata.obs["batch"] = "batch0"
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    adata.X = sp.csr_matrix(x.astype(np.int32))
    adata.uns.pop("simulation", None)
    adata.uns["source"] = f"benchmarks/robustness.py: {STRESS[name]}"
    return adata


def describe_data(adata: Any) -> dict[str, Any]:
    """What makes a dataset hard: shape, batches, sparsity, library range, extreme genes."""
    import numpy as np

    x = adata.X
    library = np.asarray(x.sum(1)).ravel()
    per_gene = np.asarray(x.sum(0)).ravel()
    batches = adata.obs["batch"].astype(str).value_counts()
    return {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_batches": int(len(batches)),
        "smallest_batch": int(batches.min()),
        "batch_key": cst.batch_key_for(adata),
        "zero_fraction": float(1 - x.nnz / (adata.n_obs * adata.n_vars)),
        "library_min": float(library.min()),
        "library_median": float(np.median(library)),
        "library_max": float(library.max()),
        "empty_cells": int((library == 0).sum()),
        "all_zero_genes": int((per_gene == 0).sum()),
        "top_gene_share": float(per_gene.max() / per_gene.sum()),
    }


def prepare_main(spec_json: str) -> int:
    """Worker mode ``--prepare``: simulate the stress cases to ``.h5ad``, describe all data."""
    import anndata

    spec = json.loads(spec_json)
    info: dict[str, Any] = {}
    for name in spec["datasets"]:
        start = time.perf_counter()
        try:
            if name in STRESS:
                adata = simulate(name, spec["smoke"])
                path = Path(spec["tmp"]) / f"{name}.h5ad"
                adata.write_h5ad(path)
            else:
                path = Path(spec["data_dir"]) / f"{name}.h5ad"
                adata = anndata.read_h5ad(path)
            info[name] = {
                "kind": "stress" if name in STRESS else "file",
                "h5ad": str(path),
                **describe_data(adata),
                "prepare_seconds": time.perf_counter() - start,
            }
            if name in STRESS:
                info[name]["description"] = STRESS[name]
        except Exception as err:  # a missing or unreadable file: its runs are skipped
            traceback.print_exc()
            info[name] = {"error": f"{type(err).__name__}: {err}"}
    _common.write_atomic(Path(spec["info"]), json.dumps(info, indent=2))
    return 0


# ---------------------------------------------------------------------------- worker
def engine_threads(token: str) -> int | None:
    """The ``Engine(threads=...)`` of a thread setting."""
    if token == "auto":
        return None
    if token == "all":
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(token)


def run_matrix_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One (dataset, seed, path, threads) run in this process (``--worker``)."""
    import anndata
    import numpy as np

    import pyro_scvi
    from pyro_scvi.train.engine import Engine

    adata = anndata.read_h5ad(spec["h5ad"])
    threads = engine_threads(spec["threads"])
    out: dict[str, Any] = {"engine_threads": threads}
    stage = "SCVI(...)"
    start = time.perf_counter()
    model = None
    try:
        model = pyro_scvi.SCVI(adata, batch_key=cst.batch_key_for(adata))
        stage = "train()"
        model.train(
            max_epochs=spec["epochs"],
            engine=Engine.preset(spec["path"], threads=threads),
            seed=spec["seed"],
            progress_bar=False,
        )
    except pyro_scvi.InputError as err:
        out.update(status="rejected", message=f"{stage}: {err}")
    except Exception as err:  # TrainingError (non-finite loss) or anything else
        # Pyro appends the trace's shapes to errors inside a model: keep the first line.
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        out.update(status="failed", message=f"{stage}: {type(err).__name__}: {first}")
        out["traceback"] = traceback.format_exc()
    out["train_seconds"] = time.perf_counter() - start
    if model is None:
        return out
    history = model.history
    out.update(
        engine=model.engine,
        epochs_run=len(history),
        validation_elbo_curve=[float(v) for v in history["validation_elbo"]],
        epoch_seconds=[float(v) for v in history["seconds"]],
        threads_per_epoch=[int(v) for v in history["threads"]],
        n_validation=len(model.validation_indices),
    )
    if len(history):
        out["validation_elbo"] = float(history["validation_elbo"].iloc[-1])
        out["train_elbo"] = float(history["train_elbo"].iloc[-1])
    if "status" in out:
        return out
    try:
        held_out = adata[model.validation_indices].copy()
        stats = model.get_fit_statistics(held_out, n_samples=spec["elbo_samples"], seed=0)
        out["heldout_elbo"] = float(stats["elbo"].mean())
        out["heldout_marginal_ll"] = float(stats["marginal_ll"].mean())
    except Exception as err:
        out.update(status="failed", message=f"held-out ELBO: {type(err).__name__}: {err}")
        out["traceback"] = traceback.format_exc()
        return out
    values = [out.get("validation_elbo", math.nan), out["heldout_elbo"]]
    if np.isfinite(values).all():
        out["status"] = "finished"
    else:
        out.update(status="failed", message=f"non-finite ELBO: validation, held-out = {values}")
    return out


# ---------------------------------------------------------------------------- parent
def run_one(ds: dict[str, Any], seed: int, path: str, threads: str, args, tmp: Path) -> dict:
    """One worker subprocess and its outcome."""
    spec = {
        "h5ad": ds["h5ad"],
        "seed": seed,
        "path": path,
        "threads": threads,
        "epochs": args.epochs,
        "elbo_samples": args.elbo_samples,
        "result": str(tmp / f"result_{ds['name']}_{seed}_{path}_{threads}.json"),
    }
    env_threads = int(threads) if threads.isdigit() else None
    run = cst.spawn_worker(spec, env_threads, script=SCRIPT)
    if "error" in run:  # the worker died or raised outside run_matrix_worker
        run.update(status="failed", message=run["error"])
    return {"dataset": ds["name"], "seed": seed, "path": path, "threads": threads, **run}


def engine_label(engine: dict[str, Any] | None) -> str:
    """``compiled + fused kernel + fused Adam``-style summary of a resolved engine."""
    if not engine:
        return "—"
    parts = ["compiled" if engine["compiled"] else "eager"]
    if engine["fused_kernel"]:
        parts.append("fused kernel")
    parts.append("fused Adam" if engine["fused_adam"] else "Pyro Adam")
    return " + ".join(parts)


def progress_line(run: dict[str, Any], k: int, total: int) -> str:
    """One line per run for the log."""
    head = f"  [{k}/{total}] seed {run['seed']} threads {run['threads']} {run['path']}:"
    wall = f"{run.get('worker_wall_seconds', 0):.1f} s"
    if run["status"] == "finished":
        return (
            f"{head} finished, val ELBO {run['validation_elbo']:.2f}, held-out ELBO "
            f"{run['heldout_elbo']:.2f}, {engine_label(run.get('engine'))}, {wall}"
        )
    return f"{head} {run['status'].upper()}: {run.get('message')} ({wall})"


def relative_spread(values: list[float]) -> float | None:
    """``(max - min) / |mean|`` of at least two values, else ``None``."""
    if len(values) < 2:
        return None
    mean = statistics.fmean(values)
    return (max(values) - min(values)) / abs(mean) if mean else math.inf


def spreads(runs: list[dict[str, Any]], over: str, keys: tuple[str, ...]) -> list[dict]:
    """Relative spread of both ELBOs over ``over`` (a run field), per group of the others."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        if r["status"] == "finished":
            groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, members in groups.items():
        row = dict(zip(keys, key, strict=True))
        row[over] = [r[over] for r in members]
        for col in ("validation_elbo", "heldout_elbo"):
            row[col] = [r[col] for r in members]
            row[f"{col}_spread"] = relative_spread(row[col])
        out.append(row)
    return out


def auto_matches(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished ``auto`` run beside the preset run it resolved to (same seed, threads).

    Same seed, same choices: a reproducible path gives the same numbers.
    """
    presets = {"eager": (False, False, True), "compiled": (True, False, True)}
    presets |= {"fused": (True, True, True), "pyro": (False, False, False)}
    done = {
        (r["dataset"], r["seed"], r["threads"], r["path"]): r
        for r in runs
        if r["status"] == "finished"
    }
    out = []
    for (dataset, seed, threads, path), r in done.items():
        if path != "auto":
            continue
        e = r["engine"]
        choice = (e["compiled"], e["fused_kernel"], e["fused_adam"])
        twin = next((p for p, c in presets.items() if c == choice), None)
        other = done.get((dataset, seed, threads, twin))
        row = {"dataset": dataset, "seed": seed, "threads": threads, "resolved": twin}
        if other is not None:
            row["abs_diff_validation_elbo"] = abs(r["validation_elbo"] - other["validation_elbo"])
            row["abs_diff_heldout_elbo"] = abs(r["heldout_elbo"] - other["heldout_elbo"])
        out.append(row)
    return out


def counts(runs: list[dict[str, Any]], field: str) -> dict[str, dict[str, int]]:
    """Finished / rejected / failed / total runs per value of ``field``."""
    out: dict[str, dict[str, int]] = {}
    for r in runs:
        c = out.setdefault(str(r[field]), {s: 0 for s in (*STATUSES, "total")})
        c[r["status"]] += 1
        c["total"] += 1
    return out


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Completion counts, spreads across paths / seeds / threads, the agreement verdict."""
    runs = results["runs"]
    across_paths = spreads(runs, "path", ("dataset", "seed", "threads"))
    worst = [r["heldout_elbo_spread"] for r in across_paths if r["heldout_elbo_spread"]]
    worst_val = [r["validation_elbo_spread"] for r in across_paths if r["validation_elbo_spread"]]
    return {
        "by_path": counts(runs, "path"),
        "by_dataset": counts(runs, "dataset"),
        "by_threads": counts(runs, "threads"),
        "across_paths": across_paths,
        "across_seeds": spreads(runs, "seed", ("dataset", "path", "threads")),
        "across_threads": spreads(runs, "threads", ("dataset", "seed", "path")),
        "auto_vs_preset": auto_matches(runs),
        "max_heldout_spread_across_paths": max(worst, default=None),
        "max_validation_spread_across_paths": max(worst_val, default=None),
        "paths_agree": all(s <= TOLERANCE for s in worst),
        "n_runs": len(runs),
        "n_finished": sum(r["status"] == "finished" for r in runs),
        "n_rejected": sum(r["status"] == "rejected" for r in runs),
        "n_failed": sum(r["status"] == "failed" for r in runs),
    }


def run_matrix(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Prepare the data, run every (dataset, threads, seed, path) in turn, write tables."""
    start = time.perf_counter()
    results: dict[str, Any] = {
        **_common.run_metadata(argv, None, script="robustness.py"),
        "settings": {
            "datasets": args.datasets,
            "paths": args.paths,
            "seeds": args.seeds,
            "threads": args.threads,
            "epochs": args.epochs,
            "elbo_samples": args.elbo_samples,
            "tolerance": TOLERANCE,
            "smoke": args.smoke,
            "data_dir": str(args.data_dir),
            "order": "dataset, then threads, then seed, then path",
        },
        "notes": NOTES,
        "datasets": [],
        "runs": [],
    }
    stem = "robustness" + ("_smoke" if args.smoke else "")
    if args.merge:
        results["datasets"], results["runs"] = earlier_results(
            args.out / f"{stem}.json", set(args.datasets)
        )
    n_total = len(args.datasets) * len(args.seeds) * len(args.paths) * len(args.threads)
    with tempfile.TemporaryDirectory(prefix="robustness_") as tmp:
        spec = {"datasets": args.datasets, "data_dir": str(args.data_dir), "tmp": tmp}
        spec |= {"smoke": args.smoke, "info": str(Path(tmp) / "info.json")}
        print(f"Preparing {len(args.datasets)} datasets ...", file=sys.stderr, flush=True)
        rc = cst._subprocess("--prepare", spec, None, script=SCRIPT)
        info_path = Path(spec["info"])
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        k = 0
        for name in args.datasets:
            ds = {"name": name, **info.get(name, {"error": f"--prepare exited with {rc}"})}
            results["datasets"].append({key: v for key, v in ds.items() if key != "h5ad"})
            print(f"{name}: {_data_line(ds)}", file=sys.stderr, flush=True)
            if "error" in ds:
                k += len(args.seeds) * len(args.paths) * len(args.threads)
                continue
            for threads in args.threads:
                for seed in args.seeds:
                    for path in args.paths:
                        k += 1
                        results["planned_runs"] = {"done": k - 1, "total": n_total}
                        run = run_one(ds, seed, path, threads, args, Path(tmp))
                        results["runs"].append(cst._finite(run))
                        print(progress_line(run, k, n_total), file=sys.stderr, flush=True)
            results["planned_runs"] = {"done": k, "total": n_total}
            results["summary"] = summarize(results)
            results["total_seconds"] = time.perf_counter() - start
            # Both files after every dataset, so that a run cut short leaves its tables.
            _common.write_results(args.out, stem, results, markdown_table(results))
    results["total_seconds"] = time.perf_counter() - start
    results["summary"] = summarize(results)
    table = markdown_table(results)
    print(table)
    _common.write_results(args.out, stem, results, table)
    s = results["summary"]
    if s["n_failed"] or any("error" in d for d in results["datasets"]):
        return 1
    return 0 if s["paths_agree"] else 2


def earlier_results(path: Path, redone: set[str]) -> tuple[list[dict], list[dict]]:
    """``--merge``: the datasets of the results file ``path`` not in ``redone``, and their
    runs, each marked ``from_run`` with the run that measured it."""
    if not path.exists():
        return [], []
    earlier = json.loads(path.read_text())
    datasets = _common.keep_not_redone(earlier["datasets"], redone, "name", earlier)
    runs = _common.keep_not_redone(earlier["runs"], redone, "dataset", earlier)
    return datasets, runs


# ---------------------------------------------------------------------------- output
NOTES = [
    "finished: training ended and the validation ELBO of the last epoch and the held-out "
    "ELBO are finite. rejected: pyro_scvi.InputError (bad input; the message names the "
    "fix), not a failure. failed: TrainingError (non-finite loss), any other exception, a "
    "non-finite ELBO or a worker that died.",
    "val ELBO: history['validation_elbo'] of the last epoch (one draw per cell, the path's "
    "own density). held-out ELBO: SCVI.get_fit_statistics(validation cells, n_samples=K, "
    "seed=0)['elbo'] averaged over cells (K draws per cell, eager density, one estimator "
    "for every path). Nats per cell, higher is better. The validation cells are the 10 % "
    "the seed picks, the same for all paths and thread settings of one seed.",
    "spread = (max - min) / |mean| over the finished runs of the group, in %. Across paths: "
    "per (dataset, seed, threads), the agreement criterion (held-out ELBO at most 1 %). "
    "Across seeds: per (dataset, path, threads), the yardstick (seeds change the "
    "initialization, the minibatches and the validation cells). Across threads: per "
    "(dataset, seed, path); thread counts change only the order of floating-point sums.",
    "Paths may draw other random numbers or round differently (compiled graphs, the fused "
    "kernel), so they are different training trajectories of the same estimator.",
    "auto: Engine.preset('auto'), the default; the engine it resolved to is compared with "
    "the preset of the same choices (same seed and threads), where that preset ran.",
]


def _data_line(ds: dict[str, Any]) -> str:
    if "error" in ds:
        return f"SKIPPED: {ds['error']}"
    return (
        f"{ds['n_cells']} cells x {ds['n_genes']} genes, {ds['n_batches']} batch(es) "
        f"(smallest {ds['smallest_batch']}), {100 * ds['zero_fraction']:.1f}% zeros, "
        f"library {ds['library_min']:.0f}-{ds['library_max']:.0f}, "
        f"{ds['all_zero_genes']} all-zero genes, top gene {100 * ds['top_gene_share']:.1f}% "
        "of counts"
    )


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def _count_cells(c: dict[str, int]) -> str:
    return f"{c['finished']}/{c['total']} | {c['rejected']} | {c['failed']}"


def markdown_table(results: dict[str, Any]) -> str:
    """Completion per path and per dataset, the spreads, failures and rejections."""
    s, sm = results["settings"], results["summary"]
    fmt = cst._fmt
    lines = cst.table_header(
        results,
        "Robustness matrix: datasets x seeds x engine paths x threads",
        f"Every run in its own process; {s['epochs']} epochs, seeds {s['seeds']}, paths "
        f"{', '.join(s['paths'])}, threads {', '.join(s['threads'])}; {sm['n_finished']} of "
        f"{sm['n_runs']} runs finished, {sm['n_rejected']} rejected, {sm['n_failed']} failed",
    )
    worst = sm["max_heldout_spread_across_paths"]
    lines += [
        f"**Paths agree on the held-out ELBO within {100 * TOLERANCE:g} %: "
        f"{'yes' if sm['paths_agree'] else 'NO'}** (largest spread across paths "
        f"{_pct(worst)} %; val ELBO {_pct(sm['max_validation_spread_across_paths'])} %).",
        "",
        "## Runs finished, per path",
        "",
        "| path | finished/total | rejected | failed |",
        "|---|---:|---:|---:|",
        *(f"| {p} | {_count_cells(c)} |" for p, c in sm["by_path"].items()),
        "",
        "## Runs finished, per dataset",
        "",
        "| dataset | cells x genes | batches (smallest) | zeros % | library min-max "
        "| finished/total | rejected | failed | auto resolved to |",
        "|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for d in results["datasets"]:
        c = sm["by_dataset"].get(d["name"], {x: 0 for x in (*STATUSES, "total")})
        if "error" in d:
            lines.append(f"| {d['name']} | {d['error']} | | | | 0/0 | | | |")
            continue
        autos = sorted(
            {
                engine_label(r.get("engine"))
                for r in results["runs"]
                if r["dataset"] == d["name"] and r["path"] == "auto" and r.get("engine")
            }
        )
        lines.append(
            f"| {d['name']} | {d['n_cells']} x {d['n_genes']} | {d['n_batches']} "
            f"({d['smallest_batch']}) | {100 * d['zero_fraction']:.1f} "
            f"| {d['library_min']:.0f}-{d['library_max']:.0f} "
            + f"| {_count_cells(c)} | {' / '.join(autos) or '—'} |"
        )
    lines += [
        "",
        "## Held-out ELBO across paths (per dataset, threads, seed)",
        "",
        "| dataset | threads | seed | val ELBO per path | spread % | held-out ELBO per path "
        f"| spread % | ≤ {100 * TOLERANCE:g} % |",
        "|---|---|---:|---|---:|---|---:|---|",
    ]
    for r in sm["across_paths"]:
        paths = " / ".join(r["path"])
        spread = r["heldout_elbo_spread"]
        ok = "—" if spread is None else ("yes" if spread <= TOLERANCE else "**no**")
        lines.append(
            f"| {r['dataset']} | {r['threads']} | {r['seed']} "
            f"| {paths}: {' / '.join(fmt(v, '.2f') for v in r['validation_elbo'])} "
            f"| {_pct(r['validation_elbo_spread'])} "
            f"| {' / '.join(fmt(v, '.2f') for v in r['heldout_elbo'])} | {_pct(spread)} | {ok} |"
        )
    lines += [
        "",
        "## Yardstick: spread across seeds of one path (per dataset, threads, path)",
        "",
    ]
    by_seeds = [r for r in sm["across_seeds"] if len(r["seed"]) > 1]
    if not by_seeds:
        lines.append("Fewer than two seeds finished per path: no yardstick.")
    else:
        lines += [
            "| dataset | threads | path | seeds | val ELBO spread % | held-out ELBO spread % |",
            "|---|---|---|---|---:|---:|",
        ]
    for r in by_seeds:
        lines.append(
            f"| {r['dataset']} | {r['threads']} | {r['path']} | {r['seed']} "
            f"| {_pct(r['validation_elbo_spread'])} | {_pct(r['heldout_elbo_spread'])} |"
        )
    if any(len(r["threads"]) > 1 for r in sm["across_threads"]):
        lines += [
            "",
            "## Spread across thread settings (per dataset, seed, path)",
            "",
            "| dataset | seed | path | threads | val ELBO spread % | held-out ELBO spread % |",
            "|---|---:|---|---|---:|---:|",
        ]
        for r in (r for r in sm["across_threads"] if len(r["threads"]) > 1):
            lines.append(
                f"| {r['dataset']} | {r['seed']} | {r['path']} | {', '.join(r['threads'])} "
                f"| {_pct(r['validation_elbo_spread'])} | {_pct(r['heldout_elbo_spread'])} |"
            )
    matched = [r for r in sm["auto_vs_preset"] if "abs_diff_heldout_elbo" in r]
    if matched:
        lines += [
            "",
            "## auto beside the preset it resolved to (same seed and threads)",
            "",
            "| dataset | threads | seed | resolved to | abs. diff val ELBO | abs. diff held-out |",
            "|---|---|---:|---|---:|---:|",
        ]
        for r in matched:
            lines.append(
                f"| {r['dataset']} | {r['threads']} | {r['seed']} | {r['resolved']} "
                f"| {r['abs_diff_validation_elbo']:.3g} | {r['abs_diff_heldout_elbo']:.3g} |"
            )
    problems = [r for r in results["runs"] if r["status"] != "finished"]
    lines += ["", "## Failures and rejections", ""]
    if not problems:
        lines.append("None.")
    for r in problems:
        lines.append(
            f"- {r['status']}: {r['dataset']}, seed {r['seed']}, path {r['path']}, threads "
            f"{r['threads']}: {str(r.get('message')).replace(chr(10), ' ')}"
        )
    planned = results.get("planned_runs")
    if planned and planned["done"] < planned["total"]:
        lines.insert(
            lines.index("## Runs finished, per path") - 1,
            f"\n**In progress**: {planned['done']} of this command's {planned['total']} runs "
            "so far; the tables hold what has finished.",
        )
    merged = [d for d in results["datasets"] if "from_run" in d]
    extra = [
        f"{d['name']}: kept from an earlier run (--merge): `{d['from_run']['command']}` at "
        f"commit {d['from_run']['commit']}, {d['from_run']['date']}."
        for d in merged
    ]
    notes = [*results["notes"], *extra]
    lines += ["", "## Notes", "", *(f"- {note}" for note in notes), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the matrix (or, with ``--worker`` / ``--prepare``, one part of it)."""
    raw = sys.argv[1:] if argv is None else argv
    if len(raw) == 2 and raw[0] == "--worker":
        return cst.worker_main(raw[1], run_matrix_worker)
    if len(raw) == 2 and raw[0] == "--prepare":
        return prepare_main(raw[1])
    return run_matrix(parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
