"""An in-process HTTP client for the app over a test database."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from labcommons.app import create_app
from labcommons.db import Database


def client_for(db: Database) -> TestClient:
    return TestClient(create_app(db=db), raise_server_exceptions=False)


def item_codes(db: Database, path: str, **params: Any) -> list[str]:
    """The codes of the items a list endpoint answers with, in its order (it must answer 200)."""
    r = client_for(db).get(path, params=params)
    assert r.status_code == 200, r.text
    return [i["code"] for i in r.json()["items"]]


def codes_by_pages(db: Database, path: str, *, limit: int, **params: Any) -> list[str]:
    """The codes of every item of a list endpoint, `limit` a page, following its cursors to the end."""
    client = client_for(db)
    seen: list[str] = []
    cursor = None
    for _page in range(20):  # bounded: a cursor that fails to advance must fail the test, not hang it
        page = client.get(path, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}).json()
        seen += [i["code"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            return seen
    raise AssertionError(f"pagination did not end; saw {len(seen)} items")
