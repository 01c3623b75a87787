"""Full fine-tuning (``peftkit train --method full``): no adapter; every parameter of the task's
model trains.

It is here as the reference the adapter methods are measured against (``peftkit compare``
trains it beside them; ``peftkit plan`` predicts its memory), so it runs through the same engine
as they do: the same loop, data, evaluation, schedule, checkpoints, DDP/FSDP, progress and
``summary.json``. Only what has to differ lives in this module:

- the model: nothing is applied to it; every parameter is made trainable (``prepare``), the
  encoder and its new head for classify, the whole decoder for causal-lm;
- the output: ``OUT/model/`` instead of ``OUT/adapter/``, a transformers ``save_pretrained``
  directory (``config.json``, ``model.safetensors``; the tokenizer, or the image processor;
  ``labels.json`` and ``train_args.json`` as an adapter run keeps them beside its adapter),
  built in a hidden temporary sibling and put in place whole (``checkpoint.write_dir``, i.e.
  ``peftkit.atomic.write_dir``), so it loads with ``AutoModelFor….from_pretrained``;
- a checkpoint: ``trainer_state.pt`` already holds every parameter (they are all trainable) and
  the optimizer, so no second copy of the weights is written beside it (an adapter run's
  checkpoint has a small usable ``adapter/``; a model's would double the checkpoint);
- divergence: a non-finite parameter is looked for in each process's own part of the model
  (its FSDP shard), and the answer is shared, so every process stops together.

``peftkit eval`` (and ``generate``) load ``OUT/model`` itself (``adapted.resolve``); ``peftkit
merge`` refuses it: it is a whole model already.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .. import atomic
from . import distributed, rundir
from .distributed import World
from .report import write_json
from .task import Task, TaskData

PROCESSOR_FILE = "preprocessor_config.json"  # an image classifier's preprocessing (image-classify)


def prepare(model: nn.Module) -> None:
    """Every parameter trains (transformers loads them trainable; this makes sure of it)."""
    for p in model.parameters():
        p.requires_grad_(True)


def console_line(trainable: int, total: int, percent: float) -> str:
    """``full: every parameter trains; trainable params 22,713,986 of 22,713,986 (100.00%)``."""
    return f"full: every parameter trains; trainable params {trainable:,} of {total:,} ({percent:.2f}%)"


def first_nonfinite(model: nn.Module, world: World) -> str | None:
    """The name of a floating-point parameter or buffer that holds an inf or NaN, or None; the
    same answer on every process (each looks at its own shard: a collective)."""
    bad = None
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        local = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: this process's part
        if local.is_floating_point() and not bool(local.detach().isfinite().all()):
            bad = name
            break
    return next((b for b in distributed.gather_objects(world, bad) if b is not None), None)


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict whole and on the CPU (FSDP shards gathered: a collective, on
    every process; tied weights stay one tensor)."""
    # tied weights are one Parameter under two names: gathered once (the same choice on every
    # process, so every process makes the same collectives)
    owner = {name: id(t) for name, t in (*model.named_parameters(remove_duplicate=False),
                                         *model.named_buffers(remove_duplicate=False))}
    gathered: dict[Any, torch.Tensor] = {}
    out = {}
    for name, t in model.state_dict().items():
        key = owner.get(name, name)
        if key not in gathered:
            gathered[key] = distributed.full_tensor(t.detach()).cpu()
        out[name] = gathered[key]
    return out


def fill_model_dir(directory: Path, model: nn.Module, tensors: dict[str, torch.Tensor], task: Task,
                   data: TaskData, model_path: str, train_args: dict[str, Any]) -> None:
    """Write the files of ``OUT/model`` (or ``best/``) into the existing ``directory`` (rank 0):
    the model (``save_pretrained`` with ``tensors``), its tokenizer or image processor, the
    task's files (``labels.json``) and ``train_args.json``."""
    model.save_pretrained(directory, state_dict=dict(tensors))  # (it empties the dict it is given)
    for path in rundir.model_weight_files(directory):
        path.chmod(atomic.new_file_mode())  # safetensors writes 0600; others may need to read the model
    tokenizer = getattr(task, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    processor = Path(model_path) / PROCESSOR_FILE
    if processor.is_file() and not (directory / PROCESSOR_FILE).exists():
        shutil.copyfile(processor, directory / PROCESSOR_FILE)
    task.save_files(directory, data)
    write_json(directory / rundir.ARGS_FILE, train_args)


def stale_outputs(out: Path, full: bool, model_path: str) -> list[Path]:
    """What an earlier run of the other kind left in ``out`` and a fresh run must remove, or
    ``eval``/``info`` would find it first: ``adapter/`` before a full run, ``model/`` (a full
    run's: it holds ``train_args.json``) before an adapter run. Never the run's own base model."""
    import os

    path = out / (rundir.ADAPTER_DIR if full else rundir.MODEL_DIR)
    ours = (path / rundir.CONFIG_FILE).is_file() if full else rundir.is_full_model_dir(path)
    if not ours or path.is_symlink():
        return []
    real, base = Path(os.path.realpath(path)), Path(os.path.realpath(model_path))
    if real == base or real in base.parents:
        return []
    return [path]
