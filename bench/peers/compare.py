"""LabCommons beside Indico's room booking, in one run on one machine: booking throughput and latency under the
same load generator (wrk, one Lua script per system, every request a different (room, hour) so nothing
conflicts), the same number of rooms/instruments, the same time grid and the same number of server processes;
then the race test (K clients on one slot, many trials) on both.

The two systems are served one after the other, never at once. `python bench/peers/compare.py [--quick]` runs it
alone; bench/run.py calls `run(...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent
for _path in (str(BENCH), str(HERE)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import indico as peer  # noqa: E402
import race  # noqa: E402

import httpbench  # noqa: E402 - after the path set-up above
from benchdata import DATA  # noqa: E402

DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
RACE_CLIENTS = (2, 10)
USERS = 16  # as many booking users as httpbench gives LabCommons
WRK_THREADS = 2
# Both systems book the same grid: request k takes room/instrument k mod n at hour k div n after a UTC midnight,
# a different day for the warm-up and the measured run, inside LabCommons' default 90-day booking horizon.
WARM_DAYS_AHEAD, MAIN_DAYS_AHEAD = 20, 40
LABCOMMONS_DATABASE = "lc_bench_http"  # the name httpbench.prepare uses


def _epoch(days_ahead: int) -> int:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return int((today + timedelta(days=days_ahead)).timestamp())


def wrk(script: Path, base_url: str, args: list[str], *, concurrency: int, seconds: int) -> dict[str, Any]:
    """Run wrk with a booking script; the script's RESULT line as a dict (counts, latency percentiles in µs)."""
    cmd = ["wrk", f"-t{WRK_THREADS}", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script),
           base_url, "--", *args, str(WRK_THREADS)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, check=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result:\n{out.stdout}\n{out.stderr}")
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    if out.stderr.strip():
        result["client_stderr"] = out.stderr.strip()[:500]
    return result


def _drain(count_stored: Callable[[int], int], epoch: int, pids: list[int], *, timeout: float = 120.0,
           idle_timeout: float = 30.0) -> float:
    """Wait until the server has stored the last booking of the run that started at `epoch`, then until it is
    idle (work deferred past the response, such as LabCommons' audit sealing, is part of a booking's cost);
    seconds waited.

    wrk stops without waiting for its in-flight requests, and a slow server still works through them; the next
    run would otherwise start behind that backlog.
    """
    started = time.monotonic()
    last, stable = count_stored(epoch), 0
    while time.monotonic() - started < timeout and stable < 3:
        time.sleep(0.5)
        now = count_stored(epoch)
        stable = stable + 1 if now == last else 0
        last = now
    idle_from = time.monotonic()
    before = httpbench._cpu_seconds(pids)
    while time.monotonic() - idle_from < idle_timeout:
        time.sleep(0.5)
        after = httpbench._cpu_seconds(pids)
        if httpbench._spent(before, after) < 0.025:  # under 5 % of a core
            break
        before = after
    return round(time.monotonic() - started, 1)


def _idle_cores(pids: list[int], seconds: float = 2.0) -> float:
    """CPU the server spends (in cores) once drained; near 0 unless it burns CPU when idle (then the per-booking
    figures include that too)."""
    before = httpbench._cpu_seconds(pids)
    time.sleep(seconds)
    return round(httpbench._spent(before, httpbench._cpu_seconds(pids)) / seconds, 3)


def _measure(
    script: Path, base_url: str, args_for: Callable[[int], list[str]], server_pids: list[int], database: str,
    count_stored: Callable[[int], int], *, concurrency: int, seconds: int, warm_seconds: int,
) -> dict[str, Any]:
    """Warm up, then load for `seconds`; wrk's figures plus the CPU the server and its PostgreSQL backends spent
    per stored booking, from the start of the run until the server is idle again (wrk stops without waiting for
    its in-flight requests, which the server still completes and stores).
    """
    wrk(script, base_url, args_for(_epoch(WARM_DAYS_AHEAD)), concurrency=concurrency, seconds=warm_seconds)
    pids = [p for pid in server_pids for p in (pid, *httpbench._children(pid))]
    drained_warm = _drain(count_stored, _epoch(WARM_DAYS_AHEAD), pids)
    idle = _idle_cores(pids)
    cpu_server = httpbench._cpu_seconds(pids)
    cpu_pg = httpbench._cpu_seconds(httpbench._postgres_pids(database))
    result = wrk(script, base_url, args_for(_epoch(MAIN_DAYS_AHEAD)), concurrency=concurrency, seconds=seconds)
    drained_run = _drain(count_stored, _epoch(MAIN_DAYS_AHEAD), pids)
    spent_server = httpbench._spent(cpu_server, httpbench._cpu_seconds(pids))
    spent_pg = httpbench._spent(cpu_pg, httpbench._cpu_seconds(httpbench._postgres_pids(database)))
    stored = count_stored(_epoch(MAIN_DAYS_AHEAD))
    elapsed = result["duration_us"] / 1e6
    result.update(
        bookings_per_s=round(result["ok"] / elapsed, 1), p50_ms=round(result["p50_us"] / 1000, 1),
        p95_ms=round(result["p95_us"] / 1000, 1), p99_ms=round(result["p99_us"] / 1000, 1),
        non_2xx=result["conflict"] + result["other"], stored_bookings=stored,
        server_cpu_ms_per_booking=round(1000 * spent_server / max(1, stored), 2),
        postgres_cpu_ms_per_booking=round(1000 * spent_pg / max(1, stored), 2),
        drain_s={"after_warm_up": drained_warm, "after_run": drained_run}, idle_server_cores=idle,
    )
    return result


@contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _labcommons(admin_url: str, *, rooms: int, workers: int, concurrency: int, seconds: int, warm_seconds: int,
                trials: int) -> dict[str, Any]:
    from sqlalchemy import func, select

    from labcommons.booking.models import Booking
    from labcommons.db import Database

    print(f"== LabCommons: PostgreSQL, {workers} uvicorn workers, {rooms} instruments", flush=True)
    # Twice as many as needed: httpbench keeps only instruments open to everyone that take one-hour bookings.
    url, ids_file, tokens_file = httpbench.prepare("postgresql", admin_url, rooms * 2, 0)
    ids = [int(x) for x in ids_file.read_text().split()][:rooms]
    if len(ids) < rooms:
        raise RuntimeError(f"only {len(ids)} bookable instruments seeded, {rooms} wanted")
    tokens = tokens_file.read_text().split()
    used = DATA / "peer_instruments.txt"
    used.write_text("\n".join(map(str, ids)) + "\n")
    db = Database.from_url(url)

    def count_stored(epoch: int) -> int:
        # Bench bookings from `epoch` on (the warm-up's day lies before the measured run's).
        with db.session() as s:
            return int(s.scalar(
                select(func.count()).select_from(Booking).where(
                    Booking.purpose == "bench", Booking.starts_at >= datetime.fromtimestamp(epoch, UTC))
            ) or 0)

    # The server inherits the environment: the write rate limit (per user per minute) off for the benchmark.
    with _env("LABCOMMONS_WRITE_RATE_PER_MINUTE", "0"), httpbench.server(url, workers) as (base, proc):
        result = _measure(
            BENCH / "booking.lua", base, lambda epoch: [str(used), str(tokens_file), str(epoch)],
            [proc.pid], LABCOMMONS_DATABASE, count_stored, concurrency=concurrency, seconds=seconds,
            warm_seconds=warm_seconds)
        print(f"  {result['bookings_per_s']} bookings/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms",
              flush=True)
        result["race"] = race.run_all(
            lambda k: race.labcommons_target(base, url, ids[0], tokens, race.race_epoch(race.RACE_DAYS_AHEAD, k)),
            list(RACE_CLIENTS), trials)
    db.dispose()
    result.update(system="LabCommons", server=f"uvicorn --workers {workers}", rooms=len(ids))
    return result


def _indico(admin_url: str, *, rooms: int, workers: int, concurrency: int, seconds: int, warm_seconds: int,
            trials: int) -> dict[str, Any]:
    print(f"== Indico {peer.VERSION} room booking: PostgreSQL, uWSGI {workers} processes, {rooms} rooms", flush=True)
    conf, port, seeded = peer.setup(admin_url, rooms=rooms, users=USERS)
    rooms_file, tokens_file = DATA / "peer_indico_rooms.txt", DATA / "peer_indico_tokens.txt"
    DATA.mkdir(parents=True, exist_ok=True)
    rooms_file.write_text("\n".join(map(str, seeded.rooms)) + "\n")
    tokens_file.write_text("".join(f"{user} {token}\n" for user, token in seeded.tokens))
    def count_stored(epoch: int) -> int:
        # Reservation state 2 is "accepted"; Indico keeps naive UTC times here.
        start = datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
        with peer.connect(admin_url) as conn:
            row = conn.execute("SELECT count(*) FROM roombooking.reservations WHERE booking_reason = 'bench' "
                               "AND start_dt >= %s AND state = 2", (start,)).fetchone()
        return int(row[0]) if row else 0

    with peer.serve(conf, port, workers) as (base, proc):
        result = _measure(
            HERE / "indico_booking.lua", base, lambda epoch: [str(rooms_file), str(tokens_file), str(epoch)],
            [proc.pid], peer.DATABASE, count_stored, concurrency=concurrency, seconds=seconds,
            warm_seconds=warm_seconds)
        print(f"  {result['bookings_per_s']} bookings/s, p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms",
              flush=True)
        result["race"] = race.run_all(
            lambda k: race.indico_target(base, admin_url, seeded.rooms[0], seeded.tokens,
                                         race.race_epoch(race.RACE_DAYS_AHEAD, k)),
            list(RACE_CLIENTS), trials)
    result.update(system=f"Indico {peer.VERSION}", server=f"uWSGI --processes {workers}", rooms=len(seeded.rooms))
    return result


def run(*, admin_url: str, seconds: int, concurrency: int, workers: int, trials: int, quick: bool) -> dict[str, Any]:
    """Both systems under the same load and the same race; a dict with both results, printed side by side."""
    rooms = 50 if quick else 200
    warm_seconds = 2 if quick else 3
    started = time.perf_counter()
    out: dict[str, Any] = {
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(),
                    "date": datetime.now(UTC).isoformat(timespec="seconds"), "loadavg_start": os.getloadavg()},
        "config": {"seconds": seconds, "concurrency": concurrency, "workers": workers, "trials": trials,
                   "rooms": rooms, "warm_seconds": warm_seconds, "client": f"wrk -t{WRK_THREADS}",
                   "race_clients": list(RACE_CLIENTS)},
    }
    if shutil.which("wrk") is None:
        reason = "wrk not found (apt-get install -y wrk)"
        out["labcommons"] = {"unavailable": reason}
        out["peer"] = {"unavailable": reason}
    else:
        sizes = dict(rooms=rooms, workers=workers, concurrency=concurrency, seconds=seconds,
                     warm_seconds=warm_seconds, trials=trials)
        out["labcommons"] = _labcommons(admin_url, **sizes)
        try:
            out["peer"] = _indico(admin_url, **sizes)
        except peer.PeerUnavailable as exc:
            out["peer"] = {"unavailable": str(exc)}
        except Exception as exc:  # the peer failing must not sink the rest of the benchmark
            out["peer"] = {"unavailable": f"{type(exc).__name__}: {exc}"}
    out["machine"]["loadavg_end"] = os.getloadavg()
    out["seconds"] = round(time.perf_counter() - started, 1)
    print()
    print(table(out))
    return out


def _race_cell(result: dict[str, Any], k: int) -> str:
    r = next((x for x in result.get("race", []) if x["clients"] == k), None)
    if r is None:
        return "-"
    return f"{r['double_booked_trials']}/{r['trials']} (max {r['max_accepted']})"


def table(out: dict[str, Any]) -> str:
    """Ours, the peer's and the ratio ours/peer, one figure a row."""
    ours, theirs = out["labcommons"], out["peer"]
    load = out["machine"]["loadavg_start"][0]
    lines = [
        f"LabCommons vs Indico room booking - same machine ({out['machine']['nproc']} cores shared by the app, "
        "PostgreSQL and wrk; the systems run one after the other),",
        f"  {out['config']['workers']} server processes each, {out['config']['concurrency']} wrk connections, "
        f"{out['config']['seconds']} s after a {out['config']['warm_seconds']} s warm-up, {out['config']['rooms']} "
        f"rooms = instruments, one-hour bookings on the same grid; load average at start {load:.1f}",
    ]
    if "unavailable" in ours:
        lines.append(f"LabCommons unavailable: {ours['unavailable']}")
        return "\n".join(lines)
    rows: list[tuple[str, str]] = [
        ("bookings/s", "bookings_per_s"), ("latency p50 (ms)", "p50_ms"),
        ("latency p95 (ms)", "p95_ms"), ("latency p99 (ms)", "p99_ms"),
        ("non-2xx responses", "non_2xx"), ("socket errors", "socket_errors"),
        ("bookings stored by the run", "stored_bookings"),
        ("server CPU ms per booking", "server_cpu_ms_per_booking"),
        ("PostgreSQL CPU ms per booking", "postgres_cpu_ms_per_booking"),
        ("idle server CPU (cores)", "idle_server_cores"),
    ]
    peer_name = theirs.get("system", "Indico")
    lines += ["  (ours/peer: above 1 is better for bookings/s, below 1 is better for latency and CPU)",
              f"{'figure':<34} {'LabCommons':>14} {peer_name:>14} {'ours/peer':>10}", "-" * 76]
    available = "unavailable" not in theirs
    for label, key in rows:
        mine = ours[key]
        other = theirs[key] if available else None
        ratio = f"{mine / other:.2f}" if isinstance(other, int | float) and other else "-"
        lines.append(f"{label:<34} {mine:>14} {other if other is not None else '-':>14} {ratio:>10}")
    for k in RACE_CLIENTS:
        lines.append(f"{f'race K={k}: double-booked trials':<34} {_race_cell(ours, k):>14} "
                     f"{_race_cell(theirs, k) if available else '-':>14} {'':>10}")
    if not available:
        lines.append(f"peer unavailable: {theirs['unavailable']}")
    lines.append("Indico does more per booking (permission checks, occurrences, notification e-mails queued to "
                 "Celery); see docs/performance.md.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--admin-url", default=os.environ.get("LABCOMMONS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    p.add_argument("--seconds", type=int, default=None, help="measured seconds per system (20; quick 5)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--trials", type=int, default=None, help="race trials per K (50; quick 10)")
    p.add_argument("--quick", action="store_true", help="50 rooms, 5 s, 10 trials unless given")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (5 if args.quick else 20)
    trials = args.trials if args.trials is not None else (10 if args.quick else 50)
    out = run(admin_url=args.admin_url, seconds=seconds, concurrency=args.concurrency, workers=args.workers,
              trials=trials, quick=args.quick)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
