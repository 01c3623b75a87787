"""Sequence classification: train an adapter, evaluate it, merge it into a plain model.

The recipe behind ``peftkit train`` / ``eval`` / ``merge``. It only uses peftkit's public API
(``apply``, ``save``, ``load``, ``unload``, ``trainable_summary``); other tasks (causal LM,
images) get a module of their own next to this one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import peftkit

from .. import ConfigError
from . import rundir
from .data import (DEMO_EVAL, DEMO_TRAIN, HOLDOUT_FRACTION, LabelMap, TextClassificationSet, make_loader,
                   read_examples, split_holdout)
from .loop import LoopSettings, evaluate, seed_everything, train
from .methods import build_config, describe
from .models import BUILTIN, load_sequence_classifier, load_tokenizer, max_positions, resolve_device, resolve_model
from .options import base_quant_type, TrainOptions
from .progress import Console
from .report import MetricsLog, plot_loss, write_json

TASK = "SEQ_CLS"


@dataclass
class Splits:
    train: TextClassificationSet
    eval: TextClassificationSet
    labels: LabelMap
    train_source: str
    eval_source: str


def _display(path: Path | str) -> str:
    """The bundled demo files by their short name, other files as given."""
    path = str(path)
    return f"demo:{Path(path).name}" if Path(path).parent == DEMO_TRAIN.parent else path


def load_splits(options: TrainOptions) -> Splits:
    """Read the training and evaluation data the options name.

    No ``--data``: the bundled demo set (its own train and eval files). ``--data`` without
    ``--eval-data``: ``HOLDOUT_FRACTION`` of each label's rows, chosen with ``--seed``, are held
    out (``split_holdout``).
    """
    train_path = options.data or str(DEMO_TRAIN)
    eval_path = options.eval_data or (None if options.data else str(DEMO_EVAL))
    train_ex = read_examples(train_path)
    train_name = _display(train_path)
    if eval_path is None:
        train_ex, eval_ex = split_holdout(train_ex, HOLDOUT_FRACTION, options.seed, train_path)
        eval_name = f"{train_name} (held-out {HOLDOUT_FRACTION:.0%})"
    else:
        eval_ex = read_examples(eval_path)
        eval_name = _display(eval_path)
    labels = LabelMap.from_examples(train_ex, train_path)
    return Splits(TextClassificationSet(train_ex, labels, train_path),
                  TextClassificationSet(eval_ex, labels, eval_path or train_path),
                  labels, train_name, eval_name)


def _prepare_model(model_name: str, labels: LabelMap, device: torch.device, max_length: int):
    path = resolve_model(model_name)
    tokenizer = load_tokenizer(path)
    model = load_sequence_classifier(path, labels.id2label, device)
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(f"--max-length {max_length}: the model has only {limit} positions")
    return path, model, tokenizer


def train_classifier(options: TrainOptions, console: Console) -> dict[str, Any]:
    """The whole ``peftkit train`` job; returns what it writes to ``summary.json``."""
    started = time.time()
    out = Path(options.out or rundir.default_out(options.method))
    console.essential(f"output: {out}")
    device = resolve_device(options.device)
    splits = load_splits(options)
    seed_everything(options.seed)  # before the model: the new head's weights and LoRA's A draw from it
    model_path, model, tokenizer = _prepare_model(options.model, splits.labels, device, options.max_length)
    if options.quant_type:
        peftkit.quantize(model, quant_type=options.quant_type)
    config = build_config(options)
    peftkit.apply(model, config)
    params = peftkit.trainable_summary(model)
    console.info(f"model: {options.model} ({model_path}) on {device}")
    console.info(f"data: {len(splits.train)} training examples from {splits.train_source}, "
                 f"{len(splits.eval)} evaluation examples from {splits.eval_source}")
    console.info(f"labels: {', '.join(splits.labels.names)}")
    console.info(f"{options.method}: {describe(config)}, targets {_targets_text(config, model)}; "
                 f"trainable params {params.trainable:,} of {params.total:,} ({params.percent:.2f}%)")

    train_loader = make_loader(splits.train, tokenizer, options.max_length, options.batch_size,
                               shuffle=True, seed=options.seed)
    eval_loader = make_loader(splits.eval, tokenizer, options.max_length, options.batch_size, shuffle=False)
    adapter_dir = out / rundir.ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    metrics = MetricsLog(out / "metrics.jsonl")

    def run_eval(desc: str) -> dict[str, Any]:
        with console.progress(len(eval_loader), desc, lines=False) as bar:
            return evaluate(model, eval_loader, device, progress=bar)

    before = run_eval("eval (before)")
    metrics.eval(0, before)
    console.essential(f"accuracy before: {before['accuracy']:.4f} (loss {before['loss']:.4f}, n={before['n']})")

    settings = LoopSettings(epochs=options.epochs, max_steps=options.max_steps, lr=options.lr,
                            warmup_ratio=options.warmup_ratio, weight_decay=options.weight_decay)
    total = settings.total_steps(len(train_loader))
    console.info(f"training: {total} steps ({total / len(train_loader):.3g} x {len(train_loader)} batches of "
                 f"{options.batch_size}), lr {options.lr:g}")
    last = {"result": before, "step": 0}
    eval_seconds = 0.0

    def on_epoch_end(epoch: int, step: int) -> None:
        nonlocal eval_seconds
        t = time.time()
        result = run_eval(f"eval (epoch {epoch})")
        eval_seconds += time.time() - t
        metrics.eval(step, result)
        last.update(result=result, step=step)
        console.info(f"epoch {epoch} (step {step}): eval accuracy {result['accuracy']:.4f}, loss {result['loss']:.4f}")

    t0 = time.time()
    with console.progress(total, "train") as bar:
        steps = train(model, train_loader, settings, device, on_step=metrics.step,
                      on_epoch_end=on_epoch_end, progress=bar)
    train_seconds = time.time() - t0 - eval_seconds
    after = last["result"]
    console.essential(f"accuracy after: {after['accuracy']:.4f} (loss {after['loss']:.4f}, n={after['n']}); "
                      f"before: {before['accuracy']:.4f}")

    peftkit.save(model, adapter_dir)
    write_json(adapter_dir / rundir.LABELS_FILE, splits.labels.to_json())
    write_json(adapter_dir / rundir.ARGS_FILE, _train_args(options, model_path))
    steps_x, losses = metrics.train_points()
    plot_loss(out / "loss.png", steps_x, losses, metrics.eval_points(),
              title=f"{options.method} on {Path(options.model).name}: loss (eval points labelled with accuracy)")
    adapter_bytes = (adapter_dir / rundir.WEIGHTS_FILE).stat().st_size
    summary = {
        "eval": after,
        "accuracy_before": before["accuracy"],
        "eval_before": before,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "trainable_percent": params.percent,
        "adapter_bytes": adapter_bytes,
        "base_bytes": peftkit.quant.weight_bytes(model),  # 4-bit (with scales) vs 16/32-bit
        "train_seconds": round(train_seconds, 3),
        "total_seconds": round(time.time() - started, 3),
        "method": options.method,
        "model": options.model,
        "model_path": model_path,
        "task": TASK,
        "labels": list(splits.labels.names),
        "train_examples": len(splits.train),
        "eval_data": splits.eval_source,
        "steps": steps,
        "epochs": round(steps / len(train_loader), 3),
        "device": str(device),
        "seed": options.seed,
        "options": options.to_dict(),
        "peftkit_version": peftkit.__version__,
    }
    write_json(out / "summary.json", summary)
    console.essential(f"saved: {adapter_dir} ({adapter_bytes / 1024:.0f} KB), metrics.jsonl, summary.json, "
                      f"loss.png in {out}")
    return summary


def _targets_text(config: Any, model: torch.nn.Module) -> str:
    """The configured targets, or the method's default for this model type."""
    if not hasattr(config, "target_modules"):
        return "none (virtual tokens at the input)"
    targets = config.target_modules
    if targets is None:
        kind = getattr(getattr(model, "config", None), "model_type", None)
        targets = peftkit.registry.get(config.peft_type).default_targets.get(kind)
        return f"{','.join(targets)} (default for {kind})" if targets else "default"
    return targets if isinstance(targets, str) else ",".join(targets)


def _train_args(options: TrainOptions, model_path: str) -> dict[str, Any]:
    """What ``eval``/``merge`` need to rebuild the run's model and inputs, plus the options."""
    def absolute(p: str | None) -> str | None:
        return os.path.abspath(p) if p else None

    return {
        "task": TASK,
        "model": options.model if options.model in BUILTIN and not os.path.isdir(options.model)
        else absolute(options.model),
        "max_length": options.max_length,
        "batch_size": options.batch_size,
        "data": absolute(options.data),  # null: the bundled demo set
        "eval_data": absolute(options.eval_data),  # null with data set: held out of data
        "holdout_fraction": HOLDOUT_FRACTION,
        "seed": options.seed,
        "options": options.to_dict(),
    }


# -- using a trained adapter --------------------------------------------------------------


@dataclass
class Adapted:
    model: torch.nn.Module
    tokenizer: Any
    labels: LabelMap
    args: dict[str, Any]
    adapter_dir: Path


def load_adapted(adapter: str, model: str | None, device: torch.device, quantized: bool = False) -> Adapted:
    """The base model (``model``, else the one the adapter was trained on) with the adapter loaded."""
    adapter_dir = rundir.find_adapter_dir(adapter)
    peftkit.read_config(adapter_dir)  # a bad adapter is reported before the base is loaded
    labels = LabelMap.read(adapter_dir / rundir.LABELS_FILE)
    args = rundir.read_train_args(adapter_dir)
    model_name = model or args.get("model")
    if not model_name:
        raise ConfigError(f"{adapter_dir}: no {rundir.ARGS_FILE} says which model it was trained on; pass --model")
    max_length = int(args.get("max_length") or TrainOptions.max_length)
    _, base, tokenizer = _prepare_model(model_name, labels, device, max_length)
    run = args.get("options") if isinstance(args.get("options"), dict) else {}
    quant_type = base_quant_type(run.get("method"), run.get("quantize")) or ("nf4" if quantized else None)
    if quant_type:  # the function the adapter was trained against: the 4-bit base
        peftkit.quantize(base, quant_type=quant_type)
    peftkit.load(base, adapter_dir)
    base.eval()
    return Adapted(base, tokenizer, labels, args, adapter_dir)


def eval_data_path(args: dict[str, Any], data: str | None) -> tuple[str, bool]:
    """The file to evaluate on and whether to take the held-out part of it.

    ``data`` when given; else the run's own evaluation data (the bundled demo eval file, the
    ``--eval-data`` file, or the part held out of ``--data`` with the run's seed)."""
    if data:
        return data, False
    if not args:
        raise ConfigError("the adapter has no train_args.json naming its evaluation data; pass --data")
    if args.get("eval_data"):
        return args["eval_data"], False
    if args.get("data"):
        return args["data"], True
    return str(DEMO_EVAL), False


def evaluate_adapter(adapter: str, model: str | None, data: str | None, batch_size: int | None,
                     device: torch.device, console: Console) -> dict[str, Any]:
    """``{"accuracy", "loss", "n"}`` of an adapter on a data file, tokenized as in training."""
    adapted = load_adapted(adapter, model, device)
    path, held_out = eval_data_path(adapted.args, data)
    examples = read_examples(path)
    if held_out:
        _, examples = split_holdout(examples, float(adapted.args.get("holdout_fraction", HOLDOUT_FRACTION)),
                                    int(adapted.args.get("seed", 0)), path)
    dataset = TextClassificationSet(examples, adapted.labels, path)
    max_length = int(adapted.args.get("max_length") or TrainOptions.max_length)
    size = batch_size or int(adapted.args.get("batch_size") or TrainOptions.batch_size)
    loader = make_loader(dataset, adapted.tokenizer, max_length, size, shuffle=False)
    console.info(f"evaluating {adapted.adapter_dir} on {len(dataset)} examples from {_display(path)}"
                 + (" (held-out part)" if held_out else ""))
    with console.progress(len(loader), "eval", lines=False) as bar:
        return evaluate(adapted.model, loader, device, progress=bar)


def merge_adapter(adapter: str, model: str | None, out: str, console: Console, quantized: bool = False) -> Path:
    """Fold the adapter into its base and write a plain transformers model directory.

    An adapter trained over a 4-bit base (the run's options say so, or ``quantized``) is merged
    into the dequantized weights, the function it was trained against; every layer is written
    dense (16/32-bit), with the merge's error reported."""
    adapted = load_adapted(adapter, model, torch.device("cpu"), quantized)
    report = peftkit.merge(adapted.model)
    console.info(str(report))
    merged = peftkit.quant.dequantize(peftkit.unload(adapted.model, merge=True))
    merged.config.id2label = dict(adapted.labels.id2label)
    merged.config.label2id = dict(adapted.labels.label2id)
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    adapted.tokenizer.save_pretrained(out_dir)
    console.info(f"merged {adapted.adapter_dir} into {adapted.args.get('model') or model}")
    return out_dir
