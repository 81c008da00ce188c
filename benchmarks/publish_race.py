"""Two writers finishing at once on one output: is the pair in place always one run's?

Two processes, in lockstep (a barrier before each round), each move a finished set of
outputs into the same place -- an ``.h5ad`` stand-in and a model folder, each carrying the
writer's ``run_id`` -- and after each round the pair in place is checked: the ``.h5ad``'s
``run_id`` must be the model's (issue 27, item 8); a writer that raises is counted too.
Nothing is trained: the race is in the last step.

``--step fit`` (default) runs ``pyro-scvi fit``'s own last step (the model folder staged from
a tiny model, the curves, the ``.h5ad`` and the moves); it runs on any checkout that has
``pyro_scvi.cli.fit._write_fit_outputs`` (so on the commit before the lock too, which is how
the "before" figure was measured). ``--step publish`` races
:func:`pyro_scvi.io.files.publish` alone on prebuilt files (as ``tests/test_io.py`` does).
Exit status 0 when no round mismatched, 1 otherwise.

    python -m benchmarks.publish_race                     # 200 rounds of fit's last step
    python -m benchmarks.publish_race --rounds 2000 --step publish
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path


def _fit_step(worker: int, folder: Path, rounds: int, barrier, results, errors) -> None:
    import warnings

    import pyro_scvi
    from pyro_scvi.cli.fit import _write_fit_outputs

    warnings.simplefilter("ignore")
    adata = pyro_scvi.datasets.synthetic_zinb(n_cells=40, n_genes=10, seed=worker)
    model = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8)
    model.train(1, progress_bar=False, device="cpu")
    for r in range(rounds):
        run_id = f"w{worker}-r{r}"
        barrier.wait()
        try:
            _write_fit_outputs(
                model,
                output=folder / "out.h5ad",
                model_dir=folder / "out_model",
                png=folder / "out_training.png",
                run_id=run_id,
                write=lambda path, run_id=run_id: Path(path).write_text(run_id),
                n_bytes=1000,
            )
        except Exception as err:  # a writer that fails is counted, and the race goes on
            errors.put(f"{type(err).__name__}: {err}")
        barrier.wait()
        if worker == 0:
            results.put(_pair(folder))
        barrier.wait()


def _publish_step(worker: int, folder: Path, rounds: int, barrier, results, errors) -> None:
    from pyro_scvi.io.files import make_temp_dir, publish, temp_name
    from pyro_scvi.io.model_dir import is_model_dir

    for r in range(rounds):
        run_id = f"w{worker}-r{r}"
        tmp_model = make_temp_dir(folder / "out_model")
        (tmp_model / "manifest.json").write_text(json.dumps({"run_id": run_id}))
        (tmp_model / "model.pt").write_text(run_id)
        tmp_h5ad = temp_name(folder / "out.h5ad")
        tmp_h5ad.write_text(run_id)
        barrier.wait()
        try:
            publish(
                [(tmp_h5ad, folder / "out.h5ad")],
                folders=[(tmp_model, folder / "out_model")],
                owned=lambda p: is_model_dir(p) or (p / "manifest.json").exists(),
            )
        except Exception as err:
            errors.put(f"{type(err).__name__}: {err}")
        barrier.wait()
        if worker == 0:
            results.put(_pair(folder))
        barrier.wait()


def _pair(folder: Path) -> tuple[str, str]:
    try:
        h5ad = (folder / "out.h5ad").read_text()
    except FileNotFoundError:
        h5ad = "(no .h5ad)"
    model = json.loads((folder / "out_model" / "manifest.json").read_text())["run_id"]
    return h5ad, model


def race(rounds: int, step: str = "fit", folder: Path | None = None) -> dict:
    """Race two writers for ``rounds`` rounds; return rounds, mismatches and seconds."""
    target = {"fit": _fit_step, "publish": _publish_step}[step]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) if folder is None else folder
        barrier, results, errors = ctx.Barrier(2), ctx.Queue(), ctx.Queue()
        shared = (folder, rounds, barrier, results, errors)
        procs = [ctx.Process(target=target, args=(w, *shared)) for w in (0, 1)]
        start = time.perf_counter()
        for p in procs:
            p.start()
        pairs = [results.get(timeout=600) for _ in range(rounds)]
        for p in procs:
            p.join(timeout=60)
        seconds = time.perf_counter() - start
        failed = [p.exitcode for p in procs if p.exitcode != 0]
        raised = []
        while not errors.empty():
            raised.append(errors.get())
    mismatched = [pair for pair in pairs if pair[0] != pair[1]]
    out = {"step": step, "rounds": rounds, "mismatches": len(mismatched)}
    out |= {"examples": mismatched[:3], "writer_errors": len(raised)}
    out |= {"error_examples": sorted(set(raised))[:3], "seconds": round(seconds, 1)}
    return out | {"worker_failures": failed}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--step", choices=["fit", "publish"], default="fit")
    args = p.parse_args(argv)
    result = race(args.rounds, args.step)
    print(json.dumps(result))
    clean = not (result["mismatches"] or result["writer_errors"] or result["worker_failures"])
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
