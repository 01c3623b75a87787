"""The host layer: the original module plus a ``ModuleDict`` of named adapter units.

Every weight-side method plugs in here. A unit may adjust the input before the base layer
runs (``adjust_input``) and transform the result after it, seeing both (``forward(x, out)``).
The host keeps the tuple of units to run precomputed, so a forward does no per-call lookup
that grows with the number of adapters loaded.

``SavedModule`` is the other host: a module listed in ``modules_to_save`` (a classifier head)
is kept as the frozen original plus one trainable copy per adapter.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.nn as nn

from . import merging
from .errors import ModelError
from .unit import FILE_PREFIX, DeltaUnit, Host, Unit  # noqa: F401 - the methods import them from here too

class NamedAdapters(Host):
    """A host whose adapters sit in ``self.adapters`` (a ``ModuleDict``), with an ordered active
    set and a disabled flag; subclasses precompute what runs in ``_refresh``."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False

    def add(self, name: str, adapter: nn.Module) -> None:
        adapter.train(self.training)  # an adapter added to an eval-mode model runs in eval mode
        self.adapters[name] = adapter
        self._refresh()

    def names(self) -> list[str]:
        return list(self.adapters)

    def owned(self, name: str) -> nn.Module | None:
        return self.adapters[name] if name in self.adapters else None

    def remove(self, name: str) -> None:
        del self.adapters[name]
        self.active = tuple(n for n in self.active if n != name)
        self._refresh()

    def set_active(self, names: Iterable[str]) -> None:
        self.active = tuple(n for n in names if n in self.adapters)
        self._refresh()

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled
        self._refresh()

    def _refresh(self) -> None:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"active={list(self.active)}, disabled={self.disabled}"


class AdapterLayer(NamedAdapters):
    """Wraps ``base_layer``; runs the active, unmerged units around it."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.training = base_layer.training
        self.merged: list[str] = []
        self.backend: merging.Dense | merging.FourBit | None = None  # while merged
        self._mix = None  # set for one call of a mixed-adapter batch (serving)
        self._refresh()

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        unit = self.adapters[name]
        return {f"{FILE_PREFIX}{path}.{suffix}": t for suffix, t in unit.file_tensors().items()}

    def restore(self, merge: bool) -> nn.Module:
        for name, unit in self.adapters.items():
            if name not in self.merged:  # a merged unit's effect stays in the weights
                unit.release(self.base_layer)
        return self.base_layer

    def inner(self) -> nn.Module:
        return self.base_layer

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise ModelError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        self.adapters[name].release(self.base_layer)
        super().remove(name)

    def check_active(self, names: Iterable[str]) -> None:
        special = [n for n in names if n in self.adapters
                   and (self.adapters[n].runs_first or self.adapters[n].replaces_base)]
        if len(special) > 1:
            kinds = ", ".join(f"{n!r} ({type(self.adapters[n]).__name__})" for n in special)
            raise ModelError(f"adapters {kinds} cannot be active together on one layer: each rescales or replaces "
                             "the base layer itself; activate one of them")

    def run_order(self, names: Iterable[str]) -> list[str]:
        """``names`` (those present here) in the order the units merge (``Unit``'s rule): a
        ``runs_first``/``replaces_base`` unit, then the units that adjust the base's input, then
        the others, each group in the active order."""
        present = [n for n in names if n in self.adapters]

        def rank(n: str) -> int:
            unit = self.adapters[n]
            return 0 if unit.runs_first or unit.replaces_base else 1 if unit.acts_on_input else 2
        return sorted(present, key=rank)  # stable: the active order within a group

    def _refresh(self) -> None:
        self.check_active(self.active)
        run = () if self.disabled else tuple(
            self.adapters[n] for n in self.run_order(self.active) if n not in self.merged
        )
        # Merged in this order, input adjustments multiply the weight as W·A1·A2: the input
        # meets the last merged one first.
        self._pre = tuple(u for u in reversed(run) if u.acts_on_input)
        self._replace = run[0] if run and run[0].replaces_base else None
        self._post = run[1:] if self._replace is not None else run
        lone = self._post[0] if len(self._post) == 1 and not self._pre and self._replace is None else None
        self._fused = (lone,) if lone is not None and lone.fuses_base else ()  # a tuple: not a registered child

    # -- merging ----------------------------------------------------------------------------
    def mergeable_check(self) -> None:
        for name in self.active:
            if name not in self.merged and not self.adapters[name].mergeable:
                why = getattr(self.adapters[name], "merge_refusal", None)
                raise ModelError(f"adapter {name!r} ({type(self.adapters[name]).__name__}) cannot be merged"
                                 + (f": {why}" if why else ""))

    def merge(self, requantize: bool = False) -> list[str]:
        """Fold the active, not yet merged units into the base weights, in their run order;
        returns their names. How is the backend's business (``merging``: in place for a dense
        base; into a dense copy of a 4-bit base, requantized only with ``requantize``)."""
        self.mergeable_check()
        pending = [n for n in self.run_order(self.active) if n not in self.merged]
        if not pending:
            return []
        if self.backend is None:
            self.backend = merging.backend_for(self.base_layer)
            self.base_layer = self.backend.open(self.base_layer)
        for name in pending:
            self.adapters[name].merge_into(self.base_layer)
            self.merged.append(name)
        self.base_layer = self.backend.close(self.base_layer, requantize)
        self._refresh()
        return pending

    @property
    def requantized(self) -> bool:
        """Merged over a 4-bit base and quantized again (``merge(requantize=True)``)."""
        return self.backend is not None and self.backend.requantized

    def unmerge(self) -> None:
        original = self.backend.original() if self.backend is not None else None
        if original is not None:  # the untouched original (a 4-bit base) goes back
            self.base_layer = original
            self.merged.clear()
        while self.merged:
            name = self.merged.pop()
            self.adapters[name].unmerge_from(self.base_layer)
        self.backend = None
        self._refresh()

    # -- the hot path -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._mix is not None:  # a mixed-adapter batch: each row its own adapter (serving)
            return self._mix.run(self, x, args, kwargs)
        if self._fused and not args and not kwargs:
            out = self._fused[0].with_base(x, self.base_layer)
            if out is not None:
                return out
        if self._replace is not None:
            if args or kwargs:  # a replacing unit computes from the input alone (norm layers take nothing else)
                raise ModelError(f"{type(self._replace).__name__} replaces {type(self.base_layer).__name__}, "
                                 f"which was called with more than its input")
            out = self._replace(x, None)
        elif not self._post:
            return self.base_layer(x, *args, **kwargs)
        else:
            base_x = x
            for unit in self._pre:
                base_x, args = unit.adjust_call(base_x, args)
            out = self.base_layer(base_x, *args, **kwargs)
        for unit in self._post:
            out = unit(x, out)
        return out

    # Model code that reads ``layer.weight`` (tied or resized embeddings, dtype checks) sees
    # the base layer's tensors.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, merged={self.merged}"


class SavedModule(Host):
    """A module trained and saved in full per adapter (``modules_to_save``, e.g. a head).

    ``original_module`` stays frozen and is used when no active adapter has a copy.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original_module = original
        self.training = original.training
        self.copies = nn.ModuleDict()
        self.use: str | None = None
        self.disabled = False
        self._mix = None  # set for one call of a mixed-adapter batch (serving)

    def add(self, name: str) -> nn.Module:
        replica = copy.deepcopy(self.original_module)
        for p in replica.parameters():
            p.requires_grad_(True)
        self.copies[name] = replica
        return replica

    def remove(self, name: str) -> None:
        del self.copies[name]
        if self.use == name:
            self.use = None

    def names(self) -> list[str]:
        return list(self.copies)

    def owned(self, name: str) -> nn.Module | None:
        return self.copies[name] if name in self.copies else None

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        return {f"{FILE_PREFIX}{path}.{k}": t for k, t in self.copies[name].state_dict(keep_vars=True).items()}

    def restore(self, merge: bool) -> nn.Module:
        """With ``merge`` the active adapter's trained copy replaces the original."""
        return self.copies[self.use] if merge and self.use is not None else self.original_module

    def set_active(self, names: Iterable[str]) -> None:
        self.use = next((n for n in names if n in self.copies), None)

    def set_disabled(self, disabled: bool) -> None:
        self.disabled = disabled

    def current(self) -> nn.Module:
        if self.disabled or self.use is None:
            return self.original_module
        return self.copies[self.use]

    def forward(self, *args, **kwargs):
        if self._mix is not None:
            return self._mix.run(args, kwargs)
        return self.current()(*args, **kwargs)


HOSTS = (Host,)
