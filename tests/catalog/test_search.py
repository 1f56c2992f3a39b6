"""Catalogue search over the API: Chinese and English keywords, facets, filters, free windows, cursors."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from labcommons.catalog.models import Instrument, InstrumentStatus
from tests.api_client import client_for, codes_by_pages, item_codes
from tests.factories import World, add_instrument, next_grid_day


def codes(world: World, **params: Any) -> list[str]:
    return item_codes(world.db, "/api/v1/instruments", **params)


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("测序", "CQ-SEQ"),            # a two-character word inside 高通量基因测序仪
        ("基因测序仪", "CQ-SEQ"),
        ("序", "CQ-SEQ"),              # one character
        ("共聚焦", "CQ-CONF"),
        ("质谱", "SC-MS"),
        ("seq", "CQ-SEQ"),             # English prefix
        ("Sequencer", "CQ-SEQ"),
        ("novaseq", "CQ-SEQ"),         # model
        ("ZEISS confocal", "CQ-CONF"),  # manufacturer and name, any case
        ("时空组学", "CQ-SPATIAL"),
        ("Spatial and spatiotemporal", "CQ-SPATIAL"),  # words of the category's name
    ],
)
def test_keyword_search_in_both_languages(world: World, q: str, expected: str) -> None:
    assert codes(world, q=q)[0] == expected


def test_all_terms_must_match(world: World) -> None:
    assert codes(world, q="测序 共聚焦") == []
    assert set(codes(world, q="显微镜")) == {"CQ-CONF", "CQ-EM"}, "maintenance is listed, not hidden"
    assert codes(world, q="电子显微镜") == ["CQ-EM"]


def test_punctuation_only_query_returns_everything_not_an_error(world: World) -> None:
    assert len(codes(world, q="!!! ---")) == len(codes(world))


def test_filters_region_institution_category_status(world: World) -> None:
    assert codes(world, region="SC") == ["SC-MS"]
    assert set(codes(world, institution="CQ-LAB")) == {"CQ-CONF", "CQ-SEQ", "CQ-SPATIAL", "CQ-EM", "CQ-LOCAL"}
    assert set(codes(world, category="GEN")) == {"CQ-SEQ", "CQ-SPATIAL"}, "a parent code matches its children"
    assert codes(world, category="GEN.SEQ") == ["CQ-SEQ"]
    assert codes(world, status="maintenance") == ["CQ-EM"]


def test_retired_instruments_are_hidden_unless_asked_for(world: World) -> None:
    with world.db.unit_of_work() as s:
        s.execute(update(Instrument).where(Instrument.code == "CQ-LOCAL").values(status=InstrumentStatus.retired))
    assert "CQ-LOCAL" not in codes(world)
    assert codes(world, status="retired") == ["CQ-LOCAL"]


def test_facets_count_each_dimension_without_its_own_filter(world: World) -> None:
    r = client_for(world.db).get("/api/v1/instruments", params={"facets": "true", "region": "CQ"})
    facets = r.json()["facets"]
    assert {f["value"]: f["count"] for f in facets["region"]} == {"CQ": 5, "SC": 1}
    categories = {f["value"]: f["count"] for f in facets["category"]}
    assert categories["GEN"] == 2 and categories["GEN.SEQ"] == 1 and categories["MIC"] == 2
    assert "ANA.MS" not in categories, "the region filter applies to the other facets"
    assert {f["value"]: f["count"] for f in facets["status"]} == {"active": 4, "maintenance": 1}
    labels = {f["value"]: f["label_zh"] for f in facets["category"]}
    assert labels["GEN.SEQ"] == "基因测序"
    assert r.json()["facets"]["institution"][0]["value"] == "CQ-LAB"


def test_free_window_filter(world: World) -> None:
    client = client_for(world.db)
    start = next_grid_day()
    booked = client.post(
        "/api/v1/bookings",
        json={"instrument_id": world.instruments["CONF"], "starts_at": start.isoformat(),
              "ends_at": (start + timedelta(hours=2)).isoformat()},
        headers=world.headers("alice"),
    )
    assert booked.status_code == 201

    def free(a: float, b: float) -> list[str]:
        return codes(world, free_from=(start + timedelta(hours=a)).isoformat(),
                     free_to=(start + timedelta(hours=b)).isoformat())

    assert "CQ-CONF" not in free(1, 3)
    assert "CQ-CONF" in free(2, 3), "the window starts when the booking ends"
    assert "CQ-CONF" in free(-1, 0)
    assert "CQ-EM" not in free(2, 3), "instruments in maintenance are never free"
    r = client.get("/api/v1/instruments", params={"free_from": start.isoformat()})
    assert r.status_code == 422 and r.json()["field"] == "free_to"
    r = client.get("/api/v1/instruments", params={"free_from": start.isoformat(), "free_to": start.isoformat()})
    assert r.status_code == 422 and r.json()["field"] == "free_to"


@pytest.mark.parametrize("q", ["", "仪", "instrument"])
def test_cursor_pagination_visits_every_match_once(world: World, q: str) -> None:
    with world.db.unit_of_work() as s:
        for i in range(23):
            add_instrument(s, world.facilities["SC-UNI"], f"SC-X{i:02d}", name_zh=f"分析仪 {i}",
                           name_en=f"Analyser instrument {i}", category_code="ANA.SPEC")
    everything = set(codes(world, q=q, limit=100))
    seen = codes_by_pages(world.db, "/api/v1/instruments", limit=5, q=q)
    assert len(seen) == len(set(seen)) == len(everything) and set(seen) == everything
    assert len(everything) >= 23


@pytest.mark.parametrize(
    ("params", "field"),
    [({"q": "x" * 201}, "q"), ({"limit": 0}, "limit"), ({"limit": 1000}, "limit"), ({"cursor": "%%%"}, "cursor"),
     ({"status": "broken"}, "status"), ({"free_from": "yesterday", "free_to": "today"}, "free_from")],
)
def test_bad_search_parameters_are_422(world: World, params: dict[str, Any], field: str) -> None:
    r = client_for(world.db).get("/api/v1/instruments", params=params)
    assert r.status_code == 422 and r.json()["field"] == field


def test_instrument_detail_and_404(world: World) -> None:
    client = client_for(world.db)
    r = client.get(f"/api/v1/instruments/{world.instruments['SEQ']}")
    assert r.status_code == 200
    data = r.json()
    assert data["name_zh"] == "高通量基因测序仪" and data["slot_minutes"] == 60
    assert data["facility"]["code"] == "CQ-LAB-F" and data["region"] == "CQ"
    missing = client.get("/api/v1/instruments/424242")
    assert missing.status_code == 404 and missing.json() == {
        "error": "not_found", "message": "Instrument 424242 does not exist.", "field": "instrument_id"}
