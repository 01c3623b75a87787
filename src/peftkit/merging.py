"""Merge backends: how a host layer folds its units into the base layer it wraps.

A backend is chosen for the base layer when merging starts (``backend_for``):

- ``Dense``: the base's own weight is changed in place; unmerging lets each unit take out what
  it put in.
- ``FourBit`` (a bitsandbytes 4-bit layer): the units are folded into a dense copy of the
  dequantized weights (the function the adapter was trained against), which becomes the base
  layer; with ``requantize`` that copy is quantized again. The untouched 4-bit original is kept
  by the backend (not as a submodule: no state_dict keys) and put back by unmerging, exactly.

The host talks only to this interface: ``open`` gives the module to fold units into, ``close``
what the host keeps as its base afterwards, ``original`` what unmerging puts back (None: let
the units subtract themselves).
"""

from __future__ import annotations

import torch.nn as nn

from . import quant


class Dense:
    def open(self, base: nn.Module) -> nn.Module:
        return base

    def close(self, merged: nn.Module, requantize: bool) -> nn.Module:
        return merged

    def original(self) -> nn.Module | None:
        return None

    @property
    def requantized(self) -> bool:
        return False


class FourBit:
    def __init__(self) -> None:
        self._original: nn.Module | None = None
        self._requantized = False

    def open(self, base: nn.Module) -> nn.Module:
        self._original = base
        return quant.dense_copy(base)

    def close(self, merged: nn.Module, requantize: bool) -> nn.Module:
        self._requantized = requantize
        return quant.quantized_copy(merged, self._original) if requantize else merged

    def original(self) -> nn.Module | None:
        return self._original

    @property
    def requantized(self) -> bool:
        return self._requantized


def backend_for(base: nn.Module) -> Dense | FourBit:
    return FourBit() if quant.is_quantized(base) else Dense()
