"""The gold judge: each term moves the score the documented way, vectorised scoring equals scoring one by one."""

import math

import numpy as np
import pytest

from rlhf_lightning.world import COMPONENTS, GoldJudge, JudgeConfig, all_prompts, ideal_response, sample_prompts
from rlhf_lightning.world.grammar import DEMO_STYLE, PAIR_STYLE, sample_response

PROMPT = "review : phone battery"
GOOD = "the phone battery is very good . the phone is great ."


def score(*responses: str, prompt: str = PROMPT, ended=None, config: JudgeConfig | None = None) -> np.ndarray:
    return GoldJudge(config).score([prompt] * len(responses), list(responses), ended)


def test_score_is_the_sum_of_the_components_in_float32():
    rng = np.random.default_rng(0)
    prompts = sample_prompts(rng, 200)
    responses = [sample_response(p, rng, PAIR_STYLE) for p in prompts]
    ended = rng.random(200) < 0.8
    judge = GoldJudge()
    parts = judge.components(prompts, responses, ended)
    total = judge.score(prompts, responses, ended)
    assert tuple(parts) == COMPONENTS
    assert total.dtype == np.float32 and total.shape == (200,)
    assert all(v.dtype == np.float32 and v.shape == (200,) for v in parts.values())
    np.testing.assert_allclose(total, sum(parts.values()), rtol=1e-6, atol=1e-6)


def test_ended_none_means_every_response_ended():
    np.testing.assert_array_equal(score(GOOD, "it is okay ."), score(GOOD, "it is okay .", ended=[True, True]))


def test_missing_eos_costs_its_weight():
    ended, cut = score(GOOD, GOOD, ended=np.array([True, False]))
    assert cut == pytest.approx(ended - JudgeConfig().missing_eos_weight)
    assert score(GOOD, ended=[False], config=JudgeConfig(missing_eos_weight=0.0)) == pytest.approx(ended)


def test_repetition_lowers_the_score_strongly_when_extreme():
    fresh, repeated, extreme = score(
        "the phone battery is very good . the phone is great .",
        "the phone battery is very good . the phone battery is very good .",
        " ".join(["the phone battery is very good ."] * 4),
    )
    assert fresh > repeated + 0.5
    parts = GoldJudge().components([PROMPT] * 2, [GOOD, " ".join(["the phone battery is very good ."] * 4)])
    assert parts["repetition"][0] == 0 and parts["repetition"][1] < -3  # the extreme term kicks in
    assert repeated > extreme + 2


def test_off_topic_nouns_lower_the_score():
    on, other_product, foreign_aspect, two = score(
        GOOD,
        "the phone battery is very good . the blender is great .",
        "the phone battery is very good . the zipper is great .",
        "the phone battery is very good . the blender lid is great .",
    )
    assert on > other_product and on > foreign_aspect
    assert two < other_product  # each foreign noun costs


def test_rambling_past_the_ideal_length_lowers_the_score():
    sentences = [
        "the phone battery is excellent .",
        "the phone screen is amazing .",
        "the phone price is very good .",
        "i love the phone design .",
        "this phone is extremely excellent .",
        "honestly it is great and good .",
        "overall i recommend this product .",
        "also the design is really amazing .",
    ]
    responses = [" ".join(sentences[:k]) for k in (2, 4, 6, 8)]
    scores = score(*responses)
    assert (np.diff(scores) < 0).all(), scores
    length = GoldJudge().components([PROMPT] * 4, responses)["length"]
    assert length[0] == 0 and (np.diff(length) < 0).all()
    assert (np.diff(np.diff(length)) < 0).all()  # the penalty grows faster than the excess


def test_positive_on_topic_specific_beats_neutral_unspecific_and_off_topic():
    ideal, positive, neutral, negative = score(
        ideal_response(PROMPT),
        "the phone battery is excellent . the phone is good .",
        "the phone battery is okay . the phone is average .",
        "the phone battery is terrible . the phone is bad .",
    )
    assert ideal > positive > neutral > negative
    specific, unspecific, generic = score(
        "the phone battery is excellent . the phone is good .",
        "the phone screen is excellent . the phone is good .",
        "the product is excellent . it is good .",
    )
    assert specific > unspecific > generic


def test_negation_flips_and_weakens_and_intensifiers_strengthen():
    parts = GoldJudge().components(
        [PROMPT] * 5,
        [
            "the phone battery is good .",
            "the phone battery is extremely good .",
            "the phone battery is not good .",
            "the phone battery is not very good .",
            "i do not hate the phone battery .",
        ],
    )
    good, extremely, not_good, not_very, not_hate = parts["sentiment"]
    assert extremely > good > 0 > not_good
    assert not_very == pytest.approx(not_good)  # "not" drops the intensifier
    assert not_hate > 0


def test_malformed_text_is_not_well_formed_and_is_not_read():
    judge = GoldJudge()
    malformed = ["the phone battery is is excellent .", "phone battery excellent amazing", "", "the phone battery is"]
    assert not judge.well_formed(malformed).any()
    parts = judge.components([PROMPT] * 4, malformed)
    np.testing.assert_array_equal(parts["well_formed"], -JudgeConfig().malformed_weight)
    for term in ("sentiment", "on_topic", "specificity"):
        np.testing.assert_array_equal(parts[term], 0.0)
    assert (judge.score([PROMPT] * 4, malformed) < score("it is okay .")).all()


def test_half_malformed_costs_half():
    parts = GoldJudge().components([PROMPT], ["the phone battery is good . battery battery ."])
    assert parts["well_formed"][0] == pytest.approx(-JudgeConfig().malformed_weight / 2)
    assert parts["on_topic"][0] == 1  # the parsed sentence is still read


def test_batch_scores_equal_one_by_one():
    rng = np.random.default_rng(1)
    prompts = sample_prompts(rng, 40)
    responses = [sample_response(p, rng, PAIR_STYLE) for p in prompts]
    responses[::7] = [" ".join([r] * 5) for r in responses[::7]]  # long rows widen the padded matrix
    responses[3] = "the phone phone is"
    ended = rng.random(40) < 0.5
    judge = GoldJudge()
    batch = judge.score(prompts, responses, ended)
    single = [judge.score([p], [r], [e])[0] for p, r, e in zip(prompts, responses, ended, strict=True)]
    np.testing.assert_allclose(batch, single, rtol=1e-6)


def test_ideal_response_reaches_the_documented_maximum():
    c = JudgeConfig()
    prompts = all_prompts()
    best = c.sentiment_weight * math.tanh(2.0) + c.on_topic_weight + c.specificity_weight
    np.testing.assert_allclose(GoldJudge().score(prompts, [ideal_response(p) for p in prompts]), best, rtol=1e-6)


def test_demos_are_decent_and_leave_room_for_rlhf():
    rng = np.random.default_rng(2)
    prompts = sample_prompts(rng, 1000)
    demos = [sample_response(p, rng, DEMO_STYLE) for p in prompts]
    judge = GoldJudge()
    parts = judge.components(prompts, demos)
    mean = judge.score(prompts, demos).mean()
    assert 0.5 < mean < judge.score([PROMPT], [ideal_response(PROMPT)])[0] - 2.0
    assert 0.02 < (parts["off_topic"] < 0).mean() < 0.2  # sometimes off-topic
    assert 0.2 < (parts["specificity"] == 0).mean() < 0.8  # sometimes not specific
    assert (parts["sentiment"] < 0).mean() > 0.05  # mixed sentiment


def test_empty_batch():
    assert GoldJudge().score([], []).shape == (0,)


def test_bad_input_raises():
    judge = GoldJudge()
    with pytest.raises(ValueError, match="differ in length"):
        judge.score([PROMPT], [GOOD, GOOD])
    with pytest.raises(ValueError, match="ended"):
        judge.score([PROMPT], [GOOD], [True, False])
    with pytest.raises(ValueError, match="product"):
        judge.score(["review : the weather"], [GOOD])
    with pytest.raises(ValueError, match="ngram"):
        JudgeConfig(ngram=0)
