"""Datasets for the studies, and the split of cells every implementation shares.

A dataset is named by a string: a registered dataset's name or file name, any other ``.h5ad``
in ``--data-dir``, or ``synthetic:<cells>x<genes>`` (``benchmarks/README.md``, "The code").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

#: How ``synthetic:<cells>x<genes>`` is simulated (the seed is the study's).
SYNTHETIC = {"n_clusters": 5, "n_batches": 2, "batch_effect": 0.5}
TRAIN_SIZE = 0.9


def data_dir(given: str | os.PathLike | None = None) -> Path:
    """``given``, else ``$PYRO_SCVI_DATA``, else pyro_scvi's download cache."""
    if given is not None:
        return Path(given)
    if os.environ.get("PYRO_SCVI_DATA"):
        return Path(os.environ["PYRO_SCVI_DATA"])
    from pyro_scvi.datasets import cache_dir

    return cache_dir()


def parse(spec: str) -> dict[str, Any]:
    """``{"spec", "kind", "name", ...}`` of a dataset's name (see the module)."""
    if not spec.startswith("synthetic:"):
        return {"spec": spec, "kind": "file", "name": Path(spec).name.removesuffix(".h5ad")}
    try:
        n_cells, n_genes = (int(v) for v in spec.split(":", 1)[1].lower().split("x"))
    except ValueError:
        raise ValueError(f"{spec!r}: write synthetic:<cells>x<genes>") from None
    if n_cells < 10 or n_genes < 2:
        raise ValueError(f"{spec!r}: at least 10 cells and 2 genes.")
    size = f"{n_cells}x{n_genes}"
    return {"spec": spec, "kind": "synthetic", "name": f"synthetic_{size}", "size": size}


def path_of(spec: str, folder: str | os.PathLike | None = None, download: bool = True) -> Path:
    """The ``.h5ad`` file of a dataset (registered ones verified, fetched if need be)."""
    from pyro_scvi import datasets

    try:
        name = datasets.entry(Path(spec).name).name
    except KeyError:  # not registered: a file of the folder
        name = None
    if name is not None:
        return datasets.fetch(name, data_dir=folder, download=download)
    path = Path(spec) if Path(spec).suffix == ".h5ad" and Path(spec).parent != Path() else None
    return path or data_dir(folder) / f"{Path(spec).name.removesuffix('.h5ad')}.h5ad"


def available(spec: str, folder: str | os.PathLike | None = None) -> bool:
    """Whether a dataset can be read here without a download."""
    from pyro_scvi.datasets import DatasetError

    try:
        return spec.startswith("synthetic:") or path_of(spec, folder, download=False).is_file()
    except DatasetError:
        return False


def default_names(folder: str | os.PathLike | None = None) -> list[str]:
    """Every ``.h5ad`` in the data folder, else every registered dataset."""
    from pyro_scvi import datasets

    found = sorted(p.stem for p in data_dir(folder).glob("*.h5ad"))
    return found or [datasets.entry(n).filename.removesuffix(".h5ad") for n in datasets.names()]


def load(
    spec: str, folder: str | os.PathLike | None = None, *, subsample: int | None = None,
    seed: int = 0, download: bool = True,
) -> Any:  # fmt: skip
    """A dataset as float32 CSR counts without empty cells; ``subsample``: that many random
    cells of a file (simulations are made at their size)."""
    import anndata
    import numpy as np
    import scipy.sparse as sp

    ds = parse(spec)
    if ds["kind"] == "synthetic":
        from pyro_scvi.datasets import synthetic_zinb

        n_cells, n_genes = (int(v) for v in ds["size"].split("x"))
        adata = synthetic_zinb(n_cells, n_genes, **SYNTHETIC, seed=seed)
        adata.uns.pop("simulation", None)
    else:
        adata = anndata.read_h5ad(path_of(spec, folder, download))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    return subsample_cells(adata, subsample if ds["kind"] == "file" else None, seed)


def subsample_cells(adata: Any, n_cells: int | None, seed: int = 0) -> Any:
    """``n_cells`` random cells of ``adata`` (all if None), without the empty ones."""
    import numpy as np

    if n_cells is not None and n_cells < adata.n_obs:
        keep = np.random.default_rng(seed).choice(adata.n_obs, n_cells, replace=False)
        adata = adata[np.sort(keep)].copy()
    nonempty = np.asarray(adata.X.sum(axis=1)).ravel() > 0
    return adata if nonempty.all() else adata[nonempty].copy()


def batch_key_for(adata: Any) -> str | None:
    """``"batch"`` when ``obs["batch"]`` has more than one value."""
    return "batch" if "batch" in adata.obs and adata.obs["batch"].nunique() > 1 else None


def make_split(n_cells: int, seed: int, train_size: float = TRAIN_SIZE) -> tuple[Any, Any]:
    """Training and held-out cells by the rule of ``pyro_scvi.SCVI.train`` (the adapters
    check it against the model's own split)."""
    import numpy as np

    perm = np.random.default_rng(seed).permutation(n_cells)
    n_train = max(2, int(round(train_size * n_cells)))
    return np.sort(perm[:n_train]), np.sort(perm[n_train:])


def some_cells(cells: Any, at_most: int, seed: int) -> Any:
    """``cells``, or ``at_most`` of them drawn at random (sorted)."""
    import numpy as np

    if len(cells) <= at_most:
        return np.asarray(cells)
    return np.sort(np.random.default_rng(seed).choice(cells, at_most, replace=False))


def describe(adata: Any) -> dict[str, Any]:
    """Shape, batches, cell types, sparsity."""
    return {
        "n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars),
        "n_batches": int(adata.obs["batch"].nunique()), "batch_key": batch_key_for(adata),
        "n_cell_types": int(adata.obs["cell_type"].nunique()),
        "nonzero_fraction": float(adata.X.nnz / (adata.n_obs * adata.n_vars)),
    }  # fmt: skip


def prepare(spec: dict[str, Any]) -> dict[str, Any]:
    """Worker mode ``--prepare``: load ``spec["dataset"]``, write it to ``spec["h5ad"]``;
    its :func:`describe`."""
    subsample, seed = spec.get("subsample"), spec.get("seed", 0)
    adata = load(spec["dataset"], spec.get("data_dir"), subsample=subsample, seed=seed)
    adata.write_h5ad(spec["h5ad"])
    return describe(adata) | {"h5ad": spec["h5ad"]}


def most_variable(adata: Any, n_genes: int) -> Any:
    """``adata`` restricted to its ``n_genes`` genes of largest variance of
    ``log1p(counts per 10^4)``."""
    import numpy as np
    import scipy.sparse as sp

    x = sp.csr_matrix(adata.X, dtype=np.float64)
    norm = sp.diags(1e4 / np.asarray(x.sum(1)).ravel()) @ x
    norm.data = np.log1p(norm.data)
    mean = np.asarray(norm.mean(0)).ravel()
    var = np.asarray(norm.multiply(norm).mean(0)).ravel() - mean**2
    return adata[:, np.sort(np.argsort(-var)[:n_genes])].copy()
