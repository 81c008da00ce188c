"""The amortized guide ``q(z, l | x, batch)`` of scVI, with the model's signature.

``q(z | x, s) = Normal(mu_z(x, s), sigma_z(x, s))`` and
``q(l | x, s) = Normal(mu_l(x, s), sigma_l(x, s))``, each produced by an encoder network
on ``log1p(x)`` and the one-hot batch (Lopez et al., 2018).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from .model import cells_plate, kl_scale
from .nn import Encoder


class ScviGuide(nn.Module):
    """Amortized mean-field guide; call it with the same arguments as :class:`ScviModel`.

    Parameters
    ----------
    n_genes, n_batch
        Data dimensions.
    n_latent, n_hidden, n_layers, dropout_rate
        Encoder architecture (paper: 10, 128, 1, 0.1).
    use_observed_lib_size
        If true the model observes the library, so there is no ``l`` site to guide.
    l_loc_init
        Initial mean of q(l); :class:`~pyro_scvi.SCVI` passes the data's mean log-library.

    Examples
    --------
    >>> import torch, pyro
    >>> g = ScviGuide(20, 1)
    >>> x = torch.poisson(torch.full((8, 20), 2.0))
    >>> tr = pyro.poutine.trace(g).get_trace(x, torch.zeros(8, dtype=torch.long))
    >>> tuple(tr.nodes["z"]["value"].shape), tuple(tr.nodes["l"]["value"].shape)
    ((8, 1, 10), (8, 1))
    """

    def __init__(
        self,
        n_genes: int,
        n_batch: int,
        *,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_observed_lib_size: bool = False,
        l_loc_init: float = 0.0,
    ) -> None:
        super().__init__()
        arch = dict(n_hidden=n_hidden, n_layers=n_layers, dropout_rate=dropout_rate)
        self.z_encoder = Encoder(n_genes, n_latent, n_batch, **arch)
        self.l_encoder = None if use_observed_lib_size else Encoder(n_genes, 1, n_batch, **arch)
        self.l_loc_init = float(l_loc_init)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start q(l) at ``l_loc_init`` (the prior's mean log-library).

        A zero-initialized bias would start it near log-library 0, about 7 nats from typical
        data, which costs hundreds of steps before the reconstruction term is meaningful.
        """
        if self.l_encoder is not None:
            with torch.no_grad():
                self.l_encoder.loc.bias.fill_(self.l_loc_init)

    def encode(self, x: torch.Tensor, batch_index: torch.Tensor) -> dict[str, torch.Tensor]:
        """Variational parameters ``z_loc``, ``z_scale`` (and ``l_loc``, ``l_scale``)."""
        x_log1p = torch.log1p(x)
        z_loc, z_scale = self.z_encoder(x_log1p, batch_index)
        out = {"z_loc": z_loc, "z_scale": z_scale}
        if self.l_encoder is not None:
            out["l_loc"], out["l_scale"] = self.l_encoder(x_log1p, batch_index)
        return out

    def forward(
        self,
        x: torch.Tensor,
        batch_index: torch.Tensor,
        cell_index: torch.Tensor | None = None,
        num_cells: int | None = None,
        kl_weight: float = 1.0,
    ) -> None:
        """Sample ``z`` and ``l`` for the cells of ``x``; see :meth:`ScviModel.forward`."""
        pyro.module("guide", self)
        q = self.encode(x, batch_index)
        with cells_plate(batch_index, cell_index, num_cells):
            with kl_scale(kl_weight):
                # unsqueeze(-2): the singleton gene axis of cell-level sites.
                pyro.sample(
                    "z",
                    dist.Normal(q["z_loc"].unsqueeze(-2), q["z_scale"].unsqueeze(-2)).to_event(1),
                )
            if self.l_encoder is not None:
                pyro.sample("l", dist.Normal(q["l_loc"], q["l_scale"]))
