"""Backup and restore on both databases: a round trip gives back every row of every table, damaged or unconfirmed
restores are refused, and a backup taken while the application writes is consistent."""

from __future__ import annotations

import sqlite3
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, delete, func, inspect, select, text, update
from sqlalchemy.engine import make_url
from typer.testing import CliRunner

from labcommons.audit import chain
from labcommons.audit.models import AuditEntry, AuditHead
from labcommons.catalog.models import Institution, InstitutionKind, Instrument
from labcommons.cli import app
from labcommons.config import get_settings
from labcommons.db import Database, make_engine
from labcommons.identity import service as identity
from labcommons.identity.models import ApiToken, User
from labcommons.migrations import upgrade
from labcommons.ops import backup as ops
from labcommons.orders.models import OrderStatus
from tests.billing import billing_support as billing
from tests.billing.invoice_support import ledger_world
from tests.conftest import POSTGRES_ADMIN_URL
from tests.factories import World, build_world, grant, next_grid_day
from tests.orders.order_support import add_service, new_order, walk_to

Snapshot = dict[str, list[tuple[Any, ...]]]


# ---------------------------------------------------------------------------------------------------- helpers


def rich_world(db: Database) -> World:
    """The standard world plus billing accounts and rates, bookings (one cancelled), service orders in several
    states, ledger charges with vouchers and payments, role grants; every write leaves audit entries."""
    world = build_world(db)
    bw = billing.billing_world(world)
    start = next_grid_day(days=3)
    bookings = [billing.book(world, "carol", start, account_id=bw.carol_grant),
                billing.book(world, "bob", start + timedelta(hours=3), account_id=bw.bob_grant),
                billing.book(world, "alice", start + timedelta(days=1), instrument="SEQ")]
    with db.unit_of_work() as s:
        from labcommons.booking import service as booking_service

        booking_service.cancel_booking(s, world.actors["bob"], bookings[1])
    service_id = add_service(world, price_fen=12_000)
    for status in (OrderStatus.submitted, OrderStatus.in_progress, OrderStatus.results_delivered):
        walk_to(world, new_order(world, service_id, "carol"), status)
    new_order(world, service_id, "bob", submit=True)
    ledger_world(world)
    grant(world, "alice", "facility_manager")
    return world


def table_rows(engine: Any) -> Snapshot:
    """Every row of every table in the database (found by inspection, so nothing is left out), all columns, ordered
    by primary key (by every column where a table has none)."""
    rows: Snapshot = {}
    with engine.connect() as conn:
        insp = inspect(conn)
        for name in sorted(insp.get_table_names()):
            columns = [c["name"] for c in insp.get_columns(name)]
            order = insp.get_pk_constraint(name)["constrained_columns"] or columns
            quoted = ", ".join(f'"{c}"' for c in columns)
            by = ", ".join(f'"{c}"' for c in order)
            rows[name] = [tuple(r) for r in conn.execute(text(f'SELECT {quoted} FROM "{name}" ORDER BY {by}'))]
    return rows


def rows_at(url: str) -> Snapshot:
    engine = make_engine(url)
    try:
        return table_rows(engine)
    finally:
        engine.dispose()


def assert_same(actual: Snapshot, expected: Snapshot) -> None:
    assert sorted(actual) == sorted(expected)
    differing = [name for name in expected if actual[name] != expected[name]]
    assert not differing, f"tables differ after restore: {differing}"


def audit_report(url: str) -> chain.VerifyReport:
    db = Database.from_url(url)
    try:
        with db.unit_of_work(write=False) as s:
            return chain.verify(s)
    finally:
        db.dispose()


def mutate(url: str) -> None:
    """Insert, update and delete rows (through the ORM, so the audit log records it), then cut the audit log."""
    db = Database.from_url(url)
    try:
        with db.unit_of_work() as s:
            identity.create_user(s, email="mallory@example.org", name="Mallory", institution_code="CQ-UNI")
            s.execute(update(Instrument).where(Instrument.code == "CQ-CONF").values(name_en="Renamed"))
            token = s.scalars(select(ApiToken).order_by(ApiToken.id)).first()
            assert token is not None
            s.delete(token)
        with db.engine.begin() as conn:
            conn.execute(delete(AuditEntry).where(AuditEntry.seq == 1))
    finally:
        db.dispose()
    assert not audit_report(url).ok


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """Run `labcommons ARGS` against the database at `url`."""
    runner = CliRunner()

    def run(url: str, *args: str) -> Any:
        monkeypatch.setenv("LABCOMMONS_DATABASE_URL", url)
        get_settings.cache_clear()
        return runner.invoke(app, list(args))

    yield run
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def pg_target(postgres_url: str) -> Iterator[str]:
    """A second PostgreSQL database to restore into (created like conftest's, dropped at the end)."""
    name = f"lc_restore_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def fresh_url(db: Database, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A URL where no database exists yet, of the same kind as `db`: a new SQLite file, or the emptied second
    PostgreSQL database (a new schema is much cheaper than a new database, whose creation forces a checkpoint)."""
    if db.is_sqlite:
        return f"sqlite:///{tmp_path / 'restored.db'}"
    return emptied(request.getfixturevalue("pg_target"))


def emptied(url: str) -> str:
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


def url_of(db: Database) -> str:
    return db.engine.url.render_as_string(hide_password=False)


# ---------------------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_every_table(db: Database, fresh_url: str, tmp_path: Path,
                                         cli: Callable[..., Any]) -> None:
    rich_world(db)
    expected = table_rows(db.engine)
    assert audit_report(url_of(db)).ok
    dump = tmp_path / "labcommons.backup"

    made = cli(url_of(db), "backup", str(dump))
    assert made.exit_code == 0, made.output
    manifest = ops.verify_backup(dump, dialect=db.engine.dialect.name)
    assert manifest.tables == {name: len(rows) for name, rows in expected.items()}
    assert manifest.alembic_revision == ops.known_revisions()[0]
    assert manifest.tables["audit_entry"] > 0 and manifest.tables["booking"] == 3
    if db.is_sqlite:
        # One self-contained file: no WAL beside it, and SQLite opens it in rollback-journal mode.
        assert not dump.with_name(dump.name + "-wal").exists()
        assert dump.read_bytes()[18:20] == b"\x01\x01"

    # Into a new database (the "new machine" case), then again over changed data.
    targets = [fresh_url] + ([url_of(db)] if db.is_sqlite else [])
    for n, target in enumerate(targets):
        if n == 0:
            first = cli(target, "restore", str(dump), "--yes")
            assert first.exit_code == 0, first.output
            assert_same(rows_at(target), expected)
        mutate(target)
        again = cli(target, "restore", str(dump), "--yes")
        assert again.exit_code == 0, again.output
        assert "row counts match the manifest" in again.output and "audit chain ok" in again.output
        assert_same(rows_at(target), expected)
        assert audit_report(target).ok

    # The restored database takes new writes: ids and sequences continue after the restored rows.
    restored = Database.from_url(fresh_url)
    with restored.unit_of_work() as s:
        user = identity.create_user(s, email="after@example.org", name="After", institution_code="SC-UNI")
        assert user.id > max(row[0] for row in expected["user_account"])
    restored.dispose()
    assert audit_report(fresh_url).ok


def test_restore_upgrades_an_older_backup(tmp_path: Path) -> None:
    old = make_engine(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(old, "0007")
    dump = tmp_path / "old.backup"
    assert ops.backup(old, dump).manifest.alembic_revision == "0007"
    old.dispose()

    target = make_engine(f"sqlite:///{tmp_path / 'new.db'}")
    result = ops.restore(target, dump, confirmed=True)
    assert result.upgraded_from == "0007" and result.revision == ops.known_revisions()[0]
    with target.connect() as conn:
        assert conn.scalar(text("SELECT version_num FROM alembic_version")) == result.revision
        assert "rate_limit_bucket" in inspect(conn).get_table_names()
    assert result.audit.ok
    target.dispose()


# ---------------------------------------------------------------------------------------------------- refusals


def test_tampered_dump_is_refused_and_changes_nothing(db: Database, tmp_path: Path) -> None:
    build_world(db)
    dump = tmp_path / "tampered.backup"
    ops.backup(db.engine, dump)
    data = bytearray(dump.read_bytes())
    data[len(data) // 2] ^= 0xFF
    dump.write_bytes(bytes(data))
    with db.unit_of_work() as s:
        s.add(Institution(code="AFTER", region_code="CQ", kind=InstitutionKind.laboratory, name_zh="后",
                          name_en="After"))
    before = table_rows(db.engine)

    with pytest.raises(ops.BackupError) as refused:
        ops.restore(db.engine, dump, confirmed=True)
    assert refused.value.code == "checksum_mismatch" and refused.value.field == "path"
    assert_same(table_rows(db.engine), before)

    # A dump without its manifest is an unfinished backup.
    ops.manifest_path(dump).unlink()
    with pytest.raises(ops.BackupError) as missing:
        ops.restore(db.engine, dump, confirmed=True)
    assert missing.value.code == "manifest_missing"
    assert_same(table_rows(db.engine), before)


def test_manifest_from_another_dialect_or_newer_code_is_refused(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(engine)
    dump = tmp_path / "a.backup"
    ops.backup(engine, dump)
    engine.dispose()
    with pytest.raises(ops.BackupError) as other:
        ops.verify_backup(dump, dialect="postgresql")
    assert other.value.code == "dialect_mismatch"

    mpath = ops.manifest_path(dump)
    mpath.write_text(mpath.read_text().replace('"alembic_revision": "', '"alembic_revision": "9'))
    with pytest.raises(ops.BackupError) as newer:
        ops.verify_backup(dump, dialect="sqlite")
    assert newer.value.code == "revision_unknown"
    mpath.write_text("{not json")
    with pytest.raises(ops.BackupError) as broken:
        ops.verify_backup(dump)
    assert broken.value.code == "manifest_invalid"


def test_restore_without_yes_is_refused(db: Database, tmp_path: Path, cli: Callable[..., Any]) -> None:
    build_world(db)
    dump = tmp_path / "b.backup"
    assert cli(url_of(db), "backup", str(dump)).exit_code == 0
    with db.unit_of_work() as s:
        s.add(Institution(code="KEPT", region_code="SC", kind=InstitutionKind.university, name_zh="留", name_en="Kept"))
    before = table_rows(db.engine)

    refused = cli(url_of(db), "restore", str(dump))
    assert refused.exit_code == 2
    assert "Backup verified" in refused.output and "--yes" in refused.output
    with pytest.raises(ops.BackupError) as unconfirmed:
        ops.restore(db.engine, dump, confirmed=False)
    assert unconfirmed.value.code == "confirmation_required" and unconfirmed.value.field == "yes"
    assert_same(table_rows(db.engine), before)

    missing = cli(url_of(db), "restore", str(tmp_path / "nope.backup"), "--yes")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    exists = cli(url_of(db), "backup", str(dump))
    assert exists.exit_code == 2 and "already exists" in exists.output
    assert cli(url_of(db), "backup", str(dump), "--force").exit_code == 0


# ---------------------------------------------------------------------------------------------------- consistency


def _new_institution(db: Database, code: str) -> None:
    with db.unit_of_work() as s:
        s.add(Institution(code=code, region_code="CQ", kind=InstitutionKind.company, name_zh=code, name_en=code))


def test_backup_while_writing_is_consistent(db: Database, fresh_url: str, tmp_path: Path) -> None:
    """A writer thread commits audited rows throughout, and the backup's own progress steps commit more: the
    backup is one moment of the database (its counts match, SQLite's integrity check passes, its audit chain
    verifies) and holds none of the rows written after that moment."""
    build_world(db)
    stop = threading.Event()
    written: list[str] = []
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            while not stop.is_set():
                code = f"W{len(written)}"
                _new_institution(db, code)
                written.append(code)
        except BaseException as exc:  # reported by the test below, not lost in the thread
            failures.append(exc)

    during: list[str] = []

    def progress(phase: str, done: int, total: int | None) -> None:
        # Commits from another connection between SQLite's copy steps, and after PostgreSQL's snapshot was taken.
        if phase in ("copy", "dump") and len(during) < 3:
            code = f"D{len(during)}"
            _new_institution(db, code)
            during.append(code)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        dump = tmp_path / "live.backup"
        manifest = ops.backup(db.engine, dump, progress=progress, pages_per_step=2).manifest
    finally:
        stop.set()
        thread.join()
    assert not failures
    assert len(during) == 3

    with db.unit_of_work(write=False) as s:
        institutions_now = s.scalar(select(func.count()).select_from(Institution))
    assert manifest.tables["institution"] < (institutions_now or 0)

    if db.is_sqlite:
        copy = sqlite3.connect(dump)
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        for name, count in manifest.tables.items():
            assert copy.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] == count, name
        copy.close()
    result = ops.restore(make_engine(fresh_url), dump, confirmed=True)
    assert result.counts == manifest.tables
    assert result.audit.ok and result.audit.entries == manifest.tables["audit_entry"]
    restored = make_engine(fresh_url)
    with restored.connect() as conn:
        codes = set(conn.scalars(select(Institution.code)))
        head = conn.scalar(select(AuditHead.seq))
    restored.dispose()
    assert not codes & set(during)
    assert head == manifest.tables["audit_entry"]


# ---------------------------------------------------------------------------------------------------- failures


def test_interrupted_backup_leaves_nothing(db: Database, tmp_path: Path) -> None:
    build_world(db)
    out = tmp_path / "out"
    out.mkdir()

    def interrupt(phase: str, done: int, total: int | None) -> None:
        if done > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ops.backup(db.engine, out / "x.backup", progress=interrupt, pages_per_step=1)
    assert list(out.iterdir()) == []


def _fake_tool(directory: Path, name: str, version: str, exit_code: int) -> None:
    script = directory / name
    script.write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{name} (PostgreSQL) {version}"; exit 0; fi\n'
                      f'echo "{name}: error: simulated failure" >&2\nfor a in "$@"; do case "$a" in --file=*) '
                      f'echo partial > "${{a#--file=}}";; esac; done\nexit {exit_code}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)


def test_pg_tools_too_old_or_failing_are_refused(postgres_url: str, tmp_path: Path) -> None:
    engine = make_engine(postgres_url)
    out = tmp_path / "out"
    out.mkdir()
    old, failing = tmp_path / "old", tmp_path / "failing"
    old.mkdir()
    failing.mkdir()
    _fake_tool(old, "pg_dump", "9.6.24", 0)
    _fake_tool(failing, "pg_dump", "99.1", 1)
    try:
        with pytest.raises(ops.BackupError) as too_old:
            ops.backup(engine, out / "x.backup", pg_bin=old)
        assert too_old.value.code == "pg_tool_too_old" and "9.6" in too_old.value.message
        with pytest.raises(ops.BackupError) as failed:
            ops.backup(engine, out / "x.backup", pg_bin=failing)
        assert failed.value.code == "pgdump_failed" and "simulated failure" in failed.value.message
        assert list(out.iterdir()) == []
        with pytest.raises(ops.BackupError) as missing:
            ops.find_pg_tool("pg_restore", 15, pg_bin=tmp_path / "empty")
        assert missing.value.code == "pg_tool_missing"
    finally:
        engine.dispose()


def test_comparison_sees_a_changed_column(db: Database) -> None:
    """The comparison helper sees a change in any column (guards the round trip against a helper that cannot fail)."""
    build_world(db)
    before = table_rows(db.engine)
    with db.unit_of_work() as s:
        s.execute(update(User).where(User.email == "bob@example.org").values(name="Robert"))
    with pytest.raises(AssertionError):
        assert_same(table_rows(db.engine), before)


def test_pg_restore_that_cannot_replace_everything_changes_nothing(
    postgres_url: str, pg_target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    source = make_engine(postgres_url)
    dump = tmp_path / "pg.backup"
    ops.backup(source, dump)
    source.dispose()
    target = make_engine(emptied(pg_target))
    upgrade(target)
    with target.begin() as conn:
        conn.execute(text("CREATE TABLE stray (x integer)"))
    try:
        # A table the backup does not hold would survive pg_restore --clean: refused before anything is dropped.
        with pytest.raises(ops.BackupError) as extra:
            ops.restore(target, dump, confirmed=True)
        assert extra.value.code == "restore_extra_tables" and "stray" in extra.value.message
        with target.begin() as conn:
            conn.execute(text("DROP TABLE stray"))
            conn.execute(text("INSERT INTO region (code, name_zh, name_en) VALUES ('XX', '某', 'Somewhere')"))
        before = table_rows(target)

        # An application still holding a lock: the restore gives up after the lock timeout, in one transaction.
        monkeypatch.setattr(ops, "PG_LOCK_WAIT_SECONDS", 0.5)
        with target.connect() as holder, holder.begin():
            holder.execute(text("SELECT count(*) FROM region")).scalar()
            with pytest.raises(ops.BackupError) as locked:
                ops.restore(target, dump, confirmed=True)
        assert locked.value.code == "restore_locked" and "pid " in locked.value.message
        assert_same(table_rows(target), before)
    finally:
        target.dispose()
