"""Per-model bookkeeping: which adapters exist, which are active, what to restore on unload.

The state lives on the model object itself (``model._peftkit``) so that the model stays the
user's model: ``generate``, ``Trainer``, FSDP and ``torch.compile`` see no wrapper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch.nn as nn

from .config import PeftConfig
from .errors import ModelError
from .layer import Host
from .targeting import get_logical, logical_modules

ATTR = "_peftkit"


@dataclass
class PeftState:
    configs: dict[str, PeftConfig] = field(default_factory=dict)
    active: list[str] = field(default_factory=list)
    # module names each adapter wraps (written to the file as the expanded target list)
    targets: dict[str, list[str]] = field(default_factory=dict)
    # requires_grad of every parameter before the first apply, restored by unload
    requires_grad: dict[str, bool] = field(default_factory=dict)


def get_state(model: nn.Module, create: bool = False) -> PeftState:
    state = model.__dict__.get(ATTR)
    if state is None:
        if not create:
            raise ModelError(f"{type(model).__name__} has no peftkit adapters (call peftkit.apply or peftkit.load)")
        state = PeftState(requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        model.__dict__[ATTR] = state
    return state


def has_adapters(model: nn.Module) -> bool:
    return model.__dict__.get(ATTR) is not None


def drop_state(model: nn.Module) -> None:
    model.__dict__.pop(ATTR, None)


def check_name(state: PeftState, name: str) -> PeftConfig:
    if name not in state.configs:
        known = ", ".join(repr(n) for n in state.configs) or "none"
        raise ModelError(f"no adapter named {name!r} (adapters: {known})")
    return state.configs[name]


def hosts(model: nn.Module) -> Iterator[tuple[str, Host]]:
    for name, module in logical_modules(model):
        if isinstance(module, Host):
            yield name, module


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
