"""`labcommons reporting status | refresh | rebuild | show | export | report` on both databases, over the bookings
and charges of test_api.py (whose hand-computed figures the command line must print too)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from openpyxl import load_workbook
from typer.testing import CliRunner

from labcommons.cli import app
from labcommons.config import get_settings
from labcommons.db import Database
from tests.factories import World
from tests.reporting.test_api import FACILITY, PLATFORM, REGION_CQ, Stats, build_stats


@pytest.fixture
def stats(world: World) -> Stats:
    return build_stats(world)


@pytest.fixture
def runner(stats: Stats, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def run(runner: CliRunner, *args: str, code: int = 0) -> str:
    """The command's output with runs of white space made one space (Rich wraps to the terminal's width)."""
    result = runner.invoke(app, ["reporting", *args])
    assert result.exit_code == code, result.output
    return " ".join(result.output.split())


def period(stats: Stats) -> list[str]:
    return ["--from", stats.first.isoformat(), "--to", stats.last.isoformat()]


def test_status_refresh_and_rebuild(runner: CliRunner, stats: Stats, db: Database) -> None:
    before = json.loads(run(runner, "status", "--json"))
    assert before["pending_marks"] > 0 and before["instrument_day_rows"] == 0
    assert "run `labcommons reporting refresh`" in run(runner, "status")
    refreshed = run(runner, "refresh")
    assert f"{before['pending_marks']} instrument-day(s) recomputed" in refreshed
    after = json.loads(run(runner, "status", "--json"))
    assert after["pending_marks"] == 0 and after["instrument_day_rows"] == 5
    assert after["first_day"] == after["last_day"] == stats.day.isoformat()
    text = run(runner, "status")
    assert "pending marks: 0" in text and "instrument-day rows: 5" in text
    rebuilt = run(runner, "rebuild")
    assert f"5 instrument-day row(s) and {after['facility_day_rows']} facility-day row(s) written" in rebuilt
    assert json.loads(run(runner, "status", "--json"))["instrument_day_rows"] == 5


def test_show_prints_the_hand_computed_figures(runner: CliRunner, stats: Stats) -> None:
    # `show` folds pending changes in first, like the API.
    for scope, expected in (("platform", PLATFORM), ("region:CQ", REGION_CQ),
                            (f"facility:{stats.world.facilities['CQ-LAB']}", FACILITY)):
        body = json.loads(run(runner, "show", "--scope", scope, *period(stats), "--json"))
        assert body["totals"] == expected, scope
        assert body["scope"]["token"] == scope
        assert body["period"] == {"first": stats.first.isoformat(), "last": stats.last.isoformat()}
    table = run(runner, "show", "--scope", "region:CQ", *period(stats))
    assert "region:CQ" in table and "10.00" in table and "27000" in table  # 600 booked minutes; revenue in fen
    assert f"{REGION_CQ['utilisation'] * 100:.2f} %" in table


@pytest.mark.parametrize(("args", "field"), [
    (["--scope", "galaxy"], "scope"),
    (["--scope", "region:XX"], "scope"),
    (["--from", "2025-02-30"], "from"),
])
def test_show_refuses_bad_input(runner: CliRunner, args: list[str], field: str) -> None:
    assert f"(field: {field})" in run(runner, "show", *args, code=2)


def test_export_xlsx_and_csv(runner: CliRunner, stats: Stats, tmp_path: Path) -> None:
    book_path = tmp_path / "stats.xlsx"
    assert "written to" in run(runner, "export", "--scope", "region:CQ", *period(stats), "--xlsx", str(book_path))
    book = load_workbook(book_path)
    values = {str(r[0]): r[2] for r in book["totals"].iter_rows(min_row=4, values_only=True) if r[0]}
    assert Decimal(str(values["booked_hours"])) == Decimal("10.00") and values["revenue_fen"] == 27_000
    csv_path = tmp_path / "instruments.csv"
    out = run(runner, "export", "--scope", "region:CQ", *period(stats), "--csv", "instruments", "--out", str(csv_path))
    assert "6 row(s) of instruments" in out
    rows = list(csv.reader(io.StringIO(csv_path.read_text("utf-8-sig"))))
    assert sorted(r[0] for r in rows[1:]) == ["CQ-CONF", "CQ-EM", "CQ-LOCAL", "CQ-SEQ", "CQ-SPATIAL", "CQ-XRD"]
    assert "(field: table)" in run(runner, "export", "--csv", "nope", "--out", str(csv_path), code=2)
    assert "either --xlsx" in run(runner, "export", code=2)
    assert "either --xlsx" in run(runner, "export", "--csv", "totals", code=2)


def test_report_writes_the_pdf(runner: CliRunner, stats: Stats, tmp_path: Path) -> None:
    out = tmp_path / "report.pdf"
    assert "written to" in run(runner, "report", "--institution", "CQ-LAB", "--year", str(stats.day.year),
                               "--out", str(out), "--locale", "en")
    assert out.read_bytes().startswith(b"%PDF")
    by_id = tmp_path / "by-id.pdf"
    run(runner, "report", "--institution", str(stats.world.institutions["CQ-LAB"]), "--year",
        str(stats.day.year), "--out", str(by_id))
    assert by_id.read_bytes().startswith(b"%PDF")
    assert "(field: institution)" in run(runner, "report", "--institution", "NOPE", "--year", "2025", "--out",
                                         str(out), code=2)
    assert "(field: year)" in run(runner, "report", "--institution", "CQ-LAB", "--year", "1999", "--out",
                                  str(out), code=2)
