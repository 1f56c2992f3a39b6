"""`labcommons billing`: invoices generate, settlement and export-charges on the command line."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from openpyxl import load_workbook
from typer.testing import CliRunner

from labcommons.cli import app
from labcommons.config import get_settings
from tests.billing.invoice_support import ledger_world
from tests.factories import World


@pytest.fixture
def cli(world: World, db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_generate_settle_and_export_from_the_command_line(world: World, cli: CliRunner, tmp_path: Path) -> None:
    ids = ledger_world(world)
    made = cli.invoke(app, ["billing", "invoices", "generate", "--period", "2026-10"])
    assert made.exit_code == 0, made.output
    assert f"INV-202610-{ids['grant']:06d}" in made.output and "3 invoice(s) made for 2026-10" in made.output
    again = cli.invoke(app, ["billing", "invoices", "generate", "--period", "2026-10"])
    assert again.exit_code == 0 and "0 invoice(s)" in again.output
    refused = cli.invoke(app, ["billing", "invoices", "generate", "--period", "2999-01"])
    assert refused.exit_code == 2 and "period" in refused.output
    early = cli.invoke(app, ["billing", "invoices", "generate", "--period", "2999-01", "--allow-open",
                             "--account", "CQ-GRANT"])
    assert early.exit_code == 0 and f"INV-299901-{ids['grant']:06d}" in early.output

    out = tmp_path / "settlement.xlsx"
    settled = cli.invoke(app, ["billing", "settlement", "--period", "2026-10", "--format", "xlsx", "--out", str(out)])
    assert settled.exit_code == 0, settled.output
    assert "total 2,240.13 (charges 2,240.13)" in settled.output
    assert load_workbook(out).sheetnames == ["Settlement", "Regions"]
    assert cli.invoke(app, ["billing", "settlement", "--period", "2026-10", "--format", "doc",
                            "--out", str(out)]).exit_code == 2

    charges = tmp_path / "charges.csv"
    exported = cli.invoke(app, ["billing", "export-charges", "--from", "2026-10-01", "--to", "2026-11-30",
                                "--out", str(charges)])
    assert exported.exit_code == 0, exported.output
    rows = list(csv.DictReader(io.StringIO(charges.read_text("utf-8-sig"))))
    assert sum(int(r["part_fen"]) for r in rows) == 224_013 + 30_001
    assert f"{len(rows)} row(s)" in exported.output
