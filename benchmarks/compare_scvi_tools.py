"""Side-by-side benchmark of pyro_scvi against the reference scvi-tools (1.4.2).

Both implementations are trained in this one process, on the same cells, with the same
architecture and optimizer settings, and then measured the same way.

What is compared
----------------
* Model: scVI with n_latent=10, n_hidden=128, n_layers=1, dropout 0.1, a ZINB likelihood,
  one dispersion per gene and a *latent* library size (scvi-tools:
  ``use_observed_lib_size=False``). On data with more than one batch both condition on
  ``obs["batch"]``; scvi-tools then gets ``encode_covariates=True`` so that, like
  pyro_scvi, its encoders see the batch too (its default only feeds it to the decoder).
* Training: Adam (lr 1e-3, eps 0.01, weight decay 1e-6 -- both defaults), minibatches of
  128 cells, the same number of epochs, linear KL warm-up over 400 epochs, no early
  stopping, and the same 90 % / 10 % train/validation split (computed once with the rule
  pyro_scvi uses, checked against ``model.train_indices`` after its run, and handed to
  scvi-tools through ``datasplitter_kwargs={"external_indexing": ...}``). Both compute
  the validation ELBO after every epoch (scvi-tools: ``check_val_every_n_epoch=1``; its
  default is never).
* Same ``torch.set_num_threads`` for both (default 1), CPU only, progress bars off.
  One thread is the default because these networks are small (the intra-op threads gain
  little) and because, on a machine shared with other jobs, two OpenMP threads on two
  cores made an epoch 10-50x slower and the timings meaningless -- pyro_scvi, which runs
  many more small operations per step, far more so than scvi-tools.

What is measured, per implementation and dataset
------------------------------------------------
* Wall-clock seconds around ``.train()`` divided by the number of epochs (so per-run
  set-up such as building the Lightning trainer is included), and training cells per
  second (training cells x epochs / seconds).
* KMeans (k = number of distinct ``obs["cell_type"]`` labels, ``n_init=10``, fixed
  ``random_state``) on the posterior mean of z from ``get_latent_representation()``,
  scored against the labels with ARI and NMI (scikit-learn).
* The final validation ELBO per cell (nats, higher is better). Each number is that
  implementation's own estimate: pyro_scvi uses a one-sample Monte-Carlo ELBO
  (``Trace_ELBO``), scvi-tools a one-sample reconstruction term with analytic KLs.
  Both are unbiased for the same quantity but are not computed by the same code.
* So that the ELBOs can also be compared by one yardstick, the trained scvi-tools
  weights are renamed into a pyro_scvi model (the networks are the same; the renaming
  is checked by recomputing scvi-tools' latent means) and both fits are scored by
  ``pyro_scvi.infer.evaluate_elbo`` on the validation and on the training cells
  ("common" ELBO, mean of several draws; not timed).

With ``--repeats N`` the runs alternate pyro_scvi, scvi-tools, pyro_scvi, ... (repeat r
uses seed ``--seed + r`` for both) and the table reports medians.

How to run
----------
::

    python -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0 -e . -r benchmarks/requirements.txt
    .venv-bench/bin/python benchmarks/compare_scvi_tools.py            # full run
    .venv-bench/bin/python benchmarks/compare_scvi_tools.py --smoke    # < 1 minute check

Results go to ``benchmarks/results/compare_scvi_tools.{json,md}`` (``--smoke`` writes
``compare_scvi_tools_smoke.{json,md}`` instead, so it never overwrites a real run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import anndata
import numpy as np
import scipy.sparse as sp
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATASETS = ("zeisel_cortex_subset_1464x1000.h5ad", "pbmc8k_200hvg.h5ad")
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools")

ARCHITECTURE: dict[str, Any] = {
    "n_latent": 10,
    "n_hidden": 128,
    "n_layers": 1,
    "dropout_rate": 0.1,
    "dispersion": "gene",
    "likelihood": "zinb",
    "library_size": "latent",
}
TRAINING: dict[str, Any] = {
    "batch_size": 128,
    "lr": 1e-3,
    "optimizer": "Adam (eps=0.01, weight_decay=1e-6; both implementations' defaults)",
    "train_size": 0.9,
    "kl_warmup_epochs": 400,
    "early_stopping": False,
    "validation_every_epoch": True,
}
KMEANS_N_INIT = 10
KMEANS_RANDOM_STATE = 0
SMOKE = {"max_epochs": 2, "subsample": 300}
COMMON_ELBO_SAMPLES = 10
ELBO_NOTE = (
    "Validation ELBO per cell (nats, higher is better) is each implementation's own "
    "estimate: pyro_scvi a one-sample Monte-Carlo Trace_ELBO, scvi-tools a one-sample "
    "reconstruction term plus analytic KLs (its elbo_validation, negated)."
)
COMMON_ELBO_NOTE = (
    "ELBO (common): both fitted models scored by one estimator -- scvi-tools' weights are "
    "renamed into a pyro_scvi model (same networks) and pyro_scvi's evaluate_elbo (eval "
    f"mode, weight 1 on every KL) is averaged over {COMMON_ELBO_SAMPLES} draws, on the "
    "validation and on the training cells; their gap shows overfitting."
)


# ---------------------------------------------------------------------------- set-up
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Benchmark pyro_scvi against scvi-tools on the same data and settings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Folder of .h5ad")
    p.add_argument(
        "--datasets", nargs="+", default=list(DEFAULT_DATASETS), help=".h5ad file names"
    )
    p.add_argument("--max-epochs", type=int, default=200, help="Epochs for both")
    p.add_argument("--repeats", type=int, default=1, help="Alternating runs per dataset")
    p.add_argument("--seed", type=int, default=0, help="Seed of repeat 0")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads for both (1 is robust on a shared machine; see docstring)",
    )
    p.add_argument(
        "--subsample", type=int, default=None, help="Use this many random cells per dataset"
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="Results folder")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"Quick check: {SMOKE['max_epochs']} epochs, first dataset only, "
        f"{SMOKE['subsample']} cells, results under a _smoke name",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.max_epochs = SMOKE["max_epochs"]
        args.subsample = SMOKE["subsample"]
        args.datasets = args.datasets[:1]
        args.repeats = 1
    if args.max_epochs < 1 or args.repeats < 1 or args.threads < 1:
        p.error("--max-epochs, --repeats and --threads must be positive.")
    return args


def quiet_libraries() -> None:
    """Silence Lightning's and scvi-tools' informational logging and known warnings."""
    import scvi

    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`__version__` is deprecated.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*is deprecated.*")


def load_dataset(path: Path, subsample: int | None, seed: int) -> anndata.AnnData:
    """Read raw counts as float32 CSR; optionally keep ``subsample`` random cells."""
    adata = anndata.read_h5ad(path)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    if subsample is not None and subsample < adata.n_obs:
        keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, subsample, replace=False))
        adata = adata[keep].copy()
    nonempty = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    if not nonempty.all():
        print(f"  dropping {int((~nonempty).sum())} cells with no counts", file=sys.stderr)
        adata = adata[nonempty].copy()
    return adata


def batch_key_for(adata: anndata.AnnData) -> str | None:
    """``"batch"`` when the data has more than one batch, else ``None``."""
    return "batch" if adata.obs["batch"].nunique() > 1 else None


def make_split(n_cells: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation cells by the rule of ``pyro_scvi.SCVI.train`` (checked after its run)."""
    perm = np.random.default_rng(seed).permutation(n_cells)
    n_train = max(2, int(round(train_size * n_cells)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


# ---------------------------------------------------------------------------- runs
def cluster_scores(latent: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """KMeans with k = number of labels on ``latent``; ARI and NMI against ``labels``."""
    k = len(np.unique(labels))
    pred = KMeans(
        n_clusters=k, n_init=KMEANS_N_INIT, random_state=KMEANS_RANDOM_STATE
    ).fit_predict(latent)
    return {
        "ari": float(adjusted_rand_score(labels, pred)),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
    }


def run_pyro_scvi(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> dict[str, Any]:
    """Train pyro_scvi once; return timings, latent means and the validation ELBO."""
    import pyro

    import pyro_scvi

    torch.set_num_threads(threads)
    # SCVI(...) builds (initializes) the networks before train(seed=...) seeds anything,
    # so seed here too; scvi-tools' settings.seed likewise comes before its model.
    pyro.set_rng_seed(seed)
    model = pyro_scvi.SCVI(
        adata,
        batch_key=batch_key,
        likelihood=pyro_scvi.ZINB(),
        n_latent=ARCHITECTURE["n_latent"],
        n_hidden=ARCHITECTURE["n_hidden"],
        n_layers=ARCHITECTURE["n_layers"],
        dropout_rate=ARCHITECTURE["dropout_rate"],
        dispersion=ARCHITECTURE["dispersion"],
        use_observed_lib_size=False,
    )
    start = time.perf_counter()
    model.train(
        max_epochs,
        batch_size=TRAINING["batch_size"],
        lr=TRAINING["lr"],
        train_size=TRAINING["train_size"],
        early_stopping=False,
        kl_warmup_epochs=TRAINING["kl_warmup_epochs"],
        device="cpu",
        seed=seed,
        progress_bar=False,
    )
    seconds = time.perf_counter() - start
    history = model.history
    split_matches = np.array_equal(model.train_indices, split[0]) and np.array_equal(
        model.validation_indices, split[1]
    )
    return {
        "train_seconds": seconds,
        "epochs_run": len(history),
        "seconds_in_epochs": float(history["seconds"].sum()),
        "n_train": len(model.train_indices),
        "n_validation": len(model.validation_indices),
        "split_matches": bool(split_matches),
        "validation_elbo_per_cell": float(history["validation_elbo"].iloc[-1]),
        "validation_elbo_curve": [float(v) for v in history["validation_elbo"]],
        "final_kl_weight": float(history["kl_weight"].iloc[-1]),
        "threads_after": torch.get_num_threads(),
        "latent": model.get_latent_representation(),
        "as_pyro_scvi": model,
    }


def run_scvi_tools(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> dict[str, Any]:
    """Train scvi-tools once on the given split; same outputs as :func:`run_pyro_scvi`."""
    import scvi

    torch.set_num_threads(threads)
    scvi.settings.seed = seed
    adata = adata.copy()  # setup_anndata writes registry columns into obs
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    model = scvi.model.SCVI(
        adata,
        n_latent=ARCHITECTURE["n_latent"],
        n_hidden=ARCHITECTURE["n_hidden"],
        n_layers=ARCHITECTURE["n_layers"],
        dropout_rate=ARCHITECTURE["dropout_rate"],
        dispersion=ARCHITECTURE["dispersion"],
        gene_likelihood="zinb",
        use_observed_lib_size=False,
        encode_covariates=batch_key is not None,
    )
    train_idx, val_idx = split
    batch_size = TRAINING["batch_size"]
    splitter: dict[str, Any] = {
        "external_indexing": [train_idx.copy(), val_idx.copy(), np.array([], dtype=np.int64)]
    }
    # pyro_scvi folds a last minibatch of one cell into the previous one; scvi-tools would
    # fail on it (batch norm), so drop it there -- a one-cell difference per epoch.
    if len(train_idx) % batch_size == 1:
        splitter["drop_last"] = True
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        batch_size=batch_size,
        early_stopping=False,
        datasplitter_kwargs=splitter,
        plan_kwargs={
            "lr": TRAINING["lr"],
            "optimizer": "Adam",
            "n_epochs_kl_warmup": TRAINING["kl_warmup_epochs"],
        },
        check_val_every_n_epoch=1,
        enable_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    val_curve = model.history["elbo_validation"].iloc[:, 0].astype(float)
    return {
        "train_seconds": seconds,
        "epochs_run": int(model.history["elbo_train"].shape[0]),
        "n_train": len(train_idx),
        "n_validation": len(val_idx),
        "split_matches": True,
        "validation_elbo_per_cell": -float(val_curve.iloc[-1]),
        "validation_elbo_curve": [-float(v) for v in val_curve],
        # scvi-tools does not log it; this is its _compute_kl_weight rule for the last epoch.
        "final_kl_weight": min(1.0, (max_epochs - 1) / TRAINING["kl_warmup_epochs"]),
        "threads_after": torch.get_num_threads(),
        "latent": model.get_latent_representation(),
        "as_pyro_scvi": scvi_tools_as_pyro_scvi(model, adata, batch_key),
    }


# scvi-tools module state-dict prefixes -> pyro_scvi's (guide, model), for n_layers=1.
_GUIDE_NAMES = {
    f"{enc}_encoder.{theirs}": f"{enc}_encoder.{ours}"
    for enc in ("z", "l")
    for theirs, ours in (
        ("encoder.fc_layers.Layer 0.0.", "body.0."),
        ("encoder.fc_layers.Layer 0.1.", "body.1."),
        ("mean_encoder.", "loc."),
        ("var_encoder.", "raw_var."),
    )
}
_MODEL_NAMES = {
    "decoder.px_decoder.fc_layers.Layer 0.0.": "decoder.body.0.",
    "decoder.px_decoder.fc_layers.Layer 0.1.": "decoder.body.1.",
    "decoder.px_scale_decoder.0.": "decoder.rho_logits.",
    "decoder.px_dropout_decoder.": "decoder.gate_logits.",
    "px_r": "log_theta",
}


def scvi_tools_as_pyro_scvi(model: Any, adata: anndata.AnnData, batch_key: str | None) -> Any:
    """A pyro_scvi ``SCVI`` holding a trained scvi-tools model's weights.

    The two networks are the same (Linear, BatchNorm, ReLU, dropout; softmax frequencies,
    gate logits, per-gene log inverse dispersion; log-normal library prior per batch), so
    this is a renaming. It lets pyro_scvi's ELBO estimator score both implementations'
    fits, which makes their ELBOs comparable. Every pyro_scvi tensor must be filled.
    """
    import pyro_scvi

    target = pyro_scvi.SCVI(
        adata,
        batch_key=batch_key,
        n_latent=ARCHITECTURE["n_latent"],
        n_hidden=ARCHITECTURE["n_hidden"],
        n_layers=ARCHITECTURE["n_layers"],
        dropout_rate=ARCHITECTURE["dropout_rate"],
        dispersion=ARCHITECTURE["dispersion"],
    )
    theirs = model.module.state_dict()
    for module, names in ((target.guide, _GUIDE_NAMES), (target.model, _MODEL_NAMES)):
        state = module.state_dict()
        filled = set()
        for key, value in theirs.items():
            for their_prefix, our_prefix in names.items():
                if key.startswith(their_prefix):
                    ours = our_prefix + key[len(their_prefix) :]
                    state[ours] = value.reshape(state[ours].shape).clone()
                    filled.add(ours)
        if module is target.model:
            state["library_prior.loc"] = theirs["library_log_means"].reshape(-1).clone()
            state["library_prior.scale"] = theirs["library_log_vars"].reshape(-1).sqrt()
            filled |= {"library_prior.loc", "library_prior.scale", "prior._zero"}
        missing = set(state) - filled
        if missing:
            raise KeyError(f"scvi-tools weights do not cover pyro_scvi's {sorted(missing)}")
        module.load_state_dict(state)
    target.is_trained = True
    return target


def common_elbo(model: Any, indices: np.ndarray, n_samples: int, seed: int) -> float:
    """ELBO per cell of ``indices`` by pyro_scvi's estimator, averaged over ``n_samples``."""
    import pyro

    from pyro_scvi.infer import evaluate_elbo

    pyro.set_rng_seed(seed)
    # A private parameter store: pyro.module would otherwise tie the two models' weights.
    with pyro.get_param_store().scope():
        values = [
            evaluate_elbo(model.model, model.guide, model.data, indices) for _ in range(n_samples)
        ]
    return float(np.mean(values))


RUNNERS = {"pyro_scvi": run_pyro_scvi, "scvi-tools": run_scvi_tools}


def benchmark_dataset(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """All runs on one dataset, alternating implementations; per-run numbers and medians."""
    adata = load_dataset(path, args.subsample, args.seed)
    batch_key = batch_key_for(adata)
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    info: dict[str, Any] = {
        "file": path.name,
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_batches": int(adata.obs["batch"].nunique()),
        "batch_key": batch_key,
        "n_cell_types": int(len(np.unique(labels))),
        "runs": [],
    }
    for repeat in range(args.repeats):
        seed = args.seed + repeat
        split = make_split(adata.n_obs, TRAINING["train_size"], seed)
        for impl in IMPLEMENTATIONS:
            load_before = os.getloadavg()[0]
            try:
                out = RUNNERS[impl](adata, batch_key, args.max_epochs, seed, split, args.threads)
            except Exception as err:  # record the failure, keep benchmarking
                print(f"  {impl:10s} repeat {repeat}: FAILED: {err!r}", file=sys.stderr)
                info["runs"].append(
                    {"implementation": impl, "repeat": repeat, "seed": seed, "error": repr(err)}
                )
                continue
            out["loadavg_1min_before"] = load_before
            out["loadavg_1min_after"] = os.getloadavg()[0]
            latent = out.pop("latent")
            fitted = out.pop("as_pyro_scvi")
            if impl == "scvi-tools":  # the renaming must give back scvi-tools' own latent
                out["conversion_latent_max_abs_diff"] = float(
                    np.abs(fitted.get_latent_representation() - latent).max()
                )
            for name, cells in (("validation", split[1]), ("train", split[0])):
                out[f"common_{name}_elbo_per_cell"] = common_elbo(
                    fitted, cells, COMMON_ELBO_SAMPLES, seed
                )
            epochs = out["epochs_run"]
            run = {
                "implementation": impl,
                "repeat": repeat,
                "seed": seed,
                **out,
                "seconds_per_epoch": out["train_seconds"] / epochs,
                "train_cells_per_second": out["n_train"] * epochs / out["train_seconds"],
                **cluster_scores(latent, labels),
            }
            if not run["split_matches"]:
                warnings.warn(
                    f"{impl} trained on another split than the one given to scvi-tools; "
                    "pyro_scvi's split rule changed, update make_split().",
                    stacklevel=1,
                )
            info["runs"].append(run)
            print(
                f"  {impl:10s} repeat {repeat}: {run['seconds_per_epoch']:.3f} s/epoch, "
                f"ARI {run['ari']:.3f}, NMI {run['nmi']:.3f}, "
                f"val ELBO {run['validation_elbo_per_cell']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    info["summary"] = summarize(info["runs"])
    return info


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats per implementation, and the time ratio pyro_scvi / scvi-tools."""
    keys = (
        "seconds_per_epoch",
        "train_cells_per_second",
        "ari",
        "nmi",
        "validation_elbo_per_cell",
        "common_validation_elbo_per_cell",
        "common_train_elbo_per_cell",
    )
    summary: dict[str, Any] = {}
    for impl in IMPLEMENTATIONS:
        ok = [r for r in runs if r["implementation"] == impl and "error" not in r]
        failed = sum(r["implementation"] == impl and "error" in r for r in runs)
        summary[impl] = {k: statistics.median(r[k] for r in ok) if ok else None for k in keys}
        summary[impl].update(n_ok=len(ok), n_failed=failed)
    pyro_t = summary["pyro_scvi"]["seconds_per_epoch"]
    scvi_t = summary["scvi-tools"]["seconds_per_epoch"]
    summary["time_ratio_pyro_over_scvi_tools"] = (
        pyro_t / scvi_t if pyro_t is not None and scvi_t is not None else None
    )
    return summary


def _fmt(value: float | None, spec: str) -> str:
    return "failed" if value is None else format(value, spec)


# ---------------------------------------------------------------------------- output
def markdown_table(results: dict[str, Any]) -> str:
    """The results as a markdown table with a short header of settings and notes."""
    s = results["settings"]
    lines = [
        "# pyro_scvi vs scvi-tools",
        "",
        f"{results['date']}; {_common.machine_line(results)}, torch threads {s['threads']}; "
        f"torch {results['versions']['torch']}, pyro-ppl {results['versions']['pyro-ppl']}, "
        f"scvi-tools {results['versions']['scvi-tools']}, "
        f"pyro_scvi {results['versions']['pyro_scvi']}.",
        "",
        f"{s['max_epochs']} epochs, batch size {s['batch_size']}, lr {s['lr']}, KL warm-up "
        f"{s['kl_warmup_epochs']} epochs, train size {s['train_size']} (same cells for both), "
        f"medians of {s['repeats']} alternating repeat(s)"
        + (f", {s['subsample']} cells subsampled" if s["subsample"] else "")
        + ".",
        "",
        "| dataset | cells x genes | implementation | s / epoch | train cells / s "
        "| time ÷ scvi-tools | KMeans ARI | KMeans NMI | val ELBO / cell (own) "
        "| val ELBO / cell (common) | train ELBO / cell (common) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        shape = f"{d['n_cells']} x {d['n_genes']}" + (
            f" ({d['n_batches']} batches)" if d["n_batches"] > 1 else ""
        )
        ratio = d["summary"]["time_ratio_pyro_over_scvi_tools"]
        for impl in IMPLEMENTATIONS:
            m = d["summary"][impl]
            lines.append(
                f"| {d['file'].removesuffix('.h5ad')} | {shape} | {impl} "
                f"| {_fmt(m['seconds_per_epoch'], '.3f')} "
                f"| {_fmt(m['train_cells_per_second'], '.0f')} "
                f"| {_fmt(ratio if impl == 'pyro_scvi' else 1.0, '.2f')} "
                f"| {_fmt(m['ari'], '.3f')} | {_fmt(m['nmi'], '.3f')} "
                f"| {_fmt(m['validation_elbo_per_cell'], '.2f')} "
                f"| {_fmt(m['common_validation_elbo_per_cell'], '.2f')} "
                f"| {_fmt(m['common_train_elbo_per_cell'], '.2f')} |"
                + (f" {m['n_failed']} run(s) failed" if m["n_failed"] else "")
            )
    lines += [
        "",
        "- s / epoch: wall time around `.train()` divided by epochs (includes per-epoch "
        "validation and per-run set-up). train cells / s: training cells x epochs / that time.",
        "- time ÷ scvi-tools: pyro_scvi's seconds per epoch over scvi-tools'; above 1 means "
        "pyro_scvi is slower.",
        f"- KMeans: k = number of cell types, n_init={KMEANS_N_INIT}, "
        f"random_state={KMEANS_RANDOM_STATE}, on the posterior mean of z.",
        f"- {ELBO_NOTE}",
        f"- {COMMON_ELBO_NOTE}",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON and markdown results."""
    args = parse_args(argv)
    quiet_libraries()
    paths = [args.data_dir / name for name in args.datasets]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"Missing data files: {missing}; pass --data-dir.", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {
        **_common.run_metadata(argv, args.threads, script="compare_scvi_tools.py"),
        "settings": {
            "max_epochs": args.max_epochs,
            "repeats": args.repeats,
            "seed": args.seed,
            "threads": args.threads,
            "subsample": args.subsample,
            "smoke": args.smoke,
            **ARCHITECTURE,
            **TRAINING,
            "kmeans": {"n_init": KMEANS_N_INIT, "random_state": KMEANS_RANDOM_STATE},
            "run_order": "per dataset: pyro_scvi, scvi-tools, pyro_scvi, scvi-tools, ...",
            "scvi_tools_extra": {
                "encode_covariates": "True when the data has >1 batch",
                "check_val_every_n_epoch": 1,
            },
        },
        "notes": [
            ELBO_NOTE,
            COMMON_ELBO_NOTE,
            "time_ratio_pyro_over_scvi_tools > 1 means pyro_scvi is slower.",
        ],
        "datasets": [],
    }
    for path in paths:
        print(f"{path.name}:", file=sys.stderr, flush=True)
        results["datasets"].append(benchmark_dataset(path, args))
    table = markdown_table(results)
    print(table)
    stem = "compare_scvi_tools" + ("_smoke" if args.smoke else "")
    _common.write_atomic(args.out_dir / f"{stem}.json", json.dumps(results, indent=2) + "\n")
    _common.write_atomic(args.out_dir / f"{stem}.md", table)
    print(f"Wrote {args.out_dir / stem}.json and .md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
