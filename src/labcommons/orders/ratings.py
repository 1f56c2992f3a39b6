"""The user's rating of a closed order: a score from 1 to 5 and a comment, given once."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.db import utcnow
from labcommons.errors import Conflict, InvalidInput
from labcommons.orders import service
from labcommons.orders.models import OrderRating, OrderStatus, ServiceOrder
from labcommons.orders.service import IllegalTransition, NotYourStep, Party

MAX_COMMENT = 2000


class AlreadyRated(Conflict):
    code = "already_rated"


def rating_of(session: Session, order: ServiceOrder) -> OrderRating | None:
    """The order's rating, if given."""
    return session.scalars(select(OrderRating).where(OrderRating.order_id == order.id)).first()


def may_rate(order: ServiceOrder, rating: OrderRating | None) -> bool:
    """Whether the order can still be rated: it is closed and not rated yet (the customer check is separate)."""
    return order.status == OrderStatus.closed and rating is None


def rate_order(session: Session, actor: Actor, order_id: int, score: int, comment: str = "") -> OrderRating:
    """Rate a closed order as its user (once: 409 already_rated for a second attempt)."""
    order = service.get_order(session, actor, order_id)
    if Party.customer not in service.parties_of(actor, order):
        raise NotYourStep("Only the user who placed the order may rate it.", field="score")
    if order.status != OrderStatus.closed:
        raise IllegalTransition("Only a closed order can be rated.", field="score", code="order_not_closed",
                                status=order.status.value)
    if isinstance(score, bool) or not isinstance(score, int) or not 1 <= score <= 5:
        raise InvalidInput("The score is a whole number from 1 to 5.", field="score", code="out_of_range",
                           min=1, max=5)
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise InvalidInput(f"The comment has at most {MAX_COMMENT} characters.", field="comment", code="too_long")
    if rating_of(session, order) is not None:
        raise AlreadyRated("You have rated this order already.", field="score")
    rating = OrderRating(order_id=order.id, service_id=order.service_id, user_id=actor.user_id, score=score,
                         comment=comment, created_at=utcnow())
    try:
        # The primary key on order_id settles two ratings racing each other.
        with session.begin_nested():
            session.add(rating)
            session.flush()
    except IntegrityError as exc:
        raise AlreadyRated("You have rated this order already.", field="score") from exc
    return rating
