"""``pyro-scvi de``: differential expression between groups of cells under a saved model."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ._common import (
    PROG,
    _add_batch_size,
    _add_data_source_option,
    _add_input,
    _add_n_samples,
    _add_output,
    _add_run_options,
    _add_saved_model,
    _add_trust_model,
    _check_outputs,
    _output_path,
    _positive_float,
    _read_data,
    _refuse_input,
    add_idea,
)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi de`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
        "de",
        help="differential expression between groups of cells under a saved model",
        description=(
            "Compare groups of INPUT's cells (a column of obs) gene by gene under the model "
            "saved in MODEL_DIR, with Bayes factors: 'change' mode tests |log2 fold change| "
            ">= --delta and calls genes at a posterior expected FDR of --fdr-target; "
            "'vanilla' is the test of Lopez et al. (2018). Without --group1 every group is "
            "tested; without --group2 against all other cells. Writes OUTPUT.csv (one row "
            "per gene and comparison) and OUTPUT_volcano.png beside it; a summary goes to "
            "stdout."
        ),
    )
    _add_saved_model(p)
    _add_input(p, "raw-count .h5ad with the model's genes")
    _add_output(p, ".csv", "the DE table; the volcano plot goes beside it")
    add_idea(p, "groupby", required=True, help="obs column holding each cell's group")
    p.add_argument(
        "--group1",
        action="append",
        metavar="A",
        help="group to test; repeat for several (default: every group)",
    )
    p.add_argument("--group2", metavar="B", help="reference group (default: all other cells)")
    p.add_argument("--mode", choices=["change", "vanilla"], default="change")
    p.add_argument(
        "--delta", type=_positive_float, default=0.25, help="log2 fold-change threshold"
    )
    p.add_argument(
        "--fdr-target", type=_positive_float, default=0.05, help="in (0, 1); default 0.05"
    )
    _add_n_samples(p, 1000, "posterior samples per group")
    p.add_argument(
        "--batch-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average each cell's decoding over all batches, or (--no-batch-correction) "
        "decode each cell in its own batch",
    )
    p.add_argument(
        "--composition-correction",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="change mode: measure LFCs against the genes that do not change (assumes most "
        "genes do not), or (--no-composition-correction) as ratios of shares of the counts",
    )
    p.add_argument(
        "--spread-uncertainty",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="change mode: widen genes that few cells detect by the uncertainty of their "
        "counts' spread, with a 10x smaller pseudocount (off by default)",
    )
    add_idea(
        p,
        "sample_key",
        help=(
            "obs column naming each cell's replicate (sample, donor); change mode then "
            "resamples replicates as well as cells, so differences between replicates are "
            "not called DE (use it when cells come from a few replicates per group)"
        ),
    )
    _add_batch_size(p, 256)
    _add_data_source_option(p, "stream them from the file a minibatch at a time")
    _add_trust_model(p)
    _add_run_options(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi de``: write the DE table and volcano plot; return the status."""
    output = _output_path(args, ".csv")
    volcano = output.with_name(f"{output.stem}_volcano.png")
    _refuse_input(args, output, volcano)
    if not Path(args.model_dir).is_dir():
        raise InputError(f"MODEL_DIR {args.model_dir} is not a directory written by fit / save().")
    _check_outputs(
        args,
        {"OUTPUT": output, "the volcano plot": volcano},
        models={"MODEL_DIR": Path(args.model_dir)},
    )

    import matplotlib

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..analysis.plotting import plot_volcano
    from ..io.files import atomic_path
    from ..scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    model = SCVI.load(
        args.model_dir,
        adata,
        device=args.device,
        streamed=True if streamed else None,
        trust=args.trust_model,
    )
    results = model.differential_expression(
        groupby=args.groupby,
        group1=args.group1,
        group2=args.group2,
        mode=args.mode,
        delta=args.delta,
        fdr_target=args.fdr_target,
        batch_correction=args.batch_correction,
        composition_correction=args.composition_correction,
        spread_uncertainty=args.spread_uncertainty,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        sample_key=args.sample_key,
    )
    with atomic_path(output) as tmp:
        results.to_csv(tmp, index_label="gene")
    plot_volcano(results, volcano)
    calls = results.groupby("comparison", sort=False)["is_de_fdr"].sum()
    listed = "; ".join(f"{name}: {int(n)}" for name, n in calls.items())
    summary = (
        f"genes called DE at posterior expected FDR {args.fdr_target:g} -- {listed}"
        if args.mode == "change"
        else "no calls (vanilla mode ranks genes; use change mode for calls)"
    )
    print(
        f"{PROG} de ({args.mode} mode): {summary}. Wrote {output} and {volcano} (counts "
        f"{data_source})."
    )
    return 0
