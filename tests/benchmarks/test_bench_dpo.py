"""The DPO throughput benchmark (benchmarks/bench_dpo.py) runs end to end at a tiny shape and prints its JSON line;
the TRL side's data (benchmarks/peer_trl_dpo.py) has exactly the tokens per pair ours has. No figure is asserted
beyond being positive: timings belong in benchmarks, never in tests."""

from __future__ import annotations

import json

import pytest


def test_bench_dpo_tiny_prints_positive_throughput(capsys, load_bench):
    bench = load_bench("bench_dpo")
    # --threads 0 leaves torch's thread count to the test process; a tiny model keeps it to seconds.
    result = bench.main(["--layers", "1", "--heads", "2", "--width", "32", "--vocab", "40", "--steps", "3", "--warmup",
                         "1", "--pairs", "32", "--val-pairs", "4", "--batch", "8", "--threads", "0"])  # fmt: skip
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result
    assert result["steps"] == 3 and result["batch_pairs"] == 8
    assert result["pairs_per_s_median"] > 0 and result["pairs_per_s_mean"] > 0
    assert result["tokens_per_pair"] == 8 + 24 + 24 and result["sequence_tokens"] == 32
    assert result["reference_pairs"] == 32 + 4 and 0 < result["reference_pass_s"] <= result["setup_s"]


def test_peer_side_tokenizes_to_the_same_tokens_per_pair(monkeypatch, load_bench):
    """TRL's DPOTrainer tokenises prompt, prompt + chosen + EOS and prompt + rejected + EOS as text; with the
    peer side's word-level tokenizer that is exactly prompt_tokens and response_tokens (EOS included) each."""
    pytest.importorskip("transformers")
    # The script sets the Hugging Face offline variables at import; set here first so that they are undone after.
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM",
                "WANDB_DISABLED", "DISABLE_MLFLOW_INTEGRATION"):  # fmt: skip
        monkeypatch.setenv(key, "1" if key != "TOKENIZERS_PARALLELISM" else "false")
    peer = load_bench("peer_trl_dpo")
    tokenizer = peer.word_tokenizer(300)
    assert len(tokenizer) == 300
    rows = peer.synthetic_pairs(20, 8, 23, 300, seed=0)
    for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"], strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        for response in (chosen, rejected):
            ids = tokenizer(prompt + response + tokenizer.eos_token)["input_ids"]
            assert len(prompt_ids) == 8 and ids[:8] == prompt_ids and len(ids) == 8 + 24
            assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
