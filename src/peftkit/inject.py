"""``apply`` and ``unload``: wrap the matched modules in host layers, freeze the rest."""

from __future__ import annotations

import copy

import torch.nn as nn

from . import adapters as ops
from . import param_lora, quant, registry, replication, tokens
from .config import PeftConfig
from .errors import ConfigError, ModelError
from .layer import AdapterLayer, SavedModule
from .state import drop_state, get_state, hosts, replace_module
from .targeting import config_modules_to_save, logical_modules, matches

# Class-name endings of transformers heads -> HF PEFT task_type.
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
)
# Heads HF PEFT trains and saves in full for these tasks (absent names are skipped).
_TASK_HEADS = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
               "QUESTION_ANS": ["qa_outputs"]}


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    for suffix, task in _TASK_SUFFIXES:
        if cls.endswith(suffix):
            return task
    if hasattr(model, "config") and hasattr(model, "base_model_prefix"):
        return "FEATURE_EXTRACTION"  # a bare transformers backbone
    return None


def apply(model: nn.Module, config: PeftConfig, name: str = "default") -> nn.Module:
    """Adapt ``model`` in place with ``config`` under ``name``; returns the same model.

    The matched modules are wrapped, every base parameter is frozen, the new adapter (and its
    ``modules_to_save`` copies) is trainable, and it becomes the one active adapter.
    A ``task_type`` of None is inferred from the model class, and the task's head
    (``classifier`` / ``score`` for SEQ_CLS) is added to ``modules_to_save``.
    """
    return build(model, config, name, infer_defaults=True)


def build(model: nn.Module, config: PeftConfig, name: str, infer_defaults: bool) -> nn.Module:
    """``apply``, and ``io.load`` with ``infer_defaults=False``: a file's config is the truth,
    so nothing it states (task type, ``modules_to_save``) is re-derived from the model."""
    if not isinstance(config, PeftConfig):
        raise ConfigError(f"config: expected a peftkit config (e.g. LoraConfig), found {type(config).__name__}")
    check_adapter_name(name)
    method = registry.method_for(config)
    state = get_state(model, create=True)
    if name in state.configs:
        raise ConfigError(f"an adapter named {name!r} exists already; delete it or choose another name")
    if ops.is_merged(model):
        raise ModelError("the model has merged adapters; call peftkit.unmerge(model) before adding one")
    config = copy.deepcopy(config)  # the caller's config stays as given
    if infer_defaults:
        config = _with_task_defaults(model, config)
    quant.settle_all(model)  # no 4-bit layer may take bitsandbytes' AVX512-BF16 repack (see quant)
    built: list = []  # (base layer, unit) built but not hosted yet: undone if a later step refuses
    try:
        if method.prepare is not None:
            config = method.prepare(model, config)
        if infer_defaults:  # a file's entries that match nothing are left to the strict key check
            _check_saved_modules(model, config)
        # layer_replication stacks the layers before targeting: the stacked ones are the targets
        replication.stack(model, config, list(state.configs.values()))
        extras = []  # (path, module, unit, host class) beyond target_modules: token rows, parameters
        if method.attach is not None:
            targets, units = [], []
            method.attach(model, config, name)
        else:
            targets = param_lora.module_targets(model, config, method.default_targets)
            # Build every unit before wrapping a layer, so a refused layer changes nothing.
            originals = [(path, getattr(m, "base_layer", m)) for path, m in targets]
            if method.make_unit is not None:
                units = [method.make_unit(config, module, path) for path, module in originals]
            else:
                units = list(method.build_units(model, config, name, originals))
                if len(units) != len(targets):
                    raise ModelError(f"{method.peft_type}: build_units gave {len(units)} units for "
                                     f"{len(targets)} targets")
            built = [(m, u) for (_, m), u in zip(originals, units)]
            extras = [*tokens.plan(model, config, targets), *param_lora.plan(model, config, targets)]
    except (ConfigError, ModelError):
        for module, unit in built:  # e.g. a PiSSA residual already written into the base
            unit.release(module)
        _remove_partial(model, name)  # a shared host build_units or attach had begun
        if not state.configs:
            replication.restore(model)
            drop_state(model)
        raise
    for path, module, unit, host_cls in [(p, m, u, AdapterLayer) for (p, m), u in zip(targets, units)] + extras:
        host = module if isinstance(module, AdapterLayer) else host_cls(module)
        host.add(name, unit)
        if host is not module:
            replace_module(model, path, host)
    _add_saved_modules(model, config, name)
    state.configs[name] = config
    state.targets[name] = [path for path, _ in targets]
    _freeze_all_but(model, name, config)
    ops.set_active(model, name)
    return model


def check_adapter_name(name: object) -> None:
    """An adapter name is a plain identifier-like string: no '.', no path separators, not '..'
    (names end up in module paths, and HF PEFT puts non-default adapters in sub-directories)."""
    if not isinstance(name, str) or not name or name.strip() != name or any(c in name for c in "./\\\0"):
        raise ConfigError(f"adapter name: expected a non-empty string without '.', '/', '\\' or spaces around it, "
                          f"found {name!r}")


def _remove_partial(model: nn.Module, name: str) -> None:
    """Take adapter ``name`` out of every host that holds it; hosts left empty go."""
    for path, host in list(hosts(model)):
        if name in host.names():
            host.remove(name)
            if not host.names():
                replace_module(model, path, host.restore(merge=False))


def _with_task_defaults(model: nn.Module, config: PeftConfig) -> PeftConfig:
    if config.task_type is None:
        config.task_type = infer_task_type(model)
    heads = _TASK_HEADS.get(config.task_type)
    if heads is not None and hasattr(config, "modules_to_save"):
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + heads))
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return config


def _check_saved_modules(model: nn.Module, config: PeftConfig) -> None:
    asked = config_modules_to_save(config)
    implied = set(_TASK_HEADS.get(config.task_type, []))
    names = [n for n, _ in logical_modules(model) if n]
    for entry in asked:
        if entry not in implied and not any(matches([entry], n) for n in names):
            raise ConfigError(f"modules_to_save: {entry!r} matches no module of {type(model).__name__}")


def _add_saved_modules(model: nn.Module, config: PeftConfig, name: str) -> None:
    asked = config_modules_to_save(config)
    if not asked:
        return
    found = [(n, m) for n, m in logical_modules(model) if n and matches(asked, n)]
    for path, module in found:
        if isinstance(module, AdapterLayer):
            raise ConfigError(f"modules_to_save: {path!r} is adapted by another adapter; it cannot also be saved in full")
        host = module if isinstance(module, SavedModule) else SavedModule(module)
        host.add(name)
        if host is not module:
            replace_module(model, path, host)


def adapter_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """Parameters owned by adapter ``name``: its units and its ``modules_to_save`` copies."""
    params = []
    for _, host in hosts(model):
        owned = host.owned(name)
        if owned is not None:
            params.extend(owned.parameters())
    return params


def _freeze_all_but(model: nn.Module, name: str, config: PeftConfig) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in adapter_parameters(model, name):
        p.requires_grad_(True)
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".adapters." not in pname and ".copies." not in pname \
                    and ".original_module." not in pname:
                p.requires_grad_(True)
    elif bias.endswith("_only"):  # HF PEFT's rule: lora_only, oft_only, ... train the adapted layers' biases
        for _, host in hosts(model):
            if isinstance(host, AdapterLayer) and name in host.adapters and host.bias is not None:
                host.bias.requires_grad_(True)


def unload(model: nn.Module, merge: bool = False) -> nn.Module:
    """Remove every adapter and restore the original module tree and state_dict keys.

    With ``merge=True`` the active adapters are folded into the base weights first (and the
    active adapter's ``modules_to_save`` copies replace the originals); otherwise merged
    layers are unmerged, so the base weights are the original ones again.
    """
    state = get_state(model)
    if merge:
        ops.merge_layers(model)
    else:
        ops.unmerge(model)
    for path, host in list(hosts(model)):
        replace_module(model, path, host.restore(merge))
    replication.restore(model)
    for pname, p in model.named_parameters():
        p.requires_grad_(state.requires_grad.get(pname, True))
    drop_state(model)
    return model
