"""LayerNorm tuning — "Tuning LayerNorm in Attention: Towards Efficient Multi-Modal LLM
Finetuning" (Zhao et al., 2023), HF PEFT's ``LN_TUNING``.

Each adapted norm layer gets a trainable copy of itself; while the adapter is active the copy
computes the layer's output and the frozen original is not called (``Unit.replaces_base``).
The copy starts equal to the original, so the model equals the base at init.

Layer types: norm layers that hold their own parameters and no submodules: ``nn.LayerNorm``,
``nn.GroupNorm``, ``nn.RMSNorm`` and any class whose name (or a base class's) contains
``LayerNorm``, ``RMSNorm`` or ``GroupNorm`` (transformers' ``LlamaRMSNorm``, ``T5LayerNorm``,
``Qwen2RMSNorm``, ``ConvNextLayerNorm``, ...). HF PEFT itself copies whatever module it is
pointed at (its llava defaults include ``embed_tokens`` and ``lm_head``); peftkit refuses any
other layer with a ``ConfigError`` naming it, so a whole block matched by a loose name is not
silently duplicated.

Composition (the host's rule): a copy replaces the base layer, so at most one LN tuning
adapter may be active on a layer (``ModelError`` otherwise, as HF PEFT's ``ValueError``);
other units on the same layer run after it, on the copy's output.

Merging copies the trained copy's parameters (and persistent buffers) into the base layer,
keeping the originals, so unmerging restores them bit for bit (HF PEFT swaps the two
modules: the same function, the same weights after ``merge_and_unload``).

File keys, as HF PEFT writes them: ``base_model.model.<path>.ln_tuning_layers.<name>`` for
every entry of the copy's ``state_dict`` (``weight``, and ``bias`` where the norm has one).
HF PEFT's config has no layer filters, so ``layers_to_transform``/``layers_pattern`` are
applied here and the file names the exact modules adapted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .. import architectures
from ..config import TargetedConfig, check_bool
from ..errors import ConfigError
from ..layer import Unit
from ..registry import CliMethod, Method, register
from ..targeting import ALL_LINEAR, logical_modules, model_type

# Suffix of the copy's entries in HF PEFT's file (its ``LNTuningLayer.ln_tuning_layers``).
FILE_KEY = "ln_tuning_layers"
NORM_CLASSES = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)) if c is not None)
NORM_NAMES = ("LayerNorm", "RMSNorm", "GroupNorm")
SUPPORTED = "norm layers (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, classes named *LayerNorm*, *RMSNorm*, *GroupNorm*)"
# How far init_weights=False moves the copies away from the originals (standard deviation).
PERTURBATION = 0.1


@dataclass
class LNTuningConfig(TargetedConfig):
    """LayerNorm tuning settings; names as in HF PEFT's ``adapter_config.json``.

    HF PEFT's fields are ``target_modules``, ``exclude_modules`` and ``modules_to_save``
    (all implemented; none left unsupported). ``target_modules=None`` means the norm layers of
    the model type (``architectures.ROLES[...].norms``).

    ``init_weights`` is peftkit's own: True (the default, the method's init) starts every copy
    equal to its original; False moves each copy's parameters by N(0, 0.1²) noise, for tests
    that need an adapter that changes the output. It is not written to files (HF PEFT has no
    such field, and a file's tensors fix the copies whatever their init).
    """

    peft_type: ClassVar[str] = "LN_TUNING"
    unsupported_defaults: ClassVar[dict[str, Any]] = {}

    init_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_bool("init_weights", self.init_weights)
        if self.target_modules == ALL_LINEAR:
            raise ConfigError(f"target_modules: expected names or a regex of norm layers, found {ALL_LINEAR!r} "
                              "(LN tuning trains copies of norm layers, not linear ones)")

    def file_dict(self, adapted: list[str]) -> dict[str, Any]:
        data = super().file_dict(adapted)
        data.pop("init_weights", None)
        if adapted:  # the exact list of adapted names already applies the layer filters
            data.pop("layers_to_transform", None)
            data.pop("layers_pattern", None)
        return data


def is_norm(module: nn.Module) -> bool:
    """A norm layer by type, or by the name of its class or one of its base classes."""
    return isinstance(module, NORM_CLASSES) or any(
        part in cls.__name__ for cls in type(module).__mro__ for part in NORM_NAMES)


class LNTuningUnit(Unit):
    """A trainable copy of one norm layer that computes the layer's output in its place."""

    mergeable: ClassVar[bool] = True
    replaces_base: ClassVar[bool] = True

    def __init__(self, base: nn.Module, init: bool) -> None:
        super().__init__()
        self.norm = copy.deepcopy(base)
        if not init:
            with torch.no_grad():
                for p in self.norm.parameters():
                    p.add_(torch.randn_like(p) * PERTURBATION)
        self._original: dict[str, torch.Tensor] | None = None  # the base's tensors while merged

    def forward(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        # The host runs a replacing unit first, with out=None: the copy's output is the layer's.
        return self.norm(x)

    def merge_into(self, base: nn.Module) -> None:
        target = base.state_dict(keep_vars=True)
        source = self.norm.state_dict(keep_vars=True)
        with torch.no_grad():
            self._original = {k: t.detach().clone() for k, t in target.items()}
            for key, tensor in source.items():
                target[key].copy_(tensor)

    def unmerge_from(self, base: nn.Module) -> None:
        if self._original is None:
            return
        target = base.state_dict(keep_vars=True)
        with torch.no_grad():
            for key, tensor in self._original.items():
                target[key].copy_(tensor)
        self._original = None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{FILE_KEY}.{k}": t for k, t in self.norm.state_dict(keep_vars=True).items()}


def make_unit(config: LNTuningConfig, module: nn.Module, path: str) -> LNTuningUnit:
    kind = type(module).__name__
    if not is_norm(module):
        raise ConfigError(f"LN tuning cannot adapt {path!r} of type {kind}; supported: {SUPPORTED}")
    if next(module.children(), None) is not None:
        raise ConfigError(f"LN tuning cannot adapt {path!r} of type {kind}: it has submodules; "
                          f"supported: {SUPPORTED} holding their own parameters")
    if next(module.parameters(), None) is None:
        raise ConfigError(f"LN tuning cannot adapt {path!r} of type {kind}: it has no parameters to train "
                          "(e.g. elementwise_affine=False)")
    return LNTuningUnit(module, config.init_weights)


# The norm layers of each model type in the role map.
DEFAULTS = architectures.table(lambda roles: list(roles.norms) or None)


def prepare(model: nn.Module, config: LNTuningConfig) -> LNTuningConfig:
    """With no ``target_modules`` and no default for the model type, say which norms it has."""
    kind = model_type(model)
    if config.target_modules is None and kind not in DEFAULTS:
        norms = sorted({n.rsplit(".", 1)[-1] for n, m in logical_modules(model)
                        if n and is_norm(getattr(m, "base_layer", m))})
        found = f"its norm layers: {', '.join(norms)}" if norms else "it has no norm layer peftkit can adapt"
        raise ConfigError(
            f"target_modules is not set and there is no LN tuning default for model type "
            f"{kind or type(model).__name__!r} (defaults exist for: {', '.join(sorted(DEFAULTS))}); "
            f"pass target_modules ({found})"
        )
    return config


register(Method(
    "LN_TUNING", LNTuningConfig, make_unit=make_unit, prepare=prepare, default_targets=DEFAULTS,
    mergeable=True, identity_at_init=True,
    cli=(CliMethod("ln_tuning", "LayerNorm tuning: trains a copy of every norm layer",
                   lambda values: LNTuningConfig(target_modules=values["targets"]), ("targets",), {"lr": 1e-2}),),
))
