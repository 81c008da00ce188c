"""Why the observed-library model separated worse than scvi-tools': one training difference
at a time against scvi-tools 1.4.2's recipe (issue 29, item 2).

Each ``--run VARIANT --dataset D --seed S`` fits pyro_scvi's observed-library model
(``use_observed_lib_size=True``, scvi-tools' default model) with one change from today's
default (or scvi-tools' default ``SCVI``, ``--run scvi-tools``) for ``--epochs`` epochs with no
early stopping, in its own process with 1 thread, on the seed's cells of
``benchmarks.lib.data.make_split``. Scores on every cell: KMeans ARI (mean over 5 KMeans
seeds, 10 restarts each), kNN purity (share of each cell's 15 nearest neighbours in ``z``
of its own cell type), cell-type silhouette, batch entropy; on the held-out cells
log p(x | library) per cell (100 importance samples). ``--report`` writes
``results/training_differences.{md,json}``.

    python -m benchmarks.training_differences --run warmup400 --dataset pbmc8k_200hvg --seed 0 \
        --out RUNS
    python -m benchmarks.training_differences --report RUNS
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .lib import adapters, data, results, score
from .lib.results import fmt

STUDY = "training_differences"
#: variant -> what it changes (``options`` builds its SCVI() and train() keywords)
VARIANTS = {
    "default": "today's default (KL warm-up 100 epochs, sampled KL, batch into encoder,"
    " gate 0.05)",
    "warmup400": "KL warm-up 400 epochs (scvi-tools' n_epochs_kl_warmup; weight e/400 in epoch e)",
    "analytic_kl": "KL(q(z)||p(z)) in closed form (TraceMeanField_ELBO), as scvi-tools' loss",
    "encoder_no_batch": "no batch one-hot into the encoder (scvi-tools' encode_covariates=False)",
    "gate_random": "zero-inflation head's bias at its random init (ZINB(initial_dropout=None))",
    "bn_ema": "the same training; batch norm's statistics left as the exponential averages of"
    " training (momentum 0.01), as scvi-tools leaves them, not re-estimated by a pass over the"
    " training cells (the probe replaces pyro_scvi's re-estimating passes by no-ops)",
    "scvi-tools": "scvi-tools 1.4.2's default SCVI (observed library), same split and seed",
    "scvi-tools+bn_refresh": "the same scvi-tools fit, its batch-norm statistics re-estimated"
    " by one pass over the training cells at the end, as pyro_scvi's training does",
}


def options(variant: str, adata, key):
    import pyro.infer

    import pyro_scvi
    from pyro_scvi.model.guides import ScviGuide

    model, train = {"use_observed_lib_size": True}, {}
    for part in variant.split("+"):
        if part == "warmup400":
            train["kl_warmup_epochs"] = 400
        elif part == "analytic_kl":
            train["elbo"] = pyro.infer.TraceMeanField_ELBO()
        elif part == "encoder_no_batch":
            obs = pyro_scvi.ObservedLibrary()
            model |= {"guide": ScviGuide(adata.n_vars, 0, library=obs), "library_prior": obs}
            model.pop("use_observed_lib_size")
        elif part == "gate_random":
            model["likelihood"] = pyro_scvi.ZINB(initial_dropout=None)
        elif part == "bn_ema":  # training is the same: batch norm trains on batch statistics
            import pyro_scvi.train.hooks as hooks
            import pyro_scvi.train.loop as loop

            loop._refresh_at_end = lambda *args: True
            hooks.refresh_batch_norm = lambda *args, **kwargs: None
        elif part != "default":
            raise SystemExit(f"unknown variant part {part!r}; known: {', '.join(VARIANTS)}")
    return model, train


def scores(latent, adata, held, fit, seed: int) -> dict:
    from sklearn.neighbors import NearestNeighbors

    from pyro_scvi.analysis.metrics import clustering_scores

    cells = np.arange(adata.n_obs)
    out = score.latent_scores(latent, adata, cells, seed)
    labels = adata.obs["cell_type"].astype("category").cat.codes.to_numpy()
    aris = [clustering_scores(latent, labels, seed=k)["ari"] for k in range(5)]
    out |= {"ari_seed": out.pop("ari"), "ari": float(np.mean(aris)), "ari_kmeans": aris}
    _, idx = NearestNeighbors(n_neighbors=16).fit(latent).kneighbors(latent)
    out["knn_purity"] = float((labels[idx[:, 1:]] == labels[:, None]).mean())
    out["heldout_log_px_given_library"] = fit.marginal_ll(held, 100, seed, True)
    return {k: (float(v) if isinstance(v, np.floating) else v) for k, v in out.items()}


def run(variant: str, name: str, seed: int, epochs: int, out: Path) -> None:
    import anndata
    import torch

    torch.set_num_threads(1)
    adata = anndata.read_h5ad(data.path_of(name))
    key = data.batch_key_for(adata)
    train_cells, held = data.make_split(adata.n_obs, seed)
    if variant == "scvi-tools":
        fit = adapters.ScviTools(adata, key, seed=seed, threads=1).fit(epochs, (train_cells, held))
    else:
        model, train = options(variant, adata, key)
        train |= {"early_stopping": False}
        kw = {"model": model, "train": train}
        fit = adapters.PyroScvi(adata, key, seed=seed, threads=1, **kw).fit(epochs)
        assert np.array_equal(np.asarray(fit.model.validation_indices), held)
    res = {"variant": variant, "dataset": name, "seed": seed, "epochs": epochs}
    res |= {"train_seconds": fit.run["train_seconds"]}
    res |= scores(np.asarray(fit.latent()), adata, held, fit, seed)
    if variant == "scvi-tools":  # its batch-norm statistics re-estimated as pyro_scvi's are
        refresh_scvi_tools(fit.model, train_cells)
        again = scores(np.asarray(fit.latent()), adata, held, fit, seed)
        res |= {f"{k}_bn_refreshed": again[k] for k in METRICS if k in again}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{variant}_{name}_{seed}.json").write_text(json.dumps(res))


def refresh_scvi_tools(model, cells) -> None:
    """scvi-tools' model with every batch norm's statistics from one pass over ``cells`` at
    the trained weights (cumulative averages), as pyro_scvi's ``refresh_batch_norm`` does,
    instead of its exponential averages (momentum 0.01) over the last ~100 steps."""
    import torch

    norms = [m for m in model.module.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.module.train()
    loader = model._make_data_loader(model.adata, indices=cells, batch_size=128, shuffle=True)
    with torch.no_grad():
        for tensors in loader:
            model.module(tensors, compute_loss=False)
    model.module.eval()


METRICS = {
    "ari": ".3f",
    "knn_purity": ".3f",
    "silhouette_label": ".3f",
    "entropy_batch_mixing": ".3f",
    "heldout_log_px_given_library": ".2f",
}


def report(folder: Path, argv: list[str]) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    bn = "scvi-tools+bn_refresh"
    for r in [r for r in runs if "ari_bn_refreshed" in r]:
        again = {k: r[f"{k}_bn_refreshed"] for k in METRICS if f"{k}_bn_refreshed" in r}
        runs.append({k: r[k] for k in ("dataset", "seed", "epochs")} | again | {"variant": bn})
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["dataset"], r["variant"]), []).append(r)
    rows = []
    for (name, variant), rs in sorted(groups.items()):
        ref = {r["seed"]: r for r in groups.get((name, "scvi-tools"), [])}
        cells = []
        for key, f in METRICS.items():
            mine = [r[key] for r in rs if r.get(key) is not None]
            paired = [r[key] - ref[r["seed"]][key] for r in rs if r["seed"] in ref and key in r]
            mean = fmt(np.mean(mine) if mine else None, f)
            diff = f" ({np.mean(paired):+{f}})" if paired and variant != "scvi-tools" else ""
            cells.append(mean + diff if mine else "—")
        base = {r["seed"]: r for r in groups.get((name, "default"), [])}
        for key, f in (("ari", ".3f"), ("heldout_log_px_given_library", ".2f")):
            paired = [r[key] - base[r["seed"]][key] for r in rs if r["seed"] in base]
            show = paired and variant not in ("default", "scvi-tools", "scvi-tools+bn_refresh")
            cells.append(f"{np.mean(paired):+{f}}" if show else "—")
        seeds = " ".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        per_seed = " / ".join(fmt(r["ari"]) for r in sorted(rs, key=lambda r: r["seed"]))
        rows.append([name, variant, seeds, *cells, per_seed])
    res = {"meta": results.metadata(STUDY, argv), "variants": VARIANTS, "runs": runs}
    how = "Observed-library model, 100 epochs, no early stopping, 1 thread per run, 2 runs at"
    how += " a time on 2 shared cores. Means over seeds; (Δ): mean paired difference from"
    how += " scvi-tools on the seeds both ran; Δ … vs default: the same, from the default."
    lines = results.header(res, "Training differences vs scvi-tools, one at a time", how)
    lines += [f"- **{k}**: {v}" for k, v in VARIANTS.items()] + [""]
    cols = ["dataset", "variant", "seeds", "KMeans ARI (5 KMeans seeds)", "kNN purity (15)"]
    cols += ["cell-type silhouette", "batch entropy", "held-out log p(x \\| library)"]
    cols += ["Δ ARI vs default", "Δ log p vs default", "ARI per seed"]
    lines += results.md_table(cols, rows)
    results.publish(results.RESULTS, STUDY, res, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help=f"a variant, or several joined by '+': {', '.join(VARIANTS)}")
    p.add_argument("--dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--out", type=Path)
    p.add_argument("--report", type=Path)
    a = p.parse_args(argv)
    report(a.report, argv) if a.report else run(a.run, a.dataset, a.seed, a.epochs, a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
