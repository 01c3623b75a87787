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
from typing import ClassVar, Iterable

import torch
import torch.nn as nn

from .errors import ModelError

# Prefix of every per-module key in HF PEFT's adapter file.
FILE_PREFIX = "base_model.model."


class Unit(nn.Module):
    """One named adapter inside a host layer. Subclasses override what they need.

    How the active units of one layer compose (the host's rule): units that adjust the input do
    so in the active order before the base runs; then the units run after it in the active
    order, each on the output so far (``forward(x, out)``), except that

    - a unit with ``runs_first`` (DoRA: its magnitude rescales the base weight W, never another
      adapter's update) runs before the others, on the base layer's own output;
    - a unit with ``replaces_base`` (LayerNorm tuning: a trained copy of the layer) computes the
      layer's output itself, ``forward(x, None)``, and the base layer is not called;

    at most one active unit of a layer may have either flag (``ModelError`` otherwise). Merging
    folds the units in the same order, so merged equals unmerged.
    """

    acts_on_input: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    runs_first: ClassVar[bool] = False
    replaces_base: ClassVar[bool] = False

    def adjust_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def adjust_call(self, x: torch.Tensor, args: tuple) -> tuple[torch.Tensor, tuple]:
        """Adjust the base layer's call: the first input and, where a unit needs to, the other
        positional arguments (e.g. the residual that BERT's output block adds)."""
        return self.adjust_input(x), args

    def forward(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:  # noqa: D401
        return out

    def merge_into(self, base: nn.Module) -> None:
        raise ModelError(f"{type(self).__name__} cannot be merged into the base layer")

    def unmerge_from(self, base: nn.Module) -> None:
        raise ModelError(f"{type(self).__name__} cannot be unmerged from the base layer")

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The unit's tensors keyed by their suffix in HF PEFT's file (``lora_A.weight``)."""
        return {}


class DeltaUnit(Unit):
    """A unit whose effect on the layer is an additive weight update ``delta_weight()`` (LoRA,
    DoRA, LoHa, LoKr, ...): merging adds it to the base weight, unmerging subtracts it again.

    ``delta_weight`` is computed again for unmerging (the same inputs give the same tensor, and
    no weight-sized copy is kept); a unit whose update depends on the base weight itself (DoRA's
    norm) sets ``delta_reads_base`` and the tensor it added is kept until it is unmerged."""

    mergeable: ClassVar[bool] = True
    delta_reads_base: ClassVar[bool] = False

    def delta_weight(self) -> torch.Tensor:
        """The update to the base weight, in the base layer's own layout and shape."""
        raise NotImplementedError

    def merge_into(self, base: nn.Module) -> None:
        with torch.no_grad():
            delta = self.delta_weight().detach().to(base.weight.dtype)
            base.weight.add_(delta)
        self._added = delta if self.delta_reads_base else None

    def unmerge_from(self, base: nn.Module) -> None:
        with torch.no_grad():
            delta = getattr(self, "_added", None)
            base.weight.sub_(delta if delta is not None else self.delta_weight().to(base.weight.dtype))
        self._added = None


class Host(nn.Module):
    """What the core needs from anything that holds adapters inside a model.

    ``apply`` creates hosts; ``set_active``, ``disabled``, ``delete``, ``unload`` and the file
    I/O talk to them only through these methods.
    """

    def names(self) -> list[str]:
        raise NotImplementedError

    def remove(self, name: str) -> None:
        raise NotImplementedError

    def set_active(self, names: Iterable[str]) -> None:
        raise NotImplementedError

    def check_active(self, names: Iterable[str]) -> None:
        """Raise ``ModelError`` when ``names`` cannot be active together here (nothing changes)."""

    def set_disabled(self, disabled: bool) -> None:
        raise NotImplementedError

    def owned(self, name: str) -> nn.Module | None:
        """The module that holds adapter ``name``'s parameters here, if any."""
        raise NotImplementedError

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s live tensors keyed as in HF PEFT's file; ``path`` is where the host sits."""
        raise NotImplementedError

    def restore(self, merge: bool) -> nn.Module | None:
        """What goes back at the host's place when it is removed (None: nothing, delete it)."""
        raise NotImplementedError

    def inner(self) -> nn.Module | None:
        """The module whose children continue the model's tree below the host (None: no descent)."""
        return None


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
        self._refresh()

    def file_tensors(self, name: str, path: str) -> dict[str, torch.Tensor]:
        unit = self.adapters[name]
        return {f"{FILE_PREFIX}{path}.{suffix}": t for suffix, t in unit.file_tensors().items()}

    def restore(self, merge: bool) -> nn.Module:
        return self.base_layer

    def inner(self) -> nn.Module:
        return self.base_layer

    def remove(self, name: str) -> None:
        if name in self.merged:
            raise ModelError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; unmerge first")
        super().remove(name)

    def check_active(self, names: Iterable[str]) -> None:
        special = [n for n in names if n in self.adapters
                   and (self.adapters[n].runs_first or self.adapters[n].replaces_base)]
        if len(special) > 1:
            kinds = ", ".join(f"{n!r} ({type(self.adapters[n]).__name__})" for n in special)
            raise ModelError(f"adapters {kinds} cannot be active together on one layer: each rescales or replaces "
                             "the base layer itself; activate one of them")

    def run_order(self, names: Iterable[str]) -> list[str]:
        """``names`` (those present here) in the order the units run and merge (``Unit``'s rule)."""
        present = [n for n in names if n in self.adapters]
        return ([n for n in present if self.adapters[n].runs_first or self.adapters[n].replaces_base]
                + [n for n in present if not (self.adapters[n].runs_first or self.adapters[n].replaces_base)])

    def _refresh(self) -> None:
        self.check_active(self.active)
        run = () if self.disabled else tuple(
            self.adapters[n] for n in self.run_order(self.active) if n not in self.merged
        )
        self._pre = tuple(u for u in run if u.acts_on_input)
        self._replace = run[0] if run and run[0].replaces_base else None
        self._post = run[1:] if self._replace is not None else run

    # -- merging ----------------------------------------------------------------------------
    def mergeable_check(self) -> None:
        for name in self.active:
            if name not in self.merged and not self.adapters[name].mergeable:
                raise ModelError(f"adapter {name!r} ({type(self.adapters[name]).__name__}) cannot be merged")

    def merge(self, requantize: bool = False) -> list[str]:
        """Fold the active, not yet merged units into the base weights; returns their names.

        A 4-bit base is swapped for a dense copy of its dequantized weights first (the function
        the units were trained against), and quantized again only with ``requantize``; the
        original 4-bit module is kept aside so that ``unmerge`` restores it exactly.
        """
        from . import quant

        self.mergeable_check()
        pending = [n for n in self.run_order(self.active) if n not in self.merged]
        if not pending:
            return []
        if quant.is_quantized(self.base_layer):
            self.__dict__["_quantized"] = self.base_layer  # not a submodule: no state_dict keys
            self.base_layer = quant.dense_copy(self.base_layer)
        for name in pending:
            self.adapters[name].merge_into(self.base_layer)
            self.merged.append(name)
        original = self.__dict__.get("_quantized")
        if requantize and original is not None:
            self.base_layer = quant.quantized_copy(self.base_layer, original)
        self._refresh()
        return pending

    @property
    def requantized(self) -> bool:
        """Merged over a 4-bit base and quantized again (``merge(requantize=True)``)."""
        from . import quant

        return "_quantized" in self.__dict__ and quant.is_quantized(self.base_layer)

    def unmerge(self) -> None:
        original = self.__dict__.pop("_quantized", None)
        if original is not None:  # the 4-bit original was never changed
            self.base_layer = original
            self.merged.clear()
        while self.merged:
            name = self.merged.pop()
            self.adapters[name].unmerge_from(self.base_layer)
        self._refresh()

    # -- the hot path -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._replace is not None:
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
        return self.current()(*args, **kwargs)


HOSTS = (Host,)
