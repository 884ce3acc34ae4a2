"""``rlhf hf-tiny --out DIR``: a tiny Hugging Face GPT-2 and a tokenizer for the embedded world, in one local model
directory, to try the Hugging Face path (``configs/hf/``, ``rlhf pipeline --hf-model DIR``) without downloading
anything. The tests build theirs with :func:`make_tiny_hf` too.

The tokenizer is trained here with the ``tokenizers`` library: the word-level tokenizer of the world's vocabulary
(every word its grammar can produce, so it fits the embedded task with no unknown word). The model is an untrained
``GPT2LMHeadModel`` of that vocabulary, its LM head tied to the token embedding (logits = hidden @ W.T, as the fused
kernels need), without dropout like TinyGPT's default: PPO's update runs the policy in training mode, where dropout
would make the new log-probs differ from the rollout's before any step (and a resumed run differ from an
uninterrupted one, since the global RNG is not in the checkpoint). The directory is what ``save_pretrained`` writes
(config.json, model.safetensors, tokenizer.json, tokenizer_config.json), so ``AutoModelForCausalLM`` /
``AutoTokenizer.from_pretrained(DIR)`` load it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.errors import ArgumentParser
from rlhf_lightning.export import check_output_dir, write_hf_directory
from rlhf_lightning.world import WORDS


def make_tiny_hf(
    out: str | os.PathLike,
    n_layer: int = 2,
    n_head: int = 2,
    d_model: int = 32,
    n_positions: int = 128,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Writes the tiny GPT-2 and its tokenizer into ``out``; returns it as a Path.

    Args:
        out: the directory to create (refused when it exists and is not empty, unless ``force``).
        n_layer, n_head, d_model: the transformer's shape.
        n_positions: the longest sequence (prompt + response) the model accepts.
        seed: seed of the weights' initialisation.
        force: replace a non-empty ``out``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    out = check_output_dir(out, force)
    tokenizer = Tokenizer.train_word_level([], extra_words=WORDS)
    config = GPT2Config(
        vocab_size=tokenizer.vocab_size, n_positions=n_positions, n_embd=d_model, n_layer=n_layer, n_head=n_head,
        bos_token_id=tokenizer.eos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config).eval()
    # Left padding: the side causal LMs generate from (the data layer pads as it needs, whatever this says).
    write_hf_directory(model, tokenizer, out, padding_side="left")
    return out


def hf_tiny_main(argv: list[str]) -> None:
    """``rlhf hf-tiny --out DIR [--n-layer 2 --n-head 2 --d-model 32 --n-positions 128 --seed 0 --force]``."""
    parser = ArgumentParser(
        prog="rlhf hf-tiny", description="Write a tiny local Hugging Face GPT-2 and a tokenizer for the embedded world."
    )
    parser.add_argument("--out", required=True, type=Path, help="the model directory to create")
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-head", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=32)
    parser.add_argument("--n-positions", type=int, default=128, help="longest prompt + response")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    args = parser.parse_args(argv)
    try:
        out = make_tiny_hf(args.out, args.n_layer, args.n_head, args.d_model, args.n_positions, args.seed, args.force)
    except FileExistsError as err:
        parser.exit(2, f"rlhf hf-tiny: error: {err}\n")
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    print(json.dumps({"out": str(out), "vocab_size": config["vocab_size"], "n_layer": config["n_layer"]}))
