"""Signing in through real upstream OpenID Connect providers on loopback, on SQLite and PostgreSQL.

Two providers, one per region: `oidc-provider-mock` (sc-ids, Sichuan) and our own misbehaving one (cq-ids, Chongqing).
The app runs in-process (TestClient); it reaches the providers over real HTTP.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient
from oidc_provider_mock import User as MockUser
from oidc_provider_mock import run_server_in_thread
from sqlalchemy import func, select
from typer.testing import CliRunner

from labcommons.actor import Actor
from labcommons.booking.models import Booking, BookingStatus
from labcommons.cli import app as cli_app
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import Forbidden
from labcommons.identity import federation, roles
from labcommons.identity.models import ExternalIdentity, IdentityProvider, Role, RoleGrant, User, WebSession
from tests.api_client import client_for
from tests.factories import World, build_world, next_grid_day
from tests.identity.upstream import DELETE, Upstream, new_key, running

SC_USER = MockUser(sub="wang.fang", claims={
    "email": "wang.fang@sc-ids.example", "email_verified": True, "name": "王芳", "institution": "SC-UNI",
})


@dataclass
class Env:
    db: Database
    world: World
    client: TestClient
    cq: Upstream
    sc_issuer: str


@pytest.fixture
def env(db: Database, monkeypatch: pytest.MonkeyPatch) -> Iterator[Env]:
    monkeypatch.setenv("LABCOMMONS_PUBLIC_BASE_URL", "http://testserver")
    monkeypatch.setenv("AUTHLIB_INSECURE_TRANSPORT", "1")
    get_settings.cache_clear()
    federation.clear_caches()
    world = build_world(db)
    with run_server_in_thread(user_claims=[SC_USER]) as mock, running(Upstream()) as cq:
        sc_issuer = f"http://localhost:{mock.server_port}"
        with db.unit_of_work() as s:
            federation.add_provider(s, name="sc-ids", region_code="SC", issuer=sc_issuer, client_id="labcommons-sc",
                                    client_secret="sc-secret", display_name_zh="四川省统一身份认证",
                                    display_name_en="Sichuan identity service")
            federation.add_provider(s, name="cq-ids", region_code="CQ", issuer=cq.issuer, client_id=cq.client_id,
                                    client_secret=cq.client_secret, display_name_zh="重庆市统一身份认证",
                                    display_name_en="Chongqing identity service")
        with client_for(db) as client:
            client.cookies.set("lang", "en")
            yield Env(db=db, world=world, client=client, cq=cq, sc_issuer=sc_issuer)
    federation.clear_caches()
    get_settings.cache_clear()


def _csrf(client: TestClient, path: str = "/login") -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', client.get(path).text)
    assert match
    return match.group(1)


def start(client: TestClient, name: str, next_: str = "/bookings") -> httpx.Response:
    return client.post(f"/login/oidc/{name}", data={"csrf_token": _csrf(client), "next": next_},
                       follow_redirects=False)


def at_cq(response: httpx.Response) -> str:
    """Follow our redirect to the cq provider (it auto-approves) and return where it sends the browser back."""
    assert response.status_code == 303, response.text
    answer = httpx.get(response.headers["location"], follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def at_sc(response: httpx.Response, sub: str = "wang.fang") -> str:
    """Approve at oidc-provider-mock's authorize form as `sub`."""
    assert response.status_code == 303, response.text
    answer = httpx.post(response.headers["location"], data={"sub": sub}, follow_redirects=False)
    assert answer.status_code == 302, answer.text
    return answer.headers["location"]


def counts(db: Database) -> tuple[int, int, int]:
    """(users, web sessions, external identities)."""
    with db.unit_of_work(write=False) as s:
        return (s.scalar(select(func.count()).select_from(User)) or 0,
                s.scalar(select(func.count()).select_from(WebSession)) or 0,
                s.scalar(select(func.count()).select_from(ExternalIdentity)) or 0)


def assert_refused(env: Env, response: httpx.Response, status: int, message: str, before: tuple[int, int, int]) -> None:
    assert response.status_code == status, response.text
    assert message in response.text.replace("&#39;", "'")
    assert counts(env.db) == before
    assert "labcommons_session" not in response.cookies


def cq_login(env: Env) -> httpx.Response:
    return env.client.get(at_cq(start(env.client, "cq-ids")), follow_redirects=False)


# --- happy paths ---


def test_login_page_lists_both_regions_providers(env: Env) -> None:
    page = env.client.get("/login")
    assert 'data-provider="sc-ids"' in page.text and 'data-provider="cq-ids"' in page.text
    assert "Sichuan identity service" in page.text
    zh = env.client.get("/login?lang=zh_CN")
    assert "通过四川省统一身份认证登录" in zh.text


def test_sc_mock_provider_creates_a_sichuan_user_and_signs_in(env: Env) -> None:
    started = start(env.client, "sc-ids")
    authorize = urlsplit(started.headers["location"])
    params = parse_qs(authorize.query)
    assert f"{authorize.scheme}://{authorize.netloc}" == env.sc_issuer
    assert params["response_type"] == ["code"] and params["client_id"] == ["labcommons-sc"]
    assert params["redirect_uri"] == ["http://testserver/login/oidc/sc-ids/callback"]
    assert params["code_challenge_method"] == ["S256"] and params["nonce"] and params["state"]
    cookie = started.headers["set-cookie"]
    assert "labcommons_oidc=" in cookie and "HttpOnly" in cookie and "samesite=lax" in cookie.lower()

    done = env.client.get(at_sc(started), follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/bookings"
    assert "labcommons_session" in done.cookies
    with env.db.unit_of_work(write=False) as s:
        user = s.scalars(select(User).where(User.email == "wang.fang@sc-ids.example")).one()
        assert user.region_code == "SC" and user.name == "王芳"
        assert user.institution_id == env.world.institutions["SC-UNI"] and user.password_hash is None
        identity = s.scalars(select(ExternalIdentity)).one()
        assert (identity.issuer, identity.subject, identity.user_id) == (env.sc_issuer, "wang.fang", user.id)
        assert s.scalars(select(WebSession.method)).one() == "oidc:sc-ids"
    page = env.client.get("/bookings")
    assert "王芳" in page.text

    # Signing in again finds the same account by (issuer, subject).
    env.client.cookies.delete("labcommons_session")
    again = env.client.get(at_sc(start(env.client, "sc-ids")), follow_redirects=False)
    assert again.status_code == 303
    users, sessions, identities = counts(env.db)
    assert (sessions, identities) == (2, 1) and users == 4


def test_cq_provider_gets_pkce_and_basic_auth_and_creates_a_chongqing_user(env: Env) -> None:
    env.cq.claims = {"sub": "cq-7", "email": "Zhao.Lei@CQ-ids.example", "email_verified": True,
                     "institution": "SC-UNI"}
    done = cq_login(env)
    assert done.status_code == 303, done.text
    request = env.cq.token_requests[-1]
    assert request["authorization"].startswith("Basic ") and request["form"]["code_verifier"]
    assert "client_secret" not in request["form"]
    with env.db.unit_of_work(write=False) as s:
        user = s.scalars(select(User).where(User.email == "zhao.lei@cq-ids.example")).one()
        # The institution claim names a Sichuan institution, which a Chongqing provider cannot vouch for.
        assert (user.region_code, user.institution_id, user.name) == ("CQ", None, "zhao.lei")


def test_email_missing_from_the_id_token_is_taken_from_userinfo(env: Env) -> None:
    env.cq.claims = {"sub": "cq-ui", "name": "赵雷"}
    env.cq.userinfo = {"sub": "cq-ui", "email": "Zhao.Lei@CQ-ids.example", "email_verified": True,
                       "name": "Someone Else", "institution": "CQ-LAB"}
    done = cq_login(env)
    assert done.status_code == 303, done.text
    assert federation.provider_metadata(env.cq.issuer).userinfo_endpoint == f"{env.cq.issuer}/userinfo"
    assert len(env.cq.userinfo_requests) == 1 and env.cq.userinfo_requests[0].startswith("Bearer ")
    with env.db.unit_of_work(write=False) as s:
        user = s.scalars(select(User).where(User.email == "zhao.lei@cq-ids.example")).one()
        # The ID token's name wins over the userinfo's; the userinfo fills in what the ID token lacks.
        assert (user.region_code, user.name) == ("CQ", "赵雷")
        assert user.institution_id == env.world.institutions["CQ-LAB"]
        identity = s.scalars(select(ExternalIdentity).where(ExternalIdentity.subject == "cq-ui")).one()
        assert (identity.email, identity.email_verified, identity.user_id) == ("zhao.lei@cq-ids.example", True,
                                                                               user.id)


def test_userinfo_is_not_asked_when_the_id_token_has_the_email(env: Env) -> None:
    env.cq.userinfo = {"sub": "cq-0001", "email": "other@cq-ids.example", "email_verified": True}
    assert cq_login(env).status_code == 303
    assert env.cq.userinfo_requests == []
    with env.db.unit_of_work(write=False) as s:
        assert s.scalars(select(User).where(User.email == "li.ming@cq-ids.example")).one()


def test_userinfo_about_another_subject_is_refused(env: Env) -> None:
    before = counts(env.db)
    env.cq.claims = {"sub": "cq-victim", "name": "Mallory"}
    env.cq.userinfo = {"sub": "cq-someone-else", "email": "someone@cq-ids.example", "email_verified": True}
    assert_refused(env, cq_login(env), 400, "about a different person", before)
    with env.db.unit_of_work(write=False) as s:
        assert s.scalars(select(User).where(User.email == "someone@cq-ids.example")).first() is None


# --- refusals: state and browser binding ---


def test_wrong_state_is_refused(env: Env) -> None:
    before = counts(env.db)
    callback = at_cq(start(env.client, "cq-ids"))
    forged = re.sub(r"state=[^&]+", "state=forged", callback)
    assert_refused(env, env.client.get(forged, follow_redirects=False), 400, "wrong state", before)
    env.client.cookies.set("lang", "zh_CN")
    assert_refused(env, env.client.get(forged, follow_redirects=False), 400, "state 不符", before)


def test_callback_in_another_browser_is_refused(env: Env) -> None:
    before = counts(env.db)
    callback = at_cq(start(env.client, "cq-ids"))
    with client_for(env.db) as other:
        other.cookies.set("lang", "en")
        assert_refused(env, other.get(callback, follow_redirects=False), 400, "wrong state", before)


def test_replayed_callback_is_refused(env: Env) -> None:
    callback = at_cq(start(env.client, "cq-ids"))
    assert env.client.get(callback, follow_redirects=False).status_code == 303
    env.client.cookies.delete("labcommons_session")
    after_first = counts(env.db)
    assert_refused(env, env.client.get(callback, follow_redirects=False), 400, "wrong state", after_first)


def test_provider_error_is_shown(env: Env) -> None:
    before = counts(env.db)
    env.cq.authorize_error = "access_denied"
    response = env.client.get(at_cq(start(env.client, "cq-ids")), follow_redirects=False)
    assert_refused(env, response, 400, "The identity service did not sign you in.", before)


# --- refusals: the ID token ---


@pytest.mark.parametrize(("override", "message"), [
    ({"nonce": "not-the-nonce"}, "wrong nonce"),
    ({"exp": int(time.time()) - 3600, "iat": int(time.time()) - 7200}, "has expired"),
    ({"iat": int(time.time()) + 3600, "exp": int(time.time()) + 7200}, "dated in the future"),
    ({"aud": "someone-else"}, "meant for another application"),
    ({"aud": ["labcommons", "someone-else"], "azp": "someone-else"}, "meant for another application"),
    ({"iss": "http://127.0.0.1:1"}, "names a different issuer"),
    ({"sub": DELETE}, "does not say who you are"),
    ({"email": DELETE}, "did not share your e-mail address"),
], ids=["nonce", "expired", "future", "audience", "azp", "issuer", "no-sub", "no-email"])
def test_bad_id_token_is_refused(env: Env, override: dict[str, object], message: str) -> None:
    before = counts(env.db)
    env.cq.overrides = override
    assert_refused(env, cq_login(env), 400, message, before)


def test_key_rotation_at_the_provider_is_accepted(env: Env) -> None:
    assert cq_login(env).status_code == 303
    fetches = env.cq.jwks_fetches
    env.cq.rotate_key("key-2")
    env.client.cookies.delete("labcommons_session")
    assert cq_login(env).status_code == 303
    assert env.cq.jwks_fetches == fetches + 1


def test_token_signed_by_an_unpublished_key_is_refused(env: Env) -> None:
    assert cq_login(env).status_code == 303
    env.client.cookies.delete("labcommons_session")
    before, fetches = counts(env.db), env.cq.jwks_fetches
    env.cq.signing_key = new_key("rogue")
    assert_refused(env, cq_login(env), 400, "no valid signature", before)
    assert env.cq.jwks_fetches == fetches + 1  # refetched once for the unknown kid, then refused


# --- refusals: issuers and providers ---


def test_state_of_provider_a_at_provider_b_callback_is_refused(env: Env) -> None:
    before = counts(env.db)
    callback = at_cq(start(env.client, "cq-ids"))
    mixed = callback.replace("/login/oidc/cq-ids/", "/login/oidc/sc-ids/")
    assert_refused(env, env.client.get(mixed, follow_redirects=False), 400, "different identity service", before)


def test_iss_parameter_naming_another_issuer_is_refused(env: Env) -> None:
    before = counts(env.db)
    env.cq.iss_param = env.sc_issuer
    assert_refused(env, cq_login(env), 400, "different identity service", before)
    env.cq.iss_param = True
    assert cq_login(env).status_code == 303


def test_discovery_naming_another_issuer_is_refused(env: Env) -> None:
    before = counts(env.db)
    env.cq.discovery_issuer = env.sc_issuer
    assert_refused(env, start(env.client, "cq-ids"), 502, "issuer does not match", before)


def test_disabled_provider_is_refused_at_start(env: Env) -> None:
    before = counts(env.db)
    with env.db.unit_of_work() as s:
        federation.set_provider_enabled(s, "cq-ids", False)
    assert_refused(env, start(env.client, "cq-ids"), 403, "switched off", before)
    assert_refused(env, start(env.client, "nope"), 404, "no such identity service", before)
    assert 'data-provider="cq-ids"' not in env.client.get("/login").text


def test_disabled_provider_is_refused_at_callback(env: Env) -> None:
    before = counts(env.db)
    callback = at_cq(start(env.client, "cq-ids"))
    with env.db.unit_of_work() as s:
        federation.set_provider_enabled(s, "cq-ids", False)
    assert_refused(env, env.client.get(callback, follow_redirects=False), 403, "switched off", before)


# --- accounts by e-mail ---


def _trust_cq(env: Env, email: str, verified: bool) -> None:
    with env.db.unit_of_work() as s:
        federation.set_trusted_for_linking(s, "cq-ids", True)
    env.cq.claims = {"sub": "cq-alice", "email": email, "email_verified": verified, "name": "Alice"}


def test_unverified_email_does_not_link_to_an_existing_account(env: Env) -> None:
    before = counts(env.db)
    _trust_cq(env, "alice@example.org", verified=False)
    assert_refused(env, cq_login(env), 409, "An account with this e-mail already exists", before)


def test_verified_email_from_an_untrusted_provider_does_not_link(env: Env) -> None:
    before = counts(env.db)
    env.cq.claims = {"sub": "cq-alice", "email": "alice@example.org", "email_verified": True}
    assert_refused(env, cq_login(env), 409, "ask an administrator to merge", before)


def test_verified_email_from_a_trusted_provider_links(env: Env) -> None:
    users, _sessions, _identities = counts(env.db)
    _trust_cq(env, "Alice@Example.org", verified=True)
    assert cq_login(env).status_code == 303
    assert counts(env.db) == (users, 1, 1)
    with env.db.unit_of_work(write=False) as s:
        alice = s.scalars(select(User).where(User.email == "alice@example.org")).one()
        assert s.scalars(select(ExternalIdentity.user_id)).one() == alice.id


def test_unverified_email_creates_no_account(env: Env) -> None:
    before = counts(env.db)
    env.cq.claims = {"sub": "cq-new", "email": "someone.else@uni.example", "email_verified": False}
    assert_refused(env, cq_login(env), 403, "has not verified your e-mail address", before)


def test_account_made_through_an_untrusted_provider_is_not_linked_by_e_mail(env: Env) -> None:
    # cq-ids is untrusted: somebody there claims an address first; a trusted provider must not then attach the
    # address's real owner to that account.
    env.cq.claims = {"sub": "cq-early", "email": "victim@uni.example", "email_verified": True}
    assert cq_login(env).status_code == 303
    env.client.cookies.clear()
    env.client.cookies.set("lang", "en")
    with env.db.unit_of_work() as s:
        federation.add_provider(s, name="sc-trusted", region_code="SC", issuer=env.cq.issuer,
                                client_id=env.cq.client_id, client_secret=env.cq.client_secret,
                                trusted_for_linking=True)
    before = counts(env.db)
    env.cq.claims = {"sub": "cq-victim", "email": "victim@uni.example", "email_verified": True}
    response = env.client.get(at_cq(start(env.client, "sc-trusted")), follow_redirects=False)
    assert_refused(env, response, 409, "ask an administrator to merge", before)


# --- linking and unlinking from the account page ---


def _sign_in_with_password(client: TestClient, email: str) -> None:
    response = client.post("/login", data={"csrf_token": _csrf(client), "email": email,
                                           "password": "correct horse", "next": "/"}, follow_redirects=False)
    assert response.status_code == 303


def test_link_and_unlink_an_identity(env: Env) -> None:
    _sign_in_with_password(env.client, "carol@example.org")
    csrf = _csrf(env.client, "/bookings")
    started = env.client.post("/account/identities/link/sc-ids", data={"csrf_token": csrf},
                              follow_redirects=False)
    done = env.client.get(at_sc(started), follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == "/account"
    with env.db.unit_of_work(write=False) as s:
        carol = s.scalars(select(User).where(User.email == "carol@example.org")).one()
        linked = federation.linked_identities(s, carol.id)
    assert [(i.provider_name, i.subject) for i in linked] == [("sc-ids", "wang.fang")]
    assert counts(env.db)[0] == 3  # no new account for the linked identity's e-mail

    # Signing in through the provider now opens carol's account.
    other = client_for(env.db)
    with other:
        assert other.get(at_sc(start(other, "sc-ids")), follow_redirects=False).status_code == 303
        assert "Carol" in other.get("/bookings").text

    unlinked = env.client.post(f"/account/identities/{linked[0].id}/unlink", data={"csrf_token": csrf},
                               follow_redirects=False)
    assert unlinked.status_code == 303
    assert counts(env.db)[2] == 0
    missing = env.client.post(f"/account/identities/{linked[0].id}/unlink", data={"csrf_token": csrf},
                              follow_redirects=False)
    assert missing.status_code == 404


def test_linking_an_identity_of_another_account_is_refused(env: Env) -> None:
    assert cq_login(env).status_code == 303  # li.ming's account now owns cq-0001
    env.client.cookies.clear()
    env.client.cookies.set("lang", "en")
    _sign_in_with_password(env.client, "bob@example.org")
    before = counts(env.db)
    started = env.client.post("/account/identities/link/cq-ids", data={"csrf_token": _csrf(env.client, "/bookings")},
                              follow_redirects=False)
    response = env.client.get(at_cq(started), follow_redirects=False)
    assert response.status_code == 409
    assert counts(env.db) == before


def test_the_last_way_to_sign_in_cannot_be_unlinked(env: Env) -> None:
    assert cq_login(env).status_code == 303
    with env.db.unit_of_work(write=False) as s:
        identity = s.scalars(select(ExternalIdentity)).one()
    response = env.client.post(f"/account/identities/{identity.id}/unlink",
                               data={"csrf_token": _csrf(env.client, "/bookings")}, follow_redirects=False)
    assert response.status_code == 409
    assert counts(env.db)[2] == 1


# --- administration: CLI and page ---


@pytest.fixture
def cli(env: Env, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", env.db.engine.url.render_as_string(hide_password=False))
    get_settings.cache_clear()
    return CliRunner()


def test_cli_add_list_enable_disable(env: Env, cli: CliRunner) -> None:
    added = cli.invoke(cli_app, ["idp", "add", "--name", "uni-sso", "--region", "SC", "--issuer",
                                 "https://sso.example.edu.cn", "--client-id", "lc", "--client-secret", "x",
                                 "--display-name-zh", "某大学统一认证", "--trusted-for-linking"])
    assert added.exit_code == 0, added.output
    assert "http://testserver/login/oidc/uni-sso/callback" in added.output
    for args, message in [
        (["--name", "Bad Name", "--region", "SC", "--issuer", "https://a.example"], "slug"),
        (["--name", "x1", "--region", "XX", "--issuer", "https://a.example"], "region"),
        (["--name", "x2", "--region", "SC", "--issuer", "http://idp.example"], "https"),
        (["--name", "uni-sso", "--region", "SC", "--issuer", "https://a.example"], "already exists"),
    ]:
        refused = cli.invoke(cli_app, ["idp", "add", *args, "--client-id", "lc"])
        assert refused.exit_code == 2 and message in refused.output, refused.output
    assert cli.invoke(cli_app, ["idp", "disable", "uni-sso"]).exit_code == 0
    with env.db.unit_of_work(write=False) as s:
        provider = federation.get_provider(s, "uni-sso")
        assert (provider.enabled, provider.trusted_for_linking, provider.region_code) == (False, True, "SC")
    assert cli.invoke(cli_app, ["idp", "enable", "uni-sso"]).exit_code == 0
    assert cli.invoke(cli_app, ["idp", "enable", "nope"]).exit_code == 2
    listed = cli.invoke(cli_app, ["idp", "list"], env={"COLUMNS": "250"})
    assert listed.exit_code == 0 and "uni-sso" in listed.output and "cq-ids" in listed.output


def test_cli_merge_moves_identities_and_deactivates(env: Env, cli: CliRunner) -> None:
    assert cq_login(env).status_code == 303
    start = next_grid_day()
    with env.db.unit_of_work() as s:
        li_id = s.scalars(select(User.id).where(User.email == "li.ming@cq-ids.example")).one()
        alice_id = s.scalars(select(User.id).where(User.email == "alice@example.org")).one()
        s.add(Booking(instrument_id=env.world.instruments["CONF"], user_id=li_id, starts_at=start,
                      ends_at=start + timedelta(hours=1), status=BookingStatus.confirmed))
        lab = env.world.facilities["CQ-LAB"]
        s.add_all([RoleGrant(user_id=uid, role=Role.facility_staff, facility_id=lab, scope_key=f"facility:{lab}")
                   for uid in (li_id, alice_id)])
        s.add(RoleGrant(user_id=li_id, role=Role.region_authority, region_code="CQ", scope_key="region:CQ"))
    merged = cli.invoke(cli_app, ["idp", "merge", "--from", "li.ming@cq-ids.example", "--into", "alice@example.org"])
    assert merged.exit_code == 0, merged.output
    with env.db.unit_of_work(write=False) as s:
        alice = s.scalars(select(User).where(User.email == "alice@example.org")).one()
        li = s.scalars(select(User).where(User.email == "li.ming@cq-ids.example")).one()
        assert s.scalars(select(ExternalIdentity.user_id)).one() == alice.id
        assert not li.is_active
        assert s.scalar(select(func.count()).select_from(WebSession).where(WebSession.user_id == li.id)) == 0
        assert s.scalars(select(Booking.user_id)).all() == [alice.id]
        assert sorted((u, r) for u, r in s.execute(select(RoleGrant.user_id, RoleGrant.role))) == [
            (alice.id, Role.facility_staff), (alice.id, Role.region_authority)]
    assert "1 bookings and 1 roles" in merged.output
    assert env.client.get("/bookings", follow_redirects=False).status_code == 303  # li's session is gone
    env.client.cookies.clear()
    env.client.cookies.set("lang", "en")
    assert cq_login(env).status_code == 303
    assert "Alice" in env.client.get("/bookings").text
    same = cli.invoke(cli_app, ["idp", "merge", "--from", "alice@example.org", "--into", "alice@example.org"])
    assert same.exit_code == 2


def test_admin_page_for_platform_admins_only(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    def only_alice(actor: Actor) -> None:
        if actor.email != "alice@example.org":
            raise Forbidden("Only a platform administrator may do this.")

    monkeypatch.setattr(roles, "require_platform_admin", only_alice)
    _sign_in_with_password(env.client, "bob@example.org")
    assert env.client.get("/admin/providers").status_code == 403
    env.client.cookies.clear()
    env.client.cookies.set("lang", "en")
    env.client.cookies.set("lang", "en")
    _sign_in_with_password(env.client, "alice@example.org")
    page = env.client.get("/admin/providers")
    assert page.status_code == 200 and "cq-ids" in page.text
    assert "http://testserver/login/oidc/cq-ids/callback" in page.text
    csrf = _csrf(env.client, "/admin/providers")
    form = {"csrf_token": csrf, "name": "cq-uni", "region": "CQ", "issuer": "https://sso.cqu.example",
            "client_id": "lc", "client_secret": "s", "display_name_en": "CQ University SSO"}
    assert env.client.post("/admin/providers", data=form, follow_redirects=False).status_code == 303
    bad = env.client.post("/admin/providers", data=form | {"name": "cq-uni2", "issuer": "http://sso.example"})
    assert bad.status_code == 422 and "plain http is allowed on loopback only" in bad.text
    assert env.client.post("/admin/providers", data=form | {"csrf_token": "x"}).status_code == 403
    assert env.client.post("/admin/providers/cq-uni/enabled", data={"csrf_token": csrf, "enabled": "false"},
                           follow_redirects=False).status_code == 303
    assert env.client.post("/admin/providers/cq-uni/trusted", data={"csrf_token": csrf, "trusted": "true"},
                           follow_redirects=False).status_code == 303
    with env.db.unit_of_work(write=False) as s:
        provider = s.scalars(select(IdentityProvider).where(IdentityProvider.name == "cq-uni")).one()
        assert (provider.enabled, provider.trusted_for_linking) == (False, True)
    zh = env.client.get("/admin/providers?lang=zh_CN")
    assert "身份认证服务" in zh.text
