"""Functional, scanpy-style tools: ``fn(adata, *, ..., key_added=..., copy=False)``.

Each function reads the counts, computes, and writes its results into the AnnData it was
given (``copy=False``, returning ``None``) or into a copy that it returns (``copy=True``),
as ``scanpy.tl`` functions do; the Returns section of each lists every field it sets. Use
:class:`pyro_scvi.SCVI` instead when you want the fitted model object for further queries.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

    from .scvi import SCVI

#: 2-D embeddings that :func:`embedding` computes, and the obsm key each writes by default.
EMBEDDINGS = {"umap": "X_umap", "tsne": "X_tsne", "pca": "X_pca2"}

#: The fewest cells each embedding places. UMAP's spectral start takes 3 eigenvectors of the
#: cells' graph, which needs 4 cells (umap-learn fails with 2 or 3, and its answer for 1 is
#: meaningless); t-SNE's perplexity, at least 2 here, must be below the number of cells.
MIN_CELLS = {"umap": 4, "tsne": 3, "pca": 2}


def _uns_key(key_added: str) -> str:
    # scanpy pairs obsm["X_umap"] with uns["umap"]: the same name without the prefix
    return key_added[2:] if key_added.startswith("X_") else key_added


def _plain(value: Any) -> Any:
    """A value h5py can write: ``None`` becomes the string ``"None"``, nested dicts too."""
    if value is None:
        return "None"
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value] if value else "[]"
    return value


def write_results(
    model: SCVI,
    adata: AnnData,
    *,
    key_added: str = "X_pyro_scvi",
    normalized_key: str | None = None,
    library_size: float | None = None,
    n_samples: int = 10,
    params: dict | None = None,
) -> None:
    """Write a fitted model's latent space (and normalized expression) into ``adata``.

    ``adata`` must hold the model's cells, in order, and its genes in any order: per-gene
    results are written by name, in ``adata``'s gene order. This is the output step shared
    by :func:`scvi` and ``pyro-scvi fit``.

    Parameters
    ----------
    model
        A trained :class:`~pyro_scvi.SCVI` set up on ``adata``'s cells.
    adata
        Where to write.
    key_added
        ``obsm`` key of the posterior mean of ``z``; ``uns`` gets the same key without a
        leading ``X_``.
    normalized_key
        ``layers`` key for the posterior-mean normalized expression; ``None`` skips it.
    library_size
        Counts each normalized cell sums to (default: the median library size).
    n_samples
        Posterior draws averaged for the normalized expression.
    params
        Extra entries for ``uns[...]["params"]``.
    """
    adata.obsm[key_added] = model.get_latent_representation(adata)
    if library_size is None:
        library_size = float(np.median(model.data.total_counts()))
    entries = {
        k: v for k, v in model.settings.items() if k not in ("guide", "likelihood", "prior")
    }
    entries.update(
        likelihood=model.settings["likelihood"],
        prior=model.settings["prior"],
        guide=model.settings.get("guide"),
        epochs=len(model.history),
        engine=model.engine,
        **(params or {}),
    )
    if normalized_key is not None:
        from .data import gene_order
        from .io.outputs import normalized_chunks

        # a chunk of cells at a time: the posterior samples are never held for all cells
        data = model.data_for(adata)
        # the model computes its genes in its own order; the layer follows adata's by name
        order = gene_order(data.var_names, adata.var_names)
        normalized = np.empty((data.n_cells, data.n_genes), dtype=np.float32)
        for rows, values in normalized_chunks(
            model, data, library_size=library_size, n_samples=n_samples
        ):
            normalized[rows] = values if order is None else values[:, order]
        adata.layers[normalized_key] = normalized
        entries.update(normalized_key=normalized_key, normalized_library_size=library_size)
    adata.uns[_uns_key(key_added)] = {
        "params": _plain(entries),
        "history": {c: model.history[c].to_numpy(dtype=float) for c in model.history},
    }


def scvi(
    adata: AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    key_added: str = "X_pyro_scvi",
    normalized_key: str | None = None,
    model_dir: str | os.PathLike | None = None,
    model_kwargs: dict | None = None,
    copy: bool = False,
    **train_kwargs: Any,
) -> AnnData | None:
    """Fit scVI to the raw counts of ``adata`` and store its latent space.

    A function in the style of ``scanpy.tl``: it fits :class:`pyro_scvi.SCVI` and writes
    the posterior mean of each cell's ``z`` to ``adata.obsm[key_added]``, ready for
    ``sc.pp.neighbors(adata, use_rep=key_added)``.

    Parameters
    ----------
    adata
        Raw counts (cells x genes) in ``.X`` or ``layer``.
    layer, batch_key
        As in :class:`pyro_scvi.SCVI`.
    key_added
        ``obsm`` key of the latent space; the parameters and training history go to
        ``uns`` under the same name without its leading ``X_``.
    normalized_key
        If given, the posterior-mean normalized expression (scaled to the median library
        size) goes to ``adata.layers[normalized_key]``.
    model_dir
        If given, the fitted model is saved there (reload it with
        ``SCVI.load(model_dir, adata)`` for further queries).
    model_kwargs
        Other arguments of :class:`pyro_scvi.SCVI`, e.g. ``{"n_latent": 20,
        "likelihood": pyro_scvi.NB()}``.
    copy
        Work on a copy of ``adata`` and return it, leaving ``adata`` untouched.
    **train_kwargs
        Arguments of :meth:`pyro_scvi.SCVI.train`, e.g. ``max_epochs=100``.

    Returns
    -------
    anndata.AnnData or None
        ``None``, or the copy with ``copy=True``. Sets

        ``obsm[key_added]`` : numpy.ndarray ``(cells, n_latent)``
            Posterior mean of ``z``.
        ``layers[normalized_key]`` : numpy.ndarray ``(cells, genes)``, float32
            Only with ``normalized_key``.
        ``uns[key]["params"]`` : dict
            The model's settings, epochs trained, training engine, and ``model_dir``;
            ``key`` is ``key_added`` without ``X_``.
        ``uns[key]["history"]`` : dict of numpy.ndarray
            Per-epoch training history (:attr:`pyro_scvi.SCVI.history`).

    Examples
    --------
    >>> import pyro_scvi
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=100, n_genes=20, n_batches=2)
    >>> pyro_scvi.tl.scvi(adata, batch_key="batch", model_kwargs={"n_latent": 3},
    ...                   max_epochs=2, progress_bar=False)
    >>> adata.obsm["X_pyro_scvi"].shape, adata.uns["pyro_scvi"]["params"]["batch_key"]
    ((100, 3), 'batch')
    """
    from .scvi import SCVI

    adata = adata.copy() if copy else adata
    kwargs = dict(model_kwargs or {})
    if "drop_empty_cells" in kwargs:
        raise TypeError(
            "tl.scvi writes one row per cell of adata; drop empty cells first, e.g. "
            "adata = adata[adata.X.sum(1).A1 > 0].copy()."
        )
    model = SCVI(adata, layer=layer, batch_key=batch_key, **kwargs)
    model.train(**train_kwargs)
    params = {}
    if model_dir is not None:
        model.save(model_dir, overwrite=True)
        params["model_dir"] = str(model_dir)
    write_results(model, adata, key_added=key_added, normalized_key=normalized_key, params=params)
    return adata if copy else None


def embedding_method(method: str = "auto") -> str:
    """The embedding ``method="auto"`` stands for here: UMAP with umap-learn, else t-SNE.

    Examples
    --------
    >>> embedding_method("pca")
    'pca'
    >>> embedding_method("auto") in ("umap", "tsne")
    True
    """
    if method not in ("auto", *EMBEDDINGS):
        raise ValueError(f"method={method!r}; use 'auto', 'umap', 'tsne' or 'pca'.")
    if method != "auto":
        return method
    import importlib.util

    return "umap" if importlib.util.find_spec("umap") is not None else "tsne"


def _check_embeddable(adata: AnnData, x: np.ndarray, use_rep: str, method: str) -> None:
    """Refuse (one line) what the embedding methods would fail on with their own errors."""
    from .errors import InputError

    if x.ndim != 2 or x.shape[1] == 0:
        raise InputError(
            f"obsm[{use_rep!r}] has shape {x.shape}, no coordinates to embed; pass a "
            "representation with at least one column (the latent space of a fit)."
        )
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        # scanpy refuses them too (sc.pp.neighbors: "Input contains NaN"): a cell without
        # coordinates has no place in the picture, and dropping it would hide a failed fit
        raise InputError(
            f"obsm[{use_rep!r}] has NaN or infinite values in {int(bad.sum())} of {len(x)} "
            f"cells (first: {str(adata.obs_names[int(np.argmax(bad))])!r}), which cannot be "
            "embedded: refit (a diverged or failed fit leaves them), or embed the other cells, "
            f"adata[np.isfinite(adata.obsm[{use_rep!r}]).all(axis=1)]."
        )
    if len(x) < MIN_CELLS[method]:
        name = {"umap": "UMAP", "tsne": "t-SNE", "pca": "PCA"}[method]
        fewer = " (method='pca', --method pca)" if method != "pca" else ""
        raise InputError(
            f"{name} needs at least {MIN_CELLS[method]} cells and obsm[{use_rep!r}] has "
            f"{len(x)}; " + (f"use PCA{fewer} for so few." if fewer else "add cells.")
        )


def embedding(
    adata: AnnData,
    *,
    use_rep: str = "X_pyro_scvi",
    method: Literal["auto", "umap", "tsne", "pca"] = "auto",
    key_added: str | None = None,
    seed: int = 0,
    copy: bool = False,
) -> AnnData | None:
    """A 2-D embedding of a latent space, for pictures: UMAP, t-SNE or PCA.

    Parameters
    ----------
    adata
        Holds the latent space in ``obsm[use_rep]``.
    use_rep
        ``obsm`` key of the representation to embed.
    method
        ``"umap"`` (umap-learn, the ``umap`` extra), ``"tsne"`` (scikit-learn), ``"pca"``
        (the first two principal components), or ``"auto"``: UMAP where umap-learn is
        installed, t-SNE otherwise.
    key_added
        ``obsm`` key to write (default ``X_umap``, ``X_tsne`` or ``X_pca2``).
    seed
        Random state of UMAP and t-SNE.
    copy
        Work on a copy and return it.

    Returns
    -------
    anndata.AnnData or None
        ``None``, or the copy with ``copy=True``. Sets ``obsm[key_added]`` (``(cells, 2)``)
        and ``uns[key]["params"]`` (``use_rep``, ``method``, ``seed``), ``key`` being
        ``key_added`` without ``X_``.

    Raises
    ------
    pyro_scvi.InputError
        When ``obsm[use_rep]`` has NaN or infinite values (as scanpy, no cell is dropped
        quietly), or fewer cells than the method places (:data:`MIN_CELLS`).

    Examples
    --------
    >>> import anndata, numpy as np
    >>> adata = anndata.AnnData(np.zeros((30, 1)))
    >>> adata.obsm["X_pyro_scvi"] = np.random.default_rng(0).normal(size=(30, 5))
    >>> embedding(adata, method="pca")
    >>> adata.obsm["X_pca2"].shape, adata.uns["pca2"]["params"]["method"]
    ((30, 2), 'pca')
    """
    if use_rep not in adata.obsm:
        raise KeyError(
            f"use_rep={use_rep!r} is not in adata.obsm ({list(adata.obsm.keys())}); fit "
            "first, e.g. pyro_scvi.tl.scvi(adata)."
        )
    method = embedding_method(method)
    x = np.asarray(adata.obsm[use_rep], dtype=np.float64)
    _check_embeddable(adata, x, use_rep, method)
    adata = adata.copy() if copy else adata
    if method == "umap":
        try:
            import umap
        except ImportError as err:
            raise ImportError(
                "method='umap' needs umap-learn: pip install umap-learn (or the package's "
                "'umap' extra); method='tsne' needs nothing more."
            ) from err
        coords = umap.UMAP(n_components=2, random_state=seed).fit_transform(x)
    elif method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
        coords = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    else:
        centred = x - x.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        coords = centred @ vt[:2].T
        if coords.shape[1] < 2:  # a 1-D latent space: pad with zeros
            coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    key_added = key_added or EMBEDDINGS[method]
    adata.obsm[key_added] = np.asarray(coords, dtype=np.float32)
    adata.uns[_uns_key(key_added)] = {
        "params": {"use_rep": use_rep, "method": method, "seed": int(seed)}
    }
    return adata if copy else None
