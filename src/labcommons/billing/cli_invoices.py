"""`labcommons billing`: monthly invoices, the settlement report and the charge export, as the platform operator."""

from __future__ import annotations

from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from sqlalchemy import select

from labcommons.cli_support import console, database, err, fail
from labcommons.errors import DomainError, NotFound

billing_app = typer.Typer(no_args_is_help=True, help="Billing: invoices, settlement, exports.")
invoices_app = typer.Typer(no_args_is_help=True, help="Monthly invoices of funding accounts.")
billing_app.add_typer(invoices_app, name="invoices")

PeriodOption = Annotated[str, typer.Option("--period", help="The month, YYYY-MM (platform time zone)")]


def _account_id(code: str | None) -> int | None:
    from labcommons.billing.models import BillingAccount

    if code is None:
        return None
    with database().unit_of_work(write=False) as session:
        found = session.scalar(select(BillingAccount.id).where(BillingAccount.code == code.strip()))
    if found is None:
        raise NotFound(f"No funding account {code!r}.", field="account")
    return found


@invoices_app.command("generate")
def generate(
    period: PeriodOption,
    allow_open: Annotated[bool, typer.Option("--allow-open", help="Invoice a month that has not ended yet")] = False,
    account: Annotated[str | None, typer.Option("--account", help="Only this account (its code)")] = None,
) -> None:
    """Make the month's invoices: one per account with un-invoiced charges; running it again makes nothing new.

    Each account is invoiced in its own transaction, so an interrupted run can simply be started again.
    """
    from labcommons.billing import invoices
    from labcommons.db import utcnow

    db = database()
    made = []
    try:
        now = utcnow()
        invoices.check_period_closed(period, now, allow_open)
        with db.unit_of_work(write=False) as session:
            candidates = invoices.accounts_to_invoice(session, period, account_id=_account_id(account))
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err) as progress:
            task = progress.add_task(f"invoicing {period}", total=len(candidates))
            for account_id in candidates:
                with db.unit_of_work() as session:
                    invoice = invoices.invoice_account(session, account_id, period, now=now)
                    if invoice is not None:
                        made.append((invoice.number, invoice.total_fen, invoice.due_fen))
                progress.advance(task)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    for number, total, due in made:
        console.print(f"{number}  total {_yuan(total)}  due {_yuan(due)}")
    console.print(f"{len(made)} invoice(s) made for {period}")


def _yuan(fen: int) -> str:
    from labcommons.billing.exports import yuan_text

    return yuan_text(fen)


@billing_app.command("settlement")
def settlement(
    period: PeriodOption,
    out: Annotated[Path, typer.Option("--out", help="The file to write")],
    fmt: Annotated[str, typer.Option("--format", help="csv, xlsx or pdf")] = "csv",
) -> None:
    """Write the month's settlement report (who owes whom) as CSV, XLSX or PDF."""
    from labcommons.billing import exports
    from labcommons.billing.settlement import settlement_report

    if fmt not in ("csv", "xlsx", "pdf"):
        err.print("[red]error:[/red] --format is csv, xlsx or pdf")
        raise typer.Exit(code=2)
    chosen: Literal["csv", "xlsx", "pdf"] = fmt  # type: ignore[assignment]
    db = database()
    try:
        with db.unit_of_work(write=False) as session:
            report = settlement_report(session, period)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    render = {"csv": exports.settlement_csv, "xlsx": exports.settlement_xlsx, "pdf": exports.settlement_pdf}[chosen]
    out.write_bytes(render(report))
    console.print(f"{len(report.rows)} row(s), total {_yuan(report.total_fen)} (charges "
                  f"{_yuan(report.charges_fen or 0)}) written to {out}")


@billing_app.command("export-charges")
def export_charges(
    first: Annotated[datetime, typer.Option("--from", formats=["%Y-%m-%d"], help="First day, YYYY-MM-DD")],
    last: Annotated[datetime, typer.Option("--to", formats=["%Y-%m-%d"], help="Last day (included)")],
    out: Annotated[Path, typer.Option("--out", help="The CSV file to write")],
    account: Annotated[str | None, typer.Option("--account", help="Only this account (its code)")] = None,
) -> None:
    """Write the charges posted in [from, to] as CSV for finance systems, one row per payment part."""
    from labcommons.billing import exports
    from labcommons.billing.invoices import day_bounds

    db = database()
    rows = 0
    try:
        start, end = day_bounds(date.fromordinal(first.toordinal()), date.fromordinal(last.toordinal()))
        scope = exports.ChargeScope(start=start, end=end, account_id=_account_id(account))
        with out.open("wb") as fh:
            for chunk in exports.charges_csv_stream(db, scope):
                fh.write(chunk)
                rows += chunk.count(b"\r\n")
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    console.print(f"{max(rows - 1, 0)} row(s) written to {out}")
