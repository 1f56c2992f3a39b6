"""Benchmark databases: created, migrated and seeded once, then reused while their size and age fit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url

from labcommons.booking.models import Booking
from labcommons.catalog.models import Instrument
from labcommons.db import Database
from labcommons.migrations import upgrade
from labcommons.synthetic import seed_synthetic

RESULTS = Path(__file__).resolve().parent / "results"
DATA = RESULTS / "data"
REGISTRY = DATA / "datasets.json"


@dataclass(frozen=True)
class Dataset:
    engine: str  # "postgresql" or "sqlite"
    instruments: int
    bookings: int
    seed: int = 1

    @property
    def name(self) -> str:
        return f"lc_bench_i{self.instruments}_b{self.bookings}_s{self.seed}"

    def url(self, admin_url: str) -> str:
        if self.engine == "sqlite":
            return f"sqlite:///{DATA / (self.name + '.db')}"
        return make_url(admin_url).set(database=self.name).render_as_string(hide_password=False)


def _registry() -> dict[str, Any]:
    if REGISTRY.exists():
        registry: dict[str, Any] = json.loads(REGISTRY.read_text())
        return registry
    return {}


def remember(key: str, info: dict[str, Any]) -> None:
    """Record what a dataset holds (and when it was seeded) in the registry."""
    registry = _registry()
    registry[key] = info
    DATA.mkdir(parents=True, exist_ok=True)
    REGISTRY.write_text(json.dumps(registry, indent=2))


def _log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", flush=True)


def _progress(stage: str, done: int, total: int) -> None:
    # One line per 10% keeps a million-row seed readable in a log.
    step = max(1, total // 10)
    if total and (done == total or done % step < 10_000) and done:
        _log(f"{stage}: {done:,}/{total:,}")


def create_database(admin_url: str, name: str) -> None:
    """Drop and create a PostgreSQL database (only lc_bench* names)."""
    assert name.startswith("lc_bench"), name
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def _exists(admin_url: str, dataset: Dataset) -> bool:
    if dataset.engine == "sqlite":
        return (DATA / (dataset.name + ".db")).exists()
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        found = conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": dataset.name})
    admin.dispose()
    return bool(found)


def _counts(db: Database) -> tuple[int, int]:
    with db.session() as s:
        return (int(s.scalar(select(func.count()).select_from(Instrument)) or 0),
                int(s.scalar(select(func.count()).select_from(Booking)) or 0))


def ensure(
    dataset: Dataset, admin_url: str, *, max_age_days: float, fresh: bool = False
) -> tuple[Database, dict[str, Any]]:
    """A database holding exactly this dataset, reused when it exists, matches and is recent enough."""
    key = f"{dataset.engine}:{dataset.name}"
    info = _registry().get(key)
    url = dataset.url(admin_url)
    if not fresh and info and _exists(admin_url, dataset):
        age = (datetime.now(UTC) - datetime.fromisoformat(info["seeded_at"])).total_seconds() / 86400
        db = Database.from_url(url)
        upgrade(db.engine)  # migrations added since the seed (an index, say) apply to the reused data
        if age <= max_age_days and _counts(db) == (dataset.instruments, dataset.bookings):
            _log(f"reusing {key} (seeded {age:.1f} days ago)")
            return db, {**info, "reused": True}
        db.dispose()
    _log(f"seeding {key}")
    if dataset.engine == "sqlite":
        DATA.mkdir(parents=True, exist_ok=True)
        for suffix in ("", "-wal", "-shm"):
            Path(str(DATA / (dataset.name + ".db")) + suffix).unlink(missing_ok=True)
    else:
        create_database(admin_url, dataset.name)
    db = Database.from_url(url)
    upgrade(db.engine)
    started = time.perf_counter()
    report = seed_synthetic(db, instruments=dataset.instruments, bookings=dataset.bookings, seed=dataset.seed,
                            progress=_progress)
    info = {
        "seeded_at": datetime.now(UTC).isoformat(), "seconds": round(time.perf_counter() - started, 1),
        "stage_seconds": {k: round(v, 1) for k, v in report.seconds.items()},
        "instruments": dataset.instruments, "bookings": dataset.bookings, "seed": dataset.seed,
    }
    remember(key, info)
    _log(f"seeded {key} in {info['seconds']} s {info['stage_seconds']}")
    return db, {**info, "reused": False}
