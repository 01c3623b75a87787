"""peftkit: parameter-efficient fine-tuning with files interchangeable with Hugging Face PEFT.

    import peftkit
    peftkit.apply(model, peftkit.LoraConfig(r=8, target_modules=["query", "value"]))
    ...train...
    peftkit.save(model, "my-adapter")
"""

from .adapters import TrainableSummary, active_adapters, adapted_modules, delete, disabled, merge, set_active, trainable_summary, unmerge
from .config import PeftConfig
from .errors import AdapterFileError, ConfigError, DataError, ModelError, PeftkitError, PeftkitWarning
from .inject import apply, infer_task_type, unload
from .swap import hotswap, prepare_hotswap
from .io import load, read_config, save
from .merge_report import MergeReport
from .eva import EvaConfig, get_eva_state_dict, initialize_eva, initialize_lora_eva_weights
from .optim import (LoraFAAdamW, create_loraplus_optimizer, create_lorafa_optimizer, freeze_lora_a,
                    lora_plus_param_groups)
from .methods.bottleneck import AdapterConfig
from .methods.combine import combine
from .methods.ia3 import IA3Config
from .methods.lora import LoraConfig
from .methods.p_tuning import PromptEncoderConfig, PTuningConfig
from .methods.prefix_tuning import PrefixTuningConfig
from .methods.prompt_tuning import PromptTuningConfig
from .quant import prepare_for_kbit_training, quantize
from .registry import Method, register

from . import registry as _registry

# Every registered method's config class is peftkit.<ClassName> (LoraConfig, LoHaConfig, ...),
# without a line here per method.
for _method in _registry.all_methods():
    globals().setdefault(_method.config_cls.__name__, _method.config_cls)

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterFileError", "ConfigError", "MergeReport", "IA3Config", "DataError", "LoraConfig", "Method", "ModelError", "PeftConfig",
    "PeftkitError", "PeftkitWarning", "PrefixTuningConfig", "PromptEncoderConfig", "PromptTuningConfig", "PTuningConfig",
    "TrainableSummary", "active_adapters", "adapted_modules", "apply", "combine", "delete", "disabled", "hotswap", "infer_task_type",
    "load", "merge", "prepare_for_kbit_training", "prepare_hotswap", "quantize", "read_config", "register", "save", "set_active", "trainable_summary", "unload", "unmerge",
]
__all__ += ["EvaConfig", "LoraFAAdamW", "create_loraplus_optimizer", "create_lorafa_optimizer", "freeze_lora_a",
            "get_eva_state_dict", "initialize_eva", "initialize_lora_eva_weights", "lora_plus_param_groups"]
__all__ += sorted({m.config_cls.__name__ for m in _registry.all_methods()} - set(__all__))
