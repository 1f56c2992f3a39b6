"""What the user and facility staff are told when an order changes or a message arrives: jobs queued in the same
transaction as the change (a rolled-back change mails nothing), e-mails rendered and sent by the job runner in the
recipient's language."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from sqlalchemy import select
from sqlalchemy.orm import Session, joinedload

from labcommons import i18n, jobs, mail
from labcommons.catalog.models import Facility, Service
from labcommons.config import get_settings
from labcommons.identity.models import Role, RoleGrant, User
from labcommons.notifications import service as notifications
from labcommons.orders.models import OrderEvent, OrderMessage, OrderStatus, Quote, QuoteStatus, ServiceOrder
from labcommons.orders.service import STATUS_LABELS
from labcommons.pages import yuan

S = OrderStatus
JOB_KIND = "order_mail"


# Preference keys checked with notifications.wants (no stored choice means "yes"); offered with their labels on
# /account/notifications (notifications.EVENT_LABELS).
ORDER_EVENTS = notifications.ORDER_EVENTS

_mail_templates = Environment(
    loader=FileSystemLoader(str(Path(__file__).parent / "templates" / "orders" / "mail")),
    autoescape=False,  # plain-text mail; nothing here is parsed as HTML
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)


# --- queueing ---------------------------------------------------------------------------------------------------


def staff_kind(order: ServiceOrder, event: OrderEvent) -> str | None:
    """Which transitions facility staff are told about: a new order, a quote accepted or declined, an order the
    user cancelled. None for the rest (staff made those themselves)."""
    if event.from_status == S.draft and event.to_status == S.submitted:
        return "submitted"
    if event.from_status == S.quoted and event.to_status == S.accepted:
        return "accepted"
    if event.from_status == S.quoted and event.to_status == S.submitted:
        return "declined"
    if event.to_status == S.cancelled and event.actor_id == order.user_id:
        return "cancelled"
    return None


def facility_staff_ids(session: Session, facility_id: int) -> list[int]:
    """Active users holding facility_staff or facility_manager over the facility."""
    return list(session.scalars(
        select(RoleGrant.user_id).join(User, User.id == RoleGrant.user_id)
        .where(RoleGrant.facility_id == facility_id,
               RoleGrant.role.in_([Role.facility_staff, Role.facility_manager]), User.is_active.is_(True))
        .distinct().order_by(RoleGrant.user_id)
    ))


def _enqueue(session: Session, template: str, order: ServiceOrder, recipients: Iterable[int], preference: str,
             key: str, **data: Any) -> None:
    for user_id in dict.fromkeys(recipients):
        if not notifications.wants(session, user_id, preference):
            continue
        jobs.enqueue(
            session, JOB_KIND, {"template": template, "order_id": order.id, "recipient_id": user_id, **data},
            dedupe_key=f"{JOB_KIND}:{template}:{key}:{user_id}"[:200],
        )


def order_changed(session: Session, order: ServiceOrder, event: OrderEvent) -> None:
    """Queue the e-mails announcing a transition: always to the order's user, and to the facility's staff for
    the steps `staff_kind` names (never to whoever took the step)."""
    quote_id = None
    if event.to_status in (S.quoted, S.accepted):
        quote_id = session.scalar(
            select(Quote.id).where(Quote.order_id == order.id,
                                   Quote.status.in_([QuoteStatus.offered, QuoteStatus.accepted]))
            .order_by(Quote.version.desc()).limit(1)
        )
    # Keyed by the event: a retried announcement of the same change queues nothing new.
    _enqueue(session, "status", order, [order.user_id], "order_status", str(event.id), event_id=event.id,
             quote_id=quote_id)
    kind = staff_kind(order, event)
    if kind is not None:
        staff = [u for u in facility_staff_ids(session, order.facility_id)
                 if u not in (event.actor_id, order.user_id)]
        _enqueue(session, "staff", order, staff, "order_staff", str(event.id), event_id=event.id, kind=kind,
                 quote_id=quote_id)


def message_posted(session: Session, order: ServiceOrder, message: OrderMessage) -> None:
    """Queue the e-mail of a new message to the other side: staff for the user's messages, the user for staff's."""
    if message.author_id == order.user_id:
        recipients = [u for u in facility_staff_ids(session, order.facility_id) if u != message.author_id]
    else:
        recipients = [order.user_id]
    _enqueue(session, "message", order, recipients, "order_message", str(message.id), message_id=message.id)


# --- rendering and sending ------------------------------------------------------------------------------------


def render_mail(template: str, locale: str, context: dict[str, Any], to: str) -> mail.Mail:
    """An order e-mail in a locale: the template's first line is the subject, the rest the body."""
    text = _mail_templates.get_template(f"{template}.{locale}.txt").render(**context)
    subject, _sep, body = text.partition("\n")
    return mail.Mail(to=to, subject=subject.strip(), text=body.lstrip("\n"))


def _named(obj: Service | Facility, locale: str) -> str:
    return obj.name_en if locale == "en" and obj.name_en else obj.name_zh


def build_context(session: Session, order: ServiceOrder, user: User, locale: str,
                  payload: dict[str, Any]) -> dict[str, Any]:
    """Everything the order mail templates use, in the recipient's language and time zone."""
    settings = get_settings()
    base = settings.public_base_url.rstrip("/")
    zone = ZoneInfo(user.timezone or settings.default_timezone)
    words = i18n.translations(locale).gettext

    def local(moment: datetime | None) -> str:
        return moment.astimezone(zone).strftime("%Y-%m-%d %H:%M") if moment is not None else ""

    context: dict[str, Any] = {
        "name": user.name, "number": order.number or str(order.id), "title": order.title,
        "service": _named(order.service, locale), "facility": _named(order.facility, locale),
        "customer": order.user.name, "url": f"{base}/orders/{order.id}", "timezone": str(zone),
        "kind": payload.get("kind", ""), "from_status": "", "to_status": "", "comment": "", "actor": "",
        "when": "", "quote_total": "", "quote_valid_until": "", "author": "", "body": "",
    }
    if payload.get("event_id") is not None:
        event = session.get(OrderEvent, int(payload["event_id"]))
        if event is not None:
            actor = session.get(User, event.actor_id) if event.actor_id is not None else None
            context.update(
                from_status=words(STATUS_LABELS[event.from_status]) if event.from_status else "",
                to_status=words(STATUS_LABELS[event.to_status]), comment=event.comment, when=local(event.at),
                actor=actor.name if actor is not None else "LabCommons",
            )
    if payload.get("quote_id") is not None:
        quote = session.get(Quote, int(payload["quote_id"]))
        if quote is not None:
            context.update(quote_total=yuan(quote.total_fen), quote_valid_until=quote.valid_until.isoformat())
    if payload.get("message_id") is not None:
        message = session.get(OrderMessage, int(payload["message_id"]))
        if message is not None:
            author = session.get(User, message.author_id)
            context.update(author=author.name if author is not None else "", body=message.body)
    return context


@jobs.handler(JOB_KIND)
def send_order_mail(session: Session, payload: dict[str, Any]) -> None:
    """Job: one order e-mail (status change, staff alert or message) to one recipient."""
    order = session.scalars(
        select(ServiceOrder).where(ServiceOrder.id == int(payload["order_id"])).options(
            joinedload(ServiceOrder.service), joinedload(ServiceOrder.facility), joinedload(ServiceOrder.user))
    ).first()
    user = session.get(User, int(payload["recipient_id"]))
    if order is None or user is None or not user.is_active:
        return  # gone since: nothing left to tell
    locale = notifications.user_locale(user)
    message = render_mail(str(payload["template"]), locale, build_context(session, order, user, locale, payload),
                          user.email)
    mail.get_mailer().send(message)
