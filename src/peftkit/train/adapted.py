"""Using a trained adapter: its base model rebuilt as in training, with the adapter loaded.

Every task's ``eval``, ``merge`` (and ``generate``) starts here, on any adapter directory HF
PEFT can load: one ``peftkit train`` wrote, one ``PeftModel.save_pretrained`` or
``peftkit.save`` wrote. ``resolve`` reads and checks the files first (``adapter_config.json``
parses, the weights file is readable; a pickle only on request), so that a broken file is
reported as that, and then works out what the files do not say when no ``train_args.json`` is
there:

- the base model: ``--model``, else ``train_args.json``'s, else the config's
  ``base_model_name_or_path`` when that is a local directory;
- the task: ``train_args.json``'s, else the config's ``task_type`` (SEQ_CLS: classify,
  CAUSAL_LM: causal-lm; FEATURE_EXTRACTION or none over an image classifier: image-classify);
- for the classification tasks, the labels (``class_labels``): ``labels.json``, else the base
  config's ``id2label`` unless its names are transformers' defaults (``LABEL_0``, ...), else
  class indices (the data's labels are the head's output numbers); how many there are comes
  from the adapter's saved head (its ``modules_to_save`` copy) when the file holds one.

The task then says how to build its base model (``build(source)``) and the adapter is loaded
into it (``peftkit.load``: keys and shapes checked, errors naming the key).

A full fine-tuning run (``--method full``) has no adapter: its ``model/`` (or the run directory
holding it) resolves to a ``Source`` with ``full`` set whose ``model_path`` is that directory, so
the task's ``build(source)`` loads the trained model itself and nothing is loaded into it; its
task and labels come from its ``train_args.json`` and ``labels.json`` as an adapter's do. It
cannot be merged (``Source.check_mergeable``): it is a whole model already.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

import peftkit

from .. import AdapterFileError, ConfigError, DataError, ModelError, atomic
from . import rundir
from .data import Example, LabelMap
from .models import first_line, resolve_model
from .options import base_quant_type

# Where the label mapping came from (``peftkit eval``'s "labels_from").
LABELS_JSON = rundir.LABELS_FILE
BASE_ID2LABEL = "base config id2label"
CLASS_INDICES = "class indices"

# HF PEFT's task types and the tasks they are; FEATURE_EXTRACTION (or none) over an image
# classifier is image-classify (HF PEFT has no task type for images).
TASK_TYPES = {"SEQ_CLS": "classify", "CAUSAL_LM": "causal-lm"}
_IMAGE_TASK_TYPES = (None, "FEATURE_EXTRACTION")
_DEFAULT_NAME = re.compile(r"LABEL_(\d+)")
_INDEX = re.compile(r"[+-]?\d+")
# A label count no real head has: the outputs of a model built with it are the label outputs.
_PROBE_LABELS = 7919


@dataclass(frozen=True)
class Labels:
    """The label mapping of a classification adapter and where it came from."""

    names: LabelMap  # in id order: the names the data uses ("0", "1", ... for class indices)
    source: str  # LABELS_JSON, BASE_ID2LABEL or CLASS_INDICES
    where: str  # for messages: "runs/x/adapter/labels.json", "the base config's id2label (DIR)", ...
    note: str = ""  # why, when it is not the obvious source

    @property
    def config_names(self) -> LabelMap:
        """The names for the model's config (transformers' ``LABEL_i`` for class indices)."""
        if self.source == CLASS_INDICES:
            return LabelMap(tuple(f"LABEL_{i}" for i in range(len(self.names))))
        return self.names

    def line(self) -> str:
        """The console line: ``labels: a, b, c (from labels.json)``."""
        if self.source == CLASS_INDICES:
            text = (f"labels: class indices 0..{len(self.names) - 1} (no {rundir.LABELS_FILE}; "
                    f"{self.note or 'the base config has only the default names LABEL_i'})")
        else:
            text = f"labels: {', '.join(self.names.names)} (from {self.where})"
        return text

    def examples(self, examples: Sequence[Example], source: str) -> list[Example]:
        """``examples`` checked against this mapping; for class indices with their labels
        written as the index (``"01"`` -> ``"1"``). ``DataError`` names the file and line."""
        if self.source == LABELS_JSON:
            return list(examples)  # LabelMap.ids names an unknown label ("not in the training data")
        k = len(self.names)
        out = []
        known = self.names.label2id
        for e in examples:
            if self.source == BASE_ID2LABEL:
                if e.label not in known:
                    raise DataError(f"{source} line {e.line}: label {e.label!r} is not one of the base model's "
                                    f"labels (its config's id2label: {', '.join(map(repr, self.names.names))}; "
                                    f"the adapter has no {rundir.LABELS_FILE})")
                out.append(e)
                continue
            if not _INDEX.fullmatch(e.label.strip()):
                raise DataError(f"{source} line {e.line}: label {e.label!r} is not a class index: the adapter has no "
                                f"{rundir.LABELS_FILE} and its base config names no labels, so the data's labels "
                                f"must be the integers 0..{k - 1}")
            index = int(e.label)
            if not 0 <= index < k:
                raise DataError(f"{source} line {e.line}: label {e.label!r} is not a class index of the adapter's "
                                f"{k}-output head (0..{k - 1})")
            out.append(Example(e.text, str(index), e.line, e.pair))
        return out


@dataclass
class Source:
    """An adapter directory, checked, with what using it needs (module docstring)."""

    adapter_dir: Path
    config: Any  # the peftkit config read from adapter_config.json
    args: dict[str, Any]  # train_args.json ({} for an adapter from elsewhere)
    weights: Path  # adapter_model.safetensors (or adapter_model.bin, with allow_pickle)
    shapes: dict[str, tuple[int, ...]]  # of every tensor in the weights file
    model_path: str  # the base model's directory
    model_from: str  # "--model", "train_args.json", "base_model_name_or_path"
    task: str  # classify, causal-lm, image-classify
    task_from: str  # "train_args.json", "task_type SEQ_CLS", ...
    allow_pickle: bool = False
    _labels: Labels | None = field(default=None, repr=False)
    # a full fine-tuning run's model directory: ``adapter_dir`` and ``model_path`` are both that
    # directory, ``config`` is None, ``weights``/``shapes`` its safetensors
    full: bool = False

    def labels(self) -> Labels:
        """The label mapping (classification tasks), worked out once."""
        if self._labels is None:
            self._labels = class_labels(self.adapter_dir, self.model_path, self.shapes, self.task)
        return self._labels

    def line(self) -> str:
        if self.full:
            return (f"model: {self.adapter_dir} (full fine-tuning of {self.args.get('model')}; {self.task}, from "
                    f"{self.task_from})")
        return (f"adapter: {self.adapter_dir} ({self.task}, from {self.task_from}); base model: {self.model_path} "
                f"(from {self.model_from})")

    def check_mergeable(self) -> None:
        """``ConfigError`` for a full fine-tuning run: there is no adapter to fold in."""
        if self.full:
            raise ConfigError(f"{self.adapter_dir}: a full fine-tuning run's model is already a whole model "
                              f"(load it with transformers' from_pretrained); there is no adapter to merge")


def resolve(adapter: str | os.PathLike | Source, model: str | None = None, allow_pickle: bool = False) -> Source:
    """Check an adapter directory (or a run directory holding ``adapter/``) and find its base
    model and task (module docstring). Raises a ``PeftkitError`` naming the file at fault."""
    if isinstance(adapter, Source):
        return adapter
    adapter_dir = rundir.find_adapter_dir(adapter)
    if rundir.is_full_model_dir(adapter_dir):
        return _resolve_full(adapter_dir, model)
    config = peftkit.read_config(adapter_dir)  # a bad adapter is reported before anything else
    weights, shapes = rundir.read_weights(adapter_dir, allow_pickle)
    args = rundir.read_train_args(adapter_dir)
    model_path, model_from = base_model_path(adapter_dir, config, args, model)
    task, task_from = task_of(adapter_dir, config, args, model_path)
    return Source(adapter_dir, config, args, weights, shapes, model_path, model_from, task, task_from, allow_pickle)


def _resolve_full(model_dir: Path, model: str | None) -> Source:
    """A full run's model directory, checked: weights readable, a task in ``train_args.json``."""
    if model:
        raise ConfigError(f"--model {model}: {model_dir} is a full fine-tuning run's model, a whole model with no "
                          "base to give; drop --model")
    weights, shapes = rundir.read_model_weights(model_dir)
    args = rundir.read_train_args(model_dir)
    if not args.get("task"):
        raise AdapterFileError(f"{model_dir / rundir.ARGS_FILE}: names no task (a full run's model directory "
                               "records the task it was trained for)")
    task, task_from = task_of(model_dir, None, args, str(model_dir))
    return Source(model_dir, None, args, weights, shapes, str(model_dir), "the run's model", task, task_from,
                  full=True)


def base_model_path(adapter_dir: Path, config: Any, args: dict[str, Any], model: str | None) -> tuple[str, str]:
    """(the base model's directory, where the name came from)."""
    if model:
        return resolve_model(model), "--model"
    if args.get("model"):
        return resolve_model(str(args["model"])), rundir.ARGS_FILE
    recorded = getattr(config, "base_model_name_or_path", None)
    if recorded and os.path.isdir(recorded):
        return resolve_model(recorded), "base_model_name_or_path"
    why = (f"its base_model_name_or_path {recorded!r} is not a local directory" if recorded
           else f"its {rundir.CONFIG_FILE} names no base_model_name_or_path")
    raise ConfigError(f"{adapter_dir}: no {rundir.ARGS_FILE} says which model it was trained on and {why}; "
                      "pass --model with the base model's directory")


def task_of(adapter_dir: Path, config: Any, args: dict[str, Any], model_path: str) -> tuple[str, str]:
    """(the task, where it came from): ``train_args.json``, else the config's ``task_type``."""
    from .tasks import MODULES

    task = args.get("task")
    if task:
        task = "classify" if task == "SEQ_CLS" else str(task)  # train_args.json of peftkit 0.1 runs
        if task not in MODULES:
            raise AdapterFileError(f"{adapter_dir / rundir.ARGS_FILE}: task {task!r} is not one this peftkit knows "
                                   f"({', '.join(MODULES)})")
        return task, rundir.ARGS_FILE
    task_type = getattr(config, "task_type", None)
    if task_type in TASK_TYPES:
        return TASK_TYPES[task_type], f"task_type {task_type}"
    config_file = adapter_dir / rundir.CONFIG_FILE
    known = "peftkit uses SEQ_CLS (classify) and CAUSAL_LM (causal-lm) adapters, and adapters of an image classifier"
    if task_type not in _IMAGE_TASK_TYPES:
        raise ConfigError(f"{config_file}: task_type {task_type}: {known}")
    kind = image_classifier_kind(model_path)
    if kind is None:
        return "image-classify", f"task_type {task_type or 'null'} over an image classifier"
    raise ConfigError(f"{config_file}: task_type {task_type or 'null'} and the base {model_path} is a {kind} model, "
                      f"not an image classifier, so the task is unknown ({known}); pass --model with the image "
                      "classifier the adapter was trained on")


def image_classifier_kind(model_path: str) -> str | None:
    """None when ``model_path`` holds an image classifier, else its ``model_type``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_path}: cannot read the model's config: {first_line(exc)}") from None
    return None if type(config) in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING else str(config.model_type)


# -- labels -------------------------------------------------------------------------------


def _auto_class(task: str):
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    return AutoModelForImageClassification if task == "image-classify" else AutoModelForSequenceClassification


def saved_head(model_path: str, shapes: dict[str, tuple[int, ...]], task: str) -> tuple[str, int] | None:
    """(the key, its number of outputs) of the classification head the adapter file holds
    (its ``modules_to_save`` copy: ``base_model.model.classifier.weight``,
    ``…classifier.out_proj.weight``, ``…score.weight``, ...), or None when it holds none.

    Found for any architecture: the model is built on the meta device (no memory, no weights)
    with a label count no real head has, and its parameters of that size are the head's."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path, num_labels=_PROBE_LABELS)
        with torch.device("meta"):
            probe = _auto_class(task).from_config(config)
    except Exception:  # noqa: BLE001 - a model that cannot be probed: the label count comes from its config
        return None
    for name, param in probe.named_parameters():
        if param.dim() >= 1 and param.shape[0] == _PROBE_LABELS:
            # weight-side methods; prompt methods; a full run's whole model
            for prefix in ("base_model.model.", "base_model.", ""):
                shape = shapes.get(prefix + name)
                if shape:
                    return prefix + name, int(shape[0])
    return None


def class_labels(adapter_dir: Path, model_path: str, shapes: dict[str, tuple[int, ...]], task: str) -> Labels:
    """The labels of a classification adapter (module docstring)."""
    head = saved_head(model_path, shapes, task)
    path = Path(adapter_dir) / rundir.LABELS_FILE
    if path.is_file():
        names = LabelMap.read(path)
        if head is not None and head[1] != len(names):
            raise AdapterFileError(f"{path}: names {len(names)} labels, but the adapter's saved head {head[0]} has "
                                   f"{head[1]} outputs")
        return Labels(names, LABELS_JSON, str(path))
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{model_path}: cannot read the model's config: {first_line(exc)}") from None
    id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    names = tuple(id2label.get(i, f"LABEL_{i}") for i in range(len(id2label)))
    count = head[1] if head is not None else len(names)
    default = all(_DEFAULT_NAME.fullmatch(n) and int(_DEFAULT_NAME.fullmatch(n).group(1)) == i
                  for i, n in enumerate(names))
    note = ""
    if not default:
        if len(names) == count and len(set(names)) == count:
            return Labels(LabelMap(names), BASE_ID2LABEL,
                          f"the base config's id2label, {os.path.join(model_path, 'config.json')}")
        note = (f"the base config's id2label names {len(names)} labels but the saved head {head[0]} has {count} "
                "outputs" if head is not None else "the base config's id2label has repeated names")
    return Labels(LabelMap(tuple(str(i) for i in range(count))), CLASS_INDICES, "class indices", note)


# -- the adapted model --------------------------------------------------------------------


@dataclass
class Adapted:
    model: torch.nn.Module  # the base with the adapter loaded, in eval mode
    args: dict[str, Any]  # train_args.json ({} for an adapter from elsewhere)
    adapter_dir: Path
    model_path: str  # the base model's directory
    source: Source | None = None


def load_adapted(adapter: str | os.PathLike | Source, model: str | None, device: torch.device,
                 build: Callable[[Source], torch.nn.Module], quantized: bool = False,
                 allow_pickle: bool = False) -> Adapted:
    """The base model (``model``, else the one the adapter was trained on) with the adapter loaded.

    ``adapter``: a directory (checked by ``resolve``) or a ``Source`` already resolved.
    ``build(source)`` returns the task's base model in float32 on ``device``. A run trained over a
    4-bit base (its options say so, or ``quantized``) gets the same 4-bit base back: the
    function the adapter was trained against.
    """
    source = resolve(adapter, model, allow_pickle)
    base = build(source)
    if source.full:  # build() loaded the trained model itself (source.model_path is its directory)
        base.eval()
        return Adapted(base, source.args, source.adapter_dir, source.model_path, source)
    run = source.args.get("options") if isinstance(source.args.get("options"), dict) else {}
    quant_type = base_quant_type(run.get("method"), run.get("quantize")) or ("nf4" if quantized else None)
    from ..methods import lora_init

    late = bool(quant_type) and lora_init.quantizes_after(peftkit.read_config(source.adapter_dir))
    if quant_type and not late:  # PiSSA/LoftQ: their init runs on the float base, quantized after (as trained)
        peftkit.quantize(base, quant_type=quant_type)
    peftkit.load(base, source.adapter_dir, allow_pickle=source.allow_pickle)
    if late:
        lora_init.quantize_base(base, quant_type=quant_type)
    base.eval()
    return Adapted(base, source.args, source.adapter_dir, source.model_path, source)


def eval_data_of(args: dict[str, Any], data: str | None, default: str | None = None) -> tuple[str, bool]:
    """What to evaluate on and whether to take its held-out part: ``data`` when given; else the
    run's ``--eval-data``; else the part of its ``--data`` held out with the run's seed and
    fraction; else ``default`` (the bundled demo's evaluation file)."""
    if data:
        return data, False
    if args.get("eval_data"):
        return str(args["eval_data"]), False
    if args.get("data"):
        return str(args["data"]), True
    if default is not None and args:
        return default, False
    raise ConfigError(f"the adapter has no {rundir.ARGS_FILE} naming its evaluation data; pass --data")


def merged_model(adapted: Adapted, console: Any) -> torch.nn.Module:
    """The adapter folded into its base: a plain (dense) transformers model, merge error reported."""
    if adapted.source is not None:
        adapted.source.check_mergeable()
    report = peftkit.merge(adapted.model)
    console.info(str(report))
    return peftkit.quant.dequantize(peftkit.unload(adapted.model, merge=True))


def write_out_dir(out: str, fill: Callable[[Path], None], keep: Sequence[str | os.PathLike] = ()) -> Path:
    """Write merge's ``--out`` as a whole: ``fill(tmp)`` builds it in a hidden temporary sibling,
    which is then renamed into place (``peftkit.atomic.write_dir``), so a failure leaves no
    half-written model directory (and an earlier one whole).

    Since the directory is replaced, not added to, ``--out`` must be new, empty, or a model
    directory (``config.json``) that is not one of ``keep`` (the base, the adapter) nor holds
    one, nor the working directory."""
    final = Path(out)
    if final.exists() or final.is_symlink():
        if not final.is_dir():
            raise ConfigError(f"--out {out}: exists and is not a directory")
        real = Path(os.path.realpath(final))
        for other in [os.getcwd(), *keep]:
            other = Path(os.path.realpath(other))
            if real == other or real in other.parents:
                raise ConfigError(f"--out {out}: is (or holds) {other}; merge replaces --out as a whole, so give "
                                  "it a new directory")
        if any(final.iterdir()) and (not (final / "config.json").is_file()
                                     or (final / rundir.CONFIG_FILE).is_file()):
            raise ConfigError(f"--out {out}: exists and is not a model directory; merge replaces --out as a whole, "
                              "so give it a new or empty directory (or a model directory merge wrote)")
    return atomic.write_dir(final, fill)
