"""Bottleneck adapters — "Parameter-Efficient Transfer Learning for NLP" (Houlsby et al., 2019),
"AdapterFusion" (Pfeiffer et al., 2021) for the FFN-only placement, and "Towards a Unified View
of Parameter-Efficient Transfer Learning" (He et al., 2022) for the parallel one.

An adapter is ``h ↦ s · up(act(down(h)))`` with down: dim → bottleneck, up: bottleneck → dim;
``up`` starts at zero, so the model equals the base at init.

- ``houlsby``: serial, after the attention output projection and after the feed-forward output
  projection, before the residual connection: ``out ↦ out + adapter(out)``.
- ``pfeiffer``: serial, after the feed-forward output projection only.
- ``parallel``: beside the feed-forward block, reading the block's input h and adding to its
  output: ``FFN(h) + adapter(h)``. For BERT-style blocks, whose output module also adds the
  residual and normalises, the adapter term is added to the residual argument before that
  (the same sum, before the LayerNorm).

Several active bottleneck adapters on a layer are *stacked* in the order given to
``set_active`` (the second reads the first's output). Not mergeable (they are non-linear).

Insertion points come from the model's module names through a small declarative mapping per
architecture (``INSERTION``), with relative names inside one transformer layer; pass
``AdapterConfig(insertion={...})`` for other models. Files use HF PEFT's directory layout with
``peft_type`` "BOTTLENECK" (peftkit's own) and keys ``<path>.adapter_down.weight`` etc.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import architectures
from ..config import TargetedConfig, check_number, check_positive_int
from ..errors import ConfigError
from ..layer import Unit
from ..unit import adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d

VARIANTS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "silu": F.silu, "tanh": torch.tanh}
INSERTION_KEYS = ("layers", "attn_out", "ffn_out", "ffn", "ffn_residual_arg")

# Per transformers model_type, from the role map: module names relative to one transformer
# layer. ffn_residual_arg: index of the positional argument of the ``ffn`` module that carries
# the block's input when that module adds the residual itself (BERT's ``output(hidden, input)``).
INSERTION = architectures.table(architectures.insertion)


@dataclass
class AdapterConfig(TargetedConfig):
    """Bottleneck adapter settings. ``bottleneck_size`` wins over ``reduction_factor``."""

    peft_type: ClassVar[str] = "BOTTLENECK"

    variant: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: int | None = None
    non_linearity: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    init: str = "identity"  # "identity" (up = 0) or "random" (both random; for tests)
    insertion: dict[str, Any] | None = None  # target_modules is derived from it and the variant when None

    def validate(self) -> None:
        super().validate()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant: expected one of {', '.join(VARIANTS)}, found {self.variant!r}")
        check_positive_int("reduction_factor", self.reduction_factor)
        if self.bottleneck_size is not None:
            check_positive_int("bottleneck_size", self.bottleneck_size)
        if not isinstance(self.non_linearity, str) or self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity: expected one of {', '.join(ACTIVATIONS)}, found {self.non_linearity!r}")
        check_number("scaling", self.scaling)
        check_number("dropout", self.dropout, 0.0, 1.0)
        if self.init not in ("identity", "random"):
            raise ConfigError(f"init: expected 'identity' or 'random', found {self.init!r}")
        if self.insertion is not None:
            _check_insertion(self.insertion)


def _check_insertion(insertion: Any) -> None:
    if not isinstance(insertion, dict):
        raise ConfigError(f"insertion: expected a mapping with keys {INSERTION_KEYS}, found {insertion!r}")
    unknown = set(insertion) - set(INSERTION_KEYS)
    missing = {"layers", "attn_out", "ffn_out", "ffn"} - set(insertion)
    if unknown or missing:
        raise ConfigError(f"insertion: expected keys {INSERTION_KEYS}; unknown {sorted(map(str, unknown))}, "
                          f"missing {sorted(missing)}")
    for key in ("layers", "attn_out", "ffn_out", "ffn"):
        if not isinstance(insertion[key], str) or not insertion[key]:
            raise ConfigError(f"insertion[{key!r}]: expected a module name (a string), found {insertion[key]!r}")
    arg = insertion.get("ffn_residual_arg")
    if arg is not None and (not isinstance(arg, int) or isinstance(arg, bool) or arg < 1):
        raise ConfigError(f"insertion['ffn_residual_arg']: expected None or a positive argument index, found {arg!r}")
    ffn, ffn_out = insertion["ffn"], insertion["ffn_out"]
    if not ffn_out.startswith(ffn + "."):
        raise ConfigError(f"insertion: ffn_out {ffn_out!r} must lie inside ffn {ffn!r}")


def _role_pattern(insertion: dict, role: str) -> str:
    return rf"(.*\.)?{re.escape(insertion['layers'])}\.\d+\.{re.escape(insertion[role])}"


def _roles(config: AdapterConfig) -> tuple[str, ...]:
    return {"houlsby": ("attn_out", "ffn_out"), "pfeiffer": ("ffn_out",), "parallel": ("ffn",)}[config.variant]


def prepare(model: nn.Module, config: AdapterConfig) -> AdapterConfig:
    """Resolve the insertion mapping for the model type and derive the target modules."""
    if config.insertion is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        if kind not in INSERTION:
            raise ConfigError(
                f"bottleneck adapters have no insertion mapping for model type {kind or type(model).__name__!r} "
                f"(supported model types: {', '.join(sorted(INSERTION))}); "
                "pass AdapterConfig(insertion={'layers': 'encoder.layer', 'attn_out': 'attention.output.dense', "
                "'ffn_out': 'output.dense', 'ffn': 'output', 'ffn_residual_arg': 1}) with the names of "
                "your model's modules (relative to one transformer layer)"
            )
        config.insertion = dict(INSERTION[kind])
    if config.target_modules is None:
        config.target_modules = "|".join(f"(?:{_role_pattern(config.insertion, r)})" for r in _roles(config))
    return config


class BottleneckUnit(Unit):
    """``s · up(act(down(h)))`` added to the output (serial), or from the input (parallel)."""

    def __init__(self, dim: int, size: int, mode: str, residual_arg: int | None, config: AdapterConfig,
                 factory: dict) -> None:
        super().__init__()
        self.mode = mode  # "serial" | "parallel"
        self.residual_arg = residual_arg
        self.acts_on_input = mode == "parallel" and residual_arg is not None
        self.act = ACTIVATIONS[config.non_linearity]
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else None
        self.adapter_down = nn.Linear(dim, size, **factory)
        self.adapter_up = nn.Linear(size, dim, **factory)
        if config.init == "identity":
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def adapter(self, h: torch.Tensor) -> torch.Tensor:
        z = self.act(self.adapter_down(h.to(self.adapter_down.weight.dtype)))  # (..., bottleneck)
        if self.dropout is not None:
            z = self.dropout(z)
        return (self.adapter_up(z) * self.scaling).to(h.dtype)

    def adjust_call(self, x: torch.Tensor, args: tuple) -> tuple[torch.Tensor, tuple]:
        i = self.residual_arg - 1  # args excludes the first input
        if i < 0 or i >= len(args):
            raise ConfigError(f"bottleneck adapter: the feed-forward module was called without argument {i + 1}")
        residual = args[i]
        return x, args[:i] + (residual + self.adapter(residual),) + args[i + 1:]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.mode == "serial":
            return out + self.adapter(out)
        if self.acts_on_input:
            return out
        return out + self.adapter(x)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{m}.{p}": t for m in ("adapter_down", "adapter_up")
                for p, t in getattr(self, m).named_parameters()}


def _out_features(module: nn.Module, path: str) -> int:
    if isinstance(module, nn.Linear):
        return module.out_features
    if is_conv1d(module):
        return module.weight.shape[1]
    raise ConfigError(f"bottleneck adapter: {path!r} is a {type(module).__name__}, expected a Linear projection")


def make_unit(config: AdapterConfig, module: nn.Module, path: str) -> BottleneckUnit:
    ins = config.insertion
    if config.variant == "parallel":
        inner = ins["ffn_out"][len(ins["ffn"]) + 1:]
        try:
            projection = module.get_submodule(inner)
        except AttributeError:
            raise ConfigError(f"bottleneck adapter: {path!r} has no submodule {inner!r} (insertion ffn_out)") from None
        dim, mode, residual_arg = _out_features(projection, f"{path}.{inner}"), "parallel", ins.get("ffn_residual_arg")
    else:
        dim, mode, residual_arg = _out_features(module, path), "serial", None
    size = config.bottleneck_size or max(1, dim // config.reduction_factor)
    return BottleneckUnit(dim, size, mode, residual_arg, config, adapter_factory(module, next(module.parameters())))


register(Method(
    "BOTTLENECK", AdapterConfig, make_unit=make_unit, prepare=prepare, identity_at_init=True,
    # Inserted where the architecture says (no --targets); they act on the full hidden width and
    # want smaller steps than LoRA.
    cli=(CliMethod("adapter", "Houlsby bottleneck adapters after each attention and feed-forward block",
                   lambda values: AdapterConfig(variant="houlsby", dropout=values["dropout"]), ("dropout",),
                   {"lr": 1e-3}),),
))
