"""Tokenisation's truncation policy and the collate functions' shapes, padding sides and loss masks."""

from functools import partial

import pytest
import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data import (
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    Tokenizer,
    TruncationStats,
    collate_pairs,
    collate_prompts,
    collate_sft,
    fitting_length,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)

PAD, EOS = 0, 1


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """Word-level, every word seen once: ids in code-point order, a=3, b=4, ..., g=9."""
    return Tokenizer.train_word_level(["a b c d e f g"])


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text)


def test_truncation_policy(tok: Tokenizer) -> None:
    assert ids(tok, "a b c") == [3, 4, 5]
    records = [
        {"prompt": "a b c d e", "response": "a b"},  # prompt 2 too long; response + EOS fit exactly in 3
        {"prompt": "a b c", "response": "a b c"},  # prompt fits exactly; response fits but EOS does not
        {"prompt": "g", "response": "a b c d e"},  # response far too long
        {"prompt": "f", "response": "g"},  # room to spare
    ]
    examples, stats = tokenize_sft(records, tok, max_prompt_len=3, max_response_len=3)
    assert examples == [
        SFTExample(ids(tok, "c d e"), [*ids(tok, "a b"), EOS]),  # the prompt keeps its end
        SFTExample(ids(tok, "a b c"), ids(tok, "a b c")),  # no EOS: the model must not learn to stop here
        SFTExample(ids(tok, "g"), ids(tok, "a b c")),  # the response keeps its beginning
        SFTExample(ids(tok, "f"), [*ids(tok, "g"), EOS]),
    ]
    assert stats == TruncationStats(
        examples=4, responses=4, truncated_prompts=1, truncated_responses=2, tokens=21,
        prompt_lengths=[5, 3, 1, 1], response_lengths=[3, 4, 6, 2],  # responses counted with their EOS
    )  # fmt: skip


def test_preference_and_prompt_policy(tok: Tokenizer) -> None:
    records = [
        {"prompt": "a b c", "chosen": "d", "rejected": "d e f"},
        {"prompt": "g", "chosen": "e f", "rejected": "f"},
    ]
    examples, stats = tokenize_preferences(records, tok, max_prompt_len=2, max_response_len=3)
    assert examples == [
        PreferenceExample(ids(tok, "b c"), [*ids(tok, "d"), EOS], ids(tok, "d e f")),
        PreferenceExample(ids(tok, "g"), [*ids(tok, "e f"), EOS], [*ids(tok, "f"), EOS]),
    ]
    assert stats == TruncationStats(
        examples=2, responses=4, truncated_prompts=1, truncated_responses=1, tokens=11,
        prompt_lengths=[3, 1], response_lengths=[2, 3, 4, 2],  # all chosen, then all rejected
    )  # fmt: skip

    prompts, stats = tokenize_prompts(records, tok, max_prompt_len=2)
    assert prompts == [PromptExample(ids(tok, "b c")), PromptExample(ids(tok, "g"))]
    assert stats == TruncationStats(examples=2, truncated_prompts=1, tokens=4, prompt_lengths=[3, 1])


def test_unknown_tokens_are_counted_before_truncation(tok: Tokenizer) -> None:
    records = [{"prompt": "a zz b", "response": "qq qq c d"}]
    stats = tokenize_sft(records, tok, max_prompt_len=1, max_response_len=2)[1]
    assert (stats.tokens, stats.unk_tokens, stats.unk_rate) == (7, 3, 3 / 7)
    assert stats.figures() == {
        "examples": 1.0, "responses": 1.0, "truncated_prompts": 1.0, "truncated_responses": 1.0, "unk_rate": 3 / 7,
    }  # fmt: skip
    assert TruncationStats().unk_rate == 0.0


def test_fitting_length() -> None:
    lengths = list(range(1, 201))  # 1 .. 200
    assert fitting_length(lengths, 0.99) == 198  # 198 of 200 fit: 99%
    assert fitting_length(lengths, 1.0) == 200
    assert fitting_length([7], 0.99) == 7
    assert fitting_length([3, 9, 1], 0.5) == 3


def test_empty_tokenisation_and_budgets(tok: Tokenizer) -> None:
    records = [{"prompt": "a", "response": "b"}, {"prompt": "a", "response": " \t "}]
    with pytest.raises(DataError, match=r"^record 1: field 'response': tokenises to no tokens$"):
        tokenize_sft(records, tok, 4, 4)
    with pytest.raises(DataError, match=r"^record 0: field 'prompt': tokenises to no tokens$"):
        tokenize_prompts([{"prompt": "\n"}], tok, 4)
    with pytest.raises(ValueError, match=r"token budget of 'response' must be >= 1, got 0"):
        tokenize_sft(records[:1], tok, 4, 0)


def test_collate_sft_hand_built() -> None:
    examples = [SFTExample([5, 6, 7], [8, EOS]), SFTExample([5], [9])]  # the second response was truncated
    batch = collate_sft(examples, pad_id=PAD)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, EOS], [5, 9, PAD, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[True] * 5, [True, True, False, False, False]]
    assert batch["targets"].tolist() == [[6, 7, 8, EOS, PAD], [9, PAD, PAD, PAD, PAD]]
    # Position t predicts targets[t]: the loss covers exactly the predictions of response tokens and EOS.
    assert batch["loss_mask"].tolist() == [[False, False, True, True, False], [True, False, False, False, False]]
    assert batch["input_ids"].dtype == batch["targets"].dtype == torch.long
    assert batch["attention_mask"].dtype == batch["loss_mask"].dtype == torch.bool


def test_collate_sft_masks_select_the_responses(tok: Tokenizer) -> None:
    records = [
        {"prompt": p, "response": r} for p, r in [("a b c d", "e f"), ("g", "a b c d e f g"), ("c d", "e"), ("a", "b")]
    ]
    examples, _ = tokenize_sft(records, tok, max_prompt_len=3, max_response_len=4)
    loader = DataLoader(examples, batch_size=4, collate_fn=partial(collate_sft, pad_id=tok.pad_id))
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (4, max(len(e.prompt_ids) + len(e.response_ids) for e in examples))
    for row, e in enumerate(examples):
        assert batch["targets"][row][batch["loss_mask"][row]].tolist() == e.response_ids
        assert batch["input_ids"][row][batch["attention_mask"][row]].tolist() == e.prompt_ids + e.response_ids
        # The loss mask never reaches padding: its last position predicts the last real token.
        assert not (batch["loss_mask"][row] & ~batch["attention_mask"][row]).any()


def test_collate_pairs() -> None:
    examples = [PreferenceExample([5, 6], [7, EOS], [8, 9, 9, EOS]), PreferenceExample([5], [7, 7, 7], [8, EOS])]
    batch = collate_pairs(examples, pad_id=PAD)
    assert batch["chosen_ids"].tolist() == [[5, 6, 7, EOS, PAD, PAD], [5, 7, 7, 7, PAD, PAD]]
    assert batch["rejected_ids"].tolist() == [[5, 6, 8, 9, 9, EOS], [5, 8, EOS, PAD, PAD, PAD]]
    assert batch["chosen_mask"].sum(1).tolist() == [4, 4] and batch["rejected_mask"].sum(1).tolist() == [6, 3]
    assert batch["chosen_mask"][:, 0].all() and not batch["chosen_mask"][:, -1].any()  # right-padded
    assert batch["chosen_response_len"].tolist() == [2, 3]
    assert batch["rejected_response_len"].tolist() == [4, 2]
    assert torch.cat([batch["chosen_ids"], batch["rejected_ids"]]).shape == (4, 6)  # one T for both sides


def test_collate_prompts_left_pads() -> None:
    batch = collate_prompts([PromptExample([5]), PromptExample([5, 6, 7]), PromptExample([8, 9])], pad_id=PAD)
    assert batch["prompt_ids"].tolist() == [[PAD, PAD, 5], [5, 6, 7], [PAD, 8, 9]]
    assert batch["prompt_mask"].tolist() == [[False, False, True], [True, True, True], [False, True, True]]
    assert batch["prompt_mask"].dtype == torch.bool
    with pytest.raises(ValueError, match="empty batch"):
        collate_prompts([], pad_id=PAD)
