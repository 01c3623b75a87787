"""P-tuning — "GPT Understands, Too" (Liu et al., 2021).

Like prompt tuning, P virtual token embeddings are prepended to the input, but during
training they are produced by a small prompt encoder from P trainable input vectors:

- ``"MLP"``: ``Linear(D, H) → ReLU → Linear(H, H) → ReLU → Linear(H, D)``
- ``"LSTM"``: a bidirectional LSTM (``encoder_num_layers`` layers, hidden H, dropout
  ``encoder_dropout``) then ``Linear(2H, 2H) → ReLU → Linear(2H, D)``

with H = ``encoder_hidden_size`` (default: D). The encoder only reparameterises training:
what is saved, and used at inference, is its output, the prompt (P, D), under
``prompt_embeddings`` (as HF PEFT does). A config with ``inference_mode=True`` — every loaded
file — therefore holds the prompt itself as a parameter and no encoder, and
``load(..., trainable=True)`` continues training that prompt directly.

During training the whole encoder lives in the model (``model.peftkit_prompts``), so a
training checkpoint of the model's (or the adapter's) state dict keeps it. Submodule names
(``embedding``, ``mlp_head``, ``lstm_head``) are HF PEFT's, so its encoder's state dict loads
into this one unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn as nn

from ..config import check_number, check_positive_int
from ..errors import ConfigError
from ..prompting import InputAdapter, ModelShape, PromptLearningConfig, attach
from ..registry import Method, register

ENCODERS = ("MLP", "LSTM")


@dataclass
class PTuningConfig(PromptLearningConfig):
    """P-tuning settings; names and meanings as in HF PEFT's ``PromptEncoderConfig``."""

    peft_type: ClassVar[str] = "P_TUNING"

    encoder_reparameterization_type: str = "MLP"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        kind = str(getattr(self.encoder_reparameterization_type, "value", self.encoder_reparameterization_type))
        if kind not in ENCODERS:
            raise ConfigError(f"encoder_reparameterization_type: expected 'MLP' or 'LSTM', found {kind!r}")
        self.encoder_reparameterization_type = kind
        if self.encoder_hidden_size is not None:
            check_positive_int("encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int("encoder_num_layers", self.encoder_num_layers)
        check_number("encoder_dropout", self.encoder_dropout, 0.0, 1.0)


PromptEncoderConfig = PTuningConfig  # HF PEFT's name


class PromptEncoder(InputAdapter):
    """P input vectors and, when training, the encoder that turns them into the prompt."""

    def __init__(self, config: PTuningConfig, dim: int) -> None:
        super().__init__(config.num_virtual_tokens)
        self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
        self.encoder_type = config.encoder_reparameterization_type
        self.reparameterized = not config.inference_mode
        if not self.reparameterized:
            return  # the embedding is the prompt
        hidden = config.encoder_hidden_size
        if self.encoder_type == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=config.encoder_num_layers, dropout=config.encoder_dropout,
                                     bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def prompt(self) -> torch.Tensor:
        x = self.embedding.weight  # (P, D)
        if not self.reparameterized:
            return x
        if self.encoder_type == "LSTM":
            return self.mlp_head(self.lstm_head(x.unsqueeze(0))[0])[0]  # (1, P, 2H) -> (P, D)
        return self.mlp_head(x)  # (P, D)

    def file_tensor(self) -> torch.Tensor:
        return self.prompt() if self.reparameterized else self.embedding.weight


def build(config: PTuningConfig, shape: ModelShape, model: nn.Module) -> PromptEncoder:
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    return PromptEncoder(config, config.token_dim)


def _attach(model: nn.Module, config: PTuningConfig, name: str) -> None:
    attach(model, config, name, build)


register(Method("P_TUNING", PTuningConfig, attach=_attach, module_prefix="base_model."))
