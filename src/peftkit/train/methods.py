"""From ``--method`` and its flags to a peftkit config (one entry per method)."""

from __future__ import annotations

import re
from typing import Any, Callable

from .. import (AdapterConfig, ConfigError, IA3Config, LoraConfig, PeftConfig, PrefixTuningConfig, PromptTuningConfig,
                PTuningConfig)
from .options import METHOD_OPTIONS, TrainOptions, check_method_options

ALL_LINEAR = "all-linear"
_REGEX_CHARS = re.compile(r"[*+?()\[\]{}|^$\\]")


def parse_targets(value: str | list[str] | None) -> str | list[str] | None:
    """``--targets``: ``all-linear``; a regex (any of ``* + ? ( ) [ ] { } | ^ $ \\``), matched
    against the full module name; or a comma list of names (``query,value``; dotted suffixes
    such as ``attention.self.query`` are names, not regexes)."""
    if value is None or isinstance(value, list):
        return value
    value = value.strip()
    if value == ALL_LINEAR:
        return value
    if _REGEX_CHARS.search(value):
        try:
            re.compile(value)
        except re.error as exc:
            raise ConfigError(f"--targets {value!r}: invalid regular expression: {exc}") from None
        return value
    names = [part.strip() for part in value.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"--targets {value!r}: expected module names, a regex or 'all-linear'")
    return names


def _lora(options: TrainOptions, use_dora: bool = False) -> PeftConfig:
    return LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                      target_modules=parse_targets(options.targets), use_dora=use_dora)


def _dora(options: TrainOptions) -> PeftConfig:
    return _lora(options, use_dora=True)


def _ia3(options: TrainOptions) -> PeftConfig:
    # With --targets, every target is scaled at its output (no feed-forward module).
    return IA3Config(target_modules=parse_targets(options.targets))


def _adapter(options: TrainOptions) -> PeftConfig:
    # Inserted at the attention and feed-forward outputs the architecture names (no --targets).
    return AdapterConfig(variant="houlsby", dropout=options.dropout)


def _input_method(make: Callable[[int], PeftConfig]) -> Callable[[TrainOptions], PeftConfig]:
    def build(options: TrainOptions) -> PeftConfig:
        return make(options.virtual_tokens)  # they adapt the inputs, not modules (no --targets)
    return build


# Each builder reads only its method's options of options.METHOD_OPTIONS (the check that no
# other was given lives there).
BUILDERS: dict[str, Callable[[TrainOptions], PeftConfig]] = {
    "lora": _lora, "qlora": _lora, "dora": _dora, "ia3": _ia3, "adapter": _adapter,
    "prompt": _input_method(lambda n: PromptTuningConfig(num_virtual_tokens=n)),
    "ptuning": _input_method(lambda n: PTuningConfig(num_virtual_tokens=n, encoder_hidden_size=128)),
    "prefix": _input_method(lambda n: PrefixTuningConfig(num_virtual_tokens=n)),
}
assert set(BUILDERS) == set(METHOD_OPTIONS)


def build_config(options: TrainOptions, task_type: str | None = None,
                 modules_to_save: list[str] | None = None) -> PeftConfig:
    """The method's config for the run; ``task_type`` and ``modules_to_save`` come from the task."""
    if options.method not in BUILDERS:
        raise ConfigError(f"--method: expected one of {', '.join(BUILDERS)}, found {options.method!r}")
    if options.targets is not None:  # the one option whose default (None) tells "not given"
        check_method_options(options.method, {"targets": ""})
    config = BUILDERS[options.method](options)
    if task_type is not None:
        config.task_type = task_type
    if modules_to_save:
        if not hasattr(config, "modules_to_save"):
            raise ConfigError(f"--method {options.method} cannot train the model's new head "
                              f"({', '.join(modules_to_save)}) for this task; use lora, dora, ia3 or adapter")
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + modules_to_save))
    return config


def describe(config: Any) -> str:
    """A one-line summary of a config's main settings, e.g. ``r=8 alpha=16 dropout=0.05``."""
    parts = []
    for field, label in (("r", "r"), ("lora_alpha", "alpha"), ("lora_dropout", "dropout"),
                         ("num_virtual_tokens", "virtual_tokens")):
        if hasattr(config, field):
            parts.append(f"{label}={getattr(config, field):g}")
    return " ".join(parts)
