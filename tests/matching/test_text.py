"""Matching tokens and the thesaurus: jieba words and bigrams for Chinese, normalised Latin words, compounds,
stopwords, and thesaurus lookup (Latin terms as whole words, CJK terms, nested terms dropped)."""

from __future__ import annotations

from labcommons.matching import text as mtext


def found(text: str) -> list[str]:
    return [term for term, _concept in mtext.lexicon().find(text)]


def categories(text: str) -> set[str | None]:
    return {concept.category for _term, concept in mtext.lexicon().find(text)}


# ----------------------------------------------------------------------------------------------- tokens


def test_chinese_gives_jieba_words_and_bigrams() -> None:
    tokens = mtext.tokens("高通量测序")
    # jieba's search-mode words, the thesaurus term kept whole, and every character bigram.
    assert {"高通量", "测序", "高通量测序"} <= set(tokens)
    assert {"高通", "通量", "量测"} <= set(tokens)
    # No single characters from a longer run.
    assert all(len(t) > 1 for t in tokens)


def test_single_chinese_character_is_kept() -> None:
    assert mtext.tokens("镜") == ["镜"]


def test_chinese_stopwords_are_dropped() -> None:
    tokens = mtext.tokens("我们需要做测序")
    assert "测序" in tokens
    assert not {"我们", "需要", "我", "做"} & set(tokens)


def test_latin_words_are_lowercased_stemmed_and_stopwords_dropped() -> None:
    assert mtext.tokens("The Sequencers and Libraries") == ["sequencer", "library"]
    # Short words and -ss/-us/-is endings keep their s.
    assert mtext.tokens("glass virus analysis gas") == ["glass", "virus", "analysis", "gas"]


def test_full_width_text_is_normalised() -> None:
    assert mtext.tokens("ＮＭＲ") == ["nmr"]


def test_compounds_also_give_their_joined_form() -> None:
    assert mtext.tokens("scRNA-seq") == ["scrna", "seq", "scrnaseq"]
    assert mtext.tokens("LC-MS/MS") == ["lc", "ms", "ms", "lcmsms"]
    assert "cryoem" in mtext.tokens("cryo-EM")


def test_repeats_are_kept_for_term_frequency() -> None:
    assert mtext.tokens("sample sample") == ["sample", "sample"]


def test_mixed_text_keeps_both_scripts() -> None:
    tokens = mtext.tokens("需要 NMR 氢谱")
    assert "nmr" in tokens and "氢谱" in tokens


def test_empty_and_punctuation_only_text() -> None:
    assert mtext.tokens("") == []
    assert mtext.tokens("，。!?") == []


def test_helpers() -> None:
    assert mtext.is_latin_word("sequencer") and not mtext.is_latin_word("ab1234") and not mtext.is_latin_word("测序")
    assert mtext.has_cjk("NMR 测试") and not mtext.has_cjk("NMR test") and not mtext.has_cjk("")
    assert mtext.latin_words("我们 need the Orbitrap 质谱") == ["orbitrap"]


# ----------------------------------------------------------------------------------------------- thesaurus


def test_latin_terms_match_whole_words_only() -> None:
    assert "em" in found("we need an EM grid")
    assert found("emsize") == []
    assert "ms" not in found("a system for stems")
    assert "sem" not in found("this semester")


def test_latin_terms_match_across_hyphens_spaces_and_plurals() -> None:
    assert categories("cryo-EM") == {"MIC.EM"}
    assert categories("cryo EM") == {"MIC.EM"}
    assert categories("two flow cytometers") == {"CYT.FLOW"}
    assert categories("mass-spectrometry") == {"ANA.MS"}


def test_latin_terms_never_span_chinese() -> None:
    # "flow" and "cytometry" are separated by Chinese text: not the term "flow cytometry".
    assert "flow cytometry" not in found("flow 和 cytometry")


def test_cjk_terms_are_found_inside_running_text() -> None:
    terms = found("我想做冷冻电镜和核磁共振")
    assert "冷冻电镜" in terms and "核磁共振" in terms
    assert categories("我想做冷冻电镜") == {"MIC.EM"}


def test_nested_cjk_terms_are_dropped() -> None:
    # 「单细胞」 and 「测序」 are thesaurus terms too, but inside 「单细胞测序」 they add nothing.
    assert found("单细胞测序") == ["单细胞测序"]
    assert "细胞" not in found("单细胞")
    # Standing alone they are found.
    assert "测序" in found("测序和单细胞")


def test_longest_terms_first_and_each_concept_once() -> None:
    hits = mtext.lexicon().find("single-cell RNA sequencing")
    assert hits[0][0] == "single cell rna sequencing"
    assert hits[0][1].category == "GEN.SC"
    pairs = [(term, id(concept)) for term, concept in hits]
    assert len(pairs) == len(set(pairs))


def test_concepts_know_their_english_terms() -> None:
    (term, concept), *_ = mtext.lexicon().find("冷冻电镜")
    assert term == "冷冻电镜"
    assert "cryo-em" in concept.english and all(not mtext.has_cjk(t) for t in concept.english)
