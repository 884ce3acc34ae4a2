"""Diversity of generated text, as pure functions on token-id sequences.

distinct-n = (number of distinct n-grams) / (number of n-grams) over a set of responses (Li et al., 2016): 1 when no
n-gram repeats, near 0 when every response says the same thing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence


def ngram_counts(sequences: Sequence[Sequence[int]], n: int) -> Counter:
    """Counts of every n-gram (as a tuple) over all sequences; sequences shorter than n contribute none."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    counts: Counter = Counter()
    for seq in sequences:
        seq = tuple(seq)
        counts.update(seq[i : i + n] for i in range(len(seq) - n + 1))
    return counts


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / total n-grams across ``sequences``; 0.0 when there is no n-gram at all."""
    counts = ngram_counts(sequences, n)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0
