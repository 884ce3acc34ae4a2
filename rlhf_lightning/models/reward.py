"""The reward model: scalar heads on policy backbones, single or as an ensemble, with normalisation statistics.

An ensemble has K members that disagree for real reasons: each head starts from its own seed and (in training) sees
its own bootstrap resample of the pairs; with ``mode="backbones"`` each member also has its own copy of the backbone,
with ``mode="heads"`` the members share one trunk (K times cheaper). The model exposes the members' normalised scores,
their mean, their standard deviation (the disagreement) and the conservative aggregate ``mean - k * std``.

Normalisation: ``norm_mean`` / ``norm_std`` (K,) are each member's score mean and std on SFT-policy samples of the
training prompts, so the PPO phase starts from rewards centred on the SFT policy.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.data.tokenizer import Tokenizer, tokenizer_from_meta
from rlhf_lightning.models.backbone import backbone_from_spec, backbone_spec
from rlhf_lightning.models.heads import Pooling, ScalarHead

EnsembleMode = Literal["heads", "backbones"]


class RewardScores(NamedTuple):
    """Normalised scores of B sequences by K members.

    members: (B, K); mean: (B,); std: (B,) population std over members (0 for K = 1).
    """

    members: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def conservative(self, k: float) -> torch.Tensor:
        """(B,) mean - k * std: a reward that distrusts what the members disagree about."""
        return self.mean - k * self.std


class RewardModel(nn.Module):
    """K scalar heads on one shared backbone (``mode="heads"``) or on K backbone copies (``mode="backbones"``).

    Args:
        backbone: the trunk (e.g. the SFT policy's backbone); copied K times for ``mode="backbones"``.
        n_members: ensemble size K (1 = a single reward model).
        mode: "heads" or "backbones".
        seed: heads are initialised from seed, seed + 1, ...
        pooling: how each head reads a sequence (see :class:`ScalarHead`).
    """

    def __init__(self, backbone: nn.Module, n_members: int = 1, mode: EnsembleMode = "heads", seed: int = 0,
                 pooling: Pooling = "last"):  # fmt: skip
        super().__init__()
        if n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {n_members}")
        if mode not in ("heads", "backbones"):
            raise ValueError(f"ensemble mode must be 'heads' or 'backbones', got {mode!r}")
        self.mode = mode
        n_trunks = n_members if mode == "backbones" else 1
        self.backbones = nn.ModuleList([backbone] + [copy.deepcopy(backbone) for _ in range(n_trunks - 1)])
        heads = []
        for i in range(n_members):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + i)
                heads.append(ScalarHead(backbone.hidden_size, pooling))
        self.heads = nn.ModuleList(heads)
        self.register_buffer("norm_mean", torch.zeros(n_members))
        self.register_buffer("norm_std", torch.ones(n_members))

    @property
    def n_members(self) -> int:
        return len(self.heads)

    @property
    def pooling(self) -> Pooling:
        return self.heads[0].pooling

    def raw_members(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised scores (B, K) of right-padded sequences.

        Args:
            input_ids: (B, T) prompt + response ids; attention_mask: (B, T) real tokens.
        """
        if self.mode == "heads":
            hidden = self.backbones[0](input_ids, attention_mask)  # (B, T, D)
            return torch.stack([head(hidden, attention_mask) for head in self.heads], dim=-1)
        pairs = zip(self.backbones, self.heads, strict=True)
        return torch.stack([head(trunk(input_ids, attention_mask), attention_mask) for trunk, head in pairs], dim=-1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> RewardScores:
        """Normalised member scores and their mean and std; see :meth:`raw_members` for the arguments."""
        members = (self.raw_members(input_ids, attention_mask) - self.norm_mean) / self.norm_std
        std = members.std(dim=-1, unbiased=False) if self.n_members > 1 else torch.zeros_like(members[:, 0])
        return RewardScores(members, members.mean(dim=-1), std)

    @torch.no_grad()
    def measure_normalisation(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, chunk: int = 256) -> None:
        """Sets each member's ``norm_mean`` / ``norm_std`` to its raw score mean and std over these sequences (in
        eval mode, in chunks of ``chunk`` rows; the mode is restored). Arguments as :meth:`raw_members`, (n, T)."""
        was_training = self.training
        self.eval()
        chunks = zip(input_ids.split(chunk), attention_mask.split(chunk), strict=True)
        raw = torch.cat([self.raw_members(i, m) for i, m in chunks])  # (n, K)
        self.train(was_training)
        self.norm_mean.copy_(raw.mean(0))
        self.norm_std.copy_(raw.std(0).clamp(min=1e-6))

    def normalised_mean_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The linear map, weight (1, D) and bias (1,), from the first trunk's hidden state to the ensemble's mean
        normalised score: what PPO's critic head starts from.

        With ``mode="heads"`` every member reads the same trunk and is linear in its hidden state, so the mean of the
        members' normalised heads (weights / std, (bias - mean) / std) gives exactly ``score().mean``. With
        ``mode="backbones"`` each member has its own trunk and only one trunk can start the critic (the first):
        member 0's head goes with it (averaging heads that read different trunks would fit none of them). For K = 1
        both are member 0's head, bit for bit.
        """
        members = range(self.n_members if self.mode == "heads" else 1)
        weight = torch.stack([self.heads[i].proj.weight / self.norm_std[i] for i in members]).mean(0)
        bias = torch.stack([(self.heads[i].proj.bias - self.norm_mean[i]) / self.norm_std[i] for i in members]).mean(0)
        return weight, bias

    def spec(self) -> dict:
        """What a checkpoint needs to rebuild this model before loading its weights."""
        return {"backbone": backbone_spec(self.backbones[0]), "n_members": self.n_members, "mode": self.mode,
                "pooling": self.pooling}  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict) -> RewardModel:
        # Checkpoints from before pooling was a choice read the last token.
        return cls(backbone_from_spec(spec["backbone"]), spec["n_members"], spec["mode"],
                   pooling=spec.get("pooling", "last"))  # fmt: skip


def load_reward_model(path: str | Path) -> tuple[RewardModel, Tokenizer]:
    """(RewardModel in eval mode, Tokenizer) from a reward-phase checkpoint."""
    ckpt = load_checkpoint(path, phase="reward")
    meta = ckpt[RLHF_KEY]
    model = RewardModel.from_spec(meta["reward_model"])
    prefix = "reward_model."
    model.load_state_dict({k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)})
    return model.eval(), tokenizer_from_meta(meta)
