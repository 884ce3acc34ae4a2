"""DPO training throughput of TRL 1.12's ``DPOTrainer`` on CPU, offline, at the peer benchmark's shape: the peer side
of ``benchmarks/bench_dpo.py`` (run both with ``benchmarks/peer_dpo.sh``, interleaved, and compare the ratio).

    /work/exp/trl-venv/bin/python benchmarks/peer_trl_dpo.py --threads 2                  # TRL's default: a reference
    /work/exp/trl-venv/bin/python benchmarks/peer_trl_dpo.py --threads 2 --precompute-ref # reference log-probs first

Runs in the TRL venv (trl 1.12, transformers, datasets, accelerate), not in this project's: it imports nothing of
rlhf_lightning. From the peer benchmark (``--peer-bench``, default ``../shared/peers/trl_bench.py`` from the
repository root) it takes the random GPT-2 of the peer's shape (``build_causal_lm``: 4 layers, 4 heads, width 128,
128 positions), its step timer and its version fields, so the model and the timing are the peer's own.

What one step is: one optimizer step of ``trl.DPOTrainer`` on 16 preference pairs (``--batch``), sigmoid loss, beta
0.1, fp32 (TRL's own defaults are bf16 and gradient checkpointing, which the peer README measured as emulation on
this CPU: both off, as in the peer), AdamW (transformers' default, fused) with gradient clipping at 1.0, no evaluation
and no checkpoints. The reference model is TRL's default: ``ref_model=None`` makes TRL load a second copy of the
policy from the policy's folder (saved here first, so nothing is fetched), and every step runs it on the batch under
``no_grad``. ``--precompute-ref`` instead sets ``precompute_ref_log_probs=True``: TRL runs the reference over the
whole training set in the trainer's constructor (``setup_s``, outside the timed loop) and keeps no reference model,
as this project's DPO does.

Data (synthetic, in memory): a word-level tokenizer of ``--vocab-size`` ids (``<pad>``, ``<|endoftext|>``, ``<unk>``
and words ``w0``, ``w1``, ...) so that one word is one token and every pair has exactly ``--prompt-tokens`` prompt
tokens and ``--response-tokens`` tokens in each response, TRL's appended EOS included (responses are one word
shorter). The peer's own byte-level BPE would give responses of varying length and padding; this way both sides of
the comparison run sequences of exactly prompt + response tokens, with no padding.

Output: one JSON line on stdout (the trainer's logs go to stderr): ``pairs_per_s_median`` (batch / the median step
time after ``--warmup`` steps), ``pairs_per_s_mean`` (all pairs / the whole loop, from the start of training to the
last step's end, first steps included), ``steps``, ``wall_s`` (``trainer.train()``), ``setup_s`` (building the
trainer: tokenising and, with ``--precompute-ref``, the reference pass), and the versions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from dpo_record import (
    add_shared_args,
    check_shared_args,
    step_fields,
)  # benchmarks/dpo_record.py, beside this script (standard library only)

# Offline before anything imports a Hugging Face library (they read these at import time).
for _key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_key, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("DISABLE_MLFLOW_INTEGRATION", "TRUE")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO.parent / "shared/peers/trl_bench.py"
EOS, PAD, UNK = "<|endoftext|>", "<pad>", "<unk>"


def load_peer(path: Path) -> ModuleType:
    """The peer benchmark as a module (its helpers; its ``main`` is not run)."""
    if not path.is_file():
        raise SystemExit(f"--peer-bench {path} does not exist")
    spec = importlib.util.spec_from_file_location("trl_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def word_tokenizer(vocab_size: int) -> Any:
    """A ``PreTrainedTokenizerFast`` with one token per whitespace-separated word: 3 specials and ``vocab_size - 3``
    words ``w0`` ... No BOS is added, so a text of n words is n tokens and TRL's EOS one more."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 4:
        raise SystemExit("--vocab-size must be >= 4 (3 special tokens and at least one word)")
    vocab = {PAD: 0, EOS: 1, UNK: 2} | {f"w{i}": 3 + i for i in range(vocab_size - 3)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=PAD)  # fmt: skip


def synthetic_pairs(n: int, prompt_tokens: int, response_words: int, vocab_size: int, seed: int) -> dict[str, list]:
    """``n`` pairs of random words: the prompt of ``prompt_tokens`` words, each response of ``response_words`` words
    with a leading space (TRL concatenates prompt + response as text before tokenising)."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(vocab_size - 3)}" for _ in range(k))

    rows: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        rows["prompt"].append(words(prompt_tokens))
        rows["chosen"].append(" " + words(response_words))
        rows["rejected"].append(" " + words(response_words))
    return rows


def run(args: argparse.Namespace, peer: ModuleType, workdir: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    tokenizer = word_tokenizer(args.vocab_size)
    # The peer's random GPT-2 (its shape flags: n_layer, n_head, n_embd, n_positions), seeded as the peer seeds its
    # policy. TRL's default reference is loaded from the policy's folder, so the policy goes through disk first.
    policy = peer.build_causal_lm(args, tokenizer, args.seed + 1)
    init_dir = os.path.join(workdir, "policy_init")
    policy.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    policy = AutoModelForCausalLM.from_pretrained(init_dir)
    rows = synthetic_pairs(args.pairs, args.prompt_tokens, args.response_tokens - 1, args.vocab_size, args.seed + 2)
    train_ds = Dataset.from_dict(rows)

    cfg = DPOConfig(
        output_dir=os.path.join(workdir, "dpo"),
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=args.lr,
        beta=args.beta,
        loss_type=["sigmoid"],
        precompute_ref_log_probs=args.precompute_ref,
        max_length=None,  # nothing is cut: every sequence is prompt + response tokens
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    timer = peer.make_step_timer()
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=policy, args=cfg, train_dataset=train_ds, processing_class=tokenizer,
                         callbacks=[timer])  # fmt: skip
    setup_s = time.perf_counter() - t0
    lengths = {len(p) + len(c) + len(r) for p, c, r in zip(trainer.train_dataset["prompt_ids"],
               trainer.train_dataset["chosen_ids"], trainer.train_dataset["rejected_ids"], strict=True)}  # fmt: skip
    want = args.prompt_tokens + 2 * args.response_tokens
    if lengths != {want}:  # the like-for-like promise: every pair the same tokens as ours
        raise RuntimeError(f"tokens per pair {sorted(lengths)}, expected {want}")

    t1 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t1

    durations = timer.step_durations()
    loop = timer.step_ends[-1] - timer.begin
    res = peer.common_fields(argparse.Namespace(**vars(args), bf16=False, gradient_checkpointing=False), "dpo")
    res.update(
        {
            "impl": "trl.DPOTrainer",
            "reference": "precomputed in setup" if args.precompute_ref else "model, every step",
            **step_fields(args, durations, loop),
            "wall_s": round(wall, 3),
            "setup_s": round(setup_s, 3),
            "train_loss": timer.last_logs.get("train_loss"),  # mean over the run: a determinism check
            "params": peer.n_params(policy),
            "vocab_size": len(tokenizer),
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": peer.peak_rss_mib(),
        }
    )
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer-bench", type=Path, default=DEFAULT_PEER, help="the peer's trl_bench.py (its helpers)")
    add_shared_args(p)
    p.add_argument("--precompute-ref", action="store_true", help="precompute_ref_log_probs=True (not TRL's default)")
    g = p.add_argument_group("model (the peer's flags)")
    g.add_argument("--vocab-size", type=int, default=300)
    g.add_argument("--n-layer", type=int, default=4)
    g.add_argument("--n-head", type=int, default=4)
    g.add_argument("--n-embd", type=int, default=128)
    g.add_argument("--n-positions", type=int, default=128)
    args = p.parse_args(argv)
    check_shared_args(p, args, args.n_positions, "--n-positions")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    peer = load_peer(args.peer_bench)

    import torch

    torch.set_num_threads(args.threads)
    from transformers import set_seed
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    set_seed(args.seed)
    with tempfile.TemporaryDirectory(prefix="peer_trl_dpo_") as workdir, contextlib.redirect_stdout(sys.stderr):
        # The trainer prints its logs; stdout carries only the JSON line.
        res = run(args, peer, workdir)
    sys.stdout.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
