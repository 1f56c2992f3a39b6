"""Dashboard charts as self-contained SVG markup, drawn on the server so the same charts go into pages and PDFs.

Every function is pure: figures and already translated labels in, an SVG string out, the same bytes for the same
input. All text is escaped (instrument and institution names are user input). Each chart is `role="img"` with a
`<title>` and a `<desc>`, and each mark carries its figure in `data-*` attributes and a `<title>` tooltip, so the
numbers can be read without seeing the picture.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from html import escape

from labcommons.billing.exports import yuan_text
from labcommons.reporting.service import Dashboard, Flow, SeriesPoint

__all__ = [
    "TURNAROUND_EDGES", "Bar", "bar_chart", "dashboard_charts", "flow_chart", "heatmap_chart", "hours_chart",
    "hours_text", "percent_text", "turnaround_buckets", "turnaround_chart",
]

WIDTH = 720
FONT = 'font-family="Noto Sans CJK SC, WenQuanYi Micro Hei, sans-serif"'
BOOKED_COLOUR = "#9cc3e4"
EFFECTIVE_COLOUR = "#1f6f9f"
UTILISATION_COLOUR = "#c8641b"
AXIS_COLOUR = "#777777"
GRID_COLOUR = "#e3e3e3"
# Sequential scale for the heat-map, lightest first (ColorBrewer Blues, 6 steps).
HEAT_COLOURS = ("#f7fbff", "#c6dbef", "#9ecae1", "#6baed6", "#3182bd", "#08519c")
# Upper bounds (days, exclusive) of the turnaround histogram's buckets; the last bucket is open.
TURNAROUND_EDGES = (1, 2, 3, 5, 7, 10, 14, 21, 30)

# Characters XML 1.0 does not allow even escaped (names come from user input).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


def _esc(text: object) -> str:
    return escape(_NOT_XML.sub("", str(text)), quote=True)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def hours_text(minutes: int) -> str:
    """Minutes as hours with one decimal (half up, exact), as charts and pages show them: 90 → "1.5"."""
    value = (Decimal(minutes) / 60).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{value:,}"


def percent_text(rate: float | None) -> str:
    """A fraction as a percentage with one decimal (0.2531 → "25.3 %"); "—" when there is none."""
    if rate is None:
        return "—"
    value = (Decimal(str(rate)) * 100).quantize(Decimal("0.1"), rounding=ROUND_HALF_UP)
    return f"{value} %"


def _num(value: float) -> str:
    """A coordinate with at most one decimal, without a trailing ".0"."""
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def _text_width(text: str, size: int = 12) -> int:
    """Roughly how wide `text` is drawn (CJK characters are square, Latin ones about 0.6 em)."""
    return round(sum(size if ord(c) > 0x2E80 else size * 0.6 for c in text))


def _nice_step(top: float, ticks: int = 4) -> float:
    """A round step (1, 2, 2.5 or 5 × 10^k) so that `ticks` steps cover `top`."""
    if top <= 0:
        return 1.0
    raw = top / ticks
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 2.5, 5, 10):
        if factor * power >= raw:
            return float(factor * power)
    return float(10 * power)


def _tick_text(value: float) -> str:
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _open(chart_id: str, height: int, title: str, desc: str, extra_class: str) -> list[str]:
    cid = _esc(chart_id)
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart {extra_class}" id="{cid}" role="img" '
        f'aria-labelledby="{cid}-title {cid}-desc" viewBox="0 0 {WIDTH} {height}" width="{WIDTH}" '
        f'height="{height}" preserveAspectRatio="xMidYMid meet" {FONT} font-size="12">',
        f'<title id="{cid}-title">{_esc(title)}</title>',
        f'<desc id="{cid}-desc">{_esc(desc)}</desc>',
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
    ]


def _empty(chart_id: str, title: str, empty_text: str, extra_class: str, height: int = 120) -> str:
    parts = _open(chart_id, height, title, empty_text, extra_class + " chart-empty")
    parts.append(f'<text x="{WIDTH // 2}" y="{height // 2}" text-anchor="middle" fill="{AXIS_COLOUR}" '
                 f'font-size="14">{_esc(empty_text)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- hours over time


def _point_label(point: SeriesPoint, granularity: str) -> str:
    if granularity == "month":
        return point.start.strftime("%Y-%m")
    return point.start.strftime("%m-%d")


def hours_chart(points: Sequence[SeriesPoint], granularity: str, *, chart_id: str, title: str, booked_label: str,
                effective_label: str, utilisation_label: str, hours_label: str, empty_text: str) -> str:
    """Booked hours (area) and effective hours (line) per day, week or month on the left axis, utilisation
    (dashed line) on the right axis in percent."""
    if not points:
        return _empty(chart_id, title, empty_text, "chart-hours")
    height, left, right, top, bottom = 300, 64, 60, 34, 48
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    most = max(max(p.booked_min, p.effective_min) for p in points) / 60
    step = _nice_step(most)
    y_max = step * max(1, math.ceil(most / step)) if most > 0 else 4.0
    util_top = max(1.0, max((p.utilisation or 0.0) for p in points))
    util_top = math.ceil(util_top * 4) / 4  # a quarter of 100 % at a time, so the ticks stay round
    n = len(points)

    def x(i: int) -> float:
        return left + (plot_w / 2 if n == 1 else plot_w * i / (n - 1))

    def y(hours: float) -> float:
        return top + plot_h - plot_h * hours / y_max

    def y_util(rate: float) -> float:
        return top + plot_h - plot_h * rate / util_top

    total_booked = sum(p.booked_min for p in points)
    total_effective = sum(p.effective_min for p in points)
    desc = (f"{booked_label}: {hours_text(total_booked)} {hours_label}; {effective_label}: "
            f"{hours_text(total_effective)} {hours_label}; {points[0].start.isoformat()} – "
            f"{points[-1].start.isoformat()}")
    parts = _open(chart_id, height, title, desc, "chart-hours")
    # Grid and left axis (hours).
    tick = 0.0
    while tick <= y_max + 1e-9:
        ty = _num(y(tick))
        parts.append(f'<line x1="{left}" y1="{ty}" x2="{WIDTH - right}" y2="{ty}" stroke="{GRID_COLOUR}"/>')
        parts.append(f'<text x="{left - 6}" y="{ty}" dy="4" text-anchor="end" fill="{AXIS_COLOUR}" '
                     f'class="tick-hours">{_tick_text(tick)}</text>')
        tick += step
    parts.append(f'<text x="14" y="{top + plot_h // 2}" transform="rotate(-90 14 {top + plot_h // 2})" '
                 f'text-anchor="middle" fill="{AXIS_COLOUR}">{_esc(hours_label)}</text>')
    # Right axis (utilisation).
    for quarter in range(int(util_top * 4) + 1):
        rate = quarter / 4
        parts.append(f'<text x="{WIDTH - right + 6}" y="{_num(y_util(rate))}" dy="4" fill="{UTILISATION_COLOUR}" '
                     f'class="tick-utilisation">{round(rate * 100)} %</text>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{WIDTH - right}" y2="{top + plot_h}" '
                 f'stroke="{AXIS_COLOUR}"/>')
    # X labels: at most eight, evenly spaced, always the first and the last.
    wanted = min(n, 8)
    label_at = sorted({round(i * (n - 1) / (wanted - 1)) for i in range(wanted)}) if wanted > 1 else [0]
    for i in label_at:
        parts.append(f'<text x="{_num(x(i))}" y="{top + plot_h + 18}" text-anchor="middle" fill="{AXIS_COLOUR}" '
                     f'class="tick-x">{_esc(_point_label(points[i], granularity))}</text>')
    # Booked area, effective line, utilisation line.
    base_y = _num(y(0))
    booked = " ".join(f"{_num(x(i))},{_num(y(p.booked_min / 60))}" for i, p in enumerate(points))
    if n == 1:
        parts.append(f'<rect x="{_num(x(0) - 12)}" y="{_num(y(points[0].booked_min / 60))}" width="24" '
                     f'height="{_num(y(0) - y(points[0].booked_min / 60))}" fill="{BOOKED_COLOUR}"/>')
    else:
        parts.append(f'<polygon points="{_num(x(0))},{base_y} {booked} {_num(x(n - 1))},{base_y}" '
                     f'fill="{BOOKED_COLOUR}" fill-opacity="0.7" class="series-booked"/>')
        effective = " ".join(f"{_num(x(i))},{_num(y(p.effective_min / 60))}" for i, p in enumerate(points))
        parts.append(f'<polyline points="{effective}" fill="none" stroke="{EFFECTIVE_COLOUR}" stroke-width="2" '
                     f'class="series-effective"/>')
        util = " ".join(f"{_num(x(i))},{_num(y_util(p.utilisation or 0.0))}" for i, p in enumerate(points))
        parts.append(f'<polyline points="{util}" fill="none" stroke="{UTILISATION_COLOUR}" stroke-width="1.5" '
                     f'stroke-dasharray="5 3" class="series-utilisation"/>')
    # One invisible-ish mark per point carrying its figures (tooltips, tests, screen readers' data tables).
    for i, p in enumerate(points):
        text = (f"{p.start.isoformat()} · {booked_label} {hours_text(p.booked_min)} {hours_label} · "
                f"{effective_label} {hours_text(p.effective_min)} {hours_label} · "
                f"{utilisation_label} {percent_text(p.utilisation)}")
        dot = 2.5 if n < 60 else 1.5
        parts.append(
            f'<circle class="point" cx="{_num(x(i))}" cy="{_num(y(p.effective_min / 60))}" r="{dot}" '
            f'fill="{EFFECTIVE_COLOUR}" data-start="{p.start.isoformat()}" '
            f'data-booked-hours="{hours_text(p.booked_min)}" data-effective-hours="{hours_text(p.effective_min)}" '
            f'data-utilisation="{"" if p.utilisation is None else p.utilisation}"><title>{_esc(text)}</title></circle>')
    # Legend.
    legend = ((booked_label, BOOKED_COLOUR, ""), (effective_label, EFFECTIVE_COLOUR, ""),
              (utilisation_label, UTILISATION_COLOUR, ' stroke-dasharray="5 3"'))
    lx = left
    for label, colour, dash in legend:
        parts.append(f'<line x1="{lx}" y1="16" x2="{lx + 22}" y2="16" stroke="{colour}" stroke-width="6"{dash}/>')
        parts.append(f'<text x="{lx + 28}" y="20" class="legend">{_esc(label)}</text>')
        lx += 40 + _text_width(label)
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- heat-map


def heatmap_chart(grid: Sequence[Sequence[int]], *, chart_id: str, title: str, weekday_names: Sequence[str],
                  hour_label: str, hours_label: str, empty_text: str) -> str:
    """Booked minutes by weekday (rows, Monday first) and local hour (columns), darker for busier cells."""
    if len(grid) != 7 or any(len(row) != 24 for row in grid) or len(weekday_names) != 7:
        raise ValueError("a heat-map is 7 weekdays × 24 hours with 7 weekday names")
    most = max(max(row) for row in grid)
    if most <= 0:
        return _empty(chart_id, title, empty_text, "chart-heatmap")
    height, left, top, cell_w, cell_h = 268, 70, 30, 26, 24
    busiest = max(((w, h) for w in range(7) for h in range(24)), key=lambda wh: (grid[wh[0]][wh[1]], -wh[0], -wh[1]))
    total = sum(sum(row) for row in grid)
    desc = (f"{hours_text(total)} {hours_label}; max {weekday_names[busiest[0]]} {busiest[1]:02d}:00 "
            f"{hours_text(most)} {hours_label}")
    parts = _open(chart_id, height, title, desc, "chart-heatmap")
    for h in range(0, 24, 2):
        parts.append(f'<text x="{left + h * cell_w + cell_w // 2}" y="{top - 8}" text-anchor="middle" '
                     f'fill="{AXIS_COLOUR}" font-size="11">{h:02d}</text>')
    for w, row in enumerate(grid):
        cy = top + w * cell_h
        parts.append(f'<text x="{left - 8}" y="{cy + cell_h // 2 + 4}" text-anchor="end" '
                     f'class="weekday">{_esc(weekday_names[w])}</text>')
        for h, minutes in enumerate(row):
            level = 0 if minutes <= 0 else 1 + min(len(HEAT_COLOURS) - 2,
                                                   int((len(HEAT_COLOURS) - 1) * minutes / (most + 1)))
            tip = f"{weekday_names[w]} {h:02d}:00–{h + 1:02d}:00 · {hours_text(minutes)} {hours_label}"
            parts.append(
                f'<rect class="cell" x="{left + h * cell_w}" y="{cy}" width="{cell_w - 2}" height="{cell_h - 2}" '
                f'fill="{HEAT_COLOURS[level]}" stroke="#dddddd" stroke-width="0.5" data-weekday="{w}" '
                f'data-hour="{h}" data-minutes="{minutes}"><title>{_esc(tip)}</title></rect>')
    # Legend: the colour steps from none to the busiest cell.
    ly = top + 7 * cell_h + 22
    parts.append(f'<text x="{left}" y="{ly + 12}" fill="{AXIS_COLOUR}" class="legend">{_esc(hour_label)}</text>')
    lx = left + _text_width(hour_label) + 20
    parts.append(f'<text x="{lx}" y="{ly + 12}" text-anchor="end" fill="{AXIS_COLOUR}">0</text>')
    for i, colour in enumerate(HEAT_COLOURS):
        parts.append(f'<rect x="{lx + 6 + i * 22}" y="{ly}" width="20" height="16" fill="{colour}" '
                     f'stroke="#dddddd" stroke-width="0.5"/>')
    parts.append(f'<text x="{lx + 12 + len(HEAT_COLOURS) * 22}" y="{ly + 12}" class="legend-max">'
                 f'{hours_text(most)} {_esc(hours_label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- bars


@dataclass(frozen=True)
class Bar:
    """One bar: its label, its length on the scale, the text printed at its end, and an optional link."""

    label: str
    value: float
    value_text: str
    href: str = ""


def bar_chart(bars: Sequence[Bar], *, chart_id: str, title: str, value_label: str, empty_text: str,
              scale_max: float | None = None) -> str:
    """Horizontal bars, one per row, longest scale `scale_max` (default: the largest value)."""
    if not bars:
        return _empty(chart_id, title, empty_text, "chart-bars")
    row_h, top, left, right = 24, 30, 230, 110
    height = top + row_h * len(bars) + 12
    most = scale_max if scale_max is not None else max(b.value for b in bars)
    most = most if most > 0 else 1.0
    plot_w = WIDTH - left - right
    desc = f"{value_label}: " + "; ".join(f"{b.label} {b.value_text}" for b in bars)
    parts = _open(chart_id, height, title, desc, "chart-bars")
    parts.append(f'<text x="{left}" y="18" fill="{AXIS_COLOUR}" class="legend">{_esc(value_label)}</text>')
    for i, b in enumerate(bars):
        y = top + i * row_h
        width = max(0.0, min(1.0, b.value / most)) * plot_w
        label = f'<text x="{left - 8}" y="{y + 15}" text-anchor="end" class="bar-label">{_esc(_short(b.label, 30))}' \
                f'<title>{_esc(b.label)}</title></text>'
        parts.append(f'<a href="{_esc(b.href)}">{label}</a>' if b.href else label)
        parts.append(f'<rect class="bar" x="{left}" y="{y + 3}" width="{_num(width)}" height="{row_h - 8}" '
                     f'fill="{EFFECTIVE_COLOUR}" data-value="{_esc(b.value_text)}"><title>{_esc(b.label)}: '
                     f'{_esc(b.value_text)}</title></rect>')
        parts.append(f'<text x="{_num(left + width + 6)}" y="{y + 15}" class="bar-value">{_esc(b.value_text)}</text>')
    parts.append(f'<line x1="{left}" y1="{top - 2}" x2="{left}" y2="{height - 10}" stroke="{AXIS_COLOUR}"/>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- flows


def _flow_label(flow: Flow, hours_label: str) -> str:
    return f"{hours_text(flow.effective_min)} {hours_label} · ¥{yuan_text(flow.revenue_fen)}"


def flow_chart(flows: Sequence[Flow], *, chart_id: str, title: str, region_names: Mapping[str, str],
               hours_label: str, internal_label: str, empty_text: str) -> str:
    """Regions as nodes; an arrow from the region providing the instrument to the region of its users for each
    flow, as wide as its effective hours, labelled with hours and money; a loop for use within a region."""
    if not flows:
        return _empty(chart_id, title, empty_text, "chart-flows")
    codes = sorted({f.provider_region for f in flows} | {f.user_region for f in flows})
    radius = 36
    # Room above the nodes for the loops of use within a region; more below when regions sit on a ring.
    height, cy = (250, 160) if len(codes) <= 2 else (340, 180)
    cx = WIDTH / 2
    spots: dict[str, tuple[float, float]]
    if len(codes) == 1:
        spots = {codes[0]: (cx, float(cy))}
    elif len(codes) == 2:
        spots = {codes[0]: (cx - 170, float(cy)), codes[1]: (cx + 170, float(cy))}
    else:
        ring = 120
        spots = {code: (cx + ring * 1.6 * math.cos(math.pi + 2 * math.pi * i / len(codes)),
                        cy + ring * math.sin(math.pi + 2 * math.pi * i / len(codes))) for i, code in enumerate(codes)}
    most = max(max(f.effective_min, f.booked_min) for f in flows) or 1

    def width(f: Flow) -> float:
        return 1.5 + 12 * f.effective_min / most

    desc = "; ".join(f"{f.provider_region} → {f.user_region}: {_flow_label(f, hours_label)}" for f in flows)
    parts = _open(chart_id, height, title, desc, "chart-flows")
    for f in flows:
        x1, y1 = spots[f.provider_region]
        x2, y2 = spots[f.user_region]
        data = (f'class="flow" data-provider="{_esc(f.provider_region)}" data-user="{_esc(f.user_region)}" '
                f'data-effective-hours="{hours_text(f.effective_min)}" data-booked-hours="{hours_text(f.booked_min)}" '
                f'data-fen="{f.revenue_fen}"')
        label = _flow_label(f, hours_label)
        if f.provider_region == f.user_region:
            # A loop above the node, away from the arrows between regions; its label above it.
            top = y1 - radius
            path = (f"M {_num(x1 - 14)} {_num(top + 2)} C {_num(x1 - 40)} {_num(top - 62)} {_num(x1 + 40)} "
                    f"{_num(top - 62)} {_num(x1 + 14)} {_num(top + 2)}")
            tip = f"{internal_label} {f.provider_region}: {label}"
            parts.append(f'<g {data}><title>{_esc(tip)}</title>')
            parts.append(f'<path d="{path}" fill="none" stroke="{BOOKED_COLOUR}" stroke-width="{_num(width(f))}" '
                         f'stroke-linecap="round"/>')
            parts.append(_arrow_head(x1 + 14, top + 2, 0.35, 1.0, width(f), BOOKED_COLOUR))
            parts.append(f'<text x="{_num(x1)}" y="{_num(top - 58)}" text-anchor="middle" class="flow-label">'
                         f'{_esc(internal_label)} · {_esc(label)}</text>')
            parts.append("</g>")
            continue
        dx, dy = x2 - x1, y2 - y1
        dist = math.hypot(dx, dy) or 1.0
        ux, uy = dx / dist, dy / dist
        # Bend each direction to its own side (the normal flips with the direction), so A→B and B→A never overlap.
        nx, ny = uy, -ux
        sx, sy = x1 + ux * (radius + 4) + nx * 10, y1 + uy * (radius + 4) + ny * 10
        ex, ey = x2 - ux * (radius + 10) + nx * 10, y2 - uy * (radius + 10) + ny * 10
        mx, my = (sx + ex) / 2 + nx * 46, (sy + ey) / 2 + ny * 46
        parts.append(f'<g {data}><title>{_esc(f.provider_region)} → {_esc(f.user_region)}: {_esc(label)}</title>')
        parts.append(f'<path d="M {_num(sx)} {_num(sy)} Q {_num(mx)} {_num(my)} {_num(ex)} {_num(ey)}" fill="none" '
                     f'stroke="{EFFECTIVE_COLOUR}" stroke-opacity="0.8" stroke-width="{_num(width(f))}"/>')
        parts.append(_arrow_head(ex, ey, ex - mx, ey - my, width(f), EFFECTIVE_COLOUR))
        lx, ly = (sx + 2 * mx + ex) / 4 + nx * 14, (sy + 2 * my + ey) / 4 + ny * 14
        parts.append(f'<text x="{_num(lx)}" y="{_num(ly + 4)}" text-anchor="middle" class="flow-label">'
                     f'{_esc(f.provider_region)} → {_esc(f.user_region)} · {_esc(label)}</text>')
        parts.append("</g>")
    for code in codes:
        x, y = spots[code]
        name = region_names.get(code, code)
        parts.append(f'<g class="region" data-region="{_esc(code)}"><circle cx="{_num(x)}" cy="{_num(y)}" '
                     f'r="{radius}" fill="#f4f8fb" stroke="{EFFECTIVE_COLOUR}" stroke-width="1.5"/>')
        parts.append(f'<text x="{_num(x)}" y="{_num(y - 2)}" text-anchor="middle" font-weight="bold">'
                     f'{_esc(_short(name, 8))}</text>')
        parts.append(f'<text x="{_num(x)}" y="{_num(y + 14)}" text-anchor="middle" fill="{AXIS_COLOUR}">'
                     f'{_esc(code)}</text></g>')
    parts.append("</svg>")
    return "\n".join(parts)


def _arrow_head(x: float, y: float, dx: float, dy: float, stroke: float, colour: str) -> str:
    """A filled triangle at (x, y) pointing along (dx, dy), sized to the line it ends."""
    length = math.hypot(dx, dy) or 1.0
    ux, uy = dx / length, dy / length
    size = 7 + stroke
    tip_x, tip_y = x + ux * size * 0.8, y + uy * size * 0.8
    bx, by = x - ux * size * 0.2, y - uy * size * 0.2
    px, py = -uy * size * 0.6, ux * size * 0.6
    return (f'<polygon points="{_num(tip_x)},{_num(tip_y)} {_num(bx + px)},{_num(by + py)} '
            f'{_num(bx - px)},{_num(by - py)}" fill="{colour}"/>')


# --------------------------------------------------------------------------------------------- turnaround


def turnaround_buckets(days: Sequence[float]) -> list[tuple[str, int]]:
    """(label, how many orders) per TURNAROUND_EDGES bucket: "<1", "1–2", …, "≥30"."""
    counts = [0] * (len(TURNAROUND_EDGES) + 1)
    for value in days:
        index = next((i for i, edge in enumerate(TURNAROUND_EDGES) if value < edge), len(TURNAROUND_EDGES))
        counts[index] += 1
    labels = [f"<{TURNAROUND_EDGES[0]}"]
    labels += [f"{a}–{b}" for a, b in itertools.pairwise(TURNAROUND_EDGES)]
    labels.append(f"≥{TURNAROUND_EDGES[-1]}")
    return list(zip(labels, counts, strict=True))


def turnaround_chart(days: Sequence[float], *, chart_id: str, title: str, days_label: str, orders_label: str,
                     empty_text: str) -> str:
    """How many orders took how many days from submission to delivered results (a histogram)."""
    if not days:
        return _empty(chart_id, title, empty_text, "chart-turnaround")
    buckets = turnaround_buckets(days)
    height, left, right, top, bottom = 240, 56, 20, 30, 46
    plot_w, plot_h = WIDTH - left - right, height - top - bottom
    most = max(count for _label, count in buckets)
    step = _nice_step(most)
    step = max(1.0, math.ceil(step))
    y_max = step * max(1, math.ceil(most / step))
    slot = plot_w / len(buckets)
    desc = f"{orders_label}: {len(days)}; " + "; ".join(f"{label} {days_label}: {count}" for label, count in buckets)
    parts = _open(chart_id, height, title, desc, "chart-turnaround")
    tick = 0.0
    while tick <= y_max + 1e-9:
        ty = _num(top + plot_h - plot_h * tick / y_max)
        parts.append(f'<line x1="{left}" y1="{ty}" x2="{WIDTH - right}" y2="{ty}" stroke="{GRID_COLOUR}"/>')
        parts.append(f'<text x="{left - 6}" y="{ty}" dy="4" text-anchor="end" fill="{AXIS_COLOUR}">'
                     f'{_tick_text(tick)}</text>')
        tick += step
    parts.append(f'<text x="{left}" y="18" fill="{AXIS_COLOUR}" class="legend">{_esc(orders_label)}</text>')
    for i, (label, count) in enumerate(buckets):
        bar_h = plot_h * count / y_max
        x = left + i * slot
        parts.append(f'<rect class="bucket" x="{_num(x + 4)}" y="{_num(top + plot_h - bar_h)}" '
                     f'width="{_num(slot - 8)}" height="{_num(bar_h)}" fill="{EFFECTIVE_COLOUR}" '
                     f'data-bucket="{_esc(label)}" data-count="{count}"><title>{_esc(label)} {_esc(days_label)}: '
                     f'{count}</title></rect>')
        if count:
            parts.append(f'<text x="{_num(x + slot / 2)}" y="{_num(top + plot_h - bar_h - 4)}" text-anchor="middle" '
                         f'class="bucket-count">{count}</text>')
        parts.append(f'<text x="{_num(x + slot / 2)}" y="{top + plot_h + 16}" text-anchor="middle" '
                     f'fill="{AXIS_COLOUR}">{_esc(label)}</text>')
    parts.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{WIDTH - right}" y2="{top + plot_h}" '
                 f'stroke="{AXIS_COLOUR}"/>')
    parts.append(f'<text x="{left + plot_w // 2}" y="{height - 8}" text-anchor="middle" fill="{AXIS_COLOUR}">'
                 f'{_esc(days_label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------- a dashboard's charts


def dashboard_charts(d: Dashboard, _: Callable[[str], str], *, locale: str, region_names: Mapping[str, str],
                     instrument_href: Callable[[int], str] | None = None, prefix: str = "chart") -> dict[str, str]:
    """Every chart of a dashboard by name (hours, heatmap, top, idle, flows, turnaround), labelled with the
    translator `_` in `locale`; pages and the PDF report both draw them with this."""
    zh = locale.startswith("zh")
    hours_unit = _("h")

    def name(zh_name: str, en_name: str) -> str:
        return (zh_name or en_name) if zh else (en_name or zh_name)

    def href(instrument_id: int) -> str:
        return instrument_href(instrument_id) if instrument_href else ""

    weekdays = [_("Mon"), _("Tue"), _("Wed"), _("Thu"), _("Fri"), _("Sat"), _("Sun")]
    no_bookings = _("No booked time in this period.")
    return {
        "hours": hours_chart(
            d.series, d.granularity, chart_id=f"{prefix}-hours", title=_("Booked and effective hours over time"),
            booked_label=_("Booked hours"), effective_label=_("Effective hours"), utilisation_label=_("Utilisation"),
            hours_label=hours_unit, empty_text=no_bookings),
        "heatmap": heatmap_chart(
            d.heatmap, chart_id=f"{prefix}-heatmap", title=_("Booked hours by weekday and hour"),
            weekday_names=weekdays, hour_label=_("Booked hours in the hour"), hours_label=hours_unit,
            empty_text=no_bookings),
        "top": bar_chart(
            [Bar(name(r.name_zh, r.name_en), r.effective_min / 60, f"{hours_text(r.effective_min)} {hours_unit}",
                 href(r.instrument_id)) for r in d.top],
            chart_id=f"{prefix}-top", title=_("Busiest instruments"), value_label=_("Effective hours"),
            empty_text=no_bookings),
        "idle": bar_chart(
            [Bar(name(r.name_zh, r.name_en), (r.utilisation or 0.0) * 100, percent_text(r.utilisation),
                 href(r.instrument_id)) for r in d.idle],
            chart_id=f"{prefix}-idle", title=_("Least used instruments"), value_label=_("Utilisation"),
            empty_text=_("No bookable instruments in this scope.")),
        "flows": flow_chart(
            d.flows, chart_id=f"{prefix}-flows", title=_("Hours and money between regions"),
            region_names=region_names, hours_label=hours_unit, internal_label=_("Within the region"),
            empty_text=no_bookings),
        "turnaround": turnaround_chart(
            d.turnaround_days, chart_id=f"{prefix}-turnaround", title=_("Order turnaround"),
            days_label=_("days"), orders_label=_("Orders with results delivered"),
            empty_text=_("No order had its results delivered in this period.")),
    }
