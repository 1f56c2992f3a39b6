"""The demo's year of history: every demo role's dashboard shows booked, effective, external and cross-region
hours; the bookings never overlap; usage looks real (no-shows, shorter actual use, maintenance, rated orders)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import aliased

from labcommons.billing.demo import seed_billing
from labcommons.billing.talent import seed_talent
from labcommons.booking.models import Booking, BookingKind, BookingStatus
from labcommons.catalog import demo
from labcommons.db import Database, utcnow
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.migrations import upgrade
from labcommons.orders.demo import seed_orders
from labcommons.reporting import aggregate, service
from labcommons.reporting.demo import HistorySeed, seed_history

ROLE_SCOPES = {
    "chen.yutong@yuelanlab.example.cn": "facility",
    "li.wei@yzmu.example.cn": "institution",
    "wang.xinyi@shancheng-bdri.example.cn": "platform",
    "david.okafor@jjscc.example.org": "facility",
    "emily.carter@shudu-univ.example.org": "facility",
    "yang.fan@sc-stco.example.cn": "region",
    "he.jing@liangjiang-dx.example.com": "facility",
}


@pytest.fixture
def seeded(db: Database) -> tuple[HistorySeed, datetime]:
    now = utcnow()
    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=100, now=now)
        seed_orders(s)
        seed_talent(s)
        seed_billing(s, now=now)
        history = seed_history(s, now=now)
    aggregate.ensure_current(db)
    return history, now


def test_each_demo_role_sees_a_busy_shared_year(db: Database, seeded: tuple[HistorySeed, datetime]) -> None:
    _history, now = seeded
    today = now.astimezone(aggregate.zone()).date()
    period = service.Period(today - timedelta(days=365), today - timedelta(days=1))
    with db.session() as s:
        assert {e["email"] for e in demo.demo_data()["users"] if e.get("roles")} == set(ROLE_SCOPES)
        for email, kind in ROLE_SCOPES.items():
            user = identity.find_user(s, email)
            actor = identity.actor_for(user, grants=roles.grants_of(s, user.id))
            scope = next(sc for sc in service.visible_scopes(s, actor) if sc.kind.value == kind)
            # The scope the dashboard opens is one the role may read.
            assert service.resolve_scope(s, actor, scope.token) == scope
            t = service.totals(s, scope, period, today)
            assert t.booked_min > 0 and t.effective_min > 0, (email, scope.token)
            assert 0 < t.effective_min < t.booked_min, (email, scope.token)  # no-shows and early check-outs
            assert t.ext_institution_min > 0 and t.ext_region_min > 0, (email, scope.token)
            assert t.users >= 2 and t.institutions >= 2, (email, scope.token)
        board = service.dashboard(s, service.Scope(service.ScopeKind.platform), period, today)
    assert board.totals.no_show_rate is not None and 0.02 < board.totals.no_show_rate < 0.09
    assert board.totals.median_turnaround_days is not None and board.totals.rating_average is not None
    assert board.totals.maintenance_min > 0
    assert {(f.provider_region, f.user_region) for f in board.flows if f.booked_min} >= {("CQ", "SC"), ("SC", "CQ")}
    # Weekdays in working hours are busier than Sunday nights.
    assert sum(board.heatmap[1][9:18]) > 5 * sum(board.heatmap[6][0:9] + board.heatmap[6][18:24])


def _snapshot(db: Database) -> list[tuple[object, ...]]:
    with db.session() as s:
        return [tuple(r) for r in s.execute(
            select(Booking.instrument_id, Booking.user_id, Booking.starts_at, Booking.ends_at, Booking.status,
                   Booking.kind, Booking.checked_in_at, Booking.checked_out_at, Booking.no_show)
            .order_by(Booking.instrument_id, Booking.starts_at))]


def test_history_never_overlaps_records_real_use_and_is_deterministic(
    db: Database, seeded: tuple[HistorySeed, datetime], tmp_path: Path
) -> None:
    history, now = seeded
    assert history.bookings > 2000 and history.maintenance > 0 and history.orders > 0 and history.ratings > 0
    with db.session() as s:
        other = aliased(Booking)
        overlapping = s.scalar(
            select(func.count()).select_from(Booking).join(
                other,
                (other.instrument_id == Booking.instrument_id) & (other.id != Booking.id)
                & (other.status != BookingStatus.cancelled) & (other.starts_at < Booking.ends_at)
                & (Booking.starts_at < other.ends_at),
            ).where(Booking.status != BookingStatus.cancelled)
        )
        assert overlapping == 0
        # The history's own bookings: the billing demo's month (with its overruns) lies within the last 70 days.
        past = list(s.scalars(select(Booking).where(Booking.ends_at <= now - timedelta(days=70),
                                                    Booking.kind == BookingKind.use,
                                                    Booking.status != BookingStatus.cancelled)))
        # Nothing in the past still holds time except no-shows, which booking.usage leaves confirmed.
        assert {b.status for b in past if not b.no_show} <= {BookingStatus.completed}
        assert all(b.status == BookingStatus.confirmed and b.checked_in_at is None for b in past if b.no_show)
        used = [b for b in past if b.checked_out_at is not None]
        assert len(used) > len(past) / 3
        assert all(b.checked_in_at is not None and b.checked_in_at < b.checked_out_at <= b.ends_at for b in used)
        assert sum(b.checked_out_at - b.checked_in_at < b.ends_at - b.starts_at for b in used) > len(used) / 2
        assert min(b.starts_at for b in past) < now - timedelta(days=300)
        local_hours = [b.starts_at.astimezone(aggregate.zone()).hour for b in past]
        assert sum(9 <= h < 18 for h in local_hours) > 0.7 * len(local_hours)
        assert any(h >= 18 for h in local_hours)
    before = _snapshot(db)
    with db.unit_of_work() as s:
        again = seed_history(s, now=now)
    assert again == HistorySeed()
    assert _snapshot(db) == before
    if db.is_sqlite:  # one fresh copy is enough to show the same seed and moment give the same year
        other = Database.from_url(f"sqlite:///{tmp_path / 'other.db'}")
        upgrade(other.engine)
        try:
            with other.unit_of_work() as s:
                demo.seed_demo(s, bookings=100, now=now)
                seed_orders(s)
                seed_talent(s)
                seed_billing(s, now=now)
                assert seed_history(s, now=now) == history
            assert _snapshot(other) == before
        finally:
            other.dispose()
