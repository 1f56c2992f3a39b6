"""Fixtures: every data-layer test runs on SQLite and on a real PostgreSQL, built by the migrations."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from labcommons.db import Base, Database, make_engine
from labcommons.migrations import upgrade
from tests.factories import World, build_world

# Cheap password hashing in tests; must be set before the settings are first read.
os.environ.setdefault("LABCOMMONS_ARGON2_TIME_COST", "1")
os.environ.setdefault("LABCOMMONS_ARGON2_MEMORY_KIB", "1024")
# No write rate limit unless a test sets one (tests/security/test_limits.py): fuzzing and load tests write far
# faster than a person, as one user from one address, and the server processes they start inherit this.
os.environ.setdefault("LABCOMMONS_WRITE_RATE_PER_MINUTE", "0")
# Tests read the audit chain right after the change they make: they append inline. The deferred sealing that
# PostgreSQL uses by default has its own tests (tests/audit/test_deferred_sealing.py) and the multi-process ones.
os.environ.setdefault("LABCOMMONS_AUDIT_SEALING", "inline")
# Result files that a test stores without choosing a place land here, never in the working tree's ./data.
os.environ.setdefault("LABCOMMONS_RESULT_DIR", tempfile.mkdtemp(prefix="labcommons-test-results-"))

POSTGRES_ADMIN_URL = os.environ.get(
    "LABCOMMONS_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Reference data the migrations load; kept between tests.
REFERENCE_TABLES = {"category", "alembic_version", "voucher_recognition"}


def _postgres_admin_reachable() -> str | None:
    try:
        engine = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # any failure to connect means "no PostgreSQL here"
        return f"{type(exc).__name__}: {exc}"


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once; each test gets a copy."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    engine = make_engine(f"sqlite:///{path}")
    upgrade(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL database of this test session, migrated once, dropped at the end."""
    problem = _postgres_admin_reachable()
    if problem:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {POSTGRES_ADMIN_URL}: {problem}")
        pytest.skip(f"PostgreSQL unreachable: {problem}")
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    name = f"lc_test_{worker}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _data_tables() -> list[str]:
    return [t.name for t in Base.metadata.sorted_tables if t.name not in REFERENCE_TABLES]


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A fresh, migrated database with only reference data, on each engine."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "test.db"
        shutil.copy(template, path)
        database = Database.from_url(f"sqlite:///{path}")
    else:
        url: str = request.getfixturevalue("postgres_url")
        database = Database.from_url(url)
        with database.engine.begin() as conn:
            conn.execute(text(f"TRUNCATE {', '.join(_data_tables())} RESTART IDENTITY CASCADE"))
    yield database
    database.dispose()


@pytest.fixture
def db_url(db: Database) -> str:
    """The URL of the test database, for server processes."""
    return db.engine.url.render_as_string(hide_password=False)


@pytest.fixture
def world(db: Database) -> World:
    """The standard test world (institutions, facilities, instruments, alice/bob/carol) on `db`."""
    return build_world(db)
