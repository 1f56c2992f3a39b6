"""Alembic migrations and the function that applies them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine

_HERE = Path(__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """The Alembic configuration for the packaged migrations."""
    cfg = Config(str(_HERE.parent / "alembic.ini"))
    cfg.set_main_option("script_location", str(_HERE))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def _driver(connection: Connection) -> Any:
    return connection.connection.driver_connection


@contextmanager
def _migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in one transaction; on SQLite with foreign keys off while it runs.

    SQLite changes a column by copying its table; dropping the old copy with foreign keys on would cascade
    into every referencing table. Keys are checked once the copy is done, as SQLite's documentation advises.
    """
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            # The pragma is ignored inside a transaction, so it goes straight to the driver before one begins.
            _driver(connection).execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                yield connection
                if sqlite:
                    problems = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if problems:
                        raise RuntimeError(f"migration left dangling foreign keys: {problems[:5]}")
        finally:
            if sqlite:
                _driver(connection).execute("PRAGMA foreign_keys=ON")


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the database behind `engine` to `revision`."""
    cfg = alembic_config()
    with _migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str) -> None:
    """Take the database behind `engine` back to `revision`."""
    cfg = alembic_config()
    with _migration_connection(engine) as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)
