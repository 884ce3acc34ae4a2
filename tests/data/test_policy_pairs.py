"""PreferenceDataModule with ``pair_source="sft_policy"``: pairs sampled from a policy, labelled by the annotators."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule, write_jsonl
from rlhf_lightning.models.sampling import SamplingConfig, sample_responses
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.world import AnnotatorConfig, Annotators, WorldConfig

WORLD = WorldConfig(n_sft=20, n_pairs=60)  # 42 train and 9 val pairs


def policy_pairs(data_dir, seed: int, world: WorldConfig = WORLD) -> PreferenceDataModule:
    dm = PreferenceDataModule(data_dir=str(data_dir), world=world, pair_source="sft_policy", batch_size=8,
                              pair_sampling=SamplingConfig(max_new_tokens=12))  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    torch.manual_seed(0)
    policy = TinyGPT(GPTConfig(vocab_size=dm.tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=32))
    tok = dm.tokenizer
    dm.sample_policy_pairs(partial(sample_responses, policy, dm.pair_sampling, tok.eos_id, tok.pad_id), seed)
    return dm


def as_lists(examples) -> list[tuple[list[int], ...]]:
    return [tuple(map(list, e)) for e in examples]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("policy_pairs") / "world"


def test_pairs_are_policy_samples_of_each_records_prompt_and_deterministic(world_dir):
    dm = policy_pairs(world_dir, seed=3)
    grammar = PreferenceDataModule(data_dir=str(world_dir), world=WORLD, batch_size=8)
    grammar.setup("fit")
    eos = dm.tokenizer.eos_id
    for split in ("train", "val"):
        sampled, files = getattr(dm, f"{split}_examples"), getattr(grammar, f"{split}_examples")
        assert len(sampled) == len(files)  # one pair per record
        assert [e.prompt_ids for e in sampled] == [e.prompt_ids for e in files]  # the records' prompts
        for e in sampled:
            for response in (e.chosen_ids, e.rejected_ids):
                # Sampled: EOS only as the last token, else cut at max_new_tokens.
                assert eos not in response[:-1] and (response[-1] == eos or len(response) == 12)
        assert as_lists(sampled) != as_lists(files)
    assert as_lists(policy_pairs(world_dir, seed=3).train_examples) == as_lists(dm.train_examples)
    assert as_lists(policy_pairs(world_dir, seed=4).train_examples) != as_lists(dm.train_examples)
    batch = next(iter(dm.train_dataloader()))
    assert batch["chosen_ids"].shape[0] == 8 and batch["index"].max() < len(dm.train_examples)


def test_val_references_are_those_of_the_sampled_pairs(world_dir):
    dm = policy_pairs(world_dir, seed=5)
    tok = dm.tokenizer
    prompts = [tok.decode(e.prompt_ids) for e in dm.val_examples]
    chosen = [tok.decode(e.chosen_ids) for e in dm.val_examples]
    rejected = [tok.decode(e.rejected_ids) for e in dm.val_examples]
    ended = ([e.chosen_ids[-1] == tok.eos_id for e in dm.val_examples],
             [e.rejected_ids[-1] == tok.eos_id for e in dm.val_examples])  # fmt: skip
    expected = Annotators(WORLD.annotators, dm.judge).bayes_accuracy(prompts, chosen, rejected, ended)
    assert dm.bayes_accuracy == pytest.approx(expected)
    assert torch.allclose(dm.val_gold[0], torch.as_tensor(dm.judge.score(prompts, chosen, ended[0])))
    n_unended = sum(not x for side in ended for x in side)
    assert dm.data_stats["data/unended_responses/prefs_sft_policy_val"] == n_unended


def test_labels_follow_the_annotators_knobs(tmp_path):
    # Annotators that only care for length (tau tiny, no noise): every chosen response is the longer one.
    world = WorldConfig(n_sft=20, n_pairs=60, annotators=AnnotatorConfig(tau=1e-4, flip_rate=0.0, length_bias=100.0))
    dm = policy_pairs(tmp_path / "world", seed=0, world=world)
    words = [(len(dm.tokenizer.decode(e.chosen_ids).split()), len(dm.tokenizer.decode(e.rejected_ids).split()))
             for e in dm.train_examples]  # fmt: skip
    assert all(c >= r for c, r in words) and any(c > r for c, r in words)


def test_dataloaders_before_sampling_and_data_without_a_world_fail_clearly(world_dir, tmp_path):
    dm = PreferenceDataModule(data_dir=str(world_dir), world=WORLD, pair_source="sft_policy")
    dm.setup("fit")
    with pytest.raises(RuntimeError, match="sample_policy_pairs"):
        dm.train_dataloader()
    pairs = [{"prompt": "question ?", "chosen": "good answer .", "rejected": "bad ."}] * 4
    write_jsonl(tmp_path / "prefs_train.jsonl", pairs)
    write_jsonl(tmp_path / "prefs_val.jsonl", pairs)
    own = PreferenceDataModule(data_dir=str(tmp_path), generate_world=False, pair_source="sft_policy")
    own.prepare_data()
    own.setup("fit")
    with pytest.raises(ValueError, match="world's annotators"):
        own.sample_policy_pairs(lambda batches, seed: ([], []), 0)
    with pytest.raises(ValueError, match="pair_source"):
        PreferenceDataModule(data_dir=str(tmp_path), pair_source="humans")
