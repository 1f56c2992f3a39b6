"""What the reliability tests share: a charging world driven through real server processes, and checkers of the
invariants that must hold whatever happened to those processes (crash, races)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from email.policy import default as default_policy
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope
from aiosmtpd.smtp import Session as SmtpSession
from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from labcommons.audit import chain, seal
from labcommons.audit.models import AuditEntry
from labcommons.billing.models import BillingHold, Charge, SourceKind
from labcommons.booking.models import ACTIVE_STATUSES, Booking, BookingKind
from labcommons.catalog.models import PriceUnit
from labcommons.notifications.models import Job
from labcommons.orders.models import OrderEvent, OrderStatus, ResultFile, ServiceOrder
from labcommons.orders.storage import LocalStore
from tests.billing.billing_support import (
    BillingWorld,
    billing_world,
    check_ledger,
    fund,
    give_voucher,
    rate_card,
    today,
)
from tests.factories import World, grant
from tests.orders.order_support import add_service


def server_env(result_dir: Path) -> dict[str, str]:
    """Settings of the server processes under test: the write rate limit is off (the tests write fast on purpose,
    the limit has its own tests), a small connection pool per process so four processes stay well within
    PostgreSQL's connection limit, and result files under the test's directory."""
    return {
        "LABCOMMONS_WRITE_RATE_PER_MINUTE": "0",
        # As in production: PostgreSQL servers leave their audit entries to the sealer (the tests' own default is
        # inline, for tests that read the chain right after a change).
        "LABCOMMONS_AUDIT_SEALING": "auto",
        "LABCOMMONS_DB_POOL_SIZE": "4",
        "LABCOMMONS_RESULT_DIR": str(result_dir),
    }


@dataclass
class LoadWorld:
    """The standard world with CQ-LAB charging for CONF and SPATIAL, a fixed-price service, alice as its staff,
    vouchers on bob's and carol's grants and a funded prepaid company account of dave's."""

    world: World
    billing: BillingWorld
    service_id: int
    vouchers: dict[str, int]

    def account_of(self, user: str) -> int:
        return {"bob": self.billing.bob_grant, "carol": self.billing.carol_grant, "dave": self.billing.company,
                "alice": self.billing.alice_grant}[user]


def load_world(world: World) -> LoadWorld:
    """Build the LoadWorld on top of the standard world."""
    bw = billing_world(world)
    rate_card(world, "SPATIAL")
    service_id = add_service(world, price_fen=30_000, unit=PriceUnit.sample)
    grant(world, "alice")
    fund(world, bw.company, 2_000_000)
    found = {
        "bob": give_voucher(world, bw.bob_grant, 200_000, issuer="CQ"),
        "carol": give_voucher(world, bw.carol_grant, 200_000, issuer="SC"),
        "dave": give_voucher(world, bw.company, 100_000, issuer="CQ"),
    }
    return LoadWorld(world=world, billing=bw, service_id=service_id, vouchers=found)


def service_date() -> str:
    return today().isoformat()


# --- invariants ------------------------------------------------------------------------------------------------


def overlapping_bookings(session: Session) -> list[tuple[int, int]]:
    """Pairs of active bookings of one instrument whose times overlap (there must be none)."""
    other = aliased(Booking)
    rows = session.execute(
        select(Booking.id, other.id).join(other, and_(
            other.instrument_id == Booking.instrument_id, other.id > Booking.id,
            other.starts_at < Booking.ends_at, Booking.starts_at < other.ends_at,
        )).where(Booking.status.in_(ACTIVE_STATUSES), other.status.in_(ACTIVE_STATUSES))
    ).all()
    return [(int(a), int(b)) for a, b in rows]


def audited_ids(session: Session, action: str) -> set[str]:
    return set(session.scalars(select(AuditEntry.entity_id).where(AuditEntry.action == action)))


def check_audit(session: Session) -> None:
    """The chain verifies (no gap, no fork, head at its end) and every booking, order step, charge and result file
    has the entry that records its creation: a change and its entry commit together or not at all."""
    # The servers run as in production (deferred sealing on PostgreSQL): chain what they left pending first.
    while seal.seal_pending(session):
        pass
    report = chain.verify(session)
    assert report.ok, report.problems
    for model, action in ((Booking, "booking.created"), (OrderEvent, "order_step.created"),
                          (Charge, "charge.created"), (ResultFile, "result_file.created"),
                          (ServiceOrder, "order.created")):
        ids = {str(i) for i in session.scalars(select(model.id))}
        missing = ids - audited_ids(session, action)
        assert not missing, f"{model.__name__} rows without their {action} audit entry: {sorted(missing)[:10]}"


def check_orders(session: Session) -> None:
    """Every order's event log is gap-free, each event starts where the one before ended, and the last one is the
    order's status; no status is entered twice on the paths the tests drive."""
    events = session.scalars(select(OrderEvent).order_by(OrderEvent.order_id, OrderEvent.version)).all()
    by_order = {k: list(v) for k, v in itertools.groupby(events, key=lambda e: e.order_id)}
    for order in session.scalars(select(ServiceOrder)):
        log = by_order.get(order.id, [])
        assert [e.version for e in log] == list(range(1, order.version + 1)), (order.id, [e.version for e in log])
        assert log[0].from_status is None and log[0].to_status == OrderStatus.draft
        for before, after in itertools.pairwise(log):
            assert after.from_status == before.to_status, (order.id, before.version)
        assert log[-1].to_status == order.status, order.id
        statuses = [e.to_status for e in log]
        assert len(statuses) == len(set(statuses)), (order.id, statuses)


def check_holds(session: Session) -> None:
    """Every booking and order of the charging facility holds its estimate on an account, every hold belongs to
    a booking or order that exists, and a delivered order has exactly one charge and holds nothing any more."""
    holds = {(h.source_kind, h.source_id): h for h in session.scalars(select(BillingHold))}
    bookings = {b.id: b for b in session.scalars(select(Booking).where(Booking.kind == BookingKind.use))}
    orders = {o.id: o for o in session.scalars(select(ServiceOrder))}
    for kind, source_id in holds:
        assert source_id in (bookings if kind == SourceKind.booking else orders), f"hold of missing {kind} {source_id}"
    for booking in bookings.values():
        assert (SourceKind.booking, booking.id) in holds, f"booking {booking.id} without its hold"
    charged: dict[int, int] = dict(session.execute(
        select(Charge.source_id, func.count()).where(Charge.source_kind == SourceKind.order)
        .group_by(Charge.source_id)).all())
    for order in orders.values():
        hold = holds.get((SourceKind.order, order.id))
        assert hold is not None, f"order {order.id} without its hold"
        if order.status in (OrderStatus.results_delivered, OrderStatus.closed):
            assert charged.get(order.id) == 1, f"delivered order {order.id} charged {charged.get(order.id)} times"
            assert hold.released_at is not None
        else:  # a cancelled order's hold stops counting by its status (accounts._open_holds)
            assert order.id not in charged, order.id


def check_outbox(session: Session) -> None:
    """The e-mail announcing each booking was queued in the booking's own transaction."""
    keys = set(session.scalars(select(Job.dedupe_key).where(Job.kind == "send_notification")))
    for booking_id in session.scalars(select(Booking.id).where(Booking.kind == BookingKind.use)):
        assert any(k.startswith(f"created:{booking_id}:") for k in keys if k), f"booking {booking_id} without mail"


def check_result_files(session: Session, store: LocalStore) -> None:
    """Every result file row has its bytes in the store, whole."""
    import hashlib

    for row in session.scalars(select(ResultFile)):
        path = store.path(row.storage_key)
        assert path.exists(), f"result file {row.id} without its bytes"
        data = path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (row.size_bytes, row.sha256), row.id


def check_everything(session: Session, store: LocalStore | None = None) -> None:
    """All the database-wide invariants at once."""
    assert overlapping_bookings(session) == []
    check_ledger(session)
    check_orders(session)
    check_holds(session)
    check_outbox(session)
    if store is not None:
        check_result_files(session, store)
    check_audit(session)


# --- job workers as processes, and an SMTP server that counts what it accepted -------------------------------


class _Recorder:
    """aiosmtpd handler: keeps every accepted message; the first delivery of a subject in `stall` is held open
    (the client waits for the server's answer) until released, then refused, so that it is never accepted."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.stall: set[str] = set()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: SmtpSession, envelope: Envelope) -> str:
        content = envelope.content if isinstance(envelope.content, bytes) else str(envelope.content).encode()
        message = message_from_bytes(content, policy=default_policy)
        subject = str(message["Subject"])
        with self.lock:
            held = subject in self.stall
            self.stall.discard(subject)
        if held:
            self.stalled.set()
            while not self.release.is_set():
                await asyncio.sleep(0.05)
            return "451 4.3.0 Held by the test and not accepted"
        with self.lock:
            self.messages.append(message)
        return "250 OK"


class CountingSmtp:
    """An SMTP server on a free loopback port, in a thread of the test process, for worker processes to send to."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.recorder = _Recorder()
        self._controller = Controller(self.recorder, hostname="127.0.0.1", port=self.port)

    def __enter__(self) -> CountingSmtp:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.recorder.release.set()
        self._controller.stop()

    def stall(self, subject: str) -> None:
        """Hold the first delivery of a message with this subject without ever accepting it."""
        with self.recorder.lock:
            self.recorder.stall.add(subject)

    def subjects(self) -> Counter[str]:
        """How many times each subject was accepted."""
        with self.recorder.lock:
            return Counter(str(m["Subject"]) for m in self.recorder.messages)

    def accepted(self) -> Counter[tuple[str, str, str]]:
        """How many times each (recipient, subject, body) was accepted."""
        with self.recorder.lock:
            found = [(str(m["To"]), str(m["Subject"]), _body(m)) for m in self.recorder.messages]
        return Counter(found)


def _body(message: Message) -> str:
    part = message.get_body(("plain",))  # type: ignore[attr-defined]
    # Line ends as sent: a base64 body comes back with the CRLFs of the wire.
    return str(part.get_content()).replace("\r\n", "\n").strip() if part is not None else ""


def worker_env(database_url: str, smtp_port: int, **more: str) -> dict[str, str]:
    """Settings of `labcommons worker` processes under test: mail to the test's SMTP server, heartbeats every
    0.3 s and a worker presumed dead after 2 s of silence, while the age limit (job_stale_minutes) is an hour, so
    only the heartbeats can explain a prompt recovery; quick polls; no embedding model to load."""
    return {
        "LABCOMMONS_DATABASE_URL": database_url, "LABCOMMONS_MAIL_BACKEND": "smtp",
        "LABCOMMONS_SMTP_HOST": "127.0.0.1", "LABCOMMONS_SMTP_PORT": str(smtp_port),
        "LABCOMMONS_PUBLIC_BASE_URL": "http://labcommons.test",
        "LABCOMMONS_JOB_HEARTBEAT_SECONDS": "0.3", "LABCOMMONS_JOB_WORKER_DEAD_SECONDS": "2",
        "LABCOMMONS_JOB_STALE_MINUTES": "60", "LABCOMMONS_JOB_POLL_SECONDS": "0.2",
        "LABCOMMONS_MATCHING_EMBEDDINGS": "off", "LABCOMMONS_DB_POOL_SIZE": "4",
    } | more


@dataclass
class WorkerProcess:
    """A running `labcommons worker --id NAME`."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        try:
            return self.log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no cleanup runs, a mail in flight is cut off."""
        with suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (finish the job in hand, record the stop), then SIGKILL if it does not exit; the exit code."""
        if self.alive:
            self.process.terminate()
            with suppress(subprocess.TimeoutExpired):
                return self.process.wait(timeout=timeout)
        self.kill()
        return self.process.returncode


def start_worker(name: str, env: dict[str, str]) -> WorkerProcess:
    """Start the `labcommons` console script's `worker` command as its own process."""
    script = Path(sys.executable).with_name("labcommons")
    fd, log_name = tempfile.mkstemp(prefix=f"labcommons-worker-{name}-", suffix=".log")
    os.close(fd)
    with open(log_name, "ab") as out:
        process = subprocess.Popen([str(script), "worker", "--id", name], env=os.environ | env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    return WorkerProcess(name, process, Path(log_name))


@contextmanager
def workers(names: list[str], env: dict[str, str]) -> Iterator[list[WorkerProcess]]:
    """Worker processes for the block; stopped after (killed if they hang), their output printed on failure."""
    started = [start_worker(name, env) for name in names]
    try:
        yield started
    except BaseException:
        for worker in started:
            print(f"--- worker {worker.name}:\n{worker.output()}")
        raise
    finally:
        for worker in started:
            worker.stop()
            worker.log.unlink(missing_ok=True)


def wait_until(condition: Callable[[], bool], timeout: float, what: str, *, step: float = 0.05) -> None:
    """Poll `condition` until it holds; fail naming `what` if it has not within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


def job_rows(session: Session, kinds: tuple[str, ...] | None = None) -> list[Job]:
    """The jobs (of the given kinds), oldest first."""
    query = select(Job).order_by(Job.id)
    if kinds is not None:
        query = query.where(Job.kind.in_(kinds))
    return list(session.scalars(query))
