"""The gold judge: the stand-in for human raters. Training never sees it by default; diagnostics compare against it.

It reads a batch of (prompt, response, ended) triples with the grammar's automaton (:func:`grammar.parse`) and
scores every term with numpy over a padded (B, T) matrix of word ids, so it costs microseconds per response.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from rlhf_lightning.world.grammar import (
    ADJECTIVES,
    ASPECTS,
    INTENSIFIERS,
    N_IDS,
    NEGATION,
    PAD_ID,
    PERIOD_ID,
    PRODUCT_ASPECTS,
    PRODUCTS,
    VERBS,
    WORD_ID,
    parse,
    parse_prompt,
)

#: The names of :meth:`GoldJudge.components`, in the order of the score's formula.
COMPONENTS = ("sentiment", "on_topic", "off_topic", "specificity", "well_formed", "repetition", "length", "eos")


@dataclass
class JudgeConfig:
    """Weights and shapes of the gold judge's terms (see :class:`GoldJudge` for the formula).

    Args:
        sentiment_weight, sentiment_scale: w_sent and s in w_sent * tanh(mean clause value / s).
        on_topic_weight: w_on, for naming the prompt's product.
        off_topic_weight: w_off, per noun of another product or aspect foreign to the prompt's product.
        specificity_weight: w_spec, for naming the asked aspect (any of the product's aspects when none is asked).
        malformed_weight: w_mal, times the fraction of sentences that do not parse.
        repetition_weight: w_rep, times (repeated-sentence fraction + repeated-n-gram fraction).
        extreme_repetition_weight, extreme_repetition_threshold: w_ext and theta of the extra penalty for
            n-gram repetition beyond theta, reaching w_ext when every n-gram is a repeat.
        ngram: n of the repeated-n-gram fraction.
        ideal_words: L, the ideal length in words ("." included): about two sentences.
        short_weight: w_short, times the relative shortfall below L.
        long_weight: w_long, times the squared relative excess over L.
        missing_eos_weight: w_eos, for a response that did not end (no end-of-sequence token).
    """

    sentiment_weight: float = 2.0
    sentiment_scale: float = 3.0
    on_topic_weight: float = 1.0
    off_topic_weight: float = 0.75
    specificity_weight: float = 1.0
    malformed_weight: float = 2.0
    repetition_weight: float = 1.0
    extreme_repetition_weight: float = 3.0
    extreme_repetition_threshold: float = 0.3
    ngram: int = 4
    ideal_words: int = 12
    short_weight: float = 0.6
    long_weight: float = 0.5
    missing_eos_weight: float = 1.0

    def __post_init__(self) -> None:
        # Keys of n-grams are base-N_IDS numbers in an int64.
        if not 1 <= self.ngram <= 8:
            raise ValueError(f"JudgeConfig.ngram must be in [1, 8], got {self.ngram}")
        if not 0.0 <= self.extreme_repetition_threshold < 1.0:
            raise ValueError(
                f"JudgeConfig.extreme_repetition_threshold must be in [0, 1), got {self.extreme_repetition_threshold}"
            )
        if self.ideal_words <= 0 or self.sentiment_scale <= 0:
            raise ValueError("JudgeConfig.ideal_words and sentiment_scale must be > 0")


def _word_table(values: dict[str, float], default: float) -> np.ndarray:
    """(N_IDS,) float64: values[word] at the word's id, default elsewhere."""
    table = np.full(N_IDS, default)
    for word, value in values.items():
        table[WORD_ID[word]] = value
    return table


def _is_word(words: Iterable[str]) -> np.ndarray:
    """(N_IDS,) bool: the id is one of words."""
    return np.isin(np.arange(N_IDS), [WORD_ID[w] for w in words])


def _topic_tables() -> tuple[np.ndarray, np.ndarray]:
    """(products, N_IDS) bool tables: the aspects of each product, and the nouns that are off-topic for it."""
    aspect_of = np.stack([_is_word(PRODUCT_ASPECTS[p]) for p in PRODUCTS])
    off_topic = np.stack([_is_word(w for w in (*PRODUCTS, *ASPECTS) if w != p) for p in PRODUCTS])
    return aspect_of, off_topic & ~aspect_of


_POLARITY = _word_table({**ADJECTIVES, **VERBS}, 0.0)
_CARRIES_SENTIMENT = _is_word((*ADJECTIVES, *VERBS))  # "okay" too: a clause of value 0
_STRENGTH = _word_table(INTENSIFIERS, 1.0)
_IS_INTENSIFIER = _is_word(INTENSIFIERS)
_IS_NOT = _is_word(["not"])
_PRODUCT_ID = np.array([WORD_ID[p] for p in PRODUCTS])
_ASPECT_OF, _OFF_TOPIC = _topic_tables()


@lru_cache(maxsize=4096)
def _prompt_key(prompt: str) -> tuple[int, int]:
    """(product index, word id of the asked aspect or -1)."""
    product, aspect = parse_prompt(prompt)
    return PRODUCTS.index(product), WORD_ID[aspect] if aspect else -1


def _repeats_per_row(keys: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B,) number of valid entries of each row of keys (B, K) that equal an earlier valid entry of the row."""
    sentinel = np.iinfo(keys.dtype).max  # invalid entries sort last and are never counted
    s = np.sort(np.where(valid, keys, sentinel), axis=1)
    return ((s[:, 1:] == s[:, :-1]) & (s[:, 1:] != sentinel)).sum(1)


def _shift(ids: np.ndarray, k: int) -> np.ndarray:
    """ids (B, T) moved k positions right, PAD_ID coming in: the word k positions before each word."""
    out = np.full_like(ids, PAD_ID)
    out[:, k:] = ids[:, : ids.shape[1] - k]
    return out


class GoldJudge:
    """Scores responses to prompts the way the world's raters would if they were noiseless and unbiased.

    score = sentiment + on_topic + off_topic + specificity + well_formed + repetition + length + eos, with

        sentiment   =  w_sent * tanh(mean over clauses of clause value / s)     (0 without a clause)
        on_topic    =  w_on * [the prompt's product is named]
        off_topic   = -w_off * (number of other products' names and aspects foreign to the product)
        specificity =  w_spec * [the asked aspect is named]    (no aspect asked: any aspect of the product)
        well_formed = -w_mal * malformed sentences / sentences                    (-w_mal for an empty response)
        repetition  = -w_rep * (r_sent + r_ngram) - w_ext * max(0, r_ngram - theta) / (1 - theta)
        length      = -w_short * max(0, 1 - n / L) - w_long * max(0, n / L - 1) ** 2
        eos         = -w_eos * [the response did not end]

    where a clause's value is its polarity times the intensifier's strength, or times NEGATION when negated (see
    grammar), r_sent is the
    fraction of sentences that repeat an earlier sentence, r_ngram the fraction of the response's n-grams that repeat
    an earlier one, and n its number of words. Clauses and nouns are read in well-formed sentences only: the judge
    does not reward what it cannot parse, which already costs the malformed penalty. The best responses score about
    w_sent * tanh(2) + w_on + w_spec (3.93 with the defaults; see :func:`grammar.ideal_response`).

    Args:
        config: the weights; defaults to :class:`JudgeConfig`.
    """

    def __init__(self, config: JudgeConfig | None = None):
        self.config = config or JudgeConfig()

    def well_formed(self, responses: Sequence[str]) -> np.ndarray:
        """(B,) bool: every sentence of the response parses under the grammar (and there is at least one)."""
        return parse(responses).well_formed

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None
    ) -> np.ndarray:
        """(B,) float32 gold scores. ended: (B,) bool, whether each response was ended by an EOS; None: all ended."""
        return sum(self.components(prompts, responses, ended).values()).astype(np.float32)

    def components(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool] | None = None
    ) -> dict[str, np.ndarray]:
        """The terms of :meth:`score` (keys: COMPONENTS), each (B,) float32; they sum to the score."""
        if len(prompts) != len(responses):
            raise ValueError(f"prompts and responses differ in length: {len(prompts)} vs {len(responses)}")
        ended = np.ones(len(responses), dtype=bool) if ended is None else np.asarray(ended, dtype=bool).reshape(-1)
        if ended.shape != (len(responses),):
            raise ValueError(f"ended must have shape ({len(responses)},), got {ended.shape}")
        c = self.config
        keys = np.array([_prompt_key(p) for p in prompts], dtype=np.int64).reshape(-1, 2)
        product, asked = keys[:, 0], keys[:, 1]  # (B,), (B,)

        doc = parse(responses)
        ids, n_words, ok = doc.ids, doc.lengths, doc.in_ok_sentence  # (B, T), (B,), (B, T)

        # "not" negates the clause word right after it or after "not <intensifier>".
        before, before2 = _shift(ids, 1), _shift(ids, 2)
        negated = _IS_NOT[before] | (_IS_INTENSIFIER[before] & _IS_NOT[before2])
        value = _POLARITY[ids] * np.where(negated, NEGATION, _STRENGTH[before])  # (B, T)
        n_clauses = (_CARRIES_SENTIMENT[ids] & ok).sum(1)
        mean_value = (value * ok).sum(1) / np.maximum(n_clauses, 1)
        sentiment = c.sentiment_weight * np.tanh(mean_value / c.sentiment_scale)

        names_product = ((ids == _PRODUCT_ID[product][:, None]) & ok).any(1)
        names_asked = ((ids == asked[:, None]) & ok).any(1)
        names_any_aspect = (_ASPECT_OF[product[:, None], ids] & ok).any(1)
        specific = np.where(asked >= 0, names_asked, names_any_aspect)
        n_off_topic = (_OFF_TOPIC[product[:, None], ids] & ok).sum(1)

        malformed = np.where(doc.n_sentences > 0, doc.n_malformed / np.maximum(doc.n_sentences, 1), 1.0)

        periods = ids == PERIOD_ID
        r_sent = _repeats_per_row(doc.sentence_keys, periods) / np.maximum(periods.sum(1), 1)
        r_ngram = self._ngram_repeats(ids, n_words)
        theta = c.extreme_repetition_threshold
        repetition = c.repetition_weight * (r_sent + r_ngram) + c.extreme_repetition_weight * np.maximum(
            r_ngram - theta, 0.0
        ) / (1.0 - theta)

        x = n_words / c.ideal_words
        length = c.short_weight * np.maximum(1.0 - x, 0.0) + c.long_weight * np.maximum(x - 1.0, 0.0) ** 2

        terms = {
            "sentiment": sentiment,
            "on_topic": c.on_topic_weight * names_product,
            "off_topic": -c.off_topic_weight * n_off_topic,
            "specificity": c.specificity_weight * specific,
            "well_formed": -c.malformed_weight * malformed,
            "repetition": -repetition,
            "length": -length,
            "eos": -c.missing_eos_weight * ~ended,
        }
        # + 0.0 turns the -0.0 of an absent penalty into 0.0, which reads better in tables.
        return {name: np.asarray(terms[name], dtype=np.float32) + np.float32(0.0) for name in COMPONENTS}

    def _ngram_repeats(self, ids: np.ndarray, n_words: np.ndarray) -> np.ndarray:
        """(B,) fraction of each response's n-grams that repeat an earlier n-gram of it (0 without n-grams)."""
        n = self.config.ngram
        starts = ids.shape[1] - n + 1
        if starts <= 0:
            return np.zeros(len(ids))
        grams = sum(ids[:, k : k + starts] * N_IDS ** (n - 1 - k) for k in range(n))  # (B, T - n + 1) base-N_IDS keys
        n_grams = np.maximum(n_words - n + 1, 0)
        return _repeats_per_row(grams, np.arange(starts) < n_grams[:, None]) / np.maximum(n_grams, 1)
