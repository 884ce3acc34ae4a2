"""LightningDataModules for the phases, on JSONL files (the embedded world's or a user's own).

Where the files come from: ``data_dir`` holds ``{sft,prefs,prompts}_{train,val,test}.jsonl``; when they are missing
and ``generate_world`` is on, the embedded review world writes them there first (deterministically for its seed).
Any file can be replaced by a user's own through ``train_file`` / ``val_file`` / ``eval_prompts_file``. The
tokenizer is ``tokenizer_path`` (a tokenizer.json or a Hugging Face tokenizer directory) or, by default, a word-level
tokenizer trained once on the corpus in ``data_dir`` and saved there.

Records are read and validated once, tokenised once in ``setup`` (not per epoch) and kept as lists of examples.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from rlhf_lightning.data.collate import (
    collate_pairs,
    collate_prompts,
    collate_sft,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_lightning.data.jsonl import read_jsonl
from rlhf_lightning.data.tokenizer import TOKENIZER_FILE, Tokenizer
from rlhf_lightning.world import WORDS, Annotators, GoldJudge, JudgeConfig, WorldConfig, write_world
from rlhf_lightning.world.writer import META_FILE as WORLD_META


class RLHFDataModule(L.LightningDataModule):
    """What every phase's data has in common: the data folder, the world, the tokenizer, the evaluation prompts.

    Args:
        data_dir: folder of the JSONL files (and of the trained tokenizer).
        generate_world: write the embedded world's files into ``data_dir`` when they are missing.
        world: the configuration of the generated world (seed, sizes, annotator knobs: a preset can build a flawed
            reward model on purpose by changing them); a data_dir holding a world written with another configuration
            is an error, so results never mix two worlds silently.
        tokenizer_path: a tokenizer.json or Hugging Face tokenizer directory; None trains one on ``data_dir``.
        batch_size: examples per training batch.
        max_prompt_len, max_response_len: token budgets (see the truncation policy in data.collate).
        eval_prompts: how many responses validation samples, cycling through the held-out prompts.
        eval_prompts_file: JSONL of ``{"prompt"}`` records; default ``data_dir/prompts_val.jsonl``.
        on_error: "raise" on a malformed record, or "skip" it (counted and logged as data/skipped).
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        data_dir: str = "runs/world",
        generate_world: bool = True,
        world: WorldConfig | None = None,
        tokenizer_path: str | None = None,
        batch_size: int = 64,
        max_prompt_len: int = 16,
        max_response_len: int = 48,
        eval_prompts: int = 256,
        eval_prompts_file: str | None = None,
        on_error: Literal["raise", "skip"] = "raise",
        num_workers: int = 0,
    ):
        super().__init__()
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
        path = Path(override) if override else self.data_dir / name
        if not path.is_file():
            hint = "" if override else " (set generate_world: true to write the embedded world there)"
            raise FileNotFoundError(f"data file {path} does not exist{hint}")
        return path

    def prepare_data(self) -> None:
        """Writes the world (when asked and missing) and trains the default tokenizer (when missing): rank 0 only."""
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
        if self.hparams.tokenizer_path is None and not (self.data_dir / TOKENIZER_FILE).is_file():
            self._train_tokenizer().save(self.data_dir)

    def _train_tokenizer(self) -> Tokenizer:
        texts = []
        for path in sorted(self.data_dir.glob("*.jsonl")):
            kind = "preference" if path.name.startswith("prefs") else "sft" if path.name.startswith("sft") else "prompt"
            for rec in read_jsonl(path, kind, on_error=self.hparams.on_error).records:
                texts.extend(v for v in rec.values() if isinstance(v, str))
        if not texts:
            raise FileNotFoundError(f"no JSONL files in {self.data_dir} to train a tokenizer on; set tokenizer_path")
        extra: tuple[str, ...] = ()
        if (self.data_dir / WORLD_META).is_file():
            extra = WORDS  # every word the world's grammar can produce, seen in the corpus or not
        return Tokenizer.train_word_level(texts, extra_words=extra)

    def load_tokenizer(self) -> Tokenizer:
        path = self.hparams.tokenizer_path or self.data_dir / TOKENIZER_FILE
        return Tokenizer.load(path)

    def _load_judge(self):
        meta_path = self.data_dir / WORLD_META
        if not meta_path.is_file():
            return None  # a user's own data: no gold judge, gold metrics are skipped
        meta = json.loads(meta_path.read_text())
        self.world_meta = meta
        judge_cfg = meta.get("config", {}).get("judge")
        return GoldJudge(JudgeConfig(**judge_cfg) if judge_cfg else JudgeConfig())

    def _read(self, name: str, kind: str, override: str | None = None) -> list[dict[str, str]]:
        path = self.file(name, override)
        data = read_jsonl(path, kind, on_error=self.hparams.on_error)
        self.data_stats[f"data/skipped/{path.stem}"] = float(data.skipped)
        return data.records

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.load_tokenizer()
            self.judge = self._load_judge()

    # -- evaluation prompts ------------------------------------------------------------------------------------------
    def eval_prompts(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The fixed held-out prompts validation samples for: their texts and a left-padded batch."""
        if self._eval is None:
            records = self._read("prompts_val.jsonl", "prompt", self.hparams.eval_prompts_file)
            # Cycle through the prompts up to eval_prompts samples: a small prompt set still gives a stable figure.
            records = [records[i % len(records)] for i in range(self.hparams.eval_prompts)]
            examples = tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len)[0]
            self._eval = ([r["prompt"] for r in records], collate_prompts(examples, self.tokenizer.pad_id))
        return self._eval

    def train_prompt_batch(self, n: int, seed: int) -> dict[str, torch.Tensor]:
        """A left-padded batch of n training prompts drawn with replacement (reproducibly, from ``seed``).

        The prompts come from ``data_dir/prompts_train.jsonl`` when it exists, else from the phase's training records.
        """
        path = self.data_dir / "prompts_train.jsonl"
        prompts = [r["prompt"] for r in self._read(path.name, "prompt")] if path.is_file() else self.train_prompts
        if not prompts:
            raise ValueError(f"no training prompts: neither {path} nor training records with prompts")
        idx = torch.randint(len(prompts), (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        records = [{"prompt": prompts[i]} for i in idx]
        return collate_prompts(tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len)[0],
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

    def tokenize(self, records: list[dict[str, str]]):
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_examples:
            return
        for split, override in (("train", self.hparams.train_file), ("val", self.hparams.val_file)):
            records = self._read(f"{self.PREFIX}_{split}.jsonl", self.KIND, override)
            if split == "train":
                self.train_prompts = list(dict.fromkeys(r["prompt"] for r in records))
            examples, stats = self.tokenize(records)
            setattr(self, f"{split}_examples", examples)
            for key, value in asdict(stats).items():
                self.data_stats[f"data/{key}/{self.PREFIX}_{split}"] = float(value)
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

    def tokenize(self, records: list[dict[str, str]]):
        return tokenize_sft(records, self.tokenizer, self.hparams.max_prompt_len, self.hparams.max_response_len)

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

    Args:
        train_file, val_file: JSONL files; default ``data_dir/prefs_{train,val}.jsonl``.
        (the rest: see :class:`RLHFDataModule`)
    """

    PREFIX, KIND = "prefs", "preference"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.val_gold: tuple[torch.Tensor, torch.Tensor] | None = None  # (B_val,) gold of chosen, of rejected
        self.bayes_accuracy: float | None = None

    def tokenize(self, records: list[dict[str, str]]):
        h = self.hparams
        return tokenize_preferences(records, self.tokenizer, h.max_prompt_len, h.max_response_len)

    def on_split_loaded(self, split: str, records: list[dict[str, str]]) -> None:
        if split != "val" or self.judge is None:
            return
        prompts = [r["prompt"] for r in records]
        chosen, rejected = [r["chosen"] for r in records], [r["rejected"] for r in records]
        self.val_gold = (torch.as_tensor(self.judge.score(prompts, chosen)),
                         torch.as_tensor(self.judge.score(prompts, rejected)))  # fmt: skip
        self.bayes_accuracy = Annotators(self.world.annotators, self.judge).bayes_accuracy(prompts, chosen, rejected)

    def train_dataloader(self) -> DataLoader:
        return self._loader(list(enumerate(self.train_examples)), collate_indexed_pairs, shuffle=True)

    def val_dataloader(self) -> DataLoader:
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
        records = self._read("prompts_train.jsonl", "prompt", self.hparams.train_file)
        examples, stats = tokenize_prompts(records, self.tokenizer, self.hparams.max_prompt_len)
        self.train_prompts = [r["prompt"] for r in records]
        self._train = examples
        for key, value in asdict(stats).items():
            self.data_stats[f"data/{key}/prompts_train"] = float(value)

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
                perms[epoch] = torch.randperm(m, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
            picks.append(int(perms[epoch][k % m]))
        batch = collate_prompts([self._train[i] for i in picks], self.tokenizer.pad_id)
        return [self.train_prompts[i] for i in picks], batch

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Ticks(), batch_size=None)
