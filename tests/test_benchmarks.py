"""Benchmark scripts run end to end in smoke mode (without scvi-tools, in the test venv)."""

import importlib.util
import json
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
