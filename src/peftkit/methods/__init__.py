"""Every module of this package is a method (or a helper such as ``combine``) and registers
itself with ``peftkit.registry`` when imported; a new method is a new file here, found without
being listed. ``peftkit train --method`` lists the methods in this order: the ones named in
``FIRST``, then the others by module name."""

import importlib
import pkgutil

FIRST = ("lora", "ia3", "bottleneck", "prompt_tuning", "p_tuning", "prefix_tuning")

_names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
for _name in [n for n in FIRST if n in _names] + sorted(n for n in _names if n not in FIRST):
    importlib.import_module(f"{__name__}.{_name}")
