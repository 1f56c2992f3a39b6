"""The server-rendered pages, driven through their forms on both database engines."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from labcommons.booking import service as booking
from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.service import get_instrument
from labcommons.http import SESSION_COOKIE
from tests.factories import World, next_grid_day
from tests.web.conftest import csrf_of, facet_count, result_names, sign_in

SHANGHAI = ZoneInfo("Asia/Shanghai")


def cell_state(html: str, local: datetime) -> str:
    """The state class of the calendar cell holding a local hour."""
    key = local.strftime("%Y-%m-%dT%H")
    match = re.search(rf'<td class="cell (\w+)" data-cell="{key}">(.*?)</td>', html, re.S)
    assert match, f"no calendar cell {key}"
    return match.group(1)


def booking_form(start: datetime, minutes: int = 60, purpose: str = "RNA-seq run") -> dict[str, str]:
    """Form fields for a booking that starts at an aware UTC time, as a Shanghai user types them."""
    local = start.astimezone(SHANGHAI)
    return {"date": local.date().isoformat(), "start": local.strftime("%H:%M"), "end": "",
            "duration": str(minutes), "purpose": purpose}


def post_booking(
    client: TestClient, instrument_id: int, form: dict[str, str], *, follow_redirects: bool = True
) -> httpx.Response:
    """Post the booking form with the CSRF token of the instrument page, as the browser would."""
    page = client.get(f"/instruments/{instrument_id}")
    return client.post(f"/instruments/{instrument_id}/book", data={"csrf_token": csrf_of(page.text), **form},
                       follow_redirects=follow_redirects)


def shortest(world: World, key: str) -> int:
    """The shortest booking an instrument of the test world allows, in minutes."""
    with world.db.unit_of_work(write=False) as s:
        return get_instrument(s, world.instruments[key]).min_booking_minutes


def count_bookings(world: World, status: BookingStatus | None = None) -> int:
    with world.db.unit_of_work(write=False) as s:
        stmt = select(func.count()).select_from(Booking)
        if status is not None:
            stmt = stmt.where(Booking.status == status)
        return int(s.scalar(stmt) or 0)


# --- search ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lang", "html_lang", "search_word", "name"),
    [("zh_CN", "zh-CN", "搜索", "激光共聚焦显微镜"), ("en", "en", "Search", "Confocal microscope")],
)
def test_home_renders_in_each_language(
    client: TestClient, lang: str, html_lang: str, search_word: str, name: str
) -> None:
    response = client.get(f"/?lang={lang}")
    assert response.status_code == 200
    assert f'<html lang="{html_lang}">' in response.text
    assert search_word in response.text
    assert name in result_names(response.text)
    # The choice is remembered: the next page without ?lang= is in the same language.
    assert f'<html lang="{html_lang}">' in client.get("/bookings", follow_redirects=True).text


def test_language_switch_links_to_the_other_language(client: TestClient) -> None:
    html = client.get("/?q=seq&lang=en").text
    assert 'href="/?q=seq&amp;lang=zh_CN"' in html
    html = client.get("/?q=seq&lang=zh_CN").text
    assert 'href="/?q=seq&amp;lang=en"' in html


def test_chinese_search_finds_the_sequencer(client: TestClient) -> None:
    response = client.get("/", params={"q": "测序", "lang": "zh_CN"})
    assert response.status_code == 200
    assert result_names(response.text) == ["高通量基因测序仪"]


def test_search_by_htmx_returns_only_the_results_block(client: TestClient) -> None:
    response = client.get("/", params={"q": "sequencer", "lang": "en"},
                          headers={"HX-Request": "true", "HX-Target": "results"})
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<div id="results"')
    assert "<html" not in response.text
    assert result_names(response.text) == ["High-throughput sequencer"]


def test_facet_counts_are_shown_and_ignore_their_own_filter(client: TestClient) -> None:
    html = client.get("/?lang=en").text
    assert facet_count(html, "region", "CQ") == 5
    assert facet_count(html, "region", "SC") == 1
    assert facet_count(html, "category", "GEN") == 2  # parents count their children
    assert facet_count(html, "category", "GEN.SEQ") == 1
    assert facet_count(html, "status", "maintenance") == 1
    assert facet_count(html, "institution", "SC-UNI") == 1

    narrowed = client.get("/?region=SC&lang=zh_CN").text
    assert result_names(narrowed) == ["高分辨质谱仪"]
    assert facet_count(narrowed, "region", "CQ") == 5
    assert re.search(r'class="facet-value on"[^>]*data-facet="region:SC"', narrowed)
    assert "共 1 台仪器" in narrowed


def test_free_window_filter_uses_the_users_zone(client: TestClient, world: World) -> None:
    start = next_grid_day(days=3, hour=2)
    with world.db.unit_of_work() as s:
        booking.reserve_slot(s, world.actors["bob"], world.instruments["SEQ"], start,
                             start + timedelta(minutes=shortest(world, "SEQ")))
    local = start.astimezone(SHANGHAI)
    inside = {"free_from": local.strftime("%Y-%m-%dT%H:%M"),
              "free_to": (local + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"), "lang": "en"}
    names = result_names(client.get("/", params=inside).text)
    assert "Confocal microscope" in names
    assert "High-throughput sequencer" not in names
    # The same wall-clock hours read as UTC would be eight hours later, when the sequencer is free.
    utc_hours = {"free_from": start.strftime("%Y-%m-%dT%H:%M"),
                 "free_to": (start + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M"), "lang": "en"}
    assert "High-throughput sequencer" in result_names(client.get("/", params=utc_hours).text)


def test_bad_free_window_is_explained(client: TestClient) -> None:
    response = client.get("/", params={"free_from": "2030-01-02T10:00", "free_to": "2030-01-02T09:00",
                                       "lang": "en"})
    assert response.status_code == 422
    assert "The end of the free window must be after its start." in response.text


def test_next_page_link_follows_the_cursor(client: TestClient) -> None:
    from labcommons.catalog import pages as catalog_pages

    original = catalog_pages.PAGE_SIZE
    catalog_pages.PAGE_SIZE = 4
    try:
        first = client.get("/?lang=en").text
        link = re.search(r'rel="next" href="([^"]+)"', first)
        assert link
        second = client.get(link.group(1).replace("&amp;", "&")).text
    finally:
        catalog_pages.PAGE_SIZE = original
    assert len(result_names(first)) == 4
    assert len(result_names(second)) == 2
    assert not set(result_names(first)) & set(result_names(second))


# --- instrument page ------------------------------------------------------------------------------------


def test_instrument_page_shows_details_and_rules(client: TestClient, world: World) -> None:
    html = client.get(f"/instruments/{world.instruments['SEQ']}?lang=en").text
    for text in ("High-throughput sequencer", "Illumina NovaSeq 6000", "CQ-LAB Core", "CQ-LAB Laboratory",
                 "Chongqing", "Slot grid", "1 h", "8 h", "Everyone, in both regions", "Sign in to book"):
        assert text in html
    assert 'action="/instruments/' not in html  # anonymous visitors get no booking form


def test_calendar_shows_a_booked_slot_as_booked_without_saying_who(client: TestClient, world: World) -> None:
    start = next_grid_day(days=3, hour=2)
    local = start.astimezone(SHANGHAI)
    seq = world.instruments["SEQ"]
    before = client.get(f"/instruments/{seq}?week={local.date()}&lang=en").text
    assert cell_state(before, local) == "free"
    length = timedelta(minutes=shortest(world, "SEQ"))
    with world.db.unit_of_work() as s:
        booking.reserve_slot(s, world.actors["alice"], seq, start, start + length, "secret project of Alice")
    after = client.get(f"/instruments/{seq}?week={local.date()}&lang=en").text
    assert cell_state(after, local) == "booked"
    assert cell_state(after, local + length - timedelta(hours=1)) == "booked"
    assert cell_state(after, local + length) == "free"
    assert "Alice" not in after and "secret project" not in after
    zh = client.get(f"/instruments/{seq}?week={local.date()}&lang=zh_CN").text
    assert re.search(rf'data-cell="{local:%Y-%m-%dT%H}">\s*已预约', zh)


def test_calendar_partial_for_week_navigation(client: TestClient, world: World) -> None:
    response = client.get(f"/instruments/{world.instruments['SEQ']}?week=2030-01-09",
                          headers={"HX-Request": "true", "HX-Target": "calendar"})
    assert response.status_code == 200
    assert response.text.lstrip().startswith('<section id="calendar"')
    assert 'data-cell="2030-01-07T00"' in response.text  # snapped to the Monday
    assert 'data-cell="2030-01-13T23"' in response.text


def test_unknown_instrument_is_a_translated_404(client: TestClient) -> None:
    response = client.get("/instruments/999999?lang=zh_CN")
    assert response.status_code == 404
    assert "未找到" in response.text
    assert 'class="error-status">404<' in response.text


# --- signing in -----------------------------------------------------------------------------------------


def test_sign_in_sets_a_safe_session_cookie(client: TestClient) -> None:
    form = client.get("/login?next=/bookings")
    response = client.post("/login", data={"csrf_token": csrf_of(form.text), "email": "alice@example.org",
                                           "password": "correct horse", "next": "/bookings"},
                           follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/bookings"
    cookie = next(c for c in response.headers.get_list("set-cookie") if c.startswith(SESSION_COOKIE + "="))
    assert "HttpOnly" in cookie
    assert "samesite=lax" in cookie.lower()
    assert "Alice" in client.get("/").text


@pytest.mark.parametrize(
    "target", ["https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:x"]
)
def test_sign_in_never_redirects_off_site(client: TestClient, target: str) -> None:
    form = client.get("/login")
    response = client.post("/login", data={"csrf_token": csrf_of(form.text), "email": "alice@example.org",
                                           "password": "correct horse", "next": target},
                           follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


def test_wrong_password_is_refused_without_a_session(client: TestClient) -> None:
    form = client.get("/login?lang=en")
    response = client.post("/login", data={"csrf_token": csrf_of(form.text), "email": "alice@example.org",
                                           "password": "wrong", "next": "/"}, follow_redirects=False)
    assert response.status_code == 401
    assert "Wrong e-mail or password." in response.text
    assert SESSION_COOKIE not in client.cookies


def test_anonymous_my_bookings_redirects_to_sign_in(client: TestClient) -> None:
    response = client.get("/bookings", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/login?next=%2Fbookings"


def test_sign_out_ends_the_session(client: TestClient) -> None:
    sign_in(client, "alice")
    page = client.get("/")
    response = client.post("/logout", data={"csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert response.status_code == 303
    assert client.get("/bookings", follow_redirects=False).status_code == 303


# --- booking through the pages --------------------------------------------------------------------------


def test_sign_in_book_see_it_and_cancel(client: TestClient, world: World) -> None:
    sign_in(client, "alice")
    start = next_grid_day(days=3, hour=2)
    form = booking_form(start, minutes=shortest(world, "SEQ"))
    response = post_booking(client, world.instruments["SEQ"], form, follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == "/bookings"

    mine = client.get("/bookings")
    local = start.astimezone(SHANGHAI)
    assert "预约成功：高通量基因测序仪" in mine.text  # the flash, in the language of the post
    assert f"{local:%Y-%m-%d %H:%M}" in mine.text  # shown in the user's zone
    booking_id = int(re.search(r'data-booking="(\d+)"', mine.text).group(1))  # type: ignore[union-attr]
    assert count_bookings(world, BookingStatus.confirmed) == 1

    cancelled = client.post(f"/bookings/{booking_id}/cancel", data={"csrf_token": csrf_of(mine.text)},
                            follow_redirects=False)
    assert cancelled.status_code == 303
    assert cancelled.headers["location"] == "/bookings"
    after = client.get("/bookings").text
    assert "已取消：高通量基因测序仪" in after
    assert f'action="/bookings/{booking_id}/cancel"' not in after
    assert count_bookings(world, BookingStatus.cancelled) == 1


def test_double_booking_names_the_problem_and_keeps_the_form(client: TestClient, world: World) -> None:
    start = next_grid_day(days=3, hour=2)
    length = shortest(world, "SEQ")
    with world.db.unit_of_work() as s:
        booking.reserve_slot(s, world.actors["alice"], world.instruments["SEQ"], start,
                             start + timedelta(minutes=length))
    sign_in(client, "bob")
    form = booking_form(start + timedelta(hours=1), minutes=length, purpose="Bob's samples")
    response = post_booking(client, world.instruments["SEQ"], form)
    assert response.status_code == 409
    assert "该时段已被预约" in response.text
    assert "Bob&#39;s samples</textarea>" in response.text
    assert f'value="{form["date"]}"' in response.text and f'value="{form["start"]}"' in response.text
    assert count_bookings(world) == 1

    client.get("/?lang=en")
    english = post_booking(client, world.instruments["SEQ"], form)
    assert english.status_code == 409
    assert "This time is already booked" in english.text


@pytest.mark.parametrize(
    ("user", "instrument", "change", "status", "message"),
    [
        ("alice", "SEQ", {"start_offset_minutes": 30}, 422, "60-minute slot grid"),
        ("alice", "CONF", {"minutes": 600}, 422, "at most 480 minutes"),
        ("alice", "CONF", {"days": -4}, 422, "The start time is in the past."),
        ("alice", "EM", {}, 422, "cannot be booked at the moment"),
        ("bob", "LOCAL", {}, 422, "not open to users of your institution or region"),
        ("carol", "CONF", {"end_before_start": 1}, 422, "The end must be after the start."),
        ("carol", "CONF", {"no_end": 1}, 422, "Enter an end time or choose a length."),
    ],
)
def test_rule_violations_are_explained(
    client: TestClient, world: World, user: str, instrument: str, change: dict[str, int], status: int,
    message: str,
) -> None:
    start = next_grid_day(days=3 + change.get("days", 0), hour=2)
    start += timedelta(minutes=change.get("start_offset_minutes", 0))
    form = booking_form(start, minutes=change.get("minutes", 60))
    if "end_before_start" in change or "no_end" in change:
        form["duration"] = ""
        earlier = (start - timedelta(hours=1)).astimezone(SHANGHAI)
        form["end"] = "" if "no_end" in change else earlier.strftime("%H:%M")
    sign_in(client, user)
    client.get("/?lang=en")
    if instrument == "EM":
        # The maintenance instrument shows no form; a hand-made post is still refused.
        page = client.get("/")
        response = client.post(f"/instruments/{world.instruments['EM']}/book",
                               data={"csrf_token": csrf_of(page.text), **form})
    else:
        response = post_booking(client, world.instruments[instrument], form)
    assert response.status_code == status
    assert message in response.text
    assert count_bookings(world) == 0


def test_end_time_instead_of_a_length(client: TestClient, world: World) -> None:
    sign_in(client, "carol")
    start = next_grid_day(days=3, hour=2)
    form = booking_form(start)
    form["duration"], form["end"] = "", (start + timedelta(minutes=90)).astimezone(SHANGHAI).strftime("%H:%M")
    response = post_booking(client, world.instruments["CONF"], form, follow_redirects=False)
    assert response.status_code == 303
    with world.db.unit_of_work(write=False) as s:
        made = s.scalars(select(Booking)).one()
    assert (made.starts_at, made.ends_at) == (start, start + timedelta(minutes=90))


def test_anonymous_booking_post_goes_to_sign_in(client: TestClient, world: World) -> None:
    seq = world.instruments["SEQ"]
    page = client.get("/login")  # an anonymous browser's token
    response = client.post(f"/instruments/{seq}/book",
                           data={"csrf_token": csrf_of(page.text), **booking_form(next_grid_day(3))},
                           follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next=%2Finstruments%2F{seq}"
    assert count_bookings(world) == 0


def test_posts_without_a_csrf_token_are_refused(client: TestClient, world: World) -> None:
    start = next_grid_day(days=3, hour=2)
    with world.db.unit_of_work() as s:
        made = booking.reserve_slot(s, world.actors["alice"], world.instruments["CONF"], start,
                                    start + timedelta(hours=1))
        booking_id = made.id
    sign_in(client, "alice")
    conf = world.instruments["CONF"]
    later = booking_form(start + timedelta(hours=3))
    for token in ({}, {"csrf_token": "forged"}):
        refused = client.post(f"/instruments/{conf}/book", data={**token, **later})
        assert refused.status_code == 403
        assert "表单已过期" in refused.text
        assert client.post(f"/bookings/{booking_id}/cancel", data=token).status_code == 403
        assert client.post("/logout", data=token).status_code == 403
    assert count_bookings(world) == 1
    assert count_bookings(world, BookingStatus.confirmed) == 1
    assert "Alice" in client.get("/").text  # still signed in


def test_csrf_token_of_another_browser_is_refused(client: TestClient, world: World) -> None:
    other = TestClient(client.app)
    foreign_token = csrf_of(other.get("/login").text)
    sign_in(client, "alice")
    response = client.post(f"/instruments/{world.instruments['CONF']}/book",
                           data={"csrf_token": foreign_token, **booking_form(next_grid_day(3))})
    assert response.status_code == 403
    assert count_bookings(world) == 0


def test_hostile_purpose_is_escaped(client: TestClient, world: World) -> None:
    hostile = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    sign_in(client, "alice")
    start = next_grid_day(days=3, hour=2)
    assert post_booking(client, world.instruments["CONF"], booking_form(start, purpose=hostile),
                        follow_redirects=False).status_code == 303
    mine = client.get("/bookings").text
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in mine
    assert "<script>alert" not in mine and "<img src=x" not in mine
    # Re-rendered with a problem, the form keeps the text, escaped too.
    again = post_booking(client, world.instruments["CONF"], booking_form(start, purpose=hostile))
    assert again.status_code == 409
    assert "&lt;script&gt;" in again.text and "<script>alert" not in again.text


def test_someone_elses_booking_cannot_be_cancelled(client: TestClient, world: World) -> None:
    start = next_grid_day(days=3, hour=2)
    with world.db.unit_of_work() as s:
        booking_id = booking.reserve_slot(s, world.actors["alice"], world.instruments["CONF"], start,
                                          start + timedelta(hours=1)).id
    sign_in(client, "bob")
    page = client.get("/bookings")
    response = client.post(f"/bookings/{booking_id}/cancel", data={"csrf_token": csrf_of(page.text)})
    assert response.status_code == 404
    assert count_bookings(world, BookingStatus.confirmed) == 1


def test_my_bookings_lists_upcoming_then_past(client: TestClient, world: World) -> None:
    conf = world.instruments["CONF"]
    soon, later = next_grid_day(days=2, hour=2), next_grid_day(days=5, hour=2)
    past_start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=2)
    with world.db.unit_of_work() as s:
        for start in (later, soon):
            booking.reserve_slot(s, world.actors["alice"], conf, start, start + timedelta(hours=1))
        booking.reserve_slot(s, world.actors["alice"], conf, past_start, past_start + timedelta(hours=1),
                             now=past_start - timedelta(days=1))
    sign_in(client, "alice")
    html = client.get("/bookings?lang=en").text
    upcoming, past = html.split('id="past-title"')
    times = re.findall(r'<time datetime="([^"]+)">', upcoming)[::2]
    assert [datetime.fromisoformat(t) for t in times] == [soon, later]
    assert upcoming.count("Cancel booking") == 2
    assert past_start.astimezone(SHANGHAI).strftime("%Y-%m-%d %H:%M") in past
    assert "Cancel booking" not in past
