"""What the fleet, charts and device pages show, built from ``fleet_data`` and ``drift`` rows (no request here).

Charts come from ``charts.py`` as complete ``<svg>`` elements in which every device string is already escaped;
they are wrapped in ``Markup`` here, once, so a template inserts them as they are and escapes everything else.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from urllib.parse import quote

from markupsafe import Markup

from edgemed.dashboard.charts import LEVEL_COLOURS, Series, Stack, line_chart, stacked_bars
from edgemed.dashboard.drift import Drift
from edgemed.dashboard.rollup import hour_of
from edgemed.dashboard.validate import LEVELS

__all__ = ["device_charts", "device_href", "drift_rows", "fleet_rows", "results_per_hour_chart", "triage_charts"]

_HOUR = 3600
#: Most bars of a chart: a longer period is drawn per day.
_MAX_BARS = 72
_SERIES_TITLES = {
    "fps": ("Frames per second", "frames/s"),
    "p95_ms": ("Inference latency, 95th percentile", "ms"),
    "cpu_percent": ("CPU", "%"),
    "pending": ("Results waiting to be sent", "results"),
}


def device_href(site: str, device_id: str) -> str:
    """The device page's path (each part percent-encoded: both are device strings)."""
    return f"/devices/{quote(site, safe='')}/{quote(device_id, safe='')}"


def _state(row: dict[str, Any]) -> str:
    if row["state"] == "online":
        return "silent" if row["silent"] else "online"
    return "offline" if row["state"] == "offline" else "unknown"


def fleet_rows(devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fleet table's rows: each device with its link, its connection word and a short sha256."""
    out = []
    for row in devices:
        sha = row.get("model_sha256")
        out.append({**row, "href": device_href(row["site"], row["device_id"]), "connection": _state(row),
                    "sha_short": sha[:12] if isinstance(sha, str) else None})  # fmt: skip
    return out


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.0f}%"


def drift_rows(report: list[Drift]) -> list[dict[str, Any]]:
    """The drift table's rows: per site and model, each label's recent and reference share, and the verdict."""
    out = []
    for d in report:
        ref = d.reference
        mix = [
            {"label": label, "recent": _pct(d.class_mix.get(label, 0.0) if d.n else None),
             "reference": _pct(ref.class_mix.get(label, 0.0)) if ref is not None else ""}
            for label in d.labels
        ]  # fmt: skip
        out.append(
            {
                "site": d.site,
                "model": d.model,
                "n": d.n,
                "mix": mix,
                "confidence": _pct(d.mean_confidence),
                "reference_confidence": _pct(ref.mean_confidence) if ref is not None else "",
                "reference_version": d.reference_version,
                "reference_n": ref.n if ref is not None else None,
                "versions_differ": d.versions_differ,
                "psi": None if d.psi is None else f"{d.psi:.3f}",
                "status": d.status,
            }
        )
    return out


def _buckets(since: float, now: float) -> tuple[list[float], int]:
    """Bar starts from ``since`` to ``now``: hours, or days when that would be more than ``_MAX_BARS`` bars."""
    size = _HOUR if (now - since) / _HOUR <= _MAX_BARS else 86400
    first = (int(since) // size) * size
    return [float(t) for t in range(first, int(now) + 1, size)], size


def triage_charts(levels: list[dict[str, Any]], since: float, now: float) -> list[dict[str, Any]]:
    """One stacked bar chart per site: results per period by triage level (``fleet_data.hourly_levels`` rows).

    Returns:
        Dicts with ``site`` and ``svg`` (``Markup``), sorted by site.
    """
    starts, size = _buckets(since, now)
    index = {t: i for i, t in enumerate(starts)}
    per_site: dict[str, dict[str, list[float]]] = defaultdict(lambda: {lv: [0.0] * len(starts) for lv in LEVELS})
    for row in levels:
        slot = index.get(float((row["hour"] // size) * size))
        if slot is not None and row["level"] in LEVELS:
            per_site[row["site"]][row["level"]][slot] += row["n"]
    out = []
    for n, site in enumerate(sorted(per_site)):
        stacks = [Stack(lv, per_site[site][lv], LEVEL_COLOURS.get(lv)) for lv in LEVELS if any(per_site[site][lv])]
        per = "hour" if size == _HOUR else "day"
        svg = stacked_bars(starts, stacks, title=f"Triage mix at {site}, per {per}", y_label=f"results per {per}",
                           ident=f"mix-{n}", bar_s=float(size), width=560)  # fmt: skip
        out.append({"site": site, "svg": Markup(svg)})  # charts.py escaped every string in it
    return out


def results_per_hour_chart(levels: list[dict[str, Any]], since: float, now: float) -> Markup:
    """A line per site: results stored per hour (every level), from ``fleet_data.hourly_levels`` rows."""
    totals: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for row in levels:
        totals[row["site"]][row["hour"]] += row["n"]
    hours = range(hour_of(since), hour_of(now) + 1, _HOUR)
    series = [Series(site, [(float(h), totals[site].get(h, 0.0)) for h in hours]) for site in sorted(totals)]
    svg = line_chart(series, title="Results per hour, per site", y_label="results per hour", ident="per-hour",
                     x_range=(float(hour_of(since)), float(hour_of(now))))  # fmt: skip
    return Markup(svg)  # charts.py escaped every string in it


def device_charts(
    series: dict[str, list[tuple[float, float]]], device_id: str, since: float, now: float
) -> list[dict[str, Any]]:
    """The device page's four line charts (frame rate, latency p95, CPU, backlog) over ``since``..``now``.

    Returns:
        Dicts with ``title`` and ``svg`` (``Markup``).
    """
    out = []
    for name, (title, unit) in _SERIES_TITLES.items():
        svg = line_chart([Series(f"{device_id} {unit}", series.get(name, []))], title=title, y_label=unit,
                         ident=f"dev-{name}", x_range=(since, now), width=480, height=220)  # fmt: skip
        out.append({"title": title, "svg": Markup(svg)})  # charts.py escaped every string in it
    return out
