"""A lean asyncio HTTP/1.1 load client (raw sockets, keep-alive), the fallback when wrk is missing.

Runs as its own process: `python bench/pyload.py URL INSTRUMENTS TOKENS BASE CONCURRENCY SECONDS`, and
prints one `RESULT {...}` line shaped like booking.lua's.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit


def _iso(epoch: int) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _client(
    host: str, port: int, worker: int, concurrency: int, instruments: list[str], tokens: list[str], base: int,
    deadline: float, latencies: list[float], statuses: dict[int, int],
) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    counter = 0
    n = len(instruments)
    try:
        while time.perf_counter() < deadline:
            k = counter * concurrency + worker
            counter += 1
            starts = base + (k // n) * 3600
            body = json.dumps({"instrument_id": int(instruments[k % n]), "starts_at": _iso(starts),
                               "ends_at": _iso(starts + 3600), "purpose": "bench"}).encode()
            head = (
                f"POST /api/v1/bookings HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {tokens[k % len(tokens)]}\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
            sent = time.perf_counter()
            writer.write(head + body)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - sent)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def main(argv: list[str]) -> None:
    url, instruments_path, tokens_path, base, concurrency, seconds = argv
    parts = urlsplit(url)
    instruments = Path(instruments_path).read_text().split()
    tokens = Path(tokens_path).read_text().split()
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    started = time.perf_counter()
    deadline = started + float(seconds)
    await asyncio.gather(*(
        _client(parts.hostname or "127.0.0.1", parts.port or 80, w, int(concurrency), instruments, tokens,
                int(base), deadline, latencies, statuses)
        for w in range(int(concurrency))
    ))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> int:
        if not latencies:
            return 0
        return int(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1e6)

    result = {
        "requests": len(latencies), "duration_us": int(elapsed * 1e6), "ok": statuses.get(201, 0),
        "conflict": statuses.get(409, 0), "other": sum(v for k, v in statuses.items() if k not in (201, 409)),
        "socket_errors": 0, "p50_us": pct(50), "p90_us": pct(90), "p95_us": pct(95), "p99_us": pct(99),
        "max_us": int(latencies[-1] * 1e6) if latencies else 0,
        "mean_us": sum(latencies) / len(latencies) * 1e6 if latencies else 0.0,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # plain asyncio still works, only slower
        asyncio.run(main(sys.argv[1:]))
    else:
        uvloop.run(main(sys.argv[1:]))
