"""A small hand-built catalogue for the matcher tests: the standard test World plus an active cryo-EM, two NMR
spectrometers (one per region, same texts), an open flow cytometer, a sequencing service and a cryo-EM expert.

World items kept as they are: CQ-CONF (confocal), CQ-SEQ (sequencer), CQ-SPATIAL, CQ-EM (cryo-EM in
maintenance), CQ-LOCAL (a flow cytometer open only to CQ-LAB, alice's institution), SC-MS (open to Sichuan).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from labcommons.actor import Actor
from labcommons.catalog.models import Facility, Instrument, PriceUnit, Service, ServiceKind
from labcommons.catalog.service import place_service
from labcommons.db import Database
from labcommons.matching import embeddings, index
from labcommons.matching import service as matching
from labcommons.matching.models import Availability, Expert
from tests.factories import World, add_instrument

NMR_TEXT = dict(
    name_zh="600兆核磁共振波谱仪", name_en="600 MHz NMR spectrometer", category_code="ANA.NMR",
    description_zh="液体核磁，一维氢谱、碳谱及二维谱。", description_en="Solution NMR: 1H, 13C and 2D spectra.",
    manufacturer="Bruker", model="Avance NEO 600",
)


@dataclass
class Catalogue:
    world: World
    services: dict[str, int] = field(default_factory=dict)
    experts: dict[str, int] = field(default_factory=dict)

    @property
    def db(self) -> Database:
        return self.world.db

    @property
    def instruments(self) -> dict[str, int]:
        return self.world.instruments

    def actor(self, name: str) -> Actor:
        return self.world.actors[name]


def add_service(db: Database, facility_id: int, code: str, **fields: Any) -> int:
    values: dict[str, Any] = dict(
        kind=ServiceKind.testing, name_zh=f"服务 {code}", name_en=f"Service {code}", description_zh="",
        description_en="", category_code="GEN.SEQ", price_unit=PriceUnit.sample, is_active=True,
    )
    values.update(fields)
    with db.unit_of_work() as s:
        svc = Service(code=code, facility_id=facility_id, **values)
        place_service(s, svc, schemes=[])
        s.add(svc)
        s.flush()
        return svc.id


def add_expert(db: Database, code: str, facility_id: int, **fields: Any) -> int:
    with db.unit_of_work() as s:
        facility = s.get(Facility, facility_id)
        assert facility is not None
        values: dict[str, Any] = dict(
            name_zh="韩启明", name_en="Han Qiming", title_zh="研究员", title_en="Professor",
            bio_zh="长期从事冷冻电镜样品制备与单颗粒三维重构。",
            bio_en="Works on cryo-EM sample preparation and single-particle 3D reconstruction.",
            fields=["MIC.EM"], skills_zh=["冷冻电镜制样", "单颗粒重构"],
            skills_en=["cryo-EM grid preparation", "single-particle reconstruction"], languages=["zh", "en"],
            availability=Availability.available, region_code="CQ",
        )
        values.update(fields)
        expert = Expert(code=code, institution_id=facility.institution_id, facility_id=facility.id, **values)
        s.add(expert)
        s.flush()
        return expert.id


def build_catalogue(world: World) -> Catalogue:
    cat = Catalogue(world=world)
    lab, uni, sc = world.facilities["CQ-LAB"], world.facilities["CQ-UNI"], world.facilities["SC-UNI"]
    with world.db.unit_of_work() as s:
        world.instruments["CRYO"] = add_instrument(
            s, lab, "CQ-CRYO", name_zh="300千伏冷冻透射电子显微镜", name_en="300 kV cryo transmission electron "
            "microscope", category_code="MIC.EM", manufacturer="Thermo Fisher", model="Krios G4",
            description_zh="单颗粒冷冻电镜数据采集，用于蛋白质结构解析。",
            description_en="Single-particle cryo-EM data collection for protein structure determination.",
        ).id
        world.instruments["NMR-CQ"] = add_instrument(s, uni, "CQ-NMR", **NMR_TEXT).id
        world.instruments["NMR-SC"] = add_instrument(s, sc, "SC-NMR", **NMR_TEXT).id
        world.instruments["FLOW"] = add_instrument(
            s, uni, "CQ-FLOW", name_zh="多色流式细胞分析仪", name_en="Multicolour flow cytometer",
            category_code="CYT.FLOW", manufacturer="BD", model="FACSymphony A5",
            description_zh="最多28色流式分析，免疫表型检测。",
            description_en="Up to 28-colour flow cytometry for immunophenotyping.",
        ).id
    cat.services["WES"] = add_service(
        world.db, lab, "CQ-S-WES", name_zh="全外显子测序服务", name_en="Whole-exome sequencing service",
        category_code="GEN.SEQ", description_zh="外显子捕获、建库与测序，交付变异注释。",
        description_en="Exome capture, library preparation, sequencing and annotated variants.",
        list_price_fen=150_000,
    )
    cat.services["CONSULT"] = add_service(
        world.db, lab, "CQ-S-EMC", kind=ServiceKind.consultation, name_zh="冷冻电镜咨询",
        name_en="Cryo-EM consultation", category_code="MIC.EM", list_price_fen=50_000, price_unit=PriceUnit.hour,
    )
    cat.experts["HAN"] = add_expert(world.db, "EXP-HAN", lab, consultation_service_id=cat.services["CONSULT"])
    return cat


def match(db: Database, text: str, actor: Actor | None = None, **kwargs: Any) -> matching.MatchOutcome:
    with db.unit_of_work(write=False) as s:
        return matching.match(s, actor, text, **kwargs)


def codes(outcome: matching.MatchOutcome) -> list[str]:
    return [r.code for r in outcome.results]


def refresh(db: Database) -> int:
    with db.unit_of_work() as s:
        return index.refresh(s)


def set_instrument(db: Database, instrument_id: int, **values: Any) -> None:
    with db.unit_of_work() as s:
        instrument = s.get(Instrument, instrument_id)
        assert instrument is not None
        for key, value in values.items():
            setattr(instrument, key, value)


@contextmanager
def keyword_only(reason: str = "test") -> Iterator[None]:
    """Matching as if the embeddings extra were not installed."""
    embeddings.simulate_missing(reason)
    index.clear_cache()
    try:
        yield
    finally:
        embeddings.simulate_missing(None)
        index.clear_cache()
