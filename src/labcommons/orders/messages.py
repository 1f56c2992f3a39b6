"""The message thread of an order between its user and the facility's staff; each message is mailed to the other
side."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.db import utcnow
from labcommons.errors import InvalidInput
from labcommons.identity import roles
from labcommons.identity.roles import Action
from labcommons.orders import service
from labcommons.orders.models import OrderMessage, ServiceOrder
from labcommons.orders.service import Party

MAX_LENGTH = 5000


@dataclass(frozen=True)
class MessageView:
    """A message with its author's name, as threads show it."""

    message: OrderMessage
    author_name: str


def messages_of(session: Session, order: ServiceOrder) -> list[MessageView]:
    """The order's thread, oldest first, with authors' names."""
    rows = list(session.scalars(
        select(OrderMessage).where(OrderMessage.order_id == order.id)
        .order_by(OrderMessage.created_at, OrderMessage.id)
    ))
    names = service.user_names(session, (m.author_id for m in rows))
    return [MessageView(m, names.get(m.author_id, "")) for m in rows]


def list_messages(session: Session, actor: Actor, order_id: int) -> list[MessageView]:
    """The thread of an order the actor may see."""
    roles.require(actor, Action.view_own_orders)
    return messages_of(session, service.get_order(session, actor, order_id))


def post_message(session: Session, actor: Actor, order_id: int, body: str) -> OrderMessage:
    """Add a message to the order's thread as its user or as facility staff; the other side is e-mailed.

    Staff who placed the order themselves write as its user there (from_staff is False).
    """
    roles.require(actor, Action.view_own_orders)
    order = service.get_order(session, actor, order_id)
    text = (body or "").strip()
    if not text:
        raise InvalidInput("Write a message.", field="body", code="missing_field")
    if len(text) > MAX_LENGTH:
        raise InvalidInput(f"A message has at most {MAX_LENGTH} characters.", field="body", code="too_long",
                           max=MAX_LENGTH)
    sides = service.parties_of(actor, order)
    message = OrderMessage(order_id=order.id, author_id=actor.user_id, body=text, created_at=utcnow(),
                           from_staff=Party.staff in sides and Party.customer not in sides)
    session.add(message)
    session.flush()
    from labcommons.orders import notify

    notify.message_posted(session, order, message)
    return message
