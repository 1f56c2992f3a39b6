"""The annual open-sharing evaluation report of an institution as a PDF: cover, the evaluation indicators with
their definitions, the dashboard's charts, and its facilities and instruments ranked by effective machine hours.

Headings are bilingual (中文 English) like the billing PDFs; chart labels and names follow `locale`. Callers run
`aggregate.ensure_current` first, as for every read of the figures.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons import i18n
from labcommons.billing.exports import render_pdf, yuan_text
from labcommons.catalog.models import Facility, Institution, Region
from labcommons.errors import InvalidInput, NotFound
from labcommons.reporting import service
from labcommons.reporting.charts import dashboard_charts, hours_text, percent_text
from labcommons.reporting.service import Dashboard, InstrumentRow, Period, Scope, ScopeKind

TEMPLATE = "reporting/report_print.html"


def report_period(year: int, today: date) -> Period:
    """The calendar year `year`, up to `today` while it is still running (InvalidInput for a year not begun)."""
    period = service.year_period(year)
    if period.first > today:
        raise InvalidInput("That year has not begun yet.", field="year")
    return service.Period(period.first, min(period.last, today))


def report_filename(scope: Scope, year: int) -> str:
    """The PDF's file name: labcommons-report-institution-3-2025.pdf."""
    return f"labcommons-report-institution-{scope.key}-{year}.pdf"


@dataclass
class Indicator:
    """One evaluation indicator: bilingual name, its value as printed, and what it means (both languages)."""

    key: str
    name: str
    value: str
    definition_zh: str
    definition_en: str


@dataclass
class ReportRow:
    """A facility or instrument line of the report's tables."""

    rank: int
    code: str
    name_zh: str
    name_en: str
    facility: str
    instruments: int | None
    booked: str
    effective: str
    external: str
    other_region: str
    utilisation: str
    revenue: str


def _rate_with(minutes_text: str, rate: float | None) -> str:
    return f"{minutes_text} h ({percent_text(rate)})" if rate is not None else f"{minutes_text} h"


def indicators(d: Dashboard) -> list[Indicator]:
    """The open-sharing evaluation indicators of the report, in the order the authorities read them."""
    t = d.totals
    rating = "—" if t.rating_average is None else f"{t.rating_average:.2f} / 5 ({t.ratings})"
    wait = "—" if t.median_lead_hours is None else f"{t.median_lead_hours:.1f} h"
    turnaround = "—" if t.median_turnaround_days is None else f"{t.median_turnaround_days:.1f} d"
    return [
        Indicator("effective_hours", "年度有效机时 Effective machine hours", f"{hours_text(t.effective_min)} h",
                  "已结束的日子里预约时段中实际使用的时间：有签到时为签到至签退，无签到且未爽约时为整个预约时段。",
                  "Booked time actually used on days that have ended: check-in to check-out where the instrument "
                  "records them, else the whole booked window unless it was a no-show."),
        Indicator("external_hours", "对外服务机时 External service hours",
                  _rate_with(hours_text(t.ext_institution_min), t.external_share),
                  "其他单位用户的有效机时及其占有效机时的比例。",
                  "Effective hours of users from other institutions, and their share of all effective hours."),
        Indicator("other_region_hours", "跨地区服务机时 Hours for other regions",
                  _rate_with(hours_text(t.ext_region_min), t.ext_region_share),
                  "其他地区（如川渝互用）用户的有效机时及其占比。",
                  "Effective hours of users from another region (Sichuan ↔ Chongqing), and their share."),
        Indicator("booked_hours", "预约机时 Booked hours", f"{hours_text(t.booked_min)} h",
                  "已确认或已完成的使用预约的时长（不含维护）。",
                  "Length of confirmed and completed use bookings (maintenance excluded)."),
        Indicator("utilisation", "利用率 Utilisation", percent_text(t.utilisation),
                  "预约机时除以可用机时（开放时间减去维护时间）。",
                  "Booked hours divided by available hours (opening hours less maintenance)."),
        Indicator("users", "服务用户数 Users served", str(t.users),
                  "期间内有使用预约的不同用户数。", "Distinct users with a counted use booking in the period."),
        Indicator("institutions", "服务单位数 Institutions served", str(t.institutions),
                  "这些用户所属的不同单位数。", "Distinct institutions those users belong to."),
        Indicator("no_show_rate", "爽约率 No-show rate", percent_text(t.no_show_rate),
                  "已开始的预约中未到场的比例。", "Share of bookings that started where the user did not come."),
        Indicator("median_wait", "预约等待中位数 Median wait", wait,
                  "从提交预约到预约开始的时间的中位数。", "Median time from making a booking to its start."),
        Indicator("orders", "服务订单 Service orders",
                  f"{t.orders} / {t.orders_completed} ({turnaround})",
                  "提交的订单数 / 交付结果的订单数（周期中位数）。",
                  "Orders submitted / orders with results delivered (median turnaround)."),
        Indicator("revenue", "服务收入 Revenue", f"¥{yuan_text(t.revenue_fen)} (¥{yuan_text(t.external_revenue_fen)})",
                  "期间内的收费合计（其中向其他单位收取的部分）。",
                  "Charges of the period (of which charged to other institutions)."),
        Indicator("rating", "平均评分 Average rating", rating,
                  "用户对订单评分的平均值（评分数）。", "Average score users gave their orders (number of ratings)."),
    ]


def _ranked_instruments(rows: list[InstrumentRow], facilities: dict[int, tuple[str, str]]) -> list[ReportRow]:
    ordered = sorted(rows, key=lambda r: (-r.effective_min, -r.booked_min, r.code))
    return [
        ReportRow(i + 1, r.code, r.name_zh, r.name_en, " ".join(facilities.get(r.facility_id, ("", ""))).strip(),
                  None, hours_text(r.booked_min), hours_text(r.effective_min), hours_text(r.ext_institution_min),
                  hours_text(r.ext_region_min), percent_text(r.utilisation), "")
        for i, r in enumerate(ordered)
    ]


def report_context(session: Session, scope: Scope, year: int, today: date, locale: str) -> dict[str, Any]:
    """What the report template needs: the institution, the dashboard of its year, indicators, charts, tables."""
    if scope.kind is not ScopeKind.institution:
        raise InvalidInput("The annual report is made for an institution.", field="scope")
    institution = session.get(Institution, int(scope.key))
    if institution is None:
        raise NotFound("No such institution.", field="institution_id")
    region = session.get(Region, institution.region_code)
    period = report_period(year, today)
    d = service.dashboard(session, scope, period, today)
    rows = service.instrument_rows(session, scope, period, today)
    own = list(session.scalars(select(Facility).where(Facility.institution_id == institution.id)))
    facilities = {f.id: (f.name_zh, f.name_en) for f in own}
    codes = {f.id: f.code for f in own}
    facility_rows = [
        ReportRow(i + 1, codes.get(int(b.key), b.key), b.name_zh, b.name_en, "", b.instruments,
                  hours_text(b.booked_min), hours_text(b.effective_min), hours_text(b.ext_institution_min),
                  hours_text(b.ext_region_min), percent_text(b.utilisation), yuan_text(b.revenue_fen))
        for i, b in enumerate(sorted(d.breakdown, key=lambda b: (-b.effective_min, -b.booked_min, b.key)))
    ]
    zh = locale.startswith("zh")
    translate = i18n.translations("zh_CN" if zh else "en").gettext
    region_names = {r.code: (r.name_zh if zh else r.name_en) for r in session.scalars(select(Region))}
    return {
        "institution": institution, "region": region, "year": year, "period": period, "today": today,
        "partial_year": period.last < date(year, 12, 31), "dashboard": d, "indicators": indicators(d),
        "charts": dashboard_charts(d, translate, locale="zh_CN" if zh else "en", region_names=region_names,
                                   prefix="report"),
        "facility_rows": facility_rows, "instrument_rows": _ranked_instruments(rows, facilities),
        "hours_text": hours_text, "percent_text": percent_text, "locale": "zh_CN" if zh else "en",
    }


def annual_report_html(session: Session, scope: Scope, year: int, today: date, locale: str) -> str:
    """The report as the HTML WeasyPrint prints (for previews and tests)."""
    from labcommons.pages import env

    return env.get_template(TEMPLATE).render(yuan=yuan_text, **report_context(session, scope, year, today, locale))


def annual_report_pdf(session: Session, scope: Scope, year: int, today: date, locale: str) -> bytes:
    """The annual evaluation report of an institution scope for `year` as PDF bytes."""
    return render_pdf(TEMPLATE, **report_context(session, scope, year, today, locale))
