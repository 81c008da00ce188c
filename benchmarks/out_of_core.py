"""Memory and speed from disk: training and the latent space streamed from a backed .h5ad.

For each ``--cells`` size, a synthetic ``.h5ad`` of NB counts (``--genes`` genes, about
10 % non-zero, 4 batches; written chunk by chunk by
:func:`pyro_scvi.datasets.synthetic_large.write_synthetic_h5ad`) is opened in backed mode,
and a new process per run does what a user does:
``SCVI(anndata.read_h5ad(path, backed="r"), batch_key="batch", streamed=...)``, ``train``
for ``--epochs`` epochs, then ``get_latent_representation()``. It reports the process's
peak resident memory (``ru_maxrss``: fit and latent together), training cells per second
(the epochs after the first, else the first) and seconds for the latent space, for the
streamed run and, up to ``--max-in-memory`` cells, the in-memory run beside it.

Then the command line end to end, in a new process per size:
``python -m pyro_scvi fit BIG.h5ad -o out.h5ad --max-epochs E --data-source streamed``
(``--cli-data-source``; run as ``pyro_scvi.cli.main`` in a small wrapper that reads the
process's own peak RSS when it returns): training, latent space and writing the output
``.h5ad`` (at these sizes without the dense normalized layer, which ``--normalized auto``
leaves out above 50 million entries; ``--cli-normalized-genes N`` also asks for N genes'
normalized expression). It reports peak RSS, wall seconds and the output's size.

The issue's targets: peak RSS <= 3 GiB for 1,000,000 x 2,000 streamed (fit + latent,
and the CLI with its output); epoch time linear
in cells (cells/s flat from 10k to 1M). Results: ``benchmarks/results/out_of_core.{json,md}``.
``--smoke``: tiny sizes for the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _common

RESULTS = _common.REPO / "benchmarks" / "results"


def worker(path: str, streamed: bool, epochs: int, out: str) -> None:
    """One run in this process: fit and latent; writes its figures to ``out``."""
    import anndata
    import numpy as np

    import pyro_scvi

    start = time.perf_counter()
    model = pyro_scvi.SCVI(
        anndata.read_h5ad(path, backed="r"), batch_key="batch", streamed=streamed
    )
    setup = time.perf_counter() - start
    model.train(max_epochs=epochs, progress_bar=False, seed=0)
    epochs_s = [float(v) for v in model.history["seconds"]]
    steady = epochs_s[1:] or epochs_s
    start = time.perf_counter()
    z = model.get_latent_representation()
    latent = time.perf_counter() - start
    result = {
        "setup_seconds": setup,
        "epoch_seconds": epochs_s,
        "train_cells_per_second": len(model.train_indices) * len(steady) / sum(steady),
        "latent_seconds": latent,
        "latent_finite": bool(np.isfinite(z).all()),
        "validation_elbo_per_cell": float(model.history["validation_elbo"].iloc[-1]),
        "data_source": model.engine["reasons"]["data_source"],
        "peak_rss_mib": peak_rss_mib(),
    }
    Path(out).write_text(json.dumps(result))


def cli_worker(out: str, argv: list[str]) -> None:
    """Run ``pyro-scvi argv`` here as ``python -m pyro_scvi`` does; status, peak RSS to ``out``."""
    from pyro_scvi.cli import main as cli_main

    status = cli_main(argv)
    Path(out).write_text(json.dumps({"status": status, "peak_rss_mib": peak_rss_mib()}))


def run_cli(path: Path, epochs: int, data_source: str, n_genes_out: int) -> dict[str, Any]:
    """The CLI's fit on ``path`` in a new process: peak RSS, seconds, output size."""
    import anndata
    import numpy as np

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        out = Path(tmp) / "out.h5ad"
        argv = ["fit", str(path), "-o", str(out), "--max-epochs", str(epochs)]
        argv += ["--batch-key", "batch", "--data-source", data_source, "--quiet"]
        if n_genes_out:
            backed = anndata.read_h5ad(path, backed="r")
            argv += ["--normalized-genes", *map(str, backed.var_names[:n_genes_out])]
            backed.file.close()
        report = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--cli-worker", str(report), *argv]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0 or not report.exists():
            return {"error": done.stderr[-2000:]}
        result = json.loads(report.read_text())
        written = anndata.read_h5ad(out, backed="r")
        params = written.uns["pyro_scvi"]["params"]
        shown = ["python -m pyro_scvi", *argv[:2], "-o out.h5ad", *argv[4:]]
        if n_genes_out:
            shown = [*shown[:-n_genes_out], f"[{n_genes_out} genes]"]
        result.update(
            wall_seconds=wall,
            output_mib=out.stat().st_size / 2**20,
            data_source=str(params["data_source"]),
            normalized=str(params["normalized_reason"]),
            latent_finite=bool(np.isfinite(written.obsm["X_pyro_scvi"]).all()),
            validation_elbo_per_cell=float(
                written.uns["pyro_scvi"]["history"]["validation_elbo"][-1]
            ),
            command=" ".join(shown),
        )
        written.file.close()
        return result


def peak_rss_mib() -> float:
    """This process's peak resident memory (``VmHWM``), MiB.

    Not ``ru_maxrss``: Linux carries that over fork and exec, so a worker started by a
    parent that once held more would report the parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(path: Path, streamed: bool, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, __file__, "--worker", str(path), str(int(streamed)), str(epochs)]
        cmd.append(str(out))
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        result = json.loads(out.read_text())
        result["wall_seconds"] = time.perf_counter() - start
        return result


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    lines = [
        "# Out-of-core: training and latent space streamed from a backed .h5ad",
        "",
        f"Machine: {_common.machine_line(meta)}. Command: `{meta.get('command')}`",
        "",
        "Peak RSS: the whole process (imports, fit, latent). Cells/s: training cells per "
        "second over the epochs after the first (with one epoch, that epoch).",
        "",
        "| cells | genes | file MiB | data | epochs | train cells/s | latent s | peak RSS MiB |"
        " validation ELBO/cell |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        if "error" in r:
            lines.append(f"| {r['cells']:,} | {r['genes']:,} | | {r['mode']} | | failed | | | |")
            continue
        lines.append(
            f"| {r['cells']:,} | {r['genes']:,} | {r['file_mib']:,.0f} | {r['mode']} | "
            f"{r['epochs']} | {r['train_cells_per_second']:,.0f} | {r['latent_seconds']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['validation_elbo_per_cell']:.2f} |"
        )
    cli = results.get("cli", [])
    if cli:
        lines += [
            "",
            "The command line end to end (training, latent space, writing the output), one "
            "process per size; peak RSS of that process:",
            "",
            "| cells | genes | epochs | data | wall s | peak RSS MiB | output MiB | normalized "
            "expression |",
            "|---:|---:|---:|---|---:|---:|---:|---|",
        ]
        for r in cli:
            if "error" in r:
                lines.append(
                    f"| {r['cells']:,} | {r['genes']:,} | {r['epochs']} | failed | | | | |"
                )
                continue
            lines.append(
                f"| {r['cells']:,} | {r['genes']:,} | {r['epochs']} | {r['data_source']} | "
                f"{r['wall_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['output_mib']:,.0f} | "
                f"{r['normalized']} |"
            )
        lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in cli if "command" in r)]
    if results["args"].get("note"):
        lines += ["", results["args"]["note"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2, help="per size below 1M cells")
    p.add_argument("--epochs-1m", type=int, default=1, help="at 1M cells and above")
    p.add_argument("--max-in-memory", type=int, default=100_000)
    p.add_argument("--data-dir", type=Path, help="keep the .h5ad files here (default: temp)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--cli-data-source",
        choices=["auto", "memory", "streamed", "skip"],
        default="streamed",
        help="--data-source of the CLI runs (skip: no CLI runs)",
    )
    p.add_argument(
        "--cli-normalized-genes",
        type=int,
        default=0,
        metavar="N",
        help="the CLI runs also write the first N genes' normalized expression",
    )
    p.add_argument("--note", default="", help="a line for the results, e.g. on the load")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.epochs, args.max_in_memory = [600, 1200], 40, 2, 1200
        args.cli_normalized_genes = 2
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        path, streamed, epochs, out = sys.argv[2:6]
        worker(path, bool(int(streamed)), int(epochs), out)
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--cli-worker":
        cli_worker(sys.argv[2], sys.argv[3:])
        return 0
    args = parse_args(argv)
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    meta = _common.run_metadata(argv, None, script="out_of_core.py")
    results: dict[str, Any] = {"meta": meta, "args": vars(args), "runs": [], "cli": []}
    stem = "out_of_core_smoke" if args.smoke else "out_of_core"
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in args.cells:
            path = folder / f"synthetic_{n}x{args.genes}.h5ad"
            if not path.exists():
                start = time.perf_counter()
                write_synthetic_h5ad(path, n, args.genes, seed=0, chunk=10_000)
                print(f"wrote {path} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
            epochs = args.epochs_1m if n >= 1_000_000 else args.epochs
            modes = [("streamed", True)] + (
                [("in memory", False)] if n <= args.max_in_memory else []
            )
            for mode, streamed in modes:
                row = {"cells": n, "genes": args.genes, "mode": mode, "epochs": epochs}
                row["file_mib"] = path.stat().st_size / 2**20
                row.update(run(path, streamed, epochs))
                results["runs"].append(row)
                print(
                    f"{n:>9,} {mode:>9}: "
                    + (
                        f"{row['train_cells_per_second']:,.0f} cells/s, "
                        f"peak RSS {row['peak_rss_mib']:,.0f} MiB"
                        if "error" not in row
                        else row["error"][-800:]
                    ),
                    file=sys.stderr,
                )
                _common.write_results(args.out, stem, results, markdown(results))
            if args.cli_data_source != "skip":
                row = {"cells": n, "genes": args.genes, "epochs": epochs}
                row.update(run_cli(path, epochs, args.cli_data_source, args.cli_normalized_genes))
                results["cli"].append(row)
                print(
                    f"{n:>9,}       CLI: "
                    + (
                        f"{row['wall_seconds']:,.0f} s, peak RSS {row['peak_rss_mib']:,.0f} MiB"
                        if "error" not in row
                        else row["error"][-800:]
                    ),
                    file=sys.stderr,
                )
                _common.write_results(args.out, stem, results, markdown(results))
    failed = [r for r in results["runs"] + results["cli"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
