"""The log p(x) yardsticks against the truth: exact (quadrature) vs AIS vs IS.

Two models whose ``log p(x)`` is exact by quadrature over a 1-d ``z`` and the latent
library ``l`` (:func:`pyro_scvi.posterior.ais.quadrature_log_px`):

- ``tiny``: a random 8-gene decoder, cells simulated from it, two per-cell Normal
  proposals: the posterior's moments (``good``) and one 3 sds off and 3 times too narrow
  (``bad``);
- ``fitted``: scVI with ``n_latent=1`` trained on pbmc8k_200hvg, its held-out cells, and its
  own amortized guide as proposal.

- ``simulated``: counts simulated from that fitted model (z and l from the priors), scored
  with the same model and its amortized guide.

For each: IS with ``K`` draws (estimate and PSIS Pareto ``k``) and AIS at several numbers of
steps (estimate, standard error, z-score against the truth).

``--datasets``: on each shared dataset, a default model (``--epochs`` caps training, and
``--cells`` subsamples) and ``--held`` of its held-out cells: the share with Pareto
``k > 0.7`` (``K`` = 1000 draws each) for IS with each proposal of
:mod:`pyro_scvi.posterior.proposals`, and their gaps to AIS (50 steps, 16 chains). Rows
are merged into the results by dataset and seed.

    python -m benchmarks.ais_validation            # about 5 minutes on 2 busy cores
    python -m benchmarks.ais_validation --datasets pbmc8k_200hvg zeisel_cortex_subset_1464x1000
    python -m benchmarks.ais_validation --smoke
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .lib import data, results

STUDY = "ais_validation"
PROPOSALS = ("q", "defensive", "refined", "mcmc")


def score(model, guide, x, b, exact, steps, k_is, chains, seed=0):
    import torch

    from pyro_scvi.analysis.criticism import psis_elpd
    from pyro_scvi.posterior import ais, log_importance_weights

    cells = torch.arange(len(x))
    torch.manual_seed(seed)
    log_w = log_importance_weights(model, guide, x, b, k_is, batch_size=16, cell_index=cells)
    est = ais.log_mean_exp_se(log_w)[0].numpy()
    k = psis_elpd(log_w.numpy())["pareto_k"].to_numpy()
    out = {"exact": exact.tolist(), "is": est.tolist(), "k": k.tolist(), "ais": {}}
    for n in steps:
        torch.manual_seed(seed)
        a = ais.ais_log_weights(model, guide, x, b, cell_index=cells, n_chains=chains, n_steps=n)
        e, se, _ = ais.log_mean_exp_se(a["log_w"])
        out["ais"][str(n)] = {"est": e.tolist(), "se": se.tolist()}
    return out


def tiny(n_cells: int, steps, k_is, chains):
    import torch

    import pyro_scvi
    from pyro_scvi.model.guides import PerCellGuide
    from pyro_scvi.model.priors import LogNormalLibrary
    from pyro_scvi.posterior import ais

    torch.manual_seed(0)
    lib = LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5]))
    model = pyro_scvi.ScviModel(8, 1, lib, n_latent=1, n_hidden=4).double().eval()
    with torch.no_grad():
        for p in model.decoder.parameters():
            p.mul_(3.0)
        model.log_theta.fill_(1.0)
        z, l = torch.randn(n_cells, 1, dtype=torch.float64), 3 + 0.5 * torch.randn(n_cells, 1)
        out = model.decoder(z, torch.zeros(n_cells, dtype=torch.long))
        mu = torch.exp(l.double()) * torch.softmax(out["rho_logits"], -1)
        x = model.likelihood(mu, model.log_theta.exp(), out["gate_logits"]).sample()
    b = torch.zeros(n_cells, dtype=torch.long)
    zs, ls = torch.linspace(-8, 8, 801).double(), torch.linspace(-1, 7, 401).double()
    truth = ais.quadrature_log_px(model, x, b, zs, ls)
    runs = {}
    for name, shift, factor in (("good", 0.0, 1.0), ("bad", 3.0, 1 / 3)):
        g = PerCellGuide(n_cells, 1, library=lib).double()
        m, sd = truth["mean"], truth["sd"] * factor
        with torch.no_grad():
            g.z_loc.copy_(m[:, :1] + shift * truth["sd"][:, :1])
            g.l_loc.copy_(m[:, 1:] + shift * truth["sd"][:, 1:])
            g.z_log_scale.copy_(sd[:, :1].log())
            g.l_log_scale.copy_(sd[:, 1:].log())
        runs[name] = score(model, g, x, b, truth["log_px"].numpy(), steps, k_is, chains)
    return runs


def fitted(n_cells: int, epochs: int, steps, k_is, chains, n_held: int = 100):
    import torch

    import pyro_scvi
    from pyro_scvi.posterior import ais

    adata = data.load("pbmc8k_200hvg", subsample=n_cells, seed=0)
    model = pyro_scvi.SCVI(adata, n_latent=1)
    model.train(max_epochs=epochs, train_size=0.9, progress_bar=False, seed=0)
    held = np.sort(model.validation_indices)[:n_held]
    x, b = model.data.tensors(held)
    loglib = torch.log(x.sum(-1, keepdim=True))
    ls = loglib + torch.linspace(-3.0, 3.0, 241)  # a grid per cell around its library,
    # then one on +-10 posterior sds around the posterior mean (refine)
    truth = ais.quadrature_log_px(model.model, x, b, torch.linspace(-8, 8, 401), ls, refine=10)
    out = score(model.model, model.guide, x, b, truth["log_px"].numpy(), steps, k_is, chains)
    out["l_offset_max"] = float((truth["mean"][:, 1:] - loglib).abs().max())  # l's posterior
    out["z_posterior_sd_min"] = float(truth["sd"][:, 0].min())
    with torch.no_grad():  # cells drawn from the fitted model itself: z, l from the priors
        m, n = model.model, len(held)
        z, l = m.prior().sample((n,)).reshape(n, 1), m.library_prior(b).sample().reshape(n, 1)
        dec = m.decoder(z, b)
        mu = torch.exp(l) * torch.softmax(dec["rho_logits"], -1)
        xs = m.likelihood(mu, m.theta(b, dec), dec["gate_logits"]).sample()
    ls = torch.log(xs.sum(-1, keepdim=True).clamp_min(1)) + torch.linspace(-3.0, 3.0, 241)
    truth = ais.quadrature_log_px(m, xs, b, torch.linspace(-8, 8, 401), ls, refine=10)
    sim = score(m, model.guide, xs, b, truth["log_px"].numpy(), steps, k_is, chains)
    return {"amortized": out, "simulated": sim}


def on_dataset(name: str, seed: int, a) -> dict:
    import time

    import torch

    import pyro_scvi
    from pyro_scvi.posterior import ais, proposals

    adata = data.load(name, subsample=a.cells, seed=seed)
    model = pyro_scvi.SCVI(adata, batch_key="batch")
    model.train(max_epochs=a.epochs, train_size=0.9, progress_bar=False, seed=seed)
    held = np.sort(model.validation_indices)[: a.held]
    x, b = model.data.tensors(held)
    step = max(1, int(5e6 // adata.n_vars // 100))  # cells per chunk: K x cells x genes bounded
    row = {"dataset": name, "seed": seed, "cells": adata.n_obs, "genes": adata.n_vars,
           "epochs": len(model.history), "held": len(held), "K": a.k_is}  # fmt: skip
    props = {"q": proposals.GuideProposal(), "defensive": proposals.DefensiveProposal(),
             "refined": proposals.RefinedProposal(), "mcmc": proposals.MCMCProposal()}  # fmt: skip
    for key, prop in props.items():
        torch.manual_seed(seed)
        t = time.perf_counter()
        log_w = torch.cat([prop.log_weights(model.model, model.guide, x[i : i + step],
                           b[i : i + step], a.k_is, cell_index=torch.as_tensor(held[i : i + step]))
                           for i in range(0, len(held), step)], 1)  # fmt: skip
        est = ais.log_mean_exp_se(log_w)[0].tolist()
        row[key] = {"k": ais.pareto_k(log_w).tolist(), "est": est,
                    "s_per_cell": (time.perf_counter() - t) / len(held)}  # fmt: skip
    torch.manual_seed(seed)
    t = time.perf_counter()
    out = ais.ais_marginal_ll(
        model.model, model.guide, model.data, held, n_steps=50, batch_size=step
    )
    row["ais"] = {"est": out["marginal_ll"].tolist(), "se": out["se"].tolist(),
                  "s_per_cell": (time.perf_counter() - t) / len(held)}  # fmt: skip
    return row


def table(res: dict) -> str:
    rows = []
    for model_name, runs in res.get("runs", {}).items():
        for name, r in runs.items():
            exact, k = np.asarray(r["exact"]), np.asarray(r["k"])
            is_err = np.asarray(r["is"]) - exact
            for n, a in r["ais"].items():
                err, se = np.asarray(a["est"]) - exact, np.asarray(a["se"])
                rows.append(
                    [model_name, name, len(exact), f"{np.mean(k > 0.7):.2f}",
                     f"{np.mean(np.abs(is_err)):.3f}", f"{np.max(np.abs(is_err)):.3f}", n,
                     f"{np.mean(np.abs(err)):.3f}", f"{np.max(np.abs(err)):.3f}",
                     f"{np.median(se):.3f}", f"{np.max(np.abs(err / se)):.2f}",
                     f"{np.mean(np.abs(err) < 2 * se):.2f}"]
                )  # fmt: skip
    s = res["settings"]
    how = (
        f"IS: {s['k_is']} draws of the proposal per cell; AIS: {s['chains']} chains per cell, "
        "sigmoid schedule, 4 leapfrog steps per transition. Errors are estimate - exact "
        "(nats); |z| = |error| / AIS standard error; 'within 2 se': share of cells."
    )
    cols = "model|proposal|cells:|IS k>0.7:|IS mean abs err:|IS max abs err:|AIS steps:|"
    cols += "AIS mean abs err:|AIS max abs err:|AIS median se:|max abs z:|within 2 se:"
    lines = results.header(res, "log p(x) against the truth: exact vs AIS vs IS", how)
    lines += results.md_table(cols, rows)
    lines += ["", f"Figure: `{STUDY}.png` (errors against IS's Pareto k, AIS with 2 se).", ""]
    rows = []
    for r in sorted(res.get("datasets", {}).values(), key=lambda r: (r["dataset"], r["seed"])):
        gap = [np.asarray(r[p]["est"]) - np.asarray(r["ais"]["est"]) for p in ("q", "mcmc")]
        rows.append([r["dataset"], r["seed"], r["cells"], r["epochs"], r["held"]]
                    + [f"{np.mean(np.asarray(r[p]['k']) > 0.7):.0%}" for p in PROPOSALS]
                    + [f"{g.mean():+.3f} ± {g.std(ddof=1) / len(g) ** 0.5:.3f}" for g in gap]
                    + [f"{r[p]['s_per_cell']:.2f}" for p in (*PROPOSALS, "ais")])  # fmt: skip
    cols = "dataset|seed|cells:|epochs:|held-out cells:|" + "|".join(
        f"k>0.7 {p}:" for p in PROPOSALS
    )
    cols += "|IS(q) - AIS (nats, ± se):|IS(mcmc) - AIS:|" + "|".join(
        f"s/cell {p}:" for p in (*PROPOSALS, "ais")
    )
    how = ("Default model (batch_key='batch'), training capped at the epochs shown, on the cells "
           "shown; k from K = 1000 draws of each proposal; AIS 50 steps, 16 chains; "
           "'± se': over cells. Seconds per cell on 1 thread of a shared machine.")  # fmt: skip
    if rows:
        lines += results.section("Every shared dataset: Pareto k by proposal, IS - AIS", cols,
                                 rows) + ["", how, ""]  # fmt: skip
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(m, n, r) for m, runs in res["runs"].items() for n, r in runs.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (m, n, r) in zip(np.atleast_1d(axes), panels, strict=True):
        exact, k = np.asarray(r["exact"]), np.asarray(r["k"])
        ax.scatter(k, np.asarray(r["is"]) - exact, s=12, c="tab:red", label="IS")
        last = list(r["ais"])[-1]
        a = r["ais"][last]
        ax.errorbar(k, np.asarray(a["est"]) - exact, yerr=2 * np.asarray(a["se"]), fmt="o",
                    ms=3, c="tab:blue", label=f"AIS {last} steps, ±2 se")  # fmt: skip
        ax.axhline(0, c="k", lw=0.5)
        ax.axvline(0.7, c="grey", ls=":", lw=0.8)
        ax.set(title=f"{m}: {n} proposal", xlabel="IS Pareto k", ylabel="estimate - exact (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(a, stem: str, update, argv) -> dict:
    """Merge ``update(earlier results)`` into the results file; runs may be in parallel."""
    import fcntl

    with open(Path(a.out_dir) / f".{stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        res = results.read(Path(a.out_dir) / f"{stem}.json") or {}
        res |= update(res)
        res.setdefault("meta", results.metadata(STUDY, argv))
        res.setdefault("settings", {"k_is": 1000, "chains": 16})
        results.write(Path(a.out_dir), stem, res, table(res))
    return res


def main(argv=None) -> int:
    p, add = results.parser(__doc__, data_dir=False)
    add("--datasets", nargs="+", help="the per-dataset mode, on these datasets")
    add("--seeds", nargs="+", type=int, default=[0])
    add("--cells", type=int, default=1500, help="subsample each dataset to this many cells")
    add("--epochs", type=int, default=40, help="cap on training epochs (early stopping is on)")
    add("--held", type=int, default=40, help="held-out cells scored per dataset (fitted: 100)")
    add("--runs", nargs="+", default=["tiny", "fitted"], help="the validation runs to redo")
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    steps, k_is, chains = ((5,), 50, 4) if a.smoke else ((10, 30, 100), 1000, 16)
    stem = results.stem(STUDY, a.smoke)
    if a.datasets:
        a.k_is = k_is
        for key, n, s in ((f"{n}/{s}", n, s) for n in a.datasets for s in a.seeds):
            row = on_dataset(n, s, a)  # saved as it comes
            save(
                a, stem, lambda old, r={key: row}: {"datasets": old.get("datasets", {}) | r}, argv
            )
        return 0
    res = {
        "meta": results.metadata(STUDY, argv),
        "settings": {"smoke": a.smoke, "k_is": k_is, "chains": chains, "steps": list(steps)},
        "runs": {"tiny": tiny(6 if a.smoke else 40, steps, k_is, chains)}
        if "tiny" in a.runs
        else {},
    }
    if "fitted" in a.runs:
        res["runs"]["fitted"] = fitted(300 if a.smoke else 3000, 2 if a.smoke else 30, steps,
                                       k_is, chains, a.held)  # fmt: skip
    runs = res.pop("runs")  # the runs not redone are kept
    res = save(a, stem, lambda old: res | {"runs": old.get("runs", {}) | runs}, argv)
    figure(res, Path(a.out_dir) / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
