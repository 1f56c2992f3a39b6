"""`labcommons serve --workers 2` as a real server: it answers, its metrics add up over both worker processes, a
killed worker's live gauges go with it, and it shuts down cleanly on SIGTERM, leaving no metric files."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from labcommons.db import Database
from tests.booking.test_booking_api import body
from tests.factories import World
from tests.ops.support import client_of, log_lines, output_once, start_serve, value

WORKERS = 2
LATENCY_COUNT = "labcommons_http_request_duration_seconds_count"


def _health_from_fresh_connections(base: str, count: int) -> None:
    """`count` requests, each on its own connection, several at once, so that both workers accept some."""
    def one(_n: int) -> int:
        with httpx.Client(base_url=base, timeout=30) as c:
            return c.get("/api/v1/health").status_code

    with ThreadPoolExecutor(8) as pool:
        assert set(pool.map(one, range(count))) == {200}


def _serving_pids(lines: list[dict[str, object]]) -> Counter[int]:
    return Counter(int(str(line["pid"])) for line in lines
                   if line.get("logger") == "labcommons.access" and line.get("route") == "/api/v1/health")


def test_serve_with_two_workers_adds_metrics_up(world: World, db_url: str, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    server = start_serve(db_url, workers=WORKERS, env={
        "LABCOMMONS_LOG_FORMAT": "json", "LABCOMMONS_METRICS_DIR": str(metrics_dir),
        "LABCOMMONS_JOBS_IN_PROCESS": "false",
    })
    try:
        base = server.base
        ready = httpx.get(f"{base}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        sent = 0
        # The kernel hands connections to whichever worker accepts first: send until both have served some.
        while len(_serving_pids(log_lines(server))) < WORKERS and sent < 800:
            _health_from_fresh_connections(base, 40)
            sent += 40
        pids = _serving_pids(log_lines(server))
        assert len(pids) == WORKERS, f"one worker served everything after {sent} requests: {pids}"
        assert sum(pids.values()) == sent, "one access line per request"
        with httpx.Client(base_url=base, timeout=30) as c:
            for key in ("CONF", "SPATIAL"):
                made = c.post("/api/v1/bookings", json=body(world, key=key), headers=world.headers("alice"))
                assert made.status_code == 201, made.text
        # Whichever worker answers a scrape, it reports the sum over both.
        for _ in range(4):
            with httpx.Client(base_url=base, timeout=30) as c:
                text = c.get("/metrics").text
            assert value(text, LATENCY_COUNT, method="GET", route="/api/v1/health", status="2xx") == sent
            assert value(text, "labcommons_bookings_created_total", status="confirmed", kind="use") == 2
            assert value(text, "labcommons_http_requests_in_flight") >= 1  # the scrape itself
        worker_files = {p.name for p in metrics_dir.glob("*.db")}
        assert any(str(pid) in name for pid in pids for name in worker_files)

        # A worker killed outright: uvicorn starts another; its live gauges leave the sum, its counts stay.
        victim = next(iter(pids))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            alive = [pid for pid in server.processes() if pid != server.process.pid]
            if victim not in alive and len(alive) >= WORKERS:
                break
            time.sleep(0.2)
        text = httpx.get(f"{base}/metrics", timeout=30).text
        assert not list(metrics_dir.glob(f"gauge_live*_{victim}.db")), "the dead worker's live gauges are gone"
        assert value(text, LATENCY_COUNT, method="GET", route="/api/v1/health", status="2xx") == sent
        assert value(text, "labcommons_http_requests_in_flight") == 1

        # SIGTERM: a graceful stop, exit status 0, the metric files removed.
        server.process.terminate()
        assert server.process.wait(timeout=30) == 0, server.output()
        assert not list(metrics_dir.glob("*.db"))
        assert "Shutting down" in server.output() or "Finished server process" in server.output()
    finally:
        server.stop()


def test_serve_single_process_on_a_unix_socket(db: Database, db_url: str, tmp_path: Path) -> None:
    socket_path = tmp_path / "app.sock"
    server = start_serve(db_url, workers=1, env={"LABCOMMONS_LOG_FORMAT": "text"}, uds=socket_path)
    try:
        with client_of(server, socket_path) as c:
            assert c.get("/healthz").status_code == 200
            ready = c.get("/readyz")
            assert ready.status_code == 200, ready.text
            answer = c.get("/api/v1/health")
            assert answer.status_code == 200 and answer.headers["x-request-id"]
            assert "server" not in answer.headers
        assert '"GET /api/v1/health" 200' in output_once(server, '"GET /api/v1/health" 200'), "the access line, in text"
        assert "uvicorn.access" not in server.output()
        # No LABCOMMONS_METRICS_DIR given: serve made a temporary one, where the process's files name its pid.
        (metrics_dir,) = {p.parent for p in Path(tempfile.gettempdir()).glob("labcommons-metrics-*/*.db")
                          if p.stem.endswith(f"_{server.process.pid}")}
        server.process.terminate()
        assert server.process.wait(timeout=30) == 0, server.output()
        assert not socket_path.exists(), "the socket is removed on shutdown"
        assert not metrics_dir.exists(), "the temporary metrics directory is removed on shutdown"
    finally:
        server.stop()
