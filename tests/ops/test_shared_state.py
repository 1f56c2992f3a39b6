"""Nothing a request depends on lives in one process's memory: two separate app processes on one database, and a
change made through one is seen at once by the other — web sessions and their CSRF tokens, signing out, the sign-in
throttle, the write rate limit, API token revocation."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from tests.factories import World, next_grid_day
from tests.server import Server, server_process
from tests.web.conftest import PASSWORD, csrf_of

WRITE_LIMIT = 6
LOGIN_FAILURES = 3


def test_state_is_shared_between_processes(world: World, db_url: str) -> None:
    """One pair of servers for every check (each start costs seconds of CPU)."""
    env = {"LABCOMMONS_WRITE_RATE_PER_MINUTE": str(WRITE_LIMIT), "LABCOMMONS_LOGIN_MAX_FAILURES": str(LOGIN_FAILURES),
           "LABCOMMONS_DB_POOL_SIZE": "4", "LABCOMMONS_JOBS_IN_PROCESS": "false"}
    with server_process(db_url, env=env) as a, server_process(db_url, env=env) as b:
        assert a.process.pid != b.process.pid
        servers = (a, b)
        check_sessions_and_csrf(servers)
        check_sign_in_throttle(servers)
        check_write_rate_limit(world, servers)
        check_token_revocation(world, servers)


def _account(browser: httpx.Client, server: Server) -> httpx.Response:
    return browser.get(f"{server.base}/account", follow_redirects=False)


def check_sessions_and_csrf(two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    # One browser behind a proxy that sends each request to either process: cookies are per host, not per port.
    with httpx.Client(timeout=30) as browser:
        form = browser.get(f"{a.base}/login")
        signed_in = browser.post(f"{b.base}/login", follow_redirects=False, data={
            "csrf_token": csrf_of(form.text), "email": "alice@example.org", "password": PASSWORD, "next": "/"})
        assert signed_in.status_code == 303, "B accepts the CSRF token A put in the form"
        assert _account(browser, a).status_code == 200, "A knows the session B opened"
        logout_csrf = csrf_of(_account(browser, b).text)
        assert browser.post(f"{a.base}/logout", data={"csrf_token": logout_csrf},
                            follow_redirects=False).status_code == 303
        # The cookie is still sent (as a stolen copy would be): B must refuse it at once.
        browser.cookies.set("labcommons_session", signed_in.cookies["labcommons_session"])
        after = _account(browser, b)
        assert after.status_code in (302, 303) and "/login" in after.headers["location"]


def check_sign_in_throttle(two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    with httpx.Client(timeout=30) as browser:
        def attempt(server: Server, password: str) -> int:
            form = browser.get(f"{server.base}/login")
            return browser.post(f"{server.base}/login", follow_redirects=False, data={
                "csrf_token": csrf_of(form.text), "email": "carol@example.org", "password": password,
                "next": "/"}).status_code

        assert [attempt(s, "wrong password") for s in (a, b, a)] == [401] * LOGIN_FAILURES
        assert attempt(b, PASSWORD) == 429, "the failures made through A and B lock the account on both"
        assert attempt(a, PASSWORD) == 429


def _minute() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


def check_write_rate_limit(world: World, two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    headers = world.headers("bob")
    start = next_grid_day(days=10)
    for _attempt in range(3):  # the budget is per minute: a run that straddles a minute's end is run again
        minute = _minute()
        codes = []
        for n in range(WRITE_LIMIT + 2):
            server = (a, b)[n % 2]
            # Not on the slot grid: refused with 422 after it was counted, so nothing is booked.
            payload = {"instrument_id": world.instruments["CONF"], "starts_at": start.replace(minute=7).isoformat(),
                       "ends_at": start.replace(minute=37).isoformat(), "purpose": "rate"}
            codes.append(httpx.post(f"{server.base}/api/v1/bookings", json=payload, headers=headers,
                                    timeout=30).status_code)
        if _minute() == minute:
            break
    assert codes[:WRITE_LIMIT] == [422] * WRITE_LIMIT
    assert codes[WRITE_LIMIT:] == [429, 429], "the writes counted by A and B share one budget"


def check_token_revocation(world: World, two_servers: tuple[Server, Server]) -> None:
    a, b = two_servers
    made = httpx.post(f"{a.base}/api/v1/me/tokens", json={"name": "second", "scopes": ["account", "bookings:read"]},
                      headers=world.headers("carol"), timeout=30)
    assert made.status_code == 201, made.text
    token = made.json()["token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{b.base}/api/v1/bookings", headers=bearer, timeout=30).status_code == 200
    revoked = httpx.delete(f"{b.base}/api/v1/me/tokens/{made.json()['id']}", headers=world.headers("carol"),
                           timeout=30)
    assert revoked.status_code == 204
    assert httpx.get(f"{a.base}/api/v1/bookings", headers=bearer, timeout=30).status_code == 401
