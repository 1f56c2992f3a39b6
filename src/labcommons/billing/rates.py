"""Rate cards and facility billing rules: what a payer of a category pays for an instrument or a service on a
day, and how instrument time is measured and rounded."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.models import BillingPolicy, ChargeBasis, PayerCategory, Rate, RateUnit, Rounding
from labcommons.catalog.models import Facility, Institution, InstitutionKind, Instrument, Service
from labcommons.config import get_settings
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action

# A rate above a million yuan per unit is a typo, not a price.
MAX_RATE_FEN = 100_000_000


def payer_category(payer: Institution, provider_institution_id: int, provider_region_code: str) -> PayerCategory:
    """The rate-card column a payer institution falls in at a provider: own, company, same or other region."""
    if payer.id == provider_institution_id:
        return PayerCategory.internal
    if payer.kind == InstitutionKind.company:
        return PayerCategory.industry
    if payer.region_code == provider_region_code:
        return PayerCategory.academic_region
    return PayerCategory.academic_other


def target_key(*, instrument_id: int | None = None, service_id: int | None = None) -> str:
    """The rate's target as one string: "instrument:12" or "service:5"."""
    if (instrument_id is None) == (service_id is None):
        raise InvalidInput("Name exactly one instrument or one service.", field="instrument_id",
                           code="one_target")
    return f"instrument:{instrument_id}" if instrument_id is not None else f"service:{service_id}"


def policy_for(session: Session, facility_id: int) -> BillingPolicy | None:
    """The facility's billing rules; None when the facility charges nothing."""
    return session.get(BillingPolicy, facility_id)


def get_facility(session: Session, facility_id: int) -> Facility:
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility_id")
    return facility


def _require_rates(actor: Actor | None, session: Session, facility_id: int) -> None:
    if actor is None:  # the platform itself (demo seeding, CLI as operator)
        return
    facility = get_facility(session, facility_id)
    roles.require(actor, Action.edit_facility_rates, facility=roles.FacilityRef.of(facility))


def save_policy(session: Session, actor: Actor | None, facility_id: int, **fields: Any) -> BillingPolicy:
    """Create or change a facility's billing rules (basis, increment, rounding, no-show, account required)."""
    _require_rates(actor, session, facility_id)
    policy = session.get(BillingPolicy, facility_id) or BillingPolicy(facility_id=facility_id)
    for name, value in fields.items():
        if value is None:
            continue
        if name == "basis":
            try:
                value = ChargeBasis(value)
            except ValueError:
                raise InvalidInput("The basis must be booked, actual or greater.", field="basis",
                                   code="invalid_choice") from None
        elif name == "rounding":
            try:
                value = Rounding(value)
            except ValueError:
                raise InvalidInput("Rounding must be up or nearest.", field="rounding", code="invalid_choice") from None
        elif name == "increment_minutes":
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 240:
                raise InvalidInput("The increment must be 1 to 240 minutes.", field=name, code="out_of_range")
        elif name in ("charge_no_show", "require_account"):
            if not isinstance(value, bool):
                raise InvalidInput("Give true or false.", field=name, code="invalid_choice")
        else:
            raise InvalidInput(f"Unknown billing rule {name!r}.", field=name, code="unknown_field")
        setattr(policy, name, value)
    session.add(policy)
    session.flush()
    return policy


def _target(session: Session, instrument_id: int | None, service_id: int | None) -> tuple[str, int]:
    """The rate target's key and facility; on PostgreSQL its row is locked for the rest of the transaction, so two
    managers adding prices to one target at once take turns and each sees the other's row (no two open rates)."""
    key = target_key(instrument_id=instrument_id, service_id=service_id)
    lock = session.get_bind().dialect.name == "postgresql"
    if instrument_id is not None:
        query = select(Instrument).where(Instrument.id == instrument_id)
        instrument = session.scalars(query.with_for_update() if lock else query).first()
        if instrument is None:
            raise NotFound(f"Instrument {instrument_id} does not exist.", field="instrument_id")
        return key, instrument.facility_id
    stmt = select(Service).where(Service.id == service_id)
    service = session.scalars(stmt.with_for_update() if lock else stmt).first()
    if service is None:
        raise NotFound(f"Service {service_id} does not exist.", field="service_id")
    return key, service.facility_id


def set_rate(
    session: Session,
    actor: Actor | None,
    *,
    instrument_id: int | None = None,
    service_id: int | None = None,
    category: PayerCategory | str,
    assisted: bool = False,
    unit: RateUnit | str,
    amount_fen: int,
    effective_from: date,
) -> Rate:
    """Add a price from a day on; the rate it follows ends that day, one already set later stays and bounds it.

    Prices of past days are never rewritten (charges point at them): a start before today is refused.
    """
    key, facility_id = _target(session, instrument_id, service_id)
    _require_rates(actor, session, facility_id)
    try:
        category = PayerCategory(category)
    except ValueError:
        raise InvalidInput("Unknown payer category.", field="category", code="invalid_choice",
                           allowed=[c.value for c in PayerCategory]) from None
    try:
        unit = RateUnit(unit)
    except ValueError:
        raise InvalidInput("The unit must be hour, sample or project.", field="unit", code="invalid_choice") from None
    if instrument_id is not None and unit == RateUnit.project:
        raise InvalidInput("Instrument time is charged per hour or per sample.", field="unit", code="invalid_choice")
    if isinstance(amount_fen, bool) or not isinstance(amount_fen, int) or not 0 <= amount_fen <= MAX_RATE_FEN:
        raise InvalidInput("The price must be 0 to 1,000,000 yuan, in whole fen.", field="amount_fen",
                           code="out_of_range")
    # Charges already posted at the old price must keep meaning what they said; a day's slack lets a manager whose
    # calendar is behind the platform's zone still say "from today".
    earliest = datetime.now(ZoneInfo(get_settings().default_timezone)).date() - timedelta(days=1)
    if actor is not None and effective_from < earliest:
        raise InvalidInput("A price cannot start in the past: charges already use the old one.",
                           field="effective_from", code="in_past")
    same = and_(Rate.target_key == key, Rate.category == category, Rate.assisted == assisted)
    if session.scalar(select(Rate.id).where(same, Rate.effective_from == effective_from)) is not None:
        raise Conflict("A price for this category already starts that day.", field="effective_from",
                       code="rate_exists")
    previous = session.scalars(
        select(Rate).where(same, Rate.effective_from < effective_from,
                           or_(Rate.effective_to.is_(None), Rate.effective_to > effective_from))
    ).first()
    following = session.scalar(
        select(Rate.effective_from).where(same, Rate.effective_from > effective_from)
        .order_by(Rate.effective_from).limit(1)
    )
    if previous is not None:
        previous.effective_to = effective_from
    rate = Rate(
        facility_id=facility_id, instrument_id=instrument_id, service_id=service_id, target_key=key,
        category=category, assisted=assisted, unit=unit, amount_fen=amount_fen, effective_from=effective_from,
        effective_to=following, created_by_id=actor.user_id if actor else None,
    )
    session.add(rate)
    session.flush()
    return rate


def rate_on(session: Session, key: str, category: PayerCategory, assisted: bool, on: date) -> Rate | None:
    """The price in force on a day; an assisted price falls back to the unassisted one and vice versa."""
    def find(assisted_: bool) -> Rate | None:
        return session.scalars(
            select(Rate).where(
                Rate.target_key == key, Rate.category == category, Rate.assisted == assisted_,
                Rate.effective_from <= on, or_(Rate.effective_to.is_(None), Rate.effective_to > on),
            )
        ).first()

    return find(assisted) or find(not assisted)


def rates_in_force(session: Session, keys: Iterable[str], on: date) -> dict[str, list[Rate]]:
    """Every rate in force on a day for several targets at once, by target key (one query, for result lists)."""
    out: dict[str, list[Rate]] = {}
    wanted = sorted(set(keys))
    if not wanted:
        return out
    for rate in session.scalars(
        select(Rate).where(Rate.target_key.in_(wanted), Rate.effective_from <= on,
                           or_(Rate.effective_to.is_(None), Rate.effective_to > on))
    ):
        out.setdefault(rate.target_key, []).append(rate)
    return out


def pick_rate(rates: Sequence[Rate], category: PayerCategory, assisted: bool) -> Rate | None:
    """From rates in force, the one for a payer category, as `rate_on` chooses it."""
    for wanted in (assisted, not assisted):
        for rate in rates:
            if rate.category == category and rate.assisted == wanted:
                return rate
    return None


def list_rates(session: Session, *, facility_id: int | None = None, key: str | None = None,
               on: date | None = None) -> Sequence[Rate]:
    """Rates of a facility or of one target, optionally only those in force on a day."""
    stmt = select(Rate)
    if facility_id is not None:
        stmt = stmt.where(Rate.facility_id == facility_id)
    if key is not None:
        stmt = stmt.where(Rate.target_key == key)
    if on is not None:
        stmt = stmt.where(Rate.effective_from <= on, or_(Rate.effective_to.is_(None), Rate.effective_to > on))
    return session.scalars(stmt.order_by(Rate.target_key, Rate.category, Rate.assisted, Rate.effective_from)).all()


def billed_minutes(policy: BillingPolicy, *, booked: int, actual: int | None, no_show: bool) -> int:
    """Minutes to charge for one booking: by the facility's basis, rounded to its increment.

    A no-show pays its booked time when the policy says so, else nothing; without a check-in an "actual" basis
    falls back to the booked time (the user held the instrument all the same).
    """
    if no_show:
        minutes = booked if policy.charge_no_show else 0
    elif policy.basis == ChargeBasis.booked or actual is None:
        minutes = booked
    elif policy.basis == ChargeBasis.actual:
        minutes = actual
    else:
        minutes = max(booked, actual)
    step = policy.increment_minutes
    if policy.rounding == Rounding.up:
        return -(-minutes // step) * step
    return (minutes + step // 2) // step * step


def hourly_amount(rate_fen: int, minutes: int) -> int:
    """Price of `minutes` at `rate_fen` per hour, rounded half up to the fen."""
    return (rate_fen * minutes + 30) // 60


def discount_amount(list_fen: int, basis_points: int) -> int:
    """A discount of `basis_points` (1/100 %) of an amount, rounded half up to the fen."""
    return (list_fen * basis_points + 5000) // 10000
