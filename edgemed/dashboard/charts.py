"""Charts as server-side SVG: a line chart and a stacked bar chart, with axes, labels, a legend and a title.

The page's Content-Security-Policy allows no inline style, so nothing here writes a ``style`` attribute or a
``<style>`` element: colours are SVG presentation attributes (``fill``, ``stroke``) and every element also carries
a CSS class the stylesheet may refine. Every text (a title, a series name, an axis label) may come from a device
(a site, a model name, a class label), so each is XML-escaped here, in one place (``_esc``); the result is a
complete ``<svg>`` element that a template inserts as markup. Each chart is an ``role="img"`` with a ``<title>``
and a ``<desc>`` that says in words what it shows, for a screen reader.

Times on the x axis are seconds since the epoch, labelled in UTC (the dashboard's clock).
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LEVEL_COLOURS", "PALETTE", "Series", "Stack", "line_chart", "nice_ticks", "stacked_bars", "time_ticks"]

#: Colours of successive series (Okabe-Ito: distinguishable with the common colour-vision deficiencies).
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
#: Triage levels keep one colour on every chart.
LEVEL_COLOURS = {
    "urgent": "#d55e00",
    "inconclusive": "#e69f00",
    "routine": "#0072b2",
    "no_finding": "#009e73",
    "recapture": "#cc79a7",
    "error": "#555555",
}
_MARGIN = (16, 16, 44, 64)  # top, right, bottom, left (pixels)
_LEGEND_ROW = 18


@dataclass(frozen=True)
class Series:
    """One line: its name and its ``(time, value)`` points, oldest first."""

    name: str
    points: Sequence[tuple[float, float]]
    colour: str | None = None


@dataclass(frozen=True)
class Stack:
    """One layer of a stacked bar chart: its name and one value per bar."""

    name: str
    values: Sequence[float]
    colour: str | None = None


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def _num(value: float) -> str:
    return f"{value:.1f}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering ``low``..``high`` (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(low) and math.isfinite(high)) or high <= low:
        high = low + 1.0
    raw = (high - low) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _tick_label(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:g}"


#: Steps between two time ticks (seconds): whole minutes, hours and days, so a label reads as a round time.
_TIME_STEPS = (60, 300, 900, 1800, 3600, 2 * 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 2 * 86400, 7 * 86400,
               14 * 86400, 30 * 86400, 91 * 86400)  # fmt: skip


def time_ticks(start: float, end: float, count: int = 6) -> list[float]:
    """Round times (UTC) between ``start`` and ``end``, at most ``count + 1`` of them."""
    span = max(end - start, 1.0)
    step = next((st for st in _TIME_STEPS if span / st <= count), _TIME_STEPS[-1])
    first = math.ceil(start / step) * step
    return [float(t) for t in range(int(first), int(end) + 1, step)]


def _time_label(at: float, span_s: float) -> str:
    fmt = "%H:%M" if span_s <= 86400 else "%m-%d %H:%M" if span_s <= 7 * 86400 else "%Y-%m-%d"
    return time.strftime(fmt, time.gmtime(at))


class _Frame:
    """Pixel geometry of a chart's plot area and its scales."""

    def __init__(self, width: int, height: int, legend_rows: int, x: tuple[float, float], y: list[float]) -> None:
        top, right, bottom, left = _MARGIN
        self.width, self.height, self.legend_rows = width, height, legend_rows
        self.left, self.top = left, top
        self.plot_w = width - left - right
        self.plot_h = height - top - bottom - legend_rows * _LEGEND_ROW
        self.x0, self.x1 = x if x[1] > x[0] else (x[0], x[0] + 1.0)
        self.yticks = y
        self.y0, self.y1 = y[0], y[-1]

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.plot_w

    def py(self, y: float) -> float:
        return self.top + self.plot_h - (y - self.y0) / (self.y1 - self.y0) * self.plot_h

    @property
    def bottom(self) -> float:
        return self.top + self.plot_h


def _open(ident: str, title: str, desc: str, width: int, height: int) -> list[str]:
    ident = "".join(c for c in ident if c.isalnum() or c in "-_") or "chart"
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" aria-labelledby="{ident}-title {ident}-desc">',
        f'<title id="{ident}-title">{_esc(title)}</title>',
        f'<desc id="{ident}-desc">{_esc(desc)}</desc>',
    ]


def _y_axis(frame: _Frame, y_label: str) -> list[str]:
    out = ['<g class="axis y-axis" font-size="11" fill="#333333">']
    for tick in frame.yticks:
        y = _num(frame.py(tick))
        out.append(
            f'<line class="grid" x1="{frame.left}" x2="{_num(frame.left + frame.plot_w)}" y1="{y}" y2="{y}" '
            'stroke="#dddddd" stroke-width="1"/>'
        )
        out.append(f'<text x="{frame.left - 6}" y="{y}" text-anchor="end" dy="4">{_esc(_tick_label(tick))}</text>')
    mid = _num(frame.top + frame.plot_h / 2)
    out.append(
        f'<text class="axis-label" x="14" y="{mid}" text-anchor="middle" transform="rotate(-90 14 {mid})">'
        f"{_esc(y_label)}</text>"
    )
    out.append("</g>")
    return out


def _x_time_axis(frame: _Frame, count: int = 7) -> list[str]:
    span = frame.x1 - frame.x0
    out = [
        '<g class="axis x-axis" font-size="11" fill="#333333">',
        f'<line x1="{frame.left}" x2="{_num(frame.left + frame.plot_w)}" y1="{_num(frame.bottom)}" '
        f'y2="{_num(frame.bottom)}" stroke="#333333" stroke-width="1"/>',
    ]
    for at in time_ticks(frame.x0, frame.x1, count):
        x = _num(frame.px(at))
        out.append(
            f'<text x="{x}" y="{_num(frame.bottom + 16)}" text-anchor="middle">{_esc(_time_label(at, span))}</text>'
        )
    out.append(
        f'<text class="axis-label" x="{_num(frame.left + frame.plot_w / 2)}" y="{_num(frame.bottom + 32)}" '
        'text-anchor="middle">time (UTC)</text>'
    )
    out.append("</g>")
    return out


def _legend(frame: _Frame, names: Sequence[tuple[str, str]]) -> list[str]:
    out = ['<g class="legend" font-size="12" fill="#333333">']
    x, row = float(frame.left), 0
    for name, colour in names:
        label = name if len(name) <= 40 else name[:39] + "…"
        item_w = 24 + 7 * len(label)
        if x + item_w > frame.width and x > frame.left:
            x, row = float(frame.left), row + 1
        y = frame.height - 8 - (frame.legend_rows - 1 - row) * _LEGEND_ROW
        out.append(f'<rect x="{_num(x)}" y="{_num(y - 10)}" width="12" height="12" fill="{_esc(colour)}"/>')
        out.append(f'<text x="{_num(x + 16)}" y="{_num(y)}">{_esc(label)}</text>')
        x += item_w
    out.append("</g>")
    return out


def _legend_rows(names: Sequence[str], width: int) -> int:
    left, right = _MARGIN[3], _MARGIN[1]
    rows, x = 1, float(left)
    for name in names:
        item_w = 24 + 7 * min(len(name), 40)
        if x + item_w > width - right and x > left:
            rows, x = rows + 1, float(left)
        x += item_w
    return rows


def _empty(ident: str, title: str, width: int, height: int) -> str:
    parts = _open(ident, title, f"{title}: no data in this period.", width, height)
    parts.append(
        f'<text class="empty" x="{width // 2}" y="{height // 2}" text-anchor="middle" font-size="13" '
        'fill="#555555">No data in this period</text>'
    )
    return "\n".join([*parts, "</svg>"])


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    y_label: str,
    ident: str,
    x_range: tuple[float, float] | None = None,
    width: int = 720,
    height: int = 260,
) -> str:
    """A line chart of values over time.

    Args:
        series: the lines; a point whose value is not finite breaks its line there.
        title: the chart's title (its ``<title>``).
        y_label: what the values are, with their unit.
        ident: a prefix for the element ids (unique on the page; other characters than ``[A-Za-z0-9_-]`` dropped).
        x_range: the period shown (seconds since the epoch); default: the points' own.
        width: pixels.
        height: pixels.

    Returns:
        One ``<svg>`` element.
    """
    points = [p for s in series for p in s.points if math.isfinite(p[1])]
    if not points:
        return _empty(ident, title, width, height)
    xs = [p[0] for p in points]
    x = x_range or (min(xs), max(xs))
    ys = [p[1] for p in points]
    colours = [(s.name, s.colour or PALETTE[i % len(PALETTE)]) for i, s in enumerate(series)]
    rows = _legend_rows([n for n, _ in colours], width)
    frame = _Frame(width, height, rows, x, nice_ticks(min(0.0, min(ys)), max(ys)))
    desc = f"{title}: " + "; ".join(
        f"{s.name}, {len(s.points)} points, last {_tick_label(s.points[-1][1])}" for s in series if s.points
    )
    parts = [*_open(ident, title, desc, width, height), *_y_axis(frame, y_label), *_x_time_axis(frame)]
    for (name, colour), s in zip(colours, series, strict=True):
        runs: list[list[str]] = [[]]
        for at, value in s.points:
            if not math.isfinite(value) or not x[0] <= at <= x[1]:
                runs.append([])
                continue
            runs[-1].append(f"{_num(frame.px(at))},{_num(frame.py(value))}")
        parts.append(f'<g class="series" fill="none" stroke="{_esc(colour)}" stroke-width="2">')
        parts.append(f"<title>{_esc(name)}</title>")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="2.5" fill="{_esc(colour)}"/>')
            elif run:
                parts.append(f'<polyline points="{" ".join(run)}"/>')
        parts.append("</g>")
    parts += _legend(frame, colours)
    parts.append("</svg>")
    return "\n".join(parts)


def stacked_bars(
    starts: Sequence[float],
    stacks: Sequence[Stack],
    *,
    title: str,
    y_label: str,
    ident: str,
    bar_s: float,
    width: int = 720,
    height: int = 260,
) -> str:
    """A stacked bar chart over time: one bar per period, one layer per stack.

    Args:
        starts: each bar's period start (seconds since the epoch), ascending.
        stacks: the layers, bottom first; each has one value per bar.
        title: the chart's title.
        y_label: what the values are.
        ident: a prefix for the element ids.
        bar_s: each period's length (seconds).
        width: pixels.
        height: pixels.

    Returns:
        One ``<svg>`` element.

    Raises:
        ValueError: a stack does not have one value per bar.
    """
    for stack in stacks:
        if len(stack.values) != len(starts):
            raise ValueError(f"stack {stack.name!r} has {len(stack.values)} values for {len(starts)} bars")
    totals = [sum(s.values[i] for s in stacks) for i in range(len(starts))]
    if not starts or max(totals, default=0) <= 0:
        return _empty(ident, title, width, height)
    colours = [(s.name, s.colour or PALETTE[i % len(PALETTE)]) for i, s in enumerate(stacks)]
    rows = _legend_rows([n for n, _ in colours], width)
    frame = _Frame(width, height, rows, (starts[0], starts[-1] + bar_s), nice_ticks(0.0, max(totals)))
    desc = f"{title}: {len(starts)} periods, " + ", ".join(f"{s.name} {_tick_label(sum(s.values))}" for s in stacks)
    parts = [*_open(ident, title, desc, width, height), *_y_axis(frame, y_label), *_x_time_axis(frame)]
    bar_w = max(1.0, frame.px(starts[0] + bar_s) - frame.px(starts[0]) - 1.0)
    for layer, ((name, colour), stack) in enumerate(zip(colours, stacks, strict=True)):
        parts.append(f'<g class="stack" fill="{_esc(colour)}"><title>{_esc(name)}</title>')
        for i, start in enumerate(starts):
            value = stack.values[i]
            if value <= 0:
                continue
            below = sum(s.values[i] for s in stacks[:layer])
            y_top, y_bottom = frame.py(below + value), frame.py(below)
            parts.append(
                f'<rect x="{_num(frame.px(start))}" y="{_num(y_top)}" width="{_num(bar_w)}" '
                f'height="{_num(max(0.5, y_bottom - y_top))}"><title>{_esc(name)}: {_esc(_tick_label(value))} at '
                f"{_esc(_time_label(start, 8 * 86400))}</title></rect>"
            )
        parts.append("</g>")
    parts += _legend(frame, colours)
    parts.append("</svg>")
    return "\n".join(parts)
