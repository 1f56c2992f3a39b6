"""Demo experts (data/experts.json) and providers subscribed to demands, for `seed-demo`."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.catalog.models import Facility, Institution, Service
from labcommons.matching.models import Availability, DemandSubscription, Expert


def expert_data() -> list[dict[str, Any]]:
    """The packaged demo expert directory."""
    data: list[dict[str, Any]] = json.loads(
        resources.files("labcommons.matching").joinpath("data/experts.json").read_text("utf-8")
    )
    return data


def seed_experts(session: Session) -> int:
    """Add the demo experts (linked to their institutions, facilities and consultation services)."""
    institutions = {i.code: i for i in session.scalars(select(Institution))}
    facilities = {f.code: f for f in session.scalars(select(Facility))}
    services = {s.code: s for s in session.scalars(select(Service))}
    count = 0
    for entry in expert_data():
        institution = institutions[entry["institution"]]
        facility = facilities.get(entry.get("facility") or "")
        service = services.get(entry.get("consultation_service") or "")
        session.add(Expert(
            code=entry["code"], institution_id=institution.id, facility_id=facility.id if facility else None,
            region_code=institution.region_code, name_zh=entry["name_zh"], name_en=entry["name_en"],
            title_zh=entry.get("title_zh", ""), title_en=entry.get("title_en", ""), bio_zh=entry.get("bio_zh", ""),
            bio_en=entry.get("bio_en", ""), fields=list(entry.get("fields", [])),
            skills_zh=list(entry.get("skills_zh", [])), skills_en=list(entry.get("skills_en", [])),
            languages=list(entry.get("languages", [])),
            availability=Availability(entry.get("availability", "available")),
            consultation_service_id=service.id if service else None,
        ))
        count += 1
    session.flush()
    return count


def seed_subscriptions(session: Session, facility_codes: tuple[str, ...] = ("CQ-LAKE-STO", "SC-SHU-ATC")) -> int:
    """Two demo facilities listen for matching demands."""
    count = 0
    for facility in session.scalars(select(Facility).where(Facility.code.in_(facility_codes))):
        session.add(DemandSubscription(facility_id=facility.id, active=True, min_score=0.3, notify_email=False))
        count += 1
    session.flush()
    return count
