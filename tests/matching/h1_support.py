"""A small matching world for the demand, offer and expert tests: the standard test World plus a few services, one
expert, a subscribed facility and its staff.

Who is who: bob (CQ-UNI) posts demands; alice manages CQ-LAB, which subscribes and answers; carol is staff of
SC-UNI, which does not subscribe; dave is nobody in particular (a user of CQ-UNI).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from labcommons.actor import Actor
from labcommons.catalog.models import Facility, Service, ServiceKind
from labcommons.identity import service as identity
from labcommons.matching import demands
from labcommons.matching.models import Availability, Demand, DemandSubscription, Expert
from tests.factories import World, actor_of, grant

SEQ_DEMAND = "需要做高通量基因测序, single-cell RNA sequencing of mouse brain tissue, 20 samples"
SPATIAL_DEMAND = "spatial transcriptomics of embryo sections, need help with study design"
MS_DEMAND = "高分辨质谱 proteomics of serum samples"


@dataclass
class MatchWorld:
    world: World
    services: dict[str, int] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)

    @property
    def db(self) -> Any:
        return self.world.db

    def actor(self, name: str) -> Actor:
        return actor_of(self.world, name)

    def headers(self, name: str, **extra: str) -> dict[str, str]:
        return self.world.headers(name, **extra)


def add_service(world: World, facility: str, code: str, kind: ServiceKind, category: str, name_zh: str,
                name_en: str, description_en: str = "", active: bool = True) -> int:
    with world.db.unit_of_work() as s:
        fac = s.get(Facility, world.facilities[facility])
        assert fac is not None
        svc = Service(code=code, facility_id=fac.id, kind=kind, name_zh=name_zh, name_en=name_en,
                      description_zh="", description_en=description_en, category_code=category,
                      institution_id=fac.institution_id, is_active=active)
        s.add(svc)
        s.flush()
        return svc.id


def add_expert(world: World, code: str, facility: str, *, service_id: int | None = None, user: str | None = None,
               **fields: Any) -> int:
    with world.db.unit_of_work() as s:
        fac = s.get(Facility, world.facilities[facility])
        assert fac is not None
        values: dict[str, Any] = dict(
            name_zh="罗晓岚", name_en="Luo Xiaolan", title_zh="研究员", title_en="Principal Investigator",
            bio_en="Designs spatial transcriptomics studies.", fields=["GEN.SPATIAL"],
            skills_zh=["空间转录组实验设计"], skills_en=["spatial transcriptomics study design"],
            languages=["zh", "en"], availability=Availability.available,
        )
        values.update(fields)
        user_id = identity.find_user(s, f"{user}@example.org").id if user else None
        institution_region = "SC" if facility.startswith("SC") else "CQ"
        expert = Expert(code=code, institution_id=fac.institution_id, facility_id=fac.id,
                        region_code=institution_region, consultation_service_id=service_id, user_id=user_id,
                        **values)
        s.add(expert)
        s.flush()
        return expert.id


def add_user(world: World, name: str, institution: str = "CQ-UNI") -> None:
    with world.db.unit_of_work() as s:
        user = identity.create_user(s, email=f"{name}@example.org", name=name.title(), institution_code=institution,
                                    password="correct horse")
        world.tokens[name] = identity.create_api_token(s, user, name="test")
    world.actors[name] = actor_of(world, name)


def subscribe(world: World, facility: str, *, min_score: float = 0.0, notify_email: bool = False,
              active: bool = True) -> None:
    with world.db.unit_of_work() as s:
        s.add(DemandSubscription(facility_id=world.facilities[facility], active=active, min_score=min_score,
                                 notify_email=notify_email))


def build_match_world(world: World) -> MatchWorld:
    """Services at CQ-LAB (sequencing, a spatial consultation) and SC-UNI (proteomics), an expert of CQ-LAB, alice
    managing CQ-LAB (subscribed, no e-mail), carol staff of SC-UNI (not subscribed), dave a plain user."""
    mw = MatchWorld(world=world)
    mw.services["SEQ"] = add_service(
        world, "CQ-LAB", "CQ-S-SEQ", ServiceKind.testing, "GEN.SEQ", "单细胞转录组测序服务",
        "Single-cell RNA sequencing service", "10x Genomics single-cell RNA-seq library prep and sequencing.")
    mw.services["CONSULT"] = add_service(
        world, "CQ-LAB", "CQ-S-CONSULT", ServiceKind.consultation, "GEN.SPATIAL", "空间转录组实验设计咨询",
        "Spatial transcriptomics study design consultation", "Advice on spatial transcriptomics experiments.")
    mw.services["MS"] = add_service(
        world, "SC-UNI", "SC-S-MS", ServiceKind.testing, "ANA.MS", "蛋白质组质谱检测", "Mass spectrometry proteomics",
        "Label-free proteomics of serum and tissue by high-resolution mass spectrometry.")
    mw.experts["LUO"] = add_expert(world, "EXP-LUO", "CQ-LAB", service_id=mw.services["CONSULT"])
    grant(world, "alice", "facility_manager", "CQ-LAB")
    grant(world, "carol", "facility_staff", "SC-UNI")
    add_user(world, "dave")
    subscribe(world, "CQ-LAB")
    return mw


def post(mw: MatchWorld, text: str = SEQ_DEMAND, user: str = "bob", **kwargs: Any) -> int:
    """A saved demand of `user`; its id."""
    with mw.db.unit_of_work() as s:
        return demands.post_demand(s, mw.actor(user), text=text, **kwargs).id


def demand_status(mw: MatchWorld, demand_id: int) -> str:
    with mw.db.unit_of_work(write=False) as s:
        demand = s.get(Demand, demand_id)
        assert demand is not None
        return demand.status.value


def facility_of_matches(mw: MatchWorld, demand_id: int) -> set[int | None]:
    with mw.db.unit_of_work(write=False) as s:
        view = demands.get_demand(s, mw.actor("bob"), demand_id)
        return {m.facility_id for m in view.matches}


def offer(mw: MatchWorld, demand_id: int, *, user: str = "alice", facility: str = "CQ-LAB",
          service: str = "SEQ", message: str = "We can run it next week.", **kwargs: Any) -> int:
    with mw.db.unit_of_work() as s:
        return demands.make_offer(s, mw.actor(user), demand_id, facility_id=mw.world.facilities[facility],
                                  service_id=mw.services[service], message=message, **kwargs).id


def experts_by_code(mw: MatchWorld) -> dict[str, Expert]:
    with mw.db.unit_of_work(write=False) as s:
        return {e.code: e for e in s.scalars(select(Expert))}
