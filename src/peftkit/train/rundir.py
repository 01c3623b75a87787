"""The layout of a run directory and of the adapter directory inside it.

    <out>/
      adapter/                  peftkit.save (HF PEFT format) plus two peftkit files:
        adapter_config.json
        adapter_model.safetensors
        labels.json             {"id2label": {"0": name, ...}, "label2id": {name: 0, ...}}
        train_args.json         the run's options and what eval needs (model, max_length, ...)
      ...

An adapter directory from elsewhere (HF PEFT's ``save_pretrained``, ``peftkit.save``) has only
the first two files (or ``adapter_model.bin``, a pickle, read only on request: ``read_weights``).
      metrics.jsonl
      summary.json
      loss.png
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


from .. import AdapterFileError
from ..io import pickle_refusal, read_pickled_tensors
from .methods import settings

ADAPTER_DIR = "adapter"
LABELS_FILE = "labels.json"
ARGS_FILE = "train_args.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # HF PEFT's older format: a pickle, read only with allow_pickle


def default_out(method: str) -> str:
    return os.path.join("runs", f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """``path`` itself when it holds ``adapter_config.json``, else ``path/adapter`` (a run dir)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return path
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    if not path.exists():
        raise AdapterFileError(f"{path}: not found")
    raise AdapterFileError(f"{path}: no {CONFIG_FILE} here nor in {path / ADAPTER_DIR} "
                           "(expected an adapter directory or a peftkit run directory)")


def read_train_args(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """``train_args.json`` of an adapter, or ``{}`` when it has none (an adapter from elsewhere)."""
    path = Path(adapter_dir) / ARGS_FILE
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise AdapterFileError(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
    if not isinstance(data, dict):
        raise AdapterFileError(f"{path}: expected a JSON object")
    return data


def read_weights(adapter_dir: str | os.PathLike, allow_pickle: bool = False
                 ) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """The adapter's weights file and the shape of every tensor in it, the file checked first.

    ``adapter_model.safetensors`` is read (its header: names, shapes, and that the file holds
    all the data it declares); without it, ``adapter_model.bin`` is refused unless
    ``allow_pickle`` (a pickle can run code when it is read), and then read with
    ``torch.load(weights_only=True)``, which accepts tensors and plain containers only.
    Every problem is one ``AdapterFileError`` line naming the file.
    """
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if weights.is_file():
        try:
            with safe_open(str(weights), framework="pt") as f:
                return weights, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
            raise AdapterFileError(f"{weights}: unreadable safetensors file (truncated or not safetensors?): "
                                   f"{_first_line(exc)}") from None
    pickled = adapter_dir / PICKLE_FILE
    if not pickled.is_file():
        raise AdapterFileError(f"{adapter_dir}: no {WEIGHTS_FILE} (nor {PICKLE_FILE}): the adapter's weights "
                               "are missing")
    if not allow_pickle:
        raise AdapterFileError(pickle_refusal(pickled))
    return pickled, {k: tuple(t.shape) for k, t in read_pickled_tensors(pickled).items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def adapter_facts(adapter_dir: str | os.PathLike, allow_pickle: bool = False) -> list[tuple[str, str]]:
    """What ``peftkit info`` prints: (label, value) pairs read from the files alone (and, for
    the labels of an adapter without ``labels.json``, its base model's config)."""
    from .. import read_config
    from .data import LabelMap

    adapter_dir = Path(adapter_dir)
    config = read_config(adapter_dir)
    data = config.to_dict()
    weights, shapes = read_weights(adapter_dir, allow_pickle)
    count = sum(_numel(s) for s in shapes.values())
    method = f"{config.peft_type} (DoRA)" if data.get("use_dora") else config.peft_type
    facts = [("adapter", str(adapter_dir)), ("method", method),
             ("task type", str(config.task_type))]
    if config.base_model_name_or_path:
        facts.append(("base model", config.base_model_name_or_path))
    targets = data.get("target_modules")
    if isinstance(targets, list):
        leaves = sorted({t.rsplit(".", 1)[-1] for t in targets})
        # peftkit writes the adapted modules' full names; HF PEFT the names it was given
        modules = f" ({len(targets)} modules)" if any("." in t for t in targets) else ""
        facts.append(("targets", f"{', '.join(leaves)}{modules}"))
    elif targets is not None:
        facts.append(("targets", str(targets)))
    for label, value in settings(data):
        facts.append((label, f"{value:g}"))
    if data.get("modules_to_save"):
        facts.append(("modules to save", ", ".join(data["modules_to_save"])))
    facts.append(("parameters", f"{count:,} in {len(shapes)} tensors"))
    size = weights.stat().st_size
    facts.append(("file size", f"{_human(size)} ({size:,} bytes, {weights.name})"))
    args = read_train_args(adapter_dir)
    if (adapter_dir / LABELS_FILE).is_file():
        facts.append(("labels", ", ".join(LabelMap.read(adapter_dir / LABELS_FILE).names)))
        facts.append(("labels from", LABELS_FILE))
    else:
        facts += _derived_label_facts(adapter_dir, config, args, shapes)
    if args.get("task"):
        facts.append(("trained for", str(args["task"])))
    elif config.task_type in ("SEQ_CLS", "CAUSAL_LM"):
        facts.append(("trained for", f"{'classify' if config.task_type == 'SEQ_CLS' else 'causal-lm'} "
                                     f"(from task_type {config.task_type})"))
    if args.get("max_length") and args.get("task") != "image-classify":
        facts.append(("max length", str(args["max_length"])))
    summary = adapter_dir.parent / "summary.json"
    if adapter_dir.name == ADAPTER_DIR and summary.is_file():
        try:
            with open(summary, encoding="utf-8") as f:
                s = json.load(f)
            metric = s.get("metric", "accuracy")
            where = f"step {s['adapter_step']}, {s.get('adapter_is', 'last')} adapter; " if "adapter_step" in s else ""
            facts.append((f"eval {metric}", f"{s['eval'][metric]:.4f} on {s['eval']['n']} examples "
                                            f"({where}before training {s['eval_before'][metric]:.4f})"))
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a summary from an interrupted or older run: nothing to add
    return facts


def _derived_label_facts(adapter_dir: Path, config: Any, args: dict[str, Any],
                         shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, str]]:
    """The labels of a classification adapter without ``labels.json``, as eval and merge would
    take them (``adapted.class_labels``), when its base model is at hand; else nothing."""
    from .. import PeftkitError
    from .adapted import CLASS_INDICES, base_model_path, class_labels, task_of

    try:
        model_path, _ = base_model_path(adapter_dir, config, args, None)
        task, _ = task_of(adapter_dir, config, args, model_path)
        if task == "causal-lm":
            return []
        labels = class_labels(adapter_dir, model_path, shapes, task)
    except PeftkitError:
        return []  # the base is not here: info still describes the files
    if labels.source == CLASS_INDICES:
        return [("labels", f"class indices 0..{len(labels.names) - 1}"), ("labels from", labels.source)]
    return [("labels", ", ".join(labels.names.names)),
            ("labels from", f"{labels.source} ({os.path.join(model_path, 'config.json')})")]


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _human(size: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return str(size)  # pragma: no cover
