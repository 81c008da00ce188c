"""Inference schemes for the model's global parameters.

By default the decoder and the dispersions ``theta`` are point estimates: parameters
that training maximizes the ELBO over. A scheme object passed as
``SCVI(adata, scheme=...)`` treats some of them as random variables instead.

:class:`BayesianDecoder` puts Normal priors on the decoder's output layer (the weight
``W`` and bias ``b`` with ``rho_logits = h W^T + b`` for the last hidden layer ``h``) and
on ``log theta``, and fits a mean-field Normal posterior over them beside the amortized
``q(z, l | x)``::

    W_g ~ Normal(0, prior_scale I),  b_g ~ Normal(0, prior_scale),
    log theta_g ~ Normal(0, log_theta_scale)                       (each gene g)
    q(W, b, log theta) = prod_g Normal(W_g | m_g, s_g) Normal(b_g | .) Normal(log theta_g | .)

The global sites sit in the ``genes`` plate and outside the subsampled ``cells`` plate, so
a minibatch ELBO counts their KL once while the cells' terms are scaled to the full data.
KL warm-up scales the cells' ``z`` terms only; the globals' KL is always counted in full.

Posterior queries draw the globals from ``q`` once per query and share draw ``s`` across
every minibatch of cells (:func:`pyro_scvi.posterior.shared_globals`), so the replicate
datasets of a posterior predictive check carry the globals' uncertainty. Per-cell fit
statistics (ELBO, marginal log-likelihood) leave the globals' density out: they estimate
``log p(x_n)`` under the posterior predictive ``E_q(globals)[p(x_n | globals)]``.

Training's history: the per-cell ``train_elbo`` and ``validation_elbo`` include the
globals' KL divided by the cells they sum over (all training cells; the validation cells),
so a Bayesian-decoder fit's ``validation_elbo`` sits below a point fit's by about
``KL / n_validation``; compare fits with :meth:`~pyro_scvi.SCVI.get_elbo` or
:meth:`~pyro_scvi.SCVI.get_marginal_ll`, which leave the globals' density out.

The remaining layers of the decoder, the encoder and the library prior stay point
estimates. The sites are ``rho_weight`` ``(genes, n_hidden)``, ``rho_bias`` ``(genes,)``
and, when the likelihood has a per-gene dispersion, ``log_theta`` ``(genes,)``.
"""

from __future__ import annotations

import math
from typing import Protocol

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from .generative import ScviModel, register_module
from .guides import Guide, LatentParams, _sample_latents

#: Key of a sample site's ``infer`` dict marking a global (dataset-level) site.
GLOBAL = "pyro_scvi_global"


def is_global(site: dict) -> bool:
    """Whether a trace node is a global site of an inference scheme (not per cell)."""
    return bool(site.get("infer", {}).get(GLOBAL, False))


def require_point_globals(model: nn.Module, what: str) -> None:
    """Refuse a model with a scheme's global sites where only point estimates are handled.

    ``what`` names the procedure, for the message.
    """
    if getattr(model, "globals", None) is not None:
        raise InputError(
            f"{what} holds the model's parameters fixed and does not draw an inference "
            f"scheme's global sites ({', '.join(model.globals.sites)}); use a model "
            "trained without scheme= (point-estimated decoder and theta)."
        )


class Scheme(Protocol):
    """What ``SCVI(adata, scheme=...)`` accepts.

    ``setup`` runs when the model is set up; ``setup_model`` when a saved model is loaded
    (the scheme is pickled with it, the guide whole), to give the rebuilt model the same
    sites before its parameters are restored.
    """

    def setup(self, model: ScviModel, guide: nn.Module) -> nn.Module:
        """Change ``model`` in place and return the guide to train with it."""

    def setup_model(self, model: ScviModel) -> nn.Module:
        """Change ``model`` in place, as :meth:`setup` does."""


class DecoderGlobals(nn.Module):
    """The model's half of :class:`BayesianDecoder`: the priors of the global sites.

    Calling it samples the sites in the ``genes`` plate and returns their values;
    :meth:`rho_logits` applies the sampled output layer. The priors are fixed (buffers).

    Examples
    --------
    >>> import pyro
    >>> g = DecoderGlobals(5, 3, prior_scale=1.0, log_theta_scale=2.0)
    >>> tr = pyro.poutine.trace(g).get_trace()
    >>> {k: tuple(tr.nodes[k]["value"].shape) for k in g.sites}
    {'rho_weight': (5, 3), 'rho_bias': (5,), 'log_theta': (5,)}
    """

    #: The same sites and shapes on every call.
    static_structure = True

    def __init__(
        self,
        n_genes: int,
        n_hidden: int,
        *,
        prior_scale: float,
        log_theta_scale: float | None,
    ) -> None:
        super().__init__()
        self.n_genes, self.n_hidden = int(n_genes), int(n_hidden)
        self.register_buffer("prior_scale", torch.tensor(float(prior_scale)))
        self.sites: tuple[str, ...] = ("rho_weight", "rho_bias")
        if log_theta_scale is not None:
            self.register_buffer("log_theta_scale", torch.tensor(float(log_theta_scale)))
            self.sites += ("log_theta",)

    def forward(self, genes: pyro.plate | None = None) -> dict[str, torch.Tensor]:
        """Sample the global sites from their priors in the ``genes`` plate (or a new one)."""
        zero = torch.zeros((), device=self.prior_scale.device)
        out = {}
        with genes if genes is not None else pyro.plate("genes", self.n_genes, dim=-1):
            infer = {GLOBAL: True}
            scale = self.prior_scale
            out["rho_weight"] = pyro.sample(
                "rho_weight",
                dist.Normal(zero, scale).expand([self.n_genes, self.n_hidden]).to_event(1),
                infer=infer,
            )
            out["rho_bias"] = pyro.sample(
                "rho_bias", dist.Normal(zero, scale).expand([self.n_genes]), infer=infer
            )
            if "log_theta" in self.sites:
                out["log_theta"] = pyro.sample(
                    "log_theta",
                    dist.Normal(zero, self.log_theta_scale).expand([self.n_genes]),
                    infer=infer,
                )
        return out

    @staticmethod
    def rho_logits(hidden: torch.Tensor, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``hidden W^T + b`` for ``hidden`` ``(..., cells, n_hidden)``.

        ``W`` is ``(genes, n_hidden)``, or ``(draws, 1, genes, n_hidden)`` when the sites
        are drawn in a plate left of the ``cells`` plate (the ``1``); ``b`` likewise.
        """
        w, b = values["rho_weight"], values["rho_bias"]
        if w.dim() == 2:
            return F.linear(hidden, w, b)
        w = w.squeeze(-3)  # the cells plate's singleton
        return torch.matmul(hidden, w.transpose(-1, -2)) + b


class GlobalsGuide(Guide):
    """A latent guide plus a mean-field Normal ``q`` over :class:`DecoderGlobals`' sites.

    ``encode`` and the latent sites ``z`` and ``l`` are ``inner``'s; calling the guide
    also samples the global sites from ``Normal(loc, exp(log_scale))``. Attributes this
    class does not define (e.g. ``z_encoder``) are looked up on ``inner``.

    Parameters
    ----------
    inner
        The guide of the cells' latents (e.g. :class:`~pyro_scvi.model.guides.ScviGuide`).
    globals_module
        The model's :class:`DecoderGlobals` (for the sites and their shapes).
    init_scale
        Starting standard deviation of every global. The means start as a fresh
        ``nn.Linear`` layer does (uniform within ``1 / sqrt(n_hidden)``), ``log_theta``'s
        at 0, as the point-estimate model's.
    optim_eps
        Adam's ``eps`` for ``q``'s ``loc`` and ``log_scale`` (:meth:`optim_groups`; no weight
        decay on them). :func:`~pyro_scvi.train.loop.train_svi` scales the networks' ``eps`` by
        the number of cells (0.01 per cell, as scvi-tools' mean loss); the log-scales'
        gradients are far below that, so with it Adam would barely move them.
    """

    def __init__(
        self,
        inner: nn.Module,
        globals_module: DecoderGlobals,
        *,
        init_scale: float = 0.1,
        optim_eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.inner = inner
        self.sites = tuple(globals_module.sites)
        self.init_scale = float(init_scale)
        self.optim_eps = float(optim_eps)
        shapes = {
            "rho_weight": (globals_module.n_genes, globals_module.n_hidden),
            "rho_bias": (globals_module.n_genes,),
            "log_theta": (globals_module.n_genes,),
        }
        self.n_hidden = globals_module.n_hidden
        self.loc = nn.ParameterDict({s: nn.Parameter(torch.zeros(shapes[s])) for s in self.sites})
        self.log_scale = nn.ParameterDict(
            {s: nn.Parameter(torch.zeros(shapes[s])) for s in self.sites}
        )
        self.reset_parameters()

    # ---- what the rest of the package asks a guide
    @property
    def amortized(self) -> bool:  # noqa: D102
        return bool(getattr(self.inner, "amortized", True))

    @property
    def static_structure(self) -> bool:  # noqa: D102
        return bool(getattr(self.inner, "static_structure", False))

    @property
    def n_latent(self) -> int:  # noqa: D102
        return self.inner.n_latent

    @property
    def annealed_sites(self) -> tuple[str, ...]:  # noqa: D102
        return tuple(getattr(self.inner, "annealed_sites", ("z",)))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("inner", "loc", "log_scale"):
                raise
            return getattr(super().__getattr__("inner"), name)

    def optim_groups(self) -> list[dict]:
        """``q``'s parameters, which need Adam settings of their own (see ``optim_eps``).

        Read by :func:`~pyro_scvi.train.optim.declared_optim_groups`: unscaled ``eps``, no weight
        decay (the priors regularize the globals; decay would pull the log-scales to 0).
        """
        return [
            {
                "params": [*self.loc.values(), *self.log_scale.values()],
                "eps": self.optim_eps,
                "weight_decay": 0.0,
                "reason": (
                    f"q of the decoder's globals: eps {self.optim_eps:g}, unscaled (their "
                    "gradients are far below the cell-scaled eps), no weight decay"
                ),
            }
        ]

    def reset_parameters(self) -> None:
        """Fresh starting means (see ``init_scale``); standard deviations ``init_scale``."""
        bound = 1.0 / math.sqrt(self.n_hidden)
        with torch.no_grad():
            for site in self.sites:
                if site == "log_theta":
                    self.loc[site].zero_()
                else:
                    self.loc[site].uniform_(-bound, bound)
                self.log_scale[site].fill_(math.log(self.init_scale))

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """``inner``'s ``q(z)`` (and ``q(l)``) parameters."""
        return self.inner.encode(x, batch_index, cell_index)

    def posterior(self, site: str) -> dist.Normal:
        """``q`` of one global site, batch shape the site's shape."""
        return dist.Normal(self.loc[site], self.log_scale[site].exp())

    def _sample_globals(self) -> dict[str, torch.Tensor]:
        out = {}
        n_genes = self.loc[self.sites[0]].shape[0]
        with pyro.plate("genes", n_genes, dim=-1):
            for site in self.sites:
                q = self.posterior(site)
                if site == "rho_weight":
                    q = q.to_event(1)
                out[site] = pyro.sample(site, q, infer={GLOBAL: True})
        return out

    def sample_globals(self, n_samples: int) -> dict[str, torch.Tensor]:
        """``n_samples`` draws of every global site, shaped as a plate at dim -3 gives them.

        ``rho_weight`` ``(n_samples, 1, genes, n_hidden)``, the others
        ``(n_samples, 1, genes)``: the layout the model's sites have under the draws
        plate of a posterior query.
        """
        with pyro.plate("_global_draws", int(n_samples), dim=-3):
            tr = poutine.trace(self._sample_globals).get_trace()
        return {site: tr.nodes[site]["value"] for site in self.sites}

    def forward(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
        num_cells: int | None = None,
    ) -> None:
        """Sample the global sites, then ``z`` and ``l`` from ``inner``'s ``encode``."""
        register_module("guide", self)
        self._sample_globals()
        q = self.inner.encode(x, batch_index, cell_index)
        _sample_latents(q, batch_index, cell_index, num_cells)


class BayesianDecoder:
    """Inference scheme: a prior and a Normal posterior for the decoder's output layer and θ.

    Pass it as ``SCVI(adata, scheme=BayesianDecoder())``. See the module docstring for
    the model and the guide; the fit is then an ELBO over ``q(W, b, log θ) q(z, l | x)``.

    Parameters
    ----------
    prior_scale
        Standard deviation of the Normal(0, ·) prior of each output-layer weight and bias.
    log_theta_scale
        Standard deviation of the Normal(0, ·) prior of each gene's ``log theta`` (1.0:
        theta's prior median 1, 95 % within [0.14, 7.1]).
    init_scale
        Starting posterior standard deviation of every global (0.1, as Pyro's autoguides).
        Start wide: the default Adam's ``eps`` is scaled to the number of cells (see
        :func:`~pyro_scvi.train.loop.train_svi`), and the entropy's pull on a log-scale is
        O(1), so a scale grows very slowly, while a too-wide scale meets a data gradient
        that grows with the cells and shrinks fast. (Measured on PBMC, 400 epochs: from
        0.01 the scales ended at 0.013.)

    Examples
    --------
    >>> import pyro_scvi
    >>> from pyro_scvi.model.schemes import BayesianDecoder
    >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=12, seed=0)
    >>> m = pyro_scvi.SCVI(adata, n_latent=2, n_hidden=8, scheme=BayesianDecoder())
    >>> m = m.train(max_epochs=2, progress_bar=False)
    >>> sorted(m.guide.sites), tuple(m.guide.posterior("rho_weight").loc.shape)
    (['log_theta', 'rho_bias', 'rho_weight'], (12, 8))
    """

    def __init__(
        self, prior_scale: float = 1.0, log_theta_scale: float = 1.0, init_scale: float = 0.1
    ) -> None:
        for name, value in (
            ("prior_scale", prior_scale),
            ("log_theta_scale", log_theta_scale),
            ("init_scale", init_scale),
        ):
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}={value!r}; it must be a positive number.")
        self.prior_scale = float(prior_scale)
        self.log_theta_scale = float(log_theta_scale)
        self.init_scale = float(init_scale)

    def __repr__(self) -> str:
        return (
            f"BayesianDecoder(prior_scale={self.prior_scale}, "
            f"log_theta_scale={self.log_theta_scale}, init_scale={self.init_scale})"
        )

    def setup_model(self, model: ScviModel) -> DecoderGlobals:
        """Give ``model`` the global sites (in place) and return its :class:`DecoderGlobals`."""
        if not isinstance(model, ScviModel):
            raise TypeError(f"BayesianDecoder needs a ScviModel, not {type(model).__name__}.")
        if model.likelihood.uses_dispersion and model.dispersion != "gene":
            raise ValueError(
                f"BayesianDecoder puts a prior on one theta per gene; dispersion="
                f"{model.dispersion!r} is not supported. Use dispersion='gene'."
            )
        if model.globals is not None:
            raise ValueError("The model already has global sites from another scheme.")
        layer = model.decoder.rho_logits
        n_genes, n_hidden = layer.weight.shape
        globals_module = DecoderGlobals(
            n_genes,
            n_hidden,
            prior_scale=self.prior_scale,
            log_theta_scale=self.log_theta_scale if model.log_theta is not None else None,
        ).to(layer.weight.device)
        model.set_globals(globals_module)
        return globals_module

    def setup(self, model: ScviModel, guide: nn.Module) -> GlobalsGuide:
        """Change ``model`` in place and return the guide: ``guide`` plus ``q`` of the globals."""
        globals_module = self.setup_model(model)
        device = globals_module.prior_scale.device
        return GlobalsGuide(guide, globals_module, init_scale=self.init_scale).to(device)
