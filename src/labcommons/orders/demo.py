"""Demo service orders in several stages of their life, made through the same services the API uses, so the demo
shows a queue for staff and order pages for customers right away."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.catalog.models import Service
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.orders import messages, quotes, ratings, results, samples
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, ServiceOrder

S = OrderStatus

# Who orders what, and how far each order has gone: (customer e-mail, service code, title, samples, stage).
DEMO_ORDERS: tuple[tuple[str, str, str, int, OrderStatus], ...] = (
    ("zhou.hang@jialingbio.example.com", "SC-SHU-LIFE-S01", "重组蛋白批次的蛋白质组鉴定", 3, S.submitted),
    ("zhou.hang@jialingbio.example.com", "CQ-LAKE-STO-S01", "Mouse brain Stereo-seq, two sections", 2, S.in_progress),
    ("liu.zimo@xlut.example.cn", "CQ-LJDX-LAB-S01", "肿瘤组织基因 panel 检测", 1, S.closed),
    ("emily.carter@shudu-univ.example.org", "CQ-LAKE-SEQ-S01", "Whole-genome resequencing, 30X", 4, S.quoted),
)


def _actor(session: Session, email: str) -> Actor:
    user = identity.find_user(session, email)
    return identity.actor_for(user, grants=roles.grants_of(session, user.id))


def _staff_of(session: Session, order: ServiceOrder) -> Actor | None:
    """A demo user who works the order's facility (its staff or manager), if the demo has one."""
    from labcommons.identity.models import Role, RoleGrant, User

    user_id = session.scalar(
        select(RoleGrant.user_id).where(
            RoleGrant.facility_id == order.facility_id,
            RoleGrant.role.in_([Role.facility_staff, Role.facility_manager]),
        ).order_by(RoleGrant.id)
    )
    if user_id is None:
        return None
    user = session.get(User, user_id)
    assert user is not None  # the grant's foreign key guarantees it
    return identity.actor_for(user, grants=roles.grants_of(session, user.id))


def seed_orders(session: Session) -> int:
    """Place the demo orders and take each to its stage; returns how many were made."""
    made = 0
    for email, code, title, sample_count, stage in DEMO_ORDERS:
        service = session.scalar(select(Service).where(Service.code == code))
        if service is None:
            continue
        customer = _actor(session, email)
        order = orders.create_order(
            session, customer, service.id, title=title, sample_count=sample_count,
            description="Demo order: see how an order moves from request to rated delivery.",
            wanted_by=orders.facility_today() + timedelta(days=45),
        )
        orders.transition(session, customer, order.id, S.submitted)
        made += 1
        staff = _staff_of(session, order)
        if stage == S.submitted or staff is None:
            continue
        quote = quotes.current_quote(session, order)
        if quote is None:
            quote = quotes.issue_quote(
                session, staff, order.id, [("Sequencing and analysis per sample", sample_count, 180000)],
                orders.facility_today() + timedelta(days=30), note="Demo quote",
            )
        if stage == S.quoted:
            continue
        quotes.accept_quote(session, customer, order.id, quote.id)
        samples.register_samples(session, staff, order.id, count=max(sample_count, 1), receive=True,
                                 location="-80 °C freezer A1")
        orders.transition(session, staff, order.id, S.in_progress)
        messages.post_message(session, staff, order.id,
                              "样本已收到，质检合格，已开始实验。Samples passed QC; work has started.")
        if stage == S.in_progress:
            continue
        report = b"Demo test report\n\nAll samples passed quality control.\n"
        results.store_result(session, staff, order.id, filename="检测报告-demo.txt", content_type="text/plain",
                             kind="report", stream=report)
        orders.transition(session, staff, order.id, S.results_delivered)
        orders.transition(session, customer, order.id, S.closed)
        ratings.rate_order(session, customer, order.id, 5, "报告清晰，周期比预期短。")
    return made
