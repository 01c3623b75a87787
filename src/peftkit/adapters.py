"""Model-level operations on the adapters a model carries.

- ``set_active(model, names)``: which adapters run. Several active LoRA adapters add their
  deltas; each method documents its own composition rule in its module docstring.
- ``disabled(model)``: a context in which the base model runs alone.
- ``merge`` / ``unmerge``: fold the active mergeable adapters into the base weights and back.
- ``delete(model, name)``: remove one adapter.
- ``trainable_summary(model)``: trainable vs total parameters.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch.nn as nn

from . import registry, replication
from .errors import ModelError
from .merge_report import MergeReport, Probe, change, default_probe
from .layer import AdapterLayer
from .state import check_name, drop_state, get_state, hosts, replace_module


def is_merged(model: nn.Module) -> bool:
    """Whether any layer has an adapter folded into its base weights."""
    return any(isinstance(h, AdapterLayer) and h.merged for _, h in hosts(model))


def set_active(model: nn.Module, names: str | list[str]) -> None:
    """Make ``names`` (one name or a list, in order) the active adapters."""
    state = get_state(model)
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        check_name(state, name)
    if len(set(names)) != len(names):
        raise ModelError(f"adapter names repeat in {names}")
    if is_merged(model):
        raise ModelError("the model has merged adapters; call peftkit.unmerge(model) before switching")
    all_hosts = [host for _, host in hosts(model)]
    for host in all_hosts:  # every host agrees before any changes
        host.check_active(names)
    for host in all_hosts:
        host.set_active(names)
    state.active = names


def active_adapters(model: nn.Module) -> list[str]:
    return list(get_state(model).active)


def adapted_modules(model: nn.Module, name: str = "default") -> list[str]:
    """The names of the modules adapter ``name`` wraps (empty for the input methods)."""
    state = get_state(model)
    check_name(state, name)
    return sorted(state.targets.get(name, []))


@contextlib.contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the block (merged adapters are unmerged meanwhile)."""
    get_state(model)
    was_merged = is_merged(model)
    requantize = any(h.requantized for _, h in hosts(model) if isinstance(h, AdapterLayer))
    if was_merged:
        unmerge(model)
    all_hosts = [h for _, h in hosts(model)]
    for host in all_hosts:
        host.set_disabled(True)
    try:
        yield model
    finally:
        for host in all_hosts:
            host.set_disabled(False)
        if was_merged:
            merge_layers(model, requantize)


def merge_layers(model: nn.Module, requantize: bool = False) -> list[str]:
    """``merge`` without measuring: fold the active adapters in; returns their names."""
    state = get_state(model)
    if not state.active:
        raise ModelError("no active adapter to merge")
    for name in state.active:
        if registry.method_for(state.configs[name]).attach is not None:
            raise ModelError(f"adapter {name!r} ({state.configs[name].peft_type}) changes the model's inputs, "
                             "not its weights; it cannot be merged")
        if getattr(state.configs[name], "layer_replication", None):
            raise ModelError(f"adapter {name!r} adapts stacked layers (layer_replication) that share their base "
                             "weights, so its updates cannot be folded into them; use it unmerged")
    layers = [h for _, h in hosts(model) if isinstance(h, AdapterLayer)]
    for host in layers:
        host.mergeable_check()
    for host in layers:
        host.merge(requantize=requantize)
    return list(state.active)


def merge(model: nn.Module, probe: Any = None, requantize: bool = False) -> MergeReport:
    """Fold the active adapters into the base weights; forward then costs the base's alone.

    Over a 4-bit base the merged layers hold the dequantized weights plus the update, in the
    compute dtype, or are quantized again with ``requantize=True``. Returns a ``MergeReport``:
    how much each merged layer's output and the model's output changed on ``probe`` (see
    ``merge_report``). Raises ``ModelError`` when an active adapter cannot be merged.
    """
    get_state(model)
    targets = {path: h for path, h in hosts(model)
               if isinstance(h, AdapterLayer) and any(n not in h.merged for n in h.active)}
    batch = probe if probe is not None else default_probe(model)
    if batch is None:
        return MergeReport(merge_layers(model, requantize), "no probe (pass probe=...)")
    runner = Probe(model, batch, targets)
    out_before, layers_before = runner.run()
    merged = merge_layers(model, requantize)
    out_after, layers_after = runner.run()
    described = "the given probe" if probe is not None else "the default probe (2 x 16 random token ids, seed 0)"
    return MergeReport(merged, described, change(out_before, out_after),
                       {p: change(layers_before[p], layers_after[p]) for p in layers_before if p in layers_after})


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``: subtract what was folded in (no-op when nothing is merged)."""
    get_state(model)
    for _, host in hosts(model):
        if isinstance(host, AdapterLayer):
            host.unmerge()


def delete(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter get their original module back."""
    state = get_state(model)
    check_name(state, name)
    for path, host in list(hosts(model)):
        if isinstance(host, AdapterLayer) and name in host.adapters:
            if name in host.merged:
                raise ModelError(f"adapter {name!r} is merged; call peftkit.unmerge(model) first")
    for path, host in list(hosts(model)):
        if name not in host.names():
            continue
        host.remove(name)
        if not host.names():
            replace_module(model, path, host.restore(merge=False))
    del state.configs[name]
    state.targets.pop(name, None)
    state.active = [n for n in state.active if n != name]
    if not state.configs:
        replication.restore(model)  # the original layer list, before the names below are read
        for pname, p in model.named_parameters():
            p.requires_grad_(state.requires_grad.get(pname, True))
        drop_state(model)


@dataclass(frozen=True)
class TrainableSummary:
    trainable: int
    total: int
    percent: float

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable: {self.percent:.4f}%"


def trainable_summary(model: nn.Module) -> TrainableSummary:
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return TrainableSummary(trainable, total, 100.0 * trainable / total if total else 0.0)
