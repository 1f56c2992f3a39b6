"""`labcommons reporting`: rebuild and refresh the statistics, show their state and a scope's figures, export
tables and write annual evaluation reports, as the platform operator (every scope is open)."""

from __future__ import annotations

import json
import time
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from labcommons.actor import Actor, Grant
from labcommons.cli_support import console, database, err, fail
from labcommons.db import Database
from labcommons.errors import DomainError, InvalidInput, NotFound

if TYPE_CHECKING:
    from labcommons.reporting.service import Period, Scope

reporting_app = typer.Typer(no_args_is_help=True,
                            help="Sharing statistics: rebuild, status, figures, exports, reports.")

# The command line is the platform operator: it reads every scope, like a platform administrator would. The
# scope checks still run (through this actor), so unknown regions, institutions and facilities are refused alike.
OPERATOR = Actor(user_id=0, email="", name="command line", institution_id=None, region_code="",
                 grants=(Grant(role="platform_admin"),))

ScopeOption = Annotated[str, typer.Option("--scope", help="platform, region:CODE, institution:ID or facility:ID")]
FromOption = Annotated[str | None, typer.Option("--from", help="First local day, YYYY-MM-DD (default 1 January)")]
ToOption = Annotated[str | None, typer.Option("--to", help="Last local day, included (default today)")]


def _checked(db: Database, scope_token: str, first: str | None, last: str | None) -> tuple[Scope, Period, date]:
    """The scope and period asked for, checked, with the platform's today; the statistics brought up to date."""
    from labcommons.reporting import aggregate, service
    from labcommons.reporting.aggregate import today as local_today

    today = local_today()
    with db.unit_of_work(write=False) as session:
        scope = service.resolve_scope(session, OPERATOR, scope_token)
    period = service.parse_period(first, last, today=today)
    aggregate.ensure_current(db)
    return scope, period, today


@reporting_app.command("rebuild")
def rebuild() -> None:
    """Recompute both statistics tables from every booking (after bulk loads that bypass the application)."""
    from labcommons.reporting import aggregate

    db = database()
    started = time.perf_counter()
    try:
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err) as progress:
            task = progress.add_task("facilities", total=None)

            def advance(done: int, total: int) -> None:
                progress.update(task, completed=done, total=total)

            instrument_rows, facility_rows = aggregate.rebuild(db, progress=advance)
    finally:
        db.dispose()
    console.print(f"{instrument_rows} instrument-day row(s) and {facility_rows} facility-day row(s) written in "
                  f"{time.perf_counter() - started:.1f} s")


@reporting_app.command("refresh")
def refresh() -> None:
    """Fold pending booking changes (dirty instrument-days) into the statistics now."""
    from labcommons.reporting import aggregate

    db = database()
    started = time.perf_counter()
    try:
        done = aggregate.refresh(db)
    finally:
        db.dispose()
    console.print(f"{done} instrument-day(s) recomputed in {time.perf_counter() - started:.1f} s")


@reporting_app.command("status")
def status(as_json: Annotated[bool, typer.Option("--json", help="Print as JSON")] = False) -> None:
    """How many instrument-days wait to be recomputed, the rows in each table and the days they cover."""
    from labcommons.reporting.aggregate import today as local_today
    from labcommons.reporting.api import statistics_status

    db = database()
    try:
        with db.unit_of_work(write=False) as session:
            state = statistics_status(session, local_today())
    finally:
        db.dispose()
    if as_json:
        typer.echo(state.model_dump_json(indent=2))
        return
    hint = " (run `labcommons reporting refresh`)" if state.pending_marks else ""
    console.print(f"pending marks: {state.pending_marks}{hint}")
    if state.oldest_mark_at is not None:
        console.print(f"oldest mark: {state.oldest_mark_at.isoformat()}")
    console.print(f"instrument-day rows: {state.instrument_day_rows}")
    console.print(f"facility-day rows: {state.facility_day_rows}")
    covered = f"{state.first_day} – {state.last_day}" if state.first_day else "none"
    console.print(f"days covered: {covered}")
    last = state.last_refresh_job_at.isoformat() if state.last_refresh_job_at else "never"
    console.print(f"last periodic refresh: {last}")


@reporting_app.command("show")
def show(
    scope: ScopeOption = "platform", first: FromOption = None, last: ToOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the totals as JSON (minutes, fen, fractions)")]
    = False,
) -> None:
    """Print a scope's headline figures for a period (docs/metrics.md defines them)."""
    from labcommons.reporting import exports, service

    db = database()
    try:
        chosen, period, today = _checked(db, scope, first, last)
        with db.unit_of_work(write=False) as session:
            d = service.dashboard(session, chosen, period, today)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    data = d.as_json()
    if as_json:
        typer.echo(json.dumps({"scope": data["scope"], "period": data["period"], "today": data["today"],
                               "totals": data["totals"]}, ensure_ascii=False, indent=2))
        return
    # The same bilingual labels and units as the exported totals table (the instrument list is not needed).
    totals = exports.dashboard_tables(d, [])["totals"]
    table = Table(title=f"{escape(chosen.name_zh)} {escape(chosen.name_en)} ({chosen.token}), "
                        f"{period.first.isoformat()} – {period.last.isoformat()}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    percent = totals.percent_rows
    for index, (_key, label, value) in enumerate(totals.rows):
        if value is None:
            text = "–"
        elif index in percent:
            text = f"{float(value) * 100:.2f} %"
        else:
            text = str(value)
        table.add_row(escape(str(label)), text)
    console.print(table)


@reporting_app.command("export")
def export(
    scope: ScopeOption = "platform", first: FromOption = None, last: ToOption = None,
    xlsx: Annotated[Path | None, typer.Option("--xlsx", help="Write every table to this workbook")] = None,
    csv_table: Annotated[str | None, typer.Option("--csv", help="Write this table as CSV (with --out)")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The CSV file to write")] = None,
) -> None:
    """Write a scope's dashboard tables: all of them as XLSX (--xlsx FILE) or one as CSV (--csv TABLE --out FILE)."""
    from labcommons.reporting import exports, service

    if (xlsx is None) == (csv_table is None) or (csv_table is not None and out is None):
        err.print("[red]error:[/red] give either --xlsx FILE or --csv TABLE --out FILE")
        raise typer.Exit(code=2)
    db = database()
    try:
        chosen, period, today = _checked(db, scope, first, last)
        if csv_table is not None and csv_table not in exports.TABLES:
            raise NotFound(f"No table {csv_table!r}; there are: {', '.join(exports.TABLES)}.", field="table")
        with db.unit_of_work(write=False) as session:
            d = service.dashboard(session, chosen, period, today)
            rows = service.instrument_rows(session, chosen, period, today)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    tables = exports.dashboard_tables(d, rows)
    if xlsx is not None:
        xlsx.write_bytes(exports.workbook(d, tables))
        console.print(f"{len(tables)} table(s) of {chosen.token} written to {xlsx}")
        return
    assert csv_table is not None and out is not None
    table = exports.pick_table(tables, csv_table)
    out.write_bytes(exports.table_csv(table))
    console.print(f"{len(table.rows)} row(s) of {table.name} written to {out}")


def _institution_id(db: Database, given: str) -> int:
    from sqlalchemy import select

    from labcommons.catalog.models import Institution

    text = given.strip()
    with db.unit_of_work(write=False) as session:
        if text.isdigit():
            found = session.scalar(select(Institution.id).where(Institution.id == int(text)))
        else:
            found = session.scalar(select(Institution.id).where(Institution.code == text))
    if found is None:
        raise NotFound(f"No institution {given!r}.", field="institution")
    return int(found)


@reporting_app.command("report")
def report(
    institution: Annotated[str, typer.Option("--institution", help="The institution's id or code")],
    year: Annotated[int, typer.Option("--year", help="The calendar year")],
    out: Annotated[Path, typer.Option("--out", help="The PDF file to write")],
    locale: Annotated[str, typer.Option("--locale", help="zh_CN or en")] = "zh_CN",
) -> None:
    """Write an institution's annual open-sharing evaluation report (PDF with charts)."""
    from labcommons.i18n import LOCALES
    from labcommons.reporting import service
    from labcommons.reporting.report import annual_report_pdf

    db = database()
    try:
        if locale not in LOCALES:
            raise InvalidInput(f"The locale is one of {', '.join(LOCALES)}.", field="locale")
        period = service.year_period(year)
        chosen, _period, today = _checked(db, f"institution:{_institution_id(db, institution)}",
                                          period.first.isoformat(), period.last.isoformat())
        with db.unit_of_work(write=False) as session:
            content = annual_report_pdf(session, chosen, year, today, locale)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    out.write_bytes(content)
    console.print(f"report of {escape(chosen.name_en)} for {year} written to {out} ({len(content)} bytes)")
