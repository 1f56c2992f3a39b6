"""`labcommons orders`: list and show service orders as the platform operator."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from labcommons.cli_support import console, database, fail
from labcommons.errors import DomainError, InvalidInput

app = typer.Typer(no_args_is_help=True, help="Service orders (read-only, as the platform operator).")


def _yuan(fen: int) -> str:
    from labcommons.pages import yuan

    return yuan(fen)


@app.command("list")
def list_(
    facility: Annotated[str | None, typer.Option("--facility", help="Facility code")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Order status, e.g. submitted")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10000)] = 200,
) -> None:
    """List orders, newest first (optionally of one facility and in one status)."""
    from labcommons.orders import service
    from labcommons.orders.models import OrderStatus

    try:
        try:
            chosen = OrderStatus(status) if status else None
        except ValueError:
            raise InvalidInput(f"Unknown status {status!r}; one of: {', '.join(s.value for s in OrderStatus)}.",
                               field="status") from None
        with database().unit_of_work(write=False) as session:
            rows = service.find_orders(session, facility=facility, status=chosen, limit=limit)
            table = Table("number", "status", "title", "service", "facility", "user", "created")
            for o in rows:
                table.add_row(o.number or str(o.id), o.status.value, o.title, o.service.code, o.facility.code,
                              o.user.email, o.created_at.strftime("%Y-%m-%d %H:%M"))
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(table)
    console.print(f"{len(rows)} order(s)")


@app.command("show")
def show(number: Annotated[str, typer.Argument(help="Order number, e.g. SO-2026-000001")]) -> None:
    """Show one order: its details, history, quotes and message count."""
    from labcommons.orders import messages, quotes, service

    try:
        with database().unit_of_work(write=False) as session:
            order = service.order_by_number(session, number)
            events = service.events_of(session, order)
            names = service.user_names(session, (e.actor_id for e in events))
            all_quotes = quotes.quotes_of(session, order)
            thread = messages.messages_of(session, order)
    except DomainError as exc:
        raise fail(exc) from exc
    console.print(f"[bold]{order.number}[/bold] {order.title}  [cyan]{order.status.value}[/cyan]"
                  + (f" (held from {order.held_from.value})" if order.held_from else ""))
    console.print(f"service {order.service.code} · {order.service.name_zh} / {order.service.name_en}")
    console.print(f"facility {order.facility.code} · user {order.user.name} <{order.user.email}>")
    console.print(f"samples {order.sample_count} · wanted by {order.wanted_by or '-'} · version {order.version}")
    history = Table("v", "at (UTC)", "from", "to", "by", "comment", title="history")
    for e in events:
        history.add_row(str(e.version), e.at.strftime("%Y-%m-%d %H:%M"), e.from_status.value if e.from_status else "",
                        e.to_status.value, names.get(e.actor_id, "") if e.actor_id else "platform", e.comment)
    console.print(history)
    if all_quotes:
        table = Table("version", "status", "total", "valid until", "lines", title="quotes")
        for q in all_quotes:
            table.add_row(str(q.version), q.status.value, _yuan(q.total_fen), q.valid_until.isoformat(),
                          "; ".join(f"{x.description} × {x.quantity} @ {_yuan(x.unit_price_fen)}" for x in q.lines))
        console.print(table)
    console.print(f"{len(thread)} message(s)")
