"""Per-model bookkeeping: which adapters exist, which are active, what to restore on unload.

The state lives on the model object itself (``model._peftkit``) so that the model stays the
user's model: ``generate``, ``Trainer``, FSDP and ``torch.compile`` see no wrapper.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn as nn

from . import serving
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
    guard: Any = None  # the forward pre-hook taking HF PEFT's per-call arguments
    done: Any = None  # the forward hook ending a mixed-adapter call
    router: serving.Router = field(default_factory=serving.Router)  # mixed-adapter batches


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
# forward would swallow them in **kwargs. ``adapter_names`` (one adapter per row) is served by
# ``serving``; the others are refused (never a silently wrong result).
PER_CALL_ARGS = {
    "alora_offsets": "HF PEFT's activated-LoRA (aLoRA) offsets; peftkit has no aLoRA",
}


def refuse_per_call_args(kwargs: dict[str, Any], call: str) -> None:
    for arg, why in PER_CALL_ARGS.items():
        if arg in kwargs:
            raise ConfigError(f"{call}: the argument {arg}= is not supported: it is {why}")


def _forward_guard(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    refuse_per_call_args(kwargs, f"{type(module).__name__}.forward")
    state = module.__dict__[ATTR]
    if "adapter_names" in kwargs or state.router.generating is not None:
        return _begin(module, state, args, kwargs)
    return None


@torch.compiler.disable  # the names are Python strings: planned outside a compiled graph
def _begin(module: nn.Module, state: PeftState, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
    return serving.begin(module, state, args, kwargs)


def _forward_done(module: nn.Module, args: tuple, output: Any) -> None:
    state = module.__dict__.get(ATTR)
    if state is not None and state.router.plan is not None:
        _end(module, state)


@torch.compiler.disable
def _end(module: nn.Module, state: PeftState) -> None:
    serving.end(module, state)


def _generate(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``generate`` with HF PEFT's ``adapter_names=`` (one name per input row)."""
    call = f"{type(self).__name__}.generate"
    refuse_per_call_args(kwargs, call)
    names = kwargs.pop("adapter_names", None)
    if names is None:
        return type(self).generate(self, *args, **kwargs)
    state = self.__dict__[ATTR]
    router = state.router
    router.generating = serving.check_names(names, state, self, call)
    router._last = None  # its first step checks the adapters' tensors; the next ones reuse that
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        router.generating = router._last = None


_generate.__name__ = "generate"


def _install_guard(model: nn.Module, state: PeftState) -> None:
    """Take ``adapter_names`` and refuse the other ``PER_CALL_ARGS`` in ``model(...)`` (a forward
    pre-hook, run before any other, and a forward hook that always runs after) and in
    ``model.generate(...)`` (whose own argument check would refuse them). ``generate`` is a bound
    method in the instance's ``__dict__``, so a deep copy of the model binds it to the copy."""
    state.guard = model.register_forward_pre_hook(_forward_guard, with_kwargs=True, prepend=True)
    state.done = model.register_forward_hook(_forward_done, always_call=True)
    if callable(getattr(type(model), "generate", None)):
        model.__dict__["generate"] = types.MethodType(_generate, model)


def has_adapters(model: nn.Module) -> bool:
    return model.__dict__.get(ATTR) is not None


def drop_state(model: nn.Module) -> None:
    state = model.__dict__.pop(ATTR, None)
    if state is not None:
        for handle in (state.guard, state.done):
            if handle is not None:
                handle.remove()
    generate = model.__dict__.get("generate")
    if isinstance(generate, types.MethodType) and generate.__func__ is _generate:
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
