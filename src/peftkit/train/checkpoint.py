"""Checkpoints: everything needed to continue a run exactly, written so a crash never breaks one.

    <out>/checkpoints/step-<N>/
      adapter/              a usable adapter (peftkit.save + the task's files), as at step N
      trainer_state.pt      trainable parameters, optimizer, scheduler, every process's RNG states
      state.json            step, epoch, position in the epoch, best evaluation so far

A checkpoint is written into a hidden temporary directory next to the others
(``.step-<N>.tmp-xxxx``), fsynced, and renamed to ``step-<N>`` only when complete
(``peftkit.atomic.write_dir``), so ``step-<N>`` either is whole or does not exist; ``latest``
ignores the temporary ones a crash leaves behind, and the next checkpoint write removes them.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .. import AdapterFileError, atomic

DIR = "checkpoints"
STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
_STEP = re.compile(r"step-(\d+)")


def step_dir(out: Path, step: int) -> Path:
    return out / DIR / f"step-{step}"


def complete(out: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest (lowest step) first."""
    root = out / DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP.fullmatch(p.name)) and (p / STATE_FILE).is_file() and (p / TRAINER_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest(out: Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete(out)
    return found[-1] if found else None


def prune(out: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` most recent complete checkpoints; returns those deleted."""
    old = complete(out)[:-keep] if keep > 0 else []
    for path in old:
        shutil.rmtree(path, ignore_errors=True)
    return old


def write_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory of the run (a checkpoint, ``adapter/``, ``best/``) with ``fill(tmp)``
    in a hidden temporary sibling and put it at ``final`` whole (``peftkit.atomic.write_dir``);
    what killed writers of it left behind goes first. On any error ``final`` is left as it was."""
    return atomic.write_dir(final, fill, clean=True)


def write_checkpoint(out: Path, step: int, fill: Callable[[Path], None]) -> Path:
    """Write ``checkpoints/step-<step>`` with ``fill(tmp)``; first removes the hidden
    temporary directories that killed writes of any checkpoint left behind."""
    clean_leftovers(out)
    return write_dir(step_dir(out, step), fill)


def clean_leftovers(out: Path) -> list[Path]:
    """Remove the hidden temporary directories in ``checkpoints/`` (never a checkpoint)."""
    root = out / DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(".")]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def copy_files(source: Path, target: Path) -> None:
    """The files of the directory ``source`` in the existing directory ``target`` (hard links
    where possible: the directories of a run are replaced whole, never changed in place)."""
    for path in source.iterdir():
        if path.is_file():
            atomic.link_or_copy(path, target / path.name)


class _Buffer(io.BytesIO):
    """The bytes of a file about to be written (named after it in messages)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.name = str(path)

    def __repr__(self) -> str:
        return f"<bytes for {self.name}>"


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` through ``atomic.write_atomic``: a full disk is an ``OSError`` naming
    ``path`` (``torch.save`` to a path turns it into a RuntimeError)."""
    buffer = _Buffer(path)
    torch.save(obj, buffer)
    atomic.write_atomic(path, buffer.getvalue())


def read_state(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(``state.json``, ``trainer_state.pt``) of a checkpoint directory."""
    try:
        with open(ckpt / STATE_FILE, encoding="utf-8") as f:
            state = json.load(f)
        trainer = torch.load(ckpt / TRAINER_FILE, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError) as exc:
        raise AdapterFileError(f"{ckpt}: unreadable checkpoint: {exc}") from None
    return state, trainer


# -- random number generators ------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": _plain(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached]
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _tuple(value: Any) -> Any:
    return tuple(_tuple(v) for v in value) if isinstance(value, list) else value
