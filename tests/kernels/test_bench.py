"""The benchmark command runs end to end at a tiny shape and writes its JSON (figures are not asserted: timings
belong in benchmarks, never in tests)."""

from __future__ import annotations

import json

import pytest
import torch
from kernel_helpers import BACKEND_PARAMS

from rlhf_kernels import bench

# The CPU benchmark path (subprocesses, peak resident set); the CUDA path is run by hand on a GPU machine.
pytestmark = pytest.mark.cpu_only


def test_bench_tiny_cpu_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(
        ["--device", "cpu", "--case", "ppo_loss:64:300:16:float32", "--case", "token_logprobs:32:50:0:float32",
         "--case", "ppo_loss_inplace:16:64:0:float32", "--reps", "1", "--json", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    rows = {(r["case"], r["impl"]) for r in data["results"]}
    cases = ("ppo_loss:64:300:16:float32", "token_logprobs:32:50:0:float32", "ppo_loss_inplace:16:64:0:float32")
    assert rows == {(c, impl) for c in cases for impl in ("naive", "torch")}
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in data["results"])
    # The memory floors: E = N * V * 4 bytes for the log-probs, 3E for the loss alone, none with the matmuls.
    floors = {r["case"]: r["floor_mib"] for r in data["results"]}
    assert floors == {cases[0]: None, cases[1]: 32 * 50 * 4 / 2**20, cases[2]: 3 * 16 * 64 * 4 / 2**20}
    # Bandwidth figures and the amax baseline are CUDA-only.
    assert all(r["gbps"] is None and r["baseline_gbps"] is None for r in data["results"])
    assert "machine:" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text", ["ppo_loss:64:300:0:float32", "nope:1:2:3:float32", "ppo_loss:a:b", "x:1:1:0:int8"])
def test_bench_rejects_bad_case(text):
    with pytest.raises(SystemExit, match="--case"):
        bench.Case.parse(text)


@pytest.mark.parametrize("impl", BACKEND_PARAMS)
@pytest.mark.parametrize("case", ["ppo_loss:48:257:8:float32", "ppo_loss_inplace:48:257:0:float32"])
def test_fused_matches_naive_on_bench_inputs(case: str, impl: str) -> None:
    assert bench.check_against_naive(bench.Case.parse(case), impl, torch.device("cpu")) < 1e-4


def test_amax_baseline_runs_on_any_device() -> None:
    assert bench.baseline_gbps(bench.Case.parse("token_logprobs:8:300:0:bfloat16"), torch.device("cpu"), 2) > 0
