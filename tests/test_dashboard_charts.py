"""Server-side SVG charts: well-formed XML, no style attribute (the CSP forbids inline style), hostile labels
escaped, gaps in a line, stacked bars that add up."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import pytest

from edgemed.dashboard.charts import Series, Stack, line_chart, nice_ticks, stacked_bars, time_ticks

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert("x")</script>&amp; "quoted" \' onload=alert(1)'


def _parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("role") == "img"
    for element in root.iter():
        assert "style" not in element.attrib, element.tag
        assert element.tag != f"{SVG}style" and element.tag != f"{SVG}script"
        assert not any(name.startswith("on") for name in element.attrib), element.attrib
    return root


def _texts(root: ET.Element) -> list[str]:
    return [el.text or "" for el in root.iter() if el.tag in (f"{SVG}text", f"{SVG}title", f"{SVG}desc")]


def test_a_line_chart_is_valid_svg_with_hostile_names_as_text() -> None:
    svg = line_chart(
        [Series(HOSTILE, [(0.0, 1.0), (60.0, 2.0), (120.0, 3.0)]), Series("fps", [(0.0, 5.0), (120.0, 4.0)])],
        title=f"title {HOSTILE}",
        y_label="frames per second",
        ident='dev"<1>',
    )
    root = _parse(svg)
    assert "<script" not in svg and 'onload=alert(1)"' not in svg
    texts = _texts(root)
    assert f"title {HOSTILE}" in texts  # the <title>, read back as the very text given
    assert HOSTILE in texts  # the series' own title and its legend entry
    title = root.find(f"{SVG}title")
    assert title is not None and root.get("aria-labelledby") == f"{title.get('id')} dev1-desc"
    assert len(root.findall(f".//{SVG}polyline")) == 2


def test_a_gap_in_a_line_breaks_it_and_a_lone_point_is_a_dot() -> None:
    points = [(0.0, 1.0), (10.0, 2.0), (20.0, math.nan), (30.0, 2.0), (40.0, math.nan), (50.0, 1.0), (60.0, 3.0)]
    root = _parse(line_chart([Series("p95", points)], title="latency", y_label="ms", ident="lat"))
    assert len(root.findall(f".//{SVG}polyline")) == 2 and len(root.findall(f".//{SVG}circle")) == 1


def test_stacked_bars_add_up_and_escape_names() -> None:
    svg = stacked_bars(
        [0.0, 3600.0, 7200.0],
        [Stack("urgent", [1, 0, 2]), Stack(HOSTILE, [3, 4, 2])],
        title="triage mix",
        y_label="results",
        ident="mix",
        bar_s=3600.0,
    )
    root = _parse(svg)
    assert HOSTILE in _texts(root)
    rects = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(rects) == 5  # zero-height layers are left out
    heights: dict[str, float] = {}
    for rect in rects:
        heights[rect.get("x", "")] = heights.get(rect.get("x", ""), 0.0) + float(rect.get("height", "0"))
    # Every bar totals 4 results: the same height each.
    assert len(heights) == 3 and max(heights.values()) - min(heights.values()) < 1.0


def test_no_data_says_so_and_bad_input_is_named() -> None:
    root = _parse(line_chart([Series("fps", [])], title="fps", y_label="fps", ident="e"))
    assert "No data in this period" in _texts(root)
    _parse(stacked_bars([], [], title="mix", y_label="n", ident="e2", bar_s=3600))
    with pytest.raises(ValueError, match="stack 'urgent' has 1 values for 2 bars"):
        stacked_bars([0.0, 1.0], [Stack("urgent", [1])], title="t", y_label="n", ident="x", bar_s=1)


def test_ticks_are_round_and_cover_the_range() -> None:
    assert nice_ticks(0, 97) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(0, 1) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(5, 5)[0] <= 5 <= nice_ticks(5, 5)[-1]


def test_time_ticks_fall_on_round_times() -> None:
    day = 1_800_000_000.0  # 2027-01-15 08:00 UTC, on the hour
    ticks = time_ticks(day + 600, day + 86400 + 600)  # a day, starting ten minutes past
    assert all(t % (6 * 3600) == 0 for t in ticks) and 4 <= len(ticks) <= 8  # every six hours
    assert day + 600 <= ticks[0] and ticks[-1] <= day + 86400 + 600
    assert time_ticks(day, day + 1800)[1] - time_ticks(day, day + 1800)[0] == 300
