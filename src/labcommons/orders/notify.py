"""What the user and facility staff are told when an order changes (filled in by the orders notifications work)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from labcommons.orders.models import OrderEvent, ServiceOrder


def order_changed(session: Session, order: ServiceOrder, event: OrderEvent) -> None:
    """Queue the e-mails announcing a transition; sent after the commit by the job runner."""
