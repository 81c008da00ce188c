"""scVI's generative model as a Pyro ``model``.

For cell ``n`` in batch ``s_n`` and gene ``g`` (Lopez et al., 2018)::

    z_n      ~ prior()                                  (default Normal(0, I))
    l_n      ~ Normal(library_loc[s_n], library_scale[s_n])   (log library size)
    rho_n    = softmax(f_rho(z_n, s_n))                 (expected frequencies)
    mu_ng    = exp(l_n) * rho_ng
    x_ng     ~ likelihood(mu_ng, theta_g, f_gate(z_n, s_n)_g)   (default ZINB)

``exp(l_n)`` is taken at ``min(l_n, L_MAX)``: float32 overflows above ``e^88.7``, and a
draw of ``l`` that far out (a library of more than ``e^80 = 5.5e34`` counts, where neither
prior nor data put mass) would otherwise make the loss NaN instead of merely very poor.

Plates: ``cells`` (dim -2, subsampled for minibatches so that the minibatch ELBO is an
unbiased estimate of the full-data ELBO) and ``genes`` (dim -1). Cell-level sites therefore
carry a singleton gene axis: ``z`` is ``(cells, 1, n_latent)`` and ``l`` is ``(cells, 1)``.

Sites (public API): ``z``, ``l``, ``rho`` (deterministic) and ``x`` (observed). An
inference scheme may add global sites outside the ``cells`` plate, e.g.
:class:`~pyro_scvi.model.schemes.BayesianDecoder`'s ``rho_weight``, ``rho_bias`` and
``log_theta`` in the ``genes`` plate (see :meth:`ScviModel.set_globals`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import pyro
import torch
from torch import nn

from .likelihoods import ZINB, Likelihood
from .nn import Decoder
from .priors import (
    CallableLibraryPrior,
    LibraryPrior,
    Prior,
    as_prior,
    check_library_prior,
    check_prior,
    is_latent_library,
)

Dispersion = Literal["gene", "gene-batch", "gene-cell"]

#: The largest log library ``exp`` is taken at: ``e^80`` leaves float32 (largest value
#: ``e^88.7``) four orders of magnitude for ``theta + mu`` and the likelihood's products.
L_MAX = 80.0


def cells_plate(
    batch_index: torch.Tensor,
    cell_index: torch.Tensor | None = None,
    num_cells: int | None = None,
) -> pyro.plate:
    """The ``cells`` plate for a minibatch of ``len(batch_index)`` cells.

    With ``num_cells`` the plate is subsampled, so every cell-level log-density is scaled
    by ``num_cells / len(batch_index)``; ``cell_index`` (positions of the minibatch's cells
    in the full data) is passed on for guides with per-cell parameters.
    """
    n = batch_index.shape[0]
    if num_cells is None:
        return pyro.plate("cells", n, subsample=cell_index, dim=-2)
    if cell_index is None:
        cell_index = torch.arange(n, device=batch_index.device)
    return pyro.plate("cells", num_cells, subsample=cell_index, dim=-2)


def register_module(name: str, module: nn.Module) -> None:
    """``pyro.module(name, module)``, unless an optimizer holds ``module``'s parameters.

    Registering sends every parameter through Pyro's effect stack on every call: per-step
    Python work that a training step whose optimizer already holds the parameters can skip.
    Whether it does is the module's own attribute ``parameters_held``, set by
    :func:`parameters_held` (false when absent).
    """
    if not getattr(module, "parameters_held", False):
        pyro.module(name, module)


@contextmanager
def parameters_held(*modules: nn.Module) -> Iterator[None]:
    """Tell ``modules`` that an optimizer holds their parameters in this block.

    Sets each module's ``parameters_held`` attribute, which :func:`register_module` reads,
    and restores it afterwards. For a training step whose optimizer found every parameter
    in a first step that registered them (:class:`~pyro_scvi.train.optim.FusedAdam` with
    ``hold=``). Nothing that reads ``param`` sites from a trace may run inside:
    ``pyro.infer.SVI`` with a Pyro optimizer and the JIT ELBOs, which compile from the
    parameters a trace shows them, do.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> m = ScviModel(5, 1, LogNormalLibrary(torch.tensor([1.0]), torch.tensor([0.5])))
    >>> with parameters_held(m):
    ...     m.parameters_held
    True
    >>> m.parameters_held
    False
    """
    missing = object()
    before = [vars(m).get("parameters_held", missing) for m in modules]
    for m in modules:
        m.parameters_held = True
    try:
        yield
    finally:
        for m, was in zip(modules, before, strict=True):
            if was is missing:
                del m.parameters_held  # back to the class's (or no) attribute
            else:
                m.parameters_held = was


class ScviModel(nn.Module):
    """The generative model ``p(x, z, l | batch)``; call it as a Pyro model.

    Parameters
    ----------
    n_genes, n_batch
        Data dimensions.
    library_prior
        The library ``l``: a :class:`~pyro_scvi.model.priors.LibraryPrior` (e.g.
        ``LogNormalLibrary``, a per-batch prior of the log-library) or a function of the
        cells' batch codes returning a distribution with ``batch_shape (cells, 1)``; or
        :class:`~pyro_scvi.model.priors.ObservedLibrary` to plug in ``log(sum_g x_ng)`` instead
        of a latent variable (no ``l`` site).
    n_latent, n_hidden, n_layers
        Decoder architecture (paper: 10, 128, 1).
    prior
        Prior on ``z`` (default :class:`~pyro_scvi.model.priors.StandardNormal`): a
        :class:`~pyro_scvi.model.priors.Prior`, or any callable returning a Pyro distribution
        with ``event_shape (n_latent,)`` (see :func:`~pyro_scvi.model.priors.as_prior`).
    likelihood
        Observation model (default :class:`~pyro_scvi.model.likelihoods.ZINB`).
    dispersion
        ``"gene"`` (one ``theta`` per gene), ``"gene-batch"`` or ``"gene-cell"`` (decoded).

    Examples
    --------
    >>> import torch, pyro
    >>> from pyro_scvi.model.priors import LogNormalLibrary
    >>> m = ScviModel(20, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> tr = pyro.poutine.trace(m).get_trace(x, torch.zeros(8, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["x"]["value"].shape)
    ((8, 1, 10), (8, 20))

    With the library observed there is no ``l`` site:

    >>> from pyro_scvi.model.priors import ObservedLibrary
    >>> m = ScviModel(20, 1, ObservedLibrary())
    >>> tr = pyro.poutine.trace(m).get_trace(x + 1, torch.zeros(8, dtype=torch.long))
    >>> "l" in tr.nodes, m.use_observed_lib_size
    (False, True)
    """

    #: Whether an optimizer holds the model's parameters, so that calling it skips
    #: registering them with Pyro (set by :func:`parameters_held`).
    parameters_held: bool = False

    def __init__(
        self,
        n_genes: int,
        n_batch: int,
        library_prior: LibraryPrior | Callable,
        *,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        prior: Prior | Callable | None = None,
        likelihood: Likelihood | None = None,
        dispersion: Dispersion = "gene",
    ) -> None:
        super().__init__()
        if dispersion not in ("gene", "gene-batch", "gene-cell"):
            raise ValueError(
                f"dispersion={dispersion!r}; use 'gene', 'gene-batch' or 'gene-cell'."
            )
        if library_prior is None:
            raise ValueError(
                "ScviModel needs library_prior: e.g. LogNormalLibrary(loc, scale) for a latent "
                "library, or ObservedLibrary() for the observed one."
            )
        self.n_genes, self.n_batch, self.n_latent = n_genes, max(n_batch, 1), n_latent
        self.dispersion = dispersion
        self.likelihood = likelihood if likelihood is not None else ZINB()
        self.prior = as_prior(prior)
        if hasattr(self.prior, "setup"):
            self.prior.setup(n_latent)
        check_prior(self.prior, n_latent)
        if not isinstance(library_prior, nn.Module):
            library_prior = CallableLibraryPrior(library_prior)
        if is_latent_library(library_prior):
            check_library_prior(library_prior, self.n_batch)
        self.library_prior = library_prior
        uses_theta = self.likelihood.uses_dispersion
        self.decoder = Decoder(
            n_latent,
            n_genes,
            n_batch,
            n_hidden,
            n_layers,
            gate=self.likelihood.uses_gate,
            cell_dispersion=uses_theta and dispersion == "gene-cell",
            gate_init_logit=self.likelihood.gate_init_logit,
        )
        self.log_theta = None
        if uses_theta and dispersion == "gene":
            self.log_theta = nn.Parameter(torch.zeros(n_genes))
        elif uses_theta and dispersion == "gene-batch":
            self.log_theta = nn.Parameter(torch.zeros(self.n_batch, n_genes))
        #: Global sites with a prior, set by an inference scheme (:meth:`set_globals`).
        self.globals: nn.Module | None = None

    def set_globals(self, globals_module: nn.Module) -> None:
        """Hand the decoder's output layer (and ``theta``) to ``globals_module``'s sample sites.

        ``globals_module(genes_plate)`` samples the global sites and returns their values
        as a dict; ``globals_module.rho_logits(hidden, values)`` maps the decoder's last
        hidden layer to ``rho_logits``; a ``"log_theta"`` value, if returned, replaces the
        ``log_theta`` parameter. The point-estimated parameters it replaces are removed, so
        none is left unused. See :class:`pyro_scvi.model.schemes.BayesianDecoder`, which calls
        this.
        """
        self.globals = globals_module
        self.decoder.rho_logits = None
        if "log_theta" in getattr(globals_module, "sites", ()):
            self.log_theta = None

    @property
    def static_structure(self) -> bool:
        """Whether a compiled (JIT) ELBO may hold this model.

        Its own code is static, so it is when its prior, library prior and likelihood
        declare ``static_structure``.
        """
        parts = [self.prior, self.likelihood, self.library_prior]
        if self.globals is not None:
            parts.append(self.globals)
        return all(getattr(part, "static_structure", False) for part in parts)

    @property
    def use_observed_lib_size(self) -> bool:
        """Whether the library is observed (:class:`~pyro_scvi.model.priors.ObservedLibrary`).

        Read from the library object; kept for code that reads the scvi-tools name.
        """
        return not is_latent_library(self.library_prior)

    def theta(
        self, batch_index: torch.Tensor, decoded: dict, sampled: dict | None = None
    ) -> torch.Tensor | None:
        """Inverse dispersion, broadcastable to ``(cells, genes)``.

        ``sampled``: the values of the global sites (:meth:`set_globals`), if any.
        """
        if not self.likelihood.uses_dispersion:
            return None
        if sampled and "log_theta" in sampled:
            return sampled["log_theta"].exp()
        if self.dispersion == "gene-cell":
            return decoded["log_theta"].exp()
        if self.dispersion == "gene-batch":
            return self.log_theta[batch_index].exp()
        return self.log_theta.exp()

    def batch_norm_pass(
        self,
        guide_trace: pyro.poutine.Trace,
        x: torch.Tensor | None,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
        num_cells: int | None = None,
    ) -> None:
        """Run what the model computes before its batch norms, at the guide's ``z``.

        For a pass that only re-estimates batch norm's statistics
        (:func:`~pyro_scvi.train.passes.refresh_batch_norm`): it gives them exactly what
        replaying the whole model on ``guide_trace`` would, without the rest of the model,
        which uses no batch norm and draws nothing: the output heads, softmax and
        likelihood over cells x genes, most of the pass's cost on 10,000 genes. The
        decoder's body holds the model's batch norm; when another part keeps running
        statistics too (a prior or a scheme's module with a network of its own), the
        whole model is replayed instead.

        Examples
        --------
        >>> import torch, pyro
        >>> from pyro_scvi.model.priors import LogNormalLibrary
        >>> from pyro_scvi.model.guides import ScviGuide
        >>> m = ScviModel(20, 1, LogNormalLibrary(torch.tensor([3.0]), torch.tensor([0.5])))
        >>> x, b = torch.poisson(torch.full((8, 20), 2.0)), torch.zeros(8, dtype=torch.long)
        >>> m.batch_norm_pass(pyro.poutine.trace(ScviGuide(20, 1)).get_trace(x, b), x, b)
        >>> int(m.decoder.body[1].num_batches_tracked)
        1
        """
        body = {id(m) for m in self.decoder.body.modules()}
        # any module that keeps running statistics (batch norm and its kin) counts
        elsewhere = any(
            getattr(m, "track_running_stats", False) and id(m) not in body for m in self.modules()
        )
        if elsewhere:
            pyro.poutine.replay(self, trace=guide_trace)(x, batch_index, cell_index, num_cells)
            return
        self.decoder.hidden(guide_trace.nodes["z"]["value"].squeeze(-2), batch_index)

    def forward(
        self,
        x: torch.Tensor | None,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
        num_cells: int | None = None,
    ) -> None:
        """Run the model on counts ``x`` of shape ``(cells, genes)`` (``None``: sample them).

        ``batch_index`` holds each cell's batch code; ``cell_index`` and ``num_cells``
        subsample the ``cells`` plate (see :func:`cells_plate`). KL warm-up is not the
        model's business: training scales the ``z`` terms with the handler
        :class:`pyro_scvi.train.kl.KLWeight`.
        """
        register_module("model", self)
        # one plate object, entered twice: a second pyro.plate("genes") would clash
        genes = pyro.plate("genes", self.n_genes, dim=-1)
        sampled = self.globals(genes) if self.globals is not None else {}
        with cells_plate(batch_index, cell_index, num_cells):
            z = pyro.sample("z", self.prior())
            if is_latent_library(self.library_prior):
                l = pyro.sample("l", self.library_prior(batch_index))
            else:
                l = self.library_prior.observed(x)
            decoded = self.decoder(z.squeeze(-2), batch_index)
            rho_logits = decoded["rho_logits"]
            if self.globals is not None:
                rho_logits = self.globals.rho_logits(decoded["hidden"], sampled)
            with genes:
                rho = pyro.deterministic("rho", torch.softmax(rho_logits, -1), 0)
                mu = torch.exp(l.clamp(max=L_MAX)) * rho
                theta = self.theta(batch_index, decoded, sampled)
                pyro.sample("x", self.likelihood(mu, theta, decoded["gate_logits"]), obs=x)
