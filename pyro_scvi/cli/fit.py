"""Command line: ``pyro-scvi fit INPUT.h5ad -o OUTPUT.h5ad``.

INPUT is an ``.h5ad`` of raw counts, or the name of a dataset shipped with the package
(``pbmc8k_200hvg``). OUTPUT is a new ``.h5ad``: the input plus

- ``obsm["X_pyro_scvi"]``: posterior mean of ``z``;
- ``layers["pyro_scvi_normalized"]``: normalized expression (posterior mean of ``rho``,
  scaled to the median library size), dense cells x genes float32, written by default only
  up to 50 million entries (``pyro_scvi.io.outputs.DENSE_NORMALIZED_MAX_ENTRIES``; 200 MB):
  ``--normalized all`` writes it at any size, ``--normalized none`` never;
  ``--normalized-genes GENE ...`` (or ``--normalized-genes-file FILE``, one name a line)
  writes only those genes, as the DataFrame ``obsm["pyro_scvi_normalized_genes"]``;
- ``uns["pyro_scvi"]``: ``params`` (the settings, the normalized-expression decision and
  why, how the counts were read) and ``history`` (per-epoch ELBOs).

INPUT is opened in anndata's backed mode; its counts are loaded when they fit in memory
and otherwise streamed from the file as training goes (``--data-source``; the rule is
``pyro_scvi.data.placement.choose_data_source``). A streamed run never loads the counts: OUTPUT is
a byte copy of INPUT with the results added, and the normalized expression is computed and
written a chunk of cells at a time. A streamed INPUT is pinned when training starts (device,
inode, size and modification time, ``pyro_scvi.data.identity``): replaced, rewritten or
deleted before the outputs are written, the run writes none, keeps the trained model as a
checkpoint and says the ``--resume`` command that writes them once INPUT is back. Results
are keyed by name: INPUT's genes may be in another order than the model's (``--resume``),
and every per-gene output follows INPUT's ``var_names``.

The model is saved to ``--model-dir`` (default: ``OUTPUT`` without ``.h5ad``, plus
``_model``) and the training curves to ``OUTPUT`` without ``.h5ad``, plus ``_training.png``.

Outputs are checked before training (writable, not a folder, not the input, room on the
disk); each is written under a temporary name and renamed into place at the end, the
``.h5ad`` last, so a run leaves all of its outputs or none beside another run's. The input
is never overwritten, and a model folder is replaced only if it holds a pyro_scvi model.
Bad arguments give one line on stderr and exit status 2. A non-finite loss (or non-finite
batch-norm statistics after the last epoch) exits with status 1: after at least one
complete epoch the outputs hold that epoch's model, else nothing is written. A run whose
validation ELBO diverged (``pyro_scvi.train.hooks.Divergence``) writes its outputs and
adds a warning line that says to lower ``--lr``; ``uns["pyro_scvi"]["params"]["engine"]
["diverged"]`` keeps it. SIGINT (Ctrl-C) or SIGTERM stop training after the current step, write
a checkpoint (``--checkpoint-dir``, default ``OUTPUT`` without ``.h5ad``, plus
``_checkpoint``) and the outputs so far, and exit with status 130 or 143 and the command
that resumes the run (``--resume``). After training, until the last output is in place,
they leave either the complete outputs or the trained model, kept as a checkpoint, and the
command that writes the outputs from it (``--resume`` of a finished run only writes its
outputs); never a silent exit 0. Two runs finishing at once on the same outputs take
turns to move them in: the ``.h5ad`` and model in place are always one run's. A disk that
fills while writing ends the run with one line and status 1, the old outputs intact; one
that fills at a checkpoint only costs that checkpoint (a warning), not the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..errors import InputChanged, InputError
from ._common import (
    PROG,
    _add_data_source_option,
    _add_input,
    _add_model_dir,
    _add_n_samples,
    _add_output,
    _add_quiet,
    _add_run_options,
    _add_training_options,
    _add_trust_model,
    _non_negative_int,
    _output_path,
    _positive_int,
    _read_data,
    _write_results_h5ad,
    add_idea,
)

#: ``--likelihood`` choices: the keys of :data:`pyro_scvi.model.likelihoods.LIKELIHOODS`, listed
#: here so that ``--help`` does not import torch (a test checks they agree).
LIKELIHOOD_NAMES = ("nb", "poisson", "zinb", "zip")
#: ``--dispersion`` choices: the values of ``pyro_scvi.model.generative.Dispersion``,
#: listed here for the same reason (a test checks they agree).
DISPERSION_NAMES = ("gene", "gene-batch", "gene-cell")


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``pyro-scvi fit`` and its options to the sub-commands ``sub``."""
    p = sub.add_parser(
        "fit",
        help="fit scVI to an .h5ad and write the latent space and normalized expression",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_input(p, "raw-count .h5ad")
    _add_output(p, ".h5ad", "INPUT with the latent space and normalized expression")
    p.add_argument("--layer", help="layer with raw counts (default: .X)")
    add_idea(p, "batch_key", help="obs column with each cell's batch")
    p.add_argument("--likelihood", choices=LIKELIHOOD_NAMES, default="zinb")
    p.add_argument(
        "--dispersion",
        choices=DISPERSION_NAMES,
        default="gene",
        help="the inverse dispersion theta: one per gene (default), one per gene and batch "
        "(with --batch-key; e.g. full-length read counts from several donors), or one per "
        "gene and cell",
    )
    p.add_argument("--n-latent", type=_positive_int, default=10)
    add_idea(
        p,
        "observed_library",
        action="store_true",
        help=(
            "condition on each cell's observed total count (scvi-tools' default, "
            "use_observed_lib_size=True) instead of the paper's latent library l"
        ),
    )
    p.add_argument(
        "--library-residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=(
            "centre q(l) on each cell's observed log library, the encoder learning the "
            "residual (default: on with a latent library); --no-library-residual is the "
            "paper's guide"
        ),
    )
    _add_training_options(p)
    _add_run_options(p)
    _add_model_dir(p, "model")
    p.add_argument(
        "--early-stopping",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="stop when the held-out ELBO stops improving, after the KL warm-up (default: "
        "on, as SCVI.train); --no-early-stopping runs exactly --max-epochs",
    )
    p.add_argument(
        "--restore-best-epoch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end with the parameters of the epoch after the KL warm-up whose 5-epoch mean "
        "held-out ELBO (what early stopping judges) is best, not the last epoch's (default: "
        "as SCVI.train, off); the epoch is recorded in uns['pyro_scvi']['params']",
    )
    _add_n_samples(p, 10, "posterior samples averaged for the normalized expression")
    p.add_argument(
        "--normalized",
        choices=["auto", "all", "none"],
        default="auto",
        help="the dense normalized layer: auto (default: written when cells x genes <= 50 "
        "million, pyro_scvi.io.outputs.DENSE_NORMALIZED_MAX_ENTRIES), all (at any size) or none",
    )
    p.add_argument(
        "--normalized-genes",
        nargs="+",
        metavar="GENE",
        help="write only these genes' normalized expression, as the DataFrame "
        "obsm['pyro_scvi_normalized_genes'] (cells x genes), instead of the dense layer",
    )
    p.add_argument(
        "--normalized-genes-file",
        metavar="FILE",
        help="as --normalized-genes, the names read from FILE (one a line; # comments)",
    )
    _add_data_source_option(p, "stream them from the file as training goes")
    p.add_argument(
        "--drop-empty-cells",
        action="store_true",
        help="drop cells with zero total counts (they are left out of OUTPUT)",
    )
    p.add_argument(
        "--engine",
        choices=["auto", "eager", "compiled", "fused", "pyro"],  # Engine.PRESETS
        default="auto",
        help="how training steps (pyro_scvi.train.engine): auto (default: decided from the "
        "run and recorded), eager, compiled, fused (compiled ELBO and fused ZINB kernel) or pyro "
        "(plain pyro.infer.SVI); --compile and --fused-kernel override its fields",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="compile the ELBO (JitTrace_ELBO): auto (from --engine), on or off",
    )
    p.add_argument(
        "--fused-kernel",
        choices=["auto", "on", "off"],
        default="auto",
        help="ZINB log-density by the compiled kernel of pyro_scvi.train.kernels: auto (from "
        "--engine; by default on long CPU runs of 500+ genes), on, or off",
    )
    p.add_argument(
        "--data-placement",
        choices=["auto", "host", "device"],
        default="auto",
        help="where minibatches are gathered: auto (default: on the GPU when the counts take "
        "at most half its free memory, else host), host, or device",
    )
    p.add_argument(
        "--matmul-precision",
        choices=["auto", "highest", "high", "medium"],
        default="auto",
        help="float32 matrix products: auto (= highest, exact float32), high (TF32 on GPUs "
        "that have it) or medium (bfloat16)",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="write training checkpoints here (every --checkpoint-every epochs, and on "
        "SIGINT/SIGTERM); default: OUTPUT without .h5ad plus _checkpoint, on interrupt only",
    )
    p.add_argument(
        "--checkpoint-every",
        type=_non_negative_int,
        default=10,
        metavar="N",
        help="epochs between checkpoints when --checkpoint-dir is given (default 10; 0: on "
        "interrupt only)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the interrupted run whose checkpoint is in --checkpoint-dir (same "
        "INPUT and training options; --seed, if given, must be the run's); a finished run's "
        "checkpoint writes the outputs without training",
    )
    _add_trust_model(p)
    _add_quiet(p)
    return p


def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Run ``pyro-scvi fit``; return the exit status.

    A process group that fit starts (under torchrun) is destroyed when it ends, however it
    ends (:func:`pyro_scvi.train.distributed.process_group`).
    """
    with contextlib.ExitStack() as stack:
        return _fit(args, argv, stack)


def _fit(args: argparse.Namespace, argv: Sequence[str], stack: contextlib.ExitStack) -> int:
    output = _output_path(args, ".h5ad")
    stem = output.with_suffix("")
    model_dir = Path(args.model_dir) if args.model_dir else Path(f"{stem}_model")
    png = Path(f"{stem}_training.png")
    explicit_checkpoints = args.checkpoint_dir is not None
    checkpoint_dir = Path(args.checkpoint_dir or f"{stem}_checkpoint")
    from ..data import datasets

    input_path = Path(args.input)
    if not input_path.exists() and args.input in datasets.SHIPPED:
        input_path = datasets.path(args.input)
    _check_fit_outputs(
        input_path if input_path.exists() else None, output, png, model_dir, checkpoint_dir
    )

    import matplotlib
    import numpy as np
    import torch

    matplotlib.use("Agg")  # the CLI only writes files; no display needed

    from ..data.identity import FileIdentity
    from ..errors import TrainingError, TrainingInterrupted, TrainingWarning
    from ..io import persistence
    from ..io.files import check_free_space
    from ..io.model_dir import new_run_id
    from ..io.outputs import GENES_KEY, LAYER_KEY
    from ..model.likelihoods import LIKELIHOODS
    from ..scvi import SCVI, resolve_device
    from ..tl import write_results
    from ..train import distributed
    from ..train.engine import ThreadPolicy

    resolve_device(args.device)  # fail before reading data
    if args.dispersion == "gene-batch" and args.batch_key is None and not args.resume:
        raise InputError(
            "--dispersion gene-batch fits one dispersion per gene and batch and needs "
            "--batch-key KEY; without batches use --dispersion gene."
        )
    # launched by torchrun: join the group; only rank 0 writes (pyro_scvi.train.distributed)
    group = stack.enter_context(distributed.process_group(resolve_device(args.device)))
    adata, streamed, data_source = _read_data(args, layer=args.layer)
    # A streamed input is read again when the outputs are written: pin the file it was
    # (pyro_scvi.data.identity), so that a file replaced meanwhile is never paired with
    # this run's rows.
    pinned = FileIdentity.of(adata.filename) if streamed else None
    plan = _normalized_plan(args, adata)
    if not plan.layer and args.normalized == "auto" and not plan.genes:
        print(f"{PROG}: {plan.reason}", file=sys.stderr)  # known before a long training
    if args.drop_empty_cells and streamed:
        raise InputError(
            "--drop-empty-cells needs the counts in memory, and INPUT is streamed "
            f"({data_source}); remove the empty cells from the file, or pass "
            "--data-source memory."
        )
    if args.drop_empty_cells:
        from ..data import nonempty_cells

        keep = nonempty_cells(adata, args.layer)
        if not keep.all():
            print(f"{PROG}: dropping {int((~keep).sum())} cells with zero counts", file=sys.stderr)
            adata = adata[keep].copy()
    if args.resume:
        model = SCVI.load_checkpoint(
            checkpoint_dir,
            adata,
            device=args.device,
            streamed=True if streamed else None,
            trust=args.trust_model,
        )
        _check_resume_options(model, args, argv)
        if not model.interrupted and model.run_settings is None:
            raise InputError(f"the checkpoint in {checkpoint_dir} has no run left to resume.")
    else:
        model = SCVI(
            adata,
            layer=args.layer,
            batch_key=args.batch_key,
            likelihood=LIKELIHOODS[args.likelihood](),
            dispersion=args.dispersion,
            n_latent=args.n_latent,
            use_observed_lib_size=True if args.observed_library else None,
            library_residual=args.library_residual,
            streamed=True if streamed else None,
        )
    # room for everything this run writes, checked before a long training
    h5ad_bytes = _h5ad_bytes(adata, args.n_latent, plan.dense_columns(adata.n_vars))
    needs = {output: h5ad_bytes, model_dir: persistence.model_bytes(model)}
    needs[png] = 2**19
    if explicit_checkpoints:
        needs[checkpoint_dir] = persistence.checkpoint_bytes(model)
    check_free_space(needs)
    every = args.checkpoint_every if explicit_checkpoints else 0
    status, stopped, note = 0, None, ""
    # What a signal after training finds: whether the trained model is safe in a checkpoint
    # already (an interrupted run's), and whether the outputs are all in place.
    after = {"epochs": len(model.history), "kept": None, "writing": False, "published": False}
    try:
        try:
            # what these warnings say, the run's one-line messages say (a TrainingError's, or
            # the divergence warning below, from the run's record)
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", category=TrainingWarning)
            warnings.filterwarnings("ignore", message="Encountered NaN")
            if args.resume and not model.interrupted:
                # a finished run's checkpoint (its outputs were not written): write them;
                # a run that converged before --max-epochs is finished too
                note = f" The run had finished ({_ended(model.history)} at epoch "
                note += f"{int(model.history['epoch'].iloc[-1])}): nothing was trained."
            elif args.resume:
                model.resume(
                    device=args.device,
                    progress_bar=not args.quiet,
                    checkpoint_dir=checkpoint_dir,
                    checkpoint_every=every,
                )
            else:
                model.train(
                    args.max_epochs,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    # not given: train()'s default, the one place it is decided
                    **{
                        name: value
                        for name in ("early_stopping", "restore_best_epoch")
                        if (value := getattr(args, name)) is not None
                    },
                    engine=_engine(args),
                    device=args.device,
                    seed=args.seed,
                    progress_bar=not args.quiet,
                    checkpoint_dir=checkpoint_dir,
                    checkpoint_every=every,
                )
        except TrainingError as err:
            if group is not None and not group.is_main:
                return 1
            if not model.is_trained:
                print(
                    f"{PROG} fit: error: {err} Nothing was written: there is no trained model.",
                    file=sys.stderr,
                )
                return 1
            status, stopped = 1, str(err)
            note = f" Training failed: {err} The outputs hold the model of that epoch."
        except TrainingInterrupted as err:
            status = 128 + err.signal
            if group is not None and not group.is_main:
                return status
            if err.checkpoint:
                resume = f" Resume with: {_resume_command(argv, checkpoint_dir)}"
                where = f"checkpoint in {checkpoint_dir}.{resume}"
                after["kept"] = checkpoint_dir
            else:  # a full disk, say: the outputs still hold what was trained
                where = f"no checkpoint could be written ({err.checkpoint_error})."
            if not model.is_trained:
                print(
                    f"{PROG} fit: {err} No epoch had completed, so no outputs were written; "
                    f"{where}",
                    file=sys.stderr,
                )
                return status
            stopped = str(err)
            note = f" {err} The outputs hold the model at that point; {where}"
        if group is not None and not group.is_main:
            return status  # rank 0 writes the outputs
        after["writing"] = True

        # the seed the run used: a resumed run's own (given --seed was checked against it)
        ran = model.run_settings
        seed = ran.seed if args.resume and ran is not None and ran.seed is not None else args.seed
        if seed is not None:
            torch.manual_seed(seed)
        if pinned is not None:
            try:
                pinned.check()  # before the latent space is read from it
            except InputChanged as err:
                return _keep_the_model(model, err, argv, checkpoint_dir)
        library = float(np.median(model.data.total_counts()))
        run_id = new_run_id()
        # The queries follow the free cores as training did (pyro_scvi.train.engine.ThreadPolicy).
        threads = ThreadPolicy(args.threads)
        threads.start()
        try:
            # latent space and uns here; the normalized expression as the .h5ad is written
            write_results(
                model,
                adata,
                normalized_key=None,
                library_size=library,
                params=dict(
                    max_epochs=len(model.history),
                    batch_size=args.batch_size,
                    lr=args.lr,
                    seed=seed,
                    model_dir=str(model_dir),
                    input=str(args.input),
                    run_id=run_id,
                    resumed=bool(args.resume),
                    data_source=data_source,
                    **plan.record(),
                    **(
                        {"normalized_key": LAYER_KEY} if plan.layer else {}
                    ),  # as tl.write_results records it
                    normalized_library_size=library,
                    normalized_n_samples=args.n_samples,
                    **({"stopped": stopped} if stopped else {}),
                    **_stopping_params(model.history),
                ),
            )
            _write_fit_outputs(
                model,
                output=output,
                model_dir=model_dir,
                png=png,
                run_id=run_id,
                write=lambda path: _write_h5ad(
                    model,
                    adata,
                    path,
                    plan=plan,
                    library=library,
                    n_samples=args.n_samples,
                    pinned=pinned,
                ),
                n_bytes=h5ad_bytes,
                after=after,
            )
        except InputChanged as err:  # the streamed INPUT, checked again once copied
            return _keep_the_model(model, err, argv, checkpoint_dir)
        finally:
            threads.close()
    except KeyboardInterrupt as err:
        if group is not None and not group.is_main:
            raise  # rank 0 keeps the model
        # SIGINT or SIGTERM after the last training step (raised by the command line's
        # handler, pyro_scvi.cli._signals): keep the trained model and say how to finish
        return _interrupted_after_training(model, err, argv, checkpoint_dir, after)
    last = model.history.iloc[-1]
    written = ["obsm['X_pyro_scvi']"]
    written += [f"layers[{LAYER_KEY!r}]"] if plan.layer else []
    written += [f"obsm[{GENES_KEY!r}] ({len(plan.genes)} genes)"] if plan.genes else []
    diverged = (model.engine or {}).get("diverged")
    if diverged:
        print(f"{PROG} fit: warning: {diverged}", file=sys.stderr)
    print(
        f"{PROG}: wrote {output} ({', '.join(written)}, uns['pyro_scvi']; normalized "
        f"expression -- {plan.reason}); model in {model_dir}; curves in {png}; "
        f"final validation ELBO {last['validation_elbo']:.2f} per cell after "
        f"{len(model.history)} epochs ({_ended(model.history)}){_restored(model.history)}."
        f"{note}",
        file=sys.stderr,
    )
    return status


def _restored(history) -> str:
    """What the summary line says of a restored epoch ("" when none replaced the last)."""
    stopping = history.attrs.get("stopping") or {}
    epoch = stopping.get("restored_epoch")
    if epoch is None or epoch == stopping.get("epoch"):
        return ""
    value = stopping["best_value"]
    return f"; the model holds epoch {epoch}'s, the best 5-epoch mean ({value:.2f} per cell)"


def _stopping_params(history) -> dict:
    """How training ended, for ``uns["pyro_scvi"]["params"]`` (plain values, no ``None``)."""
    stopping = history.attrs.get("stopping") or {}
    names = ("early_stopping", "patience", "warmup_end", "threshold", "min_delta")
    out = {f"stopping_{k}": stopping[k] for k in names if stopping.get(k) is not None}
    if stopping:
        out |= {"stopped_epoch": int(stopping["epoch"]), "stop_reason": stopping["reason"]}
    more = ("restore_best_epoch", "best_epoch", "best_value", "restored_epoch")
    return out | {k: stopping[k] for k in more if stopping.get(k) is not None}


def _ended(history) -> str:
    return (history.attrs.get("stopping") or {}).get("reason", "run ended").split(":")[0]


def _engine(args: argparse.Namespace):
    """The training engine the fit options ask for: the preset, then per-field overrides."""
    from ..train.engine import Engine

    engine = Engine.preset(args.engine, threads=args.threads)
    switch = {"auto": None, "on": True, "off": False}
    overrides = {
        name: switch[value]
        for name, value in (("compiled", args.compile), ("fused_kernel", args.fused_kernel))
        if value != "auto"
    }
    for name in ("data_placement", "matmul_precision"):
        if getattr(args, name) != "auto":
            overrides[name] = getattr(args, name)
    return dataclasses.replace(engine, **overrides)


def _normalized_plan(args: argparse.Namespace, adata):
    """The one decision on normalized expression (pyro_scvi.io.outputs.plan_normalized)."""
    from ..io.outputs import plan_normalized, read_gene_file

    genes = list(args.normalized_genes or [])
    if args.normalized_genes_file is not None:
        genes += read_gene_file(args.normalized_genes_file)
    return plan_normalized(
        adata.n_obs, adata.n_vars, mode=args.normalized, genes=genes, var_names=adata.var_names
    )


def _check_fit_outputs(
    input_path: Path | None, output: Path, png: Path, model_dir: Path, checkpoint_dir: Path
) -> None:
    """Every check on fit's outputs that can be made before reading data and training."""
    from ..io.files import check_output_dir, check_output_file
    from ..io.model_dir import is_model_dir

    if input_path is not None and output.resolve() == input_path.resolve():
        raise InputError(
            "OUTPUT is the INPUT file; choose another -o: the input is never overwritten."
        )
    check_output_file(output, what="OUTPUT")
    check_output_file(png, what="the training-curve file")
    protect = [p for p in (input_path, output, png) if p is not None]
    check_output_dir(
        model_dir, owned=is_model_dir, what="--model-dir", protect=[*protect, checkpoint_dir]
    )
    check_output_dir(
        checkpoint_dir, owned=is_model_dir, what="--checkpoint-dir", protect=[*protect, model_dir]
    )


def _nbytes(matrix) -> int:
    import scipy.sparse as sp

    if matrix is None:
        return 0
    if sp.issparse(matrix):
        return sum(
            getattr(matrix, a).nbytes
            for a in ("data", "indices", "indptr", "row", "col")
            if hasattr(matrix, a)
        )
    return int(getattr(matrix, "nbytes", 0))


def _h5ad_bytes(adata, n_latent: int = 0, dense_columns: int | None = None) -> int:
    """A generous estimate of ``adata``'s size as ``.h5ad`` once the results are added.

    ``dense_columns``: float32 values per cell of normalized expression written (default:
    the dense layer, all genes). A backed AnnData counts as its file's size.
    """
    if adata.isbacked:
        n = os.path.getsize(adata.filename)
    else:
        n = _nbytes(adata.X)
        n += sum(_nbytes(m) for m in adata.layers.values())
        n += sum(_nbytes(m) for m in adata.obsm.values())
    n += int(adata.obs.memory_usage(deep=True).sum() + adata.var.memory_usage(deep=True).sum())
    dense_columns = adata.n_vars if dense_columns is None else dense_columns
    n += 4 * adata.n_obs * (dense_columns + n_latent)
    return n + 2**20


def _write_h5ad(
    model, adata, path: Path, *, plan, library: float, n_samples: int, pinned=None
) -> None:
    """Write fit's ``.h5ad`` to ``path``: ``adata``, its results, the normalized expression.

    The normalized expression is added a chunk of cells at a time (pyro_scvi.io.outputs). A
    streamed (backed) ``adata`` is never loaded: its file is copied byte for byte and the
    latent space and ``uns`` are added to the copy; ``pinned`` (its
    :class:`~pyro_scvi.data.identity.FileIdentity` when training started) is checked again
    once it is copied, so the copy is of the file the model was trained on.
    """
    from ..io.outputs import write_normalized

    _write_results_h5ad(adata, path)
    if pinned is not None:
        pinned.check()
    write_normalized(path, model, plan, library_size=library, n_samples=n_samples)


def _keep_the_model(model, err: Exception, argv: Sequence[str], checkpoint_dir: Path) -> int:
    """INPUT changed under a trained run: keep the model as a checkpoint, say how to go on.

    Nothing is written from the changed file. The checkpoint is of the run as it stands (a
    finished run's, or an interrupted one's), so ``fit --resume`` with INPUT as it was
    writes the outputs (and finishes the run, if it was interrupted); with another file,
    the checkpoint's check of the cells refuses it.
    """
    from ..io import persistence
    from ..train.run import empty_history

    run = model.training_run
    settings = model.run_settings
    if run is None or settings is None or not model.is_trained:
        print(f"{PROG} fit: error: {err}; no outputs were written.", file=sys.stderr)
        return 1
    persistence.write_checkpoint(model, checkpoint_dir, run.state, settings, empty_history())
    print(
        f"{PROG} fit: error: {err}; no outputs were written, so no result is paired with "
        f"another file's cells. The trained model is kept as a checkpoint in "
        f"{checkpoint_dir}; put INPUT back as it was and write the outputs with: "
        f"{_resume_command(argv, checkpoint_dir)}",
        file=sys.stderr,
    )
    return 1


def _write_fit_outputs(
    model,
    *,
    output: Path,
    model_dir: Path,
    png: Path,
    run_id: str,
    write,
    n_bytes: int,
    after: dict | None = None,
):
    """Write the model folder, curves and .h5ad under temporary names, then move them in.

    ``write(path)`` writes the .h5ad (about ``n_bytes``). The three move in together
    (:func:`pyro_scvi.io.files.publish`): under a lock that two runs finishing at once
    take in turn, with signals held for the renames, the old .h5ad aside first and the
    new one last, so that at no moment do an .h5ad and a model of two different runs sit
    side by side. ``after["published"]`` is set once they are in place.
    """
    import matplotlib.pyplot as plt

    from ..analysis.plotting import plot_history
    from ..io import persistence
    from ..io.files import (
        check_free_space,
        current_umask,
        deferred_signals,
        publish,
        remove_path,
        sweep_stale,
        temp_name,
    )
    from ..io.model_dir import is_model_dir
    from ._signals import check

    after = {} if after is None else after
    for path in (output, png):
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale(path)
    tmp_model = tmp_png = tmp_h5ad = None
    try:
        tmp_model = persistence.stage(model, model_dir, run_id=run_id)
        tmp_png = temp_name(png)
        fig = plot_history(model.history)
        fig.savefig(tmp_png, format="png")
        plt.close(fig)
        # HDF5 can crash the process on a full disk: make sure the file fits first.
        check_free_space({output: n_bytes})
        tmp_h5ad = temp_name(output)
        write(tmp_h5ad)
        for tmp in (tmp_png, tmp_h5ad):
            os.chmod(tmp, 0o666 & ~current_umask())
        check()  # a signal whose exception was swallowed on the way: stop before moving in
        with deferred_signals():
            publish(
                [(tmp_png, png), (tmp_h5ad, output)],
                folders=[(tmp_model, model_dir)],
                owned=is_model_dir,
            )
            after["published"] = True
    finally:
        for tmp in (tmp_model, tmp_png, tmp_h5ad):
            if tmp is not None:
                remove_path(Path(tmp))


def _interrupted_after_training(
    model, err: KeyboardInterrupt, argv: Sequence[str], checkpoint_dir: Path, after: dict
) -> int:
    """SIGINT or SIGTERM between the last training step and the last output written.

    Leaves the complete outputs (the signal came as they moved in), or the trained model
    kept as a checkpoint in ``checkpoint_dir`` and the command that writes the outputs
    from it (``--resume``); the exit status is ``128 + signal``, never 0. A signal that
    came before training ended (a second Ctrl-C inside a step) is passed on as it was.
    """
    import signal

    from ..io import persistence
    from ..io.files import deferred_signals
    from ..train.run import empty_history
    from ._signals import signal_name

    signum = getattr(err, "signal", signal.SIGINT)
    name, status = signal_name(signum), 128 + signum
    if after["published"]:
        print(
            f"{PROG} fit: {name} arrived as the outputs were moved into place; they are complete.",
            file=sys.stderr,
        )
        return status
    finished = len(model.history) > after["epochs"] and not model.interrupted
    if after["kept"] is None and not finished and not after["writing"]:
        raise err  # training had not ended: nothing trained to keep
    command = _resume_command(argv, checkpoint_dir)
    if after["kept"] is not None:  # an interrupted run's checkpoint: resuming writes them
        print(
            f"{PROG} fit: interrupted by {name} before the outputs were written (old ones "
            f"are untouched); the checkpoint is in {checkpoint_dir}. Resume with: {command}",
            file=sys.stderr,
        )
        return status
    lost = (
        f"{PROG} fit: interrupted by {name} after training, before the outputs were "
        "written (old ones are untouched), and the trained model could not be kept"
    )
    run, settings = model.training_run, model.run_settings
    if run is None or settings is None:  # a run that failed (non-finite loss): no state
        print(f"{lost}: the run has no state to resume from.", file=sys.stderr)
        return status
    try:
        with deferred_signals():  # a few seconds; a second signal must not cut them short
            kept = empty_history()  # the model's history holds the run's rows already
            persistence.write_checkpoint(model, checkpoint_dir, run.state, settings, kept)
    except (OSError, InputError) as keep_err:
        print(f"{lost} in {checkpoint_dir} ({keep_err}).", file=sys.stderr)
        return status
    print(
        f"{PROG} fit: interrupted by {name} after training, before the outputs were written "
        f"(old ones are untouched); the trained model is kept in {checkpoint_dir}. Write the "
        f"outputs from it with: {command}",
        file=sys.stderr,
    )
    return status


def _resume_command(argv: Sequence[str], checkpoint_dir: Path) -> str:
    import shlex

    words = [PROG, *argv]
    if not any(w == "--checkpoint-dir" or w.startswith("--checkpoint-dir=") for w in argv):
        words += ["--checkpoint-dir", str(checkpoint_dir)]
    if "--resume" not in argv:
        words.append("--resume")
    return shlex.join(words)


def _check_resume_options(model, args: argparse.Namespace, argv: Sequence[str] = ()) -> None:
    """The options that shape training must be the interrupted run's.

    ``--seed`` too when given (``argv``): a resumed run goes on with the streams of the seed
    it was started with, and that seed is the one recorded.
    """
    from ..model.likelihoods import LIKELIHOODS

    settings = model.run_settings
    run = settings.to_dict() if settings is not None else {}
    expected = {
        "--likelihood": (repr(LIKELIHOODS[args.likelihood]()), model.settings["likelihood"]),
        "--dispersion": (args.dispersion, model.settings["dispersion"]),
        "--n-latent": (args.n_latent, model.settings["n_latent"]),
        "--observed-library": (
            args.observed_library,
            bool(model.settings.get("use_observed_lib_size", False)),
        ),
        "--layer": (args.layer, model.settings["layer"]),
        "--batch-key": (args.batch_key, model.settings["batch_key"]),
        "--batch-size": (args.batch_size, run.get("batch_size")),
        "--lr": (args.lr, run.get("lr")),
    }
    if args.max_epochs is not None:
        expected["--max-epochs"] = (args.max_epochs, run.get("target_epoch"))
    given_seed = any(w == "--seed" or w.startswith("--seed=") for w in argv)
    if given_seed and run.get("seed") is not None:
        expected["--seed"] = (args.seed, run.get("seed"))
    if args.early_stopping is not None:
        expected["--early-stopping"] = (args.early_stopping, run.get("early_stopping"))
    if args.restore_best_epoch is not None:
        given = args.restore_best_epoch
        expected["--restore-best-epoch"] = (given, run.get("restore_best_epoch", False))
    if args.library_residual is not None:  # not given: the checkpoint's own
        expected["--library-residual"] = (
            args.library_residual,
            bool(model.settings.get("library_residual", False)),
        )
    differ = [f"{k} {v[1]} (given: {v[0]})" for k, v in expected.items() if v[0] != v[1]]
    if differ:
        raise InputError(
            "--resume continues the checkpoint's run, which was started with "
            + ", ".join(differ)
            + "; resume with the same options."
        )
