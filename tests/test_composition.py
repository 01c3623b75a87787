"""How active units of one layer compose (``layer.Unit``'s rule), against hand-computed outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import peftkit
from peftkit.layer import AdapterLayer


class One(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 6)

    def forward(self, x):
        return self.proj(x)


def _adapted():
    model = One()
    lora = peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)
    dora = peftkit.LoraConfig(r=3, lora_alpha=3, target_modules=["proj"], init_lora_weights=False, use_dora=True)
    peftkit.apply(model, lora, "lora")
    peftkit.apply(model, dora, "dora")
    with torch.no_grad():
        model.proj.adapters["dora"].lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 6))
    return model


def _expected(model, x):
    """DoRA rescales W alone: m/‖W + s·B A‖ · (W + s·B A) x + b; LoRA adds s·B A x on top."""
    layer = model.proj
    W, b = layer.base_layer.weight, layer.base_layer.bias
    lora, dora = layer.adapters["lora"], layer.adapters["dora"]
    directed = W + dora.scaling * dora.lora_B @ dora.lora_A
    scale = dora.lora_magnitude_vector / directed.norm(dim=1)
    return x @ (scale[:, None] * directed).t() + b + lora.scaling * x @ (lora.lora_B @ lora.lora_A).t()


@pytest.mark.parametrize("order", [["lora", "dora"], ["dora", "lora"]])
def test_dora_with_lora_on_one_layer_rescales_the_base_alone(order):
    model = _adapted()
    peftkit.set_active(model, order)
    x = torch.randn(5, 8)
    with torch.no_grad():
        expected = _expected(model, x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        peftkit.merge(model, probe=x)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
        peftkit.unmerge(model)
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_two_dora_adapters_cannot_be_active_on_one_layer():
    model = _adapted()
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=["proj"], use_dora=True), "dora2")
    with pytest.raises(peftkit.ModelError, match="cannot be active together on one layer"):
        peftkit.set_active(model, ["dora", "dora2"])
    assert peftkit.active_adapters(model) == ["dora2"]  # nothing changed
    layer = model.proj
    assert isinstance(layer, AdapterLayer) and layer.active == ("dora2",)


def test_the_merge_probe_leaves_each_layer_s_output_as_it_is():
    """The probe records merged layers' outputs (as float32 copies on the CPU) without replacing
    them: a bfloat16 model merges with the default probe, and its forward keeps bfloat16."""
    from conftest import model_inputs, tiny_llama

    model = tiny_llama().to(torch.bfloat16)
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    seen = []  # what the layer after the probed q/v projections receives while the probe runs
    model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    report = peftkit.merge(model)  # the default probe runs before and after merging
    assert len(seen) == 2 and set(seen) == {torch.bfloat16}
    assert report.output.max_abs < 0.1  # bfloat16 rounding of the merged weights, nothing more
    with torch.no_grad():
        assert model(**model_inputs("llama")).logits.dtype == torch.bfloat16
