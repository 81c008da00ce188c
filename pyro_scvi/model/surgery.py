"""Architecture surgery for query mapping: new batches onto a trained reference, scArches-style.

Lotfollahi et al. (2022) map a query dataset onto a reference model by adding the query's
batches to the model's batch covariate and training only the weights that the new
batches feed, with every reference weight fixed ("architecture surgery"). The reference
cells' embedding and decoding are then exactly what they were, and the query cells land in
the reference's latent space. :meth:`pyro_scvi.SCVI.load_query_data` builds its model with
:func:`query_components`.

Here the surgery is structural rather than a mask on gradients: every reference
parameter of the model, the guide and the prior becomes a buffer (so no optimizer, weight
decay included, can move it), batch norm always uses the reference's running statistics
(:class:`FrozenBatchNorm1d`), and the first layer of each network that takes the one-hot
batch gets trainable columns for the new batches only (:class:`BatchExtendedLinear`,
started at zero, so a query cell starts as the reference's first batch would see it,
less that batch's own shift). The new batches' library prior is set from the query
data, as training sets it from the reference data. Saved, a query model loads as an
ordinary model with all batches (the modules write their state under the names of
``nn.Linear`` and ``nn.BatchNorm1d``).

References
----------
Lotfollahi, M. et al. Mapping single-cell data to reference atlases by transfer learning.
Nature Biotechnology 40, 121-130 (2022).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..data.counts import CountData, from_anndata
from ..errors import InputError
from .build import Components
from .generative import ScviModel
from .guides import ScviGuide
from .nn import Decoder, Encoder
from .priors import LogNormalLibrary, VampPrior, is_latent_library

if TYPE_CHECKING:
    from anndata import AnnData


class Reference(Protocol):
    """What query mapping reads of a reference model.

    Its :class:`~pyro_scvi.model.build.Components`, or a model with their attributes, as
    :class:`~pyro_scvi.SCVI` has.
    """

    settings: dict[str, Any]
    data: CountData
    model: ScviModel
    guide: nn.Module


class BatchExtendedLinear(nn.Module):
    """``nn.Linear`` whose last ``n_new`` input columns are trainable and the rest fixed.

    The fixed weight and the bias are buffers; ``weight_new`` is the only parameter. Its
    state is written as ``weight`` (all columns) and ``bias``, as an ``nn.Linear`` of the
    full width writes it.

    Examples
    --------
    >>> import torch
    >>> ref = torch.nn.Linear(3, 2)
    >>> ext = BatchExtendedLinear(ref.weight.detach(), ref.bias.detach(), n_new=1)
    >>> [name for name, _ in ext.named_parameters()], sorted(ext.state_dict())
    (['weight_new'], ['bias', 'weight'])
    >>> x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])  # the new column is 0 for reference cells
    >>> torch.allclose(ext(x), ref(x[:, :3]))
    True
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, n_new: int) -> None:
        super().__init__()
        self.register_buffer("weight_fixed", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.weight_new = nn.Parameter(torch.zeros(weight.shape[0], n_new))
        self._register_state_dict_hook(_write_as_linear)
        self._register_load_state_dict_pre_hook(_read_as_linear)

    @property
    def weight(self) -> torch.Tensor:
        """The full weight, fixed columns then new ones."""
        return torch.cat([self.weight_fixed, self.weight_new], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.weight, self.bias)


def _write_as_linear(module, state, prefix, local_metadata):
    fixed = state.pop(prefix + "weight_fixed")
    new = state.pop(prefix + "weight_new")
    state[prefix + "weight"] = torch.cat([fixed, new], dim=1)
    return state


def _read_as_linear(module, state, prefix, *args):
    weight = state.pop(prefix + "weight", None)
    if weight is not None:
        n_new = module.weight_new.shape[1]
        state[prefix + "weight_fixed"] = weight[:, :-n_new]
        state[prefix + "weight_new"] = weight[:, -n_new:]


class FrozenBatchNorm1d(nn.Module):
    """Batch norm that always normalizes with its running statistics, which never change.

    Every tensor is a buffer, named as in ``nn.BatchNorm1d`` (whose state it loads). It is
    not an ``nn.BatchNorm1d``, so the training loop's re-estimation of batch-norm
    statistics (:func:`pyro_scvi.train.loop.refresh_batch_norm`) leaves it alone.
    """

    def __init__(self, bn: nn.BatchNorm1d) -> None:
        super().__init__()
        self.eps = bn.eps
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            value = getattr(bn, name)
            self.register_buffer(name, None if value is None else value.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def freeze(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer and every batch norm into a frozen one.

    In place; returns ``module``. State-dict names are unchanged.

    Examples
    --------
    >>> import torch
    >>> net = freeze(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)))
    >>> list(net.parameters()), type(net[1]).__name__, sorted(net[0].state_dict())
    ([], 'FrozenBatchNorm1d', ['bias', 'weight'])
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm1d):
                setattr(parent, name, FrozenBatchNorm1d(child))
        for name, param in list(parent._parameters.items()):
            if param is not None:
                del parent._parameters[name]
                parent.register_buffer(name, param.detach().clone())
    return module


def _extend_batch_input(net: Encoder | Decoder, n_ref_batch: int, n_batch: int) -> None:
    """Give ``net``'s first layer inputs for batches ``n_ref_batch..n_batch-1``.

    ``net`` is frozen already; a network set up for one batch had no batch input at all,
    so its single batch gets a zero column of its own (fixed: the reference is unchanged).
    """
    first = net.body[0]
    weight = first.weight  # a buffer after freeze()
    if net.n_batch == 0:  # one reference batch: no one-hot input until now
        weight = torch.cat([weight, weight.new_zeros(weight.shape[0], n_ref_batch)], dim=1)
    net.body[0] = BatchExtendedLinear(weight, first.bias, n_batch - n_ref_batch)
    net.n_batch = n_batch


def query_components(
    reference: Reference, adata: AnnData, *, streamed: bool | None = None
) -> Components:
    """The components of a model of ``adata``'s cells: ``reference``'s, its new batches appended.

    ``reference`` is not modified: its model and guide are copied, frozen and widened by
    the batches of ``adata`` it does not know; only those batches' weights are
    parameters. Raises :class:`~pyro_scvi.InputError` for a reference or query that
    cannot be mapped, naming the fix.

    Parameters
    ----------
    reference
        A trained model (or its components), set up with a ``batch_key``.
    adata
        The query's raw counts: the reference's genes, in order, and its ``batch_key``
        column, with at least one batch the reference does not know.
    streamed
        For a backed ``adata``: stream its counts from the file (``None``: the engine
        decides).

    Returns
    -------
    Components
        A copy of the reference's settings, the query's data (coded with the reference's
        batches first), and the widened model and guide.

    Examples
    --------
    >>> import pyro_scvi
    >>> sim = pyro_scvi.datasets.synthetic_zinb(n_cells=60, n_genes=10, n_batches=2)
    >>> ref, query = sim[sim.obs["batch"] == "batch0"].copy(), sim[sim.obs["batch"] == "batch1"]
    >>> reference = pyro_scvi.SCVI(ref, batch_key="batch", n_latent=2, n_hidden=8)
    >>> parts = query_components(reference, query.copy())
    >>> parts.data.batch_categories, [n for n, _ in parts.guide.named_parameters()][:1]
    (('batch0', 'batch1'), ['z_encoder.body.0.weight_new'])
    """
    settings, model, guide = reference.settings, reference.model, reference.guide
    batch_key = settings["batch_key"]
    if batch_key is None:
        raise InputError(
            "The reference was set up without batch_key, so it has no batch covariate to "
            "extend; set the reference up with SCVI(adata, batch_key=...)."
        )
    if model.dispersion == "gene-batch":
        raise InputError(
            "Query mapping of a model with dispersion='gene-batch' is not supported: the "
            "new batches would need dispersions of their own; use 'gene' or 'gene-cell'."
        )
    if isinstance(model.prior, VampPrior):
        raise InputError("Query mapping of a model with a VampPrior is not supported.")
    if not isinstance(guide, ScviGuide):
        raise InputError(
            f"Query mapping needs the amortized ScviGuide; the reference has a "
            f"{type(guide).__name__}."
        )
    if is_latent_library(model.library_prior) and not isinstance(
        model.library_prior, LogNormalLibrary
    ):
        raise InputError(
            "Query mapping sets the new batches' library prior from the data and needs a "
            f"LogNormalLibrary; the reference has {model.library_prior!r}."
        )
    if batch_key not in adata.obs:
        raise InputError(
            f"The query has no obs[{batch_key!r}], the reference's batch_key; add each "
            "cell's batch there."
        )
    known = list(reference.data.batch_categories)
    query_batches = list(dict.fromkeys(sorted(adata.obs[batch_key].astype(str))))
    new = [b for b in query_batches if b not in known]
    if not new:
        raise InputError(
            f"Every batch of the query ({query_batches}) is known to the reference; query "
            "it directly (e.g. reference.get_latent_representation(adata))."
        )
    categories = known + new
    data = from_anndata(
        adata,
        layer=settings["layer"],
        batch_key=batch_key,
        batch_categories=categories,
        var_names=reference.data.var_names,
        streamed=streamed,
    )
    n_ref, n_batch = len(known), len(categories)

    model = freeze(copy.deepcopy(model).cpu())
    guide = freeze(copy.deepcopy(guide).cpu())
    for net in (model.decoder, guide.z_encoder, guide.l_encoder):
        if net is not None:
            _extend_batch_input(net, n_ref, n_batch)
    model.n_batch = n_batch
    if is_latent_library(model.library_prior):
        # the new batches' prior from their cells, as SCVI() sets the reference's from its own
        # each cell's total: streamed counts have no X in memory
        log_lib = np.log(np.maximum(data.total_counts(), 1.0))
        stats = [log_lib[data.batch_index == b] for b in range(n_ref, n_batch)]
        loc = torch.tensor([v.mean() for v in stats], dtype=torch.float32)
        scale = torch.tensor([max(v.std(), 1e-3) for v in stats], dtype=torch.float32)
        ref_prior = model.library_prior
        model.library_prior = LogNormalLibrary(
            torch.cat([ref_prior.loc, loc]), torch.cat([ref_prior.scale, scale])
        )
    # a reference with an inference scheme has no ScviGuide: refused above
    return Components(dict(settings), data, model, guide, scheme=None)
