"""The packaged configs (rlhf_lightning/configs/): names resolved wherever a config is given, `rlhf configs`, and
`rlhf --help` listing every command."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_lightning import pipeline
from rlhf_lightning.cli import SUBCOMMANDS, main, with_packaged_configs
from rlhf_lightning.packaged import copy_configs, packaged_dir, packaged_names, resolve_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "rlhf_lightning" / "configs"


def test_the_checkout_configs_folder_is_the_packaged_one():
    assert (ROOT / "configs").is_symlink() and (ROOT / "configs").resolve() == CONFIGS
    assert packaged_dir().resolve() == CONFIGS
    names = sorted(p.relative_to(CONFIGS).with_suffix("").as_posix() for p in CONFIGS.rglob("*.yaml"))
    assert packaged_names() == names
    assert {"sft", "rm", "ppo", "hf/sft", "failures/no_kl", "fixes/adaptive_kl"} <= set(packaged_names())


@pytest.mark.parametrize(
    ("given", "name"),
    [("sft", "sft"), ("sft.yaml", "sft"), ("hf/sft", "hf/sft"), ("failures/no_kl", "failures/no_kl"),
     ("configs/failures/no_kl.yaml", "failures/no_kl")],
)  # fmt: skip
def test_a_name_resolves_to_the_packaged_config_from_any_folder(tmp_path, monkeypatch, given, name):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(given, "-c") == CONFIGS / f"{name}.yaml"


def test_an_existing_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft.yaml").write_text("trainer: {}\n")
    assert resolve_config("sft.yaml", "-c") == Path("sft.yaml")


def test_an_unknown_name_lists_the_packaged_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--preset failures/nope: no such file.*failures/no_kl.*, sft\)$"):
        resolve_config("failures/nope", "--preset")


def test_fit_config_values_are_resolved_before_lightning_cli(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    words = with_packaged_configs(["fit", "-c", "sft", "--config", "fixes/adaptive_kl", "--config=rm", "--x=1"])
    assert words == ["fit", "-c", str(CONFIGS / "sft.yaml"), "--config", str(CONFIGS / "fixes/adaptive_kl.yaml"),
                     f"--config={CONFIGS / 'rm.yaml'}", "--x=1"]  # fmt: skip


@pytest.mark.filterwarnings("error:LightningCLI's args parameter")  # the resolved words replace the command line
@pytest.mark.parametrize("from_command_line", [False, True])
def test_fit_runs_a_packaged_config_by_name(tmp_path, monkeypatch, capsys, from_command_line):
    monkeypatch.chdir(tmp_path)
    words = ["fit", "-c", "sft", "--trainer.max_steps=3", "--print_config"]
    monkeypatch.setattr(sys, "argv", ["rlhf", *words] if from_command_line else ["rlhf"])
    with pytest.raises(SystemExit) as exc:
        main(None if from_command_line else words)
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["max_steps"] == 3 and printed["model"]["class_path"].endswith("SFTModule")


def test_pipeline_resolves_presets_configs_and_its_defaults_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = pipeline.parse_args(["--preset", "configs/failures/no_kl.yaml", "--preset", "fixes/adaptive_kl",
                                 "--rm-config", "hf/rm"])  # fmt: skip
    assert args.preset == [CONFIGS / "failures/no_kl.yaml", CONFIGS / "fixes/adaptive_kl.yaml"]
    assert (args.sft_config, args.rm_config, args.ppo_config) == (CONFIGS / "sft.yaml", CONFIGS / "hf/rm.yaml",
                                                                  CONFIGS / "ppo.yaml")  # fmt: skip
    (tmp_path / "sft").write_text("a file named like a packaged config is no default\n")
    hf = tmp_path / "hf_model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    args = pipeline.parse_args(["--hf-model", str(hf)])
    assert [args.sft_config, args.rm_config, args.ppo_config] == [CONFIGS / f"hf/{p}.yaml" for p in pipeline.PHASES]
    with pytest.raises(ValueError, match=r"^--ppo-config nope\.yaml: no such file"):
        pipeline.parse_args(["--ppo-config", "nope.yaml"])


def test_fit_applies_a_preset_part_for_the_configs_phase_before_the_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:  # the dpo part of a DPO preset; a command-line override still wins
        main(["fit", "-c", "dpo", "--preset", "failures/dpo_small_beta", "--model.init_args.lr=2e-4", "--print_config"])
    assert exc.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["beta"] == 0.01 and printed["model"]["init_args"]["lr"] == 2e-4
    assert printed["trainer"]["val_check_interval"] == 50
    with pytest.raises(SystemExit):  # a pipeline preset's ppo part on an RL config: the same mechanism
        main(["fit", "-c", "reinforce_pp", "--preset=failures/no_kl", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["kl"]["coef"] == 0.0


@pytest.mark.parametrize(
    ("words", "message"),
    [(["-c", "sft", "--preset", "failures/dpo_small_beta"], r"^--preset failures/dpo_small_beta: nothing for the sft "
      r"phase"),
     (["--preset", "failures/no_kl"], r"^--preset: no config names the model's class_path"),
     (["-c", "dpo", "--preset"], r"^--preset: expected a preset file")],
)  # fmt: skip
def test_fit_preset_mistakes_are_user_errors(tmp_path, monkeypatch, words, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=message):
        main(["--debug", "fit", "--print_config", *words])  # a bare --preset last


def test_pipeline_refuses_a_preset_for_dpo_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^pipeline: --preset failures/dpo_small_beta: changes none of the pipeline's "
                       r"phases \(sft, rm, ppo\); a DPO preset runs with `rlhf fit -c dpo --preset "
                       r"failures/dpo_small_beta`$"):  # fmt: skip
        pipeline.parse_args(["--preset", "failures/dpo_small_beta"])


def test_pipeline_takes_a_relative_config_from_where_it_was_started(tmp_path, monkeypatch):
    """The phases run inside the run directory: a config given relative to the working directory is made absolute."""
    monkeypatch.chdir(tmp_path)
    copy_configs(tmp_path / "cfg")
    assert pipeline.parse_args(["--sft-config", "cfg/sft.yaml"]).sft_config == (tmp_path / "cfg/sft.yaml").resolve()


@pytest.mark.parametrize("argv", [["--help"], ["-h"], []])
def test_help_lists_every_command_in_one_line(capsys, argv):
    main(argv)
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "world", "pipeline", "diagnose", "export", "hf-tiny", "configs"):
        assert name in SUBCOMMANDS
        assert len([line for line in out.splitlines() if line.split()[:1] == [name]]) == 1, (name, out)
    assert "rlhf <command> --help" in out


def test_fit_help_stays_lightning_clis(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rlhf"])
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--help"])
    assert exc.value.code == 0
    assert "--trainer.max_steps" in capsys.readouterr().out


def test_configs_lists_each_name_with_its_first_comment_line_or_description(capsys):
    main(["configs"])
    lines = {line.split()[0]: line.split(None, 1)[1] for line in capsys.readouterr().out.splitlines()}
    assert sorted(lines) == packaged_names()
    assert lines["sft"].startswith("Phase 1, supervised fine-tuning")
    assert lines["failures/no_kl"].startswith("PPO without the KL penalty")


def test_configs_out_copies_every_config_and_never_overwrites_without_force(tmp_path, capsys):
    out = tmp_path / "cfg"
    main(["configs", "--out", str(out)])
    copied = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert copied == sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.is_file())
    assert (out / "failures/no_kl.yaml").read_bytes() == (CONFIGS / "failures/no_kl.yaml").read_bytes()
    assert f"wrote {out / 'hf/sft.yaml'}" in capsys.readouterr().out.splitlines()
    mine = tmp_path / "mine"
    (mine / "hf").mkdir(parents=True)
    (mine / "hf/sft.yaml").write_text("edited\n")
    message = f"configs --out {mine}: would overwrite {mine / 'hf/sft.yaml'}; pass --force to overwrite"
    with pytest.raises(ValueError, match=re.escape(message)):
        copy_configs(mine)
    assert [p.name for p in mine.rglob("*") if p.is_file()] == ["sft.yaml"]  # nothing written
    assert (mine / "hf/sft.yaml").read_text() == "edited\n"
    main(["configs", "--out", str(mine), "--force"])
    assert (mine / "hf/sft.yaml").read_bytes() == (CONFIGS / "hf/sft.yaml").read_bytes()
