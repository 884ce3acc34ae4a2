"""Diversity and reward-model metrics."""

from rlhf_lightning.metrics.diversity import distinct_n, ngram_counts

__all__ = ["distinct_n", "ngram_counts"]
