"""Synthetic items for the matching latency bench: `add_synthetic_items(db, n)`, used by `run.py --large N`.

The items are variations of the demo catalogue: each synthetic instrument or service copies a demo item's texts
and category, gets a random adjective, maker, model number and (in Chinese) a feature and a use, and lands at a
random demo facility. Rows go in by bulk inserts; then the match documents are built the way production builds
them, `index.mark_all_dirty` and `index.refresh`, in transactions of a few thousand documents.

Embedding every document separately would dominate (the small model encodes a few dozen texts a second on a
laptop-class CPU), so while the documents are built the encoder is wrapped to encode each distinct embedding text
once: the English name and description vary over a few hundred combinations, the Chinese text and model numbers
(which only the keyword side reads) over many more. The stored vectors are the ones the plain encoder would give.
Likewise each distinct word of the texts is tokenised once (jieba is the other big cost); the tokens are the same.
"""

from __future__ import annotations

import random
import re
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, insert, select

from labcommons.catalog.models import Facility, Institution, Instrument, Service
from labcommons.db import Database
from labcommons.matching import embeddings, index
from labcommons.matching import text as mtext

CHUNK = 5000
REFRESH_CHUNK = 5000
PREFIX = "SYNM-"
INSTRUMENT_SHARE = 0.7

ADJECTIVES = [
    ("", ""), ("", ""), ("高分辨", "High-resolution"), ("全自动", "Automated"), ("新一代", "Next-generation"),
    ("多功能", "Multi-purpose"), ("台式", "Benchtop"), ("高通量", "High-throughput"),
]
MAKERS = [
    "Thermo Fisher", "Zeiss", "Leica", "Nikon", "Bruker", "Agilent", "Waters", "Shimadzu", "Illumina", "MGI",
    "BD", "Beckman Coulter", "Hitachi", "JEOL", "Sciex", "联影", "迈瑞", "华大智造", "中科科仪", "曙光",
]
FEATURES = [
    "配备自动进样器", "支持远程数据传输", "具备低温样品台", "可长时间连续采集", "配套专用分析软件", "新近完成升级改造",
    "提供操作培训", "支持夜间自助使用",
]
USES = [
    "适用于肿瘤微环境研究", "用于新药研发与质量控制", "服务于脑科学研究", "支持环境样品与食品安全检测",
    "面向新材料表征", "用于单细胞与类器官研究", "服务成渝地区企业与高校", "支持临床队列样本分析",
]
LETTERS = "ABCDEFGHKLMNPRSTXZ"
ROOMS = ["A栋", "B栋", "C栋", "科研楼", "创新中心"]


@dataclass(frozen=True)
class _Place:
    facility_id: int
    institution_id: int
    region_code: str


def add_synthetic_items(db: Database, n: int, *, seed: int = 11, verbose: bool = True) -> None:
    """Add `n` synthetic instruments and services over the demo facilities and build their match documents."""
    say = print if verbose else (lambda *_a, **_k: None)
    rng = random.Random(seed)
    started = time.perf_counter()
    instruments, services, places, first_number = _templates(db)
    n_instruments = int(n * INSTRUMENT_SHARE)
    n_services = n - n_instruments
    inserted = 0
    with db.unit_of_work() as session:
        for chunk in _chunks(_instrument_rows(rng, instruments, places, n_instruments, first_number), CHUNK):
            session.execute(insert(Instrument), chunk)
            inserted += len(chunk)
        for chunk in _chunks(_service_rows(rng, services, places, n_services, first_number), CHUNK):
            session.execute(insert(Service), chunk)
            inserted += len(chunk)
    inserted_s = time.perf_counter() - started
    say(f"  inserted {n_instruments} instruments and {n_services} services in {inserted_s:.1f} s")

    started = time.perf_counter()
    with db.unit_of_work() as session:
        marked = index.mark_all_dirty(session)
    with _distinct_texts_encoder() as encoder_stats, _word_memo_tokens() as token_stats:
        done = 0
        last_report = time.perf_counter()
        while True:
            with db.unit_of_work() as session:
                step = index.refresh(session, limit=REFRESH_CHUNK)
            if step == 0:
                break
            done += step
            if verbose and time.perf_counter() - last_report > 30:
                last_report = time.perf_counter()
                rate = done / (last_report - started)
                say(f"  ... {done}/{marked} documents ({rate:.0f}/s)", file=sys.stderr)
    refresh_s = time.perf_counter() - started
    say(f"  built {done} match documents in {refresh_s:.1f} s ({done / max(refresh_s, 1e-9):.0f}/s); "
        f"{encoder_stats.encoded} distinct texts encoded in {encoder_stats.seconds:.1f} s "
        f"for {encoder_stats.asked} embeddings; {token_stats.words} distinct words tokenised for "
        f"{token_stats.texts} texts")


def _templates(db: Database) -> tuple[list[Any], list[Any], list[_Place], int]:
    with db.unit_of_work(write=False) as session:
        instruments = list(session.execute(
            select(Instrument.name_zh, Instrument.name_en, Instrument.description_zh, Instrument.description_en,
                   Instrument.category_code, Instrument.slot_minutes, Instrument.min_booking_minutes,
                   Instrument.max_booking_minutes, Instrument.open_to)
            .where(Instrument.code.not_like(f"{PREFIX}%")).order_by(Instrument.id)
        ))
        services = list(session.execute(
            select(Service.kind, Service.name_zh, Service.name_en, Service.description_zh, Service.description_en,
                   Service.category_code, Service.list_price_fen, Service.price_unit,
                   Service.sample_requirements_zh, Service.sample_requirements_en, Service.turnaround_days)
            .where(Service.code.not_like(f"{PREFIX}%")).order_by(Service.id)
        ))
        places = [
            _Place(fid, iid, region)
            for fid, iid, region in session.execute(
                select(Facility.id, Facility.institution_id, Institution.region_code)
                .join(Institution, Institution.id == Facility.institution_id).order_by(Facility.id)
            )
        ]
        # A second run in the same database continues the numbering.
        first_number = int(session.scalar(select(func.count()).select_from(Instrument)
                                          .where(Instrument.code.like(f"{PREFIX}%"))) or 0)
        first_number += int(session.scalar(select(func.count()).select_from(Service)
                                           .where(Service.code.like(f"{PREFIX}%"))) or 0)
    if not instruments or not services or not places:
        raise RuntimeError("add_synthetic_items needs the demo catalogue (instruments, services, facilities)")
    return instruments, services, places, first_number


def _pick(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[int(rng.random() * len(options))]


def _model(rng: random.Random) -> str:
    return f"{_pick(rng, LETTERS)}{_pick(rng, LETTERS)}-{100 + int(rng.random() * 9900)}"


def _instrument_rows(rng: random.Random, templates: list[Any], places: list[_Place], count: int,
                     first: int) -> Iterator[dict[str, Any]]:
    for k in range(count):
        t = _pick(rng, templates)
        place = _pick(rng, places)
        adj_zh, adj_en = _pick(rng, ADJECTIVES)
        maker = _pick(rng, MAKERS)
        roll = rng.random()
        status = "active" if roll < 0.93 else "maintenance" if roll < 0.98 else "retired"
        yield {
            "code": f"{PREFIX}I{first + k:07d}", "facility_id": place.facility_id,
            "institution_id": place.institution_id, "region_code": place.region_code,
            "name_zh": f"{adj_zh}{t.name_zh}", "name_en": f"{adj_en} {t.name_en}".strip(),
            "description_zh": f"{t.description_zh}{_pick(rng, FEATURES)}，{_pick(rng, USES)}。",
            "description_en": t.description_en, "manufacturer": maker, "model": _model(rng),
            "category_code": t.category_code,
            "location_zh": f"{_pick(rng, ROOMS)} {1 + int(rng.random() * 12)}层",
            "location_en": "", "status": status, "slot_minutes": t.slot_minutes,
            "min_booking_minutes": t.min_booking_minutes, "max_booking_minutes": t.max_booking_minutes,
            "open_to": t.open_to, "search_name": "", "search_body": "",
        }


def _service_rows(rng: random.Random, templates: list[Any], places: list[_Place], count: int,
                  first: int) -> Iterator[dict[str, Any]]:
    for k in range(count):
        t = _pick(rng, templates)
        place = _pick(rng, places)
        adj_zh, adj_en = _pick(rng, ADJECTIVES)
        price = t.list_price_fen
        if price is not None:
            price = int(price * (0.7 + 0.6 * rng.random()))
        yield {
            "code": f"{PREFIX}S{first + k:07d}", "facility_id": place.facility_id, "kind": t.kind,
            "institution_id": place.institution_id, "region_code": place.region_code,
            "name_zh": f"{adj_zh}{t.name_zh}", "name_en": f"{adj_en} {t.name_en}".strip(),
            "description_zh": f"{t.description_zh}{_pick(rng, FEATURES)}，{_pick(rng, USES)}。",
            "description_en": t.description_en, "category_code": t.category_code,
            "turnaround_days": t.turnaround_days, "list_price_fen": price, "price_unit": t.price_unit,
            "sample_requirements_zh": t.sample_requirements_zh, "sample_requirements_en": t.sample_requirements_en,
            "is_active": rng.random() < 0.97, "search_name": "", "search_body": "",
        }


def _chunks(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class _EncoderStats:
    asked: int = 0
    encoded: int = 0
    seconds: float = 0.0


class _DistinctTexts:
    """A stand-in for the sentence-transformers model that encodes each distinct text once."""

    def __init__(self, model: Any, stats: _EncoderStats) -> None:
        self.model = model
        self.stats = stats
        self.memo: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str], **options: Any) -> np.ndarray:
        self.stats.asked += len(texts)
        missing = [t for t in dict.fromkeys(texts) if t not in self.memo]
        if missing:
            started = time.perf_counter()
            vectors = self.model.encode(missing, **options)
            self.stats.seconds += time.perf_counter() - started
            self.stats.encoded += len(missing)
            self.memo.update(zip(missing, np.asarray(vectors, dtype=np.float32), strict=True))
        return np.stack([self.memo[t] for t in texts])


@contextmanager
def _distinct_texts_encoder() -> Iterator[_EncoderStats]:
    """While the block runs, the process's encoder (if any) encodes each distinct text once."""
    stats = _EncoderStats()
    encoder = embeddings.get_encoder()
    if encoder is None:
        yield stats
        return
    wrapped = embeddings.Encoder(name=encoder.name, model=_DistinctTexts(encoder.model, stats),
                                 dimensions=encoder.dimensions)
    embeddings._encoder = wrapped  # bench only: the module keeps one encoder per process
    try:
        yield stats
    finally:
        embeddings._encoder = encoder


@dataclass
class _TokenStats:
    texts: int = 0
    words: int = 0


# Tokens never span whitespace or CJK punctuation (see matching/text.py: a token comes from one CJK run or one
# Latin compound), so a text's tokens are its parts' tokens in order.
_PARTS = re.compile(r"[\s，。；：、！？（）“”‘’]+")
_CHECK_EVERY = 997


@contextmanager
def _word_memo_tokens() -> Iterator[_TokenStats]:
    """While the block runs, `matching.text.tokens` tokenises each distinct part of a text once.

    The synthetic texts repeat their phrases (facility and category names, template descriptions) and differ in
    model numbers; every 997th text is also tokenised whole and compared, so a difference fails the bench.
    """
    stats = _TokenStats()
    original = mtext.tokens
    memo: dict[tuple[str, bool], list[str]] = {}

    def tokens(text: str, *, bigrams: bool = True) -> list[str]:
        stats.texts += 1
        out: list[str] = []
        for part in _PARTS.split(text):
            if not part:
                continue
            found = memo.get((part, bigrams))
            if found is None:
                found = memo[(part, bigrams)] = original(part, bigrams=bigrams)
                stats.words += 1
            out.extend(found)
        if stats.texts % _CHECK_EVERY == 0 and out != original(text, bigrams=bigrams):
            raise AssertionError(f"memoised tokens differ for {text!r}")
        return out

    mtext.tokens = tokens  # bench only
    try:
        yield stats
    finally:
        mtext.tokens = original
