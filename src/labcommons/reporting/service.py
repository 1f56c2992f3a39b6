"""Open-sharing metrics for a scope (platform, region, institution, facility) and a period of local days.

Booking metrics come from the pre-aggregated tables (reporting/models.py, kept current by reporting/aggregate.py);
orders, revenue and ratings from their own tables, which are small enough to sum directly. docs/metrics.md defines
every figure; this module is that definition in SQL.
"""

from __future__ import annotations

import enum
import heapq
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import String, case, distinct, func, literal, or_, select, true, union_all
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.billing.models import Charge
from labcommons.booking.models import Booking, BookingKind, BookingPolicy
from labcommons.booking.policy import WEEKDAYS, parse_hours
from labcommons.catalog.models import Facility, Institution, Instrument, InstrumentStatus, Region
from labcommons.db import MAX_ID
from labcommons.errors import InvalidInput, NotFound
from labcommons.identity.models import User
from labcommons.identity.roles import PERMISSIONS, Action, FacilityRef, authorize, require
from labcommons.orders.models import OrderEvent, OrderRating, OrderStatus, ServiceOrder
from labcommons.reporting import aggregate
from labcommons.reporting.models import (
    HOUR_COLUMNS,
    LEAD_BUCKET_HOURS,
    LEAD_COLUMNS,
    StatFacilityDay,
    StatInstrumentDay,
    StatInstrumentMonth,
    StatRegionDay,
)

MAX_PERIOD_DAYS = 3 * 366 + 1
# Periods and report years lie in these years (also keeps date arithmetic far from date.min and date.max).
FIRST_YEAR, LAST_YEAR = 2000, 2100
TOP_N = 10


class ScopeKind(enum.StrEnum):
    platform = "platform"
    region = "region"
    institution = "institution"
    facility = "facility"


# What a scope is broken down into in its breakdown table.
CHILD_KIND = {
    ScopeKind.platform: ScopeKind.region,
    ScopeKind.region: ScopeKind.institution,
    ScopeKind.institution: ScopeKind.facility,
    ScopeKind.facility: None,
}


@dataclass(frozen=True)
class Scope:
    """What the figures cover: the whole platform, or one region, institution or facility."""

    kind: ScopeKind
    key: str = ""  # region code, institution id or facility id as text; "" for the platform
    name_zh: str = ""
    name_en: str = ""
    region_code: str | None = None

    @property
    def token(self) -> str:
        """The scope as the API and pages write it: `platform`, `region:CQ`, `institution:3`, `facility:7`."""
        return self.kind.value if self.kind is ScopeKind.platform else f"{self.kind.value}:{self.key}"

    def name(self, locale: str) -> str:
        return self.name_zh if locale.startswith("zh") else self.name_en


@dataclass(frozen=True)
class Period:
    """Local days first … last, both included."""

    first: date
    last: date

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1


# --------------------------------------------------------------------------------------------- scopes and periods


def parse_period(first: str | date | None, last: str | date | None, *, today: date) -> Period:
    """A period from ISO dates; the default is the calendar year so far (1 January … today)."""
    start = _as_date(first, "from") if first not in (None, "") else date(today.year, 1, 1)
    end = _as_date(last, "to") if last not in (None, "") else today
    for value, name in ((start, "from"), (end, "to")):
        if not FIRST_YEAR <= value.year <= LAST_YEAR:
            raise InvalidInput(f"Dates must lie between {FIRST_YEAR} and {LAST_YEAR}.", field=name)
    if end < start:
        raise InvalidInput("The period ends before it starts.", field="to")
    if (end - start).days + 1 > MAX_PERIOD_DAYS:
        raise InvalidInput(f"A period may cover at most {MAX_PERIOD_DAYS} days.", field="to")
    return Period(start, end)


def year_period(year: int) -> Period:
    """The calendar year `year`."""
    if not FIRST_YEAR <= year <= LAST_YEAR:
        raise InvalidInput(f"The year must lie between {FIRST_YEAR} and {LAST_YEAR}.", field="year")
    return Period(date(year, 1, 1), date(year, 12, 31))


def _as_date(value: str | date | None, name: str) -> date:
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value))
    except ValueError:
        raise InvalidInput("Give a date as YYYY-MM-DD.", field=name) from None


def parse_scope_token(token: str | None) -> tuple[ScopeKind, str]:
    """Split `region:CQ` into its kind and key."""
    raw = (token or "").strip()
    kind_text, _, key = raw.partition(":")
    try:
        kind = ScopeKind(kind_text)
    except ValueError:
        raise InvalidInput("A scope is platform, region:CODE, institution:ID or facility:ID.", field="scope") from None
    if kind is ScopeKind.platform:
        return kind, ""
    # isascii: str.isdigit() also accepts digits such as "²" that int() refuses.
    if not key or (kind is not ScopeKind.region and not (key.isascii() and key.isdigit())) or len(key) > 20:
        raise InvalidInput("A scope is platform, region:CODE, institution:ID or facility:ID.", field="scope")
    return kind, key


def resolve_scope(session: Session, actor: Actor | None, token: str | None) -> Scope:
    """The scope named by `token`, if the actor may read its statistics (Forbidden otherwise, NotFound if unknown)."""
    kind, key = parse_scope_token(token)
    if kind is ScopeKind.platform:
        require(actor, Action.view_all_statistics)
        return Scope(kind, "", "全平台", "Whole platform", None)
    if kind is ScopeKind.region:
        region = session.get(Region, key)
        if region is None:
            raise NotFound("No such region.", field="scope")
        require(actor, Action.view_region_statistics, region_code=region.code)
        return Scope(kind, region.code, region.name_zh, region.name_en, region.code)
    if kind is ScopeKind.institution:
        institution = session.get(Institution, _scope_id(key))
        if institution is None:
            raise NotFound("No such institution.", field="scope")
        if not authorize(actor, Action.view_region_statistics, region_code=institution.region_code):
            require(actor, Action.view_institution_statistics, institution_id=institution.id)
        return Scope(kind, str(institution.id), institution.name_zh, institution.name_en, institution.region_code)
    facility = session.get(Facility, _scope_id(key))
    if facility is None:
        raise NotFound("No such facility.", field="scope")
    institution = session.get(Institution, facility.institution_id)
    region_code = institution.region_code if institution else None
    if not authorize(actor, Action.view_region_statistics, region_code=region_code):
        require(actor, Action.view_facility_statistics, facility=FacilityRef.of(facility))
    return Scope(kind, str(facility.id), facility.name_zh, facility.name_en, region_code)


def _scope_id(key: str) -> int:
    # An id beyond the id range names nothing; PostgreSQL would fail on it ("integer out of range"), not miss.
    value = int(key)
    return value if value <= MAX_ID else 0


STATISTICS_ACTIONS = (Action.view_facility_statistics, Action.view_institution_statistics,
                      Action.view_region_statistics, Action.view_all_statistics)


_STATISTICS_ROLES = frozenset(role for action in STATISTICS_ACTIONS for role in PERMISSIONS[action].roles)


def reads_statistics(actor: Actor | None) -> bool:
    """Whether the actor holds a role that reads some scope's statistics."""
    return actor is not None and any(g.role in _STATISTICS_ROLES for g in actor.grants)


def require_statistics_role(actor: Actor | None) -> Actor:
    """The actor, if they hold some role that reads statistics (a cheap first gate before the scope is known)."""
    from labcommons.errors import Forbidden, Unauthenticated

    if actor is None:
        raise Unauthenticated("Sign in to read statistics.")
    if not reads_statistics(actor):
        raise Forbidden("You may not read statistics (no facility, institution, region or platform role).",
                        action=Action.view_facility_statistics.value)
    return actor


def visible_scopes(session: Session, actor: Actor | None) -> list[Scope]:
    """The scopes whose dashboards the actor may open, widest first (empty for someone with none)."""
    if actor is None:
        return []
    scopes: list[Scope] = []
    if authorize(actor, Action.view_all_statistics):
        scopes.append(Scope(ScopeKind.platform, "", "全平台", "Whole platform"))
        regions = list(session.scalars(select(Region).order_by(Region.code)))
    else:
        codes = {g.region_code for g in actor.grants if g.region_code and g.role == "region_authority"}
        regions = list(session.scalars(select(Region).where(Region.code.in_(codes)).order_by(Region.code)))
    scopes += [Scope(ScopeKind.region, r.code, r.name_zh, r.name_en, r.code) for r in regions]
    institution_ids = {g.institution_id for g in actor.grants if g.role == "institution_admin" and g.institution_id}
    if institution_ids:
        for inst in session.scalars(select(Institution).where(Institution.id.in_(institution_ids))
                                    .order_by(Institution.id)):
            scopes.append(Scope(ScopeKind.institution, str(inst.id), inst.name_zh, inst.name_en, inst.region_code))
    facility_ids = {g.facility_id for g in actor.grants
                    if g.role in ("facility_staff", "facility_manager") and g.facility_id}
    if institution_ids:
        facility_ids |= set(session.scalars(select(Facility.id).where(Facility.institution_id.in_(institution_ids))))
    if facility_ids:
        rows = session.execute(
            select(Facility, Institution.region_code).join(Institution, Institution.id == Facility.institution_id)
            .where(Facility.id.in_(facility_ids)).order_by(Facility.id))
        for fac, region_code in rows:
            scopes.append(Scope(ScopeKind.facility, str(fac.id), fac.name_zh, fac.name_en, region_code))
    return scopes


def _filter(stmt: Any, scope: Scope, region_col: Any, institution_col: Any, facility_col: Any, *,
            indexed: bool = True) -> Any:
    if not indexed:
        region_col, institution_col, facility_col = (_unindexed(c) for c in (region_col, institution_col,
                                                                             facility_col))
    if scope.kind is ScopeKind.region:
        return stmt.where(region_col == scope.key)
    if scope.kind is ScopeKind.institution:
        return stmt.where(institution_col == int(scope.key))
    if scope.kind is ScopeKind.facility:
        return stmt.where(facility_col == int(scope.key))
    return stmt


def _unindexed(column: Any) -> Any:
    """The column's value as an expression no index serves (`col || ''`, `col + 0`): it keeps SQLite from reading
    through the scope's index when another one (the primary key for a few ids, the partial maintenance index, a
    narrow covering index) or a straight scan finds the rows far cheaper. The value is the same."""
    return column.concat("") if isinstance(column.type, String) else column + 0


def _inst_filter(stmt: Any, scope: Scope, *, indexed: bool = True) -> Any:
    return _filter(stmt, scope, StatInstrumentDay.region_code, StatInstrumentDay.institution_id,
                   StatInstrumentDay.facility_id, indexed=indexed)


def _fac_filter(stmt: Any, scope: Scope) -> Any:
    return _filter(stmt, scope, StatFacilityDay.region_code, StatFacilityDay.institution_id,
                   StatFacilityDay.facility_id)


def _instrument_filter(stmt: Any, scope: Scope, *, indexed: bool = True) -> Any:
    return _filter(stmt, scope, Instrument.region_code, Instrument.institution_id, Instrument.facility_id,
                   indexed=indexed)


# --------------------------------------------------------------------------------------------- results


@dataclass
class Totals:
    """The headline figures of a scope and period (minutes and fen as integers; rates as fractions or None)."""

    instruments: int = 0
    bookings: int = 0
    booked_min: int = 0
    effective_min: int = 0
    ext_institution_min: int = 0
    ext_region_min: int = 0
    maintenance_min: int = 0
    available_min: int = 0
    utilisation: float | None = None
    external_share: float | None = None
    ext_region_share: float | None = None
    users: int = 0
    institutions: int = 0
    started_bookings: int = 0
    no_shows: int = 0
    no_show_rate: float | None = None
    median_lead_hours: float | None = None
    orders: int = 0
    orders_completed: int = 0
    median_turnaround_days: float | None = None
    revenue_fen: int = 0
    external_revenue_fen: int = 0
    rating_average: float | None = None
    ratings: int = 0


@dataclass
class SeriesPoint:
    start: date
    booked_min: int
    effective_min: int
    available_min: int
    utilisation: float | None


@dataclass
class InstrumentRow:
    instrument_id: int
    code: str
    name_zh: str
    name_en: str
    facility_id: int
    region_code: str
    bookings: int
    booked_min: int
    effective_min: int
    ext_institution_min: int
    ext_region_min: int
    available_min: int
    utilisation: float | None
    no_shows: int
    # A retired instrument is listed only for a period in which it had bookings; it is open for none of it.
    retired: bool = False


@dataclass
class BreakdownRow:
    kind: str
    key: str
    name_zh: str
    name_en: str
    instruments: int
    booked_min: int
    effective_min: int
    ext_institution_min: int
    ext_region_min: int
    available_min: int
    utilisation: float | None
    revenue_fen: int


@dataclass
class Flow:
    provider_region: str
    user_region: str
    booked_min: int
    effective_min: int
    revenue_fen: int


@dataclass
class Dashboard:
    """Everything a dashboard shows for one scope and period."""

    scope: Scope
    period: Period
    today: date
    totals: Totals
    granularity: str  # day, week or month
    series: list[SeriesPoint]
    heatmap: list[list[int]]  # [weekday 0=Mon][hour] booked minutes
    top: list[InstrumentRow]
    idle: list[InstrumentRow]
    idle_count: int
    flows: list[Flow]
    turnaround_days: list[float]  # each completed order's turnaround, for the distribution chart
    breakdown: list[BreakdownRow] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["scope"] = {"token": self.scope.token, "kind": self.scope.kind.value, "key": self.scope.key,
                         "name_zh": self.scope.name_zh, "name_en": self.scope.name_en}
        return json.loads(json.dumps(data, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, date | datetime):
        return value.isoformat()
    raise TypeError(type(value).__name__)


def _ratio(part: int | float, whole: int | float) -> float | None:
    return round(part / whole, 4) if whole else None


# --------------------------------------------------------------------------------------------- availability


def _open_minutes_by_weekday(raw: str | None) -> tuple[int, ...]:
    """Minutes an instrument is open on each weekday (Monday first); no opening hours means open all day."""
    hours = parse_hours(raw) if raw else None
    if hours is None:
        return (1440,) * 7
    result = []
    for name in WEEKDAYS:
        total = 0
        for opens, closes in hours.get(name, []):
            a, b = _clock(opens), _clock(closes)
            total += max(b - a, 0)
        result.append(min(total, 1440))
    return tuple(result)


def _clock(text: str) -> int:
    h, m = text.split(":")
    return int(h) * 60 + int(m)


def _weekday_counts(period: Period) -> list[int]:
    counts = [period.days // 7] * 7
    for i in range(period.days % 7):
        counts[(period.first + timedelta(days=i)).weekday()] += 1
    return counts


def _memo(session: Session, key: tuple[Any, ...], compute: Any) -> Any:
    """`compute()`, once per `dashboard` call: several figures need the same availability and downtime reads."""
    memo = session.info.get(_MEMO)
    if memo is None:
        return compute()
    if key not in memo:
        memo[key] = compute()
    return memo[key]


_MEMO = "labcommons_reporting_memo"

# The instrument column a scope's breakdown groups by, per kind of child.
_INSTRUMENT_CHILD = {ScopeKind.region: Instrument.region_code, ScopeKind.institution: Instrument.institution_id,
                     ScopeKind.facility: Instrument.facility_id}


def _patterns(session: Session, scope: Scope, group: Any | None = None) -> list[tuple[Any, str | None, int]]:
    """(group key, opening hours, number of instruments) of the scope's bookable instruments."""
    child = CHILD_KIND[scope.kind]
    if group is None and child is not None:
        # The breakdown reads them per child anyway: adding those up spares a second pass over the instruments.
        instruments: dict[str | None, int] = defaultdict(int)
        for _key, raw, n in _patterns(session, scope, _INSTRUMENT_CHILD[child]):
            instruments[raw] += n
        return [(None, raw, n) for raw, n in instruments.items()]
    return _memo(session, ("patterns", scope.token, str(group)), lambda: _read_patterns(session, scope, group))


def _read_patterns(session: Session, scope: Scope, group: Any | None) -> list[tuple[Any, str | None, int]]:
    key = group if group is not None else Instrument.region_code
    wide = scope.kind in (ScopeKind.platform, ScopeKind.region)
    if wide:
        # SQLite would walk the region's or institutions' index in group order and read every wide instrument row
        # for its status; kept from those indexes, it scans the narrow ix_instrument_placement, which holds all.
        key = _unindexed(key)
    stmt = (
        select(key, BookingPolicy.opening_hours, func.count(Instrument.id))
        .outerjoin(BookingPolicy, BookingPolicy.instrument_id == Instrument.id)
        .where(Instrument.status != InstrumentStatus.retired)
        .group_by(key, BookingPolicy.opening_hours)
    )
    return [(k, raw, int(n)) for k, raw, n in session.execute(_instrument_filter(stmt, scope, indexed=not wide))]


def _available(counts: list[int], raw: str | None) -> int:
    minutes = _open_minutes_by_weekday(raw)
    return sum(c * m for c, m in zip(counts, minutes, strict=True))


def available_minutes(session: Session, scope: Scope, period: Period) -> tuple[int, int]:
    """(opening minutes of the scope's bookable instruments in the period, number of those instruments)."""
    counts = _weekday_counts(period)
    total = instruments = 0
    for _key, raw, n in _patterns(session, scope):
        total += n * _available(counts, raw)
        instruments += n
    return total, instruments


def downtime(session: Session, scope: Scope, period: Period) -> dict[tuple[int, date], int]:
    """Maintenance minutes that take away from available time, per (instrument, day): at most what the instrument
    is open that day. Downtime while an instrument is closed (a weekend, a retired instrument) removes nothing, so
    available time is the same whether summed per instrument, per day or over the scope."""
    return _memo(session, ("downtime", scope.token, period), lambda: _read_downtime(session, scope, period))


def _read_downtime(session: Session, scope: Scope, period: Period) -> dict[tuple[int, date], int]:
    stmt = (
        select(StatInstrumentDay.instrument_id, StatInstrumentDay.day, StatInstrumentDay.maintenance_min,
               BookingPolicy.opening_hours)
        .join(Instrument, Instrument.id == StatInstrumentDay.instrument_id)
        .outerjoin(BookingPolicy, BookingPolicy.instrument_id == StatInstrumentDay.instrument_id)
        .where(StatInstrumentDay.day.between(period.first, period.last), StatInstrumentDay.maintenance_min > 0,
               Instrument.status != InstrumentStatus.retired)
    )
    opening: dict[str | None, tuple[int, ...]] = {}
    out: dict[tuple[int, date], int] = {}
    for iid, day, minutes, raw in session.execute(_inst_filter(stmt, scope, indexed=False)):
        if raw not in opening:
            opening[raw] = _open_minutes_by_weekday(raw)
        counted = min(int(minutes), opening[raw][day.weekday()])
        if counted:
            out[(int(iid), day)] = counted
    return out


# --------------------------------------------------------------------------------------------- the figures


def _sum(column: Any) -> Any:
    return func.coalesce(func.sum(column), 0)


def _when(condition: Any, column: Any) -> Any:
    return func.coalesce(func.sum(case((condition, column), else_=0)), 0)


_HOUR_AT = 7
_LEAD_AT = _HOUR_AT + len(HOUR_COLUMNS)


def _per_day(session: Session, scope: Scope, period: Period) -> dict[date, tuple[int, ...]]:
    """Per local day of the period, from `stat_facility_day` (one read shared by the totals, the series and the
    heat-map): bookings, booked, maintenance, effective, other-institution and other-region effective minutes,
    no-shows, then booked minutes by hour (from _HOUR_AT) and bookings by lead-time bucket (from _LEAD_AT)."""
    return _memo(session, ("per_day", scope.token, period), lambda: _read_per_day(session, scope, period))


def _read_per_day(session: Session, scope: Scope, period: Period) -> dict[date, tuple[int, ...]]:
    # The platform and a region read their region-days: a few hundred rows instead of every facility's.
    f: Any = StatRegionDay if scope.kind in (ScopeKind.platform, ScopeKind.region) else StatFacilityDay
    stmt = select(
        f.day, _sum(f.bookings), _sum(f.booked_min), _sum(f.maintenance_min), _sum(f.effective_min),
        _when(f.internal == 0, f.effective_min), _when(f.user_region_code != f.region_code, f.effective_min),
        _sum(f.no_shows), *(_sum(getattr(f, c)) for c in HOUR_COLUMNS), *(_sum(getattr(f, c)) for c in LEAD_COLUMNS),
    ).where(f.day.between(period.first, period.last)).group_by(f.day)
    if scope.kind is ScopeKind.region:
        stmt = stmt.where(f.region_code == scope.key)
    elif scope.kind is not ScopeKind.platform:
        stmt = _fac_filter(stmt, scope)
    return {row[0]: tuple(int(v) for v in row[1:]) for row in session.execute(stmt)}


def totals(session: Session, scope: Scope, period: Period, today: date) -> Totals:
    """The headline figures (docs/metrics.md). Booking figures come from `stat_facility_day`, the smaller table:
    other-institution hours are its `internal = 0` rows, other-region hours those whose booker's region differs."""
    t = Totals()
    leads = [0] * len(LEAD_COLUMNS)
    for day, v in _per_day(session, scope, period).items():
        t.bookings += v[0]
        t.booked_min += v[1]
        t.maintenance_min += v[2]
        if day < today:
            t.effective_min += v[3]
            t.ext_institution_min += v[4]
            t.ext_region_min += v[5]
            t.started_bookings += v[0]
            t.no_shows += v[6]
        for i, count in enumerate(v[_LEAD_AT:]):
            leads[i] += count
    t.median_lead_hours = median_from_buckets(leads)
    opening, t.instruments = available_minutes(session, scope, period)
    t.available_min = opening - sum(downtime(session, scope, period).values())
    t.utilisation = _ratio(t.booked_min, t.available_min)
    t.external_share = _ratio(t.ext_institution_min, t.effective_min)
    t.ext_region_share = _ratio(t.ext_region_min, t.effective_min)
    t.no_show_rate = _ratio(t.no_shows, t.started_bookings)
    t.users, t.institutions = users_served(session, scope, period)
    orders_part(session, scope, period, t)
    return t


def users_served(session: Session, scope: Scope, period: Period) -> tuple[int, int]:
    """Distinct bookers, and their distinct institutions, of counted use bookings starting in the period."""
    lo, hi = aggregate.period_bounds(period.first, period.last)
    counted = (Booking.starts_at >= lo, Booking.starts_at < hi, Booking.status.in_(aggregate.COUNTED_STATUSES),
               Booking.kind == BookingKind.use.value)
    if scope.kind in (ScopeKind.institution, ScopeKind.facility):
        # Few instruments: their bookings in the period, found through (instrument_id, starts_at).
        base = select(Booking.user_id).join(Instrument, Instrument.id == Booking.instrument_id).where(*counted)
        bookers = _instrument_filter(base, scope).distinct().subquery()
        row = session.execute(select(func.count(User.id), func.count(distinct(User.institution_id)))
                              .join(bookers, bookers.c.user_id == User.id)).one()
        return int(row[0] or 0), int(row[1] or 0)
    # A region or the platform: ask each user whether they booked (one probe of (user_id, starts_at) each), which
    # is far cheaper than collecting the distinct bookers of a million bookings.
    probe = select(literal(1)).select_from(Booking).where(Booking.user_id == User.id, *counted)
    if scope.kind is ScopeKind.region:
        probe = probe.join(Instrument, Instrument.id == Booking.instrument_id).where(
            Instrument.region_code == scope.key)
    counts = select(func.count(User.id), func.count(distinct(User.institution_id)))
    if session.get_bind().dialect.name == "postgresql":
        # LATERAL … LIMIT 1 keeps PostgreSQL probing the index per user instead of hashing every booking.
        stmt = counts.select_from(User).join(probe.limit(1).lateral("booked"), true())
    else:
        stmt = counts.where(probe.exists())
    row = session.execute(stmt).one()
    return int(row[0] or 0), int(row[1] or 0)


def median_from_buckets(counts: Sequence[int]) -> float | None:
    """The median of values counted in LEAD_BUCKET_HOURS buckets, by linear interpolation inside its bucket
    (the open last bucket reports its lower bound)."""
    total = sum(counts)
    if not total:
        return None
    half = total / 2
    seen = 0
    lower = 0.0
    for index, count in enumerate(counts):
        upper = float(LEAD_BUCKET_HOURS[index]) if index < len(LEAD_BUCKET_HOURS) else None
        if count and seen + count >= half:
            if upper is None:
                return lower
            return round(lower + (upper - lower) * (half - seen) / count, 2)
        seen += count
        lower = upper if upper is not None else lower
    return lower


def _order_scope(stmt: Any, scope: Scope) -> Any:
    if scope.kind is ScopeKind.platform:
        return stmt
    stmt = stmt.join(Facility, Facility.id == ServiceOrder.facility_id)
    if scope.kind is ScopeKind.facility:
        return stmt.where(Facility.id == int(scope.key))
    if scope.kind is ScopeKind.institution:
        return stmt.where(Facility.institution_id == int(scope.key))
    return stmt.join(Institution, Institution.id == Facility.institution_id).where(
        Institution.region_code == scope.key)


def _charge_scope(stmt: Any, scope: Scope) -> Any:
    return _filter(stmt, scope, Charge.provider_region_code, Charge.provider_institution_id, Charge.facility_id)


def turnaround_days(session: Session, scope: Scope, period: Period) -> list[float]:
    """Days from submission to first delivered results, of orders whose results came in the period."""
    return list(_memo(session, ("turnaround", scope.token, period), lambda: _read_turnaround(session, scope, period)))


def _read_turnaround(session: Session, scope: Scope, period: Period) -> list[float]:
    lo, hi = aggregate.period_bounds(period.first, period.last)
    delivered = (
        select(OrderEvent.order_id, func.min(OrderEvent.at).label("at"))
        .where(OrderEvent.to_status == OrderStatus.results_delivered)
        .group_by(OrderEvent.order_id).subquery()
    )
    stmt = (
        select(ServiceOrder.submitted_at, delivered.c.at)
        .join(delivered, delivered.c.order_id == ServiceOrder.id)
        .where(delivered.c.at >= lo, delivered.c.at < hi, ServiceOrder.submitted_at.is_not(None))
    )
    out = []
    for submitted, done in session.execute(_order_scope(stmt, scope)):
        out.append(round(max((done - submitted).total_seconds(), 0) / 86400, 2))
    return sorted(out)


def orders_part(session: Session, scope: Scope, period: Period, t: Totals) -> None:
    """Orders submitted, orders delivered, turnaround, revenue and ratings of the period."""
    lo, hi = aggregate.period_bounds(period.first, period.last)
    t.orders = int(session.scalar(_order_scope(
        select(func.count(ServiceOrder.id)).where(ServiceOrder.submitted_at >= lo, ServiceOrder.submitted_at < hi),
        scope)) or 0)
    turnaround = turnaround_days(session, scope, period)
    t.orders_completed = len(turnaround)
    t.median_turnaround_days = round(statistics.median(turnaround), 2) if turnaround else None
    in_period = Charge.service_date.between(period.first, period.last)
    t.revenue_fen = int(session.scalar(_charge_scope(select(_sum(Charge.amount_fen)).where(in_period), scope)) or 0)
    t.external_revenue_fen = int(session.scalar(_charge_scope(select(_sum(Charge.amount_fen)).where(
        in_period, Charge.payer_institution_id != Charge.provider_institution_id), scope)) or 0)
    stmt = select(func.avg(OrderRating.score), func.count(OrderRating.order_id)).join(
        ServiceOrder, ServiceOrder.id == OrderRating.order_id).where(
        OrderRating.created_at >= lo, OrderRating.created_at < hi)
    avg, count = session.execute(_order_scope(stmt, scope)).one()
    t.ratings = int(count or 0)
    t.rating_average = round(float(avg), 2) if avg is not None and t.ratings else None


def granularity_for(period: Period) -> str:
    """Day points up to 45 days, weeks up to 200 days, months beyond."""
    if period.days <= 45:
        return "day"
    if period.days <= 200:
        return "week"
    return "month"


def _bucket(day: date, granularity: str) -> date:
    if granularity == "week":
        return day - timedelta(days=day.weekday())
    if granularity == "month":
        return day.replace(day=1)
    return day


def series(session: Session, scope: Scope, period: Period, today: date) -> tuple[str, list[SeriesPoint]]:
    """Booked and effective hours and utilisation over the period, per day, week or month."""
    granularity = granularity_for(period)
    per_day = {d: (v[1], v[3], v[2]) for d, v in _per_day(session, scope, period).items()}
    down: dict[date, int] = defaultdict(int)
    for (_iid, day), minutes in downtime(session, scope, period).items():
        down[day] += minutes
    patterns = [(raw, n) for _k, raw, n in _patterns(session, scope)]
    open_by_weekday = [0] * 7
    for raw, n in patterns:
        for i, minutes in enumerate(_open_minutes_by_weekday(raw)):
            open_by_weekday[i] += n * minutes
    points: dict[date, list[int]] = {}
    day = period.first
    while day <= period.last:
        booked, effective, _maintenance = per_day.get(day, (0, 0, 0))
        acc = points.setdefault(_bucket(day, granularity), [0, 0, 0])
        acc[0] += booked
        acc[1] += effective if day < today else 0
        acc[2] += open_by_weekday[day.weekday()] - down[day]
        day += timedelta(days=1)
    return granularity, [SeriesPoint(start, b, e, a, _ratio(b, a)) for start, (b, e, a) in sorted(points.items())]


def heatmap(session: Session, scope: Scope, period: Period) -> list[list[int]]:
    """Booked minutes by weekday (Monday first) and local hour."""
    grid = [[0] * 24 for _ in range(7)]
    for day, v in _per_day(session, scope, period).items():
        row = grid[day.weekday()]
        for hour, minutes in enumerate(v[_HOUR_AT:_LEAD_AT]):
            row[hour] += minutes
    return grid


def _per_group(session: Session, scope: Scope, period: Period,
               today: date) -> list[tuple[str, str, str, int, int, int]]:
    """(child key, provider region, booker's region, internal, booked minutes, effective minutes before today)
    from `stat_facility_day`: one grouped read shared by the flows and the breakdown. A region's rows include what
    its users used elsewhere (for its flows); the breakdown keeps the region's own."""
    return _memo(session, ("groups", scope.token, period), lambda: _read_per_group(session, scope, period, today))


def _read_per_group(session: Session, scope: Scope, period: Period,
                    today: date) -> list[tuple[str, str, str, int, int, int]]:
    f: Any = StatFacilityDay
    child = CHILD_KIND[scope.kind]
    if scope.kind is ScopeKind.platform:
        f = StatRegionDay  # its children are the regions: their region-days are enough
    key = literal("") if child is None else getattr(f, {ScopeKind.region: "region_code",
                                                         ScopeKind.institution: "institution_id",
                                                         ScopeKind.facility: "facility_id"}[child])

    def grouped(table: Any, key: Any) -> Any:
        return select(key, table.region_code, table.user_region_code, table.internal, _sum(table.booked_min),
                      _when(table.day < today, table.effective_min)).where(
            table.day.between(period.first, period.last)).group_by(
            key, table.region_code, table.user_region_code, table.internal)

    stmts = [grouped(f, key)]
    if scope.kind is ScopeKind.region:
        # Its own facilities (a large share of the rows: read straight through, not row by row from the index)…
        stmts = [_filter(stmts[0], scope, f.region_code, f.institution_id, f.facility_id, indexed=False)]
        # …and what its users used in other regions, for its flows, from the region-days.
        r = StatRegionDay
        stmts.append(grouped(r, literal("")).where(r.region_code != scope.key, r.user_region_code == scope.key))
    elif scope.kind is not ScopeKind.platform:
        stmts = [_fac_filter(stmts[0], scope)]
    return [(str(k), str(region), str(user_region), int(internal), int(booked), int(effective))
            for stmt in stmts for k, region, user_region, internal, booked, effective in session.execute(stmt)]


def flows(session: Session, scope: Scope, period: Period, today: date) -> list[Flow]:
    """Hours and money between regions: provider's region × user's (payer's) region.

    A region's flows include what its users used elsewhere; smaller scopes show what they provided.
    """
    money = select(Charge.provider_region_code, Charge.payer_region_code, _sum(Charge.amount_fen)).where(
        Charge.service_date.between(period.first, period.last)).group_by(
        Charge.provider_region_code, Charge.payer_region_code)
    if scope.kind is ScopeKind.region:
        money = money.where((Charge.provider_region_code == scope.key) | (Charge.payer_region_code == scope.key))
    else:
        money = _charge_scope(money, scope)
    table: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for _key, a, b, _internal, booked, effective in _per_group(session, scope, period, today):
        table[(a, b)][0] += booked
        table[(a, b)][1] += effective
    for a, b, v in session.execute(money):
        table[(a, b)][2] += int(v)
    return [Flow(a, b, *vals) for (a, b), vals in sorted(table.items()) if any(vals)]


def _split_by_month(period: Period, today: date) -> tuple[list[date], list[tuple[date, date]]]:
    """The period as whole calendar months other than today's (their first days), read from the month table, and
    the day ranges left over: partial months and today's month, whose effective figures depend on the day. A whole
    month lies either before today (every figure counts) or from today on (effective figures count nothing)."""
    this_month = today.replace(day=1)
    months: list[date] = []
    ranges: list[tuple[date, date]] = []
    start = period.first.replace(day=1)
    while start <= period.last:
        end = aggregate.month_end(start)
        lo, hi = max(start, period.first), min(end, period.last)
        if (lo, hi) == (start, end) and start != this_month:
            months.append(start)
        elif ranges and ranges[-1][1] + timedelta(days=1) == lo:
            ranges[-1] = (ranges[-1][0], hi)
        else:
            ranges.append((lo, hi))
        start = end + timedelta(days=1)
    return months, ranges


# The per-instrument measures, in the order of the figures tuples; effective figures and no-shows count only the
# days before today.
_MEASURES = ("bookings", "booked_min", "effective_min", "ext_institution_min", "ext_region_min", "no_shows",
             "maintenance_min")
_UNTIL_TODAY = frozenset({"effective_min", "ext_institution_min", "ext_region_min", "no_shows"})


def _per_instrument(scope: Scope, period: Period, today: date, measures: Sequence[str] = _MEASURES,
                    ids: Sequence[int] | None = None) -> Any:
    """A grouped select of (iid, *measures) over the period for the instruments with statistics in the scope (or
    only `ids`). Whole months other than today's come from `stat_instrument_month` (a row a month), the rest from
    the day table; the database adds the rows of both up in one grouping, which is far cheaper than grouping each
    or merging two result sets in Python."""
    months, ranges = _split_by_month(period, today)
    # A region holds a large share of the rows: SQLite reads them faster straight through the table than row by row
    # from the region's index; a few ids come fastest by primary key.
    indexed = ids is None and scope.kind is not ScopeKind.region
    parts = []
    if months:
        m = StatInstrumentMonth
        # A whole month other than today's lies wholly before today or wholly from today on.
        stmt = select(m.instrument_id.label("iid"), *(
            (case((m.month < today, getattr(m, name)), else_=0) if name in _UNTIL_TODAY else getattr(m, name))
            .label(name) for name in measures)).where(m.month.in_(months))
        if ids is not None:
            stmt = stmt.where(m.instrument_id.in_(ids))
        parts.append(_filter(stmt, scope, m.region_code, m.institution_id, m.facility_id, indexed=indexed))
    if ranges:
        i = StatInstrumentDay
        stmt = select(i.instrument_id.label("iid"), *(
            (case((i.day < today, getattr(i, name)), else_=0) if name in _UNTIL_TODAY else getattr(i, name))
            .label(name) for name in measures)).where(or_(*(i.day.between(lo, hi) for lo, hi in ranges)))
        if ids is not None:
            stmt = stmt.where(i.instrument_id.in_(ids))
        parts.append(_inst_filter(stmt, scope, indexed=indexed))
    rows = parts[0].subquery() if len(parts) == 1 else union_all(*parts).subquery()
    return select(rows.c.iid, *(func.sum(rows.c[name]).label(name) for name in measures)).group_by(rows.c.iid)


def _instrument_figures(session: Session, scope: Scope, period: Period, today: date,
                        ids: Sequence[int] | None = None) -> dict[int, tuple[int, int, int, int, int, int, int]]:
    """Per instrument with activity in the period (or only `ids`): (bookings, booked, effective, other-institution,
    other-region minutes, no-shows, maintenance minutes); effective figures and no-shows count the days before
    today."""
    rows = session.execute(_per_instrument(scope, period, today, ids=ids))
    return {int(r[0]): (int(r[1]), int(r[2]), int(r[3]), int(r[4]), int(r[5]), int(r[6]), int(r[7])) for r in rows}


_Figures = tuple[int, int, int, int, int, int, int, float | None, bool]  # …figures, available, utilisation, retired


def _figures_by_instrument(session: Session, scope: Scope, period: Period, today: date) -> dict[int, _Figures]:
    """Every bookable instrument of the scope (and retired ones with activity) with its figures, by id."""
    counts = _weekday_counts(period)
    figures = _instrument_figures(session, scope, period, today)
    down: dict[int, int] = defaultdict(int)
    for (iid, _day), minutes in downtime(session, scope, period).items():
        down[iid] += minutes
    stmt = _instrument_filter(select(Instrument.id, BookingPolicy.opening_hours, Instrument.status).outerjoin(
        BookingPolicy, BookingPolicy.instrument_id == Instrument.id).order_by(Instrument.id), scope)
    cache: dict[str | None, int] = {}
    nothing = (0, 0, 0, 0, 0, 0, 0)
    out: dict[int, _Figures] = {}
    for iid, raw, status in session.execute(stmt):
        retired = status == InstrumentStatus.retired
        figs = figures.get(iid, nothing)
        if retired and not any(figs):
            continue
        if raw not in cache:
            cache[raw] = _available(counts, raw)
        available = 0 if retired else cache[raw] - down[iid]
        out[iid] = (*figs[:6], available, _ratio(figs[1], available), retired)
    return out


def _rows_for(session: Session, figures: dict[int, _Figures], ids: Sequence[int]) -> list[InstrumentRow]:
    """InstrumentRows for `ids`, in that order."""
    rows: dict[int, InstrumentRow] = {}
    for chunk in (ids[k:k + 5000] for k in range(0, len(ids), 5000)):
        stmt = select(Instrument.id, Instrument.code, Instrument.name_zh, Instrument.name_en, Instrument.facility_id,
                      Instrument.region_code).where(Instrument.id.in_(list(chunk)))
        for iid, code, name_zh, name_en, facility_id, region_code in session.execute(stmt):
            bookings, booked, effective, ext_inst, ext_region, no_shows, available, utilisation, retired = figures[iid]
            rows[iid] = InstrumentRow(iid, code, name_zh, name_en, facility_id, region_code, bookings, booked,
                                      effective, ext_inst, ext_region, available, utilisation, no_shows, retired)
    return [rows[i] for i in ids if i in rows]


def instrument_rows(session: Session, scope: Scope, period: Period, today: date) -> list[InstrumentRow]:
    """Every bookable instrument of the scope with its figures for the period (also those never booked), and the
    retired ones that had bookings in it (so that the rows add up to the scope's totals)."""
    figures = _figures_by_instrument(session, scope, period, today)
    return _rows_for(session, figures, sorted(figures))


def top_and_idle(rows: Sequence[InstrumentRow], n: int = TOP_N) -> tuple[list[InstrumentRow], list[InstrumentRow], int]:
    """The n busiest instruments by effective then booked hours, the n least used (lowest utilisation), and how
    many had no booked time at all."""
    top = sorted((r for r in rows if r.booked_min), key=lambda r: (-r.effective_min, -r.booked_min, r.instrument_id))
    # A retired instrument is not idle: it cannot be booked any more.
    bookable = [r for r in rows if not r.retired]
    idle = sorted(bookable, key=lambda r: (r.utilisation or 0.0, r.booked_min, r.instrument_id))
    return top[:n], idle[:n], sum(1 for r in bookable if not r.booked_min)


def ranked_instruments(session: Session, scope: Scope, period: Period, today: date,
                       n: int = TOP_N) -> tuple[list[InstrumentRow], list[InstrumentRow], int]:
    """What `top_and_idle(instrument_rows(…))` gives, ranked by the database: one statement adds up the period per
    instrument and returns the busiest n, how many bookable instruments had booked time, and the n lowest ids of
    those that had none; only the listed instruments' rows are then read."""
    per = _per_instrument(scope, period, today, ("booked_min", "effective_min")).subquery("per")
    # Instruments with booked time, in the scope by their own placement, as instrument_rows lists them.
    booked = _instrument_filter(select(
        per.c.iid, per.c.booked_min.label("b"), per.c.effective_min.label("c"),
        case((Instrument.status == InstrumentStatus.retired, 0), else_=1).label("bookable"),
    ).join(Instrument, Instrument.id == per.c.iid), scope).cte("booked")
    # (`b > 0` stays out of the CTE: the planner cannot estimate it on a sum and then joins row by row.)
    busiest = select(booked.c.iid).where(booked.c.b > 0).order_by(
        booked.c.c.desc(), booked.c.b.desc(), booked.c.iid).limit(n).subquery()
    counted = select(func.count()).select_from(booked).where(booked.c.b > 0, booked.c.bookable == 1).scalar_subquery()
    # Never booked: utilisation 0, so they sort first, by id (when there are at least n of them).
    unbooked = _instrument_filter(select(Instrument.id).where(
        Instrument.status != InstrumentStatus.retired,
        Instrument.id.not_in(select(booked.c.iid).where(booked.c.b > 0))), scope).order_by(
        Instrument.id).limit(n).subquery()
    stmt = union_all(select(literal(0).label("part"), busiest.c.iid.label("value")),
                     select(literal(1), counted),
                     select(literal(2), unbooked.c.id))
    found: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for part, value in session.execute(stmt):
        found[int(part)].append(int(value))
    top, never_booked = found[0], found[2]
    idle_count = available_minutes(session, scope, period)[1] - (found[1][0] if found[1] else 0)
    if idle_count >= n:
        idle = never_booked[:n]
        figures = _figures_for(session, scope, period, today, top + idle)
    else:
        candidates = never_booked + _least_booked(session, scope, period, today, n)
        figures = _figures_for(session, scope, period, today, top + candidates)
        idle = heapq.nsmallest(n, {i for i in candidates if not figures[i][8]},
                               key=lambda i: (figures[i][7] or 0.0, figures[i][1], i))
    return _rows_for(session, figures, top), _rows_for(session, figures, idle), idle_count


def _least_booked(session: Session, scope: Scope, period: Period, today: date, n: int) -> list[int]:
    """Bookable instruments that may be among the n least used although booked: per opening-hours pattern the n
    with the least booked time (instruments sharing a pattern and free of downtime have the same available time,
    so booked time orders their utilisation), and every instrument with downtime in the period."""
    down = {iid for iid, _day in downtime(session, scope, period)}
    per = _per_instrument(scope, period, today, ("booked_min",)).subquery("per")
    pattern = func.coalesce(BookingPolicy.opening_hours, "")
    ranked = _instrument_filter(select(
        per.c.iid, func.row_number().over(partition_by=pattern, order_by=(per.c.booked_min, per.c.iid)).label("rn"),
    ).join(Instrument, Instrument.id == per.c.iid).outerjoin(
        BookingPolicy, BookingPolicy.instrument_id == per.c.iid).where(
        per.c.booked_min > 0, Instrument.status != InstrumentStatus.retired), scope).subquery()
    # n more per pattern than instruments with downtime, so that n without downtime remain in each.
    rows = session.scalars(select(ranked.c.iid).where(ranked.c.rn <= n + len(down)))
    return sorted({int(i) for i in rows} | down)


def _figures_for(session: Session, scope: Scope, period: Period, today: date,
                 ids: Sequence[int]) -> dict[int, _Figures]:
    """The figures of the instruments `ids`, read by id."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    counts = _weekday_counts(period)
    down: dict[int, int] = defaultdict(int)
    for (iid, _day), minutes in downtime(session, scope, period).items():
        down[iid] += minutes
    figures: dict[int, tuple[int, int, int, int, int, int, int]] = {}
    placed: dict[int, tuple[str | None, bool]] = {}
    for chunk in (wanted[k:k + 5000] for k in range(0, len(wanted), 5000)):
        figures.update(_instrument_figures(session, scope, period, today, ids=chunk))
        placed.update({int(i): (raw, status == InstrumentStatus.retired) for i, raw, status in session.execute(
            select(Instrument.id, BookingPolicy.opening_hours, Instrument.status).outerjoin(
                BookingPolicy, BookingPolicy.instrument_id == Instrument.id).where(Instrument.id.in_(chunk)))})
    cache: dict[str | None, int] = {}
    nothing = (0, 0, 0, 0, 0, 0, 0)
    out: dict[int, _Figures] = {}
    for iid in wanted:
        raw, retired = placed.get(iid, (None, False))
        if raw not in cache:
            cache[raw] = _available(counts, raw)
        figs = figures.get(iid, nothing)
        available = 0 if retired else cache[raw] - down[iid]
        out[iid] = (*figs[:6], available, _ratio(figs[1], available), retired)
    return out


def _child_names(session: Session, kind: ScopeKind, keys: Iterable[Any]) -> dict[str, tuple[str, str]]:
    wanted = list(keys)
    if kind is ScopeKind.region:
        found = session.execute(select(Region.code, Region.name_zh, Region.name_en).where(Region.code.in_(wanted)))
    elif kind is ScopeKind.institution:
        found = session.execute(select(Institution.id, Institution.name_zh, Institution.name_en).where(
            Institution.id.in_(wanted)))
    else:
        found = session.execute(select(Facility.id, Facility.name_zh, Facility.name_en).where(Facility.id.in_(wanted)))
    return {str(k): (zh, en) for k, zh, en in found}


def breakdown(session: Session, scope: Scope, period: Period, today: date) -> list[BreakdownRow]:
    """The scope's figures split by region (platform), institution (region) or facility (institution); a
    facility's breakdown is its instrument table."""
    child = CHILD_KIND[scope.kind]
    if child is None:
        return []
    inst_key = _INSTRUMENT_CHILD[child]
    acc: dict[str, list[int]] = {}
    for key, region, user_region, internal, booked, effective in _per_group(session, scope, period, today):
        if scope.kind is ScopeKind.region and region != scope.key:
            continue  # what the region's users used elsewhere: in its flows, not in its breakdown
        a = acc.setdefault(key, [0, 0, 0, 0, 0, 0])
        a[1] += booked
        a[2] += effective
        a[3] += effective if not internal else 0
        a[4] += effective if user_region != region else 0
    counts = _weekday_counts(period)
    for key, raw, n in _patterns(session, scope, inst_key):
        a = acc.setdefault(str(key), [0, 0, 0, 0, 0, 0])
        a[0] += n  # as in the totals: instruments that can be booked
        a[5] += n * _available(counts, raw)
    down = downtime(session, scope, period)
    if down:
        ids = sorted({i for i, _d in down})
        owner = {int(i): str(k)
                 for i, k in session.execute(select(Instrument.id, inst_key).where(Instrument.id.in_(ids)))}
        for (iid, _day), minutes in down.items():
            acc.setdefault(owner[iid], [0, 0, 0, 0, 0, 0])[5] -= minutes
    revenue_col = {ScopeKind.region: Charge.provider_region_code, ScopeKind.institution: Charge.provider_institution_id,
                   ScopeKind.facility: Charge.facility_id}[child]
    revenue = {str(k): int(v) for k, v in session.execute(_charge_scope(
        select(revenue_col, _sum(Charge.amount_fen)).where(Charge.service_date.between(period.first, period.last))
        .group_by(revenue_col), scope))}
    names = _child_names(session, child, [k if child is ScopeKind.region else int(k) for k in acc | revenue
                                          if k != "None"])
    out = []
    for key in sorted(set(acc) | set(revenue), key=lambda k: (names.get(k, ("", k))[1], k)):
        if key == "None":
            continue
        a = acc.get(key, [0, 0, 0, 0, 0, 0])
        zh, en = names.get(key, (key, key))
        out.append(BreakdownRow(child.value, key, zh, en, a[0], a[1], a[2], a[3], a[4], a[5], _ratio(a[1], a[5]),
                                revenue.get(key, 0)))
    return out


def dashboard(session: Session, scope: Scope, period: Period, today: date) -> Dashboard:
    """Every figure and chart of a scope's dashboard (call `aggregate.ensure_current` first)."""
    session.info[_MEMO] = {}
    try:
        top, idle, idle_count = ranked_instruments(session, scope, period, today)
        granularity, points = series(session, scope, period, today)
        return Dashboard(
            scope=scope, period=period, today=today, totals=totals(session, scope, period, today),
            granularity=granularity, series=points, heatmap=heatmap(session, scope, period), top=top, idle=idle,
            idle_count=idle_count, flows=flows(session, scope, period, today),
            turnaround_days=turnaround_days(session, scope, period),
            breakdown=breakdown(session, scope, period, today),
        )
    finally:
        session.info.pop(_MEMO, None)
