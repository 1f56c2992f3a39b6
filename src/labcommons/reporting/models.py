"""Pre-aggregated booking statistics, kept current from the booking table (see reporting/aggregate.py).

Three grains, each a sum of what the bookings of one local day (Asia/Shanghai by default) contribute:
- `stat_instrument_day`: one row per instrument and day, for per-instrument tables and the top/idle lists;
- `stat_facility_day`: one row per facility, day, booker's region and internal/external, for the charts
  (time series, weekday × hour heat-map, cross-region flows, lead-time distribution) at any scope;
- `stat_region_day`: the same summed per region, which the platform's and the regions' charts read.

All are derived data: `labcommons reporting rebuild` recomputes them from the bookings at any time.
"""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, Index, Integer, String, text
from sqlalchemy.orm import Mapped, mapped_column

from labcommons.catalog.models import Instrument
from labcommons.db import Base, UTCDateTime, utcnow

# Lead time (from making a booking to its start) is counted in these buckets; bounds in hours, the last is open.
LEAD_BUCKET_HOURS: tuple[int, ...] = (1, 4, 24, 72, 168, 336, 720)
LEAD_BUCKETS = len(LEAD_BUCKET_HOURS) + 1
HOURS = 24


class StatDirty(Base):
    """An instrument-day whose statistics must be recomputed (written in the transaction that changed a booking)."""

    __tablename__ = "stat_dirty"

    instrument_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    marked_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class _InstrumentMeasures:
    """The columns an instrument's statistics have at every grain: where it is placed and what was booked."""

    facility_id: Mapped[int] = mapped_column(Integer)
    institution_id: Mapped[int] = mapped_column(Integer)
    region_code: Mapped[str] = mapped_column(String(16))
    bookings: Mapped[int] = mapped_column(Integer, default=0)
    booked_min: Mapped[int] = mapped_column(Integer, default=0)
    effective_min: Mapped[int] = mapped_column(Integer, default=0)
    ext_institution_min: Mapped[int] = mapped_column(Integer, default=0)
    ext_region_min: Mapped[int] = mapped_column(Integer, default=0)
    maintenance_min: Mapped[int] = mapped_column(Integer, default=0)
    no_shows: Mapped[int] = mapped_column(Integer, default=0)


class StatInstrumentDay(_InstrumentMeasures, Base):
    """What one instrument's bookings contributed to one local day (minutes clipped to the day)."""

    __tablename__ = "stat_instrument_day"
    __table_args__ = (
        Index("ix_stat_instrument_day_facility", "facility_id", "day"),
        Index("ix_stat_instrument_day_region", "region_code", "day"),
        Index("ix_stat_instrument_day_institution", "institution_id", "day"),
        # Maintenance is rare: availability reads the days that had some through this small partial index.
        Index("ix_stat_instrument_day_maintenance", "day", postgresql_where=text("maintenance_min > 0"),
              sqlite_where=text("maintenance_min > 0")),
    )

    instrument_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)


class StatInstrumentMonth(_InstrumentMeasures, Base):
    """The sum of an instrument's `stat_instrument_day` rows over one calendar month (`month` is its first day), so
    per-instrument figures over long periods read a row a month instead of a row a day."""

    __tablename__ = "stat_instrument_month"
    __table_args__ = (
        Index("ix_stat_instrument_month_facility", "facility_id", "month"),
        Index("ix_stat_instrument_month_region", "region_code", "month"),
        Index("ix_stat_instrument_month_institution", "institution_id", "month"),
    )

    instrument_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    month: Mapped[date] = mapped_column(Date, primary_key=True)


class _DayMeasures:
    """What bookings contributed to one local day, at the grains of the charts (facility, region)."""

    weekday: Mapped[int] = mapped_column(Integer)  # 0 = Monday
    bookings: Mapped[int] = mapped_column(Integer, default=0)
    booked_min: Mapped[int] = mapped_column(Integer, default=0)
    effective_min: Mapped[int] = mapped_column(Integer, default=0)
    maintenance_min: Mapped[int] = mapped_column(Integer, default=0)
    no_shows: Mapped[int] = mapped_column(Integer, default=0)
    # Booked minutes by local hour of the day (h0 = 00:00–01:00).
    h0: Mapped[int] = mapped_column(Integer, default=0)
    h1: Mapped[int] = mapped_column(Integer, default=0)
    h2: Mapped[int] = mapped_column(Integer, default=0)
    h3: Mapped[int] = mapped_column(Integer, default=0)
    h4: Mapped[int] = mapped_column(Integer, default=0)
    h5: Mapped[int] = mapped_column(Integer, default=0)
    h6: Mapped[int] = mapped_column(Integer, default=0)
    h7: Mapped[int] = mapped_column(Integer, default=0)
    h8: Mapped[int] = mapped_column(Integer, default=0)
    h9: Mapped[int] = mapped_column(Integer, default=0)
    h10: Mapped[int] = mapped_column(Integer, default=0)
    h11: Mapped[int] = mapped_column(Integer, default=0)
    h12: Mapped[int] = mapped_column(Integer, default=0)
    h13: Mapped[int] = mapped_column(Integer, default=0)
    h14: Mapped[int] = mapped_column(Integer, default=0)
    h15: Mapped[int] = mapped_column(Integer, default=0)
    h16: Mapped[int] = mapped_column(Integer, default=0)
    h17: Mapped[int] = mapped_column(Integer, default=0)
    h18: Mapped[int] = mapped_column(Integer, default=0)
    h19: Mapped[int] = mapped_column(Integer, default=0)
    h20: Mapped[int] = mapped_column(Integer, default=0)
    h21: Mapped[int] = mapped_column(Integer, default=0)
    h22: Mapped[int] = mapped_column(Integer, default=0)
    h23: Mapped[int] = mapped_column(Integer, default=0)
    # Bookings by lead time (made → start), in the buckets of LEAD_BUCKET_HOURS.
    lead0: Mapped[int] = mapped_column(Integer, default=0)
    lead1: Mapped[int] = mapped_column(Integer, default=0)
    lead2: Mapped[int] = mapped_column(Integer, default=0)
    lead3: Mapped[int] = mapped_column(Integer, default=0)
    lead4: Mapped[int] = mapped_column(Integer, default=0)
    lead5: Mapped[int] = mapped_column(Integer, default=0)
    lead6: Mapped[int] = mapped_column(Integer, default=0)
    lead7: Mapped[int] = mapped_column(Integer, default=0)


class StatFacilityDay(_DayMeasures, Base):
    """What one facility's bookings by one kind of booker (region, internal or not) contributed to one local day."""

    __tablename__ = "stat_facility_day"
    __table_args__ = (
        Index("ix_stat_facility_day_region", "region_code", "day"),
        Index("ix_stat_facility_day_institution", "institution_id", "day"),
    )

    facility_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_region_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    # 1 when the booker belongs to the facility's institution, 0 otherwise (an integer: it is part of the key).
    internal: Mapped[int] = mapped_column(Integer, primary_key=True)
    institution_id: Mapped[int] = mapped_column(Integer)
    region_code: Mapped[str] = mapped_column(String(16))


class StatRegionDay(_DayMeasures, Base):
    """The sum of a region's `stat_facility_day` rows of one day and kind of booker, so the platform's and the
    regions' charts, totals and flows read a few hundred rows instead of every facility's (kept with them by every
    refresh and rebuild)."""

    __tablename__ = "stat_region_day"

    region_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_region_code: Mapped[str] = mapped_column(String(16), primary_key=True)
    internal: Mapped[int] = mapped_column(Integer, primary_key=True)


HOUR_COLUMNS = tuple(f"h{i}" for i in range(HOURS))
LEAD_COLUMNS = tuple(f"lead{i}" for i in range(LEAD_BUCKETS))


# The statistics' index on the instrument table (migration 0011): a region's or the platform's dashboard joins its
# per-instrument sums to the instruments' status and placement, counts the bookable ones by opening hours and lists
# the never booked ones in id order, all from this narrow index instead of the wide instrument rows.
Index("ix_instrument_placement", Instrument.id, Instrument.status, Instrument.region_code, Instrument.institution_id,
      Instrument.facility_id)
