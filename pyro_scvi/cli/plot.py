"""``pyro-scvi plot``: a UMAP / t-SNE picture of a fitted latent space."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from ..errors import InputError
from ._common import (
    PROG,
    _add_data_source_option,
    _add_input,
    _add_output,
    _add_run_options,
    _check_outputs,
    _output_path,
    _read_data,
    add_idea,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi plot`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
        "plot",
        help="UMAP / t-SNE picture of a fitted latent space, by label and by batch",
        description=(
            "Embed the latent space of INPUT (an .h5ad written by fit, or any .h5ad with "
            "obsm[--use-rep]) in two dimensions and write a scatter plot with one panel per "
            "obs column of --color to OUTPUT.png. --method auto uses UMAP where umap-learn "
            "is installed (pip install umap-learn) and t-SNE (scikit-learn) otherwise."
        ),
    )
    _add_input(p, ".h5ad holding obsm[--use-rep]", shipped=False)
    _add_output(p, ".png", "the picture")
    add_idea(p, "use_rep", default="X_pyro_scvi", help="obsm key (default X_pyro_scvi)")
    p.add_argument("--method", choices=["auto", "umap", "tsne", "pca"], default="auto")
    add_idea(
        p,
        "color",
        nargs="+",
        help="obs columns, one panel each (default: cell_type and batch where present)",
    )
    _add_data_source_option(p, "leave them in the file (plot reads only obs and obsm)")
    _add_run_options(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi plot``: write a 2-D embedding picture; return the status."""
    output = _output_path(args, ".png")
    _check_outputs(args, {"OUTPUT": output})  # before the embedding is computed

    import matplotlib

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.plotting import plot_embedding
    from ..tl import EMBEDDINGS, embedding, embedding_method

    # streamed: the file stays open backed; only obs and obsm are read
    adata, _, data_source = _read_data(args)
    if args.use_rep not in adata.obsm:
        raise InputError(
            f"INPUT has no obsm[{args.use_rep!r}] (it has {list(adata.obsm.keys())}); pass "
            "the output of pyro-scvi fit, or --use-rep."
        )
    missing = [k for k in args.color or () if k not in adata.obs]
    if missing:
        raise InputError(f"--color {missing} not in INPUT's obs ({list(adata.obs.columns)}).")
    method = embedding_method(args.method)
    basis = EMBEDDINGS[method]
    try:
        embedding(adata, use_rep=args.use_rep, method=method, seed=args.seed)
    except ImportError as err:
        raise InputError(str(err)) from err
    plot_embedding(adata, output, basis=basis, color=args.color)
    print(
        f"{PROG} plot: wrote {output} ({method} of obsm[{args.use_rep!r}], {adata.n_obs} cells; "
        f"counts {data_source})"
    )
    return 0
