"""The PPO loss from hidden states (LM head fused in) against the paths that build the (N, V) logits: fwd + bwd.

    OMP_NUM_THREADS=2 python benchmarks/bench_fused_linear.py --n 4096 --vocab 32000 --hidden 256 --repeats 3

Three paths, each ``loss.backward()`` to d hidden and d weight (fp32 by default):

- naive: ``logits = hidden @ weight.T`` then the reference PPO loss (``rlhf_kernels.reference``) through autograd;
- logits op: the same matmul, then ``ppo_loss_from_logits(..., inplace=True)`` (today's fused row op);
- from hidden: ``ppo_loss_from_hidden`` (the matmul chunked over rows inside the op; no (N, V) logits).

Time: the median of ``--repeats`` runs, the paths interleaved (naive, logits op, from hidden, naive, ...) in one
process after one warm-up each, so a load change on a shared machine hits all three alike.

Peak memory above the inputs: each path runs once in a fresh subprocess (``--measure``), which builds the inputs,
reads its resident set size (VmRSS from /proc/self/status), runs fwd + bwd once and reads its peak resident set size
(VmHWM); the figure is VmHWM - VmRSS. Large tensors are mmap'ed and unmapped when freed, so the peak RSS follows the
tensors alive at once (plus the allocator's and libraries' overhead, which all paths pay alike).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from rlhf_kernels import ppo_loss_from_hidden, ppo_loss_from_logits
from rlhf_kernels.reference import ppo_loss_reference

PATHS = ("naive", "logits op", "from hidden")


def make_inputs(n: int, v: int, h: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """A PPO minibatch on random hidden states and head: (n, h) hidden and (v, h) weight (leaves with gradient), n
    sampled-looking targets, rollout log-probs near the current ones, advantages, 10% padding."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) / h**0.5).to(dtype).requires_grad_()
    return {
        "hidden": hidden,
        "weight": weight,
        "targets": torch.randint(0, v, (n,), generator=gen),
        "old_logp": -torch.rand(n, generator=gen) * 8 - 4,
        "advantages": torch.randn(n, generator=gen),
        "mask": torch.rand(n, generator=gen) > 0.1,
    }


def run_path(name: str, x: dict, entropy_coef: float) -> float:
    """One fwd + bwd of path ``name``; returns the loss (the gradients land in hidden.grad and weight.grad)."""
    x["hidden"].grad = x["weight"].grad = None
    args = (x["targets"], x["old_logp"], x["advantages"], x["mask"])
    if name == "from hidden":
        loss, _ = ppo_loss_from_hidden(x["hidden"], x["weight"], *args, entropy_coef=entropy_coef)
    elif name == "logits op":
        logits = x["hidden"] @ x["weight"].T
        loss, _ = ppo_loss_from_logits(logits, *args, entropy_coef=entropy_coef, inplace=True)
    else:
        loss, _ = ppo_loss_reference(x["hidden"] @ x["weight"].T, *args, entropy_coef=entropy_coef)
    loss.backward()
    return float(loss.detach())


def status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_peak(args: argparse.Namespace) -> None:
    """Subprocess mode: prints {"peak_mib": VmHWM - VmRSS after building the inputs} for one fwd + bwd."""
    run_path(args.measure, make_inputs(8, 64, 16, torch.float32), args.entropy_coef)  # load kernels and libraries
    x = make_inputs(args.n, args.vocab, args.hidden, getattr(torch, args.dtype))
    before = status_kib("VmRSS")
    run_path(args.measure, x, args.entropy_coef)
    print(json.dumps({"peak_mib": (status_kib("VmHWM") - before) / 1024}))


def timed(fn: Callable[[], float]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens (rows)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float64"))
    parser.add_argument("--entropy-coef", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--measure", choices=PATHS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure_peak(args)
        return
    forwarded = [f"--n={args.n}", f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--dtype={args.dtype}",
                 f"--entropy-coef={args.entropy_coef}"]  # fmt: skip
    peaks = {}
    for name in PATHS:
        out = subprocess.run([sys.executable, __file__, *forwarded, f"--measure={name}"], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
        peaks[name] = json.loads(out.splitlines()[-1])["peak_mib"]
    x = make_inputs(args.n, args.vocab, args.hidden, getattr(torch, args.dtype))
    losses = {name: run_path(name, x, args.entropy_coef) for name in PATHS}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(args.repeats):
        for name in PATHS:
            times[name].append(timed(lambda name=name: run_path(name, x, args.entropy_coef)))
    inputs_mib = (x["hidden"].numel() + x["weight"].numel()) * x["hidden"].element_size() / 2**20
    print(f"N={args.n} V={args.vocab} H={args.hidden} {args.dtype}, threads={torch.get_num_threads()}, inputs "
          f"{inputs_mib:.1f} MiB, fp32 (N, V) logits {args.n * args.vocab * 4 / 2**20:.0f} MiB")  # fmt: skip
    print(f"{'path':<12} {'fwd+bwd s':>10} {'x naive':>8} {'peak MiB':>9} {'x naive':>8} {'loss':>12}")
    for name in PATHS:
        t = statistics.median(times[name])
        t0 = statistics.median(times["naive"])
        print(f"{name:<12} {t:>10.3f} {t / t0:>8.3f} {peaks[name]:>9.1f} {peaks[name] / peaks['naive']:>8.3f} "
              f"{losses[name]:>12.6f}")  # fmt: skip


if __name__ == "__main__":
    main()
