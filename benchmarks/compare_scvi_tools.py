"""pyro_scvi vs scvi-tools 1.4.2 vs the PyTorch floor, every setting matched, side by side.

The adapters with ``matched=True``. Usage, options and columns: ``benchmarks/README.md``.

    python -m benchmarks.compare_scvi_tools            # about 30 minutes on 2 cores
    python -m benchmarks.compare_scvi_tools --smoke    # about a minute
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .lib import adapters, data, results, score, workers
from .lib.results import fmt

STUDY = "compare_scvi_tools"
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools", "torch-floor")
DATASETS = (
    "zeisel_cortex_subset_1464x1000 pbmc8k_200hvg cellbench_3cl_2tech synthetic:10000x2000 "
    "synthetic:100000x2000"
).split()
SYNTHETIC_EPOCHS = ("10000x2000=20", "100000x2000=3", "20")
SMOKE = dict(max_epochs=2, subsample=300, ll_samples=10, ll_cells=100, elbo_samples=2)
SMOKE |= dict(impute_samples=5, repeats=1)
KEYS = (
    "seconds_per_epoch first_epoch_seconds median_epoch_seconds train_cells_per_second "
    "peak_rss_mib peak_minus_baseline_mib ari nmi silhouette_label entropy_batch_mixing "
    "batch_silhouette validation_elbo_per_cell common_validation_elbo_per_cell "
    "common_train_elbo_per_cell marginal_ll_per_cell own_marginal_ll_per_cell "
    "imputation_median_l1 imputation_knn_median_l1"
).split()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p, add = results.parser(__doc__, "300 cells of the first real dataset, 2 epochs")
    add("--datasets", nargs="+", default=list(DATASETS), help="names and synthetic:CxG")
    add("--max-epochs", type=int, default=100, help="epochs on real datasets")
    add("--synthetic-epochs", nargs="+", default=list(SYNTHETIC_EPOCHS), help="CxG=E, or E")
    add("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS)
    add("--repeats", type=int, default=1)
    add("--seed", type=int, default=0, help="seed of repeat 0 and of the simulated data")
    add("--threads", type=int, default=1, help="torch threads of every run")
    add("--subsample", type=int, default=None, help="random cells per real dataset")
    add("--imputation", choices=("auto", "on", "off"), default="auto", help="auto: real data")
    add("--metric-cells", type=int, default=10000)
    add("--eval-cells", type=int, default=10000, help="cells for the common ELBO")
    add("--ll-cells", type=int, default=1000)
    add("--ll-samples", type=int, default=100)
    add("--elbo-samples", type=int, default=10)
    add("--impute-samples", type=int, default=25)
    args = p.parse_args(argv)
    if args.smoke:
        real = [d for d in args.datasets if not d.startswith("synthetic:")]
        args.datasets = real[:1] + ["synthetic:300x100"]
        vars(args).update(SMOKE, synthetic_epochs=[str(SMOKE["max_epochs"])])
    try:
        args.specs = [data.parse(d) for d in args.datasets]
        args.per_size = dict(e.split("=") for e in args.synthetic_epochs if "=" in e)
        args.other_size = next((e for e in args.synthetic_epochs if "=" not in e), None)
    except ValueError as err:
        p.error(str(err))
    args.implementations = [i for i in IMPLEMENTATIONS if i in args.implementations]
    return args


def epochs_for(ds: dict[str, Any], args: argparse.Namespace) -> int:
    if ds["kind"] == "file":
        return args.max_epochs
    return int(args.per_size.get(ds["size"], args.other_size or args.max_epochs))


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One implementation trained on one dataset in this process, then scored."""
    start = time.perf_counter()
    import gc

    import anndata
    import numpy as np
    import torch

    import pyro_scvi  # noqa: F401 -- imported before the memory baseline

    impl, seed, threads = spec["implementation"], spec["seed"], spec["threads"]
    torch.set_num_threads(threads)
    if impl == "scvi-tools":
        adapters.quiet_scvi_tools()
    adata = anndata.read_h5ad(spec["h5ad"])
    split = data.make_split(adata.n_obs, seed)
    gc.collect()
    memory = {"rss_baseline_mib": workers.status_mib("VmRSS")}
    memory["peak_reset_at_baseline"] = workers.reset_peak_rss()
    kw = {"matched": True, "seed": seed, "threads": threads}
    fit = adapters.ADAPTERS[impl](adata, spec["batch_key"], **kw)
    fit.fit(spec["epochs"], split)
    memory["peak_rss_mib"] = workers.peak_rss_mib()
    if memory["rss_baseline_mib"] is not None:
        memory["peak_minus_baseline_mib"] = memory["peak_rss_mib"] - memory["rss_baseline_mib"]
    run = {k: v for k, v in fit.run.items() if k != "train_done_at"} | memory
    run["seconds_per_epoch"] = run["train_seconds"] / run["epochs_run"]
    run["train_cells_per_second"] = run["n_train"] / run["seconds_per_epoch"]
    run |= workers.steady_state(run["epoch_seconds"])
    latent, errors, t = fit.latent(), {}, time.perf_counter()
    if impl == "scvi-tools":  # the renaming must give back scvi-tools' own latent space
        renamed = fit.as_pyro_scvi().get_latent_representation()
        run["conversion_latent_max_abs_diff"] = float(np.abs(renamed - latent).max())
    cells = data.some_cells(np.arange(adata.n_obs), spec["metric_cells"], seed)
    run["metric_cells"] = len(cells)
    scores = workers.attempt(errors, "metrics", score.latent_scores, latent, adata, cells, seed)
    run |= scores or {}
    for name, part in (("validation", split[1]), ("train", split[0])):
        cells, k = data.some_cells(part, spec["eval_cells"], seed), spec["elbo_samples"]
        run[f"common_{name}_elbo_cells"] = len(cells)
        value = workers.attempt(errors, "common_elbo", fit.common_elbo, cells, k, seed)
        run[f"common_{name}_elbo_per_cell"] = value
    cells, k = data.some_cells(split[1], spec["ll_cells"], seed), spec["ll_samples"]
    run |= {"marginal_ll_cells": len(cells), "marginal_ll_samples": k}
    value = workers.attempt(errors, "marginal_ll", fit.common_marginal_ll, cells, k, seed)
    run["marginal_ll_per_cell"] = run["own_marginal_ll_per_cell"] = value
    if impl == "scvi-tools":  # only scvi-tools' own estimator is another
        own = workers.attempt(errors, "own_marginal_ll", fit.marginal_ll, cells, k, seed)
        run["own_marginal_ll_per_cell"] = own
    run["scoring_seconds"] = time.perf_counter() - t
    if spec["imputation"] and impl != "torch-floor":
        run |= workers.attempt(errors, "imputation", imputation, impl, adata, spec, split) or {}
    for stage, message in errors.items():
        print(f"  {impl}: {stage} failed: {message}", file=sys.stderr)
    run |= {"errors": errors} if errors else {}
    return run | {"worker_seconds": time.perf_counter() - start}


def imputation(impl: str, adata: Any, spec: dict[str, Any], split: Any) -> dict[str, Any]:
    """A second fit on the counts with 10 % of the non-zero entries set to 0; median L1 of
    its expected counts exp(l) * rho at the latent library on those entries, and of kNN
    smoothing in PCA space (:func:`.score.knn_impute`) on the same entries."""
    seed, start = spec["seed"], time.perf_counter()
    hidden_data, x, hidden = score.corrupted(adata, "uniform", 0.1, seed)
    fit = adapters.ADAPTERS[impl](hidden_data, spec["batch_key"], matched=True, seed=seed)
    pred = fit.fit(spec["epochs"], split).impute(hidden_data, spec["impute_samples"], seed)
    errors = score.imputation_errors(pred, x, hidden)
    knn = score.imputation_errors(score.knn_impute(hidden_data.X.toarray(), seed), x, hidden)
    out = {f"imputation_{k}_l1": errors[f"{k}_abs_error"] for k in ("median", "mean")}
    out |= {"imputation_knn_median_l1": knn["median_abs_error"]}
    out |= {"imputation_hidden_entries": len(hidden[0])}
    out |= {"imputation_train_seconds": fit.run["train_seconds"]}
    return out | {"imputation_seconds": time.perf_counter() - start}


SPEC_KEYS = ("threads", "metric_cells", "eval_cells", "ll_cells", "ll_samples", "elbo_samples")


def run_dataset(ds: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Prepare one dataset, run every implementation and repeat, summarize."""
    auto = args.imputation == "auto" and ds["kind"] == "file"
    entry = {k: ds[k] for k in ("name", "spec", "kind")} | {"epochs": epochs_for(ds, args)}
    entry["imputation"] = args.imputation == "on" or auto
    folder = args.data_dir and str(args.data_dir)
    more = {"data_dir": folder, "subsample": args.subsample, "seed": args.seed}
    info = workers.prepare(STUDY, ds["spec"], tmp, args.threads, **more)
    if "error" in info:
        print(f"  {info['error']}", file=sys.stderr)
        return entry | {"error": info["error"], "runs": [], "summary": {}}
    entry |= info
    missing = adapters.skipped(args.implementations)
    entry["runs"] = [{"implementation": i, "repeat": None, "error": e} for i, e in missing.items()]
    spec = {k: getattr(args, k) for k in (*SPEC_KEYS, "impute_samples")}
    spec |= {k: entry[k] for k in ("h5ad", "batch_key", "epochs", "imputation")}
    for repeat in range(args.repeats):
        for impl in workers.rotate([i for i in args.implementations if i not in missing], repeat):
            seed = args.seed + repeat
            run = {"implementation": impl, "repeat": repeat, "seed": seed}
            more = {"implementation": impl, "seed": seed, "result": str(tmp / "result.json")}
            run |= workers.spawn(STUDY, "--worker", spec | more, args.threads)
            entry["runs"].append(run)
            print(f"  {impl:11s} repeat {repeat}: {describe(run)}", file=sys.stderr, flush=True)
    Path(entry.pop("h5ad")).unlink(missing_ok=True)
    entry["summary"] = workers.summarize(entry["runs"], args.implementations, KEYS)
    return entry


def describe(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"FAILED: {run['error']}"
    own, common = run.get("validation_elbo_per_cell"), run.get("common_validation_elbo_per_cell")
    return (
        f"{run['seconds_per_epoch']:.3f} s/epoch, peak {run['peak_rss_mib']:.0f} MiB, ARI "
        f"{fmt(run.get('ari'))}, val ELBO {fmt(own, '.2f')} (own) {fmt(common, '.2f')} "
        f"(common), log p(x) {fmt(run.get('marginal_ll_per_cell'), '.2f')}, imputation L1 "
        f"{fmt(run.get('imputation_median_l1'))}, errors in {sorted(run.get('errors', {}))}"
    )


def markdown(res: dict[str, Any]) -> str:
    s, impls = res["settings"], res["settings"]["implementations"]
    how = (
        f"Matched settings (benchmarks/lib/adapters.py), torch threads {s['threads']}, "
        f"every run in its own process, medians of {s['repeats']} repeat(s)"
        + (f", real datasets subsampled to {s['subsample']} cells" if s["subsample"] else "")
        + (f"; {res['total_seconds'] / 60:.1f} minutes in all." if "total_seconds" in res else ".")
    )
    lines = results.header(res, "pyro_scvi vs scvi-tools vs a pure-PyTorch floor", how)
    lines += [f"- **{d['name']}**: {d['error']}" for d in res["datasets"] if "error" in d]
    speed, ratios, accuracy = [], [], []
    for d in (d for d in res["datasets"] if "error" not in d):
        sm, batches = d["summary"], f" ({d['n_batches']} batches)" * (d["n_batches"] > 1)
        head = [d["name"], f"{d['n_cells']} x {d['n_genes']}{batches}", d["epochs"]]
        base = [sm.get(i, {}).get("seconds_per_epoch") for i in ("scvi-tools", "torch-floor")]
        for impl in impls:
            m, t = sm[impl], sm[impl]["seconds_per_epoch"]
            if t is None:
                speed.append([*head, impl, m.get("error", "failed"), *[""] * 5])
                continue
            cols = [fmt(m[k], ".0f") for k in KEYS[3:6]]
            ratio = [fmt(b and t / b, ".2f") for b in base]
            speed.append([*head, impl, f"{t:.3f}", *cols, *ratio])
            specs = [".2f" if "elbo" in k or "_ll" in k else ".3f" for k in KEYS[6:]]
            values = [fmt(m.get(k), f) for k, f in zip(KEYS[6:], specs, strict=True)]
            accuracy.append([d["name"], impl, *values])
        fused = [[r.get("fused_kernel_used") for r in d["runs"] if r["implementation"] == i]
                 for i in ("pyro_scvi", "torch-floor")]  # fmt: skip
        each = [
            " / ".join(fmt(sm.get(i, {}).get(k), f) for i in IMPLEMENTATIONS)
            for k, f in (("first_epoch_seconds", ".2f"), ("median_epoch_seconds", ".3f"))
        ]
        ratio = [fmt(sm[k], ".2f") for k in workers.RATIOS]
        ratios.append([d["name"], *ratio[:4], *each, *ratio[4:], " / ".join(map(yes_no, fused))])
    lines += ["## Speed and memory", "", *results.md_table(SPEED, speed), ""]
    lines += [*results.md_table(RATIO_COLUMNS, ratios), "", "## Accuracy", ""]
    lines += [*results.md_table(ACCURACY, accuracy), ""]
    lines.append(
        f"Common estimators: pyro_scvi's `get_elbo` ({s['elbo_samples']} draws, at most "
        f"{s['eval_cells']} cells) and `get_marginal_ll` (K = {s['ll_samples']}, at most "
        f"{s['ll_cells']} validation cells) of every fit, scvi-tools' weights renamed into a "
        "pyro_scvi model. benchmarks/README.md explains every column."
    )
    return "\n".join([*lines, ""])


SPEED = (
    "dataset|cells x genes|epochs:|implementation|s / epoch:|train cells / s:|peak RSS (MiB):|"
    "peak - baseline (MiB):|time ÷ scvi-tools:|time ÷ torch-floor:"
)
RATIO_COLUMNS = (
    "dataset|pyro_scvi time ÷ scvi-tools time:|pyro_scvi speed-up vs scvi-tools (x):|"
    "pyro_scvi time ÷ torch-floor time:|scvi-tools time ÷ torch-floor time:|first epoch s "
    "(pyro_scvi / scvi-tools / floor)|median epoch s (same)|steady speed-up vs scvi-tools (x):|"
    "steady pyro_scvi ÷ floor:|fused ZINB kernel (pyro_scvi / floor)"
)
ACCURACY = (
    "dataset|implementation|ARI:|NMI:|silhouette (label):|batch entropy:|batch silhouette:|"
    "val ELBO (own):|val ELBO (common):|train ELBO (common):|val log p(x) (common):|"
    "val log p(x) (own):|imputation median L1:|kNN (PCA) median L1:"
)


def yes_no(flags: list[Any]) -> str:
    known = [f for f in flags if f is not None]
    return "—" if not known else "yes" if all(known) else "no" if not any(known) else "mixed"


def main(argv: list[str] | None = None) -> int:
    if (rc := workers.main(argv, worker=worker)) is not None:
        return rc
    args = parse_args(argv)
    start, stem = time.perf_counter(), results.stem(STUDY, args.smoke)
    hidden = ("specs", "per_size", "other_size")
    settings = {k: v for k, v in vars(args).items() if k not in hidden}
    settings |= {"matched": adapters.MATCHED | adapters.TRAINING, "synthetic": data.SYNTHETIC}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.threads)}
    res |= {"settings": settings, "datasets": []}
    if {"pyro_scvi", "torch-floor"} & set(args.implementations):
        t = time.perf_counter()
        rc = workers.spawn(STUDY, "--warm-kernel", {}, args.threads)["exit_code"]
        res["warm_kernel_cache_seconds"] = time.perf_counter() - t
        res["warm_kernel_cache_exit_code"] = rc
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as tmp:
        for ds in args.specs:
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            res["datasets"].append(run_dataset(ds, args, Path(tmp)))
            results.write(args.out_dir, stem, res)  # partial results survive a crash
    res["total_seconds"] = time.perf_counter() - start
    results.publish(args.out_dir, stem, res, markdown(res))
    return 1 if any("error" in d for d in res["datasets"]) else 0


if __name__ == "__main__":
    sys.exit(main())
