"""Exports never hand a spreadsheet a formula: names an administrator controls are written as text."""

from __future__ import annotations

import io
from datetime import date

from openpyxl import load_workbook

from labcommons.reporting import exports
from labcommons.reporting.service import Dashboard, InstrumentRow, Period, Scope, ScopeKind, Totals

HOSTILE = '=HYPERLINK("http://evil.example","x")'


def _dashboard() -> tuple[Dashboard, list[InstrumentRow]]:
    row = InstrumentRow(1, "+CODE", HOSTILE, "@name", 1, "CQ", 2, 120, 60, 30, 0, 600, 0.2, 0)
    d = Dashboard(scope=Scope(ScopeKind.institution, "1", HOSTILE, "-en", "CQ"),
                  period=Period(date(2026, 1, 1), date(2026, 1, 31)), today=date(2026, 2, 1), totals=Totals(),
                  granularity="day", series=[], heatmap=[[0] * 24 for _ in range(7)], top=[row], idle=[row],
                  idle_count=0, flows=[], turnaround_days=[])
    return d, [row]


def test_the_workbook_writes_hostile_names_as_text_not_formulas() -> None:
    d, rows = _dashboard()
    book = load_workbook(io.BytesIO(exports.workbook(d, exports.dashboard_tables(d, rows))))
    formulas = [(sheet.title, cell.coordinate, cell.value) for sheet in book.worksheets
                for line in sheet.iter_rows() for cell in line if cell.data_type == "f"]
    assert formulas == []
    assert book["totals"]["A2"].value == "'" + HOSTILE + " -en"
    instruments = [r for r in book["instruments"].iter_rows(min_row=4, values_only=True)]
    assert instruments[0][:3] == ("'+CODE", "'" + HOSTILE, "'@name")


def test_csv_cells_that_start_a_formula_are_quoted() -> None:
    d, rows = _dashboard()
    text = exports.table_csv(exports.dashboard_tables(d, rows)["instruments"]).decode("utf-8-sig")
    line = text.splitlines()[1]
    assert line.startswith("'+CODE,") and "'=HYPERLINK" in line and "'@name" in line
