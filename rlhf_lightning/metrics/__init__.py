"""Diversity and reward-model metrics."""

from rlhf_lightning.metrics.diversity import (
    DistinctN,
    DiversityMetric,
    ExpectationAdjustedDistinct,
    NgramOverlap,
    SelfBLEU,
    distinct_n,
    diversity_metrics,
    duplicate_rate,
    expectation_adjusted_distinct,
    group_sequences,
    ngram_counts,
    ngram_overlap,
    self_bleu,
    token_lists,
)
from rlhf_lightning.metrics.reward import (
    expected_calibration_error,
    order_agreement,
    pairwise_accuracy,
    pearson,
    win_rate,
)

__all__ = [
    "DistinctN",
    "DiversityMetric",
    "ExpectationAdjustedDistinct",
    "NgramOverlap",
    "SelfBLEU",
    "distinct_n",
    "diversity_metrics",
    "duplicate_rate",
    "expectation_adjusted_distinct",
    "expected_calibration_error",
    "group_sequences",
    "ngram_counts",
    "ngram_overlap",
    "order_agreement",
    "pairwise_accuracy",
    "pearson",
    "self_bleu",
    "token_lists",
    "win_rate",
]
