"""The numbers of a comparison: the summary rows of ``compare.json`` and ``compare.md``.

One row per (method, training size) aggregates its seeds: the metric's mean and sample standard
deviation (n − 1; null for one run), the train-side metric, the gap between them (the
overfitting claim: train minus eval accuracy, or eval minus train loss, so that a positive gap
is always "better on the data it saw"), and the mean costs. The best value of a column is
marked: the highest accuracy (lowest loss and perplexity), the gap closest to zero, the lowest
trainable parameters, bytes, time, memory and forgetting. A method whose runs all failed is a
row with its error. ``html.py`` renders the same ``table`` as the page's table.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

from ..atomic import write_atomic

# (key, heading, which value is best: "max", "min", "abs" (closest to 0) or None (not marked))
COLUMNS = [
    ("metric", None, "max"),  # heading and direction set per metric (table_columns)
    ("train", None, None),
    ("gap", "train−eval gap", "abs"),
    ("perplexity", "perplexity", "min"),
    ("trainable_params", "trainable params", "min"),
    ("adapter_bytes", "adapter size", "min"),
    ("train_seconds", "train time", "min"),
    ("peak_memory_bytes", "peak memory", "min"),
    ("forgetting", "forgetting", "min"),
]


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"


def summarize(runs: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """``{"method", "train_size", "mean", "sd", "n"}`` of ``metric`` per (method, size), over the
    runs without an error (``n`` = their number; mean and sd null when there are none / one)."""
    groups: dict[tuple[str, Any], list[float]] = {}
    for run in runs:
        key = (run.get("method"), run.get("train_size"))
        values = groups.setdefault(key, [])
        if not run.get("error") and isinstance(run.get(metric), (int, float)):
            values.append(float(run[metric]))
    return [{"method": m, "train_size": n, "mean": statistics.fmean(v) if v else None,
             "sd": statistics.stdev(v) if len(v) > 1 else None, "n": len(v)} for (m, n), v in groups.items()]


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(numbers) if numbers else None


def sizes(document: dict[str, Any]) -> list[Any]:
    """The training sizes of the runs, largest first."""
    return sorted({r.get("train_size") for r in document["runs"]}, key=lambda n: -(n or 0))


def table(document: dict[str, Any], size: Any) -> list[dict[str, Any]]:
    """The table's rows at one training size, with ``best``: the columns where the row is best."""
    metric = document["metric"]
    causal = metric == "eval_loss"
    by_method: dict[str, list[dict[str, Any]]] = {}
    for run in document["runs"]:
        if run.get("train_size") == size:
            by_method.setdefault(run["method"], []).append(run)
    summary = {(s["method"], s["train_size"]): s for s in document.get("summary", [])}
    rows = []
    for method, runs in by_method.items():
        ok = [r for r in runs if not r.get("error")]
        s = summary.get((method, size)) or {}
        train = _mean([r.get(f"train_{metric}") for r in ok])
        mean = s.get("mean")
        gap = None
        if mean is not None and train is not None:
            gap = (mean - train) if causal else (train - mean)
        row = {"method": method, "runs": len(runs), "n": len(ok), "metric": mean, "sd": s.get("sd"), "train": train,
               "gap": gap, "perplexity": _mean([r.get("perplexity") for r in ok]) if causal else None,
               "errors": sorted({r["error"] for r in runs if r.get("error")})}
        for key in ("trainable_params", "adapter_bytes", "train_seconds", "peak_memory_bytes", "forgetting"):
            row[key] = _mean([r.get(key) for r in ok])
        rows.append(row)
    for key, _, best in table_columns(metric):
        if best is None:
            continue
        values = [r[key] for r in rows if r[key] is not None]
        if len(values) < 2:
            continue
        pick = {"max": max(values), "min": min(values), "abs": min(values, key=abs)}[best]
        for r in rows:
            if r[key] is not None and (abs(r[key]) == abs(pick) if best == "abs" else r[key] == pick):
                r.setdefault("best", set()).add(key)
    return rows


def table_columns(metric: str) -> list[tuple[str, str, str | None]]:
    causal = metric == "eval_loss"
    heading = "eval loss" if causal else metric
    out = []
    for key, title, best in COLUMNS:
        if key == "metric":
            out.append((key, heading, "max" if higher_is_better(metric) else "min"))
        elif key == "train":
            out.append((key, "train loss" if causal else f"train {heading}", None))
        elif key == "perplexity" and not causal:
            continue
        else:
            out.append((key, title, best))
    return out


def cell(row: dict[str, Any], key: str) -> str:
    """A cell's text (no marking)."""
    value = row.get(key)
    if value is None:
        return "—"
    if key == "metric":
        text = fmt_metric(value)
        return text + (f" ± {fmt_metric(row['sd'])}" if row.get("sd") is not None else "")
    if key in ("train", "perplexity"):
        return fmt_metric(value)
    if key == "gap":
        return f"{value:+.4f}"
    if key == "trainable_params":
        return fmt_count(value)
    if key in ("adapter_bytes", "peak_memory_bytes"):
        return fmt_bytes(value)
    if key == "train_seconds":
        return f"{value:.1f} s"
    if key == "forgetting":
        return f"{value:.4f}"
    return str(value)


def fmt_metric(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "—"


def fmt_count(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def fmt_bytes(value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "—"
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def markdown(document: dict[str, Any]) -> str:
    metric = document["metric"]
    columns = table_columns(metric)
    settings = document.get("settings", {})
    lines = [f"# peftkit compare: {document['task']} ({metric})", ""]
    if settings:
        lines += [f"Model `{settings.get('model')}`, data `{settings.get('data')}`, evaluation: "
                  f"{settings.get('eval_source', settings.get('eval_data'))}; budget: "
                  + (f"{settings['max_steps']} steps" if settings.get("max_steps") else f"{settings.get('epochs')} epoch(s)")
                  + f"; seeds {', '.join(str(s) for s in settings.get('seeds', []))}.", ""]
    best = "highest accuracy" if higher_is_better(metric) else "lowest eval loss and perplexity"
    gap = "train minus eval accuracy" if higher_is_better(metric) else "eval minus train loss"
    lines.append(f"Mean ± sd over seeds; **bold**: the best of a column ({best}, the gap closest to 0, the lowest "
                 f"cost and forgetting). Gap: {gap}; costs and forgetting: means over the runs.")
    for size in sizes(document):
        rows = table(document, size)
        lines += ["", f"## {size if size is not None else 'all'} training examples", ""]
        lines.append("| method | runs | " + " | ".join(title for _, title, _ in columns) + " | error |")
        lines.append("|---|---:|" + "---:|" * len(columns) + "---|")
        for row in rows:
            cells = []
            for key, _, _ in columns:
                text = cell(row, key)
                cells.append(f"**{text}**" if key in row.get("best", ()) else text)
            errors = "; ".join(e.replace("|", "\\|") for e in row["errors"])
            lines.append(f"| {row['method']} | {row['n']}/{row['runs']} | " + " | ".join(cells) + f" | {errors} |")
    curve = learning_curve(document)
    if curve:
        present = sorted({n for points in curve.values() for n, _, _ in points})
        lines += ["", f"## Learning curve ({metric} by training examples)", "",
                  "| method | " + " | ".join(str(n) for n in present) + " |", "|---|" + "---:|" * len(present)]
        for method, points in curve.items():
            at = {n: (m, sd) for n, m, sd in points}
            lines.append(f"| {method} | " + " | ".join(
                (fmt_metric(at[n][0]) + (f" ± {fmt_metric(at[n][1])}" if at[n][1] is not None else "")) if n in at else "—"
                for n in present) + " |")
    return "\n".join(lines) + "\n"


def learning_curve(document: dict[str, Any]) -> dict[str, list[tuple[int, float, float | None]]]:
    """Per method with at least two sizes: (size, mean, sd) of the metric, by size."""
    curve: dict[str, list[tuple[int, float, float | None]]] = {}
    for s in document.get("summary", []):
        if s.get("mean") is not None and isinstance(s.get("train_size"), int):
            curve.setdefault(s["method"], []).append((s["train_size"], s["mean"], s.get("sd")))
    return {m: sorted(p) for m, p in curve.items() if len(p) >= 2}


def write_markdown(path: str | Path, document: dict[str, Any]) -> None:
    write_atomic(path, markdown(document))
