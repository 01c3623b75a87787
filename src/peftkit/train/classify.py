"""Text classification (``--task classify``): the task for the engine, ``eval`` and ``merge``.

Single texts or sentence pairs, any ``AutoModelForSequenceClassification`` (a new head with one
output per label). Only peftkit's public API is used on the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .adapted import Source, eval_data_of, load_adapted, merged_model, write_out_dir
from .data import (DEMO_EVAL, DEMO_TRAIN, HOLDOUT_FRACTION, Collate, LabelMap, TextClassificationSet, read_examples,
                   split_holdout)
from .models import check_max_length, load_sequence_classifier, load_tokenizer, resolve_model
from .options import TrainOptions
from .progress import Console
from .task import ClassificationTask, TaskData

TASK = "SEQ_CLS"
AUTO_CLASS = "AutoModelForSequenceClassification"  # what merge writes


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
    check_max_length(model, max_length)
    return path, model, tokenizer


class ClassifyTask(ClassificationTask):
    """Text classification (single texts or sentence pairs) with ``AutoModelForSequenceClassification``."""

    name = "classify"
    peft_task_type = TASK

    def load_data(self) -> TaskData:
        splits = load_splits(self.options)
        self.labels = splits.labels
        self.tokenizer = load_tokenizer(resolve_model(self.options.model))
        collate = Collate(self.tokenizer, self.options.max_length)
        pairs = " (sentence pairs)" if splits.train.pairs and splits.train.pairs[0] is not None else ""
        return TaskData(splits.train, splits.eval, collate, splits.train_source + pairs, splits.eval_source,
                        [f"labels: {', '.join(splits.labels.names)}"])

    def load_model(self, data: TaskData, device: torch.device) -> tuple[torch.nn.Module, str]:
        path, model, _ = _prepare_model(self.options.model, self.labels, device, self.options.max_length)
        return model, path


# -- using a trained adapter --------------------------------------------------------------


def _build(device: torch.device):
    """``load_adapted``'s builder: the base classifier with one output per label of the adapter."""
    def build(source: Source) -> torch.nn.Module:
        max_length = int(source.args.get("max_length") or TrainOptions.max_length)
        _, base, _ = _prepare_model(source.model_path, source.labels().config_names, device, max_length)
        return base
    return build


def _load(adapter: str | Source, model: str | None, device: torch.device, quantized: bool = False,
          allow_pickle: bool = False):
    """(the adapted model, its labels, its tokenizer)."""
    adapted = load_adapted(adapter, model, device, _build(device), quantized, allow_pickle)
    return adapted, adapted.source.labels(), load_tokenizer(adapted.model_path)


def evaluate_adapter(adapter: str | Source, model: str | None, data: str | None, batch_size: int | None,
                     device: torch.device, console: Console, allow_pickle: bool = False) -> dict[str, Any]:
    """``{"accuracy", "loss", "n", "labels_from"}`` of an adapter on a data file, tokenized as in
    training; ``labels_from`` says where the label mapping came from (``adapted.class_labels``)."""
    adapted, labels, tokenizer = _load(adapter, model, device, allow_pickle=allow_pickle)
    path, held_out = eval_data_of(adapted.args, data, default=str(DEMO_EVAL))
    examples = read_examples(path)
    if held_out:
        _, examples = split_holdout(examples, float(adapted.args.get("holdout_fraction", HOLDOUT_FRACTION)),
                                    int(adapted.args.get("seed", 0)), path)
    dataset = TextClassificationSet(labels.examples(examples, path), labels.names, path)
    max_length = int(adapted.args.get("max_length") or TrainOptions.max_length)
    size = batch_size or int(adapted.args.get("batch_size") or TrainOptions.batch_size)
    loader = DataLoader(dataset, batch_size=size, shuffle=False, collate_fn=Collate(tokenizer, max_length))
    console.info(adapted.source.line())
    console.info(labels.line())
    console.info(f"evaluating {adapted.adapter_dir} on {len(dataset)} examples from {_display(path)}"
                 + (" (held-out part)" if held_out else ""))
    task = ClassifyTask(TrainOptions())
    with console.progress(len(loader), "eval", lines=False) as bar:
        result = task.evaluate(adapted.model, loader, device, progress=bar)
    return {**result, "labels_from": labels.source}


def merge_adapter(adapter: str | Source, model: str | None, out: str, console: Console, quantized: bool = False,
                  allow_pickle: bool = False) -> Path:
    """Fold the adapter into its base and write a plain transformers model directory (as a
    whole: ``write_out_dir``), the label names in its config.

    An adapter trained over a 4-bit base (the run's options say so, or ``quantized``) is merged
    into the dequantized weights, the function it was trained against; every layer is written
    dense (16/32-bit), with the merge's error reported."""
    adapted, labels, tokenizer = _load(adapter, model, torch.device("cpu"), quantized, allow_pickle)
    console.info(adapted.source.line())
    console.info(labels.line())
    merged = merged_model(adapted, console)
    merged.config.id2label = dict(labels.config_names.id2label)
    merged.config.label2id = dict(labels.config_names.label2id)

    def fill(tmp: Path) -> None:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    out_dir = write_out_dir(out, fill, keep=[adapted.model_path, adapted.adapter_dir])
    console.info(f"merged {adapted.adapter_dir} into {adapted.model_path}")
    return out_dir
