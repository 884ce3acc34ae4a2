"""The review language: its lexicon, its grammar (as a generator and as a recogniser) and its prompts.

Prompts name a product and optionally one of its aspects, in one of a few phrasings (at most 6 words)::

    review : phone battery        write a review : blender        how is the laptop keyboard

Responses are one or more sentences; words are lowercase and separated by single spaces, "." is a word of its own::

    sentence    := [opener] clause "."
    clause      := subject "is" adjectives | "i" ["do" "not"] verb object
    subject     := determiner noun_phrase | "it"          (object: the same)
    noun_phrase := product [aspect] | aspect | generic
    adjectives  := graded ["and" graded]
    graded      := ["not"] [intensifier] adjective

e.g. "the phone battery is very good . i do not like the phone screen ." The language is regular, so the recogniser
(:func:`parse`) is a finite automaton over word classes, run for a whole batch at once in numpy.

Meaning of a clause (read by the gold judge): its adjective's or verb's polarity (terrible -3 ... excellent +3,
hate -3 ... love +3) times the intensifier's strength (1 without one), or times NEGATION when "not" precedes, which
drops the intensifier: "not very good" is as mild a complaint as "not good".

Distributions (:class:`ResponseStyle`). SFT demonstrations (:data:`DEMO_STYLE`) are decent but not optimal: sentiment
mostly mildly positive, sometimes negative, sometimes off-topic or not specific, 1-3 sentences, always well-formed.
Preference-pair candidates (:data:`PAIR_STYLE`) are broad but realistic: any sentiment, 1-4 sentences, occasional
mild repetition (one repeated sentence) and occasional off-topic sentences, always well-formed and ended. They
deliberately never contain extreme repetition, extreme length or malformed text, as real raters are rarely shown
degenerate samples: a reward model trained on these pairs has no evidence about those regions and can rate them
highly, while the gold judge penalises them, so a policy that optimises the proxy hard can reach them. That is how
reward hacking becomes reachable in this world.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, chain
from typing import NamedTuple

import numpy as np

# ---------------------------------------------------------------------------------------------------------------------
# Lexicon
# ---------------------------------------------------------------------------------------------------------------------

#: Each product and the aspects that make sense for it (several aspects are shared).
PRODUCT_ASPECTS: dict[str, tuple[str, ...]] = {
    "phone": ("battery", "screen", "price", "design"),
    "laptop": ("battery", "keyboard", "screen", "speed", "weight"),
    "blender": ("motor", "noise", "lid", "price"),
    "camera": ("lens", "battery", "zoom", "weight"),
    "headset": ("sound", "comfort", "battery", "noise"),
    "kettle": ("lid", "handle", "price", "design"),
    "backpack": ("zipper", "strap", "fabric", "size"),
    "watch": ("strap", "battery", "display", "design"),
    "speaker": ("sound", "battery", "size", "price"),
    "printer": ("ink", "speed", "noise", "price"),
    "vacuum": ("suction", "noise", "battery", "weight"),
    "tablet": ("screen", "battery", "speed", "size"),
}
PRODUCTS: tuple[str, ...] = tuple(PRODUCT_ASPECTS)
ASPECTS: tuple[str, ...] = tuple(sorted(set(chain.from_iterable(PRODUCT_ASPECTS.values()))))

#: Adjectives by polarity, two per grade so that "x and y" can join two different words of one grade.
ADJECTIVE_GRADES: dict[int, tuple[str, str]] = {
    -3: ("terrible", "awful"),
    -2: ("bad", "poor"),
    -1: ("weak", "mediocre"),
    0: ("okay", "average"),
    1: ("decent", "nice"),
    2: ("good", "great"),
    3: ("excellent", "amazing"),
}
ADJECTIVES: dict[str, int] = {word: grade for grade, words in ADJECTIVE_GRADES.items() for word in words}
VERBS: dict[str, int] = {"love": 3, "like": 2, "recommend": 2, "dislike": -2, "hate": -3}
INTENSIFIERS: dict[str, float] = {"quite": 1.25, "really": 1.5, "very": 1.5, "extremely": 2.0}
#: "not" flips a clause and halves it: "not bad" is mildly positive, "not excellent" mildly negative.
NEGATION = -0.5
OPENERS: tuple[str, ...] = ("overall", "honestly", "also")
DETERMINERS: tuple[str, ...] = ("the", "this")
GENERIC_NOUNS: tuple[str, ...] = ("product", "thing")
PROMPT_TEMPLATES: tuple[str, ...] = (
    "review : {}",
    "write a review : {}",
    "review the {}",
    "thoughts on the {}",
    "how is the {}",
)

# Word classes: the alphabet of the recogniser. Words only prompts use fall in "other", like unknown words.
_WORD_CLASS: dict[str, str] = {
    **dict.fromkeys(PRODUCTS, "product"),
    **dict.fromkeys(ASPECTS, "aspect"),
    **dict.fromkeys(GENERIC_NOUNS, "generic"),
    **dict.fromkeys(DETERMINERS, "det"),
    **dict.fromkeys(ADJECTIVES, "adj"),
    **dict.fromkeys(VERBS, "verb"),
    **dict.fromkeys(INTENSIFIERS, "intens"),
    **dict.fromkeys(OPENERS, "opener"),
    **{w: w for w in ("it", "i", "do", "not", "is", "and")},
    ".": "period",
}
_PROMPT_WORDS = {w for template in PROMPT_TEMPLATES for w in template.split() if w != "{}"}

#: Every word any generator can produce (prompts and responses), sorted. Never a special token.
WORDS: tuple[str, ...] = tuple(sorted(_WORD_CLASS.keys() | _PROMPT_WORDS))

# ---------------------------------------------------------------------------------------------------------------------
# Recogniser: the grammar above as a finite automaton over word classes
# ---------------------------------------------------------------------------------------------------------------------

# state -> {word class -> next state}. A "." listed here ends a well-formed sentence; a "." anywhere else ends a
# malformed one. Either way the next sentence starts afresh, so one bad sentence does not spoil the rest.
_TRANSITIONS: dict[str, dict[str, str]] = {
    "start": {"opener": "opened", "det": "det", "it": "subject", "i": "i"},
    "opened": {"det": "det", "it": "subject", "i": "i"},
    "det": {"product": "product", "aspect": "subject", "generic": "subject"},
    "product": {"aspect": "subject", "is": "is"},
    "subject": {"is": "is"},
    "is": {"not": "not", "intens": "intens", "adj": "adj"},
    "not": {"intens": "intens", "adj": "adj"},
    "intens": {"adj": "adj"},
    "adj": {"and": "and", "period": "start"},
    "and": {"not": "not2", "intens": "intens2", "adj": "adj2"},
    "not2": {"intens": "intens2", "adj": "adj2"},
    "intens2": {"adj": "adj2"},
    "adj2": {"period": "start"},
    "i": {"do": "do", "verb": "verb"},
    "do": {"not": "do_not"},
    "do_not": {"verb": "verb"},
    "verb": {"it": "object", "det": "object_det"},
    "object_det": {"product": "object_product", "aspect": "object", "generic": "object"},
    "object_product": {"aspect": "object", "period": "start"},
    "object": {"period": "start"},
}
_STATES = (*_TRANSITIONS, "error")
_CLASSES = ("other", "pad", *sorted(set(_WORD_CLASS.values())))
_START = _STATES.index("start")
_PERIOD_CLASS = _CLASSES.index("period")


def _compile_automaton() -> tuple[np.ndarray, np.ndarray]:
    """(table (states, classes) of next states, accepts_end (states,) bool)."""
    table = np.full((len(_STATES), len(_CLASSES)), _STATES.index("error"), dtype=np.int64)
    table[:, _CLASSES.index("pad")] = np.arange(len(_STATES))  # padding after the text leaves the state as it is
    table[:, _PERIOD_CLASS] = _START
    for state, edges in _TRANSITIONS.items():
        for cls, nxt in edges.items():
            table[_STATES.index(state), _CLASSES.index(cls)] = _STATES.index(nxt)
    accepts_end = np.array([state in _TRANSITIONS and "period" in _TRANSITIONS[state] for state in _STATES])
    return table, accepts_end


_TABLE, _ACCEPTS_END = _compile_automaton()

#: Token ids of the vectorised code: WORDS[i] has id i, then one id for any unknown word and one for padding.
WORD_ID: dict[str, int] = {w: i for i, w in enumerate(WORDS)}
UNKNOWN_ID = len(WORDS)
PAD_ID = UNKNOWN_ID + 1
N_IDS = PAD_ID + 1
PERIOD_ID = WORD_ID["."]
_ID_CLASS = np.array(
    [_CLASSES.index(_WORD_CLASS.get(w, "other")) for w in WORDS] + [_CLASSES.index("other"), _CLASSES.index("pad")]
)
_HASH_BASE = np.uint64(1_000_003)


def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Word ids of whitespace-split texts, right-padded with PAD_ID: ids (B, T) int64 with T >= 1, lengths (B,)."""
    rows = [[WORD_ID.get(w, UNKNOWN_ID) for w in text.split()] for text in texts]
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    ids = np.full((len(rows), max(int(lengths.max(initial=0)), 1)), PAD_ID, dtype=np.int64)
    ids[np.arange(ids.shape[1]) < lengths[:, None]] = np.fromiter(
        chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum())
    )
    return ids, lengths


class Parse(NamedTuple):
    """A batch of texts read by the recogniser. A sentence is a run of words ending at a "." or at the end of text.

    Fields:
        ids: (B, T) word ids (see :func:`encode`); lengths: (B,) words per text.
        sentence_ok: (B, T) a well-formed sentence ends at this ".".
        in_ok_sentence: (B, T) the word belongs to a well-formed sentence.
        sentence_keys: (B, T) uint64 hash of the sentence ending at this word; meaningful where ids == PERIOD_ID.
        n_sentences: (B,) sentences, counting a trailing fragment without "."; n_malformed: (B,) of them not parsing.
    """

    ids: np.ndarray
    lengths: np.ndarray
    sentence_ok: np.ndarray
    in_ok_sentence: np.ndarray
    sentence_keys: np.ndarray
    n_sentences: np.ndarray
    n_malformed: np.ndarray

    @property
    def well_formed(self) -> np.ndarray:
        """(B,) bool: at least one sentence and every sentence parses (so the text ends with ".")."""
        return (self.n_malformed == 0) & (self.n_sentences > 0)


def parse(texts: Sequence[str]) -> Parse:
    """Runs the grammar's automaton over a batch of texts; one numpy step per word position, vectorised over texts."""
    ids, lengths = encode(texts)
    n, width = ids.shape
    classes = np.ascontiguousarray(_ID_CLASS[ids].T)  # (T, B): one contiguous row per step
    word_keys = np.ascontiguousarray(ids.T).astype(np.uint64) + np.uint64(1)  # (T, B); no word hashes as 0
    ok = np.empty((width, n), dtype=bool)
    keys = np.empty((width, n), dtype=np.uint64)
    state = np.full(n, _START, dtype=np.int64)
    h = np.zeros(n, dtype=np.uint64)
    for t in range(width):
        period = classes[t] == _PERIOD_CLASS
        ok[t] = period & _ACCEPTS_END[state]
        h = h * _HASH_BASE + word_keys[t]  # wraps modulo 2^64: a polynomial hash of the sentence so far
        keys[t] = h
        h[period] = 0
        state = _TABLE[state, classes[t]]
    ok, keys = ok.T, keys.T  # (B, T)
    periods = ids == PERIOD_ID
    # Each word inherits the verdict of the "." that ends its sentence (none for a trailing fragment).
    end_at = np.where(periods, np.arange(width), width)
    end_at = np.minimum.accumulate(end_at[:, ::-1], axis=1)[:, ::-1]
    in_ok = np.take_along_axis(np.concatenate([ok, np.zeros((n, 1), dtype=bool)], axis=1), end_at, axis=1)
    # Only "." leads back to the start state, so ending anywhere else means a trailing fragment.
    n_sentences = periods.sum(1) + (state != _START)
    return Parse(ids, lengths, ok, in_ok, keys, n_sentences, n_sentences - ok.sum(1))


# ---------------------------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------------------------


def all_prompts() -> list[str]:
    """Every distinct prompt of the world: each template, for each product alone and with each of its aspects."""
    topics = [
        p for product, aspects in PRODUCT_ASPECTS.items() for p in (product, *(f"{product} {a}" for a in aspects))
    ]
    return [template.format(topic) for template in PROMPT_TEMPLATES for topic in topics]


def sample_prompts(rng: np.random.Generator, n: int) -> list[str]:
    """n prompts drawn uniformly, with replacement, from :func:`all_prompts`."""
    pool = all_prompts()
    return [pool[i] for i in rng.integers(len(pool), size=n)]


@lru_cache(maxsize=4096)
def parse_prompt(prompt: str) -> tuple[str, str | None]:
    """(product, asked aspect or None) of a prompt; ValueError unless it names one product and at most one aspect
    of that product."""
    words = prompt.split()
    products = [w for w in words if w in PRODUCT_ASPECTS]
    aspects = [w for w in words if w in _WORD_CLASS and _WORD_CLASS[w] == "aspect"]
    if len(products) != 1:
        raise ValueError(f"prompt {prompt!r} must name exactly one product of the review world, one of {PRODUCTS}")
    product = products[0]
    if len(aspects) > 1 or (aspects and aspects[0] not in PRODUCT_ASPECTS[product]):
        raise ValueError(f"prompt {prompt!r} may name at most one aspect of {product}: {PRODUCT_ASPECTS[product]}")
    return product, aspects[0] if aspects else None


# ---------------------------------------------------------------------------------------------------------------------
# Response generators
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResponseStyle:
    """The distribution of a family of generated responses (all of them well-formed).

    Args:
        sentence_weights: relative weights of 1, 2, ... sentences.
        polarity_weights: relative weights of the grades -3 ... +3 of each sentence's adjectives (or verb's sign).
        topic_weights: relative weights of a noun phrase being generic ("it", "this thing"), the product, an aspect,
            or the product with an aspect.
        p_asked_aspect: an aspect is the asked one (when the prompt asks one) rather than another of the product's.
        p_opener, p_opinion, p_negation, p_intensifier, p_and: per sentence, an opener word; an "i ... verb ..."
            clause instead of "... is adjective" (never for grade 0); "not"; an intensifier (never for grade 0);
            a second adjective joined by "and".
        p_off_topic: per response, one sentence is about another product.
        p_repeat: per response of 2+ sentences, its last sentence repeats an earlier one.
    """

    sentence_weights: tuple[float, ...]
    polarity_weights: tuple[float, ...]
    topic_weights: tuple[float, float, float, float]
    p_asked_aspect: float
    p_opener: float
    p_opinion: float
    p_negation: float
    p_intensifier: float
    p_and: float
    p_off_topic: float
    p_repeat: float

    def __post_init__(self) -> None:
        if len(self.polarity_weights) != len(ADJECTIVE_GRADES):
            raise ValueError(f"polarity_weights needs {len(ADJECTIVE_GRADES)} weights (grades -3..3)")


DEMO_STYLE = ResponseStyle(
    sentence_weights=(0.3, 0.45, 0.25),
    polarity_weights=(0.04, 0.06, 0.1, 0.15, 0.25, 0.28, 0.12),
    topic_weights=(0.3, 0.3, 0.25, 0.15),
    p_asked_aspect=0.6,
    p_opener=0.15,
    p_opinion=0.2,
    p_negation=0.1,
    p_intensifier=0.3,
    p_and=0.15,
    p_off_topic=0.1,
    p_repeat=0.0,
)
PAIR_STYLE = ResponseStyle(
    sentence_weights=(0.25, 0.35, 0.25, 0.15),
    polarity_weights=(1, 1, 1, 1, 1, 1, 1),
    topic_weights=(0.3, 0.3, 0.2, 0.2),
    p_asked_aspect=0.5,
    p_opener=0.15,
    p_opinion=0.2,
    p_negation=0.15,
    p_intensifier=0.35,
    p_and=0.2,
    p_off_topic=0.15,
    p_repeat=0.1,
)

_GRADES = tuple(ADJECTIVE_GRADES)
_VERBS_BY_SIGN = {1: tuple(v for v, p in VERBS.items() if p > 0), -1: tuple(v for v, p in VERBS.items() if p < 0)}
_TOPICS = ("generic", "product", "aspect", "product_aspect")


def _uniforms(rng: np.random.Generator, block: int = 64) -> Iterator[float]:
    """Uniforms from rng in blocks: one Generator call per block, as each call costs microseconds."""
    while True:
        yield from rng.random(block).tolist()


def _pick(options: Sequence[str], u: float) -> str:
    return options[int(u * len(options))]


def _weighted(weights: Sequence[float], u: float) -> int:
    """Index drawn with probability proportional to weights, from one uniform u in [0, 1)."""
    cum = list(accumulate(weights))
    return bisect.bisect_right(cum, u * cum[-1])


def _noun_phrase(
    u: Iterator[float], product: str, aspect: str | None, style: ResponseStyle, off_topic: bool
) -> list[str]:
    if off_topic:
        other = _pick([p for p in PRODUCTS if p != product], next(u))
        phrase = [other, _pick(PRODUCT_ASPECTS[other], next(u))] if next(u) < 0.5 else [other]
        return [_pick(DETERMINERS, next(u)), *phrase]
    topic = _TOPICS[_weighted(style.topic_weights, next(u))]
    if topic == "generic":
        return ["it"] if next(u) < 0.5 else [_pick(DETERMINERS, next(u)), _pick(GENERIC_NOUNS, next(u))]
    asked = aspect is not None and next(u) < style.p_asked_aspect
    named = aspect if asked else _pick(PRODUCT_ASPECTS[product], next(u))
    phrase = {"product": [product], "aspect": [named], "product_aspect": [product, named]}[topic]
    return [_pick(DETERMINERS, next(u)), *phrase]


def _graded(u: Iterator[float], grade: int, style: ResponseStyle, which: int) -> list[str]:
    words = ["not"] if next(u) < style.p_negation else []
    if grade != 0 and next(u) < style.p_intensifier:
        words.append(_pick(tuple(INTENSIFIERS), next(u)))
    return [*words, ADJECTIVE_GRADES[grade][which]]


def _sentence(u: Iterator[float], product: str, aspect: str | None, style: ResponseStyle, off_topic: bool) -> list[str]:
    words = [_pick(OPENERS, next(u))] if next(u) < style.p_opener else []
    grade = _GRADES[_weighted(style.polarity_weights, next(u))]
    if grade != 0 and next(u) < style.p_opinion:
        negated = ["do", "not"] if next(u) < style.p_negation else []
        verb = _pick(_VERBS_BY_SIGN[1 if grade > 0 else -1], next(u))
        return [*words, "i", *negated, verb, *_noun_phrase(u, product, aspect, style, off_topic), "."]
    which = int(next(u) * 2)
    words += [*_noun_phrase(u, product, aspect, style, off_topic), "is", *_graded(u, grade, style, which)]
    if next(u) < style.p_and:
        words += ["and", *_graded(u, grade, style, 1 - which)]
    return [*words, "."]


def sample_response(prompt: str, rng: np.random.Generator, style: ResponseStyle) -> str:
    """One well-formed response to prompt, drawn from style."""
    product, aspect = parse_prompt(prompt)
    u = _uniforms(rng)
    n = 1 + _weighted(style.sentence_weights, next(u))
    off_topic_at = int(next(u) * n) if next(u) < style.p_off_topic else -1
    sentences = [_sentence(u, product, aspect, style, i == off_topic_at) for i in range(n)]
    if n >= 2 and next(u) < style.p_repeat:
        sentences[-1] = sentences[int(next(u) * (n - 1))]
    return " ".join(chain.from_iterable(sentences))


def demo_response(prompt: str, rng: np.random.Generator) -> str:
    """An SFT demonstration: decent, not optimal (see :data:`DEMO_STYLE`)."""
    return sample_response(prompt, rng, DEMO_STYLE)


def pair_responses(prompt: str, rng: np.random.Generator) -> tuple[str, str]:
    """Two independent candidates for a preference pair (see :data:`PAIR_STYLE` and the module docstring)."""
    return sample_response(prompt, rng, PAIR_STYLE), sample_response(prompt, rng, PAIR_STYLE)


def ideal_response(prompt: str) -> str:
    """A hand-written response that reaches the gold judge's maximum up to rounding: on-topic, specific, as positive
    as the language allows, 12 words (the ideal length), no repeated 4-gram."""
    product, aspect = parse_prompt(prompt)
    return f"the {product} {aspect or PRODUCT_ASPECTS[product][0]} is extremely excellent . it is extremely amazing ."
