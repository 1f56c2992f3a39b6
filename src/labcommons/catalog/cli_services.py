"""`labcommons services`: list the facilities' services and show one."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.errors import DomainError, InvalidInput

app = typer.Typer(no_args_is_help=True, help="The facilities' services (testing, R&D, consultation).")


def _price(fen: int | None, unit: str) -> str:
    from labcommons.pages import yuan

    return "on request" if fen is None else f"{yuan(fen)} / {unit}"


@app.command("list")
def list_command(
    facility: Annotated[str | None, typer.Option("--facility", help="Only this facility's services (its code)")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="testing, rnd or consultation")] = None,
) -> None:
    """Every service, offered or not, optionally of one facility or one kind."""
    from labcommons.catalog import service
    from labcommons.catalog.models import ServiceKind

    try:
        try:
            wanted = ServiceKind(kind) if kind else None
        except ValueError:
            raise InvalidInput("The kind is testing, rnd or consultation.", field="kind") from None
        with database().unit_of_work(write=False) as session:
            facility_id = service.facility_by_code(session, facility).id if facility else None
            rows = service.list_services(session, facility_id=facility_id, kind=wanted)
            ratings = service.service_ratings(session, [r.id for r in rows])
    except DomainError as exc:
        raise fail(exc) from exc
    table = Table("code", "kind", "name", "facility", "price", "days", "rating", "offered")
    for s in rows:
        rating = ratings.get(s.id)
        table.add_row(
            s.code, s.kind.value, f"{s.name_zh} / {s.name_en}", s.facility.code,
            _price(s.list_price_fen, s.price_unit.value), "" if s.turnaround_days is None else str(s.turnaround_days),
            f"{rating[0]:.1f} ({rating[1]})" if rating else "", "yes" if s.is_active else "no",
        )
    console.print(table)
    console.print(f"{len(rows)} service(s)")


@app.command("show")
def show_command(code: Annotated[str, typer.Argument(help="The service's code")]) -> None:
    """One service with its texts, price, accreditations, instruments used and rating."""
    from labcommons.catalog import service

    try:
        with database().unit_of_work(write=False) as session:
            detail = service.service_by_code(session, code)
    except DomainError as exc:
        raise fail(exc) from exc
    s = detail.service
    table = Table("field", "value", show_header=False)
    table.add_row("code", s.code)
    table.add_row("name", f"{s.name_zh}\n{s.name_en}")
    table.add_row("kind", s.kind.value)
    table.add_row("category", f"{s.category.code} {s.category.name_zh} / {s.category.name_en}")
    table.add_row("facility", f"{s.facility.code} {s.facility.name_zh} / {s.facility.name_en}")
    table.add_row("institution", f"{detail.institution.name_zh} / {detail.institution.name_en} ({detail.region.code})")
    table.add_row("price", _price(s.list_price_fen, s.price_unit.value))
    table.add_row("turnaround", "" if s.turnaround_days is None else f"{s.turnaround_days} days")
    table.add_row("offered", "yes" if s.is_active else "no")
    table.add_row("description", "\n".join(t for t in (s.description_zh, s.description_en) if t))
    table.add_row("samples", "\n".join(t for t in (s.sample_requirements_zh, s.sample_requirements_en) if t))
    table.add_row("accreditations", "\n".join(
        " ".join(p for p in (a.scheme, a.certificate_no, f"valid until {a.valid_until}" if a.valid_until else "") if p)
        for a in detail.accreditations
    ))
    table.add_row("instruments", "\n".join(f"{i.code} {i.name_zh} / {i.name_en}" for i in detail.instruments))
    table.add_row("rating", f"{detail.rating_average:.1f} ({detail.rating_count})" if detail.rating_average else "")
    console.print(table)
