"""What the search's faster paths must keep: capped facet counts, the unranked text condition, the page chosen
on ids alone, and migration 0010."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import inspect, select

from labcommons.catalog import service
from labcommons.catalog.models import Instrument
from labcommons.catalog.service import InstrumentQuery
from labcommons.db import Database
from labcommons.migrations import downgrade, upgrade
from tests.factories import World


def facets(db: Database, **query: Any) -> dict[str, dict[str, tuple[int, bool]]]:
    with db.unit_of_work(write=False) as s:
        return {dim: {f.value: (f.count, f.capped) for f in values}
                for dim, values in service.facet_counts(s, InstrumentQuery(**query)).items()}


def test_facets_are_exact_and_not_capped_up_to_the_cap(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "FACET_CAP", 6)  # the world has six instruments, none retired
    counted = facets(world.db)
    assert counted["region"] == {"CQ": (5, False), "SC": (1, False)}
    assert counted["status"] == {"active": (5, False), "maintenance": (1, False)}
    assert counted["category"]["MIC"] == (2, False)  # MIC.CONF and MIC.EM


def test_facets_over_the_cap_count_a_sample_and_say_so(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "FACET_CAP", 3)
    counted = facets(world.db)
    exact = {"CQ": 5, "SC": 1}
    assert all(capped for _, capped in counted["region"].values())
    assert sum(n for n, _ in counted["region"].values()) == 4, "the cap plus one row, to know there are more"
    assert all(n <= exact[code] for code, (n, _) in counted["region"].items()), "each count is a lower bound"
    # A dimension with its own filter is counted on its own rows: the region filter leaves one SC instrument
    # under the cap for every other dimension, while the region dimension (which ignores it) is capped.
    narrowed = facets(world.db, region="SC")
    assert narrowed["status"] == {"active": (1, False)}
    assert all(capped for _, capped in narrowed["region"].values())


def test_text_facets_cap_on_the_matching_rows(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "FACET_CAP", 1)
    counted = facets(world.db, q="显微镜")  # the confocal and the cryo-EM
    assert counted["region"] == {"CQ": (2, True)}
    monkeypatch.setattr(service, "FACET_CAP", 2)
    assert facets(world.db, q="显微镜")["region"] == {"CQ": (2, False)}


@pytest.mark.parametrize("q", ["测序", "显微镜", "microscope", "seq", "zeiss confocal", "序", "nothing-like-it"])
def test_the_unranked_text_condition_matches_what_the_ranked_match_matches(world: World, q: str) -> None:
    with world.db.unit_of_work(write=False) as s:
        match = service.text_match(s, q)
        assert match is not None
        ranked = service._matching(select(Instrument.id), Instrument, match)
        condition, checked = service.text_condition(s, q), service.text_condition(s, q, drive=False)
        assert condition is not None and checked is not None
        unranked, not_driving = select(Instrument.id).where(condition), select(Instrument.id).where(checked)
        expected = set(s.scalars(ranked))
        assert set(s.scalars(unranked)) == expected
        assert set(s.scalars(not_driving)) == expected
        assert service.text_condition(s, "!!") is None


def test_a_page_keeps_the_rank_order_and_loads_its_relations(world: World) -> None:
    with world.db.unit_of_work(write=False) as s:
        page = service.search_instruments(s, InstrumentQuery(q="microscope"), limit=1)
        following = service.search_instruments(s, InstrumentQuery(q="microscope"), limit=1, cursor=page.next_cursor)
        assert {i.code for i in [*page.items, *following.items]} == {"CQ-CONF", "CQ-EM"}
        assert following.next_cursor is None
        assert page.ranks[page.items[0].id] <= following.ranks[following.items[0].id]
        first = page.items[0]
        assert first.institution.code == "CQ-LAB" and first.category.code == first.category_code
        assert first.region.code == "CQ" and first.facility.code == "CQ-LAB-F"


def test_migration_0010_adds_and_drops_the_slot_grid_index(db: Database) -> None:
    def indexes() -> set[str]:
        with db.engine.connect() as conn:
            return {ix["name"] for ix in inspect(conn).get_indexes("instrument") if ix["name"]}

    assert "ix_instrument_slot_id" in indexes()
    downgrade(db.engine, "0009")
    assert "ix_instrument_slot_id" not in indexes()
    upgrade(db.engine)
    assert "ix_instrument_slot_id" in indexes()


@pytest.mark.parametrize(("q", "several"), [("显微镜", True), ("mass spectrometer", True), ("色谱", False),
                                            ("microscope", False), ("序", False), ("!!", False)])
def test_queries_of_several_terms_are_told_apart(q: str, several: bool) -> None:
    assert service.has_several_terms(q) is several
