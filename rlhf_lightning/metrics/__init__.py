"""Diversity and reward-model metrics."""

from rlhf_lightning.metrics.diversity import distinct_n, ngram_counts
from rlhf_lightning.metrics.reward import expected_calibration_error, order_agreement, pairwise_accuracy, pearson

__all__ = [
    "distinct_n",
    "expected_calibration_error",
    "ngram_counts",
    "order_agreement",
    "pairwise_accuracy",
    "pearson",
]
