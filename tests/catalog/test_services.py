"""The service catalogue on both engines: writing services, searching them with a kind facet, the API, the CLI
and the demo data."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from labcommons.catalog import service as catalog
from labcommons.catalog.models import (
    PriceUnit,
    Service,
    ServiceAccreditation,
    ServiceInstrument,
    ServiceKind,
)
from labcommons.config import get_settings
from labcommons.db import Database
from labcommons.errors import Conflict, Forbidden, InvalidInput, NotFound
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.orders.models import OrderRating, OrderStatus, ServiceOrder
from labcommons.pagination import encode_cursor
from tests.api_client import client_for, codes_by_pages, item_codes
from tests.factories import World, grant

# --- shared helpers (also used by tests/web/test_service_pages.py) -------------------------------------------


def add_service(session: Session, facility_id: int, code: str, **fields: Any) -> Service:
    """A service placed like the catalogue places it (region, institution and search text filled in)."""
    values: dict[str, Any] = dict(
        kind=ServiceKind.testing, name_zh=f"服务 {code}", name_en=f"Service {code}", description_zh="",
        description_en="", category_code="ANA.MS", turnaround_days=5, list_price_fen=10000,
        price_unit=PriceUnit.sample, sample_requirements_zh="", sample_requirements_en="", is_active=True,
    )
    accreditations = fields.pop("accreditations", [])
    instrument_ids = fields.pop("instrument_ids", [])
    values.update(fields)
    svc = Service(code=code, facility_id=facility_id, **values)
    catalog.place_service(session, svc, schemes=[])
    session.add(svc)
    session.flush()
    if accreditations:
        catalog.replace_accreditations(session, svc, accreditations)
    if instrument_ids:
        catalog.replace_instruments(session, svc, instrument_ids)
    return svc


def build_services(world: World) -> dict[str, int]:
    """Services of the test world by code: four offered in CQ, two in SC, one no longer offered."""
    lab, uni, sc = world.facilities["CQ-LAB"], world.facilities["CQ-UNI"], world.facilities["SC-UNI"]
    ids: dict[str, int] = {}
    with world.db.unit_of_work() as s:
        specs: list[tuple[int, str, dict[str, Any]]] = [
            (lab, "CQ-WGS", dict(
                name_zh="人全基因组重测序", name_en="Human whole-genome resequencing", category_code="GEN.SEQ",
                description_zh="30X 测序深度，交付变异检测结果。", description_en="30x depth with variant calling.",
                sample_requirements_zh="基因组DNA不少于1微克", sample_requirements_en="At least 1 µg genomic DNA",
                list_price_fen=180000, turnaround_days=10,
                accreditations=[catalog.AccreditationIn("CMA", "2023000123", date(2027, 12, 31))],
                instrument_ids=[world.instruments["SEQ"]])),
            (lab, "CQ-IMG-RND", dict(
                kind=ServiceKind.rnd, name_zh="成像方法开发", name_en="Imaging method development",
                category_code="MIC.CONF", list_price_fen=None, turnaround_days=None, price_unit=PriceUnit.project)),
            (lab, "CQ-SPATIAL-CONSULT", dict(
                kind=ServiceKind.consultation, name_zh="空间组学实验设计咨询", name_en="Spatial omics study design",
                category_code="GEN.SPATIAL", list_price_fen=50000, price_unit=PriceUnit.hour)),
            (uni, "CQ-FLOW", dict(
                name_zh="流式细胞分析", name_en="Flow cytometry analysis", category_code="CYT.FLOW",
                list_price_fen=30000)),
            (sc, "SC-NMR", dict(
                name_zh="核磁共振氢谱", name_en="Proton NMR spectrum", category_code="ANA.NMR", list_price_fen=20000,
                accreditations=[catalog.AccreditationIn("CNAS", "L12345"), catalog.AccreditationIn("CMA", "2022")])),
            (sc, "SC-MS-CUSTOM", dict(
                name_zh="质谱定制分析", name_en="Custom mass spectrometry", category_code="ANA.MS",
                list_price_fen=None)),
            (sc, "SC-OLD", dict(
                name_zh="停止的测序服务", name_en="Discontinued sequencing", category_code="GEN.SEQ",
                is_active=False)),
        ]
        for facility_id, code, fields in specs:
            ids[code] = add_service(s, facility_id, code, **fields).id
    return ids


def rate(world: World, service_id: int, scores: list[tuple[int, str]], user: str = "bob") -> None:
    """Closed orders of a service with these ratings (score, comment)."""
    with world.db.unit_of_work() as s:
        svc = s.get(Service, service_id)
        assert svc is not None
        user_id = identity.find_user(s, f"{user}@example.org").id
        for score, comment in scores:
            order = ServiceOrder(service_id=service_id, facility_id=svc.facility_id, user_id=user_id,
                                 status=OrderStatus.closed, title="t")
            s.add(order)
            s.flush()
            s.add(OrderRating(order_id=order.id, service_id=service_id, user_id=user_id, score=score,
                              comment=comment))


@pytest.fixture
def services(world: World) -> dict[str, int]:
    return build_services(world)


def codes(world: World, **params: Any) -> list[str]:
    return item_codes(world.db, "/api/v1/services", **params)


# --- search --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        ("全基因组", "CQ-WGS"),           # Chinese words inside the name
        ("重测序", "CQ-WGS"),
        ("genome", "CQ-WGS"),             # English prefix
        ("resequencing", "CQ-WGS"),
        ("variant", "CQ-WGS"),            # the description
        ("微克", "CQ-WGS"),               # the sample requirements
        ("核磁", "SC-NMR"),
        ("CNAS", "SC-NMR"),               # an accreditation scheme
        ("proton", "SC-NMR"),
        ("流式", "CQ-FLOW"),
        ("design consult", "CQ-SPATIAL-CONSULT"),
    ],
)
def test_keyword_search_in_both_languages(world: World, services: dict[str, int], q: str, expected: str) -> None:
    assert codes(world, q=q)[0] == expected


def test_all_terms_must_match_and_inactive_services_are_hidden(world: World, services: dict[str, int]) -> None:
    assert codes(world, q="核磁 流式") == []
    assert "SC-OLD" not in codes(world, q="测序")
    assert codes(world, q="discontinued") == []
    assert codes(world, q="discontinued", include_inactive="true") == ["SC-OLD"]
    assert len(codes(world)) == 6
    # Its page stays reachable (orders refer to it) and says it is not offered.
    r = client_for(world.db).get(f"/api/v1/services/{services['SC-OLD']}")
    assert r.status_code == 200 and r.json()["is_active"] is False


def test_filters_kind_region_institution_category_facility(world: World, services: dict[str, int]) -> None:
    assert codes(world, kind="rnd") == ["CQ-IMG-RND"]
    assert set(codes(world, region="SC")) == {"SC-NMR", "SC-MS-CUSTOM"}
    assert codes(world, institution="CQ-UNI") == ["CQ-FLOW"]
    assert set(codes(world, category="ANA")) == {"SC-NMR", "SC-MS-CUSTOM"}, "a parent code matches its children"
    assert codes(world, facility="CQ-UNI-F") == ["CQ-FLOW"]
    assert set(codes(world, q="SC-UNI Core")) == {"SC-NMR", "SC-MS-CUSTOM"}, "the facility's name is indexed"
    assert set(codes(world, kind="testing", region="CQ")) == {"CQ-WGS", "CQ-FLOW"}
    r = client_for(world.db).get("/api/v1/services", params={"kind": "teaching"})
    assert r.status_code == 422 and r.json()["field"] == "kind"


def test_facets_count_each_dimension_without_its_own_filter(world: World, services: dict[str, int]) -> None:
    r = client_for(world.db).get("/api/v1/services", params={"facets": "true", "kind": "testing", "region": "SC"})
    facets = r.json()["facets"]
    assert [(f["value"], f["count"]) for f in facets["kind"]] == [("testing", 2), ("rnd", 0), ("consultation", 0)]
    assert {f["value"]: f["count"] for f in facets["region"]} == {"CQ": 2, "SC": 2}
    assert {f["value"]: f["count"] for f in facets["institution"]} == {"SC-UNI": 2}
    categories = {f["value"]: f["count"] for f in facets["category"]}
    assert categories == {"ANA": 2, "ANA.MS": 1, "ANA.NMR": 1}
    labels = {f["value"]: (f["label_zh"], f["label_en"]) for f in facets["kind"]}
    assert labels["testing"] == ("检验检测", "Testing")
    everything = client_for(world.db).get("/api/v1/services", params={"facets": "true", "q": "测序"}).json()
    assert {f["value"]: f["count"] for f in everything["facets"]["kind"]} == {"testing": 1, "rnd": 0,
                                                                             "consultation": 0}


@pytest.mark.parametrize("q", ["", "服务", "batch"])
def test_cursor_pagination_visits_every_match_once(world: World, services: dict[str, int], q: str) -> None:
    with world.db.unit_of_work() as s:
        for i in range(13):
            add_service(s, world.facilities["SC-UNI"], f"SC-X{i:02d}", name_zh=f"批量检测服务 {i}",
                        name_en=f"Batch assay {i}", category_code="ANA.SPEC")
    everything = set(codes(world, q=q, limit=100))
    assert len(everything) >= 13
    seen = codes_by_pages(world.db, "/api/v1/services", limit=4, q=q)
    assert sorted(seen) == sorted(everything) and len(seen) == len(set(seen))
    bad = client_for(world.db).get("/api/v1/services", params={"cursor": "nonsense"})
    assert bad.status_code == 422 and bad.json()["field"] == "cursor"


@pytest.mark.parametrize("param", ["region", "institution", "category", "facility"])
def test_a_nul_character_in_a_filter_is_a_422_naming_it(world: World, param: str) -> None:
    answer = client_for(world.db).get("/api/v1/services", params={param: "CQ\x00", "facets": "true"})
    if world.db.is_sqlite:  # SQLite compares such text like any other; PostgreSQL refuses it, which was a 500
        assert answer.status_code == 200 and answer.json()["items"] == []
    else:
        assert answer.status_code == 422 and answer.json()["field"] == param, answer.text


# A cursor's values go into SQL comparisons: other types than the ones we write (or an id beyond the id range)
# were 500s on PostgreSQL, for instruments as for services.
@pytest.mark.parametrize("values", [["x"], [[1]], [True], [2**31], [None, 1], [1.5, "x"], ["x", 1], [True, 1]])
@pytest.mark.parametrize(("path", "q"), [("/api/v1/services", ""), ("/api/v1/services", "服务"),
                                         ("/api/v1/instruments", ""), ("/api/v1/instruments", "测序")])
def test_cursors_with_other_values_than_ours_are_a_422(world: World, path: str, q: str, values: list[Any]) -> None:
    answer = client_for(world.db).get(path, params={"q": q, "cursor": encode_cursor(values)})
    assert answer.status_code == 422 and answer.json()["field"] == "cursor", answer.text


def test_list_items_carry_prices_badges_and_ratings(world: World, services: dict[str, int]) -> None:
    rate(world, services["SC-NMR"], [(5, "快"), (4, ""), (4, "Clear spectra")])
    items = {i["code"]: i for i in client_for(world.db).get("/api/v1/services", params={"limit": 50}).json()["items"]}
    nmr = items["SC-NMR"]
    assert nmr["accreditation_schemes"] == ["CMA", "CNAS"]
    assert nmr["rating_average"] == pytest.approx(4.33, abs=0.01) and nmr["rating_count"] == 3
    assert nmr["list_price_fen"] == 20000 and nmr["price_unit"] == "sample" and nmr["region"] == "SC"
    assert nmr["institution"]["code"] == "SC-UNI" and nmr["facility"]["code"] == "SC-UNI-F"
    assert items["SC-MS-CUSTOM"]["list_price_fen"] is None, "null is a quote on request"
    assert items["CQ-FLOW"]["rating_average"] is None and items["CQ-FLOW"]["rating_count"] == 0


def test_service_ratings_average_and_count(world: World, services: dict[str, int]) -> None:
    rate(world, services["CQ-WGS"], [(5, ""), (2, "slow"), (3, "")])
    with world.db.unit_of_work(write=False) as s:
        ratings = catalog.service_ratings(s, [services["CQ-WGS"], services["CQ-FLOW"]])
        assert ratings == {services["CQ-WGS"]: (pytest.approx(10 / 3), 3)}
        assert [r.comment for r in catalog.latest_ratings(s, services["CQ-WGS"])] == ["slow"]


def test_service_details(world: World, services: dict[str, int]) -> None:
    rate(world, services["CQ-WGS"], [(4, "ok")])
    r = client_for(world.db).get(f"/api/v1/services/{services['CQ-WGS']}")
    assert r.status_code == 200
    body = r.json()
    assert body["sample_requirements_en"] == "At least 1 µg genomic DNA"
    assert body["accreditations"] == [{"scheme": "CMA", "certificate_no": "2023000123", "valid_until": "2027-12-31"}]
    assert [i["code"] for i in body["instruments"]] == ["CQ-SEQ"]
    assert body["rating_average"] == 4 and body["rating_count"] == 1
    assert body["category"] == {"code": "GEN.SEQ", "name_zh": "基因测序", "name_en": body["category"]["name_en"]}
    missing = client_for(world.db).get("/api/v1/services/99999")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"


# --- writing -------------------------------------------------------------------------------------------------

NEW = {"facility": "CQ-LAB-F", "code": "cq-new-01", "kind": "testing", "name_zh": "元素分析",
       "name_en": "Elemental analysis", "category_code": "ANA.ELEM", "list_price_fen": 40000, "turnaround_days": 5,
       "sample_requirements_zh": "固体样品 100 毫克", "accreditations": [{"scheme": "cnas", "certificate_no": "L99"}],
       "instrument_ids": []}


def count_services(world: World) -> int:
    with world.db.unit_of_work(write=False) as s:
        return int(s.scalar(select(func.count()).select_from(Service)) or 0)


def test_a_manager_creates_and_updates_a_service_by_api(world: World, services: dict[str, int]) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    client = client_for(world.db)
    body = {**NEW, "instrument_ids": [world.instruments["CONF"]]}
    headers = world.headers("alice", **{"Idempotency-Key": "new-1"})
    r = client.post("/api/v1/services", json=body, headers=headers)
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["code"] == "CQ-NEW-01" and created["region"] == "CQ" and created["institution"]["code"] == "CQ-LAB"
    assert created["accreditations"][0]["scheme"] == "CNAS"
    assert [i["code"] for i in created["instruments"]] == ["CQ-CONF"]
    again = client.post("/api/v1/services", json=body, headers=headers)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == created["id"] and count_services(world) == 8
    assert codes(world, q="元素")[0] == "CQ-NEW-01"
    assert codes(world, q="毫克") == ["CQ-NEW-01"], "sample requirements are indexed"

    # Only the fields sent change; null list price means quote on request from now on.
    r = client.patch(f"/api/v1/services/{created['id']}", json={"name_en": "Elemental analysis (ICP)",
                                                                "list_price_fen": None},
                     headers=world.headers("alice"))
    assert r.status_code == 200, r.text
    assert r.json()["name_en"] == "Elemental analysis (ICP)" and r.json()["list_price_fen"] is None
    assert r.json()["name_zh"] == "元素分析" and r.json()["accreditations"][0]["scheme"] == "CNAS"
    assert codes(world, q="ICP") == ["CQ-NEW-01"], "the search text follows the change"
    r = client.patch(f"/api/v1/services/{created['id']}", json={"accreditations": [], "is_active": False},
                     headers=world.headers("alice"))
    assert r.status_code == 200 and r.json()["accreditations"] == [] and r.json()["is_active"] is False
    assert codes(world, q="元素") == [], "a deactivated service is no longer found"


def test_who_may_write(world: World, services: dict[str, int]) -> None:
    client = client_for(world.db)
    # A plain user: 403 before anything is looked up, also for a service that does not exist.
    assert client.post("/api/v1/services", json=NEW, headers=world.headers("bob")).status_code == 403
    assert client.patch("/api/v1/services/99999", json={"name_en": "x"},
                        headers=world.headers("bob")).status_code == 403
    # Staff may not edit the catalogue, managers of another facility may not edit this one.
    grant(world, "bob", "facility_staff", "CQ-LAB")
    grant(world, "carol", "facility_manager", "SC-UNI")
    for user in ("bob", "carol"):
        r = client.post("/api/v1/services", json=NEW, headers=world.headers(user))
        assert r.status_code == 403, (user, r.text)
        r = client.patch(f"/api/v1/services/{services['CQ-WGS']}", json={"name_en": "x"},
                         headers=world.headers(user))
        assert r.status_code == 403, (user, r.text)
    r = client.patch("/api/v1/services/99999", json={"name_en": "x"}, headers=world.headers("carol"))
    assert r.status_code == 404
    r = client.post("/api/v1/services", json={**NEW, "facility": "NOPE"}, headers=world.headers("carol"))
    assert r.status_code == 404 and r.json()["field"] == "facility"
    # A token without the admin scope may not write even for a manager.
    with world.db.unit_of_work() as s:
        token = identity.create_api_token(s, identity.find_user(s, "carol@example.org"), scopes=["catalog:read"])
    r = client.post("/api/v1/services", json={**NEW, "facility": "SC-UNI-F"},
                    headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
    assert count_services(world) == 7
    # An institution admin edits the services of the institution's facilities.
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "bob@example.org"), "institution_admin",
                         institution_id=world.institutions["SC-UNI"])
    r = client.patch(f"/api/v1/services/{services['SC-NMR']}", json={"turnaround_days": 2},
                     headers=world.headers("bob"))
    assert r.status_code == 200 and r.json()["turnaround_days"] == 2


@pytest.mark.parametrize(
    ("change", "field", "status"),
    [
        ({"list_price_fen": -1}, "list_price_fen", 422),
        ({"list_price_fen": 12.5}, "list_price_fen", 422),          # money is integer fen, never a float
        ({"list_price_fen": "100"}, "list_price_fen", 422),
        ({"turnaround_days": -3}, "turnaround_days", 422),
        ({"kind": "teaching"}, "kind", 422),
        ({"price_unit": "litre"}, "price_unit", 422),
        ({"category_code": "NOPE"}, "category_code", 422),
        ({"code": "has space"}, "code", 422),
        ({"code": "CQ-WGS"}, "code", 409),
        ({"name_zh": "", "name_en": " "}, "name_zh", 422),
        ({"name_en": "x" * 201}, "name_en", 422),
        ({"accreditations": [{"scheme": "CMA"}, {"scheme": "cma"}]}, "accreditations", 422),
        ({"accreditations": [{"scheme": "C M A"}]}, "accreditations", 422),
        ({"colour": "red"}, "colour", 422),
        ({"kind": None}, "kind", 422),
        ({"instrument_ids": [2**31]}, "instrument_ids.0", 422),  # beyond the id range: was a 500 on PostgreSQL
    ],
)
def test_invalid_creations_name_the_field_and_change_nothing(
    world: World, services: dict[str, int], change: dict[str, Any], field: str, status: int
) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    r = client_for(world.db).post("/api/v1/services", json={**NEW, **change}, headers=world.headers("alice"))
    assert r.status_code == status, r.text
    assert r.json()["field"] == field
    if status == 409:
        assert r.json()["error"] == "duplicate_code"
    assert count_services(world) == 7


def test_invalid_updates_name_the_field_and_change_nothing(world: World, services: dict[str, int]) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    client = client_for(world.db)
    url = f"/api/v1/services/{services['CQ-WGS']}"
    before = client.get(url).json()
    for change, field in [
        ({"name_en": "Renamed", "instrument_ids": [world.instruments["SC-MS"]]}, "instrument_ids"),
        ({"name_en": "Renamed", "instrument_ids": [99999]}, "instrument_ids"),
        ({"name_en": "Renamed", "instrument_ids": [2**31]}, "instrument_ids.0"),
        ({"name_en": "Renamed", "category_code": "NOPE"}, "category_code"),
        ({"name_en": "Renamed", "price_unit": None}, "price_unit"),
        ({"code": "OTHER"}, "code"),
        ({"name_en": "Renamed", "accreditations": [{"scheme": "CMA", "valid_until": "2027-13-01"}]},
         "accreditations.0.valid_until"),
    ]:
        r = client.patch(url, json=change, headers=world.headers("alice"))
        assert r.status_code == 422, (change, r.text)
        assert r.json()["field"] == field, change
    assert client.get(url).json() == before


def test_service_layer_rules(world: World, services: dict[str, int]) -> None:
    manager = grant(world, "alice", "facility_manager", "CQ-LAB")
    with world.db.unit_of_work() as s:
        svc = catalog.create_service(
            s, manager, world.facilities["CQ-LAB"], code="CQ-S1", kind="consultation", name_en="Advice",
            category_code="gen.seq",
        )
        assert (svc.region_code, svc.institution_id) == ("CQ", world.institutions["CQ-LAB"])
        assert svc.category_code == "GEN.SEQ" and svc.list_price_fen is None and svc.is_active
        catalog.set_accreditations(s, manager, svc.id, [{"scheme": "CMA", "certificate_no": "1",
                                                         "valid_until": "2028-01-31"}])
        catalog.set_instruments(s, manager, svc.id, [world.instruments["SEQ"], world.instruments["SEQ"]])
        assert "cma" in svc.search_body.split()
        assert s.scalar(select(func.count()).select_from(ServiceInstrument)
                        .where(ServiceInstrument.service_id == svc.id)) == 1
        with pytest.raises(InvalidInput) as bad:
            catalog.set_instruments(s, manager, svc.id, [world.instruments["SC-MS"]])
        assert bad.value.code == "instrument_of_another_facility"
        with pytest.raises(InvalidInput) as beyond:  # beyond the id range: no instrument (was a 500 on PostgreSQL)
            catalog.set_instruments(s, manager, svc.id, [2**31])
        assert beyond.value.code == "unknown_instrument"
        with pytest.raises(Forbidden):
            catalog.set_accreditations(s, manager, services["SC-NMR"], [])
        with pytest.raises(Forbidden):
            catalog.update_service(s, world.actors["bob"], 424242, name_en="x")
        with pytest.raises(NotFound):
            catalog.update_service(s, manager, 424242, name_en="x")
        with pytest.raises(Conflict):
            catalog.create_service(s, manager, world.facilities["CQ-LAB"], code="cq-s1", kind="testing",
                                   name_en="Again", category_code="GEN.SEQ")
        with pytest.raises(InvalidInput) as missing:
            catalog.create_service(s, manager, world.facilities["CQ-LAB"], code="CQ-S2", name_en="No kind",
                                   category_code="GEN.SEQ")
        assert missing.value.field == "kind"
        with pytest.raises(InvalidInput) as boolean:
            catalog.update_service(s, manager, svc.id, list_price_fen=True)
        assert boolean.value.field == "list_price_fen"
        assert [f.code for f in catalog.editable_facilities(s, manager)] == ["CQ-LAB-F"]
        assert catalog.editable_facilities(s, world.actors["bob"]) == []


def test_parsing_form_values() -> None:
    assert catalog.parse_yuan("1,800.5", "price") == 180050
    assert catalog.parse_yuan(" ¥45 ", "price") == 4500
    assert catalog.parse_yuan("", "price") is None
    for bad in ("-1", "1.234", "abc", "1e3"):
        with pytest.raises(InvalidInput) as exc:
            catalog.parse_yuan(bad, "price")
        assert exc.value.field == "price"
    items = catalog.parse_accreditation_lines("CMA 2023000123 2027-12-31\n\n  CNAS L 1234  \nISO")
    assert items == [catalog.AccreditationIn("CMA", "2023000123", date(2027, 12, 31)),
                     catalog.AccreditationIn("CNAS", "L 1234"), catalog.AccreditationIn("ISO")]
    assert catalog.accreditation_lines(items) == "CMA 2023000123 2027-12-31\nCNAS L 1234\nISO"
    with pytest.raises(InvalidInput) as exc:
        catalog.parse_accreditation_lines("CMA 1 2027-02-30")
    assert exc.value.field == "accreditations" and exc.value.code == "invalid_date"


# --- the command line and the demo ---------------------------------------------------------------------------


@pytest.fixture
def cli_env(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    from labcommons import cli_support

    monkeypatch.setenv("LABCOMMONS_DATABASE_URL", db_url)
    monkeypatch.setattr(cli_support.console, "_width", 250)  # wide enough that no cell is cut short
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_cli_lists_and_shows_services(world: World, services: dict[str, int], cli_env: CliRunner) -> None:
    from labcommons.cli import app

    rate(world, services["SC-NMR"], [(5, "")])
    listed = cli_env.invoke(app, ["services", "list", "--facility", "SC-UNI-F"])
    assert listed.exit_code == 0, listed.output
    assert "SC-NMR" in listed.output and "SC-MS-CUSTOM" in listed.output and "CQ-WGS" not in listed.output
    assert "on request" in listed.output and "¥200.00" in listed.output
    kinds = cli_env.invoke(app, ["services", "list", "--kind", "rnd"])
    assert kinds.exit_code == 0 and "CQ-IMG-RND" in kinds.output and "SC-NMR" not in kinds.output
    shown = cli_env.invoke(app, ["services", "show", "sc-nmr"])
    assert shown.exit_code == 0, shown.output
    for text in ("Proton NMR spectrum", "核磁共振氢谱", "CNAS", "L12345", "SC-UNI Core", "5.0"):
        assert text in shown.output, text
    assert cli_env.invoke(app, ["services", "show", "NOPE"]).exit_code == 2
    assert cli_env.invoke(app, ["services", "list", "--kind", "teaching"]).exit_code == 2


def test_demo_services_have_requirements_accreditations_and_instruments(db: Database) -> None:
    from labcommons.catalog import demo

    with db.unit_of_work() as s:
        demo.seed_demo(s, bookings=0)
    with db.unit_of_work(write=False) as s:
        every = catalog.list_services(s)
        assert all(x.region_code and x.institution_id and x.search_name for x in every)
        assert all(x.sample_requirements_zh and x.sample_requirements_en for x in every)
        testing = [x for x in every if x.kind == ServiceKind.testing]
        accredited = set(s.scalars(select(ServiceAccreditation.service_id)))
        assert len(accredited & {x.id for x in testing}) >= 5
        links = s.execute(select(ServiceInstrument.service_id, ServiceInstrument.instrument_id)).all()
        assert len(links) >= 15
        for service_id, instrument_id in links:
            detail = catalog.get_service(s, service_id)
            assert all(i.facility_id == detail.service.facility_id for i in detail.instruments), instrument_id
        sichuan_testing = [x for x in testing if x.region_code == "SC" and x.is_active]
        assert any(x.list_price_fen is not None for x in sichuan_testing)
        assert any(x.list_price_fen is None for x in sichuan_testing)
        companies = catalog.search_services(s, catalog.ServiceQuery(q="嘉陵"), limit=5).items
        assert companies, "a company's services are found by its name"
        engineer = identity.find_user(s, "he.jing@liangjiang-dx.example.com")
        assert engineer.institution_id is not None
