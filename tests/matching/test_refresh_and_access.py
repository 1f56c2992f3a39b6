"""Review findings, each pinned by a test: the migration's documents refresh clean; a refresh never overwrites a
document changed meanwhile; a renamed item loses its stale vector where no model runs; non-text input is a 422;
only subscribed facilities a demand reached may answer it; the earliest free slot skips booked time."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select, update

from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import Facility, Institution, InstitutionKind, Instrument, Region
from labcommons.db import Database, utcnow
from labcommons.errors import InvalidInput, NotFound
from labcommons.matching import demands, embeddings, index
from labcommons.matching import service as matching
from labcommons.matching.models import MatchDocument
from labcommons.migrations import upgrade
from tests.factories import World
from tests.matching.h1_support import MatchWorld, build_match_world, offer, post, subscribe


@pytest.fixture
def mw(world: World) -> MatchWorld:
    return build_match_world(world)


@pytest.fixture
def keyword_only() -> Iterator[None]:
    embeddings.simulate_missing("test without a model")
    index.clear_cache()
    yield
    embeddings.simulate_missing(None)
    index.clear_cache()


def _dirty(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(MatchDocument).where(MatchDocument.dirty.is_(True)))
                   or 0)


def test_documents_the_migration_adds_for_existing_items_refresh_clean(tmp_path: Path, keyword_only: None) -> None:
    db = Database.from_url(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db.engine, "0005")
    with db.engine.begin() as conn:  # a catalogue that predates matching (Core: no ORM listener involved)
        conn.execute(insert(Region).values(code="CQ", name_zh="重庆", name_en="Chongqing"))
        conn.execute(insert(Institution).values(id=1, code="I", region_code="CQ", kind=InstitutionKind.laboratory,
                                                name_zh="所", name_en="Institute"))
        conn.execute(insert(Facility).values(id=1, code="F", institution_id=1, name_zh="平台", name_en="Core",
                                             description_zh="", description_en=""))
        conn.execute(insert(Instrument).values(
            id=1, code="NMR", facility_id=1, institution_id=1, region_code="CQ", name_zh="核磁共振波谱仪",
            name_en="NMR spectrometer", category_code="ANA.NMR", created_at=utcnow(), updated_at=utcnow()))
    upgrade(db.engine)
    assert _dirty(db) == 1
    with db.unit_of_work() as s:
        assert index.refresh(s) == 1
    assert _dirty(db) == 0
    with db.unit_of_work(write=False) as s:
        assert [r.code for r in matching.match(s, None, "核磁").results] == ["NMR"]
    db.dispose()


def test_a_document_changed_while_it_was_computed_stays_dirty(world: World, keyword_only: None) -> None:
    conf = world.instruments["CONF"]
    with world.db.unit_of_work(write=False) as s:
        batch = index._recompute_batch(s, ("", 0), 100, None)
    assert any(item.item_id == conf for item in batch)
    with world.db.unit_of_work() as s:  # renamed after the refresh read it
        instrument = s.get(Instrument, conf)
        assert instrument is not None
        instrument.name_en = "Raman microscope"
    with world.db.unit_of_work() as s:
        stored = index._store(s, batch)
    assert stored == len(batch) - 1
    with world.db.unit_of_work(write=False) as s:
        row = s.get(MatchDocument, ("instrument", conf))
        assert row is not None and row.dirty
    with world.db.unit_of_work() as s:
        index.refresh(s)
    with world.db.unit_of_work(write=False) as s:
        row = s.get(MatchDocument, ("instrument", conf))
        assert row is not None and not row.dirty and "raman" in row.name_tokens.split()


def test_a_renamed_item_loses_its_vector_where_no_model_runs(world: World) -> None:
    conf = world.instruments["CONF"]
    with world.db.unit_of_work() as s:
        s.execute(update(MatchDocument).where(MatchDocument.kind == "instrument", MatchDocument.item_id == conf)
                  .values(embedding=embeddings.to_bytes(__import__("numpy").ones(384)), embedding_model="m",
                          content_hash="old", dirty=True))
    embeddings.simulate_missing("no model here")
    try:
        with world.db.unit_of_work() as s:
            index.refresh(s)
        with world.db.unit_of_work(write=False) as s:
            row = s.get(MatchDocument, ("instrument", conf))
            assert row is not None and row.embedding is None and row.embedding_model == ""
    finally:
        embeddings.simulate_missing(None)
        index.clear_cache()


def test_text_that_is_not_valid_unicode_is_refused(mw: MatchWorld, keyword_only: None) -> None:
    with pytest.raises(InvalidInput) as caught, mw.db.unit_of_work(write=False) as s:
        matching.match(s, None, "sequencing \ud800")
    assert caught.value.field == "text"
    from labcommons.app import create_app

    client = TestClient(create_app(db=mw.db))
    for path, headers in (("/api/v1/demands/match", {}), ("/api/v1/demands", mw.world.headers("bob"))):
        answer = client.post(path, headers={**headers, "Content-Type": "application/json"},
                             content=b'{"text": "sequencing \\ud800"}')
        assert answer.status_code == 422, (path, answer.text)
        assert "text" in answer.text


def test_only_facilities_a_demand_reached_may_answer_or_read_it(mw: MatchWorld, keyword_only: None) -> None:
    demand_id = post(mw, "single-cell RNA sequencing and mass spectrometry proteomics of the same tissue")
    # SC-UNI matched but does not subscribe: to carol the demand does not exist.
    with pytest.raises(NotFound), mw.db.unit_of_work() as s:
        offer(mw, demand_id, user="carol", facility="SC-UNI", service="MS")
    with pytest.raises(NotFound), mw.db.unit_of_work(write=False) as s:
        demands.get_demand(s, mw.actor("carol"), demand_id)
    # Subscribed, but asking for better matches than this one: still nothing.
    subscribe(mw.world, "SC-UNI", min_score=1.0)
    with pytest.raises(NotFound), mw.db.unit_of_work(write=False) as s:
        demands.get_demand(s, mw.actor("carol"), demand_id)
    with mw.db.unit_of_work() as s:
        demands.set_subscription(s, mw.actor("carol"), mw.world.facilities["SC-UNI"], active=True, min_score=0.0,
                                 notify_email=False)
    assert offer(mw, demand_id, user="carol", facility="SC-UNI", service="MS") > 0


def test_the_earliest_free_slot_skips_booked_time(world: World, keyword_only: None) -> None:
    now = utcnow()
    with world.db.unit_of_work() as s:
        instrument = s.get(Instrument, world.instruments["CONF"])
        assert instrument is not None
        start = matching.booking.align_up(now, instrument.slot_minutes)
        user_id = world.actors["alice"].user_id
        s.add(Booking(instrument_id=instrument.id, user_id=user_id, starts_at=start,
                      ends_at=start + timedelta(hours=3), status=BookingStatus.confirmed, purpose="busy"))
    with world.db.unit_of_work(write=False) as s:
        instrument = s.get(Instrument, world.instruments["CONF"])
        assert instrument is not None
        busy = matching.booking.busy_intervals(s, [instrument.id], now, now + timedelta(days=31))
        assert matching.earliest_free(instrument, now, busy.get(instrument.id, [])) == start + timedelta(hours=3)
        assert matching.earliest_free(instrument, now, []) == start


def test_a_large_rnd_budget_and_offer_price_are_kept_to_the_fen(mw: MatchWorld, keyword_only: None) -> None:
    # ¥50,000,000.01 is beyond a 32-bit integer of fen: the columns are 64-bit on both engines.
    amount = 5_000_000_001
    demand_id = post(mw, budget_fen=amount)
    offer_id = offer(mw, demand_id, price_fen=amount)
    with mw.db.unit_of_work(write=False) as s:
        view = demands.get_demand(s, mw.actor("bob"), demand_id)
        assert view.demand.budget_fen == amount
        assert [o.offer.price_fen for o in view.offers if o.offer.id == offer_id] == [amount]
