"""PPO's evaluation on the held-out prompts against the SFT policy, and the metrics of one rollout.

Plain functions: the module passes the models, the tokenizer and the data module it holds. The SFT policy's samples
never change (the reference is frozen), so they are drawn once and kept in an :class:`SFTBaseline`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from rlhf_lightning import tags
from rlhf_lightning.data.collate import join_left_right, pad_sequences
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.metrics import distinct_n, diversity_metrics, duplicate_rate, pearson, win_rate
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.modules.common import EvalSamples, comparison_table, response_token_logprobs, sample_eval
from rlhf_lightning.rl import Rollout, RolloutStats
from rlhf_lightning.world.annotators import AnnotatorConfig, Annotators


@dataclass
class EvalConfig:
    """Evaluation on the held-out prompts, against the SFT policy.

    every: iterations between evaluations (and the last iteration).
    table_rows: rows of the TensorBoard text table (SFT response beside the current one).
    groups, samples_per_prompt: per-input diversity is measured on this many held-out prompts with this many samples
        each (collapse shows first within one prompt's samples); 0 groups switches it off.
    seed: seed of the evaluation samples (the same for the SFT policy and the current one).
    audit_labels: on the embedded world, this many of the held-out prompts get a fresh annotator label comparing
        the policy's response with the SFT policy's (``eval/audit_win_rate``): the stand-in for a small batch of
        fresh human labels that a real run can afford. The auditors are the world's default annotators (noisy,
        mildly biased), not the run's own (possibly biased) labellers: an audit is a separate, careful rater pool.
        0 switches it off.
    """

    every: int = 10
    table_rows: int = 8
    groups: int = 16
    samples_per_prompt: int = 4
    seed: int = 1234
    audit_labels: int = 256

    def __post_init__(self) -> None:
        if self.audit_labels < 0:
            raise ValueError(f"eval.audit_labels must be >= 0, got {self.audit_labels}")


# In the checkpoints' hyperparameters (see modules/base.py); checkpoints written before this module existed name the
# class by its former home.
torch.serialization.add_safe_globals([EvalConfig, (EvalConfig, "rlhf_lightning.modules.ppo.EvalConfig")])


@dataclass
class SFTBaseline:
    """The SFT policy's evaluation samples, their proxy scores (None without a reward model) and its per-input
    diversity (None with ``groups`` 0)."""

    samples: EvalSamples
    proxy: torch.Tensor | None
    per_input: dict[str, float] | None


@torch.no_grad()
def evaluate(
    policy: nn.Module, ref_policy: Any, reward_model: nn.Module | None, tokenizer: Tokenizer, dm: Any,
    sampling: SamplingConfig, config: EvalConfig, ensemble_k: float, sft: SFTBaseline | None, device: torch.device,
) -> tuple[dict[str, float], str, SFTBaseline]:  # fmt: skip
    """Samples the held-out prompts with the current and the SFT policy (same seed); gold reward and win rate
    against SFT under the gold judge (ties count half), proxy reward, per-input diversity.

    ``eval/kl`` is the KL of the policy to the SFT policy on these held-out responses (:func:`sequence_kl`): one
    definition for PPO and DPO, the x axis of ``rlhf frontier``.

    Returns:
        the eval/* (and diversity/per_input_*) metrics, a markdown table of both policies' responses side by side,
        and the SFT baseline (``sft`` itself when given; drawn on the first call).
    """
    prompts, batch = dm.eval_prompts()
    ids, mask = batch["prompt_ids"].to(device), batch["prompt_mask"].to(device)
    args = (tokenizer, prompts, ids, mask, sampling, config.seed, dm.judge)

    def proxy_of(samples: EvalSamples) -> torch.Tensor | None:
        return eval_proxy(reward_model, tokenizer, samples, batch, ensemble_k, device)

    if sft is None:  # the reference never changes: its samples are drawn once
        sft_samples = sample_eval(ref_policy, *args)
        sft = SFTBaseline(sft_samples, proxy_of(sft_samples), None)
    cur = sample_eval(policy, *args)
    proxy = proxy_of(cur)
    metrics = {
        tags.EVAL_KL: sequence_kl(policy, ref_policy, cur, ids, mask, tokenizer.pad_id, sampling.temperature or 1.0),
        tags.EVAL_LENGTH_MEAN: float(cur.lengths.float().mean()),
        tags.EVAL_SFT_LENGTH_MEAN: float(sft.samples.lengths.float().mean()),
        "eval/eos_rate": float(cur.ended.float().mean()),
        "eval/distinct_2": distinct_n(cur.token_ids, 2),
    }
    if proxy is not None:
        metrics[tags.EVAL_PROXY_REWARD] = float(proxy.mean())
        metrics[tags.EVAL_SFT_PROXY_REWARD] = float(sft.proxy.mean())
        metrics[tags.EVAL_PROXY_WIN_RATE] = win_rate(proxy, sft.proxy)
    if cur.gold is not None:
        metrics[tags.EVAL_GOLD_REWARD] = float(cur.gold.mean())
        metrics[tags.EVAL_GOLD_REWARD_SE] = float(cur.gold.std() / len(cur.gold) ** 0.5) if len(cur.gold) > 1 else 0.0
        metrics[tags.EVAL_SFT_GOLD_REWARD] = float(sft.samples.gold.mean())
        metrics[tags.EVAL_WIN_RATE] = win_rate(cur.gold, sft.samples.gold)
        if config.audit_labels:
            metrics[tags.EVAL_AUDIT_WIN_RATE] = audit_win_rate(dm.judge, cur, sft.samples, config)
            metrics[tags.EVAL_AUDIT_LABELS] = float(min(config.audit_labels, len(prompts)))
    if config.groups > 0:
        diversity = (tokenizer, prompts, batch, sampling, config, device)
        if sft.per_input is None:
            sft.per_input = per_input_diversity(ref_policy, *diversity, tags.EVAL_SFT_PER_INPUT)
        metrics.update(sft.per_input)
        metrics.update(per_input_diversity(policy, *diversity, tags.PER_INPUT))
    table = comparison_table(sft.samples, cur, sft.proxy, proxy, config.table_rows)
    return metrics, table, sft


def audit_win_rate(judge: Any, cur: EvalSamples, sft: EvalSamples, config: EvalConfig) -> float:
    """The share of the first ``config.audit_labels`` held-out prompts on which a fresh annotator label prefers the
    policy's response to the SFT policy's: :class:`Annotators` with the default :class:`AnnotatorConfig` over the
    world's ``judge``. The labels' RNG is seeded by ``config.seed`` alone, so every evaluation of a run draws the
    same label noise (common random numbers: a change between evaluations is the policy's, not the noise's)."""
    n = min(config.audit_labels, len(cur.prompts))
    ended = (cur.ended[:n].tolist(), sft.ended[:n].tolist())
    rng = np.random.default_rng(config.seed)
    prefers, _ = Annotators(AnnotatorConfig(), judge).label(cur.prompts[:n], cur.responses[:n], sft.responses[:n],
                                                             rng, ended)  # fmt: skip
    return float(prefers.mean())


@torch.no_grad()
def sequence_kl(
    policy: nn.Module, ref_policy: Any, samples: EvalSamples, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
    pad_id: int, temperature: float,
) -> float:  # fmt: skip
    """The mean over ``samples`` (responses the policy sampled for ``prompt_ids`` / ``prompt_mask``, (B, P)
    left-padded) of ``log pi(y|x) - log pi_ref(y|x)`` summed over the response: the k1 estimate of KL(pi || pi_ref) in
    nats per response, PPO's ``objective/kl`` measured on held-out prompts."""
    device = prompt_ids.device
    resp_ids, resp_mask = (t.to(device) for t in pad_sequences(samples.token_ids, pad_id, left=False))
    # Left-padded prompts, then right-padded responses: the layout response_token_logprobs reads (as PPO's rollout).
    ids, mask = torch.cat([prompt_ids, resp_ids], 1), torch.cat([prompt_mask.bool(), resp_mask], 1)
    logp = response_token_logprobs(policy, ids, mask, resp_ids, resp_mask, temperature, False)[0]
    ref_logp = response_token_logprobs(ref_policy, ids, mask, resp_ids, resp_mask, temperature, False)[0]
    return float((logp - ref_logp).sum(-1).mean())


def per_input_diversity(
    model: Any, tokenizer: Tokenizer, prompts: list[str], batch: dict[str, torch.Tensor], sampling: SamplingConfig,
    config: EvalConfig, device: torch.device, prefix: str,
) -> dict[str, float]:  # fmt: skip
    """Diversity within each prompt's samples: ``config.samples_per_prompt`` responses to each of the first
    ``config.groups`` held-out prompts (``batch``: their (B, P) left-padded ``prompt_ids`` and ``prompt_mask``),
    scored per prompt and averaged. Keys ``{prefix}_distinct_2`` etc."""
    g, k = min(config.groups, len(prompts)), config.samples_per_prompt
    ids = batch["prompt_ids"][:g].repeat_interleave(k, 0).to(device)  # (g * k, P)
    mask = batch["prompt_mask"][:g].repeat_interleave(k, 0).to(device)
    texts = [t for t in prompts[:g] for _ in range(k)]
    samples = sample_eval(model, tokenizer, texts, ids, mask, sampling, config.seed + 1)
    groups = torch.arange(g).repeat_interleave(k)
    scores = diversity_metrics(samples.token_ids, tokenizer.vocab_size, groups, prefix="x")
    return {f"{prefix}_{name[2:]}": value for name, value in scores.items()}


def eval_proxy(
    reward_model: nn.Module | None, tokenizer: Tokenizer, samples: EvalSamples, batch: dict[str, torch.Tensor],
    ensemble_k: float, device: torch.device,
) -> torch.Tensor | None:  # fmt: skip
    """(B,) conservative proxy scores of evaluation samples to the (B, P) left-padded prompts of ``batch`` (None
    without a reward model)."""
    if reward_model is None:
        return None
    padded = pad_sequences(samples.token_ids, tokenizer.pad_id, left=False)
    resp_ids, resp_mask = (t.to(device) for t in padded)
    ids, mask = join_left_right(batch["prompt_ids"].to(device), batch["prompt_mask"].to(device), resp_ids, resp_mask)
    return reward_model.score(ids, mask).conservative(ensemble_k).float().cpu()


def rollout_metrics(
    rollout: Rollout, stats: RolloutStats, prompts: list[str], responses: list[str], token_lists: list[list[int]],
    vocab_size: int, judge: Any, scores_are_gold: bool, ensemble_std: torch.Tensor | None,
) -> dict[str, float]:  # fmt: skip
    """A rollout's objective/*, rollout/* and diversity/* metrics.

    Args:
        judge: the world's gold judge (None: no gold metrics); ``scores_are_gold``: it is the reward source, so the
            rollout's scores are its scores already.
        ensemble_std: the reward ensemble's mean disagreement (0-dim; None unless the reward model is an ensemble).
    """
    lengths = rollout.response_mask.sum(-1).float()
    metrics = {
        tags.PROXY_REWARD: float(rollout.scores.mean()),
        "objective/score": stats.score,
        "objective/non_score_reward": stats.non_score_reward,
        "objective/rlhf_reward": stats.rlhf_reward,
        tags.LENGTH_MEAN: float(lengths.mean()),
        "rollout/eos_rate": float(rollout.ended.float().mean()),
        tags.SCORE_LENGTH_CORR: pearson(rollout.scores, lengths),
        tags.DUPLICATE_RATE: duplicate_rate(prompts, responses),
        **diversity_metrics(token_lists, vocab_size),
    }
    if judge is not None:
        gold = rollout.scores if scores_are_gold else judge.score(prompts, responses, rollout.ended.cpu().numpy())
        metrics[tags.GOLD_REWARD] = float(gold.mean())
    if stats.length_slope is not None:
        metrics["objective/length_slope"] = stats.length_slope
    if ensemble_std is not None:
        metrics[tags.ENSEMBLE_STD] = float(ensemble_std)
    return metrics
