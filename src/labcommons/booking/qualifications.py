"""Training records: who may use an instrument (or every instrument of a category) and at which level.

An instrument qualification is granted by staff allowed to approve users of the instrument's facility. A category
qualification reaches the instruments of every institution, so only platform administrators grant or revoke it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.booking.models import Qualification, QualificationLevel
from labcommons.booking.policy import category_codes, facility_ref
from labcommons.catalog.models import Category, Instrument
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.identity.models import User
from labcommons.identity.roles import Action, require_some

MAX_NOTE_LENGTH = 1000


@dataclass(frozen=True)
class QualificationRow:
    qualification: Qualification
    email: str
    name: str

    def live(self, now: datetime) -> bool:
        q = self.qualification
        return q.revoked_at is None and (q.expires_at is None or q.expires_at > now)


def _instrument(session: Session, instrument_id: int) -> Instrument:
    instrument = session.get(Instrument, instrument_id)
    if instrument is None:
        raise NotFound(f"Instrument {instrument_id} does not exist.", field="instrument_id")
    return instrument


def _require_for(session: Session, actor: Actor, q: Qualification) -> None:
    if q.instrument_id is not None:
        instrument = _instrument(session, q.instrument_id)
        roles.require(actor, Action.approve_facility_users, facility=facility_ref(instrument))
    elif not roles.is_platform_admin(actor):
        # An institution's administrator would otherwise qualify users on other institutions' instruments.
        raise Forbidden("Only platform administrators manage category qualifications.")


def grant(
    session: Session, actor: Actor, user_email: str, *, instrument_id: int | None = None,
    category_code: str | None = None, level: QualificationLevel | str = QualificationLevel.independent,
    expires_at: datetime | None = None, note: str = "", now: datetime | None = None,
) -> Qualification:
    """Record that a user is trained; a live qualification of theirs for the same target is replaced."""
    now = now or utcnow()
    require_some(actor, Action.approve_facility_users)
    if (instrument_id is None) == (category_code is None):
        raise InvalidInput("Give an instrument or a category, not both.", field="instrument_id",
                           code="one_target")
    try:
        level = QualificationLevel(level)
    except ValueError:
        raise InvalidInput("level is assisted or independent.", field="level", code="invalid_choice") from None
    if expires_at is not None and expires_at <= now:
        raise InvalidInput("The expiry must be in the future.", field="expires_at", code="expires_in_past")
    if len(note) > MAX_NOTE_LENGTH:
        raise InvalidInput(f"The note is limited to {MAX_NOTE_LENGTH} characters.", field="note", code="too_long")
    if category_code is not None and session.get(Category, category_code) is None:
        raise NotFound(f"No category {category_code!r}.", field="category_code")
    q = Qualification(instrument_id=instrument_id, category_code=category_code, level=level,
                      granted_by_id=actor.user_id, granted_at=now, expires_at=expires_at, note=note.strip())
    _require_for(session, actor, q)
    try:
        user = identity.find_user(session, user_email)
    except NotFound:
        raise NotFound(f"No user with e-mail {user_email}.", field="user_email") from None
    q.user_id = user.id
    target = Qualification.instrument_id == instrument_id if instrument_id is not None \
        else Qualification.category_code == category_code
    for old in session.scalars(select(Qualification).where(
        Qualification.user_id == user.id, target, Qualification.revoked_at.is_(None)
    )):
        old.revoked_at = now
    session.add(q)
    session.flush()
    return q


def revoke(session: Session, actor: Actor, qualification_id: int, *, now: datetime | None = None) -> Qualification:
    """Withdraw a qualification; one the actor may not manage is reported as missing."""
    require_some(actor, Action.approve_facility_users)
    q = session.get(Qualification, qualification_id)
    if q is None:
        raise NotFound(f"Qualification {qualification_id} does not exist.", field="qualification_id")
    try:
        _require_for(session, actor, q)
    except Forbidden:
        raise NotFound(f"Qualification {qualification_id} does not exist.", field="qualification_id") from None
    if q.revoked_at is not None:
        raise Conflict("The qualification is already revoked.", field="qualification_id", code="already_revoked")
    q.revoked_at = now or utcnow()
    session.flush()
    return q


def list_for_instrument(session: Session, actor: Actor, instrument_id: int) -> list[QualificationRow]:
    """Qualifications that reach an instrument (its own and its categories'), newest first, revoked ones too."""
    instrument = _instrument(session, instrument_id)
    roles.require(actor, Action.approve_facility_users, facility=facility_ref(instrument))
    rows = session.execute(
        select(Qualification, User.email, User.name)
        .join(User, User.id == Qualification.user_id)
        .where(or_(Qualification.instrument_id == instrument.id,
                   Qualification.category_code.in_(category_codes(instrument.category_code))))
        .order_by(Qualification.granted_at.desc(), Qualification.id.desc())
    ).all()
    return [QualificationRow(q, email, name) for q, email, name in rows]
