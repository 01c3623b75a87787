"""(IA)³ — "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning" (Liu et al., 2022): Infused Adapter by Inhibiting and Amplifying Inner Activations.

Each adapted layer learns one vector l. On a feed-forward module (``feedforward_modules``)
it scales the layer's *input* features, ``base(x ⊙ l)``; elsewhere (keys, values) it scales the
*output*, ``base(x) ⊙ l``. Vectors start at one, so the model equals the base at init.

Several active (IA)³ adapters on one layer compose by multiplication (their vectors multiply).
Merging scales the weight's input columns (feed-forward) or output rows and bias (others);
unmerging divides again, which is exact up to rounding while no entry of l is zero.

File key ``ia3_l`` with HF PEFT's shapes: (1, in_features) on feed-forward modules,
(out_features, 1) elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .. import architectures
from ..config import TargetedConfig, check_bool, check_names, normalize_names
from ..errors import ConfigError, ModelError
from ..layer import Unit
from ..unit import MixTerms, adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d, matches


@dataclass
class IA3Config(TargetedConfig):
    """(IA)³ settings; names as in HF PEFT's ``adapter_config.json``.

    ``target_modules``/``feedforward_modules`` default, per model type, to HF PEFT's choice
    (keys, values and the feed-forward output projection); every feed-forward module must
    also be a target.
    """

    peft_type: ClassVar[str] = "IA3"

    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    init_ia3_weights: bool = True

    def validate(self) -> None:
        super().validate()
        check_names("feedforward_modules", self.feedforward_modules)
        self.feedforward_modules = normalize_names(self.feedforward_modules)
        check_bool("init_ia3_weights", self.init_ia3_weights)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)


    def file_dict(self, adapted: list[str]) -> dict[str, Any]:
        data = super().file_dict(adapted)
        if adapted:
            data["feedforward_modules"] = sorted(p for p in adapted if matches(self.feedforward_modules, p))
            # HF PEFT's IA3Config has no layer filters; the exact lists above already apply them.
            data.pop("layers_to_transform", None)
            data.pop("layers_pattern", None)
        return data


class IA3Unit(Unit):
    """A learned scaling vector on the input (feed-forward) or the output of one layer."""

    mergeable: ClassVar[bool] = True

    def __init__(self, features: int, on_input: bool, transposed: bool, init: bool, factory: dict) -> None:
        super().__init__()
        self.on_input = on_input
        self.acts_on_input = on_input  # instance attribute: the host reads it per unit
        self.transposed = transposed  # Conv1D: weight is (in, out)
        shape = (1, features) if on_input else (features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory) if init else torch.randn(shape, **factory))

    def adjust_input(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.ia3_l.view(-1).to(x.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.on_input:
            return out
        return out * self.ia3_l.view(-1).to(out.dtype)

    def _factor(self, base: nn.Module) -> torch.Tensor:
        """l shaped to broadcast against the base weight."""
        l = self.ia3_l.view(-1).to(base.weight.dtype)
        along_out = not self.on_input
        # nn.Linear weight is (out, in); Conv1D weight is (in, out).
        if along_out != self.transposed:
            return l.view(-1, 1)
        return l.view(1, -1)

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            base.weight.mul_(self._factor(base))
            if not self.on_input and getattr(base, "bias", None) is not None:
                base.bias.mul_(self.ia3_l.view(-1).to(base.bias.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        if (self.ia3_l == 0).any():
            raise ModelError("an (IA)³ vector has a zero entry; its merge cannot be undone")
        with torch.no_grad():
            base.weight.div_(self._factor(base))
            if not self.on_input and getattr(base, "bias", None) is not None:
                base.bias.div_(self.ia3_l.view(-1).to(base.bias.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def mix_terms(self) -> MixTerms:
        l = self.ia3_l.detach().view(-1)
        return MixTerms(in_scale=l) if self.on_input else MixTerms(out_scale=l)


def make_unit(config: IA3Config, module: nn.Module, path: str) -> IA3Unit:
    on_input = matches(config.feedforward_modules, path, "feedforward_modules")
    if not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ConfigError(f"(IA)³ cannot adapt {path!r} of type {type(module).__name__}; supported: Linear, Conv1D")
    weight = module.weight
    factory = adapter_factory(module)
    if isinstance(module, nn.Linear):
        n_in, n_out, transposed = module.in_features, module.out_features, False
    else:  # Conv1D
        (n_in, n_out), transposed = weight.shape, True
    return IA3Unit(n_in if on_input else n_out, on_input, transposed, config.init_ia3_weights, factory)


# HF PEFT's choice, from the role map: (targets, feed-forward modules) per model type.
DEFAULTS = architectures.table(architectures.ia3_targets)


def prepare(model: nn.Module, config: IA3Config) -> IA3Config:
    """Fill in the model type's default targets and feed-forward modules."""
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if config.target_modules is None and kind in DEFAULTS:
        config.target_modules, ff = (list(v) for v in DEFAULTS[kind])
        if config.feedforward_modules is None:
            config.feedforward_modules = ff
    if config.feedforward_modules is None:
        config.feedforward_modules = []
    return config


register(Method(
    "IA3", IA3Config, make_unit=make_unit, prepare=prepare, default_targets={k: v[0] for k, v in DEFAULTS.items()},
    mergeable=True, identity_at_init=True,
    # With --targets, every target is scaled at its output (no feed-forward module). Its vectors
    # are multiplicative scales: they need larger steps than LoRA.
    cli=(CliMethod("ia3", "(IA)³: learned scaling vectors on keys, values and the feed-forward",
                   lambda values: IA3Config(target_modules=values["targets"]), ("targets",), {"lr": 1e-2}),),
))
