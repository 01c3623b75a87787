"""Labelled text files: reading and checking them, the label mapping, hold-out split, batches.

Formats, chosen by the file's extension:

- ``.csv`` (comma) and ``.tsv`` / ``.tab`` (tab): a header line, then one example per row.
- ``.jsonl`` / ``.ndjson`` / ``.json``: JSON Lines, one object per line; blank lines are skipped.
- anything else: JSON Lines when the first character is ``{``, else TSV when the first line
  holds a tab, else CSV.

The text is in a ``text`` column/field (or ``sentence``, ``sentence1``), the label in ``label``
(column names compare case-insensitively). Sentence pairs (entailment, paraphrase) put the second
text in ``text_pair`` (or ``sentence2``); the tokenizer joins the two as the model expects
(``[CLS] a [SEP] b [SEP]`` for BERT). Every example of a file with pairs must have one. Labels may be strings or integers; both are kept as strings
(``1`` and ``"1"`` are the same label). Every problem raises ``DataError`` naming the file and,
where there is one, the line (1-based; the CSV header is line 1).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from .. import AdapterFileError, DataError

TEXT_KEYS = ("text", "sentence", "sentence1")
PAIR_KEYS = ("text_pair", "sentence2")
LABEL_KEY = "label"
HOLDOUT_FRACTION = 0.2
DEMO_DIR = Path(__file__).resolve().parent.parent / "data"
DEMO_TRAIN = DEMO_DIR / "demo_train.csv"
DEMO_EVAL = DEMO_DIR / "demo_eval.csv"

_EXPECTED = "expected a 'text' (or 'sentence') and a 'label' column"


@dataclass(frozen=True)
class Example:
    text: str
    label: str  # the label as written, as a string
    line: int  # where it is in the source file (1-based)
    pair: str | None = None  # the second text of a sentence pair


# -- reading ------------------------------------------------------------------------------


def read_examples(path: str | os.PathLike) -> list[Example]:
    """All examples of a CSV/TSV/JSONL file; raises ``DataError`` for anything malformed."""
    name = os.fspath(path)
    text = read_text(name)
    if not text.strip():
        raise DataError(f"{name}: file is empty ({_EXPECTED} and at least one example)")
    kind = format_of(name, text)
    examples = _read_jsonl(name, text) if kind == "jsonl" else _read_delimited(name, text, kind)
    if not examples:
        raise DataError(f"{name}: no examples (only a header line)" if kind != "jsonl" else f"{name}: no examples")
    return examples


def read_text(name: str) -> str:
    if not os.path.exists(name):
        raise DataError(f"{name}: file not found")
    if os.path.isdir(name):
        raise DataError(f"{name}: is a directory, expected a CSV, TSV or JSONL file")
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise DataError(f"{name}: cannot read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{name} line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x})") from None


def format_of(name: str, text: str) -> str:
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    head = text.lstrip()
    if head.startswith("{"):
        return "jsonl"
    return "tsv" if "\t" in head.splitlines()[0] else "csv"


def _read_delimited(name: str, text: str, kind: str) -> list[Example]:
    delimiter = "\t" if kind == "tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = None
        while header is None:
            row = next(reader, None)
            if row is None:
                return []
            if any(cell.strip() for cell in row):
                header = [cell.strip() for cell in row]
        header_line = reader.line_num
        lowered = [h.lower() for h in header]
        text_col = next((lowered.index(k) for k in TEXT_KEYS if k in lowered), None)
        label_col = lowered.index(LABEL_KEY) if LABEL_KEY in lowered else None
        pair_col = next((lowered.index(k) for k in PAIR_KEYS if k in lowered), None)
        if text_col is None or label_col is None:
            missing = "'text' (or 'sentence')" if text_col is None else f"'{LABEL_KEY}'"
            found = ", ".join(repr(h) for h in header) or "none"
            raise DataError(f"{name} line {header_line}: no {missing} column; found columns {found}; {_EXPECTED}"
                            + (" (is it a TSV file? name it .tsv)" if kind == "csv" and "\t" in text[:200] else ""))
        examples = []
        for row in reader:
            line = reader.line_num
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(row) > len(header):
                raise DataError(
                    f"{name} line {line}: {len(row)} fields but the header has {len(header)} "
                    f"(quote a text that contains {'a tab' if delimiter == chr(9) else 'a comma'})"
                )
            columns = [(text_col, header[text_col]), (label_col, LABEL_KEY)]
            if pair_col is not None:
                columns.append((pair_col, header[pair_col]))
            for col, what in columns:
                if col >= len(row):
                    raise DataError(f"{name} line {line}: missing {what!r} column "
                                    f"(the row has {len(row)} field{'s' * (len(row) != 1)}, the header {len(header)})")
            pair = row[pair_col] if pair_col is not None else None
            examples.append(_example(name, line, row[text_col], row[label_col], pair))
        return examples
    except csv.Error as exc:
        raise DataError(f"{name} line {reader.line_num}: malformed {kind.upper()}: {exc}") from None


def _read_jsonl(name: str, text: str) -> list[Example]:
    examples: list[Example] = []
    for line, raw in enumerate(io.StringIO(text, newline=None), 1):
        if not raw.strip():
            continue
        obj = json_object(name, line, raw)
        keys = {k.lower(): k for k in obj}
        text_key = next((keys[k] for k in TEXT_KEYS if k in keys), None)
        label_key = keys.get(LABEL_KEY)
        if text_key is None or label_key is None:
            missing = "'text' (or 'sentence')" if text_key is None else f"'{LABEL_KEY}'"
            found = ", ".join(repr(k) for k in obj) or "none"
            raise DataError(f"{name} line {line}: missing {missing} field; found fields {found}")
        value = obj[text_key]
        if not isinstance(value, str):
            raise DataError(f"{name} line {line}: {text_key!r} must be a string, found {json_type(value)}")
        label = obj[label_key]
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise DataError(f"{name} line {line}: label must be a string or an integer, found {json.dumps(label)}")
        pair_key = next((keys[k] for k in PAIR_KEYS if k in keys), None)
        pair = obj[pair_key] if pair_key is not None else None
        if pair is not None and not isinstance(pair, str):
            raise DataError(f"{name} line {line}: {pair_key!r} must be a string, found {json_type(pair)}")
        if examples and (pair is None) != (examples[0].pair is None):
            first = examples[0]
            raise DataError(f"{name} line {line}: " + (f"no 'text_pair' (or 'sentence2') field, but line {first.line} has one"
                            if pair is None else f"has {pair_key!r} but line {first.line} has no second text")
                            + "; every example of a sentence-pair file needs both texts")
        examples.append(_example(name, line, value, str(label), pair))
    return examples


def json_object(name: str, line: int, raw: str, expected: str = "a JSON object") -> dict[str, Any]:
    """One line of a JSON Lines file, which must hold an object; ``DataError`` naming file and line."""
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        hint = " (expected JSON Lines: one object per line, not one JSON array)" if raw.lstrip().startswith("[") else ""
        raise DataError(f"{name} line {line}: invalid JSON: {exc.msg} at column {exc.colno}{hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{name} line {line}: expected {expected}, found {json_type(obj)}")
    return obj


def _example(name: str, line: int, text: str, label: str, pair: str | None = None) -> Example:
    label = label.strip()
    if not label:
        raise DataError(f"{name} line {line}: label '' is empty")
    if not text.strip():
        raise DataError(f"{name} line {line}: text is empty")
    if pair is not None and not pair.strip():
        raise DataError(f"{name} line {line}: the second text (text_pair) is empty")
    return Example(text=text, label=label, line=line, pair=pair)


def json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# -- labels -------------------------------------------------------------------------------

_INT = re.compile(r"-?\d+")


@dataclass(frozen=True)
class LabelMap:
    """Label names in id order. Integer labels sort by value (``0..K-1`` keep their ids);
    other labels sort as strings."""

    names: tuple[str, ...]

    @classmethod
    def from_examples(cls, examples: Sequence[Example], source: str) -> "LabelMap":
        found = {e.label for e in examples}
        if len(found) < 2:
            raise DataError(f"{source}: found {len(found)} distinct label ({', '.join(map(repr, found))}); "
                            "classification needs at least 2")
        if all(_INT.fullmatch(x) for x in found):
            ordered = sorted(found, key=int)
        else:
            ordered = sorted(found)
        return cls(tuple(ordered))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def ids(self, examples: Sequence[Example], source: str) -> list[int]:
        """Label ids of ``examples``; a label the map does not know is a ``DataError``."""
        index = self.label2id
        out = []
        for e in examples:
            if e.label not in index:
                known = ", ".join(repr(n) for n in self.names)
                raise DataError(f"{source} line {e.line}: label {e.label!r} was not in the training data "
                                f"(known labels: {known})")
            out.append(index[e.label])
        return out

    def to_json(self) -> dict[str, Any]:
        return {"id2label": {str(i): n for i, n in enumerate(self.names)}, "label2id": self.label2id}

    @classmethod
    def read(cls, path: str | os.PathLike) -> "LabelMap":
        """Read ``labels.json`` as written by ``to_json``."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise AdapterFileError(f"{path}: not found (the label mapping peftkit train saves with the adapter)")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            id2label = data["id2label"]
            names = tuple(str(id2label[str(i)]) for i in range(len(id2label)))
        except json.JSONDecodeError as exc:
            raise AdapterFileError(f"{path} line {exc.lineno}: invalid JSON: {exc.msg}") from None
        except (KeyError, TypeError, AttributeError):
            raise AdapterFileError(f"{path}: expected {{\"id2label\": {{\"0\": name, ...}}}} with ids 0..K-1") from None
        if len(names) < 2 or len(set(names)) != len(names):
            raise AdapterFileError(f"{path}: expected at least 2 distinct labels, found {list(names)}")
        return cls(names)


# -- hold-out split -----------------------------------------------------------------------


def split_holdout(examples: Sequence[Example], fraction: float, seed: int, source: str
                  ) -> tuple[list[Example], list[Example]]:
    """Hold out ``fraction`` of each label's examples (rounded; at least one example overall,
    never a label's last one), chosen by a shuffle seeded with ``seed``. Both parts keep the
    file's order. Same file + same seed -> same split."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = {}
    for i, e in enumerate(examples):
        by_label.setdefault(e.label, []).append(i)
    held: set[int] = set()
    for label in sorted(by_label):
        idx = by_label[label][:]
        rng.shuffle(idx)
        k = min(int(len(idx) * fraction + 0.5), len(idx) - 1)
        held.update(idx[:k])
    if not held:
        biggest = max(sorted(by_label), key=lambda lab: len(by_label[lab]))
        if len(by_label[biggest]) < 2:
            raise DataError(f"{source}: too few examples to hold out an evaluation set; pass --eval-data")
        held.add(by_label[biggest][-1])
    train = [e for i, e in enumerate(examples) if i not in held]
    evaluation = [e for i, e in enumerate(examples) if i in held]
    return train, evaluation


# -- tensors ------------------------------------------------------------------------------


class TextClassificationSet(Dataset):
    """(text, second text or None, label id); the label ids are checked against ``labels`` up front."""

    def __init__(self, examples: Sequence[Example], labels: LabelMap, source: str) -> None:
        self.texts = [e.text for e in examples]
        self.pairs = [e.pair for e in examples]
        self.label_ids = labels.ids(examples, source)
        self.source = source

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> tuple[str, str | None, int]:
        return self.texts[i], self.pairs[i], self.label_ids[i]


class Collate:
    """Tokenizes a batch: padding to the longest text in it, truncation at ``max_length`` (of a
    pair, the longer text is cut first)."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[tuple[str, str | None, int]]) -> dict[str, torch.Tensor]:
        texts, pairs, labels = zip(*items)
        second = list(pairs) if pairs[0] is not None else None
        batch = self.tokenizer(list(texts), second, padding=True,
                               truncation="longest_first" if second else True, max_length=self.max_length,
                               return_tensors="pt")
        out = dict(batch)
        out["labels"] = torch.tensor(labels, dtype=torch.long)  # (B,)
        return out
