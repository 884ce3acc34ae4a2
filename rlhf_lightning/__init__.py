"""rlhf-lightning: SFT, a Bradley-Terry reward model and PPO with a KL penalty as Lightning modules."""

__version__ = "0.1.0"
