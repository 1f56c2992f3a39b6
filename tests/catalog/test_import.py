"""Bulk instrument import: CSV and XLSX, row-level rejection, upsert, encodings, and the CLI."""

from __future__ import annotations

import csv
import io
from importlib import resources
from pathlib import Path
from typing import Any

import openpyxl
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from labcommons.catalog import importer
from labcommons.catalog.importer import ImportReport, import_instruments
from labcommons.catalog.models import Instrument, InstrumentStatus, OpenTo
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import InvalidInput
from tests.factories import build_world

HEADER = ["code", "facility", "name_zh", "name_en", "category", "slot_minutes", "min_booking_minutes",
          "max_booking_minutes", "status", "open_to"]

# (row, expected error field or None for a good row); the data starts on spreadsheet line 2.
MIXED_ROWS: list[tuple[list[Any], str | None]] = [
    (["NEW-1", "CQ-LAB-F", "新共聚焦", "New confocal", "MIC.CONF", 30, 60, 480, "active", "region"], None),
    (["NEW-2", "CQ-LAB-F", "坏类别", "Bad category", "NOPE.X", "", "", "", "", ""], "category"),
    (["NEW-3", "XX-NONE-F", "无平台", "No facility", "MIC.CONF", "", "", "", "", ""], "facility"),
    (["NEW-4", "SC-UNI-F", "颠倒", "Min above max", "ANA.MS", 30, 600, 120, "", ""], "min_booking_minutes"),
    (["NEW-5", "SC-UNI-F", "", "Half-hour slot", "ANA.MS", "half", "", "", "", ""], "slot_minutes"),
    (["NEW-6", "SC-UNI-F", "", "", "ANA.MS", "", "", "", "", ""], "name_zh"),
    (["NEW-7", "SC-UNI-F", "", "Sichuan mass spec", "ANA.MS", "", "", "", "Maintenance", ""], None),
    (["NEW-1", "CQ-UNI-F", "重复", "Duplicate", "MIC.CONF", "", "", "", "", ""], "code"),
    (["NEW-8", "CQ-UNI-F", "状态错误", "Bad status", "MIC.CONF", "", "", "", "broken", ""], "status"),
]
GOOD_CODES = {"NEW-1", "NEW-7"}
BAD_CODES = {"NEW-2", "NEW-3", "NEW-4", "NEW-5", "NEW-6", "NEW-8"}
EXPECTED_ERRORS = [(line, fld) for line, (_, fld) in enumerate(MIXED_ROWS, start=2) if fld is not None]


def write_csv(
    path: Path, rows: list[list[Any]], *, header: list[str] = HEADER, encoding: str = "utf-8"
) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


def write_xlsx(path: Path, rows: list[list[Any]], *, header: list[str] = HEADER) -> Path:
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    assert sheet is not None
    sheet.append([h.upper() for h in header])  # headers are case-insensitive
    for row in rows:
        sheet.append([None if v == "" else v for v in row])
    workbook.save(path)
    return path


def instruments_by_code(db: Database) -> dict[str, Instrument]:
    with db.unit_of_work(write=False) as s:
        return {i.code: i for i in s.scalars(select(Instrument))}


def assert_mixed_result(db: Database, report: ImportReport) -> None:
    assert [(e.line, e.field) for e in report.errors] == EXPECTED_ERRORS
    assert all(e.message for e in report.errors)
    assert (report.created, report.updated) == (2, 0)
    stored = instruments_by_code(db)
    assert stored.keys() >= GOOD_CODES
    assert not BAD_CODES & stored.keys()
    first = stored["NEW-1"]
    # The first NEW-1 row wins; the duplicate on line 9 (CQ-UNI-F) changed nothing.
    assert (first.name_zh, first.region_code, first.open_to) == ("新共聚焦", "CQ", OpenTo.region)
    assert (first.min_booking_minutes, first.max_booking_minutes) == (60, 480)
    assert "confocal" in first.search_name
    mass_spec = stored["NEW-7"]
    assert mass_spec.region_code == "SC"
    assert mass_spec.status == InstrumentStatus.maintenance
    assert mass_spec.name_zh == mass_spec.name_en == "Sichuan mass spec"
    lengths = (mass_spec.slot_minutes, mass_spec.min_booking_minutes, mass_spec.max_booking_minutes)
    assert lengths == (30, 30, 480)
    assert mass_spec.open_to == OpenTo.everyone


def test_csv_good_rows_land_and_bad_rows_are_reported(db: Database, tmp_path: Path) -> None:
    build_world(db)
    before = len(instruments_by_code(db))
    calls: list[tuple[int, int]] = []
    report = import_instruments(db, write_csv(tmp_path / "in.csv", [r for r, _ in MIXED_ROWS]),
                                progress=lambda done, total: calls.append((done, total)))
    assert_mixed_result(db, report)
    assert len(instruments_by_code(db)) == before + 2
    assert calls[0] == (0, len(MIXED_ROWS))
    assert calls[-1] == (len(MIXED_ROWS), len(MIXED_ROWS))


def test_xlsx_good_rows_land_and_bad_rows_are_reported(db: Database, tmp_path: Path) -> None:
    build_world(db)
    report = import_instruments(db, write_xlsx(tmp_path / "in.xlsx", [r for r, _ in MIXED_ROWS]))
    assert_mixed_result(db, report)


def test_reimport_updates_instead_of_duplicating(db: Database, tmp_path: Path) -> None:
    build_world(db)
    rows: list[list[Any]] = [
        ["NEW-1", "CQ-LAB-F", "新共聚焦", "New confocal", "MIC.CONF", 30, 60, 480, "active", ""],
        ["CQ-CONF", "SC-UNI-F", "迁至四川", "Confocal moved to Sichuan", "MIC.CONF", 60, 60, 240, "", ""],
    ]
    first = import_instruments(db, write_csv(tmp_path / "a.csv", rows))
    assert (first.created, first.updated, first.errors) == (1, 1, [])
    count = len(instruments_by_code(db))
    rows[0][3] = "Renamed confocal"
    rows[0][8] = "retired"
    second = import_instruments(db, write_csv(tmp_path / "b.csv", rows))
    assert (second.created, second.updated, second.errors) == (0, 2, [])
    stored = instruments_by_code(db)
    assert len(stored) == count
    assert stored["NEW-1"].name_en == "Renamed confocal"
    assert stored["NEW-1"].status == InstrumentStatus.retired
    moved = stored["CQ-CONF"]
    # Moving to another facility re-derives the copied region and institution.
    assert (moved.region_code, moved.slot_minutes, moved.max_booking_minutes) == ("SC", 60, 240)


def test_update_keeps_absent_columns_and_rejected_update_changes_nothing(
    db: Database, tmp_path: Path
) -> None:
    build_world(db)
    header = ["code", "facility", "name_en", "category", "max_booking_minutes"]
    rows: list[list[Any]] = [
        ["CQ-CONF", "CQ-LAB-F", "Confocal, renamed", "MIC.CONF", 240],
        ["CQ-SEQ", "CQ-LAB-F", "Sequencer, renamed", "GEN.SEQ", 90],  # not a multiple of its 60-minute grid
    ]
    report = import_instruments(db, write_csv(tmp_path / "partial.csv", rows, header=header))
    assert [(e.line, e.field) for e in report.errors] == [(3, "max_booking_minutes")]
    stored = instruments_by_code(db)
    conf = stored["CQ-CONF"]
    assert (conf.name_en, conf.name_zh, conf.model, conf.max_booking_minutes) == (
        "Confocal, renamed", "激光共聚焦显微镜", "LSM 980", 240,
    )
    seq = stored["CQ-SEQ"]
    assert (seq.name_en, seq.max_booking_minutes) == ("High-throughput sequencer", 480)


@pytest.mark.parametrize("encoding", ["gb18030", "utf-8-sig"])
def test_chinese_excel_encodings(db: Database, tmp_path: Path, encoding: str) -> None:
    build_world(db)
    rows: list[list[Any]] = [["ZH-1", "CQ-LAB-F", "超高分辨显微镜", "", "MIC.CONF", "", "", "", "", ""]]
    path = write_csv(tmp_path / "zh.csv", rows, encoding=encoding)
    if encoding == "gb18030":
        with pytest.raises(UnicodeDecodeError):
            path.read_bytes().decode("utf-8")
    else:
        assert path.read_bytes().startswith(b"\xef\xbb\xbf")  # the BOM Excel writes
    report = import_instruments(db, path)
    assert (report.created, report.errors) == (1, [])
    stored = instruments_by_code(db)["ZH-1"]
    assert stored.name_zh == stored.name_en == "超高分辨显微镜"


@pytest.mark.parametrize("make", [write_csv, write_xlsx])
def test_unknown_header_column_rejects_the_whole_file(db: Database, tmp_path: Path, make: Any) -> None:
    build_world(db)
    before = len(instruments_by_code(db))
    rows: list[list[Any]] = [["NEW-1", "CQ-LAB-F", "名", "Name", "MIC.CONF", "", "", "", "", "", "x"]]
    path = make(tmp_path / ("in.xlsx" if make is write_xlsx else "in.csv"), rows, header=[*HEADER, "colour"])
    with pytest.raises(InvalidInput) as caught:
        import_instruments(db, path)
    assert caught.value.field == "header"
    assert "colour" in caught.value.message
    assert len(instruments_by_code(db)) == before


def test_missing_required_column_rejects_the_whole_file(db: Database, tmp_path: Path) -> None:
    build_world(db)
    header = ["code", "facility", "name_zh"]
    path = write_csv(tmp_path / "in.csv", [["NEW-1", "CQ-LAB-F", "名"]], header=header)
    with pytest.raises(InvalidInput) as caught:
        import_instruments(db, path)
    assert caught.value.field == "header"
    assert "category" in caught.value.message
    assert "NEW-1" not in instruments_by_code(db)


def test_rows_commit_in_batches_and_blank_lines_keep_line_numbers(
    db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_world(db)
    monkeypatch.setattr(importer, "BATCH_ROWS", 3)
    rows: list[list[Any]] = [
        [f"B-{n}", "CQ-UNI-F", f"仪器{n}", "", "CYT.FLOW", "", "", "", "", ""] for n in range(7)
    ]
    rows.insert(4, [])  # a blank spreadsheet row: skipped, but it still takes line 6
    rows[6][4] = "NOPE"
    calls: list[tuple[int, int]] = []
    report = import_instruments(db, write_csv(tmp_path / "in.csv", rows),
                                progress=lambda done, total: calls.append((done, total)))
    assert [(e.line, e.field) for e in report.errors] == [(8, "category")]
    assert report.created == 6
    assert [done for done, _ in calls] == [0, 3, 6, 8]
    assert {f"B-{n}" for n in range(7)} - instruments_by_code(db).keys() == {"B-5"}


def test_packaged_example_imports_cleanly_into_the_demo(db: Database) -> None:
    from labcommons.catalog import demo

    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=0)
    with db.unit_of_work(write=False) as s:
        before = s.scalar(select(func.count()).select_from(Instrument))
    example = resources.files("labcommons.catalog").joinpath("data/import_example.csv")
    with resources.as_file(example) as path:
        report = import_instruments(db, path)
    assert report.errors == []
    assert report.created >= 5
    with db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Instrument)) == before + report.created


def run_cli(db_url: str, path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from labcommons.cli import app

    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    try:
        # A wide terminal keeps Rich from folding the table cells the assertions look for.
        return CliRunner().invoke(app, ["import", "instruments", str(path)], env={"COLUMNS": "200"})
    finally:
        get_settings.cache_clear()


def test_cli_reports_rejected_lines_and_exits_1(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_world(db)
    result = run_cli(db_url, write_csv(tmp_path / "in.csv", [r for r, _ in MIXED_ROWS]), monkeypatch)
    assert result.exit_code == 1, result.output
    assert f"2 created, 0 updated, {len(EXPECTED_ERRORS)} rejected" in result.output
    table_lines = [line for line in result.output.splitlines() if "│" in line]
    for line, fld in EXPECTED_ERRORS:
        assert any(row.split("│")[1].strip() == str(line) and fld in row for row in table_lines), (line, fld)
    assert instruments_by_code(db).keys() >= GOOD_CODES


def test_cli_exits_0_when_all_rows_are_good(
    db: Database, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    build_world(db)
    rows = [r for r, fld in MIXED_ROWS if fld is None]
    result = run_cli(db_url, write_csv(tmp_path / "in.csv", rows), monkeypatch)
    assert result.exit_code == 0, result.output
    assert "2 created, 0 updated, 0 rejected" in result.output
    assert instruments_by_code(db).keys() >= GOOD_CODES
