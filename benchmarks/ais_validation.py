"""The log p(x) yardsticks against the truth: exact (quadrature) vs AIS vs IS.

scVI with ``n_latent=1`` trained on pbmc8k_200hvg, so that ``log p(x)`` is exact by
quadrature over ``z`` and the latent library ``l``
(:func:`pyro_scvi.posterior.ais.quadrature_log_px`), with its amortized guide: on its
held-out cells (``amortized``) and on counts simulated from it (``simulated``, z and l from
the priors). Each: IS with ``K`` draws of q and of ``MCMCProposal`` (estimate, Pareto
``k``), AIS at several numbers of steps (estimate, standard error, z-score against the
truth). The ``tiny`` rows (a random 8-gene decoder, proposals at the posterior's moments and
3 sds off, 3 times too narrow) are kept from the run at commit 5036e5b
(``git show 5036e5b:benchmarks/ais_validation.py``); tests/test_ais.py checks that model.

``--datasets``: per shared dataset, a default model (``--cells`` subsampled, ``--epochs``
capping training) and ``--held`` held-out cells: the share with ``k > 0.7`` at ``K = 1000``
for each proposal of :mod:`pyro_scvi.posterior.proposals` (``laplace``: ``LaplaceProposal``
with one adaptive round, the earlier default; ``laplace2``: two), and IS - AIS (16 chains,
``--ais-steps``, 0: k only). Rows and runs not redone (``--runs``) are kept in the results.

    python -m benchmarks.ais_validation            # about 5 minutes on 2 busy cores
    python -m benchmarks.ais_validation --datasets pbmc8k_200hvg zeisel_cortex_subset_1464x1000
    python -m benchmarks.ais_validation --smoke
"""

from __future__ import annotations

import fcntl
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import pyro_scvi
from pyro_scvi.posterior import ais, proposals

from .lib import data, results

STUDY = "ais_validation"
P = proposals
PROPOSALS = {"q": P.GuideProposal, "defensive": P.DefensiveProposal, "refined": P.RefinedProposal,
             "mcmc": P.MCMCProposal, "laplace": lambda: P.LaplaceProposal(adapt_rounds=1),
             "laplace2": lambda: P.LaplaceProposal(adapt_rounds=2)}  # fmt: skip
GAP = ("q", "mcmc", "laplace", "laplace2")  # the IS - AIS columns


def score(model, guide, x, b, exact, steps, k_is, chains, seed=0):
    cells, out = torch.arange(len(x)), {"exact": exact.tolist(), "ais": {}}
    for key, prop in (("", proposals.GuideProposal()), ("mcmc_", proposals.MCMCProposal())):
        torch.manual_seed(seed)
        log_w = weights(prop, model, guide, x, b, cells, k_is, 25)
        out[key + "is"] = ais.log_mean_exp_se(log_w)[0].tolist()
        out[key + "k"] = ais.pareto_k(log_w).tolist()
    for n in steps:
        torch.manual_seed(seed)
        a = ais.ais_log_weights(model, guide, x, b, cell_index=cells, n_chains=chains, n_steps=n)
        e, se, _ = ais.log_mean_exp_se(a["log_w"])
        out["ais"][str(n)] = {"est": e.tolist(), "se": se.tolist()}
    return out


def weights(prop, model, guide, x, b, cells, k: int, step: int) -> torch.Tensor:
    """``prop``'s ``(k, cells)`` log weights, ``step`` cells at a time."""
    return torch.cat([prop.log_weights(model, guide, x[c], b[c], k, cell_index=cells[c]) for c in
                      (slice(i, i + step) for i in range(0, len(x), step))], 1)  # fmt: skip


def simulate(model, z, l, b):
    """Counts from the model's decoder and likelihood at ``z``, ``l``."""
    with torch.no_grad():
        out = model.decoder(z, b)
        mu = torch.exp(l) * torch.softmax(out["rho_logits"], -1)
        return model.likelihood(mu, model.theta(b, out), out["gate_logits"]).sample()


def fitted(n_cells: int, epochs: int, steps, k_is, chains, n_held: int, names) -> dict:
    adata = data.load("pbmc8k_200hvg", subsample=n_cells, seed=0)
    fit = pyro_scvi.SCVI(adata, n_latent=1)
    fit.train(max_epochs=epochs, train_size=0.9, progress_bar=False, seed=0)
    m, held = fit.model, np.sort(fit.validation_indices)[:n_held]
    x, b = fit.data.tensors(held)
    with torch.no_grad():  # cells drawn from the fitted model itself: z and l from the priors
        z, l = m.prior().sample((len(held),)).reshape(-1, 1), m.library_prior(b).sample()
    out, sims = {}, {"amortized": x, "simulated": simulate(m, z, l.reshape(-1, 1), b)}
    for name, xs in ((n, sims[n]) for n in names):
        loglib = torch.log(xs.sum(-1, keepdim=True).clamp_min(1))
        ls = loglib + torch.linspace(-3.0, 3.0, 241)  # a grid per cell around its library,
        # then one on +-10 posterior sds around the posterior mean (refine)
        truth = ais.quadrature_log_px(m, xs, b, torch.linspace(-8, 8, 401), ls, refine=10)
        out[name] = score(m, fit.guide, xs, b, truth["log_px"].numpy(), steps, k_is, chains)
        out[name]["l_offset_max"] = float((truth["mean"][:, 1:] - loglib).abs().max())
        out[name]["z_posterior_sd_min"] = float(truth["sd"][:, 0].min())
    return out


def on_dataset(name: str, seed: int, a) -> dict:
    adata = data.load(name, subsample=a.cells, seed=seed)
    model = pyro_scvi.SCVI(adata, batch_key="batch")
    model.train(max_epochs=a.epochs, train_size=0.9, progress_bar=False, seed=seed)
    held = np.sort(model.validation_indices)[a.skip : a.skip + a.held]
    x, b, cells = *model.data.tensors(held), torch.as_tensor(held)
    step = max(1, int(5e4 // adata.n_vars))  # cells per chunk: K x cells x genes bounded
    row = {"dataset": name, "seed": seed, "cells": adata.n_obs, "genes": adata.n_vars, "K": a.k_is,
           "epochs": len(model.history), "held": len(held), "held_ids": held.tolist()}  # fmt: skip
    for key in a.proposals:
        torch.manual_seed(seed)
        prop, t = PROPOSALS[key](), time.perf_counter()
        log_w = weights(prop, model.model, model.guide, x, b, cells, a.k_is, step)
        est = ais.log_mean_exp_se(log_w)[0].tolist()
        row[key] = {"k": ais.pareto_k(log_w).tolist(), "est": est, "settings": prop.settings(),
                    "s_per_cell": (time.perf_counter() - t) / len(held)}  # fmt: skip
    if a.ais_steps:  # k needs only the importance weights: --ais-steps 0 skips AIS
        torch.manual_seed(seed)
        t, m, n = time.perf_counter(), model, a.ais_steps
        out = ais.ais_marginal_ll(m.model, m.guide, m.data, held, n_steps=n, batch_size=step)
        row["ais"] = {"est": out["marginal_ll"].tolist(), "se": out["se"].tolist(),
                      "s_per_cell": (time.perf_counter() - t) / len(held)}  # fmt: skip
    return row


def table(res: dict) -> str:
    rows = []
    for model_name, runs in res.get("runs", {}).items():
        for name, r in runs.items():
            exact, k, mk = (np.asarray(r.get(c, np.nan)) for c in ("exact", "k", "mcmc_k"))
            is_err, mcmc_err = (np.asarray(r.get(c, np.nan)) - exact for c in ("is", "mcmc_is"))
            for n, a in r["ais"].items():
                err, se = np.asarray(a["est"]) - exact, np.asarray(a["se"])
                rows.append(
                    [model_name, name, len(exact), f"{np.mean(k > 0.7):.2f}",
                     f"{np.mean(np.abs(is_err)):.3f}", f"{np.max(np.abs(is_err)):.3f}",
                     *([f"{np.mean(mk > 0.7):.2f}", f"{np.mean(np.abs(mcmc_err)):.3f}"]
                       if "mcmc_k" in r else ["-", "-"]), n,
                     f"{np.mean(np.abs(err)):.3f}", f"{np.max(np.abs(err)):.3f}",
                     f"{np.median(se):.3f}", f"{np.max(np.abs(err / se)):.2f}",
                     f"{np.mean(np.abs(err) < 2 * se):.2f}"]
                )  # fmt: skip
    s = res["settings"]
    how = (
        f"IS: {s['k_is']} draws of the proposal per cell (q, or MCMCProposal's defaults: '-' "
        f"where not run); AIS: {s['chains']} chains per cell, sigmoid schedule, 4 leapfrog "
        "steps per transition. Errors are estimate - exact (nats); |z| = |error| / AIS "
        "standard error; 'within 2 se': share of cells."
    )
    cols = "model|proposal|cells:|IS k>0.7:|IS mean abs err:|IS max abs err:|mcmc IS k>0.7:|"
    cols += "mcmc IS mean abs err:|AIS steps:|AIS mean abs err:|AIS max abs err:|AIS median se:"
    lines = results.header(res, "log p(x) against the truth: exact vs AIS vs IS", how)
    lines += results.md_table(cols + "|max abs z:|within 2 se:", rows)
    lines.append("")
    for m, runs in res.get("runs", {}).items():  # the run that made each, where kept
        made = [(n, r["from_run"]) for n, r in runs.items() if r.get("from_run")]
        for n, v in made:
            lines.append(f"- {m}/{n}: `{v['command']}` at commit {v['commit']}, {v['date']}")
    lines += ["", f"Figure: `{STUDY}.png` (errors against IS's Pareto k, AIS with 2 se).", ""]
    rows = []
    for r in sorted(res.get("datasets", {}).values(), key=lambda r: (r["dataset"], r["seed"])):
        r = {p: {"k": [], "est": np.nan, "s_per_cell": np.nan} for p in (*PROPOSALS, "ais")} | r
        gap = [np.atleast_1d(np.asarray(r[p]["est"]) - r["ais"]["est"]) for p in GAP]
        rows.append([r["dataset"], r["seed"], r["cells"], r["epochs"], r["held"]]
                    + [f"{np.mean(np.asarray(r[p]['k']) > 0.7):.0%}" for p in PROPOSALS]
                    + [f"{g.mean():+.3f} ± {g.std(ddof=1) / len(g) ** 0.5:.3f}" for g in gap]
                    + [f"{r[p]['s_per_cell']:.2f}" for p in (*PROPOSALS, "ais")])  # fmt: skip
    cols = ["dataset", "seed", "cells:", "epochs:", "held-out cells:"]
    cols += [f"k>0.7 {p}:" for p in PROPOSALS] + ["IS(q) - AIS (nats, ± se):"]
    cols += [f"IS({p}) - AIS:" for p in GAP[1:]] + [f"s/cell {p}:" for p in (*PROPOSALS, "ais")]
    how = ("Default model (batch_key='batch'), training capped at the epochs shown; k from K = "
           "1000 draws per proposal; AIS 50 steps, 16 chains; '± se': over cells.")  # fmt: skip
    if rows:
        lines += results.section("Every shared dataset: Pareto k by proposal, IS - AIS", cols,
                                 rows) + ["", how, ""]  # fmt: skip
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = [(m, n, r) for m, runs in res["runs"].items() for n, r in runs.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (m, n, r) in zip(np.atleast_1d(axes), panels, strict=True):
        exact, k, last = np.asarray(r["exact"]), np.asarray(r["k"]), list(r["ais"])[-1]
        a = {key: np.asarray(v) for key, v in r["ais"][last].items()}
        ax.scatter(k, np.asarray(r["is"]) - exact, s=12, c="tab:red", label="IS")
        ax.errorbar(k, a["est"] - exact, 2 * a["se"], fmt="o", ms=3, c="tab:blue",
                    label=f"AIS {last} steps, ±2 se")  # fmt: skip
        ax.axhline(0, c="k", lw=0.5)
        ax.axvline(0.7, c="grey", ls=":", lw=0.8)
        ax.set(title=f"{m}: {n} proposal", xlabel="IS Pareto k", ylabel="estimate - exact (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def save(a, stem: str, update, argv) -> dict:
    """Merge ``update(earlier results)`` into the results file; runs may be in parallel."""
    with open(Path(tempfile.gettempdir()) / f"pyro_scvi_{stem}.lock", "w") as lock:
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
    add("--skip", type=int, default=0, help="per dataset: leave out the first held-out cells")
    add("--ais-steps", type=int, default=50, help="AIS steps per cell (0: IS and k only)")
    add("--proposals", nargs="+", default=list(PROPOSALS), choices=list(PROPOSALS))
    add("--runs", nargs="+", default=["fitted"], help="fitted (both), amortized or simulated")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    steps, a.k_is, chains = ((5,), 50, 4) if a.smoke else ((10, 30, 100), 1000, 16)
    stem = results.stem(STUDY, a.smoke)
    if a.datasets:
        for key, n, s in ((f"{n}/{s}" + f"/{a.skip}" * (a.skip > 0), n, s) for n in a.datasets
                          for s in a.seeds):  # fmt: skip
            row = on_dataset(n, s, a)  # saved as it comes
            merge = lambda old, r={key: row}: {"datasets": old.get("datasets", {}) | r}  # noqa: E731
            save(a, stem, merge, argv)
        return 0
    res = {"meta": results.metadata(STUDY, argv), "settings": {"smoke": a.smoke, "k_is": a.k_is}}
    res["settings"] |= {"chains": chains, "steps": list(steps)}
    names = [n for n in ("amortized", "simulated") if n in a.runs or "fitted" in a.runs]
    cells, epochs = (300, 2) if a.smoke else (3000, 30)
    runs = fitted(cells, epochs, steps, a.k_is, chains, a.held, names)
    runs = {n: r | {"from_run": results.provenance(res)} for n, r in runs.items()}

    def merge(old: dict) -> dict:  # the runs and parts not redone are kept
        kept = old.get("runs", {})
        return res | {"runs": kept | {"fitted": kept.get("fitted", {}) | runs}}

    res = save(a, stem, merge, argv)
    figure(res, Path(a.out_dir) / f"{stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
