"""Using a trained adapter: its base model rebuilt as in training, with the adapter loaded.

Every task's ``eval``, ``merge`` (and ``generate``) starts here; the task says how to build its
base model from the model directory and the adapter directory (labels, tokenizer, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import peftkit

from .. import ConfigError
from . import rundir
from .models import resolve_model
from .options import base_quant_type


@dataclass
class Adapted:
    model: torch.nn.Module  # the base with the adapter loaded, in eval mode
    args: dict[str, Any]  # train_args.json ({} for an adapter from elsewhere)
    adapter_dir: Path
    model_path: str  # the base model's directory


def load_adapted(adapter: str, model: str | None, device: torch.device,
                 build: Callable[[str, Path, dict[str, Any]], torch.nn.Module], quantized: bool = False) -> Adapted:
    """The base model (``model``, else the one the adapter was trained on) with the adapter loaded.

    ``build(model_path, adapter_dir, args)`` returns the task's base model in float32 on
    ``device``. A run trained over a 4-bit base (its options say so, or ``quantized``) gets the
    same 4-bit base back: the function the adapter was trained against.
    """
    adapter_dir = rundir.find_adapter_dir(adapter)
    peftkit.read_config(adapter_dir)  # a bad adapter is reported before the base is loaded
    args = rundir.read_train_args(adapter_dir)
    model_name = model or args.get("model")
    if not model_name:
        raise ConfigError(f"{adapter_dir}: no {rundir.ARGS_FILE} says which model it was trained on; pass --model")
    model_path = resolve_model(model_name)
    base = build(model_path, adapter_dir, args)
    run = args.get("options") if isinstance(args.get("options"), dict) else {}
    quant_type = base_quant_type(run.get("method"), run.get("quantize")) or ("nf4" if quantized else None)
    if quant_type:
        peftkit.quantize(base, quant_type=quant_type)
    peftkit.load(base, adapter_dir)
    base.eval()
    return Adapted(base, args, adapter_dir, model_path)


def eval_data_of(args: dict[str, Any], data: str | None, default: str | None = None) -> tuple[str, bool]:
    """What to evaluate on and whether to take its held-out part: ``data`` when given; else the
    run's ``--eval-data``; else the part of its ``--data`` held out with the run's seed and
    fraction; else ``default`` (the bundled demo's evaluation file)."""
    if data:
        return data, False
    if args.get("eval_data"):
        return str(args["eval_data"]), False
    if args.get("data"):
        return str(args["data"]), True
    if default is not None and args:
        return default, False
    raise ConfigError("the adapter has no train_args.json naming its evaluation data; pass --data")


def merged_model(adapted: Adapted, console: Any) -> torch.nn.Module:
    """The adapter folded into its base: a plain (dense) transformers model, merge error reported."""
    report = peftkit.merge(adapted.model)
    console.info(str(report))
    return peftkit.quant.dequantize(peftkit.unload(adapted.model, merge=True))


def prepare_out_dir(out: str) -> Path:
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir
