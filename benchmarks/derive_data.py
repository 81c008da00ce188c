"""Derived versions of the shared datasets, for kinds of data none of them is.

``--kind reads`` (``<name>_reads.h5ad``): read counts from UMI counts as a full-length
protocol makes them: each molecule PCR-amplified and sequenced, ``reads_cg ~
Poisson(Gamma(k * umis_cg, a_c / k))`` with a cell's reads per molecule ``a_c`` set so that
its total is log-uniform between ``--min-reads`` and ``--max-reads`` (``--shape`` k).
``--kind zero-genes`` (``<name>_zero_genes.h5ad``): the counts plus all-zero genes, a
``--zero-fraction`` of the result, at random places. ``obs`` is kept. For
``accuracy_defaults --data-dir``; the files are not kept (the same ``--seed`` makes them
again).

    reads=$(mktemp -d)
    python -m benchmarks.derive_data --out-dir "$reads"
    python -m benchmarks.accuracy_defaults --data-dir "$reads" --seeds 0 1 \\
        --out-dir benchmarks/results/accuracy_reads
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .lib import data, results

DATASETS = ("zeisel_cortex_subset_1464x1000", "baron_pancreas_indrop_neuca")


def derive_reads(umis: Any, *, min_reads: float, max_reads: float, shape: float, rng: Any):
    """Read counts (CSR, float32) for a CSR matrix of UMI counts; see the module."""
    import numpy as np
    import scipy.sparse as sp

    umis = sp.csr_matrix(umis, dtype=np.float64)
    umis.eliminate_zeros()
    per_cell = np.asarray(umis.sum(axis=1)).ravel()
    if (per_cell <= 0).any():
        raise ValueError("Every cell needs at least one UMI; drop empty cells first.")
    target = np.exp(rng.uniform(np.log(min_reads), np.log(max_reads), size=umis.shape[0]))
    per_molecule = np.repeat(target / per_cell, np.diff(umis.indptr))
    reads = umis.copy()
    reads.data = rng.poisson(rng.gamma(shape * umis.data, per_molecule / shape)).astype(np.float32)
    reads.eliminate_zeros()
    return reads.astype(np.float32)


def add_zero_genes(adata: Any, fraction: float, rng: Any) -> Any:
    """``adata`` with all-zero genes added at random places, ``fraction`` of the result."""
    import anndata
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    n_genes = adata.n_vars + int(round(fraction * adata.n_vars / (1 - fraction)))
    place = np.sort(rng.choice(n_genes, size=adata.n_vars, replace=False))
    ones = np.ones(adata.n_vars, dtype=np.float32)  # source gene i goes to column place[i]
    spread = sp.csr_matrix((ones, (np.arange(adata.n_vars), place)), shape=(adata.n_vars, n_genes))
    names = np.array([f"zero_gene_{i}" for i in range(n_genes)], dtype=object)
    names[place] = adata.var_names.to_numpy()
    counts = sp.csr_matrix(adata.X, dtype=np.float32) @ spread
    var = pd.DataFrame(index=pd.Index(names.astype(str)))
    return anndata.AnnData(X=counts.tocsr(), obs=adata.obs.copy(), var=var)


def main(argv: list[str] | None = None) -> int:
    import anndata
    import numpy as np

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", type=Path, default=None, help="folder of the UMI files")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--kind", choices=("reads", "zero-genes"), default="reads")
    p.add_argument("--out-dir", type=Path, required=True, help="folder for the derived files")
    p.add_argument("--min-reads", type=float, default=1e4)
    p.add_argument("--max-reads", type=float, default=1e6)
    p.add_argument("--shape", type=float, default=1.0, help="Gamma shape per molecule (k)")
    p.add_argument("--zero-fraction", type=float, default=0.08)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 0 < args.min_reads <= args.max_reads or args.shape <= 0:
        p.error("need 0 < --min-reads <= --max-reads and --shape > 0")
    if not 0 <= args.zero_fraction < 1:
        p.error("--zero-fraction must be in [0, 1).")
    rng = np.random.default_rng(args.seed)
    for name in args.datasets:
        adata = data.load(name, args.data_dir)  # without empty cells
        if args.kind == "reads":
            settings = {
                "min_reads": args.min_reads,
                "max_reads": args.max_reads,
                "shape": args.shape,
            }
            reads = derive_reads(adata.X, **settings, rng=rng)
            keep = np.asarray(reads.sum(axis=1)).ravel() > 0  # all of a cell's draws were 0
            out = anndata.AnnData(X=reads[keep], obs=adata.obs[keep].copy(), var=adata.var.copy())
            how = {"reads_per_cell": [args.min_reads, args.max_reads], "shape": args.shape}
        else:
            out = add_zero_genes(adata, args.zero_fraction, rng)
            how = {"zero_fraction": args.zero_fraction}
        out.uns["derived_from"] = {"file": name, "kind": args.kind, **how, "seed": args.seed}
        path = args.out_dir / f"{data.parse(name)['name']}_{args.kind.replace('-', '_')}.h5ad"
        with results.atomic_path(path) as tmp:
            out.write_h5ad(tmp)
        totals = np.asarray(out.X.sum(axis=1)).ravel()
        empty = float((np.asarray(out.X.sum(axis=0)).ravel() == 0).mean())
        print(
            f"{path}: {out.n_obs} cells x {out.n_vars} genes, counts per cell {totals.min():,.0f}"
            f" - {totals.max():,.0f} (median {np.median(totals):,.0f}), zeros "
            f"{1 - out.X.nnz / np.prod(out.shape):.3f}, all-zero genes {empty:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
