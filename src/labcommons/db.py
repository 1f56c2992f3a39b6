"""Engine, sessions and the shared declarative base for SQLite (embedded) and PostgreSQL (production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.types import TypeDecorator

# Stable constraint names: SQLite batch migrations and PostgreSQL error mapping both rely on them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# Ids are 32-bit integers on PostgreSQL: a larger one given as input is refused before it reaches a query, where
# it would fail as "integer out of range" instead of matching nothing.
MAX_ID = 2**31 - 1


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    """The current time as an aware UTC datetime."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime: timestamptz on PostgreSQL, naive-UTC ISO text on SQLite.

    SQLite keeps the text form 'YYYY-MM-DD HH:MM:SS.ffffff' so that string order is time order.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given where an aware UTC time is required")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class add_minutes(FunctionElement[datetime]):
    """`timestamp + N minutes` in SQL, for either dialect."""

    inherit_cache = True
    type = UTCDateTime()

    def __init__(self, column: Any, minutes: Any) -> None:
        super().__init__(column, minutes)


@compiles(add_minutes, "postgresql")
def _add_minutes_pg(element: add_minutes, compiler: SQLCompiler, **kw: Any) -> str:
    column, minutes = list(element.clauses)
    return f"({compiler.process(column, **kw)} + make_interval(mins => {compiler.process(minutes, **kw)}))"


@compiles(add_minutes, "sqlite")
def _add_minutes_sqlite(element: add_minutes, compiler: SQLCompiler, **kw: Any) -> str:
    column, minutes = list(element.clauses)
    # %f is seconds with milliseconds; the trailing 000 restores the stored microsecond width.
    return (
        f"strftime('%Y-%m-%d %H:%M:%f000', {compiler.process(column, **kw)}, "
        f"'+' || ({compiler.process(minutes, **kw)}) || ' minutes')"
    )


def _configure_sqlite(engine: Engine, busy_timeout: float) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself, so writes can ask for BEGIN IMMEDIATE.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction takes SQLite's write lock up front: the overlap check and the insert that
        # follows it are then serialised across every process that opens this file.
        if conn.get_execution_options().get("sqlite_immediate"):
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            conn.exec_driver_sql("BEGIN")


def make_engine(url: str, *, busy_timeout: float = 30.0, pool_size: int = 10) -> Engine:
    """Create an engine for a SQLAlchemy URL with the settings each dialect needs."""
    if url.startswith("sqlite"):
        engine = create_engine(
            url, connect_args={"check_same_thread": False, "timeout": busy_timeout}, pool_size=pool_size
        )
        _configure_sqlite(engine, busy_timeout)
        return engine
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)


class Database:
    """An engine with two session factories: reads, and serialised writes."""

    def __init__(self, engine: Engine) -> None:
        from labcommons.audit import capture

        # Every session of every database appends its state changes to the audit log at commit.
        capture.register()
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        write_bind = engine.execution_options(sqlite_immediate=True) if self.is_sqlite else engine
        self._read = sessionmaker(bind=engine, expire_on_commit=False)
        self._write = sessionmaker(bind=write_bind, expire_on_commit=False)

    @classmethod
    def from_url(cls, url: str, **kw: Any) -> Database:
        return cls(make_engine(url, **kw))

    def session(self, *, write: bool = False) -> Session:
        """A new session; `write=True` serialises it against other writers on SQLite."""
        return (self._write if write else self._read)()

    @contextmanager
    def unit_of_work(self, *, write: bool = True) -> Iterator[Session]:
        """A session that commits when the block succeeds and rolls back when it raises."""
        session = self.session(write=write)
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self) -> None:
        self.engine.dispose()


def transaction_within(transaction: Any, ancestor: Any) -> bool:
    """Whether a session transaction is `ancestor` or nested inside it (to drop what a rolled-back savepoint
    recorded in session.info)."""
    while transaction is not None:
        if transaction is ancestor:
            return True
        transaction = transaction.parent
    return False
