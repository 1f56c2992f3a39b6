"""The platform as OpenID Connect provider: a real relying party signs a user in; each protocol failure refused."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from fastapi.testclient import TestClient
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import select, update
from typer.testing import CliRunner

from labcommons.cli import app as cli_app
from labcommons.config import get_settings
from labcommons.db import Database, utcnow
from labcommons.errors import InvalidInput
from labcommons.identity import provider
from labcommons.identity.models import OidcAuthorizationCode, OidcClient, RoleGrant, SigningKey
from tests.api_client import client_for
from tests.factories import World
from tests.identity.provider_support import (
    REDIRECT,
    SESSION_COOKIE,
    Rp,
    authorize_url,
    browser_session,
    get_code,
    grant_facility_manager,
    pkce,
    query_of,
    redeem,
    register,
)
from tests.server import running_server


@pytest.fixture
def browser(world: World) -> TestClient:
    """A TestClient signed in as alice."""
    client = client_for(world.db)
    client.cookies.set(SESSION_COOKIE, browser_session(world.db))
    return client


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def _verify(id_token: str, jwks: dict[str, object], *, issuer: str, audience: str, nonce: str) -> jwt.Token:
    token = jwt.decode(id_token, KeySet.import_key_set(jwks), algorithms=["RS256"])  # type: ignore[arg-type]
    JWTClaimsRegistry(
        iss={"essential": True, "value": issuer}, aud={"essential": True, "value": audience},
        nonce={"essential": True, "value": nonce}, sub={"essential": True}, exp={"essential": True},
    ).validate(token.claims)
    return token


# --- against a real server ---


def test_relying_party_signs_user_in_through_the_platform(
    world: World, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grant_facility_manager(world.db, "alice@example.org", world.facilities["CQ-LAB"])
    rp = register(world.db)
    cookie = browser_session(world.db)
    # The server is plain HTTP on loopback; Authlib refuses that unless told it is a test.
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    with running_server(db_url) as base:
        config = httpx.get(f"{base}/.well-known/openid-configuration").json()
        assert config["issuer"] == base
        assert config["code_challenge_methods_supported"] == ["S256"]
        rp_client = OAuth2Client(rp.client_id, rp.secret, scope="openid profile email", redirect_uri=REDIRECT,
                                 code_challenge_method="S256")
        verifier = "v" * 20 + os.urandom(16).hex()
        url, state = rp_client.create_authorization_url(config["authorization_endpoint"], code_verifier=verifier,
                                                        nonce="nonce-from-lims")
        browser = httpx.Client(cookies={SESSION_COOKIE: cookie})
        answer = browser.get(url, follow_redirects=False)
        assert answer.status_code == 303, answer.text
        back = answer.headers["location"]
        assert back.startswith(REDIRECT) and query_of(back)["state"] == state and query_of(back)["iss"] == base

        tokens = rp_client.fetch_token(config["token_endpoint"], authorization_response=back, code_verifier=verifier)
        assert tokens["token_type"].lower() == "bearer" and tokens["expires_in"] > 0
        jwks = httpx.get(config["jwks_uri"]).json()
        token = _verify(tokens["id_token"], jwks, issuer=base, audience=rp.client_id, nonce="nonce-from-lims")
        claims = token.claims
        assert claims["email"] == "alice@example.org" and claims["name"] == "Alice"
        assert claims["region"] == "CQ" and claims["institution"] == "CQ-LAB"
        assert claims["roles"] == ["facility_manager:facility:CQ-LAB-F"]
        assert token.header["kid"] in {k["kid"] for k in jwks["keys"]}

        info = rp_client.get(config["userinfo_endpoint"])
        assert info.status_code == 200
        assert info.json()["sub"] == claims["sub"] and info.json()["roles"] == claims["roles"]


def test_rotating_keys_keeps_issued_tokens_valid_and_users_signed_in(
    world: World, db_url: str, cli: CliRunner
) -> None:
    rp = register(world.db)
    cookie = browser_session(world.db)
    with running_server(db_url) as base, httpx.Client(base_url=base, cookies={SESSION_COOKIE: cookie}) as http:
        verifier, challenge = pkce()
        before = redeem(http, rp, get_code(http, rp, challenge), verifier).json()
        old_kid = jwt.decode(before["id_token"], KeySet.import_key_set(http.get("/oidc/jwks").json())).header["kid"]

        rotated = cli.invoke(cli_app, ["oidc-keys", "rotate"])
        assert rotated.exit_code == 0, rotated.output

        jwks = http.get("/oidc/jwks").json()
        assert {k["kid"] for k in jwks["keys"]} == {old_kid, rotated.output.split()[-1]}
        _verify(before["id_token"], jwks, issuer=base, audience=rp.client_id, nonce="n-456")
        # The browser session survives and gets a new code without signing in again.
        verifier, challenge = pkce()
        after = redeem(http, rp, get_code(http, rp, challenge), verifier).json()
        new = _verify(after["id_token"], jwks, issuer=base, audience=rp.client_id, nonce="n-456")
        assert new.header["kid"] != old_kid and new.header["kid"] == rotated.output.split()[-1]
        assert "Alice" in http.get("/").text
        assert http.get("/oidc/userinfo", headers={"Authorization": f"Bearer {before['access_token']}"}).is_success

    listed = cli.invoke(cli_app, ["oidc-keys", "list"])
    assert old_kid in listed.output and "signing" in listed.output and "published" in listed.output
    assert "deleted 0" in cli.invoke(cli_app, ["oidc-keys", "prune"]).output


# --- the authorization endpoint ---


def test_discovery_and_jwks_publish_one_signing_key(browser: TestClient) -> None:
    config = browser.get("/.well-known/openid-configuration").json()
    issuer = get_settings().public_base_url.rstrip("/")
    assert config["issuer"] == issuer and config["jwks_uri"] == f"{issuer}/oidc/jwks"
    assert config["response_types_supported"] == ["code"]
    assert config["token_endpoint_auth_methods_supported"] == ["client_secret_basic", "client_secret_post"]
    assert {"region", "institution", "roles"} <= set(config["claims_supported"])
    keys = browser.get("/oidc/jwks").json()["keys"]
    assert len(keys) == 1 and keys[0]["kty"] == "RSA" and "d" not in keys[0]
    assert browser.get("/oidc/jwks").json()["keys"] == keys


def test_anonymous_user_is_sent_to_sign_in_and_back(world: World) -> None:
    rp = register(world.db)
    url = authorize_url(rp, pkce()[1])
    response = client_for(world.db).get(url, follow_redirects=False)
    assert response.status_code == 303
    assert query_of(response.headers["location"]) == {"next": url}
    assert response.headers["location"].startswith("/login?")


@pytest.mark.parametrize("redirect_uri", ["https://evil.example/cb", REDIRECT + "/more", REDIRECT + "?x=1", ""])
def test_unregistered_redirect_uri_shows_an_error_page(browser: TestClient, world: World, redirect_uri: str) -> None:
    rp = register(world.db)
    response = browser.get(authorize_url(rp, pkce()[1], redirect_uri=redirect_uri), follow_redirects=False)
    assert response.status_code == 400 and "location" not in response.headers
    assert response.headers["content-type"].startswith("text/html")


def test_unknown_client_shows_an_error_page(browser: TestClient) -> None:
    response = browser.get(authorize_url(Rp("nope", "x"), pkce()[1]), follow_redirects=False)
    assert response.status_code == 400 and "location" not in response.headers


@pytest.mark.parametrize(("overrides", "error"), [
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"scope": "profile email"}, "invalid_scope"),
    ({"code_challenge": None}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"code_challenge_method": None}, "invalid_request"),
])
def test_protocol_errors_go_back_to_the_client(
    browser: TestClient, world: World, overrides: dict[str, str | None], error: str
) -> None:
    rp = register(world.db)
    response = browser.get(authorize_url(rp, pkce()[1], **overrides), follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"].startswith(REDIRECT + "?")
    back = query_of(response.headers["location"])
    assert back["error"] == error and back["state"] == "st-123" and "code" not in back


def test_untrusted_client_asks_consent_and_deny_answers_access_denied(browser: TestClient, world: World) -> None:
    rp = register(world.db, trusted=False, name="Supercomputing portal")
    page = browser.get(authorize_url(rp, pkce()[1], scope="openid email"), follow_redirects=False)
    assert page.status_code == 200 and "Supercomputing portal" in page.text
    assert "Allow" in page.text or "允许" in page.text
    form = _hidden_fields(page.text)
    assert form["redirect_uri"] == REDIRECT and form["scope"] == "openid email"

    denied = browser.post("/oidc/authorize", data=form | {"decision": "deny"}, follow_redirects=False)
    assert denied.status_code == 303
    back = query_of(denied.headers["location"])
    assert back["error"] == "access_denied" and back["state"] == "st-123" and "code" not in back
    # Nothing was remembered: the next request asks again.
    assert browser.get(authorize_url(rp, pkce()[1]), follow_redirects=False).status_code == 200


def test_consent_allowed_is_remembered(browser: TestClient, world: World) -> None:
    rp = register(world.db, trusted=False)
    verifier, challenge = pkce()
    form = _hidden_fields(browser.get(authorize_url(rp, challenge, scope="openid email")).text)
    allowed = browser.post("/oidc/authorize", data=form | {"decision": "allow"}, follow_redirects=False)
    assert allowed.status_code == 303
    assert redeem(browser, rp, query_of(allowed.headers["location"])["code"], verifier).status_code == 200
    assert get_code(browser, rp, pkce()[1], scope="openid email")  # asked once only
    # Asking for more than was allowed asks again; a forged form without the CSRF token is refused.
    assert browser.get(authorize_url(rp, challenge), follow_redirects=False).status_code == 200
    forged = browser.post("/oidc/authorize", data=form | {"decision": "allow", "csrf_token": "x"},
                          follow_redirects=False)
    assert forged.status_code == 403


def test_trusted_client_skips_consent(browser: TestClient, world: World) -> None:
    rp = register(world.db, trusted=True)
    assert get_code(browser, rp, pkce()[1])


def _hidden_fields(html: str) -> dict[str, str]:
    import re

    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', html))


# --- the token endpoint ---


def test_code_gives_tokens_and_userinfo(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    response = redeem(browser, rp, get_code(browser, rp, challenge, scope="openid"), verifier)
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["scope"] == "openid" and body["token_type"] == "Bearer"
    info = browser.get("/oidc/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"}).json()
    # Only what the scope releases: no e-mail or name without those scopes.
    assert info["region"] == "CQ" and info["roles"] == [] and "email" not in info and "name" not in info


def test_client_secret_post_works_too(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    response = browser.post("/oidc/token", data={
        "grant_type": "authorization_code", "code": get_code(browser, rp, challenge), "redirect_uri": REDIRECT,
        "code_verifier": verifier, "client_id": rp.client_id, "client_secret": rp.secret,
    })
    assert response.status_code == 200, response.text


def test_missing_pkce_verifier_is_refused(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    response = redeem(browser, rp, get_code(browser, rp, pkce()[1]), None)
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


def test_wrong_pkce_verifier_is_refused(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    response = redeem(browser, rp, get_code(browser, rp, pkce()[1]), pkce()[0])
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    assert "id_token" not in response.json()


def test_replayed_code_is_refused_and_revokes_its_tokens(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    code = get_code(browser, rp, challenge)
    first = redeem(browser, rp, code, verifier)
    assert first.status_code == 200
    bearer = {"Authorization": f"Bearer {first.json()['access_token']}"}
    assert browser.get("/oidc/userinfo", headers=bearer).status_code == 200

    second = redeem(browser, rp, code, verifier)
    assert second.status_code == 400 and second.json()["error"] == "invalid_grant"
    refused = browser.get("/oidc/userinfo", headers=bearer)
    assert refused.status_code == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]


def test_wrong_redirect_uri_at_token_is_refused(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    response = redeem(browser, rp, get_code(browser, rp, challenge), verifier, redirect_uri=REDIRECT + "x")
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


def test_wrong_client_secret_is_refused(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    code = get_code(browser, rp, challenge)
    response = redeem(browser, Rp(rp.client_id, rp.secret + "x"), code, verifier)
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert response.headers["www-authenticate"].startswith("Basic")
    # Another client cannot redeem the code either.
    other = register(world.db, name="Other")
    assert redeem(browser, other, code, verifier).json()["error"] == "invalid_grant"
    assert redeem(browser, rp, code, verifier).status_code == 200


def test_disabled_client_can_neither_start_nor_finish_a_sign_in(
    browser: TestClient, world: World, cli: CliRunner
) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    code = get_code(browser, rp, challenge)
    assert cli.invoke(cli_app, ["oidc-client", "disable", rp.client_id]).exit_code == 0
    assert redeem(browser, rp, code, verifier).json()["error"] == "invalid_client"
    response = browser.get(authorize_url(rp, challenge), follow_redirects=False)
    assert response.status_code == 400 and "location" not in response.headers
    assert cli.invoke(cli_app, ["oidc-client", "enable", rp.client_id]).exit_code == 0
    assert redeem(browser, rp, code, verifier).status_code == 200


def test_expired_code_is_refused(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    code = get_code(browser, rp, challenge)
    with world.db.unit_of_work() as s:
        s.execute(update(OidcAuthorizationCode).values(expires_at=utcnow() - timedelta(seconds=1)))
    response = redeem(browser, rp, code, verifier)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(("data", "error"), [
    ({"grant_type": "password"}, "unsupported_grant_type"),
    ({"code": "not-a-code"}, "invalid_grant"),
    ({"code": ""}, "invalid_request"),
])
def test_malformed_token_requests_answer_json(
    browser: TestClient, world: World, data: dict[str, str], error: str
) -> None:
    rp = register(world.db)
    extra = dict(data)  # parametrize shares the dict between engines; leave it untouched
    response = redeem(browser, rp, extra.pop("code", "x"), pkce()[0], **extra)
    assert response.status_code == 400 and response.json()["error"] == error


def test_userinfo_refuses_missing_unknown_and_expired_tokens(browser: TestClient, world: World) -> None:
    rp = register(world.db)
    verifier, challenge = pkce()
    access = redeem(browser, rp, get_code(browser, rp, challenge), verifier).json()["access_token"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {access}"}):
        response = browser.post("/oidc/userinfo", headers=headers)
        assert response.status_code == 401 and response.json()["error"] == "invalid_token"
        assert response.headers["www-authenticate"].startswith("Bearer")
    from labcommons.identity.models import OidcAccessToken

    with world.db.unit_of_work() as s:
        s.execute(update(OidcAccessToken).values(expires_at=utcnow() - timedelta(seconds=1)))
    assert browser.get("/oidc/userinfo", headers={"Authorization": f"Bearer {access}"}).status_code == 401


# --- clients, keys, the CLI and the admin page ---


@pytest.mark.parametrize(("uri", "ok"), [
    ("https://lims.example.org/oidc/callback", True),
    ("http://127.0.0.1:8080/cb", True),
    ("http://localhost/cb", True),
    ("http://lims.example.org/cb", False),
    ("https://lims.example.org/cb#frag", False),
    ("/relative/cb", False),
    ("javascript:alert(1)", False),
    ("https:///nohost", False),
])
def test_redirect_uris_must_be_https_or_loopback(uri: str, ok: bool) -> None:
    if ok:
        assert provider.validate_redirect_uri(uri) == uri
    else:
        with pytest.raises(InvalidInput):
            provider.validate_redirect_uri(uri)


def test_cli_registers_lists_and_disables_clients(db: Database, cli: CliRunner) -> None:
    added = cli.invoke(cli_app, ["oidc-client", "add", "--name", "测序平台 LIMS", "--redirect-uri",
                                 "https://lims.example.org/cb", "--redirect-uri", "http://127.0.0.1:5000/cb"])
    assert added.exit_code == 0, added.output
    lines = dict(line.split(": ", 1) for line in added.output.splitlines() if ": " in line)
    client_id, secret = lines["client_id"], lines["client_secret"]
    with db.unit_of_work(write=False) as s:
        stored = s.scalars(select(OidcClient)).one()
        assert stored.client_id == client_id and secret not in stored.secret_hash and not stored.trusted
        assert provider.authenticate_client(s, client_id, secret).id == stored.id
    assert client_id in cli.invoke(cli_app, ["oidc-client", "list"]).output
    assert cli.invoke(cli_app, ["oidc-client", "disable", client_id]).exit_code == 0
    with db.unit_of_work(write=False) as s, pytest.raises(provider.InvalidClient):
        provider.authenticate_client(s, client_id, secret)
    bad = cli.invoke(cli_app, ["oidc-client", "add", "--name", "X", "--redirect-uri", "http://lims.example.org/cb"])
    assert bad.exit_code == 2 and "redirect" in bad.output
    assert cli.invoke(cli_app, ["oidc-client", "disable", "nope"]).exit_code == 2


def test_cli_prunes_keys_only_after_the_grace_period(db: Database, cli: CliRunner) -> None:
    assert cli.invoke(cli_app, ["oidc-keys", "rotate"]).exit_code == 0
    assert cli.invoke(cli_app, ["oidc-keys", "rotate"]).exit_code == 0
    with db.unit_of_work(write=False) as s:
        assert len(provider.jwks(s)["keys"]) == 2
    grace = get_settings().oidc_key_grace_seconds
    with db.unit_of_work() as s:
        s.execute(update(SigningKey).where(SigningKey.retired_at.is_not(None))
                  .values(retired_at=utcnow() - timedelta(seconds=grace + 1)))
    with db.unit_of_work(write=False) as s:
        assert len(provider.jwks(s)["keys"]) == 1
    assert "deleted 1" in cli.invoke(cli_app, ["oidc-keys", "prune"]).output
    with db.unit_of_work(write=False) as s:
        assert len(provider.list_keys(s)) == 1 and provider.list_keys(s)[0].retired_at is None


@pytest.mark.parametrize("header", ["Basic \u00e9t\u00e9", "Basic !!!", "Basic " + "bm9jb2xvbg==", "Basic"])
def test_malformed_basic_authorization_is_invalid_client(browser: TestClient, header: str) -> None:
    # "bm9jb2xvbg==" is "nocolon": Base64 that is not "id:secret".
    response = browser.post("/oidc/token", data={"grant_type": "authorization_code", "code": "x"},
                            headers={"Authorization": header.encode()})
    assert response.status_code in (400, 401) and response.json()["error"] in ("invalid_client", "invalid_request")
    assert response.headers["cache-control"] == "no-store"


def test_admin_page_registers_clients_and_shows_the_secret_once(
    world: World, browser: TestClient
) -> None:
    assert browser.get("/admin/clients", follow_redirects=False).status_code == 403
    with world.db.unit_of_work() as s:
        s.add(RoleGrant(user_id=world.actors["alice"].user_id, role="platform_admin", scope_key="platform"))
    page = browser.get("/admin/clients?lang=en")
    assert page.status_code == 200 and "Register a member system" in page.text
    form = {"csrf_token": _hidden_fields(page.text)["csrf_token"], "name": "HPC portal",
            "redirect_uris": "https://hpc.example.org/cb\nhttp://127.0.0.1:7000/cb", "trusted": "1"}
    assert browser.post("/admin/clients", data=form | {"csrf_token": "x"}).status_code == 403
    bad = browser.post("/admin/clients", data=form | {"redirect_uris": "http://hpc.example.org/cb"})
    assert bad.status_code == 422 and 'aria-invalid="true"' in bad.text

    created = browser.post("/admin/clients", data=form)
    assert created.status_code == 200 and "Client secret" in created.text
    with world.db.unit_of_work(write=False) as s:
        client = s.scalars(select(OidcClient)).one()
        assert client.trusted and provider.redirect_uris_of(client) == ["https://hpc.example.org/cb",
                                                                        "http://127.0.0.1:7000/cb"]
    secret = created.text.split("Client secret")[1].split("<code>")[1].split("</code>")[0]
    with world.db.unit_of_work(write=False) as s:
        assert provider.authenticate_client(s, client.client_id, secret)
    assert secret not in browser.get("/admin/clients").text

    toggled = browser.post(f"/admin/clients/{client.client_id}", data={"csrf_token": form["csrf_token"],
                                                                        "action": "disable"},
                           follow_redirects=False)
    assert toggled.status_code == 303
    browser.post(f"/admin/clients/{client.client_id}", data={"csrf_token": form["csrf_token"], "action": "distrust"})
    with world.db.unit_of_work(write=False) as s:
        client = s.scalars(select(OidcClient)).one()
        assert not client.enabled and not client.trusted
    zh = browser.get("/admin/clients?lang=zh_CN").text
    assert "成员系统" in zh and "已停用登录" in zh and "恢复登录" in zh
