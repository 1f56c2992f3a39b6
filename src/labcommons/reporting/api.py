"""Statistics endpoints under /api/v1/stats: the caller's scopes, dashboards, per-instrument figures, CSV and XLSX
tables, the annual evaluation report (PDF) and the state of the pre-aggregates.

Every route needs the token scope `stats:read` and some statistics role (facility staff or manager, institution
administrator, region authority, platform administrator); `scope=` then says what to read and is checked against
the caller's grants. Figures include every committed booking: the pre-aggregates are refreshed before reading.
docs/metrics.md defines them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import Response
from sqlalchemy.orm import Session

from labcommons import i18n
from labcommons.actor import Actor
from labcommons.billing.exports import PDF_TYPE
from labcommons.billing.invoice_api import attachment
from labcommons.db import MAX_ID, Database
from labcommons.errors import Forbidden
from labcommons.http import Db, require_scope
from labcommons.identity.roles import Action, require
from labcommons.reporting import aggregate, exports, service
from labcommons.reporting.schemas import (
    DashboardRead,
    InstrumentPage,
    InstrumentRowRead,
    InstrumentSort,
    PeriodRead,
    ScopeList,
    ScopeRead,
    StatusRead,
)
from labcommons.reporting.service import Dashboard, InstrumentRow, Period, Scope

router = APIRouter(tags=["statistics"])

MAX_PAGE = 500

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "No statistics role, a scope outside your grants, or a token without `stats:read` "
                         "(`insufficient_scope`)"},
    404: {"description": "Unknown region, institution or facility (`field`: `scope`), or table (`table`)"},
    422: {"description": "Invalid input; `field` names it: `scope`, `from`, `to`, `sort`, `limit`, `offset`, "
                         "`year`"},
}


def download(media_type: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": "The file, as an attachment", "content": {media_type: {}}}, **ERRORS}


_scoped = require_scope("stats:read")


def stats_reader(actor: Annotated[Actor, Depends(_scoped)]) -> Actor:
    """The caller, if their token may read statistics and they hold some statistics role (checked before any
    parameter, so a caller without one learns nothing else)."""
    return service.require_statistics_role(actor)


Reader = Annotated[Actor, Depends(stats_reader)]
ScopeParam = Annotated[str | None, Query(max_length=40, description=(
    "platform, region:CODE, institution:ID or facility:ID; default: the widest scope you may read"),
    examples=["region:CQ"])]
FromParam = Annotated[str | None, Query(alias="from", max_length=10, description=(
    "First local day, YYYY-MM-DD; default 1 January of this year"))]
ToParam = Annotated[str | None, Query(alias="to", max_length=10, description="Last local day, included; "
                                                                              "default today")]




@dataclass(frozen=True)
class StatsQuery:
    """A checked request: the scope the caller may read, the period, and the platform's today."""

    scope: Scope
    period: Period
    today: date


def _resolve(db: Database, actor: Actor, scope: str | None, first: str | None, last: str | None) -> StatsQuery:
    """Check the scope and period, then bring the pre-aggregates up to date."""
    today = aggregate.today()
    with db.unit_of_work(write=False) as session:
        if scope in (None, ""):
            visible = service.visible_scopes(session, actor)
            if not visible:
                raise Forbidden("You may read no scope's statistics.", action=Action.view_facility_statistics.value)
            resolved = visible[0]
        else:
            resolved = service.resolve_scope(session, actor, scope)
    period = service.parse_period(first, last, today=today)
    aggregate.ensure_current(db)
    return StatsQuery(resolved, period, today)


def _dashboard(db: Database, req: StatsQuery) -> tuple[Dashboard, list[InstrumentRow]]:
    with db.unit_of_work(write=False) as session:
        return (service.dashboard(session, req.scope, req.period, req.today),
                service.instrument_rows(session, req.scope, req.period, req.today))


def _file_stem(req: StatsQuery) -> str:
    return f"stats-{req.scope.token.replace(':', '-')}-{req.period.first.isoformat()}-{req.period.last.isoformat()}"


# --- scopes and figures -----------------------------------------------------------------------------------------


@router.get("/stats/scopes", response_model=ScopeList, responses=ERRORS)
def scopes(actor: Annotated[Actor, Depends(_scoped)], db: Db) -> ScopeList:
    """The scopes whose statistics you may read, widest first; empty without a statistics role."""
    with db.unit_of_work(write=False) as session:
        return ScopeList(items=[ScopeRead.of(s) for s in service.visible_scopes(session, actor)])


@router.get("/stats/dashboard", response_model=DashboardRead, responses=ERRORS)
def dashboard(actor: Reader, db: Db, scope: ScopeParam = None, first: FromParam = None,
              last: ToParam = None) -> dict[str, Any]:
    """A scope's dashboard for a period: totals, hours over time, weekday × hour heat-map, busiest and least used
    instruments, cross-region flows, order turnaround and the breakdown into regions, institutions or facilities."""
    req = _resolve(db, actor, scope, first, last)
    with db.unit_of_work(write=False) as session:
        return service.dashboard(session, req.scope, req.period, req.today).as_json()


SORT_KEYS: dict[str, Callable[[InstrumentRow], tuple[Any, ...]]] = {
    "code": lambda r: (r.code,),
    "booked_hours": lambda r: (r.booked_min,),
    "effective_hours": lambda r: (r.effective_min,),
    # No available time (every day under maintenance) sorts below any utilisation.
    "utilisation": lambda r: (-1.0 if r.utilisation is None else r.utilisation,),
}


def sort_rows(rows: list[InstrumentRow], sort: str) -> list[InstrumentRow]:
    """Rows ordered by `sort` (a leading '-' for descending); ties by code then id, always ascending, so pages
    do not shift between requests."""
    descending = sort.startswith("-")
    key = SORT_KEYS[sort.lstrip("-")]
    ordered = sorted(rows, key=lambda r: (r.code, r.instrument_id))
    return sorted(ordered, key=key, reverse=descending)


@router.get("/stats/instruments", response_model=InstrumentPage, responses=ERRORS)
def instruments(
    actor: Reader, db: Db, scope: ScopeParam = None, first: FromParam = None, last: ToParam = None,
    sort: Annotated[InstrumentSort, Query(description="Order; a leading '-' is descending")] = "-effective_hours",
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> InstrumentPage:
    """Every bookable instrument of the scope with its figures for the period (also those never booked), a page
    at a time; `total` counts them all."""
    req = _resolve(db, actor, scope, first, last)
    with db.unit_of_work(write=False) as session:
        rows = service.instrument_rows(session, req.scope, req.period, req.today)
    ordered = sort_rows(rows, sort)
    return InstrumentPage(
        scope=ScopeRead.of(req.scope), period=PeriodRead(first=req.period.first, last=req.period.last),
        today=req.today, sort=sort, total=len(ordered), limit=limit, offset=offset,
        items=[InstrumentRowRead.of(r) for r in ordered[offset:offset + limit]],
    )


# --- files ------------------------------------------------------------------------------------------------------


@router.get("/stats/tables/{table}.csv", response_class=Response, responses=download(exports.CSV_TYPE))
def table_csv(table: Annotated[str, Path(max_length=40, description=f"One of: {', '.join(exports.TABLES)}")],
              actor: Reader, db: Db, scope: ScopeParam = None, first: FromParam = None,
              last: ToParam = None) -> Response:
    """One table of the dashboard as UTF-8 CSV (with a byte-order mark; bilingual headings; hours with two
    decimals, money in yuan and fen, rates as fractions)."""
    req = _resolve(db, actor, scope, first, last)
    d, rows = _dashboard(db, req)
    picked = exports.pick_table(exports.dashboard_tables(d, rows), table)
    return attachment(exports.table_csv(picked), exports.CSV_TYPE, f"{_file_stem(req)}-{picked.name}.csv")


@router.get("/stats/export.xlsx", response_class=Response, responses=download(exports.XLSX_TYPE))
def export_xlsx(actor: Reader, db: Db, scope: ScopeParam = None, first: FromParam = None,
                last: ToParam = None) -> Response:
    """Every table of the dashboard in one workbook, a sheet each (the same figures as the CSV tables)."""
    req = _resolve(db, actor, scope, first, last)
    d, rows = _dashboard(db, req)
    content = exports.workbook(d, exports.dashboard_tables(d, rows))
    return attachment(content, exports.XLSX_TYPE, f"{_file_stem(req)}.xlsx")


@router.get("/stats/reports/{institution_id}/{year}.pdf", response_class=Response, responses=download(PDF_TYPE))
def annual_report(institution_id: Annotated[int, Path(ge=1, le=MAX_ID)],
                  year: Annotated[int, Path(description="Calendar year, 2000-2100")],
                  actor: Reader, db: Db) -> Response:
    """An institution's annual open-sharing evaluation report with its charts, in the request's language;
    for the institution's administrators and its region's authority."""
    from labcommons.reporting.report import annual_report_pdf

    period = service.year_period(year)
    today = aggregate.today()
    with db.unit_of_work(write=False) as session:
        scope = service.resolve_scope(session, actor, f"institution:{institution_id}")
    aggregate.ensure_current(db)
    with db.unit_of_work(write=False) as session:
        content = annual_report_pdf(session, scope, period.first.year, today, i18n.get_locale())
    return attachment(content, PDF_TYPE, f"open-sharing-report-{institution_id}-{year}.pdf")


# --- status -----------------------------------------------------------------------------------------------------


def statistics_status(session: Session, today: date) -> StatusRead:
    """The tables' status as the API reports it."""
    return StatusRead(**asdict(aggregate.table_status(session)), today=today)


@router.get("/stats/status", response_model=StatusRead, responses=ERRORS)
def status(actor: Reader, db: Db) -> StatusRead:
    """How current the pre-aggregated statistics are (platform administrators). Reading them does not refresh."""
    require(actor, Action.view_all_statistics)
    with db.unit_of_work(write=False) as session:
        return statistics_status(session, aggregate.today())
