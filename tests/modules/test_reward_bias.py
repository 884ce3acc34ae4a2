"""A reward model inherits its annotators' bias: trained on length-biased labels, its scores follow response length
(rm/len_corr) more than when trained on unbiased labels of the very same pairs.

Two worlds with one seed hold the same pairs; only the annotators' length_bias differs, so only the labels do. A
tiny RewardModel is trained on each for a few fast steps with the package's own pieces (PreferenceDataModule for
tokenisation and collation, the reward phase's pair_scores / pair_losses on the fused Bradley-Terry loss), and
rm/len_corr is computed as the phase computes it: pearson(scores of chosen + rejected, their response lengths).
"""

from __future__ import annotations

import json

import torch

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.metrics import pairwise_accuracy, pearson
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.modules.reward import pair_losses, pair_scores
from rlhf_lightning.world import AnnotatorConfig, WorldConfig, write_world

# Checked with seeds 0..5: biased len_corr 0.79..0.90 (val accuracy 0.78..0.88), unbiased 0.08..0.31 (val accuracy
# 0.52..0.65; seed 1: 0.90 vs 0.14, accuracies 0.80 and 0.59).
SEED = 1
STEPS = 100
N_PAIRS = 1500


def train_and_measure(data_dir, length_bias: float) -> tuple[float, float]:
    """(len_corr, accuracy) on the val pairs of an RM trained on a world with this length_bias."""
    annotators = AnnotatorConfig(length_bias=length_bias, keyword_bias=0.0)
    write_world(data_dir, WorldConfig(seed=SEED, n_sft=30, n_pairs=N_PAIRS, annotators=annotators))
    dm = PreferenceDataModule(data_dir=str(data_dir), generate_world=False, batch_size=64, max_response_len=48)
    dm.prepare_data()  # trains the word-level tokenizer
    dm.setup()
    torch.manual_seed(SEED)
    config = GPTConfig(vocab_size=dm.tokenizer.vocab_size, n_layer=1, n_head=2, d_model=16, max_seq_len=64)
    model = RewardModel(TinyGPT(config), n_members=1, seed=SEED)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = 0
    while step < STEPS:
        for batch in dm.train_dataloader():
            loss = pair_losses(*pair_scores(model, batch)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == STEPS:
                break
    model.eval()
    r_c, r_r, len_c, len_r = [], [], [], []
    with torch.no_grad():
        for batch in dm.val_dataloader():
            c, r = pair_scores(model, batch)  # (B, 1) each
            r_c.append(c[:, 0])
            r_r.append(r[:, 0])
            len_c.append(batch["chosen_response_len"])
            len_r.append(batch["rejected_response_len"])
    r_c, r_r = torch.cat(r_c), torch.cat(r_r)
    len_corr = pearson(torch.cat([r_c, r_r]), torch.cat(len_c + len_r).float())
    return len_corr, pairwise_accuracy(r_c, r_r)


def val_pairs(data_dir) -> list[tuple[str, frozenset[str]]]:
    records = [json.loads(line) for line in (data_dir / "prefs_val.jsonl").read_text().splitlines()]
    return [(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in records]


def val_chosen(data_dir) -> list[str]:
    return [json.loads(line)["chosen"] for line in (data_dir / "prefs_val.jsonl").read_text().splitlines()]


def test_length_biased_annotators_give_a_length_biased_reward_model(tmp_path):
    biased, fair = tmp_path / "biased", tmp_path / "unbiased"
    biased_corr, biased_acc = train_and_measure(biased, length_bias=0.5)
    fair_corr, fair_acc = train_and_measure(fair, length_bias=0.0)
    # the same pairs, labelled differently: only the labels carry the bias
    assert val_pairs(biased) == val_pairs(fair) and len(val_pairs(fair)) == round(N_PAIRS * 0.15)
    assert val_chosen(biased) != val_chosen(fair)
    # both models learned their labels beyond chance
    assert biased_acc > 0.65 and fair_acc > 0.53, (biased_acc, fair_acc)
    assert biased_corr > 0.5, biased_corr
    assert biased_corr > fair_corr + 0.3, (biased_corr, fair_corr)
