"""Guides ``q(z, l | x, batch)`` of scVI, each with the model's signature.

* :class:`ScviGuide`, the amortized guide of the paper:
  ``q(z | x, s) = Normal(mu_z(x, s), sigma_z(x, s))`` and
  ``q(l | x, s) = Normal(mu_l(x, s), sigma_l(x, s))``, each produced by an encoder network
  on ``log1p(x)`` and the one-hot batch (Lopez et al., 2018). By default ``mu_l`` is the
  cell's observed log library size plus the encoder's output (``library_residual``).
* :class:`PerCellGuide`, non-amortized mean-field inference: free ``loc`` and ``scale``
  parameters of ``q(z_n)`` and ``q(l_n)`` for every cell ``n``, indexed by ``cell_index``.

Both are :class:`Guide` subclasses: a guide implements ``encode(x, batch_index,
cell_index=None)``, returning the Normal parameters of ``q(z)`` (and ``q(l)``) of the given
cells as a :class:`LatentParams` dict, and the base class samples the sites from them with
the model's signature. Posterior queries, :mod:`pyro_scvi.posterior.gap`,
:mod:`pyro_scvi.posterior.mcmc` and query mapping rely on that method only, so a guide of
your own that subclasses :class:`Guide` (or has the same ``encode`` and attributes) works
everywhere these two do. ``amortized`` says whether a guide can score cells it was not fitted to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..data.counts import CountData
from .flows import LOG_SCALE_BOUND, ConditionalAffineAutoregressive
from .generative import cells_plate, register_module
from .nn import Encoder
from .priors import ObservedLibrary, is_latent_library


class LatentParams(TypedDict, total=False):
    """What :meth:`Guide.encode` returns: ``(cells, n_latent)`` and ``(cells, 1)`` tensors.

    ``z_loc`` and ``z_scale`` always; ``l_loc`` and ``l_scale`` when the model has a latent
    library (not :class:`~pyro_scvi.model.priors.ObservedLibrary`).
    """

    z_loc: torch.Tensor
    z_scale: torch.Tensor
    l_loc: torch.Tensor
    l_scale: torch.Tensor


def _sample_latents(
    q: dict[str, torch.Tensor],
    batch_index: torch.Tensor,
    cell_index: torch.Tensor | None,
    num_cells: int | None,
) -> None:
    """The guide's sample sites, from a dict of Normal parameters as ``encode`` returns."""
    with cells_plate(batch_index, cell_index, num_cells):
        # unsqueeze(-2): the singleton gene axis of cell-level sites.
        pyro.sample(
            "z", dist.Normal(q["z_loc"].unsqueeze(-2), q["z_scale"].unsqueeze(-2)).to_event(1)
        )
        if "l_loc" in q:
            pyro.sample("l", dist.Normal(q["l_loc"], q["l_scale"]))


class Guide(nn.Module):
    """Base class of guides: implement :meth:`encode`; calling samples ``z`` (and ``l``).

    Attributes
    ----------
    amortized
        Whether :meth:`encode` answers for any cell's counts (an encoder), rather than
        only for the cells the guide has parameters for.
    static_structure
        Whether the guide has the same sites and shapes on every call, so a compiled
        (JIT) ELBO may hold it; declare it only when it is true.
    n_latent
        Dimension of ``z``.
    parameters_held
        Whether an optimizer holds the guide's parameters, so that calling it skips
        registering them with Pyro (set by :func:`~pyro_scvi.model.parameters_held`).

    Examples
    --------
    A guide whose q(z) is a linear function of the log counts, with a fixed scale:

    >>> import torch, pyro
    >>> class LinearGuide(Guide):
    ...     def __init__(self, n_genes, n_latent):
    ...         super().__init__()
    ...         self.n_latent = n_latent
    ...         self.proj = torch.nn.Linear(n_genes, n_latent)
    ...     def encode(self, x, batch_index, cell_index=None):
    ...         z_loc = self.proj(torch.log1p(x))
    ...         l_loc = torch.log(x.sum(-1, keepdim=True))
    ...         return {"z_loc": z_loc, "z_scale": torch.full_like(z_loc, 0.5),
    ...                 "l_loc": l_loc, "l_scale": torch.full_like(l_loc, 0.1)}
    >>> x = torch.poisson(torch.full((4, 6), 3.0)) + 1
    >>> tr = pyro.poutine.trace(LinearGuide(6, 2)).get_trace(x, torch.zeros(4, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["l"]["value"].shape)
    ((4, 1, 2), (4, 1))
    """

    amortized: bool = True
    static_structure: bool = False
    parameters_held: bool = False
    n_latent: int

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """Normal parameters of ``q(z)`` (and ``q(l)``) for the cells ``x``."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
        num_cells: int | None = None,
    ) -> None:
        """Sample ``z`` and ``l`` for the cells of ``x``.

        The arguments are the model's: see :meth:`pyro_scvi.model.ScviModel.forward`.
        """
        register_module("guide", self)
        q = self.encode(x, batch_index, cell_index)
        _sample_latents(q, batch_index, cell_index, num_cells)


class ScviGuide(Guide):
    """Amortized mean-field guide; call it as the model, :class:`~pyro_scvi.model.ScviModel`.

    Parameters
    ----------
    n_genes, n_batch
        Data dimensions.
    n_latent, n_hidden, n_layers, dropout_rate
        Encoder architecture (paper: 10, 128, 1, 0.1).
    library
        The model's library object; the guide covers ``l`` when it is latent
        (:func:`~pyro_scvi.model.priors.is_latent_library`): ``None`` (the default) or a library
        prior. With :class:`~pyro_scvi.model.priors.ObservedLibrary` there is no ``l`` site.
    l_loc_init
        Initial mean of q(l); :class:`~pyro_scvi.SCVI` passes the data's mean log-library.
        Ignored with ``library_residual``.
    library_residual
        Centre q(l) on each cell's observed log library size (the default): its mean is
        ``log(sum_g x_g)`` plus the encoder's output, so the encoder learns the residual
        (starting at 0) instead of the whole log-library. ``False`` is the paper's
        guide: the encoder's output is the mean. The model and its ELBO are the same
        either way; only the variational family's parametrization differs
        (``benchmarks/results/library_residual.md`` compares the two on every shared dataset).

    Examples
    --------
    >>> import torch, pyro
    >>> g = ScviGuide(20, 1)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> tr = pyro.poutine.trace(g).get_trace(x, torch.zeros(8, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["l"]["value"].shape)
    ((8, 1, 10), (8, 1))
    """

    #: The encoder maps any cell's counts to q, so it scores cells it was not trained on.
    amortized = True
    #: The same sites and shapes on every call: a compiled (JIT) ELBO may hold it.
    static_structure = True
    #: Guides pickled before the option existed had the paper's q(l): they load as such.
    library_residual = False

    def __init__(
        self,
        n_genes: int,
        n_batch: int,
        *,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        library: nn.Module | None = None,
        l_loc_init: float = 0.0,
        library_residual: bool = True,
    ) -> None:
        super().__init__()
        arch = dict(n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout_rate)
        self.n_latent = int(n_latent)
        self.z_encoder = Encoder(n_genes, n_latent, n_batch, **arch)
        latent = is_latent_library(library)
        self.l_encoder = Encoder(n_genes, 1, n_batch, **arch) if latent else None
        self.l_loc_init = float(l_loc_init)
        self.library_residual = bool(library_residual)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start q(l) near the data.

        At ``l_loc_init`` (the prior's mean log-library), or with ``library_residual`` at
        each cell's observed log library (a residual of 0).

        A zero-initialized bias alone would start q(l) near log-library 0, about 7 nats from
        typical data, which costs hundreds of steps before the reconstruction term is
        meaningful.
        """
        if self.l_encoder is not None:
            with torch.no_grad():
                self.l_encoder.loc.bias.fill_(0.0 if self.library_residual else self.l_loc_init)

    def extra_repr(self) -> str:  # noqa: D102
        return "library_residual=True" if self.library_residual else ""

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """Variational parameters ``z_loc``, ``z_scale`` (and ``l_loc``, ``l_scale``).

        ``cell_index`` is accepted for a common signature with :class:`PerCellGuide` and
        ignored: the encoder needs only the counts.
        """
        x_log1p = torch.log1p(x)
        inputs = self.z_encoder.input(x_log1p, batch_index)
        z_loc, z_scale = self.z_encoder(x_log1p, batch_index, inputs=inputs)
        out = {"z_loc": z_loc, "z_scale": z_scale}
        if self.l_encoder is not None:
            l_inputs = self._l_inputs(inputs)
            l_loc, out["l_scale"] = self.l_encoder(x_log1p, batch_index, inputs=l_inputs)
            if self.library_residual:
                # clamp: a cell without counts gets log 1 = 0, as its library's floor
                l_loc = l_loc + torch.log(x.sum(-1, keepdim=True).clamp_min(1.0))
            out["l_loc"] = l_loc
        return out

    def _l_inputs(self, inputs: torch.Tensor) -> torch.Tensor | None:
        # the l encoder takes the z encoder's first-layer input when it takes the same
        # batch input: the counts and one-hot are joined once per call, not twice (a copy
        # of the cells x genes block, a few % of a step on 10,000 genes)
        return inputs if self.l_encoder.n_batch == self.z_encoder.n_batch else None

    def encode_with_hidden(
        self, x: torch.Tensor, batch_index: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """:meth:`encode`'s parameters and the encoders' hidden layers ``h_z`` (and ``h_l``).

        One pass of each encoder (one dropout mask in training), for guides that build
        more on the hidden layers.
        """
        x_log1p = torch.log1p(x)
        inputs = self.z_encoder.input(x_log1p, batch_index)
        h, _ = self.z_encoder.hidden(x_log1p, batch_index, inputs=inputs)
        z_loc, z_scale = self.z_encoder.heads(h)
        out = {"z_loc": z_loc, "z_scale": z_scale, "h_z": h}
        if self.l_encoder is not None:
            h_l, _ = self.l_encoder.hidden(x_log1p, batch_index, inputs=self._l_inputs(inputs))
            l_loc, out["l_scale"] = self.l_encoder.heads(h_l)
            if self.library_residual:
                l_loc = l_loc + torch.log(x.sum(-1, keepdim=True).clamp_min(1.0))
            out["l_loc"], out["h_l"] = l_loc, h_l
        return out


class FullCovarianceGuide(ScviGuide):
    """Amortized guide with a full-covariance Gaussian ``q(z | x, s)``; ``q(l)`` as ScviGuide.

    ``q(z | x, s) = MultivariateNormal(mu_z, L L^T)`` with the Cholesky factor
    ``L = diag(sigma_z) (I + M)``: ``sigma_z > 0`` is :class:`ScviGuide`'s scale head and the
    strictly lower triangle ``M`` a further head on the same hidden layer, started at zero,
    so a new guide is the mean-field one and learns the correlations of ``z``. Its
    :meth:`encode` returns ``z_scale_tril`` beside the marginal ``z_scale``.

    Parameters
    ----------
    n_genes, n_batch, **kwargs
        As :class:`ScviGuide`.

    Examples
    --------
    >>> import torch, pyro
    >>> g = FullCovarianceGuide(20, 1, n_latent=3)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> tr = pyro.poutine.trace(g).get_trace(x, torch.zeros(8, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), type(tr.nodes["z"]["fn"]).__name__
    ((8, 1, 3), 'MultivariateNormal')
    >>> tuple(g.encode(x, torch.zeros(8, dtype=torch.long))["z_scale_tril"].shape)
    (8, 3, 3)
    """

    static_structure = True
    #: TorchScript's optimization passes move the independent draws of ``l`` (and the
    #: encoders' dropout masks) past the draw of ``z`` in a compiled graph, which then
    #: draws other numbers than eager from the same seed: the engine runs its graphs
    #: unoptimized, in eager's order (``tests/test_engine.py``).
    jit_optimize = False
    #: Recorded with a run's engine.
    jit_optimize_reason = (
        "(TorchScript's optimization passes reorder its independent random draws, "
        "so the graph would not draw as eager does)"
    )

    def __init__(self, n_genes: int, n_batch: int, **kwargs) -> None:
        super().__init__(n_genes, n_batch, **kwargs)
        d = self.n_latent
        self.z_tril = nn.Linear(self.z_encoder.loc.in_features, d * d)
        self.reset_parameters()

    @classmethod
    def from_data(
        cls, data: CountData, *, n_latent: int = 10, library: nn.Module | None = None, **kwargs
    ) -> FullCovarianceGuide:
        """The guide for ``data``: ``SCVI(adata, guide=FullCovarianceGuide.from_data)``.

        ``kwargs`` go to the constructor (e.g. ``n_hidden``; bind them with
        ``functools.partial``).
        """
        return cls(data.n_genes, data.n_batch, n_latent=n_latent, library=library, **kwargs)

    def reset_parameters(self) -> None:
        """The mean-field start: ``M = 0``; q(l) as :meth:`ScviGuide.reset_parameters`."""
        super().reset_parameters()
        if hasattr(self, "z_tril"):
            with torch.no_grad():
                self.z_tril.weight.zero_()
                self.z_tril.bias.zero_()

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """:meth:`ScviGuide.encode`, plus the Cholesky factor ``z_scale_tril``.

        ``z_scale_tril`` is ``(cells, n_latent, n_latent)``; ``z_scale`` is then the
        marginal standard deviation (row norms of ``L``).
        """
        out = self.encode_with_hidden(x, batch_index)
        h = out.pop("h_z")
        out.pop("h_l", None)
        d = self.n_latent
        # a d x d head masked to its strict lower triangle (no in-place indexing: a
        # compiled graph holds it)
        m = torch.tril(self.z_tril(h).reshape(-1, d, d), diagonal=-1)
        eye = torch.eye(d, dtype=h.dtype, device=h.device)
        tril = out["z_scale"].unsqueeze(-1) * (eye + m)
        out["z_scale_tril"] = tril
        out["z_scale"] = tril.pow(2).sum(-1).sqrt()
        return out

    def forward(self, x, batch_index, cell_index=None, num_cells=None) -> None:  # noqa: D102
        register_module("guide", self)
        q = self.encode(x, batch_index, cell_index)
        with cells_plate(batch_index, cell_index, num_cells):
            z_dist = dist.MultivariateNormal(
                q["z_loc"].unsqueeze(-2), scale_tril=q["z_scale_tril"].unsqueeze(-3)
            )
            pyro.sample("z", z_dist)
            if "l_loc" in q:
                pyro.sample("l", dist.Normal(q["l_loc"], q["l_scale"]))


class FlowGuide(ScviGuide):
    """Amortized guide whose ``q(z, l | x, s)`` is a conditional normalizing flow.

    ``z = mu_z + sigma_z * f_K(... f_1(eps; h))``, ``eps ~ Normal(0, I)``: the layers ``f_k``
    (default :class:`~pyro_scvi.model.flows.ConditionalAffineAutoregressive`, alternating
    their order) are conditioned on ``h``, the z encoder's hidden layer, and stand between
    a standard Normal and :class:`ScviGuide`'s Gaussian. Then ``l`` is the flow's last,
    affine step over ``(z, l)``, a proper conditional given ``z`` (through ``eps``, the base
    draw behind it) and the l encoder's hidden layer ``h_l``::

        l | z ~ Normal(mu_l + c(h_l) . eps, sigma_l exp(e(h_l) . eps))

    with per-cell coefficients ``c`` and ``e`` (a linear head on ``h_l``). ``c`` correlates
    ``l`` with ``z``, which widens q's marginal of ``l`` beyond the conditional ``sigma_l``
    as the posterior's is, and ``e`` lets ``l``'s spread depend on ``z`` (a non-Gaussian
    marginal). ``eps`` is symmetric about 0, so the shift and the log-stretch average to 0
    for every cell: q's mean of ``l`` is the encoder's ``mu_l``, and no parameter narrows
    ``l``'s spread below the encoder's ``sigma_l`` (an earlier design conditioned on the
    standardized ``z``, whose mean under the flow is not 0, and its 90 % intervals of ``l``
    covered 70 % of the NUTS posterior; ``benchmarks/results/compare_inference.md``).
    Every layer starts as the identity and ``c = e = 0``: a new guide is the mean-field one.

    :meth:`encode` (what the queries that want a Gaussian summary read: the latent mean,
    refinement, NUTS comparisons) returns q's moments from :attr:`N_MOMENT_DRAWS` fixed
    draws, so it is deterministic.

    Parameters
    ----------
    n_genes, n_batch
        Data dimensions.
    n_flows, flow_hidden
        Number of default layers and their hidden units.
    layers
        Your own layers instead: modules with ``transform(context)`` returning a bijective
        :class:`torch.distributions.Transform` on ``n_latent``-vectors (``context``: the
        hidden layer, ``n_hidden`` wide, with a singleton axis before it).
    **kwargs
        As :class:`ScviGuide`.

    Examples
    --------
    >>> import torch, pyro
    >>> g = FlowGuide(20, 1, n_latent=3)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> tr = pyro.poutine.trace(g).get_trace(x, torch.zeros(8, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["l"]["value"].shape)
    ((8, 1, 3), (8, 1))
    >>> sorted(g.encode(x, torch.zeros(8, dtype=torch.long)))
    ['l_loc', 'l_scale', 'z_loc', 'z_scale']
    """

    #: Fixed draws behind :meth:`encode`'s moments.
    N_MOMENT_DRAWS = 256
    static_structure = True
    #: As :class:`FullCovarianceGuide`'s.
    jit_optimize = False
    jit_optimize_reason = FullCovarianceGuide.jit_optimize_reason

    def __init__(
        self,
        n_genes: int,
        n_batch: int,
        *,
        n_flows: int = 2,
        flow_hidden: int = 32,
        layers: list[nn.Module] | None = None,
        **kwargs,
    ) -> None:
        super().__init__(n_genes, n_batch, **kwargs)
        d, hidden = self.n_latent, self.z_encoder.loc.in_features
        if layers is None:
            layers = [
                ConditionalAffineAutoregressive(d, hidden, flow_hidden, reverse=bool(i % 2))
                for i in range(int(n_flows))
            ]
        self.flows = nn.ModuleList(layers)
        self.l_coupling = None
        if self.l_encoder is not None:
            self.l_coupling = nn.Linear(self.l_encoder.loc.in_features, 2 * d)
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("moment_draws", torch.randn(self.N_MOMENT_DRAWS, d, generator=gen))
        self.reset_parameters()

    from_data = classmethod(FullCovarianceGuide.from_data.__func__)

    def reset_parameters(self) -> None:
        """The mean-field start: ``c = e = 0`` (the layers reset themselves)."""
        super().reset_parameters()
        if getattr(self, "l_coupling", None) is not None:
            with torch.no_grad():
                self.l_coupling.weight.zero_()
                self.l_coupling.bias.zero_()

    def z_distribution(self, b: dict[str, torch.Tensor]) -> dist.TransformedDistribution:
        """``q(z | x)`` with batch shape ``(cells, 1)``, as the ``z`` site takes it."""
        loc, scale = b["z_loc"].unsqueeze(-2), b["z_scale"].unsqueeze(-2)
        context = b["h_z"].unsqueeze(-2)
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(scale)).to_event(1)
        steps = [f.transform(context) for f in self.flows]
        # cached: the base draw behind a draw of z is read back without inverting the flow
        steps.append(dist.transforms.AffineTransform(loc, scale, event_dim=1, cache_size=1))
        return dist.TransformedDistribution(base, steps)

    @staticmethod
    def base_draw(z_dist: dist.TransformedDistribution, z: torch.Tensor) -> torch.Tensor:
        """``eps``, the base draw behind ``z`` (cached for a draw of ``z_dist``: no inversion)."""
        for t in reversed(z_dist.transforms):
            z = t.inv(z)
        return z

    def l_distribution(self, b: dict[str, torch.Tensor], eps: torch.Tensor) -> dist.Normal:
        """``q(l | z, x)`` given ``eps``, the base draw behind ``z`` (:meth:`base_draw`).

        ``eps`` is shaped as the ``z`` site; the batch shape is ``(..., cells, 1)``.
        """
        if "l_coupling" not in self._modules:  # a guide pickled by 0.2.0: its own q(l | z)
            return self._l_distribution_0_2(b, eps)
        c, e = self.l_coupling(b["h_l"]).unsqueeze(-2).chunk(2, -1)
        shift, log_stretch = (c * eps).sum(-1), (e * eps).sum(-1)
        # bounded as the flow layers' log-scales, so one far draw of z cannot blow q(l) up
        log_stretch = LOG_SCALE_BOUND * torch.tanh(log_stretch / LOG_SCALE_BOUND)
        return dist.Normal(b["l_loc"] + shift, b["l_scale"] * torch.exp(log_stretch))

    def _l_distribution_0_2(self, b: dict[str, torch.Tensor], eps: torch.Tensor) -> dist.Normal:
        u = self._flow(b, eps)  # its network read u = (z - mu_z) / sigma_z
        h = b["h_l"].unsqueeze(-2)
        out = self.l_net(torch.cat([u, h.expand(u.shape[:-1] + h.shape[-1:])], -1))
        stretch = LOG_SCALE_BOUND * torch.tanh(out[..., 1] / LOG_SCALE_BOUND)
        return dist.Normal(b["l_loc"] + out[..., 0], b["l_scale"] * torch.exp(stretch))

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """Means and standard deviations of q's ``z`` (and ``l``) from fixed draws."""
        b = self.encode_with_hidden(x, batch_index)
        eps = self.moment_draws.to(b["z_loc"].dtype)[:, None, None, :]
        eps = eps.expand(-1, x.shape[0], 1, -1)
        z = b["z_loc"].unsqueeze(-2) + b["z_scale"].unsqueeze(-2) * self._flow(b, eps)
        out = {"z_loc": z.mean(0).squeeze(-2), "z_scale": z.std(0).squeeze(-2)}
        if "h_l" in b:
            q_l = self.l_distribution(b, eps)
            m = q_l.loc.mean(0)
            out["l_loc"] = m
            out["l_scale"] = (q_l.scale.pow(2).mean(0) + q_l.loc.var(0)).sqrt()
        return out

    def forward(self, x, batch_index, cell_index=None, num_cells=None) -> None:  # noqa: D102
        register_module("guide", self)
        b = self.encode_with_hidden(x, batch_index)
        z_dist = self.z_distribution(b)
        with cells_plate(batch_index, cell_index, num_cells):
            z = pyro.sample("z", z_dist)
            if "h_l" in b:
                pyro.sample("l", self.l_distribution(b, self.base_draw(z_dist, z)))

    def _flow(self, b: dict[str, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        """The flow layers applied to base draws ``eps`` (before the affine step)."""
        context = b["h_z"].unsqueeze(-2)
        for f in self.flows:
            eps = f.transform(context)(eps)
        return eps


class PerCellGuide(Guide):
    """Non-amortized mean-field guide: free ``q(z_n)`` and ``q(l_n)`` for each cell ``n``.

    ``q(z_n) = Normal(z_loc[n], z_scale[n])`` and ``q(l_n) = Normal(l_loc[n], l_scale[n])``,
    with ``n`` the cell's row ``cell_index`` in the data the guide was set up for. Called
    with the model's arguments, like :class:`ScviGuide`; during training the minibatch's
    ``cell_index`` picks the rows (without it, ``x`` must hold all ``n_cells`` cells in
    order). It has no parameters for other cells: those need an amortized guide, or
    per-cell parameters of their own fitted with the decoder fixed
    (:func:`pyro_scvi.posterior.gap.refine`).

    Written as a module rather than Pyro's :class:`~pyro.infer.autoguide.AutoNormal`
    (which also subsamples per-cell parameters) because it must scale its ``z`` terms with
    the model's KL warm-up weight, name out-of-range cells in its errors, and start from an
    encoder's output (:meth:`from_guide`).

    Training tip: a cell's parameters move only in the steps whose minibatch holds it, so
    with small minibatches give the guide a higher learning rate, e.g.
    ``optim=pyro.optim.Adam(lambda module, param: {"lr": 1e-2 if module == "guide" else
    1e-3})``, or train full-batch.

    Parameters
    ----------
    n_cells
        Number of cells (rows of parameters).
    n_latent
        Dimension of ``z``.
    library
        The model's library object, as for :class:`ScviGuide`: no ``q(l)`` with
        :class:`~pyro_scvi.model.priors.ObservedLibrary`.
    l_loc_init
        Initial mean of q(l): one value, or one per cell (:meth:`from_data` uses each
        cell's observed log library size).
    init_scale
        Initial standard deviation of q(z) and q(l); q(z) starts centred at 0, as Pyro's
        autoguides do (``init_to_feasible``, ``init_scale=0.1``).

    Examples
    --------
    >>> import torch, pyro
    >>> g = PerCellGuide(100, n_latent=3)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> b, cells = torch.zeros(8, dtype=torch.long), torch.arange(40, 48)
    >>> tr = pyro.poutine.trace(g).get_trace(x, b, cells, 100)
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["l"]["value"].shape)
    ((8, 1, 3), (8, 1))
    >>> g.encode(x, b, cells)["z_scale"][0]
    tensor([0.1000, 0.1000, 0.1000], grad_fn=<SelectBackward0>)
    """

    #: Parameters exist only for the ``n_cells`` cells the guide was set up for.
    amortized = False

    def __init__(
        self,
        n_cells: int,
        n_latent: int = 10,
        *,
        library: nn.Module | None = None,
        l_loc_init: float | np.ndarray | torch.Tensor = 0.0,
        init_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if int(n_cells) < 1 or int(n_latent) < 1:
            raise ValueError(f"n_cells={n_cells}, n_latent={n_latent}; both must be positive.")
        if not init_scale > 0:
            raise ValueError(f"init_scale={init_scale}; it must be positive.")
        self.n_cells, self.n_latent = int(n_cells), int(n_latent)
        self.init_scale = float(init_scale)
        # log-scales: an exact inverse, so q can start exactly at an encoder's output.
        self.z_loc = nn.Parameter(torch.zeros(self.n_cells, self.n_latent))
        self.z_log_scale = nn.Parameter(torch.zeros(self.n_cells, self.n_latent))
        self.l_loc = self.l_log_scale = None
        if is_latent_library(library):
            init = torch.as_tensor(l_loc_init, dtype=torch.float32).reshape(-1, 1)
            if init.shape[0] not in (1, self.n_cells):
                raise ValueError(
                    f"l_loc_init has {init.shape[0]} values for {self.n_cells} cells; pass "
                    "one value or one per cell."
                )
            self.register_buffer("l_loc_init", init.expand(self.n_cells, 1).clone())
            self.l_loc = nn.Parameter(torch.zeros(self.n_cells, 1))
            self.l_log_scale = nn.Parameter(torch.zeros(self.n_cells, 1))
        self.reset_parameters()

    @classmethod
    def from_data(
        cls,
        data: CountData,
        *,
        n_latent: int = 10,
        library: nn.Module | None = None,
        init_scale: float = 0.1,
    ) -> PerCellGuide:
        """A guide for every cell of ``data``, q(l) starting at each observed log library.

        This is the guide factory :class:`~pyro_scvi.SCVI` accepts:
        ``SCVI(adata, guide=PerCellGuide.from_data)``.

        Examples
        --------
        >>> import pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=30, n_genes=10, seed=0)
        >>> g = PerCellGuide.from_data(pyro_scvi.from_anndata(adata), n_latent=2)
        >>> g.n_cells, tuple(g.l_loc.shape)
        (30, (30, 1))
        """
        log_lib = np.log(np.maximum(np.asarray(data.X.sum(axis=1)).ravel(), 1.0))
        return cls(
            data.n_cells,
            n_latent,
            library=library,
            l_loc_init=log_lib,
            init_scale=init_scale,
        )

    @classmethod
    def from_guide(
        cls,
        guide: nn.Module,
        data: CountData,
        indices: np.ndarray,
        *,
        batch_size: int = 1024,
        device: torch.device | str = "cpu",
    ) -> PerCellGuide:
        """A guide for the cells ``indices`` of ``data``, starting exactly at ``guide``'s q.

        ``guide`` (e.g. a trained :class:`ScviGuide`) is run in eval mode, as posterior
        queries run it, so the new guide's ELBO starts at the amortized one. Row ``i`` of
        the result belongs to cell ``indices[i]``.

        Examples
        --------
        >>> import numpy as np, torch, pyro_scvi
        >>> adata = pyro_scvi.datasets.synthetic_zinb(n_cells=30, n_genes=10, seed=0)
        >>> data, enc = pyro_scvi.from_anndata(adata), ScviGuide(10, 1, n_latent=2).eval()
        >>> g = PerCellGuide.from_guide(enc, data, np.array([3, 7]))
        >>> x, b = data.tensors(np.array([3, 7]))
        >>> torch.allclose(g.encode(x, b)["z_scale"], enc.encode(x, b)["z_scale"])
        True
        """
        indices = np.asarray(indices)
        parts: dict[str, list[torch.Tensor]] = {}
        was_training = guide.training
        guide.eval()
        try:
            with torch.no_grad():
                for start in range(0, len(indices), batch_size):
                    idx = indices[start : start + batch_size]
                    x, b = data.tensors(idx, device)
                    q = guide.encode(x, b, torch.as_tensor(idx, device=device))
                    for k, v in q.items():
                        parts.setdefault(k, []).append(v)
        finally:
            guide.train(was_training)
        return cls.from_encoded({k: torch.cat(v) for k, v in parts.items()})

    @classmethod
    def from_encoded(cls, q: dict[str, torch.Tensor]) -> PerCellGuide:
        """A guide whose row ``i`` starts exactly at row ``i`` of an encoder's output.

        ``q`` is what ``guide.encode(x, ...)`` returns: ``z_loc``, ``z_scale`` and, with a
        latent library, ``l_loc``, ``l_scale``. The guide is on ``q``'s device and in its
        precision.

        Examples
        --------
        >>> import torch
        >>> q = ScviGuide(10, 1, n_latent=2).eval().encode(torch.ones(3, 10), torch.zeros(3, 1))
        >>> bool(PerCellGuide.from_encoded(q).z_loc.eq(q["z_loc"]).all())
        True
        """
        z_loc = q["z_loc"]
        library = None if "l_loc" in q else ObservedLibrary()
        new = cls(z_loc.shape[0], z_loc.shape[-1], library=library, init_scale=1.0)
        new = new.to(device=z_loc.device, dtype=z_loc.dtype)
        with torch.no_grad():
            new.z_loc.copy_(z_loc)
            new.z_log_scale.copy_(q["z_scale"].log())
            if new.l_loc is not None:
                new.l_loc.copy_(q["l_loc"])
                new.l_log_scale.copy_(q["l_scale"].log())
                new.l_loc_init.copy_(q["l_loc"])
        return new

    def reset_parameters(self) -> None:
        """q(z) at ``Normal(0, init_scale)``, q(l) at ``Normal(l_loc_init, init_scale)``."""
        with torch.no_grad():
            self.z_loc.zero_()
            self.z_log_scale.fill_(float(np.log(self.init_scale)))
            if self.l_loc is not None:
                self.l_loc.copy_(self.l_loc_init)
                self.l_log_scale.fill_(float(np.log(self.init_scale)))

    def extra_repr(self) -> str:  # noqa: D102
        return f"n_cells={self.n_cells}, n_latent={self.n_latent}"

    def _rows(self, n_given: int, cell_index: torch.Tensor | None) -> torch.Tensor | slice:
        if cell_index is None:
            if n_given != self.n_cells:
                raise ValueError(
                    f"PerCellGuide has parameters for {self.n_cells} cells, found by "
                    f"cell_index; {n_given} cells came without one. Pass cell_index (each "
                    "cell's row in the data the guide was set up for)."
                )
            return slice(None)
        if len(cell_index) and (
            int(cell_index.min()) < 0 or int(cell_index.max()) >= self.n_cells
        ):
            raise ValueError(
                f"cell_index runs from {int(cell_index.min())} to {int(cell_index.max())}, but "
                f"PerCellGuide has parameters for cells 0..{self.n_cells - 1} only. Cells it "
                "was not fitted to need an amortized guide, or their own per-cell parameters "
                "fitted with the decoder fixed (pyro_scvi.posterior.gap.refine)."
            )
        return cell_index

    def encode(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
    ) -> LatentParams:
        """``z_loc``, ``z_scale`` (and ``l_loc``, ``l_scale``) of the cells ``cell_index``."""
        rows = self._rows(x.shape[0], cell_index)
        out = {"z_loc": self.z_loc[rows], "z_scale": self.z_log_scale[rows].exp()}
        if self.l_loc is not None:
            out["l_loc"], out["l_scale"] = self.l_loc[rows], self.l_log_scale[rows].exp()
        return out


#: What :class:`~pyro_scvi.SCVI` accepts as ``guide=``: a guide module, or a factory
#: ``factory(data, n_latent=..., library=...)`` returning one, ``library`` the model's
#: library object (ask it :func:`~pyro_scvi.model.priors.is_latent_library`).
GuideFactory = Callable[..., nn.Module]


def build_guide(
    guide: nn.Module | GuideFactory,
    data: CountData,
    *,
    n_latent: int,
    library: nn.Module | None = None,
) -> nn.Module:
    """Resolve a user's ``guide=`` (module or factory) and check it fits ``data``.

    A factory is called as ``guide(data, n_latent=n_latent, library=library)``, ``library``
    the model's library object (``None``: a latent library).

    Examples
    --------
    >>> import pyro_scvi
    >>> data = pyro_scvi.from_anndata(pyro_scvi.datasets.synthetic_zinb(n_cells=30, seed=0))
    >>> build_guide(PerCellGuide.from_data, data, n_latent=2)
    PerCellGuide(n_cells=30, n_latent=2)
    >>> from pyro_scvi.model.priors import ObservedLibrary
    >>> build_guide(PerCellGuide.from_data, data, n_latent=2, library=ObservedLibrary()).l_loc
    >>> build_guide(PerCellGuide(10, 2), data, n_latent=2)
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: The guide has parameters for 10 cells but the data have 30; ...
    """
    if not isinstance(guide, nn.Module):
        if not callable(guide):
            raise TypeError(
                f"guide={guide!r}: pass a guide module (e.g. PerCellGuide(n_cells, n_latent)) "
                "or a factory such as PerCellGuide.from_data."
            )
        guide = guide(data, n_latent=n_latent, library=library)
        if not isinstance(guide, nn.Module):
            raise TypeError(f"The guide factory returned {type(guide).__name__}, not a Module.")
    n_cells = getattr(guide, "n_cells", None)
    if not getattr(guide, "amortized", True) and n_cells != data.n_cells:
        raise ValueError(
            f"The guide has parameters for {n_cells} cells but the data have "
            f"{data.n_cells}; build it for these cells, e.g. guide=PerCellGuide.from_data."
        )
    if getattr(guide, "n_latent", n_latent) != n_latent:
        raise ValueError(f"The guide has n_latent={guide.n_latent}, the model {n_latent}.")
    return guide
