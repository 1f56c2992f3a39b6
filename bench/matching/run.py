"""Matching evaluation and latency: `make bench-matching`.

Loads the demo catalogue and expert directory into a fresh SQLite database, runs every labelled demand of
bench/matching/demands.jsonl (written blind to the matcher) keyword-only and hybrid, and prints top-1 and top-5
hit rate (a labelled item in the first k results) and nDCG@10 (gain 2 for a labelled item, 1 for another item of
a labelled category), by language, then match latency (median and p95 over the set, full results with prices and
free slots). `--large N` also measures latency with N synthetic items in the index.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import select

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # bench.matching.large

from labcommons.db import Database  # noqa: E402
from labcommons.matching import embeddings, index  # noqa: E402
from labcommons.matching import service as matching  # noqa: E402
from labcommons.matching.models import MatchDocument  # noqa: E402
from labcommons.migrations import upgrade  # noqa: E402


def load_demands(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def seeded_database(directory: str) -> Database:
    from labcommons.catalog import demo
    from labcommons.matching.demo import seed_experts

    db = Database.from_url(f"sqlite:///{directory}/bench.db")
    upgrade(db.engine)
    with db.unit_of_work() as session:
        demo.seed_demo(session, bookings=200)
        seed_experts(session)
    with db.unit_of_work() as session:
        index.refresh(session)
    return db


def ndcg(codes: list[str], categories_of: dict[str, str | None], demand: dict, k: int = 10) -> float:
    relevant = set(demand["relevant"])
    wanted = set(demand.get("categories") or [])

    def gain(code: str) -> int:
        if code in relevant:
            return 2
        return 1 if categories_of.get(code) in wanted else 0

    dcg = sum((2 ** gain(c) - 1) / math.log2(i + 2) for i, c in enumerate(codes[:k]))
    others = sum(1 for code, cat in categories_of.items() if cat in wanted and code not in relevant)
    ideal_gains = [2] * len(relevant) + [1] * others
    idcg = sum((2 ** g - 1) / math.log2(i + 2) for i, g in enumerate(ideal_gains[:k]))
    return dcg / idcg if idcg else 0.0


def evaluate(db: Database, demands: list[dict], categories_of: dict[str, str | None], *, details: bool,
             show_misses: bool = False, label: str = "") -> dict:
    hits1: dict[str, list[int]] = {}
    hits5: dict[str, list[int]] = {}
    gains: dict[str, list[float]] = {}
    latencies: list[float] = []
    mode = None
    with db.unit_of_work(write=False) as session:
        matching.match(session, None, "warm up", limit=10, details=details)
        for demand in demands:
            started = time.perf_counter()
            outcome = matching.match(session, None, demand["text"], region=demand.get("region"), limit=10,
                                     details=details)
            latencies.append((time.perf_counter() - started) * 1000)
            mode = outcome.mode
            codes = [r.code for r in outcome.results]
            relevant = set(demand["relevant"])
            for bucket in ("all", demand["lang"]):
                hits1.setdefault(bucket, []).append(int(bool(codes[:1]) and codes[0] in relevant))
                hits5.setdefault(bucket, []).append(int(bool(relevant & set(codes[:5]))))
                gains.setdefault(bucket, []).append(ndcg(codes, categories_of, demand))
            if show_misses and not relevant & set(codes[:5]):
                print(f"  miss {label} {demand['id']}: {demand['text'][:70]!r} -> {codes[:5]}")
    return {
        "mode": mode,
        "by": {b: (statistics.mean(hits1[b]), statistics.mean(hits5[b]), statistics.mean(gains[b]), len(hits1[b]))
               for b in hits1},
        "latency": latencies,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--demands", type=Path, default=ROOT / "bench" / "matching" / "demands.jsonl")
    parser.add_argument("--misses", action="store_true", help="print demands with no labelled item in the top 5")
    parser.add_argument("--large", type=int, default=0, help="also time matching with this many synthetic items")
    args = parser.parse_args()
    demands = load_demands(args.demands)
    with tempfile.TemporaryDirectory() as directory:
        db = seeded_database(directory)
        with db.unit_of_work(write=False) as session:
            categories_of = _categories_by_code(session)
        rows = {}
        embeddings.simulate_missing("keyword-only run")
        index.clear_cache()
        rows["keyword"] = evaluate(db, demands, categories_of, details=True, show_misses=args.misses, label="kw")
        embeddings.simulate_missing(None)
        index.clear_cache()
        rows["hybrid"] = evaluate(db, demands, categories_of, details=True, show_misses=args.misses, label="hy")
        if rows["hybrid"]["mode"] != "hybrid":
            print(f"note: embeddings unavailable ({embeddings.unavailable_reason()}); 'hybrid' ran keyword-only")
        print(f"matching evaluation: {len(demands)} labelled demands, demo catalogue "
              f"({index.load_index(db.session()).size} items)")
        print(f"{'ranker':8} {'subset':6} {'n':>4} {'top-1':>6} {'top-5':>6} {'nDCG@10':>8}")
        for name, row in rows.items():
            for bucket in ("all", "zh", "en", "mixed"):
                if bucket in row["by"]:
                    h1, h5, nd, n = row["by"][bucket]
                    print(f"{name:8} {bucket:6} {n:>4} {h1:6.3f} {h5:6.3f} {nd:8.3f}")
        for name, row in rows.items():
            lat = row["latency"]
            print(f"latency {name}: median {statistics.median(lat):.1f} ms, p95 {percentile(lat, 0.95):.1f} ms "
                  f"(demo catalogue, with prices and free slots)")
        if args.large:
            _large(db, demands, args.large)
    return 0


def _categories_by_code(session) -> dict[str, str | None]:
    from labcommons.catalog.models import Instrument, Service
    from labcommons.matching.models import Expert

    out: dict[str, str | None] = {}
    for model in (Instrument, Service):
        for code, category in session.execute(select(model.code, model.category_code)):
            out[code] = category
    for code, fields in session.execute(select(Expert.code, Expert.fields)):
        out[code] = (fields or [None])[0]
    return out


def _large(db: Database, demands: list[dict], size: int) -> None:
    from bench.matching.large import add_synthetic_items

    started = time.perf_counter()
    add_synthetic_items(db, size)
    print(f"added {size} synthetic items in {time.perf_counter() - started:.1f} s")
    with db.unit_of_work(write=False) as session:
        started = time.perf_counter()
        built = index.load_index(session)
        print(f"index of {built.size} items loaded in {time.perf_counter() - started:.1f} s")
        latencies = []
        for demand in demands:
            t = time.perf_counter()
            matching.match(session, None, demand["text"], region=demand.get("region"), limit=10)
            latencies.append((time.perf_counter() - t) * 1000)
    print(f"latency hybrid at {built.size} items: median {statistics.median(latencies):.1f} ms, "
          f"p95 {percentile(latencies, 0.95):.1f} ms")
    _ = MatchDocument


if __name__ == "__main__":
    raise SystemExit(main())
