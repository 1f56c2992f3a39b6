"""The demo catalogue shipped in data/demo.json, plus generated bookings in the coming weeks."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from labcommons.booking.models import Booking, BookingStatus
from labcommons.catalog.models import (
    Facility,
    Institution,
    InstitutionKind,
    Instrument,
    InstrumentStatus,
    OpenTo,
    PriceUnit,
    Region,
    Service,
    ServiceKind,
)
from labcommons.catalog.service import place_instrument, place_service, replace_accreditations, replace_instruments
from labcommons.db import utcnow
from labcommons.identity import roles
from labcommons.identity import service as identity
from labcommons.identity.models import User

DEMO_ZONE = ZoneInfo("Asia/Shanghai")


@dataclass
class DemoSeed:
    instruments: int = 0
    services: int = 0
    bookings: int = 0
    users: list[tuple[str, str, str]] = field(default_factory=list)  # (email, password, token)
    roles: list[tuple[str, str, str]] = field(default_factory=list)  # (email, role, scope code or "platform")


def demo_data() -> dict[str, Any]:
    """The packaged demo catalogue."""
    data: dict[str, Any] = json.loads(
        resources.files("labcommons.catalog").joinpath("data/demo.json").read_text("utf-8")
    )
    return data


def is_seeded(session: Session) -> bool:
    return bool(session.scalar(select(func.count()).select_from(Region)))


def seed_demo(session: Session, *, bookings: int = 300, now: datetime | None = None, rng_seed: int = 7) -> DemoSeed:
    """Load the demo catalogue and users into an empty database and book `bookings` slots ahead."""
    data = demo_data()
    result = DemoSeed()
    for r in data["regions"]:
        session.add(Region(code=r["code"], name_zh=r["name_zh"], name_en=r["name_en"]))
    session.flush()
    institutions: dict[str, Institution] = {}
    for i in data["institutions"]:
        institutions[i["code"]] = Institution(
            code=i["code"], region_code=i["region"], kind=InstitutionKind(i["kind"]), name_zh=i["name_zh"],
            name_en=i["name_en"],
        )
    session.add_all(institutions.values())
    session.flush()
    facilities: dict[str, Facility] = {}
    for f in data["facilities"]:
        facilities[f["code"]] = Facility(
            code=f["code"], institution_id=institutions[f["institution"]].id, name_zh=f["name_zh"],
            name_en=f["name_en"], description_zh=f.get("description_zh", ""),
            description_en=f.get("description_en", ""),
        )
    session.add_all(facilities.values())
    session.flush()
    instruments: list[Instrument] = []
    for d in data["instruments"]:
        instrument = Instrument(
            code=d["code"], facility_id=facilities[d["facility"]].id, name_zh=d["name_zh"],
            name_en=d["name_en"], description_zh=d["description_zh"], description_en=d["description_en"],
            manufacturer=d["manufacturer"], model=d["model"], category_code=d["category"],
            location_zh=d.get("location_zh", ""), location_en=d.get("location_en", ""),
            status=InstrumentStatus(d["status"]), slot_minutes=d["slot_minutes"],
            min_booking_minutes=d["min_booking_minutes"], max_booking_minutes=d["max_booking_minutes"],
            open_to=OpenTo(d["open_to"]),
        )
        place_instrument(session, instrument)
        session.add(instrument)
        instruments.append(instrument)
    session.flush()
    result.instruments = len(instruments)
    instrument_ids = {i.code: i.id for i in instruments}
    for s in data["services"]:
        svc = Service(
            code=s["code"], facility_id=facilities[s["facility"]].id, kind=ServiceKind(s["kind"]),
            name_zh=s["name_zh"], name_en=s["name_en"], description_zh=s["description_zh"],
            description_en=s["description_en"], category_code=s["category"],
            turnaround_days=s.get("turnaround_days"), list_price_fen=s.get("list_price_fen"),
            price_unit=PriceUnit(s.get("price_unit", "sample")),
            sample_requirements_zh=s.get("sample_requirements_zh", ""),
            sample_requirements_en=s.get("sample_requirements_en", ""), is_active=s.get("is_active", True),
        )
        place_service(session, svc, schemes=[])
        session.add(svc)
        session.flush()
        replace_accreditations(session, svc, s.get("accreditations", []))
        replace_instruments(session, svc, [instrument_ids[code] for code in s.get("instruments", [])])
        result.services += 1
    users: list[User] = []
    for u in data["users"]:
        user = identity.create_user(
            session, email=u["email"], name=u["name"], institution_code=u["institution"], password=u["password"]
        )
        token = identity.rotate_api_token(session, user, name="demo")
        users.append(user)
        result.users.append((user.email, u["password"], token))
        for g in u.get("roles", []):
            scope = roles.resolve_scope(session, facility=g.get("facility"), institution=g.get("institution"),
                                        region=g.get("region"))
            roles.grant_role(session, None, user, g["role"], facility_id=scope.facility_id,
                             institution_id=scope.institution_id, region_code=scope.region_code)
            code = g.get("facility") or g.get("institution") or g.get("region") or "platform"
            result.roles.append((user.email, g["role"], code))
    result.bookings = _book_ahead(session, instruments, users, institutions, bookings, now or utcnow(), rng_seed)
    session.flush()
    return result


def _book_ahead(
    session: Session,
    instruments: list[Instrument],
    users: list[User],
    institutions: dict[str, Institution],
    wanted: int,
    now: datetime,
    rng_seed: int,
) -> int:
    """Confirmed bookings over the next four weeks in working hours (Beijing time), none overlapping."""
    rng = random.Random(rng_seed)
    bookable = [i for i in instruments if i.status == InstrumentStatus.active]
    taken: dict[int, list[tuple[datetime, datetime]]] = {}
    today = now.astimezone(DEMO_ZONE).replace(hour=0, minute=0, second=0, microsecond=0)
    made = attempts = 0
    while made < wanted and attempts < wanted * 20:
        attempts += 1
        instrument = rng.choice(bookable)
        candidates = [
            u for u in users
            if instrument.open_to == OpenTo.everyone
            or (instrument.open_to == OpenTo.region and u.region_code == instrument.region_code)
            or u.institution_id == instrument.institution_id
        ]
        if not candidates:
            continue
        day = today + timedelta(days=rng.randint(1, 28))
        slot = instrument.slot_minutes
        length = min(instrument.max_booking_minutes,
                     max(instrument.min_booking_minutes, slot * rng.randint(1, max(1, 240 // slot))))
        start_minute = rng.randrange(8 * 60, 18 * 60, slot) if slot <= 600 else 0
        starts_at = day + timedelta(minutes=start_minute - start_minute % slot)
        ends_at = starts_at + timedelta(minutes=length)
        spans = taken.setdefault(instrument.id, [])
        if any(s < ends_at and starts_at < e for s, e in spans):
            continue
        spans.append((starts_at, ends_at))
        session.add(
            Booking(
                instrument_id=instrument.id, user_id=rng.choice(candidates).id,
                starts_at=starts_at.astimezone(ZoneInfo("UTC")), ends_at=ends_at.astimezone(ZoneInfo("UTC")),
                status=BookingStatus.confirmed, purpose=rng.choice(_PURPOSES),
            )
        )
        made += 1
    return made


_PURPOSES = [
    "小鼠脑切片空间转录组", "Tumour microenvironment imaging", "全基因组重测序 30X", "Cryo-EM grid screening",
    "类器官活细胞成像", "Metabolomics of plasma samples", "单细胞文库质检", "Batch flow sorting of T cells",
    "斑马鱼胚胎光片成像", "Protein structure refinement (HPC)", "", "",
]
