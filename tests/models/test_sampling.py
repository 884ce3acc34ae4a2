"""Generation: the KV cache changes nothing but speed, log-probs match a fresh forward pass, EOS stops a row,
left padding changes nothing; on TinyGPT and on the Hugging Face adapter (a tiny GPT-2 built from a config)."""

from __future__ import annotations

import pytest
import torch

import rlhf_kernels
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.sampling import SamplingConfig, filter_logits, generate
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT, positions_from_mask

V, EOS, PAD = 40, 1, 0


def tiny_gpt() -> TinyGPT:
    return TinyGPT(GPTConfig(vocab_size=V, n_layer=2, n_head=2, d_model=32, max_seq_len=64)).eval()


def tiny_gpt2() -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=EOS, eos_token_id=EOS)
    return HFCausalLM(GPT2LMHeadModel(cfg)).eval()


MODELS = {"tinygpt": tiny_gpt, "hf-gpt2": tiny_gpt2}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]()


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [3, 4, 5, 6, 7], [PAD, PAD, PAD, 9, 10]])
    return ids, ids != PAD


def sample(model, cfg: SamplingConfig, seed: int = 3, use_cache: bool = True, eos: int = EOS):
    ids, mask = prompts()
    return generate(model, ids, mask, cfg, eos, PAD, torch.Generator().manual_seed(seed), use_cache=use_cache)


@pytest.mark.parametrize(
    "cfg",
    [SamplingConfig(12, temperature=0.0), SamplingConfig(12, 1.0), SamplingConfig(12, 0.7, top_k=8, top_p=0.9)],
    ids=["greedy", "sampled", "top-k-top-p"],
)
def test_kv_cache_equals_full_recompute(model, cfg):
    with_cache, without = sample(model, cfg), sample(model, cfg, use_cache=False)
    assert torch.equal(with_cache.response_ids, without.response_ids)
    assert torch.equal(with_cache.response_mask, without.response_mask)
    torch.testing.assert_close(with_cache.logprobs, without.logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_equal_a_fresh_forward_pass(model, temperature):
    out = sample(model, SamplingConfig(10, temperature))
    ids, mask = prompts()
    full = torch.cat([ids, out.response_ids], 1)
    full_mask = torch.cat([mask, out.response_mask], 1)
    hidden = model(full, full_mask, positions_from_mask(full_mask))
    logits = model.logits(hidden[:, ids.shape[1] - 1 : -1])  # (B, R, V): position t predicts token t + 1
    logp = rlhf_kernels.token_logprobs(logits.reshape(-1, V), out.response_ids.reshape(-1), temperature)
    logp = logp.view_as(out.logprobs)
    m = out.response_mask
    torch.testing.assert_close(logp[m], out.logprobs[m], rtol=1e-5, atol=1e-5)
    assert torch.all(out.logprobs[~m] == 0)


def test_left_padding_changes_nothing(model):
    cfg = SamplingConfig(8, temperature=0.0)
    ids, mask = prompts()
    batched = generate(model, ids, mask, cfg, EOS, PAD)
    alone = generate(model, ids[:1, 2:], mask[:1, 2:], cfg, EOS, PAD)
    r = alone.response_ids.shape[1]
    assert torch.equal(batched.response_ids[0, :r], alone.response_ids[0])
    torch.testing.assert_close(batched.logprobs[0, :r], alone.logprobs[0], rtol=1e-5, atol=1e-5)


def test_stops_at_eos_per_sequence(model):
    # Make EOS the greedy choice after one step for every row by reading what the model emits first and calling it EOS.
    first = sample(model, SamplingConfig(1, temperature=0.0)).response_ids[:, 0]
    eos = int(first[0])
    out = sample(model, SamplingConfig(10, temperature=0.0), eos=eos)
    row0 = out.response_ids[0]
    assert int(row0[0]) == eos and bool(out.ended[0])
    assert out.response_mask[0].tolist() == [True] + [False] * (out.response_mask.shape[1] - 1)
    assert torch.all(row0[1:] == PAD)
    for i in range(out.response_ids.shape[0]):
        hits = (out.response_ids[i] == eos).nonzero()
        if len(hits):  # everything after the first EOS is padding and masked
            k = int(hits[0])
            assert out.response_mask[i, : k + 1].all() and not out.response_mask[i, k + 1 :].any()


def test_no_eos_means_not_ended():
    torch.manual_seed(0)
    out = sample(tiny_gpt(), SamplingConfig(6, 1.0), eos=-1)
    assert out.response_ids.shape == (3, 6)
    assert not out.ended.any() and out.response_mask.all()


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops


@pytest.mark.parametrize("bad", [{"max_new_tokens": 0}, {"temperature": -1.0}, {"top_k": -1}, {"top_p": 0.0}])
def test_sampling_config_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingConfig(**bad)


def test_any_alive_keeps_finished_rows_generating_padding(model):
    """Ranks of a sharded model stop together: a batch told to go on after its rows have ended gets padding
    columns, and the same responses as when it stops on its own."""
    cfg = SamplingConfig(12, temperature=1.0)
    ids, mask = prompts()
    ids, mask = ids[:2], mask[:2]
    first = generate(model, ids, mask, SamplingConfig(1, 1.0), EOS, PAD, torch.Generator().manual_seed(3))
    eos = int(first.response_ids[0, 0])  # row 0 ends at once; row 1 whenever it draws that token
    own = generate(model, ids, mask, cfg, eos, PAD, torch.Generator().manual_seed(3))
    go_on = generate(model, ids, mask, cfg, eos, PAD, torch.Generator().manual_seed(3), any_alive=lambda alive: True)
    r = own.response_ids.shape[1]
    assert r < 12 and go_on.response_ids.shape[1] == 12  # the batch alone stops early, told to go on it does not
    for name in ("response_ids", "response_mask", "logprobs"):
        assert torch.equal(getattr(go_on, name)[:, :r], getattr(own, name)), name
    assert not go_on.response_mask[:, r:].any() and bool((go_on.response_ids[:, r:] == PAD).all())
    assert torch.equal(go_on.ended, own.ended)
    assert int(own.response_mask[0].sum()) == 1
