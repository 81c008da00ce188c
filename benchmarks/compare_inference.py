"""Priors x likelihoods x inference schemes, scored on one yardstick: held-out log p(x).

Every combination of a prior on ``z``, a count likelihood and an inference scheme (a Pyro
ELBO and a guide) is trained on the same 90 % of the cells and scored on the other 10 %
by one estimator, :func:`pyro_scvi.posterior.fit_statistics`: the importance-sampled
marginal log-likelihood ``log (1/K) sum_k p(x, z_k, l_k) / q(z_k, l_k | x)`` with the
fitted guide as proposal (nats per cell, higher is better), and the ELBO from the same
draws. The components are whatever the installed package ships, imported by name, so a
new prior, likelihood or ELBO joins the table by adding one line to ``PRIORS``,
``likelihoods()`` or ``SCHEMES``.

What is measured, per combination and dataset
---------------------------------------------
* held-out marginal log-likelihood and ELBO per cell (``--is-samples`` draws per cell);
* KMeans (k = number of cell types, ``n_init=10``, ``random_state=0``) ARI and NMI of the
  latent means of all cells against ``obs["cell_type"]``;
* wall-clock training time (``SCVI.train``, including its per-epoch validation ELBO);
* the amortization gap (amortized guides): the first ``--gap-cells`` held-out cells'
  q(z, l) are refined by SVI on per-cell parameters with the model fixed, starting at the
  encoder's output (:func:`pyro_scvi.posterior.gap.amortization_gap`); the gain in ELBO is in nats
  per cell. The refinement runs ``--refine-steps`` steps, so the gap is a lower bound.

Schemes
-------
``Trace_ELBO`` (default), ``TraceMeanField_ELBO`` (analytic KL where Pyro has one),
``RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True)`` (the importance-weighted
bound, "IWAE-K"), ``JitTrace_ELBO``; all with the amortized encoder. ``per-cell``: the
non-amortized :class:`~pyro_scvi.model.guides.PerCellGuide` with ``Trace_ELBO``. It has no
encoder for new cells, so it is trained on the training cells only and its held-out cells
get their own per-cell q fitted with the decoder fixed (:func:`pyro_scvi.posterior.gap.refine`,
from q(z) = N(0, 0.1) and q(l) at the observed log library, ``--refine-steps`` steps);
that fit's time is the "held-out q s" column. Its local parameters train with
``--per-cell-lr`` (``pyro.optim.Adam`` with a per-parameter learning rate), since each
cell's parameters move only when the cell is in the minibatch.

Design
------
``--design oat`` (default): the default combination (StandardNormal, ZINB, Trace_ELBO,
amortized) and every variation of one factor at a time: each other prior, each other
likelihood, each other scheme. ``--design factorial``: every prior x likelihood x scheme
(much longer). Both run each dataset's combinations with the same seed, split and epochs.

Datasets
--------
``pbmc8k_200hvg`` (7,448 cells x 200 genes, one batch; shipped with the package) and
``cellbench_3cl_2tech`` (450 cells x 13,033 genes, two technologies as batches,
``batch_key="batch"``; from ``../shared/data``), restricted to its ``--cellbench-genes``
most variable genes (variance of ``log1p`` of counts per 10^4; 0 keeps all genes).

A gold standard (``--nuts-cells``): on the default combination, NUTS
(:mod:`pyro_scvi.posterior.mcmc`) samples p(z, l | x) of a few held-out cells with the model fixed,
and the amortized and the refined guides are compared with it: mean error in posterior
standard deviations, variance ratio q / p, and the posterior mass inside q's central 50 %,
90 % and 95 % intervals.

How to run
----------
::

    python benchmarks/compare_inference.py            # about 12 minutes on 2 CPU cores
    python benchmarks/compare_inference.py --smoke    # under a minute: checks every path

Results go to ``benchmarks/results/compare_inference.{json,md}`` (``--smoke``:
``compare_inference_smoke.{json,md}``), written atomically.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import pyro
import scipy.sparse as sp
import torch
from pyro.infer import ELBO, JitTrace_ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

import pyro_scvi
from pyro_scvi import posterior
from pyro_scvi.model import priors
from pyro_scvi.model.guides import PerCellGuide
from pyro_scvi.model.likelihoods import LIKELIHOODS
from pyro_scvi.posterior.gap import amortization_gap, refine
from pyro_scvi.posterior.mcmc import agreement, compare_to_nuts, sample_nuts
from pyro_scvi.train.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DATA_DIR = _common.data_dir()
OUT_DIR = Path(__file__).resolve().parent / "results"
N_LATENT = 10
TRAIN_SIZE = 0.9
KMEANS = {"n_init": 10, "random_state": 0}
DEFAULT = ("StandardNormal", "zinb", "Trace_ELBO")

# Priors on z by name; a name the installed package lacks is skipped (and reported).
PRIORS: dict[str, Callable[[], Any]] = {
    "StandardNormal": lambda: priors.StandardNormal(),
    "MixtureOfGaussians": lambda: priors.MixtureOfGaussians(n_components=10),
    "VampPrior": lambda: priors.VampPrior(n_components=50),
}


def likelihoods() -> dict[str, Callable[[], Any]]:
    """Every likelihood the package registers (ZINB first: the default)."""
    names = sorted(LIKELIHOODS, key=lambda n: (n != DEFAULT[1], n))
    return {n: LIKELIHOODS[n] for n in names}


def schemes(iwae_k: int) -> dict[str, Callable[[], ELBO]]:
    """ELBO factories by name; a JIT ELBO must be new for each training run."""
    return {
        "Trace_ELBO": Trace_ELBO,
        "TraceMeanField_ELBO": TraceMeanField_ELBO,
        f"IWAE-{iwae_k}": lambda: RenyiELBO(
            alpha=0, num_particles=iwae_k, vectorize_particles=True, max_plate_nesting=2
        ),
        "JitTrace_ELBO": JitTrace_ELBO,
        "per-cell": Trace_ELBO,
    }


@dataclass(frozen=True)
class Combo:
    prior: str
    likelihood: str
    scheme: str

    @property
    def per_cell(self) -> bool:
        return self.scheme == "per-cell"


@dataclass
class Dataset:
    name: str
    adata: anndata.AnnData
    batch_key: str | None
    max_epochs: int
    note: str
    nuts_cells: int


# ---------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=DATA_DIR, help="Folder with cellbench")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="Results folder")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=["pbmc8k_200hvg", "cellbench_3cl_2tech"],
        choices=["pbmc8k_200hvg", "cellbench_3cl_2tech"],
    )
    p.add_argument("--design", choices=["oat", "factorial"], default="oat")
    p.add_argument("--pbmc-epochs", type=int, default=40, help="Epochs on pbmc8k")
    p.add_argument("--cellbench-epochs", type=int, default=200, help="Epochs on cellbench")
    p.add_argument(
        "--warmup-fraction", type=float, default=0.25, help="KL warm-up, fraction of epochs"
    )
    p.add_argument("--cellbench-genes", type=int, default=1000, help="0: all 13,033 genes")
    p.add_argument("--iwae-k", type=int, default=5, help="Particles of the IWAE bound")
    p.add_argument("--is-samples", type=int, default=100, help="Importance samples per cell")
    p.add_argument("--gap-cells", type=int, default=128, help="Held-out cells for the gap")
    p.add_argument("--refine-steps", type=int, default=400, help="SVI steps of refinement")
    p.add_argument("--per-cell-lr", type=float, default=1e-2, help="lr of per-cell params")
    p.add_argument("--nuts-cells", type=int, default=None, help="Default: 8 pbmc, 4 cellbench")
    p.add_argument("--nuts-warmup", type=int, default=200)
    p.add_argument("--nuts-samples", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--subsample", type=int, default=None, help="Random cells per dataset")
    p.add_argument("--smoke", action="store_true", help="< 1 minute check of every path")
    args = p.parse_args(argv)
    if args.smoke:
        args.pbmc_epochs = args.cellbench_epochs = 2
        args.subsample, args.cellbench_genes = 150, 100
        args.is_samples, args.gap_cells, args.refine_steps = 5, 10, 5
        args.nuts_cells, args.nuts_warmup, args.nuts_samples = 2, 5, 5
    return args


def load(name: str, args: argparse.Namespace) -> Dataset:
    """A dataset as float32 CSR counts, with its batch key and epochs."""
    if name == "pbmc8k_200hvg":
        adata, batch_key, nuts = pyro_scvi.datasets.pbmc8k_200hvg(), None, 8
        epochs, note = args.pbmc_epochs, "all 200 genes"
    else:
        adata = anndata.read_h5ad(args.data_dir / f"{name}.h5ad")
        batch_key, epochs, nuts = "batch", args.cellbench_epochs, 4
        note = "all genes"
        if args.cellbench_genes and args.cellbench_genes < adata.n_vars:
            x = sp.csr_matrix(adata.X, dtype=np.float64)
            lib = np.asarray(x.sum(1)).ravel()
            norm = sp.diags(1e4 / lib) @ x
            norm.data = np.log1p(norm.data)
            mean = np.asarray(norm.mean(0)).ravel()
            var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
            keep = np.sort(np.argsort(-var)[: args.cellbench_genes])
            adata = adata[:, keep].copy()
            note = f"{args.cellbench_genes} most variable genes (log1p per 10^4)"
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if args.subsample and args.subsample < adata.n_obs:
        rng = np.random.default_rng(args.seed)
        adata = adata[np.sort(rng.choice(adata.n_obs, args.subsample, replace=False))].copy()
    empty = np.asarray(adata.X.sum(1)).ravel() == 0
    if empty.any():
        adata = adata[~empty].copy()
        note += f", {int(empty.sum())} empty cells dropped"
    nuts = args.nuts_cells if args.nuts_cells is not None else nuts
    return Dataset(name, adata, batch_key, epochs, note, nuts)


def split(n_cells: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out cells by the rule of ``SCVI.train`` (checked after each run)."""
    perm = np.random.default_rng(seed).permutation(n_cells)
    n_train = max(2, int(round(TRAIN_SIZE * n_cells)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def design(kind: str, prior_names, likelihood_names, scheme_names) -> list[Combo]:
    """The combinations to run, the default first."""
    default = Combo(*DEFAULT)
    if kind == "factorial":
        combos = [
            Combo(p, lk, s)
            for s in scheme_names
            if s != "per-cell"
            for p in prior_names
            for lk in likelihood_names
        ]
        combos.append(Combo(DEFAULT[0], DEFAULT[1], "per-cell"))
    else:
        combos = [default]
        combos += [Combo(p, DEFAULT[1], DEFAULT[2]) for p in prior_names if p != DEFAULT[0]]
        combos += [
            Combo(DEFAULT[0], lk, DEFAULT[2]) for lk in likelihood_names if lk != DEFAULT[1]
        ]
        combos += [Combo(DEFAULT[0], DEFAULT[1], s) for s in scheme_names if s != DEFAULT[2]]
    combos.sort(key=lambda c: c != default)
    return combos


# ---------------------------------------------------------------------------- runs
def cluster_scores(latent: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    pred = KMeans(n_clusters=len(np.unique(labels)), **KMEANS).fit_predict(latent)
    return {
        "ari": float(adjusted_rand_score(labels, pred)),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
    }


def heldout_scores(model, guide, data, indices, args) -> dict[str, float]:
    with posterior.seeded(args.seed):
        stats = posterior.fit_statistics(
            model, guide, data, indices, n_samples=args.is_samples, batch_size=32
        )
    return {
        "heldout_marginal_ll": float(stats["marginal_ll"].mean()),
        "heldout_elbo": float(stats["elbo"].mean()),
    }


def make_scvi(ds: Dataset, combo: Combo, adata=None, **kwargs) -> pyro_scvi.SCVI:
    return pyro_scvi.SCVI(
        ds.adata if adata is None else adata,
        batch_key=ds.batch_key,
        prior=PRIORS[combo.prior](),
        likelihood=likelihoods()[combo.likelihood](),
        n_latent=N_LATENT,
        **kwargs,
    )


def train_kwargs(ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "max_epochs": ds.max_epochs,
        "kl_warmup_epochs": max(1, int(round(args.warmup_fraction * ds.max_epochs))),
        "seed": args.seed,
        "progress_bar": False,
        # --threads, fixed (the engine's default follows the free cores)
        "engine": Engine(threads=args.threads),
    }


def run_amortized(ds: Dataset, combo: Combo, train_idx, val_idx, args) -> dict[str, Any]:
    m = make_scvi(ds, combo)
    elbo = schemes(args.iwae_k)[combo.scheme]()
    start = time.perf_counter()
    m.train(elbo=elbo, train_size=TRAIN_SIZE, **train_kwargs(ds, args))
    seconds = time.perf_counter() - start
    if not np.array_equal(m.validation_indices, val_idx):
        raise RuntimeError("SCVI.train split the cells differently from split().")
    row = {"train_seconds": seconds, "epochs": int(len(m.history))}
    start = time.perf_counter()
    with torch.no_grad():
        m.get_latent_representation(ds.adata[val_idx].copy())
    row["heldout_q_seconds"] = time.perf_counter() - start
    row.update(heldout_scores(m.model, m.guide, m.data, val_idx, args))
    row.update(cluster_scores(m.get_latent_representation(), ds.adata.obs["cell_type"]))
    cells = val_idx[: args.gap_cells]
    start = time.perf_counter()
    with pyro.get_param_store().scope():
        gap = amortization_gap(
            m.model,
            m.guide,
            m.data,
            cells,
            n_steps=args.refine_steps,
            n_samples=args.is_samples,
            seed=args.seed,
        )
    row.update(
        {
            "gap_cells": len(cells),
            "gap_seconds": time.perf_counter() - start,
            "amortization_gap": float(gap["gap"].mean()),
            "gap_elbo_amortized": float(gap["elbo_amortized"].mean()),
            "gap_elbo_refined": float(gap["elbo_refined"].mean()),
            "gap_marginal_ll_amortized": float(gap["marginal_ll_amortized"].mean()),
            "gap_marginal_ll_refined": float(gap["marginal_ll_refined"].mean()),
            "gap_fraction_of_cells_improved": float((gap["gap"] > 0).mean()),
        }
    )
    return {"row": row, "model": m}


def run_per_cell(ds: Dataset, combo: Combo, train_idx, val_idx, args) -> dict[str, Any]:
    train = ds.adata[train_idx].copy()
    m = make_scvi(ds, combo, adata=train, guide=PerCellGuide.from_data)
    lr = args.per_cell_lr
    optim = pyro.optim.Adam(lambda module, param: {"lr": lr if module == "guide" else 1e-3})
    start = time.perf_counter()
    m.train(optim=optim, train_size=1.0, **train_kwargs(ds, args))
    row = {"train_seconds": time.perf_counter() - start, "epochs": int(len(m.history))}
    held = pyro_scvi.from_anndata(
        ds.adata[val_idx],
        batch_key=ds.batch_key,
        batch_categories=m.batch_categories,
        var_names=m.var_names,
    )
    guide = PerCellGuide.from_data(held, n_latent=N_LATENT)
    start = time.perf_counter()
    with posterior.seeded(args.seed), pyro.get_param_store().scope():
        refine(m.model, guide, held, np.arange(held.n_cells), n_steps=args.refine_steps)
    row["heldout_q_seconds"] = time.perf_counter() - start
    row.update(heldout_scores(m.model, guide, held, np.arange(held.n_cells), args))
    latent = np.empty((ds.adata.n_obs, N_LATENT))
    latent[train_idx] = m.get_latent_representation()
    latent[val_idx] = guide.z_loc.detach().numpy()
    row.update(cluster_scores(latent, ds.adata.obs["cell_type"]))
    return {"row": row, "model": m}


def nuts_check(ds: Dataset, m: pyro_scvi.SCVI, val_idx, args) -> dict[str, Any]:
    """NUTS on a few held-out cells vs the amortized and the refined guide."""
    cells = val_idx[: ds.nuts_cells]
    start = time.perf_counter()
    samples = sample_nuts(
        m.model,
        m.data,
        cells,
        num_samples=args.nuts_samples,
        warmup_steps=args.nuts_warmup,
        seed=args.seed,
    )
    nuts_seconds = time.perf_counter() - start
    sub = pyro_scvi.from_anndata(
        ds.adata[cells], batch_key=ds.batch_key, batch_categories=m.batch_categories
    )
    refined = PerCellGuide.from_guide(m.guide, m.data, cells)
    with posterior.seeded(args.seed), pyro.get_param_store().scope():
        refine(m.model, refined, m.data, cells, n_steps=args.refine_steps)
    out = {
        "cells": int(len(cells)),
        "num_samples": args.nuts_samples,
        "warmup_steps": args.nuts_warmup,
        "seconds": nuts_seconds,
        "min_ess": float(samples["_ess"].min()),
        "guides": {},
    }
    for name, guide, data, idx in (
        ("amortized", m.guide, m.data, cells),
        ("refined", refined, sub, np.arange(len(cells))),
    ):
        # the refined guide's row i is cell i of ``sub``; the NUTS draws are in that order
        table = compare_to_nuts(m.model, guide, data, idx, samples=samples)
        out["guides"][name] = agreement(table).to_dict("index")
    return out


# ---------------------------------------------------------------------------- output
def _f(v: Any, spec: str) -> str:
    return "—" if v is None or (isinstance(v, float) and not np.isfinite(v)) else format(v, spec)


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# Priors x likelihoods x inference schemes on one yardstick",
        "",
        f"{results['date']}; {_common.machine_line(results)}, torch threads {s['threads']}; "
        f"torch {results['versions']['torch']}, pyro-ppl {results['versions']['pyro-ppl']}; "
        f"pyro_scvi commit {str(results['git']['pyro_scvi_commit'])[:7]}"
        + (" (+ uncommitted changes in pyro_scvi/)" if results["git"]["dirty"] else "")
        + f"; {results['total_seconds'] / 60:.1f} minutes in all "
        f"({results['cpu_seconds'] / 60:.1f} minutes of this process's CPU time).",
        "",
        f"Command: `{results['command']}`. Design: {s['design_note']}",
        "",
    ]
    for ds in results["datasets"]:
        lines += [
            f"## {ds['name']} ({ds['cells']} cells x {ds['genes']} genes; {ds['note']})",
            "",
            f"{ds['epochs']} epochs (KL warm-up {ds['kl_warmup_epochs']}), batch size 128, "
            f"lr 1e-3, n_latent {N_LATENT}; {ds['n_train']} training and {ds['n_heldout']} "
            f"held-out cells; held-out scores from {s['is_samples']} importance samples per "
            f"cell; amortization gap on {ds['gap_cells']} held-out cells after "
            f"{s['refine_steps']} refinement steps.",
            "",
            "| prior | likelihood | scheme | held-out log p(x) | held-out ELBO | "
            "amortization gap | KMeans ARI | KMeans NMI | train s | held-out q s |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in ds["runs"]:
            if "error" in r:
                lines.append(
                    f"| {r['prior']} | {r['likelihood']} | {r['scheme']} | failed: "
                    f"{r['error'].splitlines()[0][:80]} | | | | | | |"
                )
                continue
            lines.append(
                f"| {r['prior']} | {r['likelihood']} | {r['scheme']} | "
                f"{_f(r['heldout_marginal_ll'], '.2f')} | {_f(r['heldout_elbo'], '.2f')} | "
                f"{_f(r.get('amortization_gap'), '.2f')} | {_f(r['ari'], '.3f')} | "
                f"{_f(r['nmi'], '.3f')} | {_f(r['train_seconds'], '.0f')} | "
                f"{_f(r['heldout_q_seconds'], '.1f')} |"
            )
        default = next((r for r in ds["runs"] if r.get("is_default") and "error" not in r), None)
        if default is not None:
            lines += [
                "",
                f"Amortization gap of the default combination: "
                f"{default['amortization_gap']:.2f} nats per cell "
                f"(ELBO {default['gap_elbo_amortized']:.2f} -> {default['gap_elbo_refined']:.2f}"
                f"; log p(x) with the amortized / refined proposal "
                f"{default['gap_marginal_ll_amortized']:.2f} / "
                f"{default['gap_marginal_ll_refined']:.2f}; improved in "
                f"{100 * default['gap_fraction_of_cells_improved']:.0f}% of cells).",
            ]
        nuts = ds.get("nuts")
        if nuts and "error" not in nuts:
            lines += [
                "",
                f"NUTS gold standard (default combination, {nuts['cells']} held-out cells, "
                f"{nuts['warmup_steps']} warm-up + {nuts['num_samples']} draws, min ESS "
                f"{nuts['min_ess']:.0f}, {nuts['seconds']:.0f} s):",
                "",
                "| guide | site | mean error (posterior sd) | variance ratio q/p | "
                "coverage 50% | coverage 90% | coverage 95% |",
                "|---|---|---:|---:|---:|---:|---:|",
            ]
            for guide, sites in nuts["guides"].items():
                for site, a in sites.items():
                    lines.append(
                        f"| {guide} | {site} | {a['abs_mean_error']:.2f} | "
                        f"{a['variance_ratio']:.2f} | {a['coverage_0.5']:.2f} | "
                        f"{a['coverage_0.9']:.2f} | {a['coverage_0.95']:.2f} |"
                    )
        elif nuts:
            lines += ["", f"NUTS check failed: {nuts['error'].splitlines()[0]}"]
        lines.append("")
    lines += ["## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


NOTES = [
    "held-out log p(x): mean over held-out cells of the importance-sampled marginal "
    "log-likelihood (posterior.fit_statistics, the fitted guide as proposal), nats per cell, "
    "higher is better; a stochastic lower bound that is tighter the better the proposal. "
    "held-out ELBO: from the same draws.",
    "amortization gap: mean over cells of ELBO(refined per-cell q) - ELBO(encoder's q), "
    "refinement by SVI with the model fixed starting at the encoder's output; a lower bound "
    "on the true gap (refinement is not run to convergence). Not defined for per-cell.",
    "IWAE-K: RenyiELBO(alpha=0) with K vectorized particles; its minibatches are not "
    "rescaled (see pyro_scvi.train.loop). per-cell: PerCellGuide trained on the training cells "
    "only (its library prior from those cells), held-out cells fitted with the decoder "
    "fixed; its 'held-out q s' is that fit.",
    "train s: wall time of SCVI.train on a machine shared with other jobs: compare within a "
    "table, not across runs.",
    "NUTS: mean error is |mean_q - mean_NUTS| / sd_NUTS averaged over coordinates; variance "
    "ratio the median of var_q / var_NUTS; coverage the NUTS posterior mass inside q's "
    "central interval (equal to the level if q were exact).",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.trace.*")
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    all_schemes = schemes(args.iwae_k)
    prior_names = [n for n in PRIORS if hasattr(priors, n)]
    skipped = [n for n in PRIORS if not hasattr(priors, n)]
    combos = design(args.design, prior_names, list(likelihoods()), list(all_schemes))
    design_note = (
        "default combination (StandardNormal, zinb, Trace_ELBO) and each factor varied alone "
        "(one at a time), not the full product (about 3x longer)"
        if args.design == "oat"
        else "full prior x likelihood x scheme product"
    ) + (
        f"; priors {prior_names}, likelihoods {list(likelihoods())}, schemes "
        f"{list(all_schemes)}" + (f"; not in this package: {skipped}" if skipped else "")
    )
    if args.smoke:
        design_note += "; SMOKE RUN: 2 epochs on 150 cells, numbers are meaningless"
    results: dict[str, Any] = {
        **_common.run_metadata(argv or None, args.threads, script="compare_inference.py"),
        "settings": {**vars(args), "design_note": design_note, "n_latent": N_LATENT},
        "notes": NOTES,
        "datasets": [],
    }
    results["settings"]["data_dir"] = str(args.data_dir)
    results["settings"]["out_dir"] = str(args.out_dir)
    total, cpu = time.perf_counter(), time.process_time()
    for name in args.datasets:
        ds = load(name, args)
        train_idx, val_idx = split(ds.adata.n_obs, args.seed)
        entry: dict[str, Any] = {
            "name": name,
            "cells": ds.adata.n_obs,
            "genes": ds.adata.n_vars,
            "note": ds.note,
            "batch_key": ds.batch_key,
            "epochs": ds.max_epochs,
            "kl_warmup_epochs": train_kwargs(ds, args)["kl_warmup_epochs"],
            "n_train": len(train_idx),
            "n_heldout": len(val_idx),
            "gap_cells": min(args.gap_cells, len(val_idx)),
            "runs": [],
        }
        default_model = None
        for combo in combos:
            label = f"{name}: {combo.prior} / {combo.likelihood} / {combo.scheme}"
            print(label, file=sys.stderr, flush=True)
            row: dict[str, Any] = {**vars(combo), "is_default": combo == Combo(*DEFAULT)}
            start = time.perf_counter()
            try:
                run = (run_per_cell if combo.per_cell else run_amortized)(
                    ds, combo, train_idx, val_idx, args
                )
                row.update(run["row"])
                if row["is_default"]:
                    default_model = run["model"]
            except Exception as err:  # record and go on: one failure must not sink the table
                row["error"] = f"{type(err).__name__}: {err}"
                row["traceback"] = traceback.format_exc()
                print(f"  failed: {row['error']}", file=sys.stderr)
            row["total_seconds"] = time.perf_counter() - start
            entry["runs"].append(row)
        if default_model is not None and ds.nuts_cells > 0:
            print(f"{name}: NUTS", file=sys.stderr, flush=True)
            try:
                entry["nuts"] = nuts_check(ds, default_model, val_idx, args)
            except Exception as err:
                entry["nuts"] = {"error": f"{type(err).__name__}: {err}"}
        results["datasets"].append(entry)
    results["total_seconds"] = time.perf_counter() - total
    results["cpu_seconds"] = time.process_time() - cpu
    table = markdown(results)
    print(table)
    stem = "compare_inference" + ("_smoke" if args.smoke else "")
    _common.write_results(args.out_dir, stem, results, table)
    print(f"({results['total_seconds']:.0f} s in all)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
