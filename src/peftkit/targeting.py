"""Which modules a config matches, with HF PEFT's matching rules.

- ``target_modules`` as a list: a module matches when its full dotted name equals an entry or
  ends with ``"." + entry``; as a string: ``re.fullmatch(string, name)``; ``"all-linear"``:
  every ``nn.Linear`` / ``Conv1D`` except the output head (LM head, classifier, score).
- ``exclude_modules`` uses the same rules and wins over ``target_modules``.
- ``layers_to_transform`` keeps only modules whose layer index (the number after
  ``layers_pattern``, or the first ``.<name>.<digits>.`` when no pattern is given) is listed;
  like HF PEFT it applies to list targets only.
- ``rank_pattern`` / ``alpha_pattern`` keys match a name when ``(.*\\.)?(key)`` fully matches it.

Names are the model's own (``bert.encoder.layer.0.attention.self.query``) even after
adapters are applied: modules inside a host layer are not seen twice.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterator

import torch.nn as nn

from .errors import ConfigError
from .unit import Host

ALL_LINEAR = "all-linear"
HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "cls")


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style ``Conv1D`` (a linear layer with weight stored (in, out))."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def logical_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` under the model's own names: a host layer is reported at the name of
    the module it wraps, its adapters are not listed, and the wrapped module's children keep
    their original names (``mlp.c_fc``, not ``mlp.base_layer.c_fc``)."""
    def walk(prefix: str, module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        yield prefix, module
        inner = module.inner() if isinstance(module, Host) else module
        if inner is None:
            return
        for child_name, child in inner.named_children():
            yield from walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    yield from walk("", model)


def get_logical(model: nn.Module, name: str) -> nn.Module:
    """The module at logical ``name``; inside a host layer, the wrapped module's children."""
    module = model
    for part in name.split(".") if name else []:
        if isinstance(module, Host):
            module = module.inner()
        module = getattr(module, part)
    return module


def replace_module(model: nn.Module, name: str, new: nn.Module | None) -> None:
    """Put ``new`` at ``name``; ``None`` deletes the attribute (a host the model never had)."""
    parent_name, _, child = name.rpartition(".")
    parent = get_logical(model, parent_name)
    if isinstance(parent, Host):
        parent = parent.inner()
    if new is None:
        delattr(parent, child)
    else:
        setattr(parent, child, new)



def _matches_list(name: str, entries: list[str]) -> bool:
    return any(name == e or name.endswith("." + e) for e in entries)


def _regex(pattern: str, what: str) -> re.Pattern:
    """``re.compile`` (cached by ``re``); a bad pattern is a ``ConfigError`` naming the field.
    Configs check their patterns when built; this covers a field changed after that."""
    try:
        return re.compile(pattern)
    except (re.error, TypeError, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{what}: expected a valid regular expression, found {pattern!r} ({exc})") from None


def matches(selector: list[str] | str | None, name: str, what: str = "target_modules") -> bool:
    if selector is None:
        return False
    if isinstance(selector, str):
        return _regex(selector, what).fullmatch(name) is not None
    return _matches_list(name, selector)


def layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [])
    if not patterns:  # the first "<name>.<digits>." after the first dot
        found = re.match(r".*?\.[^.]*\.(\d+)\.", name)
        return int(found.group(1)) if found else None
    for pattern in patterns:
        found = _regex(rf"(?:^|.*?\.){pattern}\.(\d+)\.", "layers_pattern").match(name)
        if found:
            return int(found.group(1))
    return None


def pattern_value(patterns: dict[str, Any] | None, name: str, default: Any) -> Any:
    for key, value in (patterns or {}).items():
        if _regex(rf"(.*\.)?(?:{key})", "rank_pattern/alpha_pattern key").fullmatch(name):
            return value
    return default


def output_head_names(model: nn.Module) -> set[str]:
    """Names of the output head(s): the LM head and classifier/score layers."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    for name, module in logical_modules(model):
        if not name:
            continue
        if module is out_emb or name.split(".")[-1] in HEAD_NAMES:
            heads.add(name)
    return heads


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def resolve_targets(model: nn.Module, target_modules: Any, default_targets: dict[str, list[str]]) -> Any:
    """Replace ``None`` by the method's default for the model type, or explain what to pass."""
    if target_modules is not None:
        return target_modules
    kind = model_type(model)
    if kind in default_targets:
        return list(default_targets[kind])
    linear = [n for n, m in logical_modules(model) if n and is_linear(m)]
    raise ConfigError(
        f"target_modules is not set and there is no default for model type {kind or type(model).__name__!r} "
        f"(defaults exist for model types: {', '.join(sorted(default_targets)) or 'none'}); "
        f"pass target_modules (names, a regex, or 'all-linear'), e.g. from: {', '.join(_short(linear))}"
    )


def find_targets(model: nn.Module, config: Any, default_targets: dict[str, list[str]]) -> list[tuple[str, nn.Module]]:
    """All ``(name, module)`` pairs the config adapts; raises when nothing matches."""
    targets = resolve_targets(model, config.target_modules, default_targets)
    heads = output_head_names(model) if targets == ALL_LINEAR else set()
    saved = config_modules_to_save(config)
    found = []
    for name, module in logical_modules(model):
        if not name or _matches_list(name, saved):
            continue
        if targets == ALL_LINEAR:
            hit = name not in heads and is_linear(_base(module))
        else:
            hit = matches(targets, name)
            if hit and config.layers_to_transform is not None and not isinstance(targets, str):
                hit = layer_index(name, config.layers_pattern) in config.layers_to_transform
        if hit and not matches(config.exclude_modules, name, "exclude_modules"):
            found.append((name, module))
    if not found:
        raise ConfigError(_nothing_matched(model, targets, config))
    return found


def config_modules_to_save(config: Any) -> list[str]:
    return list(getattr(config, "modules_to_save", None) or [])


def _base(module: nn.Module) -> nn.Module:
    return getattr(module, "base_layer", module)


def _short(names: list[str], n: int = 8) -> list[str]:
    return names[:n] + ([f"... ({len(names) - n} more)"] if len(names) > n else [])


def _nothing_matched(model: nn.Module, targets: Any, config: Any) -> str:
    names = [n for n, _ in logical_modules(model) if n]
    leaves = sorted({n.split(".")[-1] for n in names})
    asked = [targets] if isinstance(targets, str) else list(targets)
    near = list(dict.fromkeys(
        m for a in asked for m in difflib.get_close_matches(a.split(".")[-1], leaves, n=4, cutoff=0.6)
    ))
    msg = f"target_modules {targets!r} matched no module of {type(model).__name__}"
    if config.layers_to_transform is not None:
        msg += f" in layers {config.layers_to_transform}"
    if near:
        msg += f"; near names: {', '.join(near)}"
    linear = [n for n, m in logical_modules(model) if n and is_linear(_base(m))]
    if linear:
        msg += f"; linear layers include: {', '.join(_short(linear, 5))}"
    return msg
