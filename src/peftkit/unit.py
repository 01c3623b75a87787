"""The ground floor: what a method implements (``Unit``, ``DeltaUnit``) and what the rest of the
core talks to (``Host``). Nothing here imports another peftkit module but ``errors``, so every
other module (targeting, quant, the hosts in ``layer``, the methods) can build on it without an
import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable

import torch
import torch.nn as nn

from .errors import ModelError

# Prefix of every per-module key in HF PEFT's adapter file.
FILE_PREFIX = "base_model.model."


def autocast_on(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type; False for a type autocast does not know
    (``meta``: a model built without memory, e.g. to count or plan), where asking it raises."""
    try:
        return torch.is_autocast_enabled(device.type)
    except RuntimeError:
        return False


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
    folds the units in this order: that unit, then the units adjusting the base's input (which
    therefore scale or rotate W alone, never another unit's update), then the rest, each group in
    the active order; the input meets the adjustments in the reverse order (W·A1·A2·x), so merged
    equals unmerged.
    """

    acts_on_input: ClassVar[bool] = False
    mergeable: ClassVar[bool] = False
    runs_first: ClassVar[bool] = False
    replaces_base: ClassVar[bool] = False
    # The unit can compute the whole layer (base and itself) in one step when it is the layer's
    # only running unit: ``with_base`` returns that output, or None to take the plain path.
    fuses_base: ClassVar[bool] = False

    def with_base(self, x: torch.Tensor, base: nn.Module) -> torch.Tensor | None:
        return None

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

    def release(self, base: nn.Module) -> None:
        """The unit leaves its host unmerged (delete, unload without merging): undo what it did
        to the base layer when it was built, if anything (a PiSSA/OLoRA init's residual)."""

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The unit's tensors keyed by their suffix in HF PEFT's file (``lora_A.weight``)."""
        return {}

    def mix_terms(self) -> "MixTerms | None":
        """What this unit does to one row of a mixed-adapter batch (``serving``), as terms every
        mixable method shares; None: the unit cannot serve rows of a mixed batch."""
        return None

    def mix_sources(self) -> list[torch.Tensor]:
        """The tensors ``mix_terms`` reads (default: the unit's own parameters and buffers, not
        its children's): a batch's stacked terms are rebuilt when one of them changes."""
        return [*self._parameters.values(), *self._buffers.values()]


@dataclass
class MixTerms:
    """A unit's effect on a row, in eval mode, as ``serving`` batches it across adapters:
    ``out = (base(x ⊙ in_scale) + low-rank(x)) ⊙ out_scale + out_shift``, each term optional.

    ``kind`` is the layer kind the low-rank pair is for: ``"linear"`` (A (r, in), B (out, r)),
    ``"embedding"`` (A (r, num_embeddings), B (dim, r)) or ``"conv2d"`` (A a (r, in, kh, kw)
    filter applied with ``conv`` = (stride, padding, dilation), B (out, r)); B carries the
    scaling. Tensors are detached values, not parameters."""

    kind: str = "linear"
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    in_scale: torch.Tensor | None = None  # (in,)
    out_scale: torch.Tensor | None = None  # (out,)
    out_shift: torch.Tensor | None = None  # (out,)
    conv: tuple | None = None


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


def adapter_factory(base: nn.Module, weight: torch.Tensor | None = None) -> dict:
    """``device``/``dtype`` keyword arguments for a unit's new tensors: on the base layer's device,
    in its dtype when that is float32/float64, else in float32 (half-precision and 4-bit bases)."""
    weight = base.weight if weight is None else weight
    dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
    return {"device": weight.device, "dtype": dtype}
