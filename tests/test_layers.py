"""Imports point down the layers (docs/ARCHITECTURE.md, "Layers"): no module of the package imports one on a higher
floor, at the top of the file or inside a function. Imports under ``if TYPE_CHECKING:`` are types only and never run,
so they are not counted (the data module names the type of its ``pair_sampling`` setting that way)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_lightning"

#: The floor of each top-level part of the package (and of the kernels): a part may import its own floor and below.
FLOORS = {
    "rlhf_kernels": 0, "io": 0, "stats": 0, "checkpoint": 0, "tags": 0, "errors": 0,  # leaves: no other part
    "packaged": 0,  # the configs shipped in the package
    "world": 1, "metrics": 1, "diagnose": 1,  # the simulated world, pure metrics, reading a run's metrics
    "data": 2,  # files, tokenizer, collation, data modules (on the world)
    "models": 3,  # backbones, heads, the reward model, sampling
    "rl": 4,  # the PPO math
    "modules": 5,  # the phases
    "callbacks": 6, "export": 6, "hf_tiny": 6, "pipeline": 6, "cli": 6, "best_of_n": 6, "frontier": 6,  # commands
}  # fmt: skip


def part_of(module: str) -> str | None:
    """The part of a dotted module name of this package or of the kernels (None for anything else)."""
    names = module.split(".")
    if names[0] == "rlhf_kernels":
        return "rlhf_kernels"
    if names[0] == "rlhf_lightning" and len(names) > 1:
        return names[1]
    return None


def runtime_imports(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import outside ``if TYPE_CHECKING:`` blocks."""
    skipped = {id(node) for stmt in ast.walk(tree) if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(
        stmt.test) for node in ast.walk(stmt)}  # fmt: skip
    out = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out += [(node.lineno, node.module)]
            out += [
                (node.lineno, f"{node.module}.{alias.name}") for alias in node.names if node.module == "rlhf_lightning"
            ]
    return out


def test_every_part_has_a_floor():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").is_file()
    }
    assert parts - {"__init__"} <= set(FLOORS), f"parts without a floor: {sorted(parts - {'__init__'} - set(FLOORS))}"


def test_imports_point_down_the_layers():
    kernels = ROOT / "kernels"
    upward = []
    for path in [*PACKAGE.rglob("*.py"), *(kernels / "rlhf_kernels").rglob("*.py")]:
        own = part_of(
            ".".join(path.relative_to(kernels if path.is_relative_to(kernels) else ROOT).with_suffix("").parts)
        )
        if own is None or own == "__init__":
            continue
        for line, module in runtime_imports(ast.parse(path.read_text(), str(path))):
            target = part_of(module)
            if target in FLOORS and FLOORS[target] > FLOORS[own]:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({own}, floor {FLOORS[own]}) imports {module} "
                              f"({target}, floor {FLOORS[target]})")  # fmt: skip
    assert not upward, "imports pointing up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import():
    tree = ast.parse(
        "from rlhf_lightning.models.sampling import generate\nif TYPE_CHECKING:\n    import rlhf_lightning.cli\n"
    )
    assert runtime_imports(tree) == [(1, "rlhf_lightning.models.sampling")]


def test_phases_share_only_base_and_common():
    """A phase's module never imports another phase's: what two phases share lives in modules/base.py or
    modules/common.py (or lower)."""
    phases = {
        "sft": "sft",
        "reward": "reward",
        "ppo": "ppo",
        "ppo_eval": "ppo",
        "ppo_passes": "ppo",
        "ppo_setup": "ppo",
    }
    crossing = []
    for path in (PACKAGE / "modules").glob("*.py"):
        for line, module in runtime_imports(ast.parse(path.read_text(), str(path))):
            target = module.removeprefix("rlhf_lightning.modules.")
            if path.stem in phases and target in phases and phases[target] != phases[path.stem]:
                crossing.append(f"modules/{path.name}:{line} imports {module}")
    assert not crossing, "\n".join(crossing)
