"""Billing pages: my accounts, one account, a facility's rates and charges, a region's vouchers, and the account
choice in the booking and order forms; in English and Chinese, refused to the wrong person."""

from __future__ import annotations

import re
from datetime import date, timedelta
from zoneinfo import ZoneInfo

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.billing import accounts, rates
from labcommons.billing.models import (
    AccountDeposit,
    AccountMember,
    BillingAccount,
    BillingHold,
    Charge,
    MemberStatus,
    PayerCategory,
    Rate,
    RateUnit,
    SourceKind,
    Voucher,
    VoucherRecognition,
    VoucherStatus,
)
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.factories import World, actor_of, grant, next_grid_day
from tests.orders.order_support import add_service
from tests.web.conftest import csrf_of, flash_of, page_csrf, sign_in

SHANGHAI = ZoneInfo("Asia/Shanghai")


def english(client: TestClient) -> None:
    client.cookies.set("lang", "en")


def chinese(client: TestClient) -> None:
    client.cookies.set("lang", "zh_CN")


def open_account(world: World, owner: str, code: str, **fields: object) -> int:
    with world.db.unit_of_work() as s:
        return accounts.create_account(s, actor_of(world, owner), code=code, name=f"Grant {code}",
                                       **fields).id  # type: ignore[arg-type]


def count(world: World, model: type, *where: object) -> int:
    with world.db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(model).where(*where)) or 0)  # type: ignore[arg-type]


def grant_scope(world: World, user: str, role: str, **scope: object) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, f"{user}@example.org"), role, **scope)  # type: ignore[arg-type]


def invalid(html: str, name: str) -> bool:
    return re.search(rf'name="{name}"[^>]*aria-invalid="true"', html) is not None


def charging(world: World, *, instrument: str = "CONF", fen: int = 12_000) -> None:
    """CQ-LAB charges, with an hourly price of its instrument for academics of the region."""
    with world.db.unit_of_work() as s:
        rates.save_policy(s, None, world.facilities["CQ-LAB"], basis="booked", increment_minutes=30)
        rates.set_rate(s, None, instrument_id=world.instruments[instrument], category=PayerCategory.academic_region,
                       unit=RateUnit.hour, amount_fen=fen, effective_from=date.today() - timedelta(days=30))


# --- my accounts ---------------------------------------------------------------------------------------------------


def test_billing_home_renders_in_both_languages_and_opens_an_account(client: TestClient, world: World) -> None:
    anonymous = client.get("/billing", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/login")
    sign_in(client, "bob")
    chinese(client)
    page = client.get("/billing")
    assert page.status_code == 200 and 'href="/billing"' in page.text and "开设账户" in page.text
    english(client)
    page = client.get("/billing")
    assert "My funding accounts" in page.text and "You have no funding account yet" in page.text
    data = {"csrf_token": csrf_of(page.text), "code": "NSFC-1", "name": "Omics grant", "kind": "grant",
            "limit": "12.345"}
    for bad in ("12.345", "-1"):
        answer = client.post("/billing/accounts", data={**data, "limit": bad})
        assert answer.status_code == 422 and invalid(answer.text, "limit")
        assert "at most two decimals" in answer.text and 'value="Omics grant"' in answer.text
    assert count(world, BillingAccount) == 0
    made = client.post("/billing/accounts", data={**data, "limit": "5,000.50"}, follow_redirects=False)
    assert made.status_code == 303 and "NSFC-1" in flash_of(made)
    with world.db.unit_of_work(write=False) as s:
        account = s.scalars(select(BillingAccount)).one()
        assert (account.code, account.limit_fen) == ("NSFC-1", 500_050)
    listing = client.get("/billing")
    assert 'data-account="NSFC-1"' in listing.text and "¥5,000.50" in listing.text
    taken = client.post("/billing/accounts", data={**data, "limit": ""})
    assert taken.status_code == 409 and invalid(taken.text, "code")


def test_joining_by_code_and_the_owner_deciding(client: TestClient, world: World) -> None:
    account_id = open_account(world, "bob", "G-100")
    english(client)
    sign_in(client, "alice")
    csrf = page_csrf(client)
    unknown = client.post("/billing/join", data={"csrf_token": csrf, "code": "NOPE"})
    assert unknown.status_code == 404 and invalid(unknown.text, "code")
    joined = client.post("/billing/join", data={"csrf_token": csrf, "code": "G-100"}, follow_redirects=False)
    assert joined.status_code == 303 and "owner will approve" in flash_of(joined)
    assert "G-100" in client.get("/billing").text  # listed as waiting
    assert client.get(f"/billing/accounts/{account_id}").status_code == 404  # not approved yet

    sign_in(client, "bob")
    page = client.get(f"/billing/accounts/{account_id}")
    assert page.status_code == 200 and "Awaiting approval" in page.text
    with world.db.unit_of_work(write=False) as s:
        member_id = s.scalars(select(AccountMember.id).where(AccountMember.status == MemberStatus.pending)).one()
    url = f"/billing/accounts/{account_id}/members/{member_id}"
    bad = client.post(url, data={"csrf_token": csrf_of(page.text), "status": "approved", "limit": "1.234"})
    assert bad.status_code == 422 and invalid(bad.text, "limit")
    assert count(world, AccountMember, AccountMember.status == MemberStatus.approved) == 1
    ok = client.post(url, data={"csrf_token": csrf_of(page.text), "status": "approved", "limit": "100"},
                     follow_redirects=False)
    assert ok.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        member = s.get(AccountMember, member_id)
        assert member is not None and (member.status, member.limit_fen) == (MemberStatus.approved, 10_000)
    chinese(client)
    assert client.get(f"/billing/accounts/{account_id}").status_code == 200

    sign_in(client, "alice")  # an approved member sees the account, not its members
    member_view = client.get(f"/billing/accounts/{account_id}")
    assert member_view.status_code == 200 and 'id="members"' not in member_view.text
    sign_in(client, "carol")
    assert client.get(f"/billing/accounts/{account_id}").status_code == 404
    forged = client.post(url, data={"csrf_token": page_csrf(client), "status": "revoked"})
    assert forged.status_code == 404


def test_deposits_are_recorded_by_the_institution_admin_only(client: TestClient, world: World) -> None:
    account_id = open_account(world, "bob", "PRE-1", prepaid=True)
    grant_scope(world, "carol", "institution_admin", institution_id=world.institutions["CQ-UNI"])
    english(client)
    sign_in(client, "bob")
    assert "Record deposit" not in client.get(f"/billing/accounts/{account_id}").text
    refused = client.post(f"/billing/accounts/{account_id}/deposits",
                          data={"csrf_token": page_csrf(client), "amount": "10"})
    assert refused.status_code == 403
    sign_in(client, "carol")
    page = client.get(f"/billing/accounts/{account_id}")
    assert page.status_code == 200 and "Record deposit" in page.text
    url = f"/billing/accounts/{account_id}/deposits"
    for bad in ("12.345", "-1", "0"):
        answer = client.post(url, data={"csrf_token": csrf_of(page.text), "amount": bad, "reference": "x"})
        assert answer.status_code == 422 and invalid(answer.text, "amount"), bad
    assert count(world, AccountDeposit) == 0
    ok = client.post(url, data={"csrf_token": csrf_of(page.text), "amount": "500.50", "reference": "BANK-7"},
                     follow_redirects=False)
    assert ok.status_code == 303 and "¥500.50" in flash_of(ok)
    with world.db.unit_of_work(write=False) as s:
        assert s.get(BillingAccount, account_id).balance_fen == 50_050  # type: ignore[union-attr]
    assert "BANK-7" in client.get(f"/billing/accounts/{account_id}").text


# --- a facility's rates, rules and charges ----------------------------------------------------------------------------


def test_the_facility_page_edits_rules_and_rates(client: TestClient, world: World) -> None:
    facility = world.facilities["CQ-LAB"]
    grant(world, "alice", "facility_manager", "CQ-LAB")
    sign_in(client, "bob")
    assert client.get(f"/manage/billing/facilities/{facility}").status_code == 403
    sign_in(client, "alice")
    assert client.get("/manage/billing/facilities/999999").status_code == 404
    chinese(client)
    assert client.get(f"/manage/billing/facilities/{facility}").status_code == 200
    english(client)
    page = client.get(f"/manage/billing/facilities/{facility}")
    assert page.status_code == 200 and "charges nothing until its billing rules are saved" in page.text
    assert f'href="/manage/billing/facilities/{facility}"' in client.get("/billing").text
    csrf = csrf_of(page.text)
    bad_rule = client.post(f"/manage/billing/facilities/{facility}/policy",
                           data={"csrf_token": csrf, "basis": "actual", "increment_minutes": "500"})
    assert bad_rule.status_code == 422 and invalid(bad_rule.text, "increment_minutes")
    saved = client.post(f"/manage/billing/facilities/{facility}/policy",
                        data={"csrf_token": csrf, "basis": "actual", "increment_minutes": "15", "rounding": "nearest",
                              "require_account": "1"}, follow_redirects=False)
    assert saved.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        policy = rates.policy_for(s, facility)
        assert policy is not None and policy.basis.value == "actual" and not policy.charge_no_show

    rate = {"csrf_token": csrf, "target": f"instrument:{world.instruments['CONF']}", "category": "industry",
            "unit": "hour", "effective_from": date.today().isoformat()}
    for bad in ("12.345", "-1"):
        answer = client.post(f"/manage/billing/facilities/{facility}/rates", data={**rate, "amount": bad})
        assert answer.status_code == 422 and invalid(answer.text, "amount")
    other = client.post(f"/manage/billing/facilities/{facility}/rates",
                        data={**rate, "target": f"instrument:{world.instruments['SC-MS']}", "amount": "1"})
    assert other.status_code == 422 and invalid(other.text, "target")  # not this facility's
    assert count(world, Rate) == 0
    added = client.post(f"/manage/billing/facilities/{facility}/rates", data={**rate, "amount": "300.5"},
                        follow_redirects=False)
    assert added.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        assert s.scalars(select(Rate.amount_fen)).one() == 30_050
    assert "¥300.50" in client.get(f"/manage/billing/facilities/{facility}").text


def test_manual_charges_and_corrections(client: TestClient, world: World) -> None:
    facility = world.facilities["CQ-LAB"]
    charging(world)
    account_id = open_account(world, "bob", "G-7")
    grant(world, "alice", "facility_staff", "CQ-LAB")
    english(client)
    sign_in(client, "alice")
    page = client.get(f"/manage/billing/facilities/{facility}")
    assert "Add a price" not in page.text  # staff post charges; managers set prices
    manual = {"csrf_token": csrf_of(page.text), "account": "G-7", "email": "bob@example.org",
              "description": "Consumables", "item_kind": "consultation", "service_date": date.today().isoformat()}
    for bad in ("12.345", "-1"):
        answer = client.post(f"/manage/billing/facilities/{facility}/charges", data={**manual, "amount": bad})
        assert answer.status_code == 422 and invalid(answer.text, "amount")
    unknown = client.post(f"/manage/billing/facilities/{facility}/charges",
                          data={**manual, "account": "NOPE", "amount": "10"})
    assert unknown.status_code == 422 and invalid(unknown.text, "account")
    assert count(world, Charge) == 0
    posted = client.post(f"/manage/billing/facilities/{facility}/charges", data={**manual, "amount": "88.80"},
                         follow_redirects=False)
    assert posted.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        charge_id = s.scalars(select(Charge.id)).one()
    url = f"/manage/billing/facilities/{facility}/charges/{charge_id}/correct"
    bad = client.post(url, data={"csrf_token": manual["csrf_token"], "amount": "-1", "note": "typo"})
    assert bad.status_code == 422 and invalid(bad.text, "amount")
    assert count(world, Charge) == 1
    fixed = client.post(url, data={"csrf_token": manual["csrf_token"], "amount": "50", "note": "typo"},
                        follow_redirects=False)
    assert fixed.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        assert sorted(s.scalars(select(Charge.amount_fen))) == [-8_880, 5_000, 8_880]
    sign_in(client, "bob")
    chinese(client)
    mine = client.get(f"/billing/accounts/{account_id}")
    assert mine.status_code == 200 and "¥50.00" in mine.text and "Consumables" in mine.text
    assert f'href="/billing/invoices?account={account_id}"' in mine.text
    forged = client.post(url, data={"csrf_token": page_csrf(client), "amount": "1", "note": "x"})
    assert forged.status_code == 403


# --- vouchers ------------------------------------------------------------------------------------------------------


def test_the_authority_issues_and_revokes_vouchers(client: TestClient, world: World) -> None:
    open_account(world, "bob", "CO-1")
    grant_scope(world, "carol", "region_authority", region_code="SC")
    sign_in(client, "alice")
    assert client.get("/manage/vouchers").status_code == 403
    sign_in(client, "carol")
    chinese(client)
    assert client.get("/manage/vouchers").status_code == 200
    english(client)
    page = client.get("/manage/vouchers")
    assert page.status_code == 200 and "Issue a voucher" in page.text and 'href="/manage/vouchers"' in \
        client.get("/billing").text
    data = {"csrf_token": csrf_of(page.text), "region": "SC", "account": "CO-1", "name": "Tianfu voucher",
            "share": "50", "valid_from": date.today().isoformat(),
            "valid_until": (date.today() + timedelta(days=90)).isoformat(), "eligible_kinds": ["instrument"]}
    for bad in ("12.345", "-1"):
        answer = client.post("/manage/vouchers", data={**data, "amount": bad})
        assert answer.status_code == 422 and invalid(answer.text, "amount")
    wrong_share = client.post("/manage/vouchers", data={**data, "amount": "10", "share": "150"})
    assert wrong_share.status_code == 422 and invalid(wrong_share.text, "share")
    other_region = client.post("/manage/vouchers", data={**data, "amount": "10", "region": "CQ"})
    assert other_region.status_code == 403
    assert count(world, Voucher) == 0
    issued = client.post("/manage/vouchers", data={**data, "amount": "20000"}, follow_redirects=False)
    assert issued.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        voucher = s.scalars(select(Voucher)).one()
        assert (voucher.amount_fen, voucher.share_bp, voucher.eligible_kinds) == (2_000_000, 5000, "instrument")
    listing = client.get("/manage/vouchers")
    assert f'data-voucher="{voucher.code}"' in listing.text and "¥20,000.00" in listing.text
    sign_in(client, "bob")
    assert voucher.code in client.get("/billing").text  # the holder sees its balance
    sign_in(client, "carol")
    revoked = client.post(f"/manage/vouchers/{voucher.id}/revoke", data={"csrf_token": page_csrf(client)},
                          follow_redirects=False)
    assert revoked.status_code == 303
    assert count(world, Voucher, Voucher.status == VoucherStatus.revoked) == 1


def test_the_recognition_matrix_toggles(client: TestClient, world: World) -> None:
    grant_scope(world, "carol", "region_authority", region_code="SC")
    with world.db.unit_of_work(write=False) as s:
        before = {(r.issuer_region_code, r.provider_region_code) for r in s.scalars(select(VoucherRecognition))}
    english(client)
    sign_in(client, "carol")
    try:
        page = client.get("/manage/vouchers")
        assert 'data-recognition="CQ-SC"' in page.text
        csrf = csrf_of(page.text)
        for accepted in ("0", "1"):
            answer = client.post("/manage/vouchers/recognition", follow_redirects=False,
                                 data={"csrf_token": csrf, "issuer": "CQ", "provider": "SC", "accepted": accepted})
            assert answer.status_code == 303
            assert (count(world, VoucherRecognition, VoucherRecognition.issuer_region_code == "CQ",
                          VoucherRecognition.provider_region_code == "SC") == 1) is (accepted == "1")
        refused = client.post("/manage/vouchers/recognition",
                              data={"csrf_token": csrf, "issuer": "SC", "provider": "CQ", "accepted": "0"})
        assert refused.status_code == 403  # CQ's providers are CQ's authority's to decide
    finally:
        with world.db.unit_of_work() as s:
            now = {(r.issuer_region_code, r.provider_region_code) for r in s.scalars(select(VoucherRecognition))}
            for issuer, provider in before - now:
                s.add(VoucherRecognition(issuer_region_code=issuer, provider_region_code=provider))
            for issuer, provider in now - before:
                s.delete(s.get(VoucherRecognition, (issuer, provider)))


# --- the booking and order forms -------------------------------------------------------------------------------------


@pytest.mark.parametrize("lang", ["en", "zh_CN"])
def test_the_booking_form_charges_the_chosen_account_and_holds_the_estimate(
    client: TestClient, world: World, lang: str
) -> None:
    charging(world)
    first = open_account(world, "bob", "G-A")
    second = open_account(world, "bob", "G-B")
    client.cookies.set("lang", lang)
    sign_in(client, "bob")
    instrument = world.instruments["CONF"]
    page = client.get(f"/instruments/{instrument}")
    assert page.status_code == 200 and 'name="account_id"' in page.text
    assert f'<option value="{first}"' in page.text and f'<option value="{second}"' in page.text
    assert "¥120.00" in page.text  # the rate card in force
    local = next_grid_day(days=3, hour=2).astimezone(SHANGHAI)  # the form takes the user's wall-clock time
    data = {"csrf_token": csrf_of(page.text), "date": local.date().isoformat(), "start": local.strftime("%H:%M"),
            "duration": "90", "purpose": "imaging"}
    unchosen = client.post(f"/instruments/{instrument}/book", data=data)
    assert unchosen.status_code == 422 and "¥180.00" in unchosen.text  # the estimate for the asked length
    assert re.search(r'name="account_id"[^>]*aria-invalid="true"', unchosen.text)
    assert count(world, BillingHold) == 0
    booked = client.post(f"/instruments/{instrument}/book", data={**data, "account_id": str(second)},
                         follow_redirects=False)
    assert booked.status_code == 303 and "¥180.00" in flash_of(booked) and "G-B" in flash_of(booked)
    with world.db.unit_of_work(write=False) as s:
        hold = s.scalars(select(BillingHold)).one()
        assert (hold.account_id, hold.amount_fen, hold.source_kind) == (second, 18_000, SourceKind.booking)


def test_the_booking_form_refuses_a_foreign_account_and_free_facilities_show_no_choice(
    client: TestClient, world: World
) -> None:
    english(client)
    sign_in(client, "bob")
    plain = client.get(f"/instruments/{world.instruments['CONF']}")
    assert 'name="account_id"' not in plain.text  # CQ-LAB charges nothing yet
    charging(world)
    open_account(world, "bob", "G-A")
    foreign = open_account(world, "carol", "SC-G")
    page = client.get(f"/instruments/{world.instruments['CONF']}")
    local = next_grid_day(days=4, hour=3).astimezone(SHANGHAI)
    answer = client.post(f"/instruments/{world.instruments['CONF']}/book",
                         data={"csrf_token": csrf_of(page.text), "date": local.date().isoformat(),
                               "start": local.strftime("%H:%M"), "duration": "60", "account_id": str(foreign)})
    assert answer.status_code == 422 and "You cannot charge to this account" in answer.text
    assert count(world, BillingHold) == 0


def test_the_order_form_passes_the_account(client: TestClient, world: World) -> None:
    service_id = add_service(world)
    charging(world)
    first = open_account(world, "bob", "G-A")
    second = open_account(world, "bob", "G-B")
    english(client)
    sign_in(client, "bob")
    form = client.get(f"/services/{service_id}/order")
    assert form.status_code == 200 and f'<option value="{second}"' in form.text
    data = {"csrf_token": csrf_of(form.text), "title": "RNA", "description": "x", "sample_count": "2",
            "action": "submit"}
    unchosen = client.post(f"/services/{service_id}/order", data=data)
    assert unchosen.status_code == 422 and "Choose the funding account to charge." in unchosen.text
    placed = client.post(f"/services/{service_id}/order", data={**data, "account_id": str(first)},
                         follow_redirects=False)
    assert placed.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        hold = s.scalars(select(BillingHold)).one()
        assert (hold.account_id, hold.source_kind) == (first, SourceKind.order)


# --- waitlist offers ----------------------------------------------------------------------------------------------


def test_a_waitlist_offer_is_accepted_on_the_chosen_account(client: TestClient, world: World) -> None:
    from labcommons.billing.models import BillingHold
    from labcommons.booking import service as booking_service
    from labcommons.booking import waitlist

    charging(world)
    open_account(world, "carol", "SC-W-1")
    chosen = open_account(world, "carol", "SC-W-2")
    open_account(world, "bob", "CQ-W-1")
    start = next_grid_day(4, 2)
    end = start + timedelta(hours=2)
    with world.db.unit_of_work() as s:
        bobs = booking_service.reserve_slot(s, world.actors["bob"], world.instruments["CONF"], start, end).id
        entry_id = waitlist.join(s, world.actors["carol"], world.instruments["CONF"], start, end).id
    with world.db.unit_of_work() as s:
        booking_service.cancel_booking(s, world.actors["bob"], bobs)
    sign_in(client, "carol")
    english(client)
    page = client.get("/waitlist")
    assert page.status_code == 200 and 'name="account_id"' in page.text and "SC-W-2" in page.text
    bad = client.post(f"/waitlist/{entry_id}/accept", data={"csrf_token": csrf_of(page.text), "account_id": "²"},
                      follow_redirects=False)
    assert bad.status_code == 303 and flash_of(bad).startswith("error|")
    done = client.post(f"/waitlist/{entry_id}/accept",
                       data={"csrf_token": csrf_of(page.text), "account_id": str(chosen)}, follow_redirects=False)
    assert done.status_code == 303 and "Booked from the waitlist." in flash_of(done)
    with world.db.unit_of_work(write=False) as s:
        held = s.scalars(select(BillingHold.account_id).where(BillingHold.user_id == world.actors["carol"].user_id))
        assert list(held) == [chosen]
