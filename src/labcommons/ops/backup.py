"""Backup and restore of the whole database: SQLite through its online backup API, PostgreSQL through pg_dump and
pg_restore.

A backup is two files: the dump at PATH (a plain SQLite database file, or a pg_dump custom-format archive) and its
manifest at PATH + ".manifest.json" (dialect, creation time, Alembic revision, row counts per table, size and
SHA-256 of the dump). Both are written under temporary names and renamed only when complete, the manifest last, so
a dump without its manifest, or one whose checksum does not match, is an unfinished or damaged backup and restore
refuses it. The checksum detects damage, not forgery: whoever can rewrite the dump can rewrite the manifest too.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, inspect, select, table, text
from sqlalchemy.orm import Session

from labcommons.audit import chain
from labcommons.errors import DomainError

MANIFEST_SUFFIX = ".manifest.json"
FORMAT = "labcommons-backup"
FORMAT_VERSION = 1
# SQLite pages copied per step of the online backup; between steps the progress callback runs.
PAGES_PER_STEP = 1024
# A PostgreSQL restore waits at most this many seconds for a lock (an application still connected holds some), then
# is cancelled instead of hanging; its single transaction leaves the database as it was.
PG_LOCK_WAIT_SECONDS = 30.0
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"

# (phase, done, total): phases are "copy" (SQLite pages), "dump" and "restore" (PostgreSQL tables), "check"
# (tables counted), "verify" (audit entries).
Progress = Callable[[str, int, int | None], None]


class BackupError(DomainError):
    """A backup or restore that was refused or failed; nothing was replaced."""

    code = "backup_failed"


@dataclass(frozen=True)
class Manifest:
    """What a backup holds, written next to the dump."""

    dialect: str
    created_at: datetime
    alembic_revision: str
    tables: dict[str, int]
    dump_file: str
    size_bytes: int
    sha256: str
    # The program that wrote the dump and its version ("sqlite 3.40.1", "pg_dump 15.20"), and the server's.
    tool: str
    server_version: str

    @property
    def rows(self) -> int:
        return sum(self.tables.values())

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "format_version": FORMAT_VERSION, "dialect": self.dialect,
            "created_at": self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "alembic_revision": self.alembic_revision, "tables": dict(sorted(self.tables.items())),
            "dump": {"file": self.dump_file, "size_bytes": self.size_bytes, "sha256": self.sha256},
            "tool": self.tool, "server_version": self.server_version,
        }, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, raw: str) -> Manifest:
        try:
            data = json.loads(raw)
            if data.get("format") != FORMAT:
                raise ValueError("not a LabCommons backup manifest")
            if data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"manifest format version {data.get('format_version')} is not supported")
            dump = data["dump"]
            tables = {str(k): int(v) for k, v in data["tables"].items()}
            return cls(
                dialect=str(data["dialect"]), created_at=datetime.fromisoformat(data["created_at"]),
                alembic_revision=str(data["alembic_revision"]), tables=tables, dump_file=str(dump["file"]),
                size_bytes=int(dump["size_bytes"]), sha256=str(dump["sha256"]), tool=str(data["tool"]),
                server_version=str(data["server_version"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise BackupError(f"the manifest is unreadable: {exc}", code="manifest_invalid") from exc


@dataclass(frozen=True)
class BackupResult:
    path: Path
    manifest_path: Path
    manifest: Manifest


@dataclass(frozen=True)
class RestoreResult:
    manifest: Manifest
    # Row counts found right after the restore (before any upgrade); they equal the manifest's.
    counts: dict[str, int]
    # The revision the backup was at when it was older than this code's migrations, which then upgraded it.
    upgraded_from: str | None
    revision: str
    audit: chain.VerifyReport
    warnings: list[str] = field(default_factory=list)


def manifest_path(path: Path) -> Path:
    """Where the manifest of the dump at `path` lives."""
    return path.with_name(path.name + MANIFEST_SUFFIX)


def _noop(phase: str, done: int, total: int | None) -> None:
    return None


# ---------------------------------------------------------------------------------------------------- files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _partial(path: Path) -> Path:
    # Hidden and in the same directory, so the final rename is atomic and a leftover never looks like a backup.
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


def _remove(*paths: Path) -> None:
    for p in paths:
        for candidate in (p, p.with_name(p.name + "-wal"), p.with_name(p.name + "-shm"),
                          p.with_name(p.name + "-journal")):
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()


def _publish(dump_tmp: Path, path: Path, manifest: Manifest) -> Path:
    """Move a finished dump into place, then write its manifest: the manifest appears only for a complete dump."""
    target_manifest = manifest_path(path)
    manifest_tmp = _partial(target_manifest)
    try:
        manifest_tmp.write_text(manifest.to_json(), encoding="utf-8")
        _fsync(manifest_tmp)
        _fsync(dump_tmp)
        # An old manifest must not outlive the dump it describes while the new one is moved in.
        with contextlib.suppress(FileNotFoundError):
            target_manifest.unlink()
        os.replace(dump_tmp, path)
        os.replace(manifest_tmp, target_manifest)
        _fsync(path.parent)
    except BaseException:
        _remove(manifest_tmp)
        raise
    return target_manifest


# ---------------------------------------------------------------------------------------------------- revisions


def _script() -> Any:
    from alembic.script import ScriptDirectory

    from labcommons.migrations import alembic_config

    return ScriptDirectory.from_config(alembic_config())


@functools.cache
def known_revisions() -> tuple[str, tuple[str, ...]]:
    """This code's head revision and every revision it knows."""
    script = _script()
    return script.get_current_head(), tuple(r.revision for r in script.walk_revisions())


# ---------------------------------------------------------------------------------------------------- counting


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_tables(conn: sqlite3.Connection) -> list[str]:
    rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' "
                        "ESCAPE '\\' ORDER BY name").fetchall()
    return [str(r[0]) for r in rows]


def _sqlite_counts(conn: sqlite3.Connection) -> dict[str, int]:
    return {name: int(conn.execute(f"SELECT count(*) FROM {_quote(name)}").fetchone()[0])
            for name in _sqlite_tables(conn)}


def table_counts(conn: Connection) -> dict[str, int]:
    """Rows per table of the database behind `conn` (its default schema), in the connection's snapshot."""
    return {name: int(conn.scalar(select(func.count()).select_from(table(name))) or 0)
            for name in sorted(inspect(conn).get_table_names())}


def _revision_of(tables: Sequence[str], fetch: Callable[[], Sequence[Any]]) -> str:
    if "alembic_version" not in tables:
        raise BackupError("the database has no LabCommons schema (no alembic_version table); run "
                          "`labcommons db upgrade` first", code="not_migrated")
    rows = fetch()
    if len(rows) != 1:
        raise BackupError(f"the database's alembic_version holds {len(rows)} rows; expected one",
                          code="not_migrated")
    return str(rows[0][0])


# ---------------------------------------------------------------------------------------------------- SQLite


def _sqlite_file(engine: Engine) -> Path:
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise BackupError("backup and restore need a SQLite database file (not in-memory or a URI)",
                          code="unsupported_database")
    return Path(database)


def _sqlite_connect(path: Path, timeout: float, *, read_only: bool = False) -> sqlite3.Connection:
    # isolation_level None: transactions are begun explicitly here, never implicitly by the driver.
    if read_only:
        return sqlite3.connect(path.resolve().as_uri() + "?mode=ro", timeout=timeout, isolation_level=None,
                               uri=True)
    return sqlite3.connect(str(path), timeout=timeout, isolation_level=None)


def _backup_sqlite(engine: Engine, path: Path, progress: Progress, pages_per_step: int, timeout: float) -> Manifest:
    source_path = _sqlite_file(engine)
    if not source_path.is_file():
        raise BackupError(f"the database file {source_path} does not exist", code="database_missing")
    tmp = _partial(path)
    source = _sqlite_connect(source_path, timeout)
    try:
        # One read transaction across every step: the copy is the database as of this moment, while writers carry
        # on in WAL mode. Without it, a write between two steps would restart the copy, maybe forever.
        source.execute("BEGIN")
        source.execute("SELECT count(*) FROM sqlite_master").fetchone()
        dest = _sqlite_connect(tmp, timeout)
        try:
            source.backup(dest, pages=pages_per_step,
                          progress=lambda _status, remaining, total: progress("copy", total - remaining, total))
            source.execute("COMMIT")
            # The copy carries the source's WAL flag; a rollback journal makes it one self-contained file.
            dest.execute("PRAGMA journal_mode=DELETE").fetchone()
            problems = dest.execute("PRAGMA integrity_check").fetchall()
            if [tuple(r) for r in problems] != [("ok",)]:
                raise BackupError(f"the copy fails SQLite's integrity check: {problems[:5]}", code="backup_corrupt")
            counts = _sqlite_counts(dest)
            revision = _revision_of(list(counts), lambda: dest.execute(
                "SELECT version_num FROM alembic_version").fetchall())
        finally:
            dest.close()
    except BaseException:
        _remove(tmp)
        raise
    finally:
        source.close()
    try:
        return _finish(tmp, path, "sqlite", counts, revision, f"sqlite {sqlite3.sqlite_version}",
                       sqlite3.sqlite_version)
    except BaseException:
        _remove(tmp)
        raise


def _restore_sqlite(engine: Engine, dump: Path, manifest: Manifest, progress: Progress, timeout: float,
                    pages_per_step: int) -> dict[str, int]:
    target = _sqlite_file(engine)
    if target.resolve() == dump.resolve():
        raise BackupError("the backup is the database file itself", field="path", code="restore_onto_itself")
    if not target.parent.is_dir():
        raise BackupError(f"the directory of the database file {target} does not exist", code="database_missing")
    source = _sqlite_connect(dump, timeout, read_only=True)
    try:
        dest = _sqlite_connect(target, timeout)
        try:
            # The backup API writes the whole copy in one write transaction of the target: an interrupted restore
            # rolls back and leaves the old database. Writers that are still connected would wait for it (busy
            # timeout) and then see the restored data, but their in-flight work would be lost: stop them first.
            source.backup(dest, pages=pages_per_step,
                          progress=lambda _status, remaining, total: progress("restore", total - remaining, total))
            dest.execute("PRAGMA journal_mode=WAL").fetchone()
            return _sqlite_counts(dest)
        finally:
            dest.close()
    finally:
        source.close()


# ---------------------------------------------------------------------------------------------------- PostgreSQL


@dataclass(frozen=True)
class PgTool:
    path: str
    version: str
    major: int


def _tool_version(path: str) -> PgTool | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.(\d+))?", out)
    if not match:
        return None
    return PgTool(path=path, version=match.group(0), major=int(match.group(1)))


def _candidates(name: str, pg_bin: Path | None) -> list[str]:
    if pg_bin is not None:
        return [str(pg_bin / name)]
    found: list[str] = []
    on_path = shutil.which(name)
    if on_path:
        found.append(on_path)

    def major_of(directory: Path) -> int:
        digits = re.match(r"\d+", directory.parent.name)
        return int(digits.group(0)) if digits else -1

    for directory in sorted(Path("/").glob(PG_BIN_GLOB.lstrip("/")), key=major_of, reverse=True):
        candidate = directory / name
        if candidate.is_file() and str(candidate) not in found:
            found.append(str(candidate))
    return found


def find_pg_tool(name: str, need_major: int, *, pg_bin: Path | None = None) -> PgTool:
    """The first `name` (PATH, then /usr/lib/postgresql/*/bin, newest first) whose major version is at least
    `need_major`; a clear refusal when there is none."""
    tools = [t for t in (_tool_version(c) for c in _candidates(name, pg_bin)) if t is not None]
    for tool in tools:
        if tool.major >= need_major:
            return tool
    if not tools:
        where = str(pg_bin) if pg_bin else f"PATH or {PG_BIN_GLOB}"
        raise BackupError(f"{name} was not found in {where}; install the PostgreSQL client (e.g. "
                          f"postgresql-client-{need_major})", code="pg_tool_missing")
    found = ", ".join(f"{t.path} ({t.version})" for t in tools)
    raise BackupError(f"{name} {need_major} or newer is needed (the server or the archive is version "
                      f"{need_major}); found only {found}", code="pg_tool_too_old")


def _server_major(conn: Connection) -> tuple[int, str]:
    number = int(conn.scalar(text("SHOW server_version_num")) or 0)
    version = str(conn.scalar(text("SHOW server_version")) or "").split(" ")[0]
    return number // 10000, version


def _libpq(engine: Engine) -> tuple[str, dict[str, str]]:
    """A libpq connection string for the engine's database, and the environment that carries its password (never
    on the command line, where other users could read it)."""
    from psycopg.conninfo import make_conninfo

    url = engine.url
    params: dict[str, Any] = {k: v for k, v in url.query.items() if isinstance(v, str)}
    for key, value in (("host", url.host), ("port", url.port), ("user", url.username), ("dbname", url.database)):
        if value is not None:
            params[key] = str(value)
    env = dict(os.environ)
    if url.password is not None:
        env["PGPASSWORD"] = str(url.password)
    return make_conninfo("", **params), env


def _run_pg(args: list[str], env: dict[str, str], phase: str, marker: str, total: int,
            progress: Progress) -> None:
    """Run pg_dump or pg_restore with --verbose, advancing `phase` on each line that starts a table's data."""
    done = 0
    tail: list[str] = []
    with subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        try:
            for line in proc.stderr:
                if marker in line:
                    done += 1
                    progress(phase, min(done, total), total)
                tail = [*tail[-19:], line.rstrip()]
        except BaseException:
            # Interrupted (Ctrl-C, a failing progress display): stop the tool rather than wait for it to finish.
            proc.kill()
            raise
        code = proc.wait()
    if code != 0:
        errors = [line for line in tail if "error" in line.lower()] or tail
        raise BackupError(f"{Path(args[0]).name} failed (exit {code}): " + " | ".join(errors[-5:]),
                          code=f"{Path(args[0]).name.replace('_', '')}_failed")


def _backup_postgresql(engine: Engine, path: Path, progress: Progress, pg_bin: Path | None) -> Manifest:
    conninfo, env = _libpq(engine)
    tmp = _partial(path)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                # The counts and the dump read one exported snapshot: they agree however the application writes.
                snapshot = str(conn.scalar(text("SELECT pg_export_snapshot()")))
                server_major, server_version = _server_major(conn)
                tool = find_pg_tool("pg_dump", server_major, pg_bin=pg_bin)
                counts = table_counts(conn)
                revision = _revision_of(list(counts), lambda: conn.execute(
                    text("SELECT version_num FROM alembic_version")).all())
                progress("dump", 0, len(counts))
                _run_pg([tool.path, "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}",
                         "--verbose", f"--file={tmp}", f"--dbname={conninfo}"],
                        env, "dump", "dumping contents of table", len(counts), progress)
        return _finish(tmp, path, "postgresql", counts, revision, f"pg_dump {tool.version}", server_version)
    except BaseException:
        _remove(tmp)
        raise


def _restore_postgresql(engine: Engine, dump: Path, manifest: Manifest, progress: Progress, pg_bin: Path | None,
                        confirmed: bool) -> dict[str, int]:
    with engine.connect() as conn:
        server_major, _ = _server_major(conn)
        present = set(inspect(conn).get_table_names())
    archive = re.search(r"(\d+)", manifest.tool)
    tool = find_pg_tool("pg_restore", max(server_major, int(archive.group(1)) if archive else 0), pg_bin=pg_bin)
    # pg_restore --clean drops only what the archive holds: a table of a newer schema would survive and break the
    # upgrade that follows, so a database holding such tables is refused rather than half replaced.
    extra = sorted(present - set(manifest.tables))
    if extra:
        raise BackupError(f"the database holds tables the backup does not know ({', '.join(extra[:10])}); restore "
                          "into an empty database or drop them first", code="restore_extra_tables")
    _require_confirmation(confirmed, engine)
    conninfo, env = _libpq(engine)
    # The name picks pg_restore's session out for the watchdog.
    env["PGAPPNAME"] = f"labcommons-restore-{uuid.uuid4().hex[:12]}"
    progress("restore", 0, len(manifest.tables))
    watchdog = _LockWatchdog(engine, env["PGAPPNAME"], PG_LOCK_WAIT_SECONDS)
    try:
        with watchdog:
            _run_pg([tool.path, "--clean", "--if-exists", "--no-owner", "--no-privileges", "--single-transaction",
                     "--exit-on-error", "--verbose", f"--dbname={conninfo}", str(Path(dump).resolve())],
                    env, "restore", "processing data for table", len(manifest.tables), progress)
    except BackupError as exc:
        if watchdog.blocked_by is not None:
            raise BackupError(f"the restore waited more than {PG_LOCK_WAIT_SECONDS:g} s for locks held by other "
                              f"sessions ({watchdog.blocked_by}) and was cancelled; nothing was changed. Stop the "
                              "application and try again", code="restore_locked") from exc
        raise
    with engine.connect() as conn:
        return table_counts(conn)


class _LockWatchdog:
    """Cancels pg_restore's statement when its session has waited for a lock longer than `limit` seconds.

    A PGOPTIONS lock_timeout would not do: every archive begins with `SET lock_timeout = 0`."""

    def __init__(self, engine: Engine, application_name: str, limit: float, poll: float = 0.2) -> None:
        self.engine, self.application_name, self.limit, self.poll = engine, application_name, limit, poll
        self.blocked_by: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="restore-lock-watchdog", daemon=True)

    def __enter__(self) -> _LockWatchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        waiting_since: float | None = None
        # Autocommit: pg_stat_activity is read once per transaction, and every poll must see it afresh.
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            while not self._stop.wait(self.poll):
                row = conn.execute(text(
                    "SELECT pid, pg_blocking_pids(pid) FROM pg_stat_activity "
                    "WHERE application_name = :name AND wait_event_type = 'Lock'"), {"name": self.application_name},
                ).first()
                if row is None:
                    waiting_since = None
                    continue
                waiting_since = waiting_since or time.monotonic()
                if time.monotonic() - waiting_since < self.limit:
                    continue
                blockers = conn.execute(text(
                    "SELECT pid, application_name, client_addr FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                    {"pids": list(row[1])}).all()
                self.blocked_by = ", ".join(
                    f"pid {b.pid}" + (f" {b.application_name!r}" if b.application_name else "")
                    + (f" from {b.client_addr}" if b.client_addr else "") for b in blockers) or "unknown"
                conn.execute(text("SELECT pg_cancel_backend(:pid)"), {"pid": row[0]})
                return


# ---------------------------------------------------------------------------------------------------- entry points


def _finish(tmp: Path, path: Path, dialect: str, counts: dict[str, int], revision: str, tool: str,
            server_version: str) -> Manifest:
    manifest = Manifest(
        dialect=dialect, created_at=datetime.now(UTC), alembic_revision=revision, tables=counts,
        dump_file=path.name, size_bytes=tmp.stat().st_size, sha256=_sha256(tmp), tool=tool,
        server_version=server_version,
    )
    _publish(tmp, path, manifest)
    return manifest


def backup(engine: Engine, path: Path, *, overwrite: bool = False, progress: Progress | None = None,
           pg_bin: Path | None = None, pages_per_step: int = PAGES_PER_STEP, busy_timeout: float = 30.0
           ) -> BackupResult:
    """Write a consistent backup of the database behind `engine` to `path` and its manifest next to it."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise BackupError(f"{path} already exists; choose another path or replace it with --force", field="path",
                          code="backup_exists")
    if path.is_dir():
        raise BackupError(f"{path} is a directory; give a file name", field="path", code="backup_path_invalid")
    if not path.parent.is_dir():
        raise BackupError(f"the directory {path.parent} does not exist", field="path", code="backup_path_invalid")
    report = progress or _noop
    if engine.dialect.name == "sqlite":
        manifest = _backup_sqlite(engine, path, report, pages_per_step, busy_timeout)
    elif engine.dialect.name == "postgresql":
        manifest = _backup_postgresql(engine, path, report, pg_bin)
    else:
        raise BackupError(f"backups of {engine.dialect.name} databases are not supported",
                          code="unsupported_database")
    return BackupResult(path=path, manifest_path=manifest_path(path), manifest=manifest)


def verify_backup(path: Path, *, dialect: str | None = None) -> Manifest:
    """Read the manifest of the dump at `path` and check the dump against it (size, SHA-256), its dialect and that
    its schema revision is one this code knows."""
    path = Path(path)
    mpath = manifest_path(path)
    if not path.is_file():
        raise BackupError(f"{path} does not exist", field="path", code="backup_missing")
    if not mpath.is_file():
        raise BackupError(f"{mpath} is missing: without its manifest the backup is incomplete or not a LabCommons "
                          "backup", field="path", code="manifest_missing")
    manifest = Manifest.from_json(mpath.read_text(encoding="utf-8"))
    size = path.stat().st_size
    if size != manifest.size_bytes or _sha256(path) != manifest.sha256:
        raise BackupError(f"{path} does not match its manifest's checksum: the dump was changed or damaged",
                          field="path", code="checksum_mismatch")
    if dialect is not None and manifest.dialect != dialect:
        raise BackupError(f"the backup is of a {manifest.dialect} database; the configured database is {dialect}",
                          field="path", code="dialect_mismatch")
    _head, revisions = known_revisions()
    if manifest.alembic_revision not in revisions:
        raise BackupError(f"the backup's schema revision {manifest.alembic_revision} is unknown to this version of "
                          "LabCommons (newer software wrote it?)", field="path", code="revision_unknown")
    return manifest


def _require_confirmation(confirmed: bool, engine: Engine) -> None:
    if not confirmed:
        where = engine.url.render_as_string(hide_password=True)
        raise BackupError(f"restore replaces every row of {where}; confirm with --yes", field="yes",
                          code="confirmation_required")


def restore(engine: Engine, path: Path, *, confirmed: bool, progress: Progress | None = None,
            pg_bin: Path | None = None, pages_per_step: int = PAGES_PER_STEP, busy_timeout: float = 30.0
            ) -> RestoreResult:
    """Replace the database behind `engine` by the backup at `path`, check its row counts against the manifest,
    upgrade an older schema, and verify the audit chain.

    Stop the application first: on SQLite its in-flight writes would be lost, on PostgreSQL its locks make the
    restore give up after PG_LOCK_WAIT_SECONDS."""
    path = Path(path)
    report = progress or _noop
    dialect = engine.dialect.name
    manifest = verify_backup(path, dialect=dialect)
    if dialect == "sqlite":
        _require_confirmation(confirmed, engine)
        counts = _restore_sqlite(engine, path, manifest, report, busy_timeout, pages_per_step)
    else:
        counts = _restore_postgresql(engine, path, manifest, report, pg_bin, confirmed)
    # The connections the engine pooled before the restore may hold the old schema in their caches.
    engine.dispose()
    if counts != manifest.tables:
        differing = sorted(n for n in set(counts) | set(manifest.tables) if counts.get(n) != manifest.tables.get(n))
        detail = ", ".join(f"{n}: {counts.get(n)} != {manifest.tables.get(n)}" for n in differing[:10])
        raise BackupError(f"the database WAS replaced, but its row counts differ from the manifest ({detail}); "
                          "restore again from a good backup", code="restore_mismatch")
    head, _ = known_revisions()
    upgraded_from = None
    if manifest.alembic_revision != head:
        from labcommons.migrations import upgrade

        upgrade(engine)
        upgraded_from = manifest.alembic_revision
    audit = verify_audit(engine, report)
    return RestoreResult(manifest=manifest, counts=counts, upgraded_from=upgraded_from, revision=head, audit=audit)


def verify_audit(engine: Engine, progress: Progress | None = None) -> chain.VerifyReport:
    """Verify the audit chain of the database behind `engine` (with this installation's audit key)."""
    from labcommons.audit.models import AuditEntry

    report = progress or _noop
    done = 0
    with Session(engine) as session:
        total = int(session.scalar(select(func.count()).select_from(AuditEntry)) or 0)
        report("verify", 0, total)

        def step(n: int) -> None:
            nonlocal done
            done += n
            report("verify", done, total)

        return chain.verify(session, progress=step)

