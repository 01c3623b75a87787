"""Each module registers one method with ``peftkit.registry`` when imported."""

from . import bottleneck  # noqa: F401
from . import ia3  # noqa: F401
from . import lora  # noqa: F401
from . import p_tuning  # noqa: F401
from . import prefix_tuning  # noqa: F401
from . import prompt_tuning  # noqa: F401
