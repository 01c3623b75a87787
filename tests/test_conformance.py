"""The conformance suite: every registered method, on tiny BERT, GPT-2, Llama and MiniLM.

A new method joins by adding an entry to ``CASES`` keyed by its ``peft_type`` (the registry
check below fails until it does; variants such as DoRA add keys of their own): a function
``(kind, init) -> config`` where ``init`` is "identity" (the method's own init, output equals
the base where that applies) or "random" (non-zero, for round trips); it returns None for a
model the method does not apply to (every case must cover BERT and Llama). Which checks apply
(identity at init, merging) is read from the method's registry entry.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit import registry
from peftkit.inject import adapter_parameters

from conftest import BUILDERS, model_inputs, output_of

# Small r keeps MiniLM cheap; "random" exercises every tensor in save/load and merge.
CASES = {
    "LORA": lambda kind, init: peftkit.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=(init == "identity") or False
    ),
    "DORA": lambda kind, init: peftkit.LoraConfig(
        r=4, lora_alpha=8, use_dora=True, init_lora_weights=(init == "identity") or False
    ),
    # LoRA's other initialisations (non-zero A and B from the start, the model unchanged) and its bias.
    "LORA_PISSA": lambda kind, init: peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="pissa"),
    "LORA_OLORA": lambda kind, init: None if kind == "gpt2" else peftkit.LoraConfig(  # Conv1D: refused, as documented
        r=4, lora_alpha=8, init_lora_weights="olora"),
    "LORA_ORTHOGONAL": lambda kind, init: peftkit.LoraConfig(r=4, lora_alpha=8, init_lora_weights="orthogonal"),
    "LORA_BIAS": lambda kind, init: None if kind == "llama" else peftkit.LoraConfig(  # Llama's layers have no bias
        r=4, lora_alpha=8, lora_bias=True, init_lora_weights=(init == "identity") or False),  # to merge it into
    "BOTTLENECK": lambda kind, init: peftkit.AdapterConfig(variant="houlsby", bottleneck_size=8, init=init),
    "BOTTLENECK_PFEIFFER": lambda kind, init: peftkit.AdapterConfig(variant="pfeiffer", bottleneck_size=8, init=init),
    "BOTTLENECK_PARALLEL": lambda kind, init: peftkit.AdapterConfig(variant="parallel", bottleneck_size=8, init=init),
    "IA3": lambda kind, init: peftkit.IA3Config(init_ia3_weights=(init == "identity")),
    "LN_TUNING": lambda kind, init: registry.get("LN_TUNING").config_cls(init_weights=(init == "identity")),
    # LoHa and LoKr: not on GPT-2, whose projections are Conv1D (HF PEFT's LoHa/LoKr refuse them
    # too) and whose only Linear, lm_head, is tied to the embeddings.
    "LOHA": lambda kind, init: None if kind == "gpt2" else registry.get("LOHA").config_cls(
        r=4, alpha=8, init_weights=(init == "identity")),
    "LOKR": lambda kind, init: None if kind == "gpt2" else registry.get("LOKR").config_cls(
        r=4, alpha=8, init_weights=(init == "identity")),
    "OFT": lambda kind, init: None if kind == "gpt2" else registry.get("OFT").config_cls(  # GPT-2: Conv1D, as LoHa
        oft_block_size=8, init_weights=(init == "identity")),
    "VERA": lambda kind, init: registry.get("VERA").config_cls(r=16, init_weights=(init == "identity")),
    "ADALORA": lambda kind, init: registry.get("ADALORA").config_cls(init_r=4, target_r=2, total_step=10, lora_alpha=8 if init == "identity" else 0.5, init_lora_weights=(init == "identity")),  # N(0, 1) factors when random: a small alpha keeps ΔW near the weights
    # Input methods: no identity at init (the prompt always changes the input).
    "PROMPT_TUNING": lambda kind, init: peftkit.PromptTuningConfig(num_virtual_tokens=4),
    "P_TUNING": lambda kind, init: peftkit.PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=16),
    "PREFIX_TUNING": lambda kind, init: peftkit.PrefixTuningConfig(num_virtual_tokens=4),
}
# What each case must show comes from its method's registry entry (its config's peft_type).
PEFT_TYPE = {case: make("bert", "identity").peft_type for case, make in CASES.items()}
IDENTITY_AT_INIT = {case for case, t in PEFT_TYPE.items() if registry.get(t).identity_at_init}
MERGEABLE = {case for case, t in PEFT_TYPE.items() if registry.get(t).mergeable}
# Steps for 15 AdamW steps on tiny models. (IA)³ has few parameters, each a multiplicative
# scale: it needs a larger step to move. Bottleneck adapters act on the full hidden width: a
# smaller step keeps them stable.
LEARNING_RATE = {"IA3": 5e-2, "BOTTLENECK": 3e-3, "BOTTLENECK_PFEIFFER": 3e-3, "BOTTLENECK_PARALLEL": 3e-3}
# PiSSA / OLoRA adapters hold the weights' principal directions: full-size values, smaller steps.
LEARNING_RATE.update({"LORA_PISSA": 3e-3, "LORA_OLORA": 3e-3})
# Their base holds the residual W - B·A while the adapter is in; unloading puts W back up to rounding.
MODIFIES_BASE = {"LORA_PISSA", "LORA_OLORA"}
# Input methods: N(0, 1) prompts (HF PEFT's init) need larger steps.
LEARNING_RATE.update({"PROMPT_TUNING": 1e-1, "P_TUNING": 1e-1, "PREFIX_TUNING": 1e-1})
# With virtual tokens prepended (HF PEFT's layout, which its files need), BERT's pooler reads
# the first virtual token; in a random 2-layer BERT its state barely depends on the input
# (attention is near uniform), so 15 steps cannot fit random labels. Pretrained MiniLM covers
# encoder classification for these methods (and test_prompting.py the plumbing on tiny BERT).
NO_TINY_BERT_TRAINING = {"PROMPT_TUNING", "P_TUNING"}


# (model, case) pairs the suite runs: every case on every model it applies to.
PAIRS = [(kind, case) for kind in BUILDERS for case in sorted(CASES) if CASES[case](kind, "identity") is not None]


def pairs(cases) -> list[tuple[str, str]]:
    return [(kind, case) for kind, case in PAIRS if case in cases]


def test_every_registered_method_has_a_case_on_bert_and_llama():
    assert {m.peft_type for m in registry.all_methods()} <= set(CASES)
    # every method's own case runs on the three models; variants (LORA_BIAS: Llama has no bias to
    # merge into) may leave one out
    variants = {"LORA_BIAS", "LORA_OLORA"}
    assert all({"bert", "llama", "minilm"} <= {k for k, c in PAIRS if c == case} for case in CASES if case not in variants)


def _build(kind, method, init):
    model = BUILDERS[kind]()
    peftkit.apply(model, CASES[method](kind, init))
    return model


def _batch(kind):
    inputs = model_inputs(kind, batch=4, length=8)
    if kind in ("bert", "minilm"):
        inputs["labels"] = torch.tensor([0, 1, 0, 1])
    else:
        inputs["labels"] = inputs["input_ids"].clone()
    return inputs


@pytest.mark.parametrize("kind,method", pairs(IDENTITY_AT_INIT))
def test_identity_at_init(kind, method):
    inputs = model_inputs(kind)
    base = output_of(BUILDERS[kind](), inputs)
    model = _build(kind, method, "identity")
    torch.testing.assert_close(output_of(model, inputs), base, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,method", PAIRS)
def test_only_adapter_parameters_train(kind, method):
    model = _build(kind, method, "identity")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable, "the adapter has no trainable parameter"
    assert trainable == {id(p) for p in adapter_parameters(model, "default")}
    summary = peftkit.trainable_summary(model)
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 0 < summary.percent < 10


@pytest.mark.parametrize("kind,method", PAIRS)
def test_save_load_round_trip_is_exact(kind, method, tmp_path):
    inputs = model_inputs(kind)
    model = _build(kind, method, "random")
    expected = output_of(model, inputs)
    peftkit.save(model, tmp_path)
    fresh = BUILDERS[kind]()
    peftkit.load(fresh, tmp_path)
    assert torch.equal(output_of(fresh, inputs), expected)
    assert not any(p.requires_grad for p in fresh.parameters())
    again = tmp_path / "again"
    peftkit.save(fresh, again)
    assert (again / "adapter_model.safetensors").read_bytes() == (tmp_path / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("kind,method", pairs(MERGEABLE))
def test_merge_equals_unmerged(kind, method):
    inputs = model_inputs(kind)
    model = _build(kind, method, "random")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = output_of(model, inputs)
    peftkit.merge(model)
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0, atol=1e-5)
    peftkit.unmerge(model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,method", PAIRS)
def test_unload_restores_module_tree_and_keys(kind, method):
    inputs = model_inputs(kind)
    reference = BUILDERS[kind]()
    keys = list(reference.state_dict())
    grads = {n: p.requires_grad for n, p in reference.named_parameters()}
    model = _build(kind, method, "random")
    peftkit.unload(model)
    assert list(model.state_dict()) == keys
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    if method in MODIFIES_BASE:
        torch.testing.assert_close(output_of(model, inputs), output_of(reference, inputs), rtol=0, atol=1e-5)
    else:
        assert torch.equal(output_of(model, inputs), output_of(reference, inputs))


@pytest.mark.parametrize("kind,method", pairs(MERGEABLE))
def test_unload_with_merge_keeps_the_adapted_function(kind, method):
    inputs = model_inputs(kind)
    model = _build(kind, method, "random")
    expected = output_of(model, inputs)
    keys = list(BUILDERS[kind]().state_dict())
    peftkit.unload(model, merge=True)
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(output_of(model, inputs), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind,method", [
    (k, m) for k, m in PAIRS if not (k == "bert" and m in NO_TINY_BERT_TRAINING)
])
def test_training_lowers_the_loss(kind, method):
    torch.manual_seed(0)
    model = _build(kind, method, "identity")
    batch = _batch(kind)

    def eval_loss():
        with torch.no_grad():
            return model.eval()(**batch).loss.item()

    before = eval_loss()
    params = [p for p in model.parameters() if p.requires_grad]
    initial = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE.get(method, 1e-2))
    model.train()
    for _ in range(15):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = eval_loss()
    assert after < before - 0.01, (before, after)
    # The adapter itself learned, not just a classification head beside it.
    assert all(not torch.equal(p, p0) for p, p0 in zip(params, initial))
    assert not [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
