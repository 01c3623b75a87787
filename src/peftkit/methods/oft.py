"""OFT — "Controlling Text-to-Image Diffusion by Orthogonal Finetuning" (Qiu et al., 2023), in
HF PEFT 0.21's form (OFTv2: the rotation is applied to the layer's input, not built into W).

OFT rotates instead of adding: a frozen layer ``y = W x + b`` becomes ``y = W (R x) + b`` with
R orthogonal and block-diagonal, ``R = diag(R_1, ..., R_r)``, r blocks of size b (r · b = the
layer's input dimension). HF PEFT's conventions, followed exactly:

- Each block comes from a stored vector of b(b−1)/2 numbers (file key ``<path>.oft_R.weight``,
  shape (r, b(b−1)/2); (1, ...) with ``block_share``, one block used r times). The vector fills
  the strict upper triangle of S row by row (``torch.triu_indices(b, b, 1)``) and Q = S − Sᵀ is
  skew-symmetric.
- Exact Cayley transform (``use_cayley_neumann=False``): R_i = (I − Q)(I + Q)⁻¹, orthogonal
  with determinant +1 (a rotation, never a reflection).
- Cayley–Neumann (``use_cayley_neumann=True``, HF's default): R_i = I + 2Q + 2Q² + … + 2Q^(p−1)
  + Q^p with p = max(n − 1, 3) for n = ``num_cayley_neumann_terms`` ≥ 3 (I + 2Q for n = 2, I for
  n = 1): the truncated series of (I + Q)(I − Q)⁻¹, i.e. of the exact form's transpose. It is
  orthogonal only approximately (well while ‖Q‖ ≪ 1); merging uses the same matrix, so merged
  still equals unmerged.
- The rotation acts on row vectors: an input row h becomes h·R (blockwise ``h_i R_i``); the
  merged weight is therefore W' = W Rᵀ (HF: ``mm(oft_mat, Wᵀ)ᵀ``).
- ``init_weights=True``: vectors at zero, R = I exactly (identity at init); False: N(0, 0.1²).
- ``r`` / ``oft_block_size``: exactly one is non-zero (HF's rule); the other follows per layer.
  Where it does not divide the layer's input dimension HF PEFT silently picks the nearest
  divisor; peftkit refuses with a ``ConfigError`` naming the layer, its dimension and the value
  HF would have chosen. A block of size 1 (nothing to rotate) is refused too.
- ``coft`` (constrained OFT): before every use, each block's Q is projected in place onto the
  Frobenius ball of radius eps/√(number of stored blocks) (HF PEFT writes the projection back
  into the parameter, under ``no_grad``, in every forward: projected gradient descent).
- ``module_dropout``: in training mode, ⌊p·D⌋ of the D stored blocks, chosen at random each
  call, are replaced by the identity (HF's ``MultiplicativeDropoutLayer``; none with a single
  stored block, e.g. ``block_share``). HF PEFT 0.21 builds that layer but never calls it, so
  its training ignores the setting; eval-mode outputs and files are the same either way.
- ``bias``: 'none', 'all', or 'oft_only' (train the adapted layers' biases).
- ``fan_in_fan_out``: must stay False (OFT adapts no layer stored (in, out); HF resets it too).

Layer types, each computed as cheaply as the math allows:

- ``nn.Linear`` (``OFTLinear``): the input is rotated before the base layer runs
  (``adjust_input``; the base — also a 4-bit one — is called as usual): one batched (r, N, b) ×
  (r, b, b) product, a single (N·r, b) × (b, b) one with ``block_share``; W is never touched.
  Dimension: ``in_features``.
- ``nn.Conv2d`` (``OFTConv2d``): the flattened filter (out, C·k·k) is rotated, W' = W Rᵀ (the
  OFT paper's form), and the unit computes the layer as one convolution with W' and the base's
  stride, padding (and padding mode) and bias (``replaces_base``: the base is not called, no
  second convolution). Dimension: in_channels · k · k; square kernels, groups = 1 and dilation
  1 only (HF PEFT breaks on the others). HF PEFT 0.21's *unmerged* Conv2d forward instead
  rotates stride-1 patches of the input and folds them back, summing where patches overlap:
  for a k×k kernel, k > 1, that is not the rotation of the filter (not even the identity at
  init: each pixel is counted once per patch covering it), and it differs from HF's own merge.
  peftkit computes what HF's merge computes; for 1×1 kernels (no overlap) all three agree.
- ``nn.Embedding`` (``OFTEmbedding``, as HF 0.21 supports it): the looked-up vectors are
  rotated (file key ``oft_embedding_R.weight``); merged table E' = E R.

transformers' GPT-2 ``Conv1D`` is not supported (HF PEFT's OFT refuses it as well); every other
type is a ``ConfigError`` naming the module.

Composition (``layer.Unit``'s rule): every OFT unit is ``runs_first`` (the conv unit
``replaces_base``, its cheaper equivalent). OFT's merge is multiplicative — W ← W Rᵀ — so it
must fold into the base weight before any additive unit (LoRA, LoHa, LoKr) adds its ΔW, or it
would rotate their updates too; the host merges a runs-first unit first whatever the active
order, and its input rotation reaches only the base layer (the other units see the unrotated
input), so merged equals unmerged: ``W R x + b + ΔW x``. It also makes at most one OFT (or DoRA,
or LN tuning) adapter active per layer (``ModelError`` otherwise): two rotations of one input
do not commute, and HF PEFT's own merge of two stacked OFT adapters does not equal its unmerged
forward. (An input-scaling (IA)³ unit on the same Linear is the one combination that does not
merge exactly: the host applies input adjustments in run order, OFT's first.)

Merging writes W Rᵀ (E R) into the base weight and keeps the original, so unmerging restores it
bit for bit (HF PEFT multiplies by the inverse instead).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from .. import architectures
from ..config import TargetedConfig, check_bool, check_number, check_positive_int
from ..errors import ConfigError
from ..layer import Unit
from ..unit import adapter_factory
from ..registry import CliMethod, Method, register
from ..targeting import is_conv1d

SUPPORTED = "Linear, Conv2d, Embedding"
# Written as ``peft_version`` into OFT's adapter_config.json: the HF PEFT release whose OFT this
# file follows. HF PEFT reads a missing version as older than 0.18, whose Cayley–Neumann series
# differed, and warns on every load that the adapter must be retrained.
HF_PEFT_VERSION = "0.21.2"
BIAS_CHOICES = ("none", "all", "oft_only")
INIT_STD = 0.1  # HF PEFT's init_weights=False
MAX_NEUMANN_TERMS = 100  # peftkit's bound (HF PEFT has none): beyond it, use the exact transform


@dataclass
class OFTConfig(TargetedConfig):
    """OFT settings; names, meanings and defaults as in HF PEFT 0.21's ``OFTConfig``.

    ``r`` (blocks per layer) or ``oft_block_size`` (their size): exactly one non-zero, the
    default being blocks of 32; ``module_dropout`` (blocks set to the identity in training);
    ``coft`` / ``eps`` (the constrained variant and its radius); ``block_share`` (one block for
    the whole layer); ``use_cayley_neumann`` / ``num_cayley_neumann_terms`` (the truncated
    series instead of the exact inverse); ``init_weights`` (False: a random rotation at once);
    ``bias``; ``fan_in_fan_out`` (False only).
    """

    peft_type: ClassVar[str] = "OFT"
    # Every field of HF PEFT 0.21's OFTConfig is a field here: nothing is refused or ignored.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    init_weights: bool = True
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    def validate(self) -> None:
        super().validate()
        for name in ("r", "oft_block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{name}: expected a non-negative integer (0: derived from the other of "
                                  f"r / oft_block_size), found {value!r}")
        if (self.r != 0) == (self.oft_block_size != 0):
            raise ConfigError(
                f"r, oft_block_size: expected exactly one of them non-zero (r blocks of oft_block_size make the "
                f"layer's input dimension; set the other to 0), found r={self.r} and "
                f"oft_block_size={self.oft_block_size}")
        if self.oft_block_size == 1:
            raise ConfigError("oft_block_size: expected 0 or an integer of at least 2 (a block of size 1 has "
                              "nothing to rotate), found 1")
        check_number("module_dropout", self.module_dropout, 0.0, 1.0)
        for name in ("fan_in_fan_out", "init_weights", "coft", "block_share", "use_cayley_neumann"):
            check_bool(name, getattr(self, name))
        if self.fan_in_fan_out:
            raise ConfigError("fan_in_fan_out: expected false (OFT adapts Linear, Conv2d and Embedding layers, none "
                              "stored (fan_in, fan_out); HF PEFT resets it to False as well), found True")
        if self.bias not in BIAS_CHOICES:
            raise ConfigError(f"bias: expected 'none', 'all' or 'oft_only', found {self.bias!r}")
        check_number("eps", self.eps)
        if self.eps <= 0:
            raise ConfigError(f"eps: expected a positive number (COFT's radius), found {self.eps!r}")
        check_positive_int("num_cayley_neumann_terms", self.num_cayley_neumann_terms)
        if self.num_cayley_neumann_terms > MAX_NEUMANN_TERMS:
            raise ConfigError(f"num_cayley_neumann_terms: expected a positive integer of at most {MAX_NEUMANN_TERMS} "
                              f"(one matrix product per term, every forward), found {self.num_cayley_neumann_terms}")
        if self.layers_pattern and self.layers_to_transform is None:  # HF PEFT refuses it too
            raise ConfigError(f"layers_pattern: expected layers_to_transform to be set with it, "
                              f"found layers_pattern={self.layers_pattern!r} and layers_to_transform=None")

    def file_dict(self, adapted: list[str]) -> dict[str, Any]:
        return {**super().file_dict(adapted), "peft_version": HF_PEFT_VERSION}


# -- the rotation ---------------------------------------------------------------------------


def neumann_powers(terms: int) -> list[tuple[int, float]]:
    """HF PEFT's Cayley–Neumann series as (power of Q, coefficient) pairs after the identity."""
    if terms <= 1:
        return []
    if terms == 2:
        return [(1, 2.0)]
    last = max(terms - 1, 3)
    return [(k, 2.0) for k in range(1, last)] + [(last, 1.0)]


def nearest_divisor(dim: int, value: int) -> int:
    """The divisor of ``dim`` nearest to ``value`` (the lower one on a tie; ``dim`` when
    ``value`` exceeds it): what HF PEFT silently substitutes for a value that does not divide."""
    if value >= dim:
        return dim
    lower = next(d for d in range(value, 0, -1) if dim % d == 0)
    higher = next(d for d in range(value, dim + 1) if dim % d == 0)
    return lower if value - lower <= higher - value else higher


class OFTUnit(Unit):
    """The stored vectors of one adapted layer and the block-diagonal rotation they make.

    ``dim`` is the rotated dimension (split into ``n_blocks`` blocks of ``block``); the
    parameter holds one vector per block, or one for all with ``block_share``."""

    mergeable: ClassVar[bool] = True
    runs_first: ClassVar[bool] = True  # see the module docstring: it rotates the base layer alone
    file_key: ClassVar[str] = "oft_R"

    def __init__(self, dim: int, block: int, config: OFTConfig, factory: dict) -> None:
        super().__init__()
        self.dim, self.block, self.n_blocks = dim, block, dim // block
        self.block_share = config.block_share
        self.coft, self.eps = config.coft, config.eps
        self.neumann = config.use_cayley_neumann
        self.powers = neumann_powers(config.num_cayley_neumann_terms)
        self.module_dropout = config.module_dropout
        stored = 1 if self.block_share else self.n_blocks
        self.oft_R = nn.Parameter(torch.empty(stored, block * (block - 1) // 2, **factory))
        with torch.no_grad():
            if config.init_weights:
                nn.init.zeros_(self.oft_R)
            else:
                nn.init.normal_(self.oft_R, mean=0.0, std=INIT_STD)
        rows, cols = torch.triu_indices(block, block, 1, device=factory["device"])
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self._original: torch.Tensor | None = None  # the base weight while merged

    # -- building R -------------------------------------------------------------------------
    def skew(self, vectors: torch.Tensor) -> torch.Tensor:
        """Q = S − Sᵀ per stored vector, S holding it in its strict upper triangle: (D, b, b)."""
        s = vectors.new_zeros(vectors.shape[0], self.block, self.block)
        s[:, self.rows, self.cols] = vectors
        return s - s.transpose(-2, -1)

    def _project_(self) -> None:
        """COFT: each block's Q onto the Frobenius ball of radius eps/√D, written back (HF PEFT)."""
        with torch.no_grad():
            v = self.oft_R
            radius = self.eps / math.sqrt(v.shape[0])
            norm = v.norm(dim=1, keepdim=True) * math.sqrt(2.0)  # ‖Q‖_F = √2 · ‖v‖
            scale = (radius / norm.clamp_min(torch.finfo(v.dtype).tiny)).clamp(max=1.0)  # 1 inside the ball
            v.copy_(torch.where(norm > radius, v * scale, v))  # no host sync to test whether any block is outside

    def cayley(self, vectors: torch.Tensor) -> torch.Tensor:
        """The stored blocks R_i, (D, b, b), from their vectors (exact or Cayley–Neumann)."""
        q = self.skew(vectors)
        eye = torch.eye(self.block, device=q.device, dtype=q.dtype).expand_as(q)
        if not self.neumann:
            return torch.linalg.solve(eye + q, eye - q, left=False)  # R (I + Q) = I − Q
        r = eye.clone()
        power, k = None, 0
        for exponent, coefficient in self.powers:
            while k < exponent:
                power, k = (q if power is None else torch.bmm(power, q)), k + 1
            r = r + coefficient * power if coefficient != 1.0 else r + power
        return r

    def blocks(self, dropout: bool = False) -> torch.Tensor:
        """The stored rotation blocks (D, b, b) as the forward uses them."""
        if self.coft:
            self._project_()
        r = self.cayley(self.oft_R)
        d = r.shape[0]
        if dropout and self.module_dropout > 0 and d > 1:
            dropped = torch.zeros(d, dtype=torch.bool, device=r.device)
            dropped[torch.randperm(d, device=r.device)[: int(self.module_dropout * d)]] = True
            eye = torch.eye(self.block, device=r.device, dtype=r.dtype)
            r = torch.where(dropped.view(d, 1, 1), eye, r)
        return r

    def matrix(self) -> torch.Tensor:
        """The whole (dim, dim) block-diagonal rotation (for inspection and tests)."""
        r = self.blocks().detach()
        if r.shape[0] == 1 and self.n_blocks > 1:
            r = r.expand(self.n_blocks, -1, -1)
        return torch.block_diag(*r)

    def rotate(self, h: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """Rows ``h`` (..., dim) times the block-diagonal matrix of ``blocks``: blockwise h_i R_i."""
        shape = h.shape
        if blocks.shape[0] == 1:  # one block for all (block_share, or a single block)
            return (h.reshape(-1, self.block) @ blocks[0]).view(shape)
        h3 = h.reshape(-1, self.n_blocks, self.block).transpose(0, 1)  # (D, N, b)
        return torch.bmm(h3, blocks).transpose(0, 1).reshape(shape)

    def _dropout_now(self) -> bool:
        return self.training and self.module_dropout > 0

    # -- merging ----------------------------------------------------------------------------
    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight in the base's own layout (subclasses)."""
        raise NotImplementedError

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            self._original = base.weight.detach().clone()
            base.weight.copy_(self.rotated_weight(base.weight).to(base.weight.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        if self._original is None:
            return
        with torch.no_grad():
            base.weight.copy_(self._original)
        self._original = None

    def file_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{self.file_key}.weight": self.oft_R}

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, blocks={self.n_blocks}x{self.block}, block_share={self.block_share}, "
                f"coft={self.coft}, cayley_neumann={self.neumann}")


class OFTLinear(OFTUnit):
    """``base(x R)``: the input's features rotated before the (untouched) base layer runs."""

    acts_on_input: ClassVar[bool] = True

    def adjust_input(self, x: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks(self._dropout_now())
        h = x if x.dtype == blocks.dtype else x.to(blocks.dtype)
        out = self.rotate(h, blocks)
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return out  # the rotation happened on the input

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W Rᵀ: each row of W rotated by the transposed blocks."""
        blocks = self.blocks()
        return self.rotate(weight.to(blocks.dtype), blocks.transpose(-2, -1))


class OFTConv2d(OFTUnit):
    """One convolution with the rotated filter W Rᵀ (flattened to (out, C·k·k)), in the base's place."""

    replaces_base: ClassVar[bool] = True
    runs_first: ClassVar[bool] = False  # replaces_base already puts it first (one flag per unit)

    def __init__(self, base: nn.Conv2d, block: int, config: OFTConfig, factory: dict) -> None:
        super().__init__(base.in_channels * base.kernel_size[0] * base.kernel_size[1], block, config, factory)
        self.__dict__["_base"] = base  # a reference, not a submodule: no duplicate in state_dict

    def _rotated(self, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        flat = weight.reshape(weight.shape[0], -1).to(blocks.dtype)
        return self.rotate(flat, blocks.transpose(-2, -1)).view(weight.shape)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        base = self._base
        weight = self._rotated(base.weight, self.blocks(self._dropout_now())).to(base.weight.dtype)
        return base._conv_forward(x, weight, base.bias)  # the base's stride, padding and padding mode

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self._rotated(weight, self.blocks())


class OFTEmbedding(OFTUnit):
    """The looked-up vectors rotated: ``E[x] R``."""

    file_key: ClassVar[str] = "oft_embedding_R"

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks(self._dropout_now())
        h = out if out.dtype == blocks.dtype else out.to(blocks.dtype)
        rotated = self.rotate(h, blocks)
        return rotated if rotated.dtype == out.dtype else rotated.to(out.dtype)

    def rotated_weight(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = self.blocks()
        return self.rotate(weight.to(blocks.dtype), blocks)



def _block_size(config: OFTConfig, dim: int, path: str, what: str) -> int:
    """The layer's block size from r or oft_block_size, which must divide ``dim``."""
    name, value = ("r", config.r) if config.r else ("oft_block_size", config.oft_block_size)
    if value > dim or dim % value:
        raise ConfigError(
            f"OFT cannot adapt {path!r} ({what}): {name}: expected a divisor of its input dimension {dim}, "
            f"found {value} (HF PEFT would silently use {nearest_divisor(dim, value)}); set {name} to a "
            f"divisor of every target's input dimension, or exclude the layer")
    block = dim // value if config.r else value
    if block < 2:
        raise ConfigError(f"OFT cannot adapt {path!r} ({what}): r: expected at most {dim // 2} blocks for its input "
                          f"dimension {dim} (blocks of at least 2), found {config.r}")
    return block


def make_unit(config: OFTConfig, module: nn.Module, path: str) -> OFTUnit:
    kind = type(module).__name__
    if is_conv1d(module):
        raise ConfigError(
            f"OFT cannot adapt {path!r} of type Conv1D (transformers' GPT-2 layer, weight stored (in, out)): "
            f"HF PEFT's OFT does not support it, so its files could not be exchanged; supported: {SUPPORTED}. "
            "Target other layers, or use LoRA on this model")
    if not isinstance(module, (nn.Linear, nn.Conv2d, nn.Embedding)):
        raise ConfigError(f"OFT cannot adapt {path!r} of type {kind}; supported: {SUPPORTED}")
    factory = adapter_factory(module)
    if isinstance(module, nn.Linear):  # in_features, not weight.shape: a 4-bit weight is packed
        dim = module.in_features
        return OFTLinear(dim, _block_size(config, dim, path, f"Linear, in_features {dim}"), config, factory)
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        problem = ("a non-square kernel" if kh != kw else f"groups={module.groups}" if module.groups != 1
                   else f"dilation={tuple(module.dilation)}" if tuple(module.dilation) != (1, 1) else None)
        if problem:
            raise ConfigError(f"OFT cannot adapt {path!r} (Conv2d, kernel {kh}x{kw}): {problem} is not supported "
                              "(HF PEFT's OFT cannot handle it either); supported: Conv2d with a square kernel, "
                              "groups=1 and dilation 1")
        dim = module.in_channels * kh * kw
        what = f"Conv2d, in_channels {module.in_channels} x kernel {kh}x{kw} = {dim}"
        return OFTConv2d(module, _block_size(config, dim, path, what), config, factory)
    dim = module.embedding_dim  # nn.Embedding, the only type left
    return OFTEmbedding(dim, _block_size(config, dim, path, f"Embedding, embedding_dim {dim}"), config, factory)


# Defaults when target_modules is None, per transformers model_type: LoRA's (the attention
# query and value projections; HF PEFT's OFT table is LoRA's too).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _cli_config(values: dict[str, Any]) -> OFTConfig:
    # --r is HF PEFT's r: the number of blocks per layer (block size = input dimension / r).
    return OFTConfig(r=values["r"], oft_block_size=0, target_modules=values["targets"])


# The trainer's learning rate. On the bundled demo (MiniLM, --r 8: blocks of 48 on the query and
# value projections, 30 steps, eval loss from 1.09) LoRA's 2e-3 left OFT at 0.51, 3e-3 at 0.24,
# 5e-3 at 0.065 (accuracy 1.0; seeds 1 and 2: 0.076, 0.056, both 1.0), 1e-2 at 0.11 with accuracy
# falling to 0.96 (seed 1: 0.14, 0.96), 2e-2 at 0.057 (0.98), 5e-2 diverged (accuracy 0.40).
LEARNING_RATE = 5e-3
register(Method(
    "OFT", OFTConfig, make_unit=make_unit, default_targets=DEFAULT_TARGETS, mergeable=True, identity_at_init=True,
    cli=(CliMethod("oft", "OFT: block-diagonal orthogonal rotation of the targets' inputs (--r: blocks per layer; "
                   "default: the attention layers)", _cli_config, ("r", "targets"), {"lr": LEARNING_RATE}),),
))
