"""``pyro-scvi evaluate``: how well a saved model fits cells, as JSON on stdout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputError
from ._common import (
    _add_batch_size,
    _add_cells,
    _add_data_source_option,
    _add_input,
    _add_n_samples,
    _add_run_options,
    _add_saved_model,
    _add_trust_model,
    _cell_indices,
    _check_outputs,
    _read_data,
    add_idea,
)

#: What this command writes to stdout: ``pyro-scvi`` refuses to run it with stdout closed.
STDOUT_RESULT = "its JSON summary"


#: ``--proposal``'s values: the :mod:`pyro_scvi.posterior.proposals` class each builds.
PROPOSALS = {
    "guide": "GuideProposal",
    "defensive": "DefensiveProposal",
    "refined": "RefinedProposal",
    "mcmc": "MCMCProposal",
    "laplace": "LaplaceProposal",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi evaluate`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
        "evaluate",
        help="held-out fit of a saved model on an .h5ad, a JSON summary on stdout",
        description=(
            "Print a JSON summary of the ELBO, the importance-sampled marginal "
            "log-likelihood (both nats per cell, higher is better) and the reconstruction "
            "error of INPUT's cells under the model saved in MODEL_DIR: their means, "
            "standard deviations and standard errors over cells. Both estimates use the same "
            "K draws of q(z, l | x). By default only the cells that training held out are "
            "scored (INPUT must then be the data the model was fitted to); --cells training "
            "scores the cells it trained on, and --cells all every cell, e.g. of a file of "
            "new cells. --per-cell writes each cell's "
            "values to a .csv or to an .h5ad (INPUT's scored cells with obs columns "
            "pyro_scvi_elbo, pyro_scvi_marginal_ll, pyro_scvi_reconstruction_error, "
            "pyro_scvi_pareto_k). Beside the marginal log-likelihood stand its Pareto k per "
            "cell and frac_pareto_k_high, the share of cells with k > 0.7, whose estimate "
            "may be far off; --proposal draws the importance samples from a proposal built "
            "from q that keeps k low, and --ais adds annealed importance sampling's "
            "log-likelihood with its standard error."
        ),
    )
    _add_saved_model(p)
    _add_input(p, "raw-count .h5ad with the model's genes")
    _add_n_samples(p, 100, "importance samples K per cell")
    _add_batch_size(p, 64)
    _add_cells(p, "the cells scored")
    p.add_argument(
        "--per-cell",
        metavar="PATH",
        help="also write each cell's values to PATH (.csv, or .h5ad: the scored cells)",
    )
    p.add_argument(
        "--proposal",
        choices=tuple(PROPOSALS),
        default="guide",
        help="what the importance samples are drawn from: guide (q itself, default: the "
        "ELBO's draws), defensive (q mixed with a wider Student-t), refined (q refined per "
        "cell, made defensive), mcmc (a Student-t fitted to a short MCMC run per cell; "
        "about 5 times the cost) or laplace (a Student-t at each cell's posterior mode, "
        "scaled by the curvature there)",
    )
    p.add_argument(
        "--ais",
        action="store_true",
        help="also estimate log p(x) by annealed importance sampling, with its standard "
        "error (ais_marginal_ll_*; ais_se_mean: the mean standard error of a cell's value)",
    )
    p.add_argument(
        "--ais-steps",
        type=int,
        default=100,
        metavar="N",
        help="intermediate distributions of --ais (default: 100)",
    )
    add_idea(
        p,
        "observed_library",
        action="store_true",
        help="condition on each cell's observed library (log total count) instead of "
        "integrating over the latent one: log p(x | library), the number a model with an "
        "observed library, such as scvi-tools' default, reports",
    )
    _add_data_source_option(p, "stream them from the file a minibatch at a time")
    _add_trust_model(p)
    _add_run_options(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi evaluate``: print a JSON summary of the fit; return the status."""
    import json

    if args.ais_steps < 1:
        raise InputError(f"--ais-steps {args.ais_steps}: use a positive number of steps.")

    per_cell = Path(args.per_cell) if args.per_cell else None
    if per_cell is not None and per_cell.suffix not in (".csv", ".h5ad"):
        raise InputError(f"--per-cell {per_cell} must end in .csv or .h5ad.")
    input_path = Path(args.input)
    if per_cell is not None and input_path.exists() and per_cell.resolve() == input_path.resolve():
        raise InputError("--per-cell is the INPUT file; choose another path.")
    # before the model is read and the cells are scored
    _check_outputs(
        args,
        {} if per_cell is None else {"--per-cell": per_cell},
        models={"MODEL_DIR": Path(args.model_dir)},
    )

    from ..io.files import atomic_path
    from ..io.outputs import write_h5ad
    from ..posterior import proposals
    from ..scvi import SCVI, resolve_device

    resolve_device(args.device)  # fail before reading data
    adata, streamed, data_source = _read_data(args)
    if (
        streamed
        and per_cell is not None
        and per_cell.suffix == ".h5ad"
        and args.cells != "held-out"
    ):
        raise InputError(
            f"INPUT is streamed ({data_source}), and --per-cell .h5ad with --cells {args.cells} "
            "would load most cells' counts to write them; write a .csv, or pass --data-source "
            "memory."
        )
    model = SCVI.load(
        args.model_dir,
        adata,
        device=args.device,
        streamed=True if streamed else None,
        trust=args.trust_model,
    )
    indices = _cell_indices(model, args.cells)  # None: every cell
    names = model.data.obs_names if indices is None else model.data.obs_names[indices]
    if per_cell is not None:  # keyed by cell name
        from ..data.counts import require_unique_obs_names

        require_unique_obs_names(names, "the per-cell output")
    # the model's own cells, read where the counts are (streamed: a minibatch at a time)
    stats = model.get_fit_statistics(
        indices=indices,
        n_samples=args.n_samples,
        batch_size=args.batch_size,
        seed=args.seed,
        observed_library=args.observed_library,
        proposal=getattr(proposals, PROPOSALS[args.proposal])(),
    )
    result = {
        "cells": args.cells,
        "n_cells": len(stats),
        "n_samples": args.n_samples,
        "seed": args.seed,
        "observed_library": args.observed_library,
        "data_source": data_source,
        "proposal": stats.attrs["proposal"],
        # k summarized by its median and the share above 0.7 (a mean of k says little)
        "pareto_k_median": _json_number(stats["pareto_k"].median()),
        "frac_pareto_k_high": float((stats["pareto_k"] > 0.7).mean()),
    }
    if args.ais:
        ais = model.get_marginal_ll_ais(
            indices=indices,
            n_steps=args.ais_steps,
            batch_size=args.batch_size,
            seed=args.seed,
            observed_library=args.observed_library,
        )
        stats["ais_marginal_ll"] = ais["marginal_ll"].to_numpy()
        stats["ais_se"] = ais["se"].to_numpy()
        result["ais_steps"] = args.ais_steps
        result["ais_settings"] = ais.attrs["settings"]
    for column in stats.columns.drop("pareto_k"):
        values = stats[column].to_numpy(dtype=float)
        sd = float(values.std(ddof=1)) if len(values) > 1 else float("nan")
        result[f"{column}_mean"] = _json_number(values.mean())
        result[f"{column}_sd"] = _json_number(sd)
        result[f"{column}_sem"] = _json_number(sd / len(values) ** 0.5)
    if per_cell is not None:
        with atomic_path(per_cell) as tmp:
            if per_cell.suffix == ".csv":
                stats.to_csv(tmp, index_label="cell")
            else:
                # INPUT's scored cells, never the caller's object (streamed: only those cells)
                scored = adata if indices is None else adata[indices]
                out = scored.to_memory() if scored.isbacked else scored.copy()
                for column in stats.columns:
                    out.obs[f"pyro_scvi_{column}"] = stats[column].to_numpy()
                out.uns["pyro_scvi_evaluate"] = {
                    k: ("None" if v is None else v) for k, v in result.items()
                }
                write_h5ad(out, tmp)  # a full disk: one OSError, never a crash
        result["per_cell"] = str(per_cell)
    json.dump(result, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


def _json_number(value) -> float | None:
    """A float for JSON, or None: JSON has no NaN or infinity (e.g. a diverged model)."""
    import math

    value = float(value)
    return value if math.isfinite(value) else None
