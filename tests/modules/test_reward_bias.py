"""A reward model inherits its annotators' flaws: each data failure preset of configs/failures/ (length bias, keyword
bias, noisy annotators, too few pairs), applied to the world it names, gives a reward model with that preset's
symptom, measured against a reward model trained the same way on the default world of the same seed.

This is the reduced-size check of those presets: the symptom is in the reward model, which PPO then exploits (the
full-size PPO runs and what `rlhf diagnose` says of them are in benchmarks/RESULTS.md). Worlds of one seed hold the
same pairs; a preset changes only the labels (or, for few_pairs, how many pairs there are). A tiny RewardModel is
trained on each for a few fast steps with the package's own pieces (PreferenceDataModule for tokenisation and
collation, the reward phase's pair_scores / pair_losses on the fused Bradley-Terry loss), and measured on the val
pairs as the phase measures it: rm/len_corr is pearson(scores of chosen + rejected, their response lengths).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.metrics import order_agreement, pairwise_accuracy, pearson
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.modules.reward import pair_losses, pair_scores
from rlhf_lightning.pipeline import load_preset
from rlhf_lightning.world import AnnotatorConfig, WorldConfig, write_world

FAILURES = Path(__file__).resolve().parents[2] / "configs" / "failures"
SEED = 1
STEPS = 100
N_PAIRS = 1500


class RMReport(NamedTuple):
    """What a reward model trained on one world does on that world's val pairs (and, for overfitting, its train)."""

    accuracy: float  # against the world's own (possibly flawed) labels
    train_accuracy: float
    gold_agreement: float  # order agreement with the gold judge
    len_corr: float
    keyword_gap: float  # mean score of responses with the annotators' keyword minus those without


def preset_world(name: str) -> WorldConfig:
    """The world a data failure preset asks for, at this test's size (its pair count if it sets one)."""
    part = load_preset(FAILURES / f"{name}.yaml")["all"]["data"]["init_args"]["world"]
    assert set(part) <= {"annotators", "n_pairs"}, f"{name}: this test does not know {sorted(part)}"
    annotators = AnnotatorConfig(**part.get("annotators", {}))
    return WorldConfig(seed=SEED, n_sft=30, n_pairs=part.get("n_pairs", N_PAIRS), annotators=annotators)


def _scores(model: RewardModel, loader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P,) scores of the chosen and rejected responses and their lengths, over a loader's pairs."""
    r_c, r_r, len_c, len_r = [], [], [], []
    with torch.no_grad():
        for batch in loader:
            c, r = pair_scores(model, batch)  # (B, 1) each
            r_c.append(c[:, 0])
            r_r.append(r[:, 0])
            len_c.append(batch["chosen_response_len"])
            len_r.append(batch["rejected_response_len"])
    return torch.cat(r_c), torch.cat(r_r), torch.cat(len_c).float(), torch.cat(len_r).float()


def train_and_measure(data_dir: Path, world: WorldConfig) -> RMReport:
    write_world(data_dir, world)
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
    train_c, train_r, _, _ = _scores(model, dm.train_dataloader())
    r_c, r_r, len_c, len_r = _scores(model, dm.val_dataloader())
    gold_c, gold_r = dm.val_gold
    records = [json.loads(line) for line in (data_dir / "prefs_val.jsonl").read_text().splitlines()]
    keyword = world.annotators.keyword
    has_keyword = torch.tensor([keyword in r[key].split() for key in ("chosen", "rejected") for r in records])
    scores = torch.cat([r_c, r_r])
    assert 0 < int(has_keyword.sum()) < len(has_keyword), "the val responses must both use and omit the keyword"
    return RMReport(
        accuracy=pairwise_accuracy(r_c, r_r),
        train_accuracy=pairwise_accuracy(train_c, train_r),
        gold_agreement=order_agreement(r_c - r_r, gold_c - gold_r),
        len_corr=pearson(scores, torch.cat([len_c, len_r])),
        keyword_gap=float(scores[has_keyword].mean() - scores[~has_keyword].mean()),
    )


def val_pairs(data_dir: Path) -> list[tuple[str, frozenset[str]]]:
    records = [json.loads(line) for line in (data_dir / "prefs_val.jsonl").read_text().splitlines()]
    return [(r["prompt"], frozenset((r["chosen"], r["rejected"]))) for r in records]


@pytest.fixture(scope="module")
def default_rm(tmp_path_factory) -> tuple[Path, RMReport]:
    """The reward model of the default annotators: the baseline every preset is measured against."""
    data_dir = tmp_path_factory.mktemp("default_world")
    return data_dir, train_and_measure(data_dir, WorldConfig(seed=SEED, n_sft=30, n_pairs=N_PAIRS))


def test_length_bias_preset_gives_a_reward_model_that_scores_length(default_rm, tmp_path):
    base_dir, base = default_rm
    report = train_and_measure(tmp_path, preset_world("length_bias"))
    # the same pairs, labelled differently: only the labels carry the bias
    assert val_pairs(tmp_path) == val_pairs(base_dir)
    assert report.accuracy > 0.65, report  # it learned its labels...
    # seeds 0..2: len_corr 0.74..0.80 against 0.21..0.26 for the default annotators
    assert report.len_corr > 0.5 and report.len_corr > base.len_corr + 0.3, (report, base)  # ...and they say length


def test_keyword_bias_preset_gives_a_reward_model_partial_to_the_keyword(default_rm, tmp_path):
    _, base = default_rm
    report = train_and_measure(tmp_path, preset_world("keyword_bias"))
    # seeds 0..2: the gap grows by 0.84..1.70 over the default annotators' (the keyword is also a good word)
    assert report.keyword_gap > base.keyword_gap + 0.5, (report, base)


def test_noisy_annotators_preset_gives_a_reward_model_near_chance_against_gold(default_rm, tmp_path):
    _, base = default_rm
    report = train_and_measure(tmp_path, preset_world("noisy_annotators"))
    # seeds 0..2: gold agreement 0.48..0.56 against 0.64..0.72 for the default annotators
    assert base.gold_agreement > 0.6, base
    assert report.gold_agreement < 0.6 and report.gold_agreement < base.gold_agreement - 0.05, (report, base)


def test_few_pairs_preset_gives_an_overfit_reward_model(default_rm, tmp_path):
    _, base = default_rm
    report = train_and_measure(tmp_path, preset_world("few_pairs"))
    # seeds 0..2: train accuracy 0.98..1.00 (default 0.76..0.77), train - val 0.34..0.42 (default 0.11..0.23)
    gap, base_gap = report.train_accuracy - report.accuracy, base.train_accuracy - base.accuracy
    assert report.train_accuracy > 0.95 and base.train_accuracy < 0.85, (report, base)
    assert gap > 0.25 and gap > base_gap, (report, base)
