"""Benchmark of the fused ops against the naive PyTorch formulation: time, peak memory, bandwidth.

    python -m rlhf_kernels.bench                    # default cases for the device (CUDA when present, else CPU)
    python -m rlhf_kernels.bench --device cpu --case ppo_loss:4096:32000:256:float32 --reps 5

Cases (``op:N:V:H:dtype``):
- ``token_logprobs``: forward only, logits given. Naive: log_softmax + gather.
- ``ppo_loss_logits``: the loss alone, forward + backward from given (N, V) logits (``inplace=False``: a statistics
  pass, then a gradient pass that reads and writes).
- ``ppo_loss_inplace``: the same with ``inplace=True``, the training setting: one kernel reads the logits twice and
  writes the gradient over them; backward is free for a unit upstream gradient.
- ``ppo_loss``: forward + backward with the logits produced as in a model, ``hidden (N, H) @ lm_head (V, H)^T``,
  gradients flowing back to both. Naive: log_softmax + gather + clipped objective under autograd. Fused:
  :func:`rlhf_kernels.ppo_loss_from_logits` with ``inplace=True`` (the training-step setting).

Implementations: ``naive``, ``torch`` (the chunked fallback) and, on CUDA, ``triton``. Peak memory is measured above
the inputs: on CUDA with the allocator's peak counter; on CPU each case runs in a fresh process whose peak resident
set (VmHWM) is reset once the inputs exist. On CUDA the fused outputs are first checked against the naive ones,
and times come from CUDA events around each run.

Honesty columns (CUDA): with E = N * V * bytes per element, the memory floor of the current design is E for
``token_logprobs`` (one read), 3E for the loss-only PPO cases (statistics read, gradient read + write); ``ppo_loss``
has no floor (its matmuls dominate). Each figure is printed next to that floor, the fraction of the nominal HBM
bandwidth it reaches, and a same-run baseline: ``x.amax(-1)`` over logits of the same shape and dtype, a plain
one-read reduction, whose GB/s is what "at the bandwidth floor" can mean on this device today.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import rlhf_kernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OPS = ("token_logprobs", "ppo_loss", "ppo_loss_logits", "ppo_loss_inplace")
#: Passes over the (N, V) logits a fused op must make at least, per op (None: not memory-bound, no floor).
FLOOR_PASSES = {"token_logprobs": 1, "ppo_loss": None, "ppo_loss_logits": 3, "ppo_loss_inplace": 3}
CPU_CASES = (
    "ppo_loss:4096:32000:256:float32",
    "ppo_loss:1024:32000:256:float32",
    "token_logprobs:4096:32000:0:float32",
)
CUDA_CASES = (
    "token_logprobs:16384:50257:0:bfloat16",
    "token_logprobs:16384:50304:0:bfloat16",
    "token_logprobs:8192:128256:0:bfloat16",
    "ppo_loss_inplace:16384:50257:0:bfloat16",
    "ppo_loss_inplace:16384:50304:0:bfloat16",
    "ppo_loss_logits:16384:50257:0:bfloat16",
    "ppo_loss:16384:50257:1024:bfloat16",
)
#: Nominal HBM bandwidth in GB/s by device-name fragment, for the "% of bandwidth" column (override: --peak-gbps).
NOMINAL_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "A100": 2039.0}


@dataclass(frozen=True)
class Case:
    """One benchmark shape: ``op`` on (n, v) logits of ``dtype``; ``hidden`` is H for ppo_loss (0 otherwise)."""

    op: str
    n: int
    v: int
    hidden: int
    dtype: str

    @classmethod
    def parse(cls, text: str) -> Case:
        try:
            op, n, v, h, dtype = text.split(":")
            case = cls(op, int(n), int(v), int(h), dtype)
        except ValueError:
            example = "ppo_loss:4096:32000:256:float32"
            raise SystemExit(f"--case {text!r}: expected op:N:V:H:dtype, e.g. {example}") from None
        if case.op not in OPS or case.dtype not in DTYPES or min(case.n, case.v) <= 0:
            raise SystemExit(f"--case {text!r}: op in {OPS}, dtype in {tuple(DTYPES)}, N and V > 0")
        if case.op == "ppo_loss" and case.hidden <= 0:
            raise SystemExit(f"--case {text!r}: ppo_loss needs H > 0 (the hidden size of the lm-head matmul)")
        return case

    def __str__(self) -> str:
        return f"{self.op}:{self.n}:{self.v}:{self.hidden}:{self.dtype}"


@dataclass
class Result:
    case: str
    impl: str
    device: str
    ms: float
    peak_mib: float
    gbps: float | None = None
    pct_bandwidth: float | None = None
    floor_mib: float | None = None
    baseline_gbps: float | None = None
    pct_of_baseline: float | None = None


def _inputs(case: Case, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = DTYPES[case.dtype]
    n, v = case.n, case.v
    x = {"targets": torch.randint(0, v, (n,), generator=g)}
    if case.op != "token_logprobs":
        x["old_logp"] = -torch.rand(n, generator=g) * 5 - 8
        x["advantages"] = torch.randn(n, generator=g)
        x["mask"] = torch.rand(n, generator=g) > 0.1
    if case.op == "ppo_loss":
        x["hidden"] = torch.randn(n, case.hidden, generator=g) / case.hidden**0.5
        x["weight"] = torch.randn(v, case.hidden, generator=g)
    else:
        x["logits"] = torch.randn(n, v, generator=g) * 3
    out = {}
    for k, t in x.items():
        t = t.to(device)
        out[k] = t.to(dtype) if t.is_floating_point() and k in ("hidden", "weight", "logits") else t
    if case.op == "ppo_loss":
        out["hidden"].requires_grad_(True)
        out["weight"].requires_grad_(True)
    elif case.op == "ppo_loss_logits":
        out["logits"].requires_grad_(True)
    elif case.op == "ppo_loss_inplace":
        # A non-leaf, as a model's output is (a leaf's storage cannot take its own gradient); the gradient is taken
        # with respect to it, so the product that made it is never differentiated.
        out["logits"] = out["logits"].requires_grad_(True) * 1
    return out


def _naive_ppo_loss(logits, targets, old_logp, advantages, mask, eps=0.2):
    """The textbook formulation the fused loss replaces: log_softmax + gather + clipped objective under autograd."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ratio = torch.exp(logp - old_logp)
    pg = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - eps, 1 + eps))
    return (pg * mask).sum() / mask.sum().clamp(min=1)


def run_case(case: Case, impl: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Runs one case once (forward, and backward for ppo_loss); returns the output for checking."""
    if case.op == "token_logprobs":
        if impl == "naive":
            return torch.log_softmax(x["logits"].float(), dim=-1).gather(-1, x["targets"].unsqueeze(-1)).squeeze(-1)
        return rlhf_kernels.token_logprobs(x["logits"], x["targets"], backend=impl)
    if case.op == "ppo_loss_inplace":
        # The logits are overwritten by each run's gradient: later (timed) runs see other values, which a
        # memory-bound kernel's time does not depend on; the first run is the one checked against naive.
        logits = x["logits"]
        args = (logits, x["targets"], x["old_logp"], x["advantages"], x["mask"])
        if impl == "naive":
            loss = _naive_ppo_loss(*args)
        else:
            loss, _ = rlhf_kernels.ppo_loss_from_logits(*args, inplace=True, backend=impl)
        (grad,) = torch.autograd.grad(loss, logits)
        return torch.cat([loss.detach().reshape(1).float(), grad.flatten().float()[:4096]])
    leaf = x["logits"] if case.op == "ppo_loss_logits" else x["hidden"]
    leaf.grad = None
    if case.op == "ppo_loss":
        x["weight"].grad = None
    logits = leaf if case.op == "ppo_loss_logits" else x["hidden"] @ x["weight"].T  # (N, V)
    args = (logits, x["targets"], x["old_logp"], x["advantages"], x["mask"])
    if impl == "naive":
        loss = _naive_ppo_loss(*args)
    else:
        # A leaf's storage cannot take the gradient in place; from a matmul's output it can (the training setting).
        loss, _ = rlhf_kernels.ppo_loss_from_logits(*args, inplace=case.op == "ppo_loss", backend=impl)
    loss.backward()
    return torch.cat([loss.detach().reshape(1).float(), leaf.grad.flatten().float()[:4096]])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(case: Case, impl: str, device: torch.device, reps: int) -> tuple[float, float]:
    """(median milliseconds over ``reps`` warm runs, peak MiB above the inputs of the first run)."""
    x = _inputs(case, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run_case(case, impl, x)
        _sync(device)
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        base = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set, to the current RSS
        run_case(case, impl, x)
        peak = (_status_kib("VmHWM") - base) / 1024
    return _median_ms(lambda: run_case(case, impl, x), device, reps), peak


def _median_ms(fn, device: torch.device, reps: int) -> float:
    """Median over ``reps`` runs of fn: CUDA events on the GPU (device time, no host timer jitter), the host clock
    on the CPU."""
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _logits_bytes(case: Case) -> int:
    """E: the bytes of one (N, V) logits tensor."""
    return case.n * case.v * torch.tensor([], dtype=DTYPES[case.dtype]).element_size()


def floor_bytes(case: Case) -> int | None:
    """The least memory traffic of the fused op in its current design (see the module docstring), or None."""
    passes = FLOOR_PASSES[case.op]
    return None if passes is None else passes * _logits_bytes(case)


def baseline_gbps(case: Case, device: torch.device, reps: int) -> float:
    """Read bandwidth of ``x.amax(-1)`` over (N, V) logits of the case's dtype, measured now on this device."""
    x = torch.randn(case.n, case.v, device=device).to(DTYPES[case.dtype])
    x.amax(-1)  # warm-up
    ms = _median_ms(lambda: x.amax(-1), device, reps)
    return _logits_bytes(case) / (ms * 1e-3) / 1e9


def _nominal_gbps(device: torch.device) -> float | None:
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in NOMINAL_GBPS.items() if key in name), None)


def check_against_naive(case: Case, impl: str, device: torch.device) -> float:
    """Max abs difference between the fused and naive outputs (loss and a slice of d loss / d hidden)."""
    want = run_case(case, "naive", _inputs(case, device))
    got = run_case(case, impl, _inputs(case, device))
    err = (got.float() - want.float()).abs().max().item()
    tol = 2e-2 if case.dtype != "float32" else 1e-4
    if not err <= tol * max(1.0, want.abs().max().item()):
        raise SystemExit(f"{case} {impl}: output differs from the naive reference by {err:.3g}; not benchmarking")
    return err


def _worker(case: Case, impl: str, reps: int) -> None:
    torch.manual_seed(0)
    ms, peak = measure(case, impl, torch.device("cpu"), reps)
    print(json.dumps({"ms": ms, "peak_mib": peak}))


def _cpu_cell(case: Case, impl: str, reps: int) -> tuple[float, float]:
    # A fresh process per cell: the peak resident set of one cell must not include another's heap.
    cmd = [sys.executable, "-m", "rlhf_kernels.bench", "--worker", str(case), impl, str(reps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"benchmark worker failed for {case} {impl}:\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return out["ms"], out["peak_mib"]


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


IMPLS = ("naive", "torch", "triton")


def run(
    cases: list[Case], device: torch.device, reps: int, peak_gbps: float | None, only: tuple[str, ...] = IMPLS
) -> list[Result]:
    impls = ["naive", "torch"] + (["triton"] if device.type == "cuda" and rlhf_kernels.triton_available() else [])
    impls = [i for i in impls if i in only]
    bandwidth = peak_gbps or (_nominal_gbps(device) if device.type == "cuda" else None)
    results = []
    for case in cases:
        floor = floor_bytes(case)
        base = baseline_gbps(case, device, reps) if device.type == "cuda" and floor is not None else None
        for impl in impls:
            if device.type == "cuda":
                if impl != "naive":
                    check_against_naive(case, impl, device)
                ms, peak = measure(case, impl, device, reps)
            else:
                ms, peak = _cpu_cell(case, impl, reps)
            r = Result(str(case), impl, device.type, ms, peak)
            if floor is not None:
                r.floor_mib = floor / 2**20
            if base is not None:
                r.gbps = floor / (ms * 1e-3) / 1e9
                r.pct_bandwidth = 100 * r.gbps / bandwidth if bandwidth else None
                r.baseline_gbps = base
                r.pct_of_baseline = 100 * r.gbps / base
            results.append(r)
            print(_row(r, results), flush=True)
    return results


HEADER = (
    f"{'case':42s} {'impl':7s} {'ms':>9s} {'peak MiB':>9s}   {'vs naive':13s} {'floor MiB':>9s} {'GB/s':>7s}"
    f" {'%HBM':>6s} {'amax GB/s':>9s} {'%amax':>6s}"
)


def _row(r: Result, results: list[Result]) -> str:
    naive = next((x for x in results if x.case == r.case and x.impl == "naive"), None)
    rel = f"{r.ms / naive.ms:5.2f}x {r.peak_mib / max(naive.peak_mib, 1e-9):5.2f}x" if naive else " " * 13
    floor = f"{r.floor_mib:9.0f}" if r.floor_mib is not None else f"{'-':>9s}"
    bw = ""
    if r.gbps is not None:
        pct = f"{r.pct_bandwidth:5.1f}%" if r.pct_bandwidth is not None else f"{'?':>6s}"
        bw = f" {r.gbps:7.0f} {pct} {r.baseline_gbps:9.0f} {r.pct_of_baseline:5.1f}%"
    return f"{r.case:42s} {r.impl:7s} {r.ms:9.2f} {r.peak_mib:9.1f}   {rel} {floor}{bw}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rlhf_kernels.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--case", action="append", help="op:N:V:H:dtype (repeatable); default: the device's set")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions after the first run (median)")
    parser.add_argument("--peak-gbps", type=float, help="the device's memory bandwidth in GB/s, for % of bandwidth")
    impls_help = "comma-separated subset of naive,torch,triton (the torch fallback is slow on a GPU)"
    parser.add_argument("--impls", default=",".join(IMPLS), help=impls_help)
    parser.add_argument("--json", type=Path, default=None, help="where to write the results (default benchmarks/)")
    parser.add_argument("--worker", nargs=3, metavar=("CASE", "IMPL", "REPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(Case.parse(args.worker[0]), args.worker[1], int(args.worker[2]))
        return
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    cases = [Case.parse(c) for c in args.case or (CUDA_CASES if use_cuda else CPU_CASES)]
    print(f"machine: {machine_description(device)}")
    print(HEADER)
    only = tuple(i.strip() for i in args.impls.split(","))
    if not set(only) <= set(IMPLS):
        parser.error(f"--impls: choose from {','.join(IMPLS)}")
    results = run(cases, device, args.reps, args.peak_gbps, only)
    path = args.json or Path("benchmarks") / f"kernels-{device.type}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    payload = {"machine": machine_description(device), "results": [asdict(r) for r in results]}
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a file
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
