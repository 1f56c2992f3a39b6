"""`make bench`: booking throughput over HTTP, earliest-slot and search latency, the statistics dashboard over a
million bookings; prints each figure beside its target and writes bench/results/latest.json.

Sizes come from flags or LC_BENCH_* variables (`--help` lists them); `--quick` is a small smoke run.
Seeded databases are kept (PostgreSQL `lc_bench_*`, SQLite files in bench/results/data/) and reused while
their size matches and they are younger than --max-age-days.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchdata  # noqa: E402 - after the path set-up above
import dashboard  # noqa: E402
import httpbench  # noqa: E402
import memory  # noqa: E402
import pgceiling  # noqa: E402
import workloads  # noqa: E402

TARGETS = {"bookings_per_s": 1500.0, "booking_p99_ms": 50.0, "earliest_p95_ms": 50.0, "search_p95_ms": 30.0,
           "peer_ratio": 20.0}
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def _env(name: str, default: Any) -> Any:
    value = os.environ.get(f"LC_BENCH_{name.upper()}")
    if value is None:
        return default
    return type(default)(value) if not isinstance(default, bool) else value.lower() in ("1", "true", "yes")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=_env("only", "ceiling,http,peer,earliest,search,dashboard,memory"),
                   help="comma-separated parts: ceiling (pgbench), http, peer (Indico side by side), earliest, "
                        "search, dashboard, memory (LC_BENCH_ONLY)")
    p.add_argument("--engines", default=_env("engines", "postgresql,sqlite"), help="LC_BENCH_ENGINES")
    p.add_argument("--admin-url", default=os.environ.get("LABCOMMONS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    p.add_argument("--quick", action="store_true", default=_env("quick", False),
                   help="small sizes and short runs (LC_BENCH_QUICK=1)")
    p.add_argument("--fresh", action="store_true", default=_env("fresh", False),
                   help="reseed even if reusable")
    p.add_argument("--max-age-days", type=float, default=_env("max_age_days", 7.0))
    p.add_argument("--http-instruments", type=int, default=_env("http_instruments", 10_000))
    p.add_argument("--http-bookings", type=int, default=_env("http_bookings", 10_000))
    p.add_argument("--http-seconds", type=int, default=_env("http_seconds", 20))
    p.add_argument("--http-workers", default=_env("http_workers", "1,2,4"),
                   help="server worker processes to measure, comma-separated")
    p.add_argument("--ceiling-seconds", type=int, default=_env("ceiling_seconds", 15))
    p.add_argument("--peer-seconds", type=int, default=_env("peer_seconds", 20))
    p.add_argument("--peer-workers", type=int, default=_env("peer_workers", 2))
    p.add_argument("--race-trials", type=int, default=_env("race_trials", 50))
    p.add_argument("--memory-seconds", type=float, default=_env("memory_seconds", 30.0))
    p.add_argument("--memory-workers", type=int, default=_env("memory_workers", 2))
    p.add_argument("--concurrency", type=int, default=_env("concurrency", 64))
    p.add_argument("--client", choices=["wrk", "python", "both"], default=_env("client", "wrk"),
                   help="load generator; 'both' also runs the asyncio client to show which one limits")
    p.add_argument("--earliest-instruments", type=int, default=_env("earliest_instruments", 100_000))
    p.add_argument("--earliest-bookings", type=int, default=_env("earliest_bookings", 1_000_000))
    p.add_argument("--queries", type=int, default=_env("queries", 84), help="queries per mix")
    p.add_argument("--repeat", type=int, default=_env("repeat", 1), help="measured passes over each mix")
    p.add_argument("--budget", type=float, default=_env("budget", 60.0),
                   help="seconds at most per mix, warm-up and measurement each (LC_BENCH_BUDGET)")
    p.add_argument("--search-sizes", default=_env("search_sizes", "100000,1000000"),
                   help="instrument counts for the search benchmark")
    p.add_argument("--dashboard-instruments", type=int, default=_env("dashboard_instruments", 100_000))
    p.add_argument("--dashboard-bookings", type=int, default=_env("dashboard_bookings", 1_000_000),
                   help="the dashboard's dataset (the earliest-slot one at the default sizes)")
    p.add_argument("--dashboard-repeat", type=int, default=_env("dashboard_repeat", 7),
                   help="timed calls per dashboard, after one warm-up call")
    p.add_argument("--dashboard-budget", type=float, default=_env("dashboard_budget", 20.0),
                   help="seconds per dashboard after which fewer calls are timed (at least 3)")
    p.add_argument("--dashboard-changes", type=int, default=_env("dashboard_changes", 100),
                   help="bookings changed through the ORM before timing the statistics refresh")
    p.add_argument("--dashboard-http", action=argparse.BooleanOptionalAction, default=_env("dashboard_http", True),
                   help="also time GET /api/v1/stats/dashboard and GET /stats through a server")
    p.add_argument("--rebuild-stats", action="store_true", default=_env("rebuild_stats", False),
                   help="rebuild the statistics even if the reused dataset has them")
    args = p.parse_args(argv)
    if args.quick:
        args.dashboard_instruments, args.dashboard_bookings, args.dashboard_repeat = 2_000, 20_000, 3
        args.dashboard_changes = 20
        args.http_instruments, args.http_bookings, args.http_seconds = 2_000, 2_000, 5
        args.earliest_instruments, args.earliest_bookings = 10_000, 100_000
        args.search_sizes, args.queries, args.repeat = "10000", 42, 1
    return args


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE.parent, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"nproc": os.cpu_count(), "memory_gib": round(mem_kib / 1024 / 1024, 1), "cpu": cpu,
            "python": platform.python_version(), "git_commit": commit,
            "date": datetime.now(UTC).isoformat(timespec="seconds")}


def _dataset_for_search(args: argparse.Namespace, engine: str, size: int) -> benchdata.Dataset:
    # The earliest-slot dataset doubles as the search dataset of its size; other sizes need no bookings.
    bookings = args.earliest_bookings if size == args.earliest_instruments else 0
    return benchdata.Dataset(engine, size, bookings)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    results: dict[str, Any] = {"machine": machine(), "config": vars(args), "loadavg_start": os.getloadavg(),
                               "http": [], "earliest": [], "search": [], "dashboard": [], "datasets": {}}
    if os.getloadavg()[0] > 0.5:
        print(f"note: load average {os.getloadavg()[0]:.1f} before starting: other work shares the CPUs, "
              "so timings will be worse than on an idle machine")
    started = time.perf_counter()
    results.update(ceiling=None, peer=None, memory=[])
    if "ceiling" in parts and "postgresql" in engines:
        print(f"== PostgreSQL's own insert rate with the exclusion constraint (pgbench, {args.concurrency} clients, "
              f"{args.ceiling_seconds} s per run)", flush=True)
        results["ceiling"] = pgceiling.run(admin_url=args.admin_url, seconds=args.ceiling_seconds,
                                           clients=args.concurrency, synchronous_commits=("on",))
        print(pgceiling.table(results["ceiling"]), flush=True)
    if "http" in parts:
        clients = ["wrk", "python"] if args.client == "both" else [args.client]
        worker_counts = [int(w) for w in str(args.http_workers).split(",") if w.strip()]
        for engine in engines:
            prepared = httpbench.prepare(engine, args.admin_url, args.http_instruments, args.http_bookings)
            day = 62
            for workers, client in [(w, c) for w in worker_counts for c in clients]:
                print(f"== booking throughput: {engine}, {workers} worker(s), {client}, {args.concurrency} "
                      f"clients, {args.http_seconds} s", flush=True)
                r = httpbench.run(
                    engine, args.admin_url, instruments=args.http_instruments, bookings=args.http_bookings,
                    workers=workers, concurrency=args.concurrency, seconds=args.http_seconds,
                    client=client, prepared=prepared, day=day,
                )
                day += 2
                results["http"].append(r)
                print(f"  {r['bookings_per_s']} bookings/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms "
                      f"(ok {r['ok']}, conflicts {r['conflict']}, other {r['other']}); CPU s: server "
                      f"{r['server_cpu_s']}, postgres {r['postgres_cpu_s']}, client {r['client_cpu_s']}, "
                      f"machine busy {r['machine_busy_pct']}%", flush=True)
    if "peer" in parts and "postgresql" in engines:
        from peers import compare

        print(f"== side by side with Indico's room booking ({args.peer_workers} processes each, "
              f"{args.concurrency} clients, {args.peer_seconds} s; race test {args.race_trials} trials at K=2 and "
              "K=10)", flush=True)
        results["peer"] = compare.run(admin_url=args.admin_url, seconds=args.peer_seconds,
                                      concurrency=args.concurrency, workers=args.peer_workers,
                                      trials=args.race_trials, quick=args.quick)
    if "earliest" in parts:
        # The 100k/1M dataset, and the largest search size (1M instruments, no bookings: every instrument free).
        sizes = [(args.earliest_instruments, args.earliest_bookings)]
        largest = max([int(s) for s in str(args.search_sizes).split(",") if s.strip()], default=0)
        if largest > args.earliest_instruments:
            sizes.append((largest, 0))
        for engine, (instruments, bookings) in [(e, size) for e in engines for size in sizes]:
            ds = benchdata.Dataset(engine, instruments, bookings)
            print(f"== earliest slot: {engine}, {ds.instruments:,} instruments, {ds.bookings:,} bookings",
                  flush=True)
            db, info = benchdata.ensure(ds, args.admin_url, max_age_days=args.max_age_days, fresh=args.fresh)
            results["datasets"][f"{engine}:{ds.name}"] = info
            r = workloads.run_earliest(db, args.queries, args.repeat, args.budget)
            db.dispose()
            r.update(engine=engine, instruments=ds.instruments, bookings=ds.bookings)
            results["earliest"].append(r)
            print(f"  p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms",
                  flush=True)
    if "search" in parts:
        for engine in engines:
            for size in [int(s) for s in str(args.search_sizes).split(",") if s.strip()]:
                ds = _dataset_for_search(args, engine, size)
                print(f"== search: {engine}, {size:,} instruments", flush=True)
                db, info = benchdata.ensure(ds, args.admin_url, max_age_days=args.max_age_days,
                                            fresh=args.fresh)
                results["datasets"][f"{engine}:{ds.name}"] = info
                for facets in (False, True):
                    r = workloads.run_search(db, args.queries, args.repeat, args.budget, facets=facets)
                    r.update(engine=engine, instruments=size, facets=facets)
                    results["search"].append(r)
                    print(f"  facets {'on ' if facets else 'off'}: p50 {r['p50_ms']} ms, "
                          f"p95 {r['p95_ms']} ms, p99 {r['p99_ms']} ms, max {r['max_ms']} ms", flush=True)
                db.dispose()
    if "dashboard" in parts:
        for engine in engines:
            print(f"== dashboard: {engine}, {args.dashboard_instruments:,} instruments, "
                  f"{args.dashboard_bookings:,} bookings", flush=True)
            r = dashboard.run(
                engine, args.admin_url, instruments=args.dashboard_instruments, bookings=args.dashboard_bookings,
                max_age_days=args.max_age_days, fresh=args.fresh, repeat=args.dashboard_repeat,
                budget=args.dashboard_budget,
                changes=args.dashboard_changes, http=args.dashboard_http, force_rebuild=args.rebuild_stats,
            )
            results["datasets"][f"{engine}:dashboard"] = r.pop("dataset")
            results["dashboard"].append(r)
    if "memory" in parts:
        for engine in engines:
            ds = benchdata.Dataset(engine, args.earliest_instruments, args.earliest_bookings)
            print(f"== server memory: {engine}, {ds.instruments:,} instruments, {args.memory_workers} workers, "
                  f"{args.memory_seconds:.0f} s of searches, earliest slots and pages", flush=True)
            db, info = benchdata.ensure(ds, args.admin_url, max_age_days=args.max_age_days, fresh=args.fresh)
            db.dispose()
            r = memory.run(ds.url(args.admin_url), workers=args.memory_workers, seconds=args.memory_seconds)
            r.update(engine=engine, instruments=ds.instruments, bookings=ds.bookings)
            results["memory"].append(r)
            print(f"  {r['requests']} requests {r['statuses']}; RSS per worker {r['worker_rss_mib']} MiB "
                  f"(peak {r['worker_peak_rss_mib']}), supervisor {r['master_rss_mib']} MiB, "
                  f"total {r['total_rss_mib']} MiB", flush=True)
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["loadavg_end"] = os.getloadavg()
    out = benchdata.RESULTS / "latest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print()
    print(report(results))
    print(f"\nwritten to {out} ({results['seconds']} s)")
    return 0


def _verdict(value: float, target: float, *, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value < target
    return "meets" if ok else "MISSES"


def report(results: dict[str, Any]) -> str:
    """The summary table: each measured figure beside its target."""
    lines = [f"{'figure':<62} {'measured':>12} {'target':>10}  verdict", "-" * 96]
    ceiling = results.get("ceiling")
    if ceiling:
        for run in ceiling["runs"]:
            label = f"pgbench {run['variant']} (sync commit {run['synchronous_commit']}), tx/s"
            lines.append(f"{label:<62} {run['tps']:>12.1f} {'ceiling':>10}")
    for r in results["http"]:
        label = f"bookings/s {r['engine']} ({r['client']}, {r['concurrency']} clients, {r['workers']} wkrs)"
        lines.append(f"{label:<62} {r['bookings_per_s']:>12.1f} {'>= 1500':>10}  "
                     f"{_verdict(r['bookings_per_s'], TARGETS['bookings_per_s'], higher_is_better=True)}")
        lines.append(f"{'  booking latency p50 / p99 (ms)':<62} {r['p50_ms']:>5.1f} /{r['p99_ms']:>5.1f} "
                     f"{'p99 < 50':>10}  {_verdict(r['p99_ms'], TARGETS['booking_p99_ms'])}")
    for r in results["earliest"]:
        label = f"earliest slot p95 {r['engine']} ({r['instruments']:,} instr., {r['bookings']:,} bookings)"
        lines.append(f"{label:<62} {r['p95_ms']:>10.1f}ms {'< 50 ms':>10}  "
                     f"{_verdict(r['p95_ms'], TARGETS['earliest_p95_ms'])}")
    for r in results["search"]:
        facets = "on" if r["facets"] else "off"
        label = f"search p95 {r['engine']} ({r['instruments']:,} instr., facets {facets})"
        lines.append(f"{label:<62} {r['p95_ms']:>10.1f}ms {'< 30 ms':>10}  "
                     f"{_verdict(r['p95_ms'], TARGETS['search_p95_ms'])}")
    peer = results.get("peer")
    if peer:
        ours, theirs = peer.get("labcommons", {}), peer.get("peer", {})
        if ours.get("bookings_per_s") and theirs.get("bookings_per_s"):
            ratio = ours["bookings_per_s"] / theirs["bookings_per_s"]
            lines.append(f"{'bookings/s LabCommons / Indico (same client, cores, processes)':<62} "
                         f"{ratio:>11.1f}x {'>= 20x':>10}  "
                         f"{_verdict(ratio, TARGETS['peer_ratio'], higher_is_better=True)}")
        else:
            reason = theirs.get("unavailable") or ours.get("unavailable") or "no figures"
            lines.append(f"{'peer comparison':<62} {'unavailable':>12}  {reason}")
    lines.extend(dashboard.report_lines(results["dashboard"]))
    for r in results.get("memory", []):
        label = f"server RSS per worker {r['engine']} ({r['instruments']:,} instr.), MiB"
        lines.append(f"{label:<62} {max(r['worker_rss_mib'] or [0]):>12.1f} {'—':>10}")
    start, end = results["loadavg_start"][0], results["loadavg_end"][0]
    lines.append(f"(load average {start:.1f} at start, {end:.1f} at end; {results['machine']['nproc']} CPUs)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
