"""Prefix tuning — "Prefix-Tuning: Optimizing Continuous Prompts for Generation" (Li & Liang, 2021).

Every attention layer gets P trainable key/value pairs in front of the real tokens' keys and
values; the real tokens attend to them, the model stays frozen. ``peftkit.prompting`` puts
them in the KV cache at prefill, extends the attention mask and sets positions (decoders:
real tokens at P..P+T−1; encoders: real tokens keep 0..T−1).

Parameters, as HF PEFT: ``embedding`` (P, L·2·token_dim) holds the prefixes directly; with
``prefix_projection=True`` it is (P, token_dim) and, during training, an MLP
``Linear(token_dim, H) → Tanh → Linear(H, L·2·token_dim)`` (H = ``encoder_hidden_size``)
produces them. For grouped-query attention token_dim = key/value heads × head size (and
``num_attention_heads`` = key/value heads). ``init_weights="zero"`` starts the prefixes (or
the projection's last layer) at zero. The file stores the prefixes, (P, L·2·token_dim), under
``prompt_embeddings``; in column block 2l is layer l's key, 2l+1 its value, each (heads, head size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import check_positive_int
from ..errors import ConfigError
from ..prompting import InputAdapter, ModelShape, PromptLearningConfig, attach
from ..registry import CliMethod, Method, register


@dataclass
class PrefixTuningConfig(PromptLearningConfig):
    """Prefix tuning settings; names and meanings as in HF PEFT's ``adapter_config.json``."""

    peft_type: ClassVar[str] = "PREFIX_TUNING"

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        if not isinstance(self.prefix_projection, bool):
            raise ConfigError(f"prefix_projection: expected true or false, found {self.prefix_projection!r}")
        if self.init_weights not in (None, "zero"):
            raise ConfigError(f"init_weights: expected None or 'zero', found {self.init_weights!r}")


class PrefixEncoder(InputAdapter):
    """The prefixes of every layer, (P, L·2·token_dim), optionally through a projection MLP."""

    kind: ClassVar[str] = "prefix"

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__(config.num_virtual_tokens)
        width = config.num_layers * 2 * config.token_dim
        self.projected = config.prefix_projection and not config.inference_mode
        if self.projected:
            self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim)
            self.transform = nn.Sequential(nn.Linear(config.token_dim, config.encoder_hidden_size), nn.Tanh(),
                                           nn.Linear(config.encoder_hidden_size, width))
            last = self.transform[-1]
            if config.init_weights == "zero":
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)  # N(0, 1) init, as HF PEFT
            if config.init_weights == "zero":
                nn.init.zeros_(self.embedding.weight)

    def prompt(self) -> torch.Tensor:
        if self.projected:
            return self.transform(self.embedding.weight)  # (P, token_dim) -> (P, L·2·token_dim)
        return self.embedding.weight

    def file_tensor(self) -> torch.Tensor:
        return self.prompt() if self.projected else self.embedding.weight


def build(config: PrefixTuningConfig, shape: ModelShape, model: nn.Module) -> PrefixEncoder:
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return PrefixEncoder(config)


def _attach(model: nn.Module, config: PrefixTuningConfig, name: str) -> None:
    attach(model, config, name, build)


register(Method(
    "PREFIX_TUNING", PrefixTuningConfig, attach=_attach, module_prefix="base_model.",
    gradient_checkpointing=False,  # recomputed layers drop the key/value cache the prefixes live in
    cli=(CliMethod("prefix", "prefix tuning: trained key/value prefixes in every layer",
                   lambda values: PrefixTuningConfig(num_virtual_tokens=values["virtual_tokens"]),
                   ("virtual_tokens",), {"lr": 3e-2}),),
))
