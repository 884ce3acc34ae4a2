"""LightningDataModules for the phases, on JSONL files (the embedded world's or a user's own).

Where the files come from: ``data_dir`` holds ``{sft,prefs,prompts}_{train,val,test}.jsonl``; when they are missing
and ``generate_world`` is on, the embedded review world writes them there first (deterministically for its seed).
Any file can be replaced by a user's own through ``train_file`` / ``val_file`` / ``eval_prompts_file``.

The tokenizer is ``tokenizer_path`` (a tokenizer.json or a Hugging Face tokenizer directory) or, by default, one
trained on the training files in ``data_dir`` (see :meth:`RLHFDataModule.load_tokenizer`): on the embedded world its
word-level tokenizer, cached in the world's folder; on a user's data a byte-level BPE, trained in ``setup`` and never
written into ``data_dir`` (the phase saves it beside its checkpoints, and the pipeline's later phases load it there).

Records are read and validated once, tokenised once in ``setup`` (not per epoch) and kept as lists of examples. Each
tokenised file is checked before any training: a prompt or response that its length budget would cut is an error
(or, with ``truncation: warn``, a warning), and so is a share of unknown tokens above ``max_unk_rate``.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from rlhf_lightning.data.collate import (
    PreferenceExample,
    TruncationStats,
    collate_pairs,
    collate_prompts,
    collate_sft,
    fitting_length,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_lightning.data.formats import PARQUET, chat_template_of, find_data_file, locations, read_records
from rlhf_lightning.data.jsonl import JsonlData
from rlhf_lightning.data.tokenizer import TOKENIZER_FILE, Tokenizer
from rlhf_lightning.world import WORDS, Annotators, GoldJudge, JudgeConfig, WorldConfig, write_world
from rlhf_lightning.world.annotators import Ended
from rlhf_lightning.world.writer import META_FILE as WORLD_META

if TYPE_CHECKING:  # the type of ``pair_sampling`` only (LightningCLI reads it): data/ never runs models/' code
    from rlhf_lightning.models.sampling import SamplingConfig

#: ``pair_source="sft_policy"``'s sampler: collated prompt batches (``prompt_ids``, ``prompt_mask``: (b, P) each,
#: left-padded) and a seed -> each row's response token ids (with EOS where it ended) and whether it ended. The
#: reward phase binds :func:`rlhf_lightning.models.sampling.sample_responses` to its SFT backbone.
ResponseSampler = Callable[[list[dict[str, torch.Tensor]], int], tuple[list[list[int]], list[bool]]]

#: The default longest JSONL line, in bytes (see ``max_line_bytes`` of :class:`RLHFDataModule`).
MAX_LINE_BYTES = 1 << 20
#: The training files in ``data_dir`` a default tokenizer learns from (those present), and their kinds; never the
#: val/test files, whose text the model must not have seen in any form.
TOKENIZER_TRAIN_FILES = (
    ("sft_train.jsonl", "sft"),
    ("prefs_train.jsonl", "preference"),
    ("prompts_train.jsonl", "prompt"),
)
#: Every phase's files (name in data_dir, kind of record), training and validation splits.
FILES = tuple((f"{prefix}_{split}.jsonl", kind) for prefix, kind in (("sft", "sft"), ("prefs", "preference"),
              ("prompts", "prompt")) for split in ("train", "val"))  # fmt: skip
#: The fewest tokens a byte-level BPE has: its 256 bytes and ``<pad>``, ``<eos>``.
MIN_BPE_VOCAB = 258


class RLHFDataModule(L.LightningDataModule):
    """What every phase's data has in common: the data folder, the world, the tokenizer, the evaluation prompts.

    Args:
        data_dir: folder of the JSONL files (and, for the embedded world only, of its tokenizer).
        generate_world: write the embedded world's files into ``data_dir`` when they are missing.
        world: the configuration of the generated world (seed, sizes, annotator knobs: a preset can build a flawed
            reward model on purpose by changing them); a data_dir holding a world written with another configuration
            is an error, so results never mix two worlds silently.
        tokenizer_path: a tokenizer.json or Hugging Face tokenizer directory; None trains one on ``data_dir``'s
            training files (see :meth:`load_tokenizer`).
        tokenizer_vocab_size: the most tokens of the byte-level BPE trained on a user's data (256 bytes and 2
            specials included). 2048 by default: data small enough for this recipe (thousands of records) gives each
            of ~1800 merges enough occurrences to learn an embedding for, a tiny model's embedding stays small
            (2048 x d_model), and common words still become single tokens, so sequences stay short. Raise it for
            more text; the trainer stops earlier when the text has no more pairs seen twice.
        max_unk_rate: the largest share of unknown tokens (of a tokenizer that has one: word-level, or a loaded
            one) a tokenised file may have; above it, setup raises, naming the file (text the tokenizer was not
            trained on, whose words would all read alike); above 0, a warning gives the rate.
        batch_size: examples per training batch.
        max_prompt_len, max_response_len: token budgets (see the truncation policy in data.collate);
            ``max_response_len`` counts the EOS.
        truncation: what setup does when a budget would cut a prompt or response of a file: "error" raises (naming
            the file, the setting, how many it cuts, and the budgets that keep 99% and all of them whole), so no
            instruction or answer is lost silently; "warn" says the same in a warning and cuts as data.collate says.
        eval_prompts: how many responses validation samples, cycling through the held-out prompts.
        eval_prompts_file: JSONL of ``{"prompt"}`` records; default ``data_dir/prompts_val.jsonl``.
        on_error: "raise" on a malformed record, or "skip" it (counted and logged as data/skipped).
        max_line_bytes: a JSONL line longer than this is a malformed record (read no further than the limit, so a
            file without newlines never fills the memory); None: no limit. 1 MiB by default: a record that long is
            far beyond any token budget here (it would be truncated to a few hundred tokens) and is almost always a
            broken file, e.g. records written without newlines; raise it for genuinely long documents.
        num_workers: DataLoader worker processes. Records are read, validated and tokenised in ``setup``, in the
            main process, before any loader exists: workers only pad ready examples, so a bad record is reported
            there with its file and line and never reaches (or crashes) a worker.
    """

    def __init__(
        self,
        data_dir: str = "runs/world",
        generate_world: bool = True,
        world: WorldConfig | None = None,
        tokenizer_path: str | None = None,
        tokenizer_vocab_size: int = 2048,
        max_unk_rate: float = 0.01,
        batch_size: int = 64,
        max_prompt_len: int = 16,
        max_response_len: int = 48,
        truncation: Literal["error", "warn"] = "error",
        eval_prompts: int = 256,
        eval_prompts_file: str | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        max_line_bytes: int | None = MAX_LINE_BYTES,
        num_workers: int = 0,
    ):
        super().__init__()
        if tokenizer_vocab_size < MIN_BPE_VOCAB:
            raise ValueError(
                f"data.init_args.tokenizer_vocab_size must be >= {MIN_BPE_VOCAB} (256 bytes and 2 special tokens), "
                f"got {tokenizer_vocab_size}"
            )
        if not 0.0 <= max_unk_rate <= 1.0:
            raise ValueError(f"data.init_args.max_unk_rate must be in [0, 1], got {max_unk_rate}")
        if truncation not in ("error", "warn"):
            raise ValueError(f"data.init_args.truncation must be 'error' or 'warn', got {truncation!r}")
        self.save_hyperparameters()
        self.data_dir = Path(data_dir)
        self.world = world or WorldConfig()
        self.tokenizer: Tokenizer | None = None
        self.judge: GoldJudge | None = None
        self.world_meta: dict = {}
        self.data_stats: dict[str, float] = {}
        self.train_prompts: list[str] = []  # prompts of the training records, set by the phase's setup
        self._eval: tuple[list[str], dict[str, torch.Tensor]] | None = None

    # -- files -------------------------------------------------------------------------------------------------------
    def file(self, name: str, override: str | None = None) -> Path:
        """The data file ``override``, else the one of ``name`` (spelt ``NAME.jsonl``) in data_dir: NAME.jsonl,
        NAME.parquet or a ``datasets`` folder NAME/ (:func:`~rlhf_lightning.data.formats.find_data_file`)."""
        if override:
            path = Path(override)
            if not path.exists():
                raise FileNotFoundError(f"data file {path} does not exist")
            return path
        stem = name.removesuffix(".jsonl")
        path = find_data_file(self.data_dir, stem)
        if path is None:
            # A folder the world wrote (world.json) lacks a file only when it was deleted; a user's folder needs it.
            world = (self.data_dir / WORLD_META).is_file() or self.hparams.generate_world
            hint = " (set generate_world: true to write the embedded world there)" if world else ""
            raise FileNotFoundError(f"data file {self.data_dir / name} does not exist, nor {stem}{PARQUET} or a "
                                    f"datasets folder {stem}/ there{hint}")  # fmt: skip
        return path

    @property
    def is_world(self) -> bool:
        """Whether ``data_dir`` holds the embedded world (its world.json), rather than a user's own data."""
        return (self.data_dir / WORLD_META).is_file()

    def prepare_data(self) -> None:
        """Writes the world (when asked and missing) and its tokenizer (when missing): rank 0 only."""
        meta_path = self.data_dir / WORLD_META
        if self.hparams.generate_world and not meta_path.is_file():
            write_world(self.data_dir, self.world)
        if self.hparams.generate_world:
            written = json.loads(meta_path.read_text())["config"]
            wanted = json.loads(json.dumps(asdict(self.world)))  # tuples as lists, like world.json
            if written != wanted:
                raise ValueError(
                    f"{meta_path} was written with another world configuration than data.world asks for; "
                    "use another data_dir for this world (or set generate_world: false to use the files as they are)"
                )
        if self.hparams.tokenizer_path is None and self.is_world and not (self.data_dir / TOKENIZER_FILE).is_file():
            # Every word the world's grammar can produce, seen in the corpus or not: the tokenizer is the grammar's.
            Tokenizer.train_word_level(self._training_texts(), extra_words=WORDS).save(self.data_dir)

    def _training_texts(self) -> list[str]:
        """Every string field of the training files in ``data_dir`` (:data:`TOKENIZER_TRAIN_FILES`), in a fixed order:
        what a default tokenizer learns from."""
        texts = []
        for name, kind in TOKENIZER_TRAIN_FILES:
            try:
                path = self.file(name)
            except FileNotFoundError:  # a data set need not have every phase's file
                continue
            texts.extend(v for rec in self._read_file(path, kind).records for v in rec.values() if isinstance(v, str))
        if not texts:
            names = ", ".join(name for name, _ in TOKENIZER_TRAIN_FILES)
            raise FileNotFoundError(
                f"no training file ({names}) in {self.data_dir} to train a tokenizer on; "
                "set data.init_args.tokenizer_path"
            )
        return texts

    def load_tokenizer(self) -> Tokenizer:
        """The tokenizer: ``tokenizer_path``'s; else, on the embedded world, its word-level tokenizer (which
        prepare_data cached in its folder); else a byte-level BPE of ``tokenizer_vocab_size`` tokens trained on the
        training files of ``data_dir``, kept in memory only: a user's folder is never written to. Training is
        deterministic, so every rank trains the same one, and a later phase run alone on the same data trains the
        one its checkpoint holds (on changed data, the phase's tokenizer check refuses the checkpoint)."""
        path = self.hparams.tokenizer_path
        if path is not None:
            try:
                return Tokenizer.load(path)
            except (FileNotFoundError, ValueError) as err:  # say which setting pointed there
                raise type(err)(f"data.init_args.tokenizer_path: {err}") from err
        if self.is_world:
            return Tokenizer.load(self.data_dir / TOKENIZER_FILE)
        if (self.data_dir / TOKENIZER_FILE).is_file():  # e.g. the word-level tokenizer older versions cached there
            rank_zero_warn(
                f"{self.data_dir / TOKENIZER_FILE} is not used: a user's data gets a byte-level BPE trained on its "
                "training files; set data.init_args.tokenizer_path to use that file instead"
            )
        return Tokenizer.train_byte_bpe(self._training_texts(), self.hparams.tokenizer_vocab_size)

    def _load_judge(self):
        meta_path = self.data_dir / WORLD_META
        if not meta_path.is_file():
            return None  # a user's own data: no gold judge, gold metrics are skipped
        meta = json.loads(meta_path.read_text())
        self.world_meta = meta
        judge_cfg = meta.get("config", {}).get("judge")
        return GoldJudge(JudgeConfig(**judge_cfg) if judge_cfg else JudgeConfig())

    def _read_file(self, path: Path, kind: str) -> JsonlData:
        h = self.hparams
        # Conversational records are rendered with the tokenizer's own chat template, so they read as its model expects.
        return read_records(path, kind, h.on_error, h.max_line_bytes, chat_template_of(h.tokenizer_path))

    def _read(self, name: str, kind: str, override: str | None = None) -> tuple[list[dict[str, str]], list[str]]:
        """The valid records of a data file, and where each is (``"path:line"``, ``"path row N"``) for tokenisation."""
        path = self.file(name, override)
        data = self._read_file(path, kind)
        self.data_stats[f"data/skipped/{path.stem}"] = float(data.skipped)
        return data.records, locations(path, data.lines)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
            self.judge = self._load_judge()

    def text_lengths(self) -> tuple[list[int], list[int]]:
        """The token lengths of every prompt, and of every response with its EOS, in data_dir's training and
        validation files of all three kinds (those that exist), as the truncation policy counts them: what every
        phase's length budgets must hold. Needs the tokenizer (``setup``)."""
        prompts: list[int] = []
        responses: list[int] = []
        unbounded = sys.maxsize
        tokenize = {"sft": partial(tokenize_sft, max_response_len=unbounded),
                    "preference": partial(tokenize_preferences, max_response_len=unbounded),
                    "prompt": tokenize_prompts}  # fmt: skip
        for name, kind in FILES:
            try:
                records, where = self._read(name, kind)
            except FileNotFoundError:  # a data set need not have every phase's files
                continue
            stats = tokenize[kind](records, self.tokenizer, max_prompt_len=unbounded, where=where)[1]
            prompts += stats.prompt_lengths
            responses += stats.response_lengths
        return prompts, responses

    def _check_tokenized(self, key: str, path: Path, stats: TruncationStats) -> None:
        """Logs a tokenised file's figures as ``data/<figure>/<key>`` and applies ``max_unk_rate`` and ``truncation``
        to it (see the class doc).

        Raises:
            ValueError: too many unknown tokens, or a budget would cut a text with ``truncation: error``.
        """
        h = self.hparams
        for name, value in stats.figures().items():
            self.data_stats[f"data/{name}/{key}"] = value
        if stats.unk_rate > h.max_unk_rate:
            raise ValueError(
                f"{path}: {stats.unk_rate:.2%} of its tokens are the tokenizer's unknown token "
                f"(data.init_args.max_unk_rate: {h.max_unk_rate}); the tokenizer was likely trained on other text, "
                "e.g. a checkpoint's on other data: pass a tokenizer that matches this data in "
                "data.init_args.tokenizer_path, or retrain from SFT on this data"
            )
        if stats.unk_rate > 0:
            rank_zero_warn(f"{path}: {stats.unk_rate:.2%} of its tokens are the tokenizer's unknown token")
        budgets = (("max_prompt_len", "prompts", stats.prompt_lengths, stats.truncated_prompts),
                   ("max_response_len", "responses", stats.response_lengths, stats.truncated_responses))  # fmt: skip
        for setting, what, lengths, cut in budgets:
            if not cut:
                continue
            message = (
                f"{path}: data.init_args.{setting}: {h[setting]} would cut {cut} of {len(lengths)} {what}; "
                f"{fitting_length(lengths, 0.99)} keeps 99% of them whole, {max(lengths)} all"
            )
            if h.truncation == "error":
                raise ValueError(f"{message} (or set data.init_args.truncation: warn to cut them)")
            rank_zero_warn(f"{message}; cutting them (prompts keep their last tokens, responses their first)")

    # -- evaluation prompts ------------------------------------------------------------------------------------------
    def eval_prompts(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The fixed held-out prompts validation samples for: their texts and a left-padded batch."""
        if self._eval is None:
            name, override = "prompts_val.jsonl", self.hparams.eval_prompts_file
            records, where = self._read(name, "prompt", override)
            examples, stats = tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len, where)
            self._check_tokenized("prompts_val", self.file(name, override), stats)
            # Cycle through the prompts up to eval_prompts samples: a small prompt set still gives a stable figure.
            cycle = [i % len(records) for i in range(self.hparams.eval_prompts)]
            batch = collate_prompts([examples[i] for i in cycle], self.tokenizer.pad_id)
            self._eval = ([records[i]["prompt"] for i in cycle], batch)
        return self._eval

    def train_prompt_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """A left-padded batch of n training prompts drawn with replacement (reproducibly, from ``seed``).

        The prompts come from ``data_dir/prompts_train.jsonl`` (or .parquet, or a datasets folder) when it exists, else
        from the phase's training records.
        """
        if find_data_file(self.data_dir, "prompts_train") is not None:
            records, where = self._read("prompts_train.jsonl", "prompt")
            prompts = [r["prompt"] for r in records]
        else:  # the phase's training prompts, which setup tokenised already
            prompts, where = self.train_prompts, None
        if not prompts:
            raise ValueError(f"no training prompts: neither prompts_train in {self.data_dir} nor training records")
        # device="cpu" explicitly: configure_model hooks run under Lightning's default-device context (CUDA on a GPU).
        idx = torch.randint(len(prompts), (n,), generator=torch.Generator().manual_seed(seed), device="cpu").tolist()
        records = [{"prompt": prompts[i]} for i in idx]
        where = [where[i] for i in idx] if where is not None else None
        return collate_prompts(tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len, where)[0],
                               self.tokenizer.pad_id)  # fmt: skip

    def _loader(self, examples: list, collate, shuffle: bool) -> DataLoader:
        return DataLoader(
            examples,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            collate_fn=partial(collate, pad_id=self.tokenizer.pad_id),
            num_workers=self.hparams.num_workers,
            drop_last=shuffle and len(examples) >= self.hparams.batch_size,
        )


class _SplitDataModule(RLHFDataModule):
    """A phase's train/val JSONL files (``{PREFIX}_{split}.jsonl`` of kind ``KIND``), tokenised once in setup."""

    PREFIX = ""
    KIND = ""

    def __init__(self, *args, train_file: str | None = None, val_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self.train_examples: list = []
        self.val_examples: list = []

    def tokenize(self, records: list[dict[str, str]], where: list[str]):
        """Examples and truncation statistics of a split's records; ``where`` names each record ("path:line")."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_examples:
            return
        for split, override in (("train", self.hparams.train_file), ("val", self.hparams.val_file)):
            name = f"{self.PREFIX}_{split}.jsonl"
            records, where = self._read(name, self.KIND, override)
            if split == "train":
                self.train_prompts = list(dict.fromkeys(r["prompt"] for r in records))
            examples, stats = self.tokenize(records, where)
            self._check_tokenized(f"{self.PREFIX}_{split}", self.file(name, override), stats)
            setattr(self, f"{split}_examples", examples)
            self.on_split_loaded(split, records)

    def on_split_loaded(self, split: str, records: list[dict[str, str]]) -> None:
        """Hook for a phase's extra per-split preparation."""


class SFTDataModule(_SplitDataModule):
    """Demonstrations ``{"prompt", "response"}`` for the SFT phase.

    Args:
        train_file, val_file: JSONL files; default ``data_dir/sft_{train,val}.jsonl``.
        (the rest: see :class:`RLHFDataModule`)
    """

    PREFIX, KIND = "sft", "sft"

    def tokenize(self, records: list[dict[str, str]], where: list[str]):
        h = self.hparams
        return tokenize_sft(records, self.tokenizer, h.max_prompt_len, h.max_response_len, where)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, collate_sft, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_examples, collate_sft, shuffle=False)


class PreferenceDataModule(_SplitDataModule):
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` for the reward-model phase.

    Batches carry each pair's ``index`` in its split (for per-member bootstrap weights and per-pair lookups). On the
    world, validation also gets the gold judge's scores of both responses (:attr:`val_gold`) and the annotators' exact
    Bayes accuracy on those pairs (:attr:`bayes_accuracy`), so a reward model's accuracy can be read against the best
    any model can reach under the label noise, and its ordering against the gold judge's.

    Where the two responses of a pair come from (``pair_source``):

    - ``"grammar"``: the pairs of the JSONL files as they are (on the world: two responses drawn from the grammar's
      broad pair distribution, labelled by the annotators when the world was written).
    - ``"sft_policy"``: for each record's prompt, in both splits, two responses sampled from the SFT policy and
      labelled by the world's annotators (``world.annotators``): pairs on the distribution PPO starts from. The
      RewardModule calls :meth:`sample_policy_pairs` with its SFT backbone before training. The val pairs are sampled
      the same way for the val prompts, so ``rm/accuracy`` and ``rm/bayes_accuracy`` are measured on that
      distribution too. Needs the world (its judge and annotators).

    Args:
        train_file, val_file: JSONL files; default ``data_dir/prefs_{train,val}.jsonl``.
        pair_source: "grammar" or "sft_policy" (above).
        pair_sampling: how the policy's responses are sampled (read by the sampler's maker, the reward phase);
            default (None) temperature 1 and at most ``max_response_len`` new tokens (a response that reaches it has
            no EOS, like a truncated one, and the annotators and the gold judge see it unended).
        (the rest: see :class:`RLHFDataModule`)
    """

    PREFIX, KIND = "prefs", "preference"

    def __init__(
        self,
        *args,
        pair_source: Literal["grammar", "sft_policy"] = "grammar",
        pair_sampling: SamplingConfig | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if pair_source not in ("grammar", "sft_policy"):
            raise ValueError(f"pair_source must be 'grammar' or 'sft_policy', got {pair_source!r}")
        self.pair_source = pair_source
        self.pair_sampling = pair_sampling
        self.val_gold: tuple[torch.Tensor, torch.Tensor] | None = None  # (B_val,) gold of chosen, of rejected
        self.bayes_accuracy: float | None = None
        self._split_prompts: dict[str, list[str]] = {}
        self._policy_pairs_seed: int | None = None

    def tokenize(self, records: list[dict[str, str]], where: list[str]):
        h = self.hparams
        return tokenize_preferences(records, self.tokenizer, h.max_prompt_len, h.max_response_len, where)

    def on_split_loaded(self, split: str, records: list[dict[str, str]]) -> None:
        self._split_prompts[split] = [r["prompt"] for r in records]
        if split == "val" and self.judge is not None:
            chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
            self._set_val_references(self._split_prompts["val"], chosen, rejected)

    def _set_val_references(
        self, prompts: list[str], chosen: list[str], rejected: list[str], ended: Ended = None
    ) -> None:
        """Sets :attr:`val_gold` ((B_val,) each) and :attr:`bayes_accuracy` of the val pairs (see :data:`Ended`)."""
        ended_c, ended_r = ended if ended is not None else (None, None)
        self.val_gold = (torch.as_tensor(self.judge.score(prompts, chosen, ended_c)),
                         torch.as_tensor(self.judge.score(prompts, rejected, ended_r)))  # fmt: skip
        annotators = Annotators(self.world.annotators, self.judge)
        self.bayes_accuracy = annotators.bayes_accuracy(prompts, chosen, rejected, ended)

    def sample_policy_pairs(self, sample: ResponseSampler, seed: int) -> None:
        """``pair_source="sft_policy"``: replaces the pairs of both splits with pairs the policy samples.

        For each record of a split, two responses to its prompt are sampled (``sample``, with the seed
        ``2 * seed + split``: its noise comes from a private generator seeded with it) and labelled by the world's
        annotators (labels from a numpy generator seeded likewise), so the same policy and seed give the same pairs;
        each split keeps its number of pairs. The sampled tokens become the examples as they are (EOS where the response
        ended), with no text round trip. Calling it again with the same seed changes nothing.

        Args:
            sample: draws the responses (see :data:`ResponseSampler`).
            seed: seed of the sampling noise and of the labels.
        """
        if self._policy_pairs_seed == seed:
            return
        if self.judge is None:
            raise ValueError(
                "pair_source 'sft_policy' needs the world's annotators to label the sampled pairs: point data_dir at "
                "a folder the world wrote (with world.json)"
            )
        if not self._split_prompts:
            raise RuntimeError("sample_policy_pairs needs the data module set up first (setup('fit'))")
        annotators = Annotators(self.world.annotators, self.judge)
        for k, split in enumerate(("train", "val")):
            prompts = self._split_prompts[split]
            prompt_ids, responses, ended = self._sample_responses(sample, [p for p in prompts for _ in (0, 1)],
                                                                  2 * seed + k)  # fmt: skip
            texts = self.tokenizer.decode_batch(responses)
            # Pair i is (response 2i, response 2i + 1); its label orders them as (chosen, rejected).
            a_preferred, _ = annotators.label(
                prompts, texts[0::2], texts[1::2], np.random.default_rng([seed, k]), (ended[0::2], ended[1::2])
            )
            order = [(2 * i, 2 * i + 1) if pick else (2 * i + 1, 2 * i) for i, pick in enumerate(a_preferred.tolist())]
            examples = [PreferenceExample(prompt_ids[c], responses[c], responses[r]) for c, r in order]
            setattr(self, f"{split}_examples", examples)
            self.data_stats[f"data/unended_responses/prefs_sft_policy_{split}"] = float(ended.count(False))
            if split == "val":
                chosen, rejected = [c for c, _ in order], [r for _, r in order]
                self._set_val_references(prompts, [texts[i] for i in chosen], [texts[i] for i in rejected],
                                         ([ended[i] for i in chosen], [ended[i] for i in rejected]))  # fmt: skip
        self._policy_pairs_seed = seed

    def _sample_responses(
        self, sample: ResponseSampler, prompts: list[str], seed: int, chunk: int = 256
    ) -> tuple[list[list[int]], list[list[int]], list[bool]]:
        """(prompt token ids, response token ids with EOS where it ended, ended) of one sample per prompt."""
        examples = tokenize_prompts([{"prompt": p} for p in prompts], self.tokenizer, self.hparams.max_prompt_len)[0]
        batches = [collate_prompts(examples[lo : lo + chunk], self.tokenizer.pad_id)
                   for lo in range(0, len(examples), chunk)]  # fmt: skip
        responses, ended = sample(batches, seed)
        return [e.prompt_ids for e in examples], responses, ended

    def _check_pairs_ready(self) -> None:
        if self.pair_source == "sft_policy" and self._policy_pairs_seed is None:
            raise RuntimeError(
                "pair_source 'sft_policy': the pairs come from sample_policy_pairs (the RewardModule calls it with its "
                "SFT backbone in configure_model), which has not run"
            )

    def train_dataloader(self) -> DataLoader:
        self._check_pairs_ready()
        return self._loader(list(enumerate(self.train_examples)), collate_indexed_pairs, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._check_pairs_ready()
        return self._loader(list(enumerate(self.val_examples)), collate_indexed_pairs, shuffle=False)


def collate_indexed_pairs(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """:func:`collate_pairs` of ``(index, example)`` items, plus ``index`` (B,): each pair's position in its split."""
    batch = collate_pairs([example for _, example in items], pad_id)
    batch["index"] = torch.tensor([i for i, _ in items])
    return batch


class _Ticks(IterableDataset):
    """0, 1, 2, ... forever: the PPO phase's training "batches" are iteration ticks (see PromptDataModule)."""

    def __iter__(self):
        return itertools.count()


class PromptDataModule(RLHFDataModule):
    """Prompts ``{"prompt"}`` for the PPO phase.

    The PPO module draws each iteration's prompts itself with :meth:`rollout_prompts`, a pure function of the
    iteration number (and the seed, rank and world size): every rank walks its own slice of a fresh permutation of the
    training prompts per pass over them, so a run resumed at iteration i draws exactly the prompts an uninterrupted
    run would, with no data-loader state to restore. The train data loader only yields iteration ticks; the module
    stops the run after its ``iterations``.

    Args:
        train_file: JSONL of prompts; default ``data_dir/prompts_train.jsonl``.
        (the rest: see :class:`RLHFDataModule`; ``batch_size`` is unused, the PPO module's ``rollout_batch`` counts)
    """

    def __init__(self, *args, train_file: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_hyperparameters()
        self._train: list = []

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self._train:
            return
        records, where = self._read("prompts_train.jsonl", "prompt", self.hparams.train_file)
        examples, stats = tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len, where)
        self._check_tokenized("prompts_train", self.file("prompts_train.jsonl", self.hparams.train_file), stats)
        self.train_prompts = [r["prompt"] for r in records]
        self._train = examples

    def rollout_prompts(
        self, iteration: int, n: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The n prompts of one rank at one iteration: their texts and a left-padded batch (see the class doc).

        Prompt k of the run's sequence (k = (iteration * world_size + rank) * n + j) is entry k mod M of the
        permutation of the M training prompts drawn from (seed, k // M).
        """
        m = len(self._train)
        if m == 0:
            raise ValueError("no training prompts: call setup() first (or the prompt file is empty)")
        first = (iteration * world_size + rank) * n
        picks, perms = [], {}
        for k in range(first, first + n):
            epoch = k // m
            if epoch not in perms:
                g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
                perms[epoch] = torch.randperm(m, generator=g, device="cpu")
            picks.append(int(perms[epoch][k % m]))
        batch = collate_prompts([self._train[i] for i in picks], self.tokenizer.pad_id)
        return [self.train_prompts[i] for i in picks], batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=None)
