"""DoRA — "DoRA: Weight-Decomposed Low-Rank Adaptation" (Liu et al., 2024): the unit behind
``LoraConfig(use_dora=True)``, a ``LoraLinear`` with a learned magnitude per output feature.
``methods/lora.py`` builds it and re-exports it; its config and registry entry are LoRA's."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import quant
from ..unit import MixTerms
from . import lora_fused
from .lora import LoraLinear


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
#
# Over a frozen dense float32 base with many rows and no active dropout, the layer runs instead
# on W + s·BA, which the norm needs anyway, as one autograd node (``lora_fused.dora_dense``;
# at inference ``lora_fused.merged_inference`` with the cached ratio): no low-rank pass over
# the (N, out) output.


class DoraLinear(LoraLinear):
    delta_reads_base = True  # the norm is taken of W + s·BA
    runs_first = True  # it rescales the base layer's own output (layer.Unit's composition rule)
    fuses_base = True  # on W + s·BA as one node where that moves fewer bytes (lora_fused.dora_dense)

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
        """‖W + s·BA‖ per output feature, detached (no graph is built for it)."""
        with torch.no_grad():
            return (weight + self.scaling * (self.lora_B @ self.lora_A)).norm(dim=1)

    def _scale(self) -> torch.Tensor:
        """m / ‖W + s·BA‖, (out,). At inference the ratio is kept until one of its inputs changes
        (their ``_version``s and identities), so an eval forward does not rebuild W + s·BA."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.lora_magnitude_vector / self._norm(self._base_weight())
        sources = (self.lora_A, self.lora_B, self.lora_magnitude_vector, self._base.weight)
        key = (tuple((id(t), t._version) for t in sources), float(self.scaling))
        cached = self.__dict__.get("_scale_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.lora_magnitude_vector.detach() / self._norm(self._base_weight()))
            self.__dict__["_scale_cache"] = cached
        return cached[1]

    def with_base(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        if base is not self._base or not lora_fused.fusable(base, x, self.lora_A, self.scaling, self.lora_B_bias is not None):
            return None
        if self.dropout is not None and self.dropout.training:
            return None
        if torch.is_grad_enabled():
            return lora_fused.dora_dense(x, base, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling)
        return lora_fused.merged_inference(x, base, self.lora_A, self.lora_B, self.scaling, self._scale())

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        scale = self._scale()  # (out,)
        h = self.dropped(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        if self.dropout is None and out.dtype == h.dtype:
            # W' x + b = sc ⊙ (W x + s·BAx) + b = sc ⊙ (out + s·BAx) + (1 − sc) ⊙ b: one fused
            # multiply-add for the update and one pass over the output, which is all autograd keeps.
            low = h.reshape(-1, h.shape[-1]) @ self.lora_A.t()
            if isinstance(self.scaling, torch.Tensor):
                low, alpha = low * self.scaling, 1.0
            else:
                alpha = self.scaling
            y = torch.addmm(out.reshape(-1, out.shape[-1]), low, self.lora_B.t(), alpha=alpha)
            bias = self._base.bias
            if bias is None:
                return (y * scale).view(out.shape)
            return torch.addcmul((1 - scale) * bias.to(y.dtype), y, scale).view(out.shape)
        lora = (h @ self.lora_A.t()) @ self.lora_B.t()  # (..., out)
        if self.dropout is None:
            bias = self._base.bias
            base_out = out.to(lora.dtype) - (bias.to(lora.dtype) if bias is not None else 0)
        else:  # with dropout the base term is recomputed on the dropped input, as HF PEFT does
            base_out = F.linear(h, self._base_weight())
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
            scale = self._scale()
            bias = self._base.bias
            shift = None if bias is None else (1 - scale) * bias.to(scale.dtype)
        return MixTerms("linear", a=self.lora_A.detach(), b=(self.lora_B * self.scaling).detach(),
                        out_scale=scale, out_shift=shift)

    def mix_sources(self) -> list[torch.Tensor]:
        return [*super().mix_sources(), self._base.weight]
