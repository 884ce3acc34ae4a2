"""`rlhf pipeline` end to end at tiny size, and every preset: valid YAML whose partial configs the phases accept."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from rlhf_lightning.cli import main
from rlhf_lightning.pipeline import PHASES, combine_presets, load_preset, phase_configs

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "failures").glob("*.yaml")) + sorted((ROOT / "configs" / "fixes").glob("*.yaml"))
QUIET = "--trainer.enable_progress_bar=false --trainer.enable_model_summary=false"
TINY = {
    "sft": "--model.init_args.backbone.n_layer=1 --model.init_args.backbone.d_model=32 "
    "--model.init_args.backbone.n_head=2 --data.init_args.eval_prompts=8 --trainer.max_steps=6 "
    f"--trainer.val_check_interval=3 --trainer.limit_val_batches=2 {QUIET}",
    "rm": "--data.init_args.batch_size=8 --trainer.max_steps=4 --trainer.val_check_interval=2 "
    f"--trainer.limit_val_batches=1 --model.init_args.norm_samples=8 {QUIET}",
    "ppo": "--model.init_args.iterations=2 --model.init_args.rollout_batch=8 --model.init_args.minibatch_size=4 "
    "--model.init_args.ppo_epochs=1 --model.init_args.eval_every=2 --model.init_args.sampling.max_new_tokens=8 "
    f"--data.init_args.eval_prompts=8 --model.init_args.eval_groups=4 {QUIET}",
}


def tiny_args() -> list[str]:
    return [arg for phase in PHASES for arg in (f"--{phase}-args", TINY[phase])]


def test_pipeline_end_to_end_with_a_failure_preset_and_its_fix(tmp_path, capsys):
    out = tmp_path / "run"
    summary = main_pipeline(["--out", str(out), "--preset", str(ROOT / "configs/failures/no_kl.yaml"),
                             "--preset", str(ROOT / "configs/fixes/adaptive_kl.yaml"), *tiny_args()])  # fmt: skip
    for phase in ("sft", "rm", "ppo"):
        assert (out / f"runs/{phase}/checkpoints/last.ckpt").is_file(), phase
    saved = json.loads((out / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["iterations"] == 2 and saved["gold_reward_sft"] is not None and saved["win_rate_vs_sft"] is not None
    assert (out / "diagnose" / "report.md").is_file()
    # the fix came after the failure: its controller is the one the PPO phase ran with
    ppo_part = yaml.safe_load((out / "preset" / "ppo.yaml").read_text())["model"]["init_args"]
    assert ppo_part["kl_controller"] == "adaptive" and ppo_part["kl_coef"] == 0.05
    printed = capsys.readouterr().out
    assert "rlhf pipeline summary" in printed and "win rate vs SFT" in printed


def test_pipeline_reuses_given_checkpoints(tmp_path):
    first = tmp_path / "first"
    main_pipeline(["--out", str(first), "--no-diagnose", *tiny_args()])
    second = tmp_path / "second"
    summary = main_pipeline(["--out", str(second), "--no-diagnose", "--sft-checkpoint",
                             str(first / "runs/sft/checkpoints/last.ckpt"), "--rm-checkpoint",
                             str(first / "runs/rm/checkpoints/last.ckpt"), *tiny_args()])  # fmt: skip
    assert not (second / "runs/sft").exists() and not (second / "runs/rm").exists()
    assert (second / "runs/ppo/checkpoints/last.ckpt").is_file() and set(summary["seconds"]) == {"ppo"}


def main_pipeline(argv: list[str]) -> dict:
    from rlhf_lightning.pipeline import pipeline_main

    return pipeline_main(argv)


@pytest.mark.parametrize("preset_path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_is_accepted_by_its_phases(preset_path, tmp_path, capsys):
    preset = load_preset(preset_path)
    assert preset.get("description"), "a preset says what it does"
    extra = phase_configs(combine_presets([preset]), tmp_path)
    touched = [phase for phase in PHASES if extra[phase]]
    assert touched, "a preset changes at least one phase"
    for phase in touched:
        with pytest.raises(SystemExit) as done:
            main(["fit", "-c", str(ROOT / "configs" / f"{phase}.yaml"), *extra[phase], "--print_config"])
        assert done.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        part = yaml.safe_load(Path(extra[phase][1]).read_text())
        assert _contains(printed, part), f"{phase}: {part} not in the resolved config"


def _contains(full: object, part: object) -> bool:
    if isinstance(part, dict):
        return isinstance(full, dict) and all(k in full and _contains(full[k], v) for k, v in part.items())
    return full == part


def test_bad_presets_fail_clearly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ppo:\n  model: [1, 2]\nunknown_key: 1\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_preset(bad)
    bad.write_text("ppo: 3\n")
    with pytest.raises(ValueError, match="'ppo' must be a mapping"):
        load_preset(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_preset(tmp_path / "nope.yaml")
    assert shlex.split(TINY["ppo"])  # the tiny overrides parse as a command line
