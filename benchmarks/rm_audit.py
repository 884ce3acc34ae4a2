"""A pre-flight audit of reward models: on pairs of SFT samples, how often does each one agree with fresh labels?

    python benchmarks/rm_audit.py --sft-checkpoint SFT --data-dir WORLD --rm default=RM1 --rm length=RM2 \\
        [--seeds 1234,1235,1236] [--prompts 256]

For each seed, two responses per held-out prompt are sampled from the SFT policy (seeds + 2 and + 3, as PPO's
evaluation draws its own), labelled once by the world's default annotators (the audit's raters of
``eval/audit_win_rate``), and each reward model's preference (its normalised score, higher wins, ties half) is
compared with the label and with the gold judge's order. Prints one line per (seed, reward model).

The question it answers: can a few hundred fresh labels, before any RL, tell a flawed reward model from a good one?
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models.backbone import freeze, load_sft_backbone
from rlhf_lightning.models.reward import load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.modules.common import sample_eval
from rlhf_lightning.modules.ppo_eval import eval_proxy
from rlhf_lightning.world.annotators import AnnotatorConfig, Annotators


def agreement(preferred_a: np.ndarray, tie: np.ndarray, truth_a: np.ndarray) -> float:
    """Share of pairs where a preference (``preferred_a`` (B,) bool, ``tie`` (B,) bool: counts half) matches
    ``truth_a`` (B,) bool."""
    return float(np.where(tie, 0.5, preferred_a == truth_a).mean())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sft-checkpoint", type=Path, required=True)
    parser.add_argument("--data-dir", type=Path, required=True, help="the world folder (held-out prompts, judge)")
    parser.add_argument("--rm", action="append", required=True, metavar="NAME=CHECKPOINT")
    parser.add_argument("--seeds", default="1234,1235,1236", help="evaluation seeds (PPO's eval.seed per run)")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy, tokenizer = load_sft_backbone(args.sft_checkpoint)
    policy = freeze(policy)
    dm = PromptDataModule(data_dir=str(args.data_dir), generate_world=False, eval_prompts=args.prompts,
                          tokenizer_path=str(args.sft_checkpoint.parent / "tokenizer.json"))  # fmt: skip
    dm.setup("validate")
    prompts, batch = dm.eval_prompts()
    sampling = SamplingConfig(max_new_tokens=32, temperature=1.0)
    models = {name: freeze(load_reward_model(path)[0]) for name, path in (r.split("=", 1) for r in args.rm)}
    cpu = torch.device("cpu")
    for seed in (int(s) for s in args.seeds.split(",")):
        a, b = (sample_eval(policy, tokenizer, prompts, batch["prompt_ids"], batch["prompt_mask"], sampling,
                            seed + k, dm.judge) for k in (2, 3))  # fmt: skip
        labels, _ = Annotators(AnnotatorConfig(), dm.judge).label(
            prompts, a.responses, b.responses, np.random.default_rng(seed), (a.ended.tolist(), b.ended.tolist())
        )
        gold_a = (a.gold > b.gold).numpy()
        for name, model in models.items():
            score_a, score_b = (eval_proxy(model, tokenizer, s, batch, 0.0, cpu) for s in (a, b))
            preferred, tie = (score_a > score_b).numpy(), (score_a == score_b).numpy()
            print(f"seed {seed} {name}: agreement with fresh labels {agreement(preferred, tie, labels):.3f}, "
                  f"with the gold order {agreement(preferred, tie, gold_a):.3f} ({len(prompts)} pairs)")  # fmt: skip


if __name__ == "__main__":
    main()
