"""What a training run leaves on disk: ``metrics.jsonl``, ``summary.json``, ``loss.png``.

Whole files (JSON, the plot) are written to a temporary file in the same directory, fsynced and
moved into place with ``os.replace`` (``peftkit.atomic.write_atomic``), so a crash leaves the old
file or the new one, never half of one; a full disk is an ``OSError`` naming the file. ``metrics.jsonl`` grows one line per event; each line goes out in a single ``write`` on
a file opened for appending, so a reader sees only whole lines of a run that was killed.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..atomic import write_atomic


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class MetricsLog:
    """``metrics.jsonl``: ``{"step", "loss", "lr"}`` per training step and
    ``{"step", "eval": {"accuracy", "loss", "n"}}`` per evaluation; kept in memory too."""

    def __init__(self, path: str | os.PathLike, keep_until: int | None = None) -> None:
        """A fresh, empty file; or, with ``keep_until`` (resuming from that step), the file's
        records up to and including that step, the rest (written after the checkpoint) dropped."""
        self.path = Path(path)
        self.records = self._read_until(keep_until) if keep_until is not None else []
        write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def _read_until(self, step: int) -> list[dict[str, Any]]:
        records = []
        if self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a crash
                if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                    records.append(record)
        return records

    def _append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        self.records.append(record)

    def step(self, step: int, loss: float, lr: float) -> None:
        self._append({"step": step, "loss": round(float(loss), 6), "lr": float(lr)})

    def eval(self, step: int, result: dict[str, Any]) -> None:
        self._append({"step": step, "eval": dict(result)})

    def train_points(self) -> tuple[list[int], list[float]]:
        rows = [r for r in self.records if "loss" in r]
        return [r["step"] for r in rows], [r["loss"] for r in rows]

    def eval_points(self) -> list[tuple[int, dict[str, Any]]]:
        return [(r["step"], r["eval"]) for r in self.records if "eval" in r]


def _smooth(values: list[float], weight: float = 0.6) -> list[float]:
    """Exponential moving average, bias-corrected so the first points are not pulled to 0."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_loss(path: str | os.PathLike, steps: list[int], losses: list[float],
              evals: Iterable[tuple[int, dict[str, Any]]] = (), title: str = "", metric: str = "accuracy") -> None:
    """Training loss per step (raw and smoothed) and the evaluation loss, as a PNG.

    Uses matplotlib's object API with the Agg canvas: no display, no global backend change.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, _smooth(losses), color="tab:blue", linewidth=2, label="train loss (smoothed)")
    evals = list(evals)
    if evals:
        ax.plot([s for s, _ in evals], [e["loss"] for _, e in evals], "o-", color="tab:orange",
                label="eval loss")
        for s, e in evals:
            if metric not in e or metric == "loss":
                continue
            ax.annotate(f"{e[metric]:.2f}", (s, e["loss"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7, color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "loss (eval points labelled with accuracy)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


class TensorBoard:
    """Scalars for TensorBoard (``train/loss``, ``train/lr``, ``eval/<metric>``) in a log directory.

    Needs the ``tensorboard`` package (``pip install peftkit[tensorboard]``). Resuming from step
    N drops the events a crashed run logged after N (TensorBoard's ``purge_step``)."""

    def __init__(self, log_dir: str | os.PathLike, resume_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            from .. import ConfigError

            raise ConfigError("--tensorboard needs the tensorboard package: pip install 'peftkit[tensorboard]'") from None
        self.writer = SummaryWriter(log_dir=os.fspath(log_dir),
                                    purge_step=resume_step + 1 if resume_step is not None else None)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def eval(self, step: int, result: dict[str, Any]) -> None:
        for key, value in result.items():
            if isinstance(value, (int, float)) and key != "n":
                self.writer.add_scalar(f"eval/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
