"""Result files of orders (filled in by the results work)."""

from __future__ import annotations

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from labcommons.orders.models import ResultFile, ServiceOrder


def has_deliverable(session: Session, order: ServiceOrder) -> bool:
    """Whether the order has at least one result file that is not withdrawn."""
    return bool(session.scalar(select(exists().where(ResultFile.order_id == order.id,
                                                     ResultFile.withdrawn_at.is_(None)))))


def list_results(session: Session, order: ServiceOrder, *, include_withdrawn: bool = False) -> list[ResultFile]:
    """The order's result files, newest first; withdrawn ones only when asked for (staff see them)."""
    stmt = select(ResultFile).where(ResultFile.order_id == order.id)
    if not include_withdrawn:
        stmt = stmt.where(ResultFile.withdrawn_at.is_(None))
    return list(session.scalars(stmt.order_by(ResultFile.uploaded_at.desc(), ResultFile.id.desc())))
