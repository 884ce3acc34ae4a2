"""Diversity of generated text: pure functions on token-id sequences, and torchmetrics Metrics built on them.

The scores (each a function of a set of responses):

- distinct-n (Li et al., 2016): distinct n-grams / n-grams. 1 when no n-gram repeats, near 0 when every response
  says the same thing.
- self-BLEU (Zhu et al., 2018): each response's BLEU against all the others as references, averaged. 1 when all
  responses are identical, 0 when they share no token.
- n-gram overlap: the mean pairwise Jaccard overlap of the responses' n-gram sets. 1 = identical, 0 = disjoint.
- EAD, expectation-adjusted distinct (Liu et al., 2022): distinct n-grams divided by the number a uniform draw from
  the vocabulary would give, so that, unlike distinct-n, it does not fall just because responses got longer.

Per-input and across-input diversity. With k samples of each prompt, a policy collapses first *per input*: the k
samples of a prompt become the same while different prompts still get different answers. So every score can be taken

- across inputs: over one pool of responses (e.g. one sample of each of many prompts), or
- per input: within each group of samples that share a ``group_ids`` value, averaged over the groups.

Inputs: ``sequences`` is either a list of B token-id sequences (any lengths), or a (B, T) integer tensor with
``lengths`` (B,) (real tokens first, padding after) or ``mask`` (B, T) (True at real tokens, any padding side), or
neither (every position is a token). ``group_ids`` is (B,): any hashable ids, one per sequence.

Empty and short inputs never raise: a sequence shorter than n has no n-gram, and a score with nothing to measure
(no n-gram at all, fewer than two responses to compare, no group) is 0.0.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Sequence
from functools import partial
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from rlhf_lightning import tags

TokenSequences = Sequence[Sequence[int]] | torch.Tensor
GroupIds = Sequence[Hashable] | torch.Tensor
Score = Callable[[Sequence[Sequence[int]]], float]


def ngram_counts(sequences: Sequence[Sequence[int]], n: int) -> Counter:
    """Counts of every n-gram (as a tuple) over all sequences; sequences shorter than n contribute none."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    counts: Counter = Counter()
    for seq in sequences:
        seq = tuple(seq)
        counts.update(seq[i : i + n] for i in range(len(seq) - n + 1))
    return counts


def distinct_n(sequences: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / total n-grams across ``sequences``; 0.0 when there is no n-gram at all."""
    counts = ngram_counts(sequences, n)
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def expectation_adjusted_distinct(sequences: Sequence[Sequence[int]], vocab_size: int, n: int = 1) -> float:
    """EAD (Liu et al., 2022, "Rethinking and Refining the Distinct Metric", ACL):

        EAD = N_distinct / (V * (1 - ((V - 1) / V) ** C))

    with N_distinct the distinct n-grams and C the n-grams over all ``sequences``, and V = ``vocab_size`` (the
    tokenizer's). The denominator is the expected number of distinct tokens among C drawn uniformly from V, so EAD is
    about 1 for uniform random text of any length, and can exceed 1 (up to 1 / (1 - 1/e) ~ 1.58 when C = V and nothing
    repeats). For n > 1, V stays the vocabulary size (not V ** n), as in the formula above. 0.0 when there is no
    n-gram.
    """
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    counts = ngram_counts(sequences, n)
    total = sum(counts.values())
    if not total:
        return 0.0
    expected = vocab_size * (1.0 - ((vocab_size - 1) / vocab_size) ** total)
    return len(counts) / expected


def _reference_max_counts(counts: list[Counter]) -> list[dict[tuple, int]]:
    """For each sequence i and each of its n-grams g, the largest count of g in any *other* sequence.

    One pass keeps, per n-gram, the largest count, the sequence holding it and the second largest: the largest count
    outside sequence i is then the second largest if i holds the largest, else the largest. This makes self-BLEU
    linear in the number of responses instead of quadratic.
    """
    top: dict[tuple, tuple[int, int, int]] = {}  # n-gram -> (largest count, its sequence, second largest count)
    for i, c in enumerate(counts):
        for g, m in c.items():
            best, owner, second = top.get(g, (0, -1, 0))
            if m > best:
                top[g] = (m, i, best)
            elif m > second:
                top[g] = (best, owner, m)
    return [{g: top[g][2] if top[g][1] == i else top[g][0] for g in c} for i, c in enumerate(counts)]


def self_bleu(sequences: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean over responses of BLEU-n of the response against all the other responses as references.

    BLEU-n = BP * exp(mean over k = 1..n of log p_k), uniform weights, with p_k the clipped k-gram precision (each
    k-gram of the response counts at most as often as in the reference that has most of it) and BP the brevity
    penalty against the closest reference length (the shorter on a tie): exp(1 - r / c) when c <= r.

    Smoothing: add-one on the orders k >= 2, p_k = (matches + 1) / (k-grams + 1) (Lin & Och, 2004; "smoothing 2" of
    Chen & Cherry, 2014). So a response shorter than n, or one that shares words but no longer n-gram, gets a finite
    positive score rather than 0 or NaN, identical responses still score exactly 1, and responses with no common token
    (p_1 = 0, left unsmoothed) score exactly 0. An empty response scores 0 (BP = 0); fewer than two responses give 0.0.
    """
    seqs = [tuple(s) for s in sequences]
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    if len(seqs) < 2:
        return 0.0
    log_precision = [0.0] * len(seqs)
    for k in range(1, n + 1):
        counts = [ngram_counts([s], k) for s in seqs]
        for i, (c, ref_max) in enumerate(zip(counts, _reference_max_counts(counts), strict=True)):
            matches = sum(min(m, ref_max[g]) for g, m in c.items())
            total = sum(c.values())
            if k > 1:
                matches, total = matches + 1, total + 1
            log_precision[i] += math.log(matches / total) / n if matches else -math.inf

    length_counts = Counter(len(s) for s in seqs)
    scores = []
    for seq, log_p in zip(seqs, log_precision, strict=True):
        c = len(seq)
        if log_p == -math.inf:  # no token in common with any other response, or an empty response
            scores.append(0.0)
            continue
        # Reference lengths are those of the other responses: a length only this response has is not one.
        r = min((length for length, m in length_counts.items() if m > (length == c)), key=lambda x: (abs(x - c), x))
        brevity = 1.0 if c > r else math.exp(1.0 - r / c)
        scores.append(brevity * math.exp(log_p))
    return sum(scores) / len(scores)


def ngram_overlap(sequences: Sequence[Sequence[int]], n: int = 2) -> float:
    """Mean over all pairs of responses of the Jaccard overlap |A & B| / |A | B| of their n-gram sets.

    A pair where neither response has an n-gram counts 0; fewer than two responses give 0.0.
    """
    sets = [set(ngram_counts([s], n)) for s in sequences]
    if len(sets) < 2:
        return 0.0
    total = 0.0
    for a, b in itertools.combinations(sets, 2):
        shared = len(a & b)
        union = len(a) + len(b) - shared
        total += shared / union if union else 0.0
    return total / (len(sets) * (len(sets) - 1) / 2)


def token_lists(
    sequences: TokenSequences, lengths: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> list[tuple[int, ...]]:
    """The token ids of each sequence as a tuple of ints, padding removed.

    Args:
        sequences: B sequences of token ids, or a (B, T) integer tensor.
        lengths: (B,) real tokens at the start of each row (tensor input only).
        mask: (B, T) bool, True at real tokens (tensor input only).
    """
    if not isinstance(sequences, torch.Tensor):
        if lengths is not None or mask is not None:
            raise ValueError("lengths and mask apply to a (B, T) tensor of sequences only")
        return [tuple(int(t) for t in s) for s in sequences]
    if sequences.ndim != 2:
        raise ValueError(f"sequences must be a (B, T) tensor, got shape {tuple(sequences.shape)}")
    if lengths is not None and mask is not None:
        raise ValueError("give lengths or mask, not both")
    if lengths is not None:
        positions = torch.arange(sequences.shape[1], device=sequences.device)
        mask = positions < lengths.to(sequences.device)[:, None]  # (B, T)
    if mask is None:
        return [tuple(row) for row in sequences.tolist()]
    if mask.shape != sequences.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, sequences {tuple(sequences.shape)}")
    return [tuple(row[keep].tolist()) for row, keep in zip(sequences, mask.bool(), strict=True)]


def group_sequences(sequences: Sequence[Sequence[int]], group_ids: GroupIds) -> list[list[Sequence[int]]]:
    """The sequences split by ``group_ids`` (B,), groups in order of first appearance."""
    ids = group_ids.tolist() if isinstance(group_ids, torch.Tensor) else list(group_ids)
    if len(ids) != len(sequences):
        raise ValueError(f"{len(ids)} group ids for {len(sequences)} sequences")
    groups: dict[Hashable, list[Sequence[int]]] = {}
    for g, seq in zip(ids, sequences, strict=True):
        groups.setdefault(g, []).append(seq)
    return list(groups.values())


def diversity_metrics(
    sequences: TokenSequences,
    vocab_size: int,
    group_ids: GroupIds | None = None,
    *,
    lengths: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    prefix: str = tags.DIVERSITY,
) -> dict[str, float]:
    """Every diversity score of one set of responses (e.g. a rollout), keyed ``{prefix}/distinct_1``,
    ``{prefix}/distinct_2``, ``{prefix}/self_bleu`` (BLEU-4), ``{prefix}/ngram_overlap`` (bigrams), ``{prefix}/ead``
    (unigrams, V = ``vocab_size``).

    Across inputs when ``group_ids`` is None (all sequences form one pool); per input (the mean over the groups of
    ``group_ids`` (B,)) otherwise, e.g. with ``prefix="diversity/per_input"``. Values of this process only: under DDP
    use the Metric classes below, whose state is synchronised. Shapes of ``sequences``, ``lengths``, ``mask`` as in
    :func:`token_lists`.
    """
    seqs = token_lists(sequences, lengths, mask)
    groups = [seqs] if group_ids is None else group_sequences(seqs, group_ids)
    scores: dict[str, Score] = {
        "distinct_1": partial(distinct_n, n=1),
        "distinct_2": partial(distinct_n, n=2),
        "self_bleu": self_bleu,
        "ngram_overlap": ngram_overlap,
        "ead": partial(expectation_adjusted_distinct, vocab_size=vocab_size),
    }
    n_groups = max(len(groups), 1)  # per input with no sequence there is no group: every score is then 0.0
    return {f"{prefix}/{name}": sum(map(score, groups)) / n_groups for name, score in scores.items()}


class DiversityMetric(Metric):
    """A diversity score as a torchmetrics Metric, across inputs or per input; subclasses define :meth:`score`.

    State, chosen so that any split of the data over processes gives the value of one process holding all of it:

    - across inputs (``per_input=False``): the sequences themselves, as two list states reduced by concatenation:
      ``tokens`` (all token ids of an update, flattened) and ``lengths`` (B,) per update. Pooled scores such as
      distinct-n need the union of all n-grams, which no fixed-size statistic carries, so ``compute`` rebuilds every
      sequence and scores the pool.
    - per input (``per_input=True``): a group is scored in the ``update`` it arrives in (pass all k samples of a prompt
      in one call; ids need only be unique within the call), and only ``group_score_sum`` and ``group_count`` are
      kept, reduced by sum. The mean over groups does not depend on which process scored which group.

    ``update(sequences, group_ids=None, *, lengths=None, mask=None)``: shapes as in :func:`token_lists`;
    ``group_ids`` (B,) is required per input and refused across inputs. ``compute()`` returns a float64 scalar tensor.
    """

    is_differentiable = False
    full_state_update = False

    def __init__(self, n: int, per_input: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n <= 0:
            raise ValueError(f"n must be > 0, got {n}")
        self.n = n
        self.per_input = per_input
        if per_input:
            self.add_state("group_score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state("group_count", torch.tensor(0), dist_reduce_fx="sum")
        else:
            self.add_state("tokens", [], dist_reduce_fx="cat")
            self.add_state("lengths", [], dist_reduce_fx="cat")

    def score(self, sequences: Sequence[Sequence[int]]) -> float:
        """The score of one set of sequences."""
        raise NotImplementedError

    def update(
        self,
        sequences: TokenSequences,
        group_ids: GroupIds | None = None,
        *,
        lengths: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Add B sequences (see the class docstring for shapes and ``group_ids``)."""
        seqs = token_lists(sequences, lengths, mask)
        if self.per_input:
            if group_ids is None:
                raise ValueError("a per-input metric needs group_ids: which sequences are samples of one prompt")
            groups = group_sequences(seqs, group_ids)
            self.group_score_sum += sum(self.score(g) for g in groups)
            self.group_count += len(groups)
            return
        if group_ids is not None:
            raise ValueError("an across-input metric pools all sequences; construct it with per_input=True to group")
        flat = [t for s in seqs for t in s]
        self.tokens.append(torch.tensor(flat, dtype=torch.long, device=self.device))
        self.lengths.append(torch.tensor([len(s) for s in seqs], dtype=torch.long, device=self.device))

    def compute(self) -> torch.Tensor:
        """The score of the pool, or the mean score of the groups; 0.0 with no data."""
        if self.per_input:
            count = int(self.group_count)
            value = float(self.group_score_sum) / count if count else 0.0
        else:
            value = self.score(self._pooled_sequences())
        return torch.tensor(value, dtype=torch.float64)

    def _pooled_sequences(self) -> list[list[int]]:
        # After a sync the list states are single tensors; before any update they are empty lists.
        if isinstance(self.lengths, list) and not self.lengths:
            return []
        tokens = dim_zero_cat(self.tokens).tolist()
        bounds = [0, *itertools.accumulate(dim_zero_cat(self.lengths).tolist())]
        return [tokens[a:b] for a, b in itertools.pairwise(bounds)]

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors, process_group: Any | None = None) -> None:
        # torchmetrics stands in for an empty list state with an empty tensor of the metric's float dtype; a process
        # that saw no sequence must send int64 like the others, or the gather mixes dtypes. sync() has already cached
        # the state, so unsync() restores the empty lists.
        if not self.per_input:
            for name in ("tokens", "lengths"):
                if isinstance(getattr(self, name), list) and not getattr(self, name):
                    setattr(self, name, [torch.zeros(0, dtype=torch.long, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)


class DistinctN(DiversityMetric):
    """distinct-n (:func:`distinct_n`) as a Metric; ``diversity/distinct_{n}`` in logs."""

    higher_is_better = True

    def score(self, sequences: Sequence[Sequence[int]]) -> float:
        return distinct_n(sequences, self.n)


class SelfBLEU(DiversityMetric):
    """Self-BLEU-n (:func:`self_bleu`, default n = 4) as a Metric; ``diversity/self_bleu`` in logs."""

    higher_is_better = False

    def __init__(self, n: int = 4, per_input: bool = False, **kwargs: Any) -> None:
        super().__init__(n, per_input, **kwargs)

    def score(self, sequences: Sequence[Sequence[int]]) -> float:
        return self_bleu(sequences, self.n)


class NgramOverlap(DiversityMetric):
    """Mean pairwise Jaccard overlap of n-gram sets (:func:`ngram_overlap`, default n = 2) as a Metric."""

    higher_is_better = False

    def __init__(self, n: int = 2, per_input: bool = False, **kwargs: Any) -> None:
        super().__init__(n, per_input, **kwargs)

    def score(self, sequences: Sequence[Sequence[int]]) -> float:
        return ngram_overlap(sequences, self.n)


class ExpectationAdjustedDistinct(DiversityMetric):
    """EAD (:func:`expectation_adjusted_distinct`, default n = 1) as a Metric; ``diversity/ead`` in logs.

    Args:
        vocab_size: V, the tokenizer's vocabulary size.
    """

    higher_is_better = True

    def __init__(self, vocab_size: int, n: int = 1, per_input: bool = False, **kwargs: Any) -> None:
        super().__init__(n, per_input, **kwargs)
        if vocab_size <= 0:
            raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
        self.vocab_size = vocab_size

    def score(self, sequences: Sequence[Sequence[int]]) -> float:
        return expectation_adjusted_distinct(sequences, self.vocab_size, self.n)


def duplicate_rate(prompts: Sequence[str], responses: Sequence[str]) -> float:
    """Share of responses that some response to a *different* prompt repeats word for word: near 0 for a healthy
    policy, high when it answers everything with the same text (mode collapse across inputs)."""
    by_text: dict[str, set[str]] = defaultdict(set)
    for prompt, response in zip(prompts, responses, strict=True):
        by_text[response].add(prompt)
    return sum(len(by_text[r]) > 1 for r in responses) / max(len(responses), 1)
