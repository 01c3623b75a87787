"""Checkpoints: everything needed to continue a run exactly, written so a crash never breaks one.

    <out>/checkpoints/step-<N>/
      adapter/              a usable adapter (peftkit.save + the task's files), as at step N
      trainer_state.pt      trainable parameters, optimizer, scheduler, every process's RNG states
      state.json            step, epoch, position in the epoch, best evaluation so far

A checkpoint is written into a hidden temporary directory next to the others
(``.step-<N>-xxxx``) and renamed to ``step-<N>`` only when complete, so ``step-<N>`` either is
whole or does not exist; ``latest`` ignores the temporary ones a crash leaves behind.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .. import AdapterFileError

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


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the finished directory ``tmp`` at ``final``, replacing what was there."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_dir(final: Path, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp)`` in a temporary sibling, then move it to ``final``.

    On any error the temporary directory is removed and ``final`` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def copy_files(source: Path, target: Path) -> None:
    """Copy the files of the directory ``source`` into the existing directory ``target``."""
    for path in source.iterdir():
        if path.is_file():
            shutil.copy2(path, target / path.name)


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


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
