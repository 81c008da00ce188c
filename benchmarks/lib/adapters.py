"""One adapter per implementation of scVI, fitting and scoring through one interface
(``benchmarks/README.md``, "The code"); ``run`` holds what the fit measured. ``matched=True``:
:data:`MATCHED`, :data:`TRAINING`, no early stopping, validation every epoch, CPU.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
import warnings
from pathlib import Path
from typing import Any

from .data import make_split

MATCHED = dict(n_latent=10, n_hidden=128, n_layers=1, dropout_rate=0.1, dispersion="gene")
TRAINING = {"batch_size": 128, "lr": 1e-3, "train_size": 0.9, "kl_warmup_epochs": 400}
#: The module each implementation imports (checked without importing it).
MODULES = {"pyro_scvi": "pyro_scvi", "scvi-tools": "scvi", "torch-floor": "torch"}


def skipped(impls: list[str]) -> dict[str, str]:
    """The implementations that cannot be imported here, each with the reason."""
    why = "skipped: {} not installed (pip install -e '.[bench]')"
    return {i: why.format(i) for i in impls if importlib.util.find_spec(MODULES[i]) is None}


class Adapter:
    """The interface; see the module. ``options``: each implementation's own settings."""

    name = ""

    def __init__(self, adata: Any, batch_key: str | None = None, **options: Any) -> None:
        self.adata, self.batch_key, self.options = adata, batch_key, options
        self.matched = options.pop("matched", False)
        self.seed, self.threads = options.pop("seed", None), options.pop("threads", None)
        self.quiet = options.pop("quiet", True)
        self.run: dict[str, Any] = {}
        self.model: Any = None

    def fit(self, epochs: int, split: tuple[Any, Any] | None = None) -> Adapter:
        raise NotImplementedError

    def _timed(self, train: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        train(**kwargs)
        done = time.perf_counter()
        self.run |= {"train_seconds": done - start, "train_done_at": done}

    def latent(self) -> Any:
        return self.model.get_latent_representation()

    def as_pyro_scvi(self) -> Any:
        """The fit as a trained :class:`pyro_scvi.SCVI` (for the common estimators)."""
        return self.model

    def common_elbo(self, cells: Any, n_samples: int, seed: int) -> float:
        """ELBO per cell of ``cells`` by pyro_scvi's estimator (eval mode, KL weight 1)."""
        import pyro

        with pyro.get_param_store().scope():  # pyro.module would tie two models' weights
            model = self.as_pyro_scvi()
            return float(model.get_elbo(self.adata[cells].copy(), n_samples=n_samples, seed=seed))

    def common_marginal_ll(
        self, cells: Any, n_samples: int, seed: int, observed_library: bool = False
    ) -> float:
        """Importance-sampled log p(x) per cell of ``cells`` by pyro_scvi's estimator;
        ``observed_library``: log p(x | observed library)."""
        import pyro

        kwargs = {"n_samples": n_samples, "seed": seed, "observed_library": observed_library}
        with pyro.get_param_store().scope():
            return float(self.as_pyro_scvi().get_marginal_ll(self.adata[cells].copy(), **kwargs))

    elbo = common_elbo
    marginal_ll = common_marginal_ll

    def impute(self, adata: Any, n_samples: int, seed: int) -> Any:
        """Expected counts exp(l) * rho of every entry at the cell's latent library."""
        import numpy as np

        return np.asarray(self.model.impute(adata, n_samples=n_samples, seed=seed)["mean"])

    def _history(self, epoch_seconds: list[float], curve: list[float], n_train: int) -> None:
        self.run |= {"epochs_run": len(epoch_seconds), "epoch_seconds": epoch_seconds}
        self.run |= {"n_train": n_train, "validation_elbo_curve": curve}
        self.run["validation_elbo_per_cell"] = curve[-1] if curve else None


class PyroScvi(Adapter):
    """pyro_scvi. Options: ``model`` (keywords of :class:`pyro_scvi.SCVI`), ``train`` (of
    ``train``), ``engine`` (an Engine, a preset name or a mapping), ``cache`` (a folder: the
    fit is saved there, and loaded from there when it exists)."""

    name = "pyro_scvi"

    def fit(self, epochs: int, split: tuple[Any, Any] | None = None) -> PyroScvi:
        import numpy as np
        import pyro
        import torch

        import pyro_scvi
        from pyro_scvi.train.engine import Engine

        o, cache = self.options, self.options.get("cache")
        if self.threads:
            torch.set_num_threads(self.threads)
        if cache and Path(cache).exists():
            self.model = pyro_scvi.SCVI.load(cache, self.adata)
            self.run = {"train_seconds": 0.0, "loaded_from": str(cache)}
            return self
        kwargs = {}
        if self.matched:  # SCVI() builds its networks before train(seed=) seeds anything
            pyro.set_rng_seed(self.seed or 0)
            kwargs = MATCHED | {"likelihood": pyro_scvi.ZINB(), "use_observed_lib_size": False}
        kwargs |= {"batch_key": self.batch_key, **o.get("model", {})}
        self.model = pyro_scvi.SCVI(self.adata, **kwargs)
        train: dict[str, Any] = {"max_epochs": epochs}
        if self.matched:
            train |= TRAINING | {"early_stopping": False, "device": "cpu"}
        engine = o.get("engine", Engine(threads=self.threads) if self.threads else None)
        # each only when set: train()'s own defaults otherwise
        for key, value in (("seed", self.seed), ("engine", engine)):
            train |= {key: value} if value is not None else {}
        train |= {"progress_bar": False} if self.quiet else {}
        self._timed(self.model.train, **train | o.get("train", {}))
        h = self.model.history
        curve = [float(v) for v in h["validation_elbo"]]
        self._history([float(v) for v in h["seconds"]], curve, len(self.model.train_indices))
        self.run |= {"n_validation": len(self.model.validation_indices)}
        self.run["engine"] = self.model.engine
        self.run["fused_kernel_used"] = self.model.engine["fused_kernel"]
        self.run["threads_per_epoch"] = [int(v) for v in h["threads"]] if "threads" in h else []
        if split is not None:
            ours = (self.model.train_indices, self.model.validation_indices)
            self.run["split_matches"] = all(map(np.array_equal, ours, split))
        if cache:
            self.model.save(cache)
        return self


def quiet_scvi_tools() -> None:
    """scvi-tools' and Lightning's notices to warnings only, and their known warnings off."""
    import scvi

    scvi.settings.verbosity = logging.WARNING
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "scvi", "pydeseq2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for text in ("many workers", "`__version__` is deprecated", "logging interval", "LeafSpec"):
        warnings.filterwarnings("ignore", message=f".*{text}.*")


def epoch_timer() -> Any:
    """A Lightning callback: wall seconds from each training epoch's start to the next's
    (with that epoch's validation), the last one to the end of training."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.epoch_seconds: list[float] = []

        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            self.on_train_end(trainer, pl_module)  # the previous epoch's lap
            self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            if self.starts:
                self.epoch_seconds.append(time.perf_counter() - self.starts[-1])

    return EpochTimer()


class ScviTools(Adapter):
    """scvi-tools. Options: ``model`` (keywords of ``scvi.model.SCVI``), ``device`` (``cuda``:
    Lightning's GPU accelerator), ``batch_size``, ``lr``, ``cache`` (as for :class:`PyroScvi`).
    It trains on a copy of the data (``setup_anndata`` writes into ``obs``), ``self.adata``."""

    name = "scvi-tools"

    def fit(self, epochs: int, split: tuple[Any, Any] | None = None) -> ScviTools:
        import numpy as np
        import scvi
        import torch

        quiet_scvi_tools()
        o, cache = self.options, self.options.get("cache")
        if self.threads:
            torch.set_num_threads(self.threads)
        self.adata = self.adata.copy()
        if self.seed is not None:
            scvi.settings.seed = self.seed
        scvi.model.SCVI.setup_anndata(self.adata, batch_key=self.batch_key)
        if cache and Path(cache).exists():
            self.model = scvi.model.SCVI.load(str(cache), adata=self.adata, accelerator="cpu")
            self.run = {"train_seconds": 0.0, "loaded_from": str(cache)}
            return self
        kwargs = {}
        if self.matched:
            kwargs = MATCHED | {"gene_likelihood": "zinb", "use_observed_lib_size": False}
            kwargs["encode_covariates"] = self.batch_key is not None
        self.model = scvi.model.SCVI(self.adata, **kwargs | o.get("model", {}))
        timer = epoch_timer()
        train: dict[str, Any] = {"max_epochs": epochs, "callbacks": [timer]}
        plan: dict[str, Any] = {}
        if self.quiet:
            train["enable_progress_bar"] = False
        if self.matched or "device" in o:
            train |= {"accelerator": "gpu" if o.get("device") == "cuda" else "cpu", "devices": 1}
        if self.matched:
            train |= {"batch_size": 128, "early_stopping": False, "check_val_every_n_epoch": 1}
            plan = {"lr": 1e-3, "optimizer": "Adam", "n_epochs_kl_warmup": 400}
        train |= {"batch_size": o["batch_size"]} if "batch_size" in o else {}
        plan |= {"lr": o["lr"]} if "lr" in o else {}
        if plan:
            train["plan_kwargs"] = plan
        if split is not None:
            given = [np.asarray(s, dtype=np.int64) for s in split]
            splitter = {"external_indexing": [*given, np.array([], dtype=np.int64)]}
            # a last minibatch of one cell breaks batch norm: scvi-tools' own split would
            # move it to validation; with given cells it must be dropped
            if len(given[0]) % train.get("batch_size", scvi.settings.batch_size) == 1:
                splitter["drop_last"] = True
            train["datasplitter_kwargs"] = splitter
            self.run["drop_last"] = "drop_last" in splitter
        self._timed(self.model.train, **train)
        val = self.model.history.get("elbo_validation")
        curve = [] if val is None else [-float(v) for v in val.iloc[:, 0]]
        n_train = len(split[0]) if split is not None else len(self.model.train_indices)
        self._history(timer.epoch_seconds, curve, n_train)
        self.run["epochs_run"] = int(self.model.history["elbo_train"].shape[0])
        observed = getattr(self.model.module, "use_observed_lib_size", True)
        self.run["use_observed_lib_size"] = bool(observed)
        if cache:
            self.model.save(str(cache), save_anndata=False)
        return self

    def elbo(self, cells: Any, n_samples: int, seed: int) -> float:
        """scvi-tools' ``get_elbo`` (one draw, analytic KLs), averaged over ``n_samples``
        calls; in 1.4.2 it returns the ELBO itself (not its negative)."""
        import numpy as np
        import scvi

        scvi.settings.seed = seed
        get = functools.partial(self.model.get_elbo, self.adata, indices=cells, return_mean=False)
        return float(np.mean([np.mean(np.asarray(get())) for _ in range(max(1, n_samples))]))

    def marginal_ll(
        self, cells: Any, n_samples: int, seed: int, observed_library: bool = False
    ) -> float:
        """scvi-tools' ``get_marginal_ll`` per cell, averaged over the cells (its ``return_mean``
        averages minibatch means); with its default observed library, log p(x | library)."""
        import numpy as np
        import scvi

        scvi.settings.seed = seed
        kw = {"indices": cells, "n_mc_samples": n_samples, "return_mean": False}
        return float(np.asarray(self.model.get_marginal_ll(self.adata, **kw), np.float64).mean())

    def impute(self, adata: Any, n_samples: int, seed: int) -> Any:
        import numpy as np

        kw = {"library_size": "latent", "n_samples": n_samples, "return_mean": True}
        return np.asarray(self.model.get_normalized_expression(self.adata, **kw))

    def as_pyro_scvi(self) -> Any:
        """A :class:`pyro_scvi.SCVI` holding the fit's weights (``matched`` fits: a renaming, every
        tensor filled), its guide the paper's (``library_residual=False``) as scvi-tools' is."""
        import pyro_scvi

        if getattr(self, "renamed", None) is not None:
            return self.renamed
        kw = {"batch_key": self.batch_key, "library_residual": False, **MATCHED}
        target = pyro_scvi.SCVI(self.adata, **kw)
        theirs = self.model.module.state_dict()
        for module, names in ((target.guide, _GUIDE_NAMES), (target.model, _MODEL_NAMES)):
            state, filled = module.state_dict(), set()
            for key, value in theirs.items():
                for prefix, ours in names.items():
                    if key.startswith(prefix):
                        name = ours + key[len(prefix) :]
                        state[name] = value.reshape(state[name].shape).clone()
                        filled.add(name)
            if module is target.model:
                state["library_prior.loc"] = theirs["library_log_means"].reshape(-1).clone()
                state["library_prior.scale"] = theirs["library_log_vars"].reshape(-1).sqrt()
                filled |= {"library_prior.loc", "library_prior.scale", "prior._zero"}
            if missing := set(state) - filled:
                raise KeyError(f"scvi-tools weights do not cover pyro_scvi's {sorted(missing)}")
            module.load_state_dict(state)
        target.is_trained = True
        self.renamed = target
        return target


# scvi-tools' state-dict prefixes -> pyro_scvi's (guide, model), for one hidden layer
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


class FloorLoss:
    """Negative ELBO per cell of scVI for pyro_scvi's networks in plain torch: the ZINB density
    (``fused``: the fused kernel, compiled unless ``compiled=False``), one sample, analytic KLs."""

    def __init__(self, scvi: Any, fused: bool = False, *, compiled: bool = True) -> None:
        import torch
        from torch.distributions import Normal, kl_divergence

        from pyro_scvi.model.distributions import zinb_log_prob
        from pyro_scvi.train import kernels

        fused_prob = functools.partial(kernels.zinb_log_prob_fused, compiled=compiled)
        self.log_prob = fused_prob if fused else zinb_log_prob
        self.encode, self.decoder = scvi.guide.encode, scvi.model.decoder  # plain torch
        self.model, self.kl, self.torch = scvi.model, kl_divergence, torch
        self.normal = functools.partial(Normal, validate_args=False)  # no checks in the floor
        self.standard = self.normal(torch.zeros(()), torch.ones(()))

    def __call__(self, x: Any, b: Any, kl_weight: float) -> Any:
        torch, q = self.torch, self.encode(x, b)
        z = q["z_loc"] + q["z_scale"] * torch.randn_like(q["z_scale"])
        l = q["l_loc"] + q["l_scale"] * torch.randn_like(q["l_scale"])
        decoded = self.decoder(z, b)
        mu = torch.exp(l) * torch.softmax(decoded["rho_logits"], -1)
        theta = self.model.log_theta.exp()
        reconstruction = -self.log_prob(x, mu, theta, decoded["gate_logits"]).sum(-1)
        kl_z = self.kl(self.normal(q["z_loc"], q["z_scale"]), self.standard).sum(-1)
        prior = self.model.library_prior
        lib = self.normal(prior.loc[b].unsqueeze(-1), prior.scale[b].unsqueeze(-1))
        kl_l = self.kl(self.normal(q["l_loc"], q["l_scale"]), lib).sum(-1)
        return reconstruction + kl_weight * kl_z + kl_l


def minibatches(indices: Any, batch_size: int, rng: Any) -> list[Any]:
    """Shuffled minibatches; a last one of a single cell joins the previous (batch norm)."""
    import torch

    chunks = list(torch.split(torch.from_numpy(rng.permutation(indices)), batch_size))
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2:] = [torch.cat(chunks[-2:])]
    return chunks


class TorchFloor(Adapter):
    """pyro_scvi's default networks, initialized as pyro_scvi's run of the seed, trained by a
    plain loop (no Pyro, checks or logging; the counts dense before the clock starts; fused
    Adam; validation and batch-norm refresh as pyro_scvi's). Option ``fused``: the ZINB kernel
    (default: pyro_scvi's engine decides)."""

    name = "torch-floor"

    def fit(self, epochs: int, split: tuple[Any, Any] | None = None) -> TorchFloor:
        import numpy as np
        import pyro
        import torch
        from torch.nn import BatchNorm1d

        import pyro_scvi
        from pyro_scvi.train import hooks
        from pyro_scvi.train.engine import Engine

        torch.set_num_threads(self.threads or torch.get_num_threads())
        seed, bs, warmup = self.seed or 0, TRAINING["batch_size"], TRAINING["kl_warmup_epochs"]
        pyro.set_rng_seed(seed)
        kwargs = MATCHED | {"likelihood": pyro_scvi.ZINB(), "use_observed_lib_size": False}
        scvi = self.model = pyro_scvi.SCVI(self.adata, batch_key=self.batch_key, **kwargs)
        train_idx, val_idx = split if split is not None else make_split(self.adata.n_obs, seed)
        modules, genes = (scvi.model, scvi.guide), self.adata.n_vars
        x = scvi.data.X
        x_all = torch.as_tensor(x.toarray() if hasattr(x, "toarray") else x, dtype=torch.float32)
        b_all = torch.as_tensor(scvi.data.batch_index, dtype=torch.long)
        norm_cells = np.random.default_rng(0).permutation(train_idx)[: hooks.VALIDATION_NORM_CELLS]
        params = [p for m in modules for p in m.parameters() if p.requires_grad]
        rng, curve, epoch_seconds = np.random.default_rng(seed), [], []

        def refresh_batch_norm(cells: Any, size: int) -> None:  # as passes.refresh_batch_norm
            norms = [m for net in modules for m in net.modules() if isinstance(m, BatchNorm1d)]
            for m in norms:
                m.reset_running_stats()
                m.momentum = None  # cumulative averages over one pass
            for net in modules:
                net.train()
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                for idx in minibatches(cells, size, np.random.default_rng(0)):
                    loss(idx, 1.0)
            for m in norms:
                m.momentum = 0.01

        start = time.perf_counter()
        # inside the clock, as pyro_scvi's train() resolves its engine and compiles the kernel
        steps, size = epochs * -(-len(train_idx) // bs), min(bs, len(train_idx))
        engine = Engine(fused_kernel=self.options.get("fused")).resolve(
            scvi.model, scvi.guide, n_steps=steps, batch_size=size, n_genes=genes, device="cpu"
        )
        loss_fn = FloorLoss(scvi, fused=engine.fused_kernel, compiled=engine.compile_kernel)

        def loss(idx: Any, kl_weight: float) -> Any:  # negative ELBO per cell of a minibatch
            return loss_fn(x_all.index_select(0, idx), b_all.index_select(0, idx), kl_weight)

        # inside the clock too: a process's first torch optimizer imports torch._dynamo
        optim = torch.optim.Adam(
            params, lr=TRAINING["lr"], eps=0.01, weight_decay=1e-6, fused=True
        )
        for epoch in range(epochs):
            epoch_start = time.perf_counter()
            w = min(1.0, epoch / warmup) if warmup > 0 else 1.0
            for m in modules:
                m.train()
            for idx in minibatches(train_idx, bs, rng):
                optim.zero_grad(set_to_none=True)
                loss(idx, w).mean().backward()
                optim.step()
            if len(val_idx):
                refresh_batch_norm(norm_cells, len(norm_cells))
                for m in modules:
                    m.eval()
                with torch.no_grad():
                    passes = torch.split(torch.as_tensor(val_idx, dtype=torch.long), 1024)
                    total = sum(float(loss(i, 1.0).sum()) for i in passes)
                curve.append(-total / len(val_idx))
            epoch_seconds.append(time.perf_counter() - epoch_start)
        refresh_batch_norm(train_idx, bs)
        done = time.perf_counter()
        for m in modules:
            m.eval()
        scvi.is_trained = True
        self.run |= {"train_seconds": done - start, "train_done_at": done, "split_matches": True}
        self._history(epoch_seconds, curve, len(train_idx))
        self.run |= {
            "n_validation": len(val_idx), "fused_kernel_used": engine.fused_kernel,
            "fused_kernel_compiled": engine.compile_kernel,
            "fused_kernel_reason": engine.reasons["fused_kernel"],
        }  # fmt: skip
        return self

    def impute(self, adata: Any, n_samples: int, seed: int) -> Any:
        raise NotImplementedError("the floor has no imputation run")


ADAPTERS: dict[str, type[Adapter]] = {a.name: a for a in (PyroScvi, ScviTools, TorchFloor)}
