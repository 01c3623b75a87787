"""The pieces of the training loop: seeding, AdamW (LoRA+'s groups, LoRA-FA's projection), learning-rate
schedules, the data order.

The loop itself is ``engine.Engine.fit``; what is here has no state beyond its arguments.
"""

from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn as nn
from torch.utils.data import Sampler

from .. import ConfigError
from ..optim import LoraFAAdamW, grouped


def seed_everything(seed: int) -> None:
    """Python's ``random``, NumPy (when installed) and torch (CPU and every GPU)."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy comes with transformers
        pass
    torch.manual_seed(seed)  # seeds CUDA devices too


def make_optimizer(named: list[tuple[str, nn.Parameter]], lr: float, weight_decay: float,
                   rates: dict[int, float] | None = None,
                   projections: list[tuple[nn.Parameter, torch.Tensor, float]] | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (biases, norms, scales) do not.

    ``rates`` (``id(parameter) -> lr``): parameters with their own learning rate, in groups of
    their own after the two above (LoRA+'s B at ratio × lr: ``optim.lora_plus_rates``); the
    schedule scales every group alike. ``projections``: LoRA-FA's ``(B, A, s)``; B's gradient is
    projected before each step (``optim.LoraFAAdamW``, AdamW's state otherwise)."""
    groups = grouped(named, lr, weight_decay, rates)
    if projections:
        return LoraFAAdamW(groups, projections=projections, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def _warmup(step: int, warmup: int) -> float:
    return (step + 1) / (warmup + 1)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Learning rate rises linearly over ``warmup`` steps, then falls linearly to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then half a cosine from the peak down to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def constant_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then the peak rate to the end."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _warmup(step, warmup) if step < warmup else 1.0)


SCHEDULES = {"linear": linear_schedule, "cosine": cosine_schedule, "constant": constant_schedule}


def make_schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int):
    if name not in SCHEDULES:
        raise ConfigError(f"--scheduler: expected one of {', '.join(SCHEDULES)}, found {name!r}")
    return SCHEDULES[name](optimizer, warmup, total)


class ShardOrder(Sampler[int]):
    """The examples one process visits in one epoch, from a given position on.

    Epoch ``e``'s order is a permutation drawn from ``seed + e`` (or the file order without
    ``shuffle``), padded by wrapping around to a multiple of ``world`` and dealt out round-robin:
    process ``r`` takes positions ``r, r + world, ...``. With batch size ``b`` per process, the
    ``world`` batches of one step together hold positions ``k*b*world .. (k+1)*b*world - 1`` of
    the order: the same examples a single process with batch size ``b*world`` would see.
    ``start`` skips that many of this process's examples (resuming mid-epoch). No global RNG
    is used, so resuming does not shift dropout's random numbers.
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world: int = 1) -> None:
        self.n, self.seed, self.shuffle, self.rank, self.world = n, seed, shuffle, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def per_process(self) -> int:
        return -(-self.n // self.world)

    def __len__(self) -> int:
        return max(0, self.per_process() - self.start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        padded = self.per_process() * self.world
        order = (order * (padded // max(1, self.n) + 1))[:padded]
        return iter(order[self.rank::self.world][self.start:])
