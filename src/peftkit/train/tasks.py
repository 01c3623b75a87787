"""The tasks ``peftkit train`` knows, and which one a data set is for.

    classify        text classification: CSV/TSV/JSONL with ``text`` (+ ``text_pair``) and ``label``
    causal-lm       instruction tuning / language modelling: JSONL with ``prompt``+``response``,
                    ``messages`` (chat) or ``text``
    image-classify  a folder of class folders of images (``DIR/<label>/*.png``)

Each task lives in its own module and is imported only when used.
"""

from __future__ import annotations

import importlib
import os

from .. import ConfigError, DataError
from .data import LABEL_KEY, format_of, json_object, read_text
from .options import TASKS, TrainOptions
from .task import Task

MODULES = {
    "classify": ("peftkit.train.classify", "ClassifyTask"),
    "causal-lm": ("peftkit.train.causal_lm", "CausalLMTask"),
    "image-classify": ("peftkit.train.image_classify", "ImageClassifyTask"),
}
assert set(MODULES) == set(TASKS)
LM_KEYS = ("prompt", "response", "messages", "text")


def module_of(task: str):
    return importlib.import_module(MODULES[task][0])


def make_task(options: TrainOptions) -> Task:
    name = options.task or infer_task(options.data)
    if name not in MODULES:
        raise ConfigError(f"--task: expected one of {', '.join(MODULES)}, found {name!r}")
    module = module_of(name)
    return getattr(module, MODULES[name][1])(options)


def infer_task(data: str | None) -> str:
    """The task a data set is for: a folder of class folders is image-classify; a file whose
    first record has a ``label`` is classify; ``prompt``/``response``, ``messages`` or only
    ``text`` is causal-lm. No data: the bundled demo (classify)."""
    if data is None:
        return "classify"
    if os.path.isdir(data):
        return "image-classify"
    text = read_text(data)
    if not text.strip():
        raise DataError(f"{data}: file is empty")
    if format_of(data, text) != "jsonl":
        return "classify"  # CSV/TSV: only classification reads them (its reader names a missing column)
    keys = _first_record_keys(data, text)
    if LABEL_KEY in (k.lower() for k in keys):  # the classification reader ignores case
        return "classify"
    if any(k in keys for k in LM_KEYS):  # the causal-LM reader does not
        return "causal-lm"
    found = ", ".join(repr(k) for k in keys) or "none"
    raise DataError(f"{data}: cannot tell the task from the first record (fields {found}): expected 'label' "
                    "(classify), 'prompt'/'response', 'messages' or 'text' (causal-lm); or pass --task")


def _first_record_keys(name: str, text: str) -> list[str]:
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            return [str(k) for k in json_object(name, number, line)]
    return []
