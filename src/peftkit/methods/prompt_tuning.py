"""Prompt tuning — "The Power of Scale for Parameter-Efficient Prompt Tuning" (Lester et al., 2021).

P trainable vectors, the soft prompt, are prepended to the input embeddings:
``inputs_embeds = [prompt (P, D); embed(input_ids) (T, D)]``; the model stays frozen. How
they are fed in (attention mask, positions, labels, generation) is ``peftkit.prompting``'s
job, shared with P-tuning and prefix tuning.

Initialisation (``prompt_tuning_init``): ``"RANDOM"`` draws N(0, 1) like HF PEFT's
``nn.Embedding``; ``"TEXT"`` copies the word embeddings of ``prompt_tuning_init_text``
tokenised with ``tokenizer_name_or_path`` (repeated or cut to P tokens); ``"SAMPLE_VOCAB"``
copies the embeddings of P random vocabulary entries. The file stores the prompt itself under
``prompt_embeddings`` (P, D).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..prompting import InputAdapter, ModelShape, PromptLearningConfig, attach
from ..registry import CliMethod, Method, register

INITS = ("RANDOM", "TEXT", "SAMPLE_VOCAB")


@dataclass
class PromptTuningConfig(PromptLearningConfig):
    """Prompt tuning settings; names and meanings as in HF PEFT's ``adapter_config.json``."""

    peft_type: ClassVar[str] = "PROMPT_TUNING"

    prompt_tuning_init: str = "RANDOM"
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None

    def validate(self) -> None:
        super().validate()
        self.prompt_tuning_init = str(getattr(self.prompt_tuning_init, "value", self.prompt_tuning_init))
        if self.prompt_tuning_init not in INITS:
            raise ConfigError(f"prompt_tuning_init: expected one of {', '.join(INITS)}, found {self.prompt_tuning_init!r}")
        if isinstance(self.tokenizer_name_or_path, os.PathLike):
            self.tokenizer_name_or_path = os.fspath(self.tokenizer_name_or_path)  # a str in the file
        for name in ("prompt_tuning_init_text", "tokenizer_name_or_path"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: expected a string or None, found {getattr(self, name)!r}")
        if self.prompt_tuning_init == "TEXT" and not (self.prompt_tuning_init_text and self.tokenizer_name_or_path):
            raise ConfigError("prompt_tuning_init='TEXT' needs prompt_tuning_init_text and tokenizer_name_or_path")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ConfigError(f"tokenizer_kwargs: expected a mapping, found {self.tokenizer_kwargs!r}")


class PromptEmbedding(InputAdapter):
    """The soft prompt: ``embedding.weight`` (P, D) is both what is fed in and what is saved."""

    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__(num_virtual_tokens)
        self.embedding = nn.Embedding(num_virtual_tokens, dim)  # N(0, 1) init, as HF PEFT

    def prompt(self) -> torch.Tensor:
        return self.embedding.weight  # (P, D)

    def file_tensor(self) -> torch.Tensor:
        return self.embedding.weight


def _init_ids(config: PromptTuningConfig, vocab_size: int) -> torch.Tensor:
    """Token ids whose embeddings initialise the prompt (TEXT / SAMPLE_VOCAB), P of them."""
    count = config.num_virtual_tokens
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        return torch.randint(0, vocab_size, (count,))
    from transformers import AutoTokenizer

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs.pop("trust_remote_code", None)  # a config file must not be able to run code
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tokenizer_name_or_path {config.tokenizer_name_or_path!r}: cannot load a tokenizer: {exc}") from None
    ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
    if not ids:
        raise ConfigError("prompt_tuning_init_text tokenizes to no tokens")
    ids = (ids * math.ceil(count / len(ids)))[:count]  # repeat, then cut to P
    if max(ids) >= vocab_size:
        raise ConfigError(f"tokenizer {config.tokenizer_name_or_path!r} gives token id {max(ids)}, "
                          f"beyond the model's vocabulary of {vocab_size}")
    return torch.tensor(ids, dtype=torch.long)


def build(config: PromptTuningConfig, shape: ModelShape, model: nn.Module) -> PromptEmbedding:
    adapter = PromptEmbedding(config.num_virtual_tokens, config.token_dim)
    if config.prompt_tuning_init != "RANDOM" and not config.inference_mode:
        words = model.get_input_embeddings()
        ids = _init_ids(config, words.weight.shape[0]).to(words.weight.device)
        with torch.no_grad():
            adapter.embedding.weight.copy_(words(ids).detach().float())
    return adapter


def _attach(model: nn.Module, config: PromptTuningConfig, name: str) -> None:
    attach(model, config, name, build)


register(Method(
    "PROMPT_TUNING", PromptTuningConfig, attach=_attach, module_prefix="base_model.",
    # N(0, 1) prompts (HF PEFT's init) need much larger steps than LoRA
    cli=(CliMethod("prompt", "prompt tuning: trained virtual token embeddings before the input",
                   lambda values: PromptTuningConfig(num_virtual_tokens=values["virtual_tokens"]),
                   ("virtual_tokens",), {"lr": 1e-1}),),
))
