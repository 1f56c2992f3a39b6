"""Invoice endpoints and pages: who sees which invoice (outsiders get 404), generating and paying by role,
downloads, statements and the charge export."""

from __future__ import annotations

import csv
import io
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openpyxl import load_workbook

from labcommons.billing.models import AccountMember, MemberStatus
from labcommons.identity import service as identity
from tests.api_client import client_for
from tests.billing.invoice_support import add_user, give_role, ledger_world, user_id
from tests.factories import World
from tests.web.conftest import csrf_of, sign_in


@pytest.fixture
def ledger(world: World) -> dict[str, int]:
    ids = ledger_world(world)
    give_role(world, "bob", "platform_admin")  # bob generates; carol and alice stay plain users
    return ids


def _generate(api: TestClient, world: World, who: str = "bob", **body: Any) -> Any:
    return api.post("/api/v1/billing/invoices/generate", json={"period": "2026-10", **body},
                    headers=world.headers(who))


def _token(world: World, name: str, *scopes: str) -> dict[str, str]:
    with world.db.unit_of_work() as s:
        secret = identity.create_api_token(s, identity.find_user(s, f"{name}@example.org"), name="t",
                                           scopes=list(scopes))
    return {"Authorization": f"Bearer {secret}"}


def test_generating_needs_an_administrator_and_is_idempotent(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    refused = _generate(api, world, "carol")
    assert refused.status_code == 403
    made = _generate(api, world)
    assert made.status_code == 201, made.text
    assert [i["account_id"] for i in made.json()["items"]] == [ledger["grant"], ledger["prepaid"], ledger["sc"]]
    again = _generate(api, world)
    assert again.status_code == 201 and again.json()["items"] == []
    open_month = _generate(api, world, period="2999-12")
    assert open_month.status_code == 422 and open_month.json()["field"] == "period"
    assert open_month.json()["error"] == "period_not_ended"


def test_an_institution_admin_invoices_one_of_its_accounts_only(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    give_role(world, "carol", "institution_admin", institution="SC-UNI")
    assert _generate(api, world, "carol").status_code == 403  # all accounts: platform administrators only
    assert _generate(api, world, "carol", account_id=ledger["grant"]).status_code == 404  # not hers to see
    mine = _generate(api, world, "carol", account_id=ledger["sc"])
    assert mine.status_code == 201 and [i["account_id"] for i in mine.json()["items"]] == [ledger["sc"]]


def test_owners_and_members_see_their_invoices_and_outsiders_get_404(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    items = _generate(api, world).json()["items"]
    grant_invoice = next(i for i in items if i["account_id"] == ledger["grant"])
    mine = api.get("/api/v1/billing/invoices", headers=world.headers("carol")).json()["items"]
    assert [i["account_id"] for i in mine] == [ledger["sc"]]
    url = f"/api/v1/billing/invoices/{grant_invoice['id']}"
    outsider = api.get(url, headers=world.headers("carol"))
    assert outsider.status_code == 404 and outsider.json()["error"] == "not_found"
    assert api.get(f"{url}.pdf", headers=world.headers("carol")).status_code == 404
    assert api.get(f"/api/v1/billing/invoices?account_id={ledger['grant']}",
                   headers=world.headers("carol")).status_code == 404
    dave = add_user(world, "dave")
    with world.db.unit_of_work() as s:
        s.add(AccountMember(account_id=ledger["grant"], user_id=user_id(s, "dave"), status=MemberStatus.approved))
    detail = api.get(url, headers=dave)
    assert detail.status_code == 200, detail.text
    body = detail.json()
    assert body["number"] == grant_invoice["number"] and body["account_code"] == "CQ-GRANT"
    assert sum(line["amount_fen"] for line in body["lines"]) == body["total_fen"] == 57_345
    assert [line["quantity_text"] for line in body["lines"]] == ["1.50", "3"]
    assert body["lines"][1]["discount_reason"] == "talent:tianfu 10%"
    no_scope = api.get(url, headers=_token(world, "dave", "orders:read"))
    assert no_scope.status_code == 403 and no_scope.json()["error"] == "insufficient_scope"


def test_downloads_are_attachments_named_after_the_invoice(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    invoice = next(i for i in _generate(api, world).json()["items"] if i["account_id"] == ledger["prepaid"])
    pdf = api.get(invoice["pdf_url"], headers=world.headers("alice"))
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    assert pdf.headers["content-type"] == "application/pdf"
    assert f"filename*=UTF-8''{invoice['number']}.pdf" in pdf.headers["content-disposition"]
    xlsx = api.get(invoice["xlsx_url"], headers=world.headers("alice"))
    assert xlsx.status_code == 200
    sheet = load_workbook(io.BytesIO(xlsx.content)).active
    assert sheet is not None and sheet["B1"].value == invoice["number"]
    assert api.get(f"/api/v1/billing/invoices/{invoice['id']}.doc", headers=world.headers("alice")).status_code == 422


def test_paying_is_for_the_payer_institutions_administrator(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    invoice = next(i for i in _generate(api, world).json()["items"] if i["account_id"] == ledger["grant"])
    url = f"/api/v1/billing/invoices/{invoice['id']}/pay"
    assert api.post(url, headers=world.headers("alice")).status_code == 403  # a plain user
    give_role(world, "carol", "institution_admin", institution="SC-UNI")
    assert api.post(url, headers=world.headers("carol")).status_code == 404  # another institution's invoice
    dave = add_user(world, "dave", institution="CQ-UNI")
    give_role(world, "dave", "institution_admin", institution="CQ-UNI")
    paid = api.post(url, headers=dave)
    assert paid.status_code == 200 and paid.json()["status"] == "paid" and paid.json()["paid_at"]
    twice = api.post(url, headers=dave)
    assert twice.status_code == 409 and twice.json()["error"] == "already_paid"


def test_statements_download_for_those_who_see_the_account(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    url = f"/api/v1/billing/statements/{ledger['prepaid']}/2026-10"
    xlsx = api.get(f"{url}.xlsx", headers=world.headers("alice"))
    assert xlsx.status_code == 200, xlsx.text
    assert load_workbook(io.BytesIO(xlsx.content)).sheetnames == ["Statement", "Deposits", "Vouchers"]
    assert api.get(f"{url}.pdf", headers=world.headers("alice")).content.startswith(b"%PDF")
    assert api.get(f"{url}.pdf", headers=world.headers("carol")).status_code == 404
    bad = api.get(f"/api/v1/billing/statements/{ledger['prepaid']}/2026-1x.pdf", headers=world.headers("alice"))
    assert bad.status_code == 422 and bad.json()["field"] == "period"


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text.lstrip("\ufeff"))))


def test_charge_export_by_account_facility_and_institution(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    days = "from=2026-10-01&to=2026-10-31"
    own = api.get(f"/api/v1/billing/charges.csv?{days}&account_id={ledger['grant']}", headers=world.headers("bob"))
    assert own.status_code == 200 and own.headers["content-type"].startswith("text/csv")
    assert sum(int(r["part_fen"]) for r in _csv_rows(own.text)) == 57_345
    # carol is neither the owner nor an administrator of CQ-GRANT, nor staff of SC-UNI's facility yet.
    assert api.get(f"/api/v1/billing/charges.csv?{days}&account_id={ledger['grant']}",
                   headers=world.headers("carol")).status_code == 404
    facility = f"/api/v1/billing/charges.csv?{days}&facility_id={world.facilities['SC-UNI']}"
    assert api.get(facility, headers=world.headers("carol")).status_code == 403
    assert api.get(f"/api/v1/billing/charges.csv?{days}", headers=world.headers("carol")).status_code == 403
    give_role(world, "carol", "facility_staff", facility="SC-UNI")
    staff = _csv_rows(api.get(facility, headers=world.headers("carol")).text)
    assert sum(int(r["part_fen"]) for r in staff) == 45_000 + 12_345 + 80_001 + 20_000
    assert {r["facility"] for r in staff} == {"SC-UNI-F"}
    give_role(world, "alice", "institution_admin", institution="CQ-LAB")
    inst = _csv_rows(api.get(f"/api/v1/billing/charges.csv?{days}&institution_id={world.institutions['CQ-LAB']}",
                             headers=world.headers("alice")).text)
    assert sum(int(r["part_fen"]) for r in inst) == 80_001 + 20_000 + 66_667  # as payer and as provider
    everything = _csv_rows(api.get(f"/api/v1/billing/charges.csv?{days}", headers=world.headers("bob")).text)
    assert sum(int(r["part_fen"]) for r in everything) == 45_000 + 12_345 + 80_001 + 20_000 + 66_667
    backwards = api.get("/api/v1/billing/charges.csv?from=2026-10-31&to=2026-10-01", headers=world.headers("bob"))
    assert backwards.status_code == 422 and backwards.json()["field"] == "to"


def test_pages_list_show_and_pay_invoices_and_show_the_settlement(world: World, ledger: dict[str, int]) -> None:
    api = client_for(world.db)
    items = _generate(api, world).json()["items"]
    prepaid = next(i for i in items if i["account_id"] == ledger["prepaid"])
    browser = TestClient(api.app)
    sign_in(browser, "alice")
    listing = browser.get("/billing/invoices")
    assert listing.status_code == 200 and prepaid["number"] in listing.text
    assert all(i["number"] not in listing.text for i in items if i["id"] != prepaid["id"])
    page = browser.get(f"/billing/invoices/{prepaid['id']}?lang=en")
    assert page.status_code == 200
    assert "CQV-0001" in page.text and "¥500.00" in page.text and "¥50.00" in page.text  # voucher part, due part
    assert f"/api/v1/billing/invoices/{prepaid['id']}.pdf" in page.text and "Mark paid" not in page.text
    other = next(i for i in items if i["account_id"] == ledger["sc"])
    assert browser.get(f"/billing/invoices/{other['id']}").status_code == 404
    assert browser.get("/billing/settlement").status_code == 403
    give_role(world, "alice", "institution_admin", institution="CQ-LAB")
    sign_in(browser, "alice")
    page = browser.get(f"/billing/invoices/{prepaid['id']}")
    assert page.status_code == 200 and "csrf_token" in page.text
    paid = browser.post(f"/billing/invoices/{prepaid['id']}/pay", data={"csrf_token": csrf_of(page.text)},
                        follow_redirects=False)
    assert paid.status_code == 303
    assert api.get(f"/api/v1/billing/invoices/{prepaid['id']}", headers=world.headers("alice")).json()["status"] \
        == "paid"
    report = browser.get("/billing/settlement?period=2026-10&lang=en")
    assert report.status_code == 200 and "SC-UNI" in report.text and "Between regions" in report.text
    assert browser.get("/billing/settlement?period=nonsense").status_code == 422
