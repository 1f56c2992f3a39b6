"""The notification settings page: one checkbox per event, saved with Post/Redirect/Get."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import Response

from labcommons.db import Database
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.notifications import service
from labcommons.pages import check_csrf, redirect, render, require_actor

router = APIRouter()


@router.get("/account/notifications", include_in_schema=False, response_model=None)
def notification_settings(request: Request, db: Annotated[Database, Depends(request_db)]) -> Response:
    """The signed-in user's e-mail notification settings."""
    actor = require_actor(request)
    with db.unit_of_work(write=False) as session:
        chosen = service.preferences(session, actor.user_id)
    events = [(event, _(service.EVENT_LABELS[event]), chosen[event]) for event in service.EVENTS]
    return render(request, "notifications/preferences.html", events=events)


@router.post("/account/notifications", include_in_schema=False, response_model=None)
def save_notification_settings(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    csrf_token: Annotated[str, Form()] = "",
    email: Annotated[list[str] | None, Form()] = None,
) -> Response:
    """Save the settings: a ticked box means e-mail, an unticked one means none (unknown names are ignored)."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    ticked = set(email or [])
    with db.unit_of_work() as session:
        service.set_preferences(session, actor.user_id, {event: event in ticked for event in service.EVENTS})
    return redirect("/account/notifications", flash=_("Notification settings saved."))
