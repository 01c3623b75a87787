"""The method registry: peft_type -> how to build that method's units.

Adding a method = a config dataclass, a unit factory, one ``register`` call. The conformance
suite in ``tests/`` is parametrized over this registry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

from .config import PeftConfig
from .errors import ConfigError


@dataclass(frozen=True)
class Method:
    """What the core needs to know about one method.

    A weight-side method gives ``make_unit(config, module, path)``, which builds the unit that
    adapts ``module`` (the original layer found at ``path``) and raises ``ConfigError`` for a
    layer type it cannot adapt; ``default_targets`` maps a transformers ``model_type`` to the
    module names used when the config's ``target_modules`` is None.

    A method that adds something to the model rather than wrapping matched layers (the input
    methods) gives ``attach(model, config, name)`` instead, which installs or extends its own
    ``layer.Host`` in the model and raises ``ConfigError`` before changing anything it cannot do.
    """

    peft_type: str
    config_cls: type[PeftConfig]
    make_unit: Callable[[PeftConfig, nn.Module, str], nn.Module] | None = None
    default_targets: dict[str, list[str]] = field(default_factory=dict)
    attach: Callable[[nn.Module, PeftConfig, str], None] | None = None
    # Optional: fill model-dependent defaults into the (already copied) config before targeting.
    prepare: Callable[[nn.Module, PeftConfig], PeftConfig] | None = None
    # Where HF PEFT's file keys this method's modules_to_save copies: "base_model.model.<path>",
    # or "base_model.<path>" for the input methods (their PeftModel holds the model directly).
    module_prefix: str = "base_model.model."

    def __post_init__(self) -> None:
        if (self.make_unit is None) == (self.attach is None):
            raise ConfigError(f"method {self.peft_type!r}: give exactly one of make_unit and attach")


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.peft_type in _METHODS and _METHODS[method.peft_type] is not method:
        raise ConfigError(f"method {method.peft_type!r} is registered already")
    _METHODS[method.peft_type] = method
    return method


def get(peft_type: str) -> Method:
    key = str(peft_type).upper()
    if key not in _METHODS:
        raise ConfigError(f"unknown peft_type {peft_type!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def method_for(config: PeftConfig) -> Method:
    return get(config.peft_type)


def all_methods() -> list[Method]:
    return list(_METHODS.values())


def config_from_dict(data: dict, source: str = "config") -> PeftConfig:
    """Dispatch on ``peft_type`` and build that method's config."""
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ConfigError(f"{source}: missing field 'peft_type'")
    return get(data["peft_type"]).config_cls.from_dict(data, source=source)
