"""Personal data: everything the platform holds about a user as one JSON document, and its deletion on request.

Deletion follows the Personal Information Protection Law (PIPL, art. 47): personal information is deleted once
its purpose is achieved or the user asks, except what a law requires to be kept. The ledger (charges, payments,
voucher redemptions, invoices) is an accounting record that must be kept (Accounting Law art. 23, Accounting
Archives Measures), and the audit log is the platform's security record (Cybersecurity Law art. 21): both stay,
and both name the user by id only. The row that gives the id a name and an address is pseudonymised instead of
deleted, and since the audit log keeps personal columns only as keyed digests (audit.capture.PERSONAL), nothing in
it needs rewriting and its hash chain stays valid.

What users can expect, and what docs/security.md and the privacy page say:
- refused (409 deletion_blocked, with reasons) while something still binds both sides: an agreed service order not
  finished (the facility holds samples or owes results, and the charge is still to come), a booking checked in
  or past its cancellation deadline (the user could not cancel it either), or money a funding account the user
  owns still owes (an unpaid invoice, or charges that go on the next invoice);
- cancelled through the owning services, as if the user did it: future bookings (their time is offered to the
  waitlist, their cost holds released), waitlist entries, orders not agreed yet (draft, submitted, quoted), open
  demands (their open offers are declined);
- deleted or revoked: sessions, API tokens, linked identities, password resets, consents and tokens given to member
  systems, notification preferences, calendar feeds, role grants, memberships of funding accounts, qualifications
  (revoked: the facility keeps its training record), replay records and queued e-mail to the address;
- blanked: the free text that is the user's own: purposes of bookings, series and waitlist entries, booking
  cancellation notes, an order's contact phone, rating comments, demand texts, talent card numbers and names;
- kept, under "Deleted user <id>": what the other party needs: orders with their titles, descriptions, samples,
  results and messages (the correspondence belongs to the facility as much as to the user and documents the work
  charged), charges, payments, invoices, vouchers, funding accounts the user owned (their institution's
  administrators manage them) and the audit log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.audit.models import AuditEntry
from labcommons.billing import accounts as billing_accounts
from labcommons.billing import ledger, talent, vouchers
from labcommons.billing.models import (
    AccountMember,
    BillingAccount,
    CardStatus,
    Charge,
    Invoice,
    InvoiceLine,
    InvoiceStatus,
    MemberStatus,
    SourceKind,
    TalentCard,
)
from labcommons.booking import policy as booking_policy
from labcommons.booking import service as booking_service
from labcommons.booking import waitlist
from labcommons.booking.models import (
    ACTIVE_STATUSES,
    Booking,
    BookingKind,
    BookingSeries,
    CalendarFeed,
    IdempotencyRecord,
    Qualification,
    WaitlistEntry,
)
from labcommons.catalog.models import Facility, Institution, Instrument, Service
from labcommons.db import utcnow
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import passwords, roles, service
from labcommons.identity.models import (
    ApiToken,
    ExternalIdentity,
    LoginState,
    LoginThrottle,
    OidcAccessToken,
    OidcAuthorizationCode,
    OidcConsent,
    PasswordReset,
    RoleGrant,
    User,
    WebSession,
)
from labcommons.matching import demands as matching_demands
from labcommons.matching.models import Demand, DemandMatch, DemandOffer, DemandStatus, Expert
from labcommons.notifications import service as notifications
from labcommons.notifications.models import Job, JobStatus, NotificationPreference
from labcommons.orders import messages as order_messages
from labcommons.orders import ratings as order_ratings
from labcommons.orders import samples as order_samples
from labcommons.orders import service as orders
from labcommons.orders.models import OrderStatus, Quote, ServiceOrder

SCHEMA = "labcommons.personal-data"
SCHEMA_VERSION = 1
DELETED_DOMAIN = "deleted.invalid"

# Orders whose work was agreed and is not finished: the facility holds samples, owes results or has a charge to post.
ORDERS_IN_PROGRESS = (OrderStatus.accepted, OrderStatus.samples_received, OrderStatus.in_progress,
                      OrderStatus.results_delivered, OrderStatus.on_hold)
# Orders nothing was agreed for yet: deletion withdraws them, as the user could themself.
ORDERS_NOT_AGREED = (OrderStatus.draft, OrderStatus.submitted, OrderStatus.quoted)
CANCEL_COMMENT = "Cancelled because the customer deleted their account."


def _iso(moment: datetime | date | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def _user(session: Session, user_id: int, *, lock: bool = False) -> User:
    stmt = select(User).where(User.id == user_id)
    if lock:
        # Two deletions of one account at once: the second waits here, then finds it deleted.
        stmt = stmt.with_for_update().execution_options(populate_existing=True)
    user = session.scalars(stmt).first()
    if user is None:
        raise NotFound(f"User {user_id} does not exist.", field="user_id")
    return user


def _actor_of(session: Session, user: User) -> Actor:
    return service.actor_for(user, grants=roles.grants_of(session, user.id))


def _named(row: Instrument | Service | Facility | Institution | None) -> dict[str, Any] | None:
    if row is None:
        return None
    return {"code": row.code, "name_zh": row.name_zh, "name_en": row.name_en}


def _by_id(session: Session, model: Any, ids: Sequence[int | None]) -> dict[int, Any]:
    wanted = sorted({i for i in ids if i is not None})
    if not wanted:
        return {}
    return {row.id: row for row in session.scalars(select(model).where(model.id.in_(wanted)))}


# --- export: one function per section --------------------------------------------------------------------------


def _profile(session: Session, user: User) -> dict[str, Any]:
    institution = session.get(Institution, user.institution_id) if user.institution_id else None
    return {
        "id": user.id, "email": user.email, "name": user.name, "region": user.region_code,
        "institution": _named(institution), "locale": user.locale, "timezone": user.timezone,
        "has_password": user.password_hash is not None, "is_active": user.is_active,
        "created_at": _iso(user.created_at), "deleted_at": _iso(user.deleted_at),
    }


def _external_identities(session: Session, user: User) -> list[dict[str, Any]]:
    return [
        {"provider": provider.name, "issuer": ident.issuer, "subject": ident.subject, "email": ident.email,
         "email_verified": ident.email_verified, "created_at": _iso(ident.created_at),
         "last_login_at": _iso(ident.last_login_at)}
        for ident, provider in service.external_identities(session, user.id)
    ]


def _sessions(session: Session, user: User) -> list[dict[str, Any]]:
    rows = session.scalars(select(WebSession).where(WebSession.user_id == user.id).order_by(WebSession.id))
    return [{"method": s.method, "signed_in_at": _iso(s.auth_time), "created_at": _iso(s.created_at),
             "expires_at": _iso(s.expires_at)} for s in rows]


def _api_tokens(session: Session, user: User) -> list[dict[str, Any]]:
    # Names, scopes and dates only: the token's hash is a secret even from its owner.
    rows = session.scalars(select(ApiToken).where(ApiToken.user_id == user.id).order_by(ApiToken.id))
    return [{"name": t.name, "scopes": t.scopes.split() or list(roles.SCOPES), "created_at": _iso(t.created_at),
             "expires_at": _iso(t.expires_at), "revoked_at": _iso(t.revoked_at),
             "last_used_at": _iso(t.last_used_at)} for t in rows]


def _role_grants(session: Session, user: User) -> list[dict[str, Any]]:
    return [{"role": g.role, "scope": g.scope_kind, "code": g.scope_code, "name_zh": g.scope_name_zh,
             "name_en": g.scope_name_en} for g in roles.list_grants(session, None, email=user.email)]


def _qualifications(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(Qualification).where(Qualification.user_id == user.id)
                                .order_by(Qualification.id)))
    instruments = _by_id(session, Instrument, [q.instrument_id for q in rows])
    return [{"instrument": _named(instruments.get(q.instrument_id or 0)), "category": q.category_code,
             "level": q.level.value, "granted_at": _iso(q.granted_at), "expires_at": _iso(q.expires_at),
             "revoked_at": _iso(q.revoked_at), "note": q.note} for q in rows]


def _bookings(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(Booking).where(Booking.user_id == user.id, Booking.kind == BookingKind.use)
                                .order_by(Booking.starts_at, Booking.id)))
    instruments = _by_id(session, Instrument, [b.instrument_id for b in rows])
    return [{"id": b.id, "instrument": _named(instruments.get(b.instrument_id)), "starts_at": _iso(b.starts_at),
             "ends_at": _iso(b.ends_at), "status": b.status.value, "purpose": b.purpose, "series_id": b.series_id,
             "created_at": _iso(b.created_at), "cancelled_at": _iso(b.cancelled_at), "cancel_kind": b.cancel_kind,
             "cancel_note": b.cancel_note, "checked_in_at": _iso(b.checked_in_at),
             "checked_out_at": _iso(b.checked_out_at), "no_show": b.no_show} for b in rows]


def _series(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(BookingSeries).where(BookingSeries.user_id == user.id)
                                .order_by(BookingSeries.id)))
    instruments = _by_id(session, Instrument, [s.instrument_id for s in rows])
    return [{"id": s.id, "instrument": _named(instruments.get(s.instrument_id)), "rrule": s.rrule,
             "first_starts_at": _iso(s.first_starts_at), "duration_minutes": s.duration_minutes,
             "timezone": s.timezone, "purpose": s.purpose, "created_at": _iso(s.created_at)} for s in rows]


def _waitlist(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(WaitlistEntry).where(WaitlistEntry.user_id == user.id)
                                .order_by(WaitlistEntry.id)))
    instruments = _by_id(session, Instrument, [e.instrument_id for e in rows])
    return [{"instrument": _named(instruments.get(e.instrument_id)), "starts_at": _iso(e.starts_at),
             "ends_at": _iso(e.ends_at), "purpose": e.purpose, "status": e.status.value,
             "created_at": _iso(e.created_at), "offered_at": _iso(e.offered_at),
             "offer_expires_at": _iso(e.offer_expires_at)} for e in rows]


def _order(session: Session, user: User, order: ServiceOrder, services: dict[int, Any],
           facilities: dict[int, Any]) -> dict[str, Any]:
    # Messages with who wrote them only as "you" or "facility staff": staff members' names are theirs, not the user's.
    thread = [{"from": "you" if m.message.author_id == user.id else "facility",
               "body": m.message.body, "at": _iso(m.message.created_at)}
              for m in order_messages.messages_of(session, order)]
    samples = [{"code": s.code, "description": s.description, "status": s.status.value,
                "created_at": _iso(s.created_at)} for s, _events in order_samples.samples_with_events(session, order)]
    quotes = [{"version": q.version, "status": q.status.value, "total_fen": q.total_fen,
               "valid_until": _iso(q.valid_until), "created_at": _iso(q.created_at)}
              for q in session.scalars(select(Quote).where(Quote.order_id == order.id).order_by(Quote.version))]
    steps = [{"from": e.from_status.value if e.from_status else None, "to": e.to_status.value, "at": _iso(e.at),
              "comment": e.comment} for e in orders.events_of(session, order)]
    return {
        "number": order.number, "service": _named(services.get(order.service_id)),
        "facility": _named(facilities.get(order.facility_id)), "status": order.status.value, "title": order.title,
        "description": order.description, "sample_count": order.sample_count,
        "sample_description": order.sample_description, "wanted_by": _iso(order.wanted_by),
        "contact_phone": order.contact_phone, "created_at": _iso(order.created_at),
        "submitted_at": _iso(order.submitted_at), "closed_at": _iso(order.closed_at),
        "steps": steps, "quotes": quotes, "samples": samples, "messages": thread,
    }


def _orders(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(ServiceOrder).where(ServiceOrder.user_id == user.id)
                                .order_by(ServiceOrder.id)))
    services = _by_id(session, Service, [o.service_id for o in rows])
    facilities = _by_id(session, Facility, [o.facility_id for o in rows])
    return [_order(session, user, o, services, facilities) for o in rows]


def _ratings(session: Session, user: User) -> list[dict[str, Any]]:
    out = []
    for order in session.scalars(select(ServiceOrder).where(ServiceOrder.user_id == user.id)
                                 .order_by(ServiceOrder.id)).all():
        rating = order_ratings.rating_of(session, order)
        if rating is not None and rating.user_id == user.id:
            out.append({"order": order.number, "score": rating.score, "comment": rating.comment,
                        "created_at": _iso(rating.created_at)})
    return out


def _owned_accounts(session: Session, user_id: int) -> list[BillingAccount]:
    return list(session.scalars(select(BillingAccount).where(BillingAccount.owner_id == user_id)
                                .order_by(BillingAccount.code)))


def _funding_accounts(session: Session, user: User) -> list[dict[str, Any]]:
    owned = _owned_accounts(session, user.id)
    institutions = _by_id(session, Institution, [a.institution_id for a in owned])
    out: list[dict[str, Any]] = [
        {"code": a.code, "name": a.name, "kind": a.kind.value, "role": "owner",
         "institution": _named(institutions.get(a.institution_id)), "prepaid": a.prepaid,
         "balance_fen": a.balance_fen, "limit_fen": a.limit_fen, "valid_until": _iso(a.valid_until),
         "status": a.status.value, "created_at": _iso(a.created_at)}
        for a in owned
    ]
    memberships = session.execute(
        select(AccountMember, BillingAccount).join(BillingAccount, BillingAccount.id == AccountMember.account_id)
        .where(AccountMember.user_id == user.id).order_by(BillingAccount.code)
    ).all()
    out += [{"code": account.code, "name": account.name, "kind": account.kind.value, "role": "member",
             "membership": member.status.value, "member_limit_fen": member.limit_fen,
             "requested_at": _iso(member.requested_at), "decided_at": _iso(member.decided_at),
             "status": account.status.value} for member, account in memberships]
    return out


def _charges(session: Session, user: User) -> list[dict[str, Any]]:
    # The user's own charges (on whichever account paid them); other members' charges on their accounts are theirs.
    rows = list(session.scalars(select(Charge).where(Charge.user_id == user.id).order_by(Charge.id)))
    parts = ledger.parts_of_charges(session, [c.id for c in rows])
    codes = _by_id(session, BillingAccount, [c.account_id for c in rows])
    facilities = _by_id(session, Facility, [c.facility_id for c in rows])
    return [{"id": c.id, "account": codes[c.account_id].code, "facility": _named(facilities.get(c.facility_id)),
             "source": c.source_kind.value, "source_id": c.source_id, "reverses": c.reverses_id,
             "description": c.description, "service_date": _iso(c.service_date), "posted_at": _iso(c.posted_at),
             "unit": c.unit.value, "quantity": c.quantity, "list_amount_fen": c.list_amount_fen,
             "discount_fen": c.discount_fen, "discount_reason": c.discount_reason, "amount_fen": c.amount_fen,
             "paid": {"voucher_fen": parts[c.id].voucher_fen, "prepaid_fen": parts[c.id].prepaid_fen,
                      "invoice_fen": parts[c.id].invoice_fen}} for c in rows]


def _invoices(session: Session, user: User) -> list[dict[str, Any]]:
    owned = {a.id: a.code for a in _owned_accounts(session, user.id)}
    if not owned:
        return []
    rows = session.scalars(select(Invoice).where(Invoice.account_id.in_(owned)).order_by(Invoice.period, Invoice.id))
    return [{"number": i.number, "account": owned[i.account_id], "period": i.period, "total_fen": i.total_fen,
             "voucher_fen": i.voucher_fen, "prepaid_fen": i.prepaid_fen, "due_fen": i.due_fen,
             "status": i.status.value, "issued_at": _iso(i.issued_at), "paid_at": _iso(i.paid_at)} for i in rows]


def _vouchers(session: Session, user: User) -> list[dict[str, Any]]:
    return [{"code": v.code, "name": v.name, "account": account.code, "issuer_region": v.issuer_region_code,
             "amount_fen": v.amount_fen, "balance_fen": v.balance_fen, "share_bp": v.share_bp,
             "valid_from": _iso(v.valid_from), "valid_until": _iso(v.valid_until), "status": v.status.value}
            for account in _owned_accounts(session, user.id) for v in vouchers.vouchers_of_account(session, account.id)]


def _talent_cards(session: Session, user: User, actor: Actor) -> list[dict[str, Any]]:
    return [{"scheme": c.scheme_code, "card_number": c.card_number, "holder_name": c.holder_name,
             "valid_until": _iso(c.valid_until), "status": c.status.value, "submitted_at": _iso(c.submitted_at),
             "decided_at": _iso(c.decided_at), "note": c.note} for c in talent.my_cards(session, actor)]


def _demands(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(Demand).where(Demand.user_id == user.id).order_by(Demand.id)))
    offers = list(session.scalars(select(DemandOffer).where(DemandOffer.demand_id.in_([d.id for d in rows]))
                                  .order_by(DemandOffer.id))) if rows else []
    services = _by_id(session, Service, [o.service_id for o in offers])
    facilities = _by_id(session, Facility, [o.facility_id for o in offers])
    order_numbers = {o.id: o.number for o in _by_id(session, ServiceOrder, [o.order_id for o in offers]).values()}
    by_demand: dict[int, list[dict[str, Any]]] = {}
    for o in offers:
        by_demand.setdefault(o.demand_id, []).append({
            "facility": _named(facilities.get(o.facility_id)), "service": _named(services.get(o.service_id)),
            "message": o.message, "price_fen": o.price_fen, "available_from": _iso(o.available_from),
            "status": o.status.value, "order": order_numbers.get(o.order_id or 0), "created_at": _iso(o.created_at),
        })
    return [{"id": d.id, "text": d.text, "budget_fen": d.budget_fen, "deadline": _iso(d.deadline),
             "region": d.region_code, "sample_type": d.sample_type, "share_with_providers": d.share_with_providers,
             "status": d.status.value, "created_at": _iso(d.created_at), "offers": by_demand.get(d.id, [])}
            for d in rows]


def _notification_preferences(session: Session, user: User) -> dict[str, bool]:
    return notifications.preferences(session, user.id)


def _calendar_feeds(session: Session, user: User) -> list[dict[str, Any]]:
    rows = list(session.scalars(select(CalendarFeed).where(CalendarFeed.owner_id == user.id)
                                .order_by(CalendarFeed.id)))
    instruments = _by_id(session, Instrument, [f.instrument_id for f in rows])
    return [{"of": "my bookings" if f.user_id is not None else "instrument",
             "instrument": _named(instruments.get(f.instrument_id or 0)), "created_at": _iso(f.created_at),
             "revoked_at": _iso(f.revoked_at)} for f in rows]


def _audit_entries(session: Session, user: User) -> list[dict[str, Any]]:
    rows = session.execute(
        select(AuditEntry.seq, AuditEntry.at, AuditEntry.action, AuditEntry.entity_type, AuditEntry.entity_id)
        .where(AuditEntry.actor_id == user.id).order_by(AuditEntry.seq)
    ).all()
    return [{"seq": seq, "at": _iso(at), "action": action, "entity_type": entity_type, "entity_id": entity_id}
            for seq, at, action, entity_type, entity_id in rows]


def export_personal_data(session: Session, user_id: int) -> dict[str, Any]:
    """Everything the platform holds about the user, as one JSON-ready document with a schema version."""
    user = _user(session, user_id)
    actor = _actor_of(session, user)
    sections: dict[str, Callable[[], Any]] = {
        "profile": lambda: _profile(session, user),
        "external_identities": lambda: _external_identities(session, user),
        "sessions": lambda: _sessions(session, user),
        "api_tokens": lambda: _api_tokens(session, user),
        "role_grants": lambda: _role_grants(session, user),
        "qualifications": lambda: _qualifications(session, user),
        "bookings": lambda: _bookings(session, user),
        "booking_series": lambda: _series(session, user),
        "waitlist": lambda: _waitlist(session, user),
        "service_orders": lambda: _orders(session, user),
        "ratings": lambda: _ratings(session, user),
        "funding_accounts": lambda: _funding_accounts(session, user),
        "charges": lambda: _charges(session, user),
        "invoices": lambda: _invoices(session, user),
        "vouchers": lambda: _vouchers(session, user),
        "talent_cards": lambda: _talent_cards(session, user, actor),
        "demands": lambda: _demands(session, user),
        "notification_preferences": lambda: _notification_preferences(session, user),
        "calendar_feeds": lambda: _calendar_feeds(session, user),
        "audit_entries": lambda: _audit_entries(session, user),
    }
    document: dict[str, Any] = {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "exported_at": _iso(utcnow())}
    document.update({name: build() for name, build in sections.items()})
    return document


def export_filename(user_id: int) -> str:
    """The download's file name."""
    return f"labcommons-personal-data-{user_id}.json"


# --- deletion -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Blocker:
    """Why deletion must wait: a rule name, an English explanation, and what it concerns (order numbers...)."""

    code: str
    message: str
    items: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "items": self.items}


class DeletionBlocked(Conflict):
    """Deletion is refused for now; `reasons` lists every blocker."""

    code = "deletion_blocked"

    def __init__(self, blockers: Sequence[Blocker]) -> None:
        super().__init__("Your personal data cannot be deleted yet: " + " ".join(b.message for b in blockers),
                         reasons=[b.body() for b in blockers])
        self.blockers = list(blockers)


@dataclass
class DeletionSummary:
    """What deletion did, by kind, for the confirmation page, the API and the CLI."""

    user_id: int
    deleted_at: datetime
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, count: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + count


def _live_bookings(session: Session, user_id: int, now: datetime) -> list[Booking]:
    return list(session.scalars(
        select(Booking).where(Booking.user_id == user_id, Booking.kind == BookingKind.use,
                              Booking.status.in_(ACTIVE_STATUSES), Booking.ends_at > now)
        .order_by(Booking.starts_at, Booking.id)
    ))


def _booking_blockers(session: Session, actor: Actor, now: datetime) -> list[Blocker]:
    in_use, too_late = [], []
    for booking in _live_bookings(session, actor.user_id, now):
        if booking.checked_in_at is not None:
            in_use.append(str(booking.id))
            continue
        try:
            # The booking service's own rule: what the user may not cancel, deletion does not cancel either.
            booking_policy.check_cancellation(session, actor, booking, now=now)
        except booking_policy.CancellationDeadlinePassed:
            too_late.append(str(booking.id))
    blockers = []
    if in_use:
        blockers.append(Blocker("booking_in_use", "A booking of yours is checked in; check out first.", in_use))
    if too_late:
        blockers.append(Blocker(
            "booking_past_cancellation_deadline",
            "A booking of yours is past its cancellation deadline; wait until it is over or ask the facility to "
            "cancel it.", too_late))
    return blockers


def _order_blockers(session: Session, user_id: int) -> list[Blocker]:
    numbers = list(session.scalars(
        select(ServiceOrder.number).where(ServiceOrder.user_id == user_id,
                                          ServiceOrder.status.in_(ORDERS_IN_PROGRESS)).order_by(ServiceOrder.id)
    ))
    if not numbers:
        return []
    return [Blocker("order_in_progress", "A service order of yours is under way (agreed, on hold or waiting to be "
                    "closed); wait until it is closed or cancelled.", [n or "" for n in numbers])]


def _money_blockers(session: Session, user_id: int) -> list[Blocker]:
    accounts = _owned_accounts(session, user_id)
    owned = [a.id for a in accounts]
    if not owned:
        return []
    blockers = []
    unpaid = list(session.scalars(
        select(Invoice.number).where(Invoice.account_id.in_(owned), Invoice.status == InvoiceStatus.issued,
                                     Invoice.due_fen > 0).order_by(Invoice.period, Invoice.id)
    ))
    if unpaid:
        blockers.append(Blocker("unpaid_invoice", "An invoice of a funding account you own is not paid yet.", unpaid))
    # Charges no invoice has taken yet: what they leave to the invoice (beyond vouchers and the prepaid balance)
    # is owed once the month's invoice is issued.
    pending = dict(session.execute(
        select(Charge.id, Charge.account_id).where(
            Charge.account_id.in_(owned), ~select(InvoiceLine.id).where(InvoiceLine.charge_id == Charge.id).exists())
    ).tuples().all())
    due: dict[int, int] = {}
    for charge_id, parts in ledger.parts_of_charges(session, list(pending)).items():
        due[pending[charge_id]] = due.get(pending[charge_id], 0) + parts.invoice_fen
    codes = sorted(a.code for a in accounts if due.get(a.id, 0) > 0)
    if codes:
        blockers.append(Blocker("uninvoiced_charges", "A funding account you own has charges that go on its next "
                                "invoice; wait until that invoice is issued and paid.", codes))
    return blockers


def deletion_blockers(session: Session, user_id: int, *, now: datetime | None = None) -> list[Blocker]:
    """Everything that stops the user's data from being deleted now (empty: deletion may go ahead)."""
    now = now or utcnow()
    user = _user(session, user_id)
    actor = _actor_of(session, user)
    return [*_order_blockers(session, user.id), *_booking_blockers(session, actor, now),
            *_money_blockers(session, user.id)]


def _cancel_bookings(session: Session, actor: Actor, now: datetime, summary: DeletionSummary) -> None:
    for booking in _live_bookings(session, actor.user_id, now):
        # Through the booking service: the time is freed, the waitlist offered it, the holder told.
        booking_service.cancel_booking(session, actor, booking.id, now=now)
        billing_accounts.release_hold(session, (SourceKind.booking, booking.id), now=now)
        summary.add("bookings_cancelled")
    for entry in _rows(session, WaitlistEntry, WaitlistEntry.user_id == actor.user_id,
                       WaitlistEntry.status.in_(waitlist.OPEN_STATUSES)):
        waitlist.withdraw(session, actor, entry.id, now=now)
        summary.add("waitlist_entries_withdrawn")


def _cancel_orders(session: Session, actor: Actor, summary: DeletionSummary) -> None:
    ids = list(session.scalars(select(ServiceOrder.id).where(ServiceOrder.user_id == actor.user_id,
                                                             ServiceOrder.status.in_(ORDERS_NOT_AGREED))))
    for order_id in ids:
        orders.transition(session, actor, order_id, OrderStatus.cancelled, comment=CANCEL_COMMENT)
        billing_accounts.release_hold(session, (SourceKind.order, order_id))
        summary.add("orders_cancelled")


def _withdraw_demands(session: Session, actor: Actor, now: datetime, summary: DeletionSummary) -> None:
    rows = list(session.scalars(select(Demand).where(Demand.user_id == actor.user_id)))
    for demand in rows:
        if demand.status == DemandStatus.open:
            matching_demands.close_demand(session, actor, demand.id, now=now)
            summary.add("demands_withdrawn")
        if demand.text or demand.sample_type:
            demand.text, demand.sample_type = "", ""
            summary.add("texts_blanked")
    ids = [d.id for d in rows]
    if ids:
        # Matches were computed from the text (their explanations quote its words); the e-mails telling facilities
        # about the demand quote it too.
        session.execute(delete(DemandMatch).where(DemandMatch.demand_id.in_(ids)))
        for demand_id in ids:
            _scrub_jobs(session, Job.dedupe_key.startswith(f"demand_match:{demand_id}:", autoescape=True))


def _scrub_jobs(session: Session, condition: Any) -> int:
    """Empty the payloads of matching jobs; queued ones are cancelled (a running one finishes as it is)."""
    done = session.execute(
        update(Job).where(condition, Job.status == JobStatus.queued)
        .values(status=JobStatus.cancelled, payload="{}", finished_at=utcnow())
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    done += session.execute(
        update(Job).where(condition, Job.status.in_([JobStatus.done, JobStatus.failed, JobStatus.cancelled]))
        .values(payload="{}", last_error="").execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return int(done)


def _rows(session: Session, model: Any, *where: Any) -> list[Any]:
    return list(session.scalars(select(model).where(*where)))


def _end_access(session: Session, user: User, now: datetime, summary: DeletionSummary) -> None:
    summary.add("sessions_ended", service.end_all_web_sessions(session, user.id))
    for token in _rows(session, ApiToken, ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)):
        token.revoked_at = now
        summary.add("api_tokens_revoked")
    deleted = (("external_identities_deleted", ExternalIdentity, ExternalIdentity.user_id),
               ("password_resets_deleted", PasswordReset, PasswordReset.user_id),
               ("consents_deleted", OidcConsent, OidcConsent.user_id),
               ("notification_preferences_deleted", NotificationPreference, NotificationPreference.user_id))
    for name, model, column in deleted:
        for row in _rows(session, model, column == user.id):
            session.delete(row)
            summary.add(name)
    for feed in _rows(session, CalendarFeed, or_(CalendarFeed.owner_id == user.id, CalendarFeed.user_id == user.id)):
        session.delete(feed)
        summary.add("calendar_feeds_deleted")
    # What member systems were given: their access tokens stop working, unused codes can no longer be exchanged.
    session.execute(update(OidcAccessToken).where(OidcAccessToken.user_id == user.id,
                                                  OidcAccessToken.revoked_at.is_(None)).values(revoked_at=now))
    session.execute(update(OidcAuthorizationCode).where(OidcAuthorizationCode.user_id == user.id,
                                                        OidcAuthorizationCode.used_at.is_(None)).values(used_at=now))
    session.execute(delete(LoginState).where(LoginState.link_user_id == user.id))
    session.execute(delete(LoginThrottle).where(LoginThrottle.key == passwords.email_key(user.email)))
    # Answers kept for retried requests repeat what the user sent (purposes, texts).
    session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.user_id == user.id))
    summary.add("mails_scrubbed", _scrub_jobs(session, Job.payload.contains(user.email, autoescape=True)))
    for grant in _rows(session, RoleGrant, RoleGrant.user_id == user.id):
        roles.revoke_grant(session, None, grant.id)
        summary.add("role_grants_revoked")
    for qualification in _rows(session, Qualification, Qualification.user_id == user.id,
                               Qualification.revoked_at.is_(None)):
        qualification.revoked_at = now
        summary.add("qualifications_revoked")
    for member in _rows(session, AccountMember, AccountMember.user_id == user.id,
                        AccountMember.status.in_([MemberStatus.pending, MemberStatus.approved])):
        member.status, member.decided_at = MemberStatus.revoked, now
        summary.add("account_memberships_revoked")
    for expert in _rows(session, Expert, Expert.user_id == user.id):
        # The profile is the facility's directory entry, kept by its managers; it no longer signs in as anyone.
        expert.user_id = None
        summary.add("expert_profiles_unlinked")


def _blank_texts(session: Session, user_id: int, now: datetime, summary: DeletionSummary) -> None:
    for booking in _rows(session, Booking, Booking.user_id == user_id, Booking.kind == BookingKind.use,
                         or_(Booking.purpose != "", Booking.cancel_note != "")):
        booking.purpose, booking.cancel_note = "", ""
        summary.add("texts_blanked")
    for row in (_rows(session, BookingSeries, BookingSeries.user_id == user_id, BookingSeries.purpose != "")
                + _rows(session, WaitlistEntry, WaitlistEntry.user_id == user_id, WaitlistEntry.purpose != "")):
        row.purpose = ""
        summary.add("texts_blanked")
    for order in _rows(session, ServiceOrder, ServiceOrder.user_id == user_id):
        if order.contact_phone:
            order.contact_phone = ""
            summary.add("texts_blanked")
        rating = order_ratings.rating_of(session, order)
        if rating is not None and rating.comment:
            rating.comment = ""
            summary.add("texts_blanked")
    for card in _rows(session, TalentCard, TalentCard.user_id == user_id):
        # Unique per scheme still, and no longer the holder's: they can submit the card again under a new account.
        card.card_number, card.holder_name = f"deleted-{card.id}", ""
        if card.status in (CardStatus.pending, CardStatus.verified):
            card.status, card.decided_at = CardStatus.revoked, now
        summary.add("talent_cards_pseudonymised")


def _may_delete(actor: Actor | None, user_id: int) -> None:
    if actor is None or actor.user_id == user_id or roles.is_platform_admin(actor):
        return
    raise Forbidden("Only the user themself may have their personal data deleted.", field="user_id")


def delete_personal_data(session: Session, actor: Actor | None, user_id: int, confirm_email: str, *,
                         now: datetime | None = None) -> DeletionSummary:
    """Delete the user's personal data, keeping the ledger and the audit log under a pseudonymised user row.

    `actor` is the user themself, a platform administrator, or None for the operator at the command line.
    `confirm_email` must repeat the account's address (422 email_mismatch); 409 deletion_blocked lists what must
    be settled first (see deletion_blockers)."""
    now = now or utcnow()
    _may_delete(actor, user_id)
    user = _user(session, user_id, lock=True)
    if user.deleted_at is not None:
        raise Conflict("This account's personal data was deleted already.", field="user_id", code="already_deleted")
    if not isinstance(confirm_email, str) or confirm_email.strip().lower() != user.email:
        raise InvalidInput("Type the account's e-mail address to confirm.", field="confirm_email",
                           code="email_mismatch")
    blockers = deletion_blockers(session, user.id, now=now)
    if blockers:
        raise DeletionBlocked(blockers)
    me = _actor_of(session, user)
    summary = DeletionSummary(user_id=user.id, deleted_at=now)
    _cancel_bookings(session, me, now, summary)
    _cancel_orders(session, me, summary)
    _withdraw_demands(session, me, now, summary)
    _end_access(session, user, now, summary)
    _blank_texts(session, user.id, now, summary)
    # Last: the services above read the live account (its e-mail for the throttle, its roles for the rules).
    user.email = f"deleted-{user.id}@{DELETED_DOMAIN}"
    user.name = f"Deleted user {user.id}"
    user.password_hash = None
    user.is_active = False
    user.locale = None
    user.timezone = None
    user.deleted_at = now
    session.flush()
    return summary
