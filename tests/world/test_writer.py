"""The world writer: deterministic files in the real-data schemas, disjoint prompt splits, a documented world.json."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from rlhf_lightning.world import SPLITS, WORDS, AnnotatorConfig, GoldJudge, JudgeConfig, WorldConfig, write_world

SMALL = WorldConfig(seed=0, n_sft=150, n_pairs=200)
SCHEMAS = {"sft": ("prompt", "response"), "prefs": ("prompt", "chosen", "rejected"), "prompts": ("prompt",)}
META_KEYS = {"version", "seed", "config", "n_words", "files", "sft_gold_mean", "ideal_gold_mean", "annotators"}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("world")
    return out, write_world(out, SMALL)


def test_same_seed_gives_the_same_bytes_and_another_seed_differs(world, tmp_path):
    out, _ = world
    write_world(tmp_path / "again", SMALL)
    write_world(tmp_path / "other", WorldConfig(seed=1, n_sft=150, n_pairs=200))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "again").iterdir())
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
        if name != "world.json":
            assert (out / name).read_bytes() != (tmp_path / "other" / name).read_bytes(), name


def test_files_have_the_real_data_schemas_and_counts(world):
    out, meta = world
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{k}_{s}.jsonl" for k in SCHEMAS for s in SPLITS), "world.json"]
    )
    for kind, keys in SCHEMAS.items():
        for split in SPLITS:
            name = f"{kind}_{split}.jsonl"
            records = read_jsonl(out / name)
            assert len(records) == meta["files"][name] > 0
            for record in records:
                assert tuple(record) == keys and all(isinstance(v, str) and v for v in record.values())
                assert {w for v in record.values() for w in v.split()} <= set(WORDS)
    assert meta["files"]["sft_train.jsonl"] + meta["files"]["sft_val.jsonl"] + meta["files"]["sft_test.jsonl"] == 150


def test_each_split_uses_its_own_prompts_and_test_prompts_are_never_trained_on(world):
    out, _ = world
    prompts = {s: {r["prompt"] for r in read_jsonl(out / f"prompts_{s}.jsonl")} for s in SPLITS}
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    for split in SPLITS:
        for kind in ("sft", "prefs"):
            assert {r["prompt"] for r in read_jsonl(out / f"{kind}_{split}.jsonl")} <= prompts[split]


def test_world_json_documents_the_world(world):
    out, meta = world
    assert json.loads((out / "world.json").read_text()) == meta
    assert set(meta) == META_KEYS and meta["seed"] == 0
    # The training code rebuilds the judge and the annotators from the stored config.
    assert JudgeConfig(**meta["config"]["judge"]) == SMALL.judge
    assert AnnotatorConfig(**meta["config"]["annotators"]) == SMALL.annotators
    assert meta["config"] == json.loads(json.dumps(asdict(SMALL)))
    demos = [r for s in SPLITS for r in read_jsonl(out / f"sft_{s}.jsonl")]
    gold = GoldJudge().score([r["prompt"] for r in demos], [r["response"] for r in demos])
    assert meta["sft_gold_mean"] == pytest.approx(float(gold.mean()))
    assert meta["sft_gold_mean"] < meta["ideal_gold_mean"] - 2.0  # room for RLHF to improve
    for split in SPLITS:
        stats = meta["annotators"][split]
        assert set(stats) == {"bayes_accuracy", "gold_agreement", "favourite_agreement"}
        assert 0.5 < stats["gold_agreement"] <= stats["bayes_accuracy"] < 1.0
        assert 0.5 < stats["favourite_agreement"] <= 1.0


def test_chosen_responses_are_better_by_gold_on_average(world):
    out, _ = world
    pairs = read_jsonl(out / "prefs_train.jsonl")
    prompts = [r["prompt"] for r in pairs]
    judge = GoldJudge()
    chosen = judge.score(prompts, [r["chosen"] for r in pairs])
    rejected = judge.score(prompts, [r["rejected"] for r in pairs])
    assert chosen.mean() > rejected.mean() + 0.5
    assert 0.6 < np.mean(chosen > rejected) < 0.95  # noisy labels, not the gold order


def test_no_temporary_files_are_left_and_rewriting_replaces_the_world(tmp_path):
    write_world(tmp_path, WorldConfig(seed=0, n_sft=30, n_pairs=30))
    meta = write_world(tmp_path, WorldConfig(seed=2, n_sft=20, n_pairs=0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(read_jsonl(tmp_path / "sft_train.jsonl")) == meta["files"]["sft_train.jsonl"] == 14
    assert read_jsonl(tmp_path / "prefs_train.jsonl") == []
    assert meta["annotators"]["train"] == {"bayes_accuracy": None, "gold_agreement": None, "favourite_agreement": None}
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"split_fractions": (0.5, 0.3, 0.3)}, "sum to 1"),
        ({"split_fractions": (1.0, 0.0, 0.0)}, "positive"),
        ({"split_fractions": (0.998, 0.001, 0.001)}, "without prompts"),
        ({"n_sft": -1}, "n_sft"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**kwargs)
