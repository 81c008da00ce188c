"""Derived versions of the shared datasets, for kinds of data none of them is.

The fit is to be scored on data kept outside the repo, among them Smart-seq2 read counts
with up to 10^6 reads per cell and several donors, and Microwell-seq with 20,000 genes of
which 8 % are all zero. None of the six shared files holds read counts or an all-zero
gene, so this script derives such files from them for ``accuracy_defaults.py``:

``--kind reads`` (``<name>_reads.h5ad``)
    Read counts from UMI counts, the way a full-length protocol produces them: every
    captured molecule is amplified by PCR and then sequenced, so that
its reads are a Poisson draw around a Gamma-distributed amplification. For a cell ``c``
with ``n_c`` UMIs, a target total of reads ``T_c`` (log-uniform between ``--min-reads``
and ``--max-reads``) and molecules that each give ``a_c = T_c / n_c`` reads on average,

    reads_cg ~ Poisson(Gamma(shape = k * umis_cg, scale = a_c / k)),

    i.e. negative binomial with mean ``a_c * umis_cg`` and shape ``k * umis_cg``: a sum
    over the gene's molecules of independent Gamma(k, a_c / k) amplifications (``--shape``
    k, default 1: amplification noise of the size of the mean, as PCR duplicates show).
    Zeros stay zeros.
``--kind zero-genes`` (``<name>_zero_genes.h5ad``)
    The counts as they are, plus all-zero genes making up ``--zero-fraction`` (0.08) of
    the genes, at random places among them.

``obs`` (``cell_type``, ``batch``) is kept, so the cell types and donors of the source file
label the derived one.

::

    reads=$(mktemp -d)
    python benchmarks/derive_data.py --out-dir "$reads"
    python benchmarks/accuracy_defaults.py --data-dir "$reads" \\
        --seeds 0 1 --out-dir benchmarks/results/accuracy_reads

Writes one file per ``--datasets`` entry (default: the Zeisel cortex subset and the Baron
pancreas, two donors) into ``--out-dir``, atomically, and prints its shape, reads per cell
and zeros. The derived files are not kept in the repository; the command above makes them
again, the same for the same ``--seed``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_scvi_tools as cst  # noqa: E402

DEFAULT_DATASETS = ("zeisel_cortex_subset_1464x1000", "baron_pancreas_indrop_neuca")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description="Derive read counts, or files with all-zero genes, from the shared data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data-dir", type=Path, default=cst.DEFAULT_DATA_DIR, help="Folder of .h5ad")
    p.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS), help="UMI files")
    p.add_argument(
        "--kind", choices=("reads", "zero-genes"), default="reads", help="What to derive"
    )
    p.add_argument("--out-dir", type=Path, required=True, help="Folder for the derived files")
    p.add_argument("--min-reads", type=float, default=1e4, help="Fewest reads per cell")
    p.add_argument("--max-reads", type=float, default=1e6, help="Most reads per cell")
    p.add_argument("--shape", type=float, default=1.0, help="Gamma shape per molecule (k)")
    p.add_argument(
        "--zero-fraction", type=float, default=0.08, help="zero-genes: share of all-zero genes"
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of the draws")
    args = p.parse_args(argv)
    if not 0 < args.min_reads <= args.max_reads:
        p.error("--min-reads must be positive and at most --max-reads.")
    if args.shape <= 0:
        p.error("--shape must be positive.")
    if not 0 <= args.zero_fraction < 1:
        p.error("--zero-fraction must be in [0, 1).")
    return args


def derive_reads(
    umis, *, min_reads: float, max_reads: float, shape: float, rng: np.random.Generator
):
    """Read counts (CSR, float32) for a CSR matrix of UMI counts; see the module docstring."""
    import scipy.sparse as sp

    umis = sp.csr_matrix(umis, dtype=np.float64)
    umis.eliminate_zeros()
    per_cell = np.asarray(umis.sum(axis=1)).ravel()
    if (per_cell <= 0).any():
        raise ValueError("Every cell needs at least one UMI; drop empty cells first.")
    target = np.exp(rng.uniform(np.log(min_reads), np.log(max_reads), size=umis.shape[0]))
    per_molecule = np.repeat(target / per_cell, np.diff(umis.indptr))
    amplified = rng.gamma(shape * umis.data, per_molecule / shape)
    reads = umis.copy()
    reads.data = rng.poisson(amplified).astype(np.float32)
    reads.eliminate_zeros()
    return reads.astype(np.float32)


def add_zero_genes(adata, fraction: float, rng: np.random.Generator):
    """``adata`` with all-zero genes added at random places, ``fraction`` of the result."""
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    n_zero = int(round(fraction * adata.n_vars / (1 - fraction)))
    n_genes = adata.n_vars + n_zero
    place = np.sort(rng.choice(n_genes, size=adata.n_vars, replace=False))
    counts = sp.csr_matrix(adata.X, dtype=np.float32)
    # a column map: the source's genes go to `place`, the new ones are empty columns
    spread = sp.csr_matrix(
        (np.ones(adata.n_vars, dtype=np.float32), (np.arange(adata.n_vars), place)),
        shape=(adata.n_vars, n_genes),
    )
    names = np.array([f"zero_gene_{i}" for i in range(n_genes)], dtype=object)
    names[place] = adata.var_names.to_numpy()
    var = pd.DataFrame(index=pd.Index(names.astype(str)))
    return anndata.AnnData(X=(counts @ spread).tocsr(), obs=adata.obs.copy(), var=var)


def main(argv: list[str] | None = None) -> int:
    """Write each derived file and print its reads per cell."""
    import anndata

    args = parse_args(argv)
    rng = np.random.default_rng(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        name = name.removesuffix(".h5ad")
        source = args.data_dir / f"{name}.h5ad"
        if not source.exists():
            print(f"{name}: no file {source} (pass --data-dir)", file=sys.stderr)
            return 1
        adata = anndata.read_h5ad(source)
        keep = np.asarray(adata.X.sum(axis=1)).ravel() > 0
        adata = adata[keep].copy()
        if args.kind == "reads":
            reads = derive_reads(
                adata.X,
                min_reads=args.min_reads,
                max_reads=args.max_reads,
                shape=args.shape,
                rng=rng,
            )
            keep = np.asarray(reads.sum(axis=1)).ravel() > 0  # all of a cell's draws were 0
            out = anndata.AnnData(X=reads[keep], obs=adata.obs[keep].copy(), var=adata.var.copy())
            how = {"reads_per_cell": [args.min_reads, args.max_reads], "shape": args.shape}
        else:
            out = add_zero_genes(adata, args.zero_fraction, rng)
            how = {"zero_fraction": args.zero_fraction}
        out.uns["derived_from"] = {
            "file": source.name,
            "kind": args.kind,
            **how,
            "seed": args.seed,
        }
        path = args.out_dir / f"{name}_{args.kind.replace('-', '_')}.h5ad"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".h5ad", dir=args.out_dir)
        os.close(fd)
        try:
            out.write_h5ad(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        totals = np.asarray(out.X.sum(axis=1)).ravel()
        empty = float((np.asarray(out.X.sum(axis=0)).ravel() == 0).mean())
        print(
            f"{path}: {out.n_obs} cells x {out.n_vars} genes, counts per cell "
            f"{totals.min():,.0f} - {totals.max():,.0f} (median {np.median(totals):,.0f}), "
            f"zeros {1 - out.X.nnz / np.prod(out.shape):.3f}, all-zero genes {empty:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
