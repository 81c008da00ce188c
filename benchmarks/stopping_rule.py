"""Evidence for the default stopping rule: where it stops, and the quality there vs 400 epochs.

Per dataset and seed, in its own process (``--run``): ``rule``, the default ``train()``
(convergence-aware; scored where it stopped, then continued with ``early_stopping=False``
to the cap and scored again, so the one run gives the whole validation curve), or
``today``, the previous default (400 epochs, 400 epochs of KL warm-up, no stopping).
Scores: held-out ELBO per cell (``get_elbo`` on the validation cells, 10 draws) and KMeans
ARI on ``obs["cell_type"]`` (:func:`benchmarks.lib.score.latent_scores`); ``restore``: see
:func:`restore_run`. ``--report`` adds the runs' files to the committed
``results/stopping_rule.{md,json}`` (a file replaces its run).

    python -m benchmarks.stopping_rule --run rule --dataset pbmc8k_200hvg --seed 0 --out RUNS
    python -m benchmarks.stopping_rule --run restore --dataset pbmc8k_200hvg --seed 0 --out RUNS
    python -m benchmarks.stopping_rule --report RUNS    # after --run rule and --run today
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .lib import data, results, score
from .lib.results import fmt

STUDY = "stopping_rule"


def scores(model, adata, seed: int) -> dict:
    held = model.validation_indices
    elbo = model.get_elbo(adata[held].copy(), n_samples=10, seed=seed)
    cells = data.some_cells(np.arange(adata.n_obs), 10000, seed)
    ari = score.latent_scores(model.get_latent_representation(), adata, cells, seed)["ari"]
    return {"heldout_elbo": float(elbo), "ari": float(ari)}


def test_scores(model, adata, test, seed: int) -> dict:
    cells = data.some_cells(np.arange(adata.n_obs), 10000, seed)
    z, x = model.get_latent_representation(adata), adata[test].copy()
    out = {k: float(v) for k, v in score.latent_scores(z, adata, cells, seed).items()}
    kw = {"n_samples": 100, "seed": seed, "per_cell": True}
    out["log_px"] = model.get_marginal_ll(x, **kw)
    return out | {"log_px_given_library": model.get_marginal_ll(x, observed_library=True, **kw)}


def restore_run(adata, seed: int) -> tuple:
    """`--run restore`: the default train() (with the batch key where there are batches) on
    the cells outside the benchmarks' held-out split, restore_best_epoch=True. Scores at the
    last epoch → at the restored one (batch norm re-estimated for each, as train() does):
    log p(x) and log p(x | library) per held-out cell (cells that neither train nor pick the
    epoch; 100 importance samples, get_marginal_ll), the gain paired over those cells ± its
    standard error; KMeans ARI and batch entropy of every cell."""
    import pyro_scvi
    from pyro_scvi.train.passes import refresh_batch_norm

    fit, test = data.make_split(adata.n_obs, seed)
    model = pyro_scvi.SCVI(adata[fit].copy(), batch_key=data.batch_key_for(adata))
    model.train(seed=seed, progress_bar=False, restore_best_epoch=True)
    res = {"stopping": dict(model.history.attrs["stopping"]), "test_cells": len(test)}
    res["restored"] = res["last"] = test_scores(model, adata, test, seed)
    if (params := model.training_run.state.last_params) is not None:  # the run's last epoch
        for module, state in zip((model.model, model.guide), params, strict=True):
            module.load_state_dict(state)
        refresh_batch_norm(model.model, model.guide, model.data, model.train_indices)
        res["last"] = test_scores(model, adata, test, seed)
    res["last"] = dict(res["last"])
    for key in ("log_px", "log_px_given_library"):
        gain = res["restored"][key] - res["last"][key]
        res[f"{key}_gain"] = [float(gain.mean()), float(gain.std() / np.sqrt(len(gain)))]
        for at in ("restored", "last"):
            res[at][key] = float(np.mean(res[at][key]))
    return model, res


def run(mode: str, name: str, seed: int, out: Path) -> None:
    import anndata
    import torch

    import pyro_scvi

    torch.set_num_threads(1)
    adata = anndata.read_h5ad(data.path_of(name))
    kw, start = {"seed": seed, "progress_bar": False}, time.perf_counter()
    model = pyro_scvi.SCVI(adata)
    if mode == "restore":
        model, res = restore_run(adata, seed)
    elif mode == "today":
        model.train(400, early_stopping=False, kl_warmup_epochs=400, **kw)
        res = {"end": scores(model, adata, seed)}
    else:
        model.train(**kw)
        res = {"stopping": dict(model.history.attrs["stopping"])}
        res["stop"], res["wall_to_stop"] = scores(model, adata, seed), time.perf_counter() - start
        res["stop_seconds"] = float(model.history["seconds"].sum())
        left = res["stopping"]["max_epochs"] - len(model.history)
        if left > 0:
            model.train(left, early_stopping=False, **kw)
        res["end"] = scores(model, adata, seed)
    h, res["git"] = model.history, results.git_state()
    res |= {"mode": mode, "dataset": name, "seed": seed, "shape": list(adata.shape)}
    res |= {"epochs": len(h), "seconds": float(h["seconds"].sum())}
    res |= {"wall": time.perf_counter() - start, "validation_elbo": h["validation_elbo"].tolist()}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{mode}_{name}_{seed}.json").write_text(json.dumps(res))


def report(folder: Path, argv: list[str]) -> None:
    kept = (results.read(results.RESULTS / f"{STUDY}.json") or {}).get("runs", [])
    new = [json.loads(p.read_text()) for p in folder.glob("*.json")]
    runs = {f"{r['mode']}_{r['dataset']}_{r['seed']}": r for r in kept + new}
    runs = [runs[k] for k in sorted(runs)]  # as the run files sort
    today = {(r["dataset"], r["seed"]): r for r in runs if r["mode"] == "today"}
    rows = []
    for r in (r for r in runs if r["mode"] == "rule"):
        t, s = today.get((r["dataset"], r["seed"]), {}).get("end", {}), r["stopping"]
        saved = 1 - r["stop_seconds"] / r["seconds"]
        rows.append(
            [f"{r['dataset']} ({r['shape'][0]}x{r['shape'][1]})", r["seed"], s["epoch"] + 1]
            + [s["reason"].split(":")[0], fmt(s.get("threshold"), ".3g")]
            + [fmt(r["stop"]["heldout_elbo"], ".2f"), fmt(r["end"]["heldout_elbo"], ".2f")]
            + [fmt(t.get("heldout_elbo"), ".2f"), fmt(r["stop"]["ari"]), fmt(r["end"]["ari"])]
            + [fmt(t.get("ari")), f"{1 - (s['epoch'] + 1) / r['epochs']:.0%} ({saved:.0%})"]
            + [((r.get("git") or {}).get("pyro_scvi_commit") or "—")[:7]]
        )
    res = {"meta": results.metadata(STUDY, argv), "runs": runs}
    cols = "dataset|seed|epochs run|reason|threshold (nats/cell)|held-out ELBO at stop"
    cols += "|… rule's run at 400|… previous default at 400|ARI at stop|… rule's run at 400"
    cols += "|… previous default at 400|epochs saved (train seconds saved)|run at"
    how = "Rule's run: the default train() (warm-up 100 epochs, then patience 45 on a 5-epoch"
    how += " mean, threshold = its noise), continued to 400 epochs without stopping; previous"
    how += " default: 400 epochs, 400 of warm-up (run where time allowed). 1 thread, 2 shared"
    how += " cores. Training code of 88a0c36 (later changes agree to rounding); run at —: made"
    how += " before runs recorded their commit. Earlier runs are kept from the committed JSON."
    lines = results.header(res, "The default stopping rule: where it stops", how)
    lines += results.md_table(cols, rows)
    lines += ["", "Validation ELBO per cell (5-epoch mean) by epoch; * the rule's stop.", ""]
    curves = []
    for r in runs:
        v, stop = r["validation_elbo"], (r.get("stopping") or {}).get("epoch")
        at = sorted({*range(49, len(v), 50), *([stop] if stop is not None else [])})
        cells = [f"{np.mean(v[max(0, e - 4) : e + 1]):.1f}" for e in at]
        cells = [f"{c} (*{e + 1})" if e == stop else c for c, e in zip(cells, at, strict=True)]
        curves.append([r["dataset"], r["seed"], r["mode"], " · ".join(cells)])
    lines += results.md_table("dataset|seed|run|epochs 50 · 100 · … · 400", curves)
    lines += restore_section([r for r in runs if r["mode"] == "restore"])
    results.publish(results.RESULTS, STUDY, res, "\n".join(lines) + "\n")


def restore_section(runs: list[dict]) -> list[str]:
    rows, keys = [], ("log_px", "log_px_given_library", "ari", "entropy_batch_mixing")
    for r in runs:
        s, cells = r["stopping"], []
        for k, spec in zip(keys, (".2f", ".2f", ".3f", ".3f"), strict=True):
            gain = r.get(f"{k}_gain") and " ({:+.2f} ± {:.2f})".format(*r[f"{k}_gain"])
            cell = f"{fmt(r['last'].get(k), spec)} → {fmt(r['restored'].get(k), spec)}"
            cells.append(cell + (gain or ""))
        at = ((r.get("git") or {}).get("pyro_scvi_commit") or "—")[:7]
        rows.append([r["dataset"], r["seed"], s["epoch"] + 1, s["restored_epoch"] + 1, *cells, at])
    cols = ["dataset", "seed", "epochs run", "epoch restored", "log p(x)", "log p(x \\| library)"]
    cols += ["KMeans ARI", "batch entropy", "run at"]
    how = " ".join(restore_run.__doc__.split()) + " Epochs from 1."
    title = "## Restoring the best epoch after the warm-up, scored on held-out cells"
    return ["", title, "", how, "", *results.md_table(cols, rows)] * bool(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", choices=("rule", "today", "restore"))
    p.add_argument("--seed", type=int, default=0)
    for flag, kind in (("--dataset", str), ("--out", Path), ("--report", Path)):
        p.add_argument(flag, type=kind)
    args = p.parse_args(argv)
    report(args.report, argv) if args.report else run(args.run, args.dataset, args.seed, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
