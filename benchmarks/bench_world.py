"""Throughput of the review world's gold judge, on a mix of responses like a policy's samples.

    python benchmarks/bench_world.py --count 20000 --batch 64 256 1024 4096

Prints responses scored per second (median of --reps passes over --count responses) for each batch size, then the
time to write the default world. The mix: 40% SFT-like demonstrations, 30% preference-pair candidates, 10% one
sentence repeated 3-8 times, 10% cut at a random word (not ended), 10% random words of the vocabulary. The judge runs
numpy element-wise ops, gathers and sorts only (no BLAS), so it is single-threaded: the figures are for one core.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import numpy as np

from rlhf_lightning.world import WORDS, GoldJudge, demo_response, pair_responses, sample_prompts, write_world


def realistic_mix(n: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """(prompts, responses, ended (n,) bool) in the proportions of the module docstring."""
    rng = np.random.default_rng(seed)
    prompts = sample_prompts(rng, n)
    responses, ended = [], np.ones(n, dtype=bool)
    for i, (prompt, kind) in enumerate(zip(prompts, rng.random(n), strict=True)):
        if kind < 0.4:
            responses.append(demo_response(prompt, rng))
        elif kind < 0.7:
            responses.append(pair_responses(prompt, rng)[0])
        elif kind < 0.8:
            sentence = demo_response(prompt, rng).split(" . ")[0] + " ."
            responses.append(" ".join([sentence] * int(rng.integers(3, 9))))
        elif kind < 0.9:
            words = pair_responses(prompt, rng)[0].split()
            responses.append(" ".join(words[: int(rng.integers(1, len(words) + 1))]))
            ended[i] = False
        else:
            responses.append(" ".join(rng.choice(WORDS, size=int(rng.integers(5, 41)))))
    return prompts, responses, ended


def responses_per_second(judge: GoldJudge, data: tuple, batch: int, reps: int) -> float:
    prompts, responses, ended = data
    times = []
    for _ in range(reps + 1):  # the first pass warms the prompt cache
        t0 = time.perf_counter()
        for i in range(0, len(responses), batch):
            judge.score(prompts[i : i + batch], responses[i : i + batch], ended[i : i + batch])
        times.append(time.perf_counter() - t0)
    return len(responses) / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20000, help="responses per pass")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256, 1024, 4096], help="batch sizes")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data = realistic_mix(args.count, args.seed)
    judge = GoldJudge()
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.processor() or platform.machine()}")
    mean_words = np.mean([len(r.split()) for r in data[1]])
    print(f"{args.count} responses, {mean_words:.1f} words on average, gold mean {judge.score(*data).mean():.3f}")
    for batch in args.batch:
        print(f"batch {batch:5d}  {responses_per_second(judge, data, batch, args.reps):10.0f} responses/s")
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        meta = write_world(out)
        files = meta["files"]
        print(f"write_world(default): {time.perf_counter() - t0:.2f} s for {sum(files.values())} lines")


if __name__ == "__main__":
    main()
