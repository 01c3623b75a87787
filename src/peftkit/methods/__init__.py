"""Each module registers one method with ``peftkit.registry`` when imported."""

from . import lora  # noqa: F401
