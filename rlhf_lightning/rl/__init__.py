"""Pure functions and small state objects of the RL phase: advantages, KL penalty and controllers, reward shaping,
the rollout container. No Lightning here: the PPO module orchestrates them."""

from rlhf_kernels import KL_ESTIMATORS
from rlhf_lightning.rl.advantages import explained_variance, gae, masked_mean, masked_var, whiten
from rlhf_lightning.rl.kl import (
    DEFAULT_KL_HORIZON,
    AdaptiveKL,
    AnnealedKL,
    FixedKL,
    KLController,
    KLEstimator,
    kl_controller,
    per_token_kl,
)
from rlhf_lightning.rl.rewards import (
    RunningMoments,
    ShapedRewards,
    last_real_index,
    remove_length_trend,
    shape_rewards,
)
from rlhf_lightning.rl.types import Rollout

__all__ = [
    "DEFAULT_KL_HORIZON",
    "KL_ESTIMATORS",
    "AdaptiveKL",
    "AnnealedKL",
    "FixedKL",
    "KLController",
    "KLEstimator",
    "Rollout",
    "RunningMoments",
    "ShapedRewards",
    "explained_variance",
    "gae",
    "kl_controller",
    "last_real_index",
    "masked_mean",
    "masked_var",
    "per_token_kl",
    "remove_length_trend",
    "shape_rewards",
    "whiten",
]
