"""Four server processes on one database (a PostgreSQL, or one SQLite file) and many clients released together on
the same things: the invariants hold whichever process serves whom.

(a) the same slots: exactly one booking per slot wins, the others get 409 overlapping_booking, nothing overlaps;
(b) a limited account and a voucher with a prepaid balance: bookings never pass the account's limit, charges never
    take more than the voucher or the balance holds, balances never go negative and the ledger adds up;
(c) the same order transition from several clients: exactly one 2xx, the rest 409, one event row each.
Afterwards the audit chain, appended to by every process at once, verifies without a gap.

The app processes run no jobs (LABCOMMONS_JOBS_IN_PROCESS=false): the e-mails they queued are then sent by three
`labcommons worker` processes racing over the queue, and every one arrives exactly once.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import pytest
from sqlalchemy import func, select, update

from labcommons import mail
from labcommons.billing import accounts
from labcommons.billing.models import (
    AccountKind,
    BillingHold,
    Charge,
    Payment,
    PaymentMethod,
    SourceKind,
    VoucherRedemption,
)
from labcommons.booking.models import ACTIVE_STATUSES, Booking
from labcommons.db import Database, utcnow
from labcommons.notifications import service as notifications
from labcommons.notifications.models import Job, JobStatus, JobWorker
from labcommons.orders import notify as order_mail
from labcommons.orders import quotes
from labcommons.orders import service as orders
from labcommons.orders.models import OrderEvent, OrderStatus
from tests.billing.billing_support import CONF_RATES, balance_of, fund, give_voucher, open_account
from tests.factories import build_world, next_grid_day
from tests.reliability.support import (
    CountingSmtp,
    LoadWorld,
    check_everything,
    load_world,
    overlapping_bookings,
    server_env,
    wait_until,
    worker_env,
    workers,
)
from tests.reliability.support import service_date as today_iso
from tests.server import server_process
from tests.test_mail import settings_env

WORKERS = 4
JOB_WORKERS = ("w1", "w2", "w3")
# The handlers of the e-mail jobs the races queue, to work out in this process what each job sends.
MAIL_HANDLERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "send_notification": notifications.send_notification, order_mail.JOB_KIND: order_mail.send_order_mail,
    "send_mail": notifications.send_mail,
}

# One request a client sends when the barrier opens: (user, path, JSON body).
Request = tuple[str, str, dict[str, Any] | None]


def release_together(base: str, lw: LoadWorld, requests: list[Request]) -> list[tuple[int, dict[str, Any]]]:
    """Send every request from its own thread and connection, all released at once; (status, body) of each."""
    barrier = threading.Barrier(len(requests))

    def send(request: Request) -> tuple[int, dict[str, Any]]:
        user, path, body = request
        with httpx.Client(base_url=base, timeout=120) as client:
            client.get("/api/v1/health")  # connect before the barrier, so the writes really start together
            barrier.wait(timeout=60)
            answer = client.post(path, json=body, headers=lw.world.headers(user))
            return answer.status_code, answer.json()

    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(send, requests))


def codes(answers: list[tuple[int, dict[str, Any]]]) -> Counter[str]:
    """How many answers of each kind: "2xx", or the status and error code of a refusal."""
    return Counter("2xx" if status < 300 else f"{status}:{body.get('error')}" for status, body in answers)


# --- (a) the same slots ------------------------------------------------------------------------------------------


def race_for_slots(db: Database, base: str, lw: LoadWorld) -> None:
    world, slots, per_slot = lw.world, 4, 6
    day = next_grid_day(days=5, hour=0)
    requests: list[Request] = []
    for slot in range(slots):
        instrument = world.instruments["CONF" if slot % 2 else "SPATIAL"]
        hour = day + timedelta(hours=4 * slot + 1)
        for i in range(per_slot):
            # Overlapping, not identical, windows around the slot's hour (slots are far enough apart not to touch).
            start = hour - timedelta(minutes=30 * (i % 2))
            user = ("bob", "carol", "dave")[i % 3]
            requests.append((user, "/api/v1/bookings", {
                "instrument_id": instrument, "starts_at": start.isoformat(),
                "ends_at": (hour + timedelta(minutes=60 + 30 * (i % 3))).isoformat(), "purpose": f"slot {slot}",
                "account_id": lw.account_of(user)}))
    answers = release_together(base, lw, requests)
    for slot in range(slots):
        mine = answers[slot * per_slot:(slot + 1) * per_slot]
        assert codes(mine) == {"2xx": 1, "409:overlapping_booking": per_slot - 1}, (slot, mine)
    with db.unit_of_work(write=False) as s:
        assert overlapping_bookings(s) == []
        active = s.scalars(select(Booking.purpose).where(Booking.status.in_(ACTIVE_STATUSES))).all()
        assert sorted(active) == [f"slot {slot}" for slot in range(slots)]


# --- (b) limits, a voucher and a prepaid balance -----------------------------------------------------------------


def race_for_money(db: Database, base: str, lw: LoadWorld) -> None:
    world = lw.world
    # Alice's grant may commit three hours of her internal rate and a half: of eight one-hour bookings three fit.
    cost = CONF_RATES["internal"]
    with db.unit_of_work() as s:
        accounts.update_account(s, world.actors["alice"], lw.billing.alice_grant, limit_fen=3 * cost + cost // 2)
    # A prepaid company account holding 50,000 fen and a voucher of 30,000 paying half of each charge.
    prepaid = open_account(world, "dave", "CO-RACE", kind=AccountKind.company, prepaid=True)
    fund(world, prepaid, 50_000)
    voucher = give_voucher(world, prepaid, 30_000, share_bp=5_000)
    day = next_grid_day(days=9, hour=0)
    bookings: list[Request] = [
        ("alice", "/api/v1/bookings", {
            "instrument_id": world.instruments["CONF" if i % 2 else "SPATIAL"],
            "starts_at": (day + timedelta(hours=i)).isoformat(),
            "ends_at": (day + timedelta(hours=i + 1)).isoformat(), "account_id": lw.billing.alice_grant})
        for i in range(8)
    ]
    charges: list[Request] = [
        ("alice", "/api/v1/billing/charges", {
            "facility_id": world.facilities["CQ-LAB"], "account_id": prepaid, "user_email": "dave@example.org",
            "description": f"Consumables {i}", "amount_fen": 10_000, "service_date": today_iso()})
        for i in range(16)
    ]
    answers = release_together(base, lw, bookings + charges)
    assert codes(answers[:8]) == {"2xx": 3, "422:spending_limit_exceeded": 5}, answers[:8]
    assert codes(answers[8:]) == {"2xx": 16}, answers[8:]
    with db.unit_of_work(write=False) as s:
        held = accounts.commitments(s, lw.billing.alice_grant).held_fen
        assert held == 3 * cost
        redeemed = s.scalar(select(func.sum(VoucherRedemption.amount_fen))
                            .where(VoucherRedemption.voucher_id == voucher))
        by_method = dict(s.execute(select(Payment.method, func.sum(Payment.amount_fen))
                                   .join(Charge, Charge.id == Payment.charge_id)
                                   .where(Charge.account_id == prepaid).group_by(Payment.method)).all())
    # Whatever the interleaving: the voucher paid its whole 30,000 and no more, the balance its whole 50,000 and no
    # more, and the invoice the rest.
    assert (redeemed, by_method.get(PaymentMethod.prepaid), by_method.get(PaymentMethod.invoice)) == (
        30_000, 50_000, 160_000 - 30_000 - 50_000)
    assert balance_of(world, voucher_id=voucher) == 0
    assert balance_of(world, account_id=prepaid) == 0


# --- (c) the same order transitions ------------------------------------------------------------------------------


def race_for_orders(db: Database, base: str, lw: LoadWorld) -> None:
    world, clients = lw.world, 5
    bob = world.actors["bob"]

    def quoted_order() -> tuple[int, int]:
        with db.unit_of_work() as s:
            order = orders.create_order(s, bob, lw.service_id, title="Race", sample_count=1,
                                        account_id=lw.billing.bob_grant)
            orders.transition(s, bob, order.id, OrderStatus.submitted)  # a fixed price: quoted at once
            quote = quotes.current_quote(s, order)
            assert quote is not None
            return order.id, quote.id

    def accepted_order() -> int:
        order_id, quote_id = quoted_order()
        with db.unit_of_work() as s:
            quotes.accept_quote(s, bob, order_id, quote_id)
        return order_id

    starts = [accepted_order() for _ in range(2)]
    accepts = [quoted_order() for _ in range(2)]
    disputed = [quoted_order()[0] for _ in range(2)]
    races: list[tuple[list[Request], OrderStatus, int]] = []
    for order_id in starts:  # staff start the work, several at once
        start: Request = ("alice", f"/api/v1/orders/{order_id}/transitions", {"to": "in_progress"})
        races.append(([start] * clients, OrderStatus.in_progress, order_id))
    for order_id, quote_id in accepts:  # the customer accepts one quote from several tabs
        accept: Request = ("bob", f"/api/v1/orders/{order_id}/quotes/{quote_id}/accept", None)
        races.append(([accept] * clients, OrderStatus.accepted, order_id))
    for order_id in disputed:  # the customer cancels while staff reject
        path = f"/api/v1/orders/{order_id}/transitions"
        mixed: list[Request] = [("bob", path, {"to": "cancelled"}) if i % 2 else
                                ("alice", path, {"to": "rejected", "comment": "Out of scope."})
                                for i in range(clients)]
        races.append((mixed, OrderStatus.cancelled, order_id))
    answers = release_together(base, lw, [request for requests, _, _ in races for request in requests])
    with db.unit_of_work(write=False) as s:
        for n, (_requests, status, order_id) in enumerate(races):
            mine = answers[n * clients:(n + 1) * clients]
            counted = codes(mine)
            assert counted["2xx"] == 1 and counted.total() == clients, (order_id, mine)
            assert all(code == "2xx" or code.startswith("409:") for code in counted), (order_id, mine)
            [winner] = [body for code, body in mine if code < 300]
            events = s.scalars(select(OrderEvent).where(OrderEvent.order_id == order_id)
                               .order_by(OrderEvent.version)).all()
            # One event for the one winner, and it is the last: the losers wrote nothing.
            assert events[-1].version == winner["version"] and events[-1].to_status.value == winner["status"]
            if status == OrderStatus.cancelled:
                assert winner["status"] in ("cancelled", "rejected")
            else:
                assert winner["status"] == status.value
            assert [e.to_status for e in events].count(OrderStatus(winner["status"])) == 1
        for order_id, _quote in accepts:
            [hold] = s.scalars(select(BillingHold).where(BillingHold.source_kind == SourceKind.order,
                                                         BillingHold.source_id == order_id)).all()
            assert hold.amount_fen == 30_000  # the accepted quote, held once


# --- (d) the queued e-mails, sent by racing worker processes -----------------------------------------------------


class _Recording:
    """A mailer that keeps what it is asked to send."""

    def __init__(self) -> None:
        self.sent: list[mail.Mail] = []

    def send(self, message: mail.Mail) -> None:
        self.sent.append(message)


def expected_mail(db: Database, job_ids: list[int]) -> Counter[tuple[str, str, str]]:
    """What the given mail jobs send, worked out by running their handlers here with a recording mailer (the
    database no longer changes, so each renders what its worker sent): (recipient, subject, body) with counts."""
    recording = _Recording()
    with settings_env(public_base_url="http://labcommons.test"), \
            mock.patch.object(mail, "get_mailer", lambda settings=None: recording), \
            db.unit_of_work(write=False) as s:
        for job in s.scalars(select(Job).where(Job.id.in_(job_ids))):
            MAIL_HANDLERS[job.kind](s, json.loads(job.payload))
    return Counter((m.to, m.subject, m.text.strip()) for m in recording.sent)


def drain_with_workers(db: Database, db_url: str) -> None:
    """Three worker processes race over the queue the app processes filled; each e-mail arrives once."""
    now = utcnow()
    with db.unit_of_work(write=False) as s:
        queued = list(s.scalars(select(Job).where(Job.status == JobStatus.queued, Job.run_after <= now)))
    assert {job.kind for job in queued} <= set(MAIL_HANDLERS), {job.kind for job in queued}
    ids = [job.id for job in queued]
    assert len(ids) >= 10, "the races queued too few e-mails to race over"
    expected = expected_mail(db, ids)  # before running: send_mail jobs lose their payload once done
    # Hold the queued jobs back until every worker polls, so that the workers really race for them.
    with db.unit_of_work() as s:
        s.execute(update(Job).where(Job.id.in_(ids)).values(run_after=now + timedelta(days=1)))
    with CountingSmtp() as smtp:
        with workers(list(JOB_WORKERS), worker_env(db_url, smtp.port)) as started:
            def registered() -> bool:
                with db.unit_of_work(write=False) as s:
                    return s.scalar(select(func.count()).select_from(JobWorker)) == len(JOB_WORKERS)

            wait_until(registered, 180, "the workers to register")
            with db.unit_of_work() as s:
                s.execute(update(Job).where(Job.id.in_(ids)).values(run_after=utcnow()))

            def drained() -> bool:
                with db.unit_of_work(write=False) as s:
                    return not s.scalar(select(func.count()).where(
                        Job.id.in_(ids), Job.status.in_([JobStatus.queued, JobStatus.running])))

            wait_until(drained, 180, "the workers to empty the queue")
            codes = [worker.stop() for worker in started]  # SIGTERM: a clean stop, recorded
        assert codes == [0] * len(JOB_WORKERS), codes
        assert smtp.accepted() == expected
    with db.unit_of_work(write=False) as s:
        ran = list(s.scalars(select(Job).where(Job.id.in_(ids))))
        assert {(job.status, job.attempts) for job in ran} == {(JobStatus.done, 1)}
        assert {job.locked_by for job in ran} <= set(JOB_WORKERS)
        # Nothing else the workers ran (the periodic jobs) ran twice or was left running, and all of them stopped.
        assert s.scalar(select(func.max(Job.attempts))) == 1
        assert s.scalar(select(func.count()).where(Job.status.in_([JobStatus.running, JobStatus.failed]))) == 0
        assert all(w.stopped_at is not None for w in s.scalars(select(JobWorker)))
    print(f"e-mails per worker: {dict(Counter(job.locked_by for job in ran))}")


@pytest.mark.slow
@pytest.mark.xdist_group("servers")
def test_four_processes_racing_for_slots_money_and_transitions_keep_the_invariants(
        db: Database, db_url: str, tmp_path: Path) -> None:
    lw = load_world(build_world(db))
    phases: list[Callable[[Database, str, LoadWorld], None]] = [race_for_slots, race_for_money, race_for_orders]
    # The app processes only queue jobs; worker processes run them afterwards (d).
    env = server_env(tmp_path / "results") | {"LABCOMMONS_JOBS_IN_PROCESS": "false"}
    with server_process(db_url, workers=WORKERS, env=env) as server:
        # The master and at least four workers serving (a spawn start may add a resource tracker).
        assert len(server.processes()) >= WORKERS + 1, server.processes()
        try:
            for phase in phases:
                phase(db, server.base, lw)
        except BaseException:
            print(server.output())
            raise
    with db.unit_of_work(write=False) as s:
        # Commits from four processes at once still make one gap-free chain, with an entry for every change.
        check_everything(s)
    drain_with_workers(db, db_url)
