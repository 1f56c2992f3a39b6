"""The account page and the role-grant admin page, driven through their forms."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.app import create_app
from labcommons.db import utcnow
from labcommons.http import SESSION_COOKIE
from labcommons.identity import roles, service
from labcommons.identity.models import ExternalIdentity, IdentityProvider, RoleGrant, WebSession
from tests.factories import World
from tests.web.conftest import csrf_of, sign_in


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


def test_the_account_page_needs_a_sign_in(client: TestClient) -> None:
    response = client.get("/account", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/login?next=%2Faccount"


def test_profile_roles_and_identities(world: World, client: TestClient) -> None:
    with world.db.unit_of_work() as s:
        alice = service.find_user(s, "alice@example.org")
        roles.grant_role(s, None, alice, "facility_staff", facility_id=world.facilities["CQ-LAB"])
        cq = IdentityProvider(name="cq-id", display_name_en="Chongqing ID", display_name_zh="重庆身份",
                              region_code="CQ", issuer="https://cq.example", client_id="c")
        sc = IdentityProvider(name="sc-id", display_name_en="Sichuan ID", display_name_zh="四川身份",
                              region_code="SC", issuer="https://sc.example", client_id="c")
        off = IdentityProvider(name="off-id", region_code="SC", issuer="https://off.example", client_id="c",
                               enabled=False)
        s.add_all([cq, sc, off])
        s.flush()
        s.add(ExternalIdentity(user_id=alice.id, provider_id=cq.id, issuer=cq.issuer, subject="a-1",
                               email="alice@cq.example"))
    sign_in(client, "alice")
    page = client.get("/account?lang=en").text
    assert "alice@example.org" in page and "CQ-LAB Laboratory" in page
    assert "Facility staff" in page and "CQ-LAB-F" in page
    assert "Chongqing ID" in page and 'action="/account/identities/' in page and "/unlink" in page
    assert 'action="/account/identities/link/sc-id"' in page and "link/cq-id" not in page and "off-id" not in page
    zh = client.get("/account?lang=zh_CN").text
    assert "账户" in zh and "设施工作人员" in zh and "全部退出" in zh


def test_tokens_are_made_shown_once_and_revoked_through_the_form(world: World, client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/account?lang=en")
    expires = (utcnow() + timedelta(days=30)).date().isoformat()
    response = client.post("/account/tokens", data={"csrf_token": csrf_of(page.text), "name": "laptop",
                                                    "scopes": ["bookings:read", "bookings:write"],
                                                    "expires_on": expires}, follow_redirects=False)
    assert response.status_code == 303
    shown = client.get("/account").text
    token = shown.split('<code id="new-token">')[1].split("<")[0]
    assert token.startswith("lc_")
    assert token not in client.get("/account").text  # only once
    with world.db.unit_of_work() as s:
        actor = service.authenticate_token(s, token)
        assert actor.scopes == frozenset({"bookings:read", "bookings:write"})
        row = next(t for t in service.list_api_tokens(s, actor.user_id) if t.name == "laptop")
    assert "laptop" in shown

    bad = client.post("/account/tokens", data={"csrf_token": csrf_of(page.text), "name": "x",
                                               "expires_on": expires})
    assert bad.status_code == 422 and "Choose at least one scope." in bad.text
    late = client.post("/account/tokens", data={"csrf_token": csrf_of(page.text), "name": "x", "scopes": "account",
                                                "expires_on": "2999-01-01"})
    assert late.status_code == 422 and 'id="token-error"' in late.text
    forged = client.post("/account/tokens", data={"csrf_token": "nope", "name": "x", "scopes": "account",
                                                  "expires_on": expires})
    assert forged.status_code == 403

    revoked = client.post(f"/account/tokens/{row.id}/revoke", data={"csrf_token": csrf_of(page.text)})
    assert revoked.status_code == 200 and "laptop" in revoked.text  # the flash names it
    with world.db.unit_of_work(write=False) as s:
        assert all(t.name != "laptop" for t in service.list_api_tokens(s, actor.user_id))
    sign_in(client, "bob")
    other = client.post(f"/account/tokens/{row.id}/revoke", data={"csrf_token": csrf_of(client.get("/account").text)})
    assert other.status_code == 404


def test_a_new_token_is_shown_only_to_the_session_that_made_it(world: World, client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/account?lang=en")
    expires = (utcnow() + timedelta(days=30)).date().isoformat()
    client.post("/account/tokens", data={"csrf_token": csrf_of(page.text), "name": "shared-pc",
                                         "scopes": ["bookings:read"], "expires_on": expires}, follow_redirects=False)
    carried = client.cookies.get("labcommons_new_token")
    assert carried
    # Alice walks away; Bob signs in on the same browser within the two minutes.
    sign_in(client, "bob")
    client.cookies.set("labcommons_new_token", carried, path="/account")
    shown = client.get("/account")
    assert 'id="new-token"' not in shown.text and carried.rpartition(".")[0] not in shown.text
    assert shown.headers["cache-control"] == "no-store"


def test_log_out_everywhere(world: World, client: TestClient) -> None:
    sign_in(client, "alice")
    with TestClient(create_app(db=world.db)) as phone:
        sign_in(phone, "alice")
        sign_in(TestClient(create_app(db=world.db)), "bob")
        page = client.get("/account?lang=en")
        assert "Signed in on 2 browsers or devices." in page.text
        response = client.post("/account/logout-everywhere", data={"csrf_token": csrf_of(page.text)},
                               follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login"
        assert SESSION_COOKIE not in client.cookies
        assert phone.get("/account", follow_redirects=False).status_code == 303
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(WebSession).where(
            WebSession.user_id == world.actors["alice"].user_id)) == 0
        assert s.scalar(select(func.count()).select_from(WebSession)) == 1  # bob's stays


def test_role_grants_through_the_admin_page(world: World, client: TestClient) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, service.find_user(s, "alice@example.org"), "facility_manager",
                         facility_id=world.facilities["CQ-LAB"])
    sign_in(client, "alice")
    page = client.get("/admin/roles?lang=en")
    assert page.status_code == 200
    csrf = csrf_of(page.text)
    granted = client.post("/admin/roles", data={"csrf_token": csrf, "email": "bob@example.org",
                                                "role": "facility_staff", "scope": "CQ-LAB-F"})
    assert granted.status_code == 200 and "bob@example.org" in granted.text
    elsewhere = client.post("/admin/roles", data={"csrf_token": csrf, "email": "carol@example.org",
                                                  "role": "facility_staff", "scope": "SC-UNI-F"})
    assert elsewhere.status_code == 403 and 'id="grant-error"' in elsewhere.text
    again = client.post("/admin/roles", data={"csrf_token": csrf, "email": "bob@example.org",
                                              "role": "facility_staff", "scope": "CQ-LAB-F"})
    assert again.status_code == 409
    nobody = client.post("/admin/roles", data={"csrf_token": csrf, "email": "nobody@example.org",
                                               "role": "facility_staff", "scope": "CQ-LAB-F"})
    assert nobody.status_code == 422 and "No user has this e-mail address." in nobody.text
    with world.db.unit_of_work(write=False) as s:
        grant_id = s.scalar(select(RoleGrant.id).where(RoleGrant.user_id == world.actors["bob"].user_id))
    assert client.post(f"/admin/roles/{grant_id}/revoke", data={"csrf_token": csrf}).status_code == 200
    with world.db.unit_of_work(write=False) as s:
        assert roles.grants_of(s, world.actors["bob"].user_id) == ()
