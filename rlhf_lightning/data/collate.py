"""Tokenisation with a truncation policy, and the collate functions that pad examples into batches.

Records are tokenised once, in a batch, into examples of token-id lists; the collate functions only pad. Prompt and
response are tokenised separately and concatenated as they are (no separator, no template): a chat template, or the
leading space a byte-level BPE expects before a response's first word, belongs in the text itself.

Truncation policy (counted in :class:`TruncationStats`, logged as ``data/truncated_*``; the data modules refuse to
cut anything unless ``truncation: warn``, see :class:`~rlhf_lightning.data.modules.RLHFDataModule`):

- A prompt keeps its LAST ``max_prompt_len`` tokens: the end of a prompt is what the response answers.
- A response keeps its FIRST tokens. EOS is appended only when the whole response and EOS fit in
  ``max_response_len``; otherwise the response is cut to ``max_response_len`` tokens, gets no EOS and is counted as
  truncated. Teaching EOS after a cut would teach the model to stop mid-thought, and an uncounted cut would drop a
  response's end silently.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from rlhf_lightning.data.jsonl import DataError
from rlhf_lightning.data.tokenizer import Tokenizer


class SFTExample(NamedTuple):
    """A tokenised demonstration.

    Attributes:
        prompt_ids: (P,) the prompt's tokens, P >= 1.
        response_ids: (R,) the response's tokens, ending with EOS unless truncated, R >= 1.
    """

    prompt_ids: list[int]
    response_ids: list[int]


class PreferenceExample(NamedTuple):
    """A tokenised preference pair; each response follows the policy of :class:`SFTExample`.

    Attributes:
        prompt_ids: (P,) the prompt's tokens.
        chosen_ids: (Rc,) the preferred response's tokens.
        rejected_ids: (Rr,) the other response's tokens.
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


class PromptExample(NamedTuple):
    """A tokenised prompt.

    Attributes:
        prompt_ids: (P,) the prompt's tokens.
    """

    prompt_ids: list[int]


@dataclass
class TruncationStats:
    """What tokenising a list of records found, and what the truncation policy did to it.

    Attributes:
        examples: records tokenised.
        responses: responses tokenised (1 per SFT example, 2 per preference pair, 0 per prompt).
        truncated_prompts: prompts that lost their first tokens.
        truncated_responses: responses cut at ``max_response_len`` (and left without EOS).
        tokens: tokens of all the texts, before truncation.
        unk_tokens: how many of them are the tokenizer's unknown token (0 for a tokenizer without one).
        prompt_lengths: (examples,) each prompt's tokens before truncation: the ``max_prompt_len`` that keeps it whole.
        response_lengths: (responses,) each response's tokens before truncation plus 1 for its EOS: the
            ``max_response_len`` that keeps it whole.
    """

    examples: int = 0
    responses: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0
    tokens: int = 0
    unk_tokens: int = 0
    prompt_lengths: list[int] = dataclasses.field(default_factory=list)
    response_lengths: list[int] = dataclasses.field(default_factory=list)

    @property
    def unk_rate(self) -> float:
        """The share of unknown tokens among all tokens (0 when there are none)."""
        return self.unk_tokens / self.tokens if self.tokens else 0.0

    def figures(self) -> dict[str, float]:
        """The counts and the unknown-token rate, by name: what the data modules log as ``data/<name>/<file>``."""
        names = ("examples", "responses", "truncated_prompts", "truncated_responses")
        return {**{name: float(getattr(self, name)) for name in names}, "unk_rate": self.unk_rate}


def fitting_length(lengths: Sequence[int], share: float) -> int:
    """The smallest length budget that keeps at least ``share`` of the sequences whole.

    Args:
        lengths: (N,) N >= 1, each sequence's length (as in :attr:`TruncationStats.prompt_lengths`).
        share: in (0, 1]; 1: the budget that keeps every sequence whole (the longest length).
    """
    ordered = sorted(lengths)
    return ordered[max(math.ceil(share * len(ordered)), 1) - 1]


def tokenize_sft(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    where: Sequence[str] | None = None,
) -> tuple[list[SFTExample], TruncationStats]:
    """Tokenises ``{"prompt", "response"}`` records under the module's truncation policy, in one batch.

    Args:
        records: as :func:`~rlhf_lightning.data.jsonl.read_jsonl` returns them.
        tokenizer: supplies the ids and EOS.
        max_prompt_len: the most prompt tokens kept (the last ones).
        max_response_len: the most response tokens kept, EOS included.
        where: where each record comes from (``"path:line"``), for errors; default ``"record i"``.

    Returns:
        One example per record, in order, and what truncation did.

    Raises:
        DataError: a prompt or response tokenises to no tokens (names the record and field).
        ValueError: a length budget below 1.
    """
    stats = TruncationStats(examples=len(records))
    prompts = _prompts(records, tokenizer, max_prompt_len, stats, where)
    responses = _responses(records, "response", tokenizer, max_response_len, stats, where)
    return [SFTExample(p, r) for p, r in zip(prompts, responses, strict=True)], stats


def tokenize_preferences(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    max_prompt_len: int,
    max_response_len: int,
    where: Sequence[str] | None = None,
) -> tuple[list[PreferenceExample], TruncationStats]:
    """Tokenises ``{"prompt", "chosen", "rejected"}`` records; arguments and policy as :func:`tokenize_sft`, applied
    to each response (EOS where it fits).

    Raises:
        DataError: a prompt or response tokenises to no tokens (names the record and field).
        ValueError: a length budget below 1.
    """
    stats = TruncationStats(examples=len(records))
    prompts = _prompts(records, tokenizer, max_prompt_len, stats, where)
    chosen = _responses(records, "chosen", tokenizer, max_response_len, stats, where)
    rejected = _responses(records, "rejected", tokenizer, max_response_len, stats, where)
    return [PreferenceExample(*x) for x in zip(prompts, chosen, rejected, strict=True)], stats


def tokenize_prompts(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    max_prompt_len: int,
    where: Sequence[str] | None = None,
) -> tuple[list[PromptExample], TruncationStats]:
    """Tokenises ``{"prompt"}`` records (left-truncated to ``max_prompt_len``); ``where`` as :func:`tokenize_sft`.

    Raises:
        DataError: a prompt tokenises to no tokens (names the record).
        ValueError: ``max_prompt_len`` below 1.
    """
    stats = TruncationStats(examples=len(records))
    return [PromptExample(p) for p in _prompts(records, tokenizer, max_prompt_len, stats, where)], stats


def _encode(
    records: Sequence[Mapping[str, str]],
    field: str,
    tokenizer: Tokenizer,
    max_len: int,
    stats: TruncationStats,
    where: Sequence[str] | None,
) -> list[list[int]]:
    """The token ids of each record's ``field``, untruncated; counts their tokens and unknown tokens."""
    if max_len < 1:
        raise ValueError(f"the token budget of {field!r} must be >= 1, got {max_len}")
    ids = tokenizer.encode_batch([r[field] for r in records])
    for i, x in enumerate(ids):
        if not x:
            # Valid text can still give no token: a tokenizer whose normaliser drops it (control or format
            # characters, for instance) would leave nothing to train on.
            raise DataError(where[i] if where is not None else f"record {i}", "tokenises to no tokens", field)
        stats.tokens += len(x)
        if tokenizer.unk_id is not None:
            stats.unk_tokens += x.count(tokenizer.unk_id)
    return ids


def _prompts(
    records: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    max_len: int,
    stats: TruncationStats,
    where: Sequence[str] | None,
) -> list[list[int]]:
    out = []
    for ids in _encode(records, "prompt", tokenizer, max_len, stats, where):
        stats.prompt_lengths.append(len(ids))
        if len(ids) > max_len:
            stats.truncated_prompts += 1
            ids = ids[-max_len:]
        out.append(ids)
    return out


def _responses(
    records: Sequence[Mapping[str, str]],
    field: str,
    tokenizer: Tokenizer,
    max_len: int,
    stats: TruncationStats,
    where: Sequence[str] | None,
) -> list[list[int]]:
    out = []
    for ids in _encode(records, field, tokenizer, max_len, stats, where):
        stats.responses += 1
        stats.response_lengths.append(len(ids) + 1)  # with its EOS
        if len(ids) < max_len:  # the whole response and its EOS fit
            ids.append(tokenizer.eos_id)
        else:
            stats.truncated_responses += 1
            ids = ids[:max_len]
        out.append(ids)
    return out


def collate_sft(examples: Sequence[SFTExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads demonstrations into a teacher-forcing batch, T = the longest prompt + response.

    Returns:
        input_ids: (B, T) int64, prompt + response, right-padded with ``pad_id``.
        attention_mask: (B, T) bool, True on real tokens.
        targets: (B, T) int64, ``input_ids`` shifted left by one (position t holds token t + 1), ``pad_id`` last.
        loss_mask: (B, T) bool, True exactly where ``targets`` is a response token (EOS included), i.e. at
            positions P - 1 .. P + R - 2 of an example with P prompt and R response tokens.
    """
    prompt_len = torch.tensor([len(e.prompt_ids) for e in examples])  # (B,)
    seq_len = prompt_len + torch.tensor([len(e.response_ids) for e in examples])  # (B,)
    input_ids, attention_mask = pad_sequences([e.prompt_ids + e.response_ids for e in examples], pad_id, left=False)
    targets = torch.full_like(input_ids, pad_id)
    targets[:, :-1] = input_ids[:, 1:]
    pos = torch.arange(input_ids.shape[1])  # (T,)
    loss_mask = (pos >= prompt_len[:, None] - 1) & (pos < seq_len[:, None] - 1)  # (B, T)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "targets": targets, "loss_mask": loss_mask}


def collate_pairs(examples: Sequence[PreferenceExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads preference pairs. Both sides share one T (the longest of the 2B sequences), so a reward model can score
    ``torch.cat([chosen_ids, rejected_ids])`` in a single (2B, T) forward pass.

    Returns:
        chosen_ids, rejected_ids: (B, T) int64, prompt + response, right-padded with ``pad_id``.
        chosen_mask, rejected_mask: (B, T) bool, True on real tokens (the last True is the response's last token).
        chosen_response_len, rejected_response_len: (B,) int64, response tokens, EOS included.
    """
    seqs = [e.prompt_ids + e.chosen_ids for e in examples] + [e.prompt_ids + e.rejected_ids for e in examples]
    ids, mask = pad_sequences(seqs, pad_id, left=False)  # (2B, T): chosen rows first
    b = len(examples)
    return {
        "chosen_ids": ids[:b],
        "chosen_mask": mask[:b],
        "rejected_ids": ids[b:],
        "rejected_mask": mask[b:],
        "chosen_response_len": torch.tensor([len(e.chosen_ids) for e in examples]),
        "rejected_response_len": torch.tensor([len(e.rejected_ids) for e in examples]),
    }


def collate_prompts(examples: Sequence[PromptExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Pads prompts on the LEFT, so that every prompt ends at the last column and batched generation appends each
    new token at the same position for all rows (one KV-cache write per step).

    Returns:
        prompt_ids: (B, P) int64, left-padded with ``pad_id``; P = the longest prompt.
        prompt_mask: (B, P) bool, True on real tokens.
    """
    prompt_ids, prompt_mask = pad_sequences([e.prompt_ids for e in examples], pad_id, left=True)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def pad_sequences(seqs: Sequence[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, T) int64 ids padded with ``pad_id`` on one side, and the (N, T) bool mask of real tokens."""
    if not seqs:
        raise ValueError("cannot collate an empty batch")
    lengths = torch.tensor([len(s) for s in seqs])  # (N,)
    width = int(lengths.max())
    rows = [[pad_id] * (width - len(s)) + s if left else s + [pad_id] * (width - len(s)) for s in seqs]
    pos = torch.arange(width)  # (T,)
    mask = pos >= width - lengths[:, None] if left else pos < lengths[:, None]  # (N, T)
    return torch.tensor(rows, dtype=torch.long), mask


def join_left_right(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts + right-padded responses -> right-padded prompt + response sequences.

    Args:
        prompt_ids, prompt_mask: (B, P) left-padded.
        response_ids, response_mask: (B, R) right-padded (generated).

    Returns:
        ids, mask: (B, P + R) with each row's real tokens first.
    """
    ids = torch.cat([prompt_ids, response_ids], 1)  # (B, P + R)
    mask = torch.cat([prompt_mask.bool(), response_mask.bool()], 1)
    # A stable sort of ~mask moves real tokens to the front in their order, padding to the back.
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
    return ids.gather(1, order), mask.gather(1, order)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last real token, for right-padded sequences (and left-padded ones); -1 for a row
    without one.

    Args:
        attention_mask: (B, T) 1 (or True) for real tokens.
    """
    t = attention_mask.shape[1]
    positions = torch.arange(t, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).amax(-1)
