"""Tokenisation shared by the index and the query, so Chinese matches without a word segmenter.

Latin text becomes lower-case alphanumeric words. Runs of CJK characters become their single characters
and their overlapping bigrams (「基因测序仪」 → 基 因 测 序 仪 基因 因测 测序 序仪). A query run of two or more
characters asks for all its bigrams, one character asks for the unigram, so 「测序」 finds 「基因测序仪」.
Both SQLite FTS5 (unicode61) and PostgreSQL ('simple' configuration) then see plain space-separated tokens.
"""

from __future__ import annotations

import re
import unicodedata

# CJK Unified Ideographs (+ extension A), compatibility ideographs, kana and hangul syllables.
_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_RUN = re.compile(rf"[{_CJK}]+|[^\W_{_CJK}]+", re.UNICODE)
_CJK_RUN = re.compile(rf"^[{_CJK}]+$")


def _runs(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", text).lower()
    return _RUN.findall(text)


def index_tokens(*texts: str) -> str:
    """The space-separated tokens stored for indexing."""
    out: list[str] = []
    for text in texts:
        for run in _runs(text or ""):
            if _CJK_RUN.match(run):
                out.extend(run)
                out.extend(run[i : i + 2] for i in range(len(run) - 1))
            else:
                out.append(run)
    return " ".join(out)


def query_terms(query: str) -> list[tuple[str, bool]]:
    """The query as (token, is_prefix) terms, all of which must match.

    Latin words match as prefixes ("seq" finds "sequencer"); CJK tokens match exactly.
    """
    terms: list[tuple[str, bool]] = []
    seen: set[str] = set()
    for run in _runs(query):
        if _CJK_RUN.match(run):
            tokens = [run] if len(run) == 1 else [run[i : i + 2] for i in range(len(run) - 1)]
            items = [(t, False) for t in tokens]
        else:
            items = [(run, True)]
        for token, prefix in items:
            if token not in seen:
                seen.add(token)
                terms.append((token, prefix))
    return terms[:32]
