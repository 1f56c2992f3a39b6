"""Service pages on both engines: the kind facet of the search page, a service's page, the managers' editor."""

from __future__ import annotations

import re
from datetime import date

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.catalog import service as catalog
from labcommons.catalog.models import Service, ServiceInstrument
from labcommons.identity import roles
from labcommons.identity import service as identity
from tests.catalog.test_services import build_services, rate
from tests.factories import World, grant
from tests.web.conftest import csrf_of, facet_count, result_names, sign_in


def result_block(html: str, code: str) -> str:
    match = re.search(rf'<li class="result" data-service="{re.escape(code)}">(.*?)</li>', html, re.S)
    assert match, f"no result {code}"
    return match.group(1)


@pytest.fixture
def services(world: World) -> dict[str, int]:
    return build_services(world)


# --- the kind facet on the search page -----------------------------------------------------------------------


def test_kind_facet_counts_instruments_and_each_kind(client: TestClient, services: dict[str, int]) -> None:
    html = client.get("/?lang=en").text
    assert facet_count(html, "kind", "instrument") == 6
    assert facet_count(html, "kind", "testing") == 4
    assert facet_count(html, "kind", "rnd") == 1
    assert facet_count(html, "kind", "consultation") == 1
    assert re.search(r'class="facet-value on"[^>]*aria-checked="true"\s+data-facet="kind:instrument"', html)
    assert "High-throughput sequencer" in result_names(html), "without a kind the page lists instruments"
    # The counts follow the text and the filters.
    narrowed = client.get("/", params={"q": "测序", "lang": "en"}).text
    assert facet_count(narrowed, "kind", "instrument") == 1 and facet_count(narrowed, "kind", "testing") == 1
    sichuan = client.get("/", params={"region": "SC", "lang": "en"}).text
    assert facet_count(sichuan, "kind", "instrument") == 1 and facet_count(sichuan, "kind", "testing") == 2
    assert facet_count(sichuan, "kind", "rnd") == 0


def test_a_service_kind_lists_services(client: TestClient, services: dict[str, int], world: World) -> None:
    rate(world, services["SC-NMR"], [(5, ""), (4, "")])
    html = client.get("/", params={"kind": "testing", "lang": "en"}).text
    assert set(result_names(html)) == {"Human whole-genome resequencing", "Flow cytometry analysis",
                                       "Proton NMR spectrum", "Custom mass spectrometry"}
    assert "4 services" in html
    assert facet_count(html, "kind", "instrument") == 6 and facet_count(html, "kind", "testing") == 4
    assert re.search(r'class="facet-value on"[^>]*data-facet="kind:testing"', html)
    assert 'name="free_from"' not in html, "the free window is about instruments"
    assert f'href="/services/{services["SC-NMR"]}"' in html
    nmr = result_block(html, "SC-NMR")
    for text in ("¥200.00 per sample", "Results in 5 days", "CMA", "CNAS", "★ 4.5 (2 ratings)", "SC-UNI Core",
                 "SC-UNI Laboratory", "Sichuan"):
        assert text in nmr, text
    assert "Quote on request" in result_block(html, "SC-MS-CUSTOM")
    assert "Not rated yet" in result_block(html, "CQ-FLOW")
    # Facets of the service list narrow it and ignore their own filter.
    narrowed = client.get("/", params={"kind": "testing", "region": "SC", "lang": "zh_CN"}).text
    assert set(result_names(narrowed)) == {"核磁共振氢谱", "质谱定制分析"}
    assert facet_count(narrowed, "region", "CQ") == 2 and "共 2 项服务" in narrowed
    assert "面议" in result_block(narrowed, "SC-MS-CUSTOM")
    # A kind link keeps the text and drops instrument-only filters; Instruments goes back.
    start = client.get("/", params={"q": "测序", "status": "active", "lang": "en"}).text
    link = re.search(r'data-facet="kind:testing" href="([^"]+)"', start)
    assert link and "kind=testing" in link.group(1) and "status" not in link.group(1) and "q=" in link.group(1)
    back = re.search(r'data-facet="kind:instrument" href="([^"]+)"', html)
    assert back and "kind" not in back.group(1)


def test_service_search_by_htmx_and_errors(client: TestClient, services: dict[str, int]) -> None:
    response = client.get("/", params={"q": "核磁", "kind": "testing", "lang": "en"},
                          headers={"HX-Request": "true", "HX-Target": "results"})
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<div id="results"')
    assert result_names(response.text) == ["Proton NMR spectrum"]
    empty = client.get("/", params={"q": "nothing-like-this", "kind": "rnd", "lang": "en"}).text
    assert "No service matches" in empty
    long = client.get("/", params={"q": "x" * 201, "kind": "rnd", "lang": "en"})
    assert long.status_code == 422 and "too long" in long.text
    # An unknown kind (an old or edited link) falls back to the instruments.
    assert "High-throughput sequencer" in result_names(client.get("/?kind=teaching&lang=en").text)


def test_service_pages_follow_the_cursor(client: TestClient, services: dict[str, int]) -> None:
    from labcommons.catalog import pages as catalog_pages

    original = catalog_pages.PAGE_SIZE
    catalog_pages.PAGE_SIZE = 3
    try:
        first = client.get("/?kind=testing&lang=en").text
        link = re.search(r'rel="next" href="([^"]+)"', first)
        assert link
        second = client.get(link.group(1).replace("&amp;", "&")).text
    finally:
        catalog_pages.PAGE_SIZE = original
    assert len(result_names(first)) == 3 and len(result_names(second)) == 1
    assert not set(result_names(first)) & set(result_names(second))


# --- a service's page ----------------------------------------------------------------------------------------


def test_service_page_shows_what_a_customer_needs(client: TestClient, services: dict[str, int], world: World) -> None:
    rate(world, services["CQ-WGS"], [(5, "Fast and <b>clear</b> report"), (3, "")])
    html = client.get(f"/services/{services['CQ-WGS']}?lang=en").text
    for text in ("Human whole-genome resequencing", "人全基因组重测序", "30x depth with variant calling.",
                 "At least 1 µg genomic DNA", "¥1,800.00 per sample", "Results in 10 days", "CMA",
                 "Certificate 2023000123", "CQ-LAB Core", "CQ-LAB Laboratory", "Chongqing", "★ 4.0 (2 ratings)",
                 "Fast and &lt;b&gt;clear&lt;/b&gt; report", "Sequencing (short-read, long-read)"):
        assert text in html, text
    assert "<b>clear</b>" not in html
    assert "Certificate 2023000123 · valid until" in html and "Expired" not in html
    assert f'href="/instruments/{world.instruments["SEQ"]}"' in html
    assert f'href="/services/{services["CQ-WGS"]}/order"' in html
    assert 'href="/manage/services' not in html, "only those who may edit see the editor links"
    zh = client.get(f"/services/{services['CQ-WGS']}?lang=zh_CN").text
    assert "基因组DNA不少于1微克" in zh and "订购此服务" in zh and "样品要求" in zh


def test_quote_on_request_inactive_and_unknown_services(
    client: TestClient, services: dict[str, int], world: World
) -> None:
    html = client.get(f"/services/{services['CQ-IMG-RND']}?lang=en").text
    assert "Quote on request" in html and "No accreditation is recorded" in html
    with world.db.unit_of_work() as s:
        svc = s.get(Service, services["CQ-IMG-RND"])
        assert svc is not None
        catalog.replace_accreditations(s, svc, [catalog.AccreditationIn("CNAS", "L1", date(2020, 1, 31))])
    lapsed = client.get(f"/services/{services['CQ-IMG-RND']}?lang=en").text
    assert "Certificate L1 · valid until" in lapsed and "Expired" in lapsed
    old = client.get(f"/services/{services['SC-OLD']}?lang=en")
    assert old.status_code == 200 and "This service is no longer offered." in old.text
    assert f'/services/{services["SC-OLD"]}/order' not in old.text
    missing = client.get("/services/99999?lang=zh_CN")
    assert missing.status_code == 404 and '<html lang="zh-CN">' in missing.text


def test_managers_see_the_editor_links(client: TestClient, services: dict[str, int], world: World) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    sign_in(client, "alice")
    html = client.get(f"/services/{services['CQ-WGS']}?lang=en").text
    assert f'href="/manage/services/{services["CQ-WGS"]}"' in html and 'href="/manage/services"' in html
    other = client.get(f"/services/{services['SC-NMR']}?lang=en").text
    assert 'href="/manage/services' not in other


# --- the managers' editor ------------------------------------------------------------------------------------


def test_plain_users_and_staff_may_not_manage_services(
    client: TestClient, services: dict[str, int], world: World
) -> None:
    sign_in(client, "bob")
    assert client.get("/manage/services").status_code == 403
    grant(world, "bob", "facility_staff", "CQ-LAB")
    assert client.get("/manage/services").status_code == 403
    grant(world, "bob", "facility_manager", "SC-UNI")
    assert client.get(f"/manage/services/{services['CQ-WGS']}").status_code == 403
    csrf = csrf_of(client.get("/manage/services").text)
    r = client.post(f"/manage/services/{services['CQ-WGS']}", data={"csrf_token": csrf, "name_en": "Hijacked"},
                    follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/manage/services", data={"csrf_token": csrf, "facility": "CQ-LAB-F", "code": "X-1",
                                              "kind": "testing", "name_en": "X", "category_code": "ANA.MS"},
                    follow_redirects=False)
    assert r.status_code == 403
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Service, services["CQ-WGS"]).name_en == "Human whole-genome resequencing"  # type: ignore[union-attr]
        assert s.scalar(select(func.count()).select_from(Service)) == 7


def _create_form(csrf: str, **changes: str) -> dict[str, str]:
    form = {"csrf_token": csrf, "facility": "CQ-LAB-F", "code": "CQ-NEW", "kind": "testing", "name_zh": "元素分析",
            "name_en": "Elemental analysis", "category_code": "ANA.ELEM", "price": "1,200.50", "price_unit": "sample",
            "turnaround_days": "4", "description_zh": "", "description_en": "", "sample_requirements_zh": "",
            "sample_requirements_en": "Dry powder", "accreditations": "CMA 2023000999 2028-01-31"}
    form.update(changes)
    return form


def test_a_manager_creates_and_edits_a_service(client: TestClient, services: dict[str, int], world: World) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    sign_in(client, "alice")
    page = client.get("/manage/services?lang=en")
    assert page.status_code == 200
    assert set(re.findall(r'data-service="([^"]+)"', page.text)) == {"CQ-WGS", "CQ-IMG-RND", "CQ-SPATIAL-CONSULT"}
    assert '<option value="CQ-LAB-F"' in page.text and 'value="SC-UNI-F"' not in page.text

    created = client.post("/manage/services", data=_create_form(csrf_of(page.text)), follow_redirects=False)
    assert created.status_code == 303, created.text
    location = created.headers["location"]
    edit = client.get(location + "?lang=en")
    assert "The service is created." in edit.text
    assert 'value="1200.50"' in edit.text and "CMA 2023000999 2028-01-31" in edit.text
    service_id = int(location.rsplit("/", 1)[1])
    with world.db.unit_of_work(write=False) as s:
        detail = catalog.get_service(s, service_id)
        assert detail.service.list_price_fen == 120050 and detail.service.region_code == "CQ"
        assert [a.scheme for a in detail.accreditations] == ["CMA"]

    # Edit: instruments used (multi-select), new accreditations, quote on request, withdrawn.
    form = _create_form(csrf_of(edit.text), price="", accreditations="CNAS L123\nCMA 2023000999 2029-01-31",
                        name_en="Elemental analysis (ICP)")
    chosen = [str(world.instruments["CONF"]), str(world.instruments["SEQ"])]
    saved = client.post(location, data={**form, "instrument_ids": chosen}, follow_redirects=False)
    assert saved.status_code == 303, saved.text
    assert "The service is saved." in client.get(location + "?lang=en").text
    with world.db.unit_of_work(write=False) as s:
        detail = catalog.get_service(s, service_id)
        assert detail.service.list_price_fen is None and not detail.service.is_active, "an unticked box withdraws"
        assert detail.service.name_en == "Elemental analysis (ICP)" and detail.service.code == "CQ-NEW"
        assert [a.scheme for a in detail.accreditations] == ["CMA", "CNAS"]
        assert {i.code for i in detail.instruments} == {"CQ-CONF", "CQ-SEQ"}
    public = client.get(f"/services/{service_id}?lang=en").text
    assert "Quote on request" in public and "This service is no longer offered." in public


@pytest.mark.parametrize(
    ("changes", "message", "field"),
    [
        ({"price": "12.345"}, "Enter an amount in yuan", "price"),
        ({"turnaround_days": "soon"}, "Enter a whole number.", "turnaround_days"),
        # str.isdigit takes these, int() does not: they were 500s.
        ({"turnaround_days": "²"}, "Enter a whole number.", "turnaround_days"),
        ({"turnaround_days": "9" * 5000}, "Enter a whole number.", "turnaround_days"),
        ({"code": "CQ-WGS"}, "Another service already has this code.", "code"),
        ({"category_code": ""}, "This field is required.", "category_code"),
        ({"accreditations": "CMA 1 2027-02-30"}, "Write dates as YYYY-MM-DD.", "accreditations"),
        ({"name_zh": "", "name_en": ""}, "This field is required.", "name_zh"),
    ],
)
def test_a_refused_creation_keeps_the_form_and_names_the_problem(
    client: TestClient, services: dict[str, int], world: World, changes: dict[str, str], message: str, field: str
) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    sign_in(client, "alice")
    csrf = csrf_of(client.get("/manage/services").text)
    r = client.post("/manage/services?lang=en", data=_create_form(csrf, **changes), follow_redirects=False)
    assert r.status_code in (409, 422)
    assert message in r.text
    assert re.search(rf'name="{field}"[^>]*aria-invalid="true"', r.text, re.S), field
    assert 'value="Elemental analysis"' in r.text or field == "name_zh", "the typed values are kept"
    with world.db.unit_of_work(write=False) as s:
        assert s.scalar(select(func.count()).select_from(Service)) == 7


def test_instruments_of_another_facility_are_refused(
    client: TestClient, services: dict[str, int], world: World
) -> None:
    grant(world, "alice", "facility_manager", "CQ-LAB")
    sign_in(client, "alice")
    url = f"/manage/services/{services['CQ-WGS']}"
    page = client.get(url + "?lang=en").text
    assert f'<option value="{world.instruments["SEQ"]}" selected>' in page
    assert f'value="{world.instruments["SC-MS"]}"' not in page, "only the facility's own instruments are offered"
    form = _create_form(csrf_of(page), name_en="Renamed")
    r = client.post(url + "?lang=en", data={**form, "instrument_ids": [str(world.instruments["SC-MS"])]},
                    follow_redirects=False)
    assert r.status_code == 422 and "may only use its own facility" in r.text
    for odd in ("²", "9" * 5000, str(2**31)):  # 500s before: int() refused the first two, PostgreSQL the last
        r = client.post(url + "?lang=en", data={**form, "instrument_ids": [odd]}, follow_redirects=False)
        assert r.status_code == 422 and "Unknown instrument." in r.text, odd
    assert client.get(f"/manage/services/{2**31}").status_code == 422
    with world.db.unit_of_work(write=False) as s:
        assert s.get(Service, services["CQ-WGS"]).name_en == "Human whole-genome resequencing"  # type: ignore[union-attr]
        assert s.scalars(select(ServiceInstrument.instrument_id)
                         .where(ServiceInstrument.service_id == services["CQ-WGS"])).all() == [world.instruments["SEQ"]]


def test_an_institution_admin_manages_all_its_facilities(client: TestClient, services: dict[str, int],
                                                        world: World) -> None:
    with world.db.unit_of_work() as s:
        roles.grant_role(s, None, identity.find_user(s, "carol@example.org"), "institution_admin",
                         institution_id=world.institutions["CQ-LAB"])
    sign_in(client, "carol")
    page = client.get("/manage/services?lang=zh_CN")
    assert page.status_code == 200 and "管理服务" in page.text
    assert set(re.findall(r'data-service="([^"]+)"', page.text)) == {"CQ-WGS", "CQ-IMG-RND", "CQ-SPATIAL-CONSULT"}
    assert client.get(f"/manage/services/{services['CQ-WGS']}").status_code == 200
    assert client.get(f"/manage/services/{services['CQ-FLOW']}").status_code == 403
