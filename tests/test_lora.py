"""LoRA and the core operations: layer types, composition, switching, merging, deleting."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.layer import AdapterLayer, SavedModule

from conftest import model_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama


class Net(nn.Module):
    """A model that is not a transformers model: embedding, conv, linear layers."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 8, padding_idx=0)
        self.conv = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.fc1 = nn.Linear(6 * 4 * 4 + 8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, image, tokens):
        h = torch.cat([F.relu(self.conv(image)).flatten(1), self.emb(tokens).mean(1)], dim=-1)
        return self.head(F.relu(self.fc1(h)))


def net_inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 50, (2, 5), generator=g)


def test_linear_unit_matches_the_lora_formula():
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=6, target_modules=["0"], init_lora_weights=False))
    unit = model[0].adapters["default"]
    x = torch.randn(3, 4, 6)
    expected = layer(x) + (x @ unit.lora_A.T @ unit.lora_B.T) * 3.0
    torch.testing.assert_close(model(x), expected)


def test_rslora_scaling():
    model = nn.Sequential(nn.Linear(6, 5))
    peftkit.apply(model, peftkit.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["0"]))
    assert model[0].adapters["default"].scaling == pytest.approx(8 / 2)


@pytest.mark.parametrize("targets", [["conv"], ["emb"], ["fc1", "conv", "emb"]])
def test_conv2d_embedding_and_plain_modules(targets):
    image, tokens = net_inputs()
    model = Net()
    base = model(image, tokens)
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=targets))
    torch.testing.assert_close(model(image, tokens), base, rtol=0, atol=1e-6)  # identity at init
    peftkit.delete(model, "default")
    peftkit.apply(model, peftkit.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    adapted = model(image, tokens)
    assert not torch.allclose(adapted, base)
    peftkit.merge(model)
    torch.testing.assert_close(model(image, tokens), adapted, rtol=0, atol=1e-5)
    peftkit.unload(model)
    assert type(model.conv) is nn.Conv2d and type(model.emb) is nn.Embedding
    torch.testing.assert_close(model(image, tokens), base, rtol=0, atol=1e-6)


def test_plain_model_without_targets_explains_what_to_pass():
    with pytest.raises(peftkit.ConfigError, match="target_modules is not set.*fc1"):
        peftkit.apply(Net(), peftkit.LoraConfig())


def test_default_targets_per_model_type():
    for build, names in ((tiny_bert, {"query", "value"}), (tiny_gpt2, {"c_attn"}), (tiny_llama, {"q_proj", "v_proj"})):
        model = build()
        peftkit.apply(model, peftkit.LoraConfig())
        wrapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
        assert wrapped == names


def test_all_linear_skips_the_output_head():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(target_modules="all-linear"))
    wrapped = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.lm_head, nn.Linear)


def test_layers_to_transform_and_rank_pattern():
    model = tiny_llama()
    config = peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 16})
    peftkit.apply(model, config)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert sorted(wrapped) == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert peftkit.adapted_modules(model) == sorted(wrapped)
    assert wrapped["model.layers.1.self_attn.v_proj"].adapters["default"].r == 2
    assert wrapped["model.layers.1.self_attn.q_proj"].adapters["default"].scaling == 16 / 4


def test_two_active_adapters_add_their_deltas():
    inputs = model_inputs("llama")
    model = tiny_llama()
    base = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoraConfig(r=2, init_lora_weights=False), name="a")
    out_a = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoraConfig(r=3, target_modules=["q_proj", "o_proj"], init_lora_weights=False), name="b")
    assert peftkit.active_adapters(model) == ["b"]
    out_b = output_of(model, inputs)
    peftkit.set_active(model, ["a", "b"])
    both = output_of(model, inputs)
    # With one layer adapted per adapter the logits are not additive, but hidden projections are:
    layer = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    delta = layer(x) - layer.base_layer(x)
    da = layer.adapters["a"](x, torch.zeros(2, 32))
    db = layer.adapters["b"](x, torch.zeros(2, 32))
    torch.testing.assert_close(delta, da + db)
    assert not torch.allclose(both, out_a) and not torch.allclose(both, out_b)
    peftkit.merge(model)
    torch.testing.assert_close(output_of(model, inputs), both, rtol=0, atol=1e-5)
    peftkit.unmerge(model)  # exact up to float rounding of W + ΔW - ΔW
    with peftkit.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=1e-5)
    peftkit.set_active(model, "a")
    torch.testing.assert_close(output_of(model, inputs), out_a, rtol=0, atol=1e-5)


def test_disabled_while_merged_gives_the_base_then_remerges():
    inputs = model_inputs("bert")
    model = tiny_bert()
    base = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    adapted = output_of(model, inputs)
    peftkit.merge(model)
    with peftkit.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=1e-5)
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=1e-5)
    assert model.bert.encoder.layer[0].attention.self.query.merged == ["default"]


def test_operations_refused_while_merged():
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(), name="a")
    peftkit.merge(model)
    with pytest.raises(peftkit.ModelError, match="unmerge"):
        peftkit.set_active(model, "a")
    with pytest.raises(peftkit.ModelError, match="unmerge"):
        peftkit.apply(model, peftkit.LoraConfig(), name="b")
    with pytest.raises(peftkit.ModelError, match="unmerge"):
        peftkit.delete(model, "a")


def test_delete_one_of_two_keeps_the_other():
    inputs = model_inputs("gpt2")
    model = tiny_gpt2()
    keys = list(model.state_dict())
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False), name="a")
    out_a = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["c_fc"], init_lora_weights=False), name="b")
    peftkit.delete(model, "b")
    assert peftkit.active_adapters(model) == []
    assert not any(isinstance(m, AdapterLayer) and "b" in m.adapters for m in model.modules())
    assert all(type(b.mlp.c_fc).__name__ == "Conv1D" for b in model.transformer.h)
    peftkit.set_active(model, "a")
    torch.testing.assert_close(output_of(model, inputs), out_a, rtol=0, atol=0)
    peftkit.delete(model, "a")
    assert list(model.state_dict()) == keys
    with pytest.raises(peftkit.ModelError, match="no peftkit adapters"):
        peftkit.set_active(model, "a")


def test_modules_to_save_head_is_per_adapter():
    inputs = model_inputs("bert")
    model = tiny_bert()
    base = output_of(model, inputs)
    peftkit.apply(model, peftkit.LoraConfig())
    assert isinstance(model.classifier, SavedModule)
    with torch.no_grad():
        model.classifier.copies["default"].weight.add_(1.0)
    trained = output_of(model, inputs)
    assert not torch.allclose(trained, base)
    with peftkit.disabled(model):
        torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=0)
    peftkit.unload(model, merge=True)
    assert type(model.classifier) is nn.Linear
    torch.testing.assert_close(output_of(model, inputs), trained, rtol=0, atol=1e-6)


def test_half_precision_base_keeps_float32_adapters():
    model = tiny_llama().to(torch.bfloat16)
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    unit = model.model.layers[0].self_attn.q_proj.adapters["default"]
    assert unit.lora_A.dtype == torch.float32
    out = model(**model_inputs("llama")).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().sum().backward()
    assert unit.lora_B.grad is not None and unit.lora_B.grad.dtype == torch.float32


def test_dropout_only_in_training():
    model = nn.Sequential(nn.Linear(8, 8))
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_dropout=0.5, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(4, 8)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.allclose(model(x), model(x))


def test_bias_all_trains_every_bias():
    model = tiny_bert()
    peftkit.apply(model, peftkit.LoraConfig(bias="all"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "bert.encoder.layer.0.attention.self.query.base_layer.bias" in trainable
    assert "bert.encoder.layer.0.intermediate.dense.bias" in trainable
    assert not any(n.endswith("weight") and ".adapters." not in n and ".copies." not in n for n in trainable)


def test_bad_calls_give_clear_errors():
    model = tiny_bert()
    with pytest.raises(peftkit.ConfigError, match="near names: query"):
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["querry"]))
    assert not hasattr(model, "_peftkit") and not any(isinstance(m, AdapterLayer) for m in model.modules())
    with pytest.raises(peftkit.ConfigError, match="LayerNorm"):
        peftkit.apply(model, peftkit.LoraConfig(target_modules=["attention.output.LayerNorm"]))
    peftkit.apply(model, peftkit.LoraConfig(), name="x")
    with pytest.raises(peftkit.ConfigError, match="exists already"):
        peftkit.apply(model, peftkit.LoraConfig(), name="x")
    with pytest.raises(peftkit.ModelError, match="no adapter named 'y'.*'x'"):
        peftkit.set_active(model, "y")
    with pytest.raises(peftkit.ConfigError, match="modules_to_save"):
        peftkit.apply(tiny_bert(), peftkit.LoraConfig(modules_to_save=["nonexistent_head"]))


def test_trainable_summary_line():
    model = tiny_bert()
    total_before = sum(p.numel() for p in model.parameters())
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["query"]))
    s = peftkit.trainable_summary(model)
    lora = 2 * 4 * (32 + 32)  # two layers, A (4, 32) + B (32, 4)
    head = 32 * 2 + 2
    assert s.trainable == lora + head
    assert s.total == total_before + lora + head
    assert s.percent == pytest.approx(100 * s.trainable / s.total)
    assert f"{s.trainable:,}" in str(s) and "%" in str(s)
