"""``rlhf pipeline``: the whole recipe under one run directory — world data, SFT, reward model, PPO, diagnosis.

    rlhf pipeline --out runs/pipeline                                # the embedded default task
    rlhf pipeline --out runs/no_kl --preset configs/failures/no_kl.yaml \
        --sft-checkpoint runs/pipeline/runs/sft/checkpoints/last.ckpt    # a failure preset, reusing an SFT run

Each phase is an ordinary ``rlhf fit -c configs/<phase>.yaml`` run, started with the run directory as the working
directory, so the configs' relative paths (``runs/world``, ``runs/sft/checkpoints/last.ckpt``, ...) land inside it:
``OUT/runs/{world,sft,rm,ppo}``, then ``OUT/diagnose/`` (report and plots) and ``OUT/summary.json``. The RL phase
logs to ``OUT/runs/ppo`` whichever RL config it runs (``--ppo-config grpo``, ``rloo``, ``reinforce_pp``: their own
folders are ``runs/<method>``), so the summary, the diagnosis and a seed study read every method alike.

``--hf-model DIR`` (and ``--hf-tokenizer DIR``, default the model's directory) runs every phase on a local Hugging
Face causal LM and its tokenizer: the configs become ``configs/hf/<phase>.yaml`` and the SFT phase gets the two paths
(the later phases read the model from the SFT checkpoint and the tokenizer from beside it).

Any phase can be replaced: ``--sft-checkpoint`` / ``--rm-checkpoint`` skip a phase and use that checkpoint;
``--data-dir`` points every phase at a user's own JSONL folder (no world is generated there); ``--sft-config`` etc.
swap a phase's config; ``--sft-args`` etc. append command-line overrides (e.g. ``"--trainer.max_steps=100"``).

A preset (``--preset FILE`` or a packaged name: ``failures/no_kl``, ``fixes/adaptive_kl``; ``rlhf configs`` lists
them) is a YAML file with a description and partial configs per phase: ``all`` (merged into every phase, e.g. the
world's annotator knobs), ``sft``, ``rm``, ``ppo``.

``--seed S`` sets every seed of the recipe from S (see :func:`seed_args`; without it the configs' seeds are used,
which are those of ``--seed 0``), except the world's when a checkpoint is reused: that stays the checkpoint's.
``--seeds 0,1,2`` runs the recipe once per seed, with the same flags otherwise, into ``OUT/seed_S/`` (each an
ordinary run directory), then writes each figure's per-seed values, mean, range and 95% confidence interval to
``OUT/summary.json`` and ``OUT/summary.md``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from rlhf_lightning import tags
from rlhf_lightning.diagnose.detectors import NO_GOLD
from rlhf_lightning.diagnose.events import read_scalars
from rlhf_lightning.errors import USER_ERRORS, ArgumentParser, UsageError, user_message
from rlhf_lightning.io import atomic_open
from rlhf_lightning.packaged import packaged_config, resolve_config
from rlhf_lightning.stats import seed_stats

PHASES = ("sft", "rm", "ppo")
#: Where the RL phase logs and checkpoints inside a run directory, whichever RL config it runs (``--ppo-config grpo``
#: included, whose own folder is runs/grpo): the summary, the diagnosis and the seed studies read it there.
RL_RUN = "runs/ppo"
#: The parts of a preset: ``all`` (merged into every phase) and one per phase. ``dpo`` is for ``rlhf fit -c dpo
#: --preset NAME`` (the pipeline has no DPO phase; a preset that changes only DPO is refused there).
PRESET_PHASES = (*PHASES, "dpo")
PRESET_KEYS = {"description", "symptom", "diagnose", "fix", "removes", "all", *PRESET_PHASES}


@contextmanager
def _phase_context(path: Path) -> Iterator[None]:
    """Runs the phases inside the run directory, with the command line hidden from LightningCLI (each phase gets
    its arguments explicitly; the pipeline's own flags are not for it)."""
    before, argv = Path.cwd(), sys.argv
    os.chdir(path)
    sys.argv = argv[:1]
    try:
        yield
    finally:
        os.chdir(before)
        sys.argv = argv


def _merge(base: dict, extra: dict) -> dict:
    """base updated by extra, nested dicts merged key by key (extra wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_preset(path: Path) -> dict[str, Any]:
    """A preset file, checked: a mapping with only the known keys, each phase part a mapping."""
    try:
        preset = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"preset {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ValueError(f"preset {path}: not valid YAML: {err}") from None
    if not isinstance(preset, dict):
        raise ValueError(f"preset {path}: expected a mapping at the top level")
    unknown = set(preset) - PRESET_KEYS
    if unknown:
        raise ValueError(f"preset {path}: unknown keys {sorted(unknown)}; allowed: {sorted(PRESET_KEYS)}")
    for key in ("all", *PRESET_PHASES):
        if not isinstance(preset.get(key, {}), dict):
            raise ValueError(f"preset {path}: '{key}' must be a mapping of config entries")
    return preset


def combine_presets(presets: list[dict[str, Any]]) -> dict[str, Any]:
    """Several presets as one (a failure and its fix): the phase parts merged in order, later entries winning."""
    combined: dict[str, Any] = {}
    for preset in presets:
        for key in ("all", *PRESET_PHASES):
            combined[key] = _merge(combined.get(key, {}), preset.get(key, {}))
    return combined


def preset_part(preset: dict[str, Any], phase: str) -> dict[str, Any]:
    """The partial config a preset gives ``phase`` (one of :data:`PRESET_PHASES`): its ``all`` part merged with the
    phase's own (the phase's wins)."""
    return _merge(preset.get("all", {}), preset.get(phase, {}))


def phase_configs(preset: dict[str, Any] | None, out: Path) -> dict[str, list[str]]:
    """Per phase, the ``-c FILE`` arguments a preset adds (its partial configs, written under OUT/preset/)."""
    if not preset:
        return {phase: [] for phase in PHASES}
    folder = out / "preset"
    folder.mkdir(parents=True, exist_ok=True)
    args = {}
    for phase in PHASES:
        part = preset_part(preset, phase)
        if not part:
            args[phase] = []
            continue
        path = folder / f"{phase}.yaml"
        with atomic_open(path) as f:
            yaml.safe_dump(part, f, sort_keys=False)
        args[phase] = ["-c", str(path)]
    return args


def seed_args(seed: int | None, world_seed: int | None = None) -> dict[str, list[str]]:
    """Per phase, the ``rlhf fit`` overrides of ``--seed S``; None (no ``--seed``): none, the configs' own seeds.

    S is Lightning's ``seed_everything`` (weight initialisation, data order, dropout) and the world's seed (its
    prompts and their train/val/test split, demonstrations, pairs and labels; ``world_seed`` instead when given) in
    every phase, since each phase checks that the world it reads was written with its world config; S is the reward
    model's ``seed`` (heads, bootstrap weights, normalisation samples, policy pairs) and PPO's (prompts, sampling
    noise, minibatch order, LoRA adapters); the evaluation seeds of SFT and PPO become their defaults plus S. S = 0
    gives the values of today's configs and defaults: ``--seed 0`` runs exactly what no ``--seed`` runs.
    """
    if seed is None:
        return {phase: [] for phase in PHASES}
    from rlhf_lightning.modules import SFTModule
    from rlhf_lightning.modules.ppo_eval import EvalConfig

    sft_eval_seed = inspect.signature(SFTModule).parameters["eval_seed"].default

    world = seed if world_seed is None else world_seed
    every = [f"--seed_everything={seed}", f"--data.init_args.world.seed={world}"]
    return {
        "sft": [*every, f"--model.init_args.eval_seed={sft_eval_seed + seed}"],
        "rm": [*every, f"--model.init_args.seed={seed}"],
        "ppo": [*every, f"--model.init_args.seed={seed}", f"--model.init_args.eval.seed={EvalConfig.seed + seed}"],
    }


def checkpoint_world_seed(path: Path) -> int | None:
    """The seed of the generated world a phase checkpoint was trained on (its data module's hyperparameters); None
    when it was trained on other data. Memory-mapped: the weights are not read."""
    import torch

    from rlhf_lightning.world import WorldConfig

    data = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("datamodule_hyper_parameters")
    if not data or not data.get("generate_world", True):
        return None
    world = data.get("world")
    if world is None:
        return WorldConfig().seed
    return int(world["seed"] if isinstance(world, dict) else world.seed)


def summarize(out: Path) -> dict[str, Any]:
    """The figures of the run: the last evaluation of the PPO policy against the SFT policy, and the best held-out
    gold reward along the run (at the iteration, TensorBoard's step, of its first occurrence) with final / best,
    which is how much of its peak the run kept (None unless the best is positive: a ratio of rewards of either sign
    means nothing); and the reward model's last held-out accuracy beside its bag-of-words baseline's and the Bayes
    accuracy (None when the run reused a reward model)."""
    logged = read_scalars(out / RL_RUN)
    rm_dir = out / "runs" / "rm"
    rm_logged = read_scalars(rm_dir) if rm_dir.is_dir() else {}

    def last(tag: str, scalars: dict[str, dict[int, float]] = logged) -> float | None:
        series = scalars.get(tag)
        return series[max(series)] if series else None

    gold = logged.get(tags.EVAL_GOLD_REWARD) or {}
    best_step = max(gold, key=lambda step: (gold[step], -step)) if gold else None
    best = gold[best_step] if best_step is not None else None
    final = last(tags.EVAL_GOLD_REWARD)
    return {
        "gold_reward_sft": last(tags.EVAL_SFT_GOLD_REWARD),
        "gold_reward_ppo": final,
        "best_gold_reward_ppo": best,
        "best_gold_iteration": best_step,
        "final_over_best_gold": final / best if final is not None and best is not None and best > 0 else None,
        "win_rate_vs_sft": last(tags.EVAL_WIN_RATE),
        "proxy_reward_sft": last(tags.EVAL_SFT_PROXY_REWARD),
        "proxy_reward_ppo": last(tags.EVAL_PROXY_REWARD),
        "kl": last(tags.KL),
        "kl_coef": last(tags.KL_COEF),
        "distinct_2": last(tags.DISTINCT_2),
        "per_input_distinct_2_ppo": last(tags.PER_INPUT_DISTINCT_2),
        "per_input_distinct_2_sft": last(tags.EVAL_SFT_PER_INPUT_DISTINCT_2),
        "rm_accuracy": last(tags.RM_ACCURACY, rm_logged),
        "rm_baseline_accuracy": last(tags.RM_BASELINE_ACCURACY, rm_logged),
        "rm_bayes_accuracy": last(tags.RM_BAYES_ACCURACY, rm_logged),
        "iterations": (max(logged[tags.KL]) + 1) if logged.get(tags.KL) else 0,
    }


#: The figures a seed study reports (keys of :func:`summarize`), with their labels, in the table's order.
SEED_FIGURES = {
    "gold_reward_sft": "gold reward, SFT",
    "gold_reward_ppo": "gold reward, PPO (final)",
    "best_gold_reward_ppo": "gold reward, PPO (best along the run)",
    "final_over_best_gold": "gold final / best",
    "win_rate_vs_sft": "win rate vs SFT",
    "kl": "KL to SFT",
    "per_input_distinct_2_sft": "per-input distinct-2, SFT",
    "per_input_distinct_2_ppo": "per-input distinct-2, PPO",
    "proxy_reward_sft": "proxy reward, SFT",
    "proxy_reward_ppo": "proxy reward, PPO",
    "rm_accuracy": "reward model held-out accuracy",
    "rm_baseline_accuracy": "bag-of-words baseline held-out accuracy",
    "rm_bayes_accuracy": "Bayes accuracy (annotators' ceiling)",
}


def summarize_seeds(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A seed study from its runs' summaries (by seed): per figure, the values in seed order and their statistics."""
    seeds = list(runs)
    figures = {}
    for key, label in SEED_FIGURES.items():
        values = [runs[seed][key] for seed in seeds]
        figures[key] = {"label": label, "values": values, **seed_stats(values)}
    return {"seeds": seeds, "run_dirs": [runs[seed]["run_dir"] for seed in seeds], "figures": figures}


def seeds_table(study: dict[str, Any]) -> str:
    """The study as a Markdown table: a row per figure, the per-seed values, mean, 95% CI of the mean, min, max ("-"
    where a run has no value); a figure no run has (gold without a gold judge) is named below the table instead."""

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = ["figure", *(f"seed {seed}" for seed in study["seeds"]), "mean", "95% CI", "min", "max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    unmeasured = [f["label"] for f in study["figures"].values() if f["n"] == 0]
    for f in study["figures"].values():
        if f["n"] == 0:
            continue
        ci = "-" if f["ci95"] is None else f"[{fmt(f['ci95'][0])}, {fmt(f['ci95'][1])}]"
        row = [f["label"], *map(fmt, f["values"]), fmt(f["mean"]), ci, fmt(f["min"]), fmt(f["max"])]
        lines.append("| " + " | ".join(row) + " |")
    if unmeasured:
        lines += ["", f"No value in any run: {'; '.join(unmeasured)}."]
    return "\n".join(lines) + "\n"


def _seed(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if seed < 0:
        raise argparse.ArgumentTypeError(f"a seed is >= 0, got {seed}")
    return seed


def _seeds(text: str) -> list[int]:
    seeds = [_seed(part.strip()) for part in text.split(",")]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds


def join_option_values(argv: list[str], options: set[str]) -> list[str]:
    """``argv`` with each of ``options`` and the word after it joined into one ``OPTION=VALUE``: argparse would read a
    value such as ``"--x=1"`` of ``--ppo-args --x=1`` as an option of its own."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in options and i + 1 < len(argv):
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            joined.append(argv[i])
            i += 1
    return joined


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``rlhf pipeline``'s arguments (``argv`` without the program name), checked, their paths absolute."""
    parser = ArgumentParser(prog="rlhf pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/pipeline"), help="run directory")
    parser.add_argument(
        "--preset",
        action="append",
        default=[],
        help="a preset YAML, or a packaged one's name (failures/no_kl, fixes/adaptive_kl; `rlhf configs` lists "
        "them); repeatable, later wins",
    )
    parser.add_argument("--data-dir", type=Path, help="a folder of the user's own JSONL files (no world is written)")
    parser.add_argument("--sft-checkpoint", type=Path, help="skip SFT: start from this SFT checkpoint")
    parser.add_argument("--rm-checkpoint", type=Path, help="skip the reward model: use this checkpoint")
    parser.add_argument("--no-diagnose", action="store_true", help="skip the diagnosis at the end")
    parser.add_argument("--hf-model", type=Path, help="a local Hugging Face causal-LM directory (configs/hf/)")
    parser.add_argument("--hf-tokenizer", type=Path, help="its tokenizer directory (default: --hf-model)")
    seeding = parser.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=_seed, help="every seed of the recipe from this one (default: the configs')")
    seeding.add_argument("--seeds", type=_seeds, help="comma-separated seeds: one run per seed in OUT/seed_S/, then "
                         "OUT/summary.{json,md} with each figure's mean and 95%% confidence interval")  # fmt: skip
    for phase in PHASES:
        parser.add_argument(f"--{phase}-config", help=f"a config file or a packaged name (default {phase}, hf/{phase})")
        parser.add_argument(f"--{phase}-args", default="", help=f"extra `rlhf fit` arguments of the {phase} phase")
    args = parser.parse_args(join_option_values(argv, {f"--{phase}-args" for phase in PHASES}))
    if args.hf_model is not None and not (args.hf_model / "config.json").is_file():
        parser.error(f"--hf-model {args.hf_model} is not a Hugging Face model directory (no config.json)")
    args.hf_tokenizer = args.hf_tokenizer or args.hf_model
    if args.hf_tokenizer is not None and not (args.hf_tokenizer / "tokenizer.json").is_file():
        parser.error(f"--hf-tokenizer {args.hf_tokenizer} is not a tokenizer directory (no tokenizer.json)")
    given, args.preset = args.preset, [resolve_config(preset, "--preset") for preset in args.preset]
    for name, path in zip(given, args.preset, strict=True):
        if not any(preset_part(load_preset(path), phase) for phase in PHASES):
            parser.error(f"--preset {name}: changes none of the pipeline's phases ({', '.join(PHASES)}); a DPO "
                         f"preset runs with `rlhf fit -c dpo --preset {name}`")  # fmt: skip
    for phase in PHASES:
        # The default is always the packaged config, whatever files the working directory holds.
        chosen = getattr(args, f"{phase}_config")
        config = resolve_config(chosen, f"--{phase}-config") if chosen else packaged_config(
            f"hf/{phase}" if args.hf_model else phase)  # fmt: skip
        setattr(args, f"{phase}_config", config)
    for name in ("sft_checkpoint", "rm_checkpoint"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name.replace('_', '-')} {path} does not exist")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file; the run directory must be a folder (or not exist yet)")
    # Absolute from here on: the phases (and the check before them) run in other working directories.
    for name, value in vars(args).items():
        if isinstance(value, Path):
            setattr(args, name, value.resolve())
    args.preset = [path.resolve() for path in args.preset]
    return args


def pipeline_main(argv: list[str]) -> dict[str, Any]:
    """``rlhf pipeline``; returns the summary it prints and writes (of the run, or of the seed study).

    Every phase's config, overrides and data are checked (:func:`check_phases`) before any phase trains, so a
    mistake in the last phase's settings costs seconds, not the first phases' training.
    """
    args = parse_args(argv)
    out = args.out.resolve()
    sized = check_phases(args)
    if args.seeds is None:
        return run_pipeline(args, out, args.seed, sized)
    runs = {seed: run_pipeline(args, out / f"seed_{seed}", seed, sized) for seed in args.seeds}
    study = summarize_seeds(runs)
    table = seeds_table(study)
    with atomic_open(out / "summary.json") as f:
        json.dump(study, f, indent=2)
    with atomic_open(out / "summary.md") as f:
        f.write(f"# rlhf pipeline: {len(runs)} seeds\n\nEach figure over the seeds' runs (OUT/seed_S/summary.json): "
                "mean, 95% confidence interval of the mean (Student t, n - 1 df), range.\n\n" + table)  # fmt: skip
    print(f"\n== rlhf pipeline: {len(runs)} seeds ({out}/summary.md) ==\n{table}", end="")
    return study


def phase_plan(
    args: argparse.Namespace, out: Path, seed: int | None, sized: dict[str, list[str]] | None = None
) -> list[tuple[str, list[str] | None]]:
    """Per phase, in order, its ``rlhf fit`` arguments, run from inside ``out`` (None: skipped, checkpoint given),
    with the overrides ``sized`` of :func:`sized_lengths` (per phase) before the user's own.

    The preset's partial configs are written under ``out/preset/``.
    """
    presets = [load_preset(path) for path in args.preset]
    extra = phase_configs(combine_presets(presets) if presets else None, out)
    # A reused checkpoint keeps the world it was trained on (under any seed): in another world's split, the held-out
    # prompts the policies are evaluated on could be prompts it trained on.
    reused = args.sft_checkpoint or args.rm_checkpoint
    seeding = seed_args(seed, checkpoint_world_seed(reused) if reused and seed is not None else None)
    sft_ckpt = args.sft_checkpoint.resolve() if args.sft_checkpoint else Path("runs/sft/checkpoints/last.ckpt")
    rm_ckpt = args.rm_checkpoint.resolve() if args.rm_checkpoint else Path("runs/rm/checkpoints/last.ckpt")
    data = [f"--data.init_args.data_dir={args.data_dir.resolve()}", "--data.init_args.generate_world=false"] if (
        args.data_dir) else []  # fmt: skip
    # The later phases read text with the SFT policy's tokenizer (saved beside its checkpoint), so a reused SFT
    # checkpoint works with a world whose corpus differs (e.g. fewer preference pairs).
    tokenizer_file = sft_ckpt.parent / "tokenizer.json"
    reuse_tokenizer = args.sft_checkpoint is None or tokenizer_file.is_file()
    tokenizer = [f"--data.init_args.tokenizer_path={tokenizer_file}"] if reuse_tokenizer else []
    hf = [f"--model.init_args.hf_model_path={args.hf_model.resolve()}"] if args.hf_model else []
    hf += [f"--data.init_args.tokenizer_path={args.hf_tokenizer.resolve()}"] if args.hf_tokenizer else []
    # The logger's folder (and with it the checkpoints of a config that gives them no folder of their own).
    rl_run = [f"--trainer.default_root_dir={RL_RUN}", f"--trainer.logger.init_args.save_dir={Path(RL_RUN).parent}",
              f"--trainer.logger.init_args.name={Path(RL_RUN).name}"]  # fmt: skip
    plan = [
        ("sft", args.sft_checkpoint is None, hf),
        ("rm", args.rm_checkpoint is None, [f"--model.init_args.sft_checkpoint={sft_ckpt}", *tokenizer]),
        ("ppo", True, [f"--model.init_args.sft_checkpoint={sft_ckpt}",
                       f"--model.init_args.reward_checkpoint={rm_ckpt}", *tokenizer, *rl_run]),
    ]  # fmt: skip
    commands = []
    for phase, run, phase_args in plan:
        config = str(getattr(args, f"{phase}_config").resolve())
        # The seeds and the sized lengths come before the user's own overrides, which win.
        cmd = ["fit", "-c", config, *extra[phase], *data, *seeding[phase], *(sized or {}).get(phase, []),
               *phase_args, *shlex.split(getattr(args, f"{phase}_args"))]  # fmt: skip
        commands.append((phase, cmd if run else None))
    return commands


def check_phases(args: argparse.Namespace) -> dict[str, list[str]]:
    """Builds every phase that will run — its config with the preset and overrides, its module and data module —
    without training, and with ``--data-dir`` reads and tokenises all of its data; raises the first mistake.
    Returns the per-phase overrides of the length budgets sized to ``--data-dir`` (:func:`sized_lengths`).

    It runs in a temporary folder standing in for the run directory, so a failed check leaves nothing behind. The
    checkpoints the earlier phases will write are empty stand-in files there: a module only checks, when it is
    built, that its checkpoints exist. The phases after SFT read text with the SFT tokenizer, which does not exist
    yet: their data is checked with the tokenizer SFT's data module makes (given, or trained on the same data).
    """
    from rlhf_lightning.cli import check_command

    seed = args.seed if args.seeds is None else args.seeds[0]
    # Its warnings (a file's cuts, ...) are the phases' own, which say them again when they run.
    with tempfile.TemporaryDirectory(prefix="rlhf-check-") as tmp, _phase_context(Path(tmp)), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for stand_in in ("runs/sft/checkpoints/last.ckpt", "runs/rm/checkpoints/last.ckpt"):
            Path(stand_in).parent.mkdir(parents=True)
            Path(stand_in).touch()
        sized: dict[str, list[str]] = {}
        plan = dict(phase_plan(args, Path(tmp), seed))
        # Sized only where a TinyGPT is trained here (its max_seq_len is a setting): a reused SFT checkpoint or a
        # Hugging Face model fixes the positions, and the configs' budgets are checked against the data as they are.
        if args.data_dir is not None and plan["sft"] is not None and args.hf_model is None:
            sized = _phase_errors(  # reads every file of the folder, whichever phase it is for
                "--data-dir", lambda: sized_lengths(*check_command(plan["sft"]), check_command(plan["ppo"])[0])
            )
        tokenizer = None
        for phase, cmd in phase_plan(args, Path(tmp), seed, sized):
            if cmd is None:
                continue

            def check(cmd: list[str] = cmd) -> None:
                nonlocal tokenizer
                _, datamodule = check_command(cmd, tokenizer)
                if args.data_dir is not None:
                    datamodule.prepare_data()
                    datamodule.setup("fit")
                    tokenizer = tokenizer or datamodule.tokenizer

            _phase_errors(phase, check)
    if sized:
        print(f"[pipeline] lengths sized to {args.data_dir}: {' '.join(sized['sft'])}")
    return sized


def _phase_errors(phase: str, check: Callable[[], Any]) -> Any:
    """``check()``, a user error in it reported as the phase's (or as ``--data-dir``'s)."""
    try:
        return check()
    except USER_ERRORS as err:
        where = phase if phase.startswith("--") else f"{phase} phase"
        raise UsageError(f"{where}: {user_message(err)}") from err


#: The longest budgets (tokens) :func:`sized_lengths` gives: longer texts are cut, with a warning, rather than a tiny
#: model on a CPU made to attend over thousands of positions for the sake of 1% of the records.
MAX_SIZED_PROMPT, MAX_SIZED_RESPONSE = 256, 256


def sized_lengths(sft: Any, sft_data: Any, ppo: Any) -> dict[str, list[str]]:
    """Per phase, the overrides that size the length budgets to a user's data (``--data-dir``): every prompt and
    response of every file, tokenised by the SFT data module ``sft_data`` (the SFT module ``sft`` and the PPO module
    ``ppo`` give the configured budgets); a budget is the 99th percentile of its lengths, capped at
    :data:`MAX_SIZED_PROMPT` / :data:`MAX_SIZED_RESPONSE`, and never below the config's. When that cuts some texts,
    ``truncation: warn`` (each file's cuts are then warned about with their counts). Responses sampled during
    training (SFT's evaluation, the reward model's normalisation samples, PPO's rollouts) get the response budget,
    and the TinyGPT's ``max_seq_len`` holds a prompt and a response."""
    from rlhf_lightning.data.collate import fitting_length

    sft_data.tokenizer = sft_data.load_tokenizer()
    prompts, responses = sft_data.text_lengths()
    h = sft_data.hparams
    p = max(min(fitting_length(prompts, 0.99), MAX_SIZED_PROMPT), 1)
    r = max(min(fitting_length(responses, 0.99), MAX_SIZED_RESPONSE), 2)
    p, r = max(p, h.max_prompt_len), max(r, h.max_response_len, ppo.sampling.max_new_tokens)
    data = [f"--data.init_args.max_prompt_len={p}", f"--data.init_args.max_response_len={r}"]
    if max(prompts) > p or max(responses) > r:
        data.append("--data.init_args.truncation=warn")
    return {
        "sft": [*data, f"--model.init_args.backbone.max_seq_len={max(p + r, sft.backbone_config.max_seq_len)}",
                f"--model.init_args.eval_sampling.max_new_tokens={r}"],
        "rm": [*data, f"--model.init_args.norm_sampling.max_new_tokens={r}"],
        "ppo": [*data, f"--model.init_args.sampling.max_new_tokens={r}"],
    }  # fmt: skip


def run_pipeline(
    args: argparse.Namespace, out: Path, seed: int | None, sized: dict[str, list[str]] | None = None
) -> dict[str, Any]:
    """The recipe once, in run directory ``out``, with the seeds of ``seed`` (see :func:`seed_args`) and the sized
    lengths ``sized`` (see :func:`check_phases`).

    When ``out`` did not exist and the run fails before any phase has written a checkpoint, ``out`` is removed:
    a failed start leaves nothing behind.
    """
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run_phases(args, out, seed, sized)
    except BaseException:
        if created and not any(out.glob("runs/*/checkpoints/*.ckpt")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def run_plan(out: Path, plan: list[tuple[str, list[str] | None]]) -> dict[str, float]:
    """Runs the ``rlhf fit`` commands of a :func:`phase_plan` in order inside the run directory ``out``; returns the
    seconds each phase that ran took."""
    from rlhf_lightning.cli import main as rlhf_main

    timings: dict[str, float] = {}
    with _phase_context(out):
        for phase, cmd in plan:
            if cmd is None:
                print(f"[pipeline] {phase}: skipped (checkpoint given)")
                continue
            print(f"[pipeline] {phase}: rlhf {' '.join(cmd)}", flush=True)
            start = time.perf_counter()
            rlhf_main(cmd)
            timings[phase] = time.perf_counter() - start
    return timings


def _run_phases(
    args: argparse.Namespace, out: Path, seed: int | None, sized: dict[str, list[str]] | None
) -> dict[str, Any]:
    from rlhf_lightning.cli import main as rlhf_main

    for path in args.preset:
        print(f"[pipeline] preset {path}: {str(load_preset(path).get('description', '')).strip()}")
    timings = run_plan(out, phase_plan(args, out, seed, sized))
    if not args.no_diagnose:
        with _phase_context(out):
            rlhf_main(["diagnose", RL_RUN, "--out", "diagnose"])
    summary = {**summarize(out), "seed": seed, "seconds": timings, "run_dir": str(out)}
    if not args.no_diagnose:
        summary["report"] = str(out / "diagnose" / "report.md")
    with atomic_open(out / "summary.json") as f:
        json.dump(summary, f, indent=2)
    _print_summary(summary)
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    """The run's figures, a line per group: a figure the run did not measure is left out (summary.json keeps it as
    null), never printed as None; a run evaluated without a gold judge says once what that leaves out."""

    def fmt(x: Any) -> str:
        return f"{x:.3f}" if isinstance(x, float) else str(x)

    def measured(key: str) -> bool:
        return s[key] is not None and not (isinstance(s[key], float) and math.isnan(s[key]))

    def line(label: str, *parts: tuple[str, tuple[str, ...]]) -> None:
        """``label``, then each part (a template and the keys of its figures) whose figures were all measured."""
        shown = [text.format(*(fmt(s[k]) for k in keys)) for text, keys in parts if all(map(measured, keys))]
        if shown:
            print(f"{label:<16} " + "; ".join(shown))

    print("\n== rlhf pipeline summary ==")
    if s["proxy_reward_ppo"] is not None and s["gold_reward_ppo"] is None:  # evaluated, but no judge to ask
        print(f"{NO_GOLD}: gold reward and win rate are not measured")
    line("gold reward", ("SFT {}  ->  PPO {}", ("gold_reward_sft", "gold_reward_ppo")))
    # final / best is left out where it is undefined: a best gold that is not positive (see summarize)
    line("best gold", ("PPO {} at iteration {}", ("best_gold_reward_ppo", "best_gold_iteration")),
         ("final / best {}", ("final_over_best_gold",)))  # fmt: skip
    line("win rate vs SFT", ("{} (gold judge, held-out prompts, ties count half)", ("win_rate_vs_sft",)))
    line("proxy reward", ("SFT {}  ->  PPO {}", ("proxy_reward_sft", "proxy_reward_ppo")))
    line("KL to SFT", ("{} nats per response", ("kl",)), ("beta {}", ("kl_coef",)))
    line("reward model", ("held-out accuracy {}", ("rm_accuracy",)),
         ("bag-of-words baseline {}", ("rm_baseline_accuracy",)), ("Bayes {}", ("rm_bayes_accuracy",)))  # fmt: skip
    line("diversity", ("distinct-2 {}", ("distinct_2",)),
         ("per input {} (SFT) -> {} (PPO)", ("per_input_distinct_2_sft", "per_input_distinct_2_ppo")))  # fmt: skip
    print("time             " + ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items()))
    if "report" in s:
        print(f"diagnosis        {s['report']} (plots beside it)")
    print(f"TensorBoard      tensorboard --logdir {s['run_dir']}/runs")
