"""The annual evaluation report of an institution: the year it covers, its indicators and tables from known
bookings, its charts, and a PDF that opens and says the same."""

from __future__ import annotations

import io
import re
from datetime import date

import pytest
from pypdf import PdfReader

from labcommons.actor import Grant
from labcommons.booking.models import Booking
from labcommons.errors import InvalidInput
from labcommons.reporting import aggregate, report, service
from labcommons.reporting.service import Scope
from tests.factories import World
from tests.reporting.conftest import TODAY, actor, local

PLATFORM = actor(Grant(role="platform_admin"))


def _book(world: World) -> None:
    """Three past use bookings at CQ-LAB in May 2025 (local times), none checked in, so booked = effective:
    alice (CQ-LAB itself) 2 h and carol (Sichuan) 3 h on the confocal, bob (another CQ institution) 4 h on the
    sequencer."""
    with world.db.unit_of_work() as s:
        for instrument, user, day, start, hours in (("CONF", "alice", 5, 9, 2), ("CONF", "carol", 6, 10, 3),
                                                   ("SEQ", "bob", 7, 8, 4)):
            starts = local(date(2025, 5, day), start)
            s.add(Booking(instrument_id=world.instruments[instrument], user_id=world.actors[user].user_id,
                          starts_at=starts, ends_at=local(date(2025, 5, day), start + hours),
                          created_at=local(date(2025, 5, 1), 9)))
    aggregate.ensure_current(world.db)


def _scope(world: World, code: str = "CQ-LAB") -> Scope:
    with world.db.session() as s:
        return service.resolve_scope(s, PLATFORM, f"institution:{world.institutions[code]}")


def test_the_report_covers_the_calendar_year_or_the_year_so_far() -> None:
    assert report.report_period(2025, TODAY) == service.Period(date(2025, 1, 1), date(2025, 12, 31))
    assert report.report_period(TODAY.year, TODAY) == service.Period(date(TODAY.year, 1, 1), TODAY)
    with pytest.raises(InvalidInput) as later:
        report.report_period(TODAY.year + 1, TODAY)
    assert later.value.field == "year"
    with pytest.raises(InvalidInput) as ancient:
        report.report_period(1999, TODAY)
    assert ancient.value.field == "year"


def test_only_institutions_get_a_report(world: World) -> None:
    with world.db.session() as s:
        region = service.resolve_scope(s, PLATFORM, "region:CQ")
        with pytest.raises(InvalidInput):
            report.report_context(s, region, 2025, TODAY, "en")


def test_indicators_tables_and_charts_follow_the_bookings(world: World) -> None:
    _book(world)
    with world.db.session() as s:
        context = report.report_context(s, _scope(world), 2025, TODAY, "en")
    values = {i.key: i.value for i in context["indicators"]}
    assert values["effective_hours"] == "9.0 h"
    assert values["external_hours"] == "7.0 h (77.8 %)"  # bob and carol are from other institutions
    assert values["other_region_hours"] == "3.0 h (33.3 %)"  # carol is from Sichuan
    assert values["booked_hours"] == "9.0 h"
    assert (values["users"], values["institutions"]) == ("3", "3")
    instruments = context["instrument_rows"]
    assert [(r.rank, r.code, r.effective) for r in instruments[:2]] == [(1, "CQ-CONF", "5.0"), (2, "CQ-SEQ", "4.0")]
    assert [(r.code, r.external, r.other_region) for r in instruments[:2]] == [("CQ-CONF", "3.0", "3.0"),
                                                                              ("CQ-SEQ", "4.0", "0.0")]
    assert [(r.code, r.effective, r.instruments) for r in context["facility_rows"]] == [("CQ-LAB-F", "9.0", 5)]
    assert not context["partial_year"]
    charts = context["charts"]
    assert 'data-weekday="0" data-hour="9" data-minutes="60"' in charts["heatmap"]  # alice, Monday 09:00-11:00
    assert 'data-weekday="2" data-hour="11" data-minutes="60"' in charts["heatmap"]  # bob, Wednesday 08:00-12:00
    assert 'data-weekday="2" data-hour="12" data-minutes="0"' in charts["heatmap"]
    assert "Confocal microscope" in charts["top"]


def test_the_html_has_the_charts_and_the_pdf_opens(world: World) -> None:
    _book(world)
    scope = _scope(world)
    with world.db.session() as s:
        html = report.annual_report_html(s, scope, 2025, TODAY, "zh_CN")
        pdf = report.annual_report_pdf(s, scope, 2025, TODAY, "zh_CN")
    assert len(re.findall(r"<svg\b", html)) == 6
    assert "激光共聚焦显微镜" in html and "周一" in html  # names and weekdays in the report's language
    reader = PdfReader(io.BytesIO(pdf))
    assert len(reader.pages) >= 3
    text = "\n".join(page.extract_text() for page in reader.pages)
    assert "CQ-LAB Laboratory" in text and "2025" in text
    assert "9.0 h" in text and "77.8 %" in text
    assert "CQ-CONF" in text and "CQ-SEQ" in text
    # The charts are drawn as vector paths and rectangles, not only text: the heat-map alone has 168 cells.
    drawing = sum(len(re.findall(rb"\bre\b", page.get_contents().get_data()))  # type: ignore[union-attr]
                  for page in reader.pages)
    assert drawing > 168


def test_an_empty_year_still_makes_a_report(world: World) -> None:
    scope = _scope(world, "SC-UNI")
    with world.db.session() as s:
        context = report.report_context(s, scope, 2024, TODAY, "en")
        pdf = report.annual_report_pdf(s, scope, 2024, TODAY, "en")
    assert {i.key: i.value for i in context["indicators"]}["effective_hours"] == "0.0 h"
    assert "chart-empty" in context["charts"]["heatmap"] and "chart-empty" in context["charts"]["top"]
    assert PdfReader(io.BytesIO(pdf)).pages
