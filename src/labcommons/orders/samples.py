"""Samples of orders (filled in by the samples work)."""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from labcommons.orders.models import Sample, SampleEvent, SampleStatus, ServiceOrder


def any_received(session: Session, order: ServiceOrder) -> bool:
    """Whether at least one of the order's samples has arrived at the facility."""
    return bool(session.scalar(select(exists().where(Sample.order_id == order.id,
                                                     Sample.status != SampleStatus.expected))))


def samples_with_events(session: Session, order: ServiceOrder) -> list[tuple[Sample, list[SampleEvent]]]:
    """The order's samples in label order, each with its chain-of-custody events, oldest first."""
    samples = list(session.scalars(select(Sample).where(Sample.order_id == order.id).order_by(Sample.position)))
    events: dict[int, list[SampleEvent]] = {s.id: [] for s in samples}
    if samples:
        for event in session.scalars(
            select(SampleEvent).where(SampleEvent.sample_id.in_(events)).order_by(SampleEvent.at, SampleEvent.id)
        ):
            events[event.sample_id].append(event)
    return [(s, events[s.id]) for s in samples]
