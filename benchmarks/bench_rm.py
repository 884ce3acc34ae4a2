"""Reward-model training throughput: pairs per second of the RewardModule's training computation.

    python benchmarks/bench_rm.py --layers 4 --width 128 --heads 4 --vocab 300 --pairs-per-step 16 \\
        --tokens-per-pair 72 --steps 40

One step = the chosen and rejected sequences of a batch in one (2B, T) forward pass through a TinyGPT trunk and a
scalar head, the fused Bradley-Terry loss, backward, gradient clipping and a step of the RewardModule's optimiser
(fused AdamW with its warmup/cosine schedule): what RewardModule.training_step does (the same functions), without
Lightning's loop around it. Token ids are random; each pair's tokens are split evenly between its chosen and rejected
sequence. Prints pairs/s, the median and the best of --windows timed windows after a warm-up (the best is the figure
least disturbed by other processes sharing the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.modules.common import adamw_with_warmup_cosine
from rlhf_lightning.modules.reward import pair_losses, pair_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=300)
    parser.add_argument("--pairs-per-step", type=int, default=16)
    parser.add_argument("--tokens-per-pair", type=int, default=72)
    parser.add_argument("--ensemble", type=int, default=1)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=3, help="timed windows")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    seq = args.tokens_per_pair // 2
    config = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.width,
                       max_seq_len=seq)  # fmt: skip
    model = RewardModel(TinyGPT(config), n_members=args.ensemble)
    total_steps = 5 + args.windows * args.steps
    sched = adamw_with_warmup_cosine(model, 1e-3, 0.0, (0.9, 0.95), 20, total_steps, 0.1)["lr_scheduler"]["scheduler"]
    opt = sched.optimizer
    b = args.pairs_per_step
    batch = {
        "chosen_ids": torch.randint(3, args.vocab, (b, seq)),
        "rejected_ids": torch.randint(3, args.vocab, (b, seq)),
        "chosen_mask": torch.ones(b, seq, dtype=torch.bool),
        "rejected_mask": torch.ones(b, seq, dtype=torch.bool),
    }

    def step() -> None:
        r_c, r_r = pair_scores(model, batch)
        loss = pair_losses(r_c, r_r).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    for _ in range(5):
        step()
    rates = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(args.steps * b / (time.perf_counter() - t0))
    print(f"{config}, ensemble {args.ensemble}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    shape = f"{args.pairs_per_step} pairs/step, {args.tokens_per_pair} tokens/pair ({seq} per side)"
    print(f"{statistics.median(rates):.0f} pairs/s median, {max(rates):.0f} best of {args.windows}  ({shape})")


if __name__ == "__main__":
    main()
