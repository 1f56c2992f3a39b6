"""In-process query benchmarks through the service layer: earliest free slot and catalogue search."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from labcommons.booking.service import earliest_slots
from labcommons.catalog.models import Category, Institution
from labcommons.catalog.service import InstrumentQuery, search_instruments
from labcommons.db import Database, utcnow

ZH_WORDS = ["测序仪", "显微镜", "质谱仪", "流式细胞仪", "共聚焦", "电子显微镜", "色谱", "高分辨", "测序",
            "活体成像"]
EN_WORDS = ["microscope", "sequencer", "mass spectrometer", "flow cytometer", "confocal", "chromatograph",
            "automated", "nmr", "cryo electron", "spectrometer"]
DURATIONS = [30, 60, 90, 120, 180, 240]


@dataclass
class Case:
    kind: str
    query: InstrumentQuery
    duration: int = 0
    after_hours: int = 0
    facets: bool = False


@dataclass
class Timings:
    samples: list[tuple[str, float, str]] = field(default_factory=list)  # (kind, seconds, description)
    truncated: bool = False

    def summary(self) -> dict[str, Any]:
        ms = sorted(t * 1000 for _, t, _ in self.samples)
        by_kind: dict[str, list[float]] = {}
        for kind, t, _ in self.samples:
            by_kind.setdefault(kind, []).append(t * 1000)
        slowest = sorted(self.samples, key=lambda s: -s[1])[:5]
        return {
            **percentiles(ms),
            "truncated_by_budget": self.truncated,
            "by_kind": {k: percentiles(sorted(v)) for k, v in sorted(by_kind.items())},
            "slowest": [{"kind": k, "ms": round(t * 1000, 1), "case": d} for k, t, d in slowest],
        }


def percentiles(ms: list[float]) -> dict[str, Any]:
    """n, median, p95, p99 and max of sorted millisecond samples (nearest-rank)."""
    if not ms:
        return {"n": 0}

    def rank(p: float) -> float:
        return ms[min(len(ms) - 1, max(0, math.ceil(p / 100 * len(ms)) - 1))]

    return {"n": len(ms), "p50_ms": round(statistics.median(ms), 2), "p95_ms": round(rank(95), 2),
            "p99_ms": round(rank(99), 2), "max_ms": round(ms[-1], 2)}


def _reference(db: Database) -> tuple[list[str], list[str], list[str]]:
    with db.session() as s:
        codes = list(s.scalars(select(Category.code).order_by(Category.code)))
        institutions = list(s.scalars(
            select(Institution.code).where(Institution.code.like("SYN-%")).order_by(Institution.code)
        ))
    leaves = [c for c in codes if "." in c]
    tops = [c for c in codes if "." not in c]
    return leaves, tops, institutions


def earliest_cases(db: Database, n: int, seed: int = 5) -> list[Case]:
    """A mix: no filter, category (leaf or branch), region, keyword (zh/en), and combinations."""
    rng = random.Random(seed)
    leaves, tops, _ = _reference(db)
    cases = []
    kinds = ["none", "category", "region", "q_zh", "q_en", "category+region", "q+region"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        category = rng.choice(leaves + tops) if "category" in kind else None
        region = rng.choice(["CQ", "SC"]) if "region" in kind else None
        q = ""
        if kind.startswith("q"):
            q = rng.choice(ZH_WORDS if kind == "q_zh" or rng.random() < 0.5 else EN_WORDS)
        cases.append(Case(kind.replace("q_zh", "q").replace("q_en", "q"), InstrumentQuery(
            q=q, category=category, region=region), duration=rng.choice(DURATIONS),
            after_hours=rng.choice([0, 0, 0, 2, 24, 24 * 7])))
    return cases


def search_cases(db: Database, n: int, *, facets: bool, seed: int = 9) -> list[Case]:
    """Chinese and English keywords, alone and with region, category or institution filters; browsing."""
    rng = random.Random(seed)
    leaves, tops, institutions = _reference(db)
    kinds = ["q_zh", "q_en", "q_zh+region", "q_en+category", "q+institution", "browse+category"]
    cases = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        q = "" if kind.startswith("browse") else rng.choice(
            ZH_WORDS if "zh" in kind or ("en" not in kind and rng.random() < 0.5) else EN_WORDS)
        query = InstrumentQuery(
            q=q,
            region=rng.choice(["CQ", "SC"]) if "region" in kind else None,
            category=rng.choice(leaves + tops) if "category" in kind else None,
            institution=rng.choice(institutions) if "institution" in kind and institutions else None,
        )
        cases.append(Case(kind, query, facets=facets))
    return cases


def _describe(case: Case) -> str:
    q = case.query
    parts = [
        f"q={q.q!r}" if q.q else "", f"region={q.region}" if q.region else "",
        f"category={q.category}" if q.category else "",
        f"institution={q.institution}" if q.institution else "",
        f"duration={case.duration}" if case.duration else "",
        f"after=+{case.after_hours}h" if case.after_hours else "",
    ]
    return " ".join(p for p in parts if p)


def _time(
    db: Database, cases: list[Case], call: Callable[[Session, Case], int], repeat: int, budget: float
) -> Timings:
    """Time each case `repeat` times, stopping early once `budget` seconds are spent (slow at 1M rows)."""
    timings = Timings()
    deadline = time.monotonic() + budget
    for _ in range(repeat):
        for case in cases:
            if time.monotonic() > deadline:
                timings.truncated = True
                return timings
            started = time.perf_counter()
            # A session per call, as a request has: checkout, the queries, and the rollback at the end.
            with db.session() as session:
                call(session, case)
                session.rollback()
            timings.samples.append((case.kind, time.perf_counter() - started, _describe(case)))
    return timings


def _warm(cases: list[Case]) -> list[Case]:
    # A third of the mix (every kind) warms caches and statement compilation without doubling the run.
    return cases[: max(12, len(cases) // 3)]


def run_earliest(db: Database, n: int, repeat: int, budget: float) -> dict[str, Any]:
    """Time booking.service.earliest_slots over the query mix (a warm-up, then `repeat` passes)."""
    cases = earliest_cases(db, n)
    now = utcnow()

    def call(session: Session, case: Case) -> int:
        after = now + timedelta(hours=case.after_hours)
        return len(earliest_slots(session, case.query, case.duration, after, limit=5))

    warm = _time(db, _warm(cases), call, 1, budget)
    result = _time(db, cases, call, repeat, budget).summary()
    result["warmup_p50_ms"] = warm.summary().get("p50_ms")
    return result


def run_search(db: Database, n: int, repeat: int, budget: float, *, facets: bool) -> dict[str, Any]:
    """Time catalog.service.search_instruments, first page of 20, over the query mix."""
    cases = search_cases(db, n, facets=facets)
    capped: list[bool] = []

    def call(session: Session, case: Case) -> int:
        page = search_instruments(session, case.query, limit=20, with_facets=case.facets)
        if page.facets is not None:
            capped.append(any(value.capped for values in page.facets.values() for value in values))
        return len(page.items)

    warm = _time(db, _warm(cases), call, 1, budget)
    capped.clear()
    result = _time(db, cases, call, repeat, budget).summary()
    result["warmup_p50_ms"] = warm.summary().get("p50_ms")
    if capped:
        # Facet counts over FACET_CAP matching rows are lower bounds ("1,000+"): how often that happened.
        result["facets_capped_share"] = round(sum(capped) / len(capped), 2)
    return result
