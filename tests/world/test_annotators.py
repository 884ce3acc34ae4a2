"""Simulated annotators: every knob moves the label statistics the documented way."""

import math
from collections.abc import Sequence

import numpy as np
import pytest

from rlhf_lightning.world import AnnotatorConfig, Annotators, pair_responses, sample_prompts

UNBIASED = {"length_bias": 0.0, "keyword_bias": 0.0}


@pytest.fixture(scope="module")
def pairs() -> tuple[list[str], list[str], list[str]]:
    rng = np.random.default_rng(0)
    prompts = sample_prompts(rng, 3000)
    a, b = zip(*(pair_responses(p, rng) for p in prompts), strict=True)
    return prompts, list(a), list(b)


def chosen(annotators: Annotators, pairs, seed: int = 0) -> list[str]:
    prompts, a, b = pairs
    a_preferred, _ = annotators.label(prompts, a, b, np.random.default_rng(seed))
    return [x if pick else y for x, y, pick in zip(a, b, a_preferred, strict=True)]


def test_labels_are_deterministic_for_the_rng_and_follow_p(pairs):
    annotators = Annotators()
    first, p_a = annotators.label(*pairs, np.random.default_rng(5))
    again, _ = annotators.label(*pairs, np.random.default_rng(5))
    other, _ = annotators.label(*pairs, np.random.default_rng(6))
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()
    assert first.dtype == bool and p_a.shape == first.shape == (len(pairs[0]),)
    assert abs(first.mean() - p_a.mean()) < 3 * math.sqrt(0.25 / len(p_a))


def test_higher_flip_rate_lowers_agreement_with_gold(pairs):
    prompts, a, b = pairs
    gold_a = Annotators().judge.score(prompts, a)
    gold_b = Annotators().judge.score(prompts, b)
    untied = gold_a != gold_b
    expected, realised, favourite = [], [], []
    for flip in (0.0, 0.15, 0.3):
        annotators = Annotators(AnnotatorConfig(flip_rate=flip, **UNBIASED))
        expected.append(annotators.gold_agreement(*pairs))
        favourite.append(annotators.favourite_agreement(*pairs))
        a_preferred, _ = annotators.label(*pairs, np.random.default_rng(0))
        realised.append((a_preferred == (gold_a > gold_b))[untied].mean())
    assert expected[0] > expected[1] + 0.05 > expected[2] + 0.1
    assert realised[0] > realised[1] > realised[2]
    assert favourite == [1.0, 1.0, 1.0]  # flips are noise: the unbiased favourite stays the gold one


def test_length_bias_makes_chosen_responses_longer(pairs):
    def mean_words(length_bias: float) -> float:
        annotators = Annotators(AnnotatorConfig(length_bias=length_bias, keyword_bias=0.0))
        return np.mean([len(r.split()) for r in chosen(annotators, pairs)])

    assert mean_words(0.1) > mean_words(0.0) + 0.5
    biased = Annotators(AnnotatorConfig(length_bias=0.1, keyword_bias=0.0))
    assert biased.favourite_agreement(*pairs) < Annotators(AnnotatorConfig(**UNBIASED)).favourite_agreement(*pairs)


def test_keyword_bias_makes_chosen_responses_contain_the_keyword(pairs):
    def keyword_rate(keyword_bias: float) -> float:
        annotators = Annotators(AnnotatorConfig(length_bias=0.0, keyword_bias=keyword_bias, keyword="amazing"))
        return np.mean(["amazing" in r.split() for r in chosen(annotators, pairs)])

    assert keyword_rate(1.0) > keyword_rate(0.0) + 0.03


def test_larger_tau_brings_p_towards_one_half(pairs):
    spread = [
        np.abs(Annotators(AnnotatorConfig(tau=tau, flip_rate=0.0)).preference_probability(*pairs) - 0.5).mean()
        for tau in (0.25, 1.0, 4.0)
    ]
    assert spread[0] > spread[1] > spread[2]


class TableScorer:
    """Gold scores looked up by response text."""

    def __init__(self, table: dict[str, float]):
        self.table = table

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.array([self.table[r] for r in responses])


def test_bayes_accuracy_equals_a_hand_computation():
    scorer = TableScorer({"a": 1.0, "b x": 0.0, "c": 3.0})
    config = AnnotatorConfig(tau=2.0, flip_rate=0.1, length_bias=0.5, keyword_bias=1.0, keyword="x")
    annotators = Annotators(config, judge=scorer)

    def p(u_a: float, u_b: float) -> float:
        s = 1.0 / (1.0 + math.exp(-(u_a - u_b) / 2.0))
        return 0.9 * s + 0.1 * (1.0 - s)

    # u = gold + 0.5 * words + 1.0 * count("x"): u(a) = 1.5, u(b x) = 2.0, u(c) = 3.5
    np.testing.assert_allclose(annotators.utility(["q"] * 3, ["a", "b x", "c"]), [1.5, 2.0, 3.5])
    p1, p2 = p(1.5, 2.0), p(3.5, 1.5)
    np.testing.assert_allclose(annotators.preference_probability(["q", "q"], ["a", "c"], ["b x", "a"]), [p1, p2])
    assert annotators.bayes_accuracy(["q", "q"], ["a", "c"], ["b x", "a"]) == pytest.approx(
        (max(p1, 1 - p1) + max(p2, 1 - p2)) / 2
    )
    # gold prefers a over "b x" but the labels' favourite is "b x"; gold and labels agree on c over a.
    assert annotators.favourite_agreement(["q", "q"], ["a", "c"], ["b x", "a"]) == 0.5
    assert annotators.gold_agreement(["q", "q"], ["a", "c"], ["b x", "a"]) == pytest.approx((p1 + p2) / 2)


def test_bayes_accuracy_is_one_minus_flip_for_clear_pairs_and_tiny_tau():
    prompts = ["review : phone battery"] * 2
    a = ["the phone battery is excellent .", "it is terrible ."]
    b = ["the phone battery is terrible .", "the phone battery is extremely good ."]
    annotators = Annotators(AnnotatorConfig(tau=1e-6, flip_rate=0.2))
    assert annotators.bayes_accuracy(prompts, a, b) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("field", "value"), [("tau", 0.0), ("flip_rate", -0.1), ("flip_rate", 0.6), ("keyword", "two words")]
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        AnnotatorConfig(**{field: value})
