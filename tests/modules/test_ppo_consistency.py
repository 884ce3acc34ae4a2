"""PPO's scoring pass against the sampler, without a training run: the log-probs PPO records as the rollout's "old"
log-probs must be the sampler's own, for every backbone, on left-padded prompts (or the first ratio is not 1)."""

from __future__ import annotations

import pytest
import torch
from test_ppo import grouped

from rlhf_lightning.hf_tiny import make_tiny_hf
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.modules.common import response_token_logprobs

EOS, PAD = 0, 1


def tiny_backbone(kind: str, tmp_path) -> torch.nn.Module:
    if kind == "hf":
        return HFCausalLM.from_pretrained(make_tiny_hf(tmp_path / "gpt2", d_model=16, n_layer=1))
    return TinyGPT(GPTConfig(vocab_size=40, n_layer=1, n_head=2, d_model=16, max_seq_len=32, dropout=0.0))


@pytest.mark.parametrize("kind", ["tinygpt", "hf"])
def test_scoring_log_probs_equal_the_samplers_on_left_padded_prompts(kind, tmp_path):
    model = tiny_backbone(kind, tmp_path).eval()
    # Rows padded by 0, 2 and 4 columns: the real tokens of a padded row must keep positions 0, 1, ...
    lengths = torch.tensor([6, 4, 2])
    mask = torch.arange(6).unsqueeze(0) >= (6 - lengths).unsqueeze(1)  # (3, 6)
    prompt_ids = torch.where(mask, torch.randint(2, 30, mask.shape), torch.full(mask.shape, PAD))
    gen = torch.Generator().manual_seed(0)
    out = generate(model, prompt_ids, mask, SamplingConfig(max_new_tokens=6, temperature=0.7), EOS, PAD, gen)
    ids = torch.cat([prompt_ids, out.response_ids], 1)
    full_mask = torch.cat([mask, out.response_mask], 1)
    with torch.no_grad():
        logp, _ = response_token_logprobs(model, ids, full_mask, out.response_ids, out.response_mask, 0.7, False)
    torch.testing.assert_close(logp, out.logprobs, rtol=0, atol=1e-5)


def ppo(tmp_path, **kwargs) -> PPOModule:
    """A module whose settings are checked (the checkpoints it names do not exist: only errors before that show)."""
    return PPOModule(sft_checkpoint=str(tmp_path / "sft.ckpt"), reward_source="gold", **grouped(kwargs))


@pytest.mark.parametrize(
    ("sampling", "setting"),
    [({"temperature": 0.0}, "temperature 0"), ({"top_k": 5}, "top_k 5"), ({"top_p": 0.9}, "top_p 0.9")],
)
def test_sampling_whose_log_probs_ppo_does_not_compute_is_refused(sampling, setting, tmp_path):
    with pytest.raises(ValueError, match=f"sampling.{setting}"):
        ppo(tmp_path, sampling=SamplingConfig(max_new_tokens=4, **sampling))


@pytest.mark.parametrize("estimator", ["k2", "k3", "full"])
def test_only_k1_is_accepted_as_the_kl_in_the_reward(estimator, tmp_path):
    # Only k1 has the KL's gradient under the score-function estimator: the others are refused at start-up...
    with pytest.raises(ValueError, match=rf"kl\.estimator '{estimator}' in the reward has a biased"):
        ppo(tmp_path, kl_estimator=estimator)
    # ...and are fine as the logged KL, or in the loss (both pass the settings' checks: the missing file stops them).
    for settings in ({"kl_metric": estimator}, {"kl_estimator": estimator, "kl_in_loss": True}):
        with pytest.raises(FileNotFoundError, match="sft_checkpoint"):
            ppo(tmp_path, **settings)


def test_unknown_kl_metric_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"kl\.metric must be one of"):
        ppo(tmp_path, kl_metric="k4")


def test_value_clip_is_in_units_of_the_scores(tmp_path):
    for name in ("sft.ckpt", "rm.ckpt"):
        (tmp_path / name).touch()  # the checks only ask that the files exist
    scores = torch.tensor([0.0, 10.0, 20.0])  # std 10
    settings = [
        ({"reward_source": "gold"}, 2.0),  # raw scores: 0.2 typical scores = 0.2 std
        ({"reward_source": "gold", "score_norm": "running"}, 0.2),  # already standardised
        ({"reward_checkpoint": str(tmp_path / "rm.ckpt")}, 0.2),
    ]  # the reward model's normalised scores
    for kwargs, expected in settings:  # fmt: skip
        module = PPOModule(sft_checkpoint=str(tmp_path / "sft.ckpt"), value_clip=0.2, **grouped(kwargs))
        module.score_moments.update(scores)
        assert module._value_clip == pytest.approx(expected), kwargs
