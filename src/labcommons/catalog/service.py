"""Catalogue rules: creating instruments and services, keyword search with facets, and reference look-ups."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Double,
    Select,
    and_,
    cast,
    delete,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.engine import ScalarResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, joinedload

from labcommons.actor import Actor
from labcommons.catalog.models import (
    Category,
    Facility,
    Institution,
    Instrument,
    InstrumentStatus,
    OpenTo,
    PriceUnit,
    Region,
    Service,
    ServiceAccreditation,
    ServiceInstrument,
    ServiceKind,
)
from labcommons.catalog.text import index_tokens, query_terms
from labcommons.db import MAX_ID
from labcommons.errors import Conflict, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity.roles import Action, FacilityRef
from labcommons.orders.models import OrderRating
from labcommons.pagination import decode_keyset, encode_cursor


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
    # True when the dimension had more than FACET_CAP matching rows: `count` is then only how many of the first
    # FACET_CAP + 1 rows found have this value, a lower bound shown as "n+".
    capped: bool = False


# Facets count at most this many matching rows per dimension (plus one, to know there are more): counting every
# match of a broad query over a million instruments took seconds.
FACET_CAP = 1000


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


def get_instrument(session: Session, instrument_id: int, *, lock: bool = False, related: bool = True) -> Instrument:
    """One instrument, with its facility, institution, region and category loaded unless `related` is off (they
    then load when touched); NotFound if absent.

    `lock` also takes the instrument's row lock until commit (PostgreSQL; SQLite writers are serialised anyway)."""
    for_update = lock and session.get_bind().dialect.name == "postgresql"
    instrument = session.get(
        Instrument,
        instrument_id,
        options=[
            joinedload(Instrument.facility),
            joinedload(Instrument.institution),
            joinedload(Instrument.region),
            joinedload(Instrument.category),
        ] if related else [],
        with_for_update={"of": Instrument} if for_update else None,
        populate_existing=for_update,
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


@dataclass(frozen=True)
class TextMatch:
    """The rows of a model matching a text query: a subquery to join (or None), conditions, and a rank."""

    join: Any | None
    where: list[ColumnElement[bool]]
    rank: ColumnElement[Any]


def text_match(
    session: Session, q: str, model: type[Instrument] | type[Service] = Instrument
) -> TextMatch | None:
    """How to keep the rows of `model` matching `q` and rank them (lower rank is better); None for no terms.

    Instruments and services share the scheme: SQLite has an FTS5 table `<table>_fts` kept by triggers,
    PostgreSQL a generated `<table>.search_vector` (name weighted A, body B) with a GIN index, tested and
    ranked on the row itself (no self-join, so a LIMIT or other filters apply to the same scan).
    """
    terms = query_terms(q)
    if not terms:
        return None
    table = model.__tablename__  # a class attribute, never user input
    if session.get_bind().dialect.name == "postgresql":
        query = _tsquery(terms)
        vector: ColumnElement[Any] = literal_column(f"{table}.search_vector")
        # ts_rank is a float4; as float8 its text form round-trips exactly, which keyset cursors need.
        return TextMatch(None, [vector.op("@@")(query)], -cast(func.ts_rank(vector, query), Double))
    sub = (
        select(
            literal_column("rowid").label("id"),
            literal_column(f"bm25({table}_fts, 10.0, 1.0)").label("rank"),
        )
        .select_from(text(f"{table}_fts"))
        .where(_fts_match(table, terms))
        .subquery("fts")
    )
    return TextMatch(sub, [], sub.c.rank)


def _tsquery(terms: Sequence[tuple[str, bool]]) -> ColumnElement[Any]:
    """PostgreSQL: every term must match, a prefix term as a prefix (`simple` configuration, as indexed)."""
    tsquery = " & ".join(f"'{token}'" + (":*" if prefix else "") for token, prefix in terms)
    return func.to_tsquery(literal_column("'simple'"), tsquery)


def _fts_match(table: str, terms: Sequence[tuple[str, bool]]) -> Any:
    """SQLite: the FTS5 MATCH of `<table>_fts` for every term, a prefix term as a prefix."""
    match = " ".join(f'"{token}"' + ("*" if prefix else "") for token, prefix in terms)
    return text(f"{table}_fts MATCH :fts_query").bindparams(fts_query=match)


def text_condition(
    session: Session, q: str, model: type[Instrument] | type[Service] = Instrument, *, drive: bool = True
) -> ColumnElement[bool] | None:
    """A WHERE clause keeping the rows of `model` that match `q`, unranked; None when `q` has no terms.

    Cheaper than joining `text_match` when no rank is needed: on PostgreSQL the planner can test the match
    row by row while it walks another index in order and stops at a LIMIT. `drive=False` keeps SQLite from
    starting a join at the matching ids (it would, whatever their number): the match is then only checked.
    """
    terms = query_terms(q)
    if not terms:
        return None
    table = model.__tablename__  # a class attribute, never user input
    if session.get_bind().dialect.name == "postgresql":
        vector: ColumnElement[Any] = literal_column(f"{table}.search_vector")
        return vector.op("@@")(_tsquery(terms))
    matching_ids: Select[tuple[Any]] = (
        select(literal_column("rowid")).select_from(text(f"{table}_fts")).where(_fts_match(table, terms))
    )
    # `id + 0` is no longer the rowid, so SQLite cannot look rows up by the list and tests each row against it.
    return (model.id if drive else model.id + 0).in_(matching_ids)


def has_several_terms(q: str) -> bool:
    """Whether `q` asks for more than one term (all must match). PostgreSQL estimates such a match as if the
    terms were independent, far too low for the overlapping bigrams of one word (显微 & 微镜: 1 % for 10 %)."""
    return len(query_terms(q)) > 1


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


def _matching(stmt: Any, model: type[Instrument] | type[Service], match: TextMatch | None) -> Any:
    """`stmt` over `model` kept to the rows matching the text (see `text_match`), if any text was given."""
    if match is None:
        return stmt
    if match.join is not None:
        stmt = stmt.join(match.join, match.join.c.id == model.id)
    return stmt.where(*match.where)


def _ranked_page(
    session: Session,
    model: type[Instrument] | type[Service],
    match: TextMatch | None,
    where: Sequence[ColumnElement[bool]],
    *,
    limit: int,
    cursor: str | None,
    options: Sequence[Any],
) -> tuple[list[Any], str | None, dict[int, float]]:
    """One page of `model` rows: best text rank first then by id (by id alone without text), keyset-paged; the
    rows, the cursor of the next page and each row's rank.

    The page is chosen on (id, rank) alone and only its rows are then loaded with their relations: joining
    those for every match before the LIMIT cost as much as the ranking itself.
    """
    rank = match.rank if match is not None else None
    stmt = _matching(select(model.id, literal_column("0.0") if rank is None else rank), model, match).where(*where)
    if cursor:
        last_rank, last_id = decode_keyset(cursor, ranked=rank is not None)
        stmt = stmt.where(model.id > last_id if rank is None
                          else or_(rank > last_rank, and_(rank == last_rank, model.id > last_id)))
    order = [model.id] if rank is None else [rank, model.id]
    keys = session.execute(stmt.order_by(*order).limit(limit + 1)).all()
    has_more = len(keys) > limit
    keys = keys[:limit]
    loaded: dict[int, Any] = {}
    if keys:
        page_rows: ScalarResult[Any] = session.scalars(
            select(model).where(model.id.in_([key[0] for key in keys])).options(*options)
        )
        loaded = {row.id: row for row in page_rows.unique()}
    rows = [loaded[key[0]] for key in keys]
    next_cursor = None
    if has_more and keys:
        last_id, last_rank = keys[-1]
        next_cursor = encode_cursor([last_id] if rank is None else [float(last_rank), last_id])
    return rows, next_cursor, {key[0]: float(key[1]) for key in keys}


def _grouped_counts(
    session: Session, model: type[Instrument] | type[Service], match: TextMatch | None,
    where: Sequence[ColumnElement[bool]], column: Any,
) -> list[tuple[Any, int]]:
    """How many rows of `model` matching the text and `where` have each value of `column` (for facets)."""
    stmt = _matching(select(column, func.count()).select_from(model), model, match)
    return [(value, int(count)) for value, count in session.execute(stmt.where(*where, true()).group_by(column))]


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
    items, next_cursor, ranks = _ranked_page(
        session, Instrument, text_match(session, query.q), instrument_filters(query), limit=limit, cursor=cursor,
        options=[joinedload(Instrument.institution), joinedload(Instrument.category), joinedload(Instrument.region),
                 joinedload(Instrument.facility)],
    )
    page = SearchPage(items=items, next_cursor=next_cursor, ranks=ranks)
    if with_facets:
        page.facets = facet_counts(session, query)
    return page


def facet_counts(session: Session, query: InstrumentQuery) -> dict[str, list[FacetValue]]:
    """Counts by region, institution, category and status; each dimension ignores its own filter.

    Each distinct set of filters reads at most FACET_CAP + 1 matching rows; when there are more, the counts of
    the dimensions counted on them are lower bounds marked `capped`.
    """
    _validate(query)
    matches_text = [] if (condition := text_condition(session, query.q)) is None else [condition]
    columns = {"region": Instrument.region_code, "institution": Instrument.institution_id,
               "category": Instrument.category_code, "status": Instrument.status}
    # A dimension ignores its own filter; those whose filter is not set see the query's rows and share one
    # sample (status always drops its filter: the default leaves retired instruments out).
    own_filter = {"region": bool(query.region), "institution": bool(query.institution),
                  "category": bool(query.category), "status": True}
    by_skip: dict[str | None, list[str]] = {}
    for dim in columns:
        by_skip.setdefault(dim if own_filter[dim] else None, []).append(dim)
    counts: dict[str, tuple[list[tuple[Any, int]], bool]] = {}
    for skip, dims in by_skip.items():
        rows = session.execute(
            select(*(columns[dim] for dim in dims))
            .where(*matches_text, *instrument_filters(query, skip=skip), true())
            .limit(FACET_CAP + 1)
        ).all()
        for position, dim in enumerate(dims):
            counts[dim] = (list(Counter(row[position] for row in rows).items()), len(rows) > FACET_CAP)
    status_labels = {"active": ("可预约", "Active"), "maintenance": ("维护中", "Maintenance"),
                     "retired": ("已退役", "Retired")}
    status_counts, status_capped = counts["status"]
    return {
        "region": _region_facet(session, counts["region"][0], capped=counts["region"][1]),
        "institution": _institution_facet(session, counts["institution"][0], capped=counts["institution"][1]),
        "category": _category_facet(session, counts["category"][0], capped=counts["category"][1]),
        "status": [
            FacetValue(str(s), *status_labels[str(s)], n, status_capped)
            for s, n in sorted(status_counts, key=lambda x: (-x[1], str(x[0])))
        ],
    }


def _region_facet(session: Session, counts: Iterable[tuple[Any, int]], *, capped: bool = False) -> list[FacetValue]:
    regions = {r.code: r for r in session.scalars(select(Region))}
    return [
        FacetValue(code, regions[code].name_zh, regions[code].name_en, n, capped)
        for code, n in sorted(counts, key=lambda x: (-x[1], str(x[0])))
        if code in regions
    ]


def _institution_facet(
    session: Session, counts: Iterable[tuple[Any, int]], *, capped: bool = False
) -> list[FacetValue]:
    by_id = {i: n for i, n in counts if i is not None}
    institutions = session.scalars(select(Institution).where(Institution.id.in_(by_id))).all()
    return sorted(
        (FacetValue(i.code, i.name_zh, i.name_en, by_id[i.id], capped) for i in institutions),
        key=lambda f: (-f.count, f.value),
    )


def _category_facet(
    session: Session, leaf_counts: Iterable[tuple[str, int]], *, capped: bool = False
) -> list[FacetValue]:
    """Counts per category code, each parent counting its children (GEN counts GEN.SEQ), in code order."""
    categories = {c.code: c for c in session.scalars(select(Category))}
    totals: dict[str, int] = {}
    for code, count in leaf_counts:
        parts = code.split(".")
        for depth in range(1, len(parts) + 1):
            key = ".".join(parts[:depth])
            totals[key] = totals.get(key, 0) + count
    return [
        FacetValue(code, categories[code].name_zh, categories[code].name_en, totals[code], capped)
        for code in sorted(totals)
        if code in categories
    ]


def instrument_count(session: Session, query: InstrumentQuery) -> int:
    """How many instruments match `query` (for the kind facet of the search page)."""
    _validate(query)
    stmt = _matching(select(func.count()).select_from(Instrument), Instrument, text_match(session, query.q))
    return int(session.scalar(stmt.where(*instrument_filters(query), true())) or 0)


def list_regions(session: Session) -> Sequence[Region]:
    return session.scalars(select(Region).order_by(Region.code)).all()


def list_categories(session: Session) -> Sequence[Category]:
    return session.scalars(select(Category).order_by(Category.code)).all()


def list_services(
    session: Session,
    *,
    facility_id: int | None = None,
    facility_ids: Iterable[int] | None = None,
    kind: ServiceKind | None = None,
) -> Sequence[Service]:
    """Services (active or not), optionally of some facilities or of one kind, with facility and category loaded."""
    stmt = select(Service).options(
        joinedload(Service.facility).joinedload(Facility.institution), joinedload(Service.category)
    )
    if facility_id is not None:
        stmt = stmt.where(Service.facility_id == facility_id)
    if facility_ids is not None:
        stmt = stmt.where(Service.facility_id.in_(list(facility_ids)))
    if kind is not None:
        stmt = stmt.where(Service.kind == kind)
    return session.scalars(stmt.order_by(Service.id)).all()



# ---------------------------------------------------------------------------------------------------------
# Services: writing


MAX_PRICE_FEN = 2_000_000_000  # the column is a 32-bit integer on PostgreSQL: ¥20 million per unit is plenty
MAX_TURNAROUND_DAYS = 3650
TEXT_LIMITS: dict[str, int] = {
    "name_zh": 200, "name_en": 200, "description_zh": 5000, "description_en": 5000,
    "sample_requirements_zh": 5000, "sample_requirements_en": 5000,
}
# What create_service and update_service accept besides the code (which never changes once orders cite it).
SERVICE_FIELDS = frozenset(
    {*TEXT_LIMITS, "kind", "category_code", "turnaround_days", "list_price_fen", "price_unit", "is_active",
     "accreditations", "instrument_ids"}
)
_CODE = re.compile(r"^[A-Z0-9][A-Z0-9._-]{0,39}$")
_SCHEME = re.compile(r"^[A-Z0-9][A-Z0-9&/._-]{0,19}$")


class DuplicateServiceCode(Conflict):
    code = "duplicate_code"


@dataclass(frozen=True)
class AccreditationIn:
    """One accreditation of a service as given by its manager, e.g. CMA 2023000123 valid until 2027-12-31."""

    scheme: str
    certificate_no: str = ""
    valid_until: date | None = None


def search_text_for_service(
    service: Service, facility: Facility, institution: Institution, category: Category, schemes: Iterable[str]
) -> tuple[str, str]:
    """The (name, body) token strings the full-text index stores for a service."""
    name = index_tokens(service.name_zh, service.name_en, service.code)
    body = index_tokens(
        service.description_zh, service.description_en, service.sample_requirements_zh,
        service.sample_requirements_en, category.name_zh, category.name_en, category.code.replace(".", " "),
        facility.name_zh, facility.name_en, institution.name_zh, institution.name_en, *schemes,
    )
    return name, body


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_service_rules(service: Service) -> None:
    if not isinstance(service.kind, ServiceKind):
        raise InvalidInput("kind is one of testing, rnd, consultation.", field="kind", code="invalid_choice")
    if not isinstance(service.price_unit, PriceUnit):
        raise InvalidInput("price_unit is one of sample, project, hour.", field="price_unit", code="invalid_choice")
    price = service.list_price_fen
    if price is not None and (not _is_int(price) or not 0 <= price <= MAX_PRICE_FEN):
        raise InvalidInput(
            f"list_price_fen is a whole number of fen from 0 to {MAX_PRICE_FEN}, or null for a quote on request.",
            field="list_price_fen", code="invalid_price",
        )
    days = service.turnaround_days
    if days is not None and (not _is_int(days) or not 0 <= days <= MAX_TURNAROUND_DAYS):
        raise InvalidInput(
            f"turnaround_days is a whole number from 0 to {MAX_TURNAROUND_DAYS}, or null.",
            field="turnaround_days", code="out_of_range", min=0, max=MAX_TURNAROUND_DAYS,
        )
    for name, limit in TEXT_LIMITS.items():
        value = getattr(service, name)
        if value is not None and not isinstance(value, str):
            raise InvalidInput(f"{name} must be text.", field=name, code="invalid_input")
        if len(value or "") > limit:
            raise InvalidInput(f"{name} is too long ({limit} characters at most).", field=name, code="too_long",
                               max=limit)
    if not (service.name_zh or "").strip() and not (service.name_en or "").strip():
        raise InvalidInput("Give the service a name (in Chinese, English or both).", field="name_zh",
                           code="missing_field")
    if service.is_active is None:
        service.is_active = True  # a new row before its first flush: the column's default
    if not isinstance(service.is_active, bool):
        raise InvalidInput("is_active must be true or false.", field="is_active", code="invalid_boolean")


def place_service(session: Session, service: Service, *, schemes: Iterable[str] | None = None) -> Service:
    """Validate a service and fill its copied region/institution and its search text, like place_instrument.

    Call after setting or changing facility, texts, category or accreditations, before flushing. `schemes` are
    the accreditation schemes to index; by default those stored for the service.
    """
    _check_service_rules(service)
    # No autoflush: a half-changed row must not reach the database before it is checked.
    with session.no_autoflush:
        facility = session.get(Facility, service.facility_id) if service.facility_id is not None else None
        if facility is None:
            raise InvalidInput("Unknown facility.", field="facility", code="unknown_facility")
        institution = session.get(Institution, facility.institution_id)
        assert institution is not None  # a foreign key guarantees it
        category = session.get(Category, service.category_code) if service.category_code else None
        if category is None:
            raise InvalidInput(f"Unknown category {service.category_code!r}.", field="category_code",
                               code="unknown_category")
        if schemes is None:
            schemes = [] if service.id is None else session.scalars(
                select(ServiceAccreditation.scheme).where(ServiceAccreditation.service_id == service.id)
            ).all()
    service.institution_id = facility.institution_id
    service.region_code = institution.region_code
    service.search_name, service.search_body = search_text_for_service(
        service, facility, institution, category, schemes
    )
    return service


def _as_accreditation(item: AccreditationIn | Mapping[str, Any]) -> AccreditationIn:
    if isinstance(item, AccreditationIn):
        return item
    if not isinstance(item, Mapping):
        raise InvalidInput("Each accreditation has a scheme, a certificate_no and a valid_until date.",
                           field="accreditations", code="invalid_accreditation")
    valid_until = item.get("valid_until")
    if isinstance(valid_until, str):
        try:
            valid_until = date.fromisoformat(valid_until) if valid_until.strip() else None
        except ValueError:
            raise InvalidInput("valid_until is a date written YYYY-MM-DD.", field="accreditations",
                               code="invalid_date") from None
    return AccreditationIn(scheme=str(item.get("scheme") or ""), certificate_no=str(item.get("certificate_no") or ""),
                           valid_until=valid_until)


def replace_accreditations(
    session: Session, service: Service, items: Iterable[AccreditationIn | Mapping[str, Any]]
) -> list[ServiceAccreditation]:
    """Make `items` the service's accreditations (no permission check: for set_accreditations and loaders)."""
    cleaned: list[AccreditationIn] = []
    for raw in items:
        item = _as_accreditation(raw)
        scheme = item.scheme.strip().upper()
        certificate = item.certificate_no.strip()
        if not _SCHEME.match(scheme):
            raise InvalidInput(f"Unknown accreditation scheme {item.scheme!r}: a short code such as CMA or CNAS.",
                               field="accreditations", code="invalid_scheme")
        if len(certificate) > 80:
            raise InvalidInput("A certificate number has 80 characters at most.", field="accreditations",
                               code="too_long", max=80)
        if item.valid_until is not None and not isinstance(item.valid_until, date):
            raise InvalidInput("valid_until is a date written YYYY-MM-DD.", field="accreditations",
                               code="invalid_date")
        if any(c.scheme == scheme for c in cleaned):
            raise InvalidInput(f"The scheme {scheme} is given twice.", field="accreditations",
                               code="duplicate_scheme")
        cleaned.append(AccreditationIn(scheme, certificate, item.valid_until))
    session.execute(delete(ServiceAccreditation).where(ServiceAccreditation.service_id == service.id))
    rows = [ServiceAccreditation(service_id=service.id, scheme=c.scheme, certificate_no=c.certificate_no,
                                 valid_until=c.valid_until) for c in cleaned]
    session.add_all(rows)
    place_service(session, service, schemes=[c.scheme for c in cleaned])
    session.flush()
    return rows


def replace_instruments(session: Session, service: Service, instrument_ids: Iterable[int]) -> list[Instrument]:
    """Make these the instruments the service uses; each must belong to the service's facility (no permission
    check: for set_instruments and loaders)."""
    wanted: list[int] = []
    for value in instrument_ids:
        if not _is_int(value):
            raise InvalidInput("instrument_ids lists instrument ids.", field="instrument_ids", code="invalid_input")
        if value not in wanted:
            wanted.append(value)
    # An id beyond the id range names no instrument (and would fail in the query).
    known = [i for i in wanted if 0 < i <= MAX_ID]
    found = {i.id: i for i in session.scalars(select(Instrument).where(Instrument.id.in_(known)))} if known else {}
    missing = [i for i in wanted if i not in found]
    if missing:
        raise InvalidInput(f"Instrument {missing[0]} does not exist.", field="instrument_ids",
                           code="unknown_instrument", instrument_id=missing[0])
    elsewhere = [i for i in wanted if found[i].facility_id != service.facility_id]
    if elsewhere:
        raise InvalidInput(
            f"Instrument {found[elsewhere[0]].code} belongs to another facility; a service uses its own "
            "facility's instruments.", field="instrument_ids", code="instrument_of_another_facility",
            instrument_id=elsewhere[0],
        )
    session.execute(delete(ServiceInstrument).where(ServiceInstrument.service_id == service.id))
    session.add_all(ServiceInstrument(service_id=service.id, instrument_id=i) for i in wanted)
    session.flush()
    return [found[i] for i in wanted]


def _apply_fields(service: Service, fields: Mapping[str, Any]) -> None:
    """Copy given fields onto the service, turning choice names into enums; place_service checks the rest."""
    for name, value in fields.items():
        if name == "kind":
            try:
                value = ServiceKind(value)
            except ValueError:
                raise InvalidInput("kind is one of testing, rnd, consultation.", field="kind",
                                   code="invalid_choice") from None
        elif name == "price_unit":
            try:
                value = PriceUnit(value)
            except ValueError:
                raise InvalidInput("price_unit is one of sample, project, hour.", field="price_unit",
                                   code="invalid_choice") from None
        elif name in TEXT_LIMITS:
            if value is None:
                value = ""
            if isinstance(value, str):
                value = value.strip()
        elif name == "category_code" and isinstance(value, str):
            value = value.strip().upper()
        setattr(service, name, value)


def _check_known(fields: Mapping[str, Any]) -> None:
    unknown = sorted(set(fields) - SERVICE_FIELDS)
    if unknown:
        code = "immutable_field" if unknown[0] in ("code", "facility_id", "facility") else "unknown_field"
        raise InvalidInput(f"The field {unknown[0]!r} cannot be set here.", field=unknown[0], code=code)


def _require_editor(session: Session, actor: Actor, facility_id: int) -> Facility:
    """The facility, if the actor may edit its catalogue; NotFound for an unknown one, Forbidden otherwise."""
    facility = session.get(Facility, facility_id)
    if facility is None:
        raise NotFound(f"Facility {facility_id} does not exist.", field="facility")
    roles.require(actor, Action.edit_facility_catalogue, facility=FacilityRef.of(facility))
    return facility


def facility_by_code(session: Session, code: str) -> Facility:
    """A facility by its code; NotFound (on field `facility`) if there is none."""
    facility = session.scalar(select(Facility).where(Facility.code == code.strip().upper()))
    if facility is None:
        raise NotFound(f"No facility {code!r}.", field="facility")
    return facility


def editable_facilities(session: Session, actor: Actor) -> list[Facility]:
    """The facilities whose catalogue the actor may edit, by code, with their institutions loaded."""
    stmt = select(Facility).options(joinedload(Facility.institution)).order_by(Facility.code)
    if not roles.is_platform_admin(actor):
        facility_ids = [g.facility_id for g in actor.grants if g.facility_id is not None]
        institution_ids = [g.institution_id for g in actor.grants if g.institution_id is not None]
        stmt = stmt.where(or_(Facility.id.in_(facility_ids), Facility.institution_id.in_(institution_ids)))
    return [f for f in session.scalars(stmt) if roles.authorize(actor, Action.edit_facility_catalogue,
                                                                 facility=FacilityRef.of(f))]


def create_service(session: Session, actor: Actor, facility_id: int, *, code: str, **fields: Any) -> Service:
    """A new service of a facility; needs edit_facility_catalogue on it. `fields` are SERVICE_FIELDS.

    kind, name (zh or en) and category_code are required; list_price_fen None means a quote on request.
    """
    roles.require_some(actor, Action.edit_facility_catalogue)
    facility = _require_editor(session, actor, facility_id)
    _check_known(fields)
    code = (code or "").strip().upper() if isinstance(code, str) else ""
    if not _CODE.match(code):
        raise InvalidInput("A service code has 1–40 letters, digits, dots, dashes or underscores.", field="code",
                           code="invalid_code")
    if session.scalar(select(Service.id).where(Service.code == code)) is not None:
        raise DuplicateServiceCode(f"A service with code {code} already exists.", field="code")
    for required in ("kind", "category_code"):
        if fields.get(required) in (None, ""):
            raise InvalidInput(f"{required} is required.", field=required, code="missing_field")
    accreditations = fields.pop("accreditations", None)
    instrument_ids = fields.pop("instrument_ids", None)
    service = Service(code=code, facility_id=facility.id, price_unit=PriceUnit.sample, is_active=True,
                      **{name: "" for name in TEXT_LIMITS})
    _apply_fields(service, fields)
    place_service(session, service, schemes=[])
    try:
        with session.begin_nested():
            session.add(service)
            session.flush()
    except IntegrityError as exc:  # the same code created concurrently
        raise DuplicateServiceCode(f"A service with code {code} already exists.", field="code") from exc
    if accreditations is not None:
        replace_accreditations(session, service, accreditations)
    if instrument_ids is not None:
        replace_instruments(session, service, instrument_ids)
    return service


def update_service(session: Session, actor: Actor, service_id: int, **fields: Any) -> Service:
    """Change the fields given (SERVICE_FIELDS); needs edit_facility_catalogue. Deactivate with is_active=False:
    services are never deleted, orders refer to them."""
    roles.require_some(actor, Action.edit_facility_catalogue)
    service = session.get(Service, service_id)
    if service is None:
        raise NotFound(f"Service {service_id} does not exist.", field="service_id")
    _require_editor(session, actor, service.facility_id)
    _check_known(fields)
    for required in ("kind", "category_code", "price_unit", "is_active"):
        if required in fields and fields[required] is None:
            raise InvalidInput(f"{required} may not be null.", field=required, code="missing_field")
    accreditations = fields.pop("accreditations", None)
    instrument_ids = fields.pop("instrument_ids", None)
    _apply_fields(service, fields)
    place_service(session, service)
    if accreditations is not None:
        replace_accreditations(session, service, accreditations)
    if instrument_ids is not None:
        replace_instruments(session, service, instrument_ids)
    session.flush()
    return service


def service_for_editing(session: Session, actor: Actor, service_id: int) -> Service:
    """A service whose facility's catalogue the actor may edit (Forbidden first for those who edit none)."""
    roles.require_some(actor, Action.edit_facility_catalogue)
    service = session.get(Service, service_id)
    if service is None:
        raise NotFound(f"Service {service_id} does not exist.", field="service_id")
    _require_editor(session, actor, service.facility_id)
    return service


def set_accreditations(
    session: Session, actor: Actor, service_id: int, items: Iterable[AccreditationIn | Mapping[str, Any]]
) -> list[ServiceAccreditation]:
    """Replace a service's accreditations; needs edit_facility_catalogue on its facility."""
    return replace_accreditations(session, service_for_editing(session, actor, service_id), items)


def set_instruments(session: Session, actor: Actor, service_id: int, instrument_ids: Iterable[int]) -> list[Instrument]:
    """Replace the instruments a service uses (its own facility's); needs edit_facility_catalogue."""
    return replace_instruments(session, service_for_editing(session, actor, service_id), instrument_ids)


def parse_yuan(value: str, field: str) -> int | None:
    """Yuan as typed in a form ("1800", "1,800.50", "¥45") as integer fen; None for an empty field."""
    cleaned = value.strip().replace(",", "").replace("，", "").lstrip("¥￥").strip()
    if not cleaned:
        return None
    match = re.fullmatch(r"(\d{1,9})(?:\.(\d{1,2}))?", cleaned)
    if match is None:
        raise InvalidInput("Enter an amount in yuan, such as 1800 or 1800.50.", field=field, code="invalid_amount")
    return int(match.group(1)) * 100 + int((match.group(2) or "0").ljust(2, "0"))


def parse_accreditation_lines(value: str) -> list[AccreditationIn]:
    """Lines "SCHEME CERTIFICATE-NO [YYYY-MM-DD]" (e.g. "CMA 2023000123 2027-12-31") as accreditations."""
    items: list[AccreditationIn] = []
    for number, line in enumerate(value.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        valid_until = None
        if len(parts) > 1 and re.fullmatch(r"\d{4}-\d{1,2}-\d{1,2}", parts[-1]):
            try:
                y, m, d = (int(p) for p in parts[-1].split("-"))
                valid_until = date(y, m, d)
            except ValueError:
                raise InvalidInput(f"Line {number}: {parts[-1]} is not a date.", field="accreditations",
                                   code="invalid_date", line=number) from None
            parts = parts[:-1]
        items.append(AccreditationIn(scheme=parts[0], certificate_no=" ".join(parts[1:]), valid_until=valid_until))
    return items


def accreditation_lines(items: Iterable[ServiceAccreditation | AccreditationIn]) -> str:
    """Accreditations as the lines parse_accreditation_lines reads."""
    return "\n".join(
        " ".join(p for p in (a.scheme, a.certificate_no, a.valid_until.isoformat() if a.valid_until else "") if p)
        for a in items
    )


# ---------------------------------------------------------------------------------------------------------
# Services: reading and searching

# The kinds in the order pages list them, with their names for facets (pages translate their own labels).
KIND_LABELS: dict[ServiceKind, tuple[str, str]] = {
    ServiceKind.testing: ("检验检测", "Testing"),
    ServiceKind.rnd: ("委托研发", "R&D"),
    ServiceKind.consultation: ("技术咨询", "Consultation"),
}


@dataclass(frozen=True)
class ServiceQuery:
    """What a service search asks for; every field narrows the result. Codes for institution and facility."""

    q: str = ""
    kind: ServiceKind | None = None
    region: str | None = None
    institution: str | None = None
    category: str | None = None
    facility: str | None = None
    include_inactive: bool = False


@dataclass
class ServiceResults:
    """One page of services; facets by kind, region, institution and category when asked for."""

    items: list[Service]
    next_cursor: str | None
    facets: dict[str, list[FacetValue]] | None = None
    ranks: dict[int, float] = field(default_factory=dict)


@dataclass
class ServiceDetail:
    """A service with everything its page shows."""

    service: Service
    institution: Institution
    region: Region
    accreditations: list[ServiceAccreditation]
    instruments: list[Instrument]
    rating_average: float | None
    rating_count: int


def service_filters(query: ServiceQuery, *, skip: str | None = None) -> list[ColumnElement[bool]]:
    """WHERE clauses for everything but the text; `skip` leaves one facet's own filter out."""
    clauses: list[ColumnElement[bool]] = []
    if not query.include_inactive:
        clauses.append(Service.is_active == true())
    if query.kind and skip != "kind":
        clauses.append(Service.kind == query.kind)
    if query.region and skip != "region":
        clauses.append(Service.region_code == query.region)
    if query.institution and skip != "institution":
        clauses.append(Service.institution_id.in_(select(Institution.id).where(Institution.code == query.institution)))
    if query.category and skip != "category":
        clauses.append(category_clause(Service.category_code, query.category))
    if query.facility:
        clauses.append(Service.facility_id.in_(select(Facility.id).where(Facility.code == query.facility)))
    return clauses


def _validate_services(query: ServiceQuery) -> None:
    if len(query.q) > 200:
        raise InvalidInput("The search text is too long (200 characters at most).", field="q")


def search_services(
    session: Session,
    query: ServiceQuery,
    *,
    limit: int = 20,
    cursor: str | None = None,
    with_facets: bool = False,
) -> ServiceResults:
    """One page of services matching `query`, best match first (by id without text), with a cursor."""
    _validate_services(query)
    items, next_cursor, ranks = _ranked_page(
        session, Service, text_match(session, query.q, Service), service_filters(query), limit=limit, cursor=cursor,
        options=[joinedload(Service.facility).joinedload(Facility.institution).joinedload(Institution.region),
                 joinedload(Service.category)],
    )
    page = ServiceResults(items=items, next_cursor=next_cursor, ranks=ranks)
    if with_facets:
        page.facets = service_facet_counts(session, query)
    return page


def service_facet_counts(
    session: Session, query: ServiceQuery, *, dims: Sequence[str] = ("kind", "region", "institution", "category")
) -> dict[str, list[FacetValue]]:
    """Counts by kind (every kind, zeros too), region, institution and category; each ignores its own filter."""
    _validate_services(query)
    match = text_match(session, query.q, Service)

    def grouped(column: Any, skip: str) -> list[tuple[Any, int]]:
        return _grouped_counts(session, Service, match, service_filters(query, skip=skip), column)

    facets: dict[str, list[FacetValue]] = {}
    if "kind" in dims:
        kinds = {str(k): n for k, n in grouped(Service.kind, "kind")}
        facets["kind"] = [FacetValue(k.value, zh, en, kinds.get(k.value, 0)) for k, (zh, en) in KIND_LABELS.items()]
    if "region" in dims:
        facets["region"] = _region_facet(session, grouped(Service.region_code, "region"))
    if "institution" in dims:
        facets["institution"] = _institution_facet(session, grouped(Service.institution_id, "institution"))
    if "category" in dims:
        facets["category"] = _category_facet(session, grouped(Service.category_code, "category"))
    return facets


def service_ratings(session: Session, service_ids: Iterable[int]) -> dict[int, tuple[float, int]]:
    """Average score (1–5) and number of ratings per service; services without ratings are left out."""
    ids = list(set(service_ids))
    if not ids:
        return {}
    rows = session.execute(
        select(OrderRating.service_id, func.avg(OrderRating.score), func.count())
        .where(OrderRating.service_id.in_(ids))
        .group_by(OrderRating.service_id)
    ).all()
    return {service_id: (float(average), int(count)) for service_id, average, count in rows}


def latest_ratings(session: Session, service_id: int, *, limit: int = 5) -> list[OrderRating]:
    """The newest ratings of a service that carry a comment."""
    return list(session.scalars(
        select(OrderRating)
        .where(OrderRating.service_id == service_id, OrderRating.comment != "")
        .order_by(OrderRating.created_at.desc(), OrderRating.order_id.desc())
        .limit(limit)
    ))


def service_schemes(session: Session, service_ids: Iterable[int]) -> dict[int, list[str]]:
    """The accreditation schemes (CMA, CNAS, …) of each service, for badges in result lists."""
    ids = list(set(service_ids))
    result: dict[int, list[str]] = {i: [] for i in ids}
    if ids:
        rows = session.execute(
            select(ServiceAccreditation.service_id, ServiceAccreditation.scheme)
            .where(ServiceAccreditation.service_id.in_(ids))
            .order_by(ServiceAccreditation.scheme)
        )
        for service_id, scheme in rows:
            result[service_id].append(scheme)
    return result


def load_service(session: Session, service_id: int) -> Service:
    """One service (active or not) with facility, institution, region and category loaded; NotFound if absent."""
    # populate_existing: a service already in the session (just created, or listed) gets its relations loaded.
    service = session.execute(
        select(Service).where(Service.id == service_id).options(
            joinedload(Service.facility).joinedload(Facility.institution).joinedload(Institution.region),
            joinedload(Service.category),
        ).execution_options(populate_existing=True)
    ).unique().scalar_one_or_none()
    if service is None:
        raise NotFound(f"Service {service_id} does not exist.", field="service_id")
    return service


def get_service(session: Session, service_id: int) -> ServiceDetail:
    """A service with facility, institution, region, category, accreditations, instruments used and rating."""
    service = load_service(session, service_id)
    accreditations = list(session.scalars(
        select(ServiceAccreditation).where(ServiceAccreditation.service_id == service_id)
        .order_by(ServiceAccreditation.scheme)
    ))
    instruments = list(session.scalars(
        select(Instrument).join(ServiceInstrument, ServiceInstrument.instrument_id == Instrument.id)
        .where(ServiceInstrument.service_id == service_id).order_by(Instrument.code)
    ))
    rating = service_ratings(session, [service_id]).get(service_id)
    institution = service.facility.institution
    return ServiceDetail(
        service=service, institution=institution, region=institution.region, accreditations=accreditations,
        instruments=instruments, rating_average=rating[0] if rating else None, rating_count=rating[1] if rating else 0,
    )


def service_by_code(session: Session, code: str) -> ServiceDetail:
    """get_service by the service's code; NotFound if there is none."""
    service_id = session.scalar(select(Service.id).where(Service.code == code.strip().upper()))
    if service_id is None:
        raise NotFound(f"No service {code!r}.", field="code")
    return get_service(session, service_id)


def facility_for_editing(session: Session, actor: Actor, code: str) -> Facility:
    """A facility by code whose catalogue the actor may edit: Forbidden for those who edit none, else NotFound
    for an unknown code and Forbidden for another facility."""
    roles.require_some(actor, Action.edit_facility_catalogue)
    return _require_editor(session, actor, facility_by_code(session, code).id)


def facility_instruments(session: Session, facility_id: int) -> list[Instrument]:
    """A facility's instruments by code (what its services may use)."""
    return list(session.scalars(select(Instrument).where(Instrument.facility_id == facility_id)
                                .order_by(Instrument.code)))
