"""Small builders of catalogue rows, users and tokens for tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from labcommons.actor import Actor
from labcommons.catalog.models import (
    Facility,
    Institution,
    InstitutionKind,
    Instrument,
    InstrumentStatus,
    OpenTo,
    Region,
)
from labcommons.catalog.service import place_instrument
from labcommons.db import Database
from labcommons.identity import roles
from labcommons.identity import service as identity


def next_grid_day(days: int = 2, hour: int = 2) -> datetime:
    """A whole hour `days` ahead, in UTC, for bookings that must lie in the future."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    return now.replace(hour=hour) + timedelta(days=days)


@dataclass
class World:
    """A small two-region catalogue: ids of what the tests need."""

    db: Database
    institutions: dict[str, int] = field(default_factory=dict)
    facilities: dict[str, int] = field(default_factory=dict)
    instruments: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    actors: dict[str, Actor] = field(default_factory=dict)

    def headers(self, user: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[user]}", **extra}


def actor_of(world: World, name: str) -> Actor:
    """A user as an actor with the grants they hold now."""
    with world.db.unit_of_work(write=False) as s:
        user = identity.find_user(s, f"{name}@example.org")
        return identity.actor_for(user, grants=roles.grants_of(s, user.id))


def grant(world: World, name: str, role: str = "facility_staff", facility: str = "CQ-LAB") -> Actor:
    """`name` given `role` over `facility` (once, however often asked), as an Actor carrying the grants."""
    with world.db.unit_of_work() as s:
        user = identity.find_user(s, f"{name}@example.org")
        held = {(g.role, g.facility_id) for g in roles.grants_of(s, user.id)}
        if (role, world.facilities[facility]) not in held:
            roles.grant_role(s, None, user, role, facility_id=world.facilities[facility])
    return actor_of(world, name)


def add_instrument(session: Session, facility_id: int, code: str, **fields: Any) -> Instrument:
    values: dict[str, Any] = dict(
        name_zh=f"仪器 {code}", name_en=f"Instrument {code}", description_zh="", description_en="",
        manufacturer="", model="", category_code="MIC.CONF", status=InstrumentStatus.active, slot_minutes=30,
        min_booking_minutes=30, max_booking_minutes=480, open_to=OpenTo.everyone,
    )
    values.update(fields)
    instrument = Instrument(code=code, facility_id=facility_id, **values)
    place_instrument(session, instrument)
    session.add(instrument)
    session.flush()
    return instrument


def build_world(db: Database) -> World:
    """Regions CQ and SC, one lab in each, a few instruments and three users with tokens."""
    world = World(db=db)
    with db.unit_of_work() as s:
        s.add_all([Region(code="CQ", name_zh="重庆", name_en="Chongqing"),
                   Region(code="SC", name_zh="四川", name_en="Sichuan")])
        s.flush()
        for code, region in (("CQ-LAB", "CQ"), ("CQ-UNI", "CQ"), ("SC-UNI", "SC")):
            inst = Institution(code=code, region_code=region, kind=InstitutionKind.laboratory,
                               name_zh=f"{code} 实验室", name_en=f"{code} Laboratory")
            s.add(inst)
            s.flush()
            world.institutions[code] = inst.id
            fac = Facility(code=f"{code}-F", institution_id=inst.id, name_zh=f"{code} 平台",
                           name_en=f"{code} Core", description_zh="", description_en="")
            s.add(fac)
            s.flush()
            world.facilities[code] = fac.id
        specs = {
            "CONF": dict(name_zh="激光共聚焦显微镜", name_en="Confocal microscope", category_code="MIC.CONF",
                         manufacturer="Zeiss", model="LSM 980"),
            "SEQ": dict(name_zh="高通量基因测序仪", name_en="High-throughput sequencer", category_code="GEN.SEQ",
                        manufacturer="Illumina", model="NovaSeq 6000", slot_minutes=60, min_booking_minutes=120),
            "SPATIAL": dict(name_zh="时空组学平台", name_en="Spatial omics platform", category_code="GEN.SPATIAL"),
            "EM": dict(name_zh="冷冻电子显微镜", name_en="Cryo electron microscope", category_code="MIC.EM",
                       status=InstrumentStatus.maintenance),
            "LOCAL": dict(name_zh="院内流式细胞仪", name_en="In-house flow cytometer", category_code="CYT.FLOW",
                          open_to=OpenTo.institution),
        }
        for key, spec in specs.items():
            world.instruments[key] = add_instrument(s, world.facilities["CQ-LAB"], f"CQ-{key}", **spec).id
        world.instruments["SC-MS"] = add_instrument(
            s, world.facilities["SC-UNI"], "SC-MS", name_zh="高分辨质谱仪", name_en="High-resolution mass spectrometer",
            category_code="ANA.MS", open_to=OpenTo.region,
        ).id
        for name, inst in (("alice", "CQ-LAB"), ("bob", "CQ-UNI"), ("carol", "SC-UNI")):
            code = next(c for c, i in world.institutions.items() if c == inst)
            user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code=code,
                                        password="correct horse")
            world.tokens[name] = identity.create_api_token(s, user, name="test")
            s.flush()
    with db.unit_of_work(write=False) as s:
        for name in ("alice", "bob", "carol"):
            world.actors[name] = identity.actor_for(identity.find_user(s, f"{name}@example.org"))
    return world
