"""The personal-data page: what the platform holds and how to download it, and the deletion of one's data."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import JSONResponse, Response

from labcommons.actor import Actor
from labcommons.db import Database
from labcommons.errors import InvalidInput
from labcommons.http import request_db
from labcommons.i18n import gettext_ as _
from labcommons.identity import privacy, roles
from labcommons.identity.pages import clear_session_cookie
from labcommons.identity.roles import Action
from labcommons.pages import N_, check_csrf, render, require_actor

router = APIRouter(include_in_schema=False)
Db = Annotated[Database, Depends(request_db)]

PAGE = "/account/privacy"

# The blockers' explanations as the page shows them (the service's messages are the API's English).
BLOCKER_TEXTS = {
    "order_in_progress": N_("A service order of yours is under way (agreed, on hold or waiting to be closed). "
                            "Wait until it is closed or cancelled."),
    "booking_in_use": N_("A booking of yours is checked in. Check out first."),
    "booking_past_cancellation_deadline": N_("A booking of yours is past its cancellation deadline. Wait until it "
                                             "is over, or ask the facility to cancel it."),
    "unpaid_invoice": N_("An invoice of a funding account you own is not paid yet."),
    "uninvoiced_charges": N_("A funding account you own has charges that go on its next invoice. Wait until that "
                             "invoice is issued and paid."),
}

# The deletion summary's counts in words, in the order the confirmation page lists them.
COUNT_LABELS = {
    "bookings_cancelled": N_("Bookings cancelled"),
    "waitlist_entries_withdrawn": N_("Waitlist entries withdrawn"),
    "orders_cancelled": N_("Service orders cancelled"),
    "demands_withdrawn": N_("Demands withdrawn"),
    "sessions_ended": N_("Sessions ended"),
    "api_tokens_revoked": N_("API tokens revoked"),
    "external_identities_deleted": N_("Linked identities removed"),
    "role_grants_revoked": N_("Roles removed"),
    "texts_blanked": N_("Texts you wrote erased"),
    "talent_cards_pseudonymised": N_("Talent cards erased"),
}


def _page(request: Request, actor: Actor, db: Database, status_code: int = 200, *, error: str | None = None,
          typed: str = "") -> Response:
    with db.unit_of_work(write=False) as session:
        blockers = privacy.deletion_blockers(session, actor.user_id)
    shown = [(blocker, _(BLOCKER_TEXTS.get(blocker.code, blocker.message))) for blocker in blockers]
    response = render(request, "identity/privacy.html", status_code=status_code, page_path=PAGE, blockers=shown,
                      error=error, typed=typed)
    response.headers["Cache-Control"] = "no-store"
    return response


@router.get(PAGE, response_model=None)
def privacy_page(request: Request, db: Db) -> Response:
    """What the platform holds about the user, the download, and the deletion form."""
    actor = require_actor(request)
    roles.require(actor, Action.manage_own_data)
    return _page(request, actor, db)


@router.get(PAGE + "/export.json", response_model=None)
def export_download(request: Request, db: Db) -> Response:
    """The user's personal data as a JSON download."""
    actor = require_actor(request)
    roles.require(actor, Action.manage_own_data)
    with db.unit_of_work(write=False) as session:
        document = privacy.export_personal_data(session, actor.user_id)
    return JSONResponse(document, headers={
        "Content-Disposition": f'attachment; filename="{privacy.export_filename(actor.user_id)}"',
        "Cache-Control": "no-store",
    })


@router.post(PAGE + "/delete", response_model=None)
def delete_data(
    request: Request, db: Db, csrf_token: Annotated[str, Form()] = "",
    confirm_email: Annotated[str, Form(max_length=254)] = "",
) -> Response:
    """Delete the user's personal data, sign this browser out and confirm what was done."""
    actor = require_actor(request)
    check_csrf(request, csrf_token)
    roles.require(actor, Action.manage_own_data)
    try:
        with db.unit_of_work() as session:
            summary = privacy.delete_personal_data(session, actor, actor.user_id, confirm_email)
    except InvalidInput:
        return _page(request, actor, db, 422, typed=confirm_email,
                     error=_("Type your e-mail address exactly as shown above to confirm."))
    except privacy.DeletionBlocked:
        return _page(request, actor, db, 409, typed=confirm_email,
                     error=_("Your personal data cannot be deleted yet: settle what is listed above first."))
    # The layout must not greet the deleted account: this request is signed out from here on.
    request.state.actor = None
    counts = [(_(label), summary.counts[key]) for key, label in COUNT_LABELS.items() if summary.counts.get(key)]
    response = render(request, "identity/privacy_deleted.html", counts=counts)
    response.headers["Cache-Control"] = "no-store"
    clear_session_cookie(response)
    return response
