"""The Bayesian-decoder remedy for the PBMC posterior predictive check (issue 14, item 2).

``pbmc_ppc_diagnosis.py`` found that on pbmc8k_200hvg a third of the genes' means get
posterior predictive p-values outside [0.025, 0.975], and that the check itself produces
much of it even when the model is right (point-estimated globals, approximate q(z | x)).
This script fits the same model with :class:`pyro_scvi.model.schemes.BayesianDecoder` (a Normal
prior and a mean-field Normal posterior on the decoder's output layer and on log theta)
and checks it beside the point-estimate fit.

Fits (default settings otherwise, ``--epochs`` epochs, seed 0):

* ``point``: the default model on the real counts (as the diagnosis' ``real``);
* ``bd``: the Bayesian-decoder model on the real counts;
* ``bd_sim``: the Bayesian-decoder model refitted to counts simulated from ``bd`` (one
  draw of the globals from q shared by all cells, one ``(z, l) ~ q`` per real cell, then
  ``x ~ p(x | z, l, globals)``): the model is right by construction.

Checks (fraction of gene-wise p-values outside [0.025, 0.975] for the mean, variance, cv
and zero fraction; per-entry PIT TV and interval calibration error; held-out ELBO and
importance-sampled log p(x) per cell):

* point on real, bd on real: does the remedy move the real-data numbers?
* bd on simulated (no refit), bd_sim on simulated: the calibration check; about 5 % is
  a calibrated check.

Run::

    PYTHONPATH=. python benchmarks/bayesian_decoder.py --cache DIR   # ~ 2-3 fits' time
    PYTHONPATH=. python benchmarks/bayesian_decoder.py --smoke       # seconds

``--cache`` keeps the fitted models (and reuses them; a ``point`` folder saved by
``pbmc_ppc_diagnosis.py --cache`` as ``real`` can be passed with ``--point``).
Results: ``benchmarks/results/bayesian_decoder.{json,md}`` (``_smoke`` with --smoke).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from pbmc_ppc_diagnosis import STATS, _extreme, _fit  # noqa: E402

import pyro_scvi  # noqa: E402
from pyro_scvi.analysis import criticism  # noqa: E402
from pyro_scvi.model.schemes import BayesianDecoder  # noqa: E402
from pyro_scvi.posterior import fit_statistics  # noqa: E402


def _heldout_fit(model, n_samples: int) -> dict:
    idx = np.asarray(model.validation_indices)
    stats = fit_statistics(
        model.model, model.guide, model.data, idx, n_samples=n_samples, device=model.device
    )
    return {
        "heldout_elbo": float(stats["elbo"].mean()),
        "heldout_log_px": float(stats["marginal_ll"].mean()),
        "n_cells": len(idx),
        "n_importance_samples": n_samples,
    }


def _globals_summary(model) -> dict:
    """Mean posterior standard deviation of each global site (BayesianDecoder fits)."""
    guide = model.guide
    if not hasattr(guide, "sample_globals"):
        return {}
    out = {site: float(guide.posterior(site).scale.mean().detach()) for site in guide.sites}
    if "log_theta" in guide.sites:
        out["theta_median"] = float(guide.loc["log_theta"].exp().median().detach())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument(
        "--sim-epochs", type=int, help="epochs of the refit to simulated counts (default --epochs)"
    )
    parser.add_argument(
        "--cells",
        choices=["both", "held-out"],
        default="both",
        help="check on all cells and the held-out ones, or on the held-out ones only",
    )
    parser.add_argument("--n-samples", type=int, default=50)
    parser.add_argument("--prior-scale", type=float, default=1.0)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--cache", type=Path, help="save/reuse fitted models here")
    parser.add_argument("--point", type=Path, help="a saved point-estimate fit to reuse")
    parser.add_argument("--out-dir", type=Path, default=_common.REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    adata = pyro_scvi.datasets.pbmc8k_200hvg()
    epochs, n_samples, n_is = args.epochs, args.n_samples, 100
    sim_epochs = args.sim_epochs or epochs
    if args.smoke:
        adata = adata[np.random.default_rng(0).choice(adata.n_obs, 300, replace=False)].copy()
        epochs, sim_epochs, n_samples, n_is = 2, 2, 10, 5
    scheme = BayesianDecoder(prior_scale=args.prior_scale, log_theta_scale=args.prior_scale)
    results: dict = {
        "meta": _common.run_metadata(argv, None),
        "settings": {
            "epochs": epochs,
            "sim_epochs": sim_epochs,
            "cells": args.cells,
            "n_samples": n_samples,
            "smoke": args.smoke,
            "scheme": repr(scheme),
        },
        "fits": {},
        "checks": [],
    }
    if args.point is not None and (args.point / "model.pt").exists():
        point = pyro_scvi.SCVI.load(args.point, adata, device="cpu")
    else:
        point, _ = _fit(adata, epochs, args.cache, "point")
    bd, _ = _fit(adata, epochs, args.cache, "bd", scheme=scheme)
    sim_adata = criticism.simulate(bd, latent="posterior", seed=1)
    bd_sim, _ = _fit(sim_adata, sim_epochs, args.cache, "bd_sim", scheme=scheme)
    for name, model in (("point", point), ("bd", bd), ("bd_sim", bd_sim)):
        results["fits"][name] = {
            # from the history, so a fit reused from --cache reports its own time
            "train_seconds": float(model.history["seconds"].sum()),
            "epochs": len(model.history),
            "engine": (model.engine or {}).get("reasons"),
            # Adam's settings and the param groups the guide declared (q of the globals:
            # their own eps); absent for a fit loaded from a folder without it
            "optim": model.history.attrs.get("optim"),
            "globals_posterior_sd": _globals_summary(model),
            **_heldout_fit(model, n_is),
        }
        print(name, results["fits"][name], file=sys.stderr)
    cases = [
        ("point", "point estimates, real counts", point, adata),
        ("bd", "Bayesian decoder, real counts", bd, adata),
        ("bd, sim", "Bayesian decoder on counts simulated from it (no refit)", bd, sim_adata),
        (
            "bd_sim, sim",
            "Bayesian decoder refitted to those counts (calibration)",
            bd_sim,
            sim_adata,
        ),
    ]
    for key, label, model, data in cases:
        held_out = np.asarray(model.validation_indices)
        cell_sets = [("all", None), ("held-out", held_out)]
        for cells, idx in cell_sets if args.cells == "both" else cell_sets[1:]:
            start = time.perf_counter()
            row = {"case": key, "label": label, "cells": cells}
            row["frac_outside"] = _extreme(model, data, idx, n_samples, seed=0)
            c = criticism.criticize(
                model, data, cells="all", indices=idx, n_samples=min(n_samples, 30), seed=0
            )
            row["criticism"] = {k: v for k, v in c.summary.items() if k != "name"}
            row["seconds"] = time.perf_counter() - start
            results["checks"].append(row)
            print(
                key,
                cells,
                row["frac_outside"],
                round(row["criticism"]["pit_tv"], 4),
                file=sys.stderr,
            )
    fits = results["fits"]
    lines = [
        "# The Bayesian decoder on the PBMC posterior predictive check",
        "",
        f"pbmc8k_200hvg ({adata.n_obs} cells x {adata.n_vars} genes), default model "
        f"settings, {epochs} epochs ({sim_epochs} for the refit to simulated counts), seed 0; "
        f"`{scheme!r}`. {n_samples} posterior predictive "
        "draws per cell (30 for PIT and calibration); with the Bayesian decoder each draw "
        "takes its own draw of the globals from q, shared by all cells. Fraction of "
        "gene-wise p-values outside [0.025, 0.975]: about 5 % when the check is calibrated "
        "and the model fits.",
        "",
        "| case | cells | mean | variance | cv | zero fraction | PIT TV | calibration error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["checks"]:
        f, c = row["frac_outside"], row["criticism"]
        lines.append(
            f"| {row['case']}: {row['label']} | {row['cells']} ({c['n_cells']}) | "
            + " | ".join(f"{100 * f[s]:.1f} %" for s in STATS)
            + f" | {c['pit_tv']:.3f} | {c['calibration_error']:.3f} |"
        )
    lines += [
        "",
        f"Held-out cells, per cell (nats; log p(x) importance-sampled with {n_is} draws; "
        "for the Bayesian decoder each draw also draws the globals, so it estimates the "
        "posterior predictive density):",
        "",
        "| fit | train s | held-out ELBO | held-out log p(x) | posterior sd: W | b | log theta |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, f in fits.items():
        g = f["globals_posterior_sd"]
        sds = " | ".join(
            f"{g[s]:.4f}" if s in g else "-" for s in ("rho_weight", "rho_bias", "log_theta")
        )
        lines.append(
            f"| {name} | {f['train_seconds']:.0f} | {f['heldout_elbo']:.2f} | "
            f"{f['heldout_log_px']:.2f} | {sds} |"
        )
    lines.append("")
    stem = "bayesian_decoder_smoke" if args.smoke else "bayesian_decoder"
    table = "\n".join(lines) + "\n"
    _common.write_results(args.out_dir, stem, results, table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
