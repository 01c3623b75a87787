"""One run of a comparison, in a process of its own: ``python -m peftkit.compare.child SPEC``.

A fresh process per run makes a run's memory its own (no allocator cache, no model of the run
before it) and keeps a crash, an out-of-memory kill or a hung library inside one row of the
table. ``SPEC`` is a JSON file the parent wrote:
``{"options": TrainOptions.to_dict(), "result": path, "status": path, "train_sample": path|null,
"reference": path|null}``. The child

1. trains through the real trainer (``peftkit.train.engine.run_training``), with a console
   that also writes the step count to ``status`` (the parent's live line reads it);
2. measures the run's peak memory: on CUDA the trainer's ``peak_gpu_bytes``
   (``torch.cuda.max_memory_allocated``); on the CPU the peak resident set during training
   minus the resident set when training starts (the base model, the adapter and the
   evaluation before training already loaded): the kernel's high-water mark ``VmHWM`` is reset
   (``/proc/self/clear_refs``) when the training bar opens and read when it closes; where that
   reset is refused, the process's peak (``ru_maxrss``) minus the same starting point;
3. evaluates the trained model on ``train_sample`` (the train side of the train–eval gap) as
   ``peftkit eval --data`` would;
4. measures forgetting (``peftkit.forgetting.measure_run``; null, with a note, where that
   module is missing or fails);

and writes ``result``: ``{"summary", "train_eval", "forgetting", "peak_memory_bytes",
"memory_kind", "notes", "error"}``. A failed training is ``"error"``: one line.
"""

from __future__ import annotations

import json
import os
import re
import resource
import sys
import time
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from ..errors import PeftkitError
from ..train.progress import Console, Progress


def _status_value(key: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{key}:\s+(\d+)\s*kB", text, re.M)
    return int(found.group(1)) * 1024 if found else None


class Memory:
    """The CPU peak resident set of the training phase (see the module docstring)."""

    def __init__(self) -> None:
        self.start: int | None = None
        self.reset = False
        self.peak: int | None = None

    def begin(self) -> None:
        self.start = _status_value("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)
            self.reset = True
        except OSError:
            self.reset = False

    def end(self) -> None:
        if self.start is None:
            return
        high = _status_value("VmHWM") if self.reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if high is not None:
            self.peak = max(0, high - self.start)

    @property
    def kind(self) -> str:
        return ("cpu-rss: peak during training minus the resident set at its start" if self.reset else
                "cpu-rss: the process's peak minus the resident set when training starts")


class StatusConsole(Console):
    """A console that also reports the training bar's steps to a small JSON file (atomically,
    at most every half second), and marks the training phase for ``Memory``."""

    def __init__(self, status: str, memory: Memory) -> None:
        super().__init__(quiet=False)
        self.status_path, self.memory = status, memory
        self.phase = "loading"
        self._last = 0.0
        self.write_status(0, 0, force=True)

    def write_status(self, step: int, total: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.5 and step != total:
            return
        self._last = now
        try:
            write_atomic(self.status_path, json.dumps({"phase": self.phase, "step": step, "total": total,
                                                       "time": time.time()}))
        except OSError:
            pass  # progress is a courtesy; the run goes on

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.write_status(0, 0, force=True)

    def progress(self, total: int, desc: str, lines: bool = True) -> Progress:
        bar = super().progress(total, desc, lines=lines)
        if desc == "eval (before)":
            self.set_phase("evaluating before training")
        if desc != "train":
            return bar
        console = self
        self.phase = "train"
        self.memory.begin()
        self.write_status(0, total, force=True)
        update, close = bar.update, bar.close

        def tracked_update(n: int = 1, **stats: Any) -> None:
            update(n, **stats)
            console.write_status(bar.done, total)

        def tracked_close() -> None:
            if console.phase == "train":
                console.memory.end()
                console.phase = "after training"
                console.write_status(bar.done, total, force=True)
            close()

        bar.update, bar.close = tracked_update, tracked_close  # type: ignore[method-assign]
        return bar


def error_line(exc: BaseException) -> str:
    """A failure as one line: a peftkit error's message, else the type and the first line."""
    if isinstance(exc, PeftkitError):
        text = str(exc)
    else:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return " ".join(text.split())


def run(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from ..train.adapted import resolve
    from ..train.engine import run_training
    from ..train.models import resolve_device
    from ..train.options import TrainOptions
    from ..train.tasks import module_of

    memory = Memory()
    console = StatusConsole(spec["status"], memory)
    result: dict[str, Any] = {"summary": None, "train_eval": None, "forgetting": None, "peak_memory_bytes": None,
                              "memory_kind": None, "notes": [], "error": None}
    try:
        options = TrainOptions(**spec["options"])
        summary = run_training(options, console)
    except Exception as exc:  # noqa: BLE001 - a failed run is a row of the report
        result["error"] = error_line(exc)
        return result
    result["summary"] = summary
    if summary.get("peak_gpu_bytes") is not None:
        result["peak_memory_bytes"], result["memory_kind"] = summary["peak_gpu_bytes"], "cuda: max_memory_allocated"
    elif memory.peak is not None:
        result["peak_memory_bytes"], result["memory_kind"] = memory.peak, memory.kind
    device = resolve_device(options.device)
    if spec.get("train_sample"):
        console.set_phase("train metric")
        try:
            source = resolve(options.out)
            quiet = Console(quiet=True)
            result["train_eval"] = module_of(source.task).evaluate_adapter(source, None, spec["train_sample"], None,
                                                                           device, quiet)
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded
            result["notes"].append(f"train metric: {error_line(exc)}")
    console.set_phase("forgetting")
    try:
        from ..forgetting import measure_run
    except ImportError as exc:
        result["notes"].append(f"forgetting: peftkit.forgetting is not available ({error_line(exc)})")
    else:
        try:
            result["forgetting"] = measure_run(options.out, spec.get("reference"), device=device)
        except Exception as exc:  # noqa: BLE001 - the run itself succeeded
            result["notes"].append(f"forgetting: {error_line(exc)}")
    if device.type == "cuda":
        torch.cuda.synchronize()
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m peftkit.compare.child SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    result = run(spec)
    write_atomic(spec["result"], json.dumps(result, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
