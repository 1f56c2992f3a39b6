"""Request ids, the JSON access log, /metrics and the probes, in process against both databases."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from labcommons import jobs
from labcommons.app import create_app
from labcommons.booking.models import Booking, BookingStatus
from labcommons.config import Settings
from labcommons.db import Database, utcnow
from labcommons.ops.probes import code_heads
from tests.booking.test_booking_api import body
from tests.factories import World, next_grid_day
from tests.ops.support import json_log, label_values, samples, value
from tests.server import free_port

BOOKINGS = "labcommons_bookings_created_total"
LATENCY_COUNT = "labcommons_http_request_duration_seconds_count"


def client(db: Database, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(**settings), db=db), raise_server_exceptions=False)


def metrics_text(c: TestClient) -> str:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return r.text


# --- request ids and the log ----------------------------------------------------------------------------------


def test_request_id_is_made_up_echoed_and_on_the_app_log_lines(db: Database) -> None:
    app = create_app(Settings(), db=db)

    @app.get("/_test/log")
    def log_something() -> dict[str, str]:  # a sync route: it runs in a worker thread, as most of ours do
        logging.getLogger("labcommons.test").warning("inside the request")
        return {"ok": "yes"}

    c = TestClient(app, raise_server_exceptions=False)
    with json_log() as captured:
        # Without a trusted proxy, an incoming id is not taken: a client could otherwise pick ids to confuse logs.
        first = c.get("/_test/log", headers={"X-Request-ID": "chosen-by-client"})
        second = c.get("/_test/log")
    assert first.status_code == 200
    ids = [first.headers["x-request-id"], second.headers["x-request-id"]]
    assert "chosen-by-client" not in ids and ids[0] != ids[1] and all(len(i) >= 16 for i in ids)
    lines = captured.lines()
    app_lines = [line for line in lines if line["logger"] == "labcommons.test"]
    assert [line["request_id"] for line in app_lines] == ids
    assert all(line["message"] == "inside the request" and line["level"] == "WARNING" for line in app_lines)
    access = [line for line in lines if line["logger"] == "labcommons.access"]
    assert [line["request_id"] for line in access] == ids


@pytest.mark.parametrize(("sent", "kept"), [
    ("0f3c9a1e5b7d4c2a8e6f0b1d3c5a7e9f", True),
    ("req-42.edge:a", True),
    ("bad id\nwith newline", False),
    ("x" * 300, False),
])
def test_request_id_from_a_trusted_proxy(db: Database, sent: str, kept: bool) -> None:
    r = client(db, trust_proxy_headers=True).get("/healthz", headers={"X-Request-ID": sent})
    assert r.status_code == 200
    assert (r.headers["x-request-id"] == sent) is kept
    assert r.headers["x-request-id"]


def test_access_line_fields(world: World) -> None:
    c = client(world.db, trust_proxy_headers=True)
    with json_log() as captured:
        r = c.post("/api/v1/bookings?access_token=secret-in-query", json=body(world),
                   headers=world.headers("alice", **{"X-Forwarded-For": "203.0.113.9, 198.51.100.7",
                                                     "X-Request-ID": "edge-1"}))
        reset = c.get("/password/reset/a-secret-reset-token")
    assert r.status_code == 201, r.text
    access = [line for line in captured.lines() if line["logger"] == "labcommons.access"]
    assert len(access) == 2, "one access line per request"
    line = access[0]
    assert line["method"] == "POST" and line["status"] == 201
    assert line["path"] == "/api/v1/bookings", "no query string in the log"
    assert line["route"] == "/api/v1/bookings"
    assert line["client"] == "198.51.100.7", "the address the trusted proxy appended, not the client's claim"
    assert line["request_id"] == "edge-1" and line["level"] == "INFO"
    assert isinstance(line["duration_ms"], float) and line["duration_ms"] > 0
    assert isinstance(line["pid"], int)
    assert line["time"].endswith("+00:00"), "UTC ISO 8601"
    ours = str([line for line in captured.lines() if line["logger"].startswith("labcommons")])
    assert "secret-in-query" not in ours
    assert reset.headers["x-request-id"] == access[1]["request_id"]
    assert access[1]["path"] == "/password/reset/[redacted]" and access[1]["route"] == "/password/reset/{token}"
    assert "a-secret-reset-token" not in ours


# --- metrics ----------------------------------------------------------------------------------------------------


def test_latency_histogram_by_route_template(world: World) -> None:
    c = client(world.db)
    made = c.post("/api/v1/bookings", json=body(world), headers=world.headers("alice"))
    assert made.status_code == 201
    booking_id = made.json()["id"]
    before = metrics_text(c)
    for _ in range(3):
        assert c.get(f"/api/v1/bookings/{booking_id}", headers=world.headers("alice")).status_code == 200
    assert c.get("/api/v1/bookings/999999", headers=world.headers("alice")).status_code == 404
    assert c.get("/no/such/page/at/all").status_code == 404
    after = metrics_text(c)
    route = "/api/v1/bookings/{booking_id}"
    for status, sent in (("2xx", 3), ("4xx", 1)):
        counted = value(after, LATENCY_COUNT, method="GET", route=route, status=status)
        assert counted - value(before, LATENCY_COUNT, method="GET", route=route, status=status) == sent
    routes = label_values(after, LATENCY_COUNT, "route")
    assert route in routes and "<unmatched>" in routes
    assert not any(re.search(r"/[0-9]+(/|$)", r) or "/no/such" in r for r in routes), "raw paths never become labels"
    bucket = samples(after)[("labcommons_http_request_duration_seconds_bucket",
                             frozenset({"method": "GET", "route": route, "status": "2xx", "le": "+Inf"}.items()))]
    assert bucket == value(after, LATENCY_COUNT, method="GET", route=route, status="2xx")
    assert ("labcommons_http_requests_in_flight", frozenset()) in samples(after)


def test_booking_counter_counts_commits_only(world: World) -> None:
    c = client(world.db)
    before = value(metrics_text(c), BOOKINGS, status="confirmed", kind="use")
    assert c.post("/api/v1/bookings", json=body(world), headers=world.headers("alice")).status_code == 201
    clash = c.post("/api/v1/bookings", json=body(world), headers=world.headers("bob"))
    assert clash.status_code == 409, "the overlapping booking is flushed, then rolled back"
    assert c.post("/api/v1/bookings", json=body(world, key="SPATIAL"), headers=world.headers("bob")).status_code == 201
    assert value(metrics_text(c), BOOKINGS, status="confirmed", kind="use") - before == 2


def _booking(world: World, hours: int) -> Booking:
    start = next_grid_day(days=3) + timedelta(hours=hours)
    return Booking(instrument_id=world.instruments["CONF"], user_id=world.actors["alice"].user_id,
                   starts_at=start, ends_at=start + timedelta(hours=1), status=BookingStatus.pending)


def test_booking_counter_forgets_rolled_back_savepoints_and_transactions(world: World) -> None:
    c = client(world.db)
    before = value(metrics_text(c), BOOKINGS, status="pending", kind="use")
    with world.db.unit_of_work() as s:
        s.add(_booking(world, 0))
        s.flush()
        savepoint = s.begin_nested()
        s.add(_booking(world, 1))
        s.flush()
        savepoint.rollback()
        with s.begin_nested():  # a released savepoint counts once the whole transaction commits
            s.add(_booking(world, 2))
    with pytest.raises(RuntimeError), world.db.unit_of_work() as s:
        s.add(_booking(world, 3))
        s.flush()
        raise RuntimeError("rolled back")
    assert value(metrics_text(c), BOOKINGS, status="pending", kind="use") - before == 2


def test_queue_depth_and_oldest_job(db: Database) -> None:
    c = client(db)
    before = metrics_text(c)
    queued_before = value(before, "labcommons_jobs", status="queued")
    with db.unit_of_work() as s:
        for n in range(3):
            jobs.enqueue(s, "ops_test", {"n": n}, run_after=utcnow() - timedelta(minutes=n * 2))
        jobs.enqueue(s, "ops_test", {"n": "later"}, run_after=utcnow() + timedelta(hours=1))
    after = metrics_text(c)
    assert value(after, "labcommons_jobs", status="queued") - queued_before == 4
    assert set(label_values(after, "labcommons_jobs", "status")) >= {"queued", "running", "done", "failed"}
    assert 240 <= value(after, "labcommons_job_oldest_queued_age_seconds") < 3600
    assert value(after, "labcommons_metrics_database_up") == 1


def test_pool_gauge_follows_checkouts(db: Database) -> None:
    c = client(db)
    name = "labcommons_db_pool_connections_in_use"
    with db.engine.connect() as held:
        held.execute(text("SELECT 1"))
        during = value(metrics_text(c), name)
    assert value(metrics_text(c), name) == during - 1


def test_metrics_can_be_switched_off(db: Database) -> None:
    c = client(db, metrics_enabled=False)
    assert c.get("/metrics").status_code == 404
    assert c.get("/healthz").status_code == 200


# --- probes -----------------------------------------------------------------------------------------------------


def test_health_needs_no_database() -> None:
    unreachable = Database.from_url(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    try:
        c = client(unreachable)
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        assert c.head("/healthz").status_code == 200
        refused = c.post("/healthz")
        assert refused.status_code == 405 and refused.json()["error"] == "method_not_allowed"
        assert c.get("/api/v1/health").status_code == 200, "the API's health route stays"
    finally:
        unreachable.dispose()


def test_ready_when_the_database_is_at_head(db: Database) -> None:
    r = client(db).get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "checks": {"database": "ok", "migrations": "ok"}}


@contextmanager
def schema_at(db: Database, *revisions: str) -> Iterator[None]:
    """The database's alembic_version says `revisions` inside the block; what it said before is put back after (the
    PostgreSQL database is the test session's, shared by the tests after this one)."""
    with db.engine.begin() as conn:
        saved = list(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
        conn.execute(text("DELETE FROM alembic_version"))
        for revision in revisions:
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": revision})
    try:
        yield
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM alembic_version"))
            for revision in saved:
                conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": revision})


def test_not_ready_when_the_schema_is_behind(db: Database) -> None:
    from alembic.script import ScriptDirectory

    from labcommons.migrations import alembic_config

    heads = sorted(code_heads())
    older = ScriptDirectory.from_config(alembic_config()).get_revision(heads[0]).down_revision
    assert isinstance(older, str)
    with schema_at(db, older):
        r = client(db).get("/readyz")
    assert r.status_code == 503
    answer = r.json()
    assert answer["error"] == "not_ready" and answer["field"] is None
    assert answer["checks"]["database"] == "ok"
    assert older in answer["checks"]["migrations"] and heads[0] in answer["checks"]["migrations"]


def test_ready_when_a_later_release_migrated_first(db: Database) -> None:
    """A rolling upgrade runs the new release's migrations while the old release still serves: the old code does
    not know the new revision and stays ready (migrations keep the release before them working)."""
    with schema_at(db, "9999_next_release"):
        r = client(db).get("/readyz")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_not_ready_when_the_database_is_down(dialect: str, tmp_path: Any) -> None:
    url = (f"sqlite:///{tmp_path}/missing-dir/x.db" if dialect == "sqlite"
           else f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none")
    down = Database.from_url(url)
    try:
        r = client(down).get("/readyz")
    finally:
        down.dispose()
    assert r.status_code == 503
    answer = r.json()
    assert answer["error"] == "not_ready" and "database" in answer["message"]
    assert answer["checks"]["database"].startswith("unreachable")
