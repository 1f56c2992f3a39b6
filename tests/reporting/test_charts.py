"""The dashboard's SVG charts: well-formed, accessible, carrying the figures they were given, escaping names."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date, timedelta

import pytest

from labcommons.reporting import charts
from labcommons.reporting.charts import Bar
from labcommons.reporting.service import (
    Dashboard,
    Flow,
    InstrumentRow,
    Period,
    Scope,
    ScopeKind,
    SeriesPoint,
    Totals,
)

NS = "{http://www.w3.org/2000/svg}"
HOSTILE = '<script>alert("x")</script> & Co'


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{NS}svg"
    assert root.get("role") == "img"
    title_id, desc_id = root.get("aria-labelledby", "").split()
    assert root.find(f"{NS}title").get("id") == title_id  # type: ignore[union-attr]
    assert root.find(f"{NS}desc").get("id") == desc_id  # type: ignore[union-attr]
    return root


def marks(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{NS}{tag}") if cls in (e.get("class") or "").split()]


def texts(root: ET.Element) -> list[str]:
    return ["".join(e.itertext()) for e in root.iter(f"{NS}text")]


def points(n: int) -> list[SeriesPoint]:
    return [SeriesPoint(date(2025, 3, 1) + timedelta(days=i), 90 * i, 60 * i, 1440, round(90 * i / 1440, 4))
            for i in range(n)]


def hours_svg(pts: list[SeriesPoint]) -> str:
    return charts.hours_chart(pts, "day", chart_id="h", title="Hours", booked_label="Booked",
                              effective_label="Effective", utilisation_label="Utilisation", hours_label="h",
                              empty_text="Nothing booked")


def test_hours_chart_marks_every_point_with_its_figures() -> None:
    pts = points(10)
    root = parse(hours_svg(pts))
    dots = marks(root, "circle", "point")
    assert [d.get("data-start") for d in dots] == [p.start.isoformat() for p in pts]
    assert [d.get("data-booked-hours") for d in dots] == [f"{1.5 * i:.1f}" for i in range(10)]
    assert [d.get("data-effective-hours") for d in dots] == [f"{1.0 * i:.1f}" for i in range(10)]
    assert dots[4].get("data-utilisation") == "0.25"
    assert "Booked 6.0 h" in "".join(dots[4].itertext()) and "25.0 %" in "".join(dots[4].itertext())
    assert marks(root, "polygon", "series-booked") and marks(root, "polyline", "series-utilisation")
    # Axis: hours ticks up to a round number above the largest value (13.5 h → 15), utilisation 0 … 100 %.
    assert [t.text for t in marks(root, "text", "tick-hours")] == ["0", "5", "10", "15"]
    assert [t.text for t in marks(root, "text", "tick-utilisation")][-1] == "100 %"
    assert "Booked: 67.5 h" in root.find(f"{NS}desc").text  # type: ignore[union-attr,operator]
    assert hours_svg(pts) == hours_svg(pts)


def test_hours_chart_with_one_point_or_none() -> None:
    root = parse(hours_svg(points(2)[1:]))
    assert len(marks(root, "circle", "point")) == 1
    empty = parse(hours_svg([]))
    assert "chart-empty" in (empty.get("class") or "")
    assert "Nothing booked" in texts(empty)


def test_heatmap_has_a_cell_per_weekday_and_hour() -> None:
    grid = [[0] * 24 for _ in range(7)]
    grid[2][9] = 150
    grid[4][14] = 30
    names = ["一", "二", "三", "四", "五", "六", HOSTILE]
    svg = charts.heatmap_chart(grid, chart_id="hm", title="Heat", weekday_names=names, hour_label="per hour",
                               hours_label="h", empty_text="none")
    root = parse(svg)
    cells = marks(root, "rect", "cell")
    assert len(cells) == 168
    by_key = {(int(c.get("data-weekday", -1)), int(c.get("data-hour", -1))): c for c in cells}
    assert by_key[(2, 9)].get("data-minutes") == "150" and by_key[(4, 14)].get("data-minutes") == "30"
    assert by_key[(2, 9)].get("fill") != by_key[(0, 0)].get("fill") != by_key[(4, 14)].get("fill")
    assert "三 09:00–10:00 · 2.5 h" in "".join(by_key[(2, 9)].itertext())
    assert HOSTILE in texts(root) and "<script>" not in svg
    assert [t.text for t in marks(root, "text", "legend-max")] == ["2.5 h"]
    assert "chart-empty" in (parse(charts.heatmap_chart(
        [[0] * 24] * 7, chart_id="e", title="t", weekday_names=names, hour_label="", hours_label="h",
        empty_text="none")).get("class") or "")
    with pytest.raises(ValueError):
        charts.heatmap_chart([[0] * 24] * 6, chart_id="x", title="t", weekday_names=names, hour_label="",
                             hours_label="h", empty_text="")


def test_bar_chart_escapes_names_and_scales_bars() -> None:
    bars = [Bar(HOSTILE, 12.5, "12.5 h", "/instruments/1?a=1&b=2"), Bar("Sequencer", 5.0, "5.0 h"),
            Bar("Idle\x00 one", 0.0, "0.0 h")]
    svg = charts.bar_chart(bars, chart_id="b", title="Top", value_label="Effective hours", empty_text="none")
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "\x00" not in svg
    root = parse(svg)
    rects = marks(root, "rect", "bar")
    assert [r.get("data-value") for r in rects] == ["12.5 h", "5.0 h", "0.0 h"]
    widths = [float(r.get("width", "nan")) for r in rects]
    assert widths[0] == pytest.approx(widths[1] * 2.5) and widths[2] == 0
    assert [t.text for t in marks(root, "text", "bar-value")] == ["12.5 h", "5.0 h", "0.0 h"]
    labels = ["".join(t.itertext()) for t in marks(root, "text", "bar-label")]
    assert labels[0] == HOSTILE[:29] + "…" + HOSTILE  # shortened on the chart, whole in its tooltip
    links = list(root.iter(f"{NS}a"))
    assert [a.get("href") for a in links] == ["/instruments/1?a=1&b=2"]
    # A scale of 100 (percentages) keeps a 50 % bar at half the width.
    half = parse(charts.bar_chart([Bar("a", 50, "50 %")], chart_id="p", title="t", value_label="u",
                                  empty_text="", scale_max=100))
    full = parse(charts.bar_chart([Bar("a", 100, "100 %")], chart_id="p", title="t", value_label="u",
                                  empty_text="", scale_max=100))
    assert float(marks(half, "rect", "bar")[0].get("width", "0")) * 2 == pytest.approx(
        float(marks(full, "rect", "bar")[0].get("width", "0")))
    assert "none" in texts(parse(charts.bar_chart([], chart_id="e", title="t", value_label="u", empty_text="none")))


@pytest.mark.parametrize("regions", [("CQ", "SC"), ("CQ", "SC", "GZ")])
def test_flow_chart_draws_each_flow_with_hours_and_money(regions: tuple[str, ...]) -> None:
    flows = [Flow("CQ", "CQ", 600, 540, 12_345), Flow("CQ", "SC", 300, 240, 5_000), Flow("SC", "CQ", 120, 60, 100)]
    if "GZ" in regions:
        flows.append(Flow("GZ", "SC", 90, 90, 0))
    names = {"CQ": "重庆", "SC": HOSTILE}
    svg = charts.flow_chart(flows, chart_id="f", title="Flows", region_names=names, hours_label="h",
                            internal_label="Within", empty_text="none")
    assert "<script>" not in svg
    root = parse(svg)
    groups = marks(root, "g", "flow")
    assert [(g.get("data-provider"), g.get("data-user"), g.get("data-effective-hours"), g.get("data-fen"))
            for g in groups] == [(f.provider_region, f.user_region, charts.hours_text(f.effective_min),
                                  str(f.revenue_fen)) for f in flows]
    labels = texts(root)
    assert "Within · 9.0 h · ¥123.45" in labels
    assert "CQ → SC · 4.0 h · ¥50.00" in labels and "SC → CQ · 1.0 h · ¥1.00" in labels
    assert sorted(g.get("data-region") for g in marks(root, "g", "region")) == sorted(regions)
    # Wider arrows for more hours: CQ→SC (4 h) is drawn wider than SC→CQ (1 h).
    width = {(g.get("data-provider"), g.get("data-user")): float(g.find(f"{NS}path").get("stroke-width", "0"))  # type: ignore[union-attr]
             for g in groups}
    assert width[("CQ", "SC")] > width[("SC", "CQ")]
    assert "none" in texts(parse(charts.flow_chart([], chart_id="e", title="t", region_names={}, hours_label="h",
                                                   internal_label="", empty_text="none")))


def test_turnaround_buckets_and_histogram() -> None:
    days = [0.0, 0.99, 1.0, 2.5, 4.99, 13.9, 30.0, 45.5]
    buckets = dict(charts.turnaround_buckets(days))
    assert buckets["<1"] == 2 and buckets["1–2"] == 1 and buckets["2–3"] == 1 and buckets["3–5"] == 1
    assert buckets["10–14"] == 1 and buckets["≥30"] == 2 and sum(buckets.values()) == len(days)
    root = parse(charts.turnaround_chart(days, chart_id="t", title="Turnaround", days_label="days",
                                         orders_label="Orders", empty_text="none"))
    assert {r.get("data-bucket"): int(r.get("data-count", "-1")) for r in marks(root, "rect", "bucket")} == buckets
    assert "none" in texts(parse(charts.turnaround_chart([], chart_id="e", title="t", days_label="d",
                                                         orders_label="o", empty_text="none")))


def _dashboard() -> Dashboard:
    row = InstrumentRow(1, "CQ-CONF", "共聚焦<b>", "Confocal <b>", 1, "CQ", 2, 300, 240, 120, 60, 6000, 0.05, 0)
    idle = InstrumentRow(2, "CQ-EM", "电镜", "Cryo-EM", 1, "CQ", 0, 0, 0, 0, 0, 6000, 0.0, 0)
    return Dashboard(
        scope=Scope(ScopeKind.region, "CQ", "重庆", "Chongqing", "CQ"), period=Period(date(2025, 3, 1),
                                                                                   date(2025, 3, 10)),
        today=date(2025, 3, 11), totals=Totals(), granularity="day", series=points(10),
        heatmap=[[60 if h == 9 else 0 for h in range(24)] for _ in range(7)], top=[row], idle=[idle, row],
        idle_count=1, flows=[Flow("CQ", "SC", 300, 240, 5000)], turnaround_days=[1.5, 3.0],
    )


@pytest.mark.parametrize("locale", ["zh_CN", "en"])
def test_dashboard_charts_names_instruments_in_the_locale(locale: str) -> None:
    made = charts.dashboard_charts(_dashboard(), lambda s: s, locale=locale, region_names={"CQ": "C", "SC": "S"},
                                   instrument_href=lambda i: f"/instruments/{i}")
    assert set(made) == {"hours", "heatmap", "top", "idle", "flows", "turnaround"}
    ids = [parse(svg).get("id") for svg in made.values()]
    assert len(set(ids)) == len(ids)
    top = texts(parse(made["top"]))
    assert ("共聚焦<b>" if locale == "zh_CN" else "Confocal <b>") in "".join(top)
    assert [t.text for t in marks(parse(made["idle"]), "text", "bar-value")] == ["0.0 %", "5.0 %"]
    assert made == charts.dashboard_charts(_dashboard(), lambda s: s, locale=locale,
                                           region_names={"CQ": "C", "SC": "S"},
                                           instrument_href=lambda i: f"/instruments/{i}")


def test_number_texts() -> None:
    assert charts.hours_text(0) == "0.0" and charts.hours_text(3) == "0.1" and charts.hours_text(90) == "1.5"
    assert charts.hours_text(600_000) == "10,000.0"
    assert charts.percent_text(None) == "—" and charts.percent_text(0.25315) == "25.3 %"
    assert charts.percent_text(0.0005) == "0.1 %"  # half up, exactly
