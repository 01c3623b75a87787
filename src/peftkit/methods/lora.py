"""LoRA — "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021) — and DoRA.

A frozen weight W gets a trainable low-rank update: ``out = base(x) + s · dropout(x) Aᵀ Bᵀ``
with A (r, in), B (out, r) and s = lora_alpha / r (or lora_alpha / √r with rsLoRA,
Kalajdzievski 2023). B starts at zero, so the adapted model equals the base at init.

Several active LoRA adapters on one layer compose by addition: each adds its own term.
Merging adds ``s · B A`` to W (in the layer's own layout), which is exact up to rounding.

With ``use_dora=True`` the unit is DoRA's (``DoraLinear`` below).

Layer types: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored (in, out)),
``nn.Conv2d`` (A is a conv with the base's kernel/stride/padding, B a 1x1 conv) and
``nn.Embedding`` (A (r, num_embeddings), B (dim, r), file keys without ``.weight``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import architectures, quant
from ..config import TargetedConfig, check_bool, check_number, check_pattern, check_positive_int
from ..errors import ConfigError
from ..layer import DeltaUnit
from ..unit import MixTerms, adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d, pattern_value

INIT_CHOICES = (True, False, "gaussian")


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA settings; names and meanings as in HF PEFT's ``adapter_config.json``."""

    peft_type: ClassVar[str] = "LORA"
    unsupported_defaults: ClassVar[dict[str, Any]] = {
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "lora_ga_config": None,
        "velora_config": None,
        "monteclora_config": None,
        "arrow_config": None,
        "kasa_config": None,
        "megatron_config": None,
        "trainable_token_indices": None,
        "alora_invocation_tokens": None,
        "use_qalora": False,
        "use_bdlora": None,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
        "ensure_weight_tying": False,
    }
    ignored_fields: ClassVar[frozenset[str]] = frozenset(
        {"megatron_core", "qalora_group_size", "runtime_config"}
    )

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    fan_in_fan_out: bool = False
    use_dora: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
            check_bool(name, getattr(self, name))
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias: expected 'none', 'all' or 'lora_only', found {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or isinstance(init, str) and init in INIT_CHOICES):  # not 1 or 0.0
            raise ConfigError(
                f"init_lora_weights: peftkit supports True, False or 'gaussian', found {self.init_lora_weights!r}"
            )
        self.rank_pattern = check_pattern("rank_pattern", self.rank_pattern, check_positive_int)
        self.alpha_pattern = check_pattern("alpha_pattern", self.alpha_pattern, check_number)


# -- units --------------------------------------------------------------------------------


class LoraUnit(DeltaUnit):
    """Shared by every layer type: rank, scaling, dropout; merged through ``delta_weight``."""

    def __init__(self, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__()
        self.r = r
        # A float, or a 0-d tensor once ``swap.prepare_hotswap`` made it swappable in place.
        self.scaling: float | torch.Tensor = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # None: no call, no copy

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.dropout is None else self.dropout(x)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={float(self.scaling):g}"

    def ranked(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B as the file holds them: their first ``r`` ranks (``swap.prepare_hotswap``
        pads them beyond ``r`` with zeros, which the file does not carry)."""
        if a.shape[0] == self.r:
            return a, b
        return a[: self.r], b[:, : self.r]


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str, r: int) -> None:
    """Initialise A and B for linear-like layers: B = 0 unless ``init`` is False."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)


class LoraLinear(LoraUnit):
    """For ``nn.Linear`` and transformers' ``Conv1D`` (``transposed``: weight is (in, out))."""

    def __init__(self, in_features: int, out_features: int, transposed: bool, r: int, alpha: float,
                 dropout: float, rslora: bool, init: bool | str, factory: dict) -> None:
        super().__init__(r, alpha, dropout, rslora)
        self.transposed = transposed
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        _init_pair(self.lora_A, self.lora_B, init, r)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.dropped(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        h = h.reshape(-1, h.shape[-1]) @ self.lora_A.t()  # (N, r)
        out2d = out.reshape(-1, out.shape[-1])  # (N, out)
        if out2d.dtype == h.dtype:
            if isinstance(self.scaling, torch.Tensor):  # swappable in place (hotswap): scale the small (N, r) factor
                return torch.addmm(out2d, h * self.scaling, self.lora_B.t()).view(out.shape)
            return torch.addmm(out2d, h, self.lora_B.t(), alpha=self.scaling).view(out.shape)
        return (out2d + (h @ self.lora_B.t() * self.scaling).to(out.dtype)).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.t() if self.transposed else delta

    def file_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.ranked(self.lora_A, self.lora_B)
        return {"lora_A.weight": a, "lora_B.weight": b}

    def mix_terms(self) -> MixTerms:
        return MixTerms("linear", a=self.lora_A.detach(), b=(self.lora_B * self.scaling).detach())


class LoraConv2d(LoraUnit):
    """A: conv with the base's kernel, stride, padding, dilation (r channels); B: 1x1 conv."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float, rslora: bool,
                 init: bool | str, factory: dict) -> None:
        super().__init__(r, alpha, dropout, rslora)
        if base.groups != 1:
            raise ConfigError("LoRA on a grouped Conv2d (groups > 1) is not supported")
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_channels, r, 1, 1, **factory))
        _init_pair(self.lora_A, self.lora_B, init, r)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.dropped(x).to(self.lora_A.dtype)
        h = F.conv2d(h, self.lora_A, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out + (F.conv2d(h, self.lora_B) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A) * self.scaling

    def mix_terms(self) -> MixTerms:
        return MixTerms("conv2d", a=self.lora_A.detach(), b=(self.lora_B[:, :, 0, 0] * self.scaling).detach(),
                        conv=(self.stride, self.padding, self.dilation))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.ranked(self.lora_A, self.lora_B)
        return {"lora_A.weight": a, "lora_B.weight": b}


class LoraEmbedding(LoraUnit):
    """A (r, num_embeddings) is looked up like an embedding table, then projected by B (dim, r)."""

    def __init__(self, base: nn.Embedding, r: int, alpha: float, dropout: float, rslora: bool,
                 init: bool | str, factory: dict) -> None:
        super().__init__(r, alpha, dropout, rslora)
        self.padding_idx, self.max_norm = base.padding_idx, base.max_norm
        self.norm_type, self.scale_grad_by_freq, self.sparse = base.norm_type, base.scale_grad_by_freq, base.sparse
        self.lora_embedding_A = nn.Parameter(torch.empty(r, base.num_embeddings, **factory))
        self.lora_embedding_B = nn.Parameter(torch.empty(base.embedding_dim, r, **factory))
        with torch.no_grad():
            if init is True:
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
            elif init == "gaussian":
                nn.init.normal_(self.lora_embedding_A, std=1.0 / r)
                nn.init.zeros_(self.lora_embedding_B)
            else:
                nn.init.normal_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = F.embedding(x, self.lora_embedding_A.t(), self.padding_idx, self.max_norm,
                        self.norm_type, self.scale_grad_by_freq, self.sparse)  # (..., r)
        return out + (h @ self.lora_embedding_B.t() * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_embedding_B @ self.lora_embedding_A).t() * self.scaling  # (num, dim)

    def mix_terms(self) -> MixTerms | None:
        if self.max_norm is not None:  # renormalises looked-up rows in place: not batched
            return None
        return MixTerms("embedding", a=self.lora_embedding_A.detach(), b=(self.lora_embedding_B * self.scaling).detach())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.ranked(self.lora_embedding_A, self.lora_embedding_B)
        return {"lora_embedding_A": a, "lora_embedding_B": b}


# -- DoRA -----------------------------------------------------------------------------------
# DoRA — "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., 2024).
#
# The adapted weight is split into a magnitude and a direction: W' = m · (W + s·BA) / ‖W + s·BA‖,
# with the norm taken per output feature (over the input dimension) and m a trainable vector
# that starts at ‖W‖ (so the model equals the base at init, B being zero). As in the paper
# (section 4.3) and HF PEFT, the norm is treated as a constant in the backward pass.
#
# Forward, without materialising W': ``out + (m/‖·‖ − 1)·(W x) + (m/‖·‖)·s·B A x`` where ``out`` is
# the base layer's output (W x plus bias). With dropout, W x is recomputed on the dropped input,
# as HF PEFT does. Enabled by ``LoraConfig(use_dora=True)``; file key ``lora_magnitude_vector``
# (shape (out_features,)) beside ``lora_A``/``lora_B``. Linear and Conv1D layers.


class DoraLinear(LoraLinear):
    delta_reads_base = True  # the norm is taken of W + s·BA
    runs_first = True  # it rescales the base layer's own output (layer.Unit's composition rule)

    def __init__(self, base: nn.Module, transposed: bool, **lora) -> None:
        if isinstance(base, nn.Linear):  # also a 4-bit Linear, whose packed weight has another shape
            n_in, n_out = base.in_features, base.out_features
        else:
            n_in, n_out = base.weight.shape  # Conv1D: (in, out)
        super().__init__(n_in, n_out, transposed, **lora)
        self.__dict__["_base"] = base  # a reference, not a submodule: no duplicate in state_dict
        with torch.no_grad():
            norm = self._norm(self._base_weight())
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def _base_weight(self) -> torch.Tensor:
        """The frozen base weight as (out, in), in the adapter's dtype."""
        if quant.is_quantized(self._base):
            return quant.dequantized_weight(self._base).to(self.lora_A.dtype)
        w = self._base.weight
        return (w.t() if self.transposed else w).to(self.lora_A.dtype)

    def _norm(self, weight: torch.Tensor) -> torch.Tensor:
        """‖W + s·BA‖ per output feature, detached."""
        return (weight + self.scaling * (self.lora_B @ self.lora_A)).norm(dim=1).detach()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        weight = self._base_weight()
        scale = self.lora_magnitude_vector / self._norm(weight)  # (out,)
        h = self.dropped(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        lora = (h @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        if self.dropout is None:
            bias = self._base.bias
            base_out = out.to(lora.dtype) - (bias.to(lora.dtype) if bias is not None else 0)
        else:
            base_out = F.linear(h, weight)
        return out + ((scale - 1) * base_out + scale * lora * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        weight = self._base_weight()
        norm = self._norm(weight)
        merged = (self.lora_magnitude_vector / norm).view(-1, 1) * (weight + self.scaling * (self.lora_B @ self.lora_A))
        delta = merged - weight
        return delta.t() if self.transposed else delta

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().file_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}

    def mix_terms(self) -> MixTerms:
        """In eval mode DoRA's output is ``sc ⊙ (out + s·BAx) + (1 − sc) ⊙ bias``, sc = m / ‖W + s·BA‖."""
        with torch.no_grad():
            scale = self.lora_magnitude_vector / self._norm(self._base_weight())
            bias = self._base.bias
            shift = None if bias is None else (1 - scale) * bias.to(scale.dtype)
        return MixTerms("linear", a=self.lora_A.detach(), b=(self.lora_B * self.scaling).detach(),
                        out_scale=scale, out_shift=shift)

    def mix_sources(self) -> list[torch.Tensor]:
        return [*super().mix_sources(), self._base.weight]



def make_unit(config: LoraConfig, module: nn.Module, path: str) -> LoraUnit:
    if not (isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_conv1d(module)):
        raise ConfigError(  # e.g. a whole block matched by a name such as "0" or "layer"
            f"LoRA cannot adapt {path!r} of type {type(module).__name__}; "
            "supported: Linear, Conv1D, Conv2d, Embedding"
        )
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    common = dict(r=r, alpha=alpha, dropout=config.lora_dropout, rslora=config.use_rslora,
                  init=config.init_lora_weights, factory=adapter_factory(module))
    if config.use_dora:
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            raise ConfigError(f"DoRA cannot adapt {path!r} of type {type(module).__name__}; supported: Linear, Conv1D")
        return DoraLinear(module, is_conv1d(module), **common)
    if isinstance(module, nn.Linear):
        return LoraLinear(module.in_features, module.out_features, False, **common)
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return LoraLinear(n_in, n_out, True, **common)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise ConfigError(f"LoRA cannot adapt {path!r}: a grouped Conv2d (groups={module.groups}, e.g. depthwise) "
                              "is not supported; target the model's other layers")
        return LoraConv2d(module, **common)
    return LoraEmbedding(module, **common)  # the only type left


# Defaults when target_modules is None, per transformers model_type: the attention query and
# value projections, as in the LoRA paper (from the role map).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _cli_config(use_dora: bool):
    def make(values: dict[str, Any]) -> LoraConfig:
        return LoraConfig(r=values["r"], lora_alpha=values["alpha"], lora_dropout=values["dropout"],
                          target_modules=values["targets"], use_dora=use_dora)
    return make


_CLI_OPTIONS = ("r", "alpha", "dropout", "targets")
register(Method(
    "LORA", LoraConfig, make_unit=make_unit, default_targets=DEFAULT_TARGETS, mergeable=True, identity_at_init=True,
    cli=(CliMethod("lora", "LoRA: low-rank updates of the targets (default: the attention layers)",
                   _cli_config(False), _CLI_OPTIONS),
         CliMethod("dora", "DoRA: LoRA with a learned magnitude per output feature", _cli_config(True), _CLI_OPTIONS),
         CliMethod("qlora", "QLoRA: LoRA over the base stored in 4-bit NF4 (bitsandbytes)", _cli_config(False),
                   _CLI_OPTIONS, quantize="nf4")),
))
