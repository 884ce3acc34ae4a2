"""The diversity metrics against values worked out by hand, and their state under a simulated multi-process sync."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch

from rlhf_lightning.metrics import (
    DistinctN,
    DiversityMetric,
    ExpectationAdjustedDistinct,
    NgramOverlap,
    SelfBLEU,
    distinct_n,
    diversity_metrics,
    duplicate_rate,
    expectation_adjusted_distinct,
    ngram_overlap,
    self_bleu,
    token_lists,
)

IDENTICAL = [[1, 2, 3, 4]] * 3
DISJOINT = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
# Three prompts with three samples each: every prompt's samples are the same, the prompts' answers all differ.
COLLAPSED = [[1, 2, 3, 4]] * 3 + [[5, 6, 7, 8]] * 3 + [[9, 10, 11, 12]] * 3
COLLAPSED_GROUPS = [0, 0, 0, 1, 1, 1, 2, 2, 2]


# -- distinct-n ----------------------------------------------------------------------------------------------------
def test_distinct_n_identical_disjoint_and_empty():
    assert distinct_n(IDENTICAL, 1) == pytest.approx(4 / 12)
    assert distinct_n(IDENTICAL, 2) == pytest.approx(3 / 9)
    assert distinct_n(DISJOINT, 1) == 1.0
    assert distinct_n(DISJOINT, 2) == 1.0
    assert distinct_n([], 1) == 0.0
    assert distinct_n([[1]], 2) == 0.0  # shorter than n: no bigram


# -- self-BLEU -----------------------------------------------------------------------------------------------------
def test_self_bleu_identical_is_one_and_disjoint_is_zero():
    assert self_bleu(IDENTICAL) == pytest.approx(1.0)
    assert self_bleu(DISJOINT) == 0.0


def test_self_bleu_hand_computed_with_add_one_smoothing():
    # Each response against the other: p1 = 3/5 (1, 2, 3 shared); bigrams 2 of 4 shared -> (2+1)/(4+1);
    # trigrams 1 of 3 -> 2/4; 4-grams 0 of 2 -> 1/3. Equal lengths: no brevity penalty. Symmetric, so the mean is
    # either response's BLEU.
    expected = (0.6 * 0.6 * 0.5 / 3) ** 0.25
    assert self_bleu([[1, 2, 3, 4, 5], [1, 2, 3, 9, 9]]) == pytest.approx(expected)


def test_self_bleu_brevity_penalty_and_short_responses():
    # [1, 2] against [1, 2, 3, 4]: every precision 1 (orders 3 and 4 have no n-gram: (0+1)/(0+1)), BP = exp(1 - 4/2).
    # [1, 2, 3, 4] against [1, 2]: p1 = 2/4, p2 = (1+1)/(3+1), p3 = 1/3, p4 = 1/2, longer than its reference: BP = 1.
    expected = (math.exp(-1.0) + (0.5 * 0.5 / 3 * 0.5) ** 0.25) / 2
    assert self_bleu([[1, 2], [1, 2, 3, 4]]) == pytest.approx(expected)
    assert self_bleu([[7], [7]]) == pytest.approx(1.0)  # shorter than n = 4, still finite


def test_self_bleu_clips_to_the_best_single_reference():
    # [5, 5] against [5] and [5]: each reference holds one 5, so 1 of its 2 unigrams matches (the references' counts
    # are not added up): p1 = 1/2, p2 = (0+1)/(1+1), p3 = p4 = 1; longer than its references: BP = 1.
    a = (0.5 * 0.5) ** 0.25
    # [5] against [5, 5] and [5]: all precisions 1, closest reference length 1: BP = 1.
    assert self_bleu([[5, 5], [5], [5]]) == pytest.approx((a + 2 * 1.0) / 3)


def test_self_bleu_empty_and_single_inputs_give_zero():
    assert self_bleu([]) == 0.0
    assert self_bleu([[1, 2, 3]]) == 0.0
    assert self_bleu([[], []]) == 0.0
    assert self_bleu([[], [1, 2]]) == 0.0  # the empty response scores 0; [1, 2] shares nothing with it


# -- n-gram overlap ------------------------------------------------------------------------------------------------
def test_ngram_overlap_hand_computed():
    assert ngram_overlap(IDENTICAL) == 1.0
    assert ngram_overlap(DISJOINT) == 0.0
    # Bigram sets {12, 23}, {23, 34}, {56}: Jaccard 1/3, 0, 0 over the three pairs.
    assert ngram_overlap([[1, 2, 3], [2, 3, 4], [5, 6]]) == pytest.approx(1 / 9)
    assert ngram_overlap([[1], [1]]) == 0.0  # no bigram on either side
    assert ngram_overlap([[1, 2]]) == 0.0


# -- EAD -----------------------------------------------------------------------------------------------------------
def test_ead_hand_computed():
    # 3 distinct tokens among C = 4, V = 4: expected distinct = 4 * (1 - (3/4)^4) = 700/256.
    assert expectation_adjusted_distinct([[1, 2, 1], [3]], vocab_size=4) == pytest.approx(3 / (700 / 256))
    # Bigrams (1,2), (2,1): 2 distinct among C = 2, V = 4: expected 4 * (1 - (3/4)^2) = 7/4.
    assert expectation_adjusted_distinct([[1, 2, 1]], vocab_size=4, n=2) == pytest.approx(2 / (7 / 4))
    assert expectation_adjusted_distinct([[0, 0, 0]], vocab_size=1) == 1.0  # one possible token: expected 1
    assert expectation_adjusted_distinct([], vocab_size=10) == 0.0
    with pytest.raises(ValueError, match="vocab_size"):
        expectation_adjusted_distinct([[1]], vocab_size=0)


# -- inputs --------------------------------------------------------------------------------------------------------
def test_token_lists_from_lists_lengths_and_masks():
    assert token_lists([[1, 2], []]) == [(1, 2), ()]
    padded = torch.tensor([[5, 6, 0], [7, 0, 0]])  # right padding
    assert token_lists(padded, lengths=torch.tensor([2, 1])) == [(5, 6), (7,)]
    left = torch.tensor([[0, 5, 6], [0, 0, 7]])  # left padding
    assert token_lists(left, mask=left != 0) == [(5, 6), (7,)]
    assert token_lists(padded) == [(5, 6, 0), (7, 0, 0)]
    with pytest.raises(ValueError, match="not both"):
        token_lists(padded, lengths=torch.tensor([2, 1]), mask=padded != 0)
    with pytest.raises(ValueError, match="tensor"):
        token_lists([[1]], lengths=torch.tensor([1]))


# -- per input and across inputs -----------------------------------------------------------------------------------
def test_collapse_shows_per_input_only():
    one_each = COLLAPSED[::3]  # one sample of each prompt
    across = diversity_metrics(one_each, vocab_size=16)
    per_input = diversity_metrics(COLLAPSED, vocab_size=16, group_ids=COLLAPSED_GROUPS, prefix="diversity/per_input")
    assert across["diversity/distinct_1"] == 1.0
    assert across["diversity/distinct_2"] == 1.0
    assert across["diversity/self_bleu"] == 0.0
    assert across["diversity/ngram_overlap"] == 0.0
    assert across["diversity/ead"] == pytest.approx(12 / (16 * (1 - (15 / 16) ** 12)))
    assert per_input["diversity/per_input/distinct_1"] == pytest.approx(1 / 3)
    assert per_input["diversity/per_input/distinct_2"] == pytest.approx(1 / 3)
    assert per_input["diversity/per_input/self_bleu"] == pytest.approx(1.0)
    assert per_input["diversity/per_input/ngram_overlap"] == 1.0
    assert per_input["diversity/per_input/ead"] == pytest.approx(4 / (16 * (1 - (15 / 16) ** 12)))


def test_diversity_metrics_of_nothing_is_zero():
    expected = dict.fromkeys(["distinct_1", "distinct_2", "self_bleu", "ngram_overlap", "ead"], 0.0)
    assert diversity_metrics([], vocab_size=8, prefix="d") == {f"d/{k}": v for k, v in expected.items()}
    assert diversity_metrics([], vocab_size=8, group_ids=[], prefix="d") == {f"d/{k}": v for k, v in expected.items()}


# -- Metric classes ------------------------------------------------------------------------------------------------
METRICS = {
    "distinct_1": lambda per_input: DistinctN(1, per_input=per_input),
    "distinct_2": lambda per_input: DistinctN(2, per_input=per_input),
    "self_bleu": lambda per_input: SelfBLEU(per_input=per_input),
    "ngram_overlap": lambda per_input: NgramOverlap(per_input=per_input),
    "ead": lambda per_input: ExpectationAdjustedDistinct(vocab_size=16, per_input=per_input),
}
# Nine responses of three prompts, fed as three updates (one per prompt group, whole groups per update).
BATCHES = [
    ([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2]], [0, 0, 0]),
    ([[6, 7, 8], [6, 7, 8], [9, 7, 8, 1]], [1, 1, 1]),
    ([[2, 3], [], [3, 2, 3, 2]], [2, 2, 2]),
]
ALL_SEQUENCES = [s for seqs, _ in BATCHES for s in seqs]
ALL_GROUPS = [g for _, ids in BATCHES for g in ids]


def fed(metric: DiversityMetric, batches: list) -> DiversityMetric:
    for seqs, ids in batches:
        metric.update(seqs, ids if metric.per_input else None)
    return metric


@pytest.mark.parametrize("per_input", [False, True], ids=["across", "per_input"])
@pytest.mark.parametrize("name", METRICS)
def test_metric_equals_the_pure_function(name, per_input):
    expected = diversity_metrics(ALL_SEQUENCES, 16, ALL_GROUPS if per_input else None)[f"diversity/{name}"]
    assert float(fed(METRICS[name](per_input), BATCHES).compute()) == pytest.approx(expected)


def test_metric_takes_padded_tensors():
    batch = torch.tensor([[0, 1, 2, 3], [0, 0, 4, 5]])  # left padded
    metric = DistinctN(2)
    metric.update(batch, mask=batch != 0)
    assert float(metric.compute()) == distinct_n([[1, 2, 3], [4, 5]], 2)


def test_metric_refuses_the_wrong_grouping():
    with pytest.raises(ValueError, match="group_ids"):
        DistinctN(1, per_input=True).update([[1]])
    with pytest.raises(ValueError, match="per_input=True"):
        DistinctN(1).update([[1]], group_ids=[0])


@pytest.mark.parametrize("per_input", [False, True], ids=["across", "per_input"])
def test_metric_without_data_computes_zero(per_input):
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(SelfBLEU(per_input=per_input).compute()) == 0.0


# -- distributed state ---------------------------------------------------------------------------------------------
def simulate_ddp_compute(metrics: list[DiversityMetric]) -> list[float]:
    """``compute()`` of each metric as on its own process of a world of len(metrics), through torchmetrics' real
    sync path: the gather function hands back, for each call, the tensor every rank passes to that call (a rank's
    calls are recorded on a copy of it first), and checks that they share a dtype, as all_gather requires."""
    sent = []
    for metric in metrics:
        calls: list[torch.Tensor] = []
        copy.deepcopy(metric)._sync_dist(lambda t, group=None, calls=calls: calls.append(t.clone()) or [t])
        sent.append(calls)

    values = []
    for rank, metric in enumerate(metrics):
        counter = itertools.count()

        def gather(tensor: torch.Tensor, group: object = None, rank: int = rank, counter=counter) -> list:
            i = next(counter)
            assert torch.equal(tensor, sent[rank][i])
            assert all(s[i].dtype == tensor.dtype for s in sent), "ranks would all_gather different dtypes"
            return [s[i] for s in sent]

        metric.dist_sync_fn = gather
        metric.distributed_available_fn = lambda: True
        values.append(float(metric.compute()))
    return values


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # the idle rank computes without an update
@pytest.mark.parametrize("per_input", [False, True], ids=["across", "per_input"])
@pytest.mark.parametrize("name", METRICS)
def test_two_processes_and_an_idle_one_give_the_single_process_value(name, per_input):
    single = float(fed(METRICS[name](per_input), BATCHES).compute())
    ranks = [fed(METRICS[name](per_input), BATCHES[:2]), fed(METRICS[name](per_input), BATCHES[2:])]
    idle = METRICS[name](per_input)  # a rank that got no data still takes part in every gather
    assert simulate_ddp_compute([*ranks, idle]) == pytest.approx([single] * 3)


@pytest.mark.parametrize("name", METRICS)
def test_merge_state_gives_the_single_process_value(name):
    single = float(fed(METRICS[name](False), BATCHES).compute())
    merged = fed(METRICS[name](False), BATCHES[:1])
    merged.merge_state(fed(METRICS[name](False), BATCHES[1:]))
    assert float(merged.compute()) == pytest.approx(single)


def test_duplicate_rate_counts_only_repeats_across_prompts():
    prompts = ["a", "a", "b", "c", "d"]
    responses = ["x", "x", "y", "y", "z"]  # "x" twice for one prompt is not a collapse; "y" for b and c is
    assert duplicate_rate(prompts, responses) == pytest.approx(2 / 5)
    assert duplicate_rate(["a", "b"], ["same", "same"]) == 1.0
