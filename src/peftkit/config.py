"""Configuration dataclasses and their JSON round trip.

Field names follow Hugging Face PEFT's ``adapter_config.json`` so that files map one to one.
HF PEFT writes some 40 fields; peftkit reads them all: a field it does not implement is
accepted when it holds HF's default (or an empty value) and refused with a clear
``ConfigError`` otherwise, so a file never loads into something that computes differently.
A field no version of peftkit knows (one from a newer HF PEFT) is a warning naming the file
and the field when its value is empty (null, false, ``{}``, ``[]``, ``""``), an error otherwise.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError, PeftkitWarning

TASK_TYPES = (
    "SEQ_CLS",
    "SEQ_2_SEQ_LM",
    "CAUSAL_LM",
    "TOKEN_CLS",
    "QUESTION_ANS",
    "FEATURE_EXTRACTION",
)

CONFIG_NAME = "adapter_config.json"

# Fields every HF PEFT config file may carry whose value does not change what is computed.
_IGNORED_FIELDS = {"peft_version", "auto_mapping"}


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == {} or value == [] or value == ""


def _same_as_default(value: Any, default: Any) -> bool:
    return value == default or (_is_empty(value) and _is_empty(default))


@dataclass
class PeftConfig:
    """Fields shared by every method's config."""

    peft_type: ClassVar[str] = ""
    # Fields HF PEFT has for this method that peftkit does not implement: name -> the value
    # that means "feature off". Any other value is refused when reading a file.
    unsupported_defaults: ClassVar[dict[str, Any]] = {}
    # Fields HF PEFT has that only tune its own runtime; read and ignored whatever their value.
    ignored_fields: ClassVar[frozenset[str]] = frozenset()

    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``ConfigError`` naming the field, the expected and the found value."""
        if self.task_type is not None and self.task_type not in TASK_TYPES:
            raise ConfigError(
                f"task_type: expected one of {', '.join(TASK_TYPES)} or None, found {self.task_type!r}"
            )
        if isinstance(self.base_model_name_or_path, os.PathLike):
            self.base_model_name_or_path = os.fspath(self.base_model_name_or_path)  # a str in the file
        for name in ("base_model_name_or_path", "revision"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name}: expected a string or None, found {getattr(self, name)!r}")
        check_bool("inference_mode", self.inference_mode)

    # -- JSON round trip --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {"peft_type": self.peft_type}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, tuple)):
                value = sorted(value) if isinstance(value, set) else list(value)
            data[f.name] = value
        for name, default in self.unsupported_defaults.items():
            data.setdefault(name, default)
        return data

    def file_dict(self, adapted: list[str]) -> dict[str, Any]:
        """``to_dict`` as written to a file: module selectors become the exact names adapted,
        so any reader (HF PEFT included) adapts the same modules, whatever its rules."""
        data = self.to_dict()
        if adapted and "target_modules" in data:
            data["target_modules"] = sorted(adapted)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "PeftConfig":
        """Build a config from a dict (HF PEFT's or peftkit's); ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, found {type(data).__name__}")
        own = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "peft_type":
                if str(value).upper() != cls.peft_type:
                    raise ConfigError(f"{source}: peft_type: expected {cls.peft_type!r}, found {value!r}")
            elif key in own:
                kwargs[key] = value
            elif key in _IGNORED_FIELDS or key in cls.ignored_fields:
                continue
            elif key in cls.unsupported_defaults:
                if not _same_as_default(value, cls.unsupported_defaults[key]):
                    raise ConfigError(
                        f"{source}: field {key!r} = {value!r} is not supported by peftkit "
                        f"(only the default {cls.unsupported_defaults[key]!r} is)"
                    )
            elif not _is_empty(value):
                raise ConfigError(f"{source}: unknown field {key!r} = {value!r} for {cls.peft_type}")
            else:  # e.g. a newer HF PEFT's feature, written at its "off" value
                warnings.warn(f"{source}: unknown field {key!r} = {value!r} for {cls.peft_type} ignored "
                              "(it is empty)", PeftkitWarning, stacklevel=2)
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:  # wrong argument shapes from a hand-written dict
            raise ConfigError(f"{source}: {exc}") from None


@dataclass
class TargetedConfig(PeftConfig):
    """The target-selection fields every weight-side method shares, validated once here:
    ``target_modules`` / ``exclude_modules`` (names, dotted suffixes, a regex, or
    ``"all-linear"``), ``layers_to_transform`` / ``layers_pattern`` (which layers), and
    ``modules_to_save`` (modules trained and saved in full, e.g. a new head). How they match is
    ``targeting``'s job."""

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def validate(self) -> None:
        super().validate()
        check_names("target_modules", self.target_modules)
        check_names("exclude_modules", self.exclude_modules)
        check_layers_pattern(self.layers_pattern)
        check_names("modules_to_save", self.modules_to_save, allow_str=False)
        self.target_modules = normalize_names(self.target_modules)
        self.exclude_modules = normalize_names(self.exclude_modules)
        self.layers_pattern = normalize_names(self.layers_pattern)
        if self.modules_to_save is not None:
            self.modules_to_save = list(dict.fromkeys(self.modules_to_save))
        self.layers_to_transform = check_layer_indices("layers_to_transform", self.layers_to_transform)


def _check_type(name: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name}: expected {expected}, found {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    _check_type(name, value, (int,), "a positive integer")
    if value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, found {value!r}")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, found {value!r}")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    _check_type(name, value, (int, float), "a number")
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, found {value!r}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ConfigError(f"{name}: expected a number in [{low}, {high}), found {value!r}")


def check_regex(name: str, value: str, template: str = "{}") -> None:
    """``value`` (put into ``template``, as the matcher uses it) must compile as a regex."""
    try:
        re.compile(template.format(value))
    except (re.error, RecursionError, OverflowError) as exc:
        raise ConfigError(f"{name}: expected a valid regular expression, found {value!r} ({exc})") from None


def check_layer_indices(name: str, value: Any) -> Any:
    """None, a layer index or a list of them (an index becomes a one-element list)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if value is not None and not (
        isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)
    ):
        raise ConfigError(f"{name}: expected a layer index or a list of them, found {value!r}")
    return value


def check_names(name: str, value: Any, allow_str: bool = True) -> None:
    """A module selector: None, a regex string (when allowed), or a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        if not allow_str:
            raise ConfigError(f"{name}: expected a list of module names, found {value!r}")
        check_regex(name, value)
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of module names or a regex string, found {value!r}")


LAYERS_PATTERN_TEMPLATE = r"(?:^|.*?\.){}\.(\d+)\."  # how targeting.layer_index uses a layers_pattern
PATTERN_KEY_TEMPLATE = r"(.*\.)?(?:{})"  # how targeting.pattern_value uses a rank/alpha_pattern key


def check_layers_pattern(value: Any) -> None:
    """None, or a layer-list name (a regex) or a list of them."""
    check_names("layers_pattern", value)
    for pattern in [value] if isinstance(value, str) else (value or []):
        check_regex("layers_pattern", pattern, LAYERS_PATTERN_TEMPLATE)


def check_pattern(name: str, value: Any, check: Any) -> dict[str, Any]:
    """A ``rank_pattern`` / ``alpha_pattern``: None or a mapping of module pattern (a regex,
    matched as ``targeting.pattern_value`` does) to a value ``check(label, value)`` accepts;
    returns it as a plain dict ({} for None)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name}: expected a mapping of module pattern -> value, found {value!r}")
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{name}: expected module patterns (strings) as keys, found {key!r}")
        check_regex(f"{name}[{key!r}]", key, PATTERN_KEY_TEMPLATE)
        check(f"{name}[{key!r}]", item)
    return dict(value)


def normalize_names(value: Any) -> Any:
    """Lists/sets of names become sorted lists (stable files); strings stay regexes."""
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))
