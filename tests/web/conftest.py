"""Helpers for page tests: a TestClient over the test database, sign-in through the real form."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from labcommons.app import create_app
from tests.factories import World

PASSWORD = "correct horse"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = _CSRF.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def sign_in(client: TestClient, user: str, password: str = PASSWORD) -> None:
    """Sign in through the form, as a browser would."""
    form = client.get("/login")
    response = client.post(
        "/login",
        data={"csrf_token": csrf_of(form.text), "email": f"{user}@example.org", "password": password,
              "next": "/"},
        follow_redirects=False,
    )
    assert response.status_code == 303, response.text



@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client
