"""What a training task gives the engine: data, a base model, a loss, and evaluation.

The engine (``engine.py``) owns everything common to every task: the adapter, the optimizer,
gradient accumulation, mixed precision, checkpoints, evaluation schedule, distribution and the
run directory. A task (``classify.py``, ``causal_lm.py``, ``image_classify.py``) owns what
differs: reading its data, loading its model, counting what a loss averages over, and turning
per-batch sums into metrics.

Losses are normalised by the engine, not per micro-batch: ``count(batch)`` is the number of
items the model's mean loss averages over (examples, or predicted tokens), so the engine can
divide the sum over a whole accumulation window (and over every process) by the total count.
That makes ``--grad-accum 4 --batch-size 8`` and ``--nproc 2 --batch-size 16`` take the same
step as ``--batch-size 32``, also when examples have different numbers of tokens.

Evaluation is a sum over batches: ``eval_sums`` returns sums (``keep`` marks the real examples
of the batch; the engine pads the last batches of a process so that every process runs the same
number of forwards), the engine adds them up over batches and processes, and
``finish_eval`` turns the totals into metrics (``"loss"``, ``metric``, ``"n"`` at least).
"""

from __future__ import annotations

import contextlib
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from .data import LabelMap
from .options import TrainOptions


@dataclass
class TaskData:
    train: Dataset
    eval: Dataset
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]  # items -> model keyword arguments + "labels"
    train_source: str  # for the console: "demo:demo_train.csv", "data.jsonl", ...
    eval_source: str
    lines: list[str] = field(default_factory=list)  # more console lines ("labels: a, b, c")
    train_examples: int | None = None  # when the items of ``train`` are not examples (packed rows)

    @property
    def train_count(self) -> int:
        """Training examples (not packed rows)."""
        return self.train_examples if self.train_examples is not None else len(self.train)


class Task(ABC):
    name: ClassVar[str]  # the --task value
    peft_task_type: ClassVar[str | None]  # the adapter file's task_type (SEQ_CLS, CAUSAL_LM, None)
    metric: ClassVar[str]  # the finish_eval key --keep-best and --early-stopping compare
    higher_is_better: ClassVar[bool]
    # Modules trained and saved in full beside the adapter (a new classification head); None: none,
    # or what the library adds for the adapter's task_type (SEQ_CLS adds the model's head).
    modules_to_save: ClassVar[list[str] | None] = None

    def __init__(self, options: TrainOptions) -> None:
        self.options = options

    @abstractmethod
    def load_data(self) -> TaskData:
        """Read and check the training and evaluation data (``DataError`` names file and line)."""

    @abstractmethod
    def load_model(self, data: TaskData, device: torch.device) -> tuple[nn.Module, str]:
        """The base model in float32 on ``device`` (no adapter yet) and the directory it came from."""

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        """How many items the model's mean loss over ``batch`` averages (examples by default)."""
        return int(batch["labels"].shape[0])

    def loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The summed (not mean) loss of ``batch``: the model's mean loss times ``count``."""
        return model(**batch).loss.float() * self.count(batch)

    @abstractmethod
    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
        """Sums over the examples of ``batch`` where ``keep`` (bool, (B,)) is true."""

    @abstractmethod
    def finish_eval(self, sums: dict[str, float]) -> dict[str, Any]:
        """Metrics from the totals of ``eval_sums``: at least ``"loss"``, ``self.metric``, ``"n"``."""

    def save_files(self, adapter_dir: Path, data: TaskData) -> None:
        """Files the task keeps next to the adapter (``labels.json``, ...); called on rank 0 only."""

    @torch.no_grad()
    def eval_totals(self, model: nn.Module, batches: Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]],
                    device: torch.device, progress: Any = None,
                    autocast: Callable[[], Any] = contextlib.nullcontext) -> dict[str, float]:
        """The sums of ``eval_sums`` over ``(batch, keep)`` pairs, in eval mode (the mode is restored)."""
        was_training = model.training
        model.eval()
        totals: dict[str, float] = {}
        try:
            for batch, keep in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    sums = self.eval_sums(model, batch, keep.to(device))
                for k, v in sums.items():
                    totals[k] = totals.get(k, 0.0) + float(v)
                if progress is not None:
                    progress.update(1)
        finally:
            model.train(was_training)
        return totals

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device, progress: Any = None) -> dict[str, Any]:
        """``finish_eval`` over every batch of ``loader`` in one process (``peftkit eval``)."""
        every = ((batch, torch.ones(batch["labels"].shape[0], dtype=torch.bool)) for batch in loader)
        return self.finish_eval(self.eval_totals(model, every, device, progress))

    def summary_extras(self, data: TaskData) -> dict[str, Any]:
        """More entries for ``summary.json`` (``{"labels": [...]}``, ...)."""
        return {}

    def eval_text(self, result: dict[str, Any]) -> str:
        """One line for the console, e.g. ``accuracy 0.9133 (loss 0.2710, n=75)``."""
        head = f"{self.metric} {result[self.metric]:.4f}"
        rest = f"loss {result['loss']:.4f}, " if self.metric != "loss" else ""
        return f"{head} ({rest}n={result['n']})"


# -- shared by the classification tasks (text and images) ---------------------------------


class ClassificationTask(Task):
    """A task that sorts examples into the labels of its training data (``classify``,
    ``image-classify``): cross-entropy, accuracy, and ``labels.json`` beside the adapter."""

    metric = "accuracy"
    higher_is_better = True
    labels: LabelMap  # set by load_data

    def eval_sums(self, model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
        return classification_sums(model, batch, keep)

    def finish_eval(self, sums: dict[str, float]) -> dict[str, Any]:
        return accuracy_metrics(sums)

    def save_files(self, adapter_dir: Path, data: TaskData) -> None:
        from . import rundir
        from .report import write_json

        write_json(Path(adapter_dir) / rundir.LABELS_FILE, self.labels.to_json())

    def summary_extras(self, data: TaskData) -> dict[str, Any]:
        return {"labels": list(self.labels.names)}


def classification_sums(model: nn.Module, batch: dict[str, torch.Tensor], keep: torch.Tensor) -> dict[str, float]:
    """``{"correct", "loss_sum", "n"}`` over the examples of ``batch`` where ``keep`` (B,) is true.

    ``batch``: the model's inputs and ``labels`` (B,); the model returns ``logits`` (B, K)."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits.float()  # (B, K)
        losses = F.cross_entropy(logits, labels, reduction="none")  # (B,)
        keep = keep.to(device=labels.device, dtype=torch.bool)
        correct = (logits.argmax(dim=-1) == labels) & keep  # (B,)
    return {"correct": float(correct.sum()), "loss_sum": float(losses[keep].sum()), "n": float(keep.sum())}


def accuracy_metrics(sums: dict[str, float]) -> dict[str, Any]:
    """``{"accuracy", "loss", "n"}`` from the totals of ``classification_sums`` (NaN with no examples)."""
    n = int(sums.get("n", 0))
    if n == 0:
        return {"accuracy": math.nan, "loss": math.nan, "n": 0}
    return {"accuracy": sums["correct"] / n, "loss": sums["loss_sum"] / n, "n": n}
