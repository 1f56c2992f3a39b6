"""Server memory at catalogue scale: resident set size (RSS) of `uvicorn --workers N` serving the 100k-instrument
dataset while clients search, ask for earliest slots and open pages."""

from __future__ import annotations

import random
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpbench
from workloads import EN_WORDS, ZH_WORDS


def _rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB: its resident memory now and at its peak."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def _paths(rng: random.Random) -> list[str]:
    words = ZH_WORDS + EN_WORDS
    paths = []
    for _ in range(400):
        word = urllib.parse.quote(rng.choice(words))
        paths.append(rng.choice([
            f"/api/v1/instruments?q={word}",
            f"/api/v1/instruments?q={word}&facets=true",
            f"/api/v1/slots/earliest?duration_minutes={rng.choice([60, 120])}&q={word}",
            f"/api/v1/instruments/{rng.randint(1, 100_000)}",
            f"/instruments?q={word}",
            "/api/v1/categories",
        ]))
    return paths


def run(url: str, *, workers: int, seconds: float, clients: int = 8) -> dict[str, Any]:
    """Serve `url` with `workers` processes, drive a read mix for `seconds`, then read every process's RSS."""
    rng = random.Random(7)
    paths = _paths(rng)
    with httpbench.server(url, workers) as (base, proc):
        pids = [proc.pid, *httpbench._children(proc.pid)]
        idle = {pid: _rss_kib(pid)[0] for pid in pids}
        deadline = time.monotonic() + seconds
        statuses: dict[int, int] = {}

        def client(n: int) -> None:
            i = n
            while time.monotonic() < deadline:
                try:
                    with urllib.request.urlopen(base + paths[i % len(paths)], timeout=30) as response:
                        statuses[response.status] = statuses.get(response.status, 0) + 1
                except OSError as exc:
                    code = getattr(exc, "code", 0)
                    statuses[code] = statuses.get(code, 0) + 1
                i += clients

        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        after = {pid: _rss_kib(pid) for pid in pids}
    master = pids[0]
    worker_rss = [after[p][0] for p in pids if p != master]
    worker_peak = [after[p][1] for p in pids if p != master]
    return {
        "workers": workers, "seconds": seconds, "requests": sum(statuses.values()), "statuses": statuses,
        "master_rss_mib": round(after[master][0] / 1024, 1),
        "worker_idle_rss_mib": [round(idle[p] / 1024, 1) for p in pids if p != master],
        "worker_rss_mib": [round(v / 1024, 1) for v in worker_rss],
        "worker_peak_rss_mib": [round(v / 1024, 1) for v in worker_peak],
        "total_rss_mib": round(sum(a[0] for a in after.values()) / 1024, 1),
    }
