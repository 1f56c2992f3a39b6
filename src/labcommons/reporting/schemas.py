"""API shapes of the sharing statistics (docs/metrics.md defines every figure).

Durations are integer minutes (`*_min`), money integer fen (`*_fen`), rates fractions rounded to four places
(0.2531 = 25.31 %) or null when their denominator is zero; days are local days of the platform's time zone.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Literal

from pydantic import BaseModel, Field

from labcommons.reporting.service import InstrumentRow, Scope

Rate = float | None


class ScopeRead(BaseModel):
    token: str = Field(description="What `scope=` takes: platform, region:CQ, institution:3 or facility:7",
                       examples=["region:CQ"])
    kind: Literal["platform", "region", "institution", "facility"]
    key: str = Field(description="Region code, institution or facility id as text; empty for the platform")
    name_zh: str
    name_en: str

    @classmethod
    def of(cls, scope: Scope) -> ScopeRead:
        return cls(token=scope.token, kind=scope.kind.value, key=scope.key, name_zh=scope.name_zh,
                   name_en=scope.name_en)


class ScopeList(BaseModel):
    items: list[ScopeRead] = Field(description="The scopes whose statistics you may read, widest first")


class PeriodRead(BaseModel):
    first: date = Field(description="First local day, included")
    last: date = Field(description="Last local day, included")


class TotalsRead(BaseModel):
    """The headline figures of a scope and period."""

    instruments: int = Field(description="Bookable (not retired) instruments in the scope")
    bookings: int = Field(description="Counted use bookings starting in the period")
    booked_min: int
    effective_min: int = Field(description="Effective machine minutes, days before today only")
    ext_institution_min: int = Field(description="Effective minutes of users from other institutions")
    ext_region_min: int = Field(description="Effective minutes of users from other regions")
    maintenance_min: int
    available_min: int = Field(description="Opening minutes of bookable instruments minus maintenance within them")
    utilisation: Rate = Field(description="booked_min / available_min")
    external_share: Rate = Field(description="ext_institution_min / effective_min")
    ext_region_share: Rate = Field(description="ext_region_min / effective_min")
    users: int = Field(description="Distinct bookers of use bookings starting in the period")
    institutions: int = Field(description="Distinct institutions of those bookers")
    started_bookings: int = Field(description="Use bookings that started before today (the no-show denominator)")
    no_shows: int
    no_show_rate: Rate
    median_lead_hours: float | None = Field(description="Median hours from booking to start (bucket-interpolated)")
    orders: int = Field(description="Service orders submitted in the period")
    orders_completed: int = Field(description="Orders whose first results were delivered in the period")
    median_turnaround_days: float | None
    revenue_fen: int = Field(description="Charges by service date, reversals included (negative)")
    external_revenue_fen: int = Field(description="Charges paid by other institutions")
    rating_average: float | None
    ratings: int


class SeriesPointRead(BaseModel):
    start: date = Field(description="First day of the day, week (Monday) or month the point covers")
    booked_min: int
    effective_min: int
    available_min: int
    utilisation: Rate


class InstrumentRowRead(BaseModel):
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
    utilisation: Rate
    no_shows: int
    retired: bool = Field(description="Listed only for a period in which it had bookings; open for none of it")

    @classmethod
    def of(cls, row: InstrumentRow) -> InstrumentRowRead:
        return cls(instrument_id=row.instrument_id, code=row.code, name_zh=row.name_zh, name_en=row.name_en,
                   facility_id=row.facility_id, region_code=row.region_code, bookings=row.bookings,
                   booked_min=row.booked_min, effective_min=row.effective_min,
                   ext_institution_min=row.ext_institution_min, ext_region_min=row.ext_region_min,
                   available_min=row.available_min, utilisation=row.utilisation, no_shows=row.no_shows,
                   retired=row.retired)


class BreakdownRowRead(BaseModel):
    kind: Literal["region", "institution", "facility"] = Field(description="What the row is a part of the scope")
    key: str
    name_zh: str
    name_en: str
    instruments: int
    booked_min: int
    effective_min: int
    ext_institution_min: int
    ext_region_min: int
    available_min: int
    utilisation: Rate
    revenue_fen: int


class FlowRead(BaseModel):
    provider_region: str = Field(description="Region of the instrument or facility that served")
    user_region: str = Field(description="Region of the booker (hours) or of the paying institution (money)")
    booked_min: int
    effective_min: int
    revenue_fen: int


class DashboardRead(BaseModel):
    """Every figure and chart of one scope's dashboard for one period."""

    scope: ScopeRead
    period: PeriodRead
    today: date = Field(description="The platform's local date the figures were computed on")
    totals: TotalsRead
    granularity: Literal["day", "week", "month"] = Field(description="Of `series`: day up to 45 days, week up "
                                                                     "to 200, month beyond")
    series: list[SeriesPointRead]
    heatmap: list[list[int]] = Field(description="Booked minutes [weekday 0=Monday][local hour 0-23]")
    top: list[InstrumentRowRead] = Field(description="Up to 10 busiest instruments (effective, then booked)")
    idle: list[InstrumentRowRead] = Field(description="Up to 10 least used instruments (lowest utilisation)")
    idle_count: int = Field(description="Instruments with no booked time in the period")
    flows: list[FlowRead]
    turnaround_days: list[float] = Field(description="Turnaround of each order delivered in the period, sorted")
    breakdown: list[BreakdownRowRead] = Field(description="Regions of the platform, institutions of a region, "
                                                          "facilities of an institution; empty for a facility")


InstrumentSort = Literal["code", "-code", "booked_hours", "-booked_hours", "effective_hours", "-effective_hours",
                         "utilisation", "-utilisation"]


class InstrumentPage(BaseModel):
    scope: ScopeRead
    period: PeriodRead
    today: date
    sort: InstrumentSort
    total: int = Field(description="Instruments in the scope, on every page")
    limit: int
    offset: int
    items: list[InstrumentRowRead]


class StatusRead(BaseModel):
    """How current the pre-aggregated statistics are."""

    pending_marks: int = Field(description="Instrument-days waiting to be recomputed (stat_dirty)")
    oldest_mark_at: datetime | None
    instrument_day_rows: int
    facility_day_rows: int
    first_day: date | None = Field(description="Earliest day with statistics")
    last_day: date | None = Field(description="Latest day with statistics")
    last_refresh_job_at: datetime | None = Field(description="When the periodic stat_refresh job last finished; "
                                                             "readers also refresh on demand, which is not recorded")
    today: date
