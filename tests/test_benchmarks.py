"""Benchmark studies run end to end in smoke mode (without scvi-tools, in the test venv),
as a user runs them: ``python -m benchmarks.<study>`` from the repository root."""

import importlib
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"


def _study(name, *args):
    """``python -m benchmarks.<name> ARGS`` from the repository root."""
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


def _load_script(name, monkeypatch):
    """``benchmarks.<name>`` as a module (the repository root on sys.path, as when it runs)."""
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module(f"benchmarks.{name}")


def test_benchmarks_are_a_package_without_path_hacks():
    scripts = sorted(BENCHMARKS.rglob("*.py"))
    assert (BENCHMARKS / "__init__.py") in scripts and (
        BENCHMARKS / "lib" / "__init__.py"
    ) in scripts
    hacks = [p.name for p in scripts if "sys.path" in p.read_text()]
    assert not hacks, f"run studies as python -m benchmarks.<study>, no sys.path edits: {hacks}"


def test_speed_defaults_smoke(tmp_path):
    proc = _study("speed_defaults", "--smoke", "--out-dir", tmp_path)
    assert (tmp_path / "speed_defaults_smoke.md").exists(), proc.stderr[-3000:]
    results = json.loads((tmp_path / "speed_defaults_smoke.json").read_text())
    assert results["settings"]["smoke"] and results["rows"]
    for row in results["rows"]:
        runs = [r for r in row["runs"] if r["implementation"] == "pyro_scvi"]
        assert runs and all("error" not in r for r in runs), runs
        assert all(r["train_seconds"] > 0 and r["epochs_run"] == 1 for r in runs)
        # the script's time holds the imports and set-up before train() as well
        assert all(r["script_seconds"] > r["train_seconds"] for r in runs)
        assert row["summary"]["pyro_scvi"]["train_seconds"] > 0
        scvi_tools = row["summary"]["scvi-tools"]
        if importlib.util.find_spec("scvi") is None:  # skipped, and the table says so
            assert "skipped" in scvi_tools["error"]
            assert "skipped" in proc.stdout
        else:
            assert scvi_tools["train_seconds"] > 0
    assert "pyro_scvi" in proc.stdout and "speed-up" in proc.stdout


def test_compare_scvi_tools_smoke(tmp_path):
    # the shipped PBMCs (300 of them) and synthetic:300x100
    proc = _study(
        "compare_scvi_tools", "--smoke", "--datasets", "pbmc8k_200hvg", "--out-dir", tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "compare_scvi_tools_smoke.json").read_text())
    real, synthetic = results["datasets"]
    assert real["imputation"] and not synthetic["imputation"]  # auto: real data only
    runs = {r["implementation"]: r for r in real["runs"]}
    mine = runs["pyro_scvi"]
    assert not mine.get("errors") and mine["split_matches"], mine
    # pyro_scvi's own estimator is the common one; the kNN baseline is scored beside it
    assert mine["own_marginal_ll_per_cell"] == mine["marginal_ll_per_cell"]
    assert math.isfinite(mine["marginal_ll_per_cell"])
    assert 0 < mine["imputation_knn_median_l1"] and 0 < mine["imputation_median_l1"]
    assert "imputation_median_l1" not in runs["torch-floor"]
    if importlib.util.find_spec("scvi") is None:  # skipped, and the table says so
        assert "skipped" in runs["scvi-tools"]["error"] and "skipped" in proc.stdout
    else:  # its own importance sampler beside the common one
        assert math.isfinite(runs["scvi-tools"]["own_marginal_ll_per_cell"])
    assert "kNN (PCA) median L1" in proc.stdout


def test_robustness_smoke(tmp_path):
    proc = _study("robustness", "--smoke", "--out", tmp_path)
    # 0: all finished and the paths agree; 2: all finished, but after 2 epochs on 6-19
    # validation cells the paths may differ by more than 1 %; 1: a run failed.
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    results = json.loads((tmp_path / "robustness_smoke.json").read_text())
    runs = results["runs"]
    assert results["settings"]["smoke"] and len(runs) == 4
    assert {r["path"] for r in runs} == {"eager", "fused"}
    for run in runs:
        assert run["status"] == "finished", run.get("message")
        assert run["epochs_run"] == 2
        for key in ("validation_elbo", "heldout_elbo"):
            assert isinstance(run[key], float) and math.isfinite(run[key]), run
    assert (tmp_path / "robustness_smoke.md").exists()
    assert "Runs finished, per path" in proc.stdout


def test_accuracy_defaults_smoke(tmp_path, monkeypatch):
    kept = tmp_path / "latents"
    kept.mkdir()
    proc = _study("accuracy_defaults", "--smoke", "--out-dir", tmp_path, "--keep-latents", kept)
    # 0: all criteria met; 2: a criterion is not met (after 1 epoch on 300 cells); 1: a failure.
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    results = json.loads((tmp_path / "accuracy_defaults_smoke.json").read_text())
    assert results["settings"]["smoke"] and len(results["datasets"]) == 1
    dataset = results["datasets"][0]
    runs = {r["implementation"]: r for r in dataset["runs"]}
    mine, same = runs["pyro_scvi"], runs["pyro_scvi-observed-library"]
    for run in (mine, same):  # at the defaults, early stopping on: the stop is recorded
        assert "error" not in run and not run.get("errors"), run
        assert run["epochs_run"] == 1 and run["split_matches_make_split"]
        assert run["stop_reason"].startswith("max_epochs")
        assert math.isfinite(run["heldout_log_px_per_cell"]) and -1 <= run["ari"] <= 1
        assert 0 < run["heldout_ll_cells"] < dataset["n_cells"]
    # log p(x) and log p(x | library): the two models, other numbers
    assert same["heldout_log_px_per_cell"] != mine["heldout_log_px_per_cell"]
    assert dataset["verdict"]["fit_finishes"]["passed"]
    assert set(dataset["verdict"]) >= {"latent library", "observed library"}
    if importlib.util.find_spec("scvi") is None:  # skipped, and the table says so
        assert "skipped" in runs["scvi-tools"]["error"] and "skipped" in proc.stdout
        assert dataset["verdict"]["all_passed"] is None
    else:  # each pair like for like: same training and held-out cells, each its estimator
        for theirs in (runs["scvi-tools"], runs["scvi-tools-latent-library"]):
            assert theirs["n_train"] == mine["n_train"]
            assert theirs["heldout_ll_cells"] == mine["heldout_ll_cells"]
        assert not runs["scvi-tools-latent-library"]["use_observed_lib_size"]
        pair = dataset["verdict"]["observed library"]["heldout_log_px_per_cell"]
        theirs = runs["scvi-tools"]["heldout_log_px_per_cell"]
        assert pair["difference"] == pytest.approx(same["heldout_log_px_per_cell"] - theirs)
    assert "Criteria per pair" in proc.stdout and "Every run" in proc.stdout
    # each run's latent kept on request, one row per cell
    assert len(list(kept.glob("*.npy"))) == sum("error" not in r for r in runs.values())
    (observed,) = kept.glob("*_pyro_scvi-observed-library_0.npy")
    assert np.load(observed).shape[0] == dataset["n_cells"]
    # the header names the seeds the file holds, per dataset and part
    assert f"Seeds in this file: accuracy: {dataset['name']} 0." in proc.stdout

    # time to quality: pyro-scvi fit's whole run, timed, scored from its outputs; the file
    # keeps the like-for-like part
    proc = _study(
        "accuracy_defaults", "--smoke", "--time-to-quality", "--threads", "default",
        "--out-dir", tmp_path,
    )  # fmt: skip
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    timed = json.loads((tmp_path / "accuracy_defaults_smoke.json").read_text())
    assert [d["name"] for d in timed["datasets"]] == [dataset["name"]]
    assert timed["datasets"][0]["from_run"]["date"] == results["meta"]["date"]
    (entry,) = timed["time_to_quality"]
    (fit,) = [r for r in entry["runs"] if r["implementation"] == "pyro-scvi fit"]
    assert "error" not in fit and not fit.get("errors"), fit
    assert fit["wall_seconds"] > 0 and fit["epochs_run"] == 1 and fit["split_matches_make_split"]
    assert fit["stop_reason"].startswith("max_epochs") and fit["normalized_written"]
    # the thread policy's setting and the counts it used, kept with the run and shown
    assert fit["threads"] == "auto" and all(n >= 1 for n in fit["threads_used"]), fit
    assert f"auto: {fit['threads_used']}" in proc.stdout
    assert math.isfinite(fit["heldout_log_px_per_cell"]) and -1 <= fit["ari"] <= 1
    if importlib.util.find_spec("scvi") is None:
        assert (
            entry["verdict"]["median_ratio"] is None and entry["verdict"]["time"]["passed"] is None
        )
    else:
        (theirs,) = [r for r in entry["runs"] if r["implementation"] == "scvi-tools train()"]
        assert theirs["threads"] == "default" and theirs["threads_used"][0] >= 1
        ratio = fit["wall_seconds"] / theirs["wall_seconds"]
        assert entry["verdict"]["median_ratio"] == pytest.approx(ratio)
    assert "Time to quality" in proc.stdout and "Criteria per pair" in proc.stdout
    held = f"accuracy: {dataset['name']} 0; time to quality: {dataset['name']} 0."
    assert held in proc.stdout

    # --merge into a folder without the file starts from the committed one; it keeps a dataset
    # it does not redo and a redone dataset's other seeds, each run marked with its maker
    study = _load_script("accuracy_defaults", monkeypatch)
    monkeypatch.setattr(study.results, "RESULTS", committed := tmp_path / "committed")
    seed1 = [dict(r, seed=1) for r in dataset["runs"] if r["seed"] == 0]
    earlier = dict(timed, datasets=[dict(dataset, name="an_earlier_dataset"), dict(dataset)])
    earlier["datasets"][1]["runs"] = [*dataset["runs"], *seed1]
    committed.mkdir()
    (committed / "accuracy_defaults_smoke.json").write_text(json.dumps(earlier))
    rc = study.main(["--smoke", "--out-dir", str(tmp_path / "new"), "--merge"])
    assert rc in (0, 2)
    merged = json.loads((tmp_path / "new" / "accuracy_defaults_smoke.json").read_text())
    names = [d["name"] for d in merged["datasets"]]
    assert names == ["an_earlier_dataset", dataset["name"]]
    assert merged["datasets"][0]["from_run"]["date"] == timed["meta"]["date"]
    assert "from_run" not in merged["datasets"][1] and len(merged["time_to_quality"]) == 1
    made = {r["seed"]: r.get("from_run") for r in merged["datasets"][1]["runs"]}
    assert made[0] is None and made[1]["date"] == timed["meta"]["date"]
    table = (tmp_path / "new" / "accuracy_defaults_smoke.md").read_text()
    assert "an_earlier_dataset (earlier run†)" in table
    assert f"{dataset['name']} seed 1" in table and timed["meta"]["command"] in table
    # the header names every seed the file holds, not just this run's
    assert f"accuracy: an_earlier_dataset 0, {dataset['name']} 0 1; time to quality:" in table


def test_data_parallel_smoke(tmp_path):
    proc = _study("data_parallel", "--smoke", "--out", tmp_path)
    # a failed rank's traceback and torchrun's summary both (see data_parallel.launch)
    assert proc.returncode == 0, proc.stderr[-8000:]
    results = json.loads((tmp_path / "data_parallel_smoke.json").read_text())
    runs = results["runs"]["torchrun, 2 processes"]
    assert runs[0]["processes"] == 2 and runs[0]["finite"]
    assert runs[0]["engine"]["data_parallel"] is True
    one = results["runs"]["one process, global minibatch"][0]
    assert one["engine"]["data_parallel"] is False
    assert results["summary"]["one process, global minibatch"]["ratio"] == 1.0
    pinned = results["runs"]["one process, one thread, global minibatch"][0]
    assert set(pinned["threads_per_epoch"]) == {1}
    assert results["summary"]["one process, one thread, global minibatch"][
        "ratio_vs_one_thread"
    ] == pytest.approx(1.0)


def test_gpu_throughput_smoke_on_cpu(tmp_path):
    proc = _study("gpu_throughput", "--smoke", "--no-scvi-tools", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_throughput.json").read_text())
    assert not [r for r in results["runs"] if "error" in r]
    # two sizes x two minibatches, two engines and two matmul precisions on the smaller
    assert len(results["runs"]) == 8
    assert all(0.05 < d["density"] < 0.3 for d in results["data"])
    precisions = {r["engine_used"]["matmul_precision"] for r in results["runs"]}
    assert precisions == {"highest", "high", "medium"}


def test_out_of_core_smoke(tmp_path):
    proc = _study("out_of_core", "--smoke", "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads((tmp_path / "out_of_core_smoke.json").read_text())["runs"]
    assert [r["mode"] for r in runs] == ["streamed", "in memory"] * 2
    for r in runs:
        assert r["latent_finite"] and r["peak_rss_mib"] > 0
        expected = "streamed: asked for" if r["mode"] == "streamed" else "memory: asked for"
        assert r["data_source"] == expected
    cli = json.loads((tmp_path / "out_of_core_smoke.json").read_text())["cli"]
    assert [r["cells"] for r in cli] == [600, 1200]
    for r in cli:
        assert r["status"] == 0 and r["latent_finite"] and r["peak_rss_mib"] > 0
        assert r["data_source"] == "streamed: asked for"
        assert r["normalized"].startswith("chosen genes only: 2 gene(s)")
    queries = json.loads((tmp_path / "out_of_core_smoke.json").read_text())["queries"]
    names = ["evaluate", "de", "ppc", "plot", "map-query"]
    assert [(r["cells"], r["query"]) for r in queries] == [
        (n, q) for n in (600, 1200) for q in names
    ]
    for r in queries:
        assert "error" not in r, r
        assert r["status"] == 0 and r["check_finite"], r
        assert math.isfinite(r["peak_rss_mib"]) and r["peak_rss_mib"] > 0
        assert "--data-source streamed" in r["command"]
    assert all(0 < r["n_cells"] <= 200 for r in queries if r["query"] == "map-query")
    assert "| map-query |" in (tmp_path / "out_of_core_smoke.md").read_text()


def test_out_of_core_merge_keeps_rows_not_redone(monkeypatch):
    out_of_core = _load_script("out_of_core", monkeypatch)
    earlier = {
        "meta": {"date": "then", "command": "old", "git": {"pyro_scvi_commit": "abc"}},
        "args": {"note": "under load"},
        "runs": [{"cells": 10, "mode": "streamed"}, {"cells": 20, "mode": "streamed"}],
        "cli": [{"cells": 10}, {"cells": 20}],
    }
    now = {
        "meta": {},
        "args": {"cells": [10, 20], "only": ["cli", "queries"]},
        "runs": [],
        "cli": [{"cells": 20, "new": True}],
        "queries": [{"cells": 20, "query": "evaluate"}],
    }
    out = out_of_core.merged(now, earlier)
    # no api rows now: both earlier rows stay; the cli row at 20 cells is redone, the one at
    # 10 not yet
    assert [r["cells"] for r in out["runs"]] == [10, 20]
    assert all(r["from_run"]["commit"] == "abc" for r in out["runs"])
    assert out["cli"][0]["from_run"]["note"] == "under load"
    assert out["cli"][1] == {"cells": 20, "new": True}
    assert out["queries"] == now["queries"]
    # a failed row does not replace the measured one
    failed = out_of_core.merged({**now, "cli": [{"cells": 10, "error": "x"}]}, earlier)
    assert [("error" in r, "from_run" in r) for r in failed["cli"]] == [
        (False, True),
        (True, False),
        (False, True),
    ]
    # merged again, rows keep the run that made them
    again = out_of_core.merged({**now, "cli": []}, {**out, "meta": {"date": "later"}})
    assert again["runs"][0]["from_run"]["date"] == "then"


def test_compare_inference_smoke_and_gather(tmp_path):
    proc = _study("compare_inference", "--smoke", "--out-dir", tmp_path / "part")
    part = tmp_path / "part" / "compare_inference_smoke.json"
    assert part.exists(), proc.stderr[-3000:]
    (run,) = json.loads(part.read_text())["runs"]
    schemes = ["mean-field", "full-covariance", "flow", "IWAE", "full-covariance IWAE"]
    assert list(run["schemes"]) == [*schemes, "flow IWAE", "per-cell"]
    for name, row in run["schemes"].items():
        assert "error" not in row, (name, row.get("traceback"))
        assert row["ais_se"] > 0 and 0 <= row["k_over_07"] <= 1, name
        assert 0 <= row["nuts_cov90_l"] <= 1 and row["cpu_seconds_per_epoch"] > 0, name
    # parts run side by side are gathered into one result with the goal check
    proc = _study("compare_inference", "--gather", part, "--out-dir", tmp_path)
    res = json.loads((tmp_path / "compare_inference.json").read_text())
    assert res["runs"] == [run] and res["goal"]["flow"]["of"] == 1
    assert res["goal"]["decision"] in proc.stdout and "## pbmc8k_200hvg" in proc.stdout
    # a gathered result gathers again with more parts: its parts carry over, and a dataset
    # and seed gathered twice counts once
    gathered, again = tmp_path / "compare_inference.json", tmp_path / "again"
    proc = _study("compare_inference", "--gather", gathered, part, "--out-dir", again)
    res = json.loads((again / "compare_inference.json").read_text())
    assert res["runs"] == [run], proc.stderr[-3000:]
    assert [p["command"].count("--smoke") for p in res["parts"]] == [1, 1]
    # a part of some schemes replaces those schemes' rows and keeps the others
    _study("compare_inference", "--smoke", "--schemes", "flow", "--out-dir", tmp_path / "flow")
    flow_part = tmp_path / "flow" / part.name
    flow = json.loads(flow_part.read_text())
    assert list(flow["runs"][0]["schemes"]) == ["flow"]
    merged = tmp_path / "merged"
    _study("compare_inference", "--gather", gathered, flow_part, "--out-dir", merged)
    res = json.loads((merged / "compare_inference.json").read_text())
    assert list(res["runs"][0]["schemes"]) == list(run["schemes"])
    assert res["runs"][0]["schemes"]["flow"] == flow["runs"][0]["schemes"]["flow"]
    assert res["goal"]["full-covariance IWAE vs IWAE"]["of"] == 1
    assert res["goal"]["flow IWAE vs IWAE"]["of"] == 1


def test_ais_validation_scores_pareto_k_without_ais(tmp_path):
    # --ais-steps 0: only the importance weights (k and the IS estimate), no AIS column
    args = ["--smoke", "--datasets", "synthetic:120x20", "--cells", "120", "--epochs", "2"]
    args += ["--skip", "1", "--held", "3", "--ais-steps", "0", "--proposals", "q", "laplace2"]
    proc = _study("ais_validation", *args, "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "ais_validation_smoke.json").read_text())
    ((key, row),) = results["datasets"].items()
    assert key == "synthetic:120x20/0/1" and "ais" not in row
    assert row["held"] == 3 and len(set(row["held_ids"])) == 3
    for p in ("q", "laplace2"):
        assert len(row[p]["k"]) == 3 and all(math.isfinite(v) for v in row[p]["k"] + row[p]["est"])
    assert "| synthetic:120x20 | 0 |" in (tmp_path / "ais_validation_smoke.md").read_text()


def test_query_mapping_smoke(tmp_path):
    proc = _study("query_mapping", "--smoke", "--out-dir", tmp_path)
    # 0: criteria met; 2: not met (2 epochs on 300 cells); 1: a failure
    assert proc.returncode in (0, 2), proc.stderr[-3000:]
    results = json.loads((tmp_path / "query_mapping_smoke.json").read_text())
    (row,) = results["rows"]
    assert row["query_donor"] == "batch2" and row["reference_cells_unchanged"]
    assert row["query_cells"] + row["test_cells"] == row["n_query_donor_cells"]
    for side in ("mapped", "full"):
        for key in ("ari", "entropy_donors", "entropy_query", "heldout_ll"):
            assert math.isfinite(row[side][key]), (side, key)
        assert 0 <= row[side]["label_transfer_accuracy"] <= 1
    assert set(row["criteria_met"]) == {"ari", "entropy_donors", "entropy_query", "heldout_ll_rel"}
    assert (tmp_path / "query_mapping_smoke.md").exists() and "mapped / full" in proc.stdout


def test_criticism_smoke(tmp_path):
    proc = _study("criticism", "--smoke", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "criticism_smoke.json").read_text())
    assert results["settings"]["smoke"]
    runs = results["runs"]
    assert [r["likelihood"] for r in runs] == ["zinb", "nb"]
    for run in runs:
        assert run["cells"] == "held-out" and run["n_cells"] == 20
        assert 0 <= run["pit_tv"] <= 1 and 0 <= run["calibration_error"] <= 1
        assert math.isfinite(run["r2_mean"]) and math.isfinite(run["elpd_mean"])
        # the low, mid and high thirds of genes by mean count, each a PIT TV of its own
        assert len(run["pit_tv_mean_thirds"]) == 3
        assert all(0 <= v <= 1 for v in run["pit_tv_mean_thirds"])
    assert "TV by thirds" in (tmp_path / "criticism_smoke.md").read_text()


def test_de_truth_smoke(tmp_path):
    proc = _study("de_truth", "--smoke", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "de_truth_smoke.json").read_text())
    assert results["settings"]["smoke"]
    summary = results["summary"]
    assert set(summary) == {
        "splatter",
        "splatter, confounded",
        "poisson-lognormal",
        "poisson-lognormal, confounded",
        "thinned real counts",
        "asymmetric",
        "asymmetric, batches",
        "high expressers",
        "high expressers, batches",
        "balanced",
        "balanced, batches",
        "thinned real counts, up-regulation",
    }
    for name, methods in summary.items():
        for method in ("pyro_scvi change", "pyro_scvi vanilla", "Wilcoxon"):
            row = methods[method]
            assert 0 <= row["auroc_all"] <= 1 and 0 <= row["null_fraction"] <= 1, (name, row)
        # replicates exist only in the Poisson-lognormal designs
        pseudobulk = methods["pseudobulk PyDESeq2"]
        if not name.startswith("poisson"):
            assert pseudobulk == {"skipped": "no replicates"}
        # spread_uncertainty with sample_key: scored where there are replicates, only there
        with_samples = methods["pyro_scvi change, sparse, replicates"]
        assert ("skipped" in with_samples) != name.startswith("poisson"), (name, with_samples)
    for replicate in results["replicates"]:
        assert replicate["n_de"] > 0 and replicate["group_sizes"]["A"] > 0
    # a rank-sum test finds planted fold changes even on this tiny data
    assert summary["poisson-lognormal"]["Wilcoxon"]["auroc_all"] > 0.8
    # before and after the composition correction, on the same fits
    for method in ("pyro_scvi change", "pyro_scvi change, uncorrected"):
        assert "median_null_lfc" in summary["asymmetric"][method]
        assert "auroc > 20 %" in summary["asymmetric"][method]
    assert summary["asymmetric"]["pyro_scvi vanilla"]["calls"] == 0  # vanilla makes no calls
    if importlib.util.find_spec("scvi") is None:  # skipped, and the table says so
        assert "skipped: scvi-tools not installed" in proc.stdout
    assert "Targets (pyro_scvi change mode)" in proc.stdout


def test_de_truth_methods_merge_into_an_earlier_run(tmp_path):
    # reference rows from one run, pyro_scvi's from another: one table with both
    common = ["--smoke", "--out-dir", tmp_path, "--benchmarks", "splatter", "--methods"]
    first = _study("de_truth", *common, "Wilcoxon")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _study("de_truth", *common, "pyro_scvi change", "--merge")
    assert second.returncode == 0, second.stderr[-3000:]
    results = json.loads((tmp_path / "de_truth_smoke.json").read_text())
    methods = results["summary"]["splatter"]
    assert 0 <= methods["Wilcoxon"]["auroc_all"] <= 1
    assert 0 <= methods["pyro_scvi change"]["auroc_all"] <= 1
    assert methods["scvi-tools change"] == {"skipped": "not in that run"}
    (replicate,) = results["replicates"]
    kept = replicate["methods"]["Wilcoxon"]["from_run"]["command"]
    assert "Wilcoxon" in kept and "from_run" not in replicate["methods"]["pyro_scvi change"]
    # the DE genes of each expression stratum: recorded per replicate, listed under the table
    assert set(replicate["n_de_strata"]) == {"1-5 %", "5-20 %", "> 20 %"}
    assert sum(replicate["n_de_strata"].values()) <= replicate["n_de"]
    assert "DE genes per stratum" in (tmp_path / "de_truth_smoke.md").read_text()


def test_merge_keeps_rows_not_redone_with_the_run_that_made_them(monkeypatch):
    results = _load_script("lib.results", monkeypatch)
    earlier = {
        "meta": {"date": "then", "command": "old", "git": {"pyro_scvi_commit": "abc"}},
        "datasets": [{"name": "a"}, {"name": "b"}],
    }
    kept = results.keep_not_redone(earlier["datasets"], {"a"}, "name", earlier)
    assert [d["name"] for d in kept] == ["b"]
    assert kept[0]["from_run"] == {"date": "then", "commit": "abc", "command": "old"}
    # older files hold the header at their top level; a row kept before keeps its own mark
    older = {"date": "d0", "command": "c0", "git": {"pyro_scvi_commit": "f00"}, "rows": kept}
    again = results.keep_not_redone(older["rows"], set(), "name", older, note="n")
    assert again[0]["from_run"]["commit"] == "abc"
    assert results.keep_not_redone([{"name": "c"}], set(), "name", older, "n")[0]["from_run"] == {
        "date": "d0",
        "commit": "f00",
        "command": "c0",
        "note": "n",
    }


def test_data_parallel_runs_again_only_after_a_rank_died_by_a_signal(monkeypatch):
    dp = _load_script("data_parallel", monkeypatch)
    signal = {"error": "exitcode  : -6 (pid: 1)  (SIGABRT)\ntraceback : Signal 6 (SIGABRT)"}
    python_error = {"error": "Traceback (most recent call last):\nValueError: bad"}
    ok = {"train_cells_per_second": 10.0}

    def runs(*results):
        calls = iter(results)
        monkeypatch.setattr(dp, "_launch_once", lambda *a: dict(next(calls)))
        return dp.launch(None, 2, 128)

    # a signal, then a good run: the good run, with the first failure kept
    result = runs(signal, ok)
    assert result["train_cells_per_second"] == 10.0
    assert result["first_failure"] == signal["error"]
    # two signals: the second failure is the result
    assert runs(signal, signal)["error"] == signal["error"]
    # a Python error, or a one-process run, is not run again
    assert runs(python_error, ok) == python_error
    monkeypatch.setattr(dp, "_launch_once", lambda *a: dict(signal))
    assert "first_failure" not in dp.launch(None, 1, 128)
    meta = _load_script("lib.results", monkeypatch).metadata("data_parallel", [])
    args = {"cells": 1, "genes": 1, "epochs": 1, "repeats": 1}
    runs_kept = {"torchrun, 2 processes": [result]}
    text = dp.markdown({"meta": meta, "args": args, "summary": {}, "runs": runs_kept})
    assert "Run again after a rank died by a signal" in text


def test_same_result_fingerprints_a_fit_and_tells_a_change_apart(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for out in (a, b):
        proc = _study("same_result", "--smoke", "--out", str(out))
        assert proc.returncode == 0, proc.stderr[-2000:]
    same = _study("same_result", "--compare", str(a), str(b))
    assert same.returncode == 0 and "the same results" in same.stdout  # one seed: one fit
    changed = json.loads(b.read_text())
    changed["fits"]["synthetic"]["history"]["train_elbo"][-1] += 1e-9
    b.write_text(json.dumps(changed))
    differ = _study("same_result", "--compare", str(a), str(b))
    assert differ.returncode == 1 and "history differs" in differ.stdout


def test_results_files_name_no_folder_of_the_machine_that_wrote_them(tmp_path, monkeypatch):
    from test_datasets import machine_paths

    from benchmarks.lib import results

    data = tmp_path / "data"
    monkeypatch.setenv("PYRO_SCVI_DATA", str(data))
    scratch = Path("/", "tmp", "runs", "a")  # built, so that this file names no such folder
    command = f"--data-dir {data} --out-dir {scratch} --cache {results.REPO / 'bench_out'}"
    results.write(tmp_path, "study", {"meta": {"command": command}}, f"Command: `{command}`")
    table = (tmp_path / "study.md").read_text()
    assert (
        table == "Command: `--data-dir $PYRO_SCVI_DATA --out-dir $TMPDIR/runs/a --cache bench_out`"
    )
    assert json.loads((tmp_path / "study.json").read_text())["meta"]["command"] in table
    assert not machine_paths("benchmarks/results/study.md", table)

    # The temporary folder Python uses here, and other systems' scratch folders and homes
    # ("@" stands for "/" and "%" for a backslash, so that this file names no such folder).
    monkeypatch.setattr(tempfile, "tempdir", str(Path("/", "scratch", "job42")))
    cases = {
        "@scratch@job42@a": "$TMPDIR@a",  # tempfile.gettempdir()
        "@scratch@job4": "@scratch@job4",  # another folder
        "@var@folders@x1@abc123@T@reads": "$TMPDIR@reads",  # macOS
        "@private@var@folders@x1@abc123@T": "$TMPDIR",
        "@private@tmp@r": "$TMPDIR@r",
        "@var@tmp@r": "$TMPDIR@r",
        "@Users@me@x.h5ad": "~@x.h5ad",
        "C:%Users%me%AppData%Local%Temp%r": "$TMPDIR%r",  # Windows
        "C:@Windows@Temp": "$TMPDIR",
        "D:%Users%me%x": "~%x",
        "https://example.org@Users@me": "https://example.org@Users@me",
    }
    for path, expected in cases.items():
        path, expected = (p.replace("@", "/").replace("%", "\\") for p in (path, expected))
        results.write(tmp_path, "os", {"meta": {"path": path}}, f"`{path}`")
        assert (tmp_path / "os.md").read_text() == f"`{expected}`", path
        assert json.loads((tmp_path / "os.json").read_text())["meta"]["path"] == expected, path
        assert not machine_paths("benchmarks/results/os.md", expected)


def test_stopping_rule_report_adds_new_runs_to_the_committed_ones(tmp_path, monkeypatch):
    stopping_rule = _load_script("stopping_rule", monkeypatch)
    monkeypatch.setattr(stopping_rule.results, "RESULTS", tmp_path)

    def run(dataset, seed, commit=None, elbo=-100.0):
        stop = {"epoch": 199, "reason": "converged: ...", "threshold": 0.1, "max_epochs": 400}
        scores = {"heldout_elbo": elbo, "ari": 0.5}
        rec = {"mode": "rule", "dataset": dataset, "seed": seed, "shape": [10, 5]}
        rec |= {"stopping": stop, "stop": scores, "end": scores, "stop_seconds": 1.0}
        rec |= {"seconds": 2.0, "epochs": 400, "validation_elbo": [elbo] * 400}
        return rec | ({"git": {"pyro_scvi_commit": commit}} if commit else {})

    committed = [run("zeisel", 0, "aaaaaaa1"), run("pbmc", 0)]  # pbmc 0 predates commits
    (tmp_path / "stopping_rule.json").write_text(json.dumps({"meta": {}, "runs": committed}))
    new = tmp_path / "runs"
    new.mkdir()
    for rec in (run("pbmc", 1, "bbbbbbb2"), run("zeisel", 0, "ccccccc3", elbo=-90.0)):
        (new / f"rule_{rec['dataset']}_{rec['seed']}.json").write_text(json.dumps(rec))
    stopping_rule.main(["--report", str(new)])
    runs = json.loads((tmp_path / "stopping_rule.json").read_text())["runs"]
    # the committed run stays, a new seed is added, a new file of the same run replaces it
    assert [(r["dataset"], r["seed"]) for r in runs] == [("pbmc", 0), ("pbmc", 1), ("zeisel", 0)]
    assert "git" not in runs[0] and runs[2]["stop"]["heldout_elbo"] == -90.0
    rows = (tmp_path / "stopping_rule.md").read_text().splitlines()
    rows = [line.split(" | ")[-1] for line in rows if line.startswith(("| pbmc (", "| zeisel ("))]
    assert rows == ["— |", "bbbbbbb |", "ccccccc |"]


def test_stopping_rule_report_shows_the_restored_epoch_beside_the_last(tmp_path, monkeypatch):
    stopping_rule = _load_script("stopping_rule", monkeypatch)
    monkeypatch.setattr(stopping_rule.results, "RESULTS", tmp_path)
    rec = {"mode": "restore", "dataset": "worm", "seed": 0, "shape": [10, 5], "test_cells": 3}
    rec |= {"stopping": {"epoch": 144, "restored_epoch": 100}, "validation_elbo": [-1.0] * 145}
    rec |= {"last": {"log_px": -10.0, "ari": 0.5}, "restored": {"log_px": -9.0, "ari": 0.4}}
    rec |= {"log_px_gain": [1.0, 0.25], "git": {"pyro_scvi_commit": "ddddddd4"}}
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "restore_worm_0.json").write_text(json.dumps(rec))
    stopping_rule.main(["--report", str(tmp_path / "runs")])
    text = (tmp_path / "stopping_rule.md").read_text()
    assert "## Restoring the best epoch" in text and "neither train nor pick the epoch" in text
    row = "| worm | 0 | 145 | 101 | -10.00 → -9.00 (+1.00 ± 0.25) | — → — | 0.500 → 0.400 |"
    assert row + " — → — | ddddddd |" in text.splitlines()
