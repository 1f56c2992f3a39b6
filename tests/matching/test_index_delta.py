"""The in-memory index follows catalogue changes through a delta segment over the cached base, and rebuilds in
full when the delta grows too large; ranking over base + delta equals ranking over a fresh full build."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import update

from labcommons.catalog.models import Instrument
from labcommons.db import utcnow
from labcommons.matching import embeddings, index
from labcommons.matching.models import MatchDocument
from tests.factories import World, add_instrument


@pytest.fixture(autouse=True)
def keyword_only() -> Iterator[None]:
    # The delta logic is the same with and without vectors; keywords keep these tests fast.
    embeddings.simulate_missing("delta tests")
    index.clear_cache()
    yield
    embeddings.simulate_missing(None)
    index.clear_cache()


def _ranked(world: World, text: str) -> list[tuple[str, int]]:
    with world.db.unit_of_work(write=False) as s:
        built = index.load_index(s)
        candidates, _ = built.rank(built.plan(text), encoder=None, region=None, limit=10)
    return [(c.kind, c.item_id) for c in candidates]


def _settle(world: World) -> None:
    """Store every dirty document and push their change time back, as if the base had been built long ago."""
    with world.db.unit_of_work() as s:
        index.refresh(s)
        s.execute(update(MatchDocument).values(changed_at=utcnow() - timedelta(hours=1)))
        # The base's latest change, half an hour ago: only what changed around or after it goes to a delta.
        s.execute(update(MatchDocument).where(MatchDocument.item_id == world.instruments["LOCAL"])
                  .values(changed_at=utcnow() - timedelta(minutes=30)))


def test_a_renamed_instrument_is_found_through_the_delta(world: World) -> None:
    _settle(world)
    index.clear_cache()
    assert ("instrument", world.instruments["CONF"]) in _ranked(world, "confocal")
    with world.db.unit_of_work(write=False) as s:
        base = index.load_index(s).base
    with world.db.unit_of_work() as s:
        instrument = s.get(Instrument, world.instruments["SEQ"])
        assert instrument is not None
        instrument.name_en = "Nanopore long-read sequencer"
    with world.db.unit_of_work(write=False) as s:
        current = index.load_index(s)
    assert current.base is base, "a small change reuses the base"
    assert current.delta is not None
    assert set(current.delta.positions) == {("instrument", world.instruments[k]) for k in ("SEQ", "LOCAL")}
    assert not current.alive[base.positions[("instrument", world.instruments["SEQ"])]]
    assert ("instrument", world.instruments["SEQ"]) in _ranked(world, "nanopore")


def test_delta_and_full_build_rank_the_same(world: World) -> None:
    _settle(world)
    index.clear_cache()
    _ranked(world, "warm")
    with world.db.unit_of_work() as s:
        add_instrument(s, world.facilities["SC-UNI"], "SC-NMR", name_en="NMR spectrometer 600 MHz",
                       name_zh="核磁共振波谱仪", category_code="ANA.NMR")
        retired = s.get(Instrument, world.instruments["CONF"])
        assert retired is not None
        retired.status = "retired"  # type: ignore[assignment]
    with world.db.unit_of_work(write=False) as s:
        assert index.load_index(s).delta is not None
    with_delta = {q: _ranked(world, q) for q in ("核磁", "NMR", "confocal microscope", "sequencer")}
    index.clear_cache()
    full = {q: _ranked(world, q) for q in with_delta}
    # Same documents found; the retired confocal is gone from both.
    assert {q: set(r) for q, r in with_delta.items()} == {q: set(r) for q, r in full.items()}
    assert all(("instrument", world.instruments["CONF"]) not in r for r in full.values())
    assert full["NMR"][0][0] == "instrument"


def test_a_large_change_rebuilds_in_full(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    _settle(world)
    index.clear_cache()
    _ranked(world, "warm")
    monkeypatch.setattr(index, "DELTA_MIN", 1)
    monkeypatch.setattr(index, "DELTA_SHARE", 0.0)
    with world.db.unit_of_work() as s:
        for n in range(3):
            add_instrument(s, world.facilities["CQ-LAB"], f"CQ-NEW{n}", name_en=f"Ultracentrifuge {n}")
    with world.db.unit_of_work(write=False) as s:
        rebuilt = index.load_index(s)
    assert rebuilt.delta is None
    assert sum(1 for kind, _ in _ranked(world, "ultracentrifuge") if kind == "instrument") == 3
