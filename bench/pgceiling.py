"""The PostgreSQL ceiling for bookings: how many booking INSERTs per second this machine's PostgreSQL accepts with
our real `booking` table and its exclusion constraint, measured with pgbench (PostgreSQL's own load generator), so
the app's HTTP booking rate can be printed beside what the database alone can do.

A scratch database `lc_bench_pgceiling` is built by our migrations (so the table, its indexes, the btree_gist
exclusion constraint and its status predicate are exactly production's) and seeded with the synthetic generator
(10k instruments, 10k bookings by default). Three custom pgbench scripts, each transaction on its own:

- `insert`: one INSERT of a booking, autocommitted.
- `insert+pending`: the booking and its audit record in `audit_pending` (deferred sealing, the app's default on
  PostgreSQL): no shared row, so writers do not queue.
- `insert+audit`: what a booking transaction does at the SQL level at least: INSERT the booking, advance the
  audit chain's single head row (UPDATE audit_head, the lock every audited write takes at commit), INSERT the
  audit entry, COMMIT. The difference between the two is the price of one global serial point.

Every transaction books a different (instrument, hour): a sequence gives n, the instrument is n mod N and the
hour n div N after a base far beyond the seeded bookings, so nothing conflicts and each run measures inserts,
not rejections. Each variant runs with synchronous_commit on (what the app uses) and off (WAL flush skipped).

    .venv/bin/python bench/pgceiling.py                 # 64 clients, 15 s per run
    .venv/bin/python bench/pgceiling.py --seconds 30 --clients 32 --json bench/results/pgceiling.json
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from labcommons.db import Database
from labcommons.migrations import upgrade
from labcommons.synthetic import seed_synthetic

DATABASE = "lc_bench_pgceiling"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# Far beyond the synthetic bookings (seeding day -10 .. +60 days), so benchmark rows never meet seeded ones.
BASE = "2031-01-01 00:00:00+00"
VARIANTS = ("insert", "insert+pending", "insert+audit")
GENESIS = "0" * 64

_BOOKING_INSERT = """\
INSERT INTO booking (instrument_id, user_id, starts_at, ends_at, status, purpose, created_at, kind, cancel_note,
                     no_show)
SELECT {inst_lo} + s.n % {instruments}, CAST(:uid AS integer),
       timestamptz '{base}' + (s.n / {instruments}) * interval '1 hour',
       timestamptz '{base}' + (s.n / {instruments} + 1) * interval '1 hour',
       'confirmed', 'pgbench ceiling', now(), 'use', '', false
FROM (SELECT nextval('pgceiling_slot') AS n) AS s"""

# The head is read FOR UPDATE in the same statement that advances it: under READ COMMITTED the locked read sees
# the latest committed head, so concurrent appends queue on the row exactly as the app's commits do.
_AUDIT_APPEND = """\
WITH old AS (SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE)
UPDATE audit_head AS h
SET seq = old.seq + 1, hash = encode(sha256(convert_to(old.hash || ':' || :booking_id, 'UTF8')), 'hex')
FROM old WHERE h.id = 1
RETURNING h.seq AS head_seq, old.hash AS prev_hash, h.hash AS head_hash \\gset
INSERT INTO audit_entry (seq, at, actor_id, actor_kind, client_ip, action, entity_type, entity_id, region_code,
                         institution_id, facility_id, changes, prev_hash, hash)
VALUES (:head_seq, now(), :uid, 'user', '127.0.0.1', 'booking.created', 'booking', :booking_id, 'CQ', NULL, NULL,
        '{"after":{"status":"confirmed","kind":"use"}}', :prev_hash, :head_hash);"""

_PENDING_INSERT = """\
INSERT INTO audit_pending (at, actor_id, actor_kind, client_ip, action, entity_type, entity_id, region_code,
                           institution_id, facility_id, changes, mac)
VALUES (now(), :uid, 'user', '127.0.0.1', 'booking.created', 'booking', :booking_id, 'CQ', NULL, NULL,
        '{"after":{"status":"confirmed","kind":"use"}}',
        encode(sha256(convert_to(:booking_id::text, 'UTF8')), 'hex'));"""


def _one_line(sql: str) -> str:
    # One line per command keeps the script readable in pgbench's error messages, which quote the failing line.
    return " ".join(part.strip() for part in sql.splitlines())


def pgbench_script(variant: str, *, inst_lo: int, instruments: int, user_lo: int, users: int) -> str:
    """The pgbench script text of one variant for a database whose instrument and user ids are contiguous."""
    insert = _one_line(_BOOKING_INSERT.format(inst_lo=inst_lo, instruments=instruments, base=BASE))
    lines = [f"\\set uid random({user_lo}, {user_lo + users - 1})"]
    if variant == "insert":
        lines.append(insert + ";")
    elif variant == "insert+pending":
        # Deferred sealing (the app's default on PostgreSQL): the entry goes to audit_pending, no shared row.
        lines += ["BEGIN;", insert + " RETURNING id AS booking_id \\gset", _one_line(_PENDING_INSERT), "END;"]
    elif variant == "insert+audit":
        update, _, entry = _AUDIT_APPEND.partition("\\gset\n")
        lines += ["BEGIN;", insert + " RETURNING id AS booking_id \\gset",
                  _one_line(update) + " \\gset", _one_line(entry), "END;"]
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
    return "\n".join(lines) + "\n"


def find_pgbench() -> str:
    """The pgbench executable: on PATH, else in Debian's versioned PostgreSQL directories."""
    found = shutil.which("pgbench") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
                                                        reverse=True)), None)
    if not found:
        raise RuntimeError("pgbench not found: apt-get install -y postgresql-client (or postgresql-contrib)")
    return found


def _database_url(admin_url: str) -> URL:
    return make_url(admin_url).set(database=DATABASE)


def _contiguous_ids(conn: Any, table: str) -> tuple[int, int]:
    lo, hi, count = conn.execute(text(f"SELECT min(id), max(id), count(*) FROM {table}")).one()
    if not count or hi - lo + 1 != count:
        raise RuntimeError(f"{DATABASE}.{table} ids are not contiguous; drop the database to reseed it")
    return int(lo), int(count)


def prepare(admin_url: str, *, instruments: int, bookings: int) -> dict[str, int]:
    """Create (or reuse) the scratch database, remove earlier runs' rows, and return the id ranges."""
    url = _database_url(admin_url)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        exists = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": DATABASE})
    reseed = not exists
    if exists:
        probe = create_engine(url)
        with probe.connect() as conn:
            has_tables = conn.scalar(text("SELECT to_regclass('booking') IS NOT NULL"))
            counts = conn.execute(text(
                "SELECT (SELECT count(*) FROM instrument), (SELECT count(*) FROM booking WHERE starts_at < :base)"
            ), {"base": BASE}).one() if has_tables else (0, 0)
        probe.dispose()
        reseed = tuple(counts) != (instruments, bookings)
    if reseed:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)'))
            conn.execute(text(f'CREATE DATABASE "{DATABASE}"'))
    admin.dispose()
    db = Database.from_url(url.render_as_string(hide_password=False))
    try:
        upgrade(db.engine)
        if reseed:
            seed_synthetic(db, instruments=instruments, bookings=bookings, seed=1)
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM booking WHERE starts_at >= :base"), {"base": BASE})
            conn.execute(text("TRUNCATE audit_entry, audit_pending"))
            conn.execute(text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, :g) "
                              "ON CONFLICT (id) DO UPDATE SET seq = 0, hash = :g"), {"g": GENESIS})
            conn.execute(text("DROP SEQUENCE IF EXISTS pgceiling_slot"))
            conn.execute(text("CREATE SEQUENCE pgceiling_slot MINVALUE 0 START 0"))
            inst_lo, inst_n = _contiguous_ids(conn, "instrument")
            user_lo, user_n = _contiguous_ids(conn, "user_account")
        with db.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE booking, audit_entry, audit_head"))
    finally:
        db.dispose()
    return {"inst_lo": inst_lo, "instruments": inst_n, "user_lo": user_lo, "users": user_n}


def parse_summary(output: str) -> dict[str, float]:
    """tps, average latency, processed and failed transaction counts from pgbench's summary."""
    patterns = {
        "tps": r"^tps = ([\d.]+)",
        "latency_avg_ms": r"^latency average = ([\d.]+) ms",
        "transactions": r"^number of transactions actually processed: (\d+)",
        "failed": r"^number of failed transactions: (\d+)",
    }
    found: dict[str, float] = {}
    for key, pattern in patterns.items():
        match = re.search(pattern, output, re.MULTILINE)
        if match:
            found[key] = float(match.group(1))
    if "tps" not in found:
        raise RuntimeError(f"no tps in pgbench output:\n{output}")
    return found


def latencies_ms(log_dir: Path) -> list[float]:
    """Per-transaction latencies from pgbench's --log files (third field, microseconds; 'failed' is skipped)."""
    values: list[float] = []
    for path in log_dir.glob("pgceiling*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2].isdigit():
                values.append(int(fields[2]) / 1000)
    return values


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The nearest-rank q-th percentile (0 < q <= 100) of already sorted values."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def run_pgbench(admin_url: str, script: str, *, seconds: int, clients: int, threads: int,
                synchronous_commit: str) -> dict[str, Any]:
    """One pgbench run of a script; returns the summary figures and the latency percentiles."""
    url = _database_url(admin_url)
    env = {**os.environ, "PGOPTIONS": f"-c synchronous_commit={synchronous_commit}"}
    if url.password:
        env["PGPASSWORD"] = str(url.password)
    with tempfile.TemporaryDirectory(prefix="pgceiling-") as tmp:
        script_path = Path(tmp) / "booking.sql"
        script_path.write_text(script)
        cmd = [find_pgbench(), "-n", "-M", "prepared", "-c", str(clients), "-j", str(threads), "-T", str(seconds),
               "-f", str(script_path), "-l", "--log-prefix", str(Path(tmp) / "pgceiling"),
               "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U", url.username or "postgres",
               url.database or DATABASE]
        load_before = os.getloadavg()[0]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 120, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pgbench failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        figures: dict[str, Any] = dict(parse_summary(done.stdout))
        lat = sorted(latencies_ms(Path(tmp)))
    figures.update({
        "p50_ms": percentile(lat, 50), "p95_ms": percentile(lat, 95), "p99_ms": percentile(lat, 99),
        "max_ms": lat[-1] if lat else None, "logged": len(lat),
        "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
    })
    return figures


def run(*, admin_url: str, seconds: int, clients: int, threads: int = 2, instruments: int = 10_000,
        bookings: int = 10_000, variants: tuple[str, ...] = VARIANTS,
        synchronous_commits: tuple[str, ...] = ("on", "off")) -> dict[str, Any]:
    """Measure every variant at every synchronous_commit setting; `ceiling_bookings_per_s` is insert at 'on'."""
    ids = prepare(admin_url, instruments=instruments, bookings=bookings)  # seeds on the first use
    version = subprocess.run([find_pgbench(), "--version"], capture_output=True, text=True, check=True).stdout
    runs: list[dict[str, Any]] = []
    for variant in variants:
        for sync in synchronous_commits:
            ids = prepare(admin_url, instruments=instruments, bookings=bookings)  # each run from the same table
            script = pgbench_script(variant, **ids)
            figures = run_pgbench(admin_url, script, seconds=seconds, clients=clients, threads=threads,
                                  synchronous_commit=sync)
            runs.append({"variant": variant, "synchronous_commit": sync, **figures})
    ceiling = next((r["tps"] for r in runs if r["variant"] == "insert" and r["synchronous_commit"] == "on"), None)
    return {
        "tool": version.strip(), "database": DATABASE, "clients": clients, "threads": threads, "seconds": seconds,
        "instruments": ids["instruments"], "seeded_bookings": bookings, "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "ceiling_bookings_per_s": ceiling, "runs": runs,
    }


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def table(result: dict[str, Any]) -> str:
    """The runs as a small plain-text table."""
    head = f"{'variant':<14} {'sync':<4} {'tps':>9} {'avg ms':>8} {'p50':>7} {'p95':>7} {'p99':>7} {'failed':>6} load"
    lines = [f"{result['tool']}: -c {result['clients']} -j {result['threads']} -T {result['seconds']}, "
             f"{result['instruments']:,} instruments, {result['cpus']} CPUs, {result['date']}", head]
    for r in result["runs"]:
        lines.append(f"{r['variant']:<14} {r['synchronous_commit']:<4} {r['tps']:>9,.0f} "
                     f"{_ms(r.get('latency_avg_ms')):>8} {_ms(r['p50_ms']):>7} {_ms(r['p95_ms']):>7} "
                     f"{_ms(r['p99_ms']):>7} {int(r.get('failed', 0)):>6} {r['load_before']}→{r['load_after']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print the table (and write JSON with --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--admin-url", default=os.environ.get("LABCOMMONS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--sync", default="on,off", help="synchronous_commit values to run, comma-separated")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    result = run(admin_url=args.admin_url, seconds=args.seconds, clients=args.clients, threads=args.threads,
                 variants=tuple(args.variants.split(",")), synchronous_commits=tuple(args.sync.split(",")))
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
