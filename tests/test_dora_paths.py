"""DoRA's fused training path and its cached inference ratio compute what the definition says:
W' = m ⊙ (W + s·BA) / ‖W + s·BA‖ (the norm per output feature, a constant for the gradient)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.methods.lora import DoraLinear

pytestmark = pytest.mark.usefixtures("one_thread")


def reference(unit: DoraLinear, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = base.weight.t() if unit.transposed else base.weight  # (out, in)
    adapted = w + unit.scaling * (unit.lora_B @ unit.lora_A)
    weight = unit.lora_magnitude_vector.view(-1, 1) * adapted / adapted.norm(dim=1, keepdim=True).detach()
    return torch.nn.functional.linear(x, weight, base.bias)


def dora_layer(kind: str):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = {"linear": nn.Linear(12, 10), "linear_no_bias": nn.Linear(12, 10, bias=False), "conv1d": Conv1D(10, 12)}[kind]
    holder = nn.Sequential(base)
    peftkit.apply(holder, peftkit.LoraConfig(r=3, lora_alpha=5, use_dora=True, target_modules=["0"],
                                             init_lora_weights=False))
    host = holder[0]
    unit = host.adapters["default"]
    with torch.no_grad():
        unit.lora_magnitude_vector.mul_(torch.rand(10) + 0.5)  # m away from ‖W‖: the ratio matters
    return holder, host.base_layer, unit


@pytest.mark.parametrize("kind", ["linear", "linear_no_bias", "conv1d"])
def test_the_training_forward_and_its_gradients_equal_the_definition(kind) -> None:
    holder, base, unit = dora_layer(kind)
    holder.train()
    x = torch.randn(4, 5, 12)
    got = holder(x)
    want = reference(unit, base, x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    params = [unit.lora_A, unit.lora_B, unit.lora_magnitude_vector]
    grads = torch.autograd.grad(got.square().sum(), params)
    expected = torch.autograd.grad(want.square().sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_cached_inference_ratio_follows_every_change(kind) -> None:
    holder, base, unit = dora_layer(kind)
    holder.eval()
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(holder(x), reference(unit, base, x), atol=1e-5, rtol=1e-5)
        assert "_scale_cache" in unit.__dict__  # the ratio was kept
        for change in (lambda: unit.lora_B.add_(0.3), lambda: unit.lora_A.mul_(1.7),
                       lambda: unit.lora_magnitude_vector.add_(0.2), lambda: base.weight.mul_(0.9)):
            before = holder(x)
            change()
            after = holder(x)
            assert (after - before).abs().max() > 1e-4
            torch.testing.assert_close(after, reference(unit, base, x), atol=1e-5, rtol=1e-5)
