"""Text metrics on hand-made texts whose values can be worked out by hand."""

from __future__ import annotations

import pytest

from infinito.textmetrics import (
    distinct_n,
    mean_length,
    ngrams,
    repeated_ngram_rate,
    self_bleu,
    text_metrics,
    words,
)

LOOP = " ".join(["the"] * 50)
VARIED = [
    "a quick brown fox jumps over the lazy dog",
    "scientists measured rainfall across seven northern valleys last spring",
    "the orchestra rehearsed an unfamiliar symphony before dawn",
]


def test_ngrams_counts_and_rejects_bad_n() -> None:
    assert ngrams(["a", "b", "c"], 2) == [("a", "b"), ("b", "c")]
    assert ngrams(["a"], 2) == []
    with pytest.raises(ValueError, match="n=0"):
        ngrams(["a"], 0)


def test_distinct_n_exact_values() -> None:
    # "a b a b": unigrams {a, b} of 4 -> 0.5; bigrams ab, ba, ab -> 2 of 3.
    s = [["a", "b", "a", "b"]]
    assert distinct_n(s, 1) == pytest.approx(0.5)
    assert distinct_n(s, 2) == pytest.approx(2 / 3)
    # Pooled over samples: the same bigram in two samples counts once.
    assert distinct_n([["x", "y"], ["x", "y"]], 2) == pytest.approx(0.5)
    assert distinct_n([[]], 1) == 0.0


def test_degenerate_loop_shows_in_every_number() -> None:
    m = text_metrics([LOOP, LOOP, LOOP])
    # 150 unigrams, 1 unique.
    assert m["distinct_1"] == pytest.approx(1 / 150)
    assert m["distinct_2"] == pytest.approx(1 / 147)
    assert m["distinct_3"] < 0.01
    # Per sample 47 4-grams, all but the first repeat it.
    assert m["repeated_4gram_rate"] == pytest.approx(46 / 47)
    assert m["self_bleu"] == pytest.approx(100.0)


def test_varied_text_scores_high_diversity_low_self_bleu() -> None:
    m = text_metrics(VARIED)
    assert m["distinct_1"] > 0.9
    assert m["distinct_2"] == pytest.approx(1.0)
    assert m["distinct_3"] == pytest.approx(1.0)
    assert m["repeated_4gram_rate"] == 0.0
    assert m["self_bleu"] < 10.0


def test_loop_inside_otherwise_varied_text_raises_repetition_rate() -> None:
    looping = "it was a good day " + " ".join(["and then"] * 20)
    clean = text_metrics(VARIED)["repeated_4gram_rate"]
    loopy = repeated_ngram_rate([words(looping)], 4)
    assert clean == 0.0
    assert loopy > 0.7


def test_repeated_rate_is_within_sample_only() -> None:
    # Two identical varied samples: no 4-gram repeats inside either one.
    assert repeated_ngram_rate([words(VARIED[0]), words(VARIED[0])], 4) == 0.0
    # ...while pooled distinct-n sees the duplication.
    assert distinct_n([words(VARIED[0]), words(VARIED[0])], 2) == pytest.approx(0.5)


def test_self_bleu_identical_vs_disjoint_and_undefined_for_one_text() -> None:
    assert self_bleu(["one two three four five", "one two three four five"]) == pytest.approx(100.0)
    assert self_bleu(["one two three four five", "six seven eight nine ten"]) == pytest.approx(0.0)
    assert self_bleu(["only one text"]) is None


def test_mean_length() -> None:
    assert mean_length([[1, 2, 3], [4]]) == pytest.approx(2.0)
    assert mean_length([]) == 0.0
