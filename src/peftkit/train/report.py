"""What a training run leaves on disk: ``metrics.jsonl``, ``summary.json``, ``loss.png``.

Whole files (JSON, the plot) are written to a temporary file in the same directory and moved
into place with ``os.replace``, so a crash leaves the old file or the new one, never half of
one. ``metrics.jsonl`` grows one line per event; each line goes out in a single ``write`` on
a file opened for appending, so a reader sees only whole lines of a run that was killed.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any, Iterable

from ..io import write_atomic


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class MetricsLog:
    """``metrics.jsonl``: ``{"step", "loss", "lr"}`` per training step and
    ``{"step", "eval": {"accuracy", "loss", "n"}}`` per evaluation; kept in memory too."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        write_atomic(self.path, b"")  # a fresh, empty file (a previous run's lines are dropped)

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
              evals: Iterable[tuple[int, dict[str, Any]]] = (), title: str = "") -> None:
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
            ax.annotate(f"{e['accuracy']:.2f}", (s, e["loss"]), textcoords="offset points",
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
