"""The review language: its vocabulary, prompts, generators and recogniser."""

import numpy as np
import pytest

from rlhf_lightning.world import (
    PRODUCT_ASPECTS,
    WORDS,
    all_prompts,
    demo_response,
    ideal_response,
    pair_responses,
    parse_prompt,
    sample_prompts,
)
from rlhf_lightning.world.grammar import ADJECTIVES, parse


def _sample(seed: int, n: int = 300) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    rng = np.random.default_rng(seed)
    prompts = sample_prompts(rng, n)
    return prompts, [demo_response(p, rng) for p in prompts], [pair_responses(p, rng) for p in prompts]


def test_vocabulary_is_small_sorted_lowercase_and_free_of_special_tokens():
    assert len(WORDS) <= 250
    assert list(WORDS) == sorted(set(WORDS))
    assert "." in WORDS
    for word in WORDS:
        assert word and word == word.lower() and word.split() == [word]
        assert not set(word) & set("<>[]|"), f"{word!r} looks like a special token"


def test_products_have_three_to_five_aspects_some_shared():
    assert len(PRODUCT_ASPECTS) == 12
    assert all(3 <= len(aspects) <= 5 for aspects in PRODUCT_ASPECTS.values())
    assert sum("battery" in aspects for aspects in PRODUCT_ASPECTS.values()) > 1


def test_every_prompt_names_one_product_and_fits_six_words():
    prompts = all_prompts()
    assert len(set(prompts)) == len(prompts) >= 200
    with_aspect = 0
    for prompt in prompts:
        product, aspect = parse_prompt(prompt)
        assert product in prompt.split() and len(prompt.split()) <= 6
        assert aspect is None or aspect in PRODUCT_ASPECTS[product]
        with_aspect += aspect is not None
    assert 0 < with_aspect < len(prompts)


@pytest.mark.parametrize(
    "prompt",
    ["review : the weather", "review : phone laptop", "review : phone zipper", "review : phone battery screen"],
)
def test_parse_prompt_rejects_prompts_outside_the_world(prompt):
    with pytest.raises(ValueError, match="prompt"):
        parse_prompt(prompt)


def test_generation_is_deterministic_for_a_seed_and_differs_across_seeds():
    assert _sample(3) == _sample(3)
    assert _sample(3) != _sample(4)


def test_generated_text_uses_only_words_with_single_spaces():
    prompts, demos, pairs = _sample(0)
    texts = [*prompts, *demos, *(r for pair in pairs for r in pair), *map(ideal_response, all_prompts())]
    for text in texts:
        assert " ".join(text.split()) == text
    assert {w for text in texts for w in text.split()} <= set(WORDS)


def test_demos_are_well_formed_with_one_to_three_sentences():
    _, demos, _ = _sample(1)
    doc = parse(demos)
    assert doc.well_formed.all()
    assert set(doc.n_sentences.tolist()) == {1, 2, 3}


def test_pair_responses_are_broad_but_free_of_extremes():
    _, _, pairs = _sample(2, n=1000)
    responses = [r for pair in pairs for r in pair]
    doc = parse(responses)
    assert doc.well_formed.all()
    assert set(doc.n_sentences.tolist()) == {1, 2, 3, 4}
    assert doc.lengths.max() <= 4 * 13  # four of the longest sentences the generator writes
    grades = {ADJECTIVES[w] for r in responses for w in r.split() if w in ADJECTIVES}
    assert grades == set(range(-3, 4))
    sentences = [r.split(" . ") for r in responses]
    repeats = [len(s) - len(set(s)) for s in sentences]
    assert 0 < np.mean(repeats) < 0.1 and max(repeats) == 1  # occasional, mild


@pytest.mark.parametrize(
    "text",
    [
        "the phone battery is very good .",
        "it is okay . this thing is not extremely bad and quite decent .",
        "honestly i do not like the laptop keyboard .",
        "overall i love it .",
        "the battery is excellent . i hate the blender .",
        "this product is not great and not weak .",
    ],
)
def test_recogniser_accepts_sentences_of_the_grammar(text):
    assert parse([text]).well_formed.all()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "the phone is good",  # no "."
        "the is good .",
        "phone battery excellent .",
        "the phone is excellent excellent .",
        "the phone is good and bad and okay .",
        "i very like it .",
        "i do like it .",
        "the phone is good .. ",
        "review : phone battery",
        "The phone is good .",
        "the phone is good . <eos>",
    ],
)
def test_recogniser_rejects_everything_else(text):
    assert not parse([text]).well_formed.any()


def test_parse_counts_sentences_and_reads_only_well_formed_ones():
    doc = parse(["the phone is good . phone good . it is", "it is okay ."])
    assert doc.n_sentences.tolist() == [3, 1]
    assert doc.n_malformed.tolist() == [2, 0]
    assert doc.in_ok_sentence[0, :5].all() and not doc.in_ok_sentence[0, 5:].any()
    assert doc.sentence_ok[0].nonzero()[0].tolist() == [4]
