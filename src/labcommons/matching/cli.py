"""`labcommons matching`: rebuild the match index, show its state, and try a demand from the command line."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import func, select

from labcommons.cli_support import console, database, err, fail
from labcommons.errors import DomainError

matching_app = typer.Typer(no_args_is_help=True, help="Demand matching: the index, its status, queries.")

# Documents refreshed per transaction: an interrupted reindex keeps what it did, and readers never wait long.
REINDEX_CHUNK = 1000


def _mode() -> tuple[str, str]:
    """("hybrid", model name) or ("keyword", why there is no model)."""
    from labcommons.matching import embeddings

    encoder = embeddings.get_encoder()
    if encoder is not None:
        return "hybrid", encoder.name
    return "keyword", embeddings.unavailable_reason() or "no embedding model"


@matching_app.command("reindex")
def reindex(
    everything: Annotated[bool, typer.Option("--all", help="Recompute every document, not only the dirty ones")]
    = False,
) -> None:
    """Recompute the match documents that changed (tokens and embeddings), or all of them with --all."""
    from labcommons.matching import index
    from labcommons.matching.models import MatchDocument

    db = database()
    marked = None
    done = 0
    try:
        if everything:
            with db.unit_of_work() as session:
                marked = index.mark_all_dirty(session)
        with db.unit_of_work(write=False) as session:
            pending = session.scalar(
                select(func.count()).select_from(MatchDocument).where(MatchDocument.dirty.is_(True))
            ) or 0
        mode, model = _mode()  # loads the model before the bar starts
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=err) as progress:
            task = progress.add_task("reindexing", total=pending)
            while True:
                with db.unit_of_work() as session:
                    step = index.refresh(session, limit=REINDEX_CHUNK,
                                         progress=lambda n: progress.advance(task, n))
                if step == 0:
                    break
                done += step
        with db.unit_of_work(write=False) as session:
            counts = _counts(session)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    if marked is not None:
        console.print(f"{marked} item(s) marked for reindexing")
    console.print(f"{done} document(s) refreshed; {counts['active']} active, {counts['dirty']} dirty, "
                  f"{counts['embedded']} with embeddings ({mode}: {escape(model)})")


def _counts(session: Any) -> dict[str, Any]:
    from labcommons.matching.models import MatchDocument

    by_kind = dict(session.execute(
        select(MatchDocument.kind, func.count()).group_by(MatchDocument.kind)
    ).all())

    def count(*where: Any) -> int:
        return int(session.scalar(select(func.count()).select_from(MatchDocument).where(*where)) or 0)

    models = dict(session.execute(
        select(MatchDocument.embedding_model, func.count())
        .where(MatchDocument.embedding.is_not(None)).group_by(MatchDocument.embedding_model)
    ).all())
    return {
        "documents": sum(by_kind.values()), "by_kind": by_kind,
        "active": count(MatchDocument.active.is_(True), MatchDocument.dirty.is_(False)),
        "dirty": count(MatchDocument.dirty.is_(True)),
        "embedded": sum(models.values()), "models": models,
    }


@matching_app.command("status")
def status() -> None:
    """How many match documents there are, how many wait for a refresh, and how matching ranks."""
    db = database()
    try:
        with db.unit_of_work(write=False) as session:
            counts = _counts(session)
    finally:
        db.dispose()
    mode, model = _mode()
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(counts["by_kind"].items())) or "none"
    console.print(f"documents: {counts['documents']} ({kinds})")
    console.print(f"active: {counts['active']}")
    console.print(f"dirty: {counts['dirty']}" + (" (run `labcommons matching reindex`)" if counts["dirty"] else ""))
    stored = ", ".join(f"{escape(k or '?')} {v}" for k, v in sorted(counts["models"].items())) or "none"
    console.print(f"embeddings: {counts['embedded']} ({stored})")
    console.print(f"mode: {mode}")
    console.print(f"model: {escape(model) if mode == 'hybrid' else 'none (' + escape(model) + ')'}")


@matching_app.command("query")
def query(
    text: Annotated[str, typer.Argument(help="The demand, in Chinese or English")],
    region: Annotated[str | None, typer.Option("--region", help="Prefer this region's providers (CQ, SC, ...)")]
    = None,
    limit: Annotated[int | None, typer.Option("--limit", help="How many results (1-50, default 10)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON")] = False,
) -> None:
    """Rank instruments, services and experts for a demand, as an anonymous visitor sees them."""
    from labcommons.matching import service as matching

    db = database()
    try:
        with db.unit_of_work(write=False) as session:
            outcome = matching.match(session, None, text, region=region, limit=limit)
    except DomainError as exc:
        raise fail(exc) from exc
    finally:
        db.dispose()
    if as_json:
        body = {
            "mode": outcome.mode, "notice": outcome.notice, "took_ms": round(outcome.took_ms, 1),
            "corrections": outcome.corrections, "index_size": outcome.index_size,
            "results": [r.as_json() for r in outcome.results],
        }
        typer.echo(json.dumps(body, ensure_ascii=False, indent=2))
        return
    if outcome.notice:
        err.print(f"[yellow]note:[/yellow] {escape(outcome.notice)}")
    if outcome.corrections:
        fixed = ", ".join(f"{escape(k)} → {escape(v)}" for k, v in outcome.corrections.items())
        console.print(f"corrected: {fixed}")
    table = Table(title=f"{len(outcome.results)} match(es), {outcome.mode}, {outcome.took_ms:.0f} ms "
                        f"({outcome.index_size} items)")
    table.add_column("#", justify="right")
    table.add_column("type")
    table.add_column("code", no_wrap=True)
    table.add_column("name")
    table.add_column("region")
    table.add_column("score", justify="right")
    table.add_column("why")
    for rank, r in enumerate(outcome.results, start=1):
        why = r.explanation
        reasons = list(why.get("matched_terms", []))[:4]
        reasons += [c["term"] for c in why.get("concepts", []) if c["term"] not in reasons][:2]
        table.add_row(str(rank), r.type, r.code, escape(f"{r.name_zh} / {r.name_en}"), r.region or "",
                      f"{r.score:.3f}", escape(", ".join(reasons)))
    console.print(table)
