"""Optimizers for two LoRA variants that change only how the adapter is trained.

**LoRA+** — "LoRA+: Efficient Low Rank Adaptation of Large Models" (Hayou, Ghosh, Yu, 2024,
arXiv:2402.12354). B gets a learning rate ``ratio`` times A's (the paper suggests 2–2⁴; 16 is
HF PEFT's usual example). Two entry points:

- ``lora_plus_param_groups(model, lr, ratio, weight_decay)``: parameter groups for any
  ``torch.optim`` optimizer, with peftkit's trainer rule for weight decay (matrices decay;
  vectors — biases, norms, DoRA's magnitude — do not). LoRA's B matrices (``lora_B`` and
  ``lora_embedding_B``) train at ``ratio × lr``, everything else (A, a ``modules_to_save``
  head, biases) at ``lr``; with ``lr_embedding`` both matrices of LoRA on an embedding train at
  that rate instead (HF PEFT's ``loraplus_lr_embedding``). ``peftkit train --loraplus-lr-ratio``
  uses exactly these groups.
- ``create_loraplus_optimizer(model, optimizer_cls, lr=..., loraplus_lr_ratio=..., **kwargs)``:
  HF PEFT's function (``peft.optimizers.create_loraplus_optimizer``), same name, signature and
  groups: A and other matrices at ``lr`` with ``loraplus_weight_decay``; every parameter of LoRA
  on an embedding at ``loraplus_lr_embedding`` (default 1e-6); ``lora_B`` *and every
  1-D parameter* (biases, DoRA's magnitude) at ``lr × loraplus_lr_ratio``, decayed unless it is a
  bias or sits in a LayerNorm. (That vectors count as "B" is the reference implementation's
  rule, kept for equal results.)

**LoRA-FA** — "LoRA-FA: Memory-efficient Low-rank Adaptation for Large Language Models
Fine-tuning" (Zhang et al., 2023, arXiv:2308.03303): A stays at its initial value (frozen, so
no gradient and no optimizer state is kept for it) and only B trains. ``freeze_lora_a`` does
the freezing. HF PEFT's ``LoraFAOptimizer`` also projects B's gradient so that the update of
``ΔW = s·B·A`` is the one closest to full fine-tuning's:

    g̃_B = (1/s²) · g_B · (A Aᵀ)⁻¹        (the least-squares minimiser of ‖s·g̃_B·A − G‖, G = ∂L/∂W)

``LoraFAAdamW`` is ``torch.optim.AdamW`` with that projection applied to each B's gradient
before the step (A constant, so the projection needs no state and a resumed run repeats it);
``create_lorafa_optimizer`` freezes A and builds it (HF's name and arguments). Differences from
HF's optimizer, which is a hand-written Adam: torch's AdamW applies the decoupled weight decay
before the update rather than after it (a difference of order lr²·wd), the projection is computed
in float32 rather than under bf16 autocast, and ``(A Aᵀ + δI)`` is inverted with
``torch.linalg.solve`` (δ = 1e-8, HF's) rather than a pseudo-inverse. ``peftkit train
--lora-fa`` freezes A and uses ``LoraFAAdamW`` with the trainer's groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn as nn

from .errors import ConfigError
from .layer import AdapterLayer
from .state import get_state, hosts

DELTA = 1e-8  # HF PEFT's regulariser of A Aᵀ before inverting it


@dataclass(frozen=True)
class LoraPair:
    """One LoRA unit's two factors: ``a`` (r, in…) and ``b`` (out, r…), its scaling, whether it
    adapts an embedding; ``path`` is the adapted module, ``adapter`` the adapter's name."""

    path: str
    adapter: str
    a: nn.Parameter
    b: nn.Parameter
    scaling: float
    embedding: bool


def lora_pairs(model: nn.Module, names: str | Iterable[str] | None = None) -> list[LoraPair]:
    """The (A, B) factors of every LoRA unit of adapters ``names`` (default: every adapter)."""
    from .methods.lora import LoraEmbedding, LoraUnit

    state = get_state(model)
    wanted = set(state.configs) if names is None else {names} if isinstance(names, str) else set(names)
    unknown = sorted(wanted - set(state.configs))
    if unknown:
        raise ConfigError(f"no adapter named {unknown[0]!r} (adapters: {', '.join(map(repr, state.configs))})")
    pairs = []
    for path, host in hosts(model):
        if not isinstance(host, AdapterLayer):
            continue
        for name, unit in host.adapters.items():
            if name not in wanted or not isinstance(unit, LoraUnit):
                continue
            embedding = isinstance(unit, LoraEmbedding)
            a = unit.lora_embedding_A if embedding else unit.lora_A
            b = unit.lora_embedding_B if embedding else unit.lora_B
            pairs.append(LoraPair(path, name, a, b, float(unit.scaling), embedding))
    return pairs


# -- LoRA+ ------------------------------------------------------------------------------------


def grouped(named: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
            rates: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """The trainer's AdamW groups: matrices decay, vectors do not; a parameter whose ``id`` is in
    ``rates`` trains at that rate (its own groups, after the others). Empty groups are left out,
    so without ``rates`` this is exactly the two groups of a plain run."""
    rates = rates or {}
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for _, p in named:
        buckets.setdefault((rates.get(id(p), lr), p.ndim >= 2), []).append(p)
    keys = [(lr, True), (lr, False)] + sorted((k for k in buckets if k[0] != lr), key=lambda k: (k[0], not k[1]))
    groups = []
    for rate, matrix in keys:
        params = buckets.get((rate, matrix))
        if params:
            groups.append({"params": params, "lr": rate, "weight_decay": weight_decay if matrix else 0.0})
    return groups


def lora_plus_rates(model: nn.Module, lr: float, ratio: float, lr_embedding: float | None = None,
                    names: str | Iterable[str] | None = None) -> dict[int, float]:
    """``id(parameter) -> learning rate`` for the LoRA factors that do not train at ``lr``."""
    if not ratio > 0:
        raise ConfigError(f"loraplus_lr_ratio: expected a positive number, found {ratio!r}")
    rates: dict[int, float] = {}
    for pair in lora_pairs(model, names):
        if pair.embedding and lr_embedding is not None:
            rates[id(pair.a)] = rates[id(pair.b)] = lr_embedding
        elif ratio != 1:
            rates[id(pair.b)] = lr * ratio
    return rates


def lora_plus_param_groups(model: nn.Module, lr: float, ratio: float, weight_decay: float = 0.0,
                           lr_embedding: float | None = None,
                           names: str | Iterable[str] | None = None) -> list[dict[str, Any]]:
    """LoRA+ parameter groups of ``model``'s trainable parameters, for ``torch.optim.AdamW(groups)``
    (or any optimizer taking groups): B at ``ratio × lr``, the rest at ``lr``; weight decay on
    matrices only; LoRA on an embedding at ``lr_embedding`` if given. ``names``: the adapters
    whose B is sped up (default: all)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return grouped(named, lr, weight_decay, lora_plus_rates(model, lr, ratio, lr_embedding, names))


def create_loraplus_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float,
                              loraplus_lr_ratio: float, **kwargs: Any) -> torch.optim.Optimizer:
    """HF PEFT's ``create_loraplus_optimizer``: the same groups (see the module's docstring) for
    ``optimizer_cls(groups, lr=lr, **kwargs)``. ``kwargs`` may hold ``loraplus_weight_decay``
    (default 0) and ``loraplus_lr_embedding`` (default 1e-6), which are taken out."""
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    lr_embedding = kwargs.pop("loraplus_lr_embedding", 1e-6)
    pairs = lora_pairs(model)
    b_ids = {id(p.b) for p in pairs if not p.embedding}
    embedding_ids = {id(t) for p in pairs if p.embedding for t in (p.a, p.b)}
    no_decay = _in_layernorm_or_bias(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in embedding_ids:
            groups["embedding"].append(p)
        elif id(p) in b_ids or p.ndim == 1:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    spec = [("A", lr, weight_decay), ("embedding", lr_embedding, weight_decay),
            ("B", lr * loraplus_lr_ratio, weight_decay), ("B_no_decay", lr * loraplus_lr_ratio, 0.0)]
    param_groups = [{"params": groups[k], "lr": rate, "weight_decay": wd} for k, rate, wd in spec if groups[k]]
    optimizer = optimizer_cls(param_groups, lr=lr, **kwargs)
    if optimizer_cls.__name__ in ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit"):
        import bitsandbytes  # embeddings' states in 32 bits, as HF PEFT (and bitsandbytes) advise

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


def _in_layernorm_or_bias(model: nn.Module) -> set[int]:
    """Parameters HF's trainer does not decay: those inside a LayerNorm, and those named ``bias``
    (transformers' ``get_parameter_names(model, ALL_LAYERNORM_LAYERS)`` minus ``"bias"`` names)."""
    out: set[int] = set()

    def walk(module: nn.Module, prefix: str, inside: bool) -> None:
        inside = inside or isinstance(module, nn.LayerNorm)
        for pname, p in module._parameters.items():
            if p is not None and (inside or "bias" in f"{prefix}{pname}"):
                out.add(id(p))
        for cname, child in module._modules.items():
            if child is not None:
                walk(child, f"{prefix}{cname}.", inside)

    walk(model, "", False)
    return out


# -- LoRA-FA ----------------------------------------------------------------------------------


def freeze_lora_a(model: nn.Module, names: str | Iterable[str] | None = None) -> list[nn.Parameter]:
    """LoRA-FA: freeze every LoRA A of adapters ``names`` (default: all); returns them."""
    frozen = []
    for pair in lora_pairs(model, names):
        pair.a.requires_grad_(False)
        frozen.append(pair.a)
    return frozen


def projection(a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(A Aᵀ + δI)⁻¹ / s²`` (r, r), A flattened to (r, in…), in float32: the right factor that
    turns B's gradient into LoRA-FA's projected one."""
    a2 = a.detach().reshape(a.shape[0], -1).float()
    gram = a2 @ a2.t() + DELTA * torch.eye(a2.shape[0], device=a2.device)
    return torch.linalg.solve(gram, torch.eye(a2.shape[0], device=a2.device)) / float(scaling) ** 2


class LoraFAAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` that first replaces each LoRA B's gradient ``g`` by the projected
    ``g · (A Aᵀ + δI)⁻¹ / s²`` (A frozen: LoRA-FA). ``projections``: ``(B, A, s)`` triples; the
    optimizer's state and ``state_dict`` are AdamW's (checkpoints and resume as usual)."""

    def __init__(self, params: Any, projections: Iterable[tuple[nn.Parameter, torch.Tensor, float]] = (),
                 **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.projections = [(b, a, s) for b, a, s in projections]
        for _, a, _ in self.projections:
            if a.requires_grad:
                raise ConfigError("LoraFAAdamW: LoRA-FA keeps A fixed; freeze it first (peftkit.freeze_lora_a)")
        self._factors: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def project(self) -> None:
        """Project the B gradients present (called by ``step``)."""
        for b, a, s in self.projections:
            if b.grad is None:
                continue
            factor = self._factors.get(id(b))
            if factor is None:  # A never changes: computed once
                factor = self._factors[id(b)] = projection(a, s)
            g = b.grad
            g2 = g.reshape(g.shape[0], g.shape[1], -1)  # (out, r, 1…): Conv2d's B is (out, r, 1, 1)
            g2 = torch.einsum("orx,rk->okx", g2.float(), factor.to(g.device))
            g.copy_(g2.reshape(g.shape).to(g.dtype))

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        self.project()
        return super().step(closure)


def lora_fa_projections(model: nn.Module, names: str | Iterable[str] | None = None
                        ) -> list[tuple[nn.Parameter, torch.Tensor, float]]:
    """``(B, A, s)`` for every LoRA unit of adapters ``names`` whose B trains."""
    return [(p.b, p.a, p.scaling) for p in lora_pairs(model, names) if p.b.requires_grad]


def create_lorafa_optimizer(model: nn.Module, r: int | None = None, lora_alpha: float | None = None,
                            lr: float = 1e-3, weight_decay: float = 0.0, use_rslora: bool | None = None,
                            **kwargs: Any) -> LoraFAAdamW:
    """HF PEFT's ``create_lorafa_optimizer``: freeze every LoRA A, and an AdamW over the trainable
    parameters (one group, ``weight_decay`` on all, as HF's) with B's gradient projected.

    ``r``, ``lora_alpha`` and ``use_rslora`` are accepted for HF's signature; as in HF PEFT 0.21,
    each layer's own scaling is used (a ``use_rslora`` that contradicts an adapter's config is an
    error, as there). ``kwargs`` go to AdamW (HF's defaults: betas (0.9, 0.999), eps 1e-6)."""
    if use_rslora is not None:
        state = get_state(model)
        wrong = [n for n in state.active if bool(getattr(state.configs[n], "use_rslora", False)) != use_rslora]
        if wrong:
            raise ConfigError(f"use_rslora={use_rslora} contradicts the config of adapter(s) {wrong}; "
                              "set rsLoRA in LoraConfig")
    freeze_lora_a(model)
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs.setdefault("eps", 1e-6)
    kwargs.setdefault("betas", (0.9, 0.999))
    return LoraFAAdamW([{"params": params}], projections=lora_fa_projections(model), lr=lr,
                       weight_decay=weight_decay, **kwargs)
