"""LoRA's training step over a plain dense layer as one autograd node.

The plain path is the base layer's output plus ``s·B(A·x)``, which autograd runs as about six
nodes per layer: the base output is copied into a new (N, out) tensor for the addition, and in
the backward the input gradient of the base layer and that of the LoRA branch are two (N, in)
tensors added together. At r = 8 those copies and additions move as many bytes as the low-rank
products themselves compute, and on a CPU they are a tenth of a step over the least work an
adapter step must do (BENCHMARKS.md, the suite's profile).

``LoraDense`` computes the same numbers in one node: the update is added into the base output
in place (``addmm_``) and the input gradient of the LoRA branch is added into the base layer's
(``addmm_`` again). It saves ``x`` once (the base layer's backward needs it anyway) and the small
(N, r) product ``A·x``. With dropout the LoRA branch reads the dropped input, which autograd
computed outside the node: the node takes both and returns a gradient for each.

At inference (no gradients) ``merged_inference`` runs the layer on W + s·BA built for the call
where that moves fewer bytes than the low-rank passes (many tokens, float32), else the plain
path adds the update into the base output in place.

``fusable`` says when either applies: a plain ``nn.Linear`` (or transformers' ``Conv1D``)
base whose weight and bias are frozen, every tensor in one floating dtype, not
under autocast (which would cast the operands of the base layer's own call but not ours), a
float scaling (not ``swap.prepare_hotswap``'s 0-d tensor), no LoRA bias, and no hooks on the
base layer (they would not see a call). Everything else
takes the plain path, which computes the same (``tests/test_lora_fused.py``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..unit import autocast_on


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


_CONV1D = _conv1d_type()


def fusable(base: nn.Module, x: torch.Tensor, a: torch.Tensor, scaling, has_bias: bool) -> bool:
    kind = type(base)
    if not (kind is nn.Linear or (_CONV1D is not None and kind is _CONV1D)):
        return False
    if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
        return False  # a hook on the base layer (device offloading, a probe) must see its call
    weight, bias = base.weight, base.bias
    if weight.requires_grad or (bias is not None and bias.requires_grad) or has_bias:
        return False
    if isinstance(scaling, torch.Tensor):
        return False
    if autocast_on(x.device):
        return False
    return x.dtype == a.dtype == weight.dtype and x.device == weight.device and x.shape[-1] == a.shape[1]


# With no dropout in float32, the node may instead run the layer on W + s·BA, built on the fly
# (twice: forward and backward; never kept): the update then costs two (out, in) products
# instead of low-rank passes over the (N, out) output and the (N, in) input gradient. "auto"
# takes it when that moves fewer bytes; True / False force it (tests, benchmarks). Never in
# 16-bit floats, where W + s·BA would round a small update away.
MERGED_WEIGHT: bool | str = "auto"


def _merged_weight(x2: torch.Tensor, weight: torch.Tensor, builds: int = 2) -> bool:
    """Whether building W + s·BA ``builds`` times moves fewer bytes than the low-rank passes:
    in training, reading x for A·x and adding into the (N, out) output, then the (N, in) input
    gradient (2·N·out + N·in against 2 builds of 2·out·in); at inference the output alone
    (N·in + 2·N·out against one build). ``weight`` is (out, in)."""
    if MERGED_WEIGHT != "auto":
        return bool(MERGED_WEIGHT)
    if weight.dtype != torch.float32:
        return False
    n, (d_out, d_in) = x2.shape[0], weight.shape
    return 2 * n * d_out + n * d_in > builds * 2 * d_out * d_in


def merged_inference(x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, scaling: float,
                     scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """Without gradients: the layer on W + s·BA built for this call (the base weight is not
    touched), where that moves fewer bytes than the low-rank passes; None otherwise (the plain
    path, which adds the update into the base output in place). No dropout may be active.
    ``scale`` (DoRA's m/‖W + s·BA‖, (out,)) multiplies the product before the bias is added."""
    transposed = type(base) is not nn.Linear
    weight = base.weight
    if not _merged_weight(x.reshape(-1, x.shape[-1]), weight.t() if transposed else weight, builds=1):
        return None
    w = _with_update(weight, a, b, scaling, transposed)
    w = w.t() if transposed else w
    if scale is None:  # LoRA
        return torch.nn.functional.linear(x, w, base.bias)
    y = torch.nn.functional.linear(x, w)  # DoRA: scale ⊙ x (W + s·BA)ᵀ + b
    return torch.addcmul(base.bias, y, scale) if base.bias is not None else y * scale


def lora_dense(x: torch.Tensor, dropped: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor,
               scaling: float) -> torch.Tensor:
    """``base(x) + scaling · B(A·dropped)`` as one autograd node (``fusable`` must hold)."""
    transposed = type(base) is not nn.Linear  # Conv1D keeps its weight as (in, out)
    if dropped is x:
        return _LoraDense.apply(x, base.weight, base.bias, a, b, scaling, transposed)
    return _LoraDenseDropped.apply(x, dropped, base.weight, base.bias, a, b, scaling, transposed)


def _with_update(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> torch.Tensor:
    """W + s·BA in the base weight's own layout."""
    if transposed:  # Conv1D: (in, out)
        return torch.addmm(weight, a.t(), b.t(), alpha=scaling)
    return torch.addmm(weight, b, a, alpha=scaling)


def _forward(x2: torch.Tensor, d2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             a: torch.Tensor, b: torch.Tensor, scaling: float, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight if transposed else weight.t()  # (in, out)
    out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
    h = d2 @ a.t()  # (N, r)
    out.addmm_(h, b.t(), alpha=scaling)
    return out, h


def _backward(ctx, g: torch.Tensor, d2: torch.Tensor, weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
              h: torch.Tensor, fuse_dx: bool):
    """(grad of x or None, grad of the dropped input or None, grad A, grad B); with ``fuse_dx``
    the LoRA branch's input gradient is added into the base layer's (x is the dropped input)."""
    s = ctx.scaling
    g2 = g.reshape(-1, g.shape[-1])
    dh = (g2 @ b).mul_(s)  # (N, r)
    grad_b = (g2.t() @ h).mul_(s) if ctx.needs_b else None
    grad_a = dh.t() @ d2 if ctx.needs_a else None
    grad_x = grad_d = None
    if ctx.needs_x:
        grad_x = g2 @ (weight.t() if ctx.transposed else weight)  # (N, in)
        if fuse_dx:
            grad_x.addmm_(dh, a)
    if ctx.needs_d:
        grad_d = dh @ a
    return grad_x, grad_d, grad_a, grad_b


class _LoraDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling, transposed):
        x2 = x.reshape(-1, x.shape[-1])
        ctx.merged = _merged_weight(x2, weight if not transposed else weight.t())
        if ctx.merged:
            w = _with_update(weight, a, b, scaling, transposed)
            w = w if transposed else w.t()  # (in, out)
            out = torch.addmm(bias, x2, w) if bias is not None else x2 @ w
            h = x2 @ a.t()  # for B's gradient
        else:
            out, h = _forward(x2, x2, weight, bias, a, b, scaling, transposed)
        ctx.save_for_backward(x2, weight, a, b, h)
        ctx.scaling, ctx.transposed, ctx.shape = scaling, transposed, x.shape
        ctx.needs_x, ctx.needs_a, ctx.needs_b = ctx.needs_input_grad[0], ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        ctx.needs_d = False
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, weight, a, b, h = ctx.saved_tensors
        if ctx.merged:  # the input gradient through W + s·BA carries the LoRA branch's share
            merged = _with_update(weight, a, b, ctx.scaling, ctx.transposed) if ctx.needs_x else None
            grad_x, _, grad_a, grad_b = _backward(ctx, g, x2, merged, a, b, h, fuse_dx=False)
        else:
            grad_x, _, grad_a, grad_b = _backward(ctx, g, x2, weight, a, b, h, fuse_dx=True)
        return (None if grad_x is None else grad_x.view(ctx.shape)), None, None, grad_a, grad_b, None, None


class _LoraDenseDropped(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dropped, weight, bias, a, b, scaling, transposed):
        x2, d2 = x.reshape(-1, x.shape[-1]), dropped.reshape(-1, dropped.shape[-1])
        out, h = _forward(x2, d2, weight, bias, a, b, scaling, transposed)
        ctx.save_for_backward(d2, weight, a, b, h)  # x itself is not needed: the base weight is frozen
        ctx.scaling, ctx.transposed, ctx.shape = scaling, transposed, x.shape
        ctx.needs_x, ctx.needs_d = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.needs_a, ctx.needs_b = ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        d2, weight, a, b, h = ctx.saved_tensors
        grad_x, grad_d, grad_a, grad_b = _backward(ctx, g, d2, weight, a, b, h, fuse_dx=False)
        shape = ctx.shape
        return (None if grad_x is None else grad_x.view(shape), None if grad_d is None else grad_d.view(shape),
                None, None, grad_a, grad_b, None, None)


# -- DoRA -------------------------------------------------------------------------------------
# DoRA's output is m/‖W + s·BA‖ ⊙ (x (W + s·BA)ᵀ) + b, the norm a constant in the backward pass
# (methods/dora.py). Its training step builds W + s·BA anyway, for the norm; run on that weight,
# the layer needs no low-rank pass over the (N, out) output at all, and the backward builds it
# once more for the input gradient. Same conditions as LoRA's node, no dropout, float32.


def dora_dense(x: torch.Tensor, base: nn.Module, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor,
               scaling: float) -> torch.Tensor | None:
    """DoRA's layer (base and update) as one autograd node on W + s·BA, or None where the
    low-rank path moves fewer bytes (``fusable`` must hold; no active dropout)."""
    transposed = type(base) is not nn.Linear
    weight = base.weight
    if not _merged_weight(x.reshape(-1, x.shape[-1]), weight.t() if transposed else weight, builds=1):
        return None
    return _DoraDense.apply(x, weight, base.bias, a, b, magnitude, scaling, transposed)


class _DoraDense(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, magnitude, scaling, transposed):
        x2 = x.reshape(-1, x.shape[-1])
        w = _with_update(weight, a, b, scaling, transposed)
        w = w.t() if transposed else w  # (out, in)
        norm = w.norm(dim=1)
        scale = magnitude / norm
        y = x2 @ w.t()  # (N, out)
        out = torch.addcmul(bias, y, scale) if bias is not None else y * scale
        ctx.save_for_backward(x2, weight, a, b, x2 @ a.t(), y, scale, norm)
        ctx.scaling, ctx.transposed, ctx.shape = scaling, transposed, x.shape
        ctx.needs_x, ctx.needs_a, ctx.needs_b, ctx.needs_m = (ctx.needs_input_grad[i] for i in (0, 3, 4, 5))
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, g):
        x2, weight, a, b, h, y, scale, norm = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        grad_m = (g2 * y).sum(0).div_(norm) if ctx.needs_m else None
        gy = g2 * scale
        ctx.needs_d = False
        merged = _with_update(weight, a, b, ctx.scaling, ctx.transposed) if ctx.needs_x else None
        grad_x, _, grad_a, grad_b = _backward(ctx, gy, x2, merged, a, b, h, fuse_dx=False)
        return (None if grad_x is None else grad_x.view(ctx.shape)), None, None, grad_a, grad_b, grad_m, None, None
