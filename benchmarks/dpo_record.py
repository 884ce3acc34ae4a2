"""The step-timing fields both DPO benchmarks print (ours, benchmarks/bench_dpo.py; TRL's, benchmarks/peer_trl_dpo.py),
so the two JSON lines are computed and named alike. Standard library only: the peer's script runs in TRL's venv."""

from __future__ import annotations

import argparse
import statistics


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
