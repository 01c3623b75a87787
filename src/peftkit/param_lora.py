"""LoRA on ``nn.Parameter``s outside a Linear: ``LoraConfig(target_parameters=[...])``.

Made for the stacked expert weights of mixture-of-experts blocks (transformers' Mixtral keeps
``mlp.experts.gate_up_proj`` (experts, 2·intermediate, hidden) and ``mlp.experts.down_proj``
(experts, hidden, intermediate) as two 3-d parameters of one ``MixtralExperts`` module), but any
2-d or 3-d parameter can be named. Matching is HF PEFT's: a parameter ``<module>.<name>`` is
targeted when that full name is listed or ends with ``.`` + an entry; ``exclude_modules`` and
``layers_to_transform`` do not apply (as in HF).

Shapes and the file (HF PEFT's ``ParamWrapper``, read off its source): a parameter of E experts
gets ``lora_A`` (E·r, in) and ``lora_B`` (out, E·r) — expert e's pair is rows e·r … e·r+r−1 of
A and columns r_i·E + e of B —, with (out, in) = (d1, d2) for a (E, d1, d2) parameter, or
(d2, d1) when its module says ``is_transposed`` (then ΔW is stored (E, in, out)); a 2-d
(out, in) parameter is a plain pair (E = 1). ``rank_pattern``/``alpha_pattern`` keys match the
parameter's full name. HF wraps each targeted parameter of a module in its own wrapper, nested
in the module's parameter order, so the file keys of the k-th of n targeted parameters of the
module at ``path`` carry ``base_layer.`` n−1−k times: ``<path>.base_layer.lora_A.weight`` for
``gate_up_proj`` and ``<path>.lora_A.weight`` for ``down_proj``.

How it runs (``ParamLayer``, an ``AdapterLayer`` around the module that owns the parameters):
the module is called through ``torch.func.functional_call`` with each targeted parameter
replaced by W + s·ΔW, built once per forward with one ``baddbmm`` over the experts (per active
adapter). This is the accepted exception to "never build ΔW per call": the module's own code
reads the parameter, so there is no smaller place to add the update (HF PEFT does the same
through ``torch.nn.utils.parametrize``). Merging adds s·ΔW to the parameter in place.

Limits, as in HF: ``lora_dropout`` must be 0 (x cannot be factored out of the module's own
computation), no ``use_dora``, ``fan_in_fan_out`` or ``lora_bias``; no mixed-adapter batches
(``mix_terms`` is None: a ``ConfigError`` naming the layer); a parameter on the top-level module,
or on a layer that ``target_modules`` adapts, is refused.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError
from .layer import AdapterLayer
from .targeting import find_targets, logical_modules, model_type, pattern_value
from .unit import Host, Unit, adapter_factory

def check_config(config: Any) -> list[str] | None:
    """Validate ``target_parameters`` and the options it cannot go with; returns it as a list."""
    value = config.target_parameters
    if value is None:
        return None
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"target_parameters: expected a list of parameter names (e.g. ['mlp.experts.down_proj']), "
                          f"found {value!r}")
    value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)  # HF PEFT may hold a set
    if value:
        refused = [(name, getattr(config, name, off)) for name, off in
                   (("lora_dropout", 0.0), ("use_dora", False), ("fan_in_fan_out", False), ("lora_bias", False))
                   if getattr(config, name, off) not in (off, 0)]
        if refused:
            name, found = refused[0]
            raise ConfigError(f"target_parameters: cannot be combined with {name}={found!r} (LoRA on a parameter "
                              "adds its update to the weight itself, as HF PEFT does)")
        init = config.init_lora_weights
        if not (isinstance(init, bool) or init == "gaussian"):
            raise ConfigError(f"target_parameters: init_lora_weights must be True, False or 'gaussian', "
                              f"found {config.init_lora_weights!r}")
    return value


def module_targets(model: nn.Module, config: Any, default_targets: dict[str, list[str]]) -> list[tuple[str, nn.Module]]:
    """``targeting.find_targets``, except that with ``target_parameters`` no module target is
    needed: ``target_modules=[]``, or None for a model type with no default (HF PEFT's rule;
    None with a default still adapts the default modules, as in HF)."""
    if getattr(config, "target_parameters", None):
        if config.target_modules == [] or (config.target_modules is None and model_type(model) not in default_targets):
            return []
    return find_targets(model, config, default_targets)


# -- the unit -------------------------------------------------------------------------------


class ParamFactors(nn.Module):
    """One parameter's pair: A (E·r, in), B (out, E·r), HF's layout (see the module docstring)."""

    def __init__(self, param: torch.Tensor, transposed: bool, r: int, alpha: float, rslora: bool,
                 init: bool | str, factory: dict) -> None:
        super().__init__()
        if param.dim() == 2:
            experts, (n_out, n_in), transposed = 1, param.shape, False
        else:
            experts = param.shape[0]
            n_in, n_out = (param.shape[1], param.shape[2]) if transposed else (param.shape[2], param.shape[1])
        self.experts, self.transposed, self.flat, self.r = experts, transposed, param.dim() == 2, r
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_A = nn.Parameter(torch.empty(experts * r, n_in, **factory))
        self.lora_B = nn.Parameter(torch.empty(n_out, experts * r, **factory))
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / r)
            else:
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            if init is False:
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(E, out, r) and (E, r, in): expert e's B and A."""
        a = self.lora_A.to(dtype).reshape(self.experts, self.r, -1)
        b = self.lora_B.to(dtype).reshape(self.lora_B.shape[0], self.r, self.experts).permute(2, 0, 1)
        return b, a

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """W + s·ΔW in W's layout (one batched multiply-add; autocast off, as a weight keeps its dtype)."""
        with torch.autocast(device_type=weight.device.type, enabled=False):
            if self.flat:
                return torch.addmm(weight, self.lora_B.to(weight.dtype), self.lora_A.to(weight.dtype),
                                   alpha=self.scaling)
            b, a = self.factors(weight.dtype)
            if self.transposed:  # W is (E, in, out)
                return torch.baddbmm(weight, a.transpose(1, 2), b.transpose(1, 2), alpha=self.scaling)
            return torch.baddbmm(weight, b, a, alpha=self.scaling)

    def delta(self, dtype: torch.dtype) -> torch.Tensor:
        if self.flat:
            return (self.lora_B @ self.lora_A * self.scaling).to(dtype)
        b, a = self.factors(torch.promote_types(self.lora_A.dtype, dtype))
        delta = torch.bmm(b, a) * self.scaling  # (E, out, in)
        return (delta.transpose(1, 2) if self.transposed else delta).to(dtype)

    def extra_repr(self) -> str:
        return f"experts={self.experts}, r={self.r}, scaling={self.scaling:g}"


class ParamLora(Unit):
    """An adapter's pairs for the targeted parameters of one module, in the module's parameter order."""

    mergeable = True

    def __init__(self, factors: dict[str, ParamFactors]) -> None:
        super().__init__()
        self.factors = nn.ModuleDict(factors)

    def fold(self, weights: dict[str, torch.Tensor]) -> None:
        for name, pair in self.factors.items():
            weights[name] = pair.fold(weights[name])

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, pair in self.factors.items():
                param = getattr(base, name)
                param.add_(pair.delta(param.dtype))

    def unmerge_from(self, base: nn.Module) -> None:
        with torch.no_grad():
            for name, pair in self.factors.items():
                param = getattr(base, name)
                param.sub_(pair.delta(param.dtype))

    def file_tensors(self) -> dict[str, torch.Tensor]:
        names = list(self.factors)
        out = {}
        for k, name in enumerate(names):
            nest = "base_layer." * (len(names) - 1 - k)  # HF's wrappers, the first parameter innermost
            out[f"{nest}lora_A.weight"] = self.factors[name].lora_A
            out[f"{nest}lora_B.weight"] = self.factors[name].lora_B
        return out

    def extra_repr(self) -> str:
        return f"parameters={list(self.factors)}"


class ParamLayer(AdapterLayer):
    """The host of ``ParamLora`` units: calls the module with its targeted parameters replaced
    by W + Σ s·ΔW of the active, unmerged units (``torch.func.functional_call``)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._mix is not None or not self._post:  # a mixed batch reaches a ParamLayer only without its units
            return self.base_layer(*args, **kwargs)
        weights: dict[str, torch.Tensor] = {}
        for unit in self._post:
            for name in unit.factors:
                if name not in weights:
                    weights[name] = getattr(self.base_layer, name)
            unit.fold(weights)
        return torch.func.functional_call(self.base_layer, weights, args, kwargs, strict=False)


# -- which parameters -----------------------------------------------------------------------


def _hit(key: str, names: list[str]) -> bool:
    return key in names or any(key.endswith("." + n) for n in names)


def plan(model: nn.Module, config: Any, targets: list[tuple[str, nn.Module]]) -> list[tuple]:
    """The ``ParamLora`` units of ``config`` as ``(path, module, unit, ParamLayer)``, built
    before the model changes; ``ConfigError`` when a parameter cannot take one."""
    names = list(getattr(config, "target_parameters", None) or [])
    if not names:
        return []
    adapted = {path for path, _ in targets}
    found: dict[str, tuple[nn.Module, nn.Module, list[str]]] = {}
    for path, module in logical_modules(model):
        if isinstance(module, Host) and not isinstance(module, AdapterLayer):
            continue  # a module saved in full, or a prompt host: its parameters are not the model's
        inner = module.base_layer if isinstance(module, AdapterLayer) else module
        for pname, param in inner.named_parameters(recurse=False):
            key = f"{path}.{pname}" if path else pname
            if not _hit(key, names):
                continue
            if not path:
                raise ConfigError(f"target_parameters: {pname!r} belongs to the top-level module; only parameters "
                                  "of a submodule can be targeted")
            if path in adapted or (isinstance(module, AdapterLayer) and not isinstance(module, ParamLayer)):
                raise ConfigError(f"target_parameters: {key!r} belongs to {path!r}, which target_modules adapts "
                                  "already; leave that layer out of target_modules (e.g. target_modules=[])")
            if param.dim() not in (2, 3):
                raise ConfigError(f"target_parameters: {key!r} has {param.dim()} dimensions; LoRA on a parameter "
                                  "takes a 2-d (out, in) or a 3-d (experts, ...) one")
            found.setdefault(path, (module, inner, []))[2].append(pname)
    if not found:
        sample = [f"{p}.{n}" for p, m in logical_modules(model) if p and not isinstance(m, Host)
                  for n, t in m.named_parameters(recurse=False) if t.dim() == 3][:6]
        raise ConfigError(f"target_parameters {names!r} matched no parameter of {type(model).__name__}"
                          + (f"; 3-d parameters include: {', '.join(sample)}" if sample else ""))
    out = []
    for path, (module, inner, pnames) in found.items():
        transposed = bool(getattr(inner, "is_transposed", False))
        factors = {}
        for pname in pnames:
            key, param = f"{path}.{pname}", getattr(inner, pname)
            factors[pname] = ParamFactors(
                param, transposed, pattern_value(config.rank_pattern, key, config.r),
                pattern_value(config.alpha_pattern, key, config.lora_alpha), config.use_rslora,
                config.init_lora_weights, adapter_factory(inner, param))
        out.append((path, module, ParamLora(factors), ParamLayer))
    return out
