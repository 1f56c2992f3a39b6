"""Indico's room booking as the benchmark's peer: installed into its own virtual environment at bench time,
configured, seeded and served by uWSGI the way Indico's production guide does (never vendored).

Steps (each with a timeout, each safe to re-run): `install` (bench/.peers/indico/venv, reused when the version
matches), `configure` (indico.conf and logging.yaml written by hand: the setup wizard is interactive),
`prepare_database` (its own PostgreSQL database with unaccent and pg_trgm, `indico db prepare`), `seed` (admin
user 1, bench users with personal tokens, one location and N rooms; earlier bookings removed) and `serve` (a
context manager running uWSGI with N worker processes on a free port).

`python bench/peers/indico.py [ROOMS]` does all of it and books one room once as a smoke test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy.engine import URL, make_url

HERE = Path(__file__).resolve().parent
HOME = HERE.parent / ".peers" / "indico"  # gitignored: the peer is installed here, never committed
VENV = HOME / "venv"
VERSION = "3.2.9"  # the last release running on Python 3.11 (3.3 needs 3.12)
REQUIREMENTS = [f"indico=={VERSION}", "setuptools<70", "pyuwsgi"]
DATABASE = "lc_peer_indico"
REDIS_URL = "redis://127.0.0.1:6379/7"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


class PeerUnavailable(RuntimeError):
    """The peer could not be installed, prepared or started; the message says why."""


@dataclass(frozen=True)
class Seeded:
    rooms: list[int]
    tokens: list[tuple[int, str]]  # (user id, personal token) of ordinary users
    admin: tuple[int, str]


def log(message: str) -> None:
    """One progress line, timestamped."""
    print(f"  [indico {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _run(cmd: list[str], *, timeout: float, what: str, env: dict[str, str] | None = None) -> str:
    started = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{what} took more than {timeout:.0f} s") from exc
    except OSError as exc:
        raise PeerUnavailable(f"{what}: {exc}") from exc
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-5:]
        raise PeerUnavailable(f"{what} failed (exit {out.returncode}): {' | '.join(tail)}")
    log(f"{what}: done in {time.monotonic() - started:.1f} s")
    return out.stdout


def _python() -> str:
    # The machine's Python 3.11: Indico 3.2 does not run on newer ones, and LabCommons' venv may differ.
    for name in ("python3.11", "python3"):
        path = shutil.which(name)
        if path:
            return path
    raise PeerUnavailable("no python3.11 on PATH")


def installed_version() -> str | None:
    """Indico's version in the peer venv, or None when it is not installed there."""
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('indico'))"],
                         capture_output=True, text=True, timeout=60, check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def install(*, timeout: float = 900) -> str:
    """Install Indico and pyuwsgi into bench/.peers/indico/venv unless that version is already there."""
    if installed_version() == VERSION and (VENV / "bin" / "uwsgi").exists():
        log(f"reusing Indico {VERSION} in {VENV}")
        return VERSION
    log(f"installing Indico {VERSION} into {VENV} (a few minutes the first time)")
    HOME.mkdir(parents=True, exist_ok=True)
    if VENV.exists():
        shutil.rmtree(VENV)
    _run([_python(), "-m", "venv", str(VENV)], timeout=120, what="create venv")
    _run([str(VENV / "bin" / "pip"), "install", "-q", *REQUIREMENTS], timeout=timeout, what="pip install indico")
    version = installed_version()
    if version != VERSION:
        raise PeerUnavailable(f"pip installed indico {version}, expected {VERSION}")
    return version


def _admin_url(admin_url: str) -> URL:
    return make_url(admin_url)


def database_uri(admin_url: str) -> str:
    """The peer's database as Indico's SQLAlchemy 1.4 wants it (psycopg2 driver, same server and role)."""
    url = _admin_url(admin_url).set(drivername="postgresql", database=DATABASE)
    return url.render_as_string(hide_password=False)


def _libpq(admin_url: str, database: str) -> str:
    url = _admin_url(admin_url)
    parts = [f"host={url.host or '127.0.0.1'}", f"port={url.port or 5432}", f"user={url.username or 'postgres'}",
             f"dbname={database}"]
    if url.password:
        parts.append(f"password={url.password}")
    return " ".join(parts)


def connect(admin_url: str) -> psycopg.Connection[tuple[Any, ...]]:
    """A connection to the peer's database (read its bookings with it)."""
    return psycopg.connect(_libpq(admin_url, DATABASE), autocommit=True, connect_timeout=10)


def configure(port: int, admin_url: str) -> Path:
    """Write indico.conf (BASE_URL must be the address clients call, else every request is 404)."""
    for sub in ("etc", "log", "cache", "tmp", "archive"):
        (HOME / sub).mkdir(parents=True, exist_ok=True)
    key_file = HOME / "etc" / "secret_key"
    if not key_file.exists():
        key_file.write_text(secrets.token_hex(32))
    conf = HOME / "etc" / "indico.conf"
    conf.write_text(
        "# Written by bench/peers/indico.py on every start; edits are lost.\n"
        f"SQLALCHEMY_DATABASE_URI = {database_uri(admin_url)!r}\n"
        f"SECRET_KEY = {key_file.read_text().strip()!r}\n"
        f"BASE_URL = 'http://127.0.0.1:{port}'\n"
        f"CELERY_BROKER = {REDIS_URL!r}\n"
        f"REDIS_CACHE_URL = {REDIS_URL!r}\n"
        "DEFAULT_TIMEZONE = 'UTC'\n"
        "DEFAULT_LOCALE = 'en_GB'\n"
        "ENABLE_ROOMBOOKING = True\n"
        f"CACHE_DIR = {str(HOME / 'cache')!r}\n"
        f"TEMP_DIR = {str(HOME / 'tmp')!r}\n"
        f"LOG_DIR = {str(HOME / 'log')!r}\n"
        f"STORAGE_BACKENDS = {{'default': 'fs:{HOME / 'archive'}'}}\n"
        "ATTACHMENT_STORAGE = 'default'\n"
        # Mail goes to the Celery queue in Redis (Indico's production default) and no Celery worker runs, so
        # nothing is sent; port 9 (discard) makes sure a synchronous send could not reach a real server.
        "SMTP_SERVER = ('127.0.0.1', 9)\n"
        "SMTP_USE_CELERY = True\n"
        "SMTP_TIMEOUT = 2\n"
        "NO_REPLY_EMAIL = 'noreply@peer.invalid'\n"
        "SUPPORT_EMAIL = 'support@peer.invalid'\n"
        "DISABLE_CELERY_CHECK = True\n"
        "LOCAL_REGISTRATION = False\n"
        "SYSTEM_NOTICES_URL = None\n"
        "COMMUNITY_HUB_URL = None\n"
    )
    # Indico's sample logging config also mails errors; warnings to a file are enough here.
    (HOME / "etc" / "logging.yaml").write_text(
        "version: 1\n"
        "root: {level: WARNING, handlers: [file]}\n"
        "handlers:\n"
        "  file: {class: logging.FileHandler, filename: indico.log, formatter: simple}\n"
        "formatters:\n"
        "  simple: {format: '%(asctime)s %(levelname)-7s %(name)-25s %(message)s'}\n"
    )
    return conf


def _env(conf: Path) -> dict[str, str]:
    return {**os.environ, "INDICO_CONFIG": str(conf)}


def _database_ready(admin_url: str) -> bool:
    try:
        with connect(admin_url) as conn:
            row = conn.execute("SELECT to_regclass('roombooking.rooms') IS NOT NULL").fetchone()
            return bool(row and row[0])
    except psycopg.OperationalError:
        return False


def prepare_database(conf: Path, admin_url: str, *, fresh: bool = False) -> None:
    """Create the peer's database and Indico's schema, unless a prepared one exists (or `fresh`)."""
    state = HOME / "database.json"
    recorded = json.loads(state.read_text()) if state.exists() else {}
    if not fresh and recorded.get("version") == VERSION and _database_ready(admin_url):
        log(f"reusing database {DATABASE}")
        return
    log(f"creating database {DATABASE}")
    state.unlink(missing_ok=True)
    try:
        with psycopg.connect(_libpq(admin_url, make_url(admin_url).database or "postgres"), autocommit=True,
                             connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
            admin.execute(f'CREATE DATABASE "{DATABASE}"')
        with connect(admin_url) as conn:
            conn.execute("CREATE EXTENSION IF NOT EXISTS unaccent")
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except psycopg.Error as exc:
        raise PeerUnavailable(f"cannot create database {DATABASE}: {exc}") from exc
    _run([str(VENV / "bin" / "indico"), "db", "prepare"], timeout=300, what="indico db prepare", env=_env(conf))
    state.write_text(json.dumps({"version": VERSION, "prepared": datetime.now(UTC).isoformat()}))


def seed(conf: Path, rooms: int, users: int) -> Seeded:
    """Admin user 1, `users` ordinary users with tokens and `rooms` public rooms; earlier bookings removed."""
    # -I: the script's own directory must not come first on sys.path, where this file would shadow `indico`.
    out = _run([str(VENV / "bin" / "python"), "-I", str(HERE / "indico_seed.py"), str(rooms), str(users)],
               timeout=300, what=f"seed {rooms} rooms, {users} users", env=_env(conf))
    line = next((x for x in out.splitlines() if x.startswith("SEED ")), None)
    if line is None:
        raise PeerUnavailable(f"seed printed no result: {out[-300:]}")
    data = json.loads(line[len("SEED "):])
    return Seeded(rooms=[int(r) for r in data["rooms"]],
                  tokens=[(int(u), str(t)) for u, t in data["tokens"]],
                  admin=(int(data["admin"][0]), str(data["admin"][1])))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def setup(admin_url: str, *, rooms: int, users: int, fresh: bool = False) -> tuple[Path, int, Seeded]:
    """Install (or reuse), configure for a free port, prepare the database and seed: (config, port, seeded)."""
    install()
    port = _free_port()
    conf = configure(port, admin_url)
    prepare_database(conf, admin_url, fresh=fresh)
    return conf, port, seed(conf, rooms, users)


def uwsgi_command(port: int, workers: int) -> list[str]:
    """uWSGI as Indico's production guide configures it, with an HTTP front instead of nginx's uwsgi_pass.

    The guide's ini: master, `processes` workers with one thread each (`enable-threads` only lets Indico's
    own threads run), single interpreter, no request log, buffer-size 20480, max-requests 2500. The embedded
    HTTP router with keep-alive stands in for nginx so that wrk's 64 connections are multiplexed onto the
    workers the way nginx would do it.
    """
    return [
        str(VENV / "bin" / "uwsgi"), "--master", "--http", f"127.0.0.1:{port}", "--http-keepalive",
        "--processes", str(workers), "--enable-threads", "--single-interpreter", "--disable-logging",
        "--buffer-size", "20480", "--max-requests", "2500", "--harakiri", "900", "--need-app",
        "--die-on-term", "--listen", "1024",
        "--wsgi-file", str(VENV / "lib" / "python3.11" / "site-packages" / "indico" / "web" / "indico.wsgi"),
    ]


def _ready(base: str) -> bool:
    # Any answer from the application (even 404) means a worker has loaded Indico; the router alone gives 502.
    try:
        with urllib.request.urlopen(base + "/rooms/api/locations", timeout=5) as response:
            return int(response.status) < 500
    except urllib.error.HTTPError as exc:
        return int(exc.code) < 500
    except OSError:
        return False


@contextmanager
def serve(
    conf: Path, port: int, workers: int, *, timeout: float = 120
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """uWSGI serving Indico on `port` with `workers` processes: (base URL, master process), stopped on exit."""
    log_path = HOME / "log" / "uwsgi.log"
    log(f"starting uWSGI with {workers} worker processes on port {port}")
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(uwsgi_command(port, workers), env=_env(conf), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=HOME)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while not _ready(base):
                if proc.poll() is not None:
                    raise PeerUnavailable(f"uWSGI exited with {proc.returncode}; see {log_path}")
                if time.monotonic() > deadline:
                    raise PeerUnavailable(f"uWSGI did not answer within {timeout:.0f} s; see {log_path}")
                time.sleep(0.5)
            # Workers load the app after fork; ask enough times that each has answered once.
            for _ in range(4 * workers):
                _ready(base)
            log(f"serving at {base}")
            yield base, proc
        finally:
            if proc.poll() is None:
                # SIGINT stops uWSGI's master and workers at once (SIGTERM with die-on-term does as well).
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            log("uWSGI stopped")


def book(base: str, token: str, user_id: int, room_id: int, start: datetime, hours: int = 1) -> tuple[int, str]:
    """One booking through Indico's room-booking API: (HTTP status, body). An overlap answers 418."""
    body = json.dumps({
        "start_dt": start.strftime("%Y-%m-%dT%H:%M:%S"),
        "end_dt": (start + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%S"),
        "repeat_frequency": "NEVER", "repeat_interval": 0, "room_id": room_id, "reason": "bench",
        "user": f"User:{user_id}",
    }).encode()
    request = urllib.request.Request(base + "/rooms/api/booking/create", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def main(argv: list[str]) -> int:
    rooms = int(argv[0]) if argv else 10
    admin_url = os.environ.get("LABCOMMONS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    try:
        conf, port, seeded = setup(admin_url, rooms=rooms, users=4)
        with serve(conf, port, workers=2) as (base, _):
            start = (datetime.now(UTC) + timedelta(days=30)).replace(hour=10, minute=0, second=0, microsecond=0,
                                                                    tzinfo=None)
            user_id, token = seeded.tokens[0]
            first = book(base, token, user_id, seeded.rooms[0], start)
            again = book(base, token, user_id, seeded.rooms[0], start)
            log(f"booking: {first[0]}; the same slot again: {again[0]} (expected 200 then 418)")
            if first[0] != 200 or again[0] != 418:
                log(f"bodies: {first[1][:300]} | {again[1][:300]}")
                return 1
    except PeerUnavailable as exc:
        log(f"peer unavailable: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
