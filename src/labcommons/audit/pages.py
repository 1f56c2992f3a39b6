"""The audit log page: /audit lists a region's entries for its authority (every region for platform
administrators), filtered by entity, actor, action and period, newest first, paged by position."""

from __future__ import annotations

from datetime import date, datetime, time, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from labcommons.audit import seal, service
from labcommons.audit.service import AuditQuery
from labcommons.catalog.models import Region
from labcommons.db import MAX_ID, Database
from labcommons.errors import InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.pages import env, render, require_actor, to_utc

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]
Text = Annotated[str, Query(max_length=80)]


def reads_audit_log(actor: object) -> bool:
    """Whether the layout links the audit log for this user."""
    return actor is not None and any(
        g.role in roles.PERMISSIONS[Action.view_audit_log].roles for g in actor.grants  # type: ignore[attr-defined]
    )


env.globals["reads_audit_log"] = reads_audit_log


def _day(request: Request, value: str, name: str, *, end: bool = False) -> datetime | None:
    if not value:
        return None
    try:
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidInput("Give a date as YYYY-MM-DD.", field=name) from exc
    return to_utc(request, day + timedelta(days=1) if end else day, time())


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request, db: Db, region: Text = "", entity_type: Text = "", entity_id: Text = "", actor_id: Text = "",
    action: Text = "", since: Text = "", until: Text = "", before_seq: Text = "",
) -> HTMLResponse:
    """The audit log of the regions the user reads."""
    actor = require_actor(request)
    roles.require_some(actor, Action.view_audit_log)
    form = {"region": region, "entity_type": entity_type, "entity_id": entity_id, "actor_id": actor_id,
            "action": action, "since": since, "until": until}
    error = None
    page = service.AuditPage()
    seal.bring_current(db)
    with db.unit_of_work(write=False) as session:
        readable = service.readable_regions(actor)
        regions = [r for r in session.scalars(select(Region).order_by(Region.code))
                   if readable is None or r.code in readable]
        try:
            if actor_id and not (actor_id.isdigit() and int(actor_id) <= MAX_ID):
                raise InvalidInput("Give a user id as a number.", field="actor_id")
            if before_seq and not (before_seq.isdigit() and int(before_seq) <= 2**62):
                raise InvalidInput("Give a position as a number.", field="before_seq")
            query = AuditQuery(
                region_code=region or None, entity_type=entity_type or None, entity_id=entity_id or None,
                actor_id=int(actor_id) if actor_id else None, action=action or None,
                since=_day(request, since, "since"), until=_day(request, until, "until", end=True),
                before_seq=int(before_seq) if before_seq else None,
            )
            page = service.list_entries(session, actor, query)
        except InvalidInput as exc:
            error = _(exc.message)
    status = 422 if error else 200
    return render(request, "audit/log.html", status_code=status, page=page, form=form, regions=regions,
                  error=error, sees_addresses=service.sees_addresses(actor))
