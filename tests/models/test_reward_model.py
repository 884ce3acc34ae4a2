"""RewardModel: member scores in both ensemble modes, normalisation, aggregates, spec round trip; join_left_right."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data.collate import join_left_right
from rlhf_lightning.models.reward import RewardModel, RewardScores
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT

CONFIG = GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=32)


def backbone(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(CONFIG)


def batch(b: int = 4, t: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) right-padded ids and mask; rows have different lengths (1 .. T real tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 30, (b, t), generator=g)
    lengths = torch.tensor([t, t - 2, 1, t - 3][:b])
    mask = torch.arange(t) < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


@pytest.mark.parametrize("mode", ["heads", "backbones"])
@pytest.mark.parametrize("k", [1, 3])
def test_raw_members_shape_and_trunks(mode, k):
    model = RewardModel(backbone(), n_members=k, mode=mode).eval()
    ids, mask = batch()
    raw = model.raw_members(ids, mask)
    assert raw.shape == (4, k)
    assert torch.isfinite(raw).all()
    assert model.n_members == k and len(model.heads) == k
    assert len(model.backbones) == (1 if mode == "heads" else k)


def test_backbones_mode_copies_do_not_share_parameters():
    trunk = backbone()
    model = RewardModel(trunk, n_members=3, mode="backbones")
    assert model.backbones[0] is trunk
    ptrs = [{p.data_ptr() for p in b.parameters()} for b in model.backbones]
    assert not (ptrs[0] & ptrs[1]) and not (ptrs[0] & ptrs[2]) and not (ptrs[1] & ptrs[2])
    # the copies start equal (all from the same trunk) ...
    for a, b in zip(model.backbones[0].parameters(), model.backbones[2].parameters(), strict=True):
        torch.testing.assert_close(a, b)
    # ... but are independent: changing one leaves the others alone
    with torch.no_grad():
        model.backbones[1].tok_emb.weight.add_(1.0)
    torch.testing.assert_close(model.backbones[0].tok_emb.weight, model.backbones[2].tok_emb.weight)
    assert not torch.equal(model.backbones[0].tok_emb.weight, model.backbones[1].tok_emb.weight)
    # the parameters are registered once per copy (an optimiser sees all of them)
    n_trunk = sum(p.numel() for p in trunk.parameters())
    n_head = sum(p.numel() for p in model.heads[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == 3 * n_trunk + 3 * n_head


def test_heads_mode_shares_one_trunk():
    trunk = backbone()
    model = RewardModel(trunk, n_members=3, mode="heads")
    n_trunk = sum(p.numel() for p in trunk.parameters())
    n_head = sum(p.numel() for p in model.heads[0].parameters())
    assert sum(p.numel() for p in model.parameters()) == n_trunk + 3 * n_head


@pytest.mark.parametrize("mode", ["heads", "backbones"])
def test_members_differ_and_heads_follow_the_seed(mode):
    ids, mask = batch()
    model = RewardModel(backbone(), n_members=3, mode=mode, seed=0).eval()
    raw = model.raw_members(ids, mask)
    for i in range(3):
        for j in range(i + 1, 3):
            assert not torch.allclose(raw[:, i], raw[:, j]), (i, j)
            assert not torch.equal(model.heads[i].proj.weight, model.heads[j].proj.weight)
    # head i is seeded with seed + i: member 1 of seed 0 is member 0 of seed 1
    shifted = RewardModel(backbone(), n_members=2, mode=mode, seed=1)
    torch.testing.assert_close(shifted.heads[0].proj.weight, model.heads[1].proj.weight)
    # the same seed gives the same heads, whatever the global RNG state
    torch.manual_seed(999)
    again = RewardModel(backbone(), n_members=3, mode=mode, seed=0).eval()
    torch.testing.assert_close(again.raw_members(ids, mask), raw)


def test_head_seeding_does_not_move_the_global_rng():
    trunk = backbone()
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    RewardModel(trunk, n_members=3)
    torch.testing.assert_close(torch.rand(3), expected)


def test_score_normalises_with_the_buffers():
    ids, mask = batch()
    model = RewardModel(backbone(), n_members=3).eval()
    assert model.norm_mean.tolist() == [0.0, 0.0, 0.0] and model.norm_std.tolist() == [1.0, 1.0, 1.0]
    raw = model.raw_members(ids, mask)
    torch.testing.assert_close(model.score(ids, mask).members, raw)  # identity statistics at construction
    with torch.no_grad():
        model.norm_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
        model.norm_std.copy_(torch.tensor([2.0, 0.5, 4.0]))
    scores = model.score(ids, mask)
    assert isinstance(scores, RewardScores)
    expected = torch.stack([(raw[:, 0] - 0.5) / 2.0, (raw[:, 1] + 1.0) / 0.5, (raw[:, 2] - 2.0) / 4.0], dim=1)
    torch.testing.assert_close(scores.members, expected)
    torch.testing.assert_close(scores.mean, expected.mean(1))
    pop_std = ((expected - expected.mean(1, keepdim=True)) ** 2).mean(1).sqrt()  # population std over members
    torch.testing.assert_close(scores.std, pop_std)
    assert (scores.std > 0).all()
    for k in (0.0, 1.0, 2.5):
        torch.testing.assert_close(scores.conservative(k), scores.mean - k * scores.std)
    assert (scores.conservative(1.0) < scores.mean).all()


def test_score_of_a_single_member_has_zero_std():
    ids, mask = batch()
    model = RewardModel(backbone(), n_members=1).eval()
    with torch.no_grad():
        model.norm_mean.fill_(0.25)
        model.norm_std.fill_(0.5)
    scores = model.score(ids, mask)
    raw = model.raw_members(ids, mask)[:, 0]
    assert scores.members.shape == (4, 1)
    torch.testing.assert_close(scores.mean, (raw - 0.25) / 0.5)
    assert scores.std.shape == (4,) and (scores.std == 0).all()
    torch.testing.assert_close(scores.conservative(3.0), scores.mean)


def test_score_reads_the_last_real_token_only():
    ids, mask = batch()
    model = RewardModel(backbone(), n_members=2).eval()
    noisy = ids.masked_fill(~mask, 17)  # other padding ids after the last real token change nothing
    torch.testing.assert_close(model.raw_members(noisy, mask), model.raw_members(ids, mask))


@pytest.mark.parametrize(("mode", "pooling"), [("heads", "last"), ("backbones", "last"), ("heads", "mean")])
def test_spec_round_trip(mode, pooling):
    ids, mask = batch()
    model = RewardModel(backbone(), n_members=2, mode=mode, seed=3, pooling=pooling)
    with torch.no_grad():  # make every part of the state non-default, trunks included
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
        model.norm_mean.copy_(torch.tensor([0.1, -0.2]))
        model.norm_std.copy_(torch.tensor([1.5, 0.7]))
    spec = model.spec()
    assert spec["n_members"] == 2 and spec["mode"] == mode and spec["backbone"]["kind"] == "tinygpt"
    torch.manual_seed(1)
    rebuilt = RewardModel.from_spec(spec)
    assert type(rebuilt.backbones[0]) is TinyGPT and len(rebuilt.backbones) == len(model.backbones)
    assert rebuilt.pooling == pooling
    del spec["pooling"]  # a checkpoint from before pooling was a choice: the last token
    assert RewardModel.from_spec(spec).pooling == "last"
    fresh = rebuilt.raw_members(ids, mask)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    assert not torch.allclose(fresh, model.raw_members(ids, mask))  # the weights, not the spec, made the scores
    model.eval()
    rebuilt.eval()
    a, b = model.score(ids, mask), rebuilt.score(ids, mask)
    torch.testing.assert_close(b.members, a.members)
    torch.testing.assert_close(b.std, a.std)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[key], value, msg=key)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_members must be >= 1, got 0"):
        RewardModel(backbone(), n_members=0)
    with pytest.raises(ValueError, match="n_members must be >= 1, got -2"):
        RewardModel(backbone(), n_members=-2, mode="backbones")
    with pytest.raises(ValueError, match="'shared'"):
        RewardModel(backbone(), n_members=2, mode="shared")


# -- join_left_right -----------------------------------------------------------------------------------------------
def test_join_left_right_hand_made():
    pad = 0
    # prompts, left-padded to P = 3: [5, 6, 7], [8, 9], [4]
    prompt_ids = torch.tensor([[5, 6, 7], [pad, 8, 9], [pad, pad, 4]])
    prompt_mask = prompt_ids != pad
    # responses, right-padded to R = 3: [11, 12], [13, 14, 15], [16]
    response_ids = torch.tensor([[11, 12, pad], [13, 14, 15], [16, pad, pad]])
    response_mask = response_ids != pad
    ids, mask = join_left_right(prompt_ids, prompt_mask, response_ids, response_mask)
    assert ids.tolist() == [
        [5, 6, 7, 11, 12, pad],
        [8, 9, 13, 14, 15, pad],
        [4, 16, pad, pad, pad, pad],
    ]
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [True] * 5 + [False],
        [True] * 5 + [False],
        [True] * 2 + [False] * 4,
    ]


def test_join_left_right_keeps_order_with_pad_valued_real_tokens_and_int_masks():
    # the masks, not the ids, say what is real: a real token may share the pad id, masks may be 0/1 integers
    prompt_ids = torch.tensor([[9, 9, 3, 0]])
    prompt_mask = torch.tensor([[0, 0, 1, 1]])
    response_ids = torch.tensor([[7, 0, 8, 9, 9]])
    response_mask = torch.tensor([[1, 1, 1, 0, 0]])
    ids, mask = join_left_right(prompt_ids, prompt_mask, response_ids, response_mask)
    assert ids[0, :5].tolist() == [3, 0, 7, 0, 8]
    assert mask[0].tolist() == [True] * 5 + [False] * 4


def test_join_left_right_feeds_the_reward_model_like_an_unpadded_sequence():
    model = RewardModel(backbone(), n_members=2).eval()
    prompt_ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    response_ids = torch.tensor([[7, 8, 0], [9, 0, 0]])
    ids, mask = join_left_right(prompt_ids, prompt_ids != 0, response_ids, response_ids != 0)
    joined = model.raw_members(ids, mask)
    alone0 = model.raw_members(torch.tensor([[5, 6, 7, 8]]), torch.ones(1, 4, dtype=torch.bool))
    alone1 = model.raw_members(torch.tensor([[1, 2, 3, 4, 9]]), torch.ones(1, 5, dtype=torch.bool))
    torch.testing.assert_close(joined, torch.cat([alone0, alone1]), atol=1e-5, rtol=1e-5)


def test_normalised_mean_head_scores_like_the_ensemble_mean():
    """PPO's critic head starts from it: on the last real token it gives the ensemble's mean normalised score
    (heads mode), member 0's with its own trunk (backbones mode), and a single model's head exactly."""
    from rlhf_lightning.data.collate import last_token_index
    from rlhf_lightning.models.heads import ValueHead

    ids, mask = batch()
    rows = torch.arange(ids.shape[0])
    for mode, members in (("heads", 3), ("backbones", 3), ("heads", 1)):
        model = RewardModel(backbone(), n_members=members, mode=mode).eval()
        model.norm_mean.copy_(torch.tensor([0.3, -0.2, 1.0][:members]))
        model.norm_std.copy_(torch.tensor([0.5, 2.0, 1.5][:members]))
        head = ValueHead(16)
        weight, bias = model.normalised_mean_head()
        head.proj.weight.data.copy_(weight)
        head.proj.bias.data.copy_(bias)
        with torch.no_grad():
            values = head(model.backbones[0](ids, mask))[rows, last_token_index(mask)]  # (B,)
            scores = model.score(ids, mask)
        expected = scores.mean if mode == "heads" else scores.members[:, 0]
        torch.testing.assert_close(values, expected)
        if members == 1:  # bit for bit what the single reward model's head gives
            assert torch.equal(weight, model.heads[0].proj.weight / model.norm_std[0])
            assert torch.equal(bias, (model.heads[0].proj.bias - model.norm_mean[0]) / model.norm_std[0])
