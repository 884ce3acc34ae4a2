"""The PPO math as pure functions and small state objects: advantages, the KL penalty and its controllers, reward
shaping, a rollout's whole shaping (:func:`shape_rollout`), the policy and value losses, the rollout container. No
Lightning here: the PPO module orchestrates them."""

from rlhf_kernels import KL_ESTIMATORS
from rlhf_lightning.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageConfig,
    estimate_advantages,
    explained_variance,
    gae,
    group_baseline_advantages,
    masked_mean,
    masked_var,
    whiten,
)
from rlhf_lightning.rl.kl import (
    DEFAULT_KL_HORIZON,
    AdaptiveKL,
    AnnealedKL,
    FixedKL,
    KLConfig,
    KLController,
    KLEstimator,
    kl_controller,
    per_token_kl,
)
from rlhf_lightning.rl.losses import policy_loss, value_loss
from rlhf_lightning.rl.rewards import (
    RewardConfig,
    RunningMoments,
    ShapedRewards,
    remove_length_trend,
    shape_rewards,
)
from rlhf_lightning.rl.rollout import RolloutStats, ScoredBatch, ScoreStats, shape_rollout
from rlhf_lightning.rl.types import Rollout

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "DEFAULT_KL_HORIZON",
    "KL_ESTIMATORS",
    "AdaptiveKL",
    "AdvantageConfig",
    "AnnealedKL",
    "FixedKL",
    "KLConfig",
    "KLController",
    "KLEstimator",
    "RewardConfig",
    "Rollout",
    "RolloutStats",
    "RunningMoments",
    "ScoreStats",
    "ScoredBatch",
    "ShapedRewards",
    "estimate_advantages",
    "explained_variance",
    "gae",
    "group_baseline_advantages",
    "kl_controller",
    "masked_mean",
    "masked_var",
    "per_token_kl",
    "policy_loss",
    "remove_length_trend",
    "shape_rewards",
    "shape_rollout",
    "value_loss",
    "whiten",
]
