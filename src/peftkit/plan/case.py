"""What ``peftkit plan`` is asked (``Case``), the model built from its config, and the trainer's steps
that the prediction runs on fake tensors and the measurement on real ones (``train_steps``)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, ModelError

FULL = "full"
VALIDATED_CPU = ("lora", "qlora", "prompt", FULL)  # methods benchmarks/plan_validate.py measured on the CPU
TASKS = ("classify", "causal-lm")
HEADROOM = 0.10  # --budget: a configuration fits when its peak is at most 90 % of the budget
RANKS = (4, 8, 16, 32, 64)

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, flag: str = "--budget") -> int:
    """``24GB``, ``24GiB``, ``800MB``, ``1.5 GiB`` or plain bytes -> bytes (GB = 10⁹, GiB = 2³⁰)."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{flag} {text!r}: expected a size such as 24GB, 24GiB, 800MB or a number of bytes")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ConfigError(f"{flag} {text!r}: expected a positive size")
    return int(value)


def human(n: float) -> str:
    """Bytes in binary units: ``1.23 GiB``, ``456.7 MiB``."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclass
class Case:
    """What ``peftkit plan`` is asked about: the trainer's options that change memory."""

    model: str = "minilm"
    method: str = "lora"
    r: int | None = None  # None: the method's default (the trainer's)
    virtual_tokens: int | None = None
    batch_size: int = 16
    max_length: int = 64
    quantize: str | None = None
    gradient_checkpointing: bool = False
    bf16: bool = False
    device: str = "cpu"
    task: str | None = None  # None: from the model (a decoder: causal-lm, else classify)
    num_labels: int = 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# -- the model's config -------------------------------------------------------------------


def load_config(model: str):
    """The transformers config of ``model``: ``minilm``, a model directory, or a ``config.json``-style file."""
    from transformers import AutoConfig

    from ..train.models import BUILTIN, check_model_dir, first_line

    if os.path.isfile(model):
        try:
            with open(model, encoding="utf-8") as f:
                values = json.load(f)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"{model}: cannot read a model config (JSON): {first_line(exc)}") from None
        if not isinstance(values, dict) or not isinstance(values.get("model_type"), str):
            raise ModelError(f"{model}: expected a JSON object with a 'model_type' (a transformers config.json)")
        if values.get("auto_map"):
            raise ModelError(f"{model}: auto_map asks to run the model's own code; peftkit does not run it")
        from transformers import CONFIG_MAPPING

        kind = values.pop("model_type")
        if kind not in CONFIG_MAPPING:
            raise ModelError(f"{model}: model_type {kind!r} is not one transformers implements")
        return AutoConfig.for_model(kind, **values)
    if model in BUILTIN and not os.path.isdir(model):
        path = BUILTIN[model]()
    elif os.path.isdir(model):
        check_model_dir(model)
        path = model
    else:
        raise ConfigError(f"--model {model!r}: not a file or directory; pass 'minilm', a model directory or a "
                          f"config.json file")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot read the model config: {first_line(exc)}") from None


def infer_task(config) -> str:
    """A decoder (a causal-LM class and no masked-LM one: GPT-2, Llama, ...) trains ``causal-lm``;
    an encoder (BERT, MiniLM) ``classify``."""
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = config.model_type
    if getattr(config, "is_decoder", False) or (kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                                                and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES):
        return "causal-lm"
    return "classify"


def build_model(config, task: str, num_labels: int) -> nn.Module:
    """The task's model (what the trainer loads) from ``config`` in float32, on the current device/mode."""
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if task == "classify":
        config.num_labels = num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = getattr(config, "eos_token_id", None) or 0
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        model = auto.from_config(config, dtype=torch.float32)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"{config.model_type}: cannot build a model for --task {task}: {exc}") from None
    return model


def fake_batch(task: str, batch: int, length: int, vocab: int, mask: bool = True) -> dict[str, torch.Tensor]:
    """A batch of the given shape (every example ``length`` tokens: the worst case the trainer pads to).

    ``mask=False``: no attention mask (for meta tensors: transformers reads a mask's values, and
    drops one of all ones, so that the computation is the same)."""
    ids = torch.randint(0, vocab, (batch, length))
    out = {"input_ids": ids}
    if mask:
        out["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
    out["labels"] = ids.clone() if task == "causal-lm" else torch.randint(0, 2, (batch,))
    return out


# -- the options, checked as the trainer checks them ----------------------------------------


def train_options(case: Case):
    """The trainer's ``TrainOptions`` for ``case`` (method defaults, the method's own option checks)."""
    from ..train.options import build_options

    given: dict[str, Any] = {"method": case.method, "batch_size": case.batch_size, "max_length": case.max_length,
                             "gradient_checkpointing": case.gradient_checkpointing, "bf16": case.bf16,
                             "quantize": case.quantize, "r": case.r, "virtual_tokens": case.virtual_tokens,
                             "device": case.device}
    options = build_options({}, given)
    if case.method != FULL:
        from ..train.options import CLI_METHODS

        method = CLI_METHODS[case.method][0]
        if case.gradient_checkpointing and not method.gradient_checkpointing:
            raise ConfigError(f"--gradient-checkpointing recomputes the layers without their key/value cache, "
                              f"which --method {case.method} needs; drop one of them")
    if case.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device: expected cpu or cuda, found {case.device!r}")
    if case.task is not None and case.task not in TASKS:
        raise ConfigError(f"--task: expected one of {', '.join(TASKS)}, found {case.task!r}")
    if case.num_labels < 2:
        raise ConfigError(f"--num-labels: expected at least 2, found {case.num_labels}")
    return options


def peft_config(options, task: str):
    """The adapter config the trainer builds for this task (None for full fine-tuning)."""
    from ..train.methods import build_config

    if options.method == FULL:
        return None
    task_type = "SEQ_CLS" if task == "classify" else "CAUSAL_LM"
    return build_config(options, task_type, None)


def prepare(model: nn.Module, options, config) -> None:
    """The method on ``model`` as the trainer puts it (apply, or every parameter trainable)."""
    import peftkit

    if config is None:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        peftkit.apply(model, config)


@contextlib.contextmanager
def _moves_in_place():
    """``Module.to(device=d)`` is a no-op for a module already on ``d``: torch swaps every fake
    parameter for a copy on ``.to`` (also to its own device), which fails for a parameter with
    references (the prompt methods move their new module to the embedding's device). Only in
    ``predict``'s own process."""
    original = nn.Module.to

    def to(self, *args, **kwargs):
        device = kwargs.get("device") if not args and set(kwargs) == {"device"} else None
        if device is not None and all(t.device == torch.device(device)
                                      for t in [*self.parameters(), *self.buffers()]):
            return self
        return original(self, *args, **kwargs)

    nn.Module.to = to
    try:
        yield
    finally:
        nn.Module.to = original


def enable_checkpointing(model: nn.Module) -> None:
    from ..train.engine import enable_gradient_checkpointing

    enable_gradient_checkpointing(model)


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """The trainer's summed loss (``Task.loss_sum``) with the item count known from the shape."""
    labels = batch["labels"]
    count = labels.shape[0] * (labels.shape[1] - 1) if task == "causal-lm" else labels.shape[0]
    return model(**batch).loss.float() * count


def train_steps(model: nn.Module, batch: dict[str, torch.Tensor], task: str, options, steps: int = 2,
                device_type: str = "cpu", on_step=None, on_optimizer=None,
                keep: list | None = None) -> torch.optim.Optimizer:
    """The trainer's steps (``Engine._step`` with one micro-batch): AdamW as ``make_optimizer`` builds it."""
    from ..train.loop import make_optimizer

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ModelError("the model has no trainable parameters")
    optimizer = make_optimizer(named, options.lr, options.weight_decay)
    if on_optimizer is not None:
        on_optimizer(optimizer)
    params = [p for _, p in named]
    model.train()
    for _ in range(steps):
        cast = torch.autocast(device_type, dtype=torch.bfloat16) if options.bf16 else contextlib.nullcontext()
        with cast:
            loss = loss_sum(model, batch, task)
        loss.backward()
        if keep is not None:  # a fake loss freed while its fake mode is active can crash the process later
            keep.append(loss)
        del loss
        if options.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, options.max_grad_norm)
        optimizer.step()
        if on_step is not None:
            on_step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer
