"""DPO training throughput of the real DPOModule (through Lightning's Trainer) at the peer's shape: our side of
``benchmarks/peer_trl_dpo.py`` (TRL 1.12's DPOTrainer; ``benchmarks/peer_dpo.sh`` runs both, interleaved).

    python benchmarks/bench_dpo.py --threads 2                       # 4L/4H/128d, 16 pairs of 8 + 24 + 24 tokens

What one step is: one optimizer step of ``DPOModule`` (automatic optimisation) on ``--batch`` 16 preference pairs:
one (2 x 16, 32) policy forward and backward through the fused response log-probs, the sigmoid loss at beta 0.1,
gradient clipping at 1.0 (configs/dpo.yaml's) and fused AdamW, fp32, plus the module's own per-step logging. No
evaluation runs: validation is off (``limit_val_batches=0``, no sanity check), so neither the held-out pairs' loss nor
PPO's sampled evaluation is in the timed loop, and no checkpoint is written.

The reference: DPOModule computes the frozen reference's log-probs of every training and validation pair once, in
``configure_model``, before the first step; a training step never runs the reference. That pass is OUTSIDE the
timed loop and is reported on its own (``reference_pass_s``, inside ``setup_s``). TRL's default instead runs its
reference model on every batch inside the step; ``peer_trl_dpo.py --precompute-ref`` is TRL's own equivalent of ours
(the pass in its constructor) and is the like-for-like comparison of the step itself.

Set-up (not timed): a synthetic data folder with a word-level tokenizer of ``--vocab`` ids (``<pad>``, ``<eos>``,
``<unk>`` and words ``w0`` ...), so that one word is one token; every pair has a prompt of ``--prompt-tokens`` words
and two responses of ``--response-tokens - 1`` words plus the EOS the data module appends: exactly the tokens TRL's
side trains on (8 + 24 + 24 per pair, each of the 32 rows of a step 32 tokens long, no padding). A randomly
initialised TinyGPT of the asked shape (pre-norm GPT-2 blocks: 4x GELU MLP, learned positions, tied head) is saved
as the SFT checkpoint by a one-step SFT run through the CLI, so it is an ordinary checkpoint. Then ``--steps``
optimizer steps run, timed by a callback between consecutive step ends (the first from the start of training).

Output: one JSON line: ``pairs_per_s_median`` (batch / the median step time after ``--warmup`` steps),
``pairs_per_s_mean`` (all pairs / the whole loop, from the start of training to the last step's end), ``steps``,
``setup_s`` (``trainer.fit`` to the first step: the data module's setup, the model build and the reference pass),
``reference_pass_s`` and the versions.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from dpo_record import add_shared_args, check_shared_args, step_fields  # benchmarks/dpo_record.py, beside this script
from lightning.pytorch.callbacks import Callback
from word_vocab import padded_word_tokenizer  # benchmarks/word_vocab.py, beside this script

import rlhf_kernels
from rlhf_lightning.cli import main as cli
from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.io import write_jsonl
from rlhf_lightning.modules import DPOModule
from rlhf_lightning.modules import dpo as dpo_module

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def write_data(root: Path, args: argparse.Namespace) -> Path:
    """The tokenizer (``root/tokenizer``) and the JSONL files of a synthetic data folder (``root/data``): SFT
    demonstrations for the one-step SFT run, the preference pairs, a few held-out prompts. Returns the tokenizer's
    path."""
    tokenizer, words = padded_word_tokenizer(args.vocab)  # words w0 ...: 3 ids are <pad>, <eos>, <unk>
    tokenizer.save(root / "tokenizer")
    rng = random.Random(args.seed)

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    p, r = args.prompt_tokens, args.response_tokens - 1  # the data module appends the EOS to each response

    def pairs(n: int) -> list[dict[str, str]]:
        return [{"prompt": text(p), "chosen": text(r), "rejected": text(r)} for _ in range(n)]

    data = root / "data"
    data.mkdir()
    write_jsonl(data / "prefs_train.jsonl", pairs(args.pairs))
    write_jsonl(data / "prefs_val.jsonl", pairs(args.val_pairs))
    for split, n in (("train", 64), ("val", 8)):
        write_jsonl(data / f"sft_{split}.jsonl", [{"prompt": text(p), "response": text(r)} for _ in range(n)])
    write_jsonl(data / "prompts_val.jsonl", [{"prompt": text(p)} for _ in range(8)])
    return root / "tokenizer/tokenizer.json"


def build_sft_checkpoint(root: Path, tokenizer_path: Path, args: argparse.Namespace) -> Path:
    """A one-step SFT run of the asked shape through the CLI (effectively random weights): an ordinary checkpoint."""
    cli(["fit", "-c", str(CONFIGS / "sft.yaml"), f"--model.init_args.backbone.n_layer={args.layers}",
         f"--model.init_args.backbone.n_head={args.heads}", f"--model.init_args.backbone.d_model={args.width}",
         f"--model.init_args.backbone.max_seq_len={args.max_seq_len}",
         f"--data.init_args.data_dir={root / 'data'}", "--data.init_args.generate_world=false",
         f"--data.init_args.tokenizer_path={tokenizer_path}", "--data.init_args.batch_size=16",
         f"--data.init_args.max_prompt_len={args.prompt_tokens}",
         f"--data.init_args.max_response_len={args.response_tokens}", "--trainer.max_steps=1",
         "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}",
         f"--trainer.callbacks.init_args.dirpath={root / 'sft'}", f"--seed_everything={args.seed}",
         *QUIET])  # fmt: skip
    return root / "sft/last.ckpt"


class StepTimer(Callback):
    """Records when training starts and when each optimizer step (a training batch, under automatic optimisation
    without accumulation) ends, and each step's loss: the peer's timer, for Lightning."""

    def __init__(self) -> None:
        self.begin: float | None = None
        self.step_ends: list[float] = []
        self.losses: list[float] = []

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.begin = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.step_ends.append(time.perf_counter())
        # Counted in the next step's interval, as TRL's own per-step .item() reads are in its steps: microseconds.
        self.losses.append(float(outputs["loss"]))

    def durations(self) -> list[float]:
        """Seconds of each step: between consecutive step ends, the first from the start of training."""
        marks = [self.begin, *self.step_ends]
        return [b - a for a, b in itertools.pairwise(marks)]


def git_commit() -> str | None:
    """The checkout's short commit, to tell which code a figure belongs to."""
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    except OSError:
        return None
    return out.stdout.strip() or None


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Builds the data and the SFT checkpoint in a temporary folder, trains, and returns the JSON record."""
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        root = Path(tmp)
        tokenizer_path = write_data(root, args)
        sft = build_sft_checkpoint(root, tokenizer_path, args)

        # The reference pass is timed where configure_model calls it, so its share of the set-up is reported apart.
        reference_s = [0.0]
        reference_logps = dpo_module.reference_logps

        def timed_reference_logps(*a: Any, **kw: Any) -> torch.Tensor:
            t = time.perf_counter()
            out = reference_logps(*a, **kw)
            reference_s[0] += time.perf_counter() - t
            return out

        dpo_module.reference_logps = timed_reference_logps
        try:
            L.seed_everything(args.seed, verbose=False)
            module = DPOModule(sft_checkpoint=str(sft), beta=args.beta, lr=args.lr, loss="sigmoid")
            dm = PreferenceDataModule(data_dir=str(root / "data"), generate_world=False,
                                      tokenizer_path=str(tokenizer_path), batch_size=args.batch,
                                      max_prompt_len=args.prompt_tokens, max_response_len=args.response_tokens,
                                      eval_prompts=8)  # fmt: skip
            timer = StepTimer()
            trainer = L.Trainer(max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
                                gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
                                accelerator=args.accelerator, devices=1)  # fmt: skip
            t0 = time.perf_counter()
            trainer.fit(module, dm)
            end = time.perf_counter()
        finally:
            dpo_module.reference_logps = reference_logps

    want = args.prompt_tokens + 2 * args.response_tokens
    lengths = {len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in dm.train_examples}
    if lengths != {want}:  # the like-for-like promise: every pair the same tokens as TRL's side
        raise RuntimeError(f"tokens per pair {sorted(lengths)}, expected {want}")
    durations = timer.durations()
    loop = timer.step_ends[-1] - timer.begin
    device = next(module.policy.parameters()).device
    return {
        "phase": "dpo",
        "impl": "rlhf_lightning.DPOModule",
        "reference": "log-probs cached before training (configure_model)",
        **step_fields(args, durations, loop),
        "wall_s": round(end - t0, 3),
        "setup_s": round(timer.begin - t0, 3),
        "reference_pass_s": round(reference_s[0], 3),
        "reference_pairs": len(dm.train_examples) + len(dm.val_examples),
        "mean_loss": round(statistics.mean(timer.losses), 4),  # a determinism check, like TRL's train_loss
        "model": f"tinygpt L{args.layers} H{args.heads} d{args.width}",
        "params": sum(p.numel() for p in module.policy.parameters()),
        "vocab_size": args.vocab,
        "dtype": str(next(module.policy.parameters()).dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else device.type,
        "kernels_backend": rlhf_kernels.resolve_backend("auto", device).__name__.rsplit(".", 1)[-1],
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "commit": git_commit(),
        "seed": args.seed,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--max-seq-len", type=int, default=128, help="position table (the peer GPT-2's n_positions)")
    p.add_argument("--vocab", type=int, default=300, help="token ids of the word-level tokenizer (the peer's 300)")
    add_shared_args(p)
    p.add_argument("--val-pairs", type=int, default=16, help="validation pairs (reference pass only: no validation)")
    p.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu or auto")
    args = p.parse_args(argv)
    check_shared_args(p, args, args.max_seq_len, "--max-seq-len")
    if args.vocab < 4:
        p.error("--vocab must be >= 4 (3 special tokens and at least one word)")
    if args.pairs < args.batch:
        p.error("--pairs must be >= --batch")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        result = run(args)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
