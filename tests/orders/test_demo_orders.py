"""The demo's service orders: made through the real services, each at its stage, with a consistent history."""

from __future__ import annotations

from sqlalchemy import func, select

from labcommons.catalog import demo
from labcommons.db import Database
from labcommons.orders import demo as order_demo
from labcommons.orders.models import OrderEvent, OrderRating, OrderStatus, ResultFile, Sample, ServiceOrder


def test_demo_orders_reach_their_stages(db: Database) -> None:
    with db.unit_of_work() as session:
        demo.seed_demo(session, bookings=0)
        assert order_demo.seed_orders(session) == len(order_demo.DEMO_ORDERS)
    with db.unit_of_work(write=False) as session:
        statuses = {o.title: o.status for o in session.scalars(select(ServiceOrder))}
        for _email, _code, title, _n, stage in order_demo.DEMO_ORDERS:
            assert statuses[title] == stage, title
        for order in session.scalars(select(ServiceOrder)):
            versions = list(session.scalars(
                select(OrderEvent.version).where(OrderEvent.order_id == order.id).order_by(OrderEvent.version)))
            assert versions == list(range(1, order.version + 1)), order.number
        closed = session.scalars(select(ServiceOrder).where(ServiceOrder.status == OrderStatus.closed)).one()
        assert session.get(OrderRating, closed.id) is not None
        assert session.scalar(select(func.count()).select_from(ResultFile).where(ResultFile.order_id == closed.id)) == 1
        assert session.scalar(select(func.count()).select_from(Sample).where(Sample.order_id == closed.id)) == 1
