"""The statistics pages on both databases: each role's dashboard shows its scope with the figures of a small
hand-computed set of bookings (tests/reporting/test_api.py builds it); the gate (anonymous, plain users, scopes
outside one's rights); 422 naming the field; CSV and XLSX downloads equal to the page and the API; both languages;
the annual report PDF."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from openpyxl import load_workbook
from pypdf import PdfReader

from labcommons.app import create_app
from labcommons.billing.exports import yuan_text
from labcommons.reporting.charts import hours_text, percent_text
from labcommons.reporting.exports import hours
from tests.factories import World
from tests.reporting.test_api import FACILITY, PLATFORM, REGION_CQ, REGION_SC, Stats, build_stats
from tests.web.conftest import sign_in


@pytest.fixture
def stats(world: World) -> Stats:
    return build_stats(world)


@pytest.fixture
def client(stats: Stats) -> Iterator[TestClient]:
    with TestClient(create_app(db=stats.world.db)) as test_client:
        yield test_client


def page(client: TestClient, stats: Stats, user: str | None, scope: str | None = None, status: int = 200,
         lang: str = "en", **extra: str) -> str:
    if user:
        sign_in(client, user)
    params: dict[str, Any] = {"from": stats.first.isoformat(), "to": stats.last.isoformat(), "lang": lang, **extra}
    if scope:
        params["scope"] = scope
    response = client.get("/stats", params=params, follow_redirects=False)
    assert response.status_code == status, response.text[:2000]
    return response.text


def cards(html: str) -> dict[str, str]:
    """The key-figure cards of a dashboard page: key → value as shown."""
    return dict(re.findall(r'data-key="([a-z_]+)"><dt>[^<]*</dt><dd><span class="value">([^<]*)</span>', html))


def shown_scope(html: str) -> str:
    match = re.search(r'id="stats-heading" data-scope="([^"]+)"', html)
    assert match, "the page shows no dashboard"
    return match.group(1)


def expected_cards(t: dict[str, Any]) -> dict[str, str]:
    return {
        "effective_hours": f"{hours_text(t['effective_min'])} h", "utilisation": percent_text(t["utilisation"]),
        "external_share": percent_text(t["external_share"]), "other_region_share": percent_text(t["ext_region_share"]),
        "users": str(t["users"]), "institutions": str(t["institutions"]),
        "no_show_rate": percent_text(t["no_show_rate"]), "median_wait": f"{t['median_lead_hours']:.1f} h",
        "orders": str(t["orders"]), "revenue": f"¥{yuan_text(t['revenue_fen'])}", "rating": "—",
    }


def tokens(stats: Stats) -> dict[str, str]:
    w = stats.world
    return {"lab_f": f"facility:{w.facilities['CQ-LAB']}", "lab": f"institution:{w.institutions['CQ-LAB']}",
            "uni": f"institution:{w.institutions['CQ-UNI']}", "uni_f": f"facility:{w.facilities['CQ-UNI']}",
            "sc": f"institution:{w.institutions['SC-UNI']}"}


# --- each role's dashboard --------------------------------------------------------------------------------------

ROLE_CASES = [
    ("dave", "lab_f", FACILITY),  # facility manager
    ("hank", "lab_f", FACILITY),  # facility staff
    ("erin", "lab", FACILITY),  # institution admin: CQ-LAB has the one facility, so the same figures
    ("frank", "region:CQ", REGION_CQ),  # region authority
    ("sam", "region:SC", REGION_SC),
    ("grace", "platform", PLATFORM),  # platform admin
]


def test_each_role_sees_its_widest_scope_with_the_right_figures(client: TestClient, stats: Stats) -> None:
    for user, scope, figures in ROLE_CASES:
        html = page(client, stats, user)
        assert shown_scope(html) == tokens(stats).get(scope, scope), user
        assert cards(html) == expected_cards(figures), user
        assert html.count("<svg") == 6 and 'class="chart chart-hours"' in html
        assert f'{hours_text(figures["booked_min"])} of {hours_text(figures["available_min"])} h available' in html
        assert 'href="/stats"' in html  # the layout links the statistics for every statistics role


def test_the_page_equals_the_api(client: TestClient, stats: Stats) -> None:
    body = client.get("/api/v1/stats/dashboard", params=stats.params("region:CQ"),
                      headers=stats.headers("frank")).json()
    html = page(client, stats, "frank", "region:CQ")
    assert cards(html) == expected_cards(body["totals"])
    rows = dict(re.findall(r'<tr data-key="(\d+)">.*?data-col="effective">([^<]+)<', html, re.S))
    assert rows == {b["key"]: hours_text(b["effective_min"]) for b in body["breakdown"]}
    assert len(rows) == 2  # CQ-LAB and CQ-UNI


def test_a_facility_page_lists_its_instruments(client: TestClient, stats: Stats) -> None:
    html = page(client, stats, "dave")
    table = html[html.index('id="table-instruments"'):]
    table = table[:table.index("</table>")]
    shown = dict(re.findall(r'<tr data-instrument="(\d+)">.*?data-col="effective">([^<]+)<', table, re.S))
    ins = stats.world.instruments
    assert shown == {str(ins[k]): v for k, v in
                     {"CONF": "3.0", "SEQ": "2.0", "SPATIAL": "0.0", "EM": "0.0", "LOCAL": "0.0"}.items()}
    assert "3 of 5 instruments had no booked time in this period." in html


# --- who may see what -------------------------------------------------------------------------------------------


def test_anonymous_is_sent_to_sign_in_and_plain_users_are_refused(client: TestClient, stats: Stats) -> None:
    for path in ("/stats", "/stats/export.xlsx", "/stats/tables/totals.csv",
                 f"/stats/reports/{stats.world.institutions['CQ-LAB']}/2025.pdf"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"].startswith("/login"), path
    sign_in(client, "alice")
    for path in ("/stats", "/stats?from=garbage", "/stats/export.xlsx", "/stats/tables/nope.csv",
                 f"/stats/reports/{stats.world.institutions['CQ-LAB']}/2025.pdf"):
        assert client.get(path).status_code == 403, path
    assert 'href="/stats"' not in client.get("/account").text


SCOPE_CASES = [
    ("dave", "region:CQ", 403), ("dave", "lab", 403), ("dave", "uni_f", 403), ("erin", "uni", 403),
    ("erin", "region:CQ", 403), ("frank", "sc", 403), ("frank", "region:SC", 403), ("frank", "platform", 403),
    ("sam", "lab", 403), ("frank", "region:XX", 404), ("frank", "institution:9999", 404),
    ("frank", "lab", 200), ("frank", "uni_f", 200), ("erin", "lab_f", 200), ("grace", "sc", 200),
]


def test_scopes_outside_ones_rights_are_refused(client: TestClient, stats: Stats) -> None:
    for user, scope, status in SCOPE_CASES:
        token = tokens(stats).get(scope, scope)
        html = page(client, stats, user, token, status=status)
        if status == 200:
            assert shown_scope(html) == token
        for path in ("/stats/export.xlsx", "/stats/tables/totals.csv"):
            params = {"scope": token, "from": stats.first.isoformat(), "to": stats.last.isoformat()}
            assert client.get(path, params=params).status_code == status, (user, scope, path)


def test_breakdown_rows_link_to_the_child_scopes_one_may_open(client: TestClient, stats: Stats) -> None:
    t = tokens(stats)
    period = f"from={stats.first.isoformat()}&amp;to={stats.last.isoformat()}"
    html = page(client, stats, "grace")
    assert f'href="/stats?scope=region%3ACQ&amp;{period}"' in html
    assert f'href="/stats?scope=region%3ASC&amp;{period}"' in html
    html = page(client, stats, "frank")  # the region authority drills into its institutions
    for key in ("lab", "uni"):
        assert f'href="/stats?scope={t[key].replace(":", "%3A")}&amp;{period}"' in html
    html = page(client, stats, "frank", t["lab"])
    assert f'href="/stats?scope={t["lab_f"].replace(":", "%3A")}&amp;{period}"' in html
    assert f'<option value="{t["lab"]}" selected>' in html  # the drilled-into scope is in the picker
    erin = page(client, stats, "erin")
    assert f'href="/stats?scope={t["lab_f"].replace(":", "%3A")}' in erin


# --- bad parameters ---------------------------------------------------------------------------------------------


BAD_PARAMETERS = [
    ({"from": "2025-02-30"}, "from"), ({"from": "yesterday"}, "from"), ({"to": "2025-13-01"}, "to"),
    ({"from": "2025-06-02", "to": "2025-06-01"}, "to"), ({"from": "2020-01-01", "to": "2025-01-01"}, "to"),
    ({"scope": "everything"}, "scope"), ({"scope": "institution:abc"}, "scope"),
]


def test_bad_parameters_are_422_naming_the_field(client: TestClient, stats: Stats) -> None:
    sign_in(client, "frank")
    for params, field in BAD_PARAMETERS:
        response = client.get("/stats", params={"lang": "en", **params})
        assert response.status_code == 422, params
        assert f'class="form-error" role="alert" data-field="{field}"' in response.text
        label = {"from": "From", "to": "To", "scope": "Scope"}[field]
        assert f'data-field="{field}">{label}: ' in response.text
        assert '<form class="stats-form"' in response.text  # the form is there to correct it
        for path in ("/stats/export.xlsx", "/stats/tables/totals.csv"):
            bad = client.get(path, params={"lang": "en", **params})
            assert bad.status_code == 422 and f"{label}: " in bad.text, (path, params)
        zh = client.get("/stats", params={"lang": "zh_CN", **params})
        error = re.search(r'class="form-error"[^>]*>([^<]+)<', zh.text)
        assert zh.status_code == 422 and error, params
        english = re.search(r'class="form-error"[^>]*>([^<]+)<', response.text)
        assert english and english.group(1) != error.group(1) and re.search(r"[\u4e00-\u9fff]", error.group(1))


def test_an_unknown_table_is_404(client: TestClient, stats: Stats) -> None:
    sign_in(client, "frank")
    assert client.get("/stats/tables/secrets.csv").status_code == 404


# --- downloads --------------------------------------------------------------------------------------------------


def test_xlsx_and_csv_equal_the_page(client: TestClient, stats: Stats) -> None:
    html = page(client, stats, "frank")
    assert '<a href="/stats/export.xlsx?scope=region%3ACQ&amp;from=' in html
    query = {"scope": "region:CQ", "from": stats.first.isoformat(), "to": stats.last.isoformat()}
    response = client.get("/stats/export.xlsx", params=query)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/vnd.openxmlformats")
    assert response.headers["content-disposition"] == (
        f'attachment; filename="labcommons-stats-region-CQ-{stats.first.isoformat()}-{stats.last.isoformat()}.xlsx"')
    book = load_workbook(io.BytesIO(response.content))
    totals = {row[0]: row[2] for row in book["totals"].iter_rows(min_row=4, values_only=True)}
    assert totals["booked_hours"] == pytest.approx(float(hours(REGION_CQ["booked_min"])))
    assert totals["effective_hours"] == pytest.approx(float(hours(REGION_CQ["effective_min"])))
    assert totals["users"] == REGION_CQ["users"] and totals["revenue_fen"] == REGION_CQ["revenue_fen"]
    page_rows = dict(re.findall(r'<tr data-key="(\d+)">.*?data-col="effective">([^<]+)<', html, re.S))
    sheet_rows = {str(r[1]): hours_text(round(float(r[6]) * 60))
                  for r in book["breakdown"].iter_rows(min_row=4, values_only=True)}
    assert sheet_rows == page_rows

    csv_response = client.get("/stats/tables/breakdown.csv", params=query)
    assert csv_response.status_code == 200 and csv_response.headers["content-type"].startswith("text/csv")
    assert csv_response.headers["content-disposition"].endswith('-breakdown.csv"')
    rows = list(csv.reader(io.StringIO(csv_response.content.decode("utf-8-sig"))))
    assert {r[1]: hours_text(round(float(r[6]) * 60)) for r in rows[1:]} == page_rows
    flows = list(csv.reader(io.StringIO(client.get("/stats/tables/flows.csv", params=query).text.lstrip("\ufeff"))))
    assert {(r[0], r[1]) for r in flows[1:]} >= {("CQ", "CQ"), ("CQ", "SC")}


# --- languages --------------------------------------------------------------------------------------------------


def test_the_page_in_chinese_and_in_english(client: TestClient, stats: Stats) -> None:
    zh = page(client, stats, "frank", lang="zh_CN")
    assert "开放共享统计" in zh and "有效机时" in zh and "周一" in zh and ">统计</a>" in zh
    assert "重庆" in zh
    en = page(client, stats, "frank", lang="en")
    assert "Open-sharing statistics" in en and "Effective machine hours" in en and ">Mon<" in en
    assert "Chongqing" in en and "开放共享统计" not in en
    assert cards(zh)["users"] == cards(en)["users"] == str(REGION_CQ["users"])


def test_htmx_gets_the_dashboard_body_alone(client: TestClient, stats: Stats) -> None:
    sign_in(client, "frank")
    response = client.get("/stats", params={"scope": tokens(stats)["lab"], "lang": "en"},
                          headers={"HX-Request": "true"})
    assert response.status_code == 200
    assert response.text.startswith('<div id="stats-body">') and "<html" not in response.text
    assert shown_scope(response.text) == tokens(stats)["lab"]


def test_quick_period_links(client: TestClient, stats: Stats) -> None:
    html = page(client, stats, "frank")
    links = re.findall(r'<a href="(/stats\?[^"]+)"(?: aria-current="true")?>(This year|Last year|Last 30 days|'
                       r'This month)</a>', html)
    assert [label for _href, label in links] == ["This year", "Last year", "Last 30 days", "This month"]
    today = stats.last.toordinal() + 1
    last_30 = next(href for href, label in links if label == "Last 30 days")
    from datetime import date

    assert f"from={date.fromordinal(today - 29).isoformat()}" in last_30
    assert f"to={date.fromordinal(today).isoformat()}" in last_30


# --- the annual report ------------------------------------------------------------------------------------------


def test_the_annual_report_pdf(client: TestClient, stats: Stats) -> None:
    lab = stats.world.institutions["CQ-LAB"]
    year = stats.day.year
    sign_in(client, "erin")
    html = client.get("/stats", params={"lang": "en"}).text
    assert f'href="/stats/reports/{lab}/{year}.pdf"' in html
    response = client.get(f"/stats/reports/{lab}/{year}.pdf")
    assert response.status_code == 200 and response.headers["content-type"] == "application/pdf"
    assert f'filename="labcommons-report-institution-{lab}-{year}.pdf"' in response.headers["content-disposition"]
    reader = PdfReader(io.BytesIO(response.content))
    assert len(reader.pages) >= 3
    text = "\n".join(p.extract_text() for p in reader.pages)
    assert "CQ-LAB Laboratory" in text and "CQ-CONF" in text
    assert f"{hours_text(FACILITY['effective_min'])} h" in text  # the year's effective hours (this week's)
    assert client.get(f"/stats/reports/{lab}/1999.pdf").status_code == 422
    assert client.get(f"/stats/reports/{lab}/{year + 1}.pdf").status_code == 422
    assert client.get(f"/stats/reports/{stats.world.institutions['CQ-UNI']}/{year}.pdf").status_code == 403
    sign_in(client, "frank")  # the region authority of CQ
    assert client.get(f"/stats/reports/{lab}/{year}.pdf").status_code == 200
    for user in ("sam", "dave"):
        sign_in(client, user)
        assert client.get(f"/stats/reports/{lab}/{year}.pdf").status_code == 403, user
