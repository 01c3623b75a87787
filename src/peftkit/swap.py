"""Hot-swapping LoRA adapters in place, for compiled models.

``torch.compile`` specialises a graph on what it sees: a Python float (a LoRA unit's scaling) is a
constant of the graph, a tensor's shape is guarded, and a replaced ``nn.Parameter`` is another
input. Replacing one adapter by another with ``delete`` + ``load`` therefore recompiles. Here the
adapter's tensors keep their identity, shapes, dtypes and devices, and only their values change:

- ``prepare_hotswap(model, max_rank)``, once, before ``torch.compile``: every LoRA unit's A and B
  are zero-padded along the rank dimension to ``max_rank`` (A's extra rows and B's extra columns
  are zero, so the outputs do not change), and its scaling becomes a 0-d tensor held as a
  non-persistent buffer (it moves with ``.to(device)``; ``state_dict`` keys stay as they were).
- ``hotswap(model, directory, name)``: the tensors of another adapter directory (HF PEFT's
  format) are copied into adapter ``name``'s existing parameters and scaling buffers; a file of
  a lower rank is zero-padded, and a module the loaded adapter adapts but the file does not is
  zero-filled (B = 0: it computes the identity; a DoRA magnitude becomes ‖W‖, DoRA's own
  identity). Everything is checked before the first tensor changes: a refused swap changes
  nothing.

The rank of a unit: ``unit.r`` stays the adapter's own rank (the one its config and file give,
which its scaling is computed from); the padded rank is the tensors' rank dimension
(``lora_A.shape[0]``). What ``peftkit.save`` writes is the adapter without its padding
(``LoraUnit.file_tensors`` cuts A and B to their first ``r`` ranks): the same file as without
``prepare_hotswap``, whose ``r`` / ``rank_pattern`` agree with its tensor shapes, which HF PEFT
and peftkit load as any other. Training after ``prepare_hotswap`` keeps the padding at zero (its
gradients are exactly zero, B's extra columns and A's extra rows being zero), so nothing is lost.

Rules of ``hotswap`` (HF PEFT's ``hotswap_adapter`` has the same for the config fields): the
loaded adapter and the file are both LoRA (``peft_type``), and agree on ``use_rslora``,
``lora_dropout``, ``alpha_pattern``, ``use_dora`` and ``bias``; the file adapts no module the
loaded adapter does not; its ``modules_to_save`` copies (and biases, with ``bias != "none"``) are
the loaded adapter's, and are copied too. Without ``prepare_hotswap`` a module's rank and
scaling must be the loaded ones (a different rank or alpha needs the padded tensors and the
scaling buffers). After a swap ``model._peftkit.configs[name]`` is the file's config (rank,
alpha, patterns, ``base_model_name_or_path``, targets), with the loaded adapter's module selection
kept where the file adapts fewer modules than the adapter has (the zero-filled ones stay part of
it), so ``peftkit.save`` writes a directory that reloads to the same outputs.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from . import io
from .config import CONFIG_NAME, check_positive_int
from .errors import AdapterFileError, ConfigError, ModelError
from .layer import FILE_PREFIX, AdapterLayer
from .methods.lora import DoraLinear, LoraConfig, LoraEmbedding, LoraUnit
from .state import check_name, get_state, has_adapters, hosts
from .targeting import pattern_value

# A file key's suffix -> (the unit's attribute, its rank dimension; None: no rank dimension).
_SUFFIXES = {
    "lora_A.weight": ("lora_A", 0),
    "lora_B.weight": ("lora_B", 1),
    "lora_embedding_A": ("lora_embedding_A", 0),
    "lora_embedding_B": ("lora_embedding_B", 1),
    "lora_magnitude_vector": ("lora_magnitude_vector", None),
}
# Config fields whose values the units' structure or computation depends on beyond the tensors
# and scalings a swap replaces (HF PEFT checks the first four; ``bias`` decides the file's keys).
COMPARED_FIELDS = ("use_rslora", "lora_dropout", "alpha_pattern", "use_dora", "bias")
# The fields choosing the modules an adapter adapts.
_SELECTION_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def _plain(model: nn.Module) -> nn.Module:
    """The model under a ``torch.compile`` wrapper (``OptimizedModule``), else the model."""
    orig = getattr(model, "_orig_mod", None)
    return orig if isinstance(orig, nn.Module) else model


def _is_compiled(model: nn.Module) -> bool:
    return isinstance(getattr(model, "_orig_mod", None), nn.Module)


def _lora_units(model: nn.Module, name: str) -> list[tuple[str, AdapterLayer, LoraUnit]]:
    return [(path, host, host.adapters[name]) for path, host in hosts(model)
            if isinstance(host, AdapterLayer) and name in host.adapters]


def _pair_attrs(unit: LoraUnit) -> tuple[str, str]:
    return ("lora_embedding_A", "lora_embedding_B") if isinstance(unit, LoraEmbedding) else ("lora_A", "lora_B")


def padded_rank(unit: LoraUnit) -> int:
    """The rank dimension of the unit's tensors (``unit.r`` or more after ``prepare_hotswap``)."""
    return getattr(unit, _pair_attrs(unit)[0]).shape[0]


def is_prepared(unit: LoraUnit) -> bool:
    """Whether the unit's scaling is a tensor buffer that a swap can change in place."""
    return "scaling" in unit._buffers


def _scaling(alpha: float, r: int, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r  # as ``LoraUnit`` computes it


def _check_merged(model: nn.Module, names: list[str], call: str) -> None:
    for path, host in hosts(model):
        if isinstance(host, AdapterLayer):
            merged = [n for n in names if n in host.merged]
            if merged:
                raise ModelError(f"{call}: adapter {merged[0]!r} is merged into the base weights (at {path!r}); "
                                 "call peftkit.unmerge(model) first")


def _refuse_beyond_linear(config, what: str, call: str) -> None:
    """Token rows and parameter targets (docs/lora_beyond_linear.md) have no LoRA pair of a module to swap."""
    for field_name in ("trainable_token_indices", "target_parameters"):
        if getattr(config, field_name, None):
            raise ModelError(f"{call}: {what} has {field_name}; hot-swapping swaps the LoRA pairs of modules only")


def _no_adapters(model: nn.Module, call: str) -> ModelError:
    return ModelError(f"{call}: {type(model).__name__} has no peftkit adapters; load the LoRA adapter to swap "
                      "first (peftkit.load or peftkit.apply)")


# -- prepare_hotswap ------------------------------------------------------------------------


def prepare_hotswap(model: nn.Module, max_rank: int) -> None:
    """Make every LoRA adapter of ``model`` swappable in place up to rank ``max_rank``.

    Call it after loading the adapter(s) to swap and before ``torch.compile`` (and before
    creating an optimizer: the padded A and B are new ``nn.Parameter``s). Outputs do not change.
    Calling it again re-pads to the new ``max_rank`` (not below any adapter's own rank).
    """
    call = "prepare_hotswap"
    if _is_compiled(model):
        raise ModelError(f"{call}: the model is compiled already (torch.compile); call prepare_hotswap on the "
                         "model before compiling it, or the compiled graphs would be built again")
    try:
        check_positive_int("max_rank", max_rank)
    except ConfigError as exc:
        raise ConfigError(f"{call}: {exc}") from None
    if not has_adapters(model):
        raise _no_adapters(model, call)
    state = get_state(model)
    others = [f"{n!r} ({c.peft_type})" for n, c in state.configs.items() if c.peft_type != LoraConfig.peft_type]
    if others:
        raise ModelError(f"{call}: hot-swapping supports LoRA adapters only, and the model has "
                         f"{', '.join(others)}; delete {'it' if len(others) == 1 else 'them'} first (peftkit.delete)")
    names = list(state.configs)
    for n in names:
        _refuse_beyond_linear(state.configs[n], f"adapter {n!r}", call)
    _check_merged(model, names, call)
    units = {n: _lora_units(model, n) for n in names}
    for n, found in units.items():
        if not found:
            continue
        path, _, unit = max(found, key=lambda item: item[2].r)
        if unit.r > max_rank:
            raise ConfigError(f"{call}: max_rank {max_rank} is below the rank {unit.r} of adapter {n!r} "
                              f"(module {path!r}); pass max_rank >= {unit.r}")
    with torch.no_grad():
        for found in units.values():
            for _, _, unit in found:
                _pad(unit, max_rank)
                _scaling_buffer(unit)


def _pad(unit: LoraUnit, max_rank: int) -> None:
    """A and B become new parameters of rank ``max_rank``: the first ``unit.r`` ranks copied, the rest zero."""
    for attr, dim in zip(_pair_attrs(unit), (0, 1)):
        old = getattr(unit, attr)
        if old.shape[dim] == max_rank:
            continue
        shape = list(old.shape)
        shape[dim] = max_rank
        new = torch.zeros(shape, dtype=old.dtype, device=old.device)
        new.narrow(dim, 0, unit.r).copy_(old.detach().narrow(dim, 0, unit.r))
        setattr(unit, attr, nn.Parameter(new, requires_grad=old.requires_grad))


def _scaling_buffer(unit: LoraUnit) -> None:
    """The unit's scaling as a 0-d tensor in A's dtype and device, a non-persistent buffer."""
    if is_prepared(unit):
        return
    value = float(unit.scaling)
    a = getattr(unit, _pair_attrs(unit)[0])
    delattr(unit, "scaling")
    unit.register_buffer("scaling", torch.tensor(value, dtype=a.dtype, device=a.device), persistent=False)


# -- hotswap --------------------------------------------------------------------------------


@dataclass
class _Plan:
    """Everything a swap changes, built (and checked) before anything changes."""

    copies: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (live, new value)
    scalings: list[tuple[LoraUnit, int, float]] = field(default_factory=list)  # (unit, rank, scaling)
    zero_filled: list[str] = field(default_factory=list)


def hotswap(model: nn.Module, directory: str | os.PathLike, name: str = "default", *,
            allow_pickle: bool = False) -> None:
    """Replace the weights and scalings of the loaded LoRA adapter ``name`` by those of the
    adapter in ``directory``, in place (a compiled model is not recompiled; ``model`` may be the
    compiled wrapper or the model). See the module's docstring for the rules; a refused swap
    raises ``AdapterFileError`` / ``ConfigError`` / ``ModelError`` and changes nothing."""
    call = "hotswap"
    model = _plain(model)
    if not has_adapters(model):
        raise _no_adapters(model, call)
    state = get_state(model)
    loaded = check_name(state, name)
    if loaded.peft_type != LoraConfig.peft_type:
        raise ConfigError(f"{call}: adapter {name!r} is {loaded.peft_type}; hot-swapping supports LoRA adapters only")
    _check_merged(model, [name], call)
    directory = os.fspath(directory)
    source = os.path.join(directory, CONFIG_NAME)
    new = io.read_config(directory)
    _check_compatible(loaded, new, name, source)
    _refuse_beyond_linear(loaded, f"adapter {name!r}", call)
    _refuse_beyond_linear(new, source, call)
    if (new.layer_replication or None) != (loaded.layer_replication or None):
        raise AdapterFileError(f"{source}: layer_replication: the loaded adapter {name!r} has "
                               f"{loaded.layer_replication!r}, the file has {new.layer_replication!r}; a hot-swapped "
                               "adapter must agree on it (load the file as a new adapter instead)")
    tensors = io.read_tensors(directory, allow_pickle)
    plan = _plan(model, name, new, tensors, directory)
    stored = copy.deepcopy(new)
    stored.inference_mode = loaded.inference_mode
    if plan.zero_filled:  # the adapter keeps modules the file does not adapt: keep what selects them
        for f in _SELECTION_FIELDS:
            setattr(stored, f, copy.deepcopy(getattr(loaded, f)))
    with torch.no_grad():
        for live, value in plan.copies:
            live.copy_(value)
        for unit, r, scaling in plan.scalings:
            unit.r = r
            if is_prepared(unit):
                unit.scaling.fill_(scaling)
    state.configs[name] = stored


def _normalized(field_name: str, value):
    return {} if field_name == "alpha_pattern" and value is None else value


def _check_compatible(loaded: LoraConfig, new, name: str, source: str) -> None:
    if new.peft_type != loaded.peft_type:
        raise AdapterFileError(f"{source}: peft_type: the loaded adapter {name!r} is {loaded.peft_type!r}, the file "
                               f"is {new.peft_type!r}; hot-swapping replaces a LoRA adapter by another LoRA adapter")
    from .methods import lora_init

    for config, which in ((loaded, f"the loaded adapter {name!r}"), (new, "the file")):
        init = getattr(config, "init_lora_weights", True)
        if lora_init.modifies_base(init) or getattr(config, "lora_bias", False):
            what = f"init_lora_weights={init!r} (it changes the base weights)" if lora_init.modifies_base(init) \
                else "lora_bias=True"
            raise AdapterFileError(f"{source}: {which} has {what}, which hot-swapping does not support; load the "
                                   "file as a new adapter (a PiSSA/OLoRA adapter saved with plain_lora=True swaps)")
    for f in COMPARED_FIELDS:
        have, got = _normalized(f, getattr(loaded, f)), _normalized(f, getattr(new, f))
        if have != got:
            raise AdapterFileError(f"{source}: {f}: the loaded adapter {name!r} has {have!r}, the file has {got!r}; "
                                   "a hot-swapped adapter must agree on it (load the file as a new adapter instead)")


def _module_of(key: str) -> str:
    """The module a file key belongs to (the key itself when it is not an adapter key)."""
    rest = key[len(FILE_PREFIX):] if key.startswith(FILE_PREFIX) else key
    for suffix in (*_SUFFIXES, "base_layer.bias", "bias"):
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1]
    return rest


def _plan(model: nn.Module, name: str, new: LoraConfig, tensors: dict[str, torch.Tensor], directory: str) -> _Plan:
    plan = _Plan()
    units = _lora_units(model, name)
    lora_keys: set[str] = set()
    needs_prepare: list[str] = []
    too_high: list[tuple[str, int, int]] = []
    for path, host, unit in units:
        suffixes = list(unit.file_tensors())  # the unit's own file layout
        keys = {s: f"{FILE_PREFIX}{path}.{s}" for s in suffixes}
        lora_keys.update(keys.values())
        present = [s for s in suffixes if keys[s] in tensors]
        if present and len(present) != len(suffixes):
            missing = next(keys[s] for s in suffixes if keys[s] not in tensors)
            raise AdapterFileError(f"{directory}: missing key {missing} (the file has "
                                   f"{', '.join(keys[s] for s in present)} of module {path!r})")
        r = pattern_value(new.rank_pattern, path, new.r)
        scaling = _scaling(pattern_value(new.alpha_pattern, path, new.lora_alpha), r, new.use_rslora)
        slot = padded_rank(unit)
        if is_prepared(unit):
            if r > slot:
                too_high.append((path, r, slot))
        elif r != unit.r or scaling != unit.scaling:
            needs_prepare.append(f"module {path!r}: the file's rank {r} and scaling {scaling:g}, the loaded "
                                 f"adapter's rank {unit.r} and scaling {float(unit.scaling):g}")
        plan.scalings.append((unit, r, scaling))
        if r > slot:  # refused below, with every module named that needs it
            continue
        if not present:
            plan.zero_filled.append(path)
        for s in suffixes:
            attr, dim = _SUFFIXES[s]
            live = getattr(unit, attr)
            if present:
                plan.copies.append((live, _fitted(tensors[keys[s]], live, dim, r, keys[s], directory)))
            elif dim is None:  # DoRA's magnitude of a module the file leaves out: ‖W‖, DoRA's identity
                assert isinstance(unit, DoraLinear)
                plan.copies.append((live, unit._base_weight().norm(dim=1).to(live.dtype).detach()))
            else:
                plan.copies.append((live, torch.zeros_like(live)))
    if needs_prepare:
        raise ModelError(f"hotswap: adapter {name!r} was not prepared for hot-swapping, and the file in {directory} "
                         f"differs from it in rank or scaling ({needs_prepare[0]}"
                         + (f"; and {len(needs_prepare) - 1} more modules" if len(needs_prepare) > 1 else "")
                         + "); call peftkit.prepare_hotswap(model, max_rank) after loading the adapter and before "
                         "torch.compile")
    if too_high:
        path, r, slot = max(too_high, key=lambda t: t[1])
        raise ModelError(f"hotswap: the file in {directory} has rank {r} at module {path!r}, above the rank {slot} "
                         f"adapter {name!r} was padded to; call peftkit.prepare_hotswap(model, max_rank={r}) "
                         "(or higher) before torch.compile")
    # The adapter's other tensors (modules_to_save copies, biases) are replaced whole.
    others = {k: t for k, t in io.adapter_tensors(model, name).items() if k not in lora_keys}
    optional = {k: t for k, t in io.optional_tensors(model, name).items() if k in tensors and k not in others}
    unexpected = sorted(set(tensors) - lora_keys - set(others) - set(optional))
    if unexpected:
        modules = sorted({_module_of(k) for k in unexpected})
        raise AdapterFileError(f"{directory}: the file adapts module {modules[0]!r}"
                               + (f" (and {len(modules) - 1} more)" if len(modules) > 1 else "")
                               + f", which adapter {name!r} does not (key {unexpected[0]}); hot-swapping cannot add "
                               "modules: load the file as a new adapter (peftkit.load) instead")
    for key, live in {**others, **{k: t for k, t in optional.items() if t is not None}}.items():
        if key not in tensors:
            raise AdapterFileError(f"{directory}: missing key {key} (adapter {name!r} has it; only LoRA modules "
                                   "can be left out of a hot-swapped file)")
        if tuple(tensors[key].shape) != tuple(live.shape):
            raise AdapterFileError(f"{directory}: key {key} has shape {tuple(tensors[key].shape)} in the file but "
                                   f"{tuple(live.shape)} in the model")
        plan.copies.append((live, tensors[key].to(device=live.device, dtype=live.dtype)))
    return plan


def _fitted(value: torch.Tensor, live: torch.Tensor, dim: int | None, r: int, key: str, directory: str) -> torch.Tensor:
    """The file's tensor in the live tensor's shape (zero-padded along the rank dimension),
    dtype and device; its shape must be the module's at rank ``r`` (the file config's)."""
    want = list(live.shape)
    if dim is not None:
        want[dim] = r
    if list(value.shape) != want:
        raise AdapterFileError(f"{directory}: key {key} has shape {tuple(value.shape)} in the file but "
                               f"{tuple(want)} fits the module at the rank the file's config gives ({r})")
    value = value.to(device=live.device, dtype=live.dtype)
    if dim is None or r == live.shape[dim]:
        return value
    out = torch.zeros_like(live)
    out.narrow(dim, 0, r).copy_(value)
    return out
