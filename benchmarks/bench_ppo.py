"""PPO iteration throughput of the real PPOModule (through Lightning's Trainer), with the peer's settings as flags.

    python benchmarks/bench_ppo.py --layers 4 --heads 4 --width 128 --prompts 16 --response-tokens 24 \\
        --epochs 4 --minibatches 2 --critic separate --iterations 12
    python benchmarks/bench_ppo.py ... --estimator rloo --samples-per-prompt 4   # a critic-free estimator

``--estimator`` picks the advantage estimator (``advantage.estimator``): gae (PPO with its critic) or a critic-free one,
which builds and steps no critic; ``--prompts`` counts responses, so with ``--samples-per-prompt 4`` 16 responses
answer 4 prompts, the peer's RLOO shape. GRPO puts its KL in the loss (k3), RLOO and REINFORCE++ in the reward (k1).

Set-up (not timed): the embedded world is written to a temporary folder; a randomly initialised TinyGPT of the
given shape is saved as the SFT checkpoint and a reward model on it as the reward checkpoint (one training step each
through the CLI, so they are ordinary checkpoints). Then ``iterations`` PPO iterations run; the first
``--warmup`` are discarded and the rest summarised: samples/s of whole iterations, rollout tokens/s, and the share of
each iteration spent generating, scoring (no-grad passes + reward + GAE) and updating.

The vocabulary: ``--vocab`` token ids, by default the peer's 300 (TRL's benchmark, ``--vocab-size 300``), so that the
LM heads (policy, reference, critic trunk, reward model trunk) have as many rows as the peer's. The world's own
word-level tokenizer has 81 ids (3 specials and the grammar's 78 words); it is padded with unused filler words
``w0``, ``w1``, ... (``benchmarks/word_vocab.py``, through the package's ``Tokenizer.train_word_level``) and saved in
the world's folder, where every phase loads it, so the world's prompts and responses still tokenise to the same
words (one id each, no ``<unk>``). A random policy samples the fillers too; they decode to words that the reward
model, which has a row for every id, scores like any other. ``--vocab 0`` keeps the world tokenizer's 81 ids (how
the rows measured before this option existed ran). The vocabulary used, read back from the models, is printed. EOS
is rare under a random policy, so responses run to about ``--response-tokens`` tokens; the mean is printed.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from word_vocab import padded_word_tokenizer  # benchmarks/word_vocab.py, beside this script

from rlhf_lightning.cli import main as cli
from rlhf_lightning.rl import ADVANTAGE_ESTIMATORS, AdvantageConfig, KLConfig
from rlhf_lightning.world.grammar import WORDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def build_checkpoints(root: Path, args: argparse.Namespace) -> None:
    """A tiny world, then one-step SFT and RM runs of the asked shape (effectively random weights)."""
    subprocess.run([sys.executable, "-m", "rlhf_lightning.cli", "world", "--out", str(root / "world")], check=True,
                   capture_output=True)  # fmt: skip
    if args.vocab:  # the world's tokenizer padded to the asked size; without it the data module writes the 81-id one
        padded_word_tokenizer(args.vocab, WORDS)[0].save(root / "world")
    shape = [f"--model.init_args.backbone.n_layer={args.layers}", f"--model.init_args.backbone.n_head={args.heads}",
             f"--model.init_args.backbone.d_model={args.width}", f"--model.init_args.backbone.vocab_size={args.vocab}",
             f"--model.init_args.backbone.max_seq_len={max(96, 16 + args.response_tokens)}"]  # fmt: skip
    common = [f"--data.init_args.data_dir={root / 'world'}", "--trainer.max_steps=1", "--trainer.limit_val_batches=0",
              "--data.init_args.generate_world=false", *QUIET]  # fmt: skip
    cli(["fit", "-c", str(CONFIGS / "sft.yaml"), *shape, *common, f"--trainer.default_root_dir={root}",
         f"--trainer.callbacks.init_args.dirpath={root / 'sft'}"])  # fmt: skip
    cli(["fit", "-c", str(CONFIGS / "rm.yaml"), *common, f"--model.init_args.sft_checkpoint={root / 'sft/last.ckpt'}",
         "--model.init_args.norm_samples=16", f"--trainer.default_root_dir={root}",
         f"--trainer.callbacks.init_args.dirpath={root / 'rm'}"])  # fmt: skip


def used_vocabulary(module: torch.nn.Module) -> int:
    """The token ids the run used: the tokenizer's, checked against the LM head rows of the policy, the reference,
    the critic trunk (when separate) and every reward-model trunk."""
    heads = {"policy": module.policy, "reference": module.ref_policy, "critic": module.critic_backbone}
    heads |= {f"reward model trunk {i}": b for i, b in enumerate(module.reward_model.backbones)}
    rows = {name: int(m.lm_head_weight.shape[0]) for name, m in heads.items() if m is not None}
    if set(rows.values()) != {module.tokenizer.vocab_size}:
        raise RuntimeError(f"tokenizer {module.tokenizer.vocab_size} ids, but LM head rows {rows}")
    return module.tokenizer.vocab_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=300,
                        help="token ids (LM head rows): the world tokenizer padded to this size (the peer's 300); "
                             "0: the world tokenizer's own 81")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=16, help="prompts (responses) per iteration")
    parser.add_argument("--response-tokens", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--minibatches", type=int, default=2)
    parser.add_argument("--critic", choices=("separate", "shared"), default="separate")
    parser.add_argument("--estimator", choices=ADVANTAGE_ESTIMATORS, default="gae")
    parser.add_argument("--samples-per-prompt", type=int, default=1, help="responses per prompt (grpo, rloo: >= 2)")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu or auto")
    args = parser.parse_args(argv)
    if args.prompts % args.minibatches:
        parser.error("--minibatches must divide --prompts")
    if args.prompts % args.samples_per_prompt:
        parser.error("--samples-per-prompt must divide --prompts")
    if args.iterations <= args.warmup + 1:
        parser.error("--iterations must exceed --warmup + 1 (the last iteration also evaluates: not timed)")
    if args.vocab and args.vocab < len(WORDS) + 3:
        parser.error(f"--vocab must be 0 or >= {len(WORDS) + 3} (the world's words and 3 special tokens)")
    if args.threads:
        torch.set_num_threads(args.threads)

    import lightning as L

    from rlhf_lightning.checkpoint import AtomicCheckpointIO
    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.models.sampling import SamplingConfig
    from rlhf_lightning.modules import PPOModule
    from rlhf_lightning.modules.ppo_eval import EvalConfig

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_checkpoints(root, args)
        module = PPOModule(
            sft_checkpoint=str(root / "sft/last.ckpt"), reward_checkpoint=str(root / "rm/last.ckpt"),
            critic=args.critic, iterations=args.iterations, rollout_batch=args.prompts,
            minibatch_size=args.prompts // args.minibatches, ppo_epochs=args.epochs,
            sampling=SamplingConfig(max_new_tokens=args.response_tokens, temperature=1.0),
            eval=EvalConfig(every=10**9),  # evaluation would run at the last iteration: excluded below
            advantage=AdvantageConfig(args.estimator, samples_per_prompt=args.samples_per_prompt),
            kl=KLConfig(placement="loss", estimator="k3") if args.estimator == "grpo" else KLConfig(),
        )  # fmt: skip
        rows: list[dict[str, float]] = []
        log = module._log

        def capture(metrics: dict[str, float], iteration: int) -> None:
            rows.append(dict(metrics))
            log(metrics, iteration)

        module._log = capture
        dm = PromptDataModule(data_dir=str(root / "world"), generate_world=False, eval_prompts=8)
        trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, accelerator=args.accelerator, devices=1,
                            plugins=[AtomicCheckpointIO()])  # fmt: skip
        trainer.fit(module, dm)
    vocab = used_vocabulary(module)
    timed = rows[args.warmup : args.iterations - 1]  # the last iteration also evaluates
    med = {k: statistics.median(r[k] for r in timed) for k in ("perf/iteration_s", "perf/rollout_s", "perf/score_s",
                                                              "perf/update_s", "perf/tokens_per_s")}  # fmt: skip
    length = statistics.mean(r["rollout/length_mean"] for r in timed)
    where = torch.cuda.get_device_name() if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu"
    print(f"{where}, torch threads {torch.get_num_threads()}; shape {args.layers}L/{args.heads}H/{args.width}d, "
          f"{args.prompts} prompts x {args.response_tokens} tokens (mean {length:.1f} generated), {args.epochs} epochs"
          f" x {args.minibatches} minibatches, advantage {args.estimator} (k={args.samples_per_prompt}"
          f"{f', critic {args.critic}' if args.estimator == 'gae' else ', no critic'}); median of {len(timed)}"
          " iterations")  # fmt: skip
    print(f"vocabulary {vocab} token ids (tokenizer and every model's LM head)")
    it = med["perf/iteration_s"]
    print(f"iteration {it * 1e3:.0f} ms -> {args.prompts / it:.1f} samples/s")
    print(f"rollout generation {med['perf/tokens_per_s']:.0f} tokens/s")
    for part in ("rollout", "score", "update"):
        print(f"  {part:8s} {med[f'perf/{part}_s'] * 1e3:7.0f} ms  {100 * med[f'perf/{part}_s'] / it:5.1f}%")


if __name__ == "__main__":
    main()
