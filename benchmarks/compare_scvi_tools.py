"""One benchmark: pyro_scvi vs scvi-tools (1.4.2) vs a pure-PyTorch floor, side by side.

All three train the same scVI on the same cells, with the same architecture, optimizer
settings, minibatch size, epochs and train/validation split, on every dataset in
``../shared/data`` and on simulated ZINB data of 10,000 and 100,000 cells x 2,000 genes.
Each (implementation, dataset, repeat) runs in its own subprocess, so memory is measured per
implementation and no run inherits another's allocator state or caches.

What is compared
----------------
* Model: scVI with n_latent=10, n_hidden=128, n_layers=1, dropout 0.1, a ZINB likelihood,
  one dispersion per gene and a *latent* library size (scvi-tools:
  ``use_observed_lib_size=False``). On data with more than one batch all condition on
  ``obs["batch"]``; scvi-tools then gets ``encode_covariates=True`` so that, like
  pyro_scvi, its encoders see the batch too (its default only feeds it to the decoder).
* Training: Adam (lr 1e-3, eps 0.01, weight decay 1e-6 -- scvi-tools' and pyro_scvi's
  defaults), minibatches of 128 cells, the same number of epochs, linear KL warm-up over
  400 epochs, no early stopping, and the same 90 % / 10 % train/validation split (computed
  once with the rule pyro_scvi uses, checked against ``model.train_indices`` after its run,
  handed to scvi-tools through ``datasplitter_kwargs={"external_indexing": ...}`` and to
  the floor directly). All compute the validation ELBO after every epoch (scvi-tools:
  ``check_val_every_n_epoch=1``; its default is never).
* torch-floor (``benchmarks/torch_floor.py``): pyro_scvi's own encoder/decoder modules
  trained by a hand-written PyTorch loop (closed-form ZINB, analytic KLs, plain Adam), no
  Pyro: ``pyro_scvi time / floor time`` is the overhead of Pyro and of pyro_scvi's loop.
* Same ``torch.set_num_threads`` for all (default 1; ``OMP_NUM_THREADS`` etc. set to the
  same in each worker), CPU only, progress bars off. One thread is the default because
  these networks are small (the intra-op threads gain little) and because, on a machine
  shared with other jobs, two OpenMP threads on two cores made an epoch 10-50x slower.
* Real datasets train ``--max-epochs`` (default 100); the synthetic ones their own
  ``--synthetic-epochs`` (default 20 for 10,000 cells and 3 for 100,000, whose epochs take
  half a minute or more on a laptop-class CPU). Synthetic data: ``pyro_scvi.datasets.
  synthetic_zinb`` with 5 cell types, 2 batches and a batch effect of sd 0.5 (log scale,
  per gene), generated once and handed to every worker as the same ``.h5ad`` file.

What is measured, per run
-------------------------
* Speed: wall-clock seconds around ``.train()`` (the floor: around its training loop and
  batch-norm refresh) divided by the epochs run, and training cells per second.
* Memory: the worker process's peak resident set size (``ru_maxrss``) right after
  training, and its RSS just before the model is built (after imports and data loading:
  the baseline). The peak is reset to the baseline at that point (``/proc/self/clear_refs``
  on Linux), so a transient of data loading does not count; "peak - baseline" is what the
  model, its data structures and training added at their peak. The floor's peak is read
  after ``run_torch_floor`` returns (its latent means included).
* Latent space, via ``pyro_scvi.analysis.metrics.score_latent`` on the posterior mean of z of at
  most ``--metric-cells`` random cells: KMeans ARI / NMI against the cell types,
  silhouette by cell type and, on multi-batch data, batch entropy mixing (50 neighbours,
  100 random cells, 50 repeats, natural log) and batch silhouette.
* Fit: the final validation ELBO per cell as each implementation estimates it ("own"),
  and one common estimator for all three: each fit is turned into a pyro_scvi ``SCVI``
  (scvi-tools' weights renamed, checked by recomputing scvi-tools' latent means; the floor
  trains pyro_scvi modules) and scored by pyro_scvi's ``evaluate_elbo`` on the validation
  and on (at most ``--eval-cells``) training cells, and by ``SCVI.get_marginal_ll``
  (importance sampling, ``--ll-samples`` draws) on at most ``--ll-cells`` validation cells.
  Not timed.
* Imputation (real datasets by default; pyro_scvi and scvi-tools): a second model is
  trained, same settings, on the counts with 10 % of the non-zero entries of all cells set
  to 0 (``pyro_scvi.analysis.metrics.corrupt_counts``, scheme "uniform"); it imputes the expected
  count ``exp(l) * rho`` at each cell's latent library (pyro_scvi ``impute()["mean"]``,
  scvi-tools ``get_normalized_expression(library_size="latent")``), and the score is the
  median absolute error on the hidden entries (``pyro_scvi.analysis.metrics.imputation_error``).
  Not timed.

With ``--repeats N`` the order of the implementations rotates from repeat to repeat (repeat
r uses seed ``--seed + r`` for all) and the tables report medians.

How to run
----------
::

    python benchmarks/compare_scvi_tools.py            # full run
    python benchmarks/compare_scvi_tools.py --smoke    # ~1 minute

Results go to ``benchmarks/results/compare_scvi_tools.{json,md}`` (``--smoke``:
``compare_scvi_tools_smoke.{json,md}``), rewritten after every dataset, atomically.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

if TYPE_CHECKING:  # the parent process imports no numerical library (see run_benchmark)
    import anndata
    import numpy as np

DEFAULT_DATA_DIR = _common.data_dir()
DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_DATASETS = (
    "zeisel_cortex_subset_1464x1000.h5ad",
    "pbmc8k_200hvg.h5ad",
    "cellbench_3cl_2tech.h5ad",
    "synthetic:10000x2000",
    "synthetic:100000x2000",
)
DEFAULT_SYNTHETIC_EPOCHS = ("10000x2000=20", "100000x2000=3", "20")
IMPLEMENTATIONS = ("pyro_scvi", "scvi-tools", "torch-floor")
IMPUTING = ("pyro_scvi", "scvi-tools")

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
SYNTHETIC: dict[str, Any] = {"n_clusters": 5, "n_batches": 2, "batch_effect": 0.5}
IMPUTATION: dict[str, Any] = {"scheme": "uniform", "rate": 0.1}
KMEANS_N_INIT = 10
KMEANS_RANDOM_STATE = 0
SMOKE: dict[str, Any] = {
    "max_epochs": 2,
    "synthetic": "synthetic:300x100",
    "subsample": 300,
    "ll_samples": 10,
    "ll_cells": 100,
    "elbo_samples": 2,
    "impute_samples": 5,
}
ELBO_NOTE = (
    "val ELBO (own): the final validation ELBO per cell as each implementation estimates "
    "it: pyro_scvi a one-sample Monte-Carlo Trace_ELBO, scvi-tools a one-sample "
    "reconstruction term plus analytic KLs (its elbo_validation, negated), torch-floor a "
    "one-sample reconstruction term plus analytic KLs. Nats, higher is better."
)
COMMON_ELBO_NOTE = (
    "ELBO (common): every fit turned into a pyro_scvi model (scvi-tools' weights renamed; "
    "the floor trains pyro_scvi's modules) and scored by pyro_scvi's evaluate_elbo (eval "
    "mode, weight 1 on every KL), averaged over {elbo_samples} draws, on the validation and "
    "on at most {eval_cells} training cells; their gap shows overfitting. Nats per cell, "
    "higher is better."
)
LL_NOTE = (
    "val log p(x) (common): SCVI.get_marginal_ll of the same pyro_scvi model, importance "
    "sampling with the guide as proposal, K = {ll_samples} draws, on at most {ll_cells} "
    "validation cells. Nats per cell, higher is better."
)


# ---------------------------------------------------------------------------- options
def parse_dataset(spec: str) -> dict[str, Any]:
    """``name.h5ad`` (a file in ``--data-dir``) or ``synthetic:<cells>x<genes>``."""
    if spec.startswith("synthetic:"):
        size = spec.split(":", 1)[1].lower()
        try:
            n_cells, n_genes = (int(v) for v in size.split("x"))
        except ValueError:
            raise ValueError(
                f"{spec!r}: write synthetic:<cells>x<genes>, e.g. synthetic:10000x2000"
            ) from None
        if n_cells < 10 or n_genes < 2:
            raise ValueError(f"{spec!r}: at least 10 cells and 2 genes.")
        return {
            "kind": "synthetic",
            "spec": spec,
            "name": f"synthetic_{n_cells}x{n_genes}",
            "size": f"{n_cells}x{n_genes}",
            "n_cells": n_cells,
            "n_genes": n_genes,
        }
    return {"kind": "file", "spec": spec, "name": spec.removesuffix(".h5ad"), "file": spec}


def parse_synthetic_epochs(tokens: list[str]) -> tuple[dict[str, int], int | None]:
    """``["10000x2000=20", "100000x2000=3", "20"]`` -> per-size epochs and a default."""
    per_size: dict[str, int] = {}
    default = None
    for token in tokens:
        if "=" in token:
            size, epochs = token.split("=", 1)
            per_size[size.lower()] = int(epochs)
        else:
            default = int(token)
    if any(e < 1 for e in per_size.values()) or (default is not None and default < 1):
        raise ValueError("synthetic epochs must be positive")
    return per_size, default


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Benchmark pyro_scvi against scvi-tools and a pure-PyTorch floor on the "
        "same data and settings, each run in its own process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="Folder of .h5ad")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=list(DEFAULT_DATASETS),
        help="file names in --data-dir and/or synthetic:<cells>x<genes>",
    )
    p.add_argument("--max-epochs", type=int, default=100, help="Epochs on real datasets")
    p.add_argument(
        "--synthetic-epochs",
        nargs="+",
        default=list(DEFAULT_SYNTHETIC_EPOCHS),
        help="epochs per synthetic size as <cells>x<genes>=<epochs>; a bare number is the "
        "default for other sizes (without one: --max-epochs)",
    )
    p.add_argument(
        "--implementations",
        nargs="+",
        default=list(IMPLEMENTATIONS),
        choices=IMPLEMENTATIONS,
        help="which implementations to run",
    )
    p.add_argument("--repeats", type=int, default=1, help="Runs per implementation and dataset")
    p.add_argument("--seed", type=int, default=0, help="Seed of repeat 0 (and of the data)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (and OMP/MKL threads) for every run; 1 is robust on a "
        "shared machine (see docstring)",
    )
    p.add_argument(
        "--subsample", type=int, default=None, help="Random cells per real dataset (all)"
    )
    p.add_argument(
        "--imputation",
        choices=("auto", "on", "off"),
        default="auto",
        help="imputation runs: auto = real datasets only",
    )
    p.add_argument(
        "--metric-cells", type=int, default=10000, help="at most this many cells for metrics"
    )
    p.add_argument(
        "--eval-cells",
        type=int,
        default=10000,
        help="at most this many train (and validation) cells for the common ELBO",
    )
    p.add_argument("--ll-cells", type=int, default=1000, help="validation cells for log p(x)")
    p.add_argument("--ll-samples", type=int, default=100, help="importance samples, log p(x)")
    p.add_argument("--elbo-samples", type=int, default=10, help="draws for the common ELBO")
    p.add_argument(
        "--impute-samples", type=int, default=25, help="posterior draws per imputed value"
    )
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="Results folder")
    p.add_argument(
        "--smoke",
        action="store_true",
        help=f"Quick check: the first real dataset subsampled to {SMOKE['subsample']} cells "
        f"and {SMOKE['synthetic']}, {SMOKE['max_epochs']} epochs, few samples; results "
        "under a _smoke name",
    )
    args = p.parse_args(argv)
    if args.smoke:
        real = [d for d in args.datasets if not d.startswith("synthetic:")]
        args.datasets = real[:1] + [SMOKE["synthetic"]]
        args.max_epochs = SMOKE["max_epochs"]
        args.synthetic_epochs = [str(SMOKE["max_epochs"])]
        args.subsample = SMOKE["subsample"]
        args.repeats = 1
        for key in ("ll_samples", "ll_cells", "elbo_samples", "impute_samples"):
            setattr(args, key, SMOKE[key])
    try:
        args.dataset_specs = [parse_dataset(d) for d in args.datasets]
        args.synthetic_epochs_parsed = parse_synthetic_epochs(args.synthetic_epochs)
    except ValueError as err:
        p.error(str(err))
    positive = ("max_epochs", "repeats", "threads", "metric_cells", "eval_cells", "ll_cells")
    positive += ("ll_samples", "elbo_samples", "impute_samples")
    if any(getattr(args, k) < 1 for k in positive):
        p.error("--" + ", --".join(k.replace("_", "-") for k in positive) + " must be positive.")
    args.implementations = [i for i in IMPLEMENTATIONS if i in args.implementations]
    return args


def epochs_for(ds: dict[str, Any], args: argparse.Namespace) -> int:
    """Epochs of a dataset: ``--max-epochs`` for files, ``--synthetic-epochs`` for simulations."""
    if ds["kind"] == "file":
        return args.max_epochs
    per_size, default = args.synthetic_epochs_parsed
    return per_size.get(ds["size"], default if default is not None else args.max_epochs)


def imputation_for(ds: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether to run the imputation benchmark on a dataset."""
    return args.imputation == "on" or (args.imputation == "auto" and ds["kind"] == "file")


# ---------------------------------------------------------------------------- data
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
    import anndata
    import numpy as np
    import scipy.sparse as sp

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


def make_synthetic(ds: dict[str, Any], seed: int) -> anndata.AnnData:
    """``pyro_scvi.datasets.synthetic_zinb`` with :data:`SYNTHETIC` settings, float32 CSR."""
    import numpy as np
    import scipy.sparse as sp
    from pyro_scvi.datasets import synthetic_zinb

    adata = synthetic_zinb(ds["n_cells"], ds["n_genes"], **SYNTHETIC, seed=seed)
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    nonempty = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    if not nonempty.all():
        adata = adata[nonempty].copy()
    return adata


def batch_key_for(adata: anndata.AnnData) -> str | None:
    """``"batch"`` when the data has more than one batch, else ``None``."""
    return "batch" if adata.obs["batch"].nunique() > 1 else None


def make_split(n_cells: int, train_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation cells by the rule of ``pyro_scvi.SCVI.train`` (checked after its run)."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n_cells)
    n_train = max(2, int(round(train_size * n_cells)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def some_cells(cells: np.ndarray, at_most: int, seed: int) -> np.ndarray:
    """``cells`` itself, or ``at_most`` of them drawn at random (sorted)."""
    import numpy as np

    if len(cells) <= at_most:
        return cells
    return np.sort(np.random.default_rng(seed).choice(cells, at_most, replace=False))


def prepare_main(spec_json: str) -> int:
    """Worker mode ``--prepare``: load or simulate one dataset, write it and its description."""
    spec = json.loads(spec_json)
    ds = spec["dataset"]
    start = time.perf_counter()
    if ds["kind"] == "file":
        adata = load_dataset(Path(spec["data_dir"]) / ds["file"], spec["subsample"], spec["seed"])
    else:
        adata = make_synthetic(ds, spec["seed"])
        adata.uns.pop("simulation", None)
    batch_key = batch_key_for(adata)
    info = {
        "n_cells": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_batches": int(adata.obs["batch"].nunique()),
        "batch_key": batch_key,
        "n_cell_types": int(adata.obs["cell_type"].nunique()),
        "nonzero_fraction": float(adata.X.nnz / (adata.n_obs * adata.n_vars)),
    }
    adata.write_h5ad(spec["h5ad"])
    info["prepare_seconds"] = time.perf_counter() - start
    _common.write_atomic(Path(spec["info"]), json.dumps(info))
    return 0


# ---------------------------------------------------------------------------- training
def train_pyro_scvi(
    adata: anndata.AnnData, batch_key: str | None, max_epochs: int, seed: int, threads: int
) -> tuple[Any, float]:
    """A trained pyro_scvi ``SCVI`` and the wall time of its ``.train()``.

    The engine decides how the run steps (compiled ELBO, fused ZINB kernel) as by default,
    but with ``threads`` fixed, as for the other implementations (by default it would
    follow the free cores); ``model.engine`` records the choice.
    """
    import pyro
    import torch

    import pyro_scvi
    from pyro_scvi.train.engine import Engine

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
        engine=Engine(threads=threads),
    )
    return model, time.perf_counter() - start


def run_pyro_scvi(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> dict[str, Any]:
    """Train pyro_scvi once; return timings, peak RSS, latent means and the validation ELBO."""
    import numpy as np
    import torch

    model, seconds = train_pyro_scvi(adata, batch_key, max_epochs, seed, threads)
    peak = _common.peak_rss_mib()
    history = model.history
    split_matches = np.array_equal(model.train_indices, split[0]) and np.array_equal(
        model.validation_indices, split[1]
    )
    return {
        "train_seconds": seconds,
        "peak_rss_mib": peak,
        "epochs_run": len(history),
        "seconds_in_epochs": float(history["seconds"].sum()),
        "n_train": len(model.train_indices),
        "n_validation": len(model.validation_indices),
        "split_matches": bool(split_matches),
        "validation_elbo_per_cell": float(history["validation_elbo"].iloc[-1]),
        "validation_elbo_curve": [float(v) for v in history["validation_elbo"]],
        "final_kl_weight": float(history["kl_weight"].iloc[-1]),
        "threads_after": torch.get_num_threads(),
        "epoch_seconds": [float(v) for v in history["seconds"]],
        "engine": model.engine,
        "fused_kernel_used": model.engine["fused_kernel"],
        "latent": model.get_latent_representation(),
        "as_pyro_scvi": model,
    }


def train_scvi_tools(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> tuple[Any, float]:
    """A trained scvi-tools ``SCVI`` on the given split and the wall time of its ``.train()``.

    ``setup_anndata`` writes registry columns into ``adata.obs`` (each worker owns its data).
    """
    import numpy as np
    import scvi
    import torch

    torch.set_num_threads(threads)
    scvi.settings.seed = seed
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
    timer = _epoch_timer()
    start = time.perf_counter()
    model.train(
        max_epochs=max_epochs,
        callbacks=[timer],
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
    model.epoch_seconds_ = timer.epoch_seconds
    return model, seconds


def _epoch_timer() -> Any:
    """A Lightning callback: wall seconds from each training epoch's start to the next's
    (so with that epoch's validation), the last one to the end of training."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.epoch_seconds: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            now = time.perf_counter()
            if self.starts:
                self.epoch_seconds.append(now - self.starts[-1])
            self.starts.append(now)

        def on_train_end(self, trainer, pl_module) -> None:
            if self.starts:
                self.epoch_seconds.append(time.perf_counter() - self.starts[-1])

    return EpochTimer()


def run_scvi_tools(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
) -> dict[str, Any]:
    """Train scvi-tools once on the given split; same outputs as :func:`run_pyro_scvi`."""
    import torch

    model, seconds = train_scvi_tools(adata, batch_key, max_epochs, seed, split, threads)
    peak = _common.peak_rss_mib()
    val_curve = model.history["elbo_validation"].iloc[:, 0].astype(float)
    return {
        "train_seconds": seconds,
        "peak_rss_mib": peak,
        "epochs_run": int(model.history["elbo_train"].shape[0]),
        "n_train": len(split[0]),
        "n_validation": len(split[1]),
        "split_matches": True,
        "validation_elbo_per_cell": -float(val_curve.iloc[-1]),
        "validation_elbo_curve": [-float(v) for v in val_curve],
        # scvi-tools does not log it; this is its _compute_kl_weight rule for the last epoch.
        "final_kl_weight": min(1.0, (max_epochs - 1) / TRAINING["kl_warmup_epochs"]),
        "threads_after": torch.get_num_threads(),
        "epoch_seconds": getattr(model, "epoch_seconds_", []),
        "latent": model.get_latent_representation(),
        "as_pyro_scvi": scvi_tools_as_pyro_scvi(model, adata, batch_key),
    }


def run_floor(
    adata: anndata.AnnData,
    batch_key: str | None,
    max_epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    threads: int,
    fused: bool | None = None,
) -> dict[str, Any]:
    """``torch_floor.run_torch_floor`` with this benchmark's settings where it takes them;
    ``fused`` (the ZINB kernel) is the floor's own choice unless given."""
    from torch_floor import run_torch_floor

    wanted = {
        "batch_size": TRAINING["batch_size"],
        "lr": TRAINING["lr"],
        "kl_warmup_epochs": TRAINING["kl_warmup_epochs"],
        "architecture": {
            k: ARCHITECTURE[k]
            for k in ("n_latent", "n_hidden", "n_layers", "dropout_rate", "dispersion")
        },
    }
    if fused is not None:
        wanted["fused"] = fused
    accepted = inspect.signature(run_torch_floor).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    out = run_torch_floor(adata, batch_key, max_epochs, seed, split, threads, **kwargs)
    out["floor_kwargs_passed"] = sorted(kwargs)
    return out


RUNNERS = {"pyro_scvi": run_pyro_scvi, "scvi-tools": run_scvi_tools, "torch-floor": run_floor}


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


# ---------------------------------------------------------------------------- scoring
def cluster_scores(latent: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """KMeans with k = number of labels on ``latent``; ARI and NMI against ``labels``.

    Used only when ``pyro_scvi.analysis.metrics`` is not installed.
    """
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    k = len(np.unique(labels))
    pred = KMeans(
        n_clusters=k, n_init=KMEANS_N_INIT, random_state=KMEANS_RANDOM_STATE
    ).fit_predict(latent)
    return {
        "ari": float(adjusted_rand_score(labels, pred)),
        "nmi": float(normalized_mutual_info_score(labels, pred)),
    }


def latent_scores(
    latent: np.ndarray,
    labels: np.ndarray,
    batches: np.ndarray | None,
    cells: np.ndarray,
    seed: int,
) -> dict[str, Any]:
    """``pyro_scvi.analysis.metrics.score_latent`` on ``cells`` (else KMeans ARI/NMI)."""
    try:
        from pyro_scvi.analysis.metrics import score_latent
    except ImportError as err:
        out: dict[str, Any] = cluster_scores(latent[cells], labels[cells])
        out["metrics_note"] = (
            f"pyro_scvi.analysis.metrics not available ({err}); KMeans ARI/NMI only"
        )
        return out
    return dict(
        score_latent(
            latent[cells], labels[cells], None if batches is None else batches[cells], seed=seed
        )
    )


def common_elbo(model: Any, indices: np.ndarray, n_samples: int, seed: int) -> float:
    """ELBO per cell of ``indices`` by pyro_scvi's estimator, averaged over ``n_samples``."""
    import numpy as np
    import pyro

    from pyro_scvi.train.passes import evaluate_elbo

    pyro.set_rng_seed(seed)
    # A private parameter store: pyro.module would otherwise tie the two models' weights.
    with pyro.get_param_store().scope():
        values = [
            evaluate_elbo(model.model, model.guide, model.data, indices) for _ in range(n_samples)
        ]
    return float(np.mean(values))


def common_marginal_ll(
    model: Any,
    adata: anndata.AnnData,
    cells: np.ndarray,
    n_samples: int,
    seed: int,
    observed_library: bool = False,
) -> float:
    """Mean per-cell ``SCVI.get_marginal_ll`` (K = ``n_samples``) of ``cells``;
    ``observed_library``: ``log p(x | observed library)`` instead."""
    import pyro

    with pyro.get_param_store().scope():
        return float(
            model.get_marginal_ll(
                adata[cells].copy(),
                n_samples=n_samples,
                seed=seed,
                observed_library=observed_library,
            )
        )


def imputation_run(
    impl: str,
    adata: anndata.AnnData,
    batch_key: str | None,
    epochs: int,
    seed: int,
    split: tuple[np.ndarray, np.ndarray],
    spec: dict[str, Any],
) -> dict[str, Any]:
    """Train ``impl`` on corrupted counts; median L1 of its imputation at the hidden entries.

    Same imputation as ``heldout_and_imputation.py``: the expected count ``exp(l) * rho`` at
    the cell's latent library size, averaged over posterior draws.
    """
    import numpy as np
    import scipy.sparse as sp

    from pyro_scvi.analysis.metrics import corrupt_counts, imputation_error

    x = np.asarray(adata.X.toarray(), dtype=np.float32)
    y, hidden = corrupt_counts(x, scheme=IMPUTATION["scheme"], rate=IMPUTATION["rate"], seed=seed)
    corrupted = adata.copy()
    corrupted.X = sp.csr_matrix(y)
    n_emptied = int((y.sum(1) == 0).sum())
    start = time.perf_counter()
    n = spec["impute_samples"]
    if impl == "pyro_scvi":
        model, seconds = train_pyro_scvi(corrupted, batch_key, epochs, seed, spec["threads"])
        pred = np.asarray(model.impute(corrupted, n_samples=n, seed=seed)["mean"])
    elif impl == "scvi-tools":
        model, seconds = train_scvi_tools(
            corrupted, batch_key, epochs, seed, split, spec["threads"]
        )
        pred = np.asarray(
            model.get_normalized_expression(
                corrupted, library_size="latent", n_samples=n, return_mean=True
            )
        )
    else:
        raise ValueError(f"no imputation for {impl}")
    return {
        "imputation_median_l1": imputation_error(pred, x, hidden),
        "imputation_mean_l1": float(np.abs(pred[hidden] - x[hidden]).mean()),
        "imputation_hidden_entries": len(hidden[0]),
        "imputation_cells_emptied": n_emptied,
        "imputation_train_seconds": seconds,
        "imputation_seconds": time.perf_counter() - start,
    }


def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities become ``None``, numpy scalars Python numbers."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------------- worker
def worker_main(spec_json: str, run: Any = None) -> int:
    """Worker mode ``--worker``: one run; the result (or the error) goes to a JSON file.

    ``run``: the function of the spec that does the run (default :func:`run_worker`;
    ``speed_defaults.py`` passes its own).
    """
    spec = json.loads(spec_json)
    try:
        result = (run or run_worker)(spec)
    except Exception as err:  # the parent records it and goes on
        traceback.print_exc()
        result = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
    _common.write_atomic(Path(spec["result"]), json.dumps(_finite(result)) + "\n")
    return 0


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one implementation on one dataset in this process, then score the fit."""
    start_worker = time.perf_counter()
    impl, ds, seed = spec["implementation"], spec["dataset"], spec["seed"]
    import gc

    import anndata
    import numpy as np
    import scipy.sparse as sp
    import torch

    torch.set_num_threads(spec["threads"])
    # The implementation's libraries are imported before the memory baseline.
    if impl == "scvi-tools":
        quiet_libraries()
    elif impl == "pyro_scvi":
        import pyro_scvi  # noqa: F401
    else:
        import torch_floor  # noqa: F401

        import pyro_scvi  # noqa: F401
    adata = anndata.read_h5ad(ds["h5ad"])
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    batch_key = ds["batch_key"]
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    batches = adata.obs["batch"].astype(str).to_numpy() if batch_key else None
    split = make_split(adata.n_obs, TRAINING["train_size"], seed)
    gc.collect()
    memory = {
        "rss_baseline_mib": _common.current_rss_mib(),
        "peak_rss_before_baseline_mib": _common.peak_rss_mib(),
    }
    memory["peak_reset_at_baseline"] = _common.reset_peak_rss()

    out = RUNNERS[impl](adata, batch_key, spec["epochs"], seed, split, spec["threads"])
    if "peak_rss_mib" not in out:  # the floor's runner: read after it returns
        out["peak_rss_mib"] = _common.peak_rss_mib()
        memory["peak_read_after_runner_returned"] = True
    memory["vm_hwm_after_train_mib"] = _common.high_water_rss_mib()
    if memory["rss_baseline_mib"] is not None:
        memory["peak_minus_baseline_mib"] = out["peak_rss_mib"] - memory["rss_baseline_mib"]
    latent = out.pop("latent")
    fitted = out.pop("as_pyro_scvi")
    epochs = out["epochs_run"]
    run: dict[str, Any] = {
        **out,
        **memory,
        "seconds_per_epoch": out["train_seconds"] / epochs,
        "train_cells_per_second": out["n_train"] * epochs / out["train_seconds"],
        **steady_state(out.get("epoch_seconds") or []),
    }
    if not run["split_matches"]:
        warnings.warn(
            f"{impl} trained on another split than the one given to the others; "
            "pyro_scvi's split rule changed, update make_split().",
            stacklevel=1,
        )

    t = time.perf_counter()
    errors: dict[str, str] = {}
    if impl == "scvi-tools":  # the renaming must give back scvi-tools' own latent
        run["conversion_latent_max_abs_diff"] = float(
            np.abs(fitted.get_latent_representation() - latent).max()
        )
    cells = some_cells(np.arange(adata.n_obs), spec["metric_cells"], seed)
    run["metric_cells"] = len(cells)
    try:
        run.update(latent_scores(latent, labels, batches, cells, seed))
    except Exception as err:
        errors["metrics"] = f"{type(err).__name__}: {err}"
    try:
        for name, part in (("validation", split[1]), ("train", split[0])):
            use = some_cells(part, spec["eval_cells"], seed)
            run[f"common_{name}_elbo_cells"] = len(use)
            run[f"common_{name}_elbo_per_cell"] = common_elbo(
                fitted, use, spec["elbo_samples"], seed
            )
    except Exception as err:
        errors["common_elbo"] = f"{type(err).__name__}: {err}"
    try:
        use = some_cells(split[1], spec["ll_cells"], seed)
        run["marginal_ll_cells"] = len(use)
        run["marginal_ll_samples"] = spec["ll_samples"]
        run["marginal_ll_per_cell"] = common_marginal_ll(
            fitted, adata, use, spec["ll_samples"], seed
        )
    except Exception as err:
        errors["marginal_ll"] = f"{type(err).__name__}: {err}"
    run["scoring_seconds"] = time.perf_counter() - t
    if spec["imputation"] and impl in IMPUTING:
        try:
            run.update(imputation_run(impl, adata, batch_key, spec["epochs"], seed, split, spec))
        except Exception as err:
            errors["imputation"] = f"{type(err).__name__}: {err}"
    if errors:
        run["errors"] = errors
        for stage, message in errors.items():
            print(f"  {impl}: {stage} failed: {message}", file=sys.stderr)
    run["worker_seconds"] = time.perf_counter() - start_worker
    return run


def steady_state(epoch_seconds: list[float]) -> dict[str, float | None]:
    """First epoch (it carries compilation and set-up) and the median of the others."""
    if not epoch_seconds:
        return {"first_epoch_seconds": None, "median_epoch_seconds": None}
    rest = epoch_seconds[1:] or epoch_seconds
    return {
        "first_epoch_seconds": epoch_seconds[0],
        "median_epoch_seconds": statistics.median(rest),
    }


# ---------------------------------------------------------------------------- parent
SUMMARY_KEYS = (
    "seconds_per_epoch",
    "first_epoch_seconds",
    "median_epoch_seconds",
    "train_cells_per_second",
    "peak_rss_mib",
    "peak_minus_baseline_mib",
    "ari",
    "nmi",
    "silhouette_label",
    "entropy_batch_mixing",
    "batch_silhouette",
    "validation_elbo_per_cell",
    "common_validation_elbo_per_cell",
    "common_train_elbo_per_cell",
    "marginal_ll_per_cell",
    "imputation_median_l1",
)


def _subprocess(
    mode: str, spec: dict[str, Any], threads: int | None, script: str | None = None
) -> int:
    """Run ``script`` (default: this one) in ``mode`` (``--worker`` / ``--prepare``) in a
    fresh interpreter; ``threads=None`` leaves the thread variables as they are."""
    env = dict(os.environ)
    if threads is not None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    cmd = [sys.executable, script or str(Path(__file__).resolve()), mode, json.dumps(spec)]
    # The worker's stdout (Lightning's notices) goes to our stderr: stdout is the table.
    return subprocess.run(cmd, env=env, stdout=sys.stderr).returncode


def prepare_dataset(
    ds: dict[str, Any], args: argparse.Namespace, tmp: Path
) -> dict[str, Any] | str:
    """The dataset written to ``tmp`` by a ``--prepare`` subprocess, or an error message."""
    if ds["kind"] == "file" and not (args.data_dir / ds["file"]).exists():
        return f"missing file {args.data_dir / ds['file']} (pass --data-dir)"
    spec = {
        "dataset": ds,
        "data_dir": str(args.data_dir),
        "subsample": args.subsample,
        "seed": args.seed,
        "h5ad": str(tmp / f"{ds['name']}.h5ad"),
        "info": str(tmp / f"{ds['name']}.json"),
    }
    rc = _subprocess("--prepare", spec, args.threads)
    info_path = Path(spec["info"])
    if rc != 0 or not info_path.exists():
        return f"preparing the data failed (exit code {rc})"
    return {**json.loads(info_path.read_text()), "h5ad": spec["h5ad"]}


def run_one(
    impl: str, ds: dict[str, Any], repeat: int, args: argparse.Namespace, tmp: Path
) -> dict[str, Any]:
    """One worker subprocess; its result with the load average around it."""
    seed = args.seed + repeat
    spec = {
        "implementation": impl,
        "dataset": {k: ds[k] for k in ("name", "h5ad", "batch_key")},
        "epochs": ds["epochs"],
        "seed": seed,
        "threads": args.threads,
        "imputation": ds["imputation"],
        "metric_cells": args.metric_cells,
        "eval_cells": args.eval_cells,
        "ll_cells": args.ll_cells,
        "ll_samples": args.ll_samples,
        "elbo_samples": args.elbo_samples,
        "impute_samples": args.impute_samples,
        "result": str(tmp / f"result_{ds['name']}_{impl}_{repeat}.json"),
    }
    return {"implementation": impl, "repeat": repeat, "seed": seed} | spawn_worker(
        spec, args.threads
    )


def spawn_worker(
    spec: dict[str, Any], threads: int | None, script: str | None = None
) -> dict[str, Any]:
    """Run ``script --worker spec``; its result (from ``spec["result"]``) with the wall time
    of the subprocess and the load average around it."""
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rc = _subprocess("--worker", spec, threads, script)
    wall = time.perf_counter() - start
    result_path = Path(spec["result"])
    if result_path.exists():
        result = json.loads(result_path.read_text())
        result_path.unlink()
    else:
        result = {"error": f"worker exited with code {rc} and wrote no result"}
    return {
        **result,
        "worker_wall_seconds": wall,
        "loadavg_1min_before": load_before,
        "loadavg_1min_after": os.getloadavg()[0],
    }


def run_order(implementations: list[str], repeat: int) -> list[str]:
    """The implementations, rotated by ``repeat`` so that none always runs first."""
    k = repeat % len(implementations)
    return implementations[k:] + implementations[:k]


def summarize(
    runs: list[dict[str, Any]], implementations: list[str], keys: tuple[str, ...] = SUMMARY_KEYS
) -> dict[str, Any]:
    """Medians of ``keys`` over repeats per implementation, and the time ratios between them."""
    summary: dict[str, Any] = {}
    for impl in implementations:
        ok = [r for r in runs if r["implementation"] == impl and "error" not in r]
        failed = [r for r in runs if r["implementation"] == impl and "error" in r]
        medians = {}
        for key in keys:
            values = [r[key] for r in ok if r.get(key) is not None]
            medians[key] = statistics.median(values) if values else None
        summary[impl] = {**medians, "n_ok": len(ok), "n_failed": len(failed)}
        if failed:
            summary[impl]["error"] = failed[0]["error"]

    def time_of(impl: str) -> float | None:
        return summary.get(impl, {}).get("seconds_per_epoch")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    pyro_t, scvi_t, floor_t = time_of("pyro_scvi"), time_of("scvi-tools"), time_of("torch-floor")
    summary["time_ratio_pyro_over_scvi_tools"] = ratio(pyro_t, scvi_t)
    summary["speedup_pyro_vs_scvi_tools"] = ratio(scvi_t, pyro_t)
    summary["time_ratio_pyro_over_torch_floor"] = ratio(pyro_t, floor_t)
    summary["time_ratio_scvi_tools_over_torch_floor"] = ratio(scvi_t, floor_t)

    def steady(impl: str) -> float | None:
        return summary.get(impl, {}).get("median_epoch_seconds")

    pyro_s, scvi_s, floor_s = steady("pyro_scvi"), steady("scvi-tools"), steady("torch-floor")
    summary["steady_speedup_pyro_vs_scvi_tools"] = ratio(scvi_s, pyro_s)
    summary["steady_time_ratio_pyro_over_torch_floor"] = ratio(pyro_s, floor_s)
    return summary


def benchmark_dataset(ds: dict[str, Any], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Prepare one dataset, run every implementation and repeat, summarize."""
    entry: dict[str, Any] = {
        "name": ds["name"],
        "spec": ds["spec"],
        "kind": ds["kind"],
        "epochs": epochs_for(ds, args),
        "imputation": imputation_for(ds, args),
    }
    if ds["kind"] == "synthetic":
        entry["synthetic"] = {**SYNTHETIC, "seed": args.seed}
    info = prepare_dataset(ds, args, tmp)
    if isinstance(info, str):
        print(f"  {info}", file=sys.stderr)
        return {**entry, "error": info, "runs": [], "summary": {}}
    entry.update(info)
    entry["runs"] = []
    floor_missing = None
    if "torch-floor" in args.implementations and importlib.util.find_spec("torch_floor") is None:
        floor_missing = "not available: benchmarks/torch_floor.py is missing"
    try:
        for repeat in range(args.repeats):
            for impl in run_order(args.implementations, repeat):
                if impl == "torch-floor" and floor_missing:
                    run = {"implementation": impl, "repeat": repeat, "error": floor_missing}
                else:
                    run = run_one(impl, entry, repeat, args, tmp)
                entry["runs"].append(run)
                print(f"  {impl:11s} repeat {repeat}: {describe(run)}", file=sys.stderr)
    finally:
        Path(info["h5ad"]).unlink(missing_ok=True)
    entry.pop("h5ad")
    entry["summary"] = summarize(entry["runs"], args.implementations)
    return entry


def describe(run: dict[str, Any]) -> str:
    """One progress line for a finished run."""
    if "error" in run:
        return f"FAILED: {run['error']}"
    parts = [
        f"{run['seconds_per_epoch']:.3f} s/epoch",
        f"peak {run['peak_rss_mib']:.0f} MiB",
        f"ARI {_fmt(run.get('ari'), '.3f')}",
        f"val ELBO {_fmt(run.get('validation_elbo_per_cell'), '.2f')} (own) "
        f"{_fmt(run.get('common_validation_elbo_per_cell'), '.2f')} (common)",
        f"log p(x) {_fmt(run.get('marginal_ll_per_cell'), '.2f')}",
    ]
    if "imputation_median_l1" in run:
        parts.append(f"imputation L1 {run['imputation_median_l1']:.3f}")
    if run.get("errors"):
        parts.append(f"errors in {sorted(run['errors'])}")
    return ", ".join(parts)


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _yes_no(flags: list[Any]) -> str:
    known = [f for f in flags if f is not None]
    if not known:
        return "—"
    return "yes" if all(known) else ("no" if not any(known) else "mixed")


# ---------------------------------------------------------------------------- output
def table_header(results: dict[str, Any], title: str, how: str, threads: str = "") -> list[str]:
    """A results table's title, its date / machine / threads / versions / commit line and
    its command line followed by ``how`` (the settings) and the total time."""
    s, v, g = results["settings"], results["versions"], results["git"]
    commit = str(g["pyro_scvi_commit"])[:7] + (" + uncommitted changes" if g["dirty"] else "")
    return [
        f"# {title}",
        "",
        f"{results['date']}; {_common.machine_line(results)}; {threads}"
        f"torch {v['torch']}, pyro-ppl {v['pyro-ppl']}, scvi-tools {v['scvi-tools']}, "
        f"pyro_scvi {v['pyro_scvi']} (commit {commit})."
        + (" SMOKE RUN: numbers are meaningless." if s["smoke"] else ""),
        "",
        f"Command: `{results['command']}`. {how}"
        + (
            f"; {results['total_seconds'] / 60:.1f} minutes in all"
            if "total_seconds" in results
            else "; incomplete"
        )
        + ".",
        "",
    ]


def markdown_table(results: dict[str, Any]) -> str:
    """The results as a speed table and an accuracy table, with a header and notes."""
    s = results["settings"]
    impls = s["implementations"]
    how = (
        f"Batch size {s['batch_size']}, lr {s['lr']}, KL warm-up {s['kl_warmup_epochs']} "
        f"epochs, train size {s['train_size']} (same cells for all), every run in its own "
        f"process, medians of {s['repeats']} repeat(s)"
        + (f", real datasets subsampled to {s['subsample']} cells" if s["subsample"] else "")
    )
    lines = [
        *table_header(
            results,
            "pyro_scvi vs scvi-tools vs a pure-PyTorch floor",
            how,
            threads=f"torch threads {s['threads']}; ",
        ),
        "## Speed and memory",
        "",
        "| dataset | cells x genes | epochs | implementation | s / epoch | train cells / s "
        "| peak RSS (MiB) | peak - baseline (MiB) | time ÷ scvi-tools | time ÷ torch-floor |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        if "error" in d:
            lines.append(f"| {d['name']} | | | | {d['error']} | | | | | |")
            continue
        shape = f"{d['n_cells']} x {d['n_genes']}" + (
            f" ({d['n_batches']} batches)" if d["n_batches"] > 1 else ""
        )
        scvi_t = d["summary"].get("scvi-tools", {}).get("seconds_per_epoch")
        floor_t = d["summary"].get("torch-floor", {}).get("seconds_per_epoch")
        for impl in impls:
            m = d["summary"][impl]
            t = m["seconds_per_epoch"]
            if t is None:
                note = m.get("error", "failed")
                lines.append(
                    f"| {d['name']} | {shape} | {d['epochs']} | {impl} | {note} | | | | | |"
                )
                continue
            lines.append(
                f"| {d['name']} | {shape} | {d['epochs']} | {impl} | {t:.3f} "
                f"| {_fmt(m['train_cells_per_second'], '.0f')} "
                f"| {_fmt(m['peak_rss_mib'], '.0f')} "
                f"| {_fmt(m['peak_minus_baseline_mib'], '.0f')} "
                f"| {_fmt(t / scvi_t if scvi_t else None, '.2f')} "
                f"| {_fmt(t / floor_t if floor_t else None, '.2f')} |"
                + (f" {m['n_failed']} run(s) failed" if m["n_failed"] else "")
            )
    lines += [
        "",
        "| dataset | pyro_scvi time ÷ scvi-tools time | pyro_scvi speed-up vs scvi-tools (x) "
        "| pyro_scvi time ÷ torch-floor time | scvi-tools time ÷ torch-floor time "
        "| first epoch s (pyro_scvi / scvi-tools / floor) | median epoch s (same) "
        "| steady speed-up vs scvi-tools (x) | steady pyro_scvi ÷ floor | fused ZINB kernel "
        "(pyro_scvi / floor) |",
        "|---|---:|---:|---:|---:|---|---|---:|---:|---|",
    ]
    for d in results["datasets"]:
        if "error" in d:
            continue
        sm = d["summary"]

        def each(key: str, spec: str, sm=sm) -> str:
            return " / ".join(
                _fmt(sm.get(i, {}).get(key), spec)
                for i in ("pyro_scvi", "scvi-tools", "torch-floor")
            )

        fused = " / ".join(
            _yes_no([r.get("fused_kernel_used") for r in d["runs"] if r["implementation"] == i])
            for i in ("pyro_scvi", "torch-floor")
        )
        lines.append(
            f"| {d['name']} | {_fmt(sm['time_ratio_pyro_over_scvi_tools'], '.2f')} "
            f"| {_fmt(sm['speedup_pyro_vs_scvi_tools'], '.2f')} "
            f"| {_fmt(sm['time_ratio_pyro_over_torch_floor'], '.2f')} "
            f"| {_fmt(sm['time_ratio_scvi_tools_over_torch_floor'], '.2f')} "
            f"| {each('first_epoch_seconds', '.2f')} | {each('median_epoch_seconds', '.3f')} "
            f"| {_fmt(sm.get('steady_speedup_pyro_vs_scvi_tools'), '.2f')} "
            f"| {_fmt(sm.get('steady_time_ratio_pyro_over_torch_floor'), '.2f')} "
            f"| {fused} |"
        )
    lines += [
        "",
        "## Accuracy",
        "",
        "| dataset | implementation | ARI | NMI | silhouette (label) | batch entropy "
        "| batch silhouette | val ELBO (own) | val ELBO (common) | train ELBO (common) "
        "| val log p(x) (common) | imputation median L1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in results["datasets"]:
        if "error" in d:
            continue
        for impl in impls:
            m = d["summary"][impl]
            if m["seconds_per_epoch"] is None:
                continue
            lines.append(
                f"| {d['name']} | {impl} | {_fmt(m['ari'], '.3f')} | {_fmt(m['nmi'], '.3f')} "
                f"| {_fmt(m['silhouette_label'], '.3f')} "
                f"| {_fmt(m['entropy_batch_mixing'], '.3f')} "
                f"| {_fmt(m['batch_silhouette'], '.3f')} "
                f"| {_fmt(m['validation_elbo_per_cell'], '.2f')} "
                f"| {_fmt(m['common_validation_elbo_per_cell'], '.2f')} "
                f"| {_fmt(m['common_train_elbo_per_cell'], '.2f')} "
                f"| {_fmt(m['marginal_ll_per_cell'], '.2f')} "
                f"| {_fmt(m['imputation_median_l1'], '.3f')} |"
            )
    lines += ["", *(f"- {note}" for note in results["notes"]), ""]
    return "\n".join(lines)


def notes(args: argparse.Namespace) -> list[str]:
    """The notes under the tables: units, directions and how each column is computed."""
    return [
        "s / epoch (lower is better): wall time around `.train()` (floor: its training loop "
        "and batch-norm refresh) divided by epochs; includes the per-epoch validation and "
        "per-run set-up. train cells / s (higher is better): training cells x epochs / that "
        "time.",
        "peak RSS (MiB, lower is better): the run's process, `ru_maxrss` right after "
        "training, its peak reset at the baseline (so a data-loading transient does not "
        "count). baseline: the RSS after imports and data loading, before the model is "
        "built; peak - baseline is what the model and its training added at their peak. "
        "torch-floor's peak is read when run_torch_floor returns (after its latent means).",
        "first epoch s, median epoch s: wall seconds of the first epoch (it carries one-off "
        "costs: pyro_scvi's JIT trace and part of the fused kernel's loading, Lightning's "
        "set-up) and the "
        "median of the others (steady state; scvi-tools' from a Lightning callback, epoch "
        "start to next epoch start, so with its validation). steady speed-up and steady "
        "÷ floor are ratios of those medians. fused ZINB kernel: whether pyro_scvi and the "
        "floor (which decides by the same rule, pyro_scvi.train.engine.Engine.resolve) computed "
        "the ZINB log-density with the fused kernel of pyro_scvi.train.kernels (pyro_scvi's "
        "whole engine choice is in the JSON, runs[].engine). "
        "Before the runs, one subprocess compiles that kernel once "
        "(warm_kernel_cache_seconds in the JSON), so that every timed run finds torch's "
        "on-disk compile cache as any later run on the machine would; each run still pays "
        "its own loading of it (a few seconds, inside train() and the floor's clock: mostly "
        "before the first epoch, where pyro_scvi's engine and the floor compile it when they "
        "choose it, partly in the first epoch).",
        "time ÷ X: this row's seconds per epoch over X's; above 1 means slower than X. "
        "speed-up vs scvi-tools = scvi-tools time ÷ pyro_scvi time (above 1: pyro_scvi is "
        "faster).",
        f"ARI, NMI (higher is better): KMeans (k = number of cell types, n_init "
        f"{KMEANS_N_INIT}) on the posterior mean of z vs the cell types; silhouette (label, "
        "higher is better) of the cell types; batch entropy (natural log, 50 neighbours, 100 "
        "random cells, 50 repeats; ln 2 = 0.693 is perfect mixing of 2 batches) and batch "
        "silhouette (1 - |ASW| within cell types, 1 = mixed) on multi-batch data only, higher "
        f"is better mixing. All from pyro_scvi.analysis.metrics.score_latent on at most "
        f"{args.metric_cells} random cells.",
        ELBO_NOTE,
        COMMON_ELBO_NOTE.format(elbo_samples=args.elbo_samples, eval_cells=args.eval_cells),
        LL_NOTE.format(ll_samples=args.ll_samples, ll_cells=args.ll_cells),
        f"imputation median L1 (counts, lower is better): a second model, same settings, "
        f"trained on the counts with {IMPUTATION['rate']:.0%} of the non-zero entries of "
        f"all cells set to 0; median |imputed - original| on those entries, imputed = "
        f"expected count exp(l) * rho at the latent library, mean of {args.impute_samples} "
        "posterior draws (pyro_scvi impute()['mean'], scvi-tools get_normalized_expression("
        "library_size='latent')). Real datasets only unless --imputation on; not for "
        "torch-floor.",
        f"Synthetic data: pyro_scvi.datasets.synthetic_zinb with {SYNTHETIC['n_clusters']} "
        f"cell types, {SYNTHETIC['n_batches']} batches, batch effect sd "
        f"{SYNTHETIC['batch_effect']}, seed {args.seed}; few epochs, so far from converged "
        "(the KL weight is still small): their accuracy columns compare implementations, "
        "not models.",
    ]


def warm_main() -> int:
    """Worker mode ``--warm-kernel``: compile pyro_scvi's fused ZINB kernel once.

    torch.compile caches the compiled kernel on disk; the first compilation on a machine
    takes several times longer than loading it later. Doing it here, untimed by the runs,
    makes every timed run see the cache as any run after a user's first one does.
    """
    from pyro_scvi.train import kernels

    if not kernels.precompile():
        print("  no compiled kernel: the fused ZINB kernel runs uncompiled", file=sys.stderr)
    return 0


def run_benchmark(args: argparse.Namespace, argv: list[str] | None) -> int:
    """The parent: prepare data, spawn one worker per run, write the tables.

    It imports no numerical library, so the workers' ``ru_maxrss`` (which on Linux starts at
    the parent's peak RSS at spawn time) is not inflated by it.
    """
    missing = [
        str(args.data_dir / ds["file"])
        for ds in args.dataset_specs
        if ds["kind"] == "file" and not (args.data_dir / ds["file"]).exists()
    ]
    if missing:
        print(f"Missing data files: {missing}; pass --data-dir.", file=sys.stderr)
        return 2
    start = time.perf_counter()
    results: dict[str, Any] = {
        **_common.run_metadata(argv, args.threads, script="compare_scvi_tools.py"),
        "settings": {
            "datasets": args.datasets,
            "max_epochs": args.max_epochs,
            "synthetic_epochs": args.synthetic_epochs,
            "implementations": args.implementations,
            "repeats": args.repeats,
            "seed": args.seed,
            "threads": args.threads,
            "subsample": args.subsample,
            "imputation": args.imputation,
            "metric_cells": args.metric_cells,
            "eval_cells": args.eval_cells,
            "ll_cells": args.ll_cells,
            "ll_samples": args.ll_samples,
            "elbo_samples": args.elbo_samples,
            "impute_samples": args.impute_samples,
            "smoke": args.smoke,
            **ARCHITECTURE,
            **TRAINING,
            "synthetic": SYNTHETIC,
            "imputation_corruption": IMPUTATION,
            "kmeans": {"n_init": KMEANS_N_INIT},
            "run_order": "per dataset and repeat r: the implementations rotated by r",
            "scvi_tools_extra": {
                "encode_covariates": "True when the data has >1 batch",
                "check_val_every_n_epoch": 1,
            },
        },
        "notes": notes(args),
        "datasets": [],
    }
    stem = "compare_scvi_tools" + ("_smoke" if args.smoke else "")
    if "pyro_scvi" in args.implementations or "torch-floor" in args.implementations:
        t = time.perf_counter()
        rc = _subprocess("--warm-kernel", {}, args.threads)
        results["warm_kernel_cache_seconds"] = time.perf_counter() - t
        results["warm_kernel_cache_exit_code"] = rc
    with tempfile.TemporaryDirectory(prefix="compare_scvi_tools_") as tmp:
        for ds in args.dataset_specs:
            print(f"{ds['name']}:", file=sys.stderr, flush=True)
            results["datasets"].append(benchmark_dataset(ds, args, Path(tmp)))
            if ds is not args.dataset_specs[-1]:  # partial results survive a crash
                _common.write_atomic(
                    args.out_dir / f"{stem}.json", json.dumps(results, indent=2) + "\n"
                )
    results["total_seconds"] = time.perf_counter() - start
    table = markdown_table(results)
    print(table)
    _common.write_results(args.out_dir, stem, results, table)
    failed = any("error" in d for d in results["datasets"])
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, with ``--worker`` / ``--prepare``, one part of it)."""
    raw = sys.argv[1:] if argv is None else argv
    if len(raw) == 2 and raw[0] == "--worker":
        return worker_main(raw[1])
    if len(raw) == 2 and raw[0] == "--prepare":
        return prepare_main(raw[1])
    if len(raw) == 2 and raw[0] == "--warm-kernel":
        return warm_main()
    args = parse_args(argv)
    return run_benchmark(args, argv)


if __name__ == "__main__":
    sys.exit(main())
