"""LoKr — "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model Evaluation"
(Yeh et al., 2023), as HF PEFT implements it (``peft.tuners.lokr``).

The update of a frozen weight W (out, in[, kernel]) is a Kronecker product of two factors,
``ΔW = s · (W1 ⊗ W2)`` with ``s = alpha / r``:

- the output and input sizes are split in two, ``out = a·b`` and ``in = c·d``, by
  ``factorization(n, decompose_factor)``: with -1 the pair of divisors closest to √n (the smaller
  first), with a divisor f of n the pair (f, n/f) as it is, with any other positive f the pair
  whose smaller member is the largest divisor of n up to f (and up to √n);
- W1 is (a, c) and W2 (b, d[, kernel]), ΔW[i·b + j, p·d + q] = s · W1[i, p] · W2[j, q] (for a
  convolution, per kernel position; one exception, HF PEFT's own: a Conv1d whose W2 is stored in
  full, see ``LoKrUnit.delta_weight``); a factor is stored in full, or as a rank-r product:
  W1 = W1_a W1_b only with ``decompose_both`` and ``r < max(a, c)/2``; W2 = W2_a W2_b when
  ``r < max(b, d)/2``; for a convolution with a kernel larger than 1 and
  ``use_effective_conv2d``, W2 is the CP form ``t2 ×₁ W2_aᵀ ×₂ W2_bᵀ`` (FedPara's Proposition 3).

File keys (suffixes after the module path, as HF PEFT writes them), only those a layer uses:
``lokr_w1`` (a, c) or ``lokr_w1_a`` (a, r) + ``lokr_w1_b`` (r, c); ``lokr_w2`` (b, d[, k…]),
or ``lokr_w2_a`` (b, r) + ``lokr_w2_b`` (r, d·∏k), or with the CP form ``lokr_t2`` (r, r, k1, k2)
(Conv1d: (r, r, k, 1)) + ``lokr_w2_a`` (r, b) + ``lokr_w2_b`` (r, d).

Init (``init_weights``): True, HF's default: W1 (or W1_a) zero, everything else Kaiming-uniform,
so the adapted model equals the base; ``"lycoris"``: W2 (or W2_b) zero instead (LyCORIS' way);
False: every factor Kaiming-uniform (non-zero; for tests).

Forward. Linear: with x viewed as X (…, c, d) (row-major), the Kronecker identity
``(W1 ⊗ W2) x = vec(W1 X W2ᵀ)`` needs two small matmuls (each low-rank factor as its two thin
ones) and never builds ΔW; but its intermediate products, kept for the backward pass, grow with
the rows of the batch, so a layer whose ΔW is smaller than them (MiniLM's 384 × 384 at 2,048
rows) goes through ΔW instead (``LoKrLinear.kronecker_pays``: the cheaper in memory). Conv1d / Conv2d: ΔW is built (it has the base kernel's size) and convolved with
the base's stride, padding (and padding mode), dilation and groups.

Training mode only, as HF PEFT defines them: ``module_dropout`` skips the whole update with that
probability (one draw per layer and forward); ``rank_dropout`` zeroes each output feature
(row of ΔW) of the update with that probability, the mask drawn once per forward and, with
``rank_dropout_scale``, divided by its mean. On a Linear the mask multiplies the update's output
features, which equals masking ΔW's rows, so ΔW is not built for it either. (Differences from HF
PEFT, in cases where HF's result is not meaningful: an all-zero mask with ``rank_dropout_scale``
gives a zero update, not NaN; a convolution with a padding mode other than "zeros" is applied
with that padding mode, as merging does.)

Layer types: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` (HF PEFT's). transformers' GPT-2
``Conv1D`` is refused, as by HF PEFT. Merging adds ΔW to the base weight (``DeltaUnit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import architectures
from ..config import TargetedConfig, check_bool, check_number, check_pattern, check_positive_int
from ..errors import ConfigError
from ..layer import DeltaUnit
from ..unit import adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d, pattern_value

INIT_CHOICES = (True, False, "lycoris")
SUPPORTED = "Linear, Conv1d, Conv2d"


@dataclass
class LoKrConfig(TargetedConfig):
    """LoKr settings; names, defaults and meanings as in HF PEFT's ``LoKrConfig``."""

    peft_type: ClassVar[str] = "LOKR"
    # Every field HF PEFT 0.21 writes for LoKr is implemented.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}

    r: int = 8
    alpha: float = 8
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    use_effective_conv2d: bool = False
    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: bool | str = True
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def validate(self) -> None:
        super().validate()
        check_positive_int("r", self.r)
        check_number("alpha", self.alpha)
        check_number("rank_dropout", self.rank_dropout, 0.0, 1.0)
        check_number("module_dropout", self.module_dropout, 0.0, 1.0)
        for name in ("use_effective_conv2d", "decompose_both", "rank_dropout_scale"):
            check_bool(name, getattr(self, name))
        factor = self.decompose_factor
        if not isinstance(factor, int) or isinstance(factor, bool) or factor == 0 or factor < -1:
            raise ConfigError(f"decompose_factor: expected -1 or a positive integer, found {self.decompose_factor!r}")
        init = self.init_weights
        if not (isinstance(init, bool) or isinstance(init, str) and init in INIT_CHOICES):  # not 1 or 0.0
            raise ConfigError(f"init_weights: expected true, false or 'lycoris', found {init!r}")
        self.rank_pattern = check_pattern("rank_pattern", self.rank_pattern, check_positive_int)
        self.alpha_pattern = check_pattern("alpha_pattern", self.alpha_pattern, check_number)


def factorization(n: int, factor: int = -1) -> tuple[int, int]:
    """Split ``n`` into two factors (HF PEFT's / LyCORIS' rule).

    A positive ``factor`` dividing ``n`` gives ``(factor, n // factor)`` as it is. Otherwise the
    divisors of ``n`` are walked upwards from 1, each taken as the first member while it is at most
    ``factor`` (any size for -1) and the first member is still below the second; the pair is
    returned smaller first: ``(16, 16)`` for 256, ``(8, 16)`` for 128, ``(1, 127)`` for 127.
    """
    if factor > 0 and n % factor == 0:
        return factor, n // factor
    limit = n if factor == -1 else factor
    m, k = 1, n
    while m < k:
        nxt = next(c for c in range(m + 1, n + 1) if n % c == 0)
        if nxt > limit:
            break
        m, k = nxt, n // nxt
    return (m, k) if m <= k else (k, m)


# -- units --------------------------------------------------------------------------------


def _kaiming(t: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoKrUnit(DeltaUnit):
    """The factors of one layer and what every layer type shares: ΔW, dropouts, file keys.

    ``kernel`` is the base's kernel size (``()`` for a Linear); ΔW has the shape
    (out, in / groups, *kernel), the base weight's logical shape."""

    def __init__(self, out_dim: int, in_dim: int, kernel: tuple[int, ...], r: int, alpha: float,
                 config: LoKrConfig, factory: dict) -> None:
        super().__init__()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        self.rank_dropout = float(config.rank_dropout)
        self.rank_dropout_scale = config.rank_dropout_scale
        self.module_dropout = float(config.module_dropout)
        self.kernel = tuple(kernel)
        self.shape = (out_dim, in_dim, *self.kernel)
        a, b = factorization(out_dim, config.decompose_factor)
        c, d = factorization(in_dim, config.decompose_factor)
        self.out_split, self.in_split = (a, b), (c, d)
        self.full_w1 = not (config.decompose_both and r < max(a, c) / 2)
        self.full_w2 = r >= max(b, d) / 2
        self.cp = (not self.full_w2 and config.use_effective_conv2d and bool(self.kernel)
                   and any(k != 1 for k in self.kernel))

        def param(*size: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*size, **factory))

        if self.full_w1:
            self.lokr_w1 = param(a, c)
        else:
            self.lokr_w1_a, self.lokr_w1_b = param(a, r), param(r, c)
        if self.full_w2:
            self.lokr_w2 = param(b, d, *self.kernel)
        elif self.cp:  # Conv1d's core carries a trailing 1, as in HF PEFT's file
            core = self.kernel if len(self.kernel) == 2 else (*self.kernel, 1)
            self.lokr_t2 = param(r, r, *core)
            self.lokr_w2_a, self.lokr_w2_b = param(r, b), param(r, d)
        else:
            self.lokr_w2_a, self.lokr_w2_b = param(b, r), param(r, d * math.prod(self.kernel))
        self._init(config.init_weights)

    def _init(self, init: bool | str) -> None:
        """HF PEFT's init, drawing from the RNG in its order (w1 side, w2 side, t2) and only for the
        tensors it draws, so the same seed gives HF PEFT's initial weights: True (its default)
        zeroes the W1 side (W1, or W1_a), "lycoris" the W2 side (W2, or W2_b), False none."""
        zero = set()
        if init is True:
            zero.add("lokr_w1" if self.full_w1 else "lokr_w1_a")
        elif init == "lycoris":
            zero.add("lokr_w2" if self.full_w2 else "lokr_w2_b")
        with torch.no_grad():
            for name, t in self.file_tensors().items():  # w1, w1_a, w1_b, w2, w2_a, w2_b, t2
                if name in zero:
                    nn.init.zeros_(t)
                elif not (init == "lycoris" and name == "lokr_w2_a" and not self.full_w2):
                    _kaiming(t)
            if init == "lycoris" and not self.full_w2:  # HF zeroes w2_b before drawing w2_a
                _kaiming(self.lokr_w2_a)

    # -- the factors ------------------------------------------------------------------------
    def w1(self) -> torch.Tensor:
        return self.lokr_w1 if self.full_w1 else self.lokr_w1_a @ self.lokr_w1_b  # (a, c)

    def w2(self) -> torch.Tensor:
        """W2 as (b, d, *kernel)."""
        if self.full_w2:
            return self.lokr_w2
        b, d = self.out_split[1], self.in_split[1]
        if self.cp:
            w = torch.einsum("ijkl,ip,jq->pqkl", self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
            return w.reshape(b, d, *self.kernel)
        return (self.lokr_w2_a @ self.lokr_w2_b).reshape(b, d, *self.kernel)

    def delta_weight(self) -> torch.Tensor:
        """s · (W1 ⊗ W2) in the base weight's shape, as a broadcast product (a fresh contiguous
        tensor: ``torch.kron`` fails on some strides einsum gives the CP form)."""
        w1, w2, k = self.w1(), self.w2(), self.kernel
        if self.full_w2 and len(k) == 1:
            # HF PEFT's layout for a Conv1d with W2 in full (b, d, k): its kron of the 2-D W1 with
            # the 3-D W2 treats W1 as (1, a, c), giving R[j, i·d + q, p·k + t] = W1[i, p] W2[j, q, t]
            # of shape (b, a·d, c·k), which it then reshapes to (out, in, k). Not the per-channel
            # W1 ⊗ W2 of every other case, but what its files mean (and what its merge adds):
            # reproduced so that a file computes the same here.
            full = w1[None, :, None, :, None] * w2[:, None, :, None, :]  # (b, a, d, c, k)
        else:
            full = w1[(slice(None), None, slice(None), None) + (None,) * len(k)] * w2[None, :, None]  # (a, b, c, d, *k)
        return full.reshape(self.shape) * self.scaling

    # -- dropouts (training mode only) --------------------------------------------------------
    def skipped(self) -> bool:
        """``module_dropout``: this forward leaves the update out."""
        return self.training and self.module_dropout > 0 and bool(torch.rand(1) <= self.module_dropout)

    def rank_mask(self, ref: torch.Tensor) -> torch.Tensor | None:
        """``rank_dropout``: a 0/1 mask over the output features (scaled by 1/mean with
        ``rank_dropout_scale``), or None when it does not apply."""
        if not (self.training and self.rank_dropout > 0):
            return None
        mask = (torch.rand(self.shape[0]) > self.rank_dropout).float()  # on the CPU, as HF PEFT draws it
        if self.rank_dropout_scale:
            kept = mask.mean()
            if kept > 0:  # (on the CPU: no device sync)
                mask /= kept
        return mask.to(device=ref.device, dtype=ref.dtype)

    def file_tensors(self) -> dict[str, torch.Tensor]:
        names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
        return {n: getattr(self, n) for n in names if n in self._parameters}

    def extra_repr(self) -> str:
        w1 = "W1" if self.full_w1 else "W1_a·W1_b"
        w2 = "W2" if self.full_w2 else "cp(t2, W2_a, W2_b)" if self.cp else "W2_a·W2_b"
        (a, b), (c, d) = self.out_split, self.in_split
        return f"r={self.r}, scaling={self.scaling:g}, ({a}x{c}) {w1} ⊗ ({b}x{d}) {w2}"


class LoKrLinear(LoKrUnit):
    """For ``nn.Linear``: the update through the Kronecker identity (ΔW never built) when that
    keeps less for the backward pass than ΔW would (``kronecker_pays``), else through ΔW."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, config: LoKrConfig, factory: dict) -> None:
        super().__init__(base.out_features, base.in_features, (), r, alpha, config, factory)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """``s · (W1 ⊗ W2) x`` for x (..., in), as (N, out): W1 · X · W2ᵀ with X = x viewed (N, c, d).

        Each factor is applied as one matmul of a contiguous (N·rows, k) matrix (``torch.matmul``
        of a 2-D factor with a batch picks its kernel by whether the factor requires grad, which
        would make a trained and a loaded adapter differ in the last bit)."""
        dtype = self.lokr_w1.dtype if self.full_w1 else self.lokr_w1_a.dtype
        (c, d), (a, b) = self.in_split, self.out_split
        h = x.to(dtype).reshape(-1, c, d)
        if self.full_w2:
            h = h @ self.lokr_w2.t()  # (N, c, b)
        else:
            h = (h @ self.lokr_w2_b.t()) @ self.lokr_w2_a.t()
        h = h.transpose(1, 2).contiguous()  # (N, b, c)
        if self.full_w1:
            h = h @ self.lokr_w1.t()  # (N, b, a)
        else:
            h = (h @ self.lokr_w1_b.t()) @ self.lokr_w1_a.t()
        return h.transpose(1, 2).reshape(h.shape[0], a * b) * self.scaling  # (N, a, b) -> (N, out)

    def kronecker_pays(self, rows: int) -> bool:
        """The identity's intermediate products, kept for the backward pass, hold about
        rows × (2·c·b + a·b) numbers; ΔW holds out × in. On small layers and long batches
        (MiniLM's 384 × 384 at 2,048 rows) ΔW is the smaller, on large layers the identity."""
        (c, _), (a, b) = self.in_split, self.out_split
        return rows * (2 * c * b + a * b) <= self.out_split[0] * self.out_split[1] * self.in_split[0] * self.in_split[1]

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return out
        rows = x.numel() // x.shape[-1]
        if self.kronecker_pays(rows):
            y = self.update(x)
        else:
            delta = self.delta_weight()  # (out, in), scaling included
            y = F.linear(x.to(delta.dtype).reshape(rows, -1), delta)
        mask = self.rank_mask(y)
        if mask is not None:
            y = y * mask
        return out + y.reshape(out.shape).to(out.dtype)


class LoKrConv(LoKrUnit):
    """For ``nn.Conv1d`` / ``nn.Conv2d``: ΔW built and convolved like the base."""

    def __init__(self, base: nn.Conv1d | nn.Conv2d, r: int, alpha: float, config: LoKrConfig, factory: dict) -> None:
        super().__init__(base.out_channels, base.in_channels // base.groups, tuple(base.kernel_size), r, alpha,
                         config, factory)
        self.conv = F.conv2d if isinstance(base, nn.Conv2d) else F.conv1d
        self.stride, self.padding, self.dilation, self.groups = base.stride, base.padding, base.dilation, base.groups
        self.padding_mode = base.padding_mode
        self.pad = tuple(base._reversed_padding_repeated_twice) if base.padding_mode != "zeros" else ()

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.skipped():
            return out
        delta = self.delta_weight()
        mask = self.rank_mask(delta)
        if mask is not None:
            delta = delta * mask.view(-1, *[1] * (delta.dim() - 1))
        h, padding = x.to(delta.dtype), self.padding
        if self.pad:
            h, padding = F.pad(h, self.pad, mode=self.padding_mode), 0
        y = self.conv(h, delta, None, self.stride, padding, self.dilation, self.groups)
        return out + y.to(out.dtype)



def make_unit(config: LoKrConfig, module: nn.Module, path: str) -> LoKrUnit:
    if is_conv1d(module):
        raise ConfigError(
            f"LoKr cannot adapt {path!r} of type Conv1D: transformers' GPT-2 style Conv1D is not supported "
            f"(HF PEFT's LoKr does not adapt it either); supported: {SUPPORTED}"
        )
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise ConfigError(f"LoKr cannot adapt {path!r} of type {type(module).__name__}; supported: {SUPPORTED}")
    r = pattern_value(config.rank_pattern, path, config.r)
    alpha = pattern_value(config.alpha_pattern, path, config.alpha)
    factory = adapter_factory(module)
    if isinstance(module, nn.Linear):
        return LoKrLinear(module, r, alpha, config, factory)
    return LoKrConv(module, r, alpha, config, factory)


# Defaults when target_modules is None, per transformers model_type: LoRA's (HF PEFT's LoKr
# mapping is a copy of its LoRA one), read from the role map. For a model whose default is a
# GPT-2 Conv1D (gpt2's c_attn) make_unit refuses it, naming the layer.
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _cli_config(values: dict[str, Any]) -> LoKrConfig:
    return LoKrConfig(r=values["r"], alpha=values["alpha"], rank_dropout=values["dropout"],
                      target_modules=values["targets"])


# Trainer defaults: HF's rank dropout (0; --dropout sets it). lr 2e-2: on the bundled demo
# (MiniLM, 30 steps, r=8, alpha=16) the eval loss after training was 1.05 at 1e-3, 0.99 at 2e-3,
# 0.68 at 5e-3, 0.18 at 1e-2, 0.022 at 2e-2, 0.020 at 3e-2, 0.025 at 5e-2 (LoRA at its 2e-3: 0.54);
# 2e-2 is where the gain stops, with room above it before anything degrades.
register(Method(
    "LOKR", LoKrConfig, make_unit=make_unit, default_targets=DEFAULT_TARGETS, mergeable=True, identity_at_init=True,
    cli=(CliMethod("lokr", "LoKr: Kronecker-product updates of the targets (default: the attention layers)",
                   _cli_config, ("r", "alpha", "dropout", "targets"), {"lr": 2e-2, "dropout": 0.0}),),
))
