"""Sampling throughput of the default TinyGPT: KV cache vs the naive full recompute.

    python benchmarks/bench_sampling.py --batch 256 --new-tokens 24

Prints generated tokens per second (batch * new tokens / seconds, median of --reps runs) for both paths. The model is
randomly initialised with the default shape and EOS is disabled, so every row generates exactly --new-tokens tokens.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT


def tokens_per_second(
    model: TinyGPT, batch: int, prompt_len: int, new_tokens: int, use_cache: bool, reps: int
) -> float:
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (batch, prompt_len), generator=g)
    mask = torch.ones_like(prompts, dtype=torch.bool)
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    times = []
    for _ in range(reps + 1):  # the first run warms up allocator and kernels
        t0 = time.perf_counter()
        out = generate(model, prompts, mask, cfg, eos_id=-1, pad_id=0, generator=g, use_cache=use_cache)
        times.append(time.perf_counter() - t0)
        assert out.response_ids.shape == (batch, new_tokens)
    return batch * new_tokens / statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=320)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyGPT(GPTConfig(vocab_size=args.vocab)).eval()
    print(f"TinyGPT {model.config}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    for use_cache in (True, False):
        tps = tokens_per_second(model, args.batch, args.prompt_len, args.new_tokens, use_cache, args.reps)
        print(f"{'kv-cache' if use_cache else 'naive (no cache)':18s} {tps:10.0f} tokens/s")


if __name__ == "__main__":
    main()
