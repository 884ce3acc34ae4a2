"""The benchmark command runs end to end at a tiny shape and writes its JSON (figures are not asserted: timings
belong in benchmarks, never in tests)."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf_kernels import bench

# The CPU benchmark path (subprocesses, peak resident set); the CUDA path is run by hand on a GPU machine.
pytestmark = pytest.mark.cpu_only


def test_bench_tiny_cpu_writes_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    bench.main(
        ["--device", "cpu", "--case", "ppo_loss:64:300:16:float32", "--case", "token_logprobs:32:50:0:float32",
         "--reps", "1", "--json", str(out)]
    )  # fmt: skip
    data = json.loads(out.read_text())
    rows = {(r["case"], r["impl"]) for r in data["results"]}
    assert rows == {
        ("ppo_loss:64:300:16:float32", "naive"),
        ("ppo_loss:64:300:16:float32", "torch"),
        ("token_logprobs:32:50:0:float32", "naive"),
        ("token_logprobs:32:50:0:float32", "torch"),
    }
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in data["results"])
    assert "machine:" in capsys.readouterr().out
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text", ["ppo_loss:64:300:0:float32", "nope:1:2:3:float32", "ppo_loss:a:b", "x:1:1:0:int8"])
def test_bench_rejects_bad_case(text):
    with pytest.raises(SystemExit, match="--case"):
        bench.Case.parse(text)


def test_fused_matches_naive_on_bench_inputs():
    case = bench.Case.parse("ppo_loss:48:257:8:float32")
    assert bench.check_against_naive(case, "torch", torch.device("cpu")) < 1e-4
