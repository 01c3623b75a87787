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
      model/                    instead of adapter/, a full fine-tuning run's (--method full):
        config.json             transformers' save_pretrained directory (the whole model)
        model.safetensors       (model-0000N-of-0000M.safetensors + its index for a large one)
        tokenizer files         (an image classifier: preprocessor_config.json)
        labels.json, train_args.json   as beside an adapter
      metrics.jsonl
      summary.json
      loss.png

A directory holding ``config.json`` and ``train_args.json`` but no ``adapter_config.json`` is a
full run's model (``is_full_model_dir``); a model ``peftkit merge`` wrote has no ``train_args.json``.
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
MODEL_DIR = "model"  # a full fine-tuning run's whole model (--method full)
MODEL_CONFIG = "config.json"
MODEL_WEIGHTS = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"  # save_pretrained's index of a sharded model
LABELS_FILE = "labels.json"
ARGS_FILE = "train_args.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # HF PEFT's older format: a pickle, read only with allow_pickle


def default_out(method: str) -> str:
    return os.path.join("runs", f"{method}-{time.strftime('%Y%m%d-%H%M%S')}")


def find_adapter_dir(path: str | os.PathLike) -> Path:
    """What ``eval``/``info`` use of ``path``: ``path`` itself when it holds ``adapter_config.json``
    or is a full run's model (``is_full_model_dir``), else ``path/adapter`` or ``path/model`` (a
    run directory)."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() or is_full_model_dir(path):
        return path
    if (path / ADAPTER_DIR / CONFIG_FILE).is_file():
        return path / ADAPTER_DIR
    if is_full_model_dir(path / MODEL_DIR):
        return path / MODEL_DIR
    if not path.exists():
        raise AdapterFileError(f"{path}: not found")
    raise AdapterFileError(f"{path}: no {CONFIG_FILE} here nor in {path / ADAPTER_DIR} "
                           "(expected an adapter directory or a peftkit run directory; a full fine-tuning run "
                           f"has {MODEL_DIR}/ with {MODEL_CONFIG} and {ARGS_FILE})")


def is_full_model_dir(path: str | os.PathLike) -> bool:
    """A full fine-tuning run's model directory: ``config.json`` and ``train_args.json``, and
    no ``adapter_config.json``."""
    path = Path(path)
    return ((path / MODEL_CONFIG).is_file() and (path / ARGS_FILE).is_file()
            and not (path / CONFIG_FILE).is_file())


def model_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory: ``model.safetensors``, or the
    shards its index names; ``AdapterFileError`` when there are none."""
    model_dir = Path(model_dir)
    single = model_dir / MODEL_WEIGHTS
    if single.is_file():
        return [single]
    index = model_dir / MODEL_INDEX
    if index.is_file():
        try:
            with open(index, encoding="utf-8") as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AdapterFileError(f"{index}: not a safetensors index (a 'weight_map' of tensor names to files): "
                                   f"{_first_line(exc)}") from None
        missing = [n for n in names if not (model_dir / n).is_file()]
        if missing:
            raise AdapterFileError(f"{index}: names {', '.join(missing)}, not found in {model_dir}")
        return [model_dir / n for n in names]
    raise AdapterFileError(f"{model_dir}: no {MODEL_WEIGHTS} (nor {MODEL_INDEX}): the model's weights are missing")


def read_model_weights(model_dir: str | os.PathLike) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """(the weights file, or the index of a sharded model; the shape of every tensor), every
    file's header checked as ``read_weights`` checks an adapter's."""
    from safetensors import safe_open

    files = model_weight_files(model_dir)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as exc:  # noqa: BLE001 - any failure here means an unreadable file
            raise AdapterFileError(f"{path}: unreadable safetensors file (truncated or not safetensors?): "
                                   f"{_first_line(exc)}") from None
    return (files[0] if len(files) == 1 else Path(model_dir) / MODEL_INDEX), shapes


def weights_bytes(model_dir: str | os.PathLike) -> int:
    """Bytes of a model directory's safetensors files: what the trained model costs on disk."""
    return sum(p.stat().st_size for p in model_weight_files(model_dir))


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
    the labels of an adapter without ``labels.json``, its base model's config); of a full run's
    model directory, ``model_facts``."""
    from .. import read_config
    from .data import LabelMap

    adapter_dir = Path(adapter_dir)
    if is_full_model_dir(adapter_dir):
        return model_facts(adapter_dir)
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
    return facts + _summary_facts(adapter_dir, ADAPTER_DIR, "adapter")


def _summary_facts(directory: Path, name: str, what: str) -> list[tuple[str, str]]:
    """The run's evaluation from ``summary.json`` beside ``directory`` when it is the run's
    ``name`` (``adapter``/``model``); nothing for a summary of an interrupted or older run."""
    summary = directory.parent / "summary.json"
    if directory.name != name or not summary.is_file():
        return []
    try:
        with open(summary, encoding="utf-8") as f:
            s = json.load(f)
        metric = s.get("metric", "accuracy")
        where = f"step {s['adapter_step']}, {s.get('adapter_is', 'last')} {what}; " if "adapter_step" in s else ""
        return [(f"eval {metric}", f"{s['eval'][metric]:.4f} on {s['eval']['n']} examples "
                                   f"({where}before training {s['eval_before'][metric]:.4f})")]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def model_facts(model_dir: str | os.PathLike) -> list[tuple[str, str]]:
    """What ``peftkit info`` prints for a full fine-tuning run's model directory."""
    from .data import LabelMap

    model_dir = Path(model_dir)
    weights, shapes = read_model_weights(model_dir)
    args = read_train_args(model_dir)
    try:
        with open(model_dir / MODEL_CONFIG, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as exc:
        raise AdapterFileError(f"{model_dir / MODEL_CONFIG}: unreadable: {_first_line(exc)}") from None
    if not isinstance(config, dict):
        raise AdapterFileError(f"{model_dir / MODEL_CONFIG}: expected a JSON object")
    kind = ", ".join(config.get("architectures") or []) or str(config.get("model_type", "unknown"))
    facts = [("model", str(model_dir)),
             ("method", "full fine-tuning (every parameter trained: a whole transformers model, no adapter)"),
             ("architecture", kind)]
    if args.get("model"):
        facts.append(("base model", str(args["model"])))
    count = sum(_numel(s) for s in shapes.values())
    facts.append(("parameters", f"{count:,} in {len(shapes)} tensors"))
    size = weights_bytes(model_dir)
    files = model_weight_files(model_dir)
    facts.append(("file size", f"{_human(size)} ({size:,} bytes, "
                               f"{files[0].name if len(files) == 1 else f'{len(files)} files'})"))
    if (model_dir / LABELS_FILE).is_file():
        facts.append(("labels", ", ".join(LabelMap.read(model_dir / LABELS_FILE).names)))
        facts.append(("labels from", LABELS_FILE))
    if args.get("task"):
        facts.append(("trained for", str(args["task"])))
    if args.get("max_length") and args.get("task") != "image-classify":
        facts.append(("max length", str(args["max_length"])))
    facts.append(("load with", "transformers' from_pretrained (peftkit merge: nothing to merge)"))
    return facts + _summary_facts(model_dir, MODEL_DIR, "model")


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
