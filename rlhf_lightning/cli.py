"""The ``rlhf`` command.

    rlhf fit -c sft                     # any phase: LightningCLI (omegaconf parser mode), TensorBoard logging
    rlhf fit -c dpo --preset failures/dpo_small_beta   # a preset's part for the config's phase (all + dpo here)
    rlhf world --out runs/world         # write the embedded review world's JSONL files
    rlhf pipeline --out runs/pipeline   # world -> SFT -> reward model -> PPO -> diagnosis (the main job)
    rlhf diagnose runs/ppo [--out DIR]  # findings (evidence, causes, fixes) and plots of one or more runs
    rlhf export CKPT --out DIR          # a checkpoint as a Hugging Face model directory (safetensors + tokenizer)
    rlhf hf-tiny --out DIR              # a tiny local Hugging Face GPT-2 + tokenizer for the embedded world
    rlhf configs [--out DIR]            # the packaged configs and presets, or a copy of them to edit
    rlhf best-of-n --out DIR            # best-of-n from the SFT policy: gold, proxy and KL per n (a baseline)
    rlhf frontier --out DIR [--quick]   # gold vs sqrt(KL) of best-of-n, PPO, GRPO, RLOO, REINFORCE++, DPO, fitted

``fit`` (and validate/test) take the module and data module classes from the config's ``class_path``, so one
command serves every phase. Checkpoints are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import importlib
import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from rlhf_lightning.checkpoint import AtomicCheckpointIO, check_whole, load_checkpoint
from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.errors import EXIT_USER_ERROR, USER_ERRORS, ArgumentParser, UsageError, condense, user_message
from rlhf_lightning.packaged import resolve_config


class RLHFCLI(LightningCLI):
    """LightningCLI whose trainer always saves checkpoints atomically, and which checks that a ``--ckpt_path`` file is
    whole and of the configured module's phase before anything else reads it."""

    def instantiate_trainer(self, **kwargs):
        plugins = kwargs.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins.append(AtomicCheckpointIO())
        kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:  # the parsers raise instead of exiting (exit_on_error=False): one line
            message = condense(str(err))
            # A key of an earlier version (PPO's flat kl_coef, eval_every, ...): say where the setting lives now.
            for old, new in renamed_keys(sys.argv[1:] if args is None else list(args)):
                message += f"; model.init_args.{old} is now model.init_args.{new}"
            raise UsageError(message) from err
        # LightningCLI reads a --ckpt_path file next, with a bare torch.load, and replaces the configured model with
        # the class and hyperparameters saved in it: an SFT checkpoint given to a PPO config would silently turn the
        # run into an SFT run. Check the file whole and of the configured module's phase first.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last"/"best" are resolved by Lightning itself
            return
        from rlhf_lightning.modules.base import PhaseModule  # on use: `rlhf world` need not import the modules

        module_path, _, name = self.config[subcommand]["model"]["class_path"].rpartition(".")
        model_class = getattr(importlib.import_module(module_path), name)
        if not issubclass(model_class, PhaseModule):
            check_whole(ckpt_path)
            return
        saved = load_checkpoint(ckpt_path, phase=model_class.PHASE).get("hyper_parameters", {})
        # LightningCLI then resumes with the checkpoint's model settings, so a model setting changed for the resumed
        # run (say more iterations) would be dropped without a word: name each one that is.
        init_args = self.config[subcommand]["model"].get("init_args")
        asked = vars(init_args) if init_args is not None else {}  # top level only: nested settings are Namespaces
        ignored = [
            f"{key} (config {asked[key]!r}, checkpoint {saved[key]!r})"
            for key in sorted(set(asked) & set(saved))
            if _scalar(asked[key]) and _scalar(saved[key]) and asked[key] != saved[key]
        ]
        if ignored:
            print(
                f"rlhf: resuming from {ckpt_path}: LightningCLI uses the checkpoint's model settings; these differ from"
                f" the config and the config's values are ignored: {', '.join(ignored)}",
                file=sys.stderr,
            )


class _CheckCLI(RLHFCLI):
    """An RLHFCLI that builds the module and the data module of a command line, and no trainer."""

    def instantiate_trainer(self, **kwargs):
        return None


def check_command(words: list[str], tokenizer: Tokenizer | None = None) -> tuple[LightningModule, LightningDataModule]:
    """Parses a ``fit``/``validate``/... command line ``words`` (without the program name) and builds its module and
    data module as the command would, without a trainer and without running anything; raises what the command would
    raise on its configuration. Returns the module and the data module (not set up; holding ``tokenizer`` when one is
    given)."""
    if not words or words[0] not in LIGHTNING_COMMANDS:
        raise ValueError(f"check_command: expected one of {LIGHTNING_COMMANDS} first, got {words[:1]}")
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # "Seed set to 0": the command itself will say it when it runs
    try:
        cli = _CheckCLI(subclass_mode_model=True, subclass_mode_data=True, parser_kwargs=PARSER_KWARGS,
                        args=words[1:], run=False)  # fmt: skip
    finally:
        seed_log.setLevel(level)
    if tokenizer is not None:
        cli.datamodule.tokenizer = tokenizer
    return cli.model, cli.datamodule


def renamed_keys(argv: list[str]) -> list[tuple[str, str]]:
    """(old, new) for every model key of ``argv`` (``--model.init_args.KEY`` arguments and the ``model.init_args`` of
    its ``-c`` files) that a phase module lists in its ``RENAMED``."""
    from rlhf_lightning.modules import PPOModule  # on use: only a failed parse pays for the import

    keys = []
    for i, word in enumerate(argv):
        if word.startswith("--model.init_args."):
            keys.append(word.removeprefix("--model.init_args.").split("=")[0].split(".")[0])
        elif word in ("-c", "--config") and i + 1 < len(argv) and Path(argv[i + 1]).is_file():
            config = yaml.safe_load(Path(argv[i + 1]).read_text(encoding="utf-8"))
            init_args = ((config or {}).get("model") or {}).get("init_args") or {}
            keys.extend(init_args if isinstance(init_args, dict) else [])
    return [(key, PPOModule.RENAMED[key]) for key in dict.fromkeys(keys) if key in PPOModule.RENAMED]


def _scalar(value: object) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def world_main(argv: list[str]) -> None:
    """``rlhf world``: writes the embedded review world's files and prints its summary."""
    from rlhf_lightning.world import WorldConfig, write_world

    parser = ArgumentParser(prog="rlhf world", description="Write the embedded review world's JSONL files.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_world(args.out, WorldConfig(seed=args.seed))
    print(json.dumps(summary, indent=2, default=str))


class Command(NamedTuple):
    help: str  # one line, for `rlhf --help`
    target: str | None  # "module:function(argv)"; None: LightningCLI's own subcommand


#: Every command of ``rlhf``, in the order ``rlhf --help`` lists them.
SUBCOMMANDS = {
    "fit": Command("train a phase: rlhf fit -c sft (a config file or a packaged name; LightningCLI)", None),
    "validate": Command("evaluate a checkpoint on the validation data (LightningCLI)", None),
    "test": Command("evaluate a checkpoint on the test data (LightningCLI)", None),
    "predict": Command("run a checkpoint's predictions (LightningCLI)", None),
    "world": Command("write the embedded review world's JSONL files", "rlhf_lightning.cli:world_main"),
    "pipeline": Command("world -> SFT -> reward model -> PPO -> diagnosis under one run directory",
                        "rlhf_lightning.pipeline:pipeline_main"),
    "diagnose": Command("findings (evidence, causes, fixes) and plots of one or more runs",
                        "rlhf_lightning.diagnose.report:main"),
    "evaluate-detectors": Command("precision, recall and lead time of the gold-free warnings, judged by gold",
                                  "rlhf_lightning.diagnose.evaluation:main"),
    "export": Command("a checkpoint as a Hugging Face model directory", "rlhf_lightning.export:export_main"),
    "hf-tiny": Command("a tiny local Hugging Face GPT-2 + tokenizer for the embedded world",
                       "rlhf_lightning.hf_tiny:hf_tiny_main"),
    "best-of-n": Command("best-of-n sampling from the SFT policy: gold and proxy reward and KL per n",
                         "rlhf_lightning.best_of_n:best_of_n_main"),
    "frontier": Command("gold and proxy reward against sqrt(KL to SFT) per method, fitted (Gao et al. 2022)",
                        "rlhf_lightning.frontier:frontier_main"),
    "configs": Command("list the packaged configs and presets, or copy them for editing (--out DIR)",
                       "rlhf_lightning.packaged:configs_main"),
}  # fmt: skip

#: LightningCLI's own commands.
LIGHTNING_COMMANDS = tuple(name for name, command in SUBCOMMANDS.items() if command.target is None)

#: LightningCLI's parser settings. exit_on_error off (on the main parser and each command's): a config mistake
#: raises, and main() reports it in one line instead of jsonargparse's usage text and tree of Union alternatives.
PARSER_KWARGS = {
    "parser_mode": "omegaconf",
    "exit_on_error": False,
    **{command: {"exit_on_error": False} for command in LIGHTNING_COMMANDS},
}


def usage() -> str:
    """``rlhf --help``: every command in one line each."""
    width = max(map(len, SUBCOMMANDS))
    lines = [f"  {name:<{width}}  {command.help}" for name, command in SUBCOMMANDS.items()]
    return "\n".join(["usage: rlhf <command> [options]", "", "commands:", *lines, "",
                      "`rlhf <command> --help` shows a command's options."])  # fmt: skip


def with_packaged_configs(words: list[str]) -> list[str]:
    """``words`` with each ``-c``/``--config`` value that is no file replaced by the packaged config of that name."""
    out = list(words)
    for i, word in enumerate(out):
        if word in ("-c", "--config") and i + 1 < len(out):
            out[i + 1] = str(resolve_config(out[i + 1], word))
        elif word.startswith("--config="):
            out[i] = "--config=" + str(resolve_config(word.removeprefix("--config="), "--config"))
    return out


#: A phase module's ``PHASE`` -> the part of a preset it reads (the pipeline's phase names).
PRESET_PART_OF = {"reward": "rm"}


def config_phase(words: list[str]) -> str:
    """The phase (``PHASE`` of the module class) of the command line ``words``: the model ``class_path`` of the last
    ``-c`` file that names one, or of a ``--model`` / ``--model.class_path`` argument after it."""
    from rlhf_lightning.modules.base import PhaseModule  # on use: only --preset pays for the import

    class_path = None
    for i, word in enumerate(words):
        if word in ("-c", "--config") and i + 1 < len(words):
            config = yaml.safe_load(Path(words[i + 1]).read_text(encoding="utf-8")) or {}
            model = config.get("model") if isinstance(config, dict) else None
            if isinstance(model, dict) and model.get("class_path"):
                class_path = model["class_path"]
        elif word.startswith(("--model=", "--model.class_path=")):
            class_path = word.split("=", 1)[1]
    if class_path is None:
        raise ValueError("--preset: no config names the model's class_path (give the phase's config first: -c dpo)")
    module_path, _, name = class_path.rpartition(".")
    model_class = getattr(importlib.import_module(module_path), name, None) if module_path else None
    if not (isinstance(model_class, type) and issubclass(model_class, PhaseModule)):
        raise ValueError(f"--preset: the model {class_path} is not one of the phase modules")
    return model_class.PHASE


def with_presets(words: list[str], folder: Path) -> list[str]:
    """``words`` with the ``--preset NAME`` arguments (a file or a packaged name, e.g. ``failures/dpo_small_beta``;
    repeatable, later wins, as in ``rlhf pipeline``) taken out and replaced by one ``-c FILE`` right after the last
    config file: the presets' ``all`` part merged with the part of the phase the configured module belongs to
    (``dpo``, ``ppo``, ``sft``, ``rm``), written into ``folder``. Overrides on the command line still win over it."""
    from rlhf_lightning.pipeline import combine_presets, load_preset, preset_part  # on use: fit imports no pipeline

    rest, names = [], []
    i = 0
    while i < len(words):
        if words[i] == "--preset":
            if i + 1 >= len(words):
                raise ValueError("--preset: expected a preset file or a packaged name (failures/dpo_small_beta)")
            names.append(words[i + 1])
            i += 2
            continue
        if words[i].startswith("--preset="):
            names.append(words[i].removeprefix("--preset="))
        else:
            rest.append(words[i])
        i += 1
    if not names:
        return rest
    phase = config_phase(rest)
    key = PRESET_PART_OF.get(phase, phase)
    presets = [load_preset(resolve_config(name, "--preset")) for name in names]
    part = preset_part(combine_presets(presets), key)
    if not part:
        raise ValueError(f"--preset {' '.join(names)}: nothing for the {key} phase (a preset sets its parts all, "
                         "sft, rm, ppo, dpo)")  # fmt: skip
    path = folder / f"preset_{key}.yaml"
    path.write_text(yaml.safe_dump(part, sort_keys=False), encoding="utf-8")
    last = max((j for j, word in enumerate(rest) if word in ("-c", "--config") or word.startswith("--config=")),
               default=-1)  # fmt: skip
    at = last + (2 if last >= 0 and rest[last] in ("-c", "--config") else 1)
    return [*rest[:at], "-c", str(path), *rest[at:]]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rlhf``; ``argv`` (without the program name) defaults to the command line.

    A user error (:data:`~rlhf_lightning.errors.USER_ERRORS`) ends the command with one line on stderr,
    ``rlhf: error: <message>``, and exit status 2; ``--debug`` (anywhere in ``argv``) lets it through with its
    traceback instead.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in words
    words = [word for word in words if word != "--debug"]
    try:
        run_command(words)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"rlhf: error: {user_message(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def run_command(words: list[str]) -> None:
    """Runs one ``rlhf`` command line ``words`` (without the program name): the usage, one of :data:`SUBCOMMANDS`,
    or LightningCLI's."""
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return
    target = SUBCOMMANDS[words[0]].target if words[0] in SUBCOMMANDS else None
    if target is not None:
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(words[1:])  # imported on use: each pulls in its own stack
        return
    with warnings.catch_warnings(), tempfile.TemporaryDirectory(prefix="rlhf_preset_") as folder:
        # The arguments are given explicitly (their config names resolved, presets as configs, --debug removed),
        # whatever sys.argv holds; LightningCLI would warn that both were given. The preset's partial config is read
        # while the arguments are parsed; the run's saved config.yaml records the merged result.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        RLHFCLI(
            subclass_mode_model=True,
            subclass_mode_data=True,
            parser_kwargs=PARSER_KWARGS,
            save_config_kwargs={"overwrite": True},
            args=with_presets(with_packaged_configs(words), Path(folder)),
        )


if __name__ == "__main__":
    main()
