"""API tokens: scopes, expiry, last use, the scope guard on routes, and /api/v1/me."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from labcommons.app import create_app
from labcommons.db import utcnow
from labcommons.errors import InvalidInput, Unauthenticated
from labcommons.identity import roles, service
from labcommons.identity.models import ApiToken
from tests.factories import World, next_grid_day
from tests.web.conftest import csrf_of, sign_in


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def make_token(world: World, user: str, scopes: list[str] | None, **kw: object) -> str:
    with world.db.unit_of_work() as s:
        return service.create_api_token(s, service.find_user(s, f"{user}@example.org"), name="t", scopes=scopes,
                                        **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("scopes", "expires_in", "field"),
    [
        (["bookings:read", "root"], timedelta(days=1), "scopes"),
        ([], timedelta(days=1), "scopes"),
        (["bookings:read"], timedelta(seconds=-1), "expires_at"),
        (["bookings:read"], timedelta(days=367), "expires_at"),
    ],
)
def test_creation_validates_scopes_and_expiry(
    world: World, scopes: list[str], expires_in: timedelta, field: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        make_token(world, "alice", scopes, expires_at=utcnow() + expires_in)
    assert info.value.field == field


def test_scopes_expiry_and_last_use(world: World) -> None:
    now = utcnow()
    token = make_token(world, "alice", ["bookings:read", "account"], expires_at=now + timedelta(days=30), now=now)
    with world.db.unit_of_work() as s:
        actor = service.authenticate_token(s, token, now=now)
    assert actor.scopes == frozenset({"bookings:read", "account"})
    # Tokens stored without scopes (made before scopes) have them all.
    with world.db.unit_of_work() as s:
        assert service.authenticate_token(s, world.tokens["alice"]).scopes == frozenset(roles.SCOPES)

    def last_used(after: timedelta) -> object:
        with world.db.unit_of_work() as s:
            service.authenticate_token(s, token, now=now + after)
            return s.query(ApiToken).filter(ApiToken.name == "t").one().last_used_at

    assert last_used(timedelta(seconds=30)) == now  # stamped at most once a minute
    assert last_used(timedelta(seconds=61)) == now + timedelta(seconds=61)
    with world.db.unit_of_work() as s, pytest.raises(Unauthenticated):
        service.authenticate_token(s, token, now=now + timedelta(days=31))


def test_routes_require_their_scope(world: World, client: TestClient) -> None:
    reader = make_token(world, "alice", ["bookings:read"])
    headers = {"Authorization": f"Bearer {reader}"}
    assert client.get("/api/v1/bookings", headers=headers).status_code == 200
    start = next_grid_day()
    body = {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat()}
    refused = client.post("/api/v1/bookings", json=body, headers=headers)
    assert refused.status_code == 403
    assert refused.json() == {"error": "insufficient_scope", "message": refused.json()["message"], "field": None,
                              "scope": "bookings:write"}
    assert client.post("/api/v1/bookings/1/cancel", headers=headers).json()["error"] == "insufficient_scope"
    assert client.get("/api/v1/me", headers=headers).json()["scope"] == "account"
    writer = make_token(world, "alice", ["bookings:write"])
    assert client.post("/api/v1/bookings", json=body, headers={"Authorization": f"Bearer {writer}"}).status_code == 201
    assert client.get("/api/v1/bookings", headers={"Authorization": f"Bearer {writer}"}).status_code == 403
    # The catalogue is public: no token needed.
    assert client.get("/api/v1/instruments").status_code == 200


def test_me_and_token_management(world: World, client: TestClient) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, service.find_user(s, "alice@example.org"), "facility_manager",
                         facility_id=world.facilities["CQ-LAB"])
    me = client.get("/api/v1/me", headers=world.headers("alice")).json()
    assert me["email"] == "alice@example.org" and me["region"] == "CQ"
    assert me["institution"]["code"] == "CQ-LAB"
    assert me["roles"] == [{"role": "facility_manager", "scope": "facility", "code": "CQ-LAB-F"}]

    created = client.post("/api/v1/me/tokens", headers=world.headers("alice"),
                          json={"name": "ci", "scopes": ["bookings:read", "account"]})
    assert created.status_code == 201, created.text
    token = created.json()
    assert token["token"].startswith("lc_") and token["scopes"] == ["account", "bookings:read"]
    # Default expiry: 90 days.
    listed = client.get("/api/v1/me/tokens", headers=world.headers("alice")).json()["items"]
    assert {t["name"] for t in listed} == {"ci", "test"} and all("token" not in t for t in listed)
    new_headers = {"Authorization": f"Bearer {token['token']}"}
    assert client.get("/api/v1/me", headers=new_headers).json()["token_scopes"] == ["account", "bookings:read"]

    # A token cannot mint a stronger one; unknown scopes and bad expiry name the field.
    escalate = client.post("/api/v1/me/tokens", headers=new_headers, json={"name": "x", "scopes": ["bookings:write"]})
    assert escalate.status_code == 403 and escalate.json()["scope"] == "bookings:write"
    unknown = client.post("/api/v1/me/tokens", headers=world.headers("alice"), json={"name": "x", "scopes": ["root"]})
    assert unknown.status_code == 422 and unknown.json()["field"] == "scopes"
    late = client.post("/api/v1/me/tokens", headers=world.headers("alice"),
                       json={"name": "x", "scopes": ["account"],
                             "expires_at": (utcnow() + timedelta(days=400)).isoformat()})
    assert late.status_code == 422 and late.json()["field"] == "expires_at"
    missing = client.post("/api/v1/me/tokens", headers=world.headers("alice"), json={"scopes": ["account"]})
    assert missing.status_code == 422 and missing.json()["field"] == "name"

    reader = make_token(world, "alice", ["bookings:read"])
    no_account = client.get("/api/v1/me/tokens", headers={"Authorization": f"Bearer {reader}"})
    assert no_account.status_code == 403 and no_account.json()["scope"] == "account"

    # Only one's own tokens can be revoked; a revoked token stops working.
    assert client.delete(f"/api/v1/me/tokens/{token['id']}", headers=world.headers("bob")).status_code == 404
    assert client.delete(f"/api/v1/me/tokens/{token['id']}", headers=world.headers("alice")).status_code == 204
    assert client.delete(f"/api/v1/me/tokens/{token['id']}", headers=world.headers("alice")).status_code == 404
    assert client.get("/api/v1/me", headers=new_headers).status_code == 401


def test_api_writes_with_the_session_cookie_need_the_csrf_header(world: World, client: TestClient) -> None:
    sign_in(client, "alice")
    assert client.get("/api/v1/bookings").status_code == 200  # reads need nothing more
    start = next_grid_day()
    body = {"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat()}
    refused = client.post("/api/v1/bookings", json=body)
    assert refused.status_code == 403 and refused.json()["field"] == "X-CSRF-Token"
    assert client.post("/api/v1/bookings", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert client.get("/api/v1/bookings").json()["items"] == []
    token = csrf_of(client.get("/account").text)
    assert client.post("/api/v1/bookings", json=body, headers={"X-CSRF-Token": token}).status_code == 201


def test_a_token_cannot_mint_a_longer_lived_token(world: World, client: TestClient) -> None:
    now = utcnow()
    parent_expiry = now + timedelta(days=10)
    parent = make_token(world, "alice", ["account", "bookings:read"], expires_at=parent_expiry)
    headers = {"Authorization": f"Bearer {parent}"}
    with world.db.unit_of_work() as s:
        assert service.authenticate_token(s, parent).token_expires_at == parent_expiry
        assert service.authenticate_token(s, world.tokens["alice"]).token_expires_at is None

    # Asking for a later expiry than the calling token's own is refused and names the field.
    late = client.post("/api/v1/me/tokens", headers=headers,
                       json={"name": "child", "scopes": ["account"],
                             "expires_at": (parent_expiry + timedelta(days=1)).isoformat()})
    assert late.status_code == 422 and late.json()["field"] == "expires_at"
    assert late.json()["error"] == "expiry_beyond_token" and "outlives it" in late.json()["message"]

    # An expiry up to the calling token's own is fine.
    ok = client.post("/api/v1/me/tokens", headers=headers,
                     json={"name": "child", "scopes": ["account"],
                           "expires_at": (parent_expiry - timedelta(days=1)).isoformat()})
    assert ok.status_code == 201, ok.text

    # Without an expiry the child gets the parent's, since that is sooner than the usual 90 days.
    default = client.post("/api/v1/me/tokens", headers=headers, json={"name": "child2", "scopes": ["account"]})
    assert default.status_code == 201, default.text
    with world.db.unit_of_work(write=False) as s:
        child = s.get(ApiToken, default.json()["id"])
        assert child is not None and child.expires_at == parent_expiry

    # A browser session or a token without expiry keeps the usual limits and the 90-day default.
    with world.db.unit_of_work() as s:
        forever = service.create_api_token(s, service.find_user(s, "alice@example.org"), name="forever",
                                           scopes=["account"])
    far = client.post("/api/v1/me/tokens", headers={"Authorization": f"Bearer {forever}"},
                      json={"name": "far", "scopes": ["account"]})
    assert far.status_code == 201, far.text
    assert far.json()["expires_at"] is not None
    with world.db.unit_of_work(write=False) as s:
        far_row = s.get(ApiToken, far.json()["id"])
        assert far_row is not None and far_row.expires_at is not None
        assert far_row.expires_at >= now + service.TOKEN_DEFAULT_LIFETIME
