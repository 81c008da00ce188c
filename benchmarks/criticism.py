"""Calibration and summary-statistic fit of pyro_scvi on every shared dataset.

``--epochs N``: N epochs, KL warm-up over the first third unless the fit sets it; ``--append``
keeps the file's runs this call does not redo. Details: ``benchmarks/README.md``.

    python -m benchmarks.criticism                       # every dataset, ZINB and NB
    python -m benchmarks.criticism --smoke               # seconds, synthetic data
"""

from __future__ import annotations

import sys
import time

import numpy as np

from .lib import data, results

STUDY = "criticism"
COLUMNS = {
    "pit_tv": "PIT TV", "pit_tv_null": "floor", "calibration_error": "cal. error",
    "coverage_50": "cov 50", "coverage_90": "cov 90", "coverage_95": "cov 95",
    "r2_mean": "r2 mean", "r2_cv": "r2 CV", "r2_zero_fraction": "r2 zeros",
    "r2_library_size": "r2 library", "r2_detected_genes": "r2 detected",
    "elpd_mean": "ELPD/cell", "frac_pareto_k_high": "k > 0.7",
}  # fmt: skip
SETTINGS = {"dispersion": str, "kl_warmup_epochs": int, "early_stopping": lambda v: v == "on"}


def parse_fit(spec: str) -> tuple[str, dict, dict]:
    """``"zinb:dispersion=gene-batch"`` -> ``("zinb", {SCVI kwargs}, {train kwargs})``."""
    from pyro_scvi.model.likelihoods import LIKELIHOODS

    lik, _, rest = spec.partition(":")
    if lik not in LIKELIHOODS:
        raise SystemExit(f"fit {spec!r}: unknown likelihood {lik!r}; use {list(LIKELIHOODS)}")
    model_kw, train_kw = {}, {}
    for key, _, value in (item.partition("=") for item in rest.split(",") if item):
        if key not in SETTINGS:
            raise SystemExit(f"fit {spec!r}: unknown setting {key!r}; use {list(SETTINGS)}")
        (model_kw if key == "dispersion" else train_kw)[key] = SETTINGS[key](value)
    return lik, model_kw, train_kw


def reads(adata, shape: float, rng, lo: float = 1e4, hi: float = 1e6):
    """Smart-seq2-like reads from UMIs (``--reads SHAPE``, e.g. 1): each molecule amplified,
    ``reads ~ Poisson(Gamma(shape * umis, a_c / shape))``, a cell's reads per molecule ``a_c`` set
    for a log-uniform total in [lo, hi]; cells left without reads are dropped."""
    x, total = adata.X.tocsr(copy=True), np.exp(rng.uniform(np.log(lo), np.log(hi), adata.n_obs))
    per_molecule = np.repeat(total / np.asarray(x.sum(1)).ravel(), np.diff(x.indptr))
    x.data = rng.poisson(rng.gamma(shape * x.data, per_molecule / shape)).astype(np.float32)
    x.eliminate_zeros()
    keep = x.getnnz(axis=1) > 0
    return adata.__class__(X=x[keep], obs=adata.obs[keep].copy(), var=adata.var.copy())


def table(res: dict) -> str:
    s, epochs = res["settings"], res["settings"]["epochs"]
    length = "the default number of epochs (`train(max_epochs=None)`) and KL warm-up"
    if epochs != "default":
        length = f"{epochs} epochs (KL warm-up {max(1, epochs // 3)} unless the fit sets it)"
    caps = " or ".join(map(str, sorted({r.get("max_cells", s["max_cells"]) for r in res["runs"]})))
    rows = [
        f"{r['dataset']} | {r['shape'][0]} x {r['shape'][1]} | {r['fit']} | {r['epochs']} | "
        + " | ".join(f"{r[k]:.1f}" if k == "elpd_mean" else f"{r[k]:.3f}" for k in COLUMNS)
        + f" | {' / '.join(f'{v:.3f}' for v in r.get('pit_tv_mean_thirds', []))}"
        for r in sorted(res["runs"], key=lambda r: (r["dataset"], r["fit"] != "zinb", r["fit"]))
    ]
    how = (
        f"Defaults except the fit's settings; {length}; at most {caps} random cells per dataset, "
        f"10 % held out, {s['n_samples']} posterior draws per cell. PIT TV: distance of the "
        "randomized-PIT histogram (20 bins) from uniform (goal <= 0.03); floor: its value for as "
        "many uniform values; cal. error: mean |coverage - nominal| over central intervals "
        "10-95 %; r2 about the identity line (log10 for mean, CV, library)."
    )
    lines = results.header(res, "Calibration and fit on held-out cells, per shared dataset", how)
    columns = ["dataset", "cells x genes", "fit", "epochs", *COLUMNS.values(), "TV by thirds"]
    lines += results.md_table(columns, rows)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import pyro_scvi
    from pyro_scvi.analysis import criticism
    from pyro_scvi.model.likelihoods import LIKELIHOODS

    p, _ = results.parser(__doc__, "seconds, synthetic data")
    p.add_argument("--datasets", nargs="*", help="names (default: every .h5ad there)")
    p.add_argument("--fits", nargs="*", default=["zinb", "nb"], help="LIKELIHOOD[:key=value,...]")
    p.add_argument("--epochs", default="default", help="an integer or 'default'")
    p.add_argument("--max-cells", type=int, default=1500)
    p.add_argument("--n-samples", type=int, default=30)
    p.add_argument("--append", action="store_true", help="keep the file's other runs")
    p.add_argument("--stem", default=None, help="results file name (default criticism)")
    p.add_argument("--reads", type=float, help="read counts from the UMIs, this Gamma shape")
    args = p.parse_args(argv)
    fits = [(spec, *parse_fit(spec)) for spec in args.fits]
    epochs = 2 if args.smoke else None if args.epochs == "default" else int(args.epochs)
    n_samples = 5 if args.smoke else args.n_samples
    stem = args.stem or results.stem(STUDY, args.smoke)
    settings = {"epochs": epochs or "default", "max_cells": args.max_cells, "n_samples": n_samples}
    settings |= {"smoke": args.smoke, "reads_shape": args.reads}
    old = results.read(args.out_dir / f"{stem}.json") if args.append else None
    if old and any(old["settings"][k] != settings[k] for k in ("epochs", "n_samples", "smoke")):
        raise SystemExit(f"--append: the file has settings {old['settings']}, not {settings}")
    res = {"meta": results.metadata(STUDY, argv), "settings": settings}
    res["runs"] = old["runs"] if old else []
    names = ["synthetic"] if args.smoke else args.datasets or data.default_names(args.data_dir)
    for name in names:
        if args.smoke:
            adata = pyro_scvi.datasets.synthetic_zinb(n_cells=200, n_genes=30, n_batches=2, seed=0)
            name = "synthetic_zinb"
        else:
            adata = data.load(name, args.data_dir)
            if args.reads:
                adata = reads(adata, args.reads, np.random.default_rng(0))
            if adata.n_obs > args.max_cells:
                keep = np.random.default_rng(0).choice(adata.n_obs, args.max_cells, replace=False)
                adata = adata[np.sort(keep)].copy()
        batch_key = data.batch_key_for(adata)
        third = np.argsort(np.argsort(np.asarray(adata.X.sum(0)).ravel())) * 3 // adata.n_vars
        for spec, lik, model_kw, train_kw in fits:
            if epochs is not None:
                train_kw = {"kl_warmup_epochs": max(1, epochs // 3), **train_kw}
            start, likelihood = time.perf_counter(), LIKELIHOODS[lik]()
            model = pyro_scvi.SCVI(adata, batch_key=batch_key, likelihood=likelihood, **model_kw)
            model.train(max_epochs=epochs, seed=0, progress_bar=False, **train_kw)
            trained = time.perf_counter()
            c = criticism.criticize(model, n_samples=n_samples, seed=0, name=spec)
            run = {"dataset": name, "shape": list(adata.shape), "batch_key": batch_key}
            run |= {"fit": spec, "likelihood": lik, "settings": model_kw | train_kw}
            run |= {"max_cells": args.max_cells, "epochs": len(model.history)}
            run["train_seconds"] = trained - start
            run["criticize_seconds"] = time.perf_counter() - trained
            run |= {k: v for k, v in c.summary.items() if k != "name"}
            run["pit_histogram"] = criticism.pit_histogram(c.pit).round(4).tolist()
            run["pit_tv_mean_thirds"] = [criticism.pit_tv(c.pit[:, third == t]) for t in range(3)]
            res["runs"] = [r for r in res["runs"] if (r["dataset"], r.get("fit")) != (name, spec)]
            res["runs"].append(run)
            print(name, spec, {k: run[k] for k in list(COLUMNS)[:4]}, file=sys.stderr, flush=True)
            results.write(args.out_dir, stem, res, table(res))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
