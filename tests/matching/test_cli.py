"""`labcommons matching reindex | status | query` against a temporary SQLite database holding the small catalogue."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from labcommons.cli import app
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.matching import embeddings, index
from tests.factories import build_world
from tests.matching.h3_support import build_catalogue

ITEMS = 13  # 10 instruments, 2 services, 1 expert


@pytest.fixture
def runner(sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    path = tmp_path / "cli.db"
    shutil.copy(sqlite_template, path)
    db = Database.from_url(f"sqlite:///{path}")
    build_catalogue(build_world(db))
    db.dispose()
    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", f"sqlite:///{path}")
    get_settings.cache_clear()
    index.clear_cache()
    yield CliRunner()
    get_settings.cache_clear()
    index.clear_cache()


def run(runner: CliRunner, *args: str, code: int = 0) -> str:
    result = runner.invoke(app, ["matching", *args])
    assert result.exit_code == code, result.output
    return result.output


def test_status_reindex_and_reindex_all(runner: CliRunner) -> None:
    status = run(runner, "status")
    assert f"documents: {ITEMS} (expert 1, instrument 10, service 2)" in status
    assert f"dirty: {ITEMS}" in status and "active: 0" in status
    hybrid = embeddings.get_encoder() is not None
    assert ("mode: hybrid" if hybrid else "mode: keyword") in status

    out = run(runner, "reindex")
    assert f"{ITEMS} document(s) refreshed; {ITEMS} active, 0 dirty" in out
    status = run(runner, "status")
    assert "dirty: 0" in status and f"active: {ITEMS}" in status
    if hybrid:
        assert f"embeddings: {ITEMS} (all-MiniLM-L6-v2 {ITEMS})" in status
        assert "model: all-MiniLM-L6-v2" in status

    assert "0 document(s) refreshed" in run(runner, "reindex")
    out = run(runner, "reindex", "--all")
    assert f"{ITEMS} item(s) marked for reindexing" in out and f"{ITEMS} document(s) refreshed" in out


def test_status_without_embeddings(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LABCOMMONS_MATCHING_EMBEDDINGS", "off")
    get_settings.cache_clear()
    status = run(runner, "status")
    assert "mode: keyword" in status and "model: none (switched off" in status
    out = run(runner, "reindex")
    assert f"{ITEMS} document(s) refreshed" in out and "0 with embeddings (keyword" in out


def test_query_prints_a_ranked_table(runner: CliRunner) -> None:
    run(runner, "reindex")
    out = run(runner, "query", "我想做单颗粒冷冻电镜解析蛋白质结构")
    assert "CQ-CRYO" in out and "match(es)" in out
    assert out.index("CQ-CRYO") < out.index("EXP-HAN")
    typo = run(runner, "query", "sequncing of tumour DNA")
    assert "corrected: sequncing → sequencing" in typo and "CQ-SEQ" in typo


def test_query_as_json(runner: CliRunner) -> None:
    result = runner.invoke(app, ["matching", "query", "核磁共振氢谱测试", "--region", "SC", "--limit", "2", "--json"])
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert [r["code"] for r in body["results"]] == ["SC-NMR", "CQ-NMR"]
    assert body["index_size"] == ITEMS and body["mode"] in ("hybrid", "keyword")
    first = body["results"][0]
    assert first["type"] == "instrument" and first["region"] == "SC"
    assert first["explanation"]["region_match"] is True and "price" in first["explanation"]


def test_query_keeps_institution_only_instruments_hidden(runner: CliRunner) -> None:
    # The command line ranks as an anonymous visitor.
    body = json.loads(runner.invoke(app, ["matching", "query", "流式细胞分析", "--json"]).stdout)
    codes = [r["code"] for r in body["results"]]
    assert "CQ-FLOW" in codes and "CQ-LOCAL" not in codes


@pytest.mark.parametrize(
    ("args", "field"),
    [(["query", "NMR", "--limit", "0"], "limit"), (["query", "NMR", "--limit", "51"], "limit"),
     (["query", "NMR", "--region", "XX"], "region"), (["query", "  "], "text")],
)
def test_query_rejects_bad_input(runner: CliRunner, args: list[str], field: str) -> None:
    out = run(runner, *args, code=2)
    assert f"(field: {field})" in out
