"""Helpers for page tests: a TestClient over the test database, sign-in through the real form."""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from httpx import Response

from labcommons.app import create_app
from labcommons.pages import FLASH_COOKIE
from tests.factories import World

PASSWORD = "correct horse"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token of the first form on a page."""
    match = _CSRF.search(html)
    assert match, "the page has no form with a CSRF token"
    return match.group(1)


def result_names(html: str) -> list[str]:
    """The names in a search page's result list, in order."""
    return re.findall(r'class="result-name"[^>]*>([^<]+)<', html)


def facet_count(html: str, dim: str, value: str) -> int | None:
    """The count a search page's facet shows for `dim:value`, None if it shows none."""
    match = re.search(rf'data-facet="{re.escape(dim)}:{re.escape(value)}".*?<span class="count">(\d+)</span>',
                      html, re.S)
    return int(match.group(1)) if match else None


def page_csrf(client: TestClient) -> str:
    """The signed-in browser's CSRF token, from a page every user may open."""
    return csrf_of(client.get("/account").text)


def flash_of(response: Response) -> str:
    """The flash message a response sets ("kind|text"); empty when it sets none."""
    return unquote(response.cookies.get(FLASH_COOKIE, "").strip('"'))


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
