"""Small SVG charts for the compare page: scatter and line charts (linear or log axes) and bar
charts, with ticks, grid, titles, axis labels and a legend.

Written here rather than drawn with a plotting library so that the page is one file of text
with nothing to fetch and nothing to run: each chart is an ``<svg>`` element with an ``id``,
sized by its ``viewBox`` and scaled to its column by CSS. Every text is escaped.
"""

from __future__ import annotations

import math
from html import escape
from typing import Callable, Sequence

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd"]
REFERENCE_COLOR = "#000000"  # full fine-tuning


def colors(methods: Sequence[str], reference: str = "full") -> dict[str, str]:
    """One color per method, in order; the reference (full fine-tuning) is black."""
    out, i = {}, 0
    for m in methods:
        if m == reference:
            out[m] = REFERENCE_COLOR
        else:
            out[m] = PALETTE[i % len(PALETTE)]
            i += 1
    return out


def _num(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], start
    while v <= hi + step * 1e-9:
        ticks.append(0.0 if abs(v) < step * 1e-9 else v)
        v += step
    return ticks


def byte_ticks(lo: float, hi: float) -> list[float]:
    """1, 10 and 100 of B, KB, MB, GB (binary units, as ``fmt_bytes`` writes them)."""
    return [m * 1024**u for u in range(5) for m in (1, 10, 100) if lo <= m * 1024**u <= hi]


def log_ticks(lo: float, hi: float) -> list[float]:
    """Powers of ten in [lo, hi]; with 1-2-5 in between when the range spans few decades."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    mults = (1, 2, 5) if b - a <= 3 else (1,)
    ticks = [m * 10**e for e in range(a, b + 1) for m in mults if lo * (1 - 1e-9) <= m * 10**e <= hi * (1 + 1e-9)]
    if len(ticks) < 2:  # a narrow range: its ends
        ticks = [lo, hi]
    return ticks


class Scale:
    """Data value -> pixel, linear or log10, over a padded domain."""

    def __init__(self, values: Sequence[float], a: float, b: float, log: bool = False, include_zero: bool = False,
                 pad: float = 0.1, tick_values: Callable[[float, float], list[float]] | None = None) -> None:
        self.a, self.b, self.log = a, b, log
        self.tick_values = tick_values
        vals = [v for v in values if v is not None and math.isfinite(v) and (v > 0 or not log)]
        if include_zero and not log:
            vals.append(0.0)
        if not vals:
            vals = [1.0, 10.0] if log else [0.0, 1.0]
        lo, hi = min(vals), max(vals)
        if log:
            lo, hi = math.log10(lo), math.log10(hi)
        if hi == lo:
            lo, hi = lo - 0.5, hi + 0.5
        span = hi - lo
        self.lo, self.hi = lo - span * pad, hi + span * pad
        if include_zero and not log and min(vals) >= 0:
            self.lo = 0.0

    def __call__(self, value: float) -> float:
        v = math.log10(value) if self.log else value
        return self.a + (v - self.lo) / (self.hi - self.lo) * (self.b - self.a)

    def ticks(self) -> list[float]:
        if self.tick_values is not None:
            lo, hi = (10**self.lo, 10**self.hi) if self.log else (self.lo, self.hi)
            found = [t for t in self.tick_values(lo, hi) if lo <= t <= hi]
            if len(found) >= 2:
                return found
        if self.log:
            return log_ticks(10**self.lo, 10**self.hi)
        return [t for t in nice_ticks(self.lo, self.hi) if self.lo - 1e-12 <= t <= self.hi + 1e-12]


class Chart:
    """An x–y chart: ``scatter``, ``line``, ``errorbar``, then ``render``."""

    def __init__(self, fig_id: str, title: str, xlabel: str, ylabel: str, xs: Sequence[float], ys: Sequence[float],
                 xlog: bool = False, ylog: bool = False, x_fmt: Callable[[float], str] = _num,
                 y_fmt: Callable[[float], str] = _num, width: int = 600, height: int = 380, legend_width: int = 140,
                 include_zero_y: bool = False, x_ticks: Callable[[float, float], list[float]] | None = None) -> None:
        self.id, self.title, self.xlabel, self.ylabel = fig_id, title, xlabel, ylabel
        self.width, self.height = width, height
        self.left, self.right, self.top, self.bottom = 64, width - legend_width - 12, 36, height - 48
        self.x = Scale(xs, self.left, self.right, log=xlog, tick_values=x_ticks)
        self.y = Scale(ys, self.bottom, self.top, log=ylog, include_zero=include_zero_y)
        self.x_fmt, self.y_fmt = x_fmt, y_fmt
        self.parts: list[str] = []
        self.labels: list[tuple[float, float, float]] = []  # (x, y, width) of the point labels placed
        self.legend: list[tuple[str, str, str]] = []  # (label, color, "dot" | "line" | "dash")
        self.extra_legend: list[str] = []
        self.legend_x = self.right + 16
        self.empty = not any(v is not None for v in xs)

    def scatter(self, x: float, y: float, color: str, r: float = 5, label: str | None = None,
                tooltip: str | None = None) -> None:
        cx, cy = self.x(x), self.y(y)
        tip = f"<title>{escape(tooltip)}</title>" if tooltip else ""
        self.parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" fill="{color}" fill-opacity="0.7" '
                          f'stroke="{color}" stroke-width="1">{tip}</circle>')
        if label:
            x, y = cx + r + 3, cy + 4
            width = 6.5 * len(label)
            # move a label down (or up, at the bottom) past the labels already placed that it would overlap
            step = 12 if y + 12 < self.bottom else -12
            while any(abs(y - py) < 11 and x < px + pw and px < x + width for px, py, pw in self.labels):
                y += step
            self.labels.append((x, y, width))
            self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" fill="#333">{escape(label)}</text>')

    def line(self, points: Sequence[tuple[float, float]], color: str, width: float = 1.8, dash: bool = False,
             markers: bool = False, opacity: float = 1.0) -> None:
        pts = [(self.x(a), self.y(b)) for a, b in points if a is not None and b is not None
               and math.isfinite(a) and math.isfinite(b) and (a > 0 or not self.x.log)]
        if not pts:
            return
        d = " ".join(f"{a:.1f},{b:.1f}" for a, b in pts)
        style = ' stroke-dasharray="5,4"' if dash else ""
        self.parts.append(f'<polyline points="{d}" fill="none" stroke="{color}" stroke-width="{width}" '
                          f'stroke-opacity="{opacity}"{style}/>')
        if markers:
            self.parts.extend(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in pts)

    def errorbar(self, x: float, lo: float, hi: float, color: str) -> None:
        cx = self.x(x)
        y1, y2 = self.y(lo), self.y(hi)
        self.parts.append(f'<line x1="{cx:.1f}" y1="{y1:.1f}" x2="{cx:.1f}" y2="{y2:.1f}" stroke="{color}" '
                          'stroke-width="1.2"/>')

    def hline(self, y: float, color: str, label: str) -> None:
        cy = self.y(y)
        self.parts.append(f'<line x1="{self.left}" y1="{cy:.1f}" x2="{self.right}" y2="{cy:.1f}" stroke="{color}" '
                          f'stroke-dasharray="4,3" stroke-width="1"/><text x="{self.right - 4}" y="{cy - 4:.1f}" '
                          f'font-size="10" text-anchor="end" fill="{color}">{escape(label)}</text>')

    def add_legend(self, label: str, color: str, kind: str = "dot") -> None:
        self.legend.append((label, color, kind))

    def size_legend(self, title: str, entries: Sequence[tuple[str, float]]) -> None:
        """Marker sizes and what they stand for (below the color legend)."""
        y = self.top + 18 * len(self.legend) + 22
        out = [f'<text x="{self.legend_x}" y="{y}" font-size="11" font-weight="bold">{escape(title)}</text>']
        y += 10
        for label, r in entries:
            y += r + 4
            out.append(f'<circle cx="{self.legend_x + 14}" cy="{y:.1f}" r="{r:.1f}" fill="#999" fill-opacity="0.4" '
                       f'stroke="#666"/><text x="{self.legend_x + 34}" y="{y + 4:.1f}" font-size="11">'
                       f'{escape(label)}</text>')
            y += r
        self.extra_legend.extend(out)

    def _axes(self) -> list[str]:
        out = []
        for t in self.x.ticks():
            px = self.x(t)
            out.append(f'<line x1="{px:.1f}" y1="{self.top}" x2="{px:.1f}" y2="{self.bottom}" stroke="#e4e4e4"/>'
                       f'<text x="{px:.1f}" y="{self.bottom + 16}" font-size="11" text-anchor="middle">'
                       f'{escape(self.x_fmt(t))}</text>')
        for t in self.y.ticks():
            py = self.y(t)
            out.append(f'<line x1="{self.left}" y1="{py:.1f}" x2="{self.right}" y2="{py:.1f}" stroke="#e4e4e4"/>'
                       f'<text x="{self.left - 6}" y="{py + 4:.1f}" font-size="11" text-anchor="end">'
                       f'{escape(self.y_fmt(t))}</text>')
        out.append(f'<rect x="{self.left}" y="{self.top}" width="{self.right - self.left}" '
                   f'height="{self.bottom - self.top}" fill="none" stroke="#888"/>')
        xl = self.xlabel + (" (log scale)" if self.x.log else "")
        yl = self.ylabel + (" (log scale)" if self.y.log else "")
        out.append(f'<text x="{(self.left + self.right) / 2:.1f}" y="{self.height - 10}" font-size="12" '
                   f'text-anchor="middle">{escape(xl)}</text>')
        out.append(f'<text transform="translate(16,{(self.top + self.bottom) / 2:.1f}) rotate(-90)" font-size="12" '
                   f'text-anchor="middle">{escape(yl)}</text>')
        return out

    def _legend(self) -> list[str]:
        out, y = [], self.top + 8
        for label, color, kind in self.legend:
            if kind == "dot":
                mark = f'<circle cx="{self.legend_x + 6}" cy="{y}" r="5" fill="{color}" fill-opacity="0.7"/>'
            else:
                dash = ' stroke-dasharray="5,4"' if kind == "dash" else ""
                mark = (f'<line x1="{self.legend_x}" y1="{y}" x2="{self.legend_x + 16}" y2="{y}" stroke="{color}" '
                        f'stroke-width="2"{dash}/>')
            out.append(f'{mark}<text x="{self.legend_x + 22}" y="{y + 4}" font-size="11">{escape(label)}</text>')
            y += 18
        return out

    def render(self, note: str | None = None) -> str:
        body = self._axes() + self.parts + self._legend() + self.extra_legend
        if self.empty or note:
            body.append(f'<text x="{(self.left + self.right) / 2:.1f}" y="{(self.top + self.bottom) / 2:.1f}" '
                        f'font-size="13" text-anchor="middle" fill="#777">{escape(note or "no data")}</text>')
        return _svg(self.id, self.title, self.width, self.height, body)


def bar_chart(fig_id: str, title: str, ylabel: str, categories: Sequence[str],
              series: Sequence[tuple[str, str, Sequence[float | None]]], y_fmt: Callable[[float], str] = _num,
              highlight: str | None = None, annotations: Sequence[str | None] | None = None,
              reference: tuple[float, str] | None = None, width: int = 600, height: int = 380,
              note: str | None = None) -> str:
    """Grouped vertical bars: one group per category, one bar per series (label, color, values).
    ``highlight``: a category drawn with a heavier outline (full fine-tuning); ``annotations``:
    a text above each group; ``reference``: a dashed horizontal line (value, label)."""
    left, right, top, bottom = 64, width - 16, 40 + 22 * (len(series) > 1), height - 70
    values = [v for _, _, vs in series for v in vs if v is not None and math.isfinite(v)]
    if reference is not None:
        values.append(reference[0])
    y = Scale(values or [0.0, 1.0], bottom, top, include_zero=True)
    out = []
    for t in y.ticks():
        py = y(t)
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#e4e4e4"/>'
                   f'<text x="{left - 6}" y="{py + 4:.1f}" font-size="11" text-anchor="end">{escape(y_fmt(t))}</text>')
    zero = y(0.0) if y.lo <= 0 <= y.hi else bottom
    group = (right - left) / max(1, len(categories))
    bar = group * 0.7 / max(1, len(series))
    for i, category in enumerate(categories):
        gx = left + i * group + group * 0.15
        for j, (label, color, vs) in enumerate(series):
            v = vs[i]
            if v is None or not math.isfinite(v):
                out.append(f'<text x="{gx + j * bar + bar / 2:.1f}" y="{zero - 4:.1f}" font-size="10" '
                           'text-anchor="middle" fill="#999">n/a</text>')
                continue
            py = y(v)
            heavy = ' stroke="#000" stroke-width="2"' if category == highlight else ""
            out.append(f'<rect x="{gx + j * bar:.1f}" y="{min(py, zero):.1f}" width="{bar * 0.92:.1f}" '
                       f'height="{abs(zero - py):.1f}" fill="{color}" fill-opacity="0.8"{heavy}>'
                       f'<title>{escape(f"{category} {label}: {y_fmt(v)}")}</title></rect>')
        if annotations and annotations[i]:
            tops = [y(v) for _, _, vs in series for v in [vs[i]] if v is not None and math.isfinite(v)]
            ty = (min(tops) if tops else zero) - 6
            out.append(f'<text x="{left + (i + 0.5) * group:.1f}" y="{ty:.1f}" font-size="10" text-anchor="middle" '
                       f'fill="#333">{escape(annotations[i])}</text>')
        cx = left + (i + 0.5) * group
        weight = ' font-weight="bold"' if category == highlight else ""
        out.append(f'<text transform="translate({cx:.1f},{bottom + 12}) rotate(30)" font-size="11"{weight}>'
                   f'{escape(category)}</text>')
    if reference is not None:
        py = y(reference[0])
        out.append(f'<line x1="{left}" y1="{py:.1f}" x2="{right}" y2="{py:.1f}" stroke="#000" stroke-dasharray="5,4"/>'
                   f'<text x="{right - 4}" y="{py - 4:.1f}" font-size="10" text-anchor="end">{escape(reference[1])}</text>')
    out.append(f'<line x1="{left}" y1="{zero:.1f}" x2="{right}" y2="{zero:.1f}" stroke="#888"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#888"/>')
    out.append(f'<text transform="translate(16,{(top + bottom) / 2:.1f}) rotate(-90)" font-size="12" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    if len(series) > 1:
        x = right - sum(24 + 7 * len(label) for label, _, _ in series)
        for label, color, _ in series:
            out.append(f'<rect x="{x}" y="{top - 24}" width="12" height="12" fill="{color}" fill-opacity="0.8"/>'
                       f'<text x="{x + 16}" y="{top - 14}" font-size="11">{escape(label)}</text>')
            x += 24 + 7 * len(label)
    if not categories or note:
        out.append(f'<text x="{(left + right) / 2:.1f}" y="{(top + bottom) / 2:.1f}" font-size="13" '
                   f'text-anchor="middle" fill="#777">{escape(note or "no data")}</text>')
    return _svg(fig_id, title, width, height, out)


def _svg(fig_id: str, title: str, width: int, height: int, body: list[str]) -> str:
    return (f'<svg id="{escape(fig_id)}" class="figure" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
            f'width="{width}" height="{height}" role="img" aria-label="{escape(title)}" '
            'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif">'
            f'<title>{escape(title)}</title><rect width="{width}" height="{height}" fill="#fff"/>'
            f'<text x="{width / 2}" y="20" font-size="14" font-weight="bold" text-anchor="middle">{escape(title)}</text>'
            + "".join(body) + "</svg>")
