"""Talent service cards: submission, verification by the issuing region, and what cards entitle holders to.

A scheme (e.g. the Tianfu Talent Card of Sichuan) is issued by one region; what its verified holders get from the
providers of each region is data (TalentEntitlement rows), so mutual recognition is one row per provider region.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.models import CardStatus, EntitlementKind, TalentCard, TalentCardScheme, TalentEntitlement
from labcommons.catalog.models import Facility, Institution, Region, ServiceKind
from labcommons.config import get_settings
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.models import User
from labcommons.identity.roles import Action
from labcommons.orders.models import ServiceOrder

# The largest value each kind of entitlement may take: a year of extra horizon, a 100% discount.
MAX_VALUE: dict[EntitlementKind, int] = {
    EntitlementKind.priority_window: 365,
    EntitlementKind.fee_discount: 10000,
    EntitlementKind.fast_track: 0,
}
NOTE_MAX = 2000
_CARD_NUMBER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9\-]{0,39}$")


def today(now: datetime | None = None) -> date:
    """The platform's day (cards are valid to the end of their last day there)."""
    return (now or utcnow()).astimezone(ZoneInfo(get_settings().default_timezone)).date()


# --- what cards give ------------------------------------------------------------------------------------------


def _live(user_id: int, on: date) -> list[ColumnElement[bool]]:
    """Conditions of a verified card of the user that has not expired on `on`."""
    return [TalentCard.user_id == user_id, TalentCard.status == CardStatus.verified,
            or_(TalentCard.valid_until.is_(None), TalentCard.valid_until >= on)]


def _best(session: Session, user_id: int, provider_region_code: str, on: date,
          kind: EntitlementKind) -> tuple[int, str] | None:
    """The highest value of `kind` any live card of the user gets in the region, with its scheme; several cards
    never add up."""
    rows = session.execute(
        select(TalentEntitlement.value, TalentEntitlement.scheme_code)
        .join(TalentCard, TalentCard.scheme_code == TalentEntitlement.scheme_code)
        .where(*_live(user_id, on), TalentEntitlement.provider_region_code == provider_region_code,
               TalentEntitlement.kind == kind)
    ).all()
    if not rows:
        return None
    # Ties go to the scheme code first in order, so the reason text does not depend on row order.
    value, scheme = min(rows, key=lambda r: (-r[0], r[1]))
    return int(value), str(scheme)


def fee_discount(session: Session, user_id: int, provider_region_code: str, on: date) -> tuple[int, str]:
    """The best fee discount (basis points) a verified card gets from providers of a region, and its reason."""
    best = _best(session, user_id, provider_region_code, on, EntitlementKind.fee_discount)
    if best is None or best[0] <= 0:
        return 0, ""
    return best[0], f"talent:{best[1]}"


def priority_days(session: Session, user_id: int, provider_region_code: str, on: date) -> int:
    """Extra days of booking horizon a verified card gets at providers of a region."""
    best = _best(session, user_id, provider_region_code, on, EntitlementKind.priority_window)
    return best[0] if best is not None else 0


def fast_track(session: Session, user_id: int, provider_region_code: str, on: date) -> bool:
    """Whether a verified card gets fast-track consultation from providers of a region."""
    return _best(session, user_id, provider_region_code, on, EntitlementKind.fast_track) is not None


def fast_tracked_orders(session: Session, orders: Sequence[ServiceOrder], on: date) -> set[int]:
    """The ids of those consultation orders whose user has fast track in the facility's region (needs each
    order's service loaded)."""
    consultations = [o for o in orders if o.service.kind == ServiceKind.consultation]
    if not consultations:
        return set()
    regions = {fid: region for fid, region in session.execute(
        select(Facility.id, Institution.region_code).join(Institution, Institution.id == Facility.institution_id)
        .where(Facility.id.in_({o.facility_id for o in consultations}))
    )}
    answers: dict[tuple[int, str], bool] = {}
    for o in consultations:
        key = (o.user_id, regions[o.facility_id])
        if key not in answers:
            answers[key] = fast_track(session, o.user_id, key[1], on)
    return {o.id for o in consultations if answers[(o.user_id, regions[o.facility_id])]}


# --- schemes and entitlements ---------------------------------------------------------------------------------


def list_schemes(session: Session) -> list[TalentCardScheme]:
    return list(session.scalars(select(TalentCardScheme).order_by(TalentCardScheme.region_code,
                                                                   TalentCardScheme.code)))


def entitlements_by_scheme(session: Session) -> dict[str, list[TalentEntitlement]]:
    """Every scheme's entitlements, by provider region then kind."""
    result: dict[str, list[TalentEntitlement]] = {}
    rows = session.scalars(select(TalentEntitlement).order_by(
        TalentEntitlement.scheme_code, TalentEntitlement.provider_region_code, TalentEntitlement.kind))
    for row in rows:
        result.setdefault(row.scheme_code, []).append(row)
    return result


def get_scheme(session: Session, code: str, field: str = "scheme_code") -> TalentCardScheme:
    scheme = session.get(TalentCardScheme, code.strip())
    if scheme is None:
        raise InvalidInput(f"Unknown talent card scheme {code!r}.", field=field, code="unknown_scheme")
    return scheme


def may_administer(actor: Actor | None, scheme: TalentCardScheme) -> bool:
    """Whether the actor acts for the scheme's issuing region (its authority or a platform admin)."""
    return roles.authorize(actor, Action.issue_vouchers, region_code=scheme.region_code)


def may_set_entitlements(actor: Actor | None, provider_region_code: str) -> bool:
    """Whether the actor decides what a region's providers grant card holders: that region's authority (or a
    platform admin), as with the vouchers its providers accept."""
    return roles.authorize(actor, Action.issue_vouchers, region_code=provider_region_code)


def administered_schemes(session: Session, actor: Actor) -> list[TalentCardScheme]:
    return [s for s in list_schemes(session) if may_administer(actor, s)]


def set_entitlement(session: Session, actor: Actor, scheme_code: str, provider_region_code: str,
                    kind: EntitlementKind | str, value: int) -> TalentEntitlement:
    """Add or change what the scheme's holders get from providers of a region; that region's authority decides
    what its providers recognise (as with vouchers), so one region cannot set the other's fees."""
    scheme = get_scheme(session, scheme_code)
    region = provider_region_code.strip().upper()
    if session.get(Region, region) is None:
        raise InvalidInput(f"Unknown region {provider_region_code!r}.", field="provider_region_code",
                           code="unknown_region")
    if not may_set_entitlements(actor, region):
        raise Forbidden(f"Only {region}'s authority decides what its providers grant card holders.",
                        field="provider_region_code")
    try:
        kind = EntitlementKind(kind)
    except ValueError:
        raise InvalidInput("kind is one of priority_window, fee_discount, fast_track.", field="kind",
                           code="invalid_choice") from None
    high = MAX_VALUE[kind]
    if not 0 <= value <= high:
        raise InvalidInput(f"value must be between 0 and {high}.", field="value", code="out_of_range",
                           min=0, max=high)
    row = session.scalar(select(TalentEntitlement).where(
        TalentEntitlement.scheme_code == scheme.code, TalentEntitlement.provider_region_code == region,
        TalentEntitlement.kind == kind).with_for_update())
    if row is None:
        row = TalentEntitlement(scheme_code=scheme.code, provider_region_code=region, kind=kind, value=value)
        try:
            with session.begin_nested():
                session.add(row)
                session.flush()
        except IntegrityError as exc:
            raise Conflict("Someone added this entitlement at the same moment; reload.", field="kind",
                           code="entitlement_exists") from exc
    else:
        row.value = value
        session.flush()
    return row


def remove_entitlement(session: Session, actor: Actor, entitlement_id: int) -> TalentEntitlement:
    """Remove one entitlement; one of a region the actor does not act for is NotFound."""
    row = session.get(TalentEntitlement, entitlement_id)
    if row is None or not may_set_entitlements(actor, row.provider_region_code):
        raise NotFound("No such entitlement.", field="entitlement_id")
    session.delete(row)
    session.flush()
    return row


# --- cards ----------------------------------------------------------------------------------------------------


def same_name(a: str, b: str) -> bool:
    """Names compared without case and spaces (陈 雨桐 = 陈雨桐, Emily  carter = Emily Carter)."""
    return "".join(a.split()).casefold() == "".join(b.split()).casefold()


def _clean_text(value: str, field: str, limit: int, *, required: bool = True) -> str:
    value = value.strip()
    if required and not value:
        raise InvalidInput(f"{field} is required.", field=field, code="missing_field")
    if len(value) > limit:
        raise InvalidInput(f"{field} is at most {limit} characters.", field=field, code="too_long", max=limit)
    return value


def submit_card(session: Session, actor: Actor, scheme_code: str, card_number: str, holder_name: str,
                valid_until: date | None, *, today: date) -> TalentCard:
    """Submit a card for verification (pending). Resubmitting one's own rejected card reopens it."""
    scheme = get_scheme(session, scheme_code)
    number = card_number.strip().upper()
    if not number:
        raise InvalidInput("card_number is required.", field="card_number", code="missing_field")
    if not _CARD_NUMBER.match(number):
        raise InvalidInput("A card number is 1 to 40 letters, digits and hyphens.", field="card_number",
                           code="invalid_card_number")
    holder = _clean_text(holder_name, "holder_name", 200)
    if valid_until is not None and valid_until < today:
        raise InvalidInput("This card has expired.", field="valid_until", code="card_expired")
    existing = session.scalar(select(TalentCard).where(TalentCard.scheme_code == scheme.code,
                                                       TalentCard.card_number == number).with_for_update())
    if existing is not None:
        if existing.user_id == actor.user_id and existing.status == CardStatus.rejected:
            existing.holder_name, existing.valid_until = holder, valid_until
            existing.status, existing.submitted_at = CardStatus.pending, utcnow()
            existing.decided_at, existing.decided_by_id, existing.note = None, None, ""
            session.flush()
            return existing
        raise Conflict("This card number is already registered.", field="card_number", code="card_number_taken")
    card = TalentCard(user_id=actor.user_id, scheme_code=scheme.code, card_number=number, holder_name=holder,
                      valid_until=valid_until, status=CardStatus.pending, note="")
    try:
        # The unique key decides between two people submitting the same number at once.
        with session.begin_nested():
            session.add(card)
            session.flush()
    except IntegrityError as exc:
        raise Conflict("This card number is already registered.", field="card_number",
                       code="card_number_taken") from exc
    return card


def my_cards(session: Session, actor: Actor) -> list[TalentCard]:
    return list(session.scalars(select(TalentCard).where(TalentCard.user_id == actor.user_id)
                                .order_by(TalentCard.submitted_at.desc(), TalentCard.id.desc())))


@dataclass(frozen=True)
class QueueRow:
    """A card as the authority sees it, with its holder's account name and whether the names match."""

    card: TalentCard
    scheme: TalentCardScheme
    user_name: str
    user_email: str
    name_matches: bool


def authority_cards(session: Session, actor: Actor, status: CardStatus | None = CardStatus.pending,
                    limit: int = 200) -> list[QueueRow]:
    """Cards of the schemes the actor administers, oldest first (the queue works from the front)."""
    roles.require_some(actor, Action.issue_vouchers)
    schemes = {s.code: s for s in administered_schemes(session, actor)}
    if not schemes:
        return []
    stmt = (select(TalentCard, User.name, User.email).join(User, User.id == TalentCard.user_id)
            .where(TalentCard.scheme_code.in_(schemes)).order_by(TalentCard.submitted_at, TalentCard.id)
            .limit(limit))
    if status is not None:
        stmt = stmt.where(TalentCard.status == status)
    return [QueueRow(card, schemes[card.scheme_code], name, email, same_name(card.holder_name, name))
            for card, name, email in session.execute(stmt)]


def _card_for_authority(session: Session, actor: Actor, card_id: int) -> tuple[TalentCard, TalentCardScheme]:
    roles.require_some(actor, Action.issue_vouchers)
    card = session.get(TalentCard, card_id)
    scheme = session.get(TalentCardScheme, card.scheme_code) if card is not None else None
    # Another region's cards are not the caller's to see: 404, as if absent.
    if card is None or scheme is None or not may_administer(actor, scheme):
        raise NotFound("No such talent card.", field="card_id")
    return card, scheme


def _decide(session: Session, actor: Actor, card: TalentCard, expected: CardStatus, to: CardStatus,
            note: str) -> TalentCard:
    if card.status != expected:
        raise Conflict(f"The card is {card.status.value}, not {expected.value}.", field="status",
                       code="card_not_" + expected.value, status=card.status.value)
    # Conditional on the status, so two authorities deciding at once cannot both win.
    result = session.execute(
        update(TalentCard).where(TalentCard.id == card.id, TalentCard.status == expected)
        .values(status=to, decided_at=utcnow(), decided_by_id=actor.user_id, note=note)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.expire(card)
        raise Conflict("Someone else decided on this card at the same moment; reload.", field="status",
                       code="card_changed")
    session.refresh(card)
    return card


def verify_card(session: Session, actor: Actor, card_id: int, *, confirm_holder: bool = False, note: str = "",
                today: date) -> TalentCard:
    """Verify a pending card; when the holder name differs from the account's, the verifier must confirm it."""
    card, _scheme = _card_for_authority(session, actor, card_id)
    note = _clean_text(note, "note", NOTE_MAX, required=False)
    if card.status == CardStatus.pending:
        user = session.get(User, card.user_id)
        assert user is not None  # the card's foreign key guarantees it
        if not same_name(card.holder_name, user.name) and not confirm_holder:
            raise InvalidInput("The holder name differs from the account's name; confirm that they are the same "
                               "person.", field="confirm_holder", code="holder_name_mismatch",
                               holder_name=card.holder_name, user_name=user.name)
        if card.valid_until is not None and card.valid_until < today:
            raise InvalidInput("This card has expired.", field="valid_until", code="card_expired")
    return _decide(session, actor, card, CardStatus.pending, CardStatus.verified, note)


def reject_card(session: Session, actor: Actor, card_id: int, note: str) -> TalentCard:
    """Reject a pending card, saying why (the holder sees the note)."""
    card, _scheme = _card_for_authority(session, actor, card_id)
    note = _clean_text(note, "note", NOTE_MAX)
    return _decide(session, actor, card, CardStatus.pending, CardStatus.rejected, note)


def revoke_card(session: Session, actor: Actor, card_id: int, note: str) -> TalentCard:
    """Revoke a verified card, saying why; its entitlements end at once."""
    card, _scheme = _card_for_authority(session, actor, card_id)
    note = _clean_text(note, "note", NOTE_MAX)
    return _decide(session, actor, card, CardStatus.verified, CardStatus.revoked, note)


# --- demo data ------------------------------------------------------------------------------------------------

# (code, issuing region, Chinese name, English name)
DEMO_SCHEMES: tuple[tuple[str, str, str, str], ...] = (
    ("tianfu", "SC", "天府人才卡", "Tianfu Talent Card"),
    ("cq_talent", "CQ", "重庆英才服务卡", "Chongqing Talent Service Card"),
)
# What every scheme's holders get in every region: mutual recognition is symmetric in the demo.
DEMO_ENTITLEMENTS: tuple[tuple[EntitlementKind, int], ...] = (
    (EntitlementKind.priority_window, 30),
    (EntitlementKind.fee_discount, 1000),
    (EntitlementKind.fast_track, 0),
)
# (holder e-mail, scheme, card number, verifier e-mail)
DEMO_CARDS: tuple[tuple[str, str, str, str], ...] = (
    ("liu.zimo@xlut.example.cn", "tianfu", "TF-2025-018842", "yang.fan@sc-stco.example.cn"),
)
DEMO_CARD_VALID_UNTIL = date(2029, 12, 31)


def _ensure_schemes(session: Session, regions: Iterable[str]) -> None:
    for code, region, name_zh, name_en in DEMO_SCHEMES:
        if session.get(TalentCardScheme, code) is None:
            session.add(TalentCardScheme(code=code, region_code=region, name_zh=name_zh, name_en=name_en))
    session.flush()
    for code, *_names in DEMO_SCHEMES:
        for provider in regions:
            for kind, value in DEMO_ENTITLEMENTS:
                exists = session.scalar(select(TalentEntitlement.id).where(
                    TalentEntitlement.scheme_code == code, TalentEntitlement.provider_region_code == provider,
                    TalentEntitlement.kind == kind))
                if exists is None:
                    session.add(TalentEntitlement(scheme_code=code, provider_region_code=provider, kind=kind,
                                                  value=value))
    session.flush()


def seed_talent(session: Session) -> int:
    """The demo schemes, their symmetric entitlements and a verified card of a demo user; returns the cards made."""
    regions = sorted({r for _c, r, _z, _e in DEMO_SCHEMES} & set(session.scalars(select(Region.code))))
    _ensure_schemes(session, regions)
    made = 0
    for email, scheme, number, verifier_email in DEMO_CARDS:
        holder = session.scalar(select(User).where(User.email == email))
        verifier = session.scalar(select(User).where(User.email == verifier_email))
        if holder is None or verifier is None or session.scalar(
                select(TalentCard.id).where(TalentCard.scheme_code == scheme, TalentCard.card_number == number)):
            continue
        session.add(TalentCard(user_id=holder.id, scheme_code=scheme, card_number=number, holder_name=holder.name,
                               valid_until=DEMO_CARD_VALID_UNTIL, status=CardStatus.verified, decided_at=utcnow(),
                               decided_by_id=verifier.id, note=""))
        made += 1
    session.flush()
    return made
