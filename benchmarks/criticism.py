"""Calibration and summary-statistic fit of pyro_scvi on every shared dataset.

For each ``.h5ad`` in the shared data folder (``--data-dir``; big ones subsampled to
``--max-cells`` random cells), each fit in ``--fits`` is trained with the package defaults
(seed 0, 90 % / 10 % split) and criticized on the 10 % held-out cells with
:func:`pyro_scvi.analysis.criticism.criticize`. A fit is a likelihood name, optionally followed by
``:key=value`` settings, comma-separated: ``dispersion`` (an :class:`~pyro_scvi.SCVI`
argument) and ``kl_warmup_epochs`` (a :meth:`~pyro_scvi.SCVI.train` argument); e.g.
``zinb``, ``nb``, ``zinb:dispersion=gene-batch``. ``--epochs default`` (the default) trains
for the number of epochs a user gets (``train(max_epochs=None)``) with the default KL
warm-up; ``--epochs N`` trains N epochs with the warm-up over the first third of them (so
the KL term is at full weight by the end) unless the fit sets ``kl_warmup_epochs``.

* ``pit_tv``: TV distance of the randomized-PIT histogram (20 bins) from uniform, with
  ``pit_tv_null``, its value for as many truly uniform values (the noise floor);
* ``calibration_error``: mean |coverage - nominal| of central intervals 10 ... 95 %, and
  the coverage of the 50, 80, 90 and 95 % intervals;
* ``r2_*``: identity-line r2 of observed gene mean, CV, zero fraction and cell library
  size, detected genes against their posterior predictive means;
* ``elpd_mean``: held-out log p(x) per cell (PSIS) and the share of cells with k > 0.7.

Run::

    PYTHONPATH=. python benchmarks/criticism.py            # every dataset, ZINB and NB
    PYTHONPATH=. python benchmarks/criticism.py --smoke    # seconds, synthetic data
    PYTHONPATH=. python benchmarks/criticism.py --datasets pbmc8k_200hvg --append  # one more

Results: ``benchmarks/results/criticism.{json,md}`` (``criticism_smoke.*`` with --smoke),
written after every fit; ``--append`` keeps the runs of the existing file that this call
does not redo, so the table can grow dataset by dataset.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import anndata
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

import pyro_scvi  # noqa: E402
from pyro_scvi.analysis import criticism  # noqa: E402
from pyro_scvi.model.likelihoods import LIKELIHOODS  # noqa: E402

COLUMNS = [
    ("pit_tv", "PIT TV"),
    ("pit_tv_null", "floor"),
    ("calibration_error", "cal. error"),
    ("coverage_50", "cov 50"),
    ("coverage_90", "cov 90"),
    ("coverage_95", "cov 95"),
    ("r2_mean", "r2 mean"),
    ("r2_cv", "r2 CV"),
    ("r2_zero_fraction", "r2 zeros"),
    ("r2_library_size", "r2 library"),
    ("r2_detected_genes", "r2 detected"),
    ("elpd_mean", "ELPD/cell"),
    ("frac_pareto_k_high", "k > 0.7"),
]


SETTINGS = {"dispersion": str, "kl_warmup_epochs": int}


def parse_fit(spec: str) -> tuple[str, dict, dict]:
    """``"zinb:dispersion=gene-batch"`` -> ``("zinb", {SCVI kwargs}, {train kwargs})``."""
    lik, _, rest = spec.partition(":")
    if lik not in LIKELIHOODS:
        raise SystemExit(
            f"fit {spec!r}: unknown likelihood {lik!r}; use one of {list(LIKELIHOODS)}"
        )
    model_kw, train_kw = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in SETTINGS:
            raise SystemExit(f"fit {spec!r}: unknown setting {key!r}; use {list(SETTINGS)}")
        (train_kw if key == "kl_warmup_epochs" else model_kw)[key] = SETTINGS[key](value)
    return lik, model_kw, train_kw


def _epochs(value: str) -> int | None:
    if value == "default":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: an integer or 'default'") from None


def _datasets(args) -> list[tuple[str, anndata.AnnData, str | None]]:
    if args.smoke:
        adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0)
        return [("synthetic_zinb", adata, "batch")]
    out = []
    for path in sorted(Path(args.data_dir).glob("*.h5ad")):
        if args.datasets and path.stem not in args.datasets:
            continue
        adata = anndata.read_h5ad(path)
        if adata.n_obs > args.max_cells:
            keep = np.sort(np.random.default_rng(0).choice(adata.n_obs, args.max_cells, False))
            adata = adata[keep].copy()
        batch_key = "batch" if adata.obs["batch"].nunique() > 1 else None
        out.append((path.stem, adata, batch_key))
    return out


def _table(results: dict) -> str:
    settings = results["settings"]
    epochs = settings["epochs"]
    length = (
        "the default number of epochs (`train(max_epochs=None)`: min(400, 400 * 20000 / "
        "cells)) and KL warm-up (400 epochs)"
        if epochs == "default"
        else f"{epochs} epochs (KL warm-up {max(1, epochs // 3)} unless the fit sets it)"
    )
    caps = sorted({r.get("max_cells", settings["max_cells"]) for r in results["runs"]})
    cap = " or ".join(str(c) for c in caps)
    lines = [
        "# Calibration and fit on held-out cells, per shared dataset",
        "",
        f"Defaults except the fit's settings; {length}; at most {cap} random cells per "
        "dataset (each run's cap is in the JSON, its cells in the cells column), 10 % held out, "
        f"{settings['n_samples']} posterior draws per cell. PIT TV: distance of the "
        "randomized-PIT histogram (20 bins) from uniform (goal <= 0.03); floor: its value "
        "for as many uniform values; cal. error: mean |coverage - nominal| over central "
        "intervals 10-95 %; r2 about the identity line (log10 for mean, CV, library).",
        "",
        "| dataset | cells x genes | fit | epochs | " + " | ".join(h for _, h in COLUMNS) + " |",
        "|---|---|---|---|" + "---|" * len(COLUMNS),
    ]
    for run in sorted(results["runs"], key=lambda r: (r["dataset"], r["fit"] != "zinb", r["fit"])):
        values = []
        for key, _ in COLUMNS:
            v = run[key]
            values.append(f"{v:.1f}" if key == "elpd_mean" else f"{v:.3f}")
        lines.append(
            f"| {run['dataset']} | {run['shape'][0]} x {run['shape'][1]} | {run['fit']} | "
            f"{run['epochs']} | " + " | ".join(values) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(_common.data_dir()))
    parser.add_argument("--datasets", nargs="*", help="stems of the files to run (default all)")
    parser.add_argument(
        "--fits", nargs="*", default=["zinb", "nb"], help="LIKELIHOOD[:key=value,...] per fit"
    )
    parser.add_argument("--epochs", type=_epochs, default=None, help="an integer or 'default'")
    parser.add_argument("--max-cells", type=int, default=1500)
    parser.add_argument("--n-samples", type=int, default=30)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--append", action="store_true", help="keep the file's other runs")
    parser.add_argument("--stem", default=None, help="results file name (default criticism)")
    parser.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    fits = [(spec, *parse_fit(spec)) for spec in args.fits]
    epochs = 2 if args.smoke else args.epochs
    n_samples = 5 if args.smoke else args.n_samples
    stem = args.stem or ("criticism_smoke" if args.smoke else "criticism")
    settings = {
        "epochs": "default" if epochs is None else epochs,
        "max_cells": args.max_cells,
        "n_samples": n_samples,
        "smoke": args.smoke,
    }
    kept = []
    path = args.out_dir / f"{stem}.json"
    if args.append and path.exists():
        old = json.loads(path.read_text())
        same = ("epochs", "n_samples", "smoke")
        if any(old["settings"][k] != settings[k] for k in same):
            raise SystemExit(f"--append: {path} has settings {old['settings']}, not {settings}")
        kept = old["runs"]
    results = {"meta": _common.run_metadata(argv, None), "settings": settings, "runs": kept}
    for name, adata, batch_key in _datasets(args):
        for spec, lik, model_kw, train_kw in fits:
            if epochs is not None:
                train_kw = {"kl_warmup_epochs": max(1, epochs // 3), **train_kw}
            start = time.perf_counter()
            model = pyro_scvi.SCVI(
                adata, batch_key=batch_key, likelihood=LIKELIHOODS[lik](), **model_kw
            )
            model.train(max_epochs=epochs, seed=0, progress_bar=False, **train_kw)
            train_seconds = time.perf_counter() - start
            c = criticism.criticize(model, n_samples=n_samples, seed=0, name=spec)
            run = {
                "dataset": name,
                "shape": list(adata.shape),
                "batch_key": batch_key,
                "fit": spec,
                "likelihood": lik,
                "settings": {**model_kw, **train_kw},
                "max_cells": args.max_cells,
                "epochs": len(model.history),
                "train_seconds": train_seconds,
                "criticize_seconds": time.perf_counter() - start - train_seconds,
                **{k: v for k, v in c.summary.items() if k != "name"},
            }
            results["runs"] = [
                r for r in results["runs"] if (r["dataset"], r.get("fit")) != (name, spec)
            ] + [run]
            print(name, spec, {k: run[k] for k, _ in COLUMNS[:4]}, file=sys.stderr, flush=True)
            _common.write_results(args.out_dir, stem, results, _table(results))
    table = _table(results)
    _common.write_results(args.out_dir, stem, results, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
