"""Benchmark scripts run end to end in smoke mode (without scvi-tools, in the test venv)."""

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_speed_defaults_smoke(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "speed_defaults.py"), "--smoke"]
    proc = subprocess.run(
        [*cmd, "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert (tmp_path / "speed_defaults_smoke.md").exists(), proc.stderr[-3000:]
    results = json.loads((tmp_path / "speed_defaults_smoke.json").read_text())
    assert results["settings"]["smoke"] and results["rows"]
    for row in results["rows"]:
        runs = [r for r in row["runs"] if r["implementation"] == "pyro_scvi"]
        assert runs and all("error" not in r for r in runs), runs
        assert all(r["train_seconds"] > 0 and r["epochs_run"] == 1 for r in runs)
        assert row["summary"]["pyro_scvi"]["train_seconds"] > 0
        scvi_tools = row["summary"]["scvi-tools"]
        if importlib.util.find_spec("scvi") is None:  # skipped, and the table says so
            assert "skipped" in scvi_tools["error"]
            assert "skipped" in proc.stdout
        else:
            assert scvi_tools["train_seconds"] > 0
    assert "pyro_scvi" in proc.stdout and "speed-up" in proc.stdout


def test_robustness_smoke(tmp_path):
    cmd = [sys.executable, str(BENCHMARKS / "robustness.py"), "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
