"""The caller's notification preferences under /api/v1/me/notifications."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from labcommons.actor import Actor
from labcommons.db import Database
from labcommons.http import request_db, require_scope
from labcommons.notifications import service

router = APIRouter(prefix="/me/notifications", tags=["account"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token lacks the `account` scope"},
    422: {"description": "Invalid input, such as an unknown event; `field` names it"},
}


class Preferences(BaseModel):
    email: dict[str, bool] = Field(
        description="Per event, whether it is e-mailed. Events: " + ", ".join(service.EVENTS)
    )


class PreferencesUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: dict[str, bool] = Field(description="The events to switch on (true) or off (false); others are kept")


@router.get("", response_model=Preferences, responses=ERRORS)
def get_preferences(
    actor: Annotated[Actor, Depends(require_scope("account"))], db: Annotated[Database, Depends(request_db)]
) -> Preferences:
    """Which events the caller receives by e-mail (all of them unless switched off)."""
    with db.unit_of_work(write=False) as session:
        return Preferences(email=service.preferences(session, actor.user_id))


@router.put("", response_model=Preferences, responses=ERRORS)
def put_preferences(
    body: PreferencesUpdate,
    actor: Annotated[Actor, Depends(require_scope("account"))],
    db: Annotated[Database, Depends(request_db)],
) -> Preferences:
    """Switch e-mail of some events on or off; the answer is the whole new setting."""
    with db.unit_of_work() as session:
        return Preferences(email=service.set_preferences(session, actor.user_id, body.email))
