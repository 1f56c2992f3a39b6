"""Local accounts: the sign-in throttle, password reset by e-mail, and switching local sign-in off."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from labcommons import jobs
from labcommons.cli import app as cli_app
from labcommons.db import Database, utcnow
from labcommons.errors import TooManyAttempts, Unauthenticated
from labcommons.identity import passwords, service
from labcommons.identity.models import LoginThrottle, PasswordReset, User, WebSession
from tests.api_client import client_for
from tests.factories import World
from tests.test_mail import SmtpSink, settings_env, smtp_backend
from tests.web.conftest import PASSWORD, csrf_of

NEW_PASSWORD = "a much longer passphrase"
LINK = re.compile(r"http://labcommons\.test(/password/reset/[A-Za-z0-9_-]+)")



@pytest.fixture
def client(world: World) -> TestClient:
    test_client = client_for(world.db)
    test_client.cookies.set("lang", "en")
    return test_client


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    with smtp_backend() as sink:
        yield sink


def post_login(client: TestClient, email: str, password: str) -> httpx.Response:
    form = client.get("/login")
    return client.post("/login", data={"csrf_token": csrf_of(form.text), "email": email, "password": password,
                                       "next": "/"}, follow_redirects=False)


def ask_for_link(client: TestClient, email: str) -> httpx.Response:
    form = client.get("/password/forgot")
    assert form.status_code == 200
    return client.post("/password/forgot", data={"csrf_token": csrf_of(form.text), "email": email},
                       follow_redirects=False)


def post_new_password(client: TestClient, path: str, password: str, confirmation: str | None = None) -> httpx.Response:
    form = client.get(path)
    token = csrf_of(form.text) if form.status_code == 200 else csrf_of(client.get("/password/forgot").text)
    return client.post(path, data={"csrf_token": token, "password": password,
                                   "confirmation": password if confirmation is None else confirmation},
                       follow_redirects=False)


def count(db: Database, model: type, *where: object) -> int:
    with db.unit_of_work(write=False) as session:
        return int(session.scalar(select(func.count()).select_from(model).where(*where)) or 0)  # type: ignore[arg-type]


def user_id(db: Database, email: str) -> int:
    with db.unit_of_work(write=False) as session:
        return service.find_user(session, email).id


# --- reset by e-mail ----------------------------------------------------------------------------------------------


def test_reset_by_emailed_link(world: World, client: TestClient, smtp: SmtpSink) -> None:
    other_browser = client_for(world.db)
    assert post_login(other_browser, "alice@example.org", PASSWORD).status_code == 303
    alice = user_id(world.db, "alice@example.org")
    assert count(world.db, WebSession, WebSession.user_id == alice) == 1

    asked = ask_for_link(client, "Alice@Example.org ")
    assert asked.status_code == 303 and asked.headers["location"] == "/password/forgot/sent"
    assert "If an account exists for that address" in client.get(asked.headers["location"]).text

    jobs.run_pending(world.db)  # the mail is a background job
    [message] = smtp.wait_for(1)
    assert message["To"] == "alice@example.org"
    assert "重置" in str(message["Subject"]) and "Reset" in str(message["Subject"])
    body = message.get_body(("plain",)).get_content()  # type: ignore[union-attr]
    assert "您好" in body and "Hello Alice" in body
    match = LINK.search(body)
    assert match, body
    path = match.group(1)

    form = client.get(path)
    assert form.status_code == 200 and 'name="confirmation"' in form.text
    assert form.headers["referrer-policy"] == "no-referrer"
    for bad, confirmation, text in [
        ("short one", None, "at least 10 characters"),
        (NEW_PASSWORD, NEW_PASSWORD + "x", "differ"),
        ("alice@example.org", None, "not be your e-mail"),
    ]:
        refused = post_new_password(client, path, bad, confirmation)
        assert refused.status_code == 422 and text in refused.text

    done = post_new_password(client, path, NEW_PASSWORD)
    assert done.status_code == 303 and done.headers["location"] == "/login"
    assert "Your password was changed" in client.get("/login").text

    # Every session of the account ended, including the one in the other browser.
    assert count(world.db, WebSession, WebSession.user_id == alice) == 0
    assert other_browser.get("/login", follow_redirects=False).status_code == 200
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 401
    assert post_login(client, "alice@example.org", NEW_PASSWORD).status_code == 303

    # Single use.
    assert client.get(path).status_code == 410
    reused = post_new_password(client, path, "yet another passphrase")
    assert reused.status_code == 410 and "expired or was already used" in reused.text
    assert post_login(client, "alice@example.org", NEW_PASSWORD).status_code == 303


def test_unknown_address_gets_the_same_answer_and_no_mail(world: World, client: TestClient, smtp: SmtpSink) -> None:
    unknown = ask_for_link(client, "nobody@example.org")
    known = ask_for_link(client, "bob@example.org")
    assert (unknown.status_code, unknown.headers["location"]) == (known.status_code, known.headers["location"])
    jobs.run_pending(world.db)
    messages = smtp.wait_for(1)
    time.sleep(0.2)
    assert [m["To"] for m in messages] == ["bob@example.org"]
    assert count(world.db, PasswordReset) == 1


def test_inactive_and_passwordless_accounts_get_no_link(world: World) -> None:
    with world.db.unit_of_work() as session:
        session.execute(update(User).where(User.email == "bob@example.org").values(is_active=False))
        session.execute(update(User).where(User.email == "carol@example.org").values(password_hash=None))
    with world.db.unit_of_work() as session:
        assert passwords.request_reset(session, "bob@example.org") is None
        assert passwords.request_reset(session, "carol@example.org") is None
        assert passwords.request_reset(session, "not an address") is None
    assert count(world.db, PasswordReset) == 0


def test_expired_link_is_refused(world: World, client: TestClient) -> None:
    long_ago = utcnow() - timedelta(hours=2)
    with world.db.unit_of_work() as session:
        token = passwords.request_reset(session, "alice@example.org", now=long_ago)
    assert token
    page = client.get(f"/password/reset/{token}")
    assert page.status_code == 410 and "expired or was already used" in page.text
    assert post_new_password(client, f"/password/reset/{token}", NEW_PASSWORD).status_code == 410
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303


def test_using_one_link_cancels_the_others(world: World, client: TestClient) -> None:
    with world.db.unit_of_work() as session:
        first = passwords.request_reset(session, "alice@example.org")
        second = passwords.request_reset(session, "alice@example.org")
    assert post_new_password(client, f"/password/reset/{second}", NEW_PASSWORD).status_code == 303
    assert client.get(f"/password/reset/{first}").status_code == 410
    assert client.get("/password/reset/not-a-token").status_code == 410


def test_rolled_back_reset_request_sends_no_mail(world: World, smtp: SmtpSink) -> None:
    with pytest.raises(RuntimeError), world.db.unit_of_work() as session:
        assert passwords.request_reset(session, "alice@example.org")
        raise RuntimeError("something after it failed")
    time.sleep(0.2)
    assert smtp.messages == []
    assert count(world.db, PasswordReset) == 0


def test_reset_requests_are_throttled(world: World, client: TestClient) -> None:
    for _ in range(5):
        assert ask_for_link(client, "alice@example.org").status_code == 303
    refused = ask_for_link(client, "alice@example.org")
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0
    assert "Too many requests" in refused.text
    # Asking for links does not lock the account's sign-in.
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303


# --- sign-in throttle ---------------------------------------------------------------------------------------------


def test_five_failures_lock_the_email_even_for_the_right_password(world: World, client: TestClient) -> None:
    for _ in range(5):
        assert post_login(client, "alice@example.org", "wrong password").status_code == 401
    locked = post_login(client, "alice@example.org", PASSWORD)
    assert locked.status_code == 429
    assert 0 < int(locked.headers["retry-after"]) <= 900
    assert "Too many failed sign-ins. Try again in 15 minutes." in locked.text
    assert post_login(client, "bob@example.org", PASSWORD).status_code == 303

    zh = client_for(world.db)
    zh_page = post_login(zh, "alice@example.org", PASSWORD)
    assert zh_page.status_code == 429 and "登录失败次数过多" in zh_page.text

    # When the lockout is over, the right password works again and clears the count.
    with world.db.unit_of_work() as session:
        session.execute(update(LoginThrottle).values(locked_until=utcnow() - timedelta(seconds=1)))
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303
    assert count(world.db, LoginThrottle, LoginThrottle.key == "email:alice@example.org") == 0


def test_unknown_emails_are_throttled_the_same(world: World, client: TestClient) -> None:
    for _ in range(5):
        assert post_login(client, "nobody@example.org", "guess").status_code == 401
    assert post_login(client, "nobody@example.org", "guess").status_code == 429


def test_one_address_trying_many_emails_is_locked(world: World, client: TestClient) -> None:
    for i in range(20):
        assert post_login(client, f"user{i}@example.org", "guess").status_code == 401
    assert post_login(client, "carol@example.org", PASSWORD).status_code == 429


def test_lock_and_window_follow_the_clock(world: World) -> None:
    keys = passwords.login_keys("alice@example.org", "192.0.2.1")
    start = utcnow()
    with world.db.unit_of_work() as session:
        for minute in range(4):
            passwords.record_failure(session, keys, now=start + timedelta(minutes=minute))
        # The window (15 minutes) ran out: the count starts again.
        counts = passwords.record_failure(session, keys, now=start + timedelta(minutes=16))
    assert counts["email:alice@example.org"] == 1

    t = start + timedelta(minutes=40)  # past the window that began at minute 16
    with world.db.unit_of_work() as session:
        for second in range(4):
            passwords.record_failure(session, keys, now=t + timedelta(seconds=second))
        passwords.check_not_locked(session, keys, now=t + timedelta(seconds=5))
        passwords.record_failure(session, keys, now=t + timedelta(seconds=5))
        with pytest.raises(TooManyAttempts) as locked:
            passwords.check_not_locked(session, keys, now=t + timedelta(seconds=6))
        assert locked.value.retry_after == 899
        passwords.check_not_locked(session, keys, now=t + timedelta(seconds=5 + 900))
        counts = passwords.record_failure(session, keys, now=t + timedelta(seconds=5 + 901))
    assert counts["email:alice@example.org"] == 1


def test_parallel_failures_are_all_counted(world: World) -> None:
    threads_count = 12
    barrier = threading.Barrier(threads_count)
    errors: list[BaseException] = []

    def fail_once() -> None:
        try:
            barrier.wait()
            with world.db.unit_of_work() as session:
                passwords.reserve_attempt(session, keys)
            with world.db.unit_of_work() as session, pytest.raises(Unauthenticated):
                service.verify_password(session, "alice@example.org", "wrong password")
        except BaseException as exc:
            errors.append(exc)

    with settings_env(login_max_failures=1000):
        keys = passwords.login_keys("alice@example.org", "198.51.100.7")
        threads = [threading.Thread(target=fail_once) for _ in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    with world.db.unit_of_work(write=False) as session:
        failures = {key: n for key, n in session.execute(select(LoginThrottle.key, LoginThrottle.failures))}
    assert failures == {"email:alice@example.org": threads_count, "addr:198.51.100.7": threads_count}


def test_parallel_guesses_past_the_limit_are_refused_before_any_password_check(world: World) -> None:
    # Counting before checking: of 12 simultaneous guesses only the limit's worth reach the password check.
    threads_count, limit = 12, 5
    barrier = threading.Barrier(threads_count)
    outcomes: list[str] = []

    def guess() -> None:
        barrier.wait()
        try:
            with world.db.unit_of_work() as session:
                passwords.reserve_attempt(session, keys)
            outcomes.append("checked")
        except TooManyAttempts:
            outcomes.append("refused")

    with settings_env(login_max_failures=limit):
        keys = passwords.login_keys("alice@example.org", "198.51.100.8")
        threads = [threading.Thread(target=guess) for _ in range(threads_count)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert sorted(outcomes) == ["checked"] * limit + ["refused"] * (threads_count - limit)


def test_a_successful_sign_in_gives_back_the_address_attempt(world: World, client: TestClient) -> None:
    for _ in range(3):
        assert post_login(client, "alice@example.org", PASSWORD).status_code == 303
        client.cookies.delete("labcommons_session")
    with world.db.unit_of_work(write=False) as session:
        failures = dict(session.execute(select(LoginThrottle.key, LoginThrottle.failures)).all())
    assert failures.get("email:alice@example.org") is None and set(failures.values()) <= {0}


def test_old_hash_parameters_are_upgraded_on_sign_in(world: World) -> None:
    old = PasswordHasher(time_cost=2, memory_cost=2048).hash(PASSWORD)
    with world.db.unit_of_work() as session:
        session.execute(update(User).where(User.email == "alice@example.org").values(password_hash=old))
    with world.db.unit_of_work() as session:
        service.verify_password(session, "alice@example.org", PASSWORD)
    with world.db.unit_of_work(write=False) as session:
        new = service.find_user(session, "alice@example.org").password_hash
    assert new and new != old and "m=1024,t=1" in new


# --- local sign-in switched off -----------------------------------------------------------------------------------


def test_local_login_switched_off(world: World, client: TestClient) -> None:
    with world.db.unit_of_work() as session:
        token = passwords.request_reset(session, "alice@example.org")
    csrf = csrf_of(client.get("/login").text)
    with settings_env(local_login_enabled="false"):
        page = client.get("/login")
        assert page.status_code == 200 and 'name="password"' not in page.text
        refused = client.post("/login", data={"csrf_token": csrf,
                                              "email": "alice@example.org", "password": PASSWORD})
        assert refused.status_code == 404 and "switched off" in refused.text
        assert client.get("/password/forgot").status_code == 404
        assert client.get(f"/password/reset/{token}").status_code == 404
        assert client.post(f"/password/reset/{token}", data={"password": NEW_PASSWORD}).status_code == 404
        with world.db.unit_of_work() as session, pytest.raises(Unauthenticated):
            service.verify_password(session, "alice@example.org", PASSWORD)
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303


# --- command line -------------------------------------------------------------------------------------------------


def test_cli_sets_a_password_and_ends_sessions(world: World, client: TestClient) -> None:
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303
    url = world.db.engine.url.render_as_string(hide_password=False)
    runner = CliRunner()
    with settings_env(database_url=url):
        short = runner.invoke(cli_app, ["users", "set-password", "--email", "alice@example.org"],
                              input="short\nshort\n")
        assert short.exit_code == 2 and "at least 10" in short.output
        result = runner.invoke(cli_app, ["users", "set-password", "--email", "alice@example.org"],
                               input=f"{NEW_PASSWORD}\n{NEW_PASSWORD}\n")
    assert result.exit_code == 0, result.output
    assert count(world.db, WebSession) == 0
    assert post_login(client, "alice@example.org", NEW_PASSWORD).status_code == 303


def test_a_new_password_cancels_open_reset_links(world: World) -> None:
    with world.db.unit_of_work() as session:
        token = passwords.request_reset(session, "alice@example.org")
    assert token
    with world.db.unit_of_work() as session:
        passwords.set_password_for_email(session, "alice@example.org", NEW_PASSWORD)
    with world.db.unit_of_work() as session, pytest.raises(passwords.ResetLinkInvalid):
        passwords.check_reset_token(session, token)


def test_signing_in_again_ends_the_browser_s_previous_session(world: World, client: TestClient) -> None:
    assert post_login(client, "alice@example.org", PASSWORD).status_code == 303
    first = client.cookies.get("labcommons_session")
    assert post_login(client, "bob@example.org", PASSWORD).status_code == 303
    assert client.cookies.get("labcommons_session") != first
    with world.db.unit_of_work(write=False) as session:
        assert service.actor_for_web_session(session, first or "") is None
    assert count(world.db, WebSession) == 1
