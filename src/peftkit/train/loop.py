"""The training loop: AdamW, linear warmup then linear decay, gradient clipping, evaluation.

Read it top to bottom: ``train`` runs optimizer steps over a ``DataLoader`` of batches that
carry ``labels`` (the model computes its own loss) and calls back after every step and at the
end of every epoch; ``evaluate`` measures accuracy and mean cross-entropy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .. import ModelError


def seed_everything(seed: int) -> None:
    """Python's ``random``, NumPy (when installed) and torch (CPU and every GPU)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy comes with transformers
        pass
    torch.manual_seed(seed)  # seeds CUDA devices too


@dataclass
class LoopSettings:
    epochs: int = 1
    max_steps: int | None = None  # when set, overrides epochs
    lr: float = 1e-3
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0

    def total_steps(self, steps_per_epoch: int) -> int:
        return self.max_steps if self.max_steps is not None else self.epochs * steps_per_epoch


def make_optimizer(params: list[nn.Parameter], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norms) do not."""
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rises linearly over ``warmup`` steps, then falls linearly to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def train(model: nn.Module, loader: DataLoader, settings: LoopSettings, device: torch.device, *,
          on_step: Callable[[int, float, float], None] | None = None,
          on_epoch_end: Callable[[int, int], None] | None = None,
          progress: Any = None) -> int:
    """Train the parameters that require grad; returns the number of optimizer steps taken.

    ``on_step(step, loss, lr)`` follows every step; ``on_epoch_end(epoch, step)`` follows
    every epoch, including a last one cut short by ``max_steps`` (the model is put back in
    training mode after it, so the callback may evaluate). ``progress`` has ``update(n, **stats)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters")
    total = settings.total_steps(len(loader))
    optimizer = make_optimizer(params, settings.lr, settings.weight_decay)
    scheduler = linear_schedule(optimizer, int(total * settings.warmup_ratio), total)
    step, epoch = 0, 0
    model.train()
    while step < total:
        epoch += 1
        for batch in loader:
            batch = to_device(batch, device)
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise ModelError(f"the loss became {loss.item()} at step {step + 1}; try a lower --lr")
            loss.backward()
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = loss.item()
            if on_step is not None:
                on_step(step, value, lr)
            if progress is not None:
                progress.update(1, loss=value, lr=lr)
            if step >= total:
                break
        if on_epoch_end is not None:
            on_epoch_end(epoch, step)
            model.train()
    return step


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, progress: Any = None) -> dict[str, Any]:
    """``{"accuracy", "loss", "n"}``: accuracy and mean cross-entropy over every example."""
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    try:
        for batch in loader:
            batch = to_device(batch, device)
            labels = batch.pop("labels")  # (B,)
            logits = model(**batch).logits.float()  # (B, num_labels)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            n += labels.numel()
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    if n == 0:
        return {"accuracy": math.nan, "loss": math.nan, "n": 0}
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}
