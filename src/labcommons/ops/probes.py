"""Readiness: can this process serve requests? Its database answers, and its schema is the one the code expects."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import anyio
from sqlalchemy import text

from labcommons.db import Database

# A probe that waits longer than this answers 503: a load balancer would rather try another host.
READY_TIMEOUT_SECONDS = 2.0
OK = "ok"


@dataclass
class Readiness:
    """Each check's outcome ("ok" or what is wrong)."""

    checks: dict[str, str] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return all(outcome == OK for outcome in self.checks.values())

    @property
    def failing(self) -> list[str]:
        return [name for name, outcome in self.checks.items() if outcome != OK]


@lru_cache(maxsize=1)
def _scripts() -> tuple[frozenset[str], frozenset[str]]:
    from alembic.script import ScriptDirectory

    from labcommons.migrations import alembic_config

    scripts = ScriptDirectory.from_config(alembic_config())
    return frozenset(scripts.get_heads()), frozenset(r.revision for r in scripts.walk_revisions())


def code_heads() -> frozenset[str]:
    """The Alembic head revision(s) of the migrations shipped with this code (read once per process)."""
    return _scripts()[0]


def migration_state(found: frozenset[str]) -> str:
    """"ok" when the database's revision is this code's head, or one this code does not know: a later release ran
    its migrations first, as a rolling upgrade does (docs/deploy.md: a release's migrations keep the release before
    it working). Otherwise the database is behind the code, which expects tables and columns it lacks."""
    heads, known = _scripts()
    if found == heads or (found and not found & known):
        return OK
    return (f"database at {', '.join(sorted(found)) or 'nothing'}, code at {', '.join(sorted(heads))}: "
            "run the migrations")


def check_database(db: Database, timeout: float = READY_TIMEOUT_SECONDS) -> Readiness:
    """`SELECT 1` and the schema's Alembic revision, on one connection, in a transaction rolled back after."""
    result = Readiness()
    try:
        with db.engine.connect() as connection:
            if not db.is_sqlite:
                # LOCAL: ends with this transaction, so the pooled connection keeps its usual (no) limit.
                connection.execute(text(f"SET LOCAL statement_timeout = {int(timeout * 1000)}"))
            connection.execute(text("SELECT 1"))
            result.checks["database"] = OK
            try:
                found = frozenset(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
            except Exception as exc:
                connection.rollback()
                result.checks["migrations"] = f"no migration revision in the database ({type(exc).__name__})"
                return result
            result.checks["migrations"] = migration_state(found)
    except Exception as exc:
        result.checks.setdefault("database", f"unreachable: {type(exc).__name__}")
        result.checks.setdefault("migrations", "not checked")
    return result


_limiter: anyio.CapacityLimiter | None = None


async def readiness(db: Database | None, timeout: float = READY_TIMEOUT_SECONDS) -> Readiness:
    """`check_database` in a worker thread, given up after `timeout` seconds (then the database is the problem).

    The probes have their own few threads: a database that hangs must not take the app's thread pool with it."""
    global _limiter
    if db is None:
        return Readiness({"database": "not configured", "migrations": "not checked"})
    if _limiter is None:
        _limiter = anyio.CapacityLimiter(2)
    # Reading the migration scripts takes a while the first time; that is not the database being slow.
    await anyio.to_thread.run_sync(_scripts, limiter=_limiter)
    try:
        with anyio.fail_after(timeout):
            return await anyio.to_thread.run_sync(check_database, db, timeout, abandon_on_cancel=True,
                                                  limiter=_limiter)
    except TimeoutError:
        return Readiness({"database": f"no answer within {timeout:g} s", "migrations": "not checked"})
