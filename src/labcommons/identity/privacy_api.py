"""Personal data under /api/v1/me: the caller's export and the deletion of their data (token scope `account`)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from labcommons.actor import Actor
from labcommons.http import Db, require_scope
from labcommons.identity import privacy, roles
from labcommons.identity.roles import Action

router = APIRouter(tags=["account"])

Caller = Annotated[Actor, Depends(require_scope("account"))]

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "The token lacks the `account` scope"},
}


class DeletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    confirm_email: str = Field(max_length=254, description="The account's e-mail address, typed again to confirm")


class BlockerRead(BaseModel):
    code: str = Field(examples=["order_in_progress", "unpaid_invoice", "uninvoiced_charges", "booking_in_use",
                                "booking_past_cancellation_deadline"])
    message: str
    items: list[str] = Field(description="What the reason concerns: order or invoice numbers, booking ids, "
                                         "account codes")


class DeletionBlockedRead(BaseModel):
    error: str = Field(examples=["deletion_blocked"])
    message: str
    field: str | None
    reasons: list[BlockerRead] = Field(default_factory=list, description="Every reason deletion must wait")


class DeletionRead(BaseModel):
    user_id: int
    deleted_at: datetime
    counts: dict[str, int] = Field(description="What was cancelled, deleted, revoked or blanked, by kind")


@router.get(
    "/me/export", response_class=JSONResponse, responses={
        **ERRORS,
        200: {"description": "Everything the platform holds about the caller, as a download (schema "
                             f"`{privacy.SCHEMA}` version {privacy.SCHEMA_VERSION})",
              "content": {"application/json": {"schema": {"type": "object"}}}},
    },
)
def export_my_data(actor: Caller, db: Db) -> JSONResponse:
    """The caller's personal data in one JSON document: profile, identities, sessions, tokens, roles, bookings,
    orders, billing, talent cards, demands, settings and the audit entries of what they did."""
    roles.require(actor, Action.manage_own_data)
    with db.unit_of_work(write=False) as session:
        document = privacy.export_personal_data(session, actor.user_id)
    return JSONResponse(document, headers={
        "Content-Disposition": f'attachment; filename="{privacy.export_filename(actor.user_id)}"',
        "Cache-Control": "no-store",
    })


@router.post(
    "/me/deletion", response_model=DeletionRead, responses={
        **ERRORS,
        409: {"model": DeletionBlockedRead, "description": "Something must be settled first (`reasons`), or the "
                                                           "data was deleted already"},
        422: {"description": "`confirm_email` is not the account's address; `field` names it"},
    },
)
def delete_my_data(body: DeletionRequest, actor: Caller, db: Db) -> DeletionRead:
    """Delete the caller's personal data (personal-information protection law). Bookings to come, waitlist entries,
    orders not agreed yet and open demands are cancelled; sessions and tokens end; the ledger and the audit log stay,
    under a pseudonymised account. Refused with 409 and the reasons while an order is under way, a booking cannot
    be cancelled or an account they own owes money."""
    roles.require(actor, Action.manage_own_data)
    with db.unit_of_work() as session:
        summary = privacy.delete_personal_data(session, actor, actor.user_id, body.confirm_email)
    return DeletionRead(user_id=summary.user_id, deleted_at=summary.deleted_at, counts=summary.counts)
