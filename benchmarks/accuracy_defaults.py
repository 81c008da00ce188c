"""Accuracy at the user's defaults: pyro_scvi vs scvi-tools 1.4.2 on every shared dataset.

Exit code 0: every criterion met; 2: a criterion not met; 1: a failure. Details:
``benchmarks/README.md``.

    python -m benchmarks.accuracy_defaults            # every dataset x seeds 0 1 2
    python -m benchmarks.accuracy_defaults --smoke    # about 30 s
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

STUDY = "accuracy_defaults"
OBSERVED = "pyro_scvi-observed-library"
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools", OBSERVED)
#: pyro_scvi - scvi-tools must be at least these
TOLERANCES = {"ari": -0.02, "entropy_batch_mixing": -0.05, "heldout_log_px_per_cell": 0.0}
CRITERIA = {
    "ari": "KMeans ARI ≥ scvi-tools − 0.02",
    "entropy_batch_mixing": "batch entropy ≥ scvi-tools − 0.05",
    "heldout_log_px_per_cell": "held-out log p(x) ≥ scvi-tools",
}
KEYS = ("ari", "nmi", "entropy_batch_mixing", "heldout_log_px_per_cell", "train_seconds")
KEYS += ("heldout_log_px_given_library_per_cell", "seconds_per_epoch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    merge = "keep the file's datasets this run does not redo"
    p, add = results.parser(__doc__, "cellbench, 300 cells, 1 epoch, seed 0", merge=merge)
    add("--epochs", type=int, default=100)
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--datasets", nargs="+", help="names (default: every .h5ad in the data folder)")
    add("--threads", default="1", help="'default' (set none) or a count for every run")
    add("--subsample", type=int, default=None, help="random cells per dataset")
    add("--metric-cells", type=int, default=10000)
    add("--ll-cells", type=int, default=10000, help="at most this many held-out cells")
    add("--ll-samples", type=int, default=100)
    add("--reuse-reference", action="store_true", help="reuse scvi-tools runs measured alike")
    add("--observed-library", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.smoke:
        found = data.available("cellbench_3cl_2tech", args.data_dir)
        args.datasets = args.datasets or ["cellbench_3cl_2tech" if found else "synthetic:300x100"]
        args.subsample, args.epochs, args.seeds, args.ll_samples = 300, 1, [0], 10
    names = args.datasets or data.default_names(args.data_dir)
    args.datasets = [d.removesuffix(".h5ad") for d in names]
    if not args.threads.isdigit() and args.threads != "default":
        p.error("--threads: 'default' or a count")
    args.thread_count = int(args.threads) if args.threads.isdigit() else None
    return args


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One implementation at its defaults on one dataset and seed, then scored."""
    import anndata
    import numpy as np
    import torch

    if spec["threads"] is not None:
        torch.set_num_threads(spec["threads"])
    impl, seed, key = spec["implementation"], spec["seed"], spec["batch_key"]
    adata = anndata.read_h5ad(spec["h5ad"])
    split = data.make_split(adata.n_obs, seed)
    if impl == "scvi-tools":  # pyro_scvi's held-out cells of the seed (its rule if it failed)
        held = np.asarray(spec["heldout_indices"] or split[1], dtype=np.int64)
        fit = adapters.ScviTools(adata, key, seed=seed)
        fit.fit(spec["epochs"], (np.setdiff1d(np.arange(adata.n_obs), held), held))
        out = {"heldout_cells_from": "pyro_scvi" if spec["heldout_indices"] else "make_split"}
    else:
        observed = {"use_observed_lib_size": True} if impl == OBSERVED else {}
        fit = adapters.PyroScvi(adata, key, seed=seed, model=observed).fit(spec["epochs"])
        held = np.asarray(fit.model.validation_indices)
        out = {"engine": fit.run["engine"], "heldout_indices": held.tolist()}
        out["split_matches_make_split"] = bool(np.array_equal(held, split[1]))
        out["final_validation_elbo"] = fit.run["validation_elbo_per_cell"]
    keep = ("train_seconds", "epochs_run", "n_train", "use_observed_lib_size", "drop_last")
    out |= {k: fit.run[k] for k in keep if k in fit.run}
    out["seconds_per_epoch"] = out["train_seconds"] / out["epochs_run"]
    errors: dict[str, str] = {}
    cells = data.some_cells(np.arange(adata.n_obs), spec["metric_cells"], seed)
    latent, scores = fit.latent(), score.latent_scores
    out |= workers.attempt(errors, "metrics", scores, latent, adata, cells, seed) or {}
    out["metric_cells"] = len(cells)
    use, k = data.some_cells(held, spec["ll_cells"], seed), spec["ll_samples"]
    out |= {"heldout_ll_cells": len(use), "ll_samples": k}
    value = workers.attempt(errors, "marginal_ll", fit.marginal_ll, use, k, seed)
    out["heldout_log_px_per_cell"] = value
    if impl == "pyro_scvi":  # the same model with l fixed at the observed library
        given = workers.attempt(errors, "marginal_ll", fit.common_marginal_ll, use, k, seed, True)
    else:  # conditioned on the observed library, log p(x) is log p(x | library)
        given = value if out.get("use_observed_lib_size", True) else None
    out["heldout_log_px_given_library_per_cell"] = given
    out |= {"errors": errors} if errors else {}
    return out | {"threads_after": torch.get_num_threads()}


def run_dataset(ds: dict, args: argparse.Namespace, skipped: dict, tmp: Path, reference=None):
    """Every seed of the implementations on one prepared dataset; medians and verdict.
    ``reference``: earlier scvi-tools runs by seed (``--reuse-reference``)."""
    runs = [{"implementation": i, "seed": None, "error": e} for i, e in skipped.items()]
    impls = [i for i in IMPLEMENTATIONS if i != OBSERVED or args.observed_library]
    shape = {"n_cells": ds["n_cells"], "n_genes": ds["n_genes"]}
    for seed in args.seeds:
        held = None  # pyro_scvi's held-out cells of this seed, once it has run
        for impl in (i for i in impls if i not in skipped):
            earlier = (reference or {}).get(seed)
            alike = earlier and {k: earlier["reused_from"].get(k) for k in shape} == shape
            if impl == "scvi-tools" and alike and same_split(runs, seed):
                runs.append(earlier)
                print(f"  seed {seed} {impl:10s}: reused, {describe(earlier)}", file=sys.stderr)
                continue
            spec = {"implementation": impl, "seed": seed, "heldout_indices": held}
            spec |= {k: ds[k] for k in ("h5ad", "batch_key")} | {"threads": args.thread_count}
            spec |= {k: getattr(args, k) for k in ("epochs", "metric_cells", "ll_cells")}
            spec |= {"ll_samples": args.ll_samples, "result": str(tmp / "r.json")}
            run = {"implementation": impl, "seed": seed}
            run |= workers.spawn(STUDY, "--worker", spec, args.thread_count)
            if impl == "pyro_scvi" and "heldout_indices" in run:
                held = run.pop("heldout_indices")
            elif impl == OBSERVED and "heldout_indices" in run:  # same seed, same split
                run["split_matches_pyro_scvi"] = run.pop("heldout_indices") == held
            runs.append(run)
            print(f"  seed {seed} {impl:10s}: {describe(run)}", file=sys.stderr, flush=True)
    summary = workers.summarize(runs, impls, KEYS)
    return {"runs": runs, "summary": summary, "verdict": verdict(summary, runs, ds, skipped)}


def same_split(runs: list[dict[str, Any]], seed: int) -> bool:
    """Whether this run's pyro_scvi run of ``seed`` held out ``make_split``'s cells, the
    cells a reused scvi-tools run was scored on."""
    mine = (r for r in runs if r["implementation"] == "pyro_scvi" and r["seed"] == seed)
    return any(r.get("split_matches_make_split") for r in mine)


def reusable_reference(path: Path, args: argparse.Namespace) -> dict[str, dict[int, dict]]:
    """``--reuse-reference``: the earlier file's finished scvi-tools runs by dataset and seed,
    measured as this run would (epochs, importance samples, metric and held-out cells,
    threads) on ``make_split``'s held-out cells; each marked ``reused_from``."""
    earlier, out = results.read(path), {}
    for d in (earlier or {}).get("datasets", []):
        source = d.get("from_run") or results.provenance(earlier)
        shape = {"n_cells": d.get("n_cells"), "n_genes": d.get("n_genes")}
        runs = d.get("runs", [])
        ours = (r for r in runs if r["implementation"] == "pyro_scvi")
        split_ok = {r["seed"] for r in ours if r.get("split_matches_make_split")}
        for r in runs:
            alike = (
                r["implementation"] == "scvi-tools"
                and "error" not in r
                and not r.get("errors")
                and r["seed"] in split_ok
                and r.get("epochs_run") == args.epochs
                and r.get("ll_samples") == args.ll_samples
                and r.get("metric_cells") == min(d.get("n_cells", -1), args.metric_cells)
                and r.get("heldout_ll_cells", args.ll_cells + 1) <= args.ll_cells
                and args.thread_count in (None, r.get("threads_after"))
            )
            if alike:
                reused = r | {"reused_from": r.get("reused_from", source | shape)}
                if reused.get("use_observed_lib_size"):  # older files lack the column
                    given = r.get("heldout_log_px_per_cell")
                    reused.setdefault("heldout_log_px_given_library_per_cell", given)
                out.setdefault(d["name"], {})[r["seed"]] = reused
    return out


def verdict(summary: dict, runs: list[dict], ds: dict, skipped: dict) -> dict[str, Any]:
    """Pass / fail of each criterion on the medians over seeds."""
    mine, theirs = summary["pyro_scvi"], summary["scvi-tools"]
    ours = [r for r in runs if r["implementation"] == "pyro_scvi"]
    done = [r for r in ours if "error" not in r and not r.get("errors")]
    detail = f"{len(done)} of {len(ours)} pyro_scvi runs trained and scored"
    out: dict[str, Any] = {"fit_finishes": {"passed": bool(done) and done == ours}}
    out["fit_finishes"]["detail"] = detail
    for key, tol in TOLERANCES.items():
        a, b = mine.get(key), theirs.get(key)
        if key == "entropy_batch_mixing" and ds["n_batches"] < 2:
            out[key] = {"passed": None, "detail": "one batch: not applicable"}
        elif "scvi-tools" in skipped:
            out[key] = {"passed": None, "detail": "scvi-tools skipped: not judged"}
        elif a is None or b is None:
            out[key] = {"passed": False, "detail": "no value (runs failed)"}
        else:
            out[key] = {"passed": a - b >= tol, "difference": a - b, "tolerance": tol}
    judged = [v["passed"] for v in out.values() if v["passed"] is not None]
    out["all_passed"] = all(judged) if len(judged) > 1 else None
    # reported, not judged: like for like (both log p(x | library)), and the same model
    key = "heldout_log_px_given_library_per_cell"
    a, b = mine.get(key), theirs.get(key)
    out["like_for_like_log_px"] = (
        {"passed": None} if a is None or b is None else {"passed": a >= b, "difference": a - b}
    )
    same = summary.get(OBSERVED)
    if same and same.get("n_ok") and "scvi-tools" not in skipped:
        pairs = {k: (same.get(k), theirs.get(k)) for k in TOLERANCES}
        out["same_model"] = {
            k: {"passed": a - b >= TOLERANCES[k], "difference": a - b}
            for k, (a, b) in pairs.items()
            if a is not None and b is not None
        }
    return out


def describe(run: dict[str, Any]) -> str:
    if "error" in run:
        return f"FAILED: {run['error']}"
    errors = f", errors {run['errors']}" if run.get("errors") else ""
    return (
        f"train {run['train_seconds']:.0f} s, ARI {fmt(run.get('ari'))}, batch entropy "
        f"{fmt(run.get('entropy_batch_mixing'))}, held-out log p(x) "
        f"{fmt(run.get('heldout_log_px_per_cell'), '.2f')}{errors}"
    )


def failures(res: dict[str, Any]) -> list[str]:
    """Every failed dataset, run or scoring step, with its error verbatim."""
    out = []
    for d in res["datasets"]:
        out += [f"{d['name']}: {d['error']}"] if "error" in d else []
        for r in d.get("runs", []):
            where = f"{d['name']}, {r['implementation']}, seed {r['seed']}"
            if "error" in r and not r["error"].startswith("skipped"):
                out.append(f"{where}: {r['error']}")
            out += [f"{where}, {stage}: {msg}" for stage, msg in (r.get("errors") or {}).items()]
    return out


SPECS = {"ari": ".3f", "entropy_batch_mixing": ".3f", "heldout_log_px_per_cell": ".2f"}


def markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    how = (
        f"max_epochs {s['epochs']}, seeds {' '.join(map(str, s['seeds']))}, threads "
        f"{s['threads']}, log p(x) with {s['ll_samples']} importance samples, every run in "
        f"its own process; datasets subsampled to {s['subsample']} cells" * bool(s["subsample"])
    )
    lines = results.header(res, "Accuracy at the defaults: pyro_scvi vs scvi-tools", how)
    lines += [f"- **{n}**: {e}; the criteria are not judged." for n, e in res["skipped"].items()]
    medians, criteria, same_rows = [], [], []
    for d in res["datasets"]:
        if "error" in d:
            medians.append([d["name"], d["error"], *[""] * 12])
            criteria.append([d["name"], f"FAIL ({d['error']})", "", "", "", "FAIL", ""])
            continue
        sm, v, multi = d["summary"], d["verdict"], d["n_batches"] > 1
        mine, theirs = sm["pyro_scvi"], sm["scvi-tools"]
        cells = []
        for key, f in SPECS.items():
            a, b = mine.get(key), theirs.get(key)
            diff = fmt(None if None in (a, b) else a - b, "+" + f)
            shown = multi or key != "entropy_batch_mixing"
            cells += [fmt(a, f), fmt(b, f), diff] if shown else ["—"] * 3
        name = d["name"] + " (earlier run†)" * ("from_run" in d)
        seconds = " / ".join(fmt(m.get("train_seconds"), ".0f") for m in (mine, theirs))
        ok = f"{mine['n_ok']} / {theirs['n_ok']}"
        shape = f"{d['n_cells']} x {d['n_genes']}"
        medians.append([name, shape, d["n_batches"], ok, *cells, seconds])
        given = "heldout_log_px_given_library_per_cell"
        like = mark(v["like_for_like_log_px"], mine.get(given), theirs.get(given), ".2f")
        overall = {True: "**pass**", False: "**FAIL**", None: "n/a"}[v["all_passed"]]
        texts = [verdict_text(v[k]) for k in ("fit_finishes", *CRITERIA)]
        criteria.append([d["name"], *texts, overall, like])
        if same := v.get("same_model"):
            obs = sm[OBSERVED]
            marks = [mark(same.get(k), obs.get(k), theirs.get(k), f) for k, f in SPECS.items()]
            if not multi:
                marks[list(SPECS).index("entropy_batch_mixing")] = "—"
            same_rows.append([d["name"], obs["n_ok"], *marks])
    lines += ["", "## Medians over seeds", "", *results.md_table(MEDIANS, medians), ""]
    lines += [LIKE_NOTE, "", "## Criteria (pyro_scvi against scvi-tools, medians over seeds)", ""]
    columns = ["dataset", "default fit finishes", *CRITERIA.values(), "all", LIKE_COLUMN]
    lines += results.md_table(columns, criteria)
    if same_rows:
        columns = "dataset|runs ok|KMeans ARI|batch entropy|held-out log p(x \\| library)"
        lines += ["", "## The same model as scvi-tools' default (not judged)", "", SAME_NOTE, ""]
        lines += results.md_table(columns, same_rows)
    failed = [f"- {f}" for f in failures(res)] or ["None: every run finished and scored."]
    lines += ["", "## Failures", "", *failed, "", "## Notes", "", f"- {NOTE}"]
    for d in res["datasets"]:
        runs = [(f"{d['name']}: kept from an earlier run (--merge)", d.get("from_run"))]
        reused = "{}: scvi-tools' run of seed {} reused (--reuse-reference)".format
        runs += [(reused(d["name"], r["seed"]), r.get("reused_from")) for r in d.get("runs", [])]
        note = "- {}: `{command}` at commit {commit:.7}, {date}.".format
        lines += [note(t, **r) for t, r in runs if r]

    return "\n".join([*lines, ""])


def mark(v: dict | None, a: float | None, b: float | None, f: str) -> str:
    """``yes (a / b, Δ)`` when the difference meets the criterion's tolerance, else ``no``."""
    if v is None or v.get("passed") is None:
        return "—"
    return f"{'yes' if v['passed'] else 'no'} ({a:{f}} / {b:{f}}, {v['difference']:+{f}})"


MEDIANS = (
    "dataset|cells x genes|batches:|runs ok (pyro_scvi / scvi-tools)|ARI pyro_scvi:|"
    "ARI scvi-tools:|Δ ARI:|batch entropy pyro_scvi:|batch entropy scvi-tools:|Δ entropy:|"
    "held-out log p(x) pyro_scvi:|held-out log p(x) scvi-tools*:|Δ log p(x):|"
    "train s (pyro_scvi / scvi-tools)"
)
LIKE_COLUMN = (
    "pyro_scvi's model at the observed library: log p(x \\| library) ≥ scvi-tools (not judged)"
)
LIKE_NOTE = (
    "\\* scvi-tools' default model conditions on the observed library size (log p(x | "
    "library)); pyro_scvi's integrates over a latent library (log p(x)). The criteria table's "
    "last column evaluates pyro_scvi's model with l fixed at each cell's observed library "
    "(pyro_scvi / scvi-tools, Δ); the table after it fits scvi-tools' default model with "
    "pyro_scvi. † kept from an earlier run by --merge; see the notes."
)
SAME_NOTE = (
    f"{OBSERVED}: `pyro_scvi.SCVI(adata[, batch_key], use_observed_lib_size=True)`, the same "
    "seed, training and held-out cells as the pyro_scvi run: both numbers are log p(x | "
    "library), like for like. pyro_scvi / scvi-tools (Δ), medians over seeds; yes when Δ "
    "meets the criterion's tolerance."
)
NOTE = (
    "Both at their defaults for max_epochs: pyro_scvi.SCVI(adata[, batch_key]).train("
    "max_epochs=E, seed=s, progress_bar=False); scvi-tools (scvi.settings.seed = s) trained on "
    "pyro_scvi's training cells of the seed. ARI, batch entropy: score_latent on the same "
    "cells; held-out log p(x): nats per cell, K importance samples on pyro_scvi's validation "
    "cells. Medians over seeds; a criterion passes when Δ ≥ its tolerance. Details: "
    "benchmarks/README.md."
)


def verdict_text(v: dict[str, Any]) -> str:
    if v["passed"] is None:
        return "n/a"
    if "difference" not in v:
        return "pass" if v["passed"] else f"FAIL ({v['detail']})"
    return ("pass" if v["passed"] else "FAIL") + f" ({v['difference']:+.3f})"


def main(argv: list[str] | None = None) -> int:
    if (rc := workers.main(argv, worker=worker)) is not None:
        return rc
    args = parse_args(argv)
    start, skipped = time.perf_counter(), adapters.skipped(["pyro_scvi", "scvi-tools"])
    if "pyro_scvi" in skipped:
        print(skipped["pyro_scvi"], file=sys.stderr)
        return 1
    stem = results.stem(STUDY, args.smoke)
    path = args.out_dir / f"{stem}.json"
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv, threads=args.thread_count)}
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir", "data_dir")}
    res["settings"] = settings | {"criteria": CRITERIA, "tolerances": TOLERANCES}
    res |= {"skipped": skipped, "datasets": []}
    if args.merge and (earlier := results.read(path)):
        redone = set(args.datasets)
        res["datasets"] = results.keep_not_redone(earlier["datasets"], redone, "name", earlier)

    reference = reusable_reference(path, args) if args.reuse_reference else {}
    with tempfile.TemporaryDirectory(prefix=f"{STUDY}_") as tmp:
        prepared = []
        for name in args.datasets:
            more = {"data_dir": args.data_dir and str(args.data_dir), "subsample": args.subsample}
            info = workers.prepare(STUDY, name, Path(tmp), args.thread_count, **more)
            if "error" in info:
                print(f"{name}: {info['error']}", file=sys.stderr)
                res["datasets"].append({"name": name, "error": info["error"]})
            else:
                prepared.append({"name": name, **info})
        for ds in sorted(prepared, key=lambda d: d["n_cells"] * d["n_genes"]):  # small first
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            entry = ds | run_dataset(ds, args, skipped, Path(tmp), reference.get(ds["name"]))
            Path(entry.pop("h5ad")).unlink(missing_ok=True)
            res["datasets"].append(entry)
            res["elapsed_seconds"] = time.perf_counter() - start
            results.write(args.out_dir, stem, res, markdown(res))
    res["total_seconds"] = time.perf_counter() - start
    results.publish(args.out_dir, stem, res, markdown(res))
    if failures(res):
        return 1
    passed = [d["verdict"]["all_passed"] for d in res["datasets"] if "verdict" in d]
    return 2 if False in passed else 0


if __name__ == "__main__":
    sys.exit(main())
