"""LoRA — "LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., 2021) — and DoRA.

A frozen weight W gets a trainable low-rank update: ``out = base(x) + s · dropout(x) Aᵀ Bᵀ``
with A (r, in), B (out, r) and s = lora_alpha / r (or lora_alpha / √r with rsLoRA,
Kalajdzievski 2023). B starts at zero, so the adapted model equals the base at init.

Several active LoRA adapters on one layer compose by addition: each adds its own term.
Merging adds ``s · B A`` to W (in the layer's own layout), which is exact up to rounding.

With ``use_dora=True`` the unit is DoRA's (``DoraLinear``, in ``methods/dora.py``).

``init_lora_weights``: True (A Kaiming, B = 0), False, "gaussian", and the data-driven inits of
``lora_init`` — "pissa", "pissa_niter_N", "olora", "orthogonal", "loftq" (with ``loftq_config``) —
the first three of which leave a residual (LoftQ: the quantized weight) in the base layer; the
unit keeps what its init did (``base_change``) and undoes it when it leaves unmerged
(``release``). ``lora_bias=True``: B has a trainable bias (file key ``lora_B.bias``), added as
``s·(BAx + b)`` and merged into the base bias (docs/lora_init.md).

Layer types: ``nn.Linear``, transformers' ``Conv1D`` (GPT-2; weight stored (in, out)),
``nn.Conv2d`` (A is a conv with the base's kernel/stride/padding, B a 1x1 conv) and
``nn.Embedding`` (A (r, num_embeddings), B (dim, r), file keys without ``.weight``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import architectures, quant
from ..config import TargetedConfig, check_bool, check_number, check_pattern, check_positive_int
from ..errors import ConfigError, PeftkitWarning
from ..layer import DeltaUnit
from ..unit import MixTerms, adapter_factory, autocast_on
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d, pattern_value
from . import lora_fused, lora_init
from .. import param_lora, replication, tokens  # trainable_token_indices, target_parameters, layer_replication

INIT_CHOICES = (True, False, "gaussian", "eva")  # "eva": A from the data (peftkit.eva), B = 0


@dataclass
class LoraConfig(TargetedConfig):
    """LoRA settings; names and meanings as in HF PEFT's ``adapter_config.json``."""

    peft_type: ClassVar[str] = "LORA"
    # HF PEFT's fields peftkit's LoRA does not implement, at their "off" value. ``loftq_config``,
    # ``eva_config``, ``lora_bias``, ``trainable_token_indices``, ``layer_replication`` and
    # ``target_parameters`` are LoraConfig fields (a field of the class wins over this table when
    # a file is read or written); they stay listed for AdaLoraConfig, which reuses the table and
    # implements none of them.
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
    lora_bias: bool = False  # a trainable bias on B (file key lora_B.bias), as in HF PEFT
    loftq_config: dict[str, Any] = field(default_factory=dict)  # {loftq_bits, loftq_iter} with "loftq"
    eva_config: dict[str, Any] | None = None  # EVA's settings (peftkit.eva.EvaConfig's fields)
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None  # peftkit.tokens
    target_parameters: list[str] | None = None  # peftkit.param_lora
    layer_replication: list[list[int]] | None = None  # peftkit.replication

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0)
        for name in ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias"):
            check_bool(name, getattr(self, name))
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias: expected 'none', 'all' or 'lora_only', found {self.bias!r}")
        init = self.init_lora_weights
        if not (isinstance(init, bool) or isinstance(init, str) and (init in INIT_CHOICES or lora_init.kind(init))):
            raise ConfigError(lora_init.refusal(init, INIT_CHOICES))  # also 1 or 0.0: not a bool
        self.loftq_config = lora_init.check_loftq_config(self.loftq_config, init)
        if self.lora_bias and init not in (True, False):
            raise ConfigError(f"lora_bias: True needs init_lora_weights True or False (HF PEFT's rule), "
                              f"found init_lora_weights={init!r}")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias: True is not supported with use_dora=True (HF PEFT's rule), found lora_bias=True")
        from ..eva import normalize_eva_config  # lazily: eva imports this module

        self.eva_config = normalize_eva_config(self.eva_config, init)
        self.rank_pattern = check_pattern("rank_pattern", self.rank_pattern, check_positive_int)
        self.alpha_pattern = check_pattern("alpha_pattern", self.alpha_pattern, check_number)
        self.trainable_token_indices = tokens.check_indices(self.trainable_token_indices)
        self.target_parameters = param_lora.check_config(self)
        self.layer_replication = replication.check_config(self)
        if init == "orthogonal":
            odd = [(k, v) for k, v in [("r", self.r), *self.rank_pattern.items()] if v % 2]
            if odd:
                raise ConfigError(f"init_lora_weights: 'orthogonal' needs even ranks (HF PEFT's rule), found "
                                  f"{'r' if odd[0][0] == 'r' else f'rank_pattern[{odd[0][0]!r}]'}={odd[0][1]}")


# -- units --------------------------------------------------------------------------------


class LoraUnit(DeltaUnit):
    """Shared by every layer type: rank, scaling, dropout; merged through ``delta_weight``.

    ``base_change`` says what the unit's init did to its base layer (``lora_init``): None
    (nothing), ``"residual"`` (PiSSA / OLoRA: the base holds W − s·B₀A₀; the initial pair is kept
    in the non-persistent buffers ``lora_A_init`` / ``lora_B_init``, for ``release`` and for a
    conversion to a plain LoRA) or ``"quantized"`` (LoftQ: the base holds the quantized weight).
    ``lora_B_bias`` (``lora_bias=True``): B's bias, added as ``s·(BAx + b)``."""

    base_change: str | None = None

    def __init__(self, r: int, alpha: float, dropout: float, rslora: bool) -> None:
        super().__init__()
        self.r = r
        # A float, or a 0-d tensor once ``swap.prepare_hotswap`` made it swappable in place.
        self.scaling: float | torch.Tensor = alpha / math.sqrt(r) if rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None  # None: no call, no copy
        self.merge_refusal: str | None = None  # why this unit cannot be merged (lora_bias without a base bias)
        self.register_parameter("lora_B_bias", None)  # B's bias with lora_bias=True (_add_bias)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.merge_refusal is None

    def pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        """(A, B) as parameters (an Embedding's ``lora_embedding_A`` / ``_B``)."""
        return self.lora_A, self.lora_B

    def begin(self, a: torch.Tensor, b: torch.Tensor, base_change: str | None) -> None:
        """Start from ``a``, ``b`` (a ``lora_init.Start``); with ``base_change == "residual"``
        keep them as the initial pair."""
        live_a, live_b = self.pair()
        with torch.no_grad():
            live_a.copy_(a.reshape(live_a.shape))
            live_b.copy_(b.reshape(live_b.shape))
        self.base_change = base_change
        if base_change == "residual":
            self.register_buffer("lora_A_init", live_a.detach().clone(), persistent=False)
            self.register_buffer("lora_B_init", live_b.detach().clone(), persistent=False)

    def initial_pair(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A₀, B₀) of a unit whose init left the residual in the base (PiSSA, OLoRA), as the
        file lays them out; None otherwise."""
        if self.base_change != "residual":
            return None
        return self.lora_A_init.reshape(self.lora_A_init.shape[0], -1), self.lora_B_init.reshape(self.lora_B_init.shape[0], -1)

    def release(self, base: nn.Module) -> None:
        """Undo the init's residual in ``base`` (``W_res + s·B₀A₀``, equal to W up to rounding; a
        4-bit OLoRA base gets its original 4-bit weight back); the unit leaves its host unmerged.
        A LoftQ base keeps its quantized weight (the original is not kept)."""
        if self.base_change != "residual":
            return
        old = self.__dict__.pop("_replaced_4bit", None)
        if old is not None:
            lora_init.put_back(base, old)
        else:
            with torch.no_grad():
                a0, b0 = self.initial_pair()
                delta = (self.scaling * b0) @ a0  # (out, in)
                if quant.is_quantized(base):
                    lora_init.write_base(base, lora_init.base_weight(base).to(delta.dtype) + delta)
                else:
                    transposed = getattr(self, "transposed", False)
                    base.weight.add_((delta.t() if transposed else delta).to(base.weight.dtype))
        self.base_change = None

    def mix_sources(self) -> list[torch.Tensor]:
        return [t for t in super().mix_sources() if t is not None]  # not an absent lora_B_bias

    def _bias_term(self) -> torch.Tensor | None:
        return None if self.lora_B_bias is None else self.lora_B_bias * self.scaling

    def merge_into(self, base: nn.Module) -> None:
        super().merge_into(base)
        if self.lora_B_bias is not None:
            with torch.no_grad():
                base.bias.add_(self._bias_term().to(base.bias.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        super().unmerge_from(base)
        if self.lora_B_bias is not None:
            with torch.no_grad():
                base.bias.sub_(self._bias_term().to(base.bias.dtype))

    def _add_bias(self, base: nn.Module, lora_bias: bool, out_features: int, r: int, init: Any, factory: dict) -> None:
        """B's bias (``lora_bias=True``): zero, or uniform(±1/√r) with ``init_lora_weights=False``
        (torch's default for the ``nn.Linear(r, out)`` HF PEFT uses as B)."""
        if not lora_bias:
            return
        self.lora_B_bias = nn.Parameter(torch.zeros(out_features, **factory))
        if init is False:
            with torch.no_grad():
                nn.init.uniform_(self.lora_B_bias, -1 / math.sqrt(r), 1 / math.sqrt(r))
        if getattr(base, "bias", None) is None:
            self.merge_refusal = ("lora_bias=True and the base layer has no bias to add B's bias to "
                                  "(HF PEFT cannot merge it either)")

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


def _init_pair(a: torch.Tensor, b: torch.Tensor, init: bool | str | None, r: int) -> None:
    """Initialise A and B for linear-like layers: B = 0 unless ``init`` is False; None: left for
    a data-driven init (``LoraUnit.begin``)."""
    if init is None:
        return
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
    """For ``nn.Linear`` and transformers' ``Conv1D`` (``transposed``: weight is (in, out)).

    Training over a frozen dense base runs as one autograd node (``lora_fused``)."""

    fuses_base = True

    def __init__(self, in_features: int, out_features: int, transposed: bool, r: int, alpha: float,
                 dropout: float, rslora: bool, init: bool | str | None, factory: dict, *,
                 lora_bias: bool = False, base: nn.Module | None = None,
                 start: tuple[torch.Tensor, torch.Tensor, str | None] | None = None) -> None:
        super().__init__(r, alpha, dropout, rslora)
        self.transposed = transposed
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        _init_pair(self.lora_A, self.lora_B, init, r)
        if start is not None:  # (A, B, base_change) of a data-driven init (lora_init)
            self.begin(*start)
        self._add_bias(base, lora_bias, out_features, r, init, factory)

    def with_base(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        if not lora_fused.fusable(base, x, self.lora_A, self.scaling, self.lora_B_bias is not None):
            return None
        if not torch.is_grad_enabled():
            if self.dropout is not None and self.dropout.training:  # the plain path draws the mask
                return None
            return lora_fused.merged_inference(x, base, self.lora_A, self.lora_B, self.scaling)
        return lora_fused.lora_dense(x, self.dropped(x), base, self.lora_A, self.lora_B, self.scaling)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.dropped(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        h = h.reshape(-1, h.shape[-1]) @ self.lora_A.t()  # (N, r)
        out2d = out.reshape(-1, out.shape[-1])  # (N, out)
        if self.lora_B_bias is not None:  # s·(BAx + b)
            return (out2d + (torch.addmm(self.lora_B_bias, h, self.lora_B.t()) * self.scaling).to(out.dtype)
                    ).view(out.shape)
        if out2d.dtype == h.dtype:
            if isinstance(self.scaling, torch.Tensor):  # swappable in place (hotswap): scale the small (N, r) factor
                h, alpha = h * self.scaling, 1.0
            else:
                alpha = self.scaling
            if not torch.is_grad_enabled() and not autocast_on(out.device):
                # Inference: add into the base layer's fresh output. A new (N, out) tensor would cost
                # more than the update itself (on the CPU, 10-30 % of a large layer's time). Not
                # under autocast, which casts addmm's operands but not an in-place addmm_'s.
                return out2d.addmm_(h, self.lora_B.t(), alpha=alpha).view(out.shape)
            return torch.addmm(out2d, h, self.lora_B.t(), alpha=alpha).view(out.shape)
        return (out2d + (h @ self.lora_B.t() * self.scaling).to(out.dtype)).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ self.lora_A) * self.scaling  # (out, in)
        return delta.t() if self.transposed else delta

    def file_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.ranked(self.lora_A, self.lora_B)
        out = {"lora_A.weight": a, "lora_B.weight": b}
        if self.lora_B_bias is not None:
            out["lora_B.bias"] = self.lora_B_bias
        return out

    def mix_terms(self) -> MixTerms:
        shift = None if self.lora_B_bias is None else self._bias_term().detach()
        return MixTerms("linear", a=self.lora_A.detach(), b=(self.lora_B * self.scaling).detach(), out_shift=shift)


class LoraConv2d(LoraUnit):
    """A: conv with the base's kernel, stride, padding, dilation (r channels); B: 1x1 conv."""

    def __init__(self, base: nn.Conv2d, r: int, alpha: float, dropout: float, rslora: bool,
                 init: bool | str, factory: dict, *, lora_bias: bool = False) -> None:
        super().__init__(r, alpha, dropout, rslora)
        if base.groups != 1:
            raise ConfigError("LoRA on a grouped Conv2d (groups > 1) is not supported")
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.lora_A = nn.Parameter(torch.empty(r, base.in_channels, *base.kernel_size, **factory))
        self.lora_B = nn.Parameter(torch.empty(base.out_channels, r, 1, 1, **factory))
        _init_pair(self.lora_A, self.lora_B, init, r)
        self._add_bias(base, lora_bias, base.out_channels, r, init, factory)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = self.dropped(x).to(self.lora_A.dtype)
        h = F.conv2d(h, self.lora_A, stride=self.stride, padding=self.padding, dilation=self.dilation)
        return out + (F.conv2d(h, self.lora_B, self.lora_B_bias) * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        return torch.einsum("or,rikl->oikl", self.lora_B[:, :, 0, 0], self.lora_A) * self.scaling

    def mix_terms(self) -> MixTerms | None:
        if self.lora_B_bias is not None:  # a per-channel shift of (B, C, H, W) outputs: not batched
            return None
        return MixTerms("conv2d", a=self.lora_A.detach(), b=(self.lora_B[:, :, 0, 0] * self.scaling).detach(),
                        conv=(self.stride, self.padding, self.dilation))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        a, b = self.ranked(self.lora_A, self.lora_B)
        out = {"lora_A.weight": a, "lora_B.weight": b}
        if self.lora_B_bias is not None:
            out["lora_B.bias"] = self.lora_B_bias
        return out


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
            if init is True or init == "eva":  # EVA leaves embeddings at LoRA's default
                nn.init.zeros_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)
            elif init == "gaussian":
                nn.init.normal_(self.lora_embedding_A, std=1.0 / r)
                nn.init.zeros_(self.lora_embedding_B)
            else:
                nn.init.normal_(self.lora_embedding_A)
                nn.init.normal_(self.lora_embedding_B)

    def pair(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.lora_embedding_A, self.lora_embedding_B

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


# DoRA's unit lives in methods/dora.py (a LoraLinear subclass); imported at the end of this file.


def check_target(config: LoraConfig, module: nn.Module, path: str) -> None:
    """``ConfigError`` for a layer this config cannot adapt (checked for every target before any
    unit is built, so a refused layer changes nothing, not even a base weight)."""
    if not (isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)) or is_conv1d(module)):
        raise ConfigError(  # e.g. a whole block matched by a name such as "0" or "layer"
            f"LoRA cannot adapt {path!r} of type {type(module).__name__}; "
            "supported: Linear, Conv1D, Conv2d, Embedding"
        )
    if config.use_dora and not (isinstance(module, nn.Linear) or is_conv1d(module)):
        raise ConfigError(f"DoRA cannot adapt {path!r} of type {type(module).__name__}; supported: Linear, Conv1D")
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        raise ConfigError(f"LoRA cannot adapt {path!r}: a grouped Conv2d (groups={module.groups}, e.g. depthwise) "
                          "is not supported; target the model's other layers")
    if config.lora_bias and isinstance(module, nn.Embedding):
        raise ConfigError(f"lora_bias: True cannot adapt {path!r} (Embedding): HF PEFT has no LoRA bias on "
                          "embeddings; leave it out of target_modules or use lora_bias=False")
    lora_init.check_layer(config.init_lora_weights, module, path, pattern_value(config.rank_pattern, path, config.r))


def make_unit(config: LoraConfig, module: nn.Module, path: str) -> LoraUnit:
    """The unit adapting ``module``; a data-driven init (``lora_init``) is computed here and, for
    PiSSA / OLoRA / LoftQ, written into the base weight."""
    check_target(config, module, path)
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.lora_alpha)
    init = config.init_lora_weights
    data = lora_init.kind(init) not in ("plain", "")  # "" : LoRA's other own values ("eva")
    start = replaced = None
    if data and not lora_init.applies_to(init, module):
        data, init = False, True  # an Embedding: LoRA's default init, as HF PEFT does
    elif data and not lora_init.structure_only():
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        begun = lora_init.start(init, module, r, scaling, config.loftq_config)
        change = None
        if begun.base is not None:
            replaced = lora_init.write_base(module, begun.base)
            change = "quantized" if lora_init.kind(init) == "loftq" else "residual"
        start = (begun.a, begun.b, change)
    common = dict(r=r, alpha=alpha, dropout=config.lora_dropout, rslora=config.use_rslora,
                  init=None if data else init, factory=adapter_factory(module))
    if config.use_dora:
        unit: LoraUnit = DoraLinear(module, is_conv1d(module), start=start, **common)
    elif isinstance(module, nn.Linear):
        unit = LoraLinear(module.in_features, module.out_features, False, **common, lora_bias=config.lora_bias,
                          base=module, start=start)
    elif is_conv1d(module):
        n_in, n_out = module.weight.shape
        unit = LoraLinear(n_in, n_out, True, **common, lora_bias=config.lora_bias, base=module, start=start)
    elif isinstance(module, nn.Conv2d):
        unit = LoraConv2d(module, **common, lora_bias=config.lora_bias)
    else:
        unit = LoraEmbedding(module, **common)  # the only type left
    if replaced is not None:  # a 4-bit base quantized again (OLoRA): its original goes back on release
        unit.__dict__["_replaced_4bit"] = replaced
    return unit


def build_units(model: nn.Module, config: LoraConfig, name: str, targets: list[tuple[str, nn.Module]]) -> list[LoraUnit]:
    """Every target's unit: each layer checked first; then built in order (a data-driven init
    writes its base as it goes, and is undone again if a later layer fails)."""
    for path, module in targets:
        check_target(config, module, path)
    if not lora_init.structure_only():
        _warn_about(model, config, name, targets)
    units: list[LoraUnit] = []
    try:
        for path, module in targets:
            units.append(make_unit(config, module, path))
    except BaseException:
        for (_, module), unit in zip(targets, units):
            unit.release(module)
        raise
    return units


def _warn_about(model: nn.Module, config: LoraConfig, name: str, targets: list[tuple[str, nn.Module]]) -> None:
    """HF PEFT's warnings, once per adapter: a base-modifying init beside other adapters, an
    init that leaves embeddings at LoRA's default, a LoRA bias that cannot be merged."""
    from ..state import get_state

    init = config.init_lora_weights
    others = {n: c for n, c in get_state(model).configs.items() if n != name}
    changing = [n for n, c in {name: config, **others}.items() if lora_init.modifies_base(getattr(c, "init_lora_weights", True))]
    if others and changing:
        warnings.warn(f"adapter {changing[0]!r} changes the base weights (init_lora_weights="
                      f"{(config if changing[0] == name else others[changing[0]]).init_lora_weights!r}), which every "
                      "other adapter of the model and the disabled model then compute with; save it converted "
                      "(peftkit.save(..., plain_lora=True)) to use it beside other adapters", PeftkitWarning, stacklevel=5)
    if lora_init.kind(init) not in ("plain", ""):
        skipped = [p for p, m in targets if not lora_init.applies_to(init, m)]
        if skipped:
            warnings.warn(f"init_lora_weights={init!r} is defined for Linear layers: {len(skipped)} Embedding "
                          f"layer(s) ({skipped[0]!r}{', ...' if len(skipped) > 1 else ''}) get LoRA's default init, "
                          "as in HF PEFT", PeftkitWarning, stacklevel=5)
    if config.lora_bias:
        bare = [p for p, m in targets if getattr(m, "bias", None) is None]
        if bare:
            warnings.warn(f"lora_bias=True: {len(bare)} adapted layer(s) ({bare[0]!r}{', ...' if len(bare) > 1 else ''}) "
                          "have no bias, so the adapter cannot be merged into them (as in HF PEFT)",
                          PeftkitWarning, stacklevel=5)


# Defaults when target_modules is None, per transformers model_type: the attention query and
# value projections, as in the LoRA paper (from the role map).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


# ``peftkit train --init``: the LoRA initialisations by name (``default``: init_lora_weights=True;
# then LoRA's other own values, INIT_CHOICES, and lora_init's).
CLI_INITS = ("default", *[v for v in INIT_CHOICES if isinstance(v, str)], *lora_init.DATA_INITS)


def cli_init(value: str | None, quantized: bool) -> dict[str, Any]:
    """The LoraConfig fields ``--init VALUE`` sets (``loftq``: with ``--method qlora`` only)."""
    if value is None or value == "default":
        return {"init_lora_weights": True}
    text = str(value).strip()
    if text == "loftq":
        if not quantized:
            raise ConfigError("--init loftq quantizes the base to NF4 itself and starts the adapter from the "
                              "quantization error: use it with --method qlora")
        return {"init_lora_weights": "loftq", "loftq_config": dict(lora_init.LOFTQ_DEFAULTS)}
    if text in INIT_CHOICES or lora_init.kind(text) in ("pissa", "olora", "orthogonal"):
        return {"init_lora_weights": text}
    raise ConfigError(f"--init: expected one of {', '.join(CLI_INITS)} (N: a number of iterations, e.g. "
                      f"pissa_niter_4), found {value!r}")


def _cli_config(use_dora: bool, quantized: bool = False):
    def make(values: dict[str, Any]) -> LoraConfig:
        return LoraConfig(r=values["r"], lora_alpha=values["alpha"], lora_dropout=values["dropout"],
                          target_modules=values["targets"], use_dora=use_dora,
                          **cli_init(values.get("init"), quantized))
    return make


_CLI_OPTIONS = ("r", "alpha", "dropout", "targets", "init", "loraplus_lr_ratio", "lora_fa")  # the last two: optim.py
register(Method(
    "LORA", LoraConfig, build_units=build_units, default_targets=DEFAULT_TARGETS, mergeable=True, identity_at_init=True,
    cli=(CliMethod("lora", "LoRA: low-rank updates of the targets (default: the attention layers)",
                   _cli_config(False), _CLI_OPTIONS),
         CliMethod("dora", "DoRA: LoRA with a learned magnitude per output feature", _cli_config(True), _CLI_OPTIONS),
         CliMethod("qlora", "QLoRA: LoRA over the base stored in 4-bit NF4 (bitsandbytes)", _cli_config(False, True),
                   _CLI_OPTIONS, quantize="nf4")),
))

from .dora import DoraLinear  # noqa: E402 - after LoraLinear, which it extends; re-exported here
