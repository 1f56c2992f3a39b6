"""Statistics pages: /stats (a scope's dashboard: charts, key figures, tables, downloads), its CSV and XLSX
downloads, and the annual evaluation report of an institution as PDF.

Who may read what is decided by reporting.service (require_statistics_role first, then resolve_scope); the page
works as a plain GET form, htmx only swaps the dashboard body.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons import i18n
from labcommons.actor import Actor
from labcommons.billing.exports import PDF_TYPE, yuan_text
from labcommons.catalog.models import Region
from labcommons.db import Database, utcnow
from labcommons.errors import Forbidden, InvalidInput, NotFound
from labcommons.http import Id, page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.pages import N_, env, is_htmx, localized, localtime, render
from labcommons.reporting import aggregate, exports, report, service
from labcommons.reporting.charts import dashboard_charts, hours_text, percent_text
from labcommons.reporting.service import Dashboard, InstrumentRow, Period, Scope, ScopeKind

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]
# Plain strings, checked after the role gate: a caller without a statistics role gets 403 whatever they send.
ScopeParam = Annotated[str | None, Query()]
FromParam = Annotated[str | None, Query(alias="from")]
ToParam = Annotated[str | None, Query(alias="to")]

FIELD_LABELS = {"scope": N_("Scope"), "from": N_("From"), "to": N_("To"), "year": N_("Year")}
# The services' messages about statistics parameters, so pages can show them translated.
SERVICE_MESSAGES = (
    N_("Give a date as YYYY-MM-DD."), N_("The period ends before it starts."),
    N_("A scope is platform, region:CODE, institution:ID or facility:ID."),
    N_("The year must lie between 2000 and 2100."), N_("That year has not begun yet."),
)
KIND_LABELS = {ScopeKind.platform: N_("Platform"), ScopeKind.region: N_("Region"),
               ScopeKind.institution: N_("Institution"), ScopeKind.facility: N_("Facility")}
# The layout links the statistics for those who hold a role that reads some scope's figures.
env.globals["reads_statistics"] = service.reads_statistics


def error_text(exc: InvalidInput) -> str:
    """An invalid parameter as the page says it: the field's name and what is wrong, translated."""
    if exc.message.startswith("A period may cover at most"):
        message = _("A period may cover at most %(days)s days.") % {"days": service.MAX_PERIOD_DAYS}
    else:
        message = _(exc.message)
    label = FIELD_LABELS.get(exc.field or "")
    return f"{_(label)}: {message}" if label else message


def _query(scope: Scope, period: Period) -> str:
    return urlencode({"scope": scope.token, "from": period.first.isoformat(), "to": period.last.isoformat()})


def _file_stem(scope: Scope, period: Period) -> str:
    token = re.sub(r"[^A-Za-z0-9]+", "-", scope.token)
    return f"labcommons-stats-{token}-{period.first.isoformat()}-{period.last.isoformat()}"


def _attachment(content: bytes, media_type: str, filename: str) -> Response:
    return Response(content, media_type=media_type, headers={
        "Content-Disposition": f'attachment; filename="{filename}"', "Cache-Control": "private, no-cache",
        "X-Content-Type-Options": "nosniff",
    })


def _invalid(request: Request, exc: InvalidInput) -> HTMLResponse:
    return render(request, "error.html", status_code=422, status=422, title=_("Invalid input"),
                  generic=_("Some of what was sent is not valid."), detail=error_text(exc), code=exc.code)


def _gate(request: Request, db: Database) -> Actor:
    """The signed-in actor if they read statistics at all (401 → sign in, 403 otherwise), with figures current."""
    actor = service.require_statistics_role(page_actor(request))
    aggregate.ensure_current(db)
    return actor


def _select(session: Session, actor: Actor, scope: str | None, first: str | None, last: str | None,
            today: date) -> tuple[Scope, Period, list[Scope]]:
    """The scope asked for (default: the widest the actor may see) and the period, authorised and parsed."""
    visible = service.visible_scopes(session, actor)
    token = (scope or "").strip()
    if not token:
        if not visible:
            raise Forbidden("You may not read statistics of any scope.")
        token = visible[0].token
    chosen = service.resolve_scope(session, actor, token)
    period = service.parse_period(first, last, today=today)
    return chosen, period, visible


# --- the dashboard ------------------------------------------------------------------------------------------------


@dataclass
class Card:
    key: str
    label: str
    value: str
    hint: str = ""


@dataclass
class Link:
    label: str
    href: str
    active: bool = False


def _cards(d: Dashboard) -> list[Card]:
    t = d.totals
    h = _("h")
    return [
        Card("effective_hours", _("Effective machine hours"), f"{hours_text(t.effective_min)} {h}",
             _("Booked time actually used, on days that have ended")),
        Card("utilisation", _("Utilisation"), percent_text(t.utilisation),
             _("%(booked)s of %(available)s h available") % {"booked": hours_text(t.booked_min),
                                                             "available": hours_text(t.available_min)}),
        Card("external_share", _("External service share"), percent_text(t.external_share),
             _("%(hours)s h for other institutions") % {"hours": hours_text(t.ext_institution_min)}),
        Card("other_region_share", _("Other-region share"), percent_text(t.ext_region_share),
             _("%(hours)s h for users of other regions") % {"hours": hours_text(t.ext_region_min)}),
        Card("users", _("Users served"), str(t.users)),
        Card("institutions", _("Institutions served"), str(t.institutions)),
        Card("no_show_rate", _("No-show rate"), percent_text(t.no_show_rate),
             _("%(n)s of %(total)s started bookings") % {"n": t.no_shows, "total": t.started_bookings}),
        Card("median_wait", _("Median wait"),
             "—" if t.median_lead_hours is None else f"{t.median_lead_hours:.1f} {h}",
             _("From making a booking to its start")),
        Card("orders", _("Service orders"), str(t.orders),
             _("%(n)s with results delivered") % {"n": t.orders_completed}),
        Card("revenue", _("Revenue"), f"¥{yuan_text(t.revenue_fen)}",
             _("¥%(amount)s from other institutions") % {"amount": yuan_text(t.external_revenue_fen)}),
        Card("rating", _("Average rating"), "—" if t.rating_average is None else f"{t.rating_average:.2f} / 5",
             _("%(n)s ratings") % {"n": t.ratings}),
    ]


def _period_links(request: Request, scope: Scope, period: Period, today: date) -> list[Link]:
    this_year = Period(date(today.year, 1, 1), today)
    last_year = Period(date(today.year - 1, 1, 1), date(today.year - 1, 12, 31))
    last_30 = Period(today - timedelta(days=29), today)
    this_month = Period(today.replace(day=1), today)
    return [Link(label, f"/stats?{_query(scope, p)}", p == period) for label, p in (
        (_("This year"), this_year), (_("Last year"), last_year), (_("Last 30 days"), last_30),
        (_("This month"), this_month))]


def _may_open(session: Session, actor: Actor, token: str) -> bool:
    try:
        service.resolve_scope(session, actor, token)
    except (Forbidden, NotFound, InvalidInput):
        return False
    return True


def _scope_label(scope: Scope) -> str:
    name = scope.name(i18n.get_locale())
    return name if scope.kind is ScopeKind.platform else f"{_(KIND_LABELS[scope.kind])} · {name}"


def _dashboard_context(request: Request, session: Session, actor: Actor, scope: Scope, period: Period,
                       today: date) -> dict[str, Any]:
    d = service.dashboard(session, scope, period, today)
    locale = i18n.get_locale()
    regions = {r.code: localized(r, "name") for r in session.scalars(select(Region))}
    breakdown = []
    for b in d.breakdown:
        token = f"{b.kind}:{b.key}"
        href = f"/stats?{urlencode({'scope': token, 'from': period.first.isoformat(), 'to': period.last.isoformat()})}"
        breakdown.append({"row": b, "name": localized(b, "name"),
                          "href": href if _may_open(session, actor, token) else ""})
    instruments: list[InstrumentRow] = []
    if scope.kind is ScopeKind.facility:
        instruments = sorted(service.instrument_rows(session, scope, period, today),
                             key=lambda r: (-r.effective_min, -r.booked_min, r.code))
    query = _query(scope, period)
    child = service.CHILD_KIND[scope.kind]
    reports = []
    if scope.kind is ScopeKind.institution:
        for year in sorted({period.last.year, period.last.year - 1}, reverse=True):
            if 2000 <= year <= today.year:
                reports.append(Link(str(year), f"/stats/reports/{scope.key}/{year}.pdf"))
    return {
        "dashboard": d, "cards": _cards(d), "breakdown": breakdown, "instruments": instruments,
        "charts": dashboard_charts(d, _, locale=locale, region_names=regions,
                                   instrument_href=lambda i: f"/instruments/{i}"),
        "region_names": regions, "query": query, "csv_tables": exports.TABLES,
        "xlsx_href": f"/stats/export.xlsx?{query}", "reports": reports,
        "child_label": _(KIND_LABELS[child]) if child else "",
    }


@router.get("/stats", response_class=HTMLResponse)
def stats_page(request: Request, db: Db, scope: ScopeParam = None, first: FromParam = None,
               last: ToParam = None) -> HTMLResponse:
    """A scope's dashboard for a period: charts, key figures, tables with CSV links, XLSX and report downloads."""
    actor = _gate(request, db)
    today = aggregate.today()
    context: dict[str, Any] = {"error": None, "error_field": None, "dashboard": None, "scope": None,
                               "period": None, "form_scope": scope or "", "form_from": first or "",
                               "form_to": last or "", "period_links": [], "scopes": []}
    status_code = 200
    with db.unit_of_work(write=False) as session:
        try:
            chosen, period, visible = _select(session, actor, scope, first, last, today)
        except InvalidInput as exc:
            context.update(error=error_text(exc), error_field=exc.field,
                           scopes=service.visible_scopes(session, actor))
            status_code = 422
        else:
            options = list(visible)
            if chosen.token not in {s.token for s in visible}:
                options.append(chosen)  # a drill-down the picker does not list (a region authority's institution)
            context.update(
                scope=chosen, period=period, scopes=options, form_scope=chosen.token,
                form_from=period.first.isoformat(), form_to=period.last.isoformat(),
                period_links=_period_links(request, chosen, period, today),
                updated=localtime(request, utcnow()),
                **_dashboard_context(request, session, actor, chosen, period, today))
    context.update(scope_label=_scope_label, hours_text=hours_text, percent_text=percent_text, yuan_text=yuan_text)
    template = "reporting/_body.html" if is_htmx(request) else "reporting/stats.html"
    return render(request, template, status_code, **context)


# --- downloads ------------------------------------------------------------------------------------------------------


@router.get("/stats/export.xlsx")
def stats_xlsx(request: Request, db: Db, scope: ScopeParam = None, first: FromParam = None,
               last: ToParam = None) -> Response:
    """Every table of the dashboard as one workbook (a sheet each)."""
    actor = _gate(request, db)
    try:
        with db.unit_of_work(write=False) as session:
            chosen, period, _visible = _select(session, actor, scope, first, last, aggregate.today())
            d = service.dashboard(session, chosen, period, aggregate.today())
            rows = service.instrument_rows(session, chosen, period, d.today)
    except InvalidInput as exc:
        return _invalid(request, exc)
    content = exports.workbook(d, exports.dashboard_tables(d, rows))
    return _attachment(content, exports.XLSX_TYPE, f"{_file_stem(chosen, period)}.xlsx")


@router.get("/stats/tables/{table}.csv")
def stats_csv(table: str, request: Request, db: Db, scope: ScopeParam = None, first: FromParam = None,
              last: ToParam = None) -> Response:
    """One table of the dashboard as CSV."""
    actor = _gate(request, db)
    if table not in exports.TABLES:
        raise NotFound(f"No table {table!r}; there are: {', '.join(exports.TABLES)}.", field="table")
    try:
        with db.unit_of_work(write=False) as session:
            chosen, period, _visible = _select(session, actor, scope, first, last, aggregate.today())
            d = service.dashboard(session, chosen, period, aggregate.today())
            rows = service.instrument_rows(session, chosen, period, d.today) if table == "instruments" else []
    except InvalidInput as exc:
        return _invalid(request, exc)
    content = exports.table_csv(exports.pick_table(exports.dashboard_tables(d, rows), table))
    return _attachment(content, exports.CSV_TYPE, f"{_file_stem(chosen, period)}-{table}.csv")


@router.get("/stats/reports/{institution_id}/{year}.pdf")
def stats_report(institution_id: Id, year: int, request: Request, db: Db) -> Response:
    """The annual open-sharing evaluation report of an institution (the year so far while it runs)."""
    actor = _gate(request, db)
    try:
        with db.unit_of_work(write=False) as session:
            chosen = service.resolve_scope(session, actor, f"institution:{institution_id}")
            content = report.annual_report_pdf(session, chosen, year, aggregate.today(), i18n.get_locale())
    except InvalidInput as exc:
        return _invalid(request, exc)
    return _attachment(content, PDF_TYPE, report.report_filename(chosen, year))
