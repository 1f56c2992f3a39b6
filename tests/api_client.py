"""An in-process HTTP client for the app over a test database."""

from __future__ import annotations

from fastapi.testclient import TestClient

from labcommons.app import create_app
from labcommons.db import Database


def client_for(db: Database) -> TestClient:
    return TestClient(create_app(db=db), raise_server_exceptions=False)
