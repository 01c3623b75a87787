"""Configuration dataclasses and their JSON round trip.

Field names follow Hugging Face PEFT's ``adapter_config.json`` so that files map one to one.
HF PEFT writes some 40 fields; peftkit reads them all: a field it does not implement is
accepted when it holds HF's default (or an empty value) and refused with a clear
``ConfigError`` otherwise, so a file never loads into something that computes differently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import ConfigError

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
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        except TypeError as exc:  # wrong argument shapes from a hand-written dict
            raise ConfigError(f"{source}: {exc}") from None


def _check_type(name: str, value: Any, types: tuple[type, ...], expected: str) -> None:
    if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{name}: expected {expected}, found {value!r}")


def check_positive_int(name: str, value: Any) -> None:
    _check_type(name, value, (int,), "a positive integer")
    if value <= 0:
        raise ConfigError(f"{name}: expected a positive integer, found {value!r}")


def check_number(name: str, value: Any, low: float | None = None, high: float | None = None) -> None:
    _check_type(name, value, (int, float), "a number")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ConfigError(f"{name}: expected a number in [{low}, {high}), found {value!r}")


def check_names(name: str, value: Any, allow_str: bool = True) -> None:
    """A module selector: None, a regex string (when allowed), or a list of names."""
    if value is None:
        return
    if isinstance(value, str):
        if not allow_str:
            raise ConfigError(f"{name}: expected a list of module names, found {value!r}")
        return
    if not isinstance(value, (list, tuple, set)) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name}: expected a list of module names or a regex string, found {value!r}")


def normalize_names(value: Any) -> Any:
    """Lists/sets of names become sorted lists (stable files); strings stay regexes."""
    if value is None or isinstance(value, str):
        return value
    return sorted(set(value))
