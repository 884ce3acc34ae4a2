"""The ``rlhf`` command.

    rlhf fit -c sft                     # any phase: LightningCLI (omegaconf parser mode), TensorBoard logging
    rlhf world --out runs/world         # write the embedded review world's JSONL files
    rlhf pipeline --out runs/pipeline   # world -> SFT -> reward model -> PPO -> diagnosis (the main job)
    rlhf diagnose runs/ppo [--out DIR]  # findings (evidence, causes, fixes) and plots of one or more runs
    rlhf export CKPT --out DIR          # a checkpoint as a Hugging Face model directory (safetensors + tokenizer)
    rlhf hf-tiny --out DIR              # a tiny local Hugging Face GPT-2 + tokenizer for the embedded world
    rlhf configs [--out DIR]            # the packaged configs and presets, or a copy of them to edit

``fit`` (and validate/test) take the module and data module classes from the config's ``class_path``, so one
command serves every phase. Checkpoints are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import NamedTuple

import yaml
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from rlhf_lightning.checkpoint import AtomicCheckpointIO, check_whole, load_checkpoint
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
        except SystemExit:
            # A key of an earlier version (PPO's flat kl_coef, eval_every, ...): say where the setting lives now.
            for old, new in renamed_keys(sys.argv[1:] if args is None else list(args)):
                print(f"rlhf: model.init_args.{old} is now model.init_args.{new}", file=sys.stderr)
            raise
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

    parser = argparse.ArgumentParser(prog="rlhf world", description="Write the embedded review world's JSONL files.")
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
    "export": Command("a checkpoint as a Hugging Face model directory", "rlhf_lightning.export:export_main"),
    "hf-tiny": Command("a tiny local Hugging Face GPT-2 + tokenizer for the embedded world",
                       "rlhf_lightning.hf_tiny:hf_tiny_main"),
    "configs": Command("list the packaged configs and presets, or copy them for editing (--out DIR)",
                       "rlhf_lightning.packaged:configs_main"),
}  # fmt: skip


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


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rlhf``; ``argv`` (without the program name) defaults to the command line."""
    words = sys.argv[1:] if argv is None else list(argv)
    if not words or words[0] in ("-h", "--help"):
        print(usage())
        return
    target = SUBCOMMANDS[words[0]].target if words[0] in SUBCOMMANDS else None
    if target is not None:
        module, _, name = target.partition(":")
        getattr(importlib.import_module(module), name)(words[1:])  # imported on use: each pulls in its own stack
        return
    args = with_packaged_configs(words)
    if argv is None:
        # LightningCLI warns when handed arguments beside a command line: give it the resolved command line instead.
        sys.argv[1:] = args
    RLHFCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        args=None if argv is None else args,
    )


if __name__ == "__main__":
    main()
