"""The embedded review world: a procedural language of short product reviews, a gold judge, simulated annotators and
a writer of JSONL datasets, which together make every failure mode of RLHF reproducible on a CPU without downloads.

    from rlhf_lightning.world import WorldConfig, write_world, GoldJudge
    meta = write_world("runs/world", WorldConfig(seed=0))
    GoldJudge().score(["review : phone battery"], ["the phone battery is very good ."])
"""

from rlhf_lightning.world.annotators import AnnotatorConfig, Annotators
from rlhf_lightning.world.grammar import (
    DEMO_STYLE,
    PAIR_STYLE,
    PRODUCT_ASPECTS,
    PRODUCTS,
    WORDS,
    ResponseStyle,
    all_prompts,
    demo_response,
    ideal_response,
    pair_responses,
    parse_prompt,
    sample_prompts,
    sample_response,
)
from rlhf_lightning.world.judge import COMPONENTS, GoldJudge, JudgeConfig
from rlhf_lightning.world.writer import SPLITS, WorldConfig, write_world

__all__ = [
    "COMPONENTS",
    "DEMO_STYLE",
    "PAIR_STYLE",
    "PRODUCTS",
    "PRODUCT_ASPECTS",
    "SPLITS",
    "WORDS",
    "AnnotatorConfig",
    "Annotators",
    "GoldJudge",
    "JudgeConfig",
    "ResponseStyle",
    "WorldConfig",
    "all_prompts",
    "demo_response",
    "ideal_response",
    "pair_responses",
    "parse_prompt",
    "sample_prompts",
    "sample_response",
    "write_world",
]
