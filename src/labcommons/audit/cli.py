"""`labcommons audit`: verify the hash chain, print its head for publishing, show recent entries."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from sqlalchemy import func, select

from labcommons.actor import Actor, Grant
from labcommons.audit import seal, service
from labcommons.audit.models import AuditEntry
from labcommons.cli_support import console, database, err
from labcommons.errors import DomainError

app = typer.Typer(no_args_is_help=True)

# The command line acts with the platform administrator's reach: whoever runs it holds the database already.
_OPERATOR = Actor(user_id=0, email="cli@localhost", name="command line", institution_id=None, region_code="",
                  grants=(Grant(role="platform_admin"),))


@app.command("verify")
def verify(
    anchor: Annotated[list[str] | None, typer.Option(help="A published SEQ:HASH that must still be in the chain")]
    = None,
) -> None:
    """Recompute every entry's HMAC and link; exit 1 when an entry was changed, removed or reordered."""
    try:
        anchors = [service.parse_anchor(a) for a in anchor or []]
    except DomainError as exc:
        err.print(f"[red]{exc.message}[/red]")
        raise typer.Exit(code=2) from exc
    db = database()
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        total = session.scalar(select(func.count()).select_from(AuditEntry)) or 0
        with Progress(TextColumn("verifying"), BarColumn(), MofNCompleteColumn(), console=err,
                      transient=True) as progress:
            task = progress.add_task("verify", total=total)
            report = service.verify(session, None, anchors=anchors,
                                    progress=lambda n: progress.advance(task, n))
    if report.ok:
        console.print(f"audit chain ok: {report.entries} entries, head {report.last_seq}:{report.last_hash}")
        return
    table = Table(title="Audit chain problems")
    for column in ("seq", "problem", "detail"):
        table.add_column(column)
    for problem in report.problems:
        table.add_row(str(problem.seq), problem.kind, problem.detail)
    console.print(table)
    console.print(f"[red]audit chain BROKEN[/red]: {len(report.problems)} problem(s) in {report.entries} entries")
    raise typer.Exit(code=1)


@app.command("head")
def head() -> None:
    """Print the chain's head as SEQ:HASH, to publish where the database's writers cannot change it."""
    db = database()
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        seq, digest = service.head(session)
    console.print(f"{seq}:{digest}")


@app.command("show")
def show(
    region: Annotated[str | None, typer.Option(help="Region code")] = None,
    entity: Annotated[str | None, typer.Option(help="TYPE or TYPE:ID, e.g. booking:12")] = None,
    action: Annotated[str | None, typer.Option(help="Action prefix, e.g. booking. or login")] = None,
    limit: Annotated[int, typer.Option(min=1, max=service.MAX_LIMIT)] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line")] = False,
) -> None:
    """The newest entries, newest first."""
    entity_type, _, entity_id = (entity or "").partition(":")
    query = service.AuditQuery(region_code=region, entity_type=entity_type or None, entity_id=entity_id or None,
                               action=action, limit=limit)
    db = database()
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        page = service.list_entries(session, _OPERATOR, query)
    if as_json:
        for entry in page.entries:
            console.print_json(json.dumps({**vars(entry), "at": entry.at.isoformat()}, ensure_ascii=False))
        return
    table = Table()
    for column in ("seq", "at (UTC)", "actor", "action", "entity", "region", "changed"):
        table.add_column(column)
    for entry in page.entries:
        actor = f"{entry.actor_kind}:{entry.actor_id}" if entry.actor_id is not None else entry.actor_kind
        changed = ", ".join(sorted(set(entry.before) | set(entry.after)))
        table.add_row(str(entry.seq), entry.at.strftime("%Y-%m-%d %H:%M:%S"), actor, entry.action,
                      f"{entry.entity_type}:{entry.entity_id}", entry.region_code or "-", changed[:60])
    console.print(table)
