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

Then the query commands end to end on the same streamed file, each in a new process after
that size's CLI fit has written its output and model folder (``--queries``, the default):
``evaluate MODEL_DIR BIG.h5ad --data-source streamed`` (the held-out cells; ``--n-samples``
from ``--evaluate-samples``), ``de`` with one comparison of ``obs["cell_type"]`` (``--group1
type0 --group2 type1``: ``de`` has no cap on cells per group, so a pair of the 10 types
rather than one type against the rest, which would decode every cell; ``--n-samples`` from
``--de-samples``), ``ppc --max-cells N`` (``--ppc-cells``; streamed ppc needs it), ``plot
out.h5ad --method pca`` (UMAP and t-SNE of a million cells cost far more than reading
them), and ``map-query`` of a small query file (``--query-cells`` cells of the same
generator with seed 1, its batches renamed ``query_batch*`` so they are new to the model)
for one epoch. Each reports peak RSS, wall seconds and its exit status.

``--only`` runs some of the three tables (``api``, ``cli``, ``queries``); with a
``--data-dir`` the CLI fit's output and model folder stay there
(``cli_<cells>x<genes>/``), so ``--only queries`` can reuse them. ``--merge`` keeps the
rows of the existing results file that this run does not redo (same table and size),
each marked as from that earlier run.

The issue's targets: peak RSS <= 3 GiB for 1,000,000 x 2,000 streamed (fit + latent,
and the CLI with its output and queries); epoch time linear
in cells (cells/s flat from 10k to 1M). Results: ``benchmarks/results/out_of_core.{json,md}``.
``--smoke``: tiny sizes for the test suite.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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


def cli_process(argv: list[str], report: Path) -> dict[str, Any]:
    """``pyro-scvi argv`` in a new process (:func:`cli_worker`): status, peak RSS, wall seconds.

    A dict with ``error`` (the end of stderr) when the process fails or the command's
    status is not 0; its stdout is under ``stdout``.
    """
    cmd = [sys.executable, __file__, "--cli-worker", str(report), *argv]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not report.exists():
        return {"error": done.stderr[-2000:], "wall_seconds": wall}
    result = json.loads(report.read_text())
    result.update(wall_seconds=wall, stdout=done.stdout[-4000:])
    if result["status"] != 0:
        result["error"] = done.stderr[-2000:]
    return result


def run_cli(
    path: Path, work: Path, epochs: int, data_source: str, n_genes_out: int
) -> dict[str, Any]:
    """The CLI's fit on ``path`` in a new process, writing into ``work``: peak RSS, seconds,
    output size. Leaves ``work/out.h5ad`` and ``work/out_model`` for the queries."""
    import anndata
    import numpy as np

    out = work / "out.h5ad"
    argv = ["fit", str(path), "-o", str(out), "--max-epochs", str(epochs)]
    argv += ["--batch-key", "batch", "--data-source", data_source, "--quiet"]
    if n_genes_out:
        backed = anndata.read_h5ad(path, backed="r")
        argv += ["--normalized-genes", *map(str, backed.var_names[:n_genes_out])]
        backed.file.close()
    result = cli_process(argv, work / "fit_report.json")
    if "error" in result:
        return result
    written = anndata.read_h5ad(out, backed="r")
    params = written.uns["pyro_scvi"]["params"]
    shown = ["python -m pyro_scvi", *argv[:2], "-o out.h5ad", *argv[4:]]
    if n_genes_out:
        shown = [*shown[:-n_genes_out], f"[{n_genes_out} genes]"]
    result.update(
        output_mib=out.stat().st_size / 2**20,
        data_source=str(params["data_source"]),
        normalized=str(params["normalized_reason"]),
        latent_finite=bool(np.isfinite(written.obsm["X_pyro_scvi"]).all()),
        validation_elbo_per_cell=float(written.uns["pyro_scvi"]["history"]["validation_elbo"][-1]),
        command=" ".join(shown),
    )
    written.file.close()
    return result


def write_query_file(path: Path, n_cells: int, n_genes: int) -> Path:
    """A query for ``map-query``: the generator with seed 1, batches renamed to new names."""
    import anndata
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    if not path.exists():
        write_synthetic_h5ad(path, n_cells, n_genes, seed=1, chunk=10_000)
        query = anndata.read_h5ad(path)  # small: in memory here, in the parent
        query.obs["batch"] = query.obs["batch"].cat.rename_categories(lambda b: f"query_{b}")
        query.write_h5ad(path)
    return path


def query_commands(
    path: Path, work: Path, query: Path, args: argparse.Namespace
) -> list[tuple[str, list[str], str]]:
    """``(name, argv, settings)`` of each query command on ``path`` after the CLI fit."""
    model, source = str(work / "out_model"), ["--data-source", "streamed"]
    return [
        (
            "evaluate",
            ["evaluate", model, str(path), *source, "--n-samples", str(args.evaluate_samples)],
            f"held-out cells, K = {args.evaluate_samples}",
        ),
        (
            "de",
            ["de", model, str(path), "--groupby", "cell_type", "--group1", "type0"]
            + ["--group2", "type1", "--n-samples", str(args.de_samples), *source]
            + ["-o", str(work / "de.csv")],
            f"type0 vs type1 (no cap on cells; these two of 10 types), {args.de_samples} samples",
        ),
        (
            "ppc",
            ["ppc", model, str(path), "-o", str(work / "ppc.nc")]
            + ["--max-cells", str(args.ppc_cells), *source],
            f"{args.ppc_cells:,} cells, 50 draws (default)",
        ),
        (
            "plot",
            ["plot", str(work / "out.h5ad"), "-o", str(work / "plot.png"), "--method", "pca"]
            + source,
            "PCA of the fit's obsm['X_pyro_scvi'], all cells",
        ),
        (
            "map-query",
            ["map-query", model, str(query), "-o", str(work / "mapped.h5ad")]
            + ["--max-epochs", "1", "--quiet", *source],
            f"{args.query_cells:,}-cell query, 1 epoch",
        ),
    ]


def run_queries(
    path: Path, work: Path, query: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    """Each query command in a new process after the CLI fit; a row per command."""
    import anndata
    import numpy as np
    import pandas as pd

    rows = []
    for name, argv, settings in query_commands(path, work, query, args):
        row = {"query": name, "settings": settings}
        row.update(cli_process(argv, work / f"{name}_report.json"))
        shown = [a.replace(str(work) + "/", "").replace(str(path.parent) + "/", "") for a in argv]
        row["command"] = "python -m pyro_scvi " + " ".join(shown)
        stdout = row.pop("stdout", "")
        if "error" not in row:
            if name == "evaluate":
                summary = json.loads(stdout.strip().splitlines()[-1])
                row.update(
                    n_cells=summary["n_cells"], check_finite=summary["elbo_mean"] is not None
                )
            elif name == "de":
                table = pd.read_csv(work / "de.csv")
                row.update(
                    n_cells=int(table["n_cells1"].iloc[0] + table["n_cells2"].iloc[0]),
                    check_finite=bool(np.isfinite(table["lfc_mean"]).all()),
                )
            elif name == "ppc":
                row.update(n_cells=args.ppc_cells, check_finite=(work / "ppc.nc").exists())
                row["output_mib"] = (work / "ppc.nc").stat().st_size / 2**20
            elif name == "plot":
                fitted = anndata.read_h5ad(work / "out.h5ad", backed="r")
                row.update(n_cells=fitted.n_obs, check_finite=(work / "plot.png").exists())
                fitted.file.close()
            else:
                mapped = anndata.read_h5ad(work / "mapped.h5ad", backed="r")
                row.update(
                    n_cells=mapped.n_obs,
                    check_finite=bool(np.isfinite(mapped.obsm["X_pyro_scvi"]).all()),
                )
                mapped.file.close()
        rows.append(row)
        print(
            f"{'':>9} {name:>9}: "
            + (
                f"{row['wall_seconds']:,.0f} s, peak RSS {row['peak_rss_mib']:,.0f} MiB"
                if "error" not in row
                else row["error"][-800:]
            ),
            file=sys.stderr,
        )
    return rows


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
        "# Out-of-core: training, latent space and queries streamed from a backed .h5ad",
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
            lines.append(
                f"| {_cells(r, results)} | {r['genes']:,} | | {r['mode']} | | failed | | | |"
            )
            continue
        lines.append(
            f"| {_cells(r, results)} | {r['genes']:,} | {r['file_mib']:,.0f} | {r['mode']} | "
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
                    f"| {_cells(r, results)} | {r['genes']:,} | {r['epochs']} | failed | | | | |"
                )
                continue
            lines.append(
                f"| {_cells(r, results)} | {r['genes']:,} | {r['epochs']} | {r['data_source']} | "
                f"{r['wall_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['output_mib']:,.0f} | "
                f"{r['normalized']} |"
            )
        lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in cli if "command" in r)]
    queries = results.get("queries", [])
    if queries:
        lines += [
            "",
            "The query commands end to end on the streamed file, one new process each, after "
            "that size's CLI fit above wrote `out.h5ad` and its model folder `out_model`; "
            "peak RSS of that process (target: <= 3 GiB = 3,072 MiB at 1,000,000 cells):",
            "",
            "| cells | genes | command | settings | cells used | wall s | peak RSS MiB | "
            "exit status |",
            "|---:|---:|---|---|---:|---:|---:|---:|",
        ]
        for r in queries:
            used = f"{r['n_cells']:,}" if "n_cells" in r else ""
            if "error" in r:
                status = r.get("status", "failed")
                lines.append(
                    f"| {_cells(r, results)} | {r['genes']:,} | {r['query']} | "
                    f"{r['settings']} | | | | {status} (failed) |"
                )
                continue
            lines.append(
                f"| {_cells(r, results)} | {r['genes']:,} | {r['query']} | {r['settings']} | "
                f"{used} | {r['wall_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['status']} |"
            )
        largest = max(r["cells"] for r in queries)
        lines += ["", f"Commands (at {largest:,} cells; BIG.h5ad is the streamed input):", ""]
        for r in queries:
            if r["cells"] == largest and "command" in r:
                command = r["command"].replace(Path(r["input"]).name, "BIG.h5ad")
                lines.append(f"- `{command}`")
    if results["args"].get("note"):
        lines += ["", results["args"]["note"]]
    for mark, run in zip(MARKS, _earlier_runs(results), strict=False):
        lines += [
            "",
            f"{mark} From an earlier run ({run['date']}, pyro_scvi commit {run['commit']}, "
            f"command `{run['command']}`), kept by `--merge`: this run did not redo these "
            "rows. " + run["note"],
        ]
    return "\n".join(lines) + "\n"


#: Marks of the rows kept from earlier runs, in order of first appearance.
MARKS = ("†", "‡", "§", "¶")


def _earlier_runs(results: dict[str, Any]) -> list[dict[str, str]]:
    runs: list[dict[str, str]] = []
    for key in TABLES.values():
        for r in results.get(key, []):
            if "from_run" in r and r["from_run"] not in runs:
                runs.append(r["from_run"])
    return runs


def _cells(row: dict[str, Any], results: dict[str, Any] | None = None) -> str:
    """The cells column; a mark for a row kept from an earlier run (``--merge``)."""
    if "from_run" not in row or results is None:
        return f"{row['cells']:,}"
    return f"{row['cells']:,} {MARKS[_earlier_runs(results).index(row['from_run'])]}"


TABLES = {"api": "runs", "cli": "cli", "queries": "queries"}


def merged(results: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """``results`` plus the rows of ``earlier`` that this run does not redo (``--merge``).

    A row is redone once this run has measured a row of its table at its number of cells:
    an earlier row stays until then, and beside a failed row.
    Kept rows carry ``from_run``: the date, commit, command and note of the run that made
    them.
    """
    if not earlier:
        return results
    note = str(earlier["args"].get("note") or "")
    out = dict(results)
    for key in TABLES.values():
        redone = {r["cells"] for r in results.get(key, []) if "error" not in r}
        kept = _common.keep_not_redone(
            earlier.get(key, []), redone, "cells", earlier["meta"], note
        )
        # stable: a size's rows keep their order (streamed before in memory; the queries)
        out[key] = sorted(kept + results.get(key, []), key=lambda r: r["cells"])
    return out


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
    p.add_argument(
        "--only",
        nargs="+",
        choices=list(TABLES),
        default=list(TABLES),
        help="the tables to run: api (Python fit + latent), cli (pyro-scvi fit), queries "
        "(evaluate, de, ppc, plot, map-query after the CLI fit; without cli, they use the "
        "fit kept in --data-dir)",
    )
    p.add_argument(
        "--queries",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the query commands' table (--no-queries: leave it out of --only)",
    )
    p.add_argument("--evaluate-samples", type=int, default=10, help="evaluate's --n-samples")
    p.add_argument("--de-samples", type=int, default=100, help="de's --n-samples")
    p.add_argument("--ppc-cells", type=int, default=2000, help="ppc's --max-cells")
    p.add_argument("--query-cells", type=int, default=10_000, help="map-query's query size")
    p.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of the existing results (--out) that this run does not redo",
    )
    p.add_argument("--note", default="", help="a line for the results, e.g. on the load")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)
    if not args.queries:
        args.only = [t for t in args.only if t != "queries"]
    if args.cli_data_source == "skip":
        args.only = [t for t in args.only if t != "cli"]
    if args.smoke:
        args.cells, args.genes, args.epochs, args.max_in_memory = [600, 1200], 40, 2, 1200
        args.cli_normalized_genes, args.ppc_cells, args.query_cells = 2, 50, 200
        args.de_samples = 20
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
    results: dict[str, Any] = {
        "meta": meta,
        "args": vars(args),
        "runs": [],
        "cli": [],
        "queries": [],
    }
    stem = "out_of_core_smoke" if args.smoke else "out_of_core"
    earlier = None
    if args.merge and (args.out / f"{stem}.json").exists():
        earlier = json.loads((args.out / f"{stem}.json").read_text())

    def write() -> None:
        merged_results = merged(results, earlier)
        _common.write_results(args.out, stem, merged_results, markdown(merged_results))

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
            for mode, streamed in modes if "api" in args.only else []:
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
                write()
            # the CLI fit's output and model folder, kept with the data for the queries
            work = folder / f"cli_{n}x{args.genes}"
            if "cli" in args.only:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                row = {"cells": n, "genes": args.genes, "epochs": epochs}
                row.update(
                    run_cli(path, work, epochs, args.cli_data_source, args.cli_normalized_genes)
                )
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
                write()
            if "queries" in args.only:
                base = {"cells": n, "genes": args.genes, "input": str(path)}
                if not (work / "out_model").is_dir():
                    error = f"no CLI fit in {work} to query; run with --only cli queries"
                    results["queries"].append(
                        {**base, "query": "all", "settings": "", "error": error}
                    )
                    print(f"{n:>9,}   queries: {error}", file=sys.stderr)
                else:
                    query = folder / f"query_{args.query_cells}x{args.genes}.h5ad"
                    write_query_file(query, args.query_cells, args.genes)
                    for row in run_queries(path, work, query, args):
                        results["queries"].append({**base, **row})
                write()
            if args.data_dir is None:
                shutil.rmtree(work, ignore_errors=True)  # the output is as big as the data
    failed = [r for r in results["runs"] + results["cli"] + results["queries"] if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
