"""Catalogue rules: creating instruments, keyword search with facets, and reference look-ups."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Double, Select, and_, cast, func, literal_column, or_, select, text, true
from sqlalchemy.orm import Session, joinedload

from labcommons.catalog.models import (
    Category,
    Facility,
    Institution,
    Instrument,
    InstrumentStatus,
    OpenTo,
    Region,
    Service,
)
from labcommons.catalog.text import index_tokens, query_terms
from labcommons.errors import InvalidInput, NotFound
from labcommons.pagination import decode_cursor, encode_cursor


@dataclass(frozen=True)
class InstrumentQuery:
    """What a catalogue search asks for; every field narrows the result."""

    q: str = ""
    region: str | None = None
    institution: str | None = None
    category: str | None = None
    status: InstrumentStatus | None = None
    free_from: datetime | None = None
    free_to: datetime | None = None


@dataclass
class FacetValue:
    value: str
    label_zh: str
    label_en: str
    count: int


@dataclass
class SearchPage:
    items: list[Instrument]
    next_cursor: str | None
    facets: dict[str, list[FacetValue]] | None = None
    ranks: dict[int, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Writing the catalogue


def search_text_for(
    instrument: Instrument, facility: Facility, institution: Institution, category: Category
) -> tuple[str, str]:
    """The (name, body) token strings the full-text index stores for an instrument."""
    name = index_tokens(
        instrument.name_zh, instrument.name_en, instrument.code, instrument.model, instrument.manufacturer
    )
    body = index_tokens(
        instrument.description_zh, instrument.description_en, category.name_zh, category.name_en,
        category.code.replace(".", " "), facility.name_zh, facility.name_en, institution.name_zh,
        institution.name_en, instrument.location_zh, instrument.location_en,
    )
    return name, body


def place_instrument(session: Session, instrument: Instrument) -> Instrument:
    """Fill an instrument's copied region/institution and its search text from its facility and category.

    Call after setting or changing facility, names, descriptions or category, before flushing.
    """
    facility = session.get(Facility, instrument.facility_id)
    if facility is None:
        raise InvalidInput("Unknown facility.", field="facility", code="unknown_facility")
    institution = session.get(Institution, facility.institution_id)
    assert institution is not None  # a foreign key guarantees it
    category = session.get(Category, instrument.category_code)
    if category is None:
        raise InvalidInput(
            f"Unknown category {instrument.category_code!r}.", field="category", code="unknown_category"
        )
    _check_instrument_rules(instrument)
    instrument.institution_id = facility.institution_id
    instrument.region_code = institution.region_code
    instrument.search_name, instrument.search_body = search_text_for(instrument, facility, institution, category)
    return instrument


def _check_instrument_rules(instrument: Instrument) -> None:
    slot = instrument.slot_minutes
    if not isinstance(slot, int) or slot <= 0 or slot > 1440:
        raise InvalidInput("The slot grid must be 1–1440 minutes.", field="slot_minutes", code="invalid_slot")
    for name in ("min_booking_minutes", "max_booking_minutes"):
        value = getattr(instrument, name)
        if not isinstance(value, int) or value <= 0 or value % slot:
            raise InvalidInput(
                f"{name} must be a positive multiple of the {slot}-minute slot grid.", field=name,
                code="invalid_booking_length",
            )
    if instrument.min_booking_minutes > instrument.max_booking_minutes:
        raise InvalidInput(
            "The minimum booking length exceeds the maximum.", field="min_booking_minutes",
            code="invalid_booking_length",
        )


# ---------------------------------------------------------------------------------------------------------
# Reading


def get_instrument(session: Session, instrument_id: int) -> Instrument:
    """One instrument with its facility, institution, region and category loaded; NotFound if absent."""
    instrument = session.get(
        Instrument,
        instrument_id,
        options=[
            joinedload(Instrument.facility),
            joinedload(Instrument.institution),
            joinedload(Instrument.region),
            joinedload(Instrument.category),
        ],
    )
    if instrument is None:
        raise NotFound(f"Instrument {instrument_id} does not exist.", field="instrument_id")
    return instrument


def instrument_is_open_to(
    instrument: Instrument, user_institution_id: int | None, user_region_code: str
) -> bool:
    """Whether a user of that institution and region may book the instrument at all."""
    if instrument.open_to == OpenTo.everyone:
        return True
    if instrument.open_to == OpenTo.region:
        return instrument.region_code == user_region_code
    return instrument.institution_id == user_institution_id


def category_clause(column: Any, code: str) -> ColumnElement[bool]:
    """Matches a category code and every code below it (GEN matches GEN.SEQ)."""
    return or_(column == code, column.like(code.replace("%", r"\%").replace("_", r"\_") + ".%", escape="\\"))


def text_match(session: Session, q: str) -> tuple[Any, Any] | None:
    """A subquery of (id, rank) for the instruments matching `q`, lower rank is better; None for no terms."""
    terms = query_terms(q)
    if not terms:
        return None
    if session.get_bind().dialect.name == "postgresql":
        tsquery = " & ".join(f"'{token}'" + (":*" if prefix else "") for token, prefix in terms)
        query = func.to_tsquery(literal_column("'simple'"), tsquery)
        vector: ColumnElement[Any] = literal_column("instrument.search_vector")
        sub = (
            # ts_rank is a float4; as float8 its text form round-trips exactly, which keyset cursors need.
            select(Instrument.id.label("id"), (-cast(func.ts_rank(vector, query), Double)).label("rank"))
            .where(vector.op("@@")(query))
            .subquery("fts")
        )
        return sub, sub.c.rank
    match = " ".join(f'"{token}"' + ("*" if prefix else "") for token, prefix in terms)
    sub = (
        select(
            literal_column("rowid").label("id"),
            literal_column("bm25(instrument_fts, 10.0, 1.0)").label("rank"),
        )
        .select_from(text("instrument_fts"))
        .where(text("instrument_fts MATCH :fts_query").bindparams(fts_query=match))
        .subquery("fts")
    )
    return sub, sub.c.rank


def instrument_filters(query: InstrumentQuery, *, skip: str | None = None) -> list[ColumnElement[bool]]:
    """WHERE clauses for everything but the text; `skip` leaves one facet's own filter out."""
    from labcommons.booking.service import busy_during

    clauses: list[ColumnElement[bool]] = []
    if query.region and skip != "region":
        clauses.append(Instrument.region_code == query.region)
    if query.institution and skip != "institution":
        clauses.append(
            Instrument.institution_id.in_(select(Institution.id).where(Institution.code == query.institution))
        )
    if query.category and skip != "category":
        clauses.append(category_clause(Instrument.category_code, query.category))
    if skip != "status":
        if query.status:
            clauses.append(Instrument.status == query.status)
        elif query.free_from is None:
            # Retired instruments are kept for the record but left out unless asked for.
            clauses.append(Instrument.status != InstrumentStatus.retired)
    if query.free_from is not None and query.free_to is not None:
        clauses.append(Instrument.status == InstrumentStatus.active)
        clauses.append(~busy_during(Instrument.id, query.free_from, query.free_to))
    return clauses


def _validate(query: InstrumentQuery) -> None:
    if (query.free_from is None) != (query.free_to is None):
        missing = "free_to" if query.free_to is None else "free_from"
        raise InvalidInput("Give both free_from and free_to.", field=missing, code="missing_field")
    if query.free_from and query.free_to and query.free_to <= query.free_from:
        raise InvalidInput("free_to must be after free_from.", field="free_to", code="invalid_window")
    if len(query.q) > 200:
        raise InvalidInput("The search text is too long (200 characters at most).", field="q")


def search_instruments(
    session: Session,
    query: InstrumentQuery,
    *,
    limit: int = 20,
    cursor: str | None = None,
    with_facets: bool = False,
) -> SearchPage:
    """One page of instruments matching `query`, best match first (by id without text), with a cursor."""
    _validate(query)
    match = text_match(session, query.q)
    stmt: Select[tuple[Instrument, Any]]
    if match is not None:
        sub, rank = match
        stmt = select(Instrument, rank).join(sub, sub.c.id == Instrument.id)
        order = [rank, Instrument.id]
    else:
        rank = None
        stmt = select(Instrument, literal_column("0.0"))  # type: ignore[assignment]
        order = [Instrument.id]
    stmt = stmt.where(*instrument_filters(query))
    if cursor:
        if rank is not None:
            last_rank, last_id = decode_cursor(cursor, 2)
            stmt = stmt.where(or_(rank > last_rank, and_(rank == last_rank, Instrument.id > last_id)))
        else:
            (last_id,) = decode_cursor(cursor, 1)
            stmt = stmt.where(Instrument.id > last_id)
    stmt = stmt.order_by(*order).limit(limit + 1).options(
        joinedload(Instrument.institution), joinedload(Instrument.category), joinedload(Instrument.region),
        joinedload(Instrument.facility),
    )
    rows = session.execute(stmt).unique().all()
    has_more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if has_more and rows:
        last, last_rank = rows[-1]
        next_cursor = encode_cursor([float(last_rank), last.id] if rank is not None else [last.id])
    page = SearchPage(items=[r[0] for r in rows], next_cursor=next_cursor,
                      ranks={r[0].id: float(r[1]) for r in rows})
    if with_facets:
        page.facets = facet_counts(session, query)
    return page


def facet_counts(session: Session, query: InstrumentQuery) -> dict[str, list[FacetValue]]:
    """Counts by region, institution, category and status; each dimension ignores its own filter."""
    _validate(query)
    match = text_match(session, query.q)

    def grouped(column: Any, skip: str) -> list[tuple[Any, int]]:
        stmt = select(column, func.count()).select_from(Instrument)
        if match is not None:
            stmt = stmt.join(match[0], match[0].c.id == Instrument.id)
        stmt = stmt.where(*instrument_filters(query, skip=skip), true()).group_by(column)
        return [(value, int(count)) for value, count in session.execute(stmt).all()]

    regions = {r.code: r for r in session.scalars(select(Region))}
    region_counts = grouped(Instrument.region_code, "region")
    institution_counts = dict(grouped(Instrument.institution_id, "institution"))
    institutions = session.scalars(select(Institution).where(Institution.id.in_(institution_counts))).all()
    categories = {c.code: c for c in session.scalars(select(Category))}
    leaf_counts = grouped(Instrument.category_code, "category")
    category_totals: dict[str, int] = {}
    for code, count in leaf_counts:
        parts = code.split(".")
        for depth in range(1, len(parts) + 1):
            key = ".".join(parts[:depth])
            category_totals[key] = category_totals.get(key, 0) + count
    status_counts = grouped(Instrument.status, "status")
    status_labels = {"active": ("可预约", "Active"), "maintenance": ("维护中", "Maintenance"),
                     "retired": ("已退役", "Retired")}
    return {
        "region": [
            FacetValue(code, regions[code].name_zh, regions[code].name_en, n)
            for code, n in sorted(region_counts, key=lambda x: -x[1])
        ],
        "institution": sorted(
            (FacetValue(i.code, i.name_zh, i.name_en, institution_counts[i.id]) for i in institutions),
            key=lambda f: (-f.count, f.value),
        ),
        "category": [
            FacetValue(code, categories[code].name_zh, categories[code].name_en, category_totals[code])
            for code in sorted(category_totals)
            if code in categories
        ],
        "status": [
            FacetValue(str(s), *status_labels[str(s)], n) for s, n in sorted(status_counts, key=lambda x: -x[1])
        ],
    }


def list_regions(session: Session) -> Sequence[Region]:
    return session.scalars(select(Region).order_by(Region.code)).all()


def list_categories(session: Session) -> Sequence[Category]:
    return session.scalars(select(Category).order_by(Category.code)).all()


def list_services(session: Session, *, facility_id: int | None = None) -> Sequence[Service]:
    """Services, optionally of one facility, with their facility loaded."""
    stmt = select(Service).options(joinedload(Service.facility).joinedload(Facility.institution))
    if facility_id is not None:
        stmt = stmt.where(Service.facility_id == facility_id)
    return session.scalars(stmt.order_by(Service.id)).all()

