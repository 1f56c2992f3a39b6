"""The earliest free slot's query paths: per-grid searches that stop at the limit, a text match checked while
walking other indexes, grids nobody uses, and answers equal to walking every grid point by brute force."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from labcommons.booking import service
from labcommons.booking.models import ACTIVE_STATUSES, Booking
from labcommons.catalog.models import Instrument
from labcommons.catalog.service import InstrumentQuery
from labcommons.db import Database
from tests.factories import World, add_instrument, next_grid_day


def add_euv(world: World, count: int, **fields: object) -> list[int]:
    """`count` instruments only the keyword 光刻 / lithography finds, in id order."""
    with world.db.unit_of_work() as s:
        return [
            add_instrument(s, world.facilities["CQ-LAB"], f"CQ-EUV{n}", name_zh=f"极紫外光刻机 {n}",
                           name_en=f"EUV lithography scanner {n}", category_code="MIC.EM", **fields).id
            for n in range(count)
        ]


def block(world: World, instrument_id: int, start: datetime, minutes: int) -> None:
    with world.db.unit_of_work() as s:
        service.reserve_slot(s, world.actors["alice"], instrument_id, start, start + timedelta(minutes=minutes))


def earliest_ids(db: Database, after: datetime, minutes: int, *, limit: int = 5,
                 **query: Any) -> list[tuple[int, datetime]]:
    with db.unit_of_work(write=False) as s:
        slots = service.earliest_slots(s, InstrumentQuery(**query), minutes, after, limit=limit)
        return [(slot.instrument.id, slot.starts_at) for slot in slots]


# One term lets PostgreSQL walk the grid's index in id order; several terms (光刻机: 光刻 & 刻机) take the
# fenced path that lists the candidates first.
@pytest.mark.parametrize("q", ["光刻", "lithography", "光刻机", "EUV lithography"])
def test_a_broad_text_match_gives_the_lowest_free_ids_at_the_first_grid_point(world: World, q: str) -> None:
    euv = add_euv(world, 8)
    t0 = next_grid_day()
    block(world, euv[0], t0, 60)
    block(world, euv[2], t0 - timedelta(minutes=30), 90)
    assert earliest_ids(world.db, t0, 60, limit=3, q=q) == [(euv[1], t0), (euv[3], t0), (euv[4], t0)]


def test_a_text_match_finds_the_gap_after_a_booking_when_every_match_is_busy(world: World) -> None:
    euv = add_euv(world, 2)
    t0 = next_grid_day()
    block(world, euv[0], t0, 120)
    block(world, euv[1], t0, 60)
    block(world, euv[1], t0 + timedelta(minutes=90), 60)  # a 30-minute gap: too short for an hour
    # The other instruments (free at t0) do not match the text, so only the booking ends can answer.
    assert earliest_ids(world.db, t0, 60, q="光刻") == [(euv[0], t0 + timedelta(hours=2)),
                                                       (euv[1], t0 + timedelta(minutes=150))]
    assert earliest_ids(world.db, t0, 30, q="光刻")[0] == (euv[1], t0 + timedelta(hours=1))


def test_a_duration_no_grid_in_use_divides_has_no_slots(world: World) -> None:
    t0 = next_grid_day()
    assert earliest_ids(world.db, t0, 25) == []
    add_euv(world, 1, slot_minutes=5, min_booking_minutes=5, max_booking_minutes=60)
    assert [start for _, start in earliest_ids(world.db, t0, 25)] == [t0]


def test_each_grid_starts_at_its_own_next_grid_point(world: World) -> None:
    quarter, = add_euv(world, 1, slot_minutes=45, min_booking_minutes=45, max_booking_minutes=450)
    after = next_grid_day() + timedelta(minutes=10)
    slots = dict(earliest_ids(world.db, after, 180, limit=10))
    assert slots[world.instruments["CONF"]] == after + timedelta(minutes=20)  # 30-minute grid
    assert slots[quarter] == service.align_up(after, 45)
    assert slots[world.instruments["SEQ"]] == after + timedelta(minutes=50)  # 60-minute grid


def brute_force_earliest(db: Database, ids: list[int], after: datetime, minutes: int,
                         horizon: timedelta) -> list[tuple[datetime, int]]:
    """Each instrument's first free grid point at or after `after`, by walking its grid one point at a time."""
    found = []
    with db.unit_of_work(write=False) as s:
        for instrument in s.scalars(select(Instrument).where(Instrument.id.in_(ids))):
            if not instrument.min_booking_minutes <= minutes <= instrument.max_booking_minutes or \
                    minutes % instrument.slot_minutes:
                continue
            busy = [(b.starts_at, b.ends_at) for b in s.scalars(select(Booking).where(
                Booking.instrument_id == instrument.id, Booking.status.in_(ACTIVE_STATUSES)))]
            start = service.align_up(after, instrument.slot_minutes)
            while start < after + horizon:
                end = start + timedelta(minutes=minutes)
                if all(not (b_start < end and start < b_end) for b_start, b_end in busy):
                    found.append((start, instrument.id))
                    break
                start += timedelta(minutes=instrument.slot_minutes)
    return sorted(found)


def test_the_earliest_slot_equals_walking_every_grid_point(world: World) -> None:
    rng = random.Random(20261124)
    grids = [15, 30, 60, 15, 30, 60]
    with world.db.unit_of_work() as s:
        ids = [add_instrument(s, world.facilities["SC-UNI"], f"SC-RND{n}", name_zh=f"随机仪器 {n}",
                              name_en=f"random rig {n}", category_code="CYT.FLOW", slot_minutes=grid,
                              min_booking_minutes=grid, max_booking_minutes=480).id
               for n, grid in enumerate(grids)]
    t0 = next_grid_day()
    for instrument_id, grid in zip(ids, grids, strict=True):
        moment = t0
        for _ in range(6):  # busy stretches with gaps of 0 to 3 grid steps between them
            length = grid * rng.randint(1, 8)
            block(world, instrument_id, moment, length)
            moment += timedelta(minutes=length + grid * rng.randint(0, 3))
    for minutes in (30, 60, 120):
        for offset in (0, 7, 95, 400):
            after = t0 + timedelta(minutes=offset)
            expected = brute_force_earliest(world.db, ids, after, minutes, timedelta(days=90))
            got = [(start, i) for i, start in earliest_ids(world.db, after, minutes, limit=1,
                                                            category="CYT.FLOW", region="SC")]
            assert got == expected[:1], (minutes, offset)
            for i, start in earliest_ids(world.db, after, minutes, limit=3, category="CYT.FLOW", region="SC"):
                assert (start, i) in expected, "every slot offered is that instrument's first free one"
