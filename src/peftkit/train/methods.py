"""From ``--method`` and its flags to a peftkit config (through the method's registry entry)."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from .. import ConfigError, PeftConfig
from .options import CLI_METHODS, TrainOptions, check_method_options, is_full

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


def build_config(options: TrainOptions, task_type: str | None = None,
                 modules_to_save: list[str] | None = None) -> PeftConfig:
    """The method's config for the run (its registry entry's ``make_config`` with the method's
    options); ``task_type`` and ``modules_to_save`` come from the task. ``--method full`` has
    none: it applies no adapter (``train/full.py``)."""
    if is_full(options.method):
        raise ConfigError("--method full trains the model itself: there is no adapter config to build")
    if options.method not in CLI_METHODS:
        raise ConfigError(f"--method: expected one of {', '.join(CLI_METHODS)}, found {options.method!r}")
    if options.targets is not None:  # the one option whose default (None) tells "not given"
        check_method_options(options.method, {"targets": ""})
    _, entry = CLI_METHODS[options.method]
    values = {name: getattr(options, name) for name in entry.options}
    if "targets" in values:
        values["targets"] = parse_targets(values["targets"])
    config = entry.make_config(values)
    if task_type is not None:
        config.task_type = task_type
    if modules_to_save:
        if not hasattr(config, "modules_to_save"):
            able = [name for name, (method, _) in CLI_METHODS.items()
                    if "modules_to_save" in {f.name for f in dataclasses.fields(method.config_cls)}]
            raise ConfigError(f"--method {options.method} cannot train the model's new head "
                              f"({', '.join(modules_to_save)}) for this task; use {', '.join(able)}")
        config.modules_to_save = list(dict.fromkeys((config.modules_to_save or []) + modules_to_save))
    return config


# A config's main numeric settings and how the console and ``peftkit info`` name them.
SETTINGS = (("r", "r"), ("lora_alpha", "alpha"), ("alpha", "alpha"), ("lora_dropout", "dropout"),
            ("rank_dropout", "rank_dropout"), ("module_dropout", "module_dropout"),
            ("num_virtual_tokens", "virtual_tokens"))


def settings(values: dict[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) of the ``SETTINGS`` a config's field values hold."""
    return [(label, values[field]) for field, label in SETTINGS
            if isinstance(values.get(field), (int, float)) and not isinstance(values.get(field), bool)]


def describe(config: Any) -> str:
    """A one-line summary of a config's main settings, e.g. ``r=8 alpha=16 dropout=0.05``."""
    return " ".join(f"{label}={value:g}" for label, value in settings(vars(config)))
