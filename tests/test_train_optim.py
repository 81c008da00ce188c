"""FusedAdam's update is torch's fused Adam to the last bit, however it gets there."""

import copy
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

from pyro_scvi.train.optim import FusedAdam

SETTINGS = {"lr": 1e-2, "eps": 0.01, "weight_decay": 1e-4}


class Net(nn.Module):
    """A small regression in Pyro: a network's output is the mean of the data."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
        self.spare = nn.Linear(5, 3)  # used only where a step says so (no gradient otherwise)

    def model(self, x, y, use_spare: bool = False):
        pyro.module("net", self)
        mean = self.body(x) + (self.spare(x) if use_spare else 0.0)
        with pyro.plate("rows", x.shape[0]):
            pyro.sample("y", dist.Normal(mean, 1.0).to_event(1), obs=y)

    def guide(self, x, y, use_spare: bool = False):
        pass


def _steps(use_spare: list[bool], *, groups: bool, resume_after: int | None = None):
    """(FusedAdam's parameters, torch's fused Adam's) after the same steps from one start."""
    torch.manual_seed(0)
    ours = Net()
    theirs = copy.deepcopy(ours)
    x, y = torch.randn(16, 5), torch.randn(16, 3)
    declared = [{"params": list(ours.body[2].parameters()), "eps": 1e-3, "lr": 3e-2}]
    step = FusedAdam(**SETTINGS, groups=declared if groups else None)
    elbo = Trace_ELBO()
    with pyro.get_param_store().scope():
        for i, spare in enumerate(use_spare):
            if resume_after is not None and i == resume_after:
                # a resumed run: a new optimizer continues from the saved moments
                saved = copy.deepcopy(step.state_dict())
                step = FusedAdam(**SETTINGS, groups=declared if groups else None)
                step.load_state_dict(saved)
            step(elbo, ours.model, ours.guide, x, y, spare)
    rest = [p for p in theirs.parameters() if all(p is not q for q in theirs.body[2].parameters())]
    param_groups = (
        [{"params": rest}, {"params": list(theirs.body[2].parameters()), "eps": 1e-3, "lr": 3e-2}]
        if groups
        else list(theirs.parameters())
    )
    adam = torch.optim.Adam(param_groups, fused=True, **SETTINGS)
    with pyro.get_param_store().scope():
        for spare in use_spare:
            elbo.loss_and_grads(theirs.model, theirs.guide, x, y, spare)
            adam.step()
            adam.zero_grad(set_to_none=True)
    return dict(ours.named_parameters()), dict(theirs.named_parameters())


@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize(
    "use_spare, resume_after",
    [
        ([True] * 6, None),
        ([True] * 6, 3),  # the moments loaded into a new optimizer
        ([True, True, False, True, False, True], None),  # steps where a parameter has no grad
        ([False, False, True, True, True], None),  # a parameter met after the first step
    ],
)
def test_fused_adam_updates_equal_torch_fused_adam_bitwise(use_spare, resume_after, groups):
    ours, theirs = _steps(use_spare, groups=groups, resume_after=resume_after)
    for name, p in theirs.items():
        assert torch.equal(ours[name], p), name
    # ... and the steps did move every parameter that had a gradient
    torch.manual_seed(0)
    initial = dict(Net().named_parameters())
    assert not torch.equal(initial["body.0.weight"], ours["body.0.weight"])
    if any(use_spare):
        assert not torch.equal(initial["spare.weight"], ours["spare.weight"])


@pytest.mark.parametrize("groups", [False, True])
def test_a_torch_whose_kernel_refuses_the_direct_call_gets_the_same_update(monkeypatch, groups):
    """Another torch may spell the fused kernel's arguments differently: the direct call then
    raises before writing, and the update (that step's and every later one's) goes through
    ``step()``, still torch's fused Adam to the last bit."""
    kernel, calls = torch._fused_adam_, {"direct": 0}

    def another_torch(*args, **kwargs):
        # refuses FusedAdam's direct call, not the one inside Adam.step
        if sys._getframe(1).f_code.co_name == "_fused_kernel":
            calls["direct"] += 1
            raise TypeError("_fused_adam_() got an unexpected keyword argument 'grad_scale'")
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", another_torch)
    ours, theirs = _steps([True] * 5, groups=groups)
    assert calls["direct"] == 1  # tried once, then step() every time
    for name, p in theirs.items():
        assert torch.equal(ours[name], p), name
