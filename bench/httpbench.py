"""Booking throughput through the real server: uvicorn workers, one database, 64 clients POSTing bookings."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from benchdata import DATA, create_database
from labcommons.booking.models import Booking
from labcommons.catalog.models import Instrument, InstrumentStatus, OpenTo
from labcommons.db import Database
from labcommons.identity import service as identity
from labcommons.migrations import upgrade
from labcommons.synthetic import seed_synthetic

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BIN = Path(sys.executable).parent
BOOKING_MINUTES = 60  # every request books one hour, which every synthetic slot grid divides
USERS = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cpu_seconds(pids: list[int]) -> dict[int, float]:
    """User+system CPU seconds of each process, from /proc (absent when gone)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[pid] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _spent(before: dict[int, float], after: dict[int, float]) -> float:
    # Processes started during the run (new pooled connections' backends) count from zero.
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        out.extend(int(c) for c in children)
    return out


def _postgres_pids(database: str = "lc_bench_http") -> list[int]:
    """Backends serving the benchmark database (other sessions' backends are not ours to count)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f" {database} " in (entry / "cmdline").read_text():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def prepare(engine: str, admin_url: str, instruments: int, bookings: int) -> tuple[str, Path, Path]:
    """A fresh database with instruments to book and API tokens: (url, ids file, tokens file)."""
    if engine == "sqlite":
        path = DATA / "lc_bench_http.db"
        DATA.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        url = f"sqlite:///{path}"
    else:
        create_database(admin_url, "lc_bench_http")
        url = make_url(admin_url).set(database="lc_bench_http").render_as_string(hide_password=False)
    db = Database.from_url(url)
    upgrade(db.engine)
    seed_synthetic(db, instruments=instruments, bookings=bookings, seed=11)
    with db.unit_of_work() as s:
        ids = list(s.scalars(
            select(Instrument.id).where(
                Instrument.status == InstrumentStatus.active, Instrument.open_to == OpenTo.everyone,
                Instrument.min_booking_minutes <= BOOKING_MINUTES,
                Instrument.max_booking_minutes >= BOOKING_MINUTES,
            ).order_by(Instrument.id)
        ))
        users = identity.list_users(s)[:USERS]
        tokens = [identity.create_api_token(s, user, name="bench") for user in users]
    db.dispose()
    DATA.mkdir(parents=True, exist_ok=True)
    ids_file, tokens_file = DATA / "http_instruments.txt", DATA / "http_tokens.txt"
    ids_file.write_text("\n".join(map(str, ids)) + "\n")
    tokens_file.write_text("\n".join(tokens) + "\n")
    return url, ids_file, tokens_file


@contextmanager
def server(url: str, workers: int) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`uvicorn labcommons.asgi:app --workers N` on a free port, stopped on exit."""
    port = _free_port()
    # As production runs it: mail and reminders are queued for `labcommons worker` (none runs during the measurement),
    # and the per-caller write limit is off (16 users at 300 writes a minute would cap the run at 80 bookings/s).
    env = {"LABCOMMONS_JOBS_IN_PROCESS": "false", "LABCOMMONS_WRITE_RATE_PER_MINUTE": "0", **os.environ,
           "LABCOMMONS_DATABASE_URL": url}
    log = open(DATA / "http_server.log", "wb")  # noqa: SIM115 - closed below, after the server stops
    # No access log: one log line per request would cost the workers more than some handlers do.
    proc = subprocess.Popen(
        [str(BIN / "uvicorn"), "labcommons.asgi:app", "--host", "127.0.0.1", "--port", str(port),
         "--workers", str(workers), "--no-access-log", "--log-level", "warning"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(base + "/api/v1/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start; see {DATA / 'http_server.log'}")
            time.sleep(0.2)
        time.sleep(1.0)  # every worker finishes its start-up, not only the first to answer
        yield base, proc
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _load(
    client: str, base_url: str, ids: Path, tokens: Path, first_epoch: int, concurrency: int, seconds: int
) -> dict[str, Any]:
    threads = 2
    if client == "wrk":
        cmd = [
            "wrk", f"-t{threads}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "10s",
            "-s", str(HERE / "booking.lua"), base_url, "--", str(ids), str(tokens), str(first_epoch),
            str(threads),
        ]
    else:
        cmd = [sys.executable, str(HERE / "pyload.py"), base_url, str(ids), str(tokens), str(first_epoch),
               str(concurrency), str(seconds)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"load client printed no result:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    result["client_cpu_s"] = round(
        (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2
    )
    if out.stderr.strip():
        result["client_stderr"] = out.stderr.strip()[:500]
    return result


def run(
    engine: str, admin_url: str, *, instruments: int, bookings: int, workers: int, concurrency: int,
    seconds: int, client: str, prepared: tuple[str, Path, Path] | None = None, day: int = 62,
) -> dict[str, Any]:
    """Serve a database (fresh, or `prepared` by `prepare`) and load it with distinct bookings on days `day` (the
    warm-up) and `day + 1`; throughput, latency and CPU shares."""
    if client == "wrk" and shutil.which("wrk") is None:
        print("  wrk not found: falling back to the asyncio client (run `make bench` as root to install wrk)")
        client = "python"
    url, ids, tokens = prepared or prepare(engine, admin_url, instruments, bookings)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    # Beyond the seeded bookings (60 days ahead) and within the booking horizon (90 days); a day for the warm-up
    # and another for the measured run, so no request conflicts.
    warm_epoch = int((today + timedelta(days=day)).timestamp())
    main_epoch = int((today + timedelta(days=day + 1)).timestamp())
    with server(url, workers) as (base_url, proc):
        _load(client, base_url, ids, tokens, warm_epoch, concurrency, 3)
        server_pids = [proc.pid, *_children(proc.pid)]
        pg_pids = _postgres_pids() if engine == "postgresql" else []
        cpu_server, cpu_pg, machine = _cpu_seconds(server_pids), _cpu_seconds(pg_pids), _machine_busy()
        load_before = os.getloadavg()[0]
        result = _load(client, base_url, ids, tokens, main_epoch, concurrency, seconds)
        busy_after, total_after = _machine_busy()
        spent_server = _spent(cpu_server, _cpu_seconds(server_pids))
        spent_pg = _spent(cpu_pg, _cpu_seconds(_postgres_pids())) if engine == "postgresql" else 0.0
    db = Database.from_url(url)
    with db.session() as s:
        stored = int(s.scalar(
            select(func.count()).select_from(Booking)
            .where(Booking.purpose == "bench", Booking.starts_at >= datetime.fromtimestamp(main_epoch, UTC))
        ) or 0)
    db.dispose()
    elapsed = result["duration_us"] / 1e6
    tick = os.sysconf("SC_CLK_TCK")
    result.update(
        engine=engine, client=client, workers=workers, concurrency=concurrency, seconds=seconds,
        instruments=instruments, bookings_per_s=round(result["ok"] / elapsed, 1),
        requests_per_s=round(result["requests"] / elapsed, 1), stored_bookings=stored,
        server_cpu_s=round(spent_server, 2), postgres_cpu_s=round(spent_pg, 2),
        server_cpu_ms_per_booking=round(1000 * spent_server / max(1, result["ok"]), 2),
        machine_busy_pct=round(100 * (busy_after - machine[0]) / max(1, total_after - machine[1]), 1),
        machine_cpu_s=round((busy_after - machine[0]) / tick, 1), loadavg_before=round(load_before, 2),
        p50_ms=round(result["p50_us"] / 1000, 2), p95_ms=round(result["p95_us"] / 1000, 2),
        p99_ms=round(result["p99_us"] / 1000, 2),
    )
    return result
