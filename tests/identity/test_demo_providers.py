"""The demo regional identity services over real loopback HTTP: discovery, the picker, PKCE, codes, ID tokens."""

from __future__ import annotations

import base64
import hashlib
import secrets
import socket
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet
from joserfc.jwt import JWTClaimsRegistry
from sqlalchemy import select
from typer.testing import CliRunner

from labcommons import cli
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.identity.demo_providers import (
    DEMO_REGIONS,
    DemoProviderHandle,
    disable_demo_providers,
    register_demo_provider,
    serve_in_thread,
)
from labcommons.identity.models import IdentityProvider
from tests.factories import build_world
from tests.server import free_port

APP = "http://127.0.0.1:8999"
SC = DEMO_REGIONS["SC"]
REDIRECT = f"{APP}/login/oidc/{SC.name}/callback"


@pytest.fixture(scope="module")
def provider() -> Iterator[DemoProviderHandle]:
    handle = serve_in_thread("SC", 0, app_base_url=APP)
    yield handle
    handle.stop()


@pytest.fixture
def http(provider: DemoProviderHandle) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=provider.issuer, follow_redirects=False, timeout=10) as client:
        yield client


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_params(challenge: str, **overrides: str) -> dict[str, str]:
    return {"client_id": SC.client_id, "redirect_uri": REDIRECT, "response_type": "code",
            "scope": "openid email profile", "state": "st-1", "nonce": "n-1", "code_challenge": challenge,
            "code_challenge_method": "S256"} | overrides


def pick(http: httpx.Client, sub: str, challenge: str) -> dict[str, list[str]]:
    """Choose a person on the picker and return the redirect's query."""
    response = http.post("/authorize", data=authorize_params(challenge) | {"sub": sub})
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(REDIRECT + "?")
    return parse_qs(urlsplit(location).query)


def exchange(http: httpx.Client, code: str, verifier: str, **extra: str) -> httpx.Response:
    return http.post("/token", data={"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
                                     "code_verifier": verifier} | extra, auth=(SC.client_id, SC.client_secret))


def test_discovery_and_jwks(http: httpx.Client, provider: DemoProviderHandle) -> None:
    meta = http.get("/.well-known/openid-configuration").json()
    assert meta["issuer"] == provider.issuer == f"http://127.0.0.1:{provider.port}"
    assert meta["authorization_endpoint"] == f"{provider.issuer}/authorize"
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert "client_secret_basic" in meta["token_endpoint_auth_methods_supported"]
    keys = httpx.get(meta["jwks_uri"]).json()["keys"]
    assert [(k["kty"], k["alg"]) for k in keys] == [("RSA", "RS256")] and "d" not in keys[0]


def test_authorize_page_lists_the_demo_persons(http: httpx.Client) -> None:
    page = http.get("/authorize", params=authorize_params(pkce()[1]))
    assert page.status_code == 200
    assert "四川省统一身份认证（演示）" in page.text and "Sichuan identity service (demo)" in page.text
    for person in SC.persons:
        assert f'data-sub="{person.sub}"' in page.text and person.email in page.text


@pytest.mark.parametrize(("override", "expected"), [
    ({"client_id": "someone-else"}, "Unknown client_id"),
    ({"redirect_uri": "http://evil.example/cb"}, "not registered"),
])
def test_unknown_client_or_redirect_stays_on_the_provider(
    http: httpx.Client, override: dict[str, str], expected: str
) -> None:
    response = http.get("/authorize", params=authorize_params(pkce()[1], **override))
    assert response.status_code == 400 and expected in response.text


@pytest.mark.parametrize(("override", "error"), [
    ({"code_challenge": ""}, "invalid_request"),
    ({"code_challenge_method": "plain"}, "invalid_request"),
    ({"response_type": "token"}, "unsupported_response_type"),
    ({"scope": "email"}, "invalid_scope"),
])
def test_bad_requests_go_back_with_an_error(http: httpx.Client, override: dict[str, str], error: str) -> None:
    response = http.get("/authorize", params=authorize_params(pkce()[1], **override))
    assert response.status_code == 303
    query = parse_qs(urlsplit(response.headers["location"]).query)
    assert query["error"] == [error] and query["state"] == ["st-1"]


def test_code_flow_gives_an_id_token_that_verifies(http: httpx.Client, provider: DemoProviderHandle) -> None:
    verifier, challenge = pkce()
    person = SC.persons[0]
    query = pick(http, person.sub, challenge)
    assert query["state"] == ["st-1"] and query["iss"] == [provider.issuer]
    response = exchange(http, query["code"][0], verifier)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer" and response.headers["cache-control"] == "no-store"

    token = jwt.decode(body["id_token"], KeySet.import_key_set(http.get("/jwks").json()))
    assert token.header["alg"] == "RS256"
    JWTClaimsRegistry(
        iss={"essential": True, "value": provider.issuer}, aud={"essential": True, "value": SC.client_id},
        nonce={"essential": True, "value": "n-1"}, exp={"essential": True}, sub={"essential": True},
    ).validate(token.claims)
    assert token.claims["sub"] == person.sub and token.claims["email"] == person.email
    assert token.claims["email_verified"] is True and token.claims["institution"] == person.institution

    info = http.get("/userinfo", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert info.json()["email"] == person.email
    assert http.get("/userinfo", headers={"Authorization": "Bearer nope"}).status_code == 401


def test_person_without_institution_has_no_institution_claim(http: httpx.Client) -> None:
    verifier, challenge = pkce()
    person = next(p for p in SC.persons if p.institution is None)
    body = exchange(http, pick(http, person.sub, challenge)["code"][0], verifier).json()
    claims = jwt.decode(body["id_token"], KeySet.import_key_set(http.get("/jwks").json())).claims
    assert "institution" not in claims and claims["region"] == "SC"


def test_wrong_verifier_is_refused_and_spends_the_code(http: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = pick(http, SC.persons[1].sub, challenge)["code"][0]
    wrong = exchange(http, code, pkce()[0])
    assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
    assert exchange(http, code, verifier).json()["error"] == "invalid_grant"


def test_code_is_single_use(http: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = pick(http, SC.persons[1].sub, challenge)["code"][0]
    assert exchange(http, code, verifier).status_code == 200
    again = exchange(http, code, verifier)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_client_authentication(http: httpx.Client) -> None:
    verifier, challenge = pkce()
    code = pick(http, SC.persons[1].sub, challenge)["code"][0]
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT, "code_verifier": verifier}
    refused = http.post("/token", data=data, auth=(SC.client_id, "wrong"))
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    posted = http.post("/token", data=data | {"client_id": SC.client_id, "client_secret": SC.client_secret})
    assert posted.status_code == 200 and "id_token" in posted.json()


def test_cancel_goes_back_with_access_denied(http: httpx.Client) -> None:
    response = http.post("/authorize", data=authorize_params(pkce()[1]) | {"cancel": "1"})
    assert parse_qs(urlsplit(response.headers["location"]).query)["error"] == ["access_denied"]


def test_registration_is_idempotent(db: Database) -> None:
    build_world(db)
    with db.unit_of_work() as s:
        register_demo_provider(s, SC, "http://127.0.0.1:8101")
        register_demo_provider(s, DEMO_REGIONS["CQ"], "http://127.0.0.1:8102")
    with db.unit_of_work() as s:
        register_demo_provider(s, SC, "http://127.0.0.1:9101")
    with db.unit_of_work(write=False) as s:
        rows = {p.name: p for p in s.scalars(select(IdentityProvider))}
    assert set(rows) == {"sc-demo-ids", "cq-demo-ids"}
    sc = rows["sc-demo-ids"]
    assert (sc.issuer, sc.region_code, sc.client_secret) == ("http://127.0.0.1:9101", "SC", SC.client_secret)
    assert sc.enabled and sc.trusted_for_linking and sc.display_name_en == "Sichuan identity service (demo)"
    with db.unit_of_work() as s:
        assert disable_demo_providers(s) == 2
    with db.unit_of_work(write=False) as s:
        assert not any(p.enabled for p in s.scalars(select(IdentityProvider)))


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    monkeypatch.setenv("LABCOMMONS_PUBLIC_BASE_URL", APP)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_demo_command_runs_and_registers_both_services(
    db: Database, cli_env: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    ports = {"SC": free_port(), "CQ": free_port()}
    seen: list[dict[str, str]] = []

    def fake_serve(host: str, port: int, workers: int) -> None:
        # Instead of serving the app: the providers answer now, and stop once the app would have exited.
        seen.append({code: httpx.get(f"http://127.0.0.1:{p}/.well-known/openid-configuration").json()["issuer"]
                     for code, p in ports.items()})

    monkeypatch.setattr(cli, "_serve", fake_serve)
    args = ["demo", "--idp-port-sc", str(ports["SC"]), "--idp-port-cq", str(ports["CQ"])]
    for _ in range(2):
        result = cli_env.invoke(cli.app, args)
        assert result.exit_code == 0, result.output
    assert seen == [{code: f"http://127.0.0.1:{p}" for code, p in ports.items()}] * 2
    assert "Sichuan identity service (demo)" in result.output and "孙明远" in result.output
    assert "demo-password" in result.output
    with db.unit_of_work(write=False) as s:
        rows = {p.name: p for p in s.scalars(select(IdentityProvider))}
    assert {name: (p.region_code, p.issuer, p.enabled) for name, p in rows.items()} == {
        "sc-demo-ids": ("SC", f"http://127.0.0.1:{ports['SC']}", True),
        "cq-demo-ids": ("CQ", f"http://127.0.0.1:{ports['CQ']}", True),
    }
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{ports['SC']}/jwks")

    monkeypatch.setattr(cli, "_serve", lambda host, port, workers: None)
    without = cli_env.invoke(cli.app, ["demo", "--no-demo-idps"])
    assert without.exit_code == 0 and "Sichuan identity service" not in without.output
    with db.unit_of_work(write=False) as s:
        assert not any(p.enabled for p in s.scalars(select(IdentityProvider)))


def test_demo_command_reports_a_busy_port(db: Database, cli_env: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_serve", lambda host, port, workers: pytest.fail("must not serve"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        result = cli_env.invoke(cli.app, ["demo", "--idp-port-sc", str(free_port()), "--idp-port-cq", str(busy)])
    assert result.exit_code == 2 and "--no-demo-idps" in result.output
