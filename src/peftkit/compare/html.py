"""``compare.html``: one self-contained page of a comparison (no script, no external resource).

The table of ``report.table`` and six inline SVG figures (``svg.py``), each an ``<svg>`` with
its own id (``FIGURES``), laid out two to a row for a 1280-pixel window, each with a caption
saying which claim made for PEFT it checks:

- ``fig-quality-params``: quality against trainable parameters (log scale; marker area: time);
- ``fig-quality-bytes``: quality against the bytes the method's result takes on disk (log scale);
- ``fig-gap``: the train and eval metric per method, the gap written above (overfitting);
- ``fig-forgetting``: forgetting per method, full fine-tuning's as a dashed line;
- ``fig-learning``: the metric by training-set size (``--train-sizes``; with one size, a note);
- ``fig-loss``: training-loss curves (smoothed), one per method.

Figures are drawn at the largest training size, from the per-method means over seeds.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any

from ..atomic import write_atomic
from . import report, svg

FIGURES = ("fig-quality-params", "fig-quality-bytes", "fig-gap", "fig-forgetting", "fig-learning", "fig-loss")
REFERENCE = "full"

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222; background: #f6f6f6; }
main { max-width: 1240px; margin: 0 auto; padding: 16px 20px 40px; }
h1 { font-size: 22px; margin: 8px 0 4px; } h2 { font-size: 17px; margin: 24px 0 8px; }
p.settings { color: #555; font-size: 13px; margin: 4px 0 12px; }
table { border-collapse: collapse; background: #fff; font-size: 13px; width: 100%; }
th, td { padding: 5px 8px; border-bottom: 1px solid #e2e2e2; text-align: right; white-space: nowrap; }
th { background: #eee; } td.method, th.method { text-align: left; }
td.error { text-align: left; white-space: normal; color: #b00020; font-size: 12px; max-width: 320px; }
td.best { font-weight: bold; background: #e8f4e8; }
tr.reference td.method { font-weight: bold; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 16px; }
figure { margin: 0; background: #fff; border: 1px solid #ddd; padding: 8px; }
figure svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 12px; color: #555; padding: 6px 4px 0; }
"""


def write_page(path: str | Path, document: dict[str, Any]) -> None:
    write_atomic(path, page(document))


def page(document: dict[str, Any]) -> str:
    metric = document["metric"]
    settings = document.get("settings", {})
    sizes = report.sizes(document)
    main_size = sizes[0] if sizes else None
    rows = report.table(document, main_size) if sizes else []
    color = svg.colors(_all_methods(document))
    label = "eval loss" if metric == "eval_loss" else metric
    parts = [f"<h1>peftkit compare: {escape(str(document.get('task')))}</h1>"]
    if settings:
        budget = (f"{settings['max_steps']} steps" if settings.get("max_steps")
                  else f"{settings.get('epochs')} epoch(s)")
        parts.append(f'<p class="settings">model <code>{escape(str(settings.get("model")))}</code>; data '
                     f'<code>{escape(str(settings.get("data")))}</code>; evaluation: '
                     f'{escape(str(settings.get("eval_source", settings.get("eval_data"))))}; budget {escape(budget)}; '
                     f'seeds {escape(", ".join(str(s) for s in settings.get("seeds", [])))}; device '
                     f'{escape(str(settings.get("device") or "auto"))}.</p>')
    for size in sizes:
        parts.append(f"<h2>{escape(str(size if size is not None else 'all'))} training examples</h2>")
        parts.append(_table(document, size))
    figures = [
        _quality(document, rows, color, "trainable_params", "fig-quality-params",
                 f"{label} against trainable parameters", "trainable parameters", report.fmt_count, True,
                 "Quality at a fraction of the parameters: each method's mean over seeds; marker area: training time."),
        _quality(document, rows, color, "adapter_bytes", "fig-quality-bytes", f"{label} against the file's size",
                 "bytes on disk (adapter file; full: the model)", report.fmt_bytes, False,
                 "A file of kilobytes: what each method's result costs on disk, against its quality."),
        _gap(rows, color, metric, label),
        _forgetting(rows, color),
        _learning(document, color, label),
        _loss(document, main_size, color),
    ]
    parts.append('<h2>Figures</h2><div class="grid">' + "".join(figures) + "</div>")
    failed = [r for r in document["runs"] if r.get("error")]
    if failed:
        parts.append("<h2>Failed runs</h2><ul>" + "".join(
            f"<li><b>{escape(r['method'])}</b> seed {r.get('seed')} n={r.get('train_size')}: "
            f"{escape(str(r['error']))}</li>" for r in failed) + "</ul>")
    notes = sorted({n for r in document["runs"] for n in r.get("notes") or []})
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><link rel=\"icon\" href=\"data:,\">"
            f"<title>peftkit compare: {escape(str(document.get('task')))}</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def _all_methods(document: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(r["method"] for r in document["runs"]))


def _table(document: dict[str, Any], size: Any) -> str:
    columns = report.table_columns(document["metric"])
    head = ('<tr><th class="method">method</th><th>runs</th>' + "".join(f"<th>{escape(t)}</th>" for _, t, _ in columns)
            + '<th class="method">error</th></tr>')
    body = []
    for row in report.table(document, size):
        cells = "".join(f'<td class="best">{escape(report.cell(row, k))}</td>' if k in row.get("best", ())
                        else f"<td>{escape(report.cell(row, k))}</td>" for k, _, _ in columns)
        cls = ' class="reference"' if row["method"] == REFERENCE else ""
        body.append(f'<tr{cls}><td class="method">{escape(row["method"])}</td><td>{row["n"]}/{row["runs"]}</td>{cells}'
                    f'<td class="error">{escape("; ".join(row["errors"]))}</td></tr>')
    return f"<table>{head}{''.join(body)}</table>"


def _figure(content: str, caption: str) -> str:
    return f"<figure>{content}<figcaption>{escape(caption)}</figcaption></figure>"


def _quality(document, rows, color, key, fig_id, title, xlabel, fmt, sized, caption) -> str:
    ok = [r for r in rows if r["metric"] is not None and r[key] is not None and r[key] > 0]
    chart = svg.Chart(fig_id, title, xlabel, "eval loss" if document["metric"] == "eval_loss" else document["metric"],
                      [r[key] for r in ok] or [None], [r["metric"] for r in ok], xlog=True, x_fmt=fmt,
                      y_fmt=lambda v: f"{v:.3g}", x_ticks=svg.byte_ticks if key == "adapter_bytes" else None)
    times = [r["train_seconds"] for r in ok if r["train_seconds"]]
    top = max(times) if times else None

    def radius(t):
        return 4 + 10 * math.sqrt(t / top) if top and t else 5

    for r in ok:
        if r.get("sd"):
            chart.errorbar(r[key], r["metric"] - r["sd"], r["metric"] + r["sd"], color[r["method"]])
        chart.scatter(r[key], r["metric"], color[r["method"]], r=radius(r["train_seconds"]) if sized else 5,
                      label=r["method"], tooltip=f"{r['method']}: {report.cell(r, 'metric')}, {fmt(r[key])}, "
                                                 f"{report.cell(r, 'train_seconds')}")
        chart.add_legend(r["method"], color[r["method"]])
    if sized and top:
        chart.size_legend("training time", [(f"{t:.0f} s" if t >= 1 else f"{t:.2f} s", radius(t))
                                            for t in (top / 16, top / 4, top)])
    return _figure(chart.render(), caption)


def _gap(rows, color, metric, label) -> str:
    ok = [r for r in rows if r["metric"] is not None]
    cats = [r["method"] for r in ok]
    series = [("train", "#9ecae1", [r["train"] for r in ok]), ("eval", "#3182bd", [r["metric"] for r in ok])]
    notes = [f"{r['gap']:+.3f}" if r["gap"] is not None else None for r in ok]
    content = svg.bar_chart("fig-gap", f"train and eval {label} (the gap above each)", label, cats, series,
                            y_fmt=lambda v: f"{v:.3g}", highlight=REFERENCE, annotations=notes)
    side = "train minus eval accuracy" if metric == "accuracy" else "eval minus train loss"
    return _figure(content, f"Less overfitting: the train–eval gap ({side}) of each method; the train side is "
                            "measured on a sample of the run's own training examples as large as the eval set.")


def _forgetting(rows, color) -> str:
    ok = [r for r in rows if r["forgetting"] is not None]
    cats = [r["method"] for r in ok]
    ref = next((r["forgetting"] for r in ok if r["method"] == REFERENCE), None)
    note = None if ok else "no forgetting measured (see the notes)"
    content = svg.bar_chart("fig-forgetting", "forgetting (lower is better)", "forgetting", cats,
                            [("forgetting", "#d62728", [r["forgetting"] for r in ok])], y_fmt=lambda v: f"{v:.3g}",
                            highlight=REFERENCE, reference=(ref, "full fine-tuning") if ref is not None else None,
                            note=note)
    return _figure(content, "No catastrophic forgetting: how far each trained model moved away from what the base "
                            "model did on a reference set (peftkit.forgetting), beside full fine-tuning (bold, dashed).")


def _learning(document, color, label) -> str:
    curve = report.learning_curve(document)
    xs = [n for points in curve.values() for n, _, _ in points]
    ys = [m for points in curve.values() for _, m, _ in points]
    chart = svg.Chart("fig-learning", f"{label} by training examples", "training examples", label, xs or [None], ys,
                      xlog=True, x_fmt=report.fmt_count, y_fmt=lambda v: f"{v:.3g}",
                      x_ticks=(lambda lo, hi: sorted(set(xs))) if len(set(xs)) <= 8 else None)
    for method, points in curve.items():
        c = color.get(method, "#333")
        chart.line([(n, m) for n, m, _ in points], c, width=2.6 if method == REFERENCE else 1.8,
                   dash=method == REFERENCE, markers=True)
        for n, m, sd in points:
            if sd:
                chart.errorbar(n, m - sd, m + sd, c)
        chart.add_legend(method, c, "dash" if method == REFERENCE else "line")
    note = None if curve else "learning curves need at least two --train-sizes"
    return _figure(chart.render(note), "Less data needed: each method's metric as the training set grows; where a "
                                       "method's line meets full fine-tuning's (dashed) it has caught up.")


def _loss(document, size, color) -> str:
    runs = {}
    for r in document["runs"]:
        if r.get("train_size") == size and not r.get("error") and r.get("loss_curve") and r["method"] not in runs:
            runs[r["method"]] = r
    xs = [p[0] for r in runs.values() for p in r["loss_curve"]]
    smoothed = {m: _smooth(r["loss_curve"]) for m, r in runs.items()}
    ys = [v for points in smoothed.values() for _, v in points]
    chart = svg.Chart("fig-loss", "training loss (smoothed)", "step", "loss", xs or [None], ys,
                      y_fmt=lambda v: f"{v:.3g}")
    for method, points in smoothed.items():
        c = color.get(method, "#333")
        chart.line(points, c, dash=method == REFERENCE)
        chart.add_legend(method, c, "dash" if method == REFERENCE else "line")
    seed = next((r.get("seed") for r in runs.values()), None)
    return _figure(chart.render(None if runs else "no loss curves"),
                   f"The loss curves of the runs (first seed{'' if seed is None else f', {seed}'}), "
                   "exponentially smoothed, from each run's metrics.jsonl.")


def _smooth(points: list[list[float]], weight: float = 0.8) -> list[tuple[float, float]]:
    out, avg = [], 0.0
    for i, (step, value) in enumerate(points, 1):
        avg = weight * avg + (1 - weight) * value
        out.append((step, avg / (1 - weight**i)))
    return out
