"""Tokens for matching: jieba segments Chinese, Latin text becomes normalised words, and a bilingual thesaurus
(data/lexicon.txt) links abbreviations, synonyms and translations to each other and to taxonomy codes.

The same `tokens` function serves the index and the query, so both see the same words. Chinese runs give jieba's
search-mode words plus character bigrams, which still match where jieba splits a rare term differently; Latin
words are lower-cased with a light plural stem, and hyphenated or slashed compounds ("scRNA-seq", "LC-MS/MS") also
give their joined form ("scrnaseq", "lcmsms").
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import jieba


def _load_stopwords() -> tuple[frozenset[str], frozenset[str]]:
    raw = resources.files("labcommons.matching").joinpath("data/stopwords.txt").read_text("utf-8")
    words = {k.strip(): frozenset(v.split()) for k, _, v in (line.partition(":") for line in raw.splitlines())
             if not k.startswith("#") and v}
    return words["en"], words["zh"]


_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_CJK_RUN = re.compile(rf"[{_CJK}]+")
_SEGMENT = re.compile(rf"[{_CJK}]+|[a-z0-9]+(?:[-/+.][a-z0-9]+)*")
_LATIN_PART = re.compile(r"[a-z0-9]+")

STOPWORDS_EN, STOPWORDS_ZH = _load_stopwords()

_jieba_ready = False
_jieba_lock = threading.Lock()


def _normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text or "").lower()


def _stem(word: str) -> str:
    # Enough for plurals, which is what users and catalogue texts differ by most ("sequencers", "mice" aside).
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def _ensure_jieba() -> None:
    global _jieba_ready
    if _jieba_ready:
        return
    with _jieba_lock:
        if _jieba_ready:
            return
        jieba.setLogLevel(logging.WARNING)
        jieba.initialize()
        # Thesaurus terms stay whole words, so 「冷冻电镜」 is one token as well as its parts.
        for concept in lexicon().concepts:
            for term in concept.terms:
                if _CJK_RUN.search(term) and len(term) <= 12:
                    jieba.add_word(term, freq=2000)
        _jieba_ready = True


def _cjk_tokens(run: str, bigrams: bool = True) -> list[str]:
    out = [w for w in jieba.cut_for_search(run) if w.strip() and w not in STOPWORDS_ZH and len(w) > 1]
    if bigrams:
        out.extend(run[i : i + 2] for i in range(len(run) - 1) if run[i : i + 2] not in STOPWORDS_ZH)
    if len(run) == 1 and run not in STOPWORDS_ZH:
        out.append(run)
    return out


def tokens(text: str, *, bigrams: bool = True) -> list[str]:
    """Index and query tokens of a text, in order, repeats kept (term frequency counts).

    `bigrams=False` leaves out the character bigrams of Chinese runs: the words a person would recognise, for
    explanations (a bigram such as 「量基」 from 「高通量基因」 crosses a word boundary).
    """
    _ensure_jieba()
    out: list[str] = []
    for segment in _SEGMENT.findall(_normalise(text)):
        if _CJK_RUN.fullmatch(segment):
            out.extend(_cjk_tokens(segment, bigrams))
            continue
        parts = _LATIN_PART.findall(segment)
        for part in parts:
            if part not in STOPWORDS_EN:
                out.append(_stem(part))
        if len(parts) > 1:
            out.append("".join(parts))
    return out


def is_latin_word(token: str) -> bool:
    return token.isascii() and token.isalpha()


@dataclass(frozen=True)
class Concept:
    """One thesaurus line: terms that mean the same thing, maybe tied to a taxonomy code."""

    category: str | None
    terms: tuple[str, ...]

    @property
    def english(self) -> list[str]:
        return [t for t in self.terms if not _CJK_RUN.search(t)]


@dataclass
class Lexicon:
    concepts: list[Concept]
    # Normalised term → indexes of the concepts it belongs to.
    by_term: dict[str, list[int]] = field(default_factory=dict)
    latin_pattern: re.Pattern[str] | None = None
    cjk_terms: list[str] = field(default_factory=list)

    def find(self, text: str) -> list[tuple[str, Concept]]:
        """The thesaurus terms in a text, longest first, each with its concept (a term may be in several)."""
        norm = _normalise(text)
        found: list[tuple[str, Concept]] = []
        seen: set[tuple[str, int]] = set()
        hits: list[str] = []
        if self.latin_pattern is not None:
            # Latin terms match whole words; spaces, hyphens and slashes inside a term match each other.
            hits.extend(m.group(1) for m in self.latin_pattern.finditer(_latin_key_text(norm)))
        cjk = [term for term in self.cjk_terms if term in norm]
        # A term inside a longer one found here (「细胞」 in 「单细胞」) adds nothing but noise.
        hits.extend(t for t in cjk if not any(t != other and t in other for other in cjk))
        for term in hits:
            key = _latin_key(term) if not _CJK_RUN.search(term) else term
            for index in self.by_term.get(key, []):
                if (key, index) not in seen:
                    seen.add((key, index))
                    found.append((term, self.concepts[index]))
        return found


def _latin_key(term: str) -> str:
    return " ".join(_stem(w) for w in _LATIN_PART.findall(_normalise(term)))


def _latin_key_text(text: str) -> str:
    # Keep CJK runs as separators so a Latin term never spans them; plurals match singular terms.
    return " ".join(_stem(w) if w.isascii() else w for w in _SEGMENT_KEY.findall(text))


_SEGMENT_KEY = re.compile(rf"[{_CJK}]+|[a-z0-9]+")


@cache
def lexicon() -> Lexicon:
    """The packaged thesaurus."""
    raw = resources.files("labcommons.matching").joinpath("data/lexicon.txt").read_text("utf-8")
    concepts: list[Concept] = []
    for line in raw.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        code, _, rest = line.partition(":")
        terms = tuple(t.strip() for t in rest.split("|") if t.strip())
        concepts.append(Concept(category=None if code.strip() == "-" else code.strip(), terms=terms))
    lex = Lexicon(concepts=concepts)
    latin: set[str] = set()
    cjk: set[str] = set()
    for index, concept in enumerate(concepts):
        for term in concept.terms:
            if _CJK_RUN.search(term):
                key = _normalise(term)
                cjk.add(key)
            else:
                key = _latin_key(term)
                if not key:
                    continue
                latin.add(key)
            lex.by_term.setdefault(key, []).append(index)
    if latin:
        alternatives = "|".join(re.escape(k) for k in sorted(latin, key=len, reverse=True))
        lex.latin_pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])")
    lex.cjk_terms = sorted(cjk, key=len, reverse=True)
    return lex


def latin_words(text: str) -> list[str]:
    """The Latin words of a text, as written (lower-cased), stopwords left out."""
    return [w for w in _SEGMENT_KEY.findall(_normalise(text)) if w.isascii() and w not in STOPWORDS_EN]


def has_cjk(text: str) -> bool:
    return bool(_CJK_RUN.search(text or ""))
