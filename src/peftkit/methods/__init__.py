"""Each module registers one method with ``peftkit.registry`` when imported; the import order
is the order of ``peftkit train --method``'s choices."""

from . import lora  # noqa: F401
from . import ia3  # noqa: F401
from . import bottleneck  # noqa: F401
from . import prompt_tuning  # noqa: F401
from . import p_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
