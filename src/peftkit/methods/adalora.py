"""AdaLoRA — "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning" (Zhang et al., 2023).

LoRA in SVD form: a frozen weight W gets ``ΔW = P Λ Q · s`` with Q (r, in) the right and P
(out, r) the left "singular vectors" and Λ = diag(λ) the "singular values"; while training, the
least important triplets (Pᵢ, λᵢ, Qᵢ) are masked (λᵢ = 0) until the ranks add up to a budget.
HF PEFT's names, shapes and scaling (file keys ``<path>.lora_A`` (r, in), ``<path>.lora_E``
(r, 1), ``<path>.lora_B`` (out, r), no ``.weight``):

    out = base(x) + (dropout(x) (A ⊙ E)ᵀ Bᵀ) · s / (init_r + 1e-5),   s = lora_alpha (r if ≤ 0)

with the divisor computed in float32, as HF PEFT's ``ranknum`` is. E starts at zero (A and B
are N(0, 0.02²)), so the adapted model equals the base at init; ``init_lora_weights=False``
leaves all three N(0, 1). The draws follow HF PEFT's order, so one seed gives both libraries the
same tensors. Layer types: ``nn.Linear`` and transformers' GPT-2 ``Conv1D`` (ΔW merged in the
layer's (in, out) layout); merging adds ΔW to W.

The rank allocation (``update_and_allocate``, the trainer's ``TrainingHooks.step``), after the
optimizer step and before the gradients are cleared, at step t (the number of optimizer steps
taken; the trainer counts from 1):

- importance of every entry of A, E, B: I = |p · ∂L/∂p|; sensitivity Ī ← β₁ Ī + (1 − β₁) I and
  uncertainty Ū ← β₂ Ū + (1 − β₂) |I − Ī|; an entry's score is Ī · Ū, and triplet i's score is
  score(Eᵢ) + mean of row i of A's scores + mean of column i of B's (HF PEFT's RankAllocator);
- budget b(t) (a total number of triplets over every adapted layer, from init_r × layers down to
  target_r × layers): init_r × layers while t ≤ tinit; then the cubic
  ``int((init − target) (1 − (t − tinit)/(T − tfinal − tinit))³ + target)`` with T = total_step,
  applied every deltaT steps: the triplets whose score is at most the (init − b)-th smallest are
  masked (λ = 0) — they stay trainable and may come back at the next allocation;
- at t = T − tfinal the final allocation (to target_r × layers) is made and kept: the mask is
  applied again after every later step, and the adapter's config gets HF PEFT's
  ``rank_pattern`` (``{"<path>.lora_E": [true/false per triplet]}``). A file written from then on
  holds only the kept triplets (HF PEFT's resized tensors; the dropped ones are zero, so nothing
  changes), and a config with a rank_pattern builds resized layers (HF PEFT's load): the divisor
  stays init_r + 1e-5, as HF PEFT keeps ``ranknum``.

The orthogonal regulariser (``orthogonal_regularizer``, ``TrainingHooks.loss`` × orth_reg_weight):
the mean over every A and B of the adapter of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F.

``total_step`` must be known for the schedule: ``peftkit train`` sets it to the run's number of
optimizer steps (``TrainingHooks.begin``) when the config leaves it None; through the API, set
it in the config. The allocator's state (Ī, Ū, the final masks) lives on the layers and travels
in a checkpoint (``TrainingHooks.state`` / ``load_state``), so ``--resume`` reaches the adapter
an uninterrupted run reaches.

Deliberate differences from HF PEFT 0.21 (everything else follows its code):

- where the budget is not below the current total (target_r ≥ init_r) nothing is masked; HF's
  ``kthvalue`` fails there (k ≤ 0);
- an allocation before the final one is not written to the files: a file saved during the
  budget phase holds all init_r triplets and no rank_pattern, so it computes exactly what the
  model computes (HF writes its latest mask and drops those rows, which training may have moved
  off zero since);
- a layer without a gradient in a step (not reached) counts as importance 0 (HF fails);
- where the final allocation comes before any importance was measured (total_step - tfinal = 1
  with the trainer's steps counted from 1), the final step's gradients are measured first (HF
  fails there; with nothing measured every score would be 0 and every triplet masked);
- allocating on an adapter built from a rank_pattern (a loaded AdaLoRA file, trained further)
  writes a rank_pattern over the init_r triplets again (HF's is then over the kept ones, which
  its own loader cannot read);
- the trainer adds the regulariser once per optimizer step (on the window's last micro-batch),
  so evaluation losses are the task's alone; HF adds it to every forward that has labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
import torch.nn as nn

from .. import architectures
from ..config import TargetedConfig, check_bool, check_number, check_positive_int
from ..errors import ConfigError, ModelError
from ..layer import AdapterLayer, DeltaUnit
from ..unit import MixTerms, adapter_factory
from ..registry import CliMethod, Method, TrainingHooks, register
from ..state import get_state, hosts
from ..targeting import find_targets, is_conv1d
from .lora import LoraConfig

SUPPORTED = "Linear, Conv1D"
E_SUFFIX = ".lora_E"  # rank_pattern keys: "<module path>.lora_E", as HF PEFT writes them
FACTORS = ("lora_A", "lora_E", "lora_B")


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name}: expected a non-negative integer, found {value!r}")


@dataclass
class AdaLoraConfig(TargetedConfig):
    """AdaLoRA settings; names, meanings and defaults as in HF PEFT's ``AdaLoraConfig``.

    ``init_r`` triplets per layer at first, ``target_r`` on average at the end; the schedule:
    ``tinit`` warm-up steps, budget decreasing until ``total_step - tfinal``, an allocation every
    ``deltaT`` steps; ``beta1`` / ``beta2`` (the importance EMAs); ``orth_reg_weight``;
    ``total_step`` (None: set by ``peftkit train``; required by the allocation); ``rank_pattern``
    (the final allocation, ``{"<path>.lora_E": [bool] * init_r}``); ``lora_alpha`` (the scaling
    is lora_alpha / init_r), ``lora_dropout``, ``bias``, ``init_lora_weights`` (False: E is not
    zero), ``fan_in_fan_out`` (read and written; the layer type decides the layout, as in HF).
    """

    peft_type: ClassVar[str] = "ADALORA"
    # HF PEFT's AdaLoraConfig is a LoraConfig: the LoRA features its AdaLoRA does not implement
    # (or refuses, like DoRA and LoftQ) are accepted only at their "off" value.
    unsupported_defaults: ClassVar[dict[str, Any]] = {"use_dora": False, **LoraConfig.unsupported_defaults}
    # LoraConfig fields HF PEFT's AdaLoRA reads but never uses (its layers take init_r and
    # lora_alpha: no r, no rsLoRA scaling, no alpha_pattern), and its runtime-only fields.
    ignored_fields: ClassVar[frozenset[str]] = frozenset(
        {"r", "use_rslora", "alpha_pattern"} | LoraConfig.ignored_fields
    )

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1  # noqa: N815 - HF PEFT's name
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    rank_pattern: dict[str, list[bool]] | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    bias: str = "none"
    init_lora_weights: bool = True
    fan_in_fan_out: bool = False

    def validate(self) -> None:
        super().validate()
        check_positive_int("target_r", self.target_r)
        check_positive_int("init_r", self.init_r)
        _check_count("tinit", self.tinit)
        _check_count("tfinal", self.tfinal)
        check_positive_int("deltaT", self.deltaT)
        for name in ("beta1", "beta2"):  # HF PEFT's RankAllocator asserts 0 < beta < 1
            value = getattr(self, name)
            check_number(name, value)
            if not 0 < value < 1:
                raise ConfigError(f"{name}: expected a number in (0, 1), found {value!r}")
        check_number("orth_reg_weight", self.orth_reg_weight, 0.0)
        if self.total_step is not None:
            check_positive_int("total_step", self.total_step)
            check_schedule(self)
        check_number("lora_alpha", self.lora_alpha)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0)
        if self.bias not in ("none", "all", "lora_only"):
            raise ConfigError(f"bias: expected 'none', 'all' or 'lora_only', found {self.bias!r}")
        check_bool("init_lora_weights", self.init_lora_weights)
        check_bool("fan_in_fan_out", self.fan_in_fan_out)
        if self.layers_pattern and self.layers_to_transform is None:  # HF PEFT refuses it too
            raise ConfigError(f"layers_pattern: expected layers_to_transform to be set with it, "
                              f"found layers_pattern={self.layers_pattern!r} and layers_to_transform=None")
        self.rank_pattern = _check_rank_pattern(self.rank_pattern)


def check_schedule(config: AdaLoraConfig) -> None:
    """HF PEFT's condition: a budget phase between the warm-up and the final fine-tuning."""
    if config.tinit >= config.total_step - config.tfinal:
        raise ConfigError(f"total_step: expected more than tinit + tfinal = {config.tinit + config.tfinal} steps "
                          f"(tinit={config.tinit}, tfinal={config.tfinal}: the schedule leaves no step to allocate "
                          f"the budget), found {config.total_step}; decrease tinit/tfinal or train longer")


def _check_rank_pattern(value: Any) -> dict[str, list[bool]] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"rank_pattern: expected a mapping of '<module>{E_SUFFIX}' -> a list of true/false "
                          f"(one per init_r triplet), found {value!r}")
    for key, mask in value.items():
        if not isinstance(key, str) or not key.endswith(E_SUFFIX) or key == E_SUFFIX:
            raise ConfigError(f"rank_pattern: expected keys '<module path>{E_SUFFIX}' (as HF PEFT writes them), "
                              f"found {key!r}")
        if not isinstance(mask, list) or not mask or not all(isinstance(b, bool) for b in mask):
            raise ConfigError(f"rank_pattern[{key!r}]: expected a non-empty list of true/false (one per init_r "
                              f"triplet), found {mask!r}")
    return {k: list(v) for k, v in value.items()}


# -- the unit ------------------------------------------------------------------------------


def _divisor(init_r: int) -> float:
    """HF PEFT's ``ranknum + 1e-5``, computed in float32 as its ranknum parameter is."""
    return float(torch.tensor(float(init_r)) + 1e-5)


class AdaLoraLinear(DeltaUnit):
    """For ``nn.Linear`` and transformers' ``Conv1D`` (``transposed``: weight is (in, out)).

    ``slots``: which of the init_r triplets the rows are (all of them unless built from a
    rank_pattern). ``keep``: the final allocation over the rows (None until it is made); with
    it the file holds only the kept rows. ``importance``: the allocator's EMAs, per factor.
    """

    def __init__(self, in_features: int, out_features: int, transposed: bool, init_r: int,
                 slots: list[int] | None, alpha: float, dropout: float, init: bool, factory: dict) -> None:
        super().__init__()
        self.transposed = transposed
        self.init_r = init_r
        self.slots = list(range(init_r)) if slots is None else list(slots)
        r = self.r = len(self.slots)
        self.scaling = float(alpha) if alpha > 0 else float(r)  # HF PEFT: lora_alpha, or r when it is ≤ 0
        self.divisor = _divisor(init_r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        # HF PEFT's draws, in its order (A, E, B, its ranknum, then the init), so a seed gives both the same tensors
        self.lora_A = nn.Parameter(torch.randn(r, in_features, **factory))
        self.lora_E = nn.Parameter(torch.randn(r, 1, **factory))
        self.lora_B = nn.Parameter(torch.randn(out_features, r, **factory))
        torch.randn(1, device=factory["device"])
        if init:
            with torch.no_grad():
                nn.init.zeros_(self.lora_E)
                nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
                nn.init.normal_(self.lora_B, mean=0.0, std=0.02)
        self.keep: torch.Tensor | None = None
        self.importance: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        h = x if self.dropout is None else self.dropout(x)
        if h.dtype != self.lora_A.dtype:
            h = h.to(self.lora_A.dtype)
        delta = (h @ (self.lora_A * self.lora_E).t() @ self.lora_B.t()) * self.scaling / self.divisor
        return out.add_(delta.to(out.dtype))  # in place, as HF PEFT: no second (N, out) tensor

    def delta_weight(self) -> torch.Tensor:
        delta = (self.lora_B @ (self.lora_A * self.lora_E)) * self.scaling / self.divisor  # (out, in)
        return delta.t() if self.transposed else delta

    def mix_terms(self) -> MixTerms:
        return MixTerms("linear", a=(self.lora_A * self.lora_E).detach(),
                        b=(self.lora_B * (self.scaling / self.divisor)).detach())

    def file_tensors(self) -> dict[str, torch.Tensor]:
        if self.keep is None:
            return {"lora_A": self.lora_A, "lora_E": self.lora_E, "lora_B": self.lora_B}
        keep = self.keep.to(self.lora_A.device)
        return {"lora_A": self.lora_A.detach()[keep], "lora_E": self.lora_E.detach()[keep],
                "lora_B": self.lora_B.detach()[:, keep]}

    def pattern(self) -> list[bool]:
        """The rank_pattern entry of the final allocation: over the init_r triplets."""
        kept = {self.slots[i] for i in torch.nonzero(self.keep).view(-1).tolist()}
        return [i in kept for i in range(self.init_r)]

    def extra_repr(self) -> str:
        return f"r={self.r} of init_r={self.init_r}, scaling={self.scaling:g}/{self.divisor:g}"



def make_unit(config: AdaLoraConfig, module: nn.Module, path: str) -> AdaLoraLinear:
    if isinstance(module, nn.Linear):  # in/out features, not weight.shape: a 4-bit weight is packed
        n_in, n_out, transposed = module.in_features, module.out_features, False
    elif is_conv1d(module):
        (n_in, n_out), transposed = module.weight.shape, True
    else:
        raise ConfigError(f"AdaLoRA cannot adapt {path!r} of type {type(module).__name__}; supported: {SUPPORTED}")
    slots = None
    mask = (config.rank_pattern or {}).get(path + E_SUFFIX)
    if mask is not None:
        if len(mask) != config.init_r:
            raise ConfigError(f"rank_pattern[{path + E_SUFFIX!r}]: expected init_r = {config.init_r} entries, "
                              f"found {len(mask)}")
        slots = [i for i, kept in enumerate(mask) if kept]
    return AdaLoraLinear(n_in, n_out, transposed, config.init_r, slots, config.lora_alpha, config.lora_dropout,
                         config.init_lora_weights, adapter_factory(module))


# Defaults when target_modules is None, per transformers model_type: LoRA's (the attention query
# and value projections; HF PEFT's AdaLoRA table has the same entries for these models).
DEFAULT_TARGETS = architectures.table(architectures.lora_targets)


def _prepare(model: nn.Module, config: AdaLoraConfig) -> AdaLoraConfig:
    """Every rank_pattern key must name a module this adapter adapts (HF PEFT fails on the others)."""
    if config.rank_pattern:
        targets = {path for path, _ in find_targets(model, config, DEFAULT_TARGETS)}
        for key in config.rank_pattern:
            if key[: -len(E_SUFFIX)] not in targets:
                near = ", ".join(sorted(targets)[:4]) + (", ..." if len(targets) > 4 else "")
                raise ConfigError(f"rank_pattern: {key!r} names no module this adapter adapts (it adapts {near})")
    return config


# -- the rank allocator and the regulariser ------------------------------------------------


def units(model: nn.Module, name: str = "default") -> Iterator[tuple[str, AdaLoraLinear]]:
    """(module path, unit) of AdaLoRA adapter ``name``, in the model's module order."""
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer) and name in host.adapters \
                and isinstance(host.adapters[name], AdaLoraLinear):
            yield path, host.adapters[name]


def _config(model: nn.Module, name: str) -> AdaLoraConfig:
    config = get_state(model).configs.get(name)
    if not isinstance(config, AdaLoraConfig):
        raise ModelError(f"no AdaLoRA adapter named {name!r} in {type(model).__name__}")
    return config


def orthogonal_regularizer(model: nn.Module, name: str = "default") -> torch.Tensor:
    """HF PEFT's: the mean over the adapter's A and B of ‖A Aᵀ − I‖_F and ‖Bᵀ B − I‖_F
    (not yet multiplied by orth_reg_weight)."""
    total: Any = 0
    count = 0
    for _, unit in units(model, name):
        for cov in (unit.lora_A @ unit.lora_A.T, unit.lora_B.T @ unit.lora_B):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            total = total + torch.norm(cov - eye, p="fro")
            count += 1
    if count == 0:
        raise ModelError(f"adapter {name!r} has no AdaLoRA layers")
    return total / count


def _update_importance(unit: AdaLoraLinear, beta1: float, beta2: float) -> None:
    with torch.no_grad():
        for factor in FACTORS:
            p = getattr(unit, factor)
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            ipt = (p * grad).abs().detach()
            avg, unc = unit.importance.get(factor) or (torch.zeros_like(p), torch.zeros_like(p))
            avg = beta1 * avg + (1 - beta1) * ipt  # sensitivity, smoothed
            unc = beta2 * unc + (1 - beta2) * (ipt - avg).abs()  # its uncertainty
            unit.importance[factor] = (avg, unc)


def _triplet_scores(unit: AdaLoraLinear) -> torch.Tensor:
    """(r,) scores: E's entry + the mean over A's row + the mean over B's column (of Ī·Ū)."""
    def score(factor: str) -> torch.Tensor:
        p = getattr(unit, factor)
        avg, unc = unit.importance.get(factor) or (torch.zeros_like(p), torch.zeros_like(p))
        return avg * unc

    a = torch.mean(score("lora_A"), dim=1, keepdim=True)
    b = torch.mean(score("lora_B"), dim=0, keepdim=False).view(-1, 1)
    return score("lora_E").view(-1) + torch.cat([a, b], dim=1).sum(dim=1).view(-1)


def budget_schedule(config: AdaLoraConfig, step: int, initial: int, target: int) -> tuple[int, bool]:
    """(total number of triplets allowed at ``step``, whether to mask at this step)."""
    if step <= config.tinit:
        return initial, False
    if step > config.total_step - config.tfinal:
        return target, True
    left = 1 - (step - config.tinit) / (config.total_step - config.tfinal - config.tinit)
    return int((initial - target) * (left ** 3) + target), step % config.deltaT == 0


def _mask_to_budget(found: list[tuple[str, AdaLoraLinear]], budget: int) -> dict[str, list[bool]]:
    """Mask (λ = 0) the triplets whose score is at most the k-th smallest, k = total − budget;
    returns the rows kept per layer (over its rows)."""
    scores = [_triplet_scores(unit) for _, unit in found]
    k = sum(unit.r for _, unit in found) - budget
    threshold = torch.kthvalue(torch.cat(scores), k)[0].item() if k > 0 else -math.inf
    kept = {}
    with torch.no_grad():
        for (path, unit), score in zip(found, scores):
            drop = score <= threshold
            unit.lora_E.masked_fill_(drop.view(-1, 1), 0.0)
            kept[path] = (~drop).cpu()
    return kept


def _check_trainable(config: AdaLoraConfig, name: str) -> None:
    if config.total_step is None:
        raise ConfigError(f"total_step: expected the number of training steps (AdaLoRA's budget schedule needs "
                          f"it; adapter {name!r}), found None; set total_step in the AdaLoraConfig")
    check_schedule(config)


def update_and_allocate(model: nn.Module, step: int, name: str = "default") -> tuple[int, dict[str, list[bool]] | None]:
    """HF PEFT's ``update_and_allocate``: call after ``optimizer.step()`` and before the gradients
    are cleared, with ``step`` the number of steps taken (the trainer counts from 1). Returns (the
    budget, the rows kept per layer ``{path: [bool] * rows}`` where this step masked, else None)."""
    config = _config(model, name)
    _check_trainable(config, name)
    found = list(units(model, name))
    initial, target = sum(u.r for _, u in found), config.target_r * len(found)
    final = config.total_step - config.tfinal
    if step < final:
        for _, unit in found:
            _update_importance(unit, config.beta1, config.beta2)
        budget, mask = budget_schedule(config, step, initial, target)
        if not mask:
            return budget, None
        kept = _mask_to_budget(found, budget)
        return budget, {path: k.tolist() for path, k in kept.items()}
    if step == final:  # the final allocation: kept from now on, and written to the files
        if not any(unit.importance for _, unit in found):  # total_step - tfinal = 1: nothing measured yet
            for _, unit in found:
                _update_importance(unit, config.beta1, config.beta2)
        kept = _mask_to_budget(found, target)
        for path, unit in found:
            unit.keep = kept[path]
            unit.importance = {}
        config.rank_pattern = {path + E_SUFFIX: unit.pattern() for path, unit in found}
        return target, {path: k.tolist() for path, k in kept.items()}
    with torch.no_grad():  # final fine-tuning: the final allocation's mask again
        for path, unit in found:
            if unit.keep is None:
                raise ModelError(f"step {step}: AdaLoRA adapter {name!r} has no final allocation for {path!r} "
                                 f"(it is made at step total_step - tfinal = {final})")
            unit.lora_E.masked_fill_(~unit.keep.to(unit.lora_E.device).view(-1, 1), 0.0)
    return target, None


# -- the trainer's hooks -------------------------------------------------------------------


def _begin(model: nn.Module, name: str, total_steps: int) -> None:
    config = _config(model, name)
    if config.total_step is None:
        config.total_step = total_steps
    _check_trainable(config, name)
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - older torch
        DTensor = ()  # noqa: N806
    found = list(units(model, name))
    for path, unit in found:
        if isinstance(unit.lora_E, DTensor):
            raise ConfigError("--fsdp: AdaLoRA's allocation ranks every layer's triplets together, which sharded "
                              "parameters do not allow; drop --fsdp (DDP, --nproc N, works)")
        unit.keep, unit.importance = None, {}
    # a new allocation: the config's rank_pattern describes the layers as they are built again
    # (None unless they were built from one), not an earlier run's final allocation
    resized = {path + E_SUFFIX: [i in set(u.slots) for i in range(u.init_r)] for path, u in found if u.r < u.init_r}
    config.rank_pattern = resized or None


def _loss(model: nn.Module, name: str) -> torch.Tensor | None:
    weight = _config(model, name).orth_reg_weight
    return weight * orthogonal_regularizer(model, name) if weight > 0 else None


def _step(model: nn.Module, name: str, step: int) -> None:
    update_and_allocate(model, step, name)


def _state(model: nn.Module, name: str) -> dict:
    config = _config(model, name)
    return {
        "total_step": config.total_step,
        "rank_pattern": config.rank_pattern,
        "layers": {path: {"keep": unit.keep,
                          "importance": {f: list(t) for f, t in unit.importance.items()}}
                   for path, unit in units(model, name)},
    }


def _load_state(model: nn.Module, name: str, state: dict) -> None:
    config = _config(model, name)
    found = dict(units(model, name))
    layers = state.get("layers", {})
    if set(layers) != set(found):
        raise ModelError(f"AdaLoRA adapter {name!r}: the checkpoint's allocator state is for other layers "
                         f"({len(layers)} saved, {len(found)} here)")
    config.total_step = state.get("total_step", config.total_step)
    config.rank_pattern = state.get("rank_pattern")
    for path, unit in found.items():
        saved = layers[path]
        unit.keep = saved["keep"]
        device = unit.lora_E.device
        unit.importance = {f: (avg.to(device), unc.to(device)) for f, (avg, unc) in saved["importance"].items()}


TRAINING = TrainingHooks(begin=_begin, loss=_loss, step=_step, state=_state, load_state=_load_state)


def _cli_config(values: dict[str, Any]) -> AdaLoraConfig:
    # --r is the target (average final) rank; each layer starts with 1.5 times as many triplets
    # (HF PEFT's defaults: target_r 8, init_r 12). total_step: the run's steps (TrainingHooks.begin).
    r = values["r"]
    return AdaLoraConfig(target_r=r, init_r=-(-3 * r // 2), lora_alpha=values["alpha"],
                         lora_dropout=values["dropout"], target_modules=values["targets"])


# The trainer's learning rate: E starts at zero and A, B at N(0, 0.02²), so ΔW = B·diag(E)·A grows
# more slowly than LoRA's. On the bundled demo (MiniLM, --r 8: init_r 12 → target_r 8, alpha 16,
# 30 steps, seed 0) the eval loss went from 1.09 to 0.92 at 5e-3, 0.65 at 1e-2, 0.06 at 2e-2
# (accuracy 1.0; seed 1: 0.06, 0.99), 0.01 at 5e-2 (seed 1: 0.04, 0.98, a loss spike mid-run),
# 0.02 at 1e-1 (0.99); LoRA at its 2e-3: 0.54. 2e-2: smooth on both seeds, near the best.
register(Method(
    "ADALORA", AdaLoraConfig, make_unit=make_unit, default_targets=DEFAULT_TARGETS, prepare=_prepare,
    mergeable=True, identity_at_init=True, training=TRAINING,
    cli=(CliMethod("adalora", "AdaLoRA: SVD-form LoRA whose ranks are allocated by importance while training "
                              "(--r: the final average rank; default: the attention layers)",
                   _cli_config, ("r", "alpha", "dropout", "targets"), {"lr": 2e-2}),),
))
