"""``pyro-scvi map-query``: map new batches onto a saved reference model and embed them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ._common import (
    PROG,
    _add_data_source_option,
    _add_input,
    _add_model_dir,
    _add_output,
    _add_quiet,
    _add_run_options,
    _add_training_options,
    _add_trust_model,
    _check_outputs,
    _output_path,
    _read_data,
    _refuse_input,
    _write_results_h5ad,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi map-query`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
        "map-query",
        help="map new batches onto a saved reference model (scArches-style) and embed them",
        description=(
            "Append the batches of INPUT, the query (obs[the reference's batch_key]), to the "
            "reference model saved in REFERENCE_DIR, train only the weights the new batches "
            "feed, with every reference weight fixed (pyro_scvi.SCVI.load_query_data), and "
            "write OUTPUT.h5ad: INPUT plus obsm['X_pyro_scvi'] (in the reference's latent "
            "space) and uns['pyro_scvi']. The query model is saved to --model-dir (default: "
            "OUTPUT without .h5ad, plus _model)."
        ),
    )
    p.add_argument("reference", metavar="REFERENCE_DIR", help="directory written by fit / save()")
    _add_input(p, "the query: raw-count .h5ad with the reference's genes", shipped=False)
    _add_output(p, ".h5ad", "INPUT with the query's latent space")
    _add_training_options(p)
    _add_model_dir(p, "query model")
    _add_quiet(p)
    _add_data_source_option(p, "stream them from the file as training goes")
    _add_trust_model(p)
    _add_run_options(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi map-query``: map, train, write the query's embedding; return the status."""
    output = _output_path(args, ".h5ad")
    _refuse_input(args, output)
    if not Path(args.reference).is_dir():
        raise InputError(f"REFERENCE_DIR {args.reference} is not a directory written by fit.")
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{output.with_suffix('')}_model")
    # before any reading or training: the reference is never overwritten
    _check_outputs(
        args,
        {"OUTPUT": output},
        models={"REFERENCE_DIR": Path(args.reference)},
        folders={"--model-dir": model_dir},
    )

    from ..data.identity import FileIdentity
    from ..errors import InputChanged
    from ..io.files import atomic_path
    from ..scvi import SCVI, resolve_device
    from ..tl import write_results

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    # a streamed INPUT is read again when OUTPUT is copied from it: pin the file it was
    pinned = FileIdentity.of(adata.filename) if streamed else None
    model = SCVI.load_query_data(
        adata, args.reference, streamed=True if streamed else None, trust=args.trust_model
    )
    model.train(
        args.max_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        progress_bar=not args.quiet,
    )
    model.save(model_dir, overwrite=True)
    params = dict(reference=str(args.reference), model_dir=str(model_dir), seed=args.seed)
    params.update(max_epochs=len(model.history), input=str(args.input), data_source=data_source)
    try:
        if pinned is not None:
            pinned.check()  # before the latent space is read from it
        write_results(model, adata, params=params)
        with atomic_path(output) as tmp:
            _write_results_h5ad(adata, tmp)
            if pinned is not None:
                pinned.check()  # the copy is of the file trained on, or nothing moves in
    except InputChanged as err:
        print(
            f"{PROG} map-query: error: {err} Nothing was written to {output}; the query "
            f"model is saved in {model_dir}. Put INPUT back, or map the new file.",
            file=sys.stderr,
        )
        return 1
    new = [b for b in model.batch_categories if b not in model.reference_batches]
    print(
        f"{PROG} map-query: mapped {adata.n_obs} cells of batches {new} onto {args.reference}; "
        f"wrote {output} (obsm['X_pyro_scvi']); query model in {model_dir}; counts "
        f"{data_source}",
        file=sys.stderr,
    )
    return 0
