"""Builders for the OpenID Connect provider tests: clients, signed-in browsers, PKCE pairs, one code flow."""

from __future__ import annotations

import base64
import hashlib
import secrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
from fastapi.testclient import TestClient

from labcommons.db import Database
from labcommons.identity import provider
from labcommons.identity import service as identity
from labcommons.identity.models import RoleGrant

REDIRECT = "http://127.0.0.1:9/callback"
SESSION_COOKIE = "labcommons_session"


@dataclass
class Rp:
    """A registered relying party."""

    client_id: str
    secret: str
    redirect_uri: str = REDIRECT


def register(db: Database, *, trusted: bool = True, name: str = "Sequencing LIMS") -> Rp:
    with db.unit_of_work() as s:
        client, secret = provider.register_client(s, name=name, redirect_uris=[REDIRECT], trusted=trusted)
        return Rp(client.client_id, secret)


def browser_session(db: Database, email: str = "alice@example.org") -> str:
    """A live web session of a user (the cookie value)."""
    with db.unit_of_work() as s:
        return identity.start_web_session(s, identity.find_user(s, email))


def grant_facility_manager(db: Database, email: str, facility_id: int) -> None:
    with db.unit_of_work() as s:
        user = identity.find_user(s, email)
        s.add(RoleGrant(user_id=user.id, role="facility_manager", facility_id=facility_id,
                        scope_key=f"facility:{facility_id}"))


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge."""
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def authorize_url(rp: Rp, challenge: str, **overrides: str | None) -> str:
    params: dict[str, str | None] = {
        "response_type": "code", "client_id": rp.client_id, "redirect_uri": rp.redirect_uri,
        "scope": "openid profile email", "state": "st-123", "nonce": "n-456", "code_challenge": challenge,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return "/oidc/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def get_code(http: TestClient | httpx.Client, rp: Rp, challenge: str, **overrides: str | None) -> str:
    """Run the authorization request of a signed-in browser and return the code it is sent back with."""
    response = http.get(authorize_url(rp, challenge, **overrides), follow_redirects=False)
    assert response.status_code == 303, response.text
    location = response.headers["location"]
    assert location.startswith(rp.redirect_uri + "?"), location
    return query_of(location)["code"]


def redeem(http: TestClient | httpx.Client, rp: Rp, code: str, verifier: str | None, **extra: str) -> httpx.Response:
    """POST the code to the token endpoint with HTTP Basic client authentication."""
    data: dict[str, Any] = {"grant_type": "authorization_code", "code": code, "redirect_uri": rp.redirect_uri}
    if verifier is not None:
        data["code_verifier"] = verifier
    data.update(extra)
    return http.post("/oidc/token", data=data, auth=(rp.client_id, rp.secret))
