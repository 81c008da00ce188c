"""Where a model trains and answers queries: the device policy, in one place."""

from __future__ import annotations

import torch

from ..errors import InputError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; other values pass to ``torch.device``.

    A CUDA device asked for where no GPU is visible is an :class:`~pyro_scvi.InputError`
    (torch would fail later, in the middle of the work).

    Examples
    --------
    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("auto").type in ("cpu", "cuda")
    True
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device='cuda' but no CUDA GPU is visible; use device='cpu' or 'auto'.")
    return device
