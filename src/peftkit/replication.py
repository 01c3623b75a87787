"""Layer stacking: ``LoraConfig(layer_replication=[[start, end), ...])``, HF PEFT's ``replicate_layers``.

The model's layer list is rebuilt from ranges of its layers, in order: ``[[0, 4], [2, 5]]`` over
layers 0…4 gives 0, 1, 2, 3, 2, 3, 4. Every entry is a copy of its layer that shares the
original's parameters (nothing weight-sized is copied; buffers are copied, as HF does), so the
deeper model costs the memory of its adapters only; LoRA then adapts each entry separately (a
layer that appears twice gets two adapters), and the file is keyed by the new positions
(``model.layers.4.self_attn.q_proj.lora_A.weight``), as HF writes it.

The layer list is found as HF finds it: below the last of nested ``.model`` attributes (and a
``.bert``), the ``layers`` list (Llama-like), ``encoder.layer`` (BERT) or ``h`` (Falcon); others
are refused. Each copy's modules with a ``layer_idx`` get their new position (the KV cache keeps
one entry per position) and the model config's ``num_hidden_layers`` is the new count (Llama's
forward runs ``layers[:num_hidden_layers]``; ``generate`` sizes its cache from it); beyond HF,
a ``layer_types`` list is rebuilt the same way, so caches built from it fit too. The model's
config object itself is shared with the copies, not copied.

One stacking per model: the first adapter builds it, every other adapter of the model must give
the same ``layer_replication`` (a different one, or none, is a ``ConfigError``), and it is undone
— the original layer list and config values put back — when the last adapter goes (``unload``,
``delete``, a failed ``load``). Stacked layers share their base weights, so adapters on them
cannot be merged (``ModelError``; HF PEFT means to refuse it too). ``peftkit.disabled`` runs the
stacked base without adapters, as HF's ``disable_adapter`` does.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn as nn

from .errors import ConfigError


class StackedLayers(nn.ModuleList):
    """The stacked layer list; keeps what ``restore`` puts back (not as submodules). Built as a
    ``ModuleList`` is (slicing makes another one), the record set by ``stack``."""

    def __init__(self, modules: Any = None) -> None:
        super().__init__(modules)
        self.__dict__["_original"] = None  # the model's own layer list
        self.__dict__["_config_values"] = {}  # config values before stacking


def check_config(config: Any) -> list[list[int]] | None:
    """``layer_replication`` of a ``LoraConfig`` (``check_map``), refused with an initialisation
    that writes into the base weights: the stacked positions share them."""
    value = check_map(config.layer_replication)
    if value:
        from .methods import lora_init  # lazily: the methods import this module

        if lora_init.modifies_base(config.init_lora_weights):
            raise ConfigError(f"layer_replication: cannot be combined with init_lora_weights="
                              f"{config.init_lora_weights!r}, which writes into the base weights that the stacked "
                              "layers share")
    return value


def check_map(value: Any) -> list[list[int]] | None:
    """``layer_replication``: None or a list of [start, end) pairs, 0 <= start < end."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                               for i in p) for p in value):
        raise ConfigError(f"layer_replication: expected a list of [start, end) layer ranges, e.g. [[0, 4], [2, 5]], "
                          f"found {value!r}")
    for start, end in value:
        if not 0 <= start < end:
            raise ConfigError(f"layer_replication: the range [{start}, {end}) is empty or negative; "
                              "each range is [start, end) with 0 <= start < end")
    return [list(p) for p in value]


def _locate(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the module whose config counts the layers, the layer list's parent, its attribute)."""
    inner = model
    while isinstance(getattr(inner, "model", None), nn.Module):
        inner = inner.model
    if isinstance(getattr(inner, "bert", None), nn.Module):
        inner = inner.bert
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner, inner, "layers"
    encoder = getattr(inner, "encoder", None)
    if isinstance(getattr(encoder, "layer", None), nn.ModuleList):
        return inner, encoder, "layer"
    if isinstance(getattr(inner, "h", None), nn.ModuleList):
        return inner, inner, "h"
    raise ConfigError(f"layer_replication: cannot find the layer list of {type(model).__name__} (HF PEFT's rule: "
                      "a .layers, .encoder.layer or .h list below nested .model attributes)")


def _same(a: Any, b: Any) -> bool:
    return (a or None) == (b or None)


def stack(model: nn.Module, config: Any, others: list[Any]) -> bool:
    """Build the stacking ``config`` asks for (``others``: the configs of the model's adapters);
    returns whether this call built it."""
    spec = getattr(config, "layer_replication", None) or None
    if others:
        theirs = next((c for c in others if not _same(getattr(c, "layer_replication", None), spec)), None)
        if theirs is not None:
            raise ConfigError(f"layer_replication: this adapter gives {spec!r}, the model's adapters "
                              f"{getattr(theirs, 'layer_replication', None) or None!r}; the layers of a model are "
                              "stacked once, so every adapter of it must give the same layer_replication")
        return False
    if spec is None:
        return False
    inner, parent, attr = _locate(model)
    layers = getattr(parent, attr)
    if isinstance(layers, StackedLayers):
        raise ConfigError("layer_replication: the model's layers are stacked already")
    count = len(layers)
    for start, end in spec:
        if end > count:
            raise ConfigError(f"layer_replication: the range [{start}, {end}) goes beyond the model's {count} layers")
    shared = {id(p): p for p in layers.parameters()}
    cfg = getattr(inner, "config", None)
    if cfg is not None:
        shared[id(cfg)] = cfg  # the copies keep reading the model's config (attention implementation, ...)
    new = []
    for start, end in spec:
        for i in range(start, end):
            clone = copy.deepcopy(layers[i], memo=dict(shared))
            for sub in clone.modules():
                if hasattr(sub, "layer_idx"):
                    sub.layer_idx = len(new)
            new.append(clone)
    values = {}
    if cfg is not None:
        if hasattr(cfg, "num_hidden_layers"):
            values["num_hidden_layers"] = cfg.num_hidden_layers
            cfg.num_hidden_layers = len(new)
        kinds = getattr(cfg, "layer_types", None)
        if isinstance(kinds, list) and len(kinds) == count:
            values["layer_types"] = kinds
            cfg.layer_types = [kinds[i] for start, end in spec for i in range(start, end)]
    stacked = StackedLayers(new)
    stacked.__dict__.update(_original=layers, _config_values=values)
    setattr(parent, attr, stacked)
    return True


def restore(model: nn.Module) -> None:
    """Put the original layer list and config values back (nothing when not stacked)."""
    try:
        inner, parent, attr = _locate(model)
    except ConfigError:
        return
    layers = getattr(parent, attr)
    if not isinstance(layers, StackedLayers) or layers._original is None:
        return
    setattr(parent, attr, layers._original)
    cfg = getattr(inner, "config", None)
    for key, value in layers._config_values.items():
        setattr(cfg, key, value)
