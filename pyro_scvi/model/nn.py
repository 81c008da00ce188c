"""Neural networks of scVI: the encoder of the guide and the decoder of the model.

Both are fully connected with batch norm, ReLU and dropout, and take the batch as a one-hot
vector concatenated to their input (Lopez et al., 2018, Methods). They accept any number of
leading dimensions, so the same decoder serves a training minibatch ``(cells, latent)`` and
vectorized posterior samples ``(samples, cells, latent)``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def one_hot(batch_index: torch.Tensor, n_batch: int) -> torch.Tensor:
    """Float one-hot encoding of integer batch codes, ``(..., n_batch)``."""
    return F.one_hot(batch_index.long(), n_batch).float()


def make_fc(n_in: int, n_hidden: int, n_layers: int, dropout_rate: float) -> nn.Sequential:
    """``n_layers`` blocks of Linear → BatchNorm → ReLU → Dropout.

    Batch norm uses scvi-tools' momentum (0.01) and eps (1e-3) so that the two
    implementations are compared at equal architecture.
    """
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers += [
            nn.Linear(n_in if i == 0 else n_hidden, n_hidden),
            nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3),
            nn.ReLU(),
        ]
        if dropout_rate > 0:
            layers.append(nn.Dropout(dropout_rate))
    return nn.Sequential(*layers)


def _flat(t: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    # BatchNorm1d takes (N, C) only: flatten leading dimensions and remember them.
    return t.reshape(-1, t.shape[-1]), t.shape[:-1]


class Encoder(nn.Module):
    """Amortized Gaussian posterior ``q(v | x, batch) = Normal(loc, scale)``.

    Parameters
    ----------
    n_input
        Number of genes.
    n_output
        Dimension of ``v`` (``n_latent`` for ``z``, 1 for the log-library).
    n_batch
        Number of batches (0 or 1: no batch input).
    n_hidden, n_layers, dropout_rate
        Architecture; the paper uses 128, 1 and 0.1.

    Examples
    --------
    >>> import torch
    >>> enc = Encoder(50, 10, n_batch=2).eval()
    >>> loc, scale = enc(torch.rand(4, 50), torch.tensor([0, 1, 0, 1]))
    >>> tuple(loc.shape), bool((scale > 0).all())
    ((4, 10), True)
    """

    def __init__(
        self,
        n_input: int,
        n_output: int,
        n_batch: int = 0,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.n_batch = n_batch if n_batch > 1 else 0
        self.body = make_fc(n_input + self.n_batch, n_hidden, n_layers, dropout_rate)
        self.loc = nn.Linear(n_hidden, n_output)
        self.raw_var = nn.Linear(n_hidden, n_output)

    def forward(
        self,
        x_log1p: torch.Tensor,
        batch_index: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(loc, scale)`` of q for log1p-transformed counts.

        ``inputs``: the first layer's input, built already by :meth:`input`.
        """
        h, lead = self.hidden(x_log1p, batch_index, inputs=inputs)
        loc, scale = self.heads(h)
        return loc.reshape(*lead, -1), scale.reshape(*lead, -1)

    def input(self, x_log1p: torch.Tensor, batch_index: torch.Tensor) -> torch.Tensor:
        """The first layer's input: the log1p counts, and the batch's one-hot if it takes one.

        Two encoders of the same cells and batches (``z``'s and ``l``'s) can share it: with
        a batch input it is a copy of the cells x genes block, made once instead of twice.

        Examples
        --------
        >>> import torch
        >>> enc = Encoder(50, 10, n_batch=2)
        >>> tuple(enc.input(torch.rand(4, 50), torch.tensor([0, 1, 0, 1])).shape)
        (4, 52)
        """
        if self.n_batch:
            return torch.cat([x_log1p, one_hot(batch_index, self.n_batch)], dim=-1)
        return x_log1p

    def hidden(
        self,
        x_log1p: torch.Tensor,
        batch_index: torch.Tensor,
        *,
        inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Size]:
        """The last hidden layer ``(N, n_hidden)``, leading axes flattened, and those axes.

        Richer guides condition on it too. ``inputs``: as in :meth:`forward`.
        """
        h = self.input(x_log1p, batch_index) if inputs is None else inputs
        h, lead = _flat(h)
        return self.body(h), lead

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` from the hidden layer."""
        # exp keeps the variance positive; the 1e-4 floor (as in scvi-tools) stops q from
        # collapsing to a point mass, which would make log q(z) blow up.
        return self.loc(h), torch.sqrt(torch.exp(self.raw_var(h)) + 1e-4)


class Decoder(nn.Module):
    """scVI's decoder ``f(z, batch)``: gene frequencies, zero-inflation and dispersion.

    Parameters
    ----------
    n_latent, n_output, n_batch
        Latent dimension, number of genes and number of batches.
    n_hidden, n_layers
        Architecture; the decoder has no dropout, as in the paper.
    gate
        Build the zero-inflation head (``gate_logits``).
    cell_dispersion
        Build a head for a per-cell-and-gene ``log_theta``.
    gate_init_logit
        Initial bias of the zero-inflation head: every cell and gene starts with dropout
        probability about ``sigmoid(gate_init_logit)``. The likelihood chooses it
        (``initial_dropout`` of :class:`~pyro_scvi.model.likelihoods.ZINB`); None keeps the layer's
        random bias.

    Examples
    --------
    >>> import torch
    >>> dec = Decoder(10, 50, n_batch=2).eval()
    >>> out = dec(torch.randn(3, 4, 10), torch.tensor([0, 1, 0, 1]))
    >>> tuple(out["rho_logits"].shape), out["log_theta"] is None
    ((3, 4, 50), True)
    """

    def __init__(
        self,
        n_latent: int,
        n_output: int,
        n_batch: int = 0,
        n_hidden: int = 128,
        n_layers: int = 1,
        gate: bool = True,
        cell_dispersion: bool = False,
        gate_init_logit: float | None = None,
    ) -> None:
        super().__init__()
        self.gate_init_logit = gate_init_logit
        self.n_batch = n_batch if n_batch > 1 else 0
        self.body = make_fc(n_latent + self.n_batch, n_hidden, n_layers, dropout_rate=0.0)
        # None when an inference scheme holds the output layer (pyro_scvi.model.schemes)
        self.rho_logits: nn.Linear | None = nn.Linear(n_hidden, n_output)
        self.gate_logits = nn.Linear(n_hidden, n_output) if gate else None
        self.log_theta = nn.Linear(n_hidden, n_output) if cell_dispersion else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Start the zero-inflation head at ``gate_init_logit`` (after its layer's own reset)."""
        if self.gate_logits is not None and self.gate_init_logit is not None:
            with torch.no_grad():
                self.gate_logits.bias.fill_(self.gate_init_logit)

    def forward(
        self, z: torch.Tensor, batch_index: torch.Tensor
    ) -> dict[str, torch.Tensor | None]:
        """Decode ``z`` of shape ``(..., cells, n_latent)`` for cells in ``batch_index``."""
        h, lead = self.hidden(z, batch_index)

        def head(layer: nn.Linear | None) -> torch.Tensor | None:
            return None if layer is None else layer(h).reshape(*lead, -1)

        return {
            "rho_logits": head(self.rho_logits),
            "gate_logits": head(self.gate_logits),
            "log_theta": head(self.log_theta),
            # the last hidden layer, for an output layer held outside (BayesianDecoder)
            "hidden": h.reshape(*lead, -1),
        }

    def hidden(
        self, z: torch.Tensor, batch_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Size]:
        """The last hidden layer ``(N, n_hidden)``, leading axes flattened, and those axes.

        The body, where the decoder's batch norm is; :meth:`forward` applies the heads to
        it. A pass that only re-estimates batch norm's statistics stops here
        (:meth:`~pyro_scvi.model.ScviModel.batch_norm_pass`).

        Examples
        --------
        >>> import torch
        >>> dec = Decoder(10, 50, n_batch=2).eval()
        >>> h, lead = dec.hidden(torch.randn(3, 4, 10), torch.tensor([0, 1, 0, 1]))
        >>> tuple(h.shape), tuple(lead)
        ((12, 128), (3, 4))
        """
        h = z
        if self.n_batch:
            b = one_hot(batch_index, self.n_batch).expand(*z.shape[:-1], self.n_batch)
            h = torch.cat([z, b], dim=-1)
        h, lead = _flat(h)
        return self.body(h), lead


class eval_mode:
    """Put modules in eval mode (batch norm running stats, no dropout), then restore."""

    def __init__(self, *modules):
        self.modules = [m for m in modules if isinstance(m, nn.Module)]

    def __enter__(self):
        self.was_training = [m.training for m in self.modules]
        for m in self.modules:
            m.eval()

    def __exit__(self, *exc):
        for m, was in zip(self.modules, self.was_training, strict=True):
            m.train(was)
