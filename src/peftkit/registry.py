"""The method registry: peft_type -> the method's one description (``Method``).

Adding a method = one file in ``methods/`` with a config dataclass, a unit factory (or an
``attach`` step), and one ``register(Method(...))`` call that also says how the CLI builds it
(``CliMethod``), what the trainer defaults to, and the flags the conformance suite checks. The
CLI, its help, its option checks and the conformance suite in ``tests/`` derive from this
registry; the core imports nothing from ``train/`` or the CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch.nn as nn

from .config import PeftConfig
from .errors import ConfigError


# The method-specific options of ``peftkit train`` a CLI entry may take; every other option
# applies to every method. The values reach ``CliMethod.make_config`` by these names.
CLI_OPTIONS = ("r", "alpha", "dropout", "targets", "virtual_tokens", "init", "loraplus_lr_ratio", "lora_fa")


@dataclass(frozen=True)
class CliMethod:
    """One ``peftkit train --method NAME``: how its flags become a config, as plain data.

    ``make_config(values)`` gets the options named in ``options`` (``targets`` already parsed:
    a list of names, a regex string, ``"all-linear"`` or None); ``defaults`` are the trainer's
    defaults for this method (``lr``, ...), used where neither a flag nor the YAML file sets
    them; ``quantize`` is the 4-bit format the base is stored in (QLoRA: ``"nf4"``).
    """

    name: str
    help: str
    make_config: Callable[[dict[str, Any]], PeftConfig]
    options: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    quantize: str | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.options) - set(CLI_OPTIONS))
        if unknown:
            raise ConfigError(f"--method {self.name}: unknown CLI options {unknown}; known: {', '.join(CLI_OPTIONS)}")


@dataclass(frozen=True)
class TrainingHooks:
    """What a method needs from a training loop, called by the trainer without knowing the method
    (each gets the unwrapped model and the adapter's name):

    - ``begin(model, name, total_steps)``: before the first step (also on resume), with the
      number of optimizer steps the run will take (AdaLoRA's schedule);
    - ``loss(model, name) -> Tensor | None``: a term added once per optimizer step to the loss
      (AdaLoRA's orthogonal regulariser), on the window's last micro-batch;
    - ``step(model, name, step)``: after ``optimizer.step()`` and before ``zero_grad`` (the
      gradients of the step are still there), at accumulation boundaries only; ``step`` is the
      number of optimizer steps taken (AdaLoRA's rank allocation);
    - ``state(model, name) -> dict`` / ``load_state(model, name, state)``: what a checkpoint
      must keep beyond the trainable parameters for an exact resume (tensors and plain values).
    """

    begin: Callable[[nn.Module, str, int], None] | None = None
    loss: Callable[[nn.Module, str], Any] | None = None
    step: Callable[[nn.Module, str, int], None] | None = None
    state: Callable[[nn.Module, str], dict] | None = None
    load_state: Callable[[nn.Module, str, dict], None] | None = None


@dataclass(frozen=True)
class Method:
    """The one description of a method: everything the core, the trainer, the CLI and the
    conformance suite need to know about it.

    A weight-side method gives ``make_unit(config, module, path)``, which builds the unit that
    adapts ``module`` (the original layer found at ``path``) and raises ``ConfigError`` for a
    layer type it cannot adapt; ``default_targets`` maps a transformers ``model_type`` to the
    module names used when the config's ``target_modules`` is None (usually read from the
    role map in ``architectures``).

    A weight-side method whose layers share state (VeRA's shared projections) gives
    ``build_units(model, config, name, targets) -> units`` instead of ``make_unit``: one unit per
    ``(path, module)`` target, in order; it may install a shared ``layer.Host`` of its own. If it
    raises, ``apply`` removes whatever the adapter ``name`` left in any host, so the model is as it
    was.

    A method that adds something to the model rather than wrapping matched layers (the input
    methods) gives ``attach(model, config, name)`` instead, which installs or extends its own
    ``layer.Host`` in the model and raises ``ConfigError`` before changing anything it cannot do.

    ``training``: the hooks a training loop calls for it (``TrainingHooks``). Flags:
    ``mergeable`` (its units fold into the base weights), ``identity_at_init`` (a new adapter
    leaves the model's function unchanged), ``gradient_checkpointing`` (it works with
    recomputed blocks; prefix tuning's KV cache does not). ``cli``: its ``peftkit train
    --method`` entries (one method may have several: ``lora``, ``dora``, ``qlora``).
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
    mergeable: bool = False
    identity_at_init: bool = False
    gradient_checkpointing: bool = True
    cli: tuple[CliMethod, ...] = ()
    build_units: Callable[[nn.Module, PeftConfig, str, list[tuple[str, nn.Module]]], list[nn.Module]] | None = None
    training: TrainingHooks = field(default_factory=TrainingHooks)

    def __post_init__(self) -> None:
        given = [n for n in ("make_unit", "build_units", "attach") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError(f"method {self.peft_type!r}: give exactly one of make_unit, build_units and attach "
                              f"(given: {', '.join(given) or 'none'})")

    @property
    def input_method(self) -> bool:
        """It changes the model's inputs (virtual tokens, prefixes), not its layers."""
        return self.attach is not None


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.peft_type in _METHODS and _METHODS[method.peft_type] is not method:
        raise ConfigError(f"method {method.peft_type!r} is registered already")
    taken = cli_methods()
    for entry in method.cli:
        if entry.name in taken and taken[entry.name][0] is not method:
            raise ConfigError(f"--method {entry.name}: taken by {taken[entry.name][0].peft_type} already")
    _METHODS[method.peft_type] = method
    return method


def cli_methods() -> dict[str, tuple[Method, CliMethod]]:
    """Every ``--method`` name -> (its method, its CLI entry), in registration order."""
    return {entry.name: (method, entry) for method in _METHODS.values() for entry in method.cli}


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
