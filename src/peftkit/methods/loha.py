"""LoHa — "FedPara: Low-Rank Hadamard Product for Communication-Efficient Federated Learning"
(Hyeon-Woo et al., 2022), as LyCORIS and HF PEFT use it for fine-tuning.

A frozen weight W gets the update ``ΔW = s · (W1a W1b) ⊙ (W2a W2b)`` with s = alpha / r: the
Hadamard product of two rank-r products, whose rank can reach r² for 2·r·(in + out) numbers.
W2b starts at zero (HF PEFT's init; the other factors are Kaiming-uniform), so the adapted
model equals the base at init; ``init_weights=False`` draws every factor at random.

Layer types, with HF PEFT's tensors (file keys ``<path>.hada_w1_a`` etc., no ``.weight``):

- ``nn.Linear`` (out, in): ``hada_w1_a``/``hada_w2_a`` (out, r), ``hada_w1_b``/``hada_w2_b`` (r, in).
- ``nn.Conv2d`` / ``nn.Conv1d``: the same on the flattened kernel, (out, in/groups · kernel);
  with ``use_effective_conv2d`` and a kernel larger than 1 ("Proposition 3" of the paper, a
  Tucker/CP form) each product is ``t ×₁ a ×₂ b`` instead: ``hada_t1``/``hada_t2`` (r, r, kh, kw)
  (Conv1d: (r, r, k, 1)), ``hada_w1_a``/``hada_w2_a`` (r, out), ``hada_w1_b``/``hada_w2_b``
  (r, in/groups). A grouped convolution gets a ΔW of its own weight shape, as in HF PEFT.

transformers' GPT-2 ``Conv1D`` is not one of them (HF PEFT's LoHa refuses it too): use LoRA
there. Every other type is a ``ConfigError`` naming the module.

Forward: ΔW cannot be avoided (the Hadamard product does not factor through the input), so it
is built once per call in the adapter's dtype and applied with one ``F.linear`` (an ``addmm``
into the base output) or one convolution, with the base layer's stride, padding (and padding
mode), dilation and groups. Building it goes through ``_Hadamard``, which keeps only the
factors for the backward pass and recomputes the two products there, instead of keeping two
weight-sized tensors per layer alive until the backward pass. The scaling and the rank-dropout
mask are folded into W1a (a small tensor), not applied to ΔW.

Training-mode regularisers, as HF PEFT defines them (both off in eval mode):

- ``rank_dropout``: a fresh mask over ΔW's output rows (rows dropped with that probability),
  rescaled by the mean of the mask (a mask that drops every row gives ΔW = 0, not NaN);
- ``module_dropout``: the whole adapter is skipped for the call with that probability.

Several active LoHa (or LoRA) adapters on one layer compose by addition: each adds its own
term to the output so far. Merging adds ΔW (in the layer's own layout and shape) to W.

Where a Conv's ``padding_mode`` is not "zeros", ΔW is applied with the base's padding mode
(so that merged equals unmerged); HF PEFT's unmerged forward zero-pads there instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .. import architectures
from ..config import TargetedConfig, check_bool, check_number, check_pattern, check_positive_int
from ..errors import ConfigError
from ..layer import DeltaUnit
from ..unit import adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d, pattern_value

SUPPORTED = "Linear, Conv1d, Conv2d"


@dataclass
class LoHaConfig(TargetedConfig):
    """LoHa settings; names, meanings and defaults as in HF PEFT's ``LoHaConfig``.

    ``r`` and ``alpha`` (scaling alpha / r), per module through ``rank_pattern`` /
    ``alpha_pattern``; ``rank_dropout`` and ``module_dropout`` (training only);
    ``use_effective_conv2d`` (the CP form for k×k kernels, k > 1); ``init_weights``
    (False: no zero factor, the adapter changes the model at once).
    """

    peft_type: ClassVar[str] = "LOHA"
    # Every field of HF PEFT 0.21's LoHaConfig is implemented: nothing is refused or ignored.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    init_weights: bool = True
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_number("rank_dropout", self.rank_dropout, 0.0, 1.0)
        check_number("module_dropout", self.module_dropout, 0.0, 1.0)
        check_bool("use_effective_conv2d", self.use_effective_conv2d)
        check_bool("init_weights", self.init_weights)
        if self.layers_pattern and self.layers_to_transform is None:  # HF PEFT refuses it too
            raise ConfigError(f"layers_pattern: expected layers_to_transform to be set with it, "
                              f"found layers_pattern={self.layers_pattern!r} and layers_to_transform=None")
        self.rank_pattern = check_pattern("rank_pattern", self.rank_pattern, check_positive_int)
        self.alpha_pattern = check_pattern("alpha_pattern", self.alpha_pattern, check_number)


# -- the Hadamard product of two factorised matrices ---------------------------------------


def _product(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """One factor of ΔW. Flat: ``a @ b`` with a (out, r), b (r, fan_in) -> (out, fan_in).
    CP: ``Σ_ij t[i,j,k,l] a[i,o] b[j,c]`` with t (r, r, kh, kw), a (r, out), b (r, in)
    -> (out, in, kh, kw)."""
    if t is None:
        return a @ b
    r, n_out = a.shape
    tb = torch.einsum("ijkl,jc->ickl", t, b)  # (r, in, kh, kw)
    return (a.t() @ tb.reshape(r, -1)).view(n_out, *tb.shape[1:])


def _product_grads(a, b, t, grad):
    """The gradients of ``<grad, _product(a, b, t)>`` with respect to (a, b, t)."""
    if t is None:
        return grad @ b.t(), a.t() @ grad, None
    r, n_out = a.shape
    tb = torch.einsum("ijkl,jc->ickl", t, b)  # (r, in, kh, kw)
    g = grad.reshape(n_out, -1)
    grad_a = tb.reshape(r, -1) @ g.t()  # (r, out)
    ag = (a @ g).view(tb.shape)  # Σ_o a[i,o] grad[o,c,k,l]: (r, in, kh, kw)
    return grad_a, torch.einsum("ickl,ijkl->jc", ag, t), torch.einsum("ickl,jc->ijkl", ag, b)


class _Hadamard(torch.autograd.Function):
    """``_product(w1a, w1b, t1) ⊙ _product(w2a, w2b, t2)``, saving only the factors: the two
    weight-sized products are recomputed in the backward pass, one at a time."""

    @staticmethod
    def forward(ctx, w1a, w1b, w2a, w2b, t1, t2):
        ctx.save_for_backward(w1a, w1b, w2a, w2b, t1, t2)
        delta = _product(w1a, w1b, t1)
        return delta.mul_(_product(w2a, w2b, t2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        w1a, w1b, w2a, w2b, t1, t2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        g1a = g1b = g2a = g2b = gt1 = gt2 = None
        if need[0] or need[1] or need[4]:
            g1a, g1b, gt1 = _product_grads(w1a, w1b, t1, grad * _product(w2a, w2b, t2))
        if need[2] or need[3] or need[5]:
            g2a, g2b, gt2 = _product_grads(w2a, w2b, t2, grad * _product(w1a, w1b, t1))
        return g1a, g1b, g2a, g2b, gt1, gt2


# -- units --------------------------------------------------------------------------------


class LoHaUnit(DeltaUnit):
    """The factors of one adapted layer; ``shape`` is the base weight's (out, in, *kernel)."""

    def __init__(self, shape: tuple[int, ...], r: int, alpha: float, rank_dropout: float,
                 module_dropout: float, effective: bool, init: bool, factory: dict) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        self.rank_dropout, self.module_dropout = rank_dropout, module_dropout
        n_out, n_in, kernel = shape[0], shape[1], tuple(shape[2:])
        self.effective = effective
        if effective:  # CP form: hada_t (r, r, kh, kw); Conv1d's kernel k is stored as (k, 1)
            t_shape = (r, r, *kernel) if len(kernel) == 2 else (r, r, kernel[0], 1)
            self.hada_t1 = nn.Parameter(torch.empty(t_shape, **factory))
            self.hada_t2 = nn.Parameter(torch.empty(t_shape, **factory))
            a_shape, b_shape = (r, n_out), (r, n_in)
        else:
            self.hada_t1 = self.hada_t2 = None
            a_shape, b_shape = (n_out, r), (r, math.prod(shape[1:]))
        self.hada_w1_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w1_b = nn.Parameter(torch.empty(b_shape, **factory))
        self.hada_w2_a = nn.Parameter(torch.empty(a_shape, **factory))
        self.hada_w2_b = nn.Parameter(torch.empty(b_shape, **factory))
        with torch.no_grad():
            for p in self.file_tensors().values():
                if init and p is self.hada_w2_b:
                    nn.init.zeros_(p)
                else:
                    nn.init.kaiming_uniform_(p, a=math.sqrt(5))

    def _delta(self, rank_dropout: bool) -> torch.Tensor:
        """ΔW in the base weight's shape; with ``rank_dropout`` a fresh mask over its rows."""
        w1a = self.hada_w1_a
        if rank_dropout:
            n_out = self.shape[0]
            keep = (torch.rand(n_out, device=w1a.device) > self.rank_dropout).to(w1a.dtype)
            # Rescaled by the mask's mean (HF PEFT); the clamp only acts when every row is dropped.
            scale = keep * (self.scaling / keep.mean().clamp(min=1.0 / n_out))
            w1a = w1a * (scale.view(1, -1) if self.effective else scale.view(-1, 1))
        elif self.scaling != 1:
            w1a = w1a * self.scaling
        delta = _Hadamard.apply(w1a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.hada_t1, self.hada_t2)
        return delta.view(self.shape)

    def delta_weight(self) -> torch.Tensor:
        return self._delta(rank_dropout=False)

    def skipped(self) -> bool:
        """``module_dropout``: skip the adapter for this call (training mode only)."""
        return self.training and self.module_dropout > 0 and float(torch.rand(())) <= self.module_dropout

    def file_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"hada_w1_a": self.hada_w1_a, "hada_w1_b": self.hada_w1_b,
                   "hada_w2_a": self.hada_w2_a, "hada_w2_b": self.hada_w2_b}
        if self.effective:
            tensors.update(hada_t1=self.hada_t1, hada_t2=self.hada_t2)
        return tensors

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, effective_conv={self.effective}"


class LoHaLinear(LoHaUnit):
    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return out
        delta = self._delta(self.training and self.rank_dropout > 0)  # (out, in)
        h = x if x.dtype == delta.dtype else x.to(delta.dtype)
        if out.dtype == delta.dtype:  # out + h ΔWᵀ in one fused op
            out2d = out.reshape(-1, out.shape[-1])
            return torch.addmm(out2d, h.reshape(-1, h.shape[-1]), delta.t()).view(out.shape)
        return out + F.linear(h, delta).to(out.dtype)


class LoHaConv(LoHaUnit):
    """For ``nn.Conv1d`` and ``nn.Conv2d``: ΔW is applied as a convolution with the base's settings."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, **kwargs) -> None:
        super().__init__(tuple(base.weight.shape), **kwargs)
        self.dims = 2 if isinstance(base, nn.Conv2d) else 1
        self.stride, self.dilation, self.groups = base.stride, base.dilation, base.groups
        self.padding_mode = base.padding_mode
        if base.padding_mode == "zeros":
            self.padding = base.padding
        else:  # pad as the base does, then convolve without padding (nn.Conv's own _conv_forward)
            self.pad, self.padding = base._reversed_padding_repeated_twice, 0

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return out
        delta = self._delta(self.training and self.rank_dropout > 0)
        h = x if x.dtype == delta.dtype else x.to(delta.dtype)
        if self.padding_mode != "zeros":
            h = F.pad(h, self.pad, mode=self.padding_mode)
        conv = F.conv2d if self.dims == 2 else F.conv1d
        y = conv(h, delta, None, self.stride, self.padding, self.dilation, self.groups)
        return out + (y if y.dtype == out.dtype else y.to(out.dtype))



def make_unit(config: LoHaConfig, module: nn.Module, path: str) -> LoHaUnit:
    if is_conv1d(module):
        raise ConfigError(
            f"LoHa cannot adapt {path!r} of type Conv1D (transformers' GPT-2 layer, weight stored (in, out)): "
            f"HF PEFT's LoHa does not support it, so its files could not be exchanged; supported: {SUPPORTED}. "
            "Target other layers, or use LoRA on this model"
        )
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ConfigError(f"LoHa cannot adapt {path!r} of type {type(module).__name__}; supported: {SUPPORTED}")
    common = dict(r=pattern_value(config.rank_pattern, path, config.r),
                  alpha=pattern_value(config.alpha_pattern, path, config.alpha),
                  rank_dropout=config.rank_dropout, module_dropout=config.module_dropout,
                  init=config.init_weights, factory=adapter_factory(module))
    if isinstance(module, nn.Linear):  # in/out features, not weight.shape: a 4-bit weight is packed
        return LoHaLinear((module.out_features, module.in_features), effective=False, **common)
    # HF PEFT: the CP form only where the kernel is larger than 1 (a 1x1 kernel is a matrix).
    effective = config.use_effective_conv2d and math.prod(module.kernel_size) > 1
    return LoHaConv(module, effective=effective, **common)


# Defaults when target_modules is None, per transformers model_type: LoRA's (the attention
# query and value projections; HF PEFT's LoHa uses LoRA's table too).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _cli_config(values: dict[str, Any]) -> LoHaConfig:
    # --dropout is the rank dropout (as for LoKr), 0 unless given
    return LoHaConfig(r=values["r"], alpha=values["alpha"], rank_dropout=values["dropout"],
                      target_modules=values["targets"])


# The trainer's learning rate: ΔW is a product of four factors, one of them zero at first, so
# it moves more slowly than LoRA's. On the bundled demo (MiniLM, r=8, alpha=16, 30 steps) LoRA's
# 2e-3 left LoHa's eval loss at 1.01 (from 1.09), 5e-3 at 0.60, 1e-2 at 0.04 (accuracy 1.0, two
# seeds), 2e-2 at 0.01 with a dip in accuracy mid-run, 5e-2 less stable still.
register(Method(
    "LOHA", LoHaConfig, make_unit=make_unit, default_targets=DEFAULT_TARGETS, mergeable=True, identity_at_init=True,
    cli=(CliMethod("loha", "LoHa: Hadamard product of two low-rank updates (default: the attention layers)",
                   _cli_config, ("r", "alpha", "dropout", "targets"), {"lr": 1e-2, "dropout": 0.0}),),
))
