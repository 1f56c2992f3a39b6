"""API shapes of service orders, their events, quotes, messages and ratings. Money is integer fen (`*_fen`)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from labcommons.db import MAX_ID
from labcommons.http import Day
from labcommons.orders import quotes as quote_rules
from labcommons.orders.messages import MAX_LENGTH as MESSAGE_MAX
from labcommons.orders.messages import MessageView
from labcommons.orders.models import (
    OrderEvent,
    OrderRating,
    OrderStatus,
    Quote,
    QuoteLine,
    QuoteStatus,
    ServiceOrder,
)

Comment = Annotated[str, Field(default="", max_length=2000)]


class OrderCreate(BaseModel):
    """A new order of a service; `submit` sends it to the facility at once, otherwise it stays a draft."""

    model_config = ConfigDict(extra="forbid")

    service_id: int = Field(gt=0, le=MAX_ID)
    title: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=20000)
    sample_count: StrictInt = Field(default=0, ge=0, le=10000)
    sample_description: str = Field(default="", max_length=5000)
    wanted_by: Day | None = None
    contact_phone: str = Field(default="", max_length=40)
    submit: bool = False
    # The funding account to charge when the facility charges; omitted: the caller's only account.
    account_id: int | None = Field(default=None, gt=0, le=MAX_ID)


class OrderRead(BaseModel):
    id: int
    number: str
    status: OrderStatus
    held_from: OrderStatus | None
    version: int
    title: str
    description: str
    sample_count: int
    sample_description: str
    wanted_by: date | None
    contact_phone: str
    service_id: int
    service_code: str
    service_name_zh: str
    service_name_en: str
    facility_id: int
    facility_code: str
    facility_name_zh: str
    facility_name_en: str
    user_id: int
    user_name: str
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    closed_at: datetime | None

    @classmethod
    def fields_of(cls, o: ServiceOrder) -> dict[str, object]:
        return dict(
            id=o.id, number=o.number or "", status=o.status, held_from=o.held_from, version=o.version, title=o.title,
            description=o.description, sample_count=o.sample_count, sample_description=o.sample_description,
            wanted_by=o.wanted_by, contact_phone=o.contact_phone, service_id=o.service_id,
            service_code=o.service.code, service_name_zh=o.service.name_zh, service_name_en=o.service.name_en,
            facility_id=o.facility_id, facility_code=o.facility.code, facility_name_zh=o.facility.name_zh,
            facility_name_en=o.facility.name_en, user_id=o.user_id, user_name=o.user.name, created_at=o.created_at,
            updated_at=o.updated_at, submitted_at=o.submitted_at, closed_at=o.closed_at,
        )

    @classmethod
    def of(cls, o: ServiceOrder) -> OrderRead:
        return cls.model_validate(cls.fields_of(o))


class OrderPage(BaseModel):
    items: list[OrderRead]
    next_cursor: str | None


class QueuePage(OrderPage):
    counts: dict[str, int] = Field(description="Orders of the queue per status (with the facility filter only)")


class QuoteLineCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(min_length=1, max_length=quote_rules.MAX_DESCRIPTION)
    quantity: StrictInt = Field(gt=0, le=quote_rules.MAX_QUANTITY)
    unit_price_fen: StrictInt = Field(ge=0, le=quote_rules.MAX_UNIT_PRICE_FEN)


class QuoteCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lines: list[QuoteLineCreate] = Field(min_length=1, max_length=quote_rules.MAX_LINES)
    valid_until: Day
    note: str = Field(default="", max_length=quote_rules.MAX_NOTE)
    expected_version: int | None = Field(default=None, ge=1)

    def line_tuples(self) -> list[quote_rules.LineIn]:
        return [quote_rules.LineIn(x.description, x.quantity, x.unit_price_fen) for x in self.lines]


class QuoteLineRead(BaseModel):
    position: int
    description: str
    quantity: int
    unit_price_fen: int
    amount_fen: int

    @classmethod
    def of(cls, line: QuoteLine) -> QuoteLineRead:
        return cls(position=line.position, description=line.description, quantity=line.quantity,
                   unit_price_fen=line.unit_price_fen, amount_fen=line.amount_fen)


class QuoteRead(BaseModel):
    id: int
    order_id: int
    version: int
    status: QuoteStatus
    total_fen: int
    valid_until: date
    expired: bool = Field(description="Offered but past its last valid day (the facility's date)")
    note: str
    created_by_id: int | None
    created_at: datetime
    decided_by_id: int | None
    decided_at: datetime | None
    decision_note: str
    lines: list[QuoteLineRead]

    @classmethod
    def of(cls, q: Quote) -> QuoteRead:
        return cls(
            id=q.id, order_id=q.order_id, version=q.version, status=q.status, total_fen=q.total_fen,
            valid_until=q.valid_until, expired=q.status == QuoteStatus.offered and quote_rules.is_expired(q),
            note=q.note, created_by_id=q.created_by_id, created_at=q.created_at, decided_by_id=q.decided_by_id,
            decided_at=q.decided_at, decision_note=q.decision_note, lines=[QuoteLineRead.of(x) for x in q.lines],
        )


class QuoteList(BaseModel):
    items: list[QuoteRead]


class QuoteDecline(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: Comment


class RatingCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score: StrictInt = Field(ge=1, le=5)
    comment: Comment


class RatingRead(BaseModel):
    order_id: int
    service_id: int
    score: int
    comment: str
    created_at: datetime

    @classmethod
    def of(cls, r: OrderRating) -> RatingRead:
        return cls(order_id=r.order_id, service_id=r.service_id, score=r.score, comment=r.comment,
                   created_at=r.created_at)


class OrderCounts(BaseModel):
    samples: int
    results: int = Field(description="Result files the caller may download")
    messages: int


class OrderDetail(OrderRead):
    parties: list[str] = Field(description="The caller's sides of the order: customer, staff or both")
    allowed_transitions: list[str] = Field(
        description="Statuses the caller may move the order to now; quoted, accepted and the return to submitted "
                    "from quoted are taken through the quote endpoints"
    )
    current_quote: QuoteRead | None
    counts: OrderCounts
    rating: RatingRead | None


class TransitionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: str = Field(min_length=1, max_length=32, examples=["submitted"])
    comment: Comment
    expected_version: int | None = Field(default=None, ge=1)


class EventRead(BaseModel):
    version: int
    from_status: OrderStatus | None
    to_status: OrderStatus
    actor_id: int | None
    actor_name: str = Field(description="Empty for steps the platform took itself")
    at: datetime
    comment: str

    @classmethod
    def of(cls, e: OrderEvent, names: dict[int, str]) -> EventRead:
        return cls(version=e.version, from_status=e.from_status, to_status=e.to_status, actor_id=e.actor_id,
                   actor_name=names.get(e.actor_id, "") if e.actor_id is not None else "", at=e.at,
                   comment=e.comment)


class EventList(BaseModel):
    items: list[EventRead]


class MessageCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Checked by the service, not here: a field named "body" would lose its name in validation errors (FastAPI
    # prefixes request-body fields with "body").
    body: str = Field(default="", description=f"The message, 1 to {MESSAGE_MAX} characters",
                      json_schema_extra={"minLength": 1, "maxLength": MESSAGE_MAX})


class MessageRead(BaseModel):
    id: int
    author_id: int
    author_name: str
    from_staff: bool
    body: str
    created_at: datetime

    @classmethod
    def of(cls, view: MessageView) -> MessageRead:
        m = view.message
        return cls(id=m.id, author_id=m.author_id, author_name=view.author_name, from_staff=m.from_staff,
                   body=m.body, created_at=m.created_at)


class MessageList(BaseModel):
    items: list[MessageRead]
