"""The phases as LightningModules: orchestration only; the math lives in rlhf_kernels and rlhf_lightning.rl."""

from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.sft import SFTModule

__all__ = ["DPOModule", "PPOModule", "RewardModule", "SFTModule"]
