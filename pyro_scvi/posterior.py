"""Posterior queries on a trained model and guide, built on :class:`pyro.infer.Predictive`.

Every query runs over cells in minibatches, so memory stays bounded by
``batch_size x n_samples x n_genes``; networks run in eval mode (batch-norm running
statistics, no dropout), and Pyro's global parameter store is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from .data import CountData
from .infer import _eval_mode


def iterate_cells(
    data: CountData, indices: np.ndarray, batch_size: int, device: torch.device | str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, batch_index)`` tensors for consecutive minibatches of ``indices``."""
    for idx in data.minibatches(indices, batch_size):
        yield data.tensors(idx, device)


def latent_mean(
    guide, data: CountData, indices: np.ndarray, *, batch_size: int = 1024, device="cpu"
) -> np.ndarray:
    """Posterior mean of ``z`` (the encoder's ``z_loc``) for each cell, ``(cells, n_latent)``."""
    out = []
    with torch.no_grad(), _eval_mode(guide):
        for x, b in iterate_cells(data, indices, batch_size, device):
            out.append(guide.encode(x, b)["z_loc"].cpu().numpy())
    return np.concatenate(out)


def sample_guide(
    model, guide, x: torch.Tensor, batch_index: torch.Tensor, n_samples: int
) -> dict[str, torch.Tensor]:
    """``n_samples`` draws of the guide's latent sites for one minibatch of cells.

    Returns ``z`` of shape ``(n_samples, cells, 1, n_latent)`` and, for a latent library,
    ``l`` of shape ``(n_samples, cells, 1)``.
    """
    sites = ["z"] if getattr(model, "use_observed_lib_size", False) else ["z", "l"]
    predictive = Predictive(
        model, guide=guide, num_samples=n_samples, return_sites=sites, parallel=True
    )
    return predictive(x, batch_index)


def decode(
    model,
    samples: dict[str, torch.Tensor],
    x: torch.Tensor,
    batch_index: torch.Tensor,
    sites: Sequence[str] = ("rho",),
) -> dict[str, torch.Tensor]:
    """Run the model at the given latent ``samples`` and return ``sites``.

    Passing another ``batch_index`` than the cells' own decodes them as if they had been
    measured in that batch: the basis of batch-corrected expression.
    """
    n = next(iter(samples.values())).shape[0]
    predictive = Predictive(
        model, posterior_samples=samples, num_samples=n, return_sites=list(sites), parallel=True
    )
    return predictive(x, batch_index)


def sample_posterior(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    n_samples: int = 25,
    sites: Sequence[str] = ("z", "l", "rho", "x"),
    transform_batch: int | None = None,
    batch_size: int = 256,
    device="cpu",
) -> dict[str, np.ndarray]:
    """Posterior and posterior predictive samples for the cells ``indices``.

    ``z`` (and ``l``) are drawn from the guide; ``rho`` and the replicated counts ``x`` are
    then drawn from the model at those draws (``x`` is unconditioned, so it is a new
    sample x~ from p(x | z, l), not the data). With ``transform_batch`` the model decodes
    every cell as if measured in that batch.

    Returns
    -------
    dict
        numpy arrays with a leading sample axis: ``z`` ``(S, cells, n_latent)``, ``l``
        ``(S, cells)``, ``rho`` and ``x`` ``(S, cells, genes)``; only the requested sites.
    """
    unknown = set(sites) - {"z", "l", "rho", "x"}
    if unknown:
        raise ValueError(f"Unknown sites {sorted(unknown)}; choose from z, l, rho, x.")
    out: dict[str, list[np.ndarray]] = {s: [] for s in sites}
    model_sites = [s for s in sites if s in ("rho", "x")]
    with torch.no_grad(), _eval_mode(model, guide), pyro.get_param_store().scope():
        for x, b in iterate_cells(data, indices, batch_size, device):
            latent = sample_guide(model, guide, x, b, n_samples)
            decoded = {}
            if model_sites:
                bb = b if transform_batch is None else torch.full_like(b, transform_batch)
                decoded = decode(poutine.uncondition(model), latent, x, bb, model_sites)
            for s in sites:
                if s in ("z", "l"):
                    if s in latent:
                        out[s].append(latent[s].squeeze(-2 if s == "z" else -1).cpu().numpy())
                else:
                    out[s].append(decoded[s].cpu().numpy())
    return {s: np.concatenate(v, axis=1) for s, v in out.items() if v}


def normalized_expression(
    model,
    guide,
    data: CountData,
    indices: np.ndarray,
    *,
    transform_batch: Sequence[int] | None = None,
    library_size: float | str = 1.0,
    n_samples: int = 1,
    batch_size: int = 256,
    device="cpu",
) -> np.ndarray:
    """Posterior samples of normalized expression, ``(n_samples, cells, genes)``.

    ``rho`` is decoded under each batch code in ``transform_batch`` and averaged over them
    (``None``: each cell's own batch), then scaled to ``library_size`` counts per cell or,
    with ``library_size="latent"``, multiplied by the cell's library ``exp(l)``.
    """
    out = []
    with torch.no_grad(), _eval_mode(model, guide), pyro.get_param_store().scope():
        for x, b in iterate_cells(data, indices, batch_size, device):
            samples = sample_guide(model, guide, x, b, n_samples)
            codes = [None] if transform_batch is None else list(transform_batch)
            rho = 0.0
            for code in codes:
                bb = b if code is None else torch.full_like(b, code)
                rho = rho + decode(model, samples, x, bb)["rho"]
            rho = rho / len(codes)
            if library_size == "latent":
                lib = (
                    x.sum(-1, keepdim=True).expand(rho.shape[:-1] + (1,))
                    if "l" not in samples
                    else samples["l"].exp()
                )
                rho = rho * lib
            else:
                rho = rho * float(library_size)
            out.append(rho.cpu().numpy())
    return np.concatenate(out, axis=1)
