"""A new LoRA adapter from a weighted combination of existing ones.

For every layer the adapters share, with ΔWᵢ = sᵢ·BᵢAᵢ and weights wᵢ:

- ``"cat"``: exactly Σ wᵢ·ΔWᵢ. A is the row-stack of the Aᵢ, B the column-stack of wᵢ·sᵢ·Bᵢ,
  so the new rank is the sum of the ranks (per layer, through ``rank_pattern``).
- ``"svd"``: the best rank-k approximation (Eckart–Young) of that exact sum, k = ``svd_rank``
  or the largest rank combined. Exact when k reaches the sum's rank.
- ``"linear"``: HF PEFT's same-rank weighting, A = Σ √|wᵢsᵢ|·Aᵢ and B = Σ ±√|wᵢsᵢ|·Bᵢ. Cheap and
  rank-preserving but *approximate*: the product picks up cross terms BᵢAⱼ (i ≠ j).

The new adapter has scaling 1 (``lora_alpha = r`` per layer) and takes the first adapter's
``modules_to_save`` copies (a classifier head is not averaged). It becomes the active adapter,
like any newly added one. DoRA adapters cannot be combined this way (their magnitude is not
linear in the update).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..inject import apply
from ..layer import AdapterLayer, SavedModule
from ..state import check_name, get_state, hosts
from .lora import LoraConfig, LoraUnit

HOW = ("cat", "svd", "linear")


def _pair(unit: LoraUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of any LoRA unit as 2-D matrices, B (out, r) and A (r, in)."""
    a, b = list(unit.file_tensors().values())[:2]
    return b.detach().reshape(b.shape[0], -1), a.detach().reshape(a.shape[0], -1)


def _combined_pair(units: list[LoraUnit], weights: list[float], how: str, svd_rank: int | None):
    pairs = [_pair(u) for u in units]
    scales = [w * u.scaling for u, w in zip(units, weights)]
    if how == "cat":
        return torch.cat([s * b for s, (b, _) in zip(scales, pairs)], dim=1), torch.cat([a for _, a in pairs], dim=0)
    if how == "svd":
        delta = sum(s * (b @ a) for s, (b, a) in zip(scales, pairs))
        k = min(svd_rank or max(u.r for u in units), *delta.shape)
        u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
        return (u[:, :k] * sv[:k]).to(delta.dtype), vh[:k].to(delta.dtype)
    ranks = {u.r for u in units}
    if len(ranks) != 1:
        raise ConfigError(f'combine(how="linear") needs equal ranks on each layer, found {sorted(ranks)}')
    roots = [math.sqrt(abs(s)) for s in scales]
    b = sum(math.copysign(root, s) * b for root, s, (b, _) in zip(roots, scales, pairs))
    a = sum(root * a for root, (_, a) in zip(roots, pairs))
    return b, a


def combine(model: nn.Module, names: list[str], weights: list[float], new_name: str, how: str = "cat",
            svd_rank: int | None = None) -> nn.Module:
    """Add adapter ``new_name`` = the weighted combination of LoRA adapters ``names``."""
    state = get_state(model)
    if how not in HOW:
        raise ConfigError(f"how: expected one of {', '.join(HOW)}, found {how!r}")
    if not names or len(names) != len(weights):
        raise ConfigError(f"combine needs one weight per adapter: {len(names)} names, {len(weights)} weights")
    configs = [check_name(state, n) for n in names]
    for n, c in zip(names, configs):
        if not isinstance(c, LoraConfig) or c.use_dora:
            raise ConfigError(f"adapter {n!r} is not a plain LoRA adapter ({c.peft_type}); only LoRA adapters combine")
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
        pairs[path] = _combined_pair(units, ws, how, svd_rank)
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
