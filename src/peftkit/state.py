"""Per-model bookkeeping: which adapters exist, which are active, what to restore on unload.

The state lives on the model object itself (``model._peftkit``) so that the model stays the
user's model: ``generate``, ``Trainer``, FSDP and ``torch.compile`` see no wrapper.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.nn as nn

from .config import PeftConfig
from .errors import ConfigError, ModelError
from .layer import Host
from .targeting import logical_modules, replace_module  # noqa: F401 - replace_module: part of this module's API

ATTR = "_peftkit"


@dataclass
class PeftState:
    configs: dict[str, PeftConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # module names each adapter wraps (written to the file as the expanded target list)
    targets: dict[str, list[str]] = field(default_factory=dict)
    # requires_grad of every parameter before the first apply, restored by unload
    requires_grad: dict[str, bool] = field(default_factory=dict)
    guard: Any = None  # the forward pre-hook refusing HF PEFT's per-call arguments


def get_state(model: nn.Module, create: bool = False) -> PeftState:
    state = model.__dict__.get(ATTR)
    if state is None:
        if not create:
            raise ModelError(f"{type(model).__name__} has no peftkit adapters (call peftkit.apply or peftkit.load)")
        state = PeftState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[ATTR] = state
        _install_guard(model, state)
    return state


# -- HF PEFT's per-call arguments ----------------------------------------------------------
# HF PEFT's PeftModel takes these in forward/generate; a peftkit model is the user's model, whose
# forward would swallow them in **kwargs and give every row the active adapter. Until peftkit
# acts on them, passing one is an error (never a silently wrong result).
PER_CALL_ARGS = {
    "adapter_names": "HF PEFT's per-row adapter selection (a batch mixing adapters); peftkit runs the active "
                     "adapter(s) on every row: call peftkit.set_active(model, name) and run one batch per adapter",
    "alora_offsets": "HF PEFT's activated-LoRA (aLoRA) offsets; peftkit has no aLoRA",
}


def refuse_per_call_args(kwargs: dict[str, Any], call: str) -> None:
    for arg, why in PER_CALL_ARGS.items():
        if arg in kwargs:
            raise ConfigError(f"{call}: the argument {arg}= is not supported: it is {why}")


def _forward_guard(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    refuse_per_call_args(kwargs, f"{type(module).__name__}.forward")


def _guarded_generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    refuse_per_call_args(kwargs, f"{type(self).__name__}.generate")
    return type(self).generate(self, *args, **kwargs)


_guarded_generate.__name__ = "generate"


def _install_guard(model: nn.Module, state: PeftState) -> None:
    """Refuse ``PER_CALL_ARGS`` in ``model(...)`` (a forward pre-hook, run before any other) and in
    ``model.generate(...)`` (which would otherwise fail in transformers' own argument check, or
    pass them on). ``generate`` is a bound method in the instance's ``__dict__``, so a deep copy
    of the model binds it to the copy."""
    state.guard = model.register_forward_pre_hook(_forward_guard, with_kwargs=True, prepend=True)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(_guarded_generate, model)


def has_adapters(model: nn.Module) -> bool:
    return model.__dict__.get(ATTR) is not None


def drop_state(model: nn.Module) -> None:
    state = model.__dict__.pop(ATTR, None)
    if state is not None and state.guard is not None:
        state.guard.remove()
    generate = model.__dict__.get("generate")
    if isinstance(generate, types.MethodType) and generate.__func__ is _guarded_generate:
        del model.__dict__["generate"]


def check_name(state: PeftState, name: str) -> PeftConfig:
    if name not in state.configs:
        known = ", ".join(repr(n) for n in state.configs) or "none"
        raise ModelError(f"no adapter named {name!r} (adapters: {known})")
    return state.configs[name]


def hosts(model: nn.Module) -> Iterator[tuple[str, Host]]:
    for name, module in logical_modules(model):
        if isinstance(module, Host):
            yield name, module
