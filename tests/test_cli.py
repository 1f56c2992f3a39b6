"""The command line against both databases: migrations, users, tokens, the demo catalogue."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labcommons.catalog.models import Instrument, Service
from labcommons.cli import app
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.identity import service as identity
from labcommons.migrations import downgrade, upgrade


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_seed_demo_users_and_tokens(db: Database, cli_env: CliRunner) -> None:
    result = cli_env.invoke(app, ["seed-demo", "--bookings", "120"])
    assert result.exit_code == 0, result.output
    assert "demo-password" in result.output and "lc_" in result.output
    with db.unit_of_work(write=False) as s:
        assert (s.scalar(select(func.count()).select_from(Instrument)) or 0) >= 60
        assert (s.scalar(select(func.count()).select_from(Service)) or 0) >= 15
        categories = s.scalar(select(func.count(func.distinct(Instrument.category_code))))
        assert (categories or 0) >= 20
    again = cli_env.invoke(app, ["seed-demo"])
    assert again.exit_code == 0 and "fresh demo tokens" in again.output

    added = cli_env.invoke(app, ["users", "add", "--email", "Wu.Lei@Example.org", "--name", "吴磊",
                                 "--institution", "CQ-LAKE"])
    assert added.exit_code == 0, added.output
    duplicate = cli_env.invoke(app, ["users", "add", "--email", "wu.lei@example.org", "--name", "X",
                                     "--institution", "CQ-LAKE"])
    assert duplicate.exit_code == 2 and "already exists" in duplicate.output
    unknown = cli_env.invoke(app, ["users", "add", "--email", "a@b.org", "--name", "X", "--institution", "NOPE"])
    assert unknown.exit_code == 2 and "institution" in unknown.output
    token = cli_env.invoke(app, ["tokens", "create", "--email", "wu.lei@example.org"])
    assert token.exit_code == 0
    with db.unit_of_work(write=False) as s:
        actor = identity.authenticate_token(s, token.output.strip())
        assert actor.email == "wu.lei@example.org" and actor.region_code == "CQ"
    listed = cli_env.invoke(app, ["users", "list"])
    assert "wu.lei@example.org" in listed.output


def test_migrations_go_down_and_up_again(db: Database) -> None:
    downgrade(db.engine, "base")
    upgrade(db.engine)
    with db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Instrument)) == 0
