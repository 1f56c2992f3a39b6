"""Catalogue pages: the search home page (instruments or services) and an instrument's page with its week
calendar."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse

from labcommons.booking import policy as booking_policy
from labcommons.booking import service as booking
from labcommons.catalog import service
from labcommons.catalog.models import Instrument, InstrumentStatus, OpenTo, PriceUnit, ServiceKind
from labcommons.db import Database, utcnow
from labcommons.errors import InvalidInput
from labcommons.http import page_actor, request_db
from labcommons.i18n import gettext_ as _
from labcommons.i18n import ngettext_ as ngettext
from labcommons.pages import is_htmx, parse_local_datetime, render, user_zone, yuan

router = APIRouter(include_in_schema=False)

PAGE_SIZE = 20


def status_label(status: InstrumentStatus | str) -> str:
    """An instrument status in the current language."""
    return {
        "active": _("Available"),
        "maintenance": _("Under maintenance"),
        "retired": _("Retired"),
    }.get(str(status), str(status))


def open_to_label(open_to: OpenTo | str) -> str:
    return {
        "everyone": _("Everyone, in both regions"),
        "region": _("Users in the instrument's own region"),
        "institution": _("Users of the instrument's own institution"),
    }.get(str(open_to), str(open_to))


def _facet_titles() -> dict[str, str]:
    return {
        "region": _("Region"),
        "institution": _("Institution"),
        "category": _("Category"),
        "status": _("Status"),
        "kind": _("Type"),
    }


def kind_label(kind: ServiceKind | str) -> str:
    """A search kind (instruments or a service kind) in the current language."""
    return {
        "instrument": _("Instruments"),
        "testing": _("Testing"),
        "rnd": _("R&D"),
        "consultation": _("Consultation"),
    }.get(str(kind), str(kind))


def price_text(fen: int | None, unit: PriceUnit | str) -> str:
    """A service's list price per unit, or "quote on request" when it has none."""
    if fen is None:
        return _("Quote on request")
    per = {"sample": _("per sample"), "project": _("per project"), "hour": _("per hour")}.get(str(unit), "")
    return f"{yuan(fen)} {per}".strip()


def turnaround_text(days: int | None) -> str:
    """A turnaround in working days, or nothing when the facility gives none."""
    if days is None:
        return ""
    return ngettext("Results in %(num)s day", "Results in %(num)s days", days) % {"num": days}


def rating_text(average: float | None, count: int) -> str:
    """An average score with the number of ratings: ★ 4.5 (12 ratings)."""
    if average is None or not count:
        return _("Not rated yet")
    return ngettext("★ %(avg)s (%(num)s rating)", "★ %(avg)s (%(num)s ratings)", count) % {
        "avg": f"{average:.1f}", "num": count}


def _search_message(exc: InvalidInput) -> str:
    return {
        "invalid_window": _("The end of the free window must be after its start."),
        "missing_field": _("Give both the start and the end of the free window."),
        "invalid_cursor": _("That page link is no longer valid; start the search again."),
    }.get(exc.code, _("The search text is too long (200 characters at most).") if exc.field == "q"
          else _("Some of what was sent is not valid."))


@router.get("/", response_class=HTMLResponse)
def home(
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    q: str = "",
    kind: Annotated[str | None, Query(max_length=20)] = None,
    region: Annotated[str | None, Query(max_length=16)] = None,
    institution: Annotated[str | None, Query(max_length=40)] = None,
    category: Annotated[str | None, Query(max_length=32)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    free_from: Annotated[str, Query(max_length=40)] = "",
    free_to: Annotated[str, Query(max_length=40)] = "",
    cursor: Annotated[str | None, Query(max_length=500)] = None,
) -> HTMLResponse:
    """Search instruments or, with a service `kind`, services; htmx asks for just the results block while the
    user types."""
    service_kind: ServiceKind | None = None
    if kind:
        try:
            service_kind = ServiceKind(kind)
        except ValueError:
            kind = None  # an unknown kind (an old link) falls back to instruments
    if service_kind is not None:
        return _service_search(request, db, q, service_kind, region, institution, category, cursor)
    errors: list[str] = []
    window: list[datetime | None] = []
    for raw in (free_from, free_to):
        try:
            window.append(parse_local_datetime(request, raw))
        except ValueError:
            window.append(None)
            errors.append(_("Enter the free window as a date and a time."))
    wanted_status: InstrumentStatus | None = None
    if status:
        try:
            wanted_status = InstrumentStatus(status)
        except ValueError:
            errors.append(_("Unknown status."))
    query = service.InstrumentQuery(
        q=q.strip(), region=region or None, institution=institution or None, category=category or None,
        status=wanted_status, free_from=window[0], free_to=window[1],
    )
    page = None
    kind_facet: list[service.FacetValue] = []
    if not errors:
        try:
            with db.unit_of_work(write=False) as session:
                page = service.search_instruments(
                    session, query, limit=PAGE_SIZE, cursor=cursor or None, with_facets=True
                )
                kind_facet = service.service_facet_counts(
                    session, service.ServiceQuery(q=query.q, region=query.region, institution=query.institution,
                                                  category=query.category), dims=("kind",),
                )["kind"]
        except InvalidInput as exc:
            errors.append(_search_message(exc))
    facets = page.facets if page and page.facets else {}
    # The region facet ignores only the region filter, so it also yields the exact total.
    region_counts = {f.value: f.count for f in facets.get("region", [])}
    total = region_counts.get(region, 0) if region else sum(region_counts.values())
    # Beyond service.FACET_CAP matches the counts are lower bounds: the page says "1,000+".
    total_capped = any(f.capped for f in facets.get("region", []))
    if total_capped:
        total = service.FACET_CAP
    if page is not None:
        kind_facet = [service.FacetValue("instrument", "仪器", "Instruments", total, capped=total_capped),
                      *kind_facet]
    context: dict[str, Any] = dict(
        q=q, query=query, page=page, facets=facets, facet_titles=_facet_titles(), errors=errors, total=total,
        total_capped=total_capped,
        selected={"region": region, "institution": institution, "category": category, "status": status},
        free_from=free_from, free_to=free_to, cursor=cursor, status_label=status_label, kind=None,
        kind_facet=kind_facet, kind_label=kind_label, dims=["region", "institution", "category", "status"],
    )
    code = 422 if errors else 200
    if is_htmx(request) and request.headers.get("hx-target") == "results":
        return render(request, "catalog/_results.html", code, **context)
    return render(request, "catalog/search.html", code, **context)


def _service_search(
    request: Request, db: Database, q: str, kind: ServiceKind, region: str | None, institution: str | None,
    category: str | None, cursor: str | None,
) -> HTMLResponse:
    """The home page listing services of one kind, with the same facets (no status or free window)."""
    errors: list[str] = []
    query = service.ServiceQuery(q=q.strip(), kind=kind, region=region or None, institution=institution or None,
                                 category=category or None)
    page = None
    kind_facet: list[service.FacetValue] = []
    ratings: dict[int, tuple[float, int]] = {}
    schemes: dict[int, list[str]] = {}
    try:
        with db.unit_of_work(write=False) as session:
            page = service.search_services(session, query, limit=PAGE_SIZE, cursor=cursor or None, with_facets=True)
            ids = [s.id for s in page.items]
            ratings = service.service_ratings(session, ids)
            schemes = service.service_schemes(session, ids)
            instruments = service.instrument_count(session, service.InstrumentQuery(
                q=query.q, region=query.region, institution=query.institution, category=query.category))
            kind_facet = [service.FacetValue("instrument", "仪器", "Instruments", instruments),
                          *(page.facets or {}).get("kind", [])]
    except InvalidInput as exc:
        errors.append(_search_message(exc))
    facets = page.facets if page and page.facets else {}
    # The kind facet ignores only the kind filter, so the chosen kind's count is the exact total.
    total = next((f.count for f in kind_facet if f.value == kind.value), 0)
    context: dict[str, Any] = dict(
        q=q, query=query, page=page, facets=facets, facet_titles=_facet_titles(), errors=errors, total=total,
        selected={"region": region, "institution": institution, "category": category},
        free_from="", free_to="", cursor=cursor, status_label=status_label, kind=kind.value, kind_facet=kind_facet,
        kind_label=kind_label, dims=["region", "institution", "category"], ratings=ratings, schemes=schemes,
        price_text=price_text, turnaround_text=turnaround_text, rating_text=rating_text,
    )
    code = 422 if errors else 200
    if is_htmx(request) and request.headers.get("hx-target") == "results":
        return render(request, "catalog/_results.html", code, **context)
    return render(request, "catalog/search.html", code, **context)


# ---------------------------------------------------------------------------------------------------------
# The instrument page


@dataclass(frozen=True)
class Cell:
    """One hour of one day in the user's zone; `state`: free, booked, partial, mine, past or closed."""

    day: date
    hour: int
    state: str


@dataclass(frozen=True)
class WeekCalendar:
    monday: date
    days: list[date]
    rows: list[tuple[int, list[Cell]]]
    today: date

    @property
    def prev_week(self) -> date:
        return self.monday - timedelta(days=7)

    @property
    def next_week(self) -> date:
        return self.monday + timedelta(days=7)


def _monday(day: date) -> date:
    return day - timedelta(days=day.weekday())


def week_calendar(
    request: Request, db: Database, instrument: Instrument, monday: date, *, now: datetime
) -> WeekCalendar:
    """Seven days by 24 hours of one instrument, free or booked; never says who booked."""
    zone = user_zone(request)
    actor = page_actor(request)
    days = [monday + timedelta(days=i) for i in range(7)]
    window_start = datetime.combine(monday, time(0), tzinfo=zone).astimezone(UTC)
    window_end = datetime.combine(monday + timedelta(days=7), time(0), tzinfo=zone).astimezone(UTC)
    with db.unit_of_work(write=False) as session:
        taken = [
            (b.starts_at, b.ends_at, actor is not None and b.user_id == actor.user_id)
            for b in booking.week_bookings(session, instrument.id, window_start, window_end)
        ]
    bookable = instrument.status == InstrumentStatus.active
    rows: list[tuple[int, list[Cell]]] = []
    for hour in range(24):
        cells = []
        for day in days:
            start = datetime.combine(day, time(hour), tzinfo=zone).astimezone(UTC)
            end_local = datetime.combine(day, time(hour + 1), tzinfo=zone) if hour < 23 else \
                datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
            end = end_local.astimezone(UTC)
            covered = timedelta()
            mine = False
            for b_start, b_end, own in taken:
                overlap = min(end, b_end) - max(start, b_start)
                if overlap > timedelta():
                    covered += overlap
                    mine = mine or own
            if covered:
                state = "mine" if mine else ("booked" if covered >= end - start else "partial")
            elif end <= now or not bookable:
                state = "past" if end <= now else "closed"
            else:
                state = "free"
            cells.append(Cell(day, hour, state))
        rows.append((hour, cells))
    return WeekCalendar(monday=monday, days=days, rows=rows, today=now.astimezone(zone).date())


def duration_choices(instrument: Instrument) -> list[int]:
    """Allowed booking lengths in minutes, on the slot grid, capped so the list stays short."""
    step = instrument.slot_minutes
    lengths = list(range(instrument.min_booking_minutes, instrument.max_booking_minutes + 1, step))
    return lengths[:96]


def render_instrument_page(
    request: Request,
    db: Database,
    instrument_id: int,
    *,
    week: date | None = None,
    form: dict[str, str] | None = None,
    error: str | None = None,
    error_field: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    """The instrument page; the booking POST re-renders it with the form values and the problem."""
    now = utcnow()
    with db.unit_of_work(write=False) as session:
        instrument = service.get_instrument(session, instrument_id)
        policy = booking_policy.policy_for(session, instrument_id)
    zone = user_zone(request)
    if week is not None and not date.min + timedelta(days=14) <= week <= date.max - timedelta(days=21):
        week = None  # a week at the edge of what datetime holds (year 1 or 9999): its calendar would overflow
    monday = _monday(week or now.astimezone(zone).date())
    calendar = week_calendar(request, db, instrument, monday, now=now)
    values = {"date": "", "start": "", "end": "", "duration": "", "purpose": ""}
    values.update(form or {})
    context: dict[str, Any] = dict(
        instrument=instrument, calendar=calendar, form=values, error=error, error_field=error_field,
        status_label=status_label, open_to_label=open_to_label, durations=duration_choices(instrument),
        today=now.astimezone(zone).date().isoformat(), policy=policy,
    )
    if is_htmx(request) and request.headers.get("hx-target") == "calendar":
        return render(request, "catalog/_calendar.html", status_code, **context)
    # A POST re-rendering the page points the language links at the page's own address.
    page_path = None if request.method == "GET" else f"/instruments/{instrument_id}"
    return render(request, "catalog/instrument.html", status_code, page_path=page_path, **context)


@router.get("/instruments/{instrument_id}", response_class=HTMLResponse)
def instrument_page(
    instrument_id: int,
    request: Request,
    db: Annotated[Database, Depends(request_db)],
    week: Annotated[str | None, Query(max_length=10)] = None,
    date_: Annotated[str, Query(alias="date", max_length=10)] = "",
    start: Annotated[str, Query(max_length=5)] = "",
) -> HTMLResponse:
    """An instrument's details, its week calendar and, for signed-in users, the booking form."""
    try:
        week_day = date.fromisoformat(week) if week else None
    except ValueError:
        week_day = None
    # A free calendar cell links here with its date and hour to fill in the booking form.
    form = {"date": date_, "start": start} if date_ and start else None
    return render_instrument_page(request, db, instrument_id, week=week_day, form=form)
