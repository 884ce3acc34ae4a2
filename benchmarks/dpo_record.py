"""What both DPO benchmarks share (ours, benchmarks/bench_dpo.py; TRL's, benchmarks/peer_trl_dpo.py): the flags of
the run's shape and timing, which benchmarks/peer_dpo.sh passes to both, and the step-timing fields of their JSON
lines, computed and named alike. Standard library only: the peer's script runs in TRL's venv."""

from __future__ import annotations

import argparse
import statistics


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """The flags both scripts take with the same meaning and default."""
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    p.add_argument("--batch", type=int, default=16, help="preference pairs per optimizer step")
    p.add_argument("--pairs", type=int, default=1024, help="training pairs")
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--response-tokens", type=int, default=24, help="per response, its EOS included")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-4, help="this project's DPO default (TRL's is 1e-6)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=1234)


def check_shared_args(
    p: argparse.ArgumentParser, args: argparse.Namespace, positions: int, positions_flag: str
) -> None:
    """Exits through ``p.error`` on shared flags that cannot run: the sequence must fit in ``positions`` (the model's
    position table, set by ``positions_flag``)."""
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    if args.response_tokens < 2 or args.prompt_tokens < 1:
        p.error("--response-tokens must be >= 2 (a word and the EOS), --prompt-tokens >= 1")
    if args.prompt_tokens + args.response_tokens > positions:
        p.error(f"--prompt-tokens + --response-tokens must fit in {positions_flag}")


def step_fields(args: argparse.Namespace, durations: list[float], loop_s: float) -> dict:
    """Pairs/s of the median step after ``args.warmup`` warm-up steps and of the mean over the whole loop.

    Args:
        args: the benchmark's flags (``warmup``, ``batch``, ``prompt_tokens``, ``response_tokens``, ``beta``).
        durations: each optimizer step's seconds, in order.
        loop_s: the seconds from the loop's start to the last step's end.
    Raises:
        RuntimeError: no step after the warm-up.
    """
    if len(durations) <= args.warmup:
        raise RuntimeError(f"{len(durations)} timed steps, need more than --warmup {args.warmup}")
    median = statistics.median(durations[args.warmup :])
    return {
        "steps": len(durations),
        "warmup": args.warmup,
        "batch_pairs": args.batch,
        "prompt_tokens": args.prompt_tokens,
        "response_tokens": args.response_tokens,
        "tokens_per_pair": args.prompt_tokens + 2 * args.response_tokens,  # prompt + chosen + rejected
        "sequence_tokens": args.prompt_tokens + args.response_tokens,  # each of the 2 x batch rows a step runs
        "beta": args.beta,
        "median_step_s": round(median, 4),
        "pairs_per_s_median": round(args.batch / median, 2),
        "pairs_per_s_mean": round(len(durations) * args.batch / loop_s, 2),
    }
