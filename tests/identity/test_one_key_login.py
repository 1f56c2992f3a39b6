"""Both directions at once: a member system signs in a Sichuan user who has never seen the platform.

The member system (an Authlib relying party) sends the browser to LabCommons; LabCommons has no session, so the
user picks the Sichuan identity service on the sign-in page, picks themself there, comes back signed in, allows
the member system on the consent screen, and the member system gets an ID token naming the user's region. A
second member system then signs the same browser in without any page at all ("one-key login").
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html import unescape

import httpx
import pytest
from authlib.integrations.httpx_client import OAuth2Client
from joserfc import jwt
from joserfc.jwk import KeySet

from labcommons.identity import provider
from labcommons.identity.demo_providers import DEMO_REGIONS, DemoProviderHandle, register_demo_provider, serve_in_thread
from tests.factories import World
from tests.server import free_port, running_server

SC = DEMO_REGIONS["SC"]
NEWCOMER = next(p for p in SC.persons if p.institution is None)
LIMS = "http://127.0.0.1:9/lims/callback"
HPC = "http://127.0.0.1:9/hpc/callback"


@pytest.fixture
def stack(world: World, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, DemoProviderHandle]]:
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")  # plain HTTP on loopback
    app_port = free_port()
    handle = serve_in_thread(SC, 0, app_base_url=f"http://127.0.0.1:{app_port}")
    try:
        with world.db.unit_of_work() as s:
            register_demo_provider(s, SC, handle.issuer)
        with running_server(db_url, port=app_port) as base:
            yield base, handle
    finally:
        handle.stop()


def _form(html: str, marker: str) -> tuple[str, dict[str, str]]:
    """The action and hidden fields of the first form containing `marker`."""
    for match in re.finditer(r"<form[^>]*action=\"([^\"]+)\"[^>]*>(.*?)</form>", html, re.S):
        if marker in match.group(2):
            fields = dict(re.findall(r"<input type=\"hidden\" name=\"([^\"]+)\" value=\"([^\"]*)\"", match.group(2)))
            return unescape(match.group(1)), {k: unescape(v) for k, v in fields.items()}
    raise AssertionError(f"no form with {marker!r}")


def _verified(id_token: str, base: str, client_id: str, nonce: str) -> dict[str, object]:
    jwks = KeySet.import_key_set(httpx.get(f"{base}/oidc/jwks").json())
    token = jwt.decode(id_token, jwks)
    claims = dict(token.claims)
    assert claims["iss"] == base and claims["aud"] == client_id and claims["nonce"] == nonce
    return claims


def test_member_system_signs_in_a_newcomer_through_the_regional_service(
    stack: tuple[str, DemoProviderHandle], world: World
) -> None:
    base, handle = stack
    with world.db.unit_of_work() as s:
        lims, lims_secret = provider.register_client(s, name="Sequencing LIMS", redirect_uris=[LIMS], trusted=False)
        hpc, hpc_secret = provider.register_client(s, name="HPC portal", redirect_uris=[HPC], trusted=True)
        lims_id, hpc_id = lims.client_id, hpc.client_id
    rp = OAuth2Client(lims_id, lims_secret, scope="openid profile email", redirect_uri=LIMS,
                      code_challenge_method="S256")
    verifier = "lims-verifier-" + "x" * 40
    url, state = rp.create_authorization_url(f"{base}/oidc/authorize", code_verifier=verifier, nonce="n-lims")

    with httpx.Client(follow_redirects=False, timeout=20) as browser:
        # No platform session yet: to the sign-in page, which offers the Sichuan service.
        answer = browser.get(url)
        assert answer.status_code == 303 and answer.headers["location"].startswith("/login?next=")
        login = browser.get(base + answer.headers["location"])
        action, fields = _form(login.text, f'data-provider="{SC.name}"')
        answer = browser.post(base + action, data=fields)
        assert answer.status_code == 303 and answer.headers["location"].startswith(handle.issuer + "/authorize")

        # At the regional service: pick the person.
        picker = browser.get(answer.headers["location"])
        action, fields = _form(picker.text, f'data-sub="{NEWCOMER.sub}"')
        answer = browser.post(handle.issuer + action, data=fields | {"sub": NEWCOMER.sub})
        assert answer.status_code in (302, 303)

        # Back at the platform: the callback signs the newcomer in and resumes the member system's request.
        answer = browser.get(answer.headers["location"])
        assert answer.status_code == 303, answer.text
        resume = answer.headers["location"]
        assert resume.startswith("/oidc/authorize?")
        consent = browser.get(base + resume)
        assert consent.status_code == 200 and "Sequencing LIMS" in consent.text
        action, fields = _form(consent.text, 'value="allow"')
        answer = browser.post(base + action, data=fields | {"decision": "allow"})
        assert answer.status_code == 303 and answer.headers["location"].startswith(LIMS + "?")

        tokens = rp.fetch_token(f"{base}/oidc/token", authorization_response=answer.headers["location"],
                                code_verifier=verifier)
        claims = _verified(tokens["id_token"], base, lims_id, "n-lims")
        assert claims["email"] == NEWCOMER.email and claims["name"] == NEWCOMER.name
        assert claims["region"] == "SC" and claims["institution"] is None and claims["roles"] == []
        assert f"state={state}" in answer.headers["location"]

        # A second, trusted member system: the same browser is signed in with no page shown at all.
        hpc_rp = OAuth2Client(hpc_id, hpc_secret, scope="openid email", redirect_uri=HPC,
                              code_challenge_method="S256")
        hpc_verifier = "hpc-verifier-" + "y" * 40
        url, _state = hpc_rp.create_authorization_url(f"{base}/oidc/authorize", code_verifier=hpc_verifier,
                                                      nonce="n-hpc")
        answer = browser.get(url)
        assert answer.status_code == 303 and answer.headers["location"].startswith(HPC + "?")
        tokens = hpc_rp.fetch_token(f"{base}/oidc/token", authorization_response=answer.headers["location"],
                                    code_verifier=hpc_verifier)
        hpc_claims = _verified(tokens["id_token"], base, hpc_id, "n-hpc")
        assert hpc_claims["sub"] == claims["sub"] and hpc_claims["email"] == NEWCOMER.email
