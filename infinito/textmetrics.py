"""Diversity and repetition metrics for generated text.

Used by the generate-samples stage to turn a set of continuations into a few numbers where a
degenerate model shows up at once: a loop such as "the the the" drives distinct-n towards 0,
the repeated-4-gram rate towards 1 and self-BLEU towards 100.

- ``distinct_n``: unique n-grams / total n-grams, pooled over all samples (Li et al., 2016).
- ``repeated_ngram_rate``: the share of n-grams that already occurred earlier in the same sample,
  pooled over samples; it measures looping within a text, independent of the other samples.
- ``self_bleu``: mean sentence BLEU (sacrebleu, 0-100) of each sample against all the others as
  references (Zhu et al., 2018); high when the samples resemble one another.
- ``mean_length``: mean number of tokens per sample.

Texts are split into words on whitespace for distinct-n and the repetition rate; self-BLEU uses
sacrebleu's own standard tokenisation (13a). No torch here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from sacrebleu.metrics import BLEU


def words(text: str) -> list[str]:
    """Whitespace tokenisation used by the n-gram metrics."""
    return text.split()


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple[Hashable, ...]]:
    """All contiguous n-grams of ``tokens`` (empty when the sequence is shorter than n)."""
    if n < 1:
        raise ValueError(f"n={n} must be a positive integer")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(samples: Sequence[Sequence[Hashable]], n: int) -> float:
    """Unique n-grams over total n-grams, pooled over all samples; 0.0 when there are none."""
    pooled = [g for s in samples for g in ngrams(s, n)]
    if not pooled:
        return 0.0
    return len(set(pooled)) / len(pooled)


def repeated_ngram_rate(samples: Sequence[Sequence[Hashable]], n: int = 4) -> float:
    """Share of n-grams repeating an earlier n-gram of the same sample; 0.0 when there are none."""
    total = repeated = 0
    for s in samples:
        seen: set[tuple[Hashable, ...]] = set()
        for g in ngrams(s, n):
            total += 1
            if g in seen:
                repeated += 1
            seen.add(g)
    return repeated / total if total else 0.0


def self_bleu(texts: Sequence[str]) -> float | None:
    """Mean sacrebleu sentence BLEU (0-100) of each text against all the others.

    Returns None for fewer than two texts, where self-BLEU is undefined. Sentence-level BLEU uses
    effective order, so short texts without 4-gram matches still score by their lower orders.
    """
    if len(texts) < 2:
        return None
    bleu = BLEU(effective_order=True)
    scores = [
        bleu.sentence_score(hyp, [t for j, t in enumerate(texts) if j != i]).score
        for i, hyp in enumerate(texts)
    ]
    return sum(scores) / len(scores)


def mean_length(samples: Sequence[Sequence[Hashable]]) -> float:
    """Mean number of tokens per sample; 0.0 for no samples."""
    return sum(len(s) for s in samples) / len(samples) if samples else 0.0


def text_metrics(texts: Sequence[str]) -> dict[str, float | None]:
    """The stage's diversity and repetition numbers for a list of texts (flat keys)."""
    tokenised = [words(t) for t in texts]
    return {
        "distinct_1": distinct_n(tokenised, 1),
        "distinct_2": distinct_n(tokenised, 2),
        "distinct_3": distinct_n(tokenised, 3),
        "repeated_4gram_rate": repeated_ngram_rate(tokenised, 4),
        "self_bleu": self_bleu(texts),
    }
