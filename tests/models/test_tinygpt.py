"""TinyGPT, the heads, and rebuilding a backbone from a checkpoint's spec."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.data.collate import last_token_index
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec, build_backbone, disable_dropout, freeze
from rlhf_lightning.models.heads import ScalarHead, ValueHead
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT, attention_mask_4d


def test_causal_future_tokens_do_not_change_the_past():
    torch.manual_seed(0)
    m = TinyGPT(GPTConfig(vocab_size=30, n_layer=2, n_head=2, d_model=16, max_seq_len=16)).eval()
    a = torch.tensor([[3, 4, 5, 6]])
    b = torch.tensor([[3, 4, 9, 9]])
    torch.testing.assert_close(m(a)[:, :2], m(b)[:, :2])
    assert not torch.allclose(m(a)[:, 2:], m(b)[:, 2:])


def test_logits_use_the_tied_embedding():
    m = TinyGPT(GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16, max_seq_len=8))
    h = m(torch.tensor([[1, 2, 3]]))
    assert m.logits(h).shape == (1, 3, 30)
    assert m.lm_head_weight is m.tok_emb.weight


def test_attention_mask_never_has_an_empty_row():
    key_mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    mask = attention_mask_4d(key_mask, 4)  # (B, 1, T, S)
    assert mask.any(-1).all()
    assert mask[0, 0, 3].tolist() == [False, False, True, True]  # no padded keys for a real query
    assert mask[0, 0, 0].tolist() == [True, False, False, False]  # a padding query sees only itself


def test_position_limit_and_config_errors():
    m = TinyGPT(GPTConfig(vocab_size=10, n_layer=1, n_head=1, d_model=8, max_seq_len=4))
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(d_model=10, n_head=3)
    with pytest.raises(ValueError, match="vocab_size"):
        TinyGPT(GPTConfig())


def test_build_backbone_follows_the_tokenizer_and_rejects_a_mismatch():
    assert build_backbone(GPTConfig(n_layer=1, d_model=16, n_head=2), 57).config.vocab_size == 57
    with pytest.raises(ValueError, match="vocab_size 40 != tokenizer vocabulary size 57"):
        build_backbone(GPTConfig(vocab_size=40), 57)


def test_backbone_spec_round_trip_tinygpt_and_hf():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhf_lightning.models.hf import HFCausalLM

    torch.manual_seed(0)
    for model in (
        TinyGPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, max_seq_len=8)),
        HFCausalLM(GPT2LMHeadModel(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2))),
    ):
        rebuilt = backbone_from_spec(backbone_spec(model))
        rebuilt.load_state_dict(model.state_dict())
        x = torch.tensor([[1, 2, 3]])
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(ValueError, match="unknown backbone kind"):
        backbone_from_spec({"kind": "nope"})


def test_heads_read_the_last_real_token():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 2]
    hidden = torch.randn(3, 4, 8)
    head = ScalarHead(8)
    scores = head(hidden, mask)
    torch.testing.assert_close(scores[0], head.proj(hidden[0, 1]).squeeze())
    assert ValueHead(8)(hidden).shape == (3, 4)


def test_mean_pooling_head_averages_the_per_token_scores_of_real_tokens_only():
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]])
    hidden = torch.randn(2, 4, 8)
    head = ScalarHead(8, pooling="mean")
    per_token = head.proj(hidden).squeeze(-1)  # (2, 4)
    want = torch.stack([per_token[0, :2].mean(), per_token[1, 1:].mean()])
    torch.testing.assert_close(head(hidden, mask), want)
    hidden[0, 2:] = 1e6  # padding never counts
    torch.testing.assert_close(head(hidden, mask), want)
    with pytest.raises(ValueError, match="pooling must be"):
        ScalarHead(8, pooling="max")


def test_disable_dropout_makes_training_mode_deterministic():
    model = TinyGPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, max_seq_len=8, dropout=0.5)).train()
    ids, mask = torch.randint(0, 20, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    assert not torch.equal(model(ids, mask), model(ids, mask))  # dropout on: two passes differ
    disable_dropout(model)
    torch.testing.assert_close(model(ids, mask), model.eval()(ids, mask), rtol=0, atol=0)


def test_freeze_turns_gradients_and_training_mode_off():
    model = freeze(TinyGPT(GPTConfig(vocab_size=20, n_layer=1, n_head=2, d_model=16, max_seq_len=8)).train())
    assert not model.training and not any(p.requires_grad for p in model.parameters())
