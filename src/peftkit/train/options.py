"""The settings of a training run: defaults, a YAML file, command-line flags, in that order.

A field's name is its long flag's name with ``-`` written ``_`` (``--batch-size`` ->
``batch_size``); a YAML file may spell keys either way. Values from YAML are checked and
converted here (``lr: 1e-3`` is a string to YAML 1.1, and is accepted as a number). An unknown
key is refused with the near names (``learning_rate``: did you mean ``lr``?); a method-specific
option given to a method that does not take it (``METHOD_OPTIONS``) is refused too.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from typing import Any, Mapping

from .. import ConfigError, registry

# Everything per method comes from its registry entry (``peftkit.registry.CliMethod``): the
# ``--method`` names, the trainer's per-method defaults (used where neither the file nor a flag
# sets the field) and the method-specific options each method takes. An option of
# ``METHOD_SPECIFIC`` given (as a flag or a YAML key, even at its default value) to a method that
# does not take it is an error (``check_method_options``); every other option applies to every
# method.
#
# ``--method full`` is no adapter and has no registry entry (``train/full.py``): it is one of
# ``METHODS`` but not of ``CLI_METHODS`` (the adapter methods), takes none of the method-specific
# options, and has its own learning rate, ``FULL_LR`` (every weight moves, not a small new
# module: the rate of BERT-style fine-tuning).
CLI_METHODS = registry.cli_methods()
FULL = "full"
FULL_LR = 2e-5
FULL_HELP = "full fine-tuning, no adapter: every parameter of the model trains (writes OUT/model, a whole model)"
METHODS = (*CLI_METHODS, FULL)
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    **{name: dict(entry.defaults) for name, (_, entry) in CLI_METHODS.items() if entry.defaults},
    FULL: {"lr": FULL_LR}}
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {**{name: entry.options for name, (_, entry) in CLI_METHODS.items()},
                                              FULL: ()}
METHOD_SPECIFIC = registry.CLI_OPTIONS
QUANT_TYPES = ("nf4", "fp4")
DEVICES = ("cpu", "cuda")
TASKS = ("classify", "causal-lm", "image-classify")
SCHEDULERS = ("linear", "cosine", "constant")


def is_full(method: str | None) -> bool:
    """``--method full``: no adapter, the whole model trains."""
    return method == FULL


def base_quant_type(method: str | None, quantize: str | None) -> str | None:
    """The 4-bit format of the base, if any: ``--quantize``, or the method's own (qlora: nf4)."""
    entry = CLI_METHODS.get(method) if method else None
    return quantize or (entry[1].quantize if entry else None)


@dataclass
class TrainOptions:
    model: str = "minilm"
    data: str | None = None  # None: the bundled demo set
    eval_data: str | None = None
    method: str = "lora"
    r: int = 8
    virtual_tokens: int = 20  # prompt, ptuning, prefix
    alpha: float = 16.0
    dropout: float = 0.05
    targets: str | list[str] | None = None  # None: the method's default for the model type
    init: str | None = None  # lora/dora/qlora: how A and B start (--init; None: LoRA's default)
    epochs: int = 3
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 2e-3
    loraplus_lr_ratio: float | None = None  # lora/dora/qlora: LoRA+, B at this times --lr (None: off)
    lora_fa: bool = False  # lora/dora/qlora: LoRA-FA, A frozen at init, B's gradient projected
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_length: int = 64
    seed: int = 0
    out: str | None = None  # None: runs/<method>-<YYYYmmdd>-<HHMMSS>
    device: str | None = None  # None: cuda when available, else cpu
    quantize: str | None = None  # nf4/fp4: a 4-bit base (qlora implies nf4)
    quiet: bool = False
    task: str | None = None  # None: inferred from the data (tasks.infer_task)
    packing: bool = False  # causal-lm: pack short examples into full sequences
    gradient_checkpointing: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step
    bf16: bool = False  # bfloat16 autocast
    scheduler: str = "linear"
    max_grad_norm: float = 1.0  # 0: no clipping
    eval_steps: int | None = None  # None: evaluate after every epoch
    save_steps: int | None = None  # None: no checkpoints
    save_limit: int | None = None  # keep only the N most recent checkpoints (None: all)
    keep_best: bool = False  # adapter/ holds the best evaluated adapter instead of the last
    early_stopping: int | None = None  # stop after this many evaluations without improvement
    nproc: int = 1  # processes (torchrun) when launched by peftkit train
    fsdp: bool = False  # shard the model with FSDP (under torchrun)
    tensorboard: bool = False  # also log to OUT/tensorboard

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, sources: dict[str, str] | None = None) -> None:
        """Check every value; ``sources`` maps a field to the file its value came from."""
        def fail(name: str, expected: str, value: Any) -> None:
            source = (sources or {}).get(name)
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}--{name.replace('_', '-')}: expected {expected}, found {value!r}")

        for name in ("r", "virtual_tokens", "epochs", "batch_size", "max_length", "grad_accum", "nproc"):
            if getattr(self, name) < 1:
                fail(name, "a positive integer", getattr(self, name))
        for name in ("max_steps", "eval_steps", "save_steps", "save_limit", "early_stopping"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, "a positive integer", getattr(self, name))
        if self.max_grad_norm < 0:
            fail("max_grad_norm", "a non-negative number (0: no clipping)", self.max_grad_norm)
        if self.task is not None and self.task not in TASKS:
            fail("task", f"one of {', '.join(TASKS)}", self.task)
        if self.scheduler not in SCHEDULERS:
            fail("scheduler", f"one of {', '.join(SCHEDULERS)}", self.scheduler)
        if self.seed < 0:
            fail("seed", "a non-negative integer", self.seed)
        if not self.lr > 0:
            fail("lr", "a positive number", self.lr)
        if self.loraplus_lr_ratio is not None and not self.loraplus_lr_ratio > 0:
            fail("loraplus_lr_ratio", "a positive number (B's learning rate over A's)", self.loraplus_lr_ratio)
        if not self.alpha > 0:
            fail("alpha", "a positive number", self.alpha)
        for name in ("dropout", "warmup_ratio"):
            if not 0 <= getattr(self, name) < 1:
                fail(name, "a number in [0, 1)", getattr(self, name))
        if self.weight_decay < 0:
            fail("weight_decay", "a non-negative number", self.weight_decay)
        if self.method not in METHODS:
            fail("method", f"one of {', '.join(METHODS)}", self.method)
        if self.quantize is not None and self.quantize not in QUANT_TYPES:
            fail("quantize", f"one of {', '.join(QUANT_TYPES)}", self.quantize)
        if self.quantize is not None and is_full(self.method):
            source = (sources or {}).get("quantize") or (sources or {}).get("method")
            raise ConfigError(f"{source + ': ' if source else ''}--quantize {self.quantize} with --method full: "
                              "4-bit weights cannot be trained, and full fine-tuning trains every weight; drop "
                              "--quantize (or train an adapter over the 4-bit base: --method qlora)")
        if self.device is not None and self.device not in DEVICES:
            fail("device", f"one of {', '.join(DEVICES)}", self.device)

    @property
    def quant_type(self) -> str | None:
        return base_quant_type(self.method, self.quantize)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainOptions)}
_INT_FIELDS = {"r", "virtual_tokens", "epochs", "max_steps", "batch_size", "max_length", "seed", "grad_accum",
               "eval_steps", "save_steps", "save_limit", "early_stopping", "nproc"}
_FLOAT_FIELDS = {"alpha", "dropout", "lr", "warmup_ratio", "weight_decay", "max_grad_norm", "loraplus_lr_ratio"}
_STR_FIELDS = {"model", "data", "eval_data", "method", "out", "device", "quantize", "task", "scheduler", "init"}
_BOOL_FIELDS = {f.name for f in dataclasses.fields(TrainOptions) if f.type in ("bool", bool)}


def key_to_field(key: str) -> str | None:
    name = str(key).strip().replace("-", "_")
    return name if name in FIELDS else None


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Field values from a YAML file (a mapping of long flag names); checked and converted."""
    import yaml

    name = os.fspath(path)
    if not os.path.isfile(name):
        raise ConfigError(f"{name}: config file not found")
    try:
        with open(name, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{name}{where}: invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: cannot read: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: expected a mapping of option names to values, found {type(data).__name__}")
    values: dict[str, Any] = {}
    for key, value in data.items():
        field = key_to_field(key)
        if field is None:
            raise ConfigError(f"{name}: unknown key {key!r}; {_near_keys(str(key))}")
        if field in values:
            raise ConfigError(f"{name}: key {key!r} is given twice (as '-' and '_' spellings)")
        values[field] = _convert(name, key, field, value)
    return values


# Names other trainers (transformers' TrainingArguments, HF PEFT's configs) give some options.
ALIASES = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type": "scheduler", "output_dir": "out",
    "model_name_or_path": "model", "base_model": "model", "train_file": "data", "dataset": "data",
    "validation_file": "eval_data", "eval_file": "eval_data", "max_seq_length": "max_length",
    "lora_r": "r", "rank": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "init_lora_weights": "init", "num_virtual_tokens": "virtual_tokens", "peft_type": "method",
    "save_total_limit": "save_limit", "early_stopping_patience": "early_stopping", "max_norm": "max_grad_norm",
    "load_in_4bit": "quantize", "bnb_4bit_quant_type": "quantize", "fp16": "bf16",
}


def _near_keys(key: str) -> str:
    """``did you mean 'lr'?`` for a misspelt or foreign key (written in the key's own spelling,
    ``-`` or ``_``); the list of every key when no name is near."""
    name = key.strip().lower().replace("-", "_")
    near = ([ALIASES[name]] if name in ALIASES else []) + difflib.get_close_matches(name, list(FIELDS), n=3, cutoff=0.6)
    near = list(dict.fromkeys(near))
    dash = "-" in key and "_" not in key
    spell = (lambda n: n.replace("_", "-")) if dash else (lambda n: n)
    if near:
        return "did you mean " + " or ".join(repr(spell(n)) for n in near) + "?"
    return f"no option has a similar name (known keys: {', '.join(n.replace('_', '-') for n in FIELDS)})"


def _convert(source: str, key: str, field: str, value: Any) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{source}: key {key!r}: expected {expected}, found {value!r}")

    if value is None:
        if FIELDS[field].default is None:
            return None
        raise bad("a value")
    if field in _INT_FIELDS:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad("an integer") from None
        raise bad("an integer")
    if field in _FLOAT_FIELDS:
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if field in _BOOL_FIELDS:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if field == "targets":
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
        raise bad("a comma-separated string, a regex, 'all-linear' or a list of module names")
    if field in _STR_FIELDS:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad("a string")
    raise bad("a value")  # pragma: no cover - every field is handled above


def build_options(file_values: dict[str, Any], cli_values: dict[str, Any], source: str = "",
                  saved: bool | None = None) -> TrainOptions:
    """Defaults, overridden by the file's values, overridden by flags given on the command line.

    What the user gave (the flags in ``cli_values`` that are not None, the file's keys) must
    apply to the method (``check_method_options``), except the values of a file that is a run's
    saved options (``saved``; None: a file that holds every option, as the ``options.json`` and
    ``launch.yaml`` peftkit writes from ``TrainOptions.to_dict`` do), which are the options
    already checked, defaults included.
    """
    flags = {k: v for k, v in cli_values.items() if v is not None}
    merged = {**file_values, **flags}
    options = TrainOptions.__new__(TrainOptions)
    method_defaults = METHOD_DEFAULTS.get(merged.get("method", FIELDS["method"].default), {})
    for name, f in FIELDS.items():
        setattr(options, name, merged.get(name, method_defaults.get(name, f.default)))
    from_file = {k: source for k in file_values if k not in flags} if source else {}
    options.validate(from_file)
    if saved is None:
        saved = set(FIELDS) <= set(file_values)
    given = {k: "" for k in flags}
    if not saved:
        given = {**{k: source or "the config file" for k in file_values}, **given}
    check_method_options(options.method, given, method_from=from_file.get("method", ""))
    return options


def check_method_options(method: str, given: Mapping[str, str], method_from: str = "") -> None:
    """``ConfigError`` when an option the user gave does not apply to ``method`` (``METHOD_OPTIONS``).

    ``given`` maps each option the user gave to where: ``""`` for the command line, else the
    file's name. Only what the user gave counts, never a default or a run's saved options.
    """
    takes = METHOD_OPTIONS.get(method, ())
    for name in METHOD_SPECIFIC:
        if name in given and name not in takes:
            flag = "--" + name.replace("_", "-")
            where = f"{given[name]}: key {name.replace('_', '-')!r} ({flag})" if given[name] else flag
            users = [m for m, names in METHOD_OPTIONS.items() if name in names]
            own = ", ".join("--" + n.replace("_", "-") for n in takes) or "none"
            chosen = f" (from {method_from})" if method_from else ""
            raise ConfigError(f"{where} does not apply to --method {method}{chosen} (an option of "
                              f"{', '.join(users)}; {method}'s own: {own}); drop it")
