"""The data every run of a comparison sees: one evaluation set, nested training subsets.

A fair comparison needs every method evaluated on the same examples and trained on the same
ones. The trainer holds an evaluation set out of ``--data`` itself, per ``--seed``, and out of
whatever file it is given, so handing it differently sized files would change the evaluation
set with the size. Here the split is made once, at the level of records (a JSONL line, a
CSV/TSV row: whatever the task), and written as plain files the trainer reads:

- ``eval.<ext>``: ``--eval-data`` as given, or a held-out fifth of ``--data`` (seed 0, the same
  for every run); ``--eval-limit`` keeps the first N of it after a seeded shuffle;
- ``train-s<seed>-n<N>.<ext>``: the first N records of the training records shuffled with the
  run's seed, so that for one seed a smaller size is a prefix of a larger one (learning curves
  measure the size, not a different draw);
- ``sample-s<seed>-n<N>.<ext>``: the first records of that subset, at most as many as the
  evaluation set has: what the train-side metric (the train–eval gap) is measured on.

CSV/TSV rows are parsed and written back with the reader's own dialect (``csv``; the trainer's
reader, ``train.data``, uses the same), so a quoted cell reads back as it was. An image folder
is not split (``ConfigError`` for a size); it is passed through as it is.
"""

from __future__ import annotations

import csv
import io
import os
import random
from dataclasses import dataclass
from pathlib import Path

from .. import ConfigError, DataError
from ..atomic import write_atomic
from ..train.data import DEMO_EVAL, DEMO_TRAIN, HOLDOUT_FRACTION, format_of, read_text

HOLDOUT_SEED = 0  # one evaluation set for every run, whatever its seed


@dataclass
class Records:
    """A data file as its header (CSV/TSV) and records, in the file's own format."""

    kind: str  # "jsonl", "csv" or "tsv"
    header: list[str] | None
    rows: list  # JSONL: the lines (str); CSV/TSV: lists of cells
    source: str

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def suffix(self) -> str:
        return {"jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv"}[self.kind]

    def subset(self, rows: list) -> "Records":
        return Records(self.kind, self.header, rows, self.source)

    def text(self) -> str:
        if self.kind == "jsonl":
            return "".join(line.rstrip("\r\n") + "\n" for line in self.rows)
        buffer = io.StringIO(newline="")
        writer = csv.writer(buffer, delimiter="\t" if self.kind == "tsv" else ",", lineterminator="\n")
        writer.writerow(self.header or [])
        writer.writerows(self.rows)
        return buffer.getvalue()

    def write(self, path: Path) -> str:
        write_atomic(path, self.text())
        return str(path)


def read_records(path: str) -> Records:
    """The records of a CSV/TSV/JSONL file (blank lines and rows skipped, as the trainer does)."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: file is empty")
    kind = format_of(path, text)
    if kind == "jsonl":
        rows = [line for line in text.splitlines() if line.strip()]
        return Records(kind, None, rows, path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if kind == "tsv" else ",")
    try:
        body = [row for row in reader if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise DataError(f"{path} line {reader.line_num}: malformed {kind.upper()}: {exc}") from None
    if not body:
        raise DataError(f"{path}: file is empty")
    return Records(kind, body[0], body[1:], path)


@dataclass
class Split:
    """What ``prepare`` settled: the evaluation file and the training records."""

    eval_path: str | None  # None: an image folder (the trainer's own split)
    eval_count: int | None
    eval_source: str  # for the report: the file, or "<data> (held-out 20%)"
    train: Records | None  # None: an image folder
    train_path: str  # --data as given
    train_count: int | None


def prepare(data_dir: Path, data: str | None, eval_data: str | None, eval_limit: int | None) -> Split:
    """Read ``--data``/``--eval-data`` (the bundled demo set without ``--data``) and write the
    evaluation file into ``data_dir``; the training records stay in memory for ``subset``."""
    if data is None:
        data, eval_data = str(DEMO_TRAIN), eval_data or str(DEMO_EVAL)
    if os.path.isdir(data):
        if eval_limit is not None:
            raise ConfigError(f"--eval-limit: {data} is an image folder, which compare does not split; drop it")
        return Split(eval_data, None, eval_data or f"{data} (held out by the trainer)", None, data, None)
    train = read_records(data)
    if eval_data is not None:
        evaluation = read_records(eval_data)
        source = eval_data
    else:
        rows = train.rows[:]
        random.Random(HOLDOUT_SEED).shuffle(rows)
        k = max(1, int(len(rows) * HOLDOUT_FRACTION + 0.5))
        if len(rows) - k < 1:
            raise DataError(f"{data}: too few records ({len(rows)}) to hold out an evaluation set; pass --eval-data")
        held = set(map(id, rows[:k]))
        evaluation = train.subset([r for r in train.rows if id(r) in held])
        train = train.subset([r for r in train.rows if id(r) not in held])
        source = f"{data} (held-out {HOLDOUT_FRACTION:.0%}, seed {HOLDOUT_SEED})"
    if eval_limit is not None and eval_limit < len(evaluation):
        rows = evaluation.rows[:]
        random.Random(HOLDOUT_SEED).shuffle(rows)
        evaluation = evaluation.subset(rows[:eval_limit])
        source += f", {eval_limit} of it"
    data_dir.mkdir(parents=True, exist_ok=True)
    eval_path = evaluation.write(data_dir / f"eval{evaluation.suffix}")
    return Split(eval_path, len(evaluation), source, train, data, len(train))


def subset(split: Split, data_dir: Path, seed: int, size: int | None) -> tuple[str, str | None]:
    """(the training file of a run, the file its train-side metric is measured on)."""
    if split.train is None:
        if size is not None:
            raise ConfigError(f"--train-limit/--train-sizes: {split.train_path} is an image folder, which "
                              "compare does not cut down; drop them")
        return split.train_path, split.train_path
    n = len(split.train) if size is None else size
    if n > len(split.train):
        held = " besides the held-out evaluation set" if "held-out" in split.eval_source else ""
        raise ConfigError(f"--train-limit/--train-sizes {n}: {split.train_path} has only {len(split.train)} "
                          f"training records{held}")
    rows = split.train.rows[:]
    random.Random(seed).shuffle(rows)
    rows = rows[:n]
    train = split.train.subset(rows).write(data_dir / f"train-s{seed}-n{n}{split.train.suffix}")
    k = min(n, split.eval_count or n)
    sample = split.train.subset(rows[:k]).write(data_dir / f"sample-s{seed}-n{n}{split.train.suffix}")
    return train, sample

