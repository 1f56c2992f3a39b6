"""Matching pages: /match in Chinese and English with reasons for each result, the keyword-only notice, saving a
demand, a provider's inbox and offer accepted as an order, the expert directory and profile editing, and escaping
of what users type."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from labcommons.catalog.models import Institution, Service
from labcommons.matching import embeddings, index
from labcommons.matching.models import Demand, DemandOffer, DemandSubscription, Expert, OfferStatus
from labcommons.orders.models import ServiceOrder
from tests.factories import World
from tests.matching.h1_support import MatchWorld, add_expert, add_user, build_match_world, offer, post
from tests.web.conftest import csrf_of, flash_of, page_csrf, result_names, sign_in

SEQ_ZH = "需要做高通量基因测序，小鼠脑组织，20个样本"
SEQ_EN = "single-cell RNA sequencing of mouse brain tissue"


@pytest.fixture
def mw(world: World) -> MatchWorld:
    built = build_match_world(world)
    # The catalogue copies a service's region from its institution; the shared builder leaves it out.
    with world.db.unit_of_work() as s:
        for svc in s.scalars(select(Service)):
            institution = s.get(Institution, svc.institution_id)
            assert institution is not None
            svc.region_code = institution.region_code
    return built


def english(client: TestClient) -> None:
    client.cookies.set("lang", "en")


def chinese(client: TestClient) -> None:
    client.cookies.set("lang", "zh_CN")


def invalid(html: str, name: str) -> bool:
    return re.search(rf'name="{name}"[^>]*aria-invalid="true"', html) is not None


def card(html: str, kind: str, code: str) -> str:
    """The HTML of one result card."""
    match = re.search(rf'<li class="result match-card" data-kind="{kind}" data-code="{re.escape(code)}">(.*?)</li>\s*'
                      r'(?=<li class="result match-card"|</ol>)', html, re.S)
    assert match, f"no {kind} card {code}"
    return match.group(1)


def demand_id_of(location: str) -> int:
    match = re.fullmatch(r"/demands/(\d+)", location)
    assert match, location
    return int(match.group(1))


# --- /match -------------------------------------------------------------------------------------------------------


def test_match_page_in_chinese_explains_each_result(client: TestClient, mw: MatchWorld) -> None:
    chinese(client)
    empty = client.get("/match")
    assert empty.status_code == 200 and "您需要什么？" in empty.text and 'href="/match"' in empty.text
    assert 'name="q"' in empty.text and 'id="match-results"' in empty.text
    page = client.get("/match", params={"q": SEQ_ZH})
    assert page.status_code == 200
    names = result_names(page.text)
    assert "高通量基因测序仪" in names[:3] and "单细胞转录组测序服务" in names
    seq = card(page.text, "instrument", "CQ-SEQ")
    assert "命中您的用词" in seq and "<mark>" in seq and "测序" in seq
    assert "匹配度" in seq and "<meter" in seq
    assert f'href="/instruments/{mw.world.instruments["SEQ"]}#book"' in seq and "预约" in seq
    assert "最早空闲时间" in seq and "Asia/Shanghai" in seq  # earliest slot in the user's zone
    service = card(page.text, "service", "CQ-S-SEQ")
    assert f'href="/services/{mw.services["SEQ"]}/order"' in service
    # Anonymous visitors are asked to sign in before saving the demand.
    assert "登录后可保存需求" in page.text and 'action="/demands"' not in page.text


def test_match_page_in_english_with_region_and_concepts(client: TestClient, mw: MatchWorld) -> None:
    english(client)
    page = client.get("/match", params={"q": "spatial transcriptomics study design consultation", "region": "SC"})
    assert page.status_code == 200
    assert "Find a provider for what you need" in page.text
    assert 'option value="SC" selected' in page.text
    names = result_names(page.text)
    assert "Luo Xiaolan" in names and "Spatial transcriptomics study design consultation" in names
    expert = card(page.text, "expert", "EXP-LUO")
    assert "Your words found here:" in expert and "Takes consultations" in expert
    assert "Languages: 中文, English" in expert
    assert f'href="/services/{mw.services["CONSULT"]}"' in expert and "Request a consultation" in expert
    assert "In another region: Chongqing" in expert  # the demand asked for Sichuan
    proteomics = client.get("/match", params={"q": "proteomics of serum by mass spectrometry", "region": "SC"})
    ms = card(proteomics.text, "service", "SC-S-MS")
    assert "In the region you chose" in ms and "Sichuan" in ms
    concept = client.get("/match", params={"q": "cryo-EM"})
    assert concept.status_code == 200
    em = card(concept.text, "instrument", "CQ-EM")
    assert "Same thing in other words:" in em and "≈" in em and "Under maintenance" in em


def test_match_fragment_for_htmx_and_bad_input(client: TestClient, mw: MatchWorld) -> None:
    english(client)
    fragment = client.get("/match", params={"q": SEQ_EN}, headers={"HX-Request": "true"})
    assert fragment.status_code == 200 and "<html" not in fragment.text
    assert fragment.text.lstrip().startswith('<section id="match-results"')
    assert "Single-cell RNA sequencing service" in result_names(fragment.text)
    bad = client.get("/match", params={"q": SEQ_EN, "region": "XX"})
    assert bad.status_code == 422 and "Choose one of the regions." in bad.text
    too_long = client.get("/match", params={"q": "测序" * 1001})
    assert too_long.status_code == 422 and "The text is too long." in too_long.text
    blank = client.get("/match", params={"q": "   "})
    assert blank.status_code == 200 and 'class="result match-card"' not in blank.text


def test_keyword_mode_shows_the_notice(client: TestClient, mw: MatchWorld) -> None:
    embeddings.simulate_missing("test")
    index.clear_cache()
    try:
        english(client)
        page = client.get("/match", params={"q": SEQ_EN})
        assert page.status_code == 200 and 'data-mode="keyword"' in page.text
        assert "results are ranked by keywords only" in page.text
        assert "Single-cell RNA sequencing service" in result_names(page.text)
        assert "Similar in meaning" not in page.text
        chinese(client)
        assert "语义排序暂不可用" in client.get("/match", params={"q": SEQ_ZH}).text
    finally:
        embeddings.simulate_missing(None)
        index.clear_cache()


# --- saving a demand ----------------------------------------------------------------------------------------------


def test_saving_a_demand_from_match_and_from_the_full_form(client: TestClient, mw: MatchWorld) -> None:
    assert client.get("/demands", follow_redirects=False).status_code == 303  # to the sign-in page
    sign_in(client, "bob")
    chinese(client)
    page = client.get("/match", params={"q": SEQ_ZH})
    assert "保存需求，让服务方响应" in page.text
    saved = client.post("/demands", data={"csrf_token": csrf_of(page.text), "text": SEQ_ZH, "region": "",
                                          "share": "1"}, follow_redirects=False)
    assert saved.status_code == 303 and "需求已保存" in flash_of(saved)
    demand_id = demand_id_of(saved.headers["location"])
    detail = client.get(f"/demands/{demand_id}")
    assert detail.status_code == 200 and SEQ_ZH in detail.text and "高通量基因测序仪" in detail.text
    assert "命中您的用词" in detail.text and "关闭该需求" in detail.text
    assert f'href="/demands/{demand_id}"' in client.get("/demands").text

    english(client)
    form = client.get("/demands", params={"text": SEQ_EN, "region": "CQ"})
    assert SEQ_EN in form.text and 'option value="CQ" selected' in form.text
    data = {"csrf_token": csrf_of(form.text), "text": SEQ_EN, "budget": "12,000.555", "deadline": "",
            "region": "CQ", "sample_type": "frozen tissue", "share": ""}
    bad = client.post("/demands", data=data)
    assert bad.status_code == 422 and invalid(bad.text, "budget") and 'value="frozen tissue"' in bad.text
    past = client.post("/demands", data={**data, "budget": "12000", "deadline": "2020-01-01"})
    assert past.status_code == 422 and invalid(past.text, "deadline") and "must not be in the past" in past.text
    missing = client.post("/demands", data={**data, "budget": "", "text": "  "})
    assert missing.status_code == 422 and invalid(missing.text, "text")
    deadline = (date.today() + timedelta(days=20)).isoformat()
    ok = client.post("/demands", data={**data, "budget": "12,000.50", "deadline": deadline},
                     follow_redirects=False)
    assert ok.status_code == 303 and "kept private" in flash_of(ok)
    with mw.db.unit_of_work(write=False) as s:
        demand = s.get(Demand, demand_id_of(ok.headers["location"]))
        assert demand is not None
        assert (demand.budget_fen, demand.deadline.isoformat() if demand.deadline else None, demand.region_code,
                demand.share_with_providers) == (1_200_050, deadline, "CQ", False)
    private = client.get(ok.headers["location"])
    assert "¥12,000.50" in private.text and "This demand is private" in private.text
    # Someone else's demand does not exist for them.
    sign_in(client, "dave")
    assert client.get(f"/demands/{demand_id}").status_code == 404


def test_closing_a_demand(client: TestClient, mw: MatchWorld) -> None:
    demand_id = post(mw, SEQ_EN)
    english(client)
    sign_in(client, "bob")
    page = client.get(f"/demands/{demand_id}")
    closed = client.post(f"/demands/{demand_id}/close", data={"csrf_token": csrf_of(page.text)},
                         follow_redirects=False)
    assert closed.status_code == 303 and "Demand closed" in flash_of(closed)
    again = client.post(f"/demands/{demand_id}/close", data={"csrf_token": csrf_of(page.text)},
                        follow_redirects=False)
    assert again.status_code == 303 and flash_of(again).startswith("error|")
    after = client.get(f"/demands/{demand_id}")
    assert "Close this demand" not in after.text and "Closed without an order" in after.text
    forged = client.post(f"/demands/{demand_id}/close", data={"csrf_token": "nope"})
    assert forged.status_code == 403


# --- providers: inbox, offer, accept -------------------------------------------------------------------------------


def test_provider_offers_and_the_author_accepts_it_as_an_order(client: TestClient, mw: MatchWorld) -> None:
    demand_id = post(mw, SEQ_EN, budget_fen=500_000)
    lab = mw.world.facilities["CQ-LAB"]
    english(client)
    sign_in(client, "alice")
    home = client.get("/manage/demands")
    assert home.status_code == 200 and f'href="/manage/demands/facilities/{lab}"' in home.text
    assert "Subscribed" in home.text
    inbox = client.get(f"/manage/demands/facilities/{lab}")
    assert inbox.status_code == 200 and f'id="demand-{demand_id}"' in inbox.text and SEQ_EN in inbox.text
    assert "¥5,000.00" in inbox.text and "What matched at this facility" in inbox.text
    assert "Bob" not in inbox.text  # providers never see the author
    data = {"csrf_token": csrf_of(inbox.text), "demand_id": str(demand_id), "service_id": str(mw.services["SEQ"]),
            "message": "We can run 20 samples next week.", "price": "4,800.5", "available_from": "",
            "expert_id": ""}
    bad = client.post(f"/manage/demands/facilities/{lab}/offers", data={**data, "price": "abc"})
    assert bad.status_code == 422 and invalid(bad.text, "price") and "We can run 20 samples" in bad.text
    foreign = client.post(f"/manage/demands/facilities/{lab}/offers",
                          data={**data, "service_id": str(mw.services["MS"])})
    assert foreign.status_code == 422 and "Choose an active service of this facility." in foreign.text
    sent = client.post(f"/manage/demands/facilities/{lab}/offers", data=data, follow_redirects=False)
    assert sent.status_code == 303 and "Offer sent" in flash_of(sent)
    twice = client.post(f"/manage/demands/facilities/{lab}/offers", data=data)
    assert twice.status_code == 409
    after = client.get(f"/manage/demands/facilities/{lab}")
    assert "Your offer is open (¥4,800.50)" in after.text and "Withdraw the offer" in after.text

    # carol (staff of SC-UNI) may not open CQ-LAB's inbox; dave answers for no facility.
    sign_in(client, "carol")
    assert client.get(f"/manage/demands/facilities/{lab}").status_code == 403
    sign_in(client, "dave")
    assert client.get("/manage/demands").status_code == 403

    sign_in(client, "bob")
    page = client.get(f"/demands/{demand_id}")
    assert "We can run 20 samples next week." in page.text and "¥4,800.50" in page.text
    with mw.db.unit_of_work(write=False) as s:
        offer_id = s.scalars(select(DemandOffer.id).where(DemandOffer.demand_id == demand_id)).one()
    assert f'action="/demands/{demand_id}/offers/{offer_id}/accept"' in page.text
    wrong = client.post(f"/demands/{demand_id + 1}/offers/{offer_id}/accept", data={"csrf_token": csrf_of(page.text)})
    assert wrong.status_code == 404
    accepted = client.post(f"/demands/{demand_id}/offers/{offer_id}/accept",
                           data={"csrf_token": csrf_of(page.text), "account_id": ""}, follow_redirects=False)
    assert accepted.status_code == 303 and "Offer accepted" in flash_of(accepted)
    with mw.db.unit_of_work(write=False) as s:
        made = s.get(DemandOffer, offer_id)
        assert made is not None and made.status == OfferStatus.accepted and made.order_id is not None
        order = s.get(ServiceOrder, made.order_id)
        assert order is not None and order.service_id == mw.services["SEQ"]
    assert accepted.headers["location"] == f"/orders/{made.order_id}"
    assert client.get(accepted.headers["location"]).status_code == 200
    fulfilled = client.get(f"/demands/{demand_id}")
    assert "Fulfilled" in fulfilled.text and "Open the order" in fulfilled.text
    assert "Accept and make an order" not in fulfilled.text


def test_declining_and_withdrawing_offers_and_the_subscription_form(client: TestClient, mw: MatchWorld) -> None:
    demand_id = post(mw, SEQ_EN)
    first = offer(mw, demand_id)
    lab = mw.world.facilities["CQ-LAB"]
    chinese(client)
    sign_in(client, "bob")
    page = client.get(f"/demands/{demand_id}")
    declined = client.post(f"/demands/{demand_id}/offers/{first}/decline", data={"csrf_token": csrf_of(page.text)},
                           follow_redirects=False)
    assert declined.status_code == 303 and "已拒绝该报价" in flash_of(declined)
    assert "已谢绝" in client.get(f"/demands/{demand_id}").text and "征集报价中" in page.text

    second = offer(mw, demand_id)
    sign_in(client, "alice")
    csrf = page_csrf(client)
    withdrawn = client.post(f"/manage/demands/offers/{second}/withdraw", data={"csrf_token": csrf},
                            follow_redirects=False)
    assert withdrawn.status_code == 303 and "报价已撤回" in flash_of(withdrawn)
    assert withdrawn.headers["location"].startswith(f"/manage/demands/facilities/{lab}")
    again = client.post(f"/manage/demands/offers/{second}/withdraw", data={"csrf_token": csrf},
                        follow_redirects=False)
    assert again.status_code == 303 and flash_of(again).startswith("error|")

    url = f"/manage/demands/facilities/{lab}/subscription"
    bad = client.post(url, data={"csrf_token": csrf, "active": "1", "min_score": "150", "notify_email": "1"})
    assert bad.status_code == 422 and invalid(bad.text, "min_score") and 'value="150"' in bad.text
    stopped = client.post(url, data={"csrf_token": csrf, "active": "", "min_score": "40"}, follow_redirects=False)
    assert stopped.status_code == 303 and "已停止订阅" in flash_of(stopped)
    with mw.db.unit_of_work(write=False) as s:
        sub = s.get(DemandSubscription, lab)
        assert sub is not None and (sub.active, sub.min_score, sub.notify_email) == (False, 0.4, False)
    inbox = client.get(f"/manage/demands/facilities/{lab}")
    assert "本平台尚未订阅" in inbox.text and f'id="demand-{demand_id}"' not in inbox.text


# --- experts ------------------------------------------------------------------------------------------------------


def test_expert_directory_and_profile(client: TestClient, mw: MatchWorld) -> None:
    add_expert(mw.world, "EXP-SC", "SC-UNI", name_zh="唐明", name_en="Tang Ming", fields=["ANA.MS"],
               skills_zh=["蛋白质组学"], skills_en=["proteomics"], availability="unavailable", languages=["zh"])
    english(client)
    listing = client.get("/experts")
    assert listing.status_code == 200 and {"Luo Xiaolan", "Tang Ming"} <= set(result_names(listing.text))
    assert 'href="/experts"' in listing.text  # the navigation link
    assert result_names(client.get("/experts", params={"q": "proteomics"}).text) == ["Tang Ming"]
    assert result_names(client.get("/experts", params={"region": "CQ"}).text) == ["Luo Xiaolan"]
    assert result_names(client.get("/experts", params={"available": "1"}).text) == ["Luo Xiaolan"]
    assert result_names(client.get("/experts", params={"field": "ANA"}).text) == ["Tang Ming"]
    bad = client.get("/experts", params={"region": "XX"})
    assert bad.status_code == 422 and "Choose one of the regions." in bad.text

    luo = mw.experts["LUO"]
    profile = client.get(f"/experts/{luo}")
    assert profile.status_code == 200 and "spatial transcriptomics study design" in profile.text
    assert f'href="/services/{mw.services["CONSULT"]}/order?expert_id=' in profile.text
    assert "Request a consultation" in profile.text
    assert "Edit profile" not in profile.text
    chinese(client)
    zh = client.get(f"/experts/{luo}")
    assert "罗晓岚" in zh.text and "空间转录组实验设计" in zh.text and "预约咨询" in zh.text
    assert client.get("/experts/999999").status_code == 404


def test_editing_an_expert_profile(client: TestClient, mw: MatchWorld) -> None:
    add_user(mw.world, "erin")
    own = add_expert(mw.world, "EXP-ERIN", "CQ-LAB", user="erin", name_zh="艾琳", name_en="Erin")
    luo = mw.experts["LUO"]
    english(client)
    assert client.get(f"/experts/{luo}/edit", follow_redirects=False).status_code == 303  # sign in first
    sign_in(client, "dave")
    assert client.get(f"/experts/{luo}/edit").status_code == 403

    sign_in(client, "erin")  # the expert edits their own profile, without the managers' fields
    form = client.get(f"/experts/{own}/edit")
    assert form.status_code == 200 and 'name="availability"' in form.text and 'name="is_active"' not in form.text
    data = {"csrf_token": csrf_of(form.text), "name_zh": "艾琳", "name_en": "Erin", "title_zh": "", "title_en": "",
            "bio_zh": "", "bio_en": "Flow cytometry.", "fields": "NOPE.X", "skills_zh": "流式细胞术\n",
            "skills_en": "flow cytometry\ncell sorting", "languages": "zh, en", "availability": "limited"}
    bad = client.post(f"/experts/{own}/edit", data=data)
    assert bad.status_code == 422 and invalid(bad.text, "fields") and "cell sorting" in bad.text
    saved = client.post(f"/experts/{own}/edit", data={**data, "fields": "CYT.FLOW"}, follow_redirects=False)
    assert saved.status_code == 303 and saved.headers["location"] == f"/experts/{own}"
    page = client.get(f"/experts/{own}")
    assert "Limited availability" in page.text and "cell sorting" in page.text and "Edit profile" in page.text
    assert client.get(f"/experts/{luo}/edit").status_code == 403

    sign_in(client, "alice")  # the facility's manager: also the consultation service and the listing
    manage = client.get(f"/experts/{luo}/edit")
    assert manage.status_code == 200 and 'name="is_active"' in manage.text
    assert f'option value="{mw.services["CONSULT"]}" selected' in manage.text
    data = {"csrf_token": csrf_of(manage.text), "name_zh": "罗晓岚", "name_en": "Luo Xiaolan", "title_zh": "研究员",
            "title_en": "Principal Investigator", "bio_zh": "", "bio_en": "", "fields": "GEN.SPATIAL",
            "skills_zh": "空间转录组实验设计", "skills_en": "spatial transcriptomics study design",
            "languages": "zh en", "availability": "available", "consultation_service_id": "", "is_active": ""}
    hidden = client.post(f"/experts/{luo}/edit", data=data, follow_redirects=False)
    assert hidden.status_code == 303 and hidden.headers["location"] == f"/experts/{luo}/edit"
    with mw.db.unit_of_work(write=False) as s:
        expert = s.get(Expert, luo)
        assert expert is not None and not expert.is_active and expert.consultation_service_id is None
    assert client.get(f"/experts/{luo}").status_code == 404  # unlisted
    assert client.get(f"/experts/{luo}/edit").status_code == 200  # the manager still edits it


# --- escaping -----------------------------------------------------------------------------------------------------


def test_what_users_type_is_escaped(client: TestClient, mw: MatchWorld) -> None:
    text = '<script>alert("x")</script> 高通量基因测序 <b>sequencing</b>'
    english(client)
    page = client.get("/match", params={"q": text})
    assert page.status_code == 200 and "<script>alert" not in page.text and "<b>sequencing" not in page.text
    assert "&lt;script&gt;alert" in page.text
    sign_in(client, "bob")
    form = client.get("/match", params={"q": text})
    assert "&lt;script&gt;" in form.text and "<script>alert" not in form.text
    saved = client.post("/demands", data={"csrf_token": csrf_of(form.text), "text": text, "region": "",
                                          "share": "1", "sample_type": "<img src=x onerror=alert(1)>"},
                        follow_redirects=False)
    assert saved.status_code == 303
    detail = client.get(saved.headers["location"])
    assert "<script>alert" not in detail.text and "&lt;script&gt;alert" in detail.text
    assert "<img src=x" not in detail.text
    assert "<script>alert" not in client.get("/demands").text
    offer(mw, demand_id_of(saved.headers["location"]), message="<script>evil()</script> ok")
    assert "<script>evil" not in client.get(saved.headers["location"]).text
    sign_in(client, "alice")
    inbox = client.get(f"/manage/demands/facilities/{mw.world.facilities['CQ-LAB']}")
    assert "<script>alert" not in inbox.text and "&lt;script&gt;alert" in inbox.text



def test_a_consultation_requested_from_an_expert_profile_names_the_expert(client: TestClient, mw: MatchWorld) -> None:
    english(client)
    sign_in(client, "bob")
    expert_id, service_id = mw.experts["LUO"], mw.services["CONSULT"]
    profile = client.get(f"/experts/{expert_id}")
    assert f'href="/services/{service_id}/order?expert_id={expert_id}"' in profile.text
    form = client.get(f"/services/{service_id}/order?expert_id={expert_id}")
    assert form.status_code == 200 and "Consultation with" in form.text
    assert f'name="expert_id" value="{expert_id}"' in form.text
    # An expert of another service's facility is not offered on this form.
    assert 'name="expert_id"' not in client.get(f"/services/{mw.services['MS']}/order?expert_id={expert_id}").text
    placed = client.post(f"/services/{service_id}/order", data={
        "csrf_token": csrf_of(form.text), "title": "Study design for embryo sections", "description": "",
        "sample_count": "0", "sample_description": "", "wanted_by": "", "contact_phone": "", "action": "draft",
        "expert_id": str(expert_id)}, follow_redirects=False)
    assert placed.status_code == 303, placed.text
    with mw.db.unit_of_work(write=False) as s:
        order = s.scalars(select(ServiceOrder).where(ServiceOrder.title == "Study design for embryo sections")).one()
        assert order.expert_id == expert_id
    # A forged expert of another facility is refused, with the form again.
    refused = client.post(f"/services/{mw.services['MS']}/order", data={
        "csrf_token": csrf_of(form.text), "title": "x", "action": "draft", "expert_id": str(expert_id)})
    assert refused.status_code == 422
    with mw.db.unit_of_work(write=False) as s:
        assert s.scalars(select(ServiceOrder).where(ServiceOrder.title == "x")).first() is None
