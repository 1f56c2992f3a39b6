"""The expert directory (matching/experts.py) and orders naming an expert, on both databases."""

from __future__ import annotations

from typing import Any

import pytest

from labcommons.catalog.models import ServiceKind
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.matching import experts
from labcommons.matching import service as matching
from labcommons.matching.models import Availability
from labcommons.orders import service as orders
from tests.factories import World
from tests.matching.h1_support import MatchWorld, add_expert, add_service, build_match_world


@pytest.fixture
def mw(world: World) -> MatchWorld:
    mw = build_match_world(world)
    mw.experts["ZHANG"] = add_expert(
        world, "EXP-ZHANG", "SC-UNI", name_zh="张明", name_en="Zhang Ming", fields=["ANA.MS", "GEN.PROT"],
        skills_zh=["蛋白质组学数据分析"], skills_en=["proteomics data analysis"], languages=["zh"],
        availability=Availability.limited, user="dave")
    mw.experts["GONE"] = add_expert(world, "EXP-GONE", "CQ-LAB", name_en="Retired Person", is_active=False)
    mw.experts["BUSY"] = add_expert(world, "EXP-BUSY", "CQ-LAB", name_en="Busy Person",
                                    availability=Availability.unavailable, fields=["MIC.EM"])
    return mw


def codes(mw: MatchWorld, **filters: Any) -> list[str]:
    with mw.db.unit_of_work(write=False) as s:
        return [e.code for e in experts.list_experts(s, **filters)]


def test_listing_and_filters(mw: MatchWorld) -> None:
    assert codes(mw) == ["EXP-BUSY", "EXP-LUO", "EXP-ZHANG"]  # by code; the inactive one is hidden
    assert codes(mw, q="proteomics") == ["EXP-ZHANG"]
    assert codes(mw, q="蛋白质组") == ["EXP-ZHANG"]
    assert codes(mw, q="luo XIAOLAN") == ["EXP-LUO"]
    assert codes(mw, q="nobody here") == []
    assert codes(mw, field="GEN") == ["EXP-LUO", "EXP-ZHANG"]
    assert codes(mw, field="GEN.PROT") == ["EXP-ZHANG"]
    assert codes(mw, field="GEN.PRO") == []  # a prefix ends at a dot
    assert codes(mw, region="SC") == ["EXP-ZHANG"]
    assert codes(mw, available_only=True) == ["EXP-LUO", "EXP-ZHANG"]
    assert codes(mw, limit=1, offset=1) == ["EXP-LUO"]
    with mw.db.unit_of_work(write=False) as s:
        page = experts.search_experts(s, limit=2)
    assert page.total == 3 and len(page.items) == 2
    for bad, field in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"offset": -1}, "offset"),
                       ({"region": "XX"}, "region"), ({"q": "x" * 201}, "q")):
        with pytest.raises(InvalidInput) as caught, mw.db.unit_of_work(write=False) as s:
            experts.list_experts(s, **bad)
        assert caught.value.field == field


def test_get(mw: MatchWorld) -> None:
    with mw.db.unit_of_work(write=False) as s:
        luo = experts.get_expert(s, mw.experts["LUO"])
        assert luo.institution.code == "CQ-LAB" and luo.facility is not None and luo.facility.code == "CQ-LAB-F"
        for missing in (mw.experts["GONE"], 99999, 0):
            with pytest.raises(NotFound):
                experts.get_expert(s, missing)
        assert experts.get_expert(s, mw.experts["GONE"], include_inactive=True).code == "EXP-GONE"


def test_managers_create_experts_of_their_facility(mw: MatchWorld) -> None:
    facility = mw.world.facilities["CQ-LAB"]
    with mw.db.unit_of_work() as s:
        created = experts.create_expert(
            s, mw.actor("alice"), facility_id=facility, code="EXP-NEW", name_zh="王芳", name_en="Wang Fang",
            fields=["MIC.EM"], skills_en=["cryo-EM grid preparation", " cryo-EM grid preparation "],
            languages=["zh", "en"], availability="limited", consultation_service_id=mw.services["CONSULT"],
        )
        assert (created.region_code, created.institution_id) == ("CQ", mw.world.institutions["CQ-LAB"])
        assert created.skills_en == ["cryo-EM grid preparation"] and created.availability == Availability.limited
    base: dict[str, Any] = {"facility_id": facility, "code": "EXP-X", "name_zh": "某", "name_en": "Someone"}
    for user in ("carol", "dave", "bob"):  # staff of another facility; nobody
        with pytest.raises(Forbidden), mw.db.unit_of_work() as s:
            experts.create_expert(s, mw.actor(user), **base)
    bad_cases: list[tuple[dict[str, Any], str, type[Exception]]] = [
        ({"code": "EXP-NEW"}, "code", Conflict),
        ({"name_en": " "}, "name_en", InvalidInput),
        ({"fields": ["NOPE.X"]}, "fields", InvalidInput),
        ({"fields": "GEN.SEQ"}, "fields", InvalidInput),
        ({"skills_zh": [1, 2]}, "skills_zh", InvalidInput),
        ({"languages": ["x" * 17]}, "languages", InvalidInput),
        ({"availability": "sometimes"}, "availability", InvalidInput),
        ({"consultation_service_id": mw.services["SEQ"]}, "consultation_service_id", InvalidInput),  # testing
        ({"consultation_service_id": mw.services["MS"]}, "consultation_service_id", InvalidInput),  # elsewhere
        ({"hobby": "chess"}, "hobby", InvalidInput),
        ({"user_id": 99999}, "user_id", InvalidInput),
        ({"user_id": mw.world.actors["dave"].user_id}, "user_id", Conflict),  # dave is EXP-ZHANG already
    ]
    for changes, field, error in bad_cases:
        with pytest.raises(error) as caught, mw.db.unit_of_work() as s:
            experts.create_expert(s, mw.actor("alice"), **{**base, **changes})
        assert caught.value.field == field, changes  # type: ignore[attr-defined]
    with pytest.raises(NotFound), mw.db.unit_of_work() as s:
        experts.create_expert(s, mw.actor("alice"), **{**base, "facility_id": 99999})


def test_who_edits_what(mw: MatchWorld) -> None:
    zhang = mw.experts["ZHANG"]
    with mw.db.unit_of_work() as s:  # dave is the expert himself
        experts.update_expert(s, mw.actor("dave"), zhang, skills_en=["phosphoproteomics"], availability="available",
                              bio_en="Runs the proteomics core.")
    with pytest.raises(Forbidden) as caught, mw.db.unit_of_work() as s:
        experts.update_expert(s, mw.actor("dave"), zhang, is_active=False)
    assert caught.value.field == "is_active"
    for user in ("alice", "bob"):  # a manager of another facility; a stranger
        with pytest.raises(Forbidden), mw.db.unit_of_work() as s:
            experts.update_expert(s, mw.actor(user), zhang, title_en="Professor")
    with pytest.raises(NotFound), mw.db.unit_of_work() as s:  # inactive: nothing to see
        experts.update_expert(s, mw.actor("bob"), mw.experts["GONE"], title_en="Professor")
    with mw.db.unit_of_work() as s:  # alice manages CQ-LAB
        experts.update_expert(s, mw.actor("alice"), mw.experts["GONE"], is_active=True, title_en="Emeritus")
        experts.update_expert(s, mw.actor("alice"), mw.experts["LUO"], consultation_service_id=None)
    for changes, field in (({"availability": None}, "availability"), ({"name_zh": ""}, "name_zh"),
                           ({"fields": ["GEN.SEQ", 5]}, "fields"), ({"colour": "blue"}, "colour"),
                           ({"code": "EXP-RENAMED"}, "code")):
        with pytest.raises(InvalidInput) as caught_input, mw.db.unit_of_work() as s:
            experts.update_expert(s, mw.actor("alice"), mw.experts["LUO"], **changes)
        assert caught_input.value.field == field
    with mw.db.unit_of_work(write=False) as s:
        updated = experts.get_expert(s, zhang)
        assert (updated.skills_en, updated.availability, updated.bio_en) == (
            ["phosphoproteomics"], Availability.available, "Runs the proteomics core.")
        assert experts.get_expert(s, mw.experts["GONE"]).title_en == "Emeritus"
        assert experts.get_expert(s, mw.experts["LUO"]).consultation_service_id is None
        assert experts.may_edit(mw.actor("dave"), updated) and not experts.may_edit(mw.actor("alice"), updated)
        assert not experts.may_edit(None, updated)


def test_matching_finds_an_edited_profile_at_once(mw: MatchWorld) -> None:
    with mw.db.unit_of_work() as s:
        experts.update_expert(s, mw.actor("dave"), mw.experts["ZHANG"],
                              skills_en=["zebrafish behaviour tracking"], skills_zh=["斑马鱼行为追踪"])
    with mw.db.unit_of_work(write=False) as s:
        outcome = matching.match(s, None, "zebrafish behaviour tracking", kinds=["expert"])
    assert outcome.results and outcome.results[0].code == "EXP-ZHANG"


def test_orders_name_an_expert_of_the_service(mw: MatchWorld) -> None:
    other_consult = add_service(mw.world, "SC-UNI", "SC-S-CONSULT", ServiceKind.consultation, "ANA.MS",
                                "质谱咨询", "Mass spectrometry consultation")
    bob = mw.actor("bob")
    with mw.db.unit_of_work() as s:
        order = orders.create_order(s, bob, mw.services["CONSULT"], title="Design help",
                                    expert_id=mw.experts["LUO"])
        assert order.expert_id == mw.experts["LUO"]
        # Any service of the expert's own facility will do.
        assert orders.create_order(s, bob, mw.services["SEQ"], title="x", expert_id=mw.experts["LUO"]).expert_id
    for service_id, expert_id in ((other_consult, mw.experts["LUO"]), (mw.services["CONSULT"], mw.experts["GONE"]),
                                  (mw.services["CONSULT"], 99999), (mw.services["CONSULT"], mw.experts["ZHANG"])):
        with pytest.raises(InvalidInput) as caught, mw.db.unit_of_work() as s:
            orders.create_order(s, bob, service_id, title="Design help", expert_id=expert_id)
        assert caught.value.field == "expert_id"
