"""How much merging changed the model's function, measured on a probe batch.

Merging a float base is exact up to rounding; merging over a 4-bit base is exact against the
dequantized weights but changes the function when the result is requantized (or when the
adapter was trained against a different dequantization). Silent quality loss on merge is the
most common complaint of QLoRA users, so ``peftkit.merge`` measures it: the probe batch runs
through the model before and after, and the report gives the max and mean absolute change of
every merged layer's output and of the model's output.

The default probe, for a model with a ``config.vocab_size``, is a fixed batch of 2 × 16 token
ids drawn with seed 0 (ids 1 … vocab−1) with a full attention mask; pass ``probe=`` (a dict of
keyword arguments, or one tensor) to measure on your own data. A model without a vocabulary
and no probe is merged without measurement (the report says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Change:
    max_abs: float
    mean_abs: float


@dataclass
class MergeReport:
    merged: list[str]
    probe: str
    output: Change | None = None
    layers: dict[str, Change] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.output is None:
            return f"merged {', '.join(self.merged)}; change not measured ({self.probe})"
        worst = max(self.layers.items(), key=lambda kv: kv[1].max_abs, default=None)
        line = (f"merged {', '.join(self.merged)}: model output changed by max {self.output.max_abs:.3g}, "
                f"mean {self.output.mean_abs:.3g} on {self.probe}")
        if worst is not None:
            line += f"; largest layer change {worst[1].max_abs:.3g} at {worst[0]}"
        return line


def default_probe(model: nn.Module) -> dict[str, torch.Tensor] | None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        return None
    device = next(model.parameters()).device
    ids = torch.randint(1, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot read a tensor from the model's output ({type(out).__name__})")


class Probe:
    """Runs the probe in eval mode under no_grad, recording the given layers' outputs."""

    def __init__(self, model: nn.Module, probe: Any, layers: dict[str, nn.Module]) -> None:
        self.model, self.probe, self.layers = model, probe, layers

    def run(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seen: dict[str, torch.Tensor] = {}

        def record(name: str):
            def hook(_module, _inputs, out) -> None:  # returns None: the layer's output goes on unchanged
                seen.setdefault(name, out.detach().float().cpu())
            return hook

        handles = [m.register_forward_hook(record(name)) for name, m in self.layers.items()]
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            with torch.no_grad():
                args = self.probe
                out = self.model(**args) if isinstance(args, dict) else self.model(args)
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return _first_tensor(out).detach().float().cpu(), seen


def change(before: torch.Tensor, after: torch.Tensor) -> Change:
    diff = (after - before).abs()
    return Change(diff.max().item(), diff.mean().item())
