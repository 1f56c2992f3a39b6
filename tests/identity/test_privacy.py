"""Personal data: a user's export holds everything about them and nothing about anyone else; deletion is refused
while something still binds both sides, and otherwise removes every personal field from every table while the
ledger, the invoices and the audit chain stay intact. Through the service, the API, the pages and the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from labcommons.actor import Actor, Grant
from labcommons.app import create_app
from labcommons.audit import chain
from labcommons.audit.models import AuditEntry
from labcommons.billing import invoices
from labcommons.billing.models import (
    AccountDeposit,
    BillingAccount,
    BillingHold,
    CardStatus,
    Charge,
    Invoice,
    Payment,
    TalentCard,
    TalentCardScheme,
    Voucher,
    VoucherRedemption,
)
from labcommons.booking import calendar, recurrence, waitlist
from labcommons.booking.models import Booking, BookingPolicy, BookingStatus, WaitlistEntry, WaitlistStatus
from labcommons.cli import app as cli_app
from labcommons.config import get_settings
from labcommons.db import Base, Database, utcnow
from labcommons.errors import Forbidden, InvalidInput, Unauthenticated
from labcommons.identity import federation, passwords, privacy, roles
from labcommons.identity import service as identity
from labcommons.identity.models import (
    ExternalIdentity,
    IdentityProvider,
    OidcClient,
    OidcConsent,
    User,
)
from labcommons.matching.models import Demand, DemandMatch, DemandOffer, DemandStatus, OfferStatus
from labcommons.notifications import service as notifications
from labcommons.orders import messages, ratings
from labcommons.orders.models import OrderStatus, ServiceOrder
from tests.api_client import client_for
from tests.billing.billing_support import charging, check_ledger, give_voucher, open_account, rate_card
from tests.billing.invoice_support import post_charge
from tests.factories import World, grant, next_grid_day
from tests.orders.order_support import add_received_sample, add_service, new_order, walk_to
from tests.web.conftest import csrf_of, sign_in

EMAIL = "erin@example.org"
NAME = "Erin Qiao-Privacy"
PURPOSE = "imaging organoids of cohort Z-41"
SERIES_PURPOSE = "weekly calibration for cohort Z-41"
WAIT_PURPOSE = "hoping to image cohort Z-41 sooner"
PHONE = "+86 138 0013 8000"
RATING = "Careful work, thank you from cohort Z-41"
DEMAND = "lipid profiling of cohort Z-41 plasma"
CARD = "TF-2026-778899"
SUBJECT = "sc-erin-77"
EXTERNAL_EMAIL = "erin.q@sc-id.example"
BOB_PURPOSE = "bob's confidential lipidomics run"
PERSONAL = (EMAIL, NAME, PURPOSE, SERIES_PURPOSE, WAIT_PURPOSE, PHONE, RATING, DEMAND, CARD, SUBJECT, EXTERNAL_EMAIL)
PLATFORM = Actor(user_id=0, email="ops@example.org", name="Ops", institution_id=None, region_code="CQ",
                 grants=(Grant(role="platform_admin"),))


def add_erin(world: World) -> int:
    """Erin of CQ-UNI, with a password and an all-scope token, in `world` like alice, bob and carol."""
    with world.db.unit_of_work() as s:
        user = identity.create_user(s, email=EMAIL, name=NAME, institution_code="CQ-UNI", password="correct horse")
        world.tokens["erin"] = identity.create_api_token(s, user, name="test")
        user_id = user.id
    with world.db.unit_of_work(write=False) as s:
        world.actors["erin"] = identity.actor_for(identity.find_user(s, EMAIL))
    return user_id


def as_erin(world: World) -> dict[str, str]:
    return world.headers("erin")


def warm(api: TestClient, world: World) -> None:
    """Use erin's token once, so that its last-used stamp (once a minute) is not what a later request changes."""
    assert api.get("/api/v1/me", headers=as_erin(world)).status_code == 200


@pytest.fixture
def api(world: World) -> TestClient:
    """One app per test: building it is not free."""
    return client_for(world.db)


@dataclass
class Rich:
    """Erin with a bit of everything; ids of what the tests look at."""

    world: World
    user_id: int
    account: int
    future_booking: int
    bob_booking: int
    closed_order: int
    draft_order: int
    demand: int


@pytest.fixture
def rich(world: World, api: TestClient) -> Rich:
    db = world.db
    erin_id = add_erin(world)
    erin = world.actors["erin"]
    alice = grant(world, "alice")  # staff of CQ-LAB: answers erin's orders
    # Orders first, while CQ-LAB does not charge yet (no funding account to choose).
    svc = add_service(world)
    closed = new_order(world, svc, "erin")
    draft = new_order(world, svc, "erin")
    with db.unit_of_work() as s:
        messages.post_message(s, erin, closed, "The samples ship on Monday.")
        messages.post_message(s, alice, closed, "Received in good order.")
        s.execute(update(ServiceOrder).where(ServiceOrder.id.in_([closed, draft])).values(contact_phone=PHONE))
    add_received_sample(world, closed)
    walk_to(world, closed, OrderStatus.closed)
    with db.unit_of_work() as s:
        ratings.rate_order(s, erin, closed, 4, RATING)

    charging(world)
    rate_card(world)
    account = open_account(world, "erin", "ERIN-GRANT")
    bob_account = open_account(world, "bob", "BOB-GRANT", members=("erin",))
    voucher_id = give_voucher(world, account, 50_000)
    client = api
    start = next_grid_day(3)
    r = client.post("/api/v1/bookings", headers={**as_erin(world), "Idempotency-Key": "erin-1"}, json={
        "instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
        "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": PURPOSE, "account_id": account})
    assert r.status_code == 201, r.text
    future_booking = r.json()["id"]
    bob_start = next_grid_day(4)
    r = client.post("/api/v1/bookings", headers=world.headers("bob"), json={
        "instrument_id": world.instruments["CONF"], "starts_at": bob_start.isoformat(),
        "ends_at": (bob_start + timedelta(hours=1)).isoformat(), "purpose": BOB_PURPOSE})
    assert r.status_code == 201, r.text
    bob_booking = r.json()["id"]
    now = utcnow()
    period = invoices.previous_period(now)
    posted = invoices.period_bounds(period)[0] + timedelta(days=3)
    with db.unit_of_work() as s:
        waitlist.join(s, erin, world.instruments["CONF"], bob_start, bob_start + timedelta(hours=1), WAIT_PURPOSE)
        series = recurrence.book_series(s, erin, world.instruments["CONF"], next_grid_day(5, hour=6), 60,
                                        "FREQ=WEEKLY;COUNT=2", SERIES_PURPOSE, True, account_id=account)
        assert series.status == "booked" and series.bookable_count == 2
        past = now.replace(minute=0, second=0, microsecond=0) - timedelta(days=3)
        s.add(Booking(instrument_id=world.instruments["CONF"], user_id=erin_id, starts_at=past,
                      ends_at=past + timedelta(hours=1), status=BookingStatus.completed, purpose=PURPOSE))
        erin_account = s.get(BillingAccount, account)
        voucher = s.get(Voucher, voucher_id)
        assert erin_account is not None and voucher is not None
        post_charge(s, world, erin_account, 30_000, at=posted, facility="CQ-LAB", voucher=voucher,
                    voucher_fen=10_000, user="erin")
        bob_side = s.get(BillingAccount, bob_account)
        assert bob_side is not None
        post_charge(s, world, bob_side, 12_000, at=posted, facility="CQ-LAB", user="erin")
        made = invoices.invoice_account(s, account, period, now=now)
        assert made is not None and made.due_fen == 20_000
        invoices.mark_paid(s, PLATFORM, made.id)

        demand = Demand(user_id=erin_id, text=DEMAND, sample_type="frozen plasma", status=DemandStatus.open)
        s.add(demand)
        s.flush()
        s.add(DemandMatch(demand_id=demand.id, rank=1, kind="service", item_id=svc,
                          facility_id=world.facilities["CQ-LAB"], score=0.7, explanation={"matched_terms": ["lipid"]}))
        s.add(DemandOffer(demand_id=demand.id, facility_id=world.facilities["CQ-LAB"], service_id=svc,
                          message="We can run it next week.", price_fen=80_000, created_by=alice.user_id))
        s.add(TalentCardScheme(code="tianfu", region_code="SC", name_zh="天府英才卡", name_en="Tianfu Talent Card"))
        s.flush()
        s.add(TalentCard(user_id=erin_id, scheme_code="tianfu", card_number=CARD, holder_name=NAME,
                         status=CardStatus.verified))
        notifications.set_preferences(s, erin_id, {"reminder": False})
        provider = IdentityProvider(name="sc-id", region_code="SC", issuer="https://sc-id.example", client_id="c",
                                    trusted_for_linking=True)
        client_row = OidcClient(client_id="lims", secret_hash="0" * 64, name="LIMS",
                                redirect_uris="https://lims.example/cb")
        s.add_all([provider, client_row])
        s.flush()
        s.add(ExternalIdentity(user_id=erin_id, provider_id=provider.id, issuer=provider.issuer, subject=SUBJECT,
                               email=EXTERNAL_EMAIL, email_verified=True))
        s.add(OidcConsent(user_id=erin_id, client_pk=client_row.id, scope="openid profile"))
        user = s.get(User, erin_id)
        assert user is not None
        roles.grant_role(s, None, user, "facility_staff", facility_id=world.facilities["SC-UNI"])
        calendar.create_feed(s, erin)
        identity.start_web_session(s, user)
        assert passwords.request_reset(s, EMAIL) is not None
        passwords.record_failure(s, passwords.login_keys(EMAIL, "203.0.113.9"))
    with db.unit_of_work() as s:
        from labcommons.booking import qualifications

        qualifications.grant(s, alice, EMAIL, instrument_id=world.instruments["CONF"], note="trained on the LSM")
    return Rich(world=world, user_id=erin_id, account=account, future_booking=future_booking,
                bob_booking=bob_booking, closed_order=closed, draft_order=draft, demand=demand.id)


def export_of(db: Database, user_id: int) -> dict[str, Any]:
    with db.unit_of_work(write=False) as s:
        return privacy.export_personal_data(s, user_id)


# Request counters of the write rate limit: every request moves them, whatever it changes.
COUNTERS = {"rate_limit_bucket"}


def dump(db: Database) -> str:
    """Every row of every table but the counters, as text: what a search of a database dump would find."""
    parts = []
    with db.unit_of_work(write=False) as s:
        for table in Base.metadata.sorted_tables:
            if table.name in COUNTERS:
                continue
            for row in s.execute(select(table)).all():
                parts.append(f"{table.name}: {tuple(row)!r}")
    return "\n".join(parts)


def verified(db: Database) -> bool:
    with db.unit_of_work(write=False) as s:
        report = chain.verify(s)
        return report.ok and report.entries > 0


def ledger_state(s: Session) -> dict[str, Any]:
    """The ledger's sums and the invoices as they stand (compared before and after a deletion)."""
    def total(column: Any) -> int:
        return int(s.scalar(select(func.coalesce(func.sum(column), 0))) or 0)

    return {
        "charges": total(Charge.amount_fen), "charge_rows": s.scalar(select(func.count()).select_from(Charge)),
        "payments": total(Payment.amount_fen), "redeemed": total(VoucherRedemption.amount_fen),
        "deposits": total(AccountDeposit.amount_fen), "balances": total(BillingAccount.balance_fen),
        "vouchers": total(Voucher.balance_fen),
        "charges_by_user": sorted(s.execute(select(Charge.user_id, Charge.account_id, Charge.amount_fen)).all()),
        "invoices": sorted(s.execute(select(Invoice.number, Invoice.account_id, Invoice.total_fen, Invoice.due_fen,
                                            Invoice.status, Invoice.paid_at)).all()),
    }


# --- export ---------------------------------------------------------------------------------------------------


def test_the_export_holds_everything_about_the_user_and_nothing_about_others(rich: Rich, api: TestClient) -> None:
    world = rich.world
    r = api.get("/api/v1/me/export", headers=as_erin(world))
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == f'attachment; filename="labcommons-personal-data-{rich.user_id}.json"'
    doc = r.json()
    assert (doc["schema"], doc["schema_version"]) == ("labcommons.personal-data", 1)
    assert doc["profile"]["email"] == EMAIL and doc["profile"]["name"] == NAME
    assert doc["profile"]["institution"]["code"] == "CQ-UNI"
    assert doc["external_identities"] == [{
        "provider": "sc-id", "issuer": "https://sc-id.example", "subject": SUBJECT, "email": EXTERNAL_EMAIL,
        "email_verified": True, "created_at": doc["external_identities"][0]["created_at"], "last_login_at": None}]
    assert [s["method"] for s in doc["sessions"]] == ["password"]
    assert [t["name"] for t in doc["api_tokens"]] == ["test"]
    assert not any("hash" in key for t in doc["api_tokens"] for key in t)
    assert world.tokens["erin"] not in r.text
    assert doc["role_grants"][0]["role"] == "facility_staff" and doc["role_grants"][0]["code"] == "SC-UNI-F"
    assert doc["qualifications"][0]["instrument"]["code"] == "CQ-CONF"

    bookings = {b["id"]: b for b in doc["bookings"]}
    assert len(bookings) == 4  # one via the API, two of the series, one in the past
    booked = bookings[rich.future_booking]
    assert booked["instrument"] == {"code": "CQ-CONF", "name_zh": "激光共聚焦显微镜", "name_en": "Confocal microscope"}
    assert booked["purpose"] == PURPOSE and booked["status"] == "confirmed"
    assert booked["starts_at"].endswith("+00:00")
    assert datetime.fromisoformat(booked["starts_at"]) == next_grid_day(3)
    assert [s["purpose"] for s in doc["booking_series"]] == [SERIES_PURPOSE]
    assert [(w["purpose"], w["status"]) for w in doc["waitlist"]] == [(WAIT_PURPOSE, "waiting")]

    orders = {o["status"]: o for o in doc["service_orders"]}
    assert set(orders) == {"closed", "draft"}
    closed = orders["closed"]
    assert closed["contact_phone"] == PHONE and closed["facility"]["code"] == "CQ-LAB-F"
    assert [(m["from"], m["body"]) for m in closed["messages"]] == [
        ("you", "The samples ship on Monday."), ("facility", "Received in good order.")]
    assert [s["description"] for s in closed["samples"]] == ["block 1"]
    assert [step["to"] for step in closed["steps"]][-1] == "closed"
    assert [(x["score"], x["comment"]) for x in doc["ratings"]] == [(4, RATING)]

    assert {(a["code"], a["role"]) for a in doc["funding_accounts"]} == {
        ("ERIN-GRANT", "owner"), ("ERIN-GRANT", "member"), ("BOB-GRANT", "member")}
    assert sorted((c["account"], c["amount_fen"], c["paid"]["voucher_fen"]) for c in doc["charges"]) == [
        ("BOB-GRANT", 12_000, 0), ("ERIN-GRANT", 30_000, 10_000)]
    assert [(i["total_fen"], i["due_fen"], i["status"]) for i in doc["invoices"]] == [(30_000, 20_000, "paid")]
    assert [(v["amount_fen"], v["balance_fen"]) for v in doc["vouchers"]] == [(50_000, 40_000)]
    assert [(c["card_number"], c["holder_name"], c["status"]) for c in doc["talent_cards"]] == [
        (CARD, NAME, "verified")]
    assert doc["demands"][0]["text"] == DEMAND
    assert [(o["message"], o["facility"]["code"]) for o in doc["demands"][0]["offers"]] == [
        ("We can run it next week.", "CQ-LAB-F")]
    assert doc["notification_preferences"]["reminder"] is False
    assert doc["notification_preferences"]["created"] is True
    assert len(doc["calendar_feeds"]) == 1
    # What erin did herself (through her token, her sign-in); what services did for her carries no actor.
    actions = {e["action"] for e in doc["audit_entries"]}
    assert {"booking.created", "login"} <= actions
    assert set(doc["audit_entries"][0]) == {"seq", "at", "action", "entity_type", "entity_id"}

    # Nothing of bob's (his booking, his address, the account he owns beyond its code) nor of the staff member.
    for other in (BOB_PURPOSE, "bob@example.org", "alice@example.org", "Alice", "Bob"):
        assert other not in r.text, other


def test_the_export_needs_the_account_scope_and_a_sign_in(world: World, api: TestClient) -> None:
    add_erin(world)
    client = api
    assert client.get("/api/v1/me/export").status_code == 401
    with world.db.unit_of_work() as s:
        token = identity.create_api_token(s, identity.find_user(s, EMAIL), name="narrow", scopes=["bookings:read"])
    r = client.get("/api/v1/me/export", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"


# --- deletion -------------------------------------------------------------------------------------------------


def test_deletion_erases_every_personal_field_and_keeps_ledger_invoices_and_audit_chain(rich: Rich,
                                                                                          api: TestClient) -> None:
    world, db = rich.world, rich.world.db
    before = dump(db)
    for value in PERSONAL:
        assert value in before, value  # the search below can find each of them
    assert verified(db)
    with db.unit_of_work(write=False) as s:
        ledger_before = ledger_state(s)
        last_seq = s.scalar(select(func.max(AuditEntry.seq)))
    old_token = world.tokens["erin"]

    r = api.post("/api/v1/me/deletion", headers=as_erin(world), json={"confirm_email": "Erin@Example.org "})
    assert r.status_code == 200, r.text
    counts = r.json()["counts"]
    assert counts["bookings_cancelled"] == 3  # the API booking and both occurrences of the series
    assert counts["waitlist_entries_withdrawn"] == 1 and counts["orders_cancelled"] == 1
    assert counts["demands_withdrawn"] == 1 and counts["external_identities_deleted"] == 1

    after = dump(db)
    for value in PERSONAL:
        assert value not in after, value
    assert BOB_PURPOSE in after  # only erin's data went
    with db.unit_of_work(write=False) as s:
        assert ledger_state(s) == ledger_before
        check_ledger(s)
        user = s.get(User, rich.user_id)
        assert user is not None
        assert (user.email, user.name) == (f"deleted-{user.id}@deleted.invalid", f"Deleted user {user.id}")
        assert user.password_hash is None and not user.is_active and user.deleted_at is not None
        assert user.locale is None and user.timezone is None
        booking = s.get(Booking, rich.future_booking)
        assert booking is not None and booking.status == BookingStatus.cancelled and booking.cancel_kind == "user"
        assert s.scalar(select(BillingHold.released_at).where(BillingHold.source_id == booking.id)) is not None
        # bob's slot was freed of erin's wait; the closed order, its messages and samples stay; the draft is gone
        entry = s.scalars(select(WaitlistEntry)).one()
        assert entry.status == WaitlistStatus.withdrawn
        orders = {o.id: o for o in s.scalars(select(ServiceOrder))}
        assert orders[rich.closed_order].status == OrderStatus.closed
        assert orders[rich.draft_order].status == OrderStatus.cancelled
        assert [m.message.body for m in messages.messages_of(s, orders[rich.closed_order])] == [
            "The samples ship on Monday.", "Received in good order."]
        demand = s.get(Demand, rich.demand)
        assert demand is not None and demand.status == DemandStatus.closed and demand.text == ""
        assert s.scalars(select(DemandOffer.status)).one() == OfferStatus.declined
        card = s.scalars(select(TalentCard)).one()
        assert card.status == CardStatus.revoked
        assert roles.grants_of(s, rich.user_id) == ()
        # the deletion is in the audit log, done by erin's token, and the chain still verifies
        entry_row = s.scalars(select(AuditEntry).where(AuditEntry.seq > (last_seq or 0),
                                                       AuditEntry.action == "user.updated",
                                                       AuditEntry.entity_id == str(rich.user_id))).one()
        assert (entry_row.actor_id, entry_row.actor_kind) == (rich.user_id, "token")
        changes = json.loads(entry_row.changes)
        assert changes["after"]["deleted_at"] and changes["after"]["is_active"] is False
        assert changes["before"]["email"].startswith("hmac:")
    assert verified(db)

    # Nobody signs in as erin any more: not with the password, the token, nor the identity service.
    with db.unit_of_work() as s:
        with pytest.raises(Unauthenticated):
            identity.verify_password(s, EMAIL, "correct horse")
        with pytest.raises(Unauthenticated):
            identity.authenticate_token(s, old_token)
    assert api.get("/api/v1/me", headers={"Authorization": f"Bearer {old_token}"}).status_code == 401


def test_the_old_identity_signs_up_as_a_fresh_account(world: World) -> None:
    erin_id = add_erin(world)
    with world.db.unit_of_work() as s:
        provider = IdentityProvider(name="sc-id", region_code="SC", issuer="https://sc-id.example", client_id="c")
        s.add(provider)
        s.flush()
        s.add(ExternalIdentity(user_id=erin_id, provider_id=provider.id, issuer=provider.issuer, subject=SUBJECT,
                               email=EMAIL, email_verified=True))
        provider_id = provider.id
    with world.db.unit_of_work() as s:
        privacy.delete_personal_data(s, None, erin_id, EMAIL)
    pending = federation.PendingLogin(
        provider_id=provider_id, name="sc-id", issuer="https://sc-id.example", client_id="c", client_secret="",
        scopes="openid email profile", provider_enabled=True, browser_hash="x",
        expires_at=utcnow() + timedelta(minutes=5), nonce="n", code_verifier="v", next_path="/", link_user_id=None)
    with world.db.unit_of_work() as s:
        fresh = federation.account_for(s, pending, {"sub": SUBJECT, "email": EMAIL, "email_verified": True,
                                                    "name": NAME})
        assert fresh.id != erin_id and fresh.email == EMAIL and fresh.is_active
        fresh_id = fresh.id
    fresh_export = export_of(world.db, fresh_id)
    assert fresh_export["profile"]["email"] == EMAIL and fresh_export["api_tokens"] == []
    assert [i["subject"] for i in fresh_export["external_identities"]] == [SUBJECT]


def _blocked(world: World, erin_id: int, setup: str, api: TestClient | None = None) -> None:
    """Put erin in a state deletion must wait for."""
    db = world.db
    now = utcnow()
    if setup == "order_in_progress":
        order = new_order(world, add_service(world), "erin")
        walk_to(world, order, OrderStatus.accepted)
    elif setup in ("unpaid_invoice", "uninvoiced_charges"):
        account = open_account(world, "erin", "ERIN-GRANT")
        period = invoices.previous_period(now)
        with db.unit_of_work() as s:
            row = s.get(BillingAccount, account)
            assert row is not None
            post_charge(s, world, row, 9_000, at=invoices.period_bounds(period)[0] + timedelta(days=1),
                        facility="CQ-LAB", user="erin")
            if setup == "unpaid_invoice":
                assert invoices.invoice_account(s, account, period, now=now) is not None
    elif setup == "booking_in_use":
        start = now.replace(second=0, microsecond=0) - timedelta(minutes=20)
        with db.unit_of_work() as s:
            s.add(Booking(instrument_id=world.instruments["CONF"], user_id=erin_id, starts_at=start,
                          ends_at=start + timedelta(hours=1), status=BookingStatus.confirmed, purpose=PURPOSE,
                          checked_in_at=start))
    else:
        start = next_grid_day(1)
        assert api is not None
        r = api.post("/api/v1/bookings", headers=as_erin(world), json={
            "instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
            "ends_at": (start + timedelta(hours=1)).isoformat(), "purpose": PURPOSE})
        assert r.status_code == 201, r.text
        with db.unit_of_work() as s:
            s.add(BookingPolicy(instrument_id=world.instruments["CONF"], cancellation_deadline_hours=72))


@pytest.mark.parametrize("reason", ["order_in_progress", "unpaid_invoice", "uninvoiced_charges", "booking_in_use",
                                    "booking_past_cancellation_deadline"])
def test_deletion_waits_while_something_binds_both_sides(world: World, api: TestClient, reason: str) -> None:
    erin_id = add_erin(world)
    _blocked(world, erin_id, reason, api)
    warm(api, world)
    before = dump(world.db)
    r = api.post("/api/v1/me/deletion", headers=as_erin(world), json={"confirm_email": EMAIL})
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"] == "deletion_blocked" and [x["code"] for x in body["reasons"]] == [reason]
    assert body["reasons"][0]["items"] and body["reasons"][0]["message"]
    assert dump(world.db) == before  # a refused request changes nothing
    assert api.get("/api/v1/me", headers=as_erin(world)).status_code == 200


def test_what_does_not_bind_the_user_does_not_block(world: World) -> None:
    """Charges on someone else's account, a fully prepaid or voucher-paid charge, a closed order: deletion goes on."""
    erin_id = add_erin(world)
    bob_account = open_account(world, "bob", "BOB-GRANT", members=("erin",))
    own = open_account(world, "erin", "ERIN-GRANT")
    voucher_id = give_voucher(world, own, 10_000)
    walk_to(world, new_order(world, add_service(world), "erin"), OrderStatus.closed)
    with world.db.unit_of_work() as s:
        bob_side, mine, voucher = s.get(BillingAccount, bob_account), s.get(BillingAccount, own), s.get(Voucher,
                                                                                                       voucher_id)
        assert bob_side is not None and mine is not None and voucher is not None
        post_charge(s, world, bob_side, 5_000, at=utcnow(), facility="CQ-LAB", user="erin")
        post_charge(s, world, mine, 4_000, at=utcnow(), facility="CQ-LAB", user="erin", voucher=voucher,
                    voucher_fen=4_000)
        assert privacy.deletion_blockers(s, erin_id) == []
        summary = privacy.delete_personal_data(s, None, erin_id, EMAIL)
        assert summary.counts["account_memberships_revoked"] == 2


@pytest.mark.parametrize("body,code", [({"confirm_email": "bob@example.org"}, "email_mismatch"),
                                       ({"confirm_email": ""}, "email_mismatch"),
                                       ({}, "missing_field"),
                                       ({"confirm_email": EMAIL, "extra": 1}, "invalid_input")])
def test_a_wrong_confirmation_is_422_naming_it_and_changes_nothing(world: World, api: TestClient,
                                                                    body: dict[str, Any], code: str) -> None:
    add_erin(world)
    warm(api, world)
    before = dump(world.db)
    r = api.post("/api/v1/me/deletion", headers=as_erin(world), json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == code and r.json()["field"] in ("confirm_email", "extra")
    assert dump(world.db) == before


def test_only_the_user_or_the_platform_deletes(world: World) -> None:
    erin_id = add_erin(world)
    with world.db.unit_of_work() as s:
        with pytest.raises(Forbidden):
            privacy.delete_personal_data(s, world.actors["bob"], erin_id, EMAIL)
        with pytest.raises(InvalidInput):
            privacy.delete_personal_data(s, PLATFORM, erin_id, "bob@example.org")
        privacy.delete_personal_data(s, PLATFORM, erin_id, EMAIL)
    with world.db.unit_of_work() as s, pytest.raises(Exception, match="deleted already"):
        privacy.delete_personal_data(s, None, erin_id, f"deleted-{erin_id}@deleted.invalid")


# --- pages ----------------------------------------------------------------------------------------------------


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    add_erin(world)
    with TestClient(create_app(db=world.db)) as test_client:
        yield test_client


@pytest.mark.parametrize("lang,words", [("en", ["Your personal data", "Download my data (JSON)",
                                                "What is kept, and why", "Delete my personal data"]),
                                        ("zh_CN", ["个人信息", "下载", "删除"])])
def test_the_privacy_page_explains_export_and_deletion(client: TestClient, lang: str, words: list[str]) -> None:
    assert client.get("/account/privacy", follow_redirects=False).status_code == 303
    sign_in(client, "erin")
    assert 'href="/account/privacy"' in client.get("/account").text
    page = client.get(f"/account/privacy?lang={lang}")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    for word in words:
        assert word in page.text, word
    assert 'href="/account/privacy/export.json"' in page.text and EMAIL in page.text
    download = client.get("/account/privacy/export.json")
    assert download.status_code == 200 and download.headers["content-disposition"].startswith("attachment;")
    assert download.json()["profile"]["email"] == EMAIL


def test_the_delete_form_checks_csrf_and_the_typed_address(world: World, client: TestClient) -> None:
    sign_in(client, "erin")
    csrf = csrf_of(client.get("/account/privacy").text)
    before = dump(world.db)
    forged = client.post("/account/privacy/delete", data={"csrf_token": "forged", "confirm_email": EMAIL})
    assert forged.status_code == 403
    wrong = client.post("/account/privacy/delete?lang=en", data={"csrf_token": csrf, "confirm_email": "x@y.org"})
    assert wrong.status_code == 422 and 'id="delete-error"' in wrong.text and 'value="x@y.org"' in wrong.text
    assert dump(world.db) == before


def test_a_blocked_deletion_shows_its_reasons_on_the_page(world: World, client: TestClient) -> None:
    with world.db.unit_of_work(write=False) as s:
        erin_id = identity.find_user(s, EMAIL).id
    _blocked(world, erin_id, "order_in_progress")
    sign_in(client, "erin")
    page = client.get("/account/privacy?lang=en")
    assert 'data-blocker="order_in_progress"' in page.text and "under way" in page.text
    refused = client.post("/account/privacy/delete?lang=zh_CN",
                          data={"csrf_token": csrf_of(page.text), "confirm_email": EMAIL})
    assert refused.status_code == 409 and 'data-blocker="order_in_progress"' in refused.text
    assert client.get("/account").status_code == 200  # still signed in, nothing deleted


def test_deleting_through_the_page_signs_out_and_confirms(world: World, client: TestClient) -> None:
    sign_in(client, "erin")
    csrf = csrf_of(client.get("/account/privacy").text)
    done = client.post("/account/privacy/delete?lang=zh_CN", data={"csrf_token": csrf, "confirm_email": EMAIL})
    assert done.status_code == 200, done.text
    assert 'id="deleted-notice"' in done.text and "已删除" in done.text
    assert NAME not in done.text and EMAIL not in done.text
    assert "labcommons_session" in done.headers.get("set-cookie", "")
    assert client.get("/account", follow_redirects=False).status_code == 303
    form = client.get("/login")
    again = client.post("/login", data={"csrf_token": csrf_of(form.text), "email": EMAIL,
                                        "password": "correct horse", "next": "/"}, follow_redirects=False)
    assert again.status_code != 303


# --- command line ---------------------------------------------------------------------------------------------


@pytest.fixture
def cli(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_the_cli_exports_and_deletes(world: World, cli: CliRunner, tmp_path: Path) -> None:
    erin_id = add_erin(world)
    out = tmp_path / "erin.json"
    written = cli.invoke(cli_app, ["users", "export", EMAIL, "--out", str(out)])
    assert written.exit_code == 0, written.output
    assert json.loads(out.read_text("utf-8"))["profile"]["name"] == NAME and "api_tokens" in written.output
    printed = cli.invoke(cli_app, ["users", "export", EMAIL])
    assert printed.exit_code == 0 and json.loads(printed.output)["profile"]["id"] == erin_id
    assert cli.invoke(cli_app, ["users", "export", "nobody@example.org"]).exit_code == 2

    unconfirmed = cli.invoke(cli_app, ["users", "delete", EMAIL])
    assert unconfirmed.exit_code == 2 and "--yes" in unconfirmed.output
    _blocked(world, erin_id, "order_in_progress")
    blocked = cli.invoke(cli_app, ["users", "delete", EMAIL, "--yes"])
    assert blocked.exit_code == 2 and "Deletion must wait" in blocked.output
    with world.db.unit_of_work() as s:
        s.execute(update(ServiceOrder).values(status=OrderStatus.closed))
    deleted = cli.invoke(cli_app, ["users", "delete", EMAIL, "--yes"])
    assert deleted.exit_code == 0, deleted.output
    assert "sessions ended" in deleted.output
    with world.db.unit_of_work(write=False) as s:
        user = s.get(User, erin_id)
        assert user is not None and user.deleted_at is not None and user.email != EMAIL
    assert verified(world.db)
    assert cli.invoke(cli_app, ["users", "delete", EMAIL, "--yes"]).exit_code == 2  # no such user any more
    with world.db.unit_of_work() as s:  # the address is free for a new account
        assert identity.create_user(s, email=EMAIL, name=NAME, institution_code="CQ-UNI").id != erin_id
