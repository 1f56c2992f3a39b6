"""What the reliability tests share: a charging world driven through real server processes, and checkers of the
invariants that must hold whatever happened to those processes (crash, races)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import and_, func, select
from sqlalchemy.orm import Session, aliased

from labcommons.audit import chain
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
