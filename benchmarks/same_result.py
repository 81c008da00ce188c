"""Does a change leave results alone? Fingerprints of default fits, to compare across commits.

The public API only, so it runs against any checkout (details: ``benchmarks/README.md``)::

    cd OLD_CHECKOUT && PYTHONPATH=. python NEW_CHECKOUT/benchmarks/same_result.py --out a.json
    cd NEW_CHECKOUT && PYTHONPATH=. python benchmarks/same_result.py --out b.json
    python benchmarks/same_result.py --compare a.json b.json     # exit 1 if they differ
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

#: (file stem, epochs): the two engine paths a default fit takes on the shared data
DEFAULT_FITS = (("zeisel_cortex_subset_1464x1000", 30), ("cellbench_3cl_2tech", 15))
#: history columns that must agree (``seconds`` is wall time)
COMPARED = ("epoch", "train_elbo", "validation_elbo", "kl_weight", "threads")


def fingerprint(adata, epochs: int) -> dict:
    """The fit's latent (SHA-256 of its float32 bytes), history columns and engine choices."""
    import torch

    import pyro_scvi

    torch.set_num_threads(1)
    kw = {"batch_key": "batch"} if adata.obs["batch"].nunique() > 1 else {}
    model = pyro_scvi.SCVI(adata, **kw)
    model.train(epochs, seed=0, progress_bar=False, engine=pyro_scvi.Engine(threads=1))
    latent = np.ascontiguousarray(model.get_latent_representation(), dtype=np.float32)
    engine = model.engine or {}
    return {
        "latent_sha256": hashlib.sha256(latent.tobytes()).hexdigest(),
        "history": {c: model.history[c].astype(float).tolist() for c in COMPARED},
        "engine": {k: engine.get(k) for k in ("compiled", "fused_kernel", "fused_adam")},
    }


def compare(a: dict, b: dict) -> list[str]:
    """What differs between two fingerprint files' fits (empty: the same results)."""
    out = []
    for name in sorted(set(a["fits"]) | set(b["fits"])):
        fa, fb = a["fits"].get(name), b["fits"].get(name)
        if fa is None or fb is None:
            out.append(f"{name}: in one file only")
            continue
        keys = ("latent_sha256", "history", "engine")
        out += [f"{name}: {k} differs" for k in keys if fa[k] != fb[k]]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, help="write the fingerprints here (JSON)")
    p.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="two JSON files")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("PYRO_SCVI_DATA"))
    p.add_argument("--smoke", action="store_true", help="2 epochs of simulated counts")
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(path.read_text()) for path in args.compare)
        differ = compare(a, b)
        print("\n".join(differ) if differ else f"the same results: {', '.join(a['fits'])}")
        return 1 if differ else 0
    if args.out is None:
        p.error("give --out FILE to fit, or --compare A B")
    import anndata

    import pyro_scvi

    if args.smoke:
        fits = {"synthetic": (pyro_scvi.datasets.synthetic_zinb(200, 30, n_batches=2), 2)}
    else:
        if args.data_dir is None:
            p.error("set PYRO_SCVI_DATA or --data-dir to the folder of the .h5ad files")
        read = anndata.read_h5ad
        fits = {name: (read(args.data_dir / f"{name}.h5ad"), e) for name, e in DEFAULT_FITS}
    result = {"pyro_scvi_version": pyro_scvi.__version__}
    result["fits"] = {name: fingerprint(adata, epochs) for name, (adata, epochs) in fits.items()}
    args.out.write_text(json.dumps(result, indent=1))
    for name, fit in result["fits"].items():
        print(f"{name}: latent {fit['latent_sha256'][:12]}, engine {fit['engine']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
