"""Writes the review world as ordinary JSONL files, in the schemas real data uses, so the real-data path is the one
that runs:

    sft_{train,val,test}.jsonl      {"prompt": str, "response": str}
    prefs_{train,val,test}.jsonl    {"prompt": str, "chosen": str, "rejected": str}
    prompts_{train,val,test}.jsonl  {"prompt": str}
    world.json                      the config, the seed, the line counts and reference figures (see write_world)

The distinct prompts (:func:`grammar.all_prompts`) are split between train, val and test, so no test or val prompt is
ever trained on; each split's demonstrations and pairs use only its own prompts. Everything is a function of the seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from rlhf_lightning.io import atomic_open, write_jsonl
from rlhf_lightning.world.annotators import AnnotatorConfig, Annotators
from rlhf_lightning.world.grammar import WORDS, all_prompts, demo_response, ideal_response, pair_responses
from rlhf_lightning.world.judge import GoldJudge, JudgeConfig

SPLITS = ("train", "val", "test")
#: Bumped when the language, the judge or the files change meaning, so stale worlds can be told apart.
WORLD_VERSION = 1
META_FILE = "world.json"


@dataclass
class WorldConfig:
    """What :func:`write_world` writes. Defaults are sized for a CPU laptop.

    Args:
        seed: the seed of every random draw.
        n_sft: SFT demonstrations over all splits.
        n_pairs: preference pairs over all splits.
        split_fractions: (train, val, test) shares of the distinct prompts and of the demonstrations and pairs.
        annotators: the simulated annotators that label the pairs.
        judge: the gold judge (its config is stored in world.json for the training code to rebuild it).
    """

    seed: int = 0
    n_sft: int = 4000
    n_pairs: int = 6000
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    annotators: AnnotatorConfig = field(default_factory=AnnotatorConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        if len(self.split_fractions) != len(SPLITS) or min(self.split_fractions) <= 0:
            raise ValueError(f"WorldConfig.split_fractions must be 3 positive shares, got {self.split_fractions}")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6:
            raise ValueError(f"WorldConfig.split_fractions must sum to 1, got {self.split_fractions}")
        if min(split_sizes(len(all_prompts()), self.split_fractions)) < 1:
            raise ValueError(f"WorldConfig.split_fractions {self.split_fractions} leave a split without prompts")
        if self.n_sft < 0 or self.n_pairs < 0:
            raise ValueError(f"WorldConfig.n_sft and n_pairs must be >= 0, got {self.n_sft} and {self.n_pairs}")


def split_sizes(total: int, fractions: tuple[float, ...]) -> list[int]:
    """total split by fractions: the later splits rounded, the first (train) takes the remainder."""
    rest = [round(total * f) for f in fractions[1:]]
    return [total - sum(rest), *rest]


def _json_number(x: float) -> float | None:
    """x as a JSON number; None (null) for NaN, which JSON lacks: a statistic of no pairs, or of only tied ones."""
    return None if math.isnan(x) else float(x)


def write_world(out_dir: str | Path, config: WorldConfig | None = None) -> dict:
    """Writes the world's files into out_dir (created if needed) and returns the contents of world.json:

        version, seed, config (asdict of the WorldConfig), n_words (len(WORDS)), files (lines per file),
        sft_gold_mean (mean gold score of all demonstrations, as ended responses),
        ideal_gold_mean (mean gold score of grammar.ideal_response over the test prompts: what RLHF can reach),
        annotators: per split, bayes_accuracy, gold_agreement and favourite_agreement of its pairs' annotators
            (see :class:`Annotators`; null for a split without pairs).

    world.json is written last, so its presence means the world is complete.
    """
    config = config or WorldConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # An older world's world.json would vouch for files half replaced by this one until it is rewritten.
    (out / META_FILE).unlink(missing_ok=True)
    # One independent stream per purpose: changing one count does not reshuffle the other files.
    names = ["split", *(f"{kind}_{s}" for s in SPLITS for kind in ("sft", "prefs", "labels"))]
    seeds = np.random.SeedSequence(config.seed).spawn(len(names))
    rng = {name: np.random.default_rng(seed) for name, seed in zip(names, seeds, strict=True)}
    judge = GoldJudge(config.judge)
    annotators = Annotators(config.annotators, judge)

    distinct = all_prompts()
    pool = [distinct[i] for i in rng["split"].permutation(len(distinct))]
    prompt_sizes = split_sizes(len(pool), config.split_fractions)
    bounds = np.cumsum([0, *prompt_sizes])
    split_prompts = {s: pool[lo:hi] for s, lo, hi in zip(SPLITS, bounds[:-1], bounds[1:], strict=True)}

    files: dict[str, list[dict[str, str]]] = {}
    sft_prompts, sft_responses = [], []
    annotator_stats = {}
    for split, n_sft, n_pairs in zip(
        SPLITS,
        split_sizes(config.n_sft, config.split_fractions),
        split_sizes(config.n_pairs, config.split_fractions),
        strict=True,
    ):
        prompts = split_prompts[split]
        files[f"prompts_{split}.jsonl"] = [{"prompt": p} for p in prompts]

        r = rng[f"sft_{split}"]
        demos = [(p, demo_response(p, r)) for p in (prompts[i] for i in r.integers(len(prompts), size=n_sft))]
        files[f"sft_{split}.jsonl"] = [{"prompt": p, "response": d} for p, d in demos]
        sft_prompts += [p for p, _ in demos]
        sft_responses += [d for _, d in demos]

        r = rng[f"prefs_{split}"]
        pair_prompts = [prompts[i] for i in r.integers(len(prompts), size=n_pairs)]
        a, b = zip(*(pair_responses(p, r) for p in pair_prompts), strict=True) if n_pairs else ((), ())
        a_preferred, _ = annotators.label(pair_prompts, a, b, rng[f"labels_{split}"])
        files[f"prefs_{split}.jsonl"] = [
            {"prompt": p, "chosen": x if pick else y, "rejected": y if pick else x}
            for p, x, y, pick in zip(pair_prompts, a, b, a_preferred, strict=True)
        ]
        annotator_stats[split] = {
            stat: _json_number(getattr(annotators, stat)(pair_prompts, a, b) if n_pairs else math.nan)
            for stat in ("bayes_accuracy", "gold_agreement", "favourite_agreement")
        }

    for name, records in files.items():
        write_jsonl(out / name, records)
    test_prompts = split_prompts["test"]
    meta = {
        "version": WORLD_VERSION,
        "seed": config.seed,
        "config": asdict(config),
        "n_words": len(WORDS),
        "files": {name: len(records) for name, records in files.items()},
        "sft_gold_mean": _json_number(judge.score(sft_prompts, sft_responses).mean() if sft_responses else math.nan),
        "ideal_gold_mean": float(judge.score(test_prompts, [ideal_response(p) for p in test_prompts]).mean()),
        "annotators": annotator_stats,
    }
    text = json.dumps(meta, indent=2) + "\n"
    with atomic_open(out / META_FILE) as f:
        f.write(text)
    return json.loads(text)  # exactly what a reader of world.json gets (lists for tuples)
