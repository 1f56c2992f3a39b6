"""The match index stays current: changes are found by the next match before any refresh, refreshing stores clean
documents, retired or inactive items drop out, facility renames mark their items, the periodic job refreshes and
each process reloads its cached index when the documents change."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import delete, func, select

from labcommons import jobs
from labcommons.catalog.models import Facility, InstrumentStatus, Service
from labcommons.db import Database, utcnow
from labcommons.matching import embeddings, index
from labcommons.matching.models import MatchDocument
from labcommons.notifications.models import Job, JobStatus
from tests.factories import World, add_instrument
from tests.matching.h3_support import (
    Catalogue,
    add_expert,
    add_service,
    build_catalogue,
    codes,
    match,
    refresh,
    set_instrument,
)


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    index.clear_cache()
    yield
    index.clear_cache()


@pytest.fixture
def cat(world: World) -> Catalogue:
    return build_catalogue(world)


def documents(db: Database) -> dict[tuple[str, int], MatchDocument]:
    with db.unit_of_work(write=False) as s:
        return {(d.kind, d.item_id): d for d in s.scalars(select(MatchDocument))}


def dirty_count(db: Database) -> int:
    with db.unit_of_work(write=False) as s:
        return s.scalar(select(func.count()).select_from(MatchDocument).where(MatchDocument.dirty.is_(True))) or 0


def test_every_item_gets_a_dirty_document_in_its_own_transaction(cat: Catalogue) -> None:
    docs = documents(cat.db)
    for instrument_id in cat.instruments.values():
        assert docs[("instrument", instrument_id)].dirty
    assert docs[("service", cat.services["WES"])].dirty
    assert docs[("expert", cat.experts["HAN"])].dirty


def test_new_items_are_found_by_the_next_match_without_a_refresh(cat: Catalogue) -> None:
    refresh(cat.db)
    assert "CQ-NEPH" not in codes(match(cat.db, "nephelometer"))  # the index is loaded and cached now
    with cat.db.unit_of_work() as s:
        add_instrument(s, cat.world.facilities["CQ-UNI"], "CQ-NEPH", name_zh="浊度计", name_en="Laser nephelometer",
                       category_code="ANA.SPEC")
    assert codes(match(cat.db, "nephelometer"))[:1] == ["CQ-NEPH"]
    assert codes(match(cat.db, "浊度计"))[:1] == ["CQ-NEPH"]

    add_service(cat.db, cat.world.facilities["SC-UNI"], "SC-S-ZETA", name_zh="Zeta电位测定",
                name_en="Zeta potential measurement", category_code="ANA.SPEC")
    assert codes(match(cat.db, "zeta potential"))[:1] == ["SC-S-ZETA"]

    add_expert(cat.db, "EXP-ZHOU", cat.world.facilities["SC-UNI"], name_zh="周立", name_en="Zhou Li",
               fields=["ANA.XRD"], skills_zh=["晶体学"], skills_en=["crystallography"],
               bio_en="Small-molecule crystallography.", bio_zh="小分子晶体学。", region_code="SC")
    assert codes(match(cat.db, "crystallography advice"))[:1] == ["EXP-ZHOU"]
    # Still dirty: found through the in-memory overlay, nothing refreshed them.
    assert dirty_count(cat.db) == 3


def test_refresh_stores_clean_documents(cat: Catalogue) -> None:
    assert refresh(cat.db) == len(documents(cat.db))
    encoder = embeddings.get_encoder()
    docs = documents(cat.db)
    for doc in docs.values():
        assert not doc.dirty and doc.active
        assert doc.name_tokens and doc.body_tokens and len(doc.content_hash) == 64
        if encoder is not None:
            assert doc.embedding is not None and doc.embedding_model == encoder.name
            assert len(embeddings.from_bytes(doc.embedding)) == encoder.dimensions
    cryo = docs[("instrument", cat.instruments["CRYO"])]
    assert cryo.category_code == "MIC.EM" and cryo.region_code == "CQ"
    assert cryo.facility_id == cat.world.facilities["CQ-LAB"]
    assert "冷冻" in cryo.name_tokens.split() and "krio" in cryo.name_tokens.split()
    # Nothing left to do.
    assert refresh(cat.db) == 0


def test_refresh_keeps_the_embedding_when_the_text_is_unchanged(cat: Catalogue) -> None:
    refresh(cat.db)
    key = ("instrument", cat.instruments["CRYO"])
    before = documents(cat.db)[key]
    # A change that is not part of the document's text: the row is marked dirty, the content stays the same.
    set_instrument(cat.db, cat.instruments["CRYO"], max_booking_minutes=600)
    assert documents(cat.db)[key].dirty
    refresh(cat.db)
    after = documents(cat.db)[key]
    assert not after.dirty and after.content_hash == before.content_hash and after.embedding == before.embedding


def test_renaming_an_instrument_changes_what_matches(cat: Catalogue) -> None:
    set_instrument(cat.db, cat.instruments["CONF"], name_en="Quokka confocal microscope")
    refresh(cat.db)
    assert codes(match(cat.db, "quokka"))[:1] == ["CQ-CONF"]
    set_instrument(cat.db, cat.instruments["CONF"], name_en="Wombat confocal microscope")
    # Before the refresh (overlay) and after it.
    assert "CQ-CONF" not in codes(match(cat.db, "quokka"))
    assert codes(match(cat.db, "wombat"))[:1] == ["CQ-CONF"]
    refresh(cat.db)
    assert "CQ-CONF" not in codes(match(cat.db, "quokka"))
    assert codes(match(cat.db, "wombat"))[:1] == ["CQ-CONF"]


def test_retired_instruments_and_inactive_services_drop_out(cat: Catalogue) -> None:
    refresh(cat.db)
    assert "CQ-FLOW" in codes(match(cat.db, "flow cytometer"))
    assert "CQ-S-WES" in codes(match(cat.db, "whole exome sequencing"))
    set_instrument(cat.db, cat.instruments["FLOW"], status=InstrumentStatus.retired)
    with cat.db.unit_of_work() as s:
        service = s.get(Service, cat.services["WES"])
        assert service is not None
        service.is_active = False
    assert "CQ-FLOW" not in codes(match(cat.db, "flow cytometer"))
    assert "CQ-S-WES" not in codes(match(cat.db, "whole exome sequencing"))
    refresh(cat.db)
    docs = documents(cat.db)
    flow = docs[("instrument", cat.instruments["FLOW"])]
    wes = docs[("service", cat.services["WES"])]
    assert not flow.active and flow.embedding is None and not wes.active
    assert "CQ-FLOW" not in codes(match(cat.db, "flow cytometer"))
    assert "CQ-S-WES" not in codes(match(cat.db, "whole exome sequencing"))
    # Back in service, back in the results.
    set_instrument(cat.db, cat.instruments["FLOW"], status=InstrumentStatus.active)
    assert "CQ-FLOW" in codes(match(cat.db, "flow cytometer"))


def test_renaming_a_facility_marks_its_items_dirty(cat: Catalogue) -> None:
    refresh(cat.db)
    assert dirty_count(cat.db) == 0
    with cat.db.unit_of_work() as s:
        facility = s.get(Facility, cat.world.facilities["CQ-UNI"])
        assert facility is not None
        facility.name_en = "Platypus Resonance Centre"
    docs = documents(cat.db)
    uni = cat.world.facilities["CQ-UNI"]
    assert {k for k, d in docs.items() if d.dirty} == {k for k, d in docs.items() if d.facility_id == uni}
    assert docs[("instrument", cat.instruments["NMR-CQ"])].dirty
    assert not docs[("instrument", cat.instruments["NMR-SC"])].dirty
    assert set(codes(match(cat.db, "platypus"))) == {"CQ-NMR", "CQ-FLOW"}
    refresh(cat.db)
    assert set(codes(match(cat.db, "platypus"))) == {"CQ-NMR", "CQ-FLOW"}


def test_the_periodic_refresh_job_cleans_documents(cat: Catalogue) -> None:
    assert dirty_count(cat.db) > 0
    now = utcnow()
    jobs.schedule_periodic(cat.db, now=now)
    with cat.db.unit_of_work(write=False) as s:
        queued = s.scalars(select(Job).where(Job.kind == "match_refresh")).all()
    assert len(queued) == 1 and queued[0].status == JobStatus.queued
    # Scheduling again in the same interval queues nothing new.
    jobs.schedule_periodic(cat.db, now=now)
    with cat.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Job).where(Job.kind == "match_refresh")) == 1
    stats = jobs.run_pending(cat.db, now=now + timedelta(seconds=1))
    assert stats.failed == 0 and stats.done >= 1
    with cat.db.unit_of_work(write=False) as s:
        job = s.scalars(select(Job).where(Job.kind == "match_refresh")).one()
    assert job.status == JobStatus.done
    assert dirty_count(cat.db) == 0
    assert codes(match(cat.db, "冷冻电镜"))[:1] == ["CQ-CRYO"]


def test_the_cached_index_reloads_when_the_documents_change(cat: Catalogue) -> None:
    refresh(cat.db)
    with cat.db.unit_of_work(write=False) as s:
        first = index.load_index(s)
        assert index.load_index(s) is first
    size = first.size
    with cat.db.unit_of_work() as s:
        add_instrument(s, cat.world.facilities["CQ-LAB"], "CQ-NEW", name_en="Isothermal titration calorimeter",
                       category_code="ANA.THERM")
    with cat.db.unit_of_work(write=False) as s:
        second = index.load_index(s)
    assert second is not first and second.version != first.version and second.size == size + 1
    refresh(cat.db)  # clean again: a new version, the same content
    with cat.db.unit_of_work(write=False) as s:
        third = index.load_index(s)
        assert third is not second and third.size == size + 1
        assert index.load_index(s) is third
    index.clear_cache()
    with cat.db.unit_of_work(write=False) as s:
        assert index.load_index(s) is not third


def test_document_tokens_are_computed_for_dirty_documents(cat: Catalogue) -> None:
    key = ("instrument", cat.instruments["CRYO"])
    with cat.db.unit_of_work(write=False) as s:
        dirty = index.document_tokens(s, [key])
    refresh(cat.db)
    with cat.db.unit_of_work(write=False) as s:
        clean = index.document_tokens(s, [key])
    assert dirty == clean and "冷冻" in clean[key]


def test_mark_all_dirty_adds_missing_documents(cat: Catalogue) -> None:
    refresh(cat.db)
    with cat.db.unit_of_work() as s:
        s.execute(delete(MatchDocument).where(MatchDocument.kind == "service"))
    with cat.db.unit_of_work() as s:
        marked = index.mark_all_dirty(s)
    docs = documents(cat.db)
    assert marked == len(docs) and all(d.dirty for d in docs.values())
    assert ("service", cat.services["WES"]) in docs
    refresh(cat.db)
    assert codes(match(cat.db, "whole exome sequencing"))[:1] == ["CQ-S-WES"]
