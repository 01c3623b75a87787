"""A new LoRA adapter from a weighted combination of existing ones.

For every layer the adapters share, with ΔWᵢ = sᵢ·BᵢAᵢ and weights wᵢ:

- ``"cat"``: exactly Σ wᵢ·ΔWᵢ. A is the row-stack of the Aᵢ, B the column-stack of wᵢ·sᵢ·Bᵢ,
  so the new rank is the sum of the ranks (per layer, through ``rank_pattern``).
- ``"svd"``: the best rank-k approximation (Eckart–Young) of that exact sum, k = ``svd_rank``
  or the largest rank combined. Exact when k reaches the sum's rank.
- ``"linear"``: HF PEFT's same-rank weighting, A = Σ ±√|wᵢsᵢ|·Aᵢ (the sign of wᵢsᵢ on A) and
  B = Σ √|wᵢsᵢ|·Bᵢ. Cheap and rank-preserving but *approximate*: the product picks up cross
  terms BᵢAⱼ (i ≠ j).

The model-merging methods of HF PEFT's ``add_weighted_adapter``, with ``density`` (the fraction
of entries kept, in [0, 1]) and ``majority_sign_method`` (``"total"`` or ``"frequency"``):

- ``"ties"`` — TIES-Merging (Yadav et al., 2023, arXiv:2306.01708): each task tensor keeps its
  ``density`` largest-magnitude entries (``int(density·numel)`` of them; ``density`` ≥ 1 keeps
  all); per entry the majority sign is the sign of the sum of the pruned tensors (``"total"``)
  or of the sum of their signs (``"frequency"``), 0 counting as +; the result is the sum of the
  *weighted* pruned entries that have the majority sign divided by how many tensors have that
  sign there (at least 1).
- ``"magnitude_prune"``: the same pruning, then the plain weighted sum.
- ``"dare_linear"`` — DARE (Yu et al., 2023, arXiv:2311.03099): each entry is kept with
  probability ``density`` (a Bernoulli mask) and the kept ones divided by ``density``; then the
  weighted sum. ``"dare_ties"``: the same masks, then TIES' sign election and disjoint mean.
  The masks are drawn from ``generator`` (a ``torch.Generator``; None: torch's global RNG) in a
  fixed order: layer by layer in the model's module order; without ``_svd`` all adapters' A
  tensors, then their B tensors; with ``_svd`` each adapter's ΔW (in the layer's own weight
  layout). Same generator state, same masks.

Without the ``_svd`` suffix (as in HF PEFT) the merge is applied to the A and to the B tensors
separately, with weights √|wᵢsᵢ|·sign(wᵢsᵢ) on A and √|wᵢsᵢ| on B (so ``"linear"`` is this
family with no pruning); the ranks must be equal and the rank is kept. With the suffix
(``"ties_svd"``, ``"dare_linear_svd"``, ``"dare_ties_svd"``, ``"magnitude_prune_svd"``) it is
applied to the full ΔWᵢ, with weights wᵢ, and the result truncated to rank k by SVD as for
``"svd"`` (``svd_clamp``: HF's optional clamping of the factors to a quantile of their entries).

The new adapter has scaling 1 (``lora_alpha = r`` per layer) and takes the first adapter's
``modules_to_save`` copies (a classifier head is not averaged). It becomes the active adapter,
like any newly added one. DoRA adapters cannot be combined this way (their magnitude is not
linear in the update). One difference from HF PEFT: HF silently switches to ``"linear"`` when a
single adapter is given; peftkit applies the method asked for (pruning one adapter).
"""

from __future__ import annotations

import math
import re
from typing import Callable

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..inject import apply
from ..layer import AdapterLayer, SavedModule
from ..state import check_name, get_state, hosts
from .lora import LoraConfig, LoraConv2d, LoraEmbedding, LoraUnit

MERGES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
HOW = ("cat", "svd", *MERGES) + tuple(f"{m}_svd" for m in MERGES[1:])
SIGN_METHODS = ("total", "frequency")


# -- the merge functions (on a list of same-shaped task tensors) --------------------------------


def magnitude_mask(t: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density·numel)`` entries of largest magnitude (all when density ≥ 1)."""
    if density >= 1:
        return t
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    keep[torch.topk(t.abs().reshape(-1), k=int(density * t.numel()), largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def random_mask(t: torch.Tensor, density: float, generator: torch.Generator | None) -> torch.Tensor:
    """DARE: keep each entry with probability ``density`` and rescale the kept ones by 1/density."""
    if density >= 1:
        return t
    mask = torch.bernoulli(torch.full_like(t, density), generator=generator)
    return t * mask / density


def majority_sign(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Where each task tensor (stacked on dim 0) has the elected sign (sum or count; 0 → +)."""
    sign = stacked.sign()
    votes = stacked.sum(dim=0) if method == "total" else sign.sum(dim=0)
    return sign == torch.where(votes >= 0, 1.0, -1.0).to(sign.dtype)


def merge_tensors(how: str, tensors: list[torch.Tensor], weights: list[float], density: float | None,
                  sign_method: str, generator: torch.Generator | None) -> torch.Tensor:
    """One of ``MERGES`` applied to ``tensors`` with ``weights`` (HF PEFT's ``merge_utils``)."""
    if how in ("ties", "magnitude_prune"):
        tensors = [magnitude_mask(t, density) for t in tensors]
    elif how in ("dare_linear", "dare_ties"):
        tensors = [random_mask(t, density, generator) for t in tensors]
    stacked = torch.stack(tensors, dim=0)
    w = torch.tensor(weights, dtype=stacked.dtype, device=stacked.device).view(-1, *([1] * (stacked.ndim - 1)))
    if how in ("ties", "dare_ties"):
        agree = majority_sign(stacked, sign_method)
        return (stacked * w * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1.0)
    return (stacked * w).sum(dim=0)


# -- per layer ------------------------------------------------------------------------------------


def _factors(unit: LoraUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of any LoRA unit, as stored (A (r, …), B (…, r, …))."""
    a, b = list(unit.file_tensors().values())[:2]
    return a.detach(), b.detach()


def _pair(unit: LoraUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of any LoRA unit as 2-D matrices, B (out, r) and A (r, in)."""
    a, b = _factors(unit)
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def _as_2d(unit: LoraUnit, delta: torch.Tensor) -> torch.Tensor:
    """A ΔW in the layer's own weight layout (Conv1D's (in, out), an embedding's (num, dim),
    a conv's (out, in, k, k)) as the (out, in) matrix B·A factors."""
    if isinstance(unit, LoraConv2d):
        return delta.flatten(start_dim=1)
    if isinstance(unit, LoraEmbedding) or getattr(unit, "transposed", False):
        return delta.t()
    return delta


def _truncate(delta: torch.Tensor, k: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = the best rank-k factors of ``delta`` (B = U·S, A = Vᴴ); ``clamp``: HF's quantile."""
    k = min(k, *delta.shape)
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    b, a = u[:, :k] * sv[:k], vh[:k]
    if clamp is not None:
        high = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-high, high), a.clamp(-high, high)
    return b.to(delta.dtype), a.to(delta.dtype)


def _combined_pair(units: list[LoraUnit], weights: list[float], how: str, svd_rank: int | None,
                   merge: Callable[[str, list[torch.Tensor], list[float]], torch.Tensor], svd_clamp: float | None):
    scales = [w * float(u.scaling) for u, w in zip(units, weights)]
    if how == "cat":
        pairs = [_pair(u) for u in units]
        return torch.cat([s * b for s, (b, _) in zip(scales, pairs)], dim=1), torch.cat([a for _, a in pairs], dim=0)
    k = svd_rank or max(u.r for u in units)
    if how == "svd":
        pairs = [_pair(u) for u in units]
        return _truncate(sum(s * (b @ a) for s, (b, a) in zip(scales, pairs)), k, svd_clamp)
    if how.endswith("_svd"):
        # merged in the layer's own layout (the order DARE's masks are drawn in), then as (out, in)
        delta = merge(how[: -len("_svd")], [u.delta_weight().detach() for u in units], list(weights))
        return _truncate(_as_2d(units[0], delta), k, svd_clamp)
    ranks = {u.r for u in units}
    if len(ranks) != 1:
        raise ConfigError(f'combine(how="{how}") needs equal ranks on each layer, found {sorted(ranks)}')
    roots = [math.sqrt(abs(s)) for s in scales]
    factors = [_factors(u) for u in units]
    a = merge(how, [a for a, _ in factors], [math.copysign(root, s) for root, s in zip(roots, scales)])
    b = merge(how, [b for _, b in factors], roots)
    return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)


def _not_plain(config: LoraConfig) -> str:
    """The fields that make a LoRA adapter more than low-rank updates against its base ('' if none)."""
    from . import lora_init

    found = []
    if lora_init.modifies_base(config.init_lora_weights):
        found.append(f"init_lora_weights={config.init_lora_weights!r} (its base holds a residual)")
    for field, off in (("lora_bias", False), ("trainable_token_indices", None), ("target_parameters", None),
                       ("layer_replication", None)):
        if getattr(config, field, off) not in (off, [], {}):
            found.append(field)
    return ", ".join(found)


def combine(model: nn.Module, names: list[str], weights: list[float], new_name: str, how: str = "cat",
            svd_rank: int | None = None, density: float | None = None, majority_sign_method: str = "total",
            generator: torch.Generator | None = None, svd_clamp: float | None = None) -> nn.Module:
    """Add adapter ``new_name`` = the weighted combination of LoRA adapters ``names``.

    ``how``: one of ``HOW`` (see the module's docstring); ``density`` is required by the pruning
    methods; ``generator`` seeds DARE's masks (``torch.Generator().manual_seed(s)``)."""
    state = get_state(model)
    if how not in HOW:
        raise ConfigError(f"how: expected one of {', '.join(HOW)}, found {how!r}")
    if not names or len(names) != len(weights):
        raise ConfigError(f"combine needs one weight per adapter: {len(names)} names, {len(weights)} weights")
    base = how[: -len("_svd")] if how.endswith("_svd") else how
    if base in ("ties", "dare_linear", "dare_ties", "magnitude_prune"):
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0 <= density <= 1 or (base.startswith("dare") and density == 0):
            raise ConfigError(f'combine(how="{how}"): density: expected a number in '
                              f'{"(0, 1]" if base.startswith("dare") else "[0, 1]"} (the fraction of entries '
                              f"kept), found {density!r}")
    if majority_sign_method not in SIGN_METHODS:
        raise ConfigError(f"majority_sign_method: expected one of {', '.join(SIGN_METHODS)}, "
                          f"found {majority_sign_method!r}")
    if svd_clamp is not None and not (isinstance(svd_clamp, (int, float)) and 0 <= svd_clamp <= 1):
        raise ConfigError(f"svd_clamp: expected a quantile in [0, 1], found {svd_clamp!r}")
    configs = [check_name(state, n) for n in names]
    for n, c in zip(names, configs):
        if not isinstance(c, LoraConfig) or c.use_dora:
            raise ConfigError(f"adapter {n!r} is not a plain LoRA adapter ({c.peft_type}); only LoRA adapters combine")
        extra = _not_plain(c)
        if extra:
            raise ConfigError(f"adapter {n!r} cannot combine: it uses {extra}, which a combined plain LoRA adapter "
                              "cannot carry (only low-rank updates against the untouched base combine)")

    def merge(kind: str, tensors: list[torch.Tensor], ws: list[float]) -> torch.Tensor:
        return merge_tensors(kind, tensors, ws, density, majority_sign_method, generator)

    layers: dict[str, tuple[list[LoraUnit], list[float]]] = {}
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer):
            present = [(host.adapters[n], w) for n, w in zip(names, weights) if n in host.adapters]
            if present:
                layers[path] = ([u for u, _ in present], [w for _, w in present])
    pairs = {}
    for path, (units, ws) in layers.items():
        if len({type(u) for u in units}) != 1:
            raise ConfigError(f"layer {path!r}: adapters of different layer kinds cannot combine")
        pairs[path] = _combined_pair(units, ws, how, svd_rank, merge, svd_clamp)
    ranks = {path: a.shape[0] for path, (_, a) in pairs.items()}
    r = max(ranks.values())
    config = LoraConfig(
        r=r, lora_alpha=r, target_modules=sorted(pairs), task_type=configs[0].task_type,
        rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
        modules_to_save=configs[0].modules_to_save,
    )
    apply(model, config, new_name)
    with torch.no_grad():
        for path, host in hosts(model):
            if isinstance(host, AdapterLayer) and path in pairs:
                b, a = pairs[path]
                target_a, target_b = list(host.adapters[new_name].file_tensors().values())[:2]
                target_a.copy_(a.reshape(target_a.shape))
                target_b.copy_(b.reshape(target_b.shape))
            elif isinstance(host, SavedModule) and new_name in host.copies and names[0] in host.copies:
                host.copies[new_name].load_state_dict(host.copies[names[0]].state_dict())
    return model
