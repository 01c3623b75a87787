"""Tiny models, configs and batches shared by the input-method tests (test_prompt_*.py)."""

from __future__ import annotations

import torch

import peftkit
from conftest import tiny_bert, tiny_gpt2, tiny_llama

VOCAB = 120
PAD = 0  # the tiny decoders' pad (= eos) token; real tokens are drawn from 1..VOCAB-1


def tiny_gpt2_cls(seed: int = 0, num_labels: int = 2):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, num_labels=num_labels,
                     bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    return GPT2ForSequenceClassification(cfg).eval()


def tiny_llama_cls(seed: int = 0, num_labels: int = 2):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, num_labels=num_labels,
                      bos_token_id=0, eos_token_id=0, pad_token_id=PAD)
    return LlamaForSequenceClassification(cfg).eval()


MODELS = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama,
          "gpt2_cls": tiny_gpt2_cls, "llama_cls": tiny_llama_cls}
DECODERS = ("gpt2", "llama")


def peftkit_config(method: str, tokens: int = 4):
    return {
        "prompt": lambda: peftkit.PromptTuningConfig(num_virtual_tokens=tokens),
        "ptuning": lambda: peftkit.PTuningConfig(num_virtual_tokens=tokens, encoder_hidden_size=16),
        "ptuning_lstm": lambda: peftkit.PTuningConfig(num_virtual_tokens=tokens, encoder_hidden_size=8,
                                                      encoder_reparameterization_type="LSTM"),
        "prefix": lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=tokens),
        "prefix_proj": lambda: peftkit.PrefixTuningConfig(num_virtual_tokens=tokens, prefix_projection=True,
                                                          encoder_hidden_size=16),
    }[method]()


def ids(rows: list[int], seed: int = 1) -> list[torch.Tensor]:
    """One 1-D tensor of real token ids per requested row length."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in rows]


def pad(rows: list[torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """A batch of ``rows`` padded with PAD on ``side`` ("left" or "right"), with its mask."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        input_ids[i, span] = r
        mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def perturb(params, scale: float = 0.1, seed: int = 3) -> None:
    """Move every given parameter, as training would, so a dropped tensor changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g))
