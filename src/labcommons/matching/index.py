"""The match index: what each instrument, service and expert is about, as tokens and an embedding, kept in
`match_document` and loaded into each process's memory for ranking.

Keeping it current:
- a flush that adds or changes an instrument, service, expert or facility marks the affected documents dirty in
  the same transaction (`mark_changed`, called by matching/hooks.py's flush listener);
- the periodic `match_refresh` job (every minute, on whichever worker claims it) or `labcommons matching reindex`
  recomputes dirty documents once: tokens, content hash and, when the text changed, the embedding;
- each process caches the loaded index under a version read from the table (latest `changed_at` and the number of
  dirty rows, two indexed reads per query) and computes documents still dirty in memory, so a change is found by
  the next query even before the job has run.

Ranking (`MatchIndex.rank`): BM25 over name and body tokens (name counts three times), thesaurus expansion and
category votes from data/lexicon.txt, typo correction of Latin words against the index vocabulary, and, when the
embeddings extra is installed, cosine similarity between the demand's English gist and each item's English text.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from itertools import repeat
from typing import Any

import numpy as np
from rapidfuzz import process as fuzzy
from rapidfuzz.distance import Levenshtein
from sqlalchemy import Table, and_, bindparam, func, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, joinedload

from labcommons import jobs
from labcommons.catalog.models import Category, Facility, Instrument, InstrumentStatus, Service
from labcommons.db import Database, utcnow
from labcommons.matching import embeddings
from labcommons.matching import text as mtext
from labcommons.matching.models import Expert, ItemKind, MatchDocument

log = logging.getLogger("labcommons.matching")

NAME_BOOST = 3
BM25_K1 = 1.2
BM25_B = 0.75
# Dirty documents a query computes in memory before the refresh job has run; more wait for the job.
OVERLAY_TOKENS_LIMIT = 5000
OVERLAY_EMBED_LIMIT = 256
REFRESH_BATCH = 256
KIND_CODES = {ItemKind.instrument.value: 0, ItemKind.service.value: 1, ItemKind.expert.value: 2}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}


# --------------------------------------------------------------------------------------------- documents


@dataclass
class ComputedDocument:
    kind: str
    item_id: int
    active: bool
    content_hash: str
    name_tokens: str
    body_tokens: str
    embed_text: str
    category_code: str | None
    region_code: str | None
    facility_id: int | None
    embedding: np.ndarray | None = None


def _category_names(session: Session) -> dict[str, tuple[str, str]]:
    return {c.code: (c.name_zh, c.name_en) for c in session.scalars(select(Category))}


def _category_text(categories: dict[str, tuple[str, str]], code: str | None) -> tuple[str, str]:
    """Chinese and English names of a category and its parent."""
    zh: list[str] = []
    en: list[str] = []
    while code:
        names = categories.get(code)
        if names:
            zh.append(names[0])
            en.append(names[1])
        code = code.rpartition(".")[0] or None
    return " ".join(zh), "; ".join(en)


def _finish(kind: str, item_id: int, active: bool, name: str, body: str, embed: str, category: str | None,
            region: str | None, facility_id: int | None) -> ComputedDocument:
    name_tokens = " ".join(mtext.tokens(name))
    body_tokens = " ".join(mtext.tokens(body))
    digest = hashlib.sha256("\x1f".join([name, body, embed, category or "", region or ""]).encode()).hexdigest()
    return ComputedDocument(
        kind=kind, item_id=item_id, active=active, content_hash=digest, name_tokens=name_tokens,
        body_tokens=body_tokens, embed_text=embed, category_code=category, region_code=region,
        facility_id=facility_id,
    )


def compute_documents(session: Session, keys: Iterable[tuple[str, int]]) -> list[ComputedDocument]:
    """Tokens and texts of the given (kind, id) items; items that no longer exist come back inactive."""
    wanted: dict[str, set[int]] = {}
    for kind, item_id in keys:
        wanted.setdefault(kind, set()).add(item_id)
    categories = _category_names(session)
    out: list[ComputedDocument] = []
    found: set[tuple[str, int]] = set()
    if ids := wanted.get(ItemKind.instrument.value):
        for ins in session.scalars(
            select(Instrument).where(Instrument.id.in_(ids)).options(joinedload(Instrument.facility))
        ):
            cat_zh, cat_en = _category_text(categories, ins.category_code)
            name = f"{ins.name_zh} {ins.name_en} {ins.manufacturer} {ins.model}"
            body = (f"{cat_zh} {cat_en} {ins.description_zh} {ins.description_en} {ins.facility.name_zh} "
                    f"{ins.facility.name_en}")
            embed = f"{ins.name_en}. {cat_en}. {ins.description_en}"
            out.append(_finish("instrument", ins.id, ins.status != InstrumentStatus.retired, name, body, embed,
                               ins.category_code, ins.region_code, ins.facility_id))
            found.add(("instrument", ins.id))
    if ids := wanted.get(ItemKind.service.value):
        for svc in session.scalars(
            select(Service).where(Service.id.in_(ids)).options(joinedload(Service.facility))
        ):
            cat_zh, cat_en = _category_text(categories, svc.category_code)
            kind_words = {"testing": "检测 测试 testing analysis", "rnd": "研发 定制开发 research development",
                          "consultation": "咨询 consultation advice"}[svc.kind.value]
            name = f"{svc.name_zh} {svc.name_en}"
            body = (f"{cat_zh} {cat_en} {kind_words} {svc.description_zh} {svc.description_en} "
                    f"{svc.sample_requirements_zh} {svc.sample_requirements_en} {svc.facility.name_zh} "
                    f"{svc.facility.name_en}")
            embed = f"{svc.name_en} ({svc.kind.value} service). {cat_en}. {svc.description_en}"
            out.append(_finish("service", svc.id, bool(svc.is_active), name, body, embed, svc.category_code,
                               svc.region_code, svc.facility_id))
            found.add(("service", svc.id))
    if ids := wanted.get(ItemKind.expert.value):
        for exp in session.scalars(select(Expert).where(Expert.id.in_(ids))):
            fields_zh: list[str] = []
            fields_en: list[str] = []
            for code in exp.fields or []:
                zh, en = _category_text(categories, code)
                fields_zh.append(zh)
                fields_en.append(en)
            skills_zh = " ".join(exp.skills_zh or [])
            skills_en = ", ".join(exp.skills_en or [])
            name = f"{exp.name_zh} {exp.name_en} {skills_zh} {skills_en}"
            body = (f"专家 咨询 expert consultation {exp.title_zh} {exp.title_en} {' '.join(fields_zh)} "
                    f"{' '.join(fields_en)} {exp.bio_zh} {exp.bio_en}")
            embed = f"Expert consultation: {skills_en}. {'; '.join(fields_en)}. {exp.bio_en}"
            category = exp.fields[0] if exp.fields else None
            out.append(_finish("expert", exp.id, bool(exp.is_active), name, body, embed, category,
                               exp.region_code, exp.facility_id))
            found.add(("expert", exp.id))
    for kind, ids in wanted.items():
        for item_id in ids:
            if (kind, item_id) not in found:
                out.append(ComputedDocument(kind, item_id, False, "", "", "", "", None, None, None))
    return out


# Embeddings of texts already encoded in this process, by content hash: a rebuilt index re-encodes nothing.
_vector_cache: OrderedDict[str, np.ndarray] = OrderedDict()
_VECTOR_CACHE_SIZE = 20000


def _embed(docs: Sequence[ComputedDocument], encoder: embeddings.Encoder) -> None:
    missing = [d for d in docs if d.active and d.content_hash not in _vector_cache]
    if missing:
        vectors = encoder.encode([d.embed_text for d in missing])
        for doc, vector in zip(missing, vectors, strict=True):
            _vector_cache[doc.content_hash] = vector
            while len(_vector_cache) > _VECTOR_CACHE_SIZE:
                _vector_cache.popitem(last=False)
    for doc in docs:
        if doc.active:
            doc.embedding = _vector_cache.get(doc.content_hash)


@dataclass
class _Recomputed:
    kind: str
    item_id: int
    # The row's `changed_at` when it was read: the write applies only if nothing changed it since.
    read_changed_at: datetime
    values: dict[str, Any]


def _recompute_batch(session: Session, after: tuple[str, int], size: int,
                     encoder: embeddings.Encoder | None) -> list[_Recomputed]:
    """Read up to `size` dirty documents after the key `after` and compute them (reads only)."""
    rows = session.execute(
        select(MatchDocument.kind, MatchDocument.item_id, MatchDocument.content_hash, MatchDocument.embedding_model,
               MatchDocument.embedding.is_not(None), MatchDocument.changed_at)
        .where(MatchDocument.dirty.is_(True), tuple_(MatchDocument.kind, MatchDocument.item_id) > after)
        .order_by(MatchDocument.kind, MatchDocument.item_id).limit(size)
    ).all()
    if not rows:
        return []
    previous = {(r[0], r[1]): r for r in rows}
    docs = compute_documents(session, previous)
    stale = [
        d for d in docs
        if d.active and encoder is not None
        and (previous[(d.kind, d.item_id)][2] != d.content_hash
             or previous[(d.kind, d.item_id)][3] != encoder.name or not previous[(d.kind, d.item_id)][4])
    ]
    if encoder is not None and stale:
        _embed(stale, encoder)
    needs_vector = {id(d) for d in stale}
    out: list[_Recomputed] = []
    for doc in docs:
        values: dict[str, Any] = {
            "dirty": False, "active": doc.active, "content_hash": doc.content_hash,
            "name_tokens": doc.name_tokens, "body_tokens": doc.body_tokens, "category_code": doc.category_code,
            "region_code": doc.region_code, "facility_id": doc.facility_id,
        }
        if id(doc) in needs_vector and doc.embedding is not None and encoder is not None:
            values["embedding"] = embeddings.to_bytes(doc.embedding)
            values["embedding_model"] = encoder.name
        elif not doc.active or (encoder is None and previous[(doc.kind, doc.item_id)][2] != doc.content_hash):
            # Gone, or its text changed where no model runs: an old vector would rank the old text.
            values["embedding"] = None
            values["embedding_model"] = ""
        out.append(_Recomputed(doc.kind, doc.item_id, previous[(doc.kind, doc.item_id)][5], values))
    return sorted(out, key=lambda r: (r.kind, r.item_id))


def _store(session: Session, recomputed: Sequence[_Recomputed]) -> int:
    """Write recomputed documents back, each only if it was not changed again meanwhile (it then stays dirty,
    for the next refresh); how many were written. One executemany per shape of row."""
    now = utcnow()
    table: Table = MatchDocument.__table__  # type: ignore[assignment]
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for item in recomputed:
        names = tuple(sorted(item.values))
        groups.setdefault(names, []).append(
            {**{f"v_{k}": v for k, v in item.values.items()}, "k_kind": item.kind, "k_item": item.item_id,
             "k_read": item.read_changed_at, "v_changed_at": now}
        )
    connection = session.connection()
    stored = 0
    for names, rows in groups.items():
        statement = (
            update(table)
            .where(table.c.kind == bindparam("k_kind"), table.c.item_id == bindparam("k_item"),
                   table.c.changed_at == bindparam("k_read", type_=table.c.changed_at.type))
            .values({name: bindparam(f"v_{name}") for name in (*names, "changed_at")})
        )
        result = connection.execute(statement, rows)
        counted = result.rowcount if connection.dialect.supports_sane_multi_rowcount else -1
        stored += counted if counted >= 0 else len(rows)
    return stored


def refresh(session: Session, *, limit: int | None = None, progress: Any = None,
            store_in: Callable[[Sequence[_Recomputed]], int] | None = None) -> int:
    """Recompute dirty documents (all, or `limit` of them) and store them clean; returns how many were stored
    (one changed again while it was computed stays dirty and is not counted).

    By default they are written in `session`; `store_in` writes each batch elsewhere (the job reads in one
    session and writes in short transactions, so the embedding model never runs under SQLite's write lock).
    """
    if session.scalar(select(MatchDocument.kind).where(MatchDocument.dirty.is_(True)).limit(1)) is None:
        return 0  # nothing to do: do not load the embedding model for it (seconds, and much memory)
    encoder = embeddings.get_encoder()
    done = 0
    stored = 0
    after: tuple[str, int] = ("", 0)
    while limit is None or done < limit:
        size = min(REFRESH_BATCH, (limit - done) if limit is not None else REFRESH_BATCH)
        batch = _recompute_batch(session, after, size, encoder)
        if not batch:
            break
        stored += _store(session, batch) if store_in is None else store_in(batch)
        after = (batch[-1].kind, batch[-1].item_id)
        done += len(batch)
        if progress is not None:
            progress(len(batch))
    return stored


def mark_all_dirty(session: Session) -> int:
    """Make every item's document dirty, adding documents for items that have none (after a bulk load)."""
    now = utcnow()
    keys: list[tuple[str, int]] = [("instrument", i) for i in session.scalars(select(Instrument.id))]
    keys += [("service", i) for i in session.scalars(select(Service.id))]
    keys += [("expert", i) for i in session.scalars(select(Expert.id))]
    # An empty hash makes the refresh re-embed too (a model may have been installed since).
    _upsert_dirty(session.connection(), keys, now, reset_hash=True)
    return len(keys)


def _upsert_dirty(connection: Any, keys: Sequence[tuple[str, int]], now: datetime, *,
                  reset_hash: bool = False) -> None:
    if not keys:
        return
    # Sorted, as the refresh writes them: concurrent writers lock rows in one order and never deadlock.
    keys = sorted(set(keys))
    insert = postgresql.insert if connection.dialect.name == "postgresql" else sqlite.insert
    changes: dict[str, Any] = {"dirty": True, "changed_at": now}
    if reset_hash:
        changes["content_hash"] = ""
    statement = insert(MatchDocument).on_conflict_do_update(
        index_elements=[MatchDocument.kind, MatchDocument.item_id], set_=changes
    )
    rows = [
        {"kind": kind, "item_id": item_id, "dirty": True, "active": True, "content_hash": "", "name_tokens": "",
         "body_tokens": "", "embedding_model": "", "changed_at": now}
        for kind, item_id in keys
    ]
    for start in range(0, len(rows), 5000):
        connection.execute(statement, rows[start : start + 5000])


_WATCHED = (Instrument, Service, Expert)


def mark_changed(session: Session) -> None:
    """After a flush: mark the documents of the instruments, services, experts and facilities it wrote dirty
    (called by matching/hooks.py's listener, in the flush's transaction)."""
    keys: list[tuple[str, int]] = []
    facilities: list[int] = []
    for obj in (*session.new, *session.dirty, *session.deleted):
        if isinstance(obj, _WATCHED):
            if obj in session.dirty and not session.is_modified(obj, include_collections=False):
                continue
            kind = {Instrument: "instrument", Service: "service", Expert: "expert"}[type(obj)]
            if obj.id is not None:
                keys.append((kind, obj.id))
        elif isinstance(obj, Facility) and obj in session.dirty and obj.id is not None:
            facilities.append(obj.id)
    if not keys and not facilities:
        return
    now = utcnow()
    connection = session.connection()
    _upsert_dirty(connection, keys, now)
    if facilities:
        connection.execute(
            update(MatchDocument).where(MatchDocument.facility_id.in_(facilities)).values(dirty=True, changed_at=now)
        )


@jobs.handler("match_refresh")
def _refresh_job(session: Session, _payload: dict[str, Any]) -> None:
    # Cheap when nothing is dirty: one indexed read. The job gets a read session; each computed batch is written
    # in its own short write transaction.
    writer = Database(session.get_bind())  # type: ignore[arg-type]

    def store(batch: Sequence[_Recomputed]) -> int:
        with writer.unit_of_work() as write:
            return _store(write, batch)

    refresh(session, store_in=store)


# --------------------------------------------------------------------------------------------- in memory


@dataclass
class Candidate:
    """One ranked document with the parts of its score."""

    kind: str
    item_id: int
    score: float
    keyword: float
    semantic: float | None
    category: float
    region_code: str | None
    category_code: str | None
    facility_id: int | None


@dataclass
class QueryPlan:
    """What the matcher made of a demand: tokens, thesaurus hits, corrections and the semantic query."""

    tokens: dict[str, float]
    concepts: list[tuple[str, mtext.Concept]]
    corrections: dict[str, str]
    categories: dict[str, float]
    semantic_text: str
    # Words of the demand (and their corrections) as a person would recognise them, for explanations.
    words: list[str] = field(default_factory=list)


@dataclass
class Segment:
    """Documents ranked together: BM25 postings in flat arrays (by term), vectors, and per-document facts."""

    kinds: np.ndarray
    item_ids: np.ndarray
    categories: list[str | None]
    regions: np.ndarray
    facilities: list[int | None]
    vocab: dict[str, int]
    post_ptr: np.ndarray
    post_docs: np.ndarray
    post_weights: np.ndarray
    df: np.ndarray
    average_length: float
    vectors: np.ndarray | None
    has_vector: np.ndarray
    category_index: dict[str, np.ndarray]
    positions: dict[tuple[str, int], int]

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def keyword_scores(self, plan: QueryPlan) -> np.ndarray:
        scores = np.zeros(self.size, dtype=np.float32)
        for token, weight in plan.tokens.items():
            term = self.vocab.get(token)
            if term is not None:
                lo, hi = self.post_ptr[term], self.post_ptr[term + 1]
                # A document appears once per term, so the fancy-indexed add is exact.
                scores[self.post_docs[lo:hi]] += weight * self.post_weights[lo:hi]
        return scores

    def category_scores(self, plan: QueryPlan) -> np.ndarray:
        scores = np.zeros(self.size, dtype=np.float32)
        for code, vote in plan.categories.items():
            for prefix, factor in ((code, 1.0), (code.rpartition(".")[0], 0.4)):
                members = self.category_index.get(prefix) if prefix else None
                if members is not None and len(members):
                    scores[members] = np.maximum(scores[members], vote * factor)
        return scores

    def cosine(self, query_vector: np.ndarray) -> np.ndarray | None:
        if self.vectors is None:
            return None
        cosine = self.vectors @ query_vector
        cosine[~self.has_vector] = 0.0
        return cosine


def _segment(docs: list[ComputedDocument], *, base: Segment | None = None) -> Segment:
    """Index documents. A delta segment scores with its base's statistics, so its scores compare with the base's."""
    n = len(docs)
    # Term ids are handed out by the dict itself (its length as the default), so mapping a document's distinct
    # tokens runs in C; Counter counts in C too. Python touches each document, not each token.
    vocab: defaultdict[str, int] = defaultdict()
    vocab.default_factory = vocab.__len__
    terms: list[int] = []
    tfs: list[int] = []
    owners: list[int] = []
    lengths = np.zeros(n, dtype=np.float32)
    for index, doc in enumerate(docs):
        counts = Counter(doc.body_tokens.split())
        for token in doc.name_tokens.split():
            counts[token] += NAME_BOOST
        terms.extend(map(vocab.__getitem__, counts))
        values = counts.values()
        tfs.extend(values)
        owners.extend(repeat(index, len(counts)))
        lengths[index] = sum(values)
    size = len(vocab)
    pair_term = np.asarray(terms, dtype=np.int64)
    pair_doc = np.asarray(owners, dtype=np.int32)
    tf = np.asarray(tfs, dtype=np.float32)
    df = np.bincount(pair_term, minlength=size).astype(np.float64)
    if base is None:
        total, average, term_df = n, (float(lengths.mean()) if n else 1.0), df
    else:
        total, average = base.size + n, base.average_length
        known = np.asarray([base.vocab.get(t, -1) for t in vocab], dtype=np.int64)
        term_df = df + np.where(known >= 0, base.df[np.maximum(known, 0)], 0.0)
    idf = np.log(1 + (total - term_df + 0.5) / (term_df + 0.5))
    norm = BM25_K1 * (1 - BM25_B + BM25_B * lengths / max(average, 1.0))
    score = idf[pair_term] * tf * (BM25_K1 + 1) / (tf + norm[pair_doc])
    by_term = np.argsort(pair_term, kind="stable")
    ptr = np.zeros(size + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(pair_term, minlength=size))
    vectors: np.ndarray | None = None
    has_vector = np.zeros(n, dtype=bool)
    dims = next((len(d.embedding) for d in docs if d.embedding is not None), 0)
    if not dims and base is not None and base.vectors is not None:
        dims = base.vectors.shape[1]
    if dims:
        vectors = np.zeros((n, dims), dtype=np.float32)
        for index, doc in enumerate(docs):
            if doc.embedding is not None and len(doc.embedding) == dims:
                vectors[index] = doc.embedding
                has_vector[index] = True
    categories = [d.category_code for d in docs]
    members: dict[str, list[int]] = {}
    for index, code in enumerate(categories):
        while code:
            members.setdefault(code, []).append(index)
            code = code.rpartition(".")[0]
    return Segment(
        kinds=np.asarray([KIND_CODES[d.kind] for d in docs], dtype=np.int8),
        item_ids=np.asarray([d.item_id for d in docs], dtype=np.int64),
        categories=categories, regions=np.asarray([d.region_code or "" for d in docs], dtype="<U16"),
        facilities=[d.facility_id for d in docs], vocab=dict(vocab), post_ptr=ptr,
        post_docs=pair_doc[by_term], post_weights=score[by_term].astype(np.float32), df=df,
        average_length=average, vectors=vectors, has_vector=has_vector,
        category_index={k: np.asarray(v, dtype=np.int32) for k, v in members.items()},
        positions={(d.kind, d.item_id): i for i, d in enumerate(docs)},
    )


@dataclass
class MatchIndex:
    """A base segment, the documents changed since it was built (a small delta segment), and what is masked."""

    version: tuple[Any, ...]
    base: Segment
    delta: Segment | None
    # Base documents superseded by the delta (changed, retired or gone).
    alive: np.ndarray
    # The latest `changed_at` the base was built from: the delta holds what changed after it.
    base_changed_at: datetime | None
    encoder_name: str | None
    latin_vocab: list[str] = field(default_factory=list)
    built_seconds: float = 0.0

    @property
    def size(self) -> int:
        return int(self.alive.sum()) + (self.delta.size if self.delta is not None else 0)

    def knows(self, token: str) -> bool:
        return token in self.base.vocab or (self.delta is not None and token in self.delta.vocab)

    def _segments(self) -> list[Segment]:
        return [self.base] if self.delta is None else [self.base, self.delta]

    def plan(self, text: str) -> QueryPlan:
        """Tokens with weights, thesaurus concepts, typo corrections and category votes of a demand."""
        weights: dict[str, float] = {}
        for token in mtext.tokens(text):
            weights[token] = 1.0
        corrections: dict[str, str] = {}
        for token in list(weights):
            if mtext.is_latin_word(token) and len(token) >= 4 and not self.knows(token) and self.latin_vocab:
                limit = 1 if len(token) <= 6 else 2
                # Typos rarely hit the first letter; requiring it keeps real words the catalogue lacks
                # ("bacterial") from being "corrected" into unrelated ones ("material").
                near = fuzzy.extract(token, self.latin_vocab, scorer=Levenshtein.distance, score_cutoff=limit,
                                     limit=8)
                same_start = [(word, distance) for word, distance, _ in near if word[0] == token[0]]
                if same_start:
                    best = min(same_start, key=lambda pair: (pair[1], -len(pair[0])))[0]
                    corrections[token] = best
                    weights.setdefault(best, 0.8)
        corrected = text
        for _wrong, right in corrections.items():
            corrected += " " + right
        concepts = mtext.lexicon().find(corrected)
        votes: dict[str, float] = {}
        english: list[str] = []
        for term, concept in concepts:
            if concept.category:
                # Longer, more specific terms vote more; a generic word ("测序") less than "单细胞测序".
                votes[concept.category] = votes.get(concept.category, 0.0) + min(1.0, 0.4 + 0.1 * len(term))
            english.extend(concept.english[:3])
            for other in concept.terms:
                for token in mtext.tokens(other):
                    if token not in weights:
                        weights[token] = 0.35
        # The model reads English: a Chinese demand is represented by its Latin words and the English terms of
        # the thesaurus concepts it mentions.
        gist = ", ".join(dict.fromkeys(english))
        if mtext.has_cjk(text):
            latin = " ".join(mtext.latin_words(corrected))
            semantic_text = ". ".join(part for part in (latin, gist) if part)
        else:
            semantic_text = ". ".join(part for part in (corrected, gist) if part)
        top = max(votes.values(), default=0.0)
        categories = {code: vote / top for code, vote in votes.items()} if top else {}
        words = list(dict.fromkeys(mtext.tokens(corrected, bigrams=False)))
        return QueryPlan(tokens=weights, concepts=concepts, corrections=corrections, categories=categories,
                         semantic_text=semantic_text.strip(), words=words)

    def rank(self, plan: QueryPlan, *, encoder: embeddings.Encoder | None, region: str | None, limit: int,
             kinds: set[str] | None = None) -> tuple[list[Candidate], str]:
        """The best `limit` documents and the mode used ("hybrid" or "keyword")."""
        segments = self._segments()
        if self.size == 0:
            return [], "keyword"
        keyword = np.concatenate([seg.keyword_scores(plan) for seg in segments])
        alive = np.concatenate([self.alive] + ([np.ones(self.delta.size, dtype=bool)] if self.delta else []))
        keyword[~alive] = 0.0
        top_kw = float(keyword.max())
        keyword_n = keyword / top_kw if top_kw > 0 else keyword
        category = np.concatenate([seg.category_scores(plan) for seg in segments])
        semantic: np.ndarray | None = None
        mode = "keyword"
        if encoder is not None and plan.semantic_text and any(seg.vectors is not None for seg in segments):
            query_vector = encoder.encode([plan.semantic_text])[0]
            parts = [seg.cosine(query_vector) for seg in segments]
            cosine = np.concatenate([p if p is not None else np.zeros(seg.size, np.float32)
                                     for p, seg in zip(parts, segments, strict=True)])
            semantic = np.clip((cosine - 0.15) / 0.45, 0.0, 1.0).astype(np.float32)
            mode = "hybrid"
        if semantic is not None:
            score = 0.5 * keyword_n + 0.3 * semantic + 0.2 * category
        else:
            score = 0.75 * keyword_n + 0.25 * category
        regions = np.concatenate([seg.regions for seg in segments])
        kind_codes = np.concatenate([seg.kinds for seg in segments])
        if region:
            score = np.where(regions == region, score, score * 0.85)
        if kinds:
            score = np.where(np.isin(kind_codes, [KIND_CODES[k] for k in kinds]), score, 0.0)
        # Nothing relevant at all: no result rather than the first rows of the catalogue.
        weak = (keyword <= 0) & (category <= 0) & ((semantic if semantic is not None else keyword) <= 0.2)
        score[weak | ~alive] = 0.0
        count = min(limit, int((score > 0).sum()))
        if count <= 0:
            return [], mode
        top = np.argpartition(-score, count - 1)[:count]
        top = top[np.argsort(-score[top], kind="stable")]
        out: list[Candidate] = []
        for i in top:
            seg, j = (self.base, int(i)) if i < self.base.size else (self.delta, int(i) - self.base.size)
            assert seg is not None
            out.append(Candidate(
                kind=KIND_NAMES[int(seg.kinds[j])], item_id=int(seg.item_ids[j]), score=float(score[i]),
                keyword=float(keyword_n[i]), semantic=None if semantic is None else float(semantic[i]),
                category=float(category[i]), region_code=str(seg.regions[j]) or None,
                category_code=seg.categories[j], facility_id=seg.facilities[j],
            ))
        return out, mode


def _latin_vocab(*segments: Segment | None) -> list[str]:
    words: set[str] = set()
    for seg in segments:
        if seg is not None:
            words.update(t for t in seg.vocab if len(t) >= 3 and mtext.is_latin_word(t))
    return sorted(words)


_cache: dict[Any, MatchIndex] = {}
_cache_lock = threading.Lock()
# A delta larger than this share of the base (or DELTA_MIN documents) triggers a full rebuild instead.
DELTA_SHARE = 0.1
DELTA_MIN = 1000
# What changed after the base was built: documents still dirty (a change not yet refreshed, however late its
# transaction commits) and documents whose `changed_at` is after the base's latest, less this margin for clocks
# of different app hosts. A refresh stamps `changed_at` after it read the dirty row, so it is never missed.
DELTA_LOOKBACK = timedelta(seconds=30)


def _version(session: Session) -> tuple[Any, ...]:
    latest = session.scalar(select(func.max(MatchDocument.changed_at)))
    dirty = session.scalar(select(func.count()).select_from(MatchDocument).where(MatchDocument.dirty.is_(True)))
    return (latest, dirty)


def load_index(session: Session) -> MatchIndex:
    """This process's index for the session's database, brought up to date when the documents changed."""
    bind = session.get_bind()
    engine: Any = getattr(bind, "engine", bind)
    encoder = embeddings.get_encoder()
    key = (id(engine), str(engine.url), encoder.name if encoder else None)
    version = _version(session)
    cached = _cache.get(key)
    if cached is not None and cached.version == version:
        return cached
    with _cache_lock:
        cached = _cache.get(key)
        if cached is not None and cached.version == version:
            return cached
        index = None
        if cached is not None and cached.base_changed_at is not None:
            index = _with_delta(session, cached, version, encoder)
        if index is None:
            index = _load(session, version, encoder)
        _cache[key] = index
        return index


_COLUMNS = (
    MatchDocument.kind, MatchDocument.item_id, MatchDocument.dirty, MatchDocument.active,
    MatchDocument.content_hash, MatchDocument.name_tokens, MatchDocument.body_tokens, MatchDocument.category_code,
    MatchDocument.region_code, MatchDocument.facility_id, MatchDocument.embedding, MatchDocument.embedding_model,
)


def _documents(session: Session, rows: Sequence[Any], encoder: embeddings.Encoder | None) -> list[ComputedDocument]:
    """Active documents of the rows; dirty ones computed here, in memory only (the refresh job stores them)."""
    docs: list[ComputedDocument] = []
    dirty: list[tuple[str, int]] = []
    for row in rows:
        # Past the overlay's limit a dirty document is used as last stored (if it ever was) until the refresh.
        if row.dirty and (len(dirty) < OVERLAY_TOKENS_LIMIT or not row.content_hash):
            dirty.append((row.kind, row.item_id))
            continue
        if not row.active:
            continue
        vector = None
        if encoder is not None and row.embedding is not None and row.embedding_model == encoder.name:
            vector = embeddings.from_bytes(row.embedding)
        docs.append(ComputedDocument(
            kind=row.kind, item_id=row.item_id, active=True, content_hash=row.content_hash,
            name_tokens=row.name_tokens, body_tokens=row.body_tokens, embed_text="", category_code=row.category_code,
            region_code=row.region_code, facility_id=row.facility_id, embedding=vector,
        ))
    if dirty:
        overlay = compute_documents(session, dirty[:OVERLAY_TOKENS_LIMIT])
        if encoder is not None:
            _embed([d for d in overlay if d.active][:OVERLAY_EMBED_LIMIT], encoder)
        docs.extend(d for d in overlay if d.active)
        if len(dirty) > OVERLAY_TOKENS_LIMIT:
            waiting = len(dirty) - OVERLAY_TOKENS_LIMIT
            log.warning("matching: %d new documents wait for `labcommons matching reindex`", waiting)
    return docs


def _load(session: Session, version: tuple[Any, ...], encoder: embeddings.Encoder | None) -> MatchIndex:
    started = time.perf_counter()
    docs = _documents(session, session.execute(select(*_COLUMNS)).all(), encoder)
    base = _segment(docs)
    return MatchIndex(
        version=version, base=base, delta=None, alive=np.ones(base.size, dtype=bool), base_changed_at=version[0],
        encoder_name=encoder.name if encoder else None, latin_vocab=_latin_vocab(base),
        built_seconds=time.perf_counter() - started,
    )


def _with_delta(session: Session, cached: MatchIndex, version: tuple[Any, ...],
                encoder: embeddings.Encoder | None) -> MatchIndex | None:
    """The cached base plus a delta of what changed since it was built; None when a full rebuild is better."""
    started = time.perf_counter()
    since = cached.base_changed_at - DELTA_LOOKBACK  # type: ignore[operator]
    changed = (MatchDocument.changed_at >= since) | MatchDocument.dirty.is_(True)
    limit = max(DELTA_MIN, int(cached.base.size * DELTA_SHARE))
    count = session.scalar(select(func.count()).select_from(MatchDocument).where(changed)) or 0
    if count > limit:
        return None
    rows = session.execute(select(*_COLUMNS).where(changed)).all()
    docs = _documents(session, rows, encoder)
    alive = np.ones(cached.base.size, dtype=bool)
    for row in rows:
        position = cached.base.positions.get((row.kind, row.item_id))
        if position is not None:
            alive[position] = False
    delta = _segment(docs, base=cached.base) if docs else None
    return MatchIndex(
        version=version, base=cached.base, delta=delta, alive=alive, base_changed_at=cached.base_changed_at,
        encoder_name=cached.encoder_name, latin_vocab=_latin_vocab(cached.base, delta),
        built_seconds=time.perf_counter() - started,
    )


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


def _ids_by_kind(keys: Iterable[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for kind, item_id in keys:
        out.setdefault(kind, []).append(item_id)
    return out


def document_tokens(session: Session, keys: Sequence[tuple[str, int]]) -> dict[tuple[str, int], set[str]]:
    """The index tokens of some documents (for explanations), computed afresh where a document is dirty."""
    out: dict[tuple[str, int], set[str]] = {}
    if not keys:
        return out
    rows = session.execute(
        select(MatchDocument.kind, MatchDocument.item_id, MatchDocument.dirty, MatchDocument.name_tokens,
               MatchDocument.body_tokens)
        # By kind, so each part is a primary-key lookup (SQLite scans the table for a row-value IN).
        .where(or_(*(and_(MatchDocument.kind == kind, MatchDocument.item_id.in_(ids))
                     for kind, ids in _ids_by_kind(keys).items())))
    ).all()
    dirty = []
    for row in rows:
        if row.dirty:
            dirty.append((row.kind, row.item_id))
        else:
            out[(row.kind, row.item_id)] = set(row.name_tokens.split()) | set(row.body_tokens.split())
    for doc in compute_documents(session, dirty):
        out[(doc.kind, doc.item_id)] = set(doc.name_tokens.split()) | set(doc.body_tokens.split())
    return out
