"""The trajectory of one PPO iteration and the statistics of its update, as typed containers."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Rollout:
    """B sampled responses and everything the update needs, all without gradient.

    Sequences are ``[prompt (left-padded) | response (right-padded)]``: P prompt columns then R response columns.

    prompt_ids, prompt_mask: (B, P).
    response_ids, response_mask: (B, R); the mask is True on generated tokens (EOS included).
    ended: (B,) True where the response emitted EOS.
    logprobs: (B, R) log-probs of the response tokens under the policy that sampled them ("old").
    ref_logprobs: (B, R) the same under the frozen SFT reference.
    values: (B, R) the critic's V(s_t) before each response token.
    scores: (B,) the raw sequence scores (reward model / judge / callable), before clipping and penalties.
    kl: (B, R) per-token KL estimate (0 at padding), with PPO's ``kl_metric`` estimator: what is logged and what the
        KL controller sees (the reward's penalty is always k1's).
    rewards: (B, R) shaped per-token rewards.
    advantages: (B, R) GAE advantages (whitened when asked); returns: (B, R) value targets.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    @property
    def size(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, idx: torch.Tensor) -> Rollout:
        """The rollout restricted to rows ``idx`` (B',) — a minibatch."""
        return Rollout(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @property
    def input_ids(self) -> torch.Tensor:
        """(B, P + R) prompt then response ids."""
        return torch.cat([self.prompt_ids, self.response_ids], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, P + R) real tokens of :attr:`input_ids`."""
        return torch.cat([self.prompt_mask.bool(), self.response_mask.bool()], 1)
