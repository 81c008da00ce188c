"""Priors of the model's latent variables, as objects passed to the model.

Prior on ``z``
--------------
A prior on ``z`` is a :class:`torch.nn.Module` whose ``forward()`` returns a Pyro
distribution with ``event_shape == (n_latent,)`` and an empty ``batch_shape``; the model
samples it inside the ``cells`` plate, which adds the cell dimension. :meth:`Prior.setup` is
called with the latent dimension when the model is built: learnable priors create their
``nn.Parameter`` s there, so they are trained with everything else (the model registers them
with ``pyro.module``) and saved with the model. Shipped:

- :class:`StandardNormal`: ``Normal(0, I)``, the prior of the scVI paper (the default);
- :class:`MixtureOfGaussians`: a learnable mixture of diagonal Gaussians;
- :class:`VampPrior`: a mixture of the guide's own ``q(z | u_k)`` over learnable
  pseudo-inputs ``u_k`` (Tomczak & Welling, 2018);
- :class:`CallablePrior`: wraps any function returning a Pyro distribution (see
  :func:`as_prior`), for fixed priors such as a Laplace.

Prior on the log-library ``l``
------------------------------
Per batch: :class:`LogNormalLibrary` is ``l ~ Normal(loc[batch], scale[batch])`` with ``loc``
and ``scale`` the mean and standard deviation of the log total counts of each batch's cells
(Lopez et al., 2018). Any :class:`LibraryPrior` (a module called with the cells' batch codes,
returning a distribution with ``batch_shape (cells, 1)``) replaces it; see
:func:`as_library_prior`. :class:`ObservedLibrary` makes ``l`` observed instead, the log of
each cell's total count (scvi-tools' ``use_observed_lib_size=True``): the model then has no
``l`` site and the guide none to cover. The model and the guides ask the library object
(:attr:`LibraryPrior.latent`, :func:`is_latent_library`) which of the two it is.

References
----------
Tomczak, J. & Welling, M. VAE with a VampPrior. AISTATS (2018).
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
from torch import nn


class Prior(nn.Module):
    """Base class of priors on ``z``.

    Subclasses implement :meth:`forward`; :meth:`setup` is called once with the latent
    dimension before training, and is where a learnable prior creates its parameters.
    """

    n_latent: int | None = None
    #: Whether every call builds the same distribution structure (shapes, Python control
    #: flow) given parameters of fixed shape, so that a compiled (JIT) ELBO may hold it.
    #: A subclass that knows this sets it to True; the training engine then may compile.
    static_structure: bool = False

    def setup(self, n_latent: int) -> None:
        """Fix the latent dimension; learnable priors create their parameters here."""
        self.n_latent = int(n_latent)

    def forward(self) -> dist.TorchDistribution:
        """The distribution of one cell's ``z``: ``event_shape (n_latent,)``, no batch shape.

        Called with no arguments; the model samples each cell's ``z`` from it inside the
        ``cells`` plate, which adds the cell dimension.
        """
        raise NotImplementedError

    def _require_setup(self) -> int:
        if self.n_latent is None:
            raise RuntimeError(
                f"Call {type(self).__name__}.setup(n_latent) before sampling from it "
                "(ScviModel does this when it is built)."
            )
        return self.n_latent


class StandardNormal(Prior):
    """``z ~ Normal(0, I)``, the prior of the scVI paper.

    Examples
    --------
    >>> p = StandardNormal()
    >>> p.setup(10)
    >>> tuple(p().event_shape)
    (10,)
    """

    static_structure = True

    def __init__(self) -> None:
        super().__init__()
        # A buffer, not a constant, so that ``.to(device)`` moves the prior with the model.
        self.register_buffer("_zero", torch.zeros(()))

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        loc = self._zero.expand(self._require_setup())
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def __repr__(self) -> str:
        return "StandardNormal()"


class MixtureOfGaussians(Prior):
    """Learnable mixture ``z ~ sum_k pi_k Normal(m_k, diag(s_k**2))``.

    Weights (as logits), means and per-dimension log-scales are ``nn.Parameter`` s, fitted
    with the networks by maximizing the ELBO (empirical Bayes). The KL term then pulls each
    cell's ``q(z | x)`` towards a component, so cell types tend to occupy components;
    :meth:`responsibilities` reads off the assignments.

    Parameters
    ----------
    n_components
        Number of mixture components ``K``.
    init_spread
        Standard deviation of the random initial means. Spread-out means (``N(0, spread**2)``
        per coordinate, unit scales) keep the components from starting on top of each other,
        where they would receive the same gradients and never separate.

    Examples
    --------
    >>> import torch
    >>> p = MixtureOfGaussians(n_components=4)
    >>> p.setup(3)
    >>> d = p()
    >>> tuple(d.batch_shape), tuple(d.event_shape)
    ((), (3,))
    >>> tuple(p.responsibilities(torch.zeros(5, 3)).shape)
    (5, 4)
    """

    static_structure = True

    def __init__(self, n_components: int = 10, *, init_spread: float = 2.0) -> None:
        super().__init__()
        if int(n_components) < 1:
            raise ValueError(f"n_components={n_components}; it must be a positive integer.")
        self.n_components = int(n_components)
        self.init_spread = float(init_spread)

    def setup(self, n_latent: int) -> None:  # noqa: D102
        if self.n_latent == int(n_latent) and hasattr(self, "loc"):
            return  # already set up (e.g. a loaded model): keep the learned values
        super().setup(n_latent)
        k = self.n_components
        self.logits = nn.Parameter(torch.zeros(k))
        self.loc = nn.Parameter(torch.zeros(k, self.n_latent))
        self.log_scale = nn.Parameter(torch.zeros(k, self.n_latent))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Equal weights, unit scales and random spread-out means (torch's global RNG)."""
        if not hasattr(self, "loc"):
            return
        with torch.no_grad():
            self.logits.zero_()
            self.log_scale.zero_()
            self.loc.normal_(0.0, self.init_spread)

    def _components(self) -> dist.TorchDistribution:
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        self._require_setup()
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), self._components())

    def responsibilities(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities ``p(k | z)``, shape ``(..., n_components)``."""
        self._require_setup()
        log_joint = self._components().log_prob(z.unsqueeze(-2)) + torch.log_softmax(
            self.logits, -1
        )
        return torch.softmax(log_joint, -1)

    def __repr__(self) -> str:
        return f"MixtureOfGaussians(n_components={self.n_components})"


class VampPrior(Prior):
    """VampPrior: ``p(z) = (1/K) sum_k q(z | u_k, s_k)`` (Tomczak & Welling, 2018).

    The components are the guide's own ``z`` posterior at ``K`` learnable pseudo-inputs
    ``u_k`` (in the encoder's input space, ``log1p`` counts) with batch codes ``s_k``. The
    prior therefore needs the guide's ``z`` encoder, which it uses but does not own: the
    encoder's parameters stay the guide's (registered and saved once, under the guide),
    and gradients of the prior term reach them. :class:`~pyro_scvi.SCVI` wires it up in its
    constructor (and again in :meth:`~pyro_scvi.SCVI.load`): it calls :meth:`attach_encoder`
    with ``guide.z_encoder``, initializes the pseudo-inputs at the ``log1p`` counts of
    ``K`` random cells and gives each the batch of its cell. With
    :class:`~pyro_scvi.ScviModel` directly, call :meth:`attach_encoder` before running the
    model (the model's shape check of the prior waits for it).

    The pseudo-inputs pass through the encoder in eval mode (batch norm with its running
    statistics, no dropout): they then neither depend on the minibatch nor leak into the
    running statistics of the cells.

    Parameters
    ----------
    n_components
        Number of pseudo-inputs ``K``.

    Examples
    --------
    >>> import torch
    >>> from pyro_scvi.model.nn import Encoder
    >>> encoder = Encoder(20, 3, n_batch=2)
    >>> p = VampPrior(n_components=5)
    >>> p.attach_encoder(encoder, torch.rand(5, 20), batch_index=torch.tensor([0, 1, 0, 1, 0]))
    >>> p.setup(3)
    >>> d = p()
    >>> tuple(d.batch_shape), tuple(d.event_shape)
    ((), (3,))
    >>> [name for name, _ in p.named_parameters()]  # the encoder is not a submodule
    ['pseudo_inputs']
    """

    static_structure = True

    def __init__(self, n_components: int = 50) -> None:
        super().__init__()
        if int(n_components) < 1:
            raise ValueError(f"n_components={n_components}; it must be a positive integer.")
        self.n_components = int(n_components)
        # A tuple hides the encoder from nn.Module's registration: the guide owns it.
        self._encoder: tuple[nn.Module, ...] = ()

    def attach_encoder(
        self,
        encoder: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        pseudo_inputs: torch.Tensor | None = None,
        batch_index: torch.Tensor | None = None,
    ) -> None:
        """Use ``encoder`` (``(x_log1p, batch_index) -> (loc, scale)``) for the components.

        Parameters
        ----------
        encoder
            The guide's ``z`` encoder, e.g. ``ScviGuide.z_encoder``.
        pseudo_inputs
            Initial pseudo-inputs, ``(n_components, n_genes)`` in the encoder's input space.
            ``None`` keeps the current ones (re-attaching a loaded prior).
        batch_index
            Batch code of each pseudo-input, ``(n_components,)``; default all 0.
        """
        if pseudo_inputs is not None:
            u = torch.as_tensor(pseudo_inputs, dtype=torch.float32)
            if u.dim() != 2 or u.shape[0] != self.n_components:
                raise ValueError(
                    f"pseudo_inputs must have shape ({self.n_components}, n_genes); "
                    f"got {tuple(u.shape)}."
                )
            self.pseudo_inputs = nn.Parameter(u.clone())
            codes = (
                torch.zeros(self.n_components, dtype=torch.long)
                if batch_index is None
                else torch.as_tensor(batch_index, dtype=torch.long).clone()
            )
            if codes.shape != (self.n_components,):
                raise ValueError(f"batch_index must have shape ({self.n_components},).")
            self.register_buffer("pseudo_batch_index", codes)
        elif not hasattr(self, "pseudo_inputs"):
            raise ValueError("The first attach_encoder call needs initial pseudo_inputs.")
        self._encoder = (encoder,)
        if self.n_latent is not None:
            check_prior(self, self.n_latent)

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        self._require_setup()
        if not self._encoder:
            raise RuntimeError(
                "VampPrior has no encoder: SCVI attaches the guide's z encoder; with "
                "ScviModel directly call prior.attach_encoder(guide.z_encoder, pseudo_inputs) "
                "first."
            )
        encoder = self._encoder[0]
        was_training = getattr(encoder, "training", False)
        if was_training:
            encoder.eval()
        try:
            loc, scale = encoder(self.pseudo_inputs, self.pseudo_batch_index)
        finally:
            if was_training:
                encoder.train()
        weights = dist.Categorical(logits=loc.new_zeros(self.n_components))
        return dist.MixtureSameFamily(weights, dist.Normal(loc, scale).to_event(1))

    def __getstate__(self) -> dict:
        # Pickled with a saved model; the encoder is the guide's and is re-attached on load.
        state = self.__dict__.copy()
        state["_encoder"] = ()
        return state

    def __repr__(self) -> str:
        return f"VampPrior(n_components={self.n_components})"


class CallablePrior(Prior):
    """A prior on ``z`` given by a function of no arguments returning a Pyro distribution.

    :func:`as_prior` wraps plain callables in it, so ``SCVI(adata, prior=fn)`` works. The
    function's own parameters (if any) are not trained: for a learnable prior subclass
    :class:`Prior`. A model with a lambda (or a function defined inside another) as its
    prior cannot be saved, since pickle cannot store such functions.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> p = CallablePrior(lambda: dist.Laplace(torch.zeros(4), 1.0).to_event(1))
    >>> type(p().base_dist).__name__
    'Laplace'
    """

    def __init__(self, fn: Callable[[], dist.TorchDistribution]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self) -> dist.TorchDistribution:  # noqa: D102
        return self.fn()

    def __repr__(self) -> str:
        return f"CallablePrior({getattr(self.fn, '__qualname__', repr(self.fn))})"


def as_prior(prior: nn.Module | Callable[[], dist.TorchDistribution] | None) -> nn.Module:
    """The prior object for ``prior``: a module as is, a plain callable wrapped.

    Examples
    --------
    >>> as_prior(None)
    StandardNormal()
    >>> import torch, pyro.distributions as dist
    >>> def laplace():
    ...     return dist.Laplace(torch.zeros(4), 1.0).to_event(1)
    >>> as_prior(laplace)
    CallablePrior(laplace)
    """
    if prior is None:
        return StandardNormal()
    if isinstance(prior, nn.Module):
        return prior
    if callable(prior):
        return CallablePrior(prior)
    raise TypeError(
        f"prior={prior!r}: pass a pyro_scvi.Prior (e.g. StandardNormal(), "
        "MixtureOfGaussians(10)), an nn.Module, or a callable returning a Pyro distribution."
    )


def check_prior(prior: Callable[[], dist.TorchDistribution], n_latent: int) -> None:
    """Raise a ``ValueError`` naming the fix unless ``prior()`` fits the ``z`` site.

    A :class:`VampPrior` without its encoder yet is checked when the encoder is attached.
    """
    if isinstance(prior, VampPrior) and not prior._encoder:
        return
    d = prior()
    if not isinstance(d, torch.distributions.Distribution):
        raise ValueError(
            f"The prior on z must return a Pyro distribution, but {prior!r} returned "
            f"{type(d).__name__}."
        )
    if tuple(d.event_shape) != (n_latent,):
        raise ValueError(
            f"The prior on z must return a distribution with event_shape ({n_latent},), "
            f"but {prior!r} returned event_shape {tuple(d.event_shape)}: "
            "wrap per-dimension distributions with .to_event(1)."
        )
    if any(s != 1 for s in d.batch_shape):
        raise ValueError(
            f"The prior on z must return one draw per cell (batch_shape ()), but {prior!r} "
            f"returned batch_shape {tuple(d.batch_shape)}; the model's cells plate adds the "
            "cell dimension. For a mixture use pyro.distributions.MixtureSameFamily."
        )


class LibraryPrior(nn.Module):
    """Base class of priors on the log-library ``l``.

    ``forward(batch_index)`` returns the distribution of ``l`` for each cell, with
    ``batch_shape (cells, 1)`` (the 1 broadcasts over genes) and ``event_shape ()``.
    """

    #: As :attr:`Prior.static_structure`.
    static_structure: bool = False
    #: Whether ``l`` is a latent variable: a sample site of the model that the guide covers.
    #: :class:`ObservedLibrary` sets it to False.
    latent: bool = True

    def forward(self, batch_index: torch.Tensor) -> dist.TorchDistribution:  # noqa: D102
        raise NotImplementedError


class LogNormalLibrary(LibraryPrior):
    """Per-batch prior of the log-library ``l = log(library size)``.

    Parameters
    ----------
    loc, scale
        Mean and standard deviation of ``l`` for each batch, shape ``(n_batch,)``.

    Examples
    --------
    >>> import torch
    >>> p = LogNormalLibrary(torch.tensor([7.0, 8.0]), torch.tensor([0.5, 0.4]))
    >>> tuple(p(torch.tensor([0, 1, 1])).batch_shape)
    (3, 1)
    """

    static_structure = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        loc, scale = torch.as_tensor(loc).float(), torch.as_tensor(scale).float()
        if loc.shape != scale.shape or loc.dim() != 1:
            raise ValueError("loc and scale must both have shape (n_batch,).")
        if not (scale > 0).all():
            raise ValueError("Every batch needs a positive library-size scale.")
        self.register_buffer("loc", loc)
        self.register_buffer("scale", scale)

    def forward(self, batch_index: torch.Tensor) -> dist.TorchDistribution:
        """Distribution of ``l`` for each cell, shape ``(cells, 1)`` to broadcast over genes."""
        return dist.Normal(
            self.loc[batch_index].unsqueeze(-1), self.scale[batch_index].unsqueeze(-1)
        )


class ObservedLibrary(LibraryPrior):
    """The library observed, not latent: ``l_n = log(sum_g x_ng)``, each cell's log total count.

    Pass it where a library prior goes (``SCVI(adata, library_prior=ObservedLibrary())``,
    which ``use_observed_lib_size=True`` stands for): the model conditions on
    :meth:`observed` of the counts, so it has no ``l`` site and the guide has none to
    cover (:attr:`~LibraryPrior.latent` is False). It has no parameters, so a model saved
    with it has the state of one saved with ``use_observed_lib_size=True`` before this
    class existed.

    Examples
    --------
    >>> import torch
    >>> lib = ObservedLibrary()
    >>> lib.latent, is_latent_library(lib)
    (False, False)
    >>> lib.observed(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).exp().round().ravel().tolist()
    [3.0, 7.0]
    """

    static_structure = True
    latent = False

    def observed(self, x: torch.Tensor | None) -> torch.Tensor:
        """``log(sum_g x_ng)`` of the counts ``x`` ``(cells, genes)``, shape ``(cells, 1)``."""
        if x is None:
            raise ValueError(
                "An observed library (ObservedLibrary, use_observed_lib_size=True) needs the "
                "observed counts x; to sample counts from the model use a latent library "
                "prior such as LogNormalLibrary."
            )
        return torch.log(x.sum(-1, keepdim=True))

    def forward(self, batch_index: torch.Tensor) -> dist.TorchDistribution:  # noqa: D102
        raise TypeError(
            "ObservedLibrary has no distribution of l: the library is observed; the model "
            "calls its observed(x)."
        )

    def __repr__(self) -> str:
        return "ObservedLibrary()"


def is_latent_library(library: object) -> bool:
    """Whether ``library`` (a library prior, or ``None`` for the default) makes ``l`` latent.

    It asks the object's ``latent`` attribute; any library prior without one (a plain module
    or function of the batch codes) is latent, as is ``None``.

    Examples
    --------
    >>> import torch
    >>> is_latent_library(None), is_latent_library(ObservedLibrary())
    (True, False)
    >>> is_latent_library(LogNormalLibrary(torch.tensor([7.0]), torch.tensor([0.5])))
    True
    """
    return bool(getattr(library, "latent", True))


class CallableLibraryPrior(LibraryPrior):
    """A library prior given by a function of the cells' batch codes (:func:`as_library_prior`).

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> p = CallableLibraryPrior(lambda b: dist.Normal(torch.full((len(b), 1), 7.0), 1.0))
    >>> tuple(p(torch.tensor([0, 0, 1])).batch_shape)
    (3, 1)
    """

    def __init__(self, fn: Callable[[torch.Tensor], dist.TorchDistribution]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, batch_index: torch.Tensor) -> dist.TorchDistribution:  # noqa: D102
        return self.fn(batch_index)

    def __repr__(self) -> str:
        return f"CallableLibraryPrior({getattr(self.fn, '__qualname__', repr(self.fn))})"


def as_library_prior(
    spec: nn.Module | Callable | None, loc: torch.Tensor, scale: torch.Tensor
) -> nn.Module:
    """The library prior for ``SCVI(library_prior=spec)``, given the data's per-batch stats.

    Parameters
    ----------
    spec
        ``None``: :class:`LogNormalLibrary` at the data's ``(loc, scale)``. An
        ``nn.Module``: used as it is (called with batch codes). Any other callable: a
        factory, called as ``spec(loc, scale)``; it returns a module, or a function of the
        batch codes (wrapped in :class:`CallableLibraryPrior`). The class
        :class:`LogNormalLibrary` itself is such a factory.
    loc, scale
        Mean and standard deviation of the log total counts of each batch, ``(n_batch,)``.

    Examples
    --------
    >>> import torch, pyro.distributions as dist
    >>> loc, scale = torch.tensor([7.0, 8.0]), torch.tensor([0.5, 0.4])
    >>> def wider(loc, scale):  # a factory: twice the data's spread
    ...     return LogNormalLibrary(loc, 2 * scale)
    >>> float(as_library_prior(wider, loc, scale).scale[0])
    1.0
    """
    if spec is None:
        return LogNormalLibrary(loc, scale)
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise TypeError(
            f"library_prior={spec!r}: pass an nn.Module called with batch codes, or a "
            "factory called with the per-batch (loc, scale), e.g. LogNormalLibrary."
        )
    made = spec(loc, scale)
    if isinstance(made, nn.Module):
        return made
    if callable(made):
        return CallableLibraryPrior(made)
    raise TypeError(
        f"The library_prior factory {spec!r} returned {type(made).__name__}; it must "
        "return an nn.Module or a function of the batch codes."
    )


def check_library_prior(prior: Callable, n_batch: int) -> None:
    """Raise a ``ValueError`` naming the fix unless ``prior(batch codes)`` fits the ``l`` site."""
    # at least 3 cells, so that a batch_shape missing the trailing 1 cannot broadcast
    codes = torch.arange(max(n_batch, 3)) % max(n_batch, 1)
    d = prior(codes)
    if not isinstance(d, torch.distributions.Distribution):
        raise ValueError(
            f"The library prior must return a Pyro distribution, but {prior!r} returned "
            f"{type(d).__name__}."
        )
    expected = (len(codes), 1)
    shape_ok = tuple(d.event_shape) == ()
    try:
        shape_ok = shape_ok and torch.broadcast_shapes(d.batch_shape, expected) == expected
    except RuntimeError:
        shape_ok = False
    if not shape_ok:
        raise ValueError(
            f"The library prior must return a distribution of l with batch_shape (cells, 1) "
            f"and event_shape (); for {len(codes)} cells {prior!r} returned batch_shape "
            f"{tuple(d.batch_shape)}, event_shape {tuple(d.event_shape)}."
        )
