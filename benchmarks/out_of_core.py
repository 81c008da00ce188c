"""Memory and speed from disk: training, the latent space and the CLI on a backed .h5ad.

Target: peak RSS <= 3 GiB at 1,000,000 x 2,000. Details: ``benchmarks/README.md``.

    python -m benchmarks.out_of_core --cells 100000 1000000 --data-dir "$DATA"
    python -m benchmarks.out_of_core --smoke
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .lib import results, workers

STUDY = "out_of_core"
TABLES = {"api": "runs", "cli": "cli", "queries": "queries"}
MARKS = ("†", "‡", "§", "¶")  # rows kept from earlier runs, in order of first appearance


def worker(path: str, streamed: bool, epochs: int, out: str) -> None:
    """Fit and latent space in this process; its figures to ``out``."""
    import anndata
    import numpy as np

    import pyro_scvi

    start, adata = time.perf_counter(), anndata.read_h5ad(path, backed="r")
    model = pyro_scvi.SCVI(adata, batch_key="batch", streamed=streamed)
    setup = time.perf_counter() - start
    model.train(max_epochs=epochs, progress_bar=False, seed=0)
    epochs_s = [float(v) for v in model.history["seconds"]]
    steady, start = epochs_s[1:] or epochs_s, time.perf_counter()
    z = model.get_latent_representation()
    result = {
        "setup_seconds": setup, "epoch_seconds": epochs_s,
        "train_cells_per_second": len(model.train_indices) * len(steady) / sum(steady),
        "latent_seconds": time.perf_counter() - start, "latent_finite": bool(np.isfinite(z).all()),
        "validation_elbo_per_cell": float(model.history["validation_elbo"].iloc[-1]),
        "data_source": model.engine["reasons"]["data_source"],
        "peak_rss_mib": workers.status_mib("VmHWM"),
    }  # fmt: skip
    Path(out).write_text(json.dumps(result))


def cli_worker(out: str, argv: list[str]) -> None:
    """``pyro-scvi argv`` in this process; its status and peak RSS (``VmHWM``: not
    ``ru_maxrss``, which Linux carries over from the parent) to ``out``."""
    from pyro_scvi.cli import main as cli_main

    status = cli_main(argv)
    report = {"status": status, "peak_rss_mib": workers.status_mib("VmHWM")}
    Path(out).write_text(json.dumps(report))


def process(args: list[str], report: Path | None = None) -> dict[str, Any]:
    """``python -m benchmarks.out_of_core ARGS`` in a new process: its report (or the end of
    its stderr as ``error``), wall seconds and stdout."""
    start = time.perf_counter()
    cmd = [sys.executable, "-m", f"benchmarks.{STUDY}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=results.REPO)
    wall = time.perf_counter() - start
    if done.returncode != 0 or report is None or not report.exists():
        return {"error": done.stderr[-2000:], "wall_seconds": wall}
    out = json.loads(report.read_text()) | {"wall_seconds": wall, "stdout": done.stdout[-4000:]}
    return out | ({"error": done.stderr[-2000:]} if out.get("status", 0) != 0 else {})


def run_api(path: Path, streamed: bool, epochs: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "r.json"
        argv = ["--worker", str(path), str(int(streamed)), str(epochs), str(report)]
        out = process(argv, report)
        return {k: v for k, v in out.items() if k != "stdout"}


def run_cli(path: Path, work: Path, epochs: int, args: argparse.Namespace) -> dict[str, Any]:
    """The CLI's fit on ``path``, writing ``work/out.h5ad`` and ``work/out_model``."""
    import anndata
    import numpy as np

    out, n = work / "out.h5ad", args.cli_normalized_genes
    argv = ["fit", str(path), "-o", str(out), "--max-epochs", str(epochs), "--batch-key", "batch"]
    argv += ["--data-source", args.cli_data_source, "--quiet"]
    if n:
        backed = anndata.read_h5ad(path, backed="r")
        argv += ["--normalized-genes", *map(str, backed.var_names[:n])]
        backed.file.close()
    report = work / "fit_report.json"
    result = process(["--cli-worker", str(report), *argv], report)
    if "error" in result:
        return result
    written = anndata.read_h5ad(out, backed="r")
    params, history = written.uns["pyro_scvi"]["params"], written.uns["pyro_scvi"]["history"]
    shown = ["python -m pyro_scvi", *argv[:2], "-o out.h5ad", *argv[4:]]
    shown = [*shown[:-n], f"[{n} genes]"] if n else shown
    result |= {
        "output_mib": out.stat().st_size / 2**20, "data_source": str(params["data_source"]),
        "normalized": str(params["normalized_reason"]), "command": " ".join(shown),
        "latent_finite": bool(np.isfinite(written.obsm["X_pyro_scvi"]).all()),
        "validation_elbo_per_cell": float(history["validation_elbo"][-1]),
    }  # fmt: skip
    written.file.close()
    return {k: v for k, v in result.items() if k != "stdout"}


def run_queries(
    path: Path, work: Path, query: Path, args: argparse.Namespace
) -> Iterator[dict[str, Any]]:
    """Each query command in a new process after the CLI fit; a row per command."""
    import anndata
    import numpy as np
    import pandas as pd

    model, data, src = str(work / "out_model"), str(path), "--data-source streamed".split()
    de = "--groupby cell_type --group1 type0 --group2 type1 --n-samples".split()
    ppc, plot = ["-o", str(work / "ppc.nc"), "--max-cells", str(args.ppc_cells)], ["-o"]
    plot += [str(work / "plot.png"), "--method", "pca"]
    mapped = ["-o", str(work / "mapped.h5ad"), "--max-epochs", "1", "--quiet"]
    commands = {  # name: (argv, settings)
        "evaluate": (["evaluate", model, data, *src, "--n-samples", str(args.evaluate_samples)],
                     f"held-out cells, K = {args.evaluate_samples}"),
        "de": (["de", model, data, *de, str(args.de_samples), *src, "-o", str(work / "de.csv")],
               f"type0 vs type1 (no cap on cells; these two of 10 types), {args.de_samples} "
               "samples"),
        "ppc": (["ppc", model, data, *ppc, *src], f"{args.ppc_cells:,} cells, 50 draws (default)"),
        "plot": (["plot", str(work / "out.h5ad"), *plot, *src],
                 "PCA of the fit's obsm['X_pyro_scvi'], all cells"),
        "map-query": (["map-query", model, str(query), *mapped, *src],
                      f"{args.query_cells:,}-cell query, 1 epoch"),
    }  # fmt: skip
    for name, (argv, settings) in commands.items():
        report = work / f"{name}_report.json"
        row = {"query": name, "settings": settings}
        row |= process(["--cli-worker", str(report), *argv], report)
        shown = [a.replace(str(work) + "/", "").replace(str(path.parent) + "/", "") for a in argv]
        row["command"] = "python -m pyro_scvi " + " ".join(shown)
        stdout = row.pop("stdout", "")
        if "error" not in row:
            if name == "evaluate":
                n = json.loads(stdout.strip().splitlines()[-1])
                row |= {"n_cells": n["n_cells"], "check_finite": n["elbo_mean"] is not None}
            elif name == "de":
                t = pd.read_csv(work / "de.csv")
                n_cells = int(t["n_cells1"].iloc[0] + t["n_cells2"].iloc[0])
                row |= {"n_cells": n_cells, "check_finite": bool(np.isfinite(t["lfc_mean"]).all())}
            elif name == "ppc":
                row |= {"n_cells": args.ppc_cells, "check_finite": (work / "ppc.nc").exists()}
                row["output_mib"] = (work / "ppc.nc").stat().st_size / 2**20
            else:
                out = work / f"{'out' if name == 'plot' else 'mapped'}.h5ad"
                written = anndata.read_h5ad(out, backed="r")
                finite = np.isfinite(written.obsm["X_pyro_scvi"]).all()
                ok = (work / "plot.png").exists() if name == "plot" else finite
                row |= {"n_cells": written.n_obs, "check_finite": bool(ok)}
                written.file.close()
        yield row


def write_query_file(path: Path, n_cells: int, n_genes: int) -> Path:
    """A query for ``map-query``: the generator with seed 1, batches renamed to new names."""
    import anndata
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    if not path.exists():
        write_synthetic_h5ad(path, n_cells, n_genes, seed=1, chunk=10_000)
        query = anndata.read_h5ad(path)  # small: in memory, in the parent
        query.obs["batch"] = query.obs["batch"].cat.rename_categories(lambda b: f"query_{b}")
        query.write_h5ad(path)
    return path


def earlier_runs(res: dict[str, Any]) -> list[dict[str, str]]:
    found: list[dict[str, str]] = []
    for key in TABLES.values():  # each table's runs not found in the tables before it
        kept = [r["from_run"] for r in res.get(key, []) if "from_run" in r]
        found += [run for run in kept if run not in found]
    return found


def merged(res: dict[str, Any], earlier: dict[str, Any] | None) -> dict[str, Any]:
    """``res`` plus the rows of ``earlier`` this run did not measure at their cells (a failed
    row replaces nothing), each with ``from_run``: the run that made it (``--merge``)."""
    if not earlier:
        return res
    note, out = str(earlier["args"].get("note") or ""), dict(res)
    for key in TABLES.values():
        redone = {r["cells"] for r in res.get(key, []) if "error" not in r}
        kept = results.keep_not_redone(earlier.get(key, []), redone, "cells", earlier, note)
        out[key] = sorted(kept + res.get(key, []), key=lambda r: r["cells"])  # stable per size
    return out


def markdown(res: dict[str, Any]) -> str:
    runs = earlier_runs(res)
    marks = {json.dumps(r, sort_keys=True): m for m, r in zip(MARKS, runs, strict=False)}

    def cells(r: dict[str, Any]) -> str:
        mark = marks.get(json.dumps(r["from_run"], sort_keys=True), "") if "from_run" in r else ""
        return f"{r['cells']:,} {mark}".strip()

    title = "Out-of-core: training, latent space and queries streamed from a backed .h5ad"
    lines = results.header(res, title, HOW)
    rows = [f"{cells(r)} | {r['genes']:,} | | {r['mode']} | | failed | | | |" if "error" in r
            else f"{cells(r)} | {r['genes']:,} | {r['file_mib']:,.0f} | {r['mode']} | "
            f"{r['epochs']} | {r['train_cells_per_second']:,.0f} | {r['latent_seconds']:.1f} | "
            f"{r['peak_rss_mib']:,.0f} | {r['validation_elbo_per_cell']:.2f}"
            for r in res["runs"]]  # fmt: skip
    columns = "cells:|genes:|file MiB:|data|epochs:|train cells/s:|latent s:|peak RSS MiB:|"
    lines += results.md_table(columns + "validation ELBO/cell:", rows)
    if cli := res.get("cli"):
        rows = [f"{cells(r)} | {r['genes']:,} | {r['epochs']} | failed | | | | " if "error" in r
                else f"{cells(r)} | {r['genes']:,} | {r['epochs']} | {r['data_source']} | "
                f"{r['wall_seconds']:,.0f} | {r['peak_rss_mib']:,.0f} | {r['output_mib']:,.0f} | "
                f"{r['normalized']}" for r in cli]  # fmt: skip
        columns = "cells:|genes:|epochs:|data|wall s:|peak RSS MiB:|output MiB:|"
        lines += ["", CLI_NOTE, "", *results.md_table(columns + "normalized expression", rows)]
        lines += ["", "Commands: " + "; ".join(f"`{r['command']}`" for r in cli if "command" in r)]
    if queries := res.get("queries"):
        rows = [f"{cells(r)} | {r['genes']:,} | {r['query']} | {r['settings']} | "
                + (f"| | | {r.get('status', 'failed')} (failed)" if "error" in r
                   else f"{r.get('n_cells', 0):,} | {r['wall_seconds']:,.0f} | "
                   f"{r['peak_rss_mib']:,.0f} | {r['status']}") for r in queries]  # fmt: skip
        columns = "cells:|genes:|command|settings|cells used:|wall s:|peak RSS MiB:|exit status:"
        lines += ["", QUERIES_NOTE, "", *results.md_table(columns, rows)]
        largest = max(r["cells"] for r in queries)
        lines += ["", f"Commands (at {largest:,} cells; BIG.h5ad is the streamed input):", ""]
        lines += [f"- `{r['command'].replace(Path(r['input']).name, 'BIG.h5ad')}`"
                  for r in queries if r["cells"] == largest and "command" in r]  # fmt: skip
    lines += ["", res["args"]["note"]] if res["args"].get("note") else []
    kept = "kept by `--merge`: this run did not redo these rows."
    for mark, run in zip(MARKS, runs, strict=False):
        source = f"{run['date']}, pyro_scvi commit {run['commit']}, command `{run['command']}`"
        lines += ["", f"{mark} From an earlier run ({source}), {kept} {run.get('note', '')}"]
    return "\n".join(lines) + "\n"


HOW = ("Peak RSS: the whole process (imports, fit, latent). Cells/s: training cells per second "
       "over the epochs after the first (with one epoch, that epoch).")  # fmt: skip
CLI_NOTE = ("The command line end to end (training, latent space, writing the output), one "
            "process per size; peak RSS of that process:")  # fmt: skip
QUERIES_NOTE = (
    "The query commands end to end on the streamed file, one new process each, after that size's "
    "CLI fit above wrote `out.h5ad` and its model folder `out_model`; peak RSS of that process "
    "(target: <= 3 GiB = 3,072 MiB at 1,000,000 cells):"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    merge = "keep the results' rows this run does not redo"
    p, add = results.parser(__doc__, out="--out", data_dir=False, merge=merge)
    add("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    add("--genes", type=int, default=2000)
    add("--epochs", type=int, default=2, help="per size below 1M cells")
    add("--epochs-1m", type=int, default=1, help="at 1M cells and above")
    add("--max-in-memory", type=int, default=100_000)
    add("--data-dir", type=Path, help="keep the .h5ad files here (default: temporary)")
    add("--cli-data-source", choices=["auto", "memory", "streamed"], default="streamed")
    add("--cli-normalized-genes", type=int, default=0, metavar="N", help="N genes' normalized")
    add("--only", nargs="+", choices=list(TABLES), default=list(TABLES), help="the tables to run")
    for name, default in (("evaluate-samples", 10), ("de-samples", 100), ("ppc-cells", 2000)):
        add(f"--{name}", type=int, default=default)
    add("--query-cells", type=int, default=10_000)
    add("--note", default="", help="a line for the results, e.g. on the load")
    args = p.parse_args(argv)
    if args.smoke:
        args.cells, args.genes, args.epochs, args.max_in_memory = [600, 1200], 40, 2, 1200
        vars(args).update(cli_normalized_genes=2, ppc_cells=50, query_cells=200, de_samples=20)
    return args


def main(argv: list[str] | None = None) -> int:
    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] == ["--worker"]:
        return worker(raw[1], bool(int(raw[2])), int(raw[3]), raw[4]) or 0
    if raw[:1] == ["--cli-worker"]:
        return cli_worker(raw[1], raw[2:]) or 0
    args = parse_args(argv)
    from pyro_scvi.datasets.synthetic_large import write_synthetic_h5ad

    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    res: dict[str, Any] = {"meta": results.metadata(STUDY, argv), "args": settings}
    res |= {key: [] for key in TABLES.values()}
    stem = results.stem(STUDY, args.smoke)
    earlier = results.read(args.out / f"{stem}.json") if args.merge else None

    def write(key: str, label: str, row: dict[str, Any]) -> None:
        res[key].append(row)
        if not (done := row.get("error", "")[-800:]):
            speed, unit = row.get("train_cells_per_second"), "cells/s"
            if key != "runs":
                speed, unit = row["wall_seconds"], "s"
            done = f"peak RSS {row['peak_rss_mib']:,.0f} MiB, {speed:,.0f} {unit}"
        print(f"{row['cells']:>9,} {label:>9}: {done}", file=sys.stderr)
        both = merged(res, earlier)
        results.write(args.out, stem, both, markdown(both))

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
            base = {"cells": n, "genes": args.genes, "epochs": epochs}
            modes = [("streamed", True)] + [("in memory", False)] * (n <= args.max_in_memory)
            for mode, streamed in modes if "api" in args.only else []:
                row = base | {"mode": mode, "file_mib": path.stat().st_size / 2**20}
                row |= run_api(path, streamed, epochs)
                write("runs", mode, row)
            work = folder / f"cli_{n}x{args.genes}"  # the CLI fit, kept for the queries
            if "cli" in args.only:
                shutil.rmtree(work, ignore_errors=True)
                work.mkdir()
                write("cli", "CLI", base | run_cli(path, work, epochs, args))
            if "queries" in args.only:
                base = {"cells": n, "genes": args.genes, "input": str(path)}
                if not (work / "out_model").is_dir():
                    error = f"no CLI fit in {work} to query; run with --only cli queries"
                    row = base | {"query": "all", "settings": "", "error": error}
                    write("queries", "queries", row)
                else:
                    query = folder / f"query_{args.query_cells}x{args.genes}.h5ad"
                    write_query_file(query, args.query_cells, args.genes)
                    for row in run_queries(path, work, query, args):
                        write("queries", row["query"], base | row)
            if args.data_dir is None:
                shutil.rmtree(work, ignore_errors=True)  # the output is as big as the data
    return 1 if any("error" in r for key in TABLES.values() for r in res[key]) else 0


if __name__ == "__main__":
    sys.exit(main())
