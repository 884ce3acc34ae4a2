"""rlhf_lightning/tags.py: the shared metric tags keep their public names, and the ones built from a prefix are the
keys their writers build."""

import ast
from pathlib import Path

import torch

from rlhf_lightning import tags
from rlhf_lightning.metrics import diversity_metrics

TAGS = {name: value for name, value in vars(tags).items() if name.isupper()}


def test_every_tag_is_a_distinct_literal_with_a_comment():
    source = Path(tags.__file__).read_text()
    lines = source.splitlines()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign):
            assert isinstance(node.value, ast.Constant), node.targets[0].id
            assert "  # " in lines[node.lineno - 1], f"{node.targets[0].id} has no comment"
    assert len(set(TAGS.values())) == len(TAGS)


def test_prefixed_tags_are_the_keys_their_writers_build():
    seqs = [[1, 2, 3, 4], [1, 2, 5, 6], [3, 4, 5, 6], [1, 1, 2, 2]]
    across = diversity_metrics(seqs, 8)
    assert {tags.DISTINCT_2, tags.SELF_BLEU, tags.EAD} <= set(across)
    per_input = diversity_metrics(seqs, 8, torch.tensor([0, 0, 1, 1]), prefix="x")
    # modules/ppo_eval.py: per_input_diversity keys {prefix}_{score}
    for prefix, distinct, bleu in (
        (tags.PER_INPUT, tags.PER_INPUT_DISTINCT_2, tags.PER_INPUT_SELF_BLEU),
        (tags.EVAL_SFT_PER_INPUT, tags.EVAL_SFT_PER_INPUT_DISTINCT_2, tags.EVAL_SFT_PER_INPUT_SELF_BLEU),
    ):
        keys = {f"{prefix}_{name[2:]}" for name in per_input}
        assert {distinct, bleu} <= keys
