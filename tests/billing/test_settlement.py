"""The settlement report: who owes whom for a month's charges, reconciled to the fen, by region, per reader; and its
CSV/XLSX/PDF renderings and API."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

from openpyxl import load_workbook
from pypdf import PdfReader

from labcommons.billing import exports
from labcommons.billing.settlement import settlement_report
from labcommons.errors import Forbidden
from tests.api_client import client_for
from tests.billing.invoice_support import give_role, ledger_world
from tests.factories import World, actor_of

OCTOBER_TOTAL = 45_000 + 12_345 + 80_001 + 20_000 + 66_667


def _rows(report: object) -> set[tuple[str, str, str, int]]:
    return {(r.debtor_kind, r.debtor_code, r.creditor_code, r.amount_fen) for r in report.rows}  # type: ignore[attr-defined]


def test_rows_say_who_owes_whom_and_reconcile_with_the_charges(world: World) -> None:
    ledger_world(world)
    with world.db.unit_of_work(write=False) as s:
        report = settlement_report(s, "2026-10")
    assert _rows(report) == {
        ("institution", "CQ-UNI", "SC-UNI", 45_000 + 12_345),
        # CQ-LAB's prepaid and invoiced parts; its Chongqing voucher's parts are owed by the CQ authority.
        ("institution", "CQ-LAB", "SC-UNI", 40_001 + 5_000 + 5_000),
        ("region_authority", "CQ", "SC-UNI", 40_000 + 10_000),
        ("institution", "SC-UNI", "CQ-LAB", 33_334),
        ("region_authority", "SC", "CQ-LAB", 33_333),
    }
    assert report.complete and report.total_fen == report.charges_fen == OCTOBER_TOTAL and report.reconciled
    assert (report.account_fen, report.voucher_fen) == (57_345 + 50_001 + 33_334, 50_000 + 33_333)
    assert report.matrix == {"CQ": {"SC": 157_346}, "SC": {"CQ": 66_667}}
    assert report.net("CQ", "SC") == 157_346 - 66_667 == -report.net("SC", "CQ")


def test_november_has_only_novembers_charges(world: World) -> None:
    ledger_world(world)
    with world.db.unit_of_work(write=False) as s:
        report = settlement_report(s, "2026-11")
    assert _rows(report) == {("institution", "CQ-UNI", "SC-UNI", 30_001)}
    assert report.total_fen == report.charges_fen == 30_001


def test_readers_see_the_rows_that_concern_them(world: World) -> None:
    ledger_world(world)
    give_role(world, "alice", "institution_admin", institution="CQ-LAB")
    with world.db.unit_of_work(write=False) as s:
        report = settlement_report(s, "2026-10", actor=actor_of(world, "alice"))
        assert {(r.debtor_code, r.creditor_code) for r in report.rows} == {
            ("CQ-LAB", "SC-UNI"), ("SC-UNI", "CQ-LAB"), ("SC", "CQ-LAB")}
        assert not report.complete and report.charges_fen is None
        try:
            settlement_report(s, "2026-10", actor=actor_of(world, "bob"))
        except Forbidden:
            pass
        else:
            raise AssertionError("a plain user read the settlement report")


def test_csv_xlsx_and_pdf_carry_the_same_rows(world: World) -> None:
    ledger_world(world)
    with world.db.unit_of_work(write=False) as s:
        report = settlement_report(s, "2026-10")
    rows = list(csv.DictReader(io.StringIO(exports.settlement_csv(report).decode("utf-8-sig"))))
    assert sum(int(r["amount_fen"]) for r in rows) == OCTOBER_TOTAL
    assert sum(Decimal(r["amount_yuan"]) for r in rows) == Decimal(OCTOBER_TOTAL) / 100
    book = load_workbook(io.BytesIO(exports.settlement_xlsx(report)))
    sheet = list(book["Settlement"].iter_rows(values_only=True))
    body = sheet[2:2 + len(report.rows)]
    assert sum(int(r[8]) for r in body) == OCTOBER_TOTAL == sheet[2 + len(report.rows)][8]
    regions = list(book["Regions"].iter_rows(values_only=True))
    assert regions[0][1:] == ("CQ", "SC") and Decimal(str(regions[1][2])) == Decimal("1573.46")
    text = "".join(p.extract_text() for p in PdfReader(io.BytesIO(exports.settlement_pdf(report))).pages)
    assert "Settlement report" in text and "2026-10" in text and "2,240.13" in text


def test_settlement_api_follows_the_roles(world: World) -> None:
    ledger_world(world)
    api = client_for(world.db)
    assert api.get("/api/v1/billing/settlement?period=2026-10", headers=world.headers("bob")).status_code == 403
    assert api.get("/api/v1/billing/settlement.csv", headers=world.headers("bob")).status_code == 403
    give_role(world, "bob", "platform_admin")
    answer = api.get("/api/v1/billing/settlement?period=2026-10", headers=world.headers("bob"))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["total_fen"] == body["charges_fen"] == OCTOBER_TOTAL and body["complete"] is True
    assert body["matrix"]["CQ"]["SC"] == 157_346
    bad = api.get("/api/v1/billing/settlement?period=2026-1", headers=world.headers("bob"))
    assert bad.status_code == 422 and bad.json()["field"] == "period"
    for fmt, media in (("csv", "text/csv"), ("xlsx", "spreadsheetml"), ("pdf", "application/pdf")):
        download = api.get(f"/api/v1/billing/settlement.{fmt}?period=2026-10", headers=world.headers("bob"))
        assert download.status_code == 200 and media in download.headers["content-type"]
        assert f"filename*=UTF-8''settlement-2026-10.{fmt}" in download.headers["content-disposition"]
    give_role(world, "carol", "region_authority", region="SC")
    seen = api.get("/api/v1/billing/settlement?period=2026-10", headers=world.headers("carol")).json()
    assert seen["complete"] is False and seen["charges_fen"] is None and len(seen["rows"]) == 5
