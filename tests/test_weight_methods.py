"""Bottleneck adapters, (IA)³ and DoRA beyond the conformance suite; combining LoRA adapters."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit.layer import AdapterLayer

from conftest import model_inputs, output_of, tiny_bert, tiny_gpt2, tiny_llama

BUILD = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


# -- bottleneck adapters --------------------------------------------------------------------


@pytest.mark.parametrize("variant,expected", [
    ("houlsby", {"attn.c_proj", "mlp.c_proj"}), ("pfeiffer", {"mlp.c_proj"}), ("parallel", {"mlp"}),
])
def test_bottleneck_insertion_points(variant, expected):
    model = tiny_gpt2()
    peftkit.apply(model, peftkit.AdapterConfig(variant=variant, bottleneck_size=4))
    wrapped = {n.split(".", 3)[3] for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    assert wrapped == expected


def test_bottleneck_serial_unit_is_the_residual_adapter():
    model = tiny_llama()
    peftkit.apply(model, peftkit.AdapterConfig(variant="pfeiffer", bottleneck_size=4, non_linearity="gelu", scaling=0.5,
                                               init="random"))
    host = model.model.layers[0].mlp.down_proj
    unit = host.adapters["default"]
    x = torch.randn(2, 3, 64)
    y = host.base_layer(x)
    expected = y + 0.5 * unit.adapter_up(F.gelu(unit.adapter_down(y)))
    torch.testing.assert_close(host(x), expected)


def test_bottleneck_parallel_on_bert_adds_before_the_layernorm():
    model = tiny_bert()
    peftkit.apply(model, peftkit.AdapterConfig(variant="parallel", bottleneck_size=4, init="random"))
    block = model.bert.encoder.layer[0].output  # host around BertOutput(hidden, input_tensor)
    base = block.base_layer
    unit = block.adapters["default"]
    inter, h = torch.randn(2, 5, 64), torch.randn(2, 5, 32)
    adapter_h = unit.adapter_up(F.relu(unit.adapter_down(h)))
    expected = base.LayerNorm(base.dense(inter) + h + adapter_h)
    torch.testing.assert_close(block(inter, h), expected)


def test_bottleneck_stacking_applies_adapters_in_the_given_order():
    inputs = model_inputs("gpt2")
    model = tiny_gpt2()
    for name in ("lang", "task"):
        peftkit.apply(model, peftkit.AdapterConfig(bottleneck_size=4, init="random"), name=name)
    peftkit.set_active(model, ["lang", "task"])
    host = model.transformer.h[0].attn.c_proj
    x = torch.randn(2, 3, 32)
    y = host.base_layer(x)
    lang, task = host.adapters["lang"], host.adapters["task"]
    y = y + lang.adapter_up(F.relu(lang.adapter_down(y)))
    y = y + task.adapter_up(F.relu(task.adapter_down(y)))
    torch.testing.assert_close(host(x), y)
    stacked = output_of(model, inputs)
    peftkit.set_active(model, ["task", "lang"])
    assert not torch.allclose(output_of(model, inputs), stacked)


def test_bottleneck_unknown_architecture_says_how_to_map_it():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(peftkit.ConfigError, match="insertion=.*layers"):
        peftkit.apply(net, peftkit.AdapterConfig())
    with pytest.raises(peftkit.ConfigError, match="insertion: expected keys"):
        peftkit.AdapterConfig(insertion={"layers": "h"})


def test_bottleneck_custom_insertion_mapping():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn_proj, self.ff = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))

        def forward(self, x):
            x = x + self.attn_proj(x)
            return x + self.ff(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net = Net()
    insertion = {"layers": "blocks", "attn_out": "attn_proj", "ffn_out": "ff.2", "ffn": "ff", "ffn_residual_arg": None}
    peftkit.apply(net, peftkit.AdapterConfig(insertion=insertion, bottleneck_size=2))
    assert sorted(n for n, m in net.named_modules() if isinstance(m, AdapterLayer)) == [
        "blocks.0.attn_proj", "blocks.0.ff.2", "blocks.1.attn_proj", "blocks.1.ff.2"]


def test_bottleneck_with_lora_inside_a_parallel_block(tmp_path):
    inputs = model_inputs("llama")
    model = tiny_llama()
    peftkit.apply(model, peftkit.AdapterConfig(variant="parallel", bottleneck_size=4, init="random"), name="ad")
    peftkit.apply(model, peftkit.LoraConfig(target_modules=["up_proj"], init_lora_weights=False), name="lo")
    peftkit.set_active(model, ["ad", "lo"])
    both = output_of(model, inputs)
    peftkit.save(model, tmp_path / "ad", name="ad")
    peftkit.save(model, tmp_path / "lo", name="lo")
    fresh = tiny_llama()
    peftkit.load(fresh, tmp_path / "ad", name="ad")
    peftkit.load(fresh, tmp_path / "lo", name="lo")
    peftkit.set_active(fresh, ["ad", "lo"])
    torch.testing.assert_close(output_of(fresh, inputs), both, rtol=0, atol=0)
    keys = list(tiny_llama().state_dict())
    peftkit.unload(fresh)
    assert list(fresh.state_dict()) == keys


# -- (IA)³ ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_ia3_files_both_ways_with_hf(kind, tmp_path):
    from peft import IA3Config, PeftModel, get_peft_model

    inputs = model_inputs(kind)
    ours = BUILD[kind]()
    peftkit.apply(ours, peftkit.IA3Config())
    _perturb(ours)
    expected = output_of(ours, inputs)
    assert not torch.allclose(expected, output_of(BUILD[kind](), inputs))
    peftkit.save(ours, tmp_path / "ours")
    theirs = PeftModel.from_pretrained(BUILD[kind](), tmp_path / "ours").eval()
    torch.testing.assert_close(output_of(theirs, inputs), expected, rtol=0, atol=1e-5)

    hf = get_peft_model(BUILD[kind](), IA3Config(task_type="SEQ_CLS" if kind == "bert" else "CAUSAL_LM"))
    _perturb(hf, seed=1)
    hf.eval()
    hf.save_pretrained(tmp_path / "hf")
    loaded = peftkit.load(BUILD[kind](), tmp_path / "hf")
    torch.testing.assert_close(output_of(loaded, inputs), output_of(hf, inputs), rtol=0, atol=1e-5)


def test_ia3_vectors_of_active_adapters_multiply():
    model = tiny_llama()
    for name in ("a", "b"):
        peftkit.apply(model, peftkit.IA3Config(init_ia3_weights=False), name=name)
    peftkit.set_active(model, ["a", "b"])
    for host in (model.model.layers[0].self_attn.k_proj, model.model.layers[0].mlp.down_proj):
        a, b = host.adapters["a"].ia3_l.view(-1), host.adapters["b"].ia3_l.view(-1)
        x = torch.randn(3, host.base_layer.in_features)
        if host.adapters["a"].on_input:
            expected = host.base_layer(x * a * b)
        else:
            expected = host.base_layer(x) * a * b
        torch.testing.assert_close(host(x), expected)


# -- combining LoRA adapters -----------------------------------------------------------------


def _two_loras():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False), name="a")
    peftkit.apply(model, peftkit.LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "o_proj"],
                                            init_lora_weights=False), name="b")
    return model


def _delta(host, name):
    return host.adapters[name].delta_weight()


def test_combine_cat_is_the_exact_weighted_sum():
    inputs = model_inputs("llama")
    model = _two_loras()
    peftkit.combine(model, ["a", "b"], [0.7, -1.3], "ab", how="cat")
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        torch.testing.assert_close(_delta(q, "ab"), 0.7 * _delta(q, "a") - 1.3 * _delta(q, "b"))
        assert q.adapters["ab"].r == 5
        torch.testing.assert_close(_delta(layer.self_attn.v_proj, "ab"), 0.7 * _delta(layer.self_attn.v_proj, "a"))
    peftkit.combine(model, ["a", "b"], [1.0, 1.0], "sum", how="cat")
    peftkit.set_active(model, "sum")
    combined = output_of(model, inputs)
    peftkit.set_active(model, ["a", "b"])
    torch.testing.assert_close(combined, output_of(model, inputs), rtol=0, atol=1e-5)


def test_combine_svd_is_the_best_low_rank_approximation():
    model = _two_loras()
    peftkit.combine(model, ["a", "b"], [1.0, 0.5], "full", how="svd", svd_rank=5)
    peftkit.combine(model, ["a", "b"], [1.0, 0.5], "low", how="svd", svd_rank=2)
    q = model.model.layers[1].self_attn.q_proj
    exact = _delta(q, "a") + 0.5 * _delta(q, "b")
    torch.testing.assert_close(_delta(q, "full"), exact, rtol=0, atol=1e-5)
    singular = torch.linalg.svdvals(exact)
    err = torch.linalg.matrix_norm(_delta(q, "low") - exact)
    torch.testing.assert_close(err, singular[2:].norm(), rtol=1e-4, atol=1e-6)


def test_combine_linear_follows_its_documented_formula_and_needs_equal_ranks():
    model = tiny_llama()
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        peftkit.apply(model, peftkit.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False), name=name)
    peftkit.combine(model, ["a", "b"], [0.25, 1.0], "lin", how="linear")
    q = model.model.layers[0].self_attn.q_proj
    ua, ub = q.adapters["a"], q.adapters["b"]
    ca, cb = (0.25 * 2) ** 0.5, (1.0 * 2) ** 0.5
    expected = (ca * ua.lora_B + cb * ub.lora_B) @ (ca * ua.lora_A + cb * ub.lora_A)
    torch.testing.assert_close(_delta(q, "lin"), expected)
    with pytest.raises(peftkit.ConfigError, match="equal ranks"):
        peftkit.combine(_two_loras(), ["a", "b"], [1.0, 1.0], "x", how="linear")


def test_combine_round_trips_through_files(tmp_path):
    inputs = model_inputs("llama")
    model = _two_loras()
    peftkit.combine(model, ["a", "b"], [0.5, 0.5], "ab")
    expected = output_of(model, inputs)
    peftkit.save(model, tmp_path, name="ab")
    fresh = peftkit.load(tiny_llama(), tmp_path)
    torch.testing.assert_close(output_of(fresh, inputs), expected, rtol=0, atol=0)


def test_combine_refuses_what_it_cannot_do():
    model = _two_loras()
    peftkit.apply(model, peftkit.IA3Config(), name="ia3")
    with pytest.raises(peftkit.ConfigError, match="only LoRA adapters combine"):
        peftkit.combine(model, ["a", "ia3"], [1.0, 1.0], "x")
    with pytest.raises(peftkit.ConfigError, match="one weight per adapter"):
        peftkit.combine(model, ["a", "b"], [1.0], "x")
    with pytest.raises(peftkit.ConfigError, match="how"):
        peftkit.combine(model, ["a", "b"], [1.0, 1.0], "x", how="mean")
