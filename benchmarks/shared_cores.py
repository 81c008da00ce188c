"""The main job's epoch time when another CPU-bound process shares the cores.

A training step of scVI's small networks is a chain of short parallel regions, each
waiting for its slowest thread; when another busy process holds one of the cores, one of
torch's threads waits for the scheduler in every region, and a step takes several times
as long. pyro_scvi's engine therefore lets torch's thread count follow the cores that
other processes leave free (:class:`pyro_scvi.train.engine.ThreadPolicy`). This benchmark
measures the README's main job (``SCVI(pbmc8k_200hvg).train()`` at default settings, for
``--epochs`` epochs) with the cores idle and with one competitor (a Python busy loop,
started before training), for:

* ``auto``: the default (threads follow the free cores);
* ``fixed``: torch's own default thread count, held fixed (what runs got before the
  engine chose, and what most PyTorch code does).

Each (setting, condition, repeat) runs in its own subprocess; conditions alternate. The
figure is the median epoch time (epochs after the first) with a competitor divided by the
idle one, per setting; the goal for ``auto`` is at most 1.5.

::

    python benchmarks/shared_cores.py            # about 4 minutes on 2 cores
    python benchmarks/shared_cores.py --smoke    # seconds

Results: ``benchmarks/results/shared_cores.{json,md}`` (``--smoke``: ``*_smoke.*``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine_line, run_metadata, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

_WORKER = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch
import pyro_scvi
setting, epochs, n_cells = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
adata = pyro_scvi.datasets.pbmc8k_200hvg()
if n_cells:
    adata = adata[:n_cells].copy()
engine = pyro_scvi.Engine(threads=torch.get_num_threads()) if setting == "fixed" else None
model = pyro_scvi.SCVI(adata)
start = time.perf_counter()
model.train(max_epochs=epochs, engine=engine, progress_bar=False)
print(json.dumps({
    "train_seconds": time.perf_counter() - start,
    "epoch_seconds": model.history["seconds"].tolist(),
    "threads": model.history["threads"].tolist(),
    "engine": model.engine,
}))
"""


def run_once(setting: str, busy: bool, epochs: int, n_cells: int) -> dict:
    """One training run in a subprocess, with or without a busy competitor."""
    competitor = None
    if busy:
        competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)  # let it be scheduled before training starts
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _WORKER, setting, str(epochs), str(n_cells)],
            capture_output=True,
            text=True,
            check=False,
        )
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    steady = out["epoch_seconds"][1:] or out["epoch_seconds"]
    out["median_epoch_seconds"] = statistics.median(steady)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--settings", nargs="+", default=["auto", "fixed"])
    parser.add_argument(
        "--smoke", action="store_true", help="200 cells, 2 epochs, 1 repeat, first setting"
    )
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    epochs, repeats, n_cells = args.epochs, args.repeats, 0
    if args.smoke:
        epochs, repeats, n_cells = 2, 1, 200
        args.settings = args.settings[:1]
    runs = []
    for repeat in range(repeats):
        for setting in args.settings:
            for busy in (False, True) if repeat % 2 == 0 else (True, False):
                run = run_once(setting, busy, epochs, n_cells)
                run.update(setting=setting, busy=busy, repeat=repeat)
                runs.append(run)
                print(
                    f"{setting:5s} {'busy' if busy else 'idle'} repeat {repeat}: "
                    + (
                        "error"
                        if "error" in run
                        else f"median epoch {run['median_epoch_seconds']:.3f} s, "
                        f"threads {sorted(set(run['threads']))}"
                    ),
                    flush=True,
                )
    summary = {}
    for setting in args.settings:
        medians = {
            busy: [
                r["median_epoch_seconds"]
                for r in runs
                if r["setting"] == setting and r["busy"] is busy and "error" not in r
            ]
            for busy in (False, True)
        }
        if medians[False] and medians[True]:
            idle, shared = statistics.median(medians[False]), statistics.median(medians[True])
            summary[setting] = {
                "idle_epoch_seconds": idle,
                "shared_epoch_seconds": shared,
                "ratio": shared / idle,
            }
    meta = run_metadata(argv, None)
    results = {"meta": meta, "settings": vars(args) | {"out_dir": str(args.out_dir)}}
    results.update(runs=runs, summary=summary)
    lines = [
        "# Main job epoch time with one other CPU-bound process on the cores",
        "",
        f"{meta['date']}; {machine_line(meta)}; `{meta['command']}`",
        "",
        f"pbmc8k_200hvg{f' ({n_cells} cells)' if n_cells else ''}, default settings, "
        f"{epochs} epochs, {repeats} repeat(s); median epoch time (epochs after the first).",
        "",
        "| threads | idle s/epoch | shared s/epoch | shared / idle |",
        "|---|---|---|---|",
    ]
    for setting, s in summary.items():
        lines.append(
            f"| {setting} | {s['idle_epoch_seconds']:.3f} | {s['shared_epoch_seconds']:.3f} | "
            f"{s['ratio']:.2f} |"
        )
    lines += [
        "",
        "auto: the engine's default (threads follow the cores other processes leave free); "
        "fixed: torch's default thread count held for the whole run. Goal for auto: "
        "shared / idle at most 1.5.",
        "",
    ]
    table = "\n".join(lines)
    print(table)
    write_results(
        args.out_dir, "shared_cores_smoke" if args.smoke else "shared_cores", results, table
    )
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
