"""Simulated annotators: Bradley-Terry noise around a biased utility, so a proxy reward model inherits real flaws.

An annotator's utility of a response is the gold score plus a taste for length and for a keyword,

    u(x) = gold(x) + length_bias * n_words(x) + keyword_bias * count(keyword, x),

and a pair (A, B) is labelled "A preferred" with probability

    p_A = (1 - flip) * sigmoid((u(A) - u(B)) / tau) + flip * (1 - sigmoid((u(A) - u(B)) / tau)).

tau sets the noise of honest judgements, flip the rate of labels that are simply wrong (mis-clicks, swapped pairs),
and the two biases make the annotators' favourite differ from the gold judge's. No predictor of the labels can beat
the Bayes accuracy mean(max(p_A, 1 - p_A)): that is the ceiling of a reward model's accuracy on held-out labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from rlhf_lightning.world.judge import GoldJudge


class Scorer(Protocol):
    """Anything that scores responses to prompts like :meth:`GoldJudge.score`. Only pairs labelled with ``ended``
    call it with a third argument (:meth:`GoldJudge.score`'s ``ended``); otherwise every response counts as ended."""

    def score(self, prompts: Sequence[str], responses: Sequence[str], *ended: Sequence[bool]) -> np.ndarray: ...


#: Whether each response of a pair ended with EOS: ((B,) for a, (B,) for b); None means all ended.
Ended = tuple[Sequence[bool], Sequence[bool]] | None


@dataclass
class AnnotatorConfig:
    """Knobs of the simulated annotators (see the module docstring for the formula).

    Args:
        tau: Bradley-Terry temperature (> 0); larger is noisier, p_A closer to 0.5.
        flip_rate: probability in [0, 0.5] that a label is inverted whatever the responses.
        length_bias: utility added per word; > 0 prefers longer responses.
        keyword_bias: utility added per occurrence of keyword.
        keyword: the word the annotators are partial to.
    """

    tau: float = 1.0
    flip_rate: float = 0.05
    length_bias: float = 0.02
    keyword_bias: float = 0.2
    keyword: str = "excellent"

    def __post_init__(self) -> None:
        if not self.tau > 0:
            raise ValueError(f"AnnotatorConfig.tau must be > 0, got {self.tau}")
        # Past 0.5 the labels would favour the worse response: that is a different bias, not noise.
        if not 0.0 <= self.flip_rate <= 0.5:
            raise ValueError(f"AnnotatorConfig.flip_rate must be in [0, 0.5], got {self.flip_rate}")
        if len(self.keyword.split()) != 1 or self.keyword != self.keyword.strip():
            raise ValueError(f"AnnotatorConfig.keyword must be one word, got {self.keyword!r}")


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # The tanh form does not overflow for the huge arguments a tiny tau gives.
    return 0.5 * (1.0 + np.tanh(0.5 * x))


class Annotators:
    """A pool of simulated annotators that label preference pairs.

    Args:
        config: the knobs; defaults to :class:`AnnotatorConfig`.
        judge: the gold scorer under the utility; defaults to a :class:`GoldJudge` with its default config.
    """

    def __init__(self, config: AnnotatorConfig | None = None, judge: Scorer | None = None):
        self.config = config or AnnotatorConfig()
        self.judge = judge or GoldJudge()

    def utility(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """(B,) float64 u(x) = gold + length_bias * n_words + keyword_bias * count(keyword)."""
        return np.asarray(self.judge.score(prompts, responses), dtype=np.float64) + self._taste(responses)

    def preference_probability(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], ended: Ended = None
    ) -> np.ndarray:
        """(B,) float64 p_A, the probability that a label prefers a[i] over b[i]. ended: see :data:`Ended` (the
        gold judge penalises a response that did not end; sampled responses can lack EOS, the grammar's never do)."""
        return self._against_gold(prompts, a, b, ended)[0]

    def label(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], rng: np.random.Generator, ended: Ended = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One label per pair: (a_preferred (B,) bool drawn with probability p_A from rng, p_A (B,) float64)."""
        p_a = self.preference_probability(prompts, a, b, ended)
        return rng.random(len(p_a)) < p_a, p_a

    def bayes_accuracy(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], ended: Ended = None) -> float:
        """mean(max(p_A, 1 - p_A)): the expected accuracy on these pairs' labels of the best possible predictor."""
        p_a = self.preference_probability(prompts, a, b, ended)
        return float(np.maximum(p_a, 1.0 - p_a).mean())

    def gold_agreement(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
        """The expected fraction of labels that agree with the gold judge's order, mean over pairs the judge does not
        tie of (p_A if gold(a) > gold(b) else 1 - p_A). Noise (tau, flips) and bias both lower it; NaN when the judge
        ties every pair."""
        p_a, gold_diff = self._against_gold(prompts, a, b)
        untied = gold_diff != 0
        return float(np.where(gold_diff > 0, p_a, 1.0 - p_a)[untied].mean()) if untied.any() else float("nan")

    def favourite_agreement(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> float:
        """The fraction of pairs the judge does not tie on which the labels' favourite (p_A > 0.5, or < 0.5) is the
        judge's; a tie p_A = 0.5 counts one half. Noise leaves it alone (flips below 0.5 never change the favourite):
        it measures the bias that a perfect reward model of these labels would still have. NaN when all are tied."""
        p_a, gold_diff = self._against_gold(prompts, a, b)
        untied = gold_diff != 0
        agree = np.where(p_a == 0.5, 0.5, (p_a > 0.5) == (gold_diff > 0))
        return float(agree[untied].mean()) if untied.any() else float("nan")

    def _taste(self, responses: Sequence[str]) -> np.ndarray:
        """(B,) float64 length_bias * n_words + keyword_bias * count(keyword): what the annotators add to gold."""
        c = self.config
        words = [r.split() for r in responses]
        return np.array([c.length_bias * len(w) + c.keyword_bias * w.count(c.keyword) for w in words], dtype=np.float64)

    def _against_gold(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str], ended: Ended = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(p_A, gold(a) - gold(b)), each (B,) float64, scoring each response once."""
        if not len(prompts) == len(a) == len(b):
            raise ValueError(f"prompts, a and b differ in length: {len(prompts)}, {len(a)}, {len(b)}")
        ended_a, ended_b = ((e,) for e in ended) if ended is not None else ((), ())
        gold_a = np.asarray(self.judge.score(prompts, a, *ended_a), np.float64)
        gold_diff = gold_a - self.judge.score(prompts, b, *ended_b)
        s = _sigmoid((gold_diff + self._taste(a) - self._taste(b)) / self.config.tau)
        return (1.0 - self.config.flip_rate) * s + self.config.flip_rate * (1.0 - s), gold_diff
