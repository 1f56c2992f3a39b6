"""Hostile input: script tags in every name a user or manager writes are shown as text on every page, to every
role, whole pages and htmx fragments, in both languages; SQL-looking text is stored and read back verbatim and can
be searched for without error."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from markupsafe import escape

from labcommons.app import create_app
from labcommons.config import get_settings
from tests.factories import World, next_grid_day
from tests.security.hostile_world import (
    RAW,
    ROLES,
    USERS,
    HostileWorld,
    build_hostile_world,
    escaped,
    fill,
    page_routes,
)
from tests.web.conftest import sign_in

# Not our pages: FastAPI's Swagger UI redirect helper.
NOT_OURS = {"/docs/oauth2-redirect"}
# Files, not pages (spreadsheet exports have their own test that hostile names never become formulas): fetched
# once, by the administrator, to see that they do not fail; a PDF takes seconds to typeset.
DOWNLOADS = (".pdf", ".xlsx", ".csv", ".ics")


@pytest.fixture
def hw(world: World, monkeypatch: pytest.MonkeyPatch) -> Iterator[HostileWorld]:
    # Keyword matching is enough here; loading the embedding model would only cost time.
    monkeypatch.setenv("LABCOMMONS_MATCHING_EMBEDDINGS", "off")
    get_settings.cache_clear()
    yield build_hostile_world(world)
    get_settings.cache_clear()


def client_of(hw: HostileWorld, role: str) -> TestClient:
    client = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
    sign_in(client, USERS[role])
    return client


def test_every_page_shows_hostile_text_as_text_to_every_role(hw: HostileWorld) -> None:
    routes = [path for path in page_routes("GET") if path not in NOT_OURS]
    assert len(routes) > 40
    leaks: list[str] = []
    errors: list[str] = []
    shown: set[str] = set()
    pages = 0
    for role in ROLES:
        client = client_of(hw, role)
        for path in routes:
            url = fill(path, hw.ids)
            variants: list[dict[str, str]] = [{"Accept-Language": "zh-CN"}]
            if role in ("owner", "manager"):
                variants.append({"Accept-Language": "en"})  # English names and texts show where Chinese ones did
            if path.endswith(DOWNLOADS):
                if role != "admin":
                    continue
                variants = variants[:1]
            for headers in variants:
                response = client.get(url, headers=headers, follow_redirects=False)
                if "hx-get" in response.text and "HX-Request" not in headers:
                    # A page that updates itself through htmx: its fragments are checked too.
                    variants.append({**headers, "HX-Request": "true"})
                if response.status_code >= 500:
                    errors.append(f"{role} {url} {headers}: {response.status_code}")
                if not response.headers.get("content-type", "").startswith("text/html"):
                    continue
                pages += 1
                if RAW in response.text:
                    at = response.text.index(RAW)
                    leaks.append(f"{role} {url} {headers}: ...{response.text[max(0, at - 80):at + 60]}...")
                shown |= {tag for tag in hw.tags if escaped(tag) in response.text}
    assert errors == []
    assert leaks == []
    # Not vacuous: every hostile text was on some page, escaped.
    assert hw.tags - shown == set()
    assert pages > 200


def test_the_escaped_text_is_the_whole_text(hw: HostileWorld) -> None:
    """What the owner typed comes back whole on the pages, quotes and SQL included, only escaped."""
    page = client_of(hw, "owner").get("/bookings", headers={"Accept-Language": "en"})
    from tests.security.hostile_world import hostile

    assert str(escape(hostile("purpose"))) in page.text
    manager = client_of(hw, "manager")
    assert str(escape(hostile("pending-purpose"))) in manager.get("/manage/approvals").text
    assert str(escape(hostile("name-mallory"))) in manager.get("/manage/approvals").text
    order = manager.get(f"/orders/{hw.ids['order_id']}", headers={"Accept-Language": "en"}).text
    for tag in ("order-title", "order-description", "message-owner", "quote-note"):
        assert str(escape(hostile(tag))) in order, tag


# --- SQL-looking text -----------------------------------------------------------------------------------------

SQLISH = ["'; DROP TABLE booking; --", '" OR 1=1 --', "%_\\", "Robert'); DELETE FROM user_account;--",
          "1' UNION SELECT token_hash FROM api_token --", "\\'\\\"%%__"]


def test_sql_looking_text_is_stored_and_read_back_verbatim(world: World) -> None:
    api = TestClient(create_app(db=world.db), raise_server_exceptions=False)
    alice = world.headers("alice")
    start = next_grid_day(days=4)
    made: dict[str, int] = {}
    for i, text in enumerate(SQLISH):
        at = start + timedelta(hours=i)
        response = api.post("/api/v1/bookings", headers=alice, json={
            "instrument_id": world.instruments["CONF"], "starts_at": at.isoformat(),
            "ends_at": (at + timedelta(hours=1)).isoformat(), "purpose": text})
        assert response.status_code == 201, response.text
        assert response.json()["purpose"] == text
        made[text] = response.json()["id"]
        demand = api.post("/api/v1/demands", headers=alice, json={"text": f"需要 {text}"})
        assert demand.status_code == 201 and demand.json()["text"] == f"需要 {text}"
        account = api.post("/api/v1/billing/accounts", headers=alice,
                           json={"code": f"SQL-{i}", "name": text, "kind": "grant"})
        assert account.status_code == 201, account.text
        assert api.get(f"/api/v1/billing/accounts/{account.json()['id']}", headers=alice).json()["name"] == text
    for text, booking_id in made.items():
        assert api.get(f"/api/v1/bookings/{booking_id}", headers=alice).json()["purpose"] == text
    # Nothing was dropped or deleted, and the pages show each text escaped, as it was typed.
    assert len(api.get("/api/v1/bookings", headers=alice, params={"limit": 100}).json()["items"]) == len(SQLISH)
    sign_in(api, "alice")
    page = api.get("/bookings", headers={"Accept-Language": "en"}).text
    billing = api.get("/billing", headers={"Accept-Language": "en"}).text
    for text in SQLISH:
        assert str(escape(text)) in page, text
        assert str(escape(text)) in billing, text


SEARCHES = [*SQLISH, "O'Brien", "a:*", "!!", "&|", "(", "\\", "'", '"', "%", "_", "*", "<->", "~", "--"]


def test_searching_for_sql_looking_text_is_no_error(world: World) -> None:
    api = TestClient(create_app(db=world.db), raise_server_exceptions=False)

    def found(q: str) -> list[int]:
        return [item["id"] for item in api.get("/api/v1/instruments", params={"q": q}).json()["items"]]

    sequencer = found("sequencer")
    assert sequencer == [world.instruments["SEQ"]]
    for text in SEARCHES:
        for path in ("/api/v1/instruments", "/api/v1/services", "/api/v1/bookings", "/api/v1/experts", "/",
                     "/experts"):
            headers = world.headers("alice") if path == "/api/v1/bookings" else {}
            response = api.get(path, params={"q": text}, headers=headers)
            assert response.status_code == 200, (path, text, response.text[:300])
        # Beside a word, punctuation and wildcards are neither syntax nor patterns: the word alone decides.
        if not any(c.isalnum() for c in text):
            assert found(f"sequencer {text}") == sequencer, text


def test_a_hostile_instrument_name_is_found_by_search(hw: HostileWorld) -> None:
    api = TestClient(create_app(db=hw.world.db), raise_server_exceptions=False)
    found = api.get("/api/v1/instruments", params={"q": "DROP TABLE booking"}).json()["items"]
    assert hw.ids["instrument_id"] in [item["id"] for item in found]
