"""Ranking and explaining matches on a small hand-built catalogue: Chinese and English demands, region preference,
typo correction, who may see which instrument, explanations (terms, concepts, prices, free slots), the keyword
fallback without embeddings, and input validation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

import pytest

from labcommons.errors import InvalidInput
from labcommons.matching import embeddings, index
from labcommons.matching import service as matching
from tests.billing.billing_support import add_rate
from tests.factories import World
from tests.matching.h3_support import Catalogue, build_catalogue, codes, keyword_only, match, refresh

CRYO_ZH = "我想做单颗粒冷冻电镜解析蛋白质结构"


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    index.clear_cache()
    yield
    index.clear_cache()


@pytest.fixture
def cat(world: World) -> Catalogue:
    catalogue = build_catalogue(world)
    refresh(world.db)
    return catalogue


def result(outcome: matching.MatchOutcome, code: str) -> matching.MatchResult:
    return next(r for r in outcome.results if r.code == code)


# ----------------------------------------------------------------------------------------------- ranking


@pytest.mark.parametrize(
    ("text", "first"),
    [
        (CRYO_ZH, "CQ-CRYO"),
        ("流式细胞分析，免疫表型", "CQ-FLOW"),
        ("找冷冻电镜专家咨询制样问题", "EXP-HAN"),
        ("need a sequencer for whole genome sequencing", "CQ-SEQ"),
        ("whole exome sequencing of 20 blood samples", "CQ-S-WES"),
        ("flow cytometry immunophenotyping of PBMC", "CQ-FLOW"),
        ("1H and 13C NMR spectra of a small molecule", None),  # either NMR: they are the same
    ],
)
def test_the_right_item_ranks_first(cat: Catalogue, text: str, first: str | None) -> None:
    outcome = match(cat.db, text)
    assert outcome.results, text
    if first is None:
        assert outcome.results[0].code in {"CQ-NMR", "SC-NMR"}
    else:
        assert outcome.results[0].code == first, codes(outcome)
    scores = [r.score for r in outcome.results]
    assert scores == sorted(scores, reverse=True)
    assert outcome.index_size == 13 and outcome.took_ms > 0


def test_results_carry_item_and_provider_details(cat: Catalogue) -> None:
    outcome = match(cat.db, CRYO_ZH)
    cryo = outcome.results[0]
    assert (cryo.type, cryo.id, cryo.name_en) == ("instrument", cat.instruments["CRYO"],
                                                   "300 kV cryo transmission electron microscope")
    assert cryo.category == "MIC.EM" and cryo.category_name_zh == "电子显微镜" and cryo.region == "CQ"
    assert cryo.facility_id == cat.world.facilities["CQ-LAB"] and cryo.facility_name_en == "CQ-LAB Core"
    assert cryo.institution_name_en == "CQ-LAB Laboratory"
    body = cryo.as_json()
    assert body["type"] == "instrument" and body["code"] == "CQ-CRYO" and body["name"]["zh"] == cryo.name_zh
    assert body["provider"]["facility"]["en"] == "CQ-LAB Core" and 0 < body["score"] <= 1
    expert = result(outcome, "EXP-HAN")
    assert expert.type == "expert" and expert.institution_name_en == "CQ-LAB Laboratory"


def test_types_limit_the_kinds_of_results(cat: Catalogue) -> None:
    experts = match(cat.db, "冷冻电镜", kinds=["expert"])
    assert codes(experts) == ["EXP-HAN"]
    both = match(cat.db, "冷冻电镜", kinds=["service", "expert"])
    assert {r.type for r in both.results} == {"service", "expert"}


def test_limit_caps_the_results(cat: Catalogue) -> None:
    assert len(match(cat.db, "冷冻电镜 microscope", limit=2).results) == 2
    assert len(match(cat.db, "冷冻电镜 microscope", limit=50).results) > 2


@pytest.mark.parametrize(("region", "first", "second"), [("CQ", "CQ-NMR", "SC-NMR"), ("SC", "SC-NMR", "CQ-NMR")])
def test_region_preference_ranks_the_regions_item_first_among_equals(
    cat: Catalogue, region: str, first: str, second: str
) -> None:
    outcome = match(cat.db, "核磁共振氢谱测试", region=region)
    assert codes(outcome)[:2] == [first, second]
    top, other = outcome.results[:2]
    assert top.explanation["region_match"] is True and other.explanation["region_match"] is False
    assert top.score > other.score
    # Without a preference both score the same and say nothing about regions.
    plain = match(cat.db, "核磁共振氢谱测试")
    assert set(codes(plain)[:2]) == {"CQ-NMR", "SC-NMR"}
    assert plain.results[0].score == pytest.approx(plain.results[1].score, abs=1e-3)
    assert plain.results[0].explanation["region_match"] is None


def test_typos_are_corrected(cat: Catalogue) -> None:
    outcome = match(cat.db, "sequncing of tumour DNA")
    assert outcome.corrections == {"sequncing": "sequencing"}
    assert codes(outcome)[0] == "CQ-SEQ"
    assert outcome.results[0].explanation["corrections"] == {"sequncing": "sequencing"}
    # Words the index knows are left alone.
    assert match(cat.db, "sequencing").corrections == {}


# ----------------------------------------------------------------------------------------------- who sees what


def test_instruments_open_only_to_their_institution_are_shown_to_insiders_only(cat: Catalogue) -> None:
    text = "流式细胞分析"
    assert "CQ-LOCAL" not in codes(match(cat.db, text))  # anonymous
    assert "CQ-LOCAL" not in codes(match(cat.db, text, cat.actor("bob")))  # CQ-UNI
    assert "CQ-LOCAL" not in codes(match(cat.db, text, cat.actor("carol")))  # SC-UNI
    insider = codes(match(cat.db, text, cat.actor("alice")))  # CQ-LAB, the instrument's institution
    assert "CQ-LOCAL" in insider and "CQ-FLOW" in insider


def test_instruments_open_to_a_region_are_hidden_from_the_other_region(cat: Catalogue) -> None:
    text = "high-resolution mass spectrometer"
    assert codes(match(cat.db, text, cat.actor("carol")))[:1] == ["SC-MS"]
    assert "SC-MS" not in codes(match(cat.db, text, cat.actor("alice")))
    # Anonymous visitors see what is open beyond one institution.
    assert "SC-MS" in codes(match(cat.db, text))


# ----------------------------------------------------------------------------------------------- explanations


def test_explanation_of_an_instrument(cat: Catalogue) -> None:
    add_rate(cat.world, instrument="CRYO", category="academic_region", amount_fen=80_000, unit="hour")
    add_rate(cat.world, instrument="CRYO", category="industry", amount_fen=200_000, unit="hour")
    add_rate(cat.world, instrument="CRYO", category="internal", amount_fen=30_000, unit="hour")
    now = datetime.now().astimezone()
    outcome = match(cat.db, CRYO_ZH, cat.actor("bob"), now=now)
    why = result(outcome, "CQ-CRYO").explanation
    assert "单颗粒冷冻电镜" in why["matched_terms"] or "冷冻电镜" in why["matched_terms"]
    assert "蛋白质" in why["matched_terms"]
    assert any(c["category"] == "MIC.EM" and "cryo-em" in c["means"] for c in why["concepts"])
    assert why["category_match"] is True and why["category"] == 1.0
    assert 0 < why["keyword"] <= 1 and why["region"] == "CQ" and why["region_match"] is None
    if embeddings.get_encoder() is not None:
        assert why["semantic"] is not None and 0 <= why["semantic"] <= 1
    # bob's institution is another academic one in the same region.
    assert why["price"] == {"amount_fen": 80_000, "unit": "hour", "payer_category": "academic_region"}
    slot = datetime.fromisoformat(why["earliest_slot"])
    assert slot >= now.replace(second=0, microsecond=0) and slot.minute in (0, 30)
    assert why["earliest_slot_minutes"] == 30
    # Anonymous: the lowest price of the card, marked as a starting price.
    anonymous = result(match(cat.db, CRYO_ZH), "CQ-CRYO").explanation
    assert anonymous["price"] == {"amount_fen": 30_000, "unit": "hour", "payer_category": None, "from": True}
    # Inside the institution: the internal rate.
    inside = result(match(cat.db, CRYO_ZH, cat.actor("alice")), "CQ-CRYO").explanation
    assert inside["price"]["amount_fen"] == 30_000 and inside["price"]["payer_category"] == "internal"


def test_explanation_of_an_instrument_in_maintenance_has_no_slot(cat: Catalogue) -> None:
    why = result(match(cat.db, CRYO_ZH), "CQ-EM").explanation
    assert why["status"] == "maintenance" and why["earliest_slot"] is None and why["price"] is None


def test_explanation_of_a_service_and_an_expert(cat: Catalogue) -> None:
    wes = result(match(cat.db, "whole exome sequencing"), "CQ-S-WES").explanation
    assert "exome" in wes["matched_terms"]
    assert wes["price"] == {"amount_fen": 150_000, "unit": "sample", "payer_category": None}
    assert "earliest_slot" not in wes
    han = result(match(cat.db, "找冷冻电镜专家咨询制样问题"), "EXP-HAN").explanation
    assert han["availability"] == "available" and han["languages"] == ["zh", "en"]
    assert han["consultation_service_id"] == cat.services["CONSULT"]
    # The expert's price is that of their consultation service.
    assert han["price"] == {"amount_fen": 50_000, "unit": "hour", "payer_category": None}


def test_without_details_there_are_no_prices_or_slots(cat: Catalogue) -> None:
    why = match(cat.db, CRYO_ZH, details=False).results[0].explanation
    assert "price" not in why and "earliest_slot" not in why
    assert why["matched_terms"]


# ----------------------------------------------------------------------------------------------- keyword fallback


def test_keyword_fallback_without_embeddings(cat: Catalogue) -> None:
    with keyword_only("test"):
        outcome = match(cat.db, CRYO_ZH)
        assert outcome.mode == "keyword"
        assert outcome.notice is not None and "keywords only" in outcome.notice and "test" in outcome.notice
        assert codes(outcome)[0] == "CQ-CRYO"
        assert all(r.explanation["semantic"] is None for r in outcome.results)
        english = match(cat.db, "need a sequencer for whole genome sequencing")
        assert english.mode == "keyword" and codes(english)[0] == "CQ-SEQ"
    after = match(cat.db, CRYO_ZH)
    if embeddings.get_encoder() is not None:
        assert after.mode == "hybrid" and after.notice is None
        assert after.results[0].explanation["semantic"] is not None


def test_keyword_fallback_before_any_refresh(world: World) -> None:
    build_catalogue(world)  # documents still dirty: computed in memory
    with keyword_only("not installed"):
        outcome = match(world.db, "whole exome sequencing")
        assert outcome.mode == "keyword" and codes(outcome)[0] == "CQ-S-WES"


# ----------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"text": ""}, "text"),
        ({"text": "   \n "}, "text"),
        ({"text": "测" * 2001}, "text"),
        ({"text": "NMR", "region": "XX"}, "region"),
        ({"text": "NMR", "limit": 0}, "limit"),
        ({"text": "NMR", "limit": 51}, "limit"),
        ({"text": "NMR", "limit": True}, "limit"),
        ({"text": "NMR", "kinds": ["instrument", "robot"]}, "types"),
    ],
)
def test_invalid_input(cat: Catalogue, kwargs: dict, field: str) -> None:
    options = dict(kwargs)  # the parameters are shared by both database runs
    text = options.pop("text")
    with pytest.raises(InvalidInput) as caught, cat.db.unit_of_work(write=False) as s:
        matching.match(s, None, text, **options)
    assert caught.value.field == field


def test_limits_at_the_edges_are_accepted(cat: Catalogue) -> None:
    assert match(cat.db, "NMR", limit=1).results
    assert match(cat.db, "NMR", limit=50).results
    assert match(cat.db, ("NMR " * 500)[:2000]).results  # the longest text accepted still ranks
    assert match(cat.db, "NMR", region="").results
