"""The data layer: JSONL schemas and validation, TRL's record layouts and Parquet / datasets files, the tokenizer,
tokenisation with a truncation policy, collation.

Everything here is plain Python and PyTorch (no Lightning), so it can be used and tested on its own; the
LightningDataModules of the phases (``modules.py``) are built on top of it.
"""

from rlhf_lightning.data.collate import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    TruncationStats,
    collate_pairs,
    collate_prompts,
    collate_sft,
    fitting_length,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)
from rlhf_lightning.data.formats import ChatTemplate, read_records
from rlhf_lightning.data.jsonl import SCHEMAS, DataError, JsonlData, atomic_open, read_jsonl, write_jsonl
from rlhf_lightning.data.modules import PreferenceDataModule, PromptDataModule, RLHFDataModule, SFTDataModule
from rlhf_lightning.data.tokenizer import Tokenizer

__all__ = [
    "SCHEMAS",
    "ChatTemplate",
    "DataError",
    "JsonlData",
    "PreferenceDataModule",
    "PreferenceExample",
    "PromptDataModule",
    "PromptExample",
    "RLHFDataModule",
    "SFTDataModule",
    "SFTExample",
    "Tokenizer",
    "TruncationStats",
    "atomic_open",
    "collate_pairs",
    "collate_prompts",
    "collate_sft",
    "fitting_length",
    "read_jsonl",
    "read_records",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
    "write_jsonl",
]
