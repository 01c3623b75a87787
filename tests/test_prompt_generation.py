"""``model.generate`` with input adapters on decoders (tiny GPT-2 and Llama).

The reference runs the whole sequence through the model at every step, without a cache
(``model(input_ids, attention_mask)``, the prompt added afresh each time), and picks the next
token itself: argmax, or ``torch.multinomial`` from the same seed. ``generate`` with its KV
cache must produce the same tokens, on a left-padded batch, and each padded row the tokens it
gets alone; the virtual tokens enter the cache once, at prefill.
"""

from __future__ import annotations

import pytest
import torch

import peftkit
from prompt_models import DECODERS, MODELS, PAD, ids, pad, peftkit_config, perturb

METHODS = ("prompt", "ptuning", "prefix", "prefix_proj")
NEW = 6
P = 4


def adapted(kind: str, method: str):
    model = MODELS[kind]()
    peftkit.apply(model, peftkit_config(method, P))
    perturb((p for p in model.parameters() if p.requires_grad), scale=1.0)
    return model.eval()


def reference(model, batch: dict, sample_seed: int | None = None) -> torch.Tensor:
    """Step by step without a cache: the full sequence every time."""
    x, mask = batch["input_ids"], batch["attention_mask"]
    if sample_seed is not None:
        torch.manual_seed(sample_seed)
    for _ in range(NEW):
        with torch.no_grad():
            last = model(input_ids=x, attention_mask=mask, use_cache=False).logits[:, -1]  # (B, V)
        if sample_seed is None:
            nxt = last.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(last, dim=-1), num_samples=1)
        x, mask = torch.cat([x, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return x


def generate(model, batch: dict, **kwargs):
    return model.generate(**batch, max_new_tokens=NEW, pad_token_id=PAD, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", DECODERS)
def test_greedy_generation_with_cache_equals_the_no_cache_reference(kind, method):
    model = adapted(kind, method)
    rows = ids([5, 3], seed=7)
    batch = pad(rows, "left")
    steps = []
    spy = model.register_forward_pre_hook(lambda m, a, kw: steps.append(dict(kw)), with_kwargs=True)  # after ours
    out = generate(model, batch, do_sample=False)
    spy.remove()
    expected = reference(model, batch)
    assert torch.equal(out.sequences, expected)
    assert torch.equal(generate(model, batch, do_sample=False, use_cache=False).sequences, expected)
    for i, row in enumerate(rows):  # a left-padded row generates what it generates alone
        alone = generate(model, pad([row], "left"), do_sample=False).sequences[0, len(row):]
        assert torch.equal(out.sequences[i, -NEW:], alone)
    # the virtual tokens / prefixes entered the cache once: P + prompt + generated − 1 entries
    assert out.cache.get_seq_length() == P + batch["input_ids"].shape[1] + NEW - 1
    prefill, decode = steps[0], steps[1:]
    added = 0 if method.startswith("prefix") else P
    assert prefill["attention_mask"].shape[1] == P + 5
    assert (prefill["inputs_embeds"] if added else prefill["input_ids"]).shape[1] == added + 5
    for k, step in enumerate(decode, start=1):
        assert step["input_ids"].shape == (2, 1) and step.get("inputs_embeds") is None
        assert step["attention_mask"].shape[1] == P + 5 + k


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("kind", DECODERS)
def test_sampled_generation_with_cache_equals_the_no_cache_reference(kind, method):
    model = adapted(kind, method)
    batch = pad(ids([5, 3], seed=11), "left")
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = generate(model, batch, do_sample=True, top_k=0, top_p=1.0, temperature=1.0)
        assert torch.equal(out.sequences, reference(model, batch, sample_seed=seed))


def test_generation_without_an_active_input_adapter_is_the_base_models():
    model = adapted("llama", "prompt")
    batch = pad(ids([5, 3], seed=7), "left")
    base = MODELS["llama"]()
    with peftkit.disabled(model):
        got = generate(model, batch, do_sample=False).sequences
    assert torch.equal(got, generate(base, batch, do_sample=False).sequences)
