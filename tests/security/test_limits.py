"""Hostile input, limits: bodies above the size limit (by Content-Length and streamed), result uploads up to their
own limit with nothing left behind, write rate limits per caller and minute shared by every app process, and the
sign-in throttle across processes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons import i18n, jobs
from labcommons.app import create_app
from labcommons.booking.models import Booking
from labcommons.config import Settings, get_settings
from labcommons.db import Database, utcnow
from labcommons.identity import service as identity
from labcommons.security import service
from labcommons.security.models import RateLimitBucket
from tests.factories import World, next_grid_day
from tests.orders.test_results import Stores, limit_uploads, make_order, payload, rows, use_local_store
from tests.web.conftest import PASSWORD, csrf_of, page_csrf, sign_in

LIMIT = 4096


def app_client(db: Database, **settings: Any) -> TestClient:
    """A client of an app instance with its own settings (the middleware reads them; routes read the process's)."""
    return TestClient(create_app(Settings(**settings), db=db), raise_server_exceptions=False)


def bookings(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Booking)) or 0)


def booking(world: World, hour: int = 0, purpose: str = "imaging organoids") -> dict[str, Any]:
    start = next_grid_day() + timedelta(hours=hour)
    return {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": purpose}


def booking_form(world: World, client: TestClient, purpose: str) -> dict[str, str]:
    start = next_grid_day()
    return {"csrf_token": page_csrf(client), "date": start.date().isoformat(), "start": "10:00", "end": "11:00",
            "purpose": purpose}


def in_chinese(message: str) -> str:
    i18n.set_locale("zh_CN")
    try:
        return i18n.gettext_(message)
    finally:
        i18n.set_locale("en")


def assert_too_large(response: httpx.Response, limit: int = LIMIT) -> None:
    assert response.status_code == 413, response.text
    assert response.json() == {"error": "body_too_large", "field": "body", "max_bytes": limit,
                               "message": f"The request body is larger than the limit of {limit} bytes."}


# --- body size ---------------------------------------------------------------------------------------------------


def test_a_body_whose_length_is_over_the_limit_is_refused_before_the_app_reads_it(world: World) -> None:
    client = app_client(world.db, max_body_bytes=LIMIT)
    # Not even JSON and not signed in: the app would answer 422 or 401; the length alone decides first.
    assert_too_large(client.post("/api/v1/bookings", content=b"{" * (LIMIT + 1),
                                 headers={"Content-Type": "application/json"}))
    big = booking(world, purpose="x" * LIMIT)
    assert_too_large(client.post("/api/v1/bookings", json=big, headers=world.headers("alice")))
    assert_too_large(client.patch("/api/v1/me/notifications", json={"x": "y" * LIMIT},
                                  headers=world.headers("alice")))
    assert bookings(world.db) == 0
    small = client.post("/api/v1/bookings", json=booking(world), headers=world.headers("alice"))
    assert small.status_code == 201 and bookings(world.db) == 1


def test_a_page_gets_a_translated_413_page(world: World) -> None:
    client = app_client(world.db, max_body_bytes=LIMIT)
    sign_in(client, "alice")
    url = f"/instruments/{world.instruments['CONF']}/book"
    form = booking_form(world, client, "y" * LIMIT)
    english = client.post(url, data=form, headers={"Accept-Language": "en"}, follow_redirects=False)
    assert english.status_code == 413 and english.headers["content-type"].startswith("text/html")
    assert "Too large" in english.text and "Alice" in english.text  # the usual layout, signed in
    chinese = client.post(url, data=form, headers={"Accept-Language": "zh-CN"}, follow_redirects=False)
    assert chinese.status_code == 413 and '<html lang="zh-CN">' in chinese.text
    assert in_chinese("Too large") in chinese.text
    assert bookings(world.db) == 0


def test_a_streamed_body_is_counted_as_it_arrives(world: World) -> None:
    client = app_client(world.db, max_body_bytes=LIMIT)
    chunk = b" " * 1000
    # No Content-Length: httpx sends an iterator chunked; the fifth chunk crosses the limit.
    refused = client.post("/api/v1/bookings", content=iter([chunk] * 5),
                          headers=world.headers("alice", **{"Content-Type": "application/json"}))
    assert_too_large(refused)
    sign_in(client, "alice")
    form = httpx.QueryParams(booking_form(world, client, "z" * LIMIT))
    page = client.post(f"/instruments/{world.instruments['CONF']}/book", content=iter([str(form).encode()]),
                       headers={"Content-Type": "application/x-www-form-urlencoded", "Accept-Language": "en"},
                       follow_redirects=False)
    assert page.status_code == 413 and "Too large" in page.text
    assert bookings(world.db) == 0
    import json

    within = json.dumps(booking(world)).encode()
    ok = client.post("/api/v1/bookings", content=iter([within[:50], within[50:]]),
                     headers=world.headers("alice", **{"Content-Type": "application/json"}))
    assert ok.status_code == 201, ok.text
    assert bookings(world.db) == 1


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stores]:
    yield use_local_store(tmp_path, monkeypatch)
    get_settings.cache_clear()


def test_result_uploads_go_past_the_body_limit_up_to_their_own_and_oversize_ones_leave_nothing(
        world: World, stores: Stores, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.factories import grant

    grant(world, "alice")
    order_id = make_order(world)
    limit_uploads(monkeypatch, 64 * 1024)
    client = app_client(world.db, max_body_bytes=LIMIT)
    url = f"/api/v1/orders/{order_id}/results"
    fine = client.post(url, params={"filename": "ok.bin"}, content=payload(20_000), headers=world.headers("alice"))
    assert fine.status_code == 201, fine.text
    over = client.post(url, params={"filename": "big.bin"}, content=payload(64 * 1024 + 1),
                       headers=world.headers("alice"))
    chunked = client.post(url, params={"filename": "big.bin"}, content=iter([payload(40_000, 1), payload(40_000, 2)]),
                          headers=world.headers("alice"))
    for response in (over, chunked):
        assert response.status_code == 413
        assert (response.json()["error"], response.json()["field"]) == ("file_too_large", "file")
    # Far above even the upload limit, the body is refused before anyone is asked who sends it.
    huge = client.post(url, params={"filename": "huge.bin"}, content=payload(64 * 1024 + 300 * 1024))
    assert huge.status_code == 413 and huge.json()["error"] == "body_too_large"
    assert [r.filename for r in rows(world)] == ["ok.bin"]
    assert len(stores.objects()) == 1 and stores.spooled() == []


# --- write rate limits -------------------------------------------------------------------------------------------


class Clock:
    """The rate limit's clock, stopped 5 s into a minute so that no test straddles a window's end by chance."""

    def __init__(self) -> None:
        self.now = utcnow().replace(second=5, microsecond=0)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(autouse=True)
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    stopped = Clock()
    monkeypatch.setattr(service, "utcnow", stopped)
    return stopped


def buckets(db: Database) -> dict[str, int]:
    with db.unit_of_work(write=False) as s:
        return {b.key: b.count for b in s.scalars(select(RateLimitBucket))}


def test_writes_over_the_budget_get_429_and_change_nothing(world: World) -> None:
    client = app_client(world.db, write_rate_per_minute=3)
    for hour in range(3):
        assert client.post("/api/v1/bookings", json=booking(world, hour), headers=world.headers("alice")).status_code \
            == 201
    refused = client.post("/api/v1/bookings", json=booking(world, 5), headers=world.headers("alice"))
    assert refused.status_code == 429
    assert refused.headers["retry-after"] == "55"
    assert refused.json() == {"error": "rate_limited", "field": None, "retry_after": 55,
                              "message": "Too many writes; try again in 55 seconds."}
    assert bookings(world.db) == 3
    # Reads are not limited; another user has a budget of their own.
    assert client.get("/api/v1/bookings", headers=world.headers("alice")).status_code == 200
    assert client.post("/api/v1/bookings", json=booking(world, 6), headers=world.headers("bob")).status_code == 201
    # The budget is the user's, whichever token or browser they use.
    with world.db.unit_of_work() as s:
        second = identity.create_api_token(s, identity.find_user(s, "alice@example.org"), name="second")
    other_token = client.post("/api/v1/bookings", json=booking(world, 7),
                              headers={"Authorization": f"Bearer {second}"})
    assert other_token.status_code == 429
    sign_in(client, "alice")
    page = client.post(f"/bookings/{1}/cancel", data={"csrf_token": page_csrf(client)},
                       headers={"Accept-Language": "en"}, follow_redirects=False)
    assert page.status_code == 429 and page.headers["content-type"].startswith("text/html")
    assert "Too many requests" in page.text and int(page.headers["retry-after"]) >= 1
    assert bookings(world.db) == 4
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Booking).where(Booking.status != "confirmed")) == 0
    assert buckets(world.db)[f"write:user:{world.actors['alice'].user_id}"] == 6


def test_the_budget_starts_again_in_the_next_minute(world: World, clock: Clock) -> None:
    client = app_client(world.db, write_rate_per_minute=2)
    for hour in range(2):
        assert client.post("/api/v1/bookings", json=booking(world, hour), headers=world.headers("alice")).status_code \
            == 201
    refused = client.post("/api/v1/bookings", json=booking(world, 2), headers=world.headers("alice"))
    assert refused.status_code == 429 and refused.headers["retry-after"] == "55"
    clock.now += timedelta(seconds=54)
    assert client.post("/api/v1/bookings", json=booking(world, 2), headers=world.headers("alice")).status_code == 429
    clock.now += timedelta(seconds=1)
    assert client.post("/api/v1/bookings", json=booking(world, 2), headers=world.headers("alice")).status_code == 201
    assert bookings(world.db) == 3


def test_anonymous_and_forged_writes_count_against_the_address(world: World) -> None:
    client = app_client(world.db, write_rate_per_minute=3)
    for i in range(3):
        forged = client.post("/api/v1/bookings", json=booking(world), headers={"Authorization": f"Bearer lc_fake{i}"})
        assert forged.status_code == 401
    assert client.post("/api/v1/bookings", json=booking(world)).status_code == 429
    assert buckets(world.db) == {"write:addr:testclient": 4}
    # Signed-in users are counted as themselves, not by the address they share.
    assert client.post("/api/v1/bookings", json=booking(world), headers=world.headers("alice")).status_code == 201


def test_a_trusted_proxy_names_the_address(world: World) -> None:
    trusting = app_client(world.db, write_rate_per_minute=1, trust_proxy_headers=True)
    # The proxy appends the address it saw; what the client wrote before it (here a new one each time) is ignored.
    for spoofed, address in (("203.0.113.1", "192.0.2.1"), ("203.0.113.2", "192.0.2.2")):
        response = trusting.post("/api/v1/bookings", json=booking(world),
                                 headers={"X-Forwarded-For": f"{spoofed}, {address}"})
        assert response.status_code == 401
    assert set(buckets(world.db)) == {"write:addr:192.0.2.1", "write:addr:192.0.2.2"}
    # Without trust the header is the client's word and changes nothing.
    plain = app_client(world.db, write_rate_per_minute=1)
    for address in ("192.0.2.3", "192.0.2.4"):
        plain.post("/api/v1/bookings", json=booking(world), headers={"X-Forwarded-For": address})
    assert buckets(world.db)["write:addr:testclient"] == 2


def test_two_app_processes_share_one_budget(world: World, db_url: str) -> None:
    other_db = Database.from_url(db_url)
    try:
        first = app_client(world.db, write_rate_per_minute=4)
        second = app_client(other_db, write_rate_per_minute=4)
        for hour, client in enumerate([first, second, first, second]):
            assert client.post("/api/v1/bookings", json=booking(world, hour),
                               headers=world.headers("alice")).status_code == 201
        for client in (first, second):
            assert client.post("/api/v1/bookings", json=booking(world, 9),
                               headers=world.headers("alice")).status_code == 429
    finally:
        other_db.dispose()
    assert bookings(world.db) == 4


def test_no_limit_when_it_is_zero(world: World) -> None:
    client = app_client(world.db, write_rate_per_minute=0)
    for hour in range(5):
        assert client.post("/api/v1/bookings", json=booking(world, hour), headers=world.headers("alice")).status_code \
            == 201
    assert buckets(world.db) == {}


def test_concurrent_counts_are_all_counted(world: World) -> None:
    threads, each = 4, 8
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            start.wait(timeout=10)
            for _ in range(each):
                with world.db.unit_of_work() as s:
                    service.count_write(s, limit=1000, address="198.51.100.7")
        except BaseException as exc:  # reported below
            errors.append(exc)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert errors == []
    assert buckets(world.db) == {"write:addr:198.51.100.7": threads * each}


def test_windows_counts_and_pruning_follow_the_clock(world: World) -> None:
    start = utcnow().replace(second=10, microsecond=0)
    with world.db.unit_of_work() as s:
        first = service.count_write(s, limit=2, address="203.0.113.9", now=start)
        service.count_write(s, limit=2, address="203.0.113.9", now=start + timedelta(seconds=20))
        third = service.count_write(s, limit=2, address="203.0.113.9", now=start + timedelta(seconds=40))
        assert (first.count, first.allowed, first.retry_after) == (1, True, 50)
        assert (third.count, third.allowed, third.retry_after) == (3, False, 10)
        # A process whose clock is a little behind keeps counting in the newer window.
        late = service.count_write(s, limit=2, address="203.0.113.9", now=start - timedelta(seconds=15))
        assert late.count == 4
        fresh = service.count_write(s, limit=2, address="203.0.113.9", now=start + timedelta(seconds=55))
        assert (fresh.count, fresh.allowed) == (1, True)
        service.count_write(s, limit=2, address="203.0.113.10", now=start + timedelta(minutes=5))
    with world.db.unit_of_work() as s:
        assert service.prune_buckets(s, now=start + timedelta(minutes=5, seconds=30)) == 1
    assert buckets(world.db) == {"write:addr:203.0.113.10": 1}
    assert ("rate_limit_prune", service.PRUNE_INTERVAL_SECONDS) in jobs.PERIODIC


def test_revoked_tokens_and_ended_sessions_count_against_the_address(world: World) -> None:
    client = app_client(world.db, write_rate_per_minute=5)
    with world.db.unit_of_work() as s:
        user = identity.find_user(s, "carol@example.org")
        token = identity.create_api_token(s, user, name="soon revoked")
    with world.db.unit_of_work() as s:
        [row] = [t for t in identity.list_api_tokens(s, user.id) if t.name == "soon revoked"]
        identity.revoke_api_token(s, user.id, row.id)
    assert client.post("/api/v1/bookings", json=booking(world),
                       headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert set(buckets(world.db)) == {"write:addr:testclient"}


# --- sign-in throttle --------------------------------------------------------------------------------------------


def test_the_sign_in_throttle_holds_across_app_processes(world: World, db_url: str) -> None:
    other_db = Database.from_url(db_url)
    try:
        clients = [app_client(world.db), app_client(other_db)]

        def attempt(client: TestClient, password: str) -> int:
            form = client.get("/login")
            return client.post("/login", data={"csrf_token": csrf_of(form.text), "email": "alice@example.org",
                                               "password": password, "next": "/"}, follow_redirects=False).status_code

        assert [attempt(clients[i % 2], "wrong password") for i in range(5)] == [401] * 5
        assert attempt(clients[0], PASSWORD) == 429
        assert attempt(clients[1], PASSWORD) == 429
    finally:
        other_db.dispose()


def test_behind_a_trusted_proxy_one_guesser_locks_out_only_their_own_address(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCOMMONS_TRUST_PROXY_HEADERS", "true")
    get_settings.cache_clear()
    try:
        client = app_client(world.db)

        def attempt(email: str, password: str, address: str) -> int:
            form = client.get("/login")
            return client.post("/login", data={"csrf_token": csrf_of(form.text), "email": email, "password": password,
                                               "next": "/"}, headers={"X-Forwarded-For": address},
                               follow_redirects=False).status_code

        assert {attempt(f"user{i}@example.org", "guess", "192.0.2.66") for i in range(20)} == {401}
        assert attempt("carol@example.org", PASSWORD, "192.0.2.66") == 429
        assert attempt("carol@example.org", PASSWORD, "192.0.2.7") == 303
    finally:
        get_settings.cache_clear()
