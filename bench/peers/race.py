"""Race test for any HTTP booking system: K clients released together on one slot, many trials.

Each trial takes a fresh slot. Every client opens its own keep-alive connection and warms it with one cheap
request, then all wait on a barrier and send their booking at once (the bytes are built beforehand, so the
release costs one `sendall` per client). A trial counts the bookings the system accepted, from the responses
and, where the target can read it, from the system's own state. A correct system accepts exactly one per trial.

    python bench/peers/race.py labcommons [--engine sqlite|postgresql] [--trials 50] [--clients 2,10]
    python bench/peers/race.py indico [--trials 50] [--clients 2,10]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HERE = Path(__file__).resolve().parent
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SLOT = timedelta(hours=1)
# Within LabCommons' default booking horizon (90 days); Indico's rooms here have no advance limit.
RACE_DAYS_AHEAD = 60


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def encode(self, host: str) -> bytes:
        """The request as HTTP/1.1 bytes on a keep-alive connection."""
        head = [f"{self.method} {self.path} HTTP/1.1", f"Host: {host}", "Connection: keep-alive",
                f"Content-Length: {len(self.body)}"]
        head += [f"{name}: {value}" for name, value in self.headers.items()]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + self.body


@dataclass(frozen=True)
class RaceTarget:
    """How to race one system: its address, the requests, how to read answers and (optionally) its state."""

    name: str
    base_url: str
    warm: Callable[[int], HttpRequest]  # client -> a cheap request that proves the connection works
    book: Callable[[int, int], HttpRequest]  # (trial, client) -> a booking of the trial's one slot
    accepted: Callable[[int], bool]  # status -> the system says it booked
    refused: Callable[[int], bool]  # status -> the system says the slot is taken (the correct refusal)
    stored: Callable[[int], int] | None = None  # trial -> bookings the system holds on the trial's slot


@dataclass
class _Answer:
    status: int | None = None
    error: str | None = None
    latency_ms: float = 0.0
    body: bytes = b""
    reconnected: bool = False


def _read(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def _client(
    target: RaceTarget, host: str, port: int, trial: int, index: int, barrier: threading.Barrier,
    answer: _Answer, timeout: float,
) -> None:
    sock: socket.socket | None = None
    try:
        payload = target.book(trial, index).encode(f"{host}:{port}")
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(target.warm(index).encode(f"{host}:{port}"))
        warm = _read(sock)
        if warm.status >= 500 or warm.will_close:
            # The server closed the warmed connection: race on a fresh (connected, unwarmed) one, and say so.
            sock.close()
            sock = socket.create_connection((host, port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answer.reconnected = True
    except (OSError, http.client.HTTPException) as exc:
        answer.error = f"warm-up: {type(exc).__name__}: {exc}"
        barrier.abort()
        if sock is not None:
            sock.close()
        return
    try:
        barrier.wait(timeout=timeout)
        sent = time.perf_counter()
        sock.sendall(payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        answer.body = response.read()
        answer.latency_ms = (time.perf_counter() - sent) * 1000
        answer.status = response.status
    except threading.BrokenBarrierError:
        answer.error = "barrier broken (another client failed to warm up)"
    except (OSError, http.client.HTTPException) as exc:
        answer.error = f"booking: {type(exc).__name__}: {exc}"
    finally:
        sock.close()


def run(target: RaceTarget, *, clients: int, trials: int, timeout: float = 60.0) -> dict[str, Any]:
    """Race `clients` clients on one fresh slot per trial, `trials` times; the distribution of accepted counts."""
    parts = urlsplit(target.base_url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    accepted_by_responses: Counter[int] = Counter()
    accepted_in_state: Counter[int] = Counter()
    statuses: Counter[str] = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    double, mismatched, reconnects = 0, 0, 0
    started = time.perf_counter()
    for trial in range(trials):
        barrier = threading.Barrier(clients)
        answers = [_Answer() for _ in range(clients)]
        threads = [threading.Thread(target=_client, args=(target, host, port, trial, i, barrier, answers[i], timeout))
                   for i in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout + 10)
        ok = 0
        for answer in answers:
            reconnects += answer.reconnected
            if answer.error is not None or answer.status is None:
                errors.append(answer.error or "no answer")
                statuses["error"] += 1
                continue
            statuses[str(answer.status)] += 1
            latencies.append(answer.latency_ms)
            if target.accepted(answer.status):
                ok += 1
            elif not target.refused(answer.status):
                errors.append(f"unexpected status {answer.status}: {answer.body[:200].decode(errors='replace')}")
        accepted_by_responses[ok] += 1
        held = ok
        if target.stored is not None:
            held = target.stored(trial)
            accepted_in_state[held] += 1
            mismatched += held != ok
        double += max(ok, held) > 1
    latencies.sort()
    result: dict[str, Any] = {
        "system": target.name, "clients": clients, "trials": trials,
        "accepted_by_responses": {str(k): v for k, v in sorted(accepted_by_responses.items())},
        "accepted_in_state": ({str(k): v for k, v in sorted(accepted_in_state.items())}
                              if target.stored is not None else None),
        "double_booked_trials": double,
        "max_accepted": max([*accepted_by_responses, *accepted_in_state]),
        "responses_vs_state_mismatches": mismatched if target.stored is not None else None,
        "statuses": dict(sorted(statuses.items())),
        "errors": len(errors), "error_samples": sorted(set(errors))[:5],
        "warm_reconnects": reconnects,
        "latency_p50_ms": round(latencies[len(latencies) // 2], 1) if latencies else None,
        "latency_max_ms": round(latencies[-1], 1) if latencies else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    result["correct"] = (double == 0 and not errors and accepted_by_responses.get(1, 0) == trials
                         and (target.stored is None or accepted_in_state.get(1, 0) == trials))
    return result


def describe(result: dict[str, Any]) -> str:
    """One line per race: the distribution of accepted counts, double bookings and errors."""
    dist = result["accepted_in_state"] or result["accepted_by_responses"]
    shown = ", ".join(f"{k} accepted: {v}" for k, v in dist.items())
    return (f"{result['system']}: K={result['clients']}, {result['trials']} trials -> {shown}; double-booked "
            f"trials {result['double_booked_trials']}, errors {result['errors']}"
            + ("" if result["accepted_in_state"] is None else
               f" (counted in the system's state; responses disagree in {result['responses_vs_state_mismatches']})"))


def slot_start(first: datetime, trial: int) -> datetime:
    """A fresh one-hour slot per trial: hours 0-22 of each day from `first` (a UTC midnight) on.

    23:00 is skipped because a slot ending at midnight is refused by Indico (a non-repeating booking must end
    on the day it starts; it answers 500), and both systems race on the same slots.
    """
    return first + timedelta(days=trial // 23, hours=trial % 23)


def _iso_z(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def labcommons_target(base_url: str, database_url: str, instrument_id: int, tokens: list[str],
                      first: datetime) -> RaceTarget:
    """LabCommons: `POST /api/v1/bookings` (201 booked, 409 taken); the slot's bookings counted in its database.

    Client i books with token i (distinct users when there are enough tokens).
    """
    from sqlalchemy import func, select

    from labcommons.booking.models import ACTIVE_STATUSES, Booking
    from labcommons.db import Database

    db = Database.from_url(database_url)

    def book(trial: int, client: int) -> HttpRequest:
        start = slot_start(first, trial)
        body = json.dumps({"instrument_id": instrument_id, "starts_at": _iso_z(start),
                           "ends_at": _iso_z(start + SLOT), "purpose": "race"}).encode()
        return HttpRequest("POST", "/api/v1/bookings", {
            "Content-Type": "application/json", "Authorization": f"Bearer {tokens[client % len(tokens)]}"}, body)

    def stored(trial: int) -> int:
        start = slot_start(first, trial)
        with db.session() as s:
            return int(s.scalar(
                select(func.count()).select_from(Booking).where(
                    Booking.instrument_id == instrument_id, Booking.starts_at < start + SLOT,
                    Booking.ends_at > start, Booking.status.in_(ACTIVE_STATUSES))
            ) or 0)

    return RaceTarget(
        name="LabCommons", base_url=base_url, warm=lambda _: HttpRequest("GET", "/api/v1/health"), book=book,
        accepted=lambda status: status == 201, refused=lambda status: status == 409, stored=stored,
    )


def indico_target(base_url: str, admin_url: str, room_id: int, tokens: list[tuple[int, str]],
                  first: datetime) -> RaceTarget:
    """Indico: `POST /rooms/api/booking/create` (200 booked, 418 taken); valid accepted occurrences in its DB."""
    import indico as peer

    def book(trial: int, client: int) -> HttpRequest:
        start = slot_start(first, trial).astimezone(UTC).replace(tzinfo=None)
        user_id, token = tokens[client % len(tokens)]
        body = json.dumps({
            "start_dt": start.isoformat(), "end_dt": (start + SLOT).isoformat(), "repeat_frequency": "NEVER",
            "repeat_interval": 0, "room_id": room_id, "reason": "race", "user": f"User:{user_id}",
        }).encode()
        return HttpRequest("POST", "/rooms/api/booking/create", {
            "Content-Type": "application/json", "Authorization": f"Bearer {token}"}, body)

    def stored(trial: int) -> int:
        # Indico stores naive times in its default time zone (UTC here); occurrence state 2 is "valid" and
        # reservation state 2 "accepted".
        start = slot_start(first, trial).astimezone(UTC).replace(tzinfo=None)
        with peer.connect(admin_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM roombooking.reservation_occurrences o "
                "JOIN roombooking.reservations r ON r.id = o.reservation_id "
                "WHERE r.room_id = %s AND o.start_dt < %s AND o.end_dt > %s AND o.state = 2 AND r.state = 2",
                (room_id, start + SLOT, start),
            ).fetchone()
        return int(row[0]) if row else 0

    return RaceTarget(
        name="Indico", base_url=base_url, warm=lambda _: HttpRequest("GET", "/rooms/api/locations"), book=book,
        accepted=lambda status: status == 200, refused=lambda status: status == 418, stored=stored,
    )


def race_epoch(days_ahead: int, clients: int) -> datetime:
    """The first slot of a race: UTC midnight `days_ahead` days from now, one day further per K."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return today + timedelta(days=days_ahead + clients)


def run_all(target_for: Callable[[int], RaceTarget], clients: list[int], trials: int) -> list[dict[str, Any]]:
    """One race per K, each on its own day of slots; prints a line per race."""
    results = []
    for k in clients:
        result = run(target_for(k), clients=k, trials=trials)
        print("  race " + describe(result), flush=True)
        results.append(result)
    return results


@contextmanager
def _labcommons(engine: str, admin_url: str, workers: int) -> Iterator[tuple[str, str, list[int], list[str]]]:
    sys.path.insert(0, str(HERE.parent))
    import httpbench

    os.environ["LABCOMMONS_WRITE_RATE_PER_MINUTE"] = "0"  # the server inherits the environment
    url, ids_file, tokens_file = httpbench.prepare(engine, admin_url, 200, 0)
    ids = [int(x) for x in ids_file.read_text().split()]
    tokens = tokens_file.read_text().split()
    with httpbench.server(url, workers) as (base, _):
        yield base, url, ids, tokens


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("system", choices=["labcommons", "indico"])
    p.add_argument("--engine", choices=["postgresql", "sqlite"], default="postgresql",
                   help="LabCommons' database")
    p.add_argument("--admin-url", default=os.environ.get("LABCOMMONS_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL))
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--clients", default="2,10")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    clients = [int(k) for k in args.clients.split(",")]
    if args.system == "labcommons":
        with _labcommons(args.engine, args.admin_url, args.workers) as (base, url, ids, tokens):
            results = run_all(lambda k: labcommons_target(base, url, ids[0], tokens, race_epoch(RACE_DAYS_AHEAD, k)),
                              clients, args.trials)
    else:
        import indico as peer

        try:
            conf, port, seeded = peer.setup(args.admin_url, rooms=1, users=max(clients))
            with peer.serve(conf, port, args.workers) as (base, _):
                results = run_all(
                    lambda k: indico_target(base, args.admin_url, seeded.rooms[0], seeded.tokens,
                                            race_epoch(RACE_DAYS_AHEAD, k)), clients, args.trials)
        except peer.PeerUnavailable as exc:
            print(f"peer unavailable: {exc}")
            return 1
    print(json.dumps(results, indent=2))
    return 0 if all(r["correct"] for r in results) else 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
