"""The periodic booking sweep runs through the job queue once per interval, however many workers ask."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select

from labcommons import jobs
from labcommons.booking.models import Booking
from labcommons.db import utcnow
from labcommons.notifications.models import Job, JobStatus
from tests.booking.test_usage import add_booking, grid_now
from tests.factories import World


def test_periodic_sweep_is_queued_once_per_interval_and_marks_no_shows(world: World) -> None:
    late = add_booking(world, "alice", starts_at=grid_now() - timedelta(minutes=60), minutes=90)
    now = utcnow()
    # The booking sweep, the match-index refresh, the statistics refresh and the rate-limit pruning.
    assert jobs.schedule_periodic(world.db, now=now) == len(jobs.PERIODIC) == 4
    assert jobs.schedule_periodic(world.db, now=now) == 0  # a second worker in the same minute adds nothing
    stats = jobs.run_pending(world.db, "test-worker", now=now)
    assert stats.done == 4 and stats.failed == 0
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Booking, late).no_show is True  # type: ignore[union-attr]
        sweeps = s.scalars(select(Job.status).where(Job.kind == "booking_sweep")).all()
    assert sweeps == [JobStatus.done]
    # A minute later the one-minute jobs are due again; the ten-minute one only if a ten-minute mark was passed.
    later = now + timedelta(seconds=61)
    due = sum(int(later.timestamp()) // seconds != int(now.timestamp()) // seconds for _kind, seconds in jobs.PERIODIC)
    assert due >= 3
    assert jobs.schedule_periodic(world.db, now=later) == due
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "booking_sweep")) == 2


def test_the_sweep_prunes_old_finished_jobs(world: World) -> None:
    now = utcnow()
    with world.db.unit_of_work() as s:
        for key, status, days in (("old-done", JobStatus.done, 8), ("new-done", JobStatus.done, 1),
                                  ("old-failed", JobStatus.failed, 31), ("young-failed", JobStatus.failed, 20)):
            moment = now - timedelta(days=days)
            s.add(Job(kind="send_mail", payload="{}", dedupe_key=key, status=status, attempts=1, max_attempts=5,
                      run_after=moment, created_at=moment, finished_at=moment, last_error=""))
    jobs.schedule_periodic(world.db, now=now)
    assert jobs.run_pending(world.db, "test-worker", now=now).done == len(jobs.PERIODIC)
    with world.db.unit_of_work(write=False) as s:
        left = set(s.scalars(select(Job.dedupe_key).where(Job.kind == "send_mail")))
    assert left == {"new-done", "young-failed"}
