"""Talent service card endpoints under /api/v1/billing: schemes (public), my cards, the issuing region's queue.

Reads need the token scope `billing:read`, writes `billing:write`; submitting a card takes an Idempotency-Key.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing import talent
from labcommons.billing.models import CardStatus, EntitlementKind, TalentCard, TalentCardScheme, TalentEntitlement
from labcommons.http import Day, Db, Id, IdempotencyKey, idempotent_post, require_role_for, require_scope
from labcommons.idempotency import Outcome
from labcommons.identity.roles import Action

router = APIRouter(prefix="/billing", tags=["talent cards"])

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No valid API token"},
    403: {"description": "Not an authority of any region, or the token lacks the scope"},
    404: {"description": "Unknown card or entitlement, or one of another region's schemes"},
    409: {"description": "`card_number_taken` (field `card_number`), `card_not_pending`, `card_not_verified`, "
                         "`card_changed`"},
    422: {"description": "Invalid input; `field` names it and `error` the rule (e.g. `holder_name_mismatch` "
                         "on `confirm_holder`, `unknown_scheme`, `card_expired`)"},
}
Reader = Annotated[Actor, Depends(require_scope("billing:read"))]
Writer = Annotated[Actor, Depends(require_scope("billing:write"))]


AuthorityWriter = Annotated[Actor, Depends(require_role_for("billing:write", Action.issue_vouchers))]
AuthorityReader = Annotated[Actor, Depends(require_role_for("billing:read", Action.issue_vouchers))]


# --- shapes ---------------------------------------------------------------------------------------------------


class EntitlementRead(BaseModel):
    id: int
    scheme_code: str
    provider_region_code: str
    kind: EntitlementKind
    value: int

    @classmethod
    def of(cls, e: TalentEntitlement) -> EntitlementRead:
        return cls(id=e.id, scheme_code=e.scheme_code, provider_region_code=e.provider_region_code, kind=e.kind,
                   value=e.value)


class SchemeRead(BaseModel):
    """A card scheme with what its holders get from the providers of each region."""

    code: str
    region_code: str
    name_zh: str
    name_en: str
    entitlements: dict[str, list[EntitlementRead]]

    @classmethod
    def of(cls, s: TalentCardScheme, rows: list[TalentEntitlement]) -> SchemeRead:
        by_region: dict[str, list[EntitlementRead]] = {}
        for row in rows:
            by_region.setdefault(row.provider_region_code, []).append(EntitlementRead.of(row))
        return cls(code=s.code, region_code=s.region_code, name_zh=s.name_zh, name_en=s.name_en,
                   entitlements=by_region)


class SchemeList(BaseModel):
    items: list[SchemeRead]


class CardCreate(BaseModel):
    """A card to verify: the scheme, its number, the holder's name as printed, and its last valid day."""

    model_config = ConfigDict(extra="forbid")

    scheme_code: str = Field(min_length=1, max_length=32)
    card_number: str = Field(min_length=1, max_length=40)
    holder_name: str = Field(min_length=1, max_length=200)
    valid_until: Day | None = None


class CardRead(BaseModel):
    id: int
    user_id: int
    scheme_code: str
    card_number: str
    holder_name: str
    valid_until: date | None
    status: CardStatus
    submitted_at: datetime
    decided_at: datetime | None
    note: str

    @classmethod
    def of(cls, c: TalentCard) -> CardRead:
        return cls(id=c.id, user_id=c.user_id, scheme_code=c.scheme_code, card_number=c.card_number,
                   holder_name=c.holder_name, valid_until=c.valid_until, status=c.status,
                   submitted_at=c.submitted_at, decided_at=c.decided_at, note=c.note)


class CardList(BaseModel):
    items: list[CardRead]


class QueueItem(CardRead):
    user_name: str
    user_email: str
    name_matches: bool


class QueueList(BaseModel):
    items: list[QueueItem]


class CardVerify(BaseModel):
    """`confirm_holder` confirms a holder name that differs from the account's name."""

    model_config = ConfigDict(extra="forbid")

    confirm_holder: bool = False
    note: str = Field(default="", max_length=talent.NOTE_MAX)


class CardDecision(BaseModel):
    """Why the card is rejected or revoked; the holder sees it."""

    model_config = ConfigDict(extra="forbid")

    note: str = Field(min_length=1, max_length=talent.NOTE_MAX)


class EntitlementSet(BaseModel):
    """What the scheme's holders get from providers of a region; `value` is days (priority_window), basis points
    (fee_discount) or 0 (fast_track)."""

    model_config = ConfigDict(extra="forbid")

    scheme_code: str = Field(min_length=1, max_length=32)
    provider_region_code: str = Field(min_length=1, max_length=16)
    kind: EntitlementKind
    value: StrictInt = Field(default=0, ge=0, le=10000)


# --- schemes --------------------------------------------------------------------------------------------------


@router.get("/talent-schemes", response_model=SchemeList, responses=ERRORS)
def list_schemes(db: Db) -> SchemeList:
    """Every talent card scheme with the entitlements its holders get in each region."""
    with db.unit_of_work(write=False) as session:
        rows = talent.entitlements_by_scheme(session)
        return SchemeList(items=[SchemeRead.of(s, rows.get(s.code, [])) for s in talent.list_schemes(session)])


@router.post("/talent-entitlements", response_model=EntitlementRead, responses=ERRORS)
def set_entitlement(body: EntitlementSet, actor: AuthorityWriter, db: Db) -> EntitlementRead:
    """Add or change one entitlement of a scheme of the caller's region (setting it again is harmless)."""
    with db.unit_of_work() as session:
        row = talent.set_entitlement(session, actor, body.scheme_code, body.provider_region_code, body.kind,
                                     body.value)
        return EntitlementRead.of(row)


@router.delete("/talent-entitlements/{entitlement_id}", status_code=204, responses=ERRORS)
def remove_entitlement(entitlement_id: Id, actor: AuthorityWriter, db: Db) -> None:
    """Remove one entitlement of a scheme of the caller's region."""
    with db.unit_of_work() as session:
        talent.remove_entitlement(session, actor, entitlement_id)


# --- cards ----------------------------------------------------------------------------------------------------


@router.get("/talent-cards", response_model=CardList, responses=ERRORS)
def my_cards(actor: Reader, db: Db) -> CardList:
    """The caller's cards, newest first, in every status."""
    with db.unit_of_work(write=False) as session:
        return CardList(items=[CardRead.of(c) for c in talent.my_cards(session, actor)])


@router.post("/talent-cards", status_code=201, response_model=CardRead, responses=ERRORS)
def submit_card(body: CardCreate, request: Request, actor: Writer, db: Db,
                idempotency_key: IdempotencyKey = None) -> JSONResponse:
    """Submit a card for the issuing region to verify; 409 `card_number_taken` when the number is registered."""

    def work(session: Session) -> Outcome:
        card = talent.submit_card(session, actor, body.scheme_code, body.card_number, body.holder_name,
                                  body.valid_until, today=talent.today())
        return Outcome(201, CardRead.of(card).model_dump(mode="json"))

    return idempotent_post(request, db, actor, idempotency_key, body.model_dump(mode="json"), work)


@router.get("/talent-cards/queue", response_model=QueueList, responses=ERRORS)
def queue(actor: AuthorityReader, db: Db, status: Annotated[CardStatus | None, Query()] = CardStatus.pending,
          ) -> QueueList:
    """Cards of the schemes of the caller's regions in one status (pending by default), oldest first."""
    with db.unit_of_work(write=False) as session:
        rows = talent.authority_cards(session, actor, status)
        return QueueList(items=[QueueItem(**CardRead.of(r.card).model_dump(), user_name=r.user_name,
                                          user_email=r.user_email, name_matches=r.name_matches) for r in rows])


@router.post("/talent-cards/{card_id}/verify", response_model=CardRead, responses=ERRORS)
def verify_card(card_id: Id, actor: AuthorityWriter, db: Db, body: CardVerify | None = None) -> CardRead:
    """Verify a pending card (422 `holder_name_mismatch` unless `confirm_holder` when the names differ)."""
    body = body or CardVerify()
    with db.unit_of_work() as session:
        return CardRead.of(talent.verify_card(session, actor, card_id, confirm_holder=body.confirm_holder,
                                              note=body.note, today=talent.today()))


@router.post("/talent-cards/{card_id}/reject", response_model=CardRead, responses=ERRORS)
def reject_card(card_id: Id, body: CardDecision, actor: AuthorityWriter, db: Db) -> CardRead:
    """Reject a pending card with a note; its holder may correct and resubmit it."""
    with db.unit_of_work() as session:
        return CardRead.of(talent.reject_card(session, actor, card_id, body.note))


@router.post("/talent-cards/{card_id}/revoke", response_model=CardRead, responses=ERRORS)
def revoke_card(card_id: Id, body: CardDecision, actor: AuthorityWriter, db: Db) -> CardRead:
    """Revoke a verified card with a note; its entitlements end at once."""
    with db.unit_of_work() as session:
        return CardRead.of(talent.revoke_card(session, actor, card_id, body.note))
