"""CSRF: every page form post (taken from the route table) without a token or with a forged one is refused with 403
and changes nothing, for every role and for anonymous visitors; writes to the API with the session cookie need the
page's token in X-CSRF-Token, writes with a bearer token do not."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcommons.app import create_app
from labcommons.config import get_settings
from labcommons.db import Base, Database
from labcommons.identity.roles import ROUTES
from labcommons.pages import CSRF_FAILED
from tests.factories import World, next_grid_day
from tests.security.hostile_world import USERS, HostileWorld, build_hostile_world, fill
from tests.web.conftest import page_csrf, sign_in

# OAuth 2 / OpenID Connect protocol endpoints: relying parties' servers call them with client credentials or a
# bearer token, never a browser with our cookie, so no form token applies (they answer 401 without credentials).
PROTOCOL = {"/oidc/token", "/oidc/userinfo"}
WRITES = ("POST", "PUT", "PATCH", "DELETE")


@pytest.fixture
def hw(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileWorld]:
    monkeypatch.setenv("LABCOMMONS_MATCHING_EMBEDDINGS", "off")
    get_settings.cache_clear()
    yield build_hostile_world(world)
    get_settings.cache_clear()


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table."""
    with db.unit_of_work(write=False) as s:
        return {table.name: [tuple(row) for row in s.execute(select(table).order_by(*table.primary_key.columns))]
                for table in Base.metadata.sorted_tables}


def changed(before: dict[str, list[tuple[Any, ...]]], after: dict[str, list[tuple[Any, ...]]]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))


def routes_with(*methods: str, api: bool) -> list[tuple[str, str]]:
    return sorted((method, path) for method, path in ROUTES if method in methods
                  and path.startswith("/api/") == api and path not in PROTOCOL)


def test_every_form_post_without_a_valid_token_is_refused_and_changes_nothing(hw: HostileWorld) -> None:
    posts = [path for _method, path in routes_with("POST", api=False)]
    assert len(posts) > 60
    clients = {"anonymous": TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)}
    for role in ("owner", "manager", "authority", "admin"):
        clients[role] = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
        sign_in(clients[role], USERS[role])
    tokens = {who: page_csrf(client) for who, client in clients.items() if who != "anonymous"}
    before = snapshot(hw.world.db)
    accepted: list[str] = []
    not_for_csrf: list[str] = []
    for path in posts:
        url = fill(path, hw.ids)
        public = ROUTES[("POST", path)] == "public"
        for who, client in clients.items():
            if who == "anonymous" and not public:
                continue  # answered by a redirect to the sign-in page (tests/identity/test_permissions.py)
            # No token; for the administrator (whom nothing else stops) and anonymous visitors also a forged one
            # and another browser's real one.
            someone_elses = tokens["manager" if who == "owner" else "owner"]
            forms: list[dict[str, str]] = [{}]
            if who in ("admin", "anonymous"):
                forms += [{"csrf_token": "forged"}, {"csrf_token": someone_elses}]
            for form in forms:
                response = client.post(url, data=form, headers={"Accept-Language": "en"}, follow_redirects=False)
                if response.status_code != 403:
                    accepted.append(f"{who} {url} {form}: {response.status_code}")
                # The platform administrator may do anything: the missing token is what refuses them.
                elif who in ("admin", "anonymous") and CSRF_FAILED not in response.text:
                    not_for_csrf.append(f"{who} {url} {form}")
    assert accepted == []
    assert not_for_csrf == []
    assert changed(before, snapshot(hw.world.db)) == []
    # The sessions survived: signing out without a token did not sign anyone out.
    assert clients["owner"].get("/account").status_code == 200


def test_a_form_post_with_the_browsers_token_goes_through(hw: HostileWorld) -> None:
    """The refusals above are about the token: the same post with it is accepted."""
    client = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
    sign_in(client, "mallory")
    url = fill("/bookings/{booking_id}/cancel", hw.ids)
    assert client.post(url, data={"csrf_token": "forged"}, follow_redirects=False).status_code == 403
    done = client.post(url, data={"csrf_token": page_csrf(client)}, follow_redirects=False)
    assert done.status_code == 303


def test_api_writes_with_the_session_cookie_need_the_csrf_header(hw: HostileWorld) -> None:
    writes = [(m, p) for m, p in routes_with(*WRITES, api=True) if ROUTES[(m, p)] != "public"]
    assert len(writes) > 50
    client = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
    sign_in(client, "pat")  # the platform administrator: only the header can be missing
    token = page_csrf(client)
    before = snapshot(hw.world.db)
    wrong: list[str] = []
    for method, path in writes:
        url = fill(path, hw.ids)
        for headers in ({}, {"X-CSRF-Token": "forged"}, {"X-CSRF-Token": token[:-1]}):
            response = client.request(method, url, json={}, headers=headers)
            body = response.json() if response.headers.get("content-type") == "application/json" else {}
            if (response.status_code, body.get("error"), body.get("field")) != (403, "forbidden", "X-CSRF-Token"):
                wrong.append(f"{method} {url} {headers}: {response.status_code} {response.text[:120]}")
    assert wrong == []
    assert changed(before, snapshot(hw.world.db)) == []

    start = next_grid_day(days=5)
    booking = {"instrument_id": hw.world.instruments["SEQ"], "starts_at": start.isoformat(),
               "ends_at": (start + timedelta(hours=2)).isoformat(), "purpose": "with the header"}
    assert client.post("/api/v1/bookings", json=booking, headers={"X-CSRF-Token": token}).status_code == 201
    # A bearer token is no ambient credential: no CSRF header needed.
    later = {**booking, "starts_at": (start + timedelta(hours=4)).isoformat(),
             "ends_at": (start + timedelta(hours=6)).isoformat()}
    bearer = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
    assert bearer.post("/api/v1/bookings", json=later, headers=hw.headers("admin")).status_code == 201
