"""Crash safety: the server is killed with SIGKILL (master and workers at once) in the middle of a write load of
bookings, cancellations, service orders and their steps, result uploads and manual charges; it is restarted on the
same database, and whatever the clients were told must still be true.

Checked after every restart: every write that got a 2xx is there with the content it was acknowledged with; a
refused one left nothing; a request that got no answer exists at most once, and retrying it with its
Idempotency-Key answers as if it had been sent once; nothing is half-written (each booking has its hold and its
queued e-mail, each order's event log matches its status, a delivered order has its one charge, every charge is
paid exactly and has its source, every result file row has its bytes); no two active bookings overlap; the audit
chain verifies and holds the entry of every booking, order step, charge and result file.
"""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time
from collections import defaultdict
from collections.abc import Sized
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from labcommons.billing.models import Charge, Payment, PaymentMethod, VoucherRedemption
from labcommons.booking.models import Booking, BookingStatus
from labcommons.db import Database
from labcommons.orders.models import OrderEvent, ResultFile, ServiceOrder
from labcommons.orders.storage import LocalStore
from tests.factories import build_world, next_grid_day
from tests.reliability.support import LoadWorld, check_everything, load_world, server_env, service_date
from tests.server import Server, start_server

# Kills per database; each costs one server start (about ten seconds of CPU for two workers).
KILLS = 2
WORKERS = 2
BOOKERS = ("bob", "carol", "dave")
CUSTOMERS = ("bob", "carol")


class NoAnswer(Exception):
    """The request got no response: the server died before or while handling it."""


@dataclass
class Attempt:
    """One write request as sent, so that it can be sent again unchanged."""

    kind: str  # booking, cancel, order, step, upload, charge
    user: str
    path: str
    body: Any = None
    key: str | None = None
    order_id: int | None = None


@dataclass
class Told:
    """What the clients were told: acknowledged writes, refusals, and the requests that got no answer."""

    bookings: dict[str, dict[str, Any]] = field(default_factory=dict)  # Idempotency-Key -> 201 body
    refused_bookings: set[str] = field(default_factory=set)
    cancelled: set[int] = field(default_factory=set)
    orders: dict[str, int] = field(default_factory=dict)  # key (the order's title) -> order id
    steps: dict[int, list[tuple[int, str]]] = field(default_factory=lambda: defaultdict(list))  # (version, status)
    uploads: dict[int, str] = field(default_factory=dict)  # order id -> SHA-256 of its result file
    charges: dict[str, dict[str, Any]] = field(default_factory=dict)  # key (the description) -> 201 body
    unanswered: list[Attempt] = field(default_factory=list)
    # Answers no correct server gives here (a 5xx, or a refusal of a step that was allowed): the test fails on them.
    wrong: list[str] = field(default_factory=list)
    # Requests cut off by a kill (however they were settled later).
    cut_off: int = 0
    lock: threading.RLock = field(default_factory=threading.RLock)

    def acknowledged(self) -> int:
        return len(self.bookings) + len(self.cancelled) + sum(map(len, self.steps.values())) + len(self.charges)


class Client:
    """One client thread's connection; every write goes through `send`, which files what came back."""

    def __init__(self, base: str, lw: LoadWorld, told: Told) -> None:
        self.http = httpx.Client(base_url=base, timeout=60)
        self.lw, self.told = lw, told

    def send(self, attempt: Attempt) -> httpx.Response:
        headers = self.lw.world.headers(attempt.user, **({"Idempotency-Key": attempt.key} if attempt.key else {}))
        try:
            if attempt.kind == "upload":
                response = self.http.post(attempt.path, content=attempt.body, params={"filename": "report.txt"},
                                          headers={**headers, "Content-Type": "text/plain"})
            else:
                response = self.http.post(attempt.path, json=attempt.body, headers=headers)
        except httpx.HTTPError as exc:
            with self.told.lock:
                self.told.unanswered.append(attempt)
            raise NoAnswer from exc
        if response.status_code >= 500:
            self.wrong_answer(attempt, response)
        return response

    def wrong_answer(self, attempt: Attempt, response: httpx.Response) -> None:
        with self.told.lock:
            self.told.wrong.append(f"{attempt.kind} {attempt.path}: {response.status_code} {response.text[:300]}")

    def close(self) -> None:
        self.http.close()


# --- the load ------------------------------------------------------------------------------------------------


class Load:
    """The client threads of one round; each stops at its first request that gets no answer."""

    def __init__(self, base: str, lw: LoadWorld, told: Told, round_no: int, rng: random.Random) -> None:
        self.base, self.lw, self.told, self.round_no = base, lw, told, round_no
        self.seeds = [rng.randrange(2**32) for _ in range(len(BOOKERS) + len(CUSTOMERS) + 1)]
        self.stop = threading.Event()
        self.threads = [
            *(threading.Thread(target=self._run, args=(self.book, u, i)) for i, u in enumerate(BOOKERS)),
            *(threading.Thread(target=self._run, args=(self.order, u, len(BOOKERS) + i))
              for i, u in enumerate(CUSTOMERS)),
            threading.Thread(target=self._run, args=(self.charge, "alice", len(self.seeds) - 1)),
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a client thread hung"

    def _run(self, work: Any, user: str, index: int) -> None:
        client = Client(self.base, self.lw, self.told)
        try:
            work(client, user, random.Random(self.seeds[index]))
        except NoAnswer:
            pass
        finally:
            client.close()

    def _key(self, user: str, what: str, n: int) -> str:
        return f"r{self.round_no}-{user}-{what}{n}-{os.urandom(3).hex()}"

    def book(self, client: Client, user: str, rng: random.Random) -> None:
        """Book hours of a crowded day (so some requests collide); every third request cancels one of one's own."""
        world, mine = self.lw.world, list[int]()
        day = next_grid_day(days=3 + 2 * self.round_no, hour=0)
        for n in range(10_000):
            if self.stop.is_set():
                return
            if mine and n % 3 == 2:
                booking_id = mine.pop(rng.randrange(len(mine)))
                answer = client.send(Attempt("cancel", user, f"/api/v1/bookings/{booking_id}/cancel",
                                             key=self._key(user, "c", n)))
                if answer.status_code == 200:
                    with self.told.lock:
                        self.told.cancelled.add(booking_id)
                else:
                    client.wrong_answer(Attempt("cancel", user, str(booking_id)), answer)
                continue
            key = self._key(user, "b", n)
            start = day + timedelta(hours=rng.randrange(16))
            body = {"instrument_id": world.instruments[rng.choice(["CONF", "SPATIAL"])],
                    "starts_at": start.isoformat(), "ends_at": (start + timedelta(hours=1)).isoformat(),
                    "purpose": key}
            answer = client.send(Attempt("booking", user, "/api/v1/bookings", body, key))
            with self.told.lock:
                if answer.status_code == 201:
                    self.told.bookings[key] = answer.json()
                    mine.append(answer.json()["id"])
                elif answer.status_code in (409, 422):  # the time is taken, or the account cannot cover it
                    self.told.refused_bookings.add(key)
                else:
                    client.wrong_answer(Attempt("booking", user, key), answer)

    def order(self, client: Client, customer: str, rng: random.Random) -> None:
        """Order the fixed-price service (quoted at once), accept, then either cancel, or have it worked on,
        deliver a result file and close it."""
        for n in range(10_000):
            if self.stop.is_set():
                return
            key = self._key(customer, "o", n)
            created = client.send(Attempt("order", customer, "/api/v1/orders", {
                "service_id": self.lw.service_id, "title": key, "sample_count": 2, "submit": True}, key))
            if created.status_code != 201:
                client.wrong_answer(Attempt("order", customer, key), created)
                return
            order_id, quote_id = created.json()["id"], created.json()["current_quote"]["id"]
            with self.told.lock:
                self.told.orders[key] = order_id
                self._ack(order_id, created)
            base = f"/api/v1/orders/{order_id}"
            steps: list[Attempt] = [Attempt("step", customer, f"{base}/quotes/{quote_id}/accept")]
            if rng.random() < 0.3:
                steps.append(Attempt("step", customer, f"{base}/transitions",
                                     {"to": "cancelled", "comment": "The samples were lost."}))
            else:
                report = f"Result of {key}\n".encode() * rng.randint(1, 200)
                steps += [
                    Attempt("step", "alice", f"{base}/transitions", {"to": "in_progress"}),
                    Attempt("upload", "alice", f"{base}/results", report),
                    Attempt("step", "alice", f"{base}/transitions", {"to": "results_delivered"}),
                    Attempt("step", customer, f"{base}/transitions", {"to": "closed"}),
                ]
            for i, step in enumerate(steps):
                step.order_id = order_id
                step.key = None if step.kind == "upload" else f"{key}-s{i}"
                answer = client.send(step)
                if answer.status_code not in (200, 201):
                    client.wrong_answer(step, answer)
                    return
                with self.told.lock:
                    if step.kind == "upload":
                        self.told.uploads[order_id] = hashlib.sha256(step.body).hexdigest()
                    else:
                        self._ack(order_id, answer)

    def _ack(self, order_id: int, answer: httpx.Response) -> None:
        self.told.steps[order_id].append((answer.json()["version"], answer.json()["status"]))

    def charge(self, client: Client, staff: str, rng: random.Random) -> None:
        """Manual charges to bob's and carol's grants (partly paid by their vouchers) and dave's prepaid account."""
        facility = self.lw.world.facilities["CQ-LAB"]
        for n in range(10_000):
            if self.stop.is_set():
                return
            user, key = rng.choice(BOOKERS), self._key(staff, "m", n)
            body = {"facility_id": facility, "account_id": self.lw.account_of(user),
                    "user_email": f"{user}@example.org", "description": key,
                    "amount_fen": rng.randint(1_000, 20_000), "service_date": service_date()}
            answer = client.send(Attempt("charge", staff, "/api/v1/billing/charges", body, key))
            if answer.status_code == 201:
                with self.told.lock:
                    self.told.charges[key] = answer.json()
            else:
                client.wrong_answer(Attempt("charge", staff, key), answer)


# --- after the restart ---------------------------------------------------------------------------------------


def rows_with(session: Any, column: Any, value: str) -> int:
    return int(session.scalar(select(func.count()).where(column == value)) or 0)


def retry_unanswered(db: Database, base: str, lw: LoadWorld, told: Told) -> None:
    """Send every request that got no answer again, as a client would: same body, same Idempotency-Key."""
    client = Client(base, lw, told)
    pending, told.unanswered = told.unanswered, []
    told.cut_off += len(pending)
    try:
        with db.unit_of_work(write=False) as s:
            # Before the retry: a request the server may or may not have committed exists at most once.
            for attempt in pending:
                column = {"booking": Booking.purpose, "order": ServiceOrder.title,
                          "charge": Charge.description}.get(attempt.kind)
                if column is not None and attempt.key is not None:
                    assert rows_with(s, column, attempt.key) <= 1, attempt
        for attempt in pending:
            if attempt.kind == "upload":
                with db.unit_of_work(write=False) as s:
                    done = s.scalar(select(func.count()).where(ResultFile.order_id == attempt.order_id))
                if done:  # uploads take no Idempotency-Key: a client looks before it sends again
                    told.uploads[attempt.order_id or 0] = hashlib.sha256(attempt.body).hexdigest()
                    continue
            answer = client.send(attempt)
            ok = answer.status_code in (200, 201)
            if attempt.kind == "booking" and answer.status_code in (409, 422):
                told.refused_bookings.add(attempt.key or "")  # another client's booking took the time meanwhile
            elif not ok:
                client.wrong_answer(attempt, answer)
            elif attempt.kind == "booking":
                told.bookings[attempt.key or ""] = answer.json()
            elif attempt.kind == "cancel":
                told.cancelled.add(answer.json()["id"])
            elif attempt.kind == "order":
                told.orders[attempt.key or ""] = answer.json()["id"]
                told.steps[answer.json()["id"]].append((answer.json()["version"], answer.json()["status"]))
            elif attempt.kind == "step":
                told.steps[attempt.order_id or 0].append((answer.json()["version"], answer.json()["status"]))
            elif attempt.kind == "upload":
                told.uploads[attempt.order_id or 0] = hashlib.sha256(attempt.body).hexdigest()
            elif attempt.kind == "charge":
                told.charges[attempt.key or ""] = answer.json()
    finally:
        client.close()


def check_told(db: Database, told: Told) -> None:
    """Everything acknowledged is there as acknowledged; everything refused left nothing."""
    assert told.wrong == [], told.wrong
    with db.unit_of_work(write=False) as s:
        for key, answer in told.bookings.items():
            [row] = s.scalars(select(Booking).where(Booking.purpose == key)).all()
            assert (row.id, row.instrument_id, row.user_id, row.starts_at, row.ends_at) == (
                answer["id"], answer["instrument_id"], answer["user_id"], datetime.fromisoformat(answer["starts_at"]),
                datetime.fromisoformat(answer["ends_at"])), key
            cancelled = row.id in told.cancelled
            assert row.status == (BookingStatus.cancelled if cancelled else BookingStatus.confirmed), key
        for key in told.refused_bookings:
            assert rows_with(s, Booking.purpose, key) == 0, key
        for key, order_id in told.orders.items():
            assert s.scalars(select(ServiceOrder.id).where(ServiceOrder.title == key)).all() == [order_id]
        for order_id, acks in told.steps.items():
            events = dict(s.execute(select(OrderEvent.version, OrderEvent.to_status)
                                    .where(OrderEvent.order_id == order_id)).all())
            for version, status in acks:
                assert events.get(version) == status, (order_id, version, status, events)
        for order_id, digest in told.uploads.items():
            assert s.scalars(select(ResultFile.sha256).where(ResultFile.order_id == order_id)).all() == [digest]
        for key, answer in told.charges.items():
            [charge] = s.scalars(select(Charge).where(Charge.description == key)).all()
            assert (charge.id, charge.account_id, charge.amount_fen) == (answer["id"], answer["account_id"],
                                                                        answer["amount_fen"]), key
            voucher = s.scalar(select(func.coalesce(func.sum(VoucherRedemption.amount_fen), 0))
                               .where(VoucherRedemption.charge_id == charge.id))
            paid = dict(s.execute(select(Payment.method, Payment.amount_fen)
                                  .where(Payment.charge_id == charge.id)).all())
            assert {"voucher_fen": voucher, "prepaid_fen": paid.get(PaymentMethod.prepaid, 0),
                    "invoice_fen": paid.get(PaymentMethod.invoice, 0)} == answer["parts"], key


def settle(db: Database, server: Server, lw: LoadWorld, told: Told, store: LocalStore) -> None:
    """After a restart: retry what got no answer, then check what the clients were told and every invariant."""
    retry_unanswered(db, server.base, lw, told)
    check_told(db, told)
    with db.unit_of_work(write=False) as s:
        check_everything(s, store)


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_sigkill_during_writes_loses_nothing_acknowledged(db: Database, db_url: str, tmp_path: Path) -> None:
    lw = load_world(build_world(db))
    env = server_env(tmp_path / "results")
    store = LocalStore(tmp_path / "results")
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    print(f"crash-safety seed {seed}")  # shown with a failure: the same choices and kill delays (not thread timing)
    told = Told()
    for round_no in range(KILLS + 1):
        server = start_server(db_url, workers=WORKERS, env=env)
        try:
            if round_no:
                settle(db, server, lw, told, store)
            if round_no == KILLS:
                break
            before = told.acknowledged()
            kinds: tuple[Sized, ...] = (told.uploads, told.cancelled, told.charges)
            counts = [len(kind) for kind in kinds]
            load = Load(server.base, lw, told, round_no, rng)
            load.start()
            # Kill once the load is well under way (every kind of write has been done), at a random moment: some
            # requests are then in flight, some in their transaction, some committed but not yet answered.
            deadline = time.monotonic() + 90
            while (told.acknowledged() < before + 8 or any(len(k) == n for k, n in zip(kinds, counts, strict=True))) \
                    and not told.wrong and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 1.0))
            server.kill()
            load.join()
            assert told.wrong == [], told.wrong
            assert told.acknowledged() >= before + 8, "the load did not get going"
        except BaseException:
            print(server.output())
            raise
        finally:
            server.stop()
    # The load did what it is meant to: writes of each kind were acknowledged, and some requests were cut off.
    assert told.bookings and told.cancelled and told.charges and told.uploads and told.cut_off
