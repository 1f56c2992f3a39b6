"""Builders shared by the order tests (state machine, quotes, API, race, messages, notifications, pages)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from datetime import date

from sqlalchemy import select

from labcommons.catalog.models import Facility, PriceUnit, Service, ServiceKind
from labcommons.orders import service
from labcommons.orders.models import (
    OrderEvent,
    OrderStatus,
    ResultFile,
    Sample,
    SampleStatus,
    ServiceOrder,
)
from tests.factories import World

S = OrderStatus

# How apply_transition walks a fresh order to each status (no guards, no permissions): the path after draft.
PATHS: dict[OrderStatus, tuple[OrderStatus, ...]] = {
    S.draft: (),
    S.submitted: (S.submitted,),
    S.quoted: (S.submitted, S.quoted),
    S.accepted: (S.submitted, S.quoted, S.accepted),
    S.samples_received: (S.submitted, S.quoted, S.accepted, S.samples_received),
    S.in_progress: (S.submitted, S.quoted, S.accepted, S.in_progress),
    S.results_delivered: (S.submitted, S.quoted, S.accepted, S.in_progress, S.results_delivered),
    S.closed: (S.submitted, S.quoted, S.accepted, S.in_progress, S.results_delivered, S.closed),
    S.rejected: (S.submitted, S.rejected),
    S.cancelled: (S.submitted, S.cancelled),
    S.on_hold: (S.submitted, S.on_hold),
}


def add_service(world: World, facility: str = "CQ-LAB", *, price_fen: int | None = None,
                unit: PriceUnit = PriceUnit.sample, active: bool = True, name_en: str = "Single-cell sequencing",
                requirements_en: str = "") -> int:
    """A testing service of a facility; without `price_fen` it is quoted on request (nothing automatic)."""
    with world.db.unit_of_work() as s:
        fac = s.get(Facility, world.facilities[facility])
        assert fac is not None
        svc = Service(code=f"SVC-{uuid.uuid4().hex[:8]}", facility_id=fac.id, kind=ServiceKind.testing,
                      name_zh="单细胞测序", name_en=name_en, category_code="GEN.SEQ", list_price_fen=price_fen,
                      price_unit=unit, is_active=active, institution_id=fac.institution_id, turnaround_days=10,
                      sample_requirements_zh="样本需冷冻保存", sample_requirements_en=requirements_en)
        s.add(svc)
        s.flush()
        return svc.id


def new_order(world: World, service_id: int, customer: str = "bob", *, submit: bool = False,
              sample_count: int = 2, title: str = "RNA of 2 tissue blocks") -> int:
    """An order of `customer` (a draft, or submitted through the real transition)."""
    actor = world.actors[customer]
    with world.db.unit_of_work() as s:
        order = service.create_order(s, actor, service_id, title=title, description="Spatial transcriptomics",
                                     sample_count=sample_count, sample_description="FFPE blocks")
        if submit:
            service.transition(s, actor, order.id, S.submitted)
        return order.id


def walk_to(world: World, order_id: int, status: OrderStatus, actor_id: int | None = None) -> None:
    """Move a draft order to `status` along PATHS with apply_transition (the system path: no checks)."""
    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        for step in PATHS[status]:
            service.apply_transition(s, order, step, actor_id=actor_id)


def status_of(world: World, order_id: int) -> OrderStatus:
    with world.db.unit_of_work(write=False) as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        return order.status


def events_of(world: World, order_id: int) -> list[OrderEvent]:
    with world.db.unit_of_work(write=False) as s:
        return list(s.scalars(select(OrderEvent).where(OrderEvent.order_id == order_id)
                              .order_by(OrderEvent.version)))


def add_received_sample(world: World, order_id: int) -> None:
    """A sample already at the facility (rows written directly; custody is tested elsewhere)."""
    with world.db.unit_of_work() as s:
        order = s.get(ServiceOrder, order_id)
        assert order is not None
        s.add(Sample(order_id=order_id, position=1, code=f"{order.number}-S01", description="block 1",
                     status=SampleStatus.received))


def add_result_file(world: World, order_id: int) -> None:
    """A result file row (its bytes are not needed by the state machine)."""
    with world.db.unit_of_work() as s:
        s.add(ResultFile(order_id=order_id, filename="report.pdf", size_bytes=10, sha256="0" * 64,
                         storage_key=f"test/{uuid.uuid4().hex}"))


def at_once(*calls: Callable[[], object]) -> list[object]:
    """Run the calls at the same moment, each in its own thread (so with its own session); what each returned, or
    the exception it raised."""
    start = threading.Barrier(len(calls))
    results: list[object] = [None] * len(calls)

    def run(i: int) -> None:
        start.wait(timeout=10)
        try:
            results[i] = calls[i]()
        except Exception as exc:  # the test looks at what each call raised
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def far_day() -> date:
    """A valid-until date comfortably in the future."""
    return date(service.facility_today().year + 1, 1, 15)
