"""Monthly invoices from the charge ledger: what goes on which invoice, totals to the fen, idempotent runs,
statements, and the PDF/XLSX/CSV renderings."""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from openpyxl import load_workbook
from pypdf import PdfReader
from sqlalchemy import func, select

from labcommons.billing import exports, invoices
from labcommons.billing.models import Charge, Invoice, InvoiceLine, Payment, VoucherRedemption
from labcommons.errors import InvalidInput
from tests.billing.invoice_support import (
    AFTER_NOV,
    AFTER_OCT,
    NOV,
    OCT,
    add_account,
    ledger_world,
    post_charge,
    reverse,
)
from tests.factories import World


def _generate(world: World, period: str, now: datetime, **kw: object) -> list[str]:
    with world.db.unit_of_work() as s:
        return [i.number for i in invoices.generate_invoices(s, period, now=now, **kw)]


def _paid_parts(world: World, charge_ids: list[int]) -> int:
    with world.db.unit_of_work(write=False) as s:
        payments = s.scalar(select(func.coalesce(func.sum(Payment.amount_fen), 0))
                            .where(Payment.charge_id.in_(charge_ids)))
        vouchers = s.scalar(select(func.coalesce(func.sum(VoucherRedemption.amount_fen), 0))
                            .where(VoucherRedemption.charge_id.in_(charge_ids)))
        return int(payments or 0) + int(vouchers or 0)


def _view(world: World, number: str) -> invoices.InvoiceView:
    with world.db.unit_of_work(write=False) as s:
        invoice = s.scalars(select(Invoice).where(Invoice.number == number)).one()
        return invoices.invoice_view(s, invoice)


def test_one_invoice_per_account_with_the_months_charges_and_totals_to_the_fen(world: World) -> None:
    ids = ledger_world(world)
    made = _generate(world, "2026-10", AFTER_OCT)
    assert made == [f"INV-202610-{ids[k]:06d}" for k in ("grant", "prepaid", "sc")]

    grant = _view(world, made[0])
    # The charge at 00:00 on 1 November (Beijing) is November's even though it is still 31 October in UTC.
    assert [line.charge_id for line in grant.lines] == [ids["g1"], ids["g2"]]
    assert grant.total_fen == 45_000 + 12_345 == _paid_parts(world, [ids["g1"], ids["g2"]])
    assert grant.due_fen == grant.total_fen and grant.voucher_fen == grant.prepaid_fen == 0
    assert grant.totals.list_fen == 45_000 + 12_345 + 1_372 and grant.totals.discount_fen == 1_372

    prepaid = _view(world, made[1])
    assert (prepaid.total_fen, prepaid.voucher_fen, prepaid.prepaid_fen, prepaid.due_fen) == (
        100_001, 50_000, 45_001, 5_000)
    assert prepaid.lines[0].voucher_codes == ["CQV-0001"]
    for view in (grant, prepaid, _view(world, made[2])):
        t = view.totals
        assert (t.amount_fen, t.voucher_fen, t.prepaid_fen, t.due_fen) == (
            view.total_fen, view.voucher_fen, view.prepaid_fen, view.due_fen)
        assert all(line.amount_fen == line.voucher_fen + line.prepaid_fen + line.due_fen for line in view.lines)
        assert view.total_fen == view.voucher_fen + view.prepaid_fen + view.due_fen


def test_running_again_makes_nothing_and_later_charges_wait_for_the_next_month(world: World) -> None:
    ids = ledger_world(world)
    assert len(_generate(world, "2026-10", AFTER_OCT)) == 3
    with world.db.unit_of_work() as s:
        grant = s.get(invoices.BillingAccount, ids["grant"])
        assert grant is not None
        # Posted late, but before the October run is repeated: it belongs to November's invoice.
        late = post_charge(s, world, grant, 777, at=AFTER_OCT).id
    assert _generate(world, "2026-10", AFTER_OCT) == []
    assert _generate(world, "2026-10", AFTER_NOV) == []
    november = _generate(world, "2026-11", AFTER_NOV)
    assert november == [f"INV-202611-{ids['grant']:06d}"]
    view = _view(world, november[0])
    assert [line.charge_id for line in view.lines] == [ids["g3"], late]
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(InvoiceLine)) == s.scalar(
            select(func.count()).select_from(Charge))


def test_a_reversal_in_a_later_month_appears_on_the_later_invoice(world: World) -> None:
    ids = ledger_world(world)
    _generate(world, "2026-10", AFTER_OCT)
    with world.db.unit_of_work() as s:
        original = s.get(Charge, ids["p1"])
        assert original is not None
        reversal = reverse(s, world, original, at=NOV, voucher=s.get(invoices.Voucher, ids["cq_voucher"])).id
    october = _view(world, f"INV-202610-{ids['prepaid']:06d}")
    assert ids["p1"] in [line.charge_id for line in october.lines]
    (number,) = _generate(world, "2026-11", AFTER_NOV, account_id=ids["prepaid"])
    november = _view(world, number)
    (line,) = november.lines
    assert (line.charge_id, line.reverses_id, line.amount_fen) == (reversal, ids["p1"], -80_001)
    assert (line.voucher_fen, line.prepaid_fen, line.due_fen) == (-40_000, -40_001, 0)
    assert november.total_fen == -80_001 == _paid_parts(world, [reversal])


def test_an_open_month_is_refused_unless_allowed(world: World) -> None:
    ledger_world(world)
    with pytest.raises(InvalidInput) as refused:
        _generate(world, "2026-11", NOV)
    assert refused.value.field == "period" and refused.value.code == "period_not_ended"
    assert len(_generate(world, "2026-11", NOV, allow_open=True)) == 3
    with pytest.raises(InvalidInput) as bad:
        _generate(world, "2026-13", AFTER_NOV)
    assert bad.value.field == "period"


def test_generation_can_be_limited_to_one_account(world: World) -> None:
    ids = ledger_world(world)
    assert _generate(world, "2026-10", AFTER_OCT, account_id=ids["sc"]) == [f"INV-202610-{ids['sc']:06d}"]
    assert len(_generate(world, "2026-10", AFTER_OCT)) == 2


@pytest.mark.parametrize(("minutes", "text"), [(0, "0.00"), (1, "0.02"), (30, "0.50"), (90, "1.50"), (100, "1.67"),
                                               (61, "1.02"), (-90, "-1.50"), (59, "0.98")])
def test_minutes_print_as_hours_with_two_decimals(minutes: int, text: str) -> None:
    assert invoices.hours_text(minutes) == text


def test_statement_shows_prepaid_balances_deposits_and_vouchers(world: World) -> None:
    ids = ledger_world(world)
    _generate(world, "2026-10", AFTER_OCT)
    with world.db.unit_of_work(write=False) as s:
        view = invoices.statement(s, ids["prepaid"], "2026-10")
    assert view.opening_balance_fen == 500_000
    assert view.deposits_fen == 100_000 and [d.reference for d in view.deposits] == ["bank 1020"]
    assert view.prepaid_used_fen == 45_001
    assert view.closing_balance_fen == 500_000 + 100_000 - 45_001
    (voucher,) = view.vouchers
    assert (voucher.used_in_period_fen, voucher.balance_end_fen) == (50_000, 1_000_000 - 50_000)
    assert view.totals.amount_fen == 100_001
    assert view.invoice_numbers == [f"INV-202610-{ids['prepaid']:06d}"]
    with world.db.unit_of_work(write=False) as s:
        september = invoices.statement(s, ids["prepaid"], "2026-09")
    assert (september.opening_balance_fen, september.closing_balance_fen) == (0, 500_000)


def test_invoice_pdf_and_xlsx_carry_the_number_and_add_up(world: World) -> None:
    ids = ledger_world(world)
    (number,) = _generate(world, "2026-10", AFTER_OCT, account_id=ids["prepaid"])
    view = _view(world, number)
    pdf = exports.invoice_pdf(view)
    assert pdf.startswith(b"%PDF")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert number in text and "Invoice" in text and "CQV-0001" in text

    book = load_workbook(io.BytesIO(exports.invoice_xlsx(view)))
    sheet = book.active
    assert sheet is not None
    rows = [r for r in sheet.iter_rows(values_only=True)]
    assert rows[0][:2] == ("发票 Invoice", number)
    header = rows.index(exports.LINE_HEADINGS)
    lines, total = rows[header + 1:-1], rows[-1]
    net, voucher, prepaid, due, fen = (exports.LINE_HEADINGS.index(h) for h in (
        "应收 Net", "创新券 Voucher", "预付 Prepaid", "待付 Due", "应收（分） Net (fen)"))
    assert sum(Decimal(str(r[net])) for r in lines) == Decimal("1000.01") == Decimal(str(total[net]))
    assert sum(Decimal(str(r[voucher])) for r in lines) == Decimal("500.00")
    assert sum(Decimal(str(r[prepaid])) for r in lines) == Decimal("450.01")
    assert sum(Decimal(str(r[due])) for r in lines) == Decimal("50.00")
    assert sum(int(r[fen]) for r in lines) == view.total_fen == total[fen]


def test_statement_pdf_and_xlsx_render(world: World) -> None:
    ids = ledger_world(world)
    with world.db.unit_of_work(write=False) as s:
        view = invoices.statement(s, ids["prepaid"], "2026-10")
    pdf = exports.statement_pdf(view)
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(pdf)).pages)
    assert "CO-PREPAID" in text and "Closing balance" in text
    book = load_workbook(io.BytesIO(exports.statement_xlsx(view)))
    assert book.sheetnames == ["Statement", "Deposits", "Vouchers"]
    vouchers = list(book["Vouchers"].iter_rows(values_only=True))
    assert vouchers[1][0] == "CQV-0001" and Decimal(str(vouchers[1][5])) == Decimal("9500.00")


def _csv(world: World, scope: exports.ChargeScope) -> list[dict[str, str]]:
    body = b"".join(exports.charges_csv_stream(world.db, scope)).decode("utf-8-sig")
    return list(csv.DictReader(io.StringIO(body)))


def test_charge_csv_has_one_row_per_payment_part_and_sums_to_the_charges(world: World) -> None:
    ids = ledger_world(world)
    start, end = invoices.period_bounds("2026-10")
    rows = _csv(world, exports.ChargeScope(start=start, end=end))
    assert list(rows[0]) == list(exports.CHARGE_COLUMNS)
    assert sum(int(r["part_fen"]) for r in rows) == 45_000 + 12_345 + 80_001 + 20_000 + 66_667
    by_charge = [(int(r["charge_id"]), r["method"], r["voucher_code"], int(r["part_fen"])) for r in rows
                 if int(r["charge_id"]) == ids["p2"]]
    assert by_charge == [(ids["p2"], "voucher", "CQV-0001", 10_000), (ids["p2"], "prepaid", "", 5_000),
                         (ids["p2"], "invoice", "", 5_000)]
    g2 = next(r for r in rows if int(r["charge_id"]) == ids["g2"])
    assert (g2["description"], g2["unit"], g2["quantity"], g2["discount_fen"]) == ("高分辨质谱 3 个样品", "sample",
                                                                                    "3", "1372")
    assert datetime.fromisoformat(g2["posted_at"]).tzinfo is not None
    assert g2["account_code"] == "CQ-GRANT" and g2["payer_institution"] == "CQ-UNI" and g2["provider_region"] == "SC"
    one = _csv(world, exports.ChargeScope(start=start, end=end, account_id=ids["sc"]))
    assert {r["account_code"] for r in one} == {"SC-GRANT"}
    assert sum(int(r["part_fen"]) for r in one) == 66_667


def test_charge_csv_streams_in_batches_and_guards_formulas(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exports, "BATCH", 2)
    with world.db.unit_of_work() as s:
        account = add_account(s, world, "BIG")
        for i in range(5):
            post_charge(s, world, account, 100 + i, at=OCT, description="=HYPERLINK(\"x\")" if i == 0 else f"c{i}")
    start, end = invoices.period_bounds("2026-10")
    chunks = list(exports.charges_csv_stream(world.db, exports.ChargeScope(start=start, end=end)))
    assert len(chunks) >= 3
    rows = _csv(world, exports.ChargeScope(start=start, end=end))
    assert len(rows) == 5 and sum(int(r["part_fen"]) for r in rows) == 510
    assert rows[0]["description"].startswith("'=")


def test_zero_charge_and_day_bounds() -> None:
    start, end = invoices.day_bounds(datetime(2026, 10, 1).date(), datetime(2026, 10, 31).date())
    assert (start, end) == invoices.period_bounds("2026-10")
    assert start == datetime(2026, 9, 30, 16, tzinfo=UTC)
    assert invoices.previous_period(datetime(2026, 1, 5, tzinfo=UTC)) == "2025-12"
