"""Reward-model training throughput: pairs per second of the RewardModule's training computation.

    python benchmarks/bench_rm.py --layers 4 --width 128 --heads 4 --vocab 300 --pairs-per-step 16 \\
        --tokens-per-pair 72 --steps 40

One step = the chosen and rejected sequences of a batch in one (2B, T) forward pass through a TinyGPT trunk and a
scalar head, the fused Bradley-Terry loss, backward, gradient clipping and an AdamW step: exactly what
RewardModule.training_step does (the same functions), without Lightning's loop around it. Token ids are random; each
pair's tokens are split evenly between its chosen and rejected sequence. Prints pairs/s (median of 3 timed windows
after a warm-up).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
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
    args = parser.parse_args()
    torch.manual_seed(0)
    seq = args.tokens_per_pair // 2
    config = GPTConfig(vocab_size=args.vocab, n_layer=args.layers, n_head=args.heads, d_model=args.width,
                       max_seq_len=seq)  # fmt: skip
    model = RewardModel(TinyGPT(config), n_members=args.ensemble)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
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

    for _ in range(5):
        step()
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        rates.append(args.steps * b / (time.perf_counter() - t0))
    print(f"{config}, ensemble {args.ensemble}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    shape = f"{args.pairs_per_step} pairs/step, {args.tokens_per_pair} tokens/pair ({seq} per side)"
    print(f"{statistics.median(rates):.0f} pairs/s  ({shape})")


if __name__ == "__main__":
    main()
