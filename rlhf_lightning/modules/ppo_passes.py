"""PPO's forward passes over a rollout: the no-grad scoring of sampled responses, and one minibatch's loss.

Plain functions of the models (:class:`~rlhf_lightning.modules.ppo_setup.PPOModels`) and the settings they need;
the math they feed is in :mod:`rlhf_lightning.rl`, the orchestration in :class:`~rlhf_lightning.modules.PPOModule`.
"""

from __future__ import annotations

from typing import Any

import torch

import rlhf_kernels
from rlhf_lightning import tags
from rlhf_lightning.data.collate import join_left_right
from rlhf_lightning.models.sampling import Generation
from rlhf_lightning.modules.common import adapted_lm_head, response_hidden, response_token_logprobs, unflatten_masked
from rlhf_lightning.modules.ppo_setup import PPOModels
from rlhf_lightning.rl import KLConfig, Rollout, ScoredBatch, explained_variance, policy_loss, value_loss


@torch.no_grad()
def score_batch(
    models: PPOModels, prompts: list[str], responses: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
    out: Generation, temperature: float, full_kl_metric: bool, score: Any,
) -> tuple[ScoredBatch, torch.Tensor | None]:  # fmt: skip
    """The no-grad passes over sampled responses: log-probs under the policy and the reference (and their exact KL
    when ``full_kl_metric``), values and scores.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded prompts; ``out`` holds the (B, R) right-padded responses.
        score: ``(prompts, responses, prompt_ids, prompt_mask, response_ids, response_mask, ended) -> ((B,) scores,
            ensemble std or None)``, e.g. :func:`sequence_scores` with its other arguments bound.

    Returns:
        the scored batch, and what ``score`` returned second.
    """
    resp_ids, resp_mask = out.response_ids, out.response_mask
    ids = torch.cat([prompt_ids, resp_ids], 1)  # (B, P + R)
    mask = torch.cat([prompt_mask.bool(), resp_mask], 1)
    args = (ids, mask, resp_ids, resp_mask, temperature, full_kl_metric)
    logp, hidden = response_token_logprobs(models.policy, *args)
    ref_logp, ref_hidden = response_token_logprobs(models.ref_policy, *args)
    full_kl = None
    if full_kl_metric:
        kl = exact_kl(models.policy, hidden, models.ref_policy, ref_hidden, temperature)
        full_kl = unflatten_masked(kl, resp_mask)
    if models.value_head is None:  # a critic-free estimator: the values are never read
        values = torch.zeros(resp_mask.shape, device=resp_mask.device)
    else:
        trunk = models.critic_backbone if models.critic_backbone is not None else models.policy
        values = models.value_head(response_hidden(trunk, ids, mask, prompt_ids.shape[1], resp_mask.shape[1])).float()
    scores, ensemble_std = score(prompts, responses, prompt_ids, prompt_mask, resp_ids, resp_mask, out.ended)
    batch = ScoredBatch(prompt_ids, prompt_mask, resp_ids, resp_mask, out.ended, logp, ref_logp, values, scores,
                        full_kl)  # fmt: skip
    return batch, ensemble_std


def exact_kl(
    policy: Any, hidden: torch.Tensor, ref_policy: Any, ref_hidden: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(N,) exact KL(policy || reference) over the vocabulary from both models' (N, D) hidden states at the same
    positions, the LM heads fused in (from the logits where LoRA adapts the policy's head)."""
    head = adapted_lm_head(policy)
    if head is None:
        return rlhf_kernels.kl_from_hidden(hidden, policy.lm_head_weight, ref_hidden, ref_policy.lm_head_weight,
                                           temperature)  # fmt: skip
    return rlhf_kernels.kl_from_logits(head(hidden), ref_hidden @ ref_policy.lm_head_weight.T, temperature)


def sequence_scores(
    models: PPOModels, reward_source: str, ensemble_k: float, judge: Any, device: torch.device, prompts: list[str],
    responses: list[str], prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor,
    response_mask: torch.Tensor, ended: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(B,) sequence scores from the configured reward source, and the reward ensemble's mean disagreement (0-dim;
    None unless the reward model is an ensemble).

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded; response_ids, response_mask: (B, R) right-padded; ended: (B,).
    """
    if reward_source == "model":
        ids, mask = join_left_right(prompt_ids, prompt_mask, response_ids, response_mask)
        scores = models.reward_model.score(ids, mask)
        ensemble_std = scores.std.mean() if models.reward_model.n_members > 1 else None
        return scores.conservative(ensemble_k).float(), ensemble_std
    if reward_source == "gold":
        gold = judge.score(prompts, responses, ended.cpu().numpy())
        return torch.as_tensor(gold, dtype=torch.float32, device=device), None
    out = torch.as_tensor(models.score_fn(prompts, responses), dtype=torch.float32, device=device).flatten()
    if out.shape != (len(prompts),):
        shape = tuple(out.shape)
        raise ValueError(f"reward_source {reward_source!r} returned {shape} scores for {len(prompts)} responses")
    return out, None


def minibatch_loss(
    models: PPOModels, mb: Rollout, h: Any, kl: KLConfig, beta: float, temperature: float, value_clip: float | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy loss (fused, from the hidden states and the LM head) + ``h.vf_coef`` * clipped value loss (without a
    critic: the policy loss alone) of one minibatch, and its stats (``h``: PPOModule's hyperparameters; ``beta``: the
    KL coefficient, used when the KL is in the loss)."""
    ids, mask = mb.input_ids, mb.attention_mask
    p, r = mb.prompt_ids.shape[1], mb.response_ids.shape[1]
    sel = mb.response_mask
    policy, ref_policy = models.policy, models.ref_policy
    hidden = response_hidden(policy, ids, mask, p, r)  # (b, R, D)
    ref_hidden = None
    if kl.in_loss and kl.estimator == "full":
        with torch.no_grad():  # the exact KL in the loss reads the reference's hidden states at the same positions
            ref_hidden = response_hidden(ref_policy, ids, mask, p, r)[sel]
    pg_loss, pstats = policy_loss(
        hidden[sel], policy.lm_head_weight, mb.response_ids[sel], mb.logprobs[sel], mb.advantages[sel],
        clip_eps_low=h.clip_eps, clip_eps_high=h.clip_eps if h.clip_eps_high is None else h.clip_eps_high,
        entropy_coef=h.entropy_coef, temperature=temperature,
        ref_logprobs=mb.ref_logprobs[sel] if kl.in_loss else None, kl_coef=beta if kl.in_loss else 0.0,
        kl_estimator=kl.estimator if kl.in_loss else "k1", ref_hidden=ref_hidden, ref_weight=ref_policy.lm_head_weight,
        adapted_head=adapted_lm_head(policy),
    )  # fmt: skip
    stats = {
        "policy/loss": float(pg_loss.detach()),
        "policy/clipfrac": float(pstats.clip_fraction),
        tags.APPROX_KL: float(pstats.approx_kl),
        "policy/ratio": float(pstats.ratio),
        tags.ENTROPY: float(pstats.entropy),
    }
    if models.value_head is None:  # a critic-free estimator: the policy loss alone
        return pg_loss, stats
    critic = models.critic_backbone
    values = models.value_head(hidden if critic is None else response_hidden(critic, ids, mask, p, r))  # (b, R)
    v_loss, v_clipfrac = value_loss(values.float(), mb.values, mb.returns, sel, value_clip)
    stats.update({
        "value/loss": float(v_loss.detach()),
        "value/clipfrac": float(v_clipfrac),
        "value/explained_variance": float(explained_variance(mb.values, mb.returns, sel)),
    })  # fmt: skip
    return pg_loss + h.vf_coef * v_loss, stats
