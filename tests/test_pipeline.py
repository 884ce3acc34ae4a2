"""`rlhf pipeline` end to end at tiny size, and every preset: valid YAML whose partial configs the phases accept."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from unicode_corpus import write_unicode_data_dir

from rlhf_lightning import pipeline
from rlhf_lightning.cli import main
from rlhf_lightning.diagnose.events import read_scalars
from rlhf_lightning.errors import UsageError
from rlhf_lightning.pipeline import (
    PHASES,
    PRESET_PHASES,
    combine_presets,
    load_preset,
    phase_configs,
    preset_part,
    seed_args,
)

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
    "--model.init_args.ppo_epochs=1 --model.init_args.eval.every=2 --model.init_args.sampling.max_new_tokens=8 "
    f"--data.init_args.eval_prompts=8 --model.init_args.eval.groups=4 {QUIET}",
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
    # the reward model's accuracy beside its bag-of-words baseline's, as its phase logged them last
    rm_logged = read_scalars(out / "runs/rm")
    for key, tag in (("rm_accuracy", "rm/accuracy"), ("rm_baseline_accuracy", "rm/baseline_accuracy")):
        assert saved[key] == pytest.approx(rm_logged[tag][max(rm_logged[tag])]), key
    assert (out / "diagnose" / "report.md").is_file()
    # the fix came after the failure: its controller is the one the PPO phase ran with
    ppo_part = yaml.safe_load((out / "preset" / "ppo.yaml").read_text())["model"]["init_args"]
    assert ppo_part["kl"]["controller"] == "adaptive" and ppo_part["kl"]["coef"] == 0.05
    printed = capsys.readouterr().out
    assert "rlhf pipeline summary" in printed and "win rate vs SFT" in printed


#: All a tiny run may print on stderr, line by line: Lightning's start-up facts, the end of each fit, the diagnostics
#: callback's best checkpoint, and its one line on what it cannot evaluate without a gold judge. Any other line (a
#: warning, a tip, a notice) fails the test that uses it.
ALLOWED_STDERR = re.compile(
    r"Seed set to \d+|GPU available: .*|TPU available: .*|`Trainer\.fit` stopped: .*|RLHFDiagnostics: new best .*"
    r"|RLHFDiagnostics: no gold judge for this data: annotation_shift cannot be evaluated .*"
)


def test_a_run_on_own_data_prints_nothing_a_newcomer_reads_as_trouble(tmp_path, capsys):
    """The whole pipeline as a user starts it on their own data (no world.json: no gold judge), progress bars and
    model summaries on, in a fresh process (so that no test's warning filters or earlier warnings hide anything)."""
    data = tmp_path / "own"
    main(["world", "--out", str(data)])
    (data / "world.json").unlink()
    tiny = {phase: args.replace(QUIET, "") for phase, args in TINY.items()}
    # an RM run that ends between validations (5 steps, every 2), and no limit of 1 batch (Lightning echoes that)
    tiny["rm"] = tiny["rm"].replace("max_steps=4", "max_steps=5").replace("limit_val_batches=1", "limit_val_batches=2")
    args = [arg for phase in PHASES for arg in (f"--{phase}-args", tiny[phase])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]),
    }
    command = ["-m", "rlhf_lightning.cli", "pipeline", "--out", str(tmp_path / "run"), "--data-dir", str(data), *args]
    done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    unexpected = [line for line in done.stderr.splitlines() if line.strip() and not ALLOWED_STDERR.fullmatch(line)]
    assert not unexpected, "\n".join(unexpected)
    out = done.stdout.replace("\r", "\n")
    assert not re.search(r"\b(None|nan|NaN)\b", out), out
    assert not re.search(r"Epoch \d+/-|/--", out), out  # no "Epoch 9/-2", no unknown total of PPO iterations
    assert "Epoch 0/0" in out and "2/2" in out  # the PPO phase: its 2 iterations are the bar's total
    summary = out.split("== rlhf pipeline summary ==")[1]
    assert summary.count("no gold judge for this data: gold reward and win rate are not measured") == 1
    assert "reward model     held-out accuracy" in summary  # the RM validated at its last step


def test_lightning_notices_of_a_small_data_set_are_silenced(monkeypatch):
    """Notices a tiny machine or data set would print: too few loader workers (the data modules collate in memory),
    fewer batches per epoch than the logging interval (the phases log across epochs, bounded in steps)."""
    from lightning.pytorch.trainer.connectors import data_connector
    from lightning.pytorch.utilities.warnings import PossibleUserWarning
    from torch.utils.data import DataLoader

    from rlhf_lightning.modules.base import PhaseModule

    PhaseModule()  # what a run makes before its Trainer
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)
    with warnings.catch_warnings(record=True) as caught:
        data_connector._worker_check(SimpleNamespace(num_devices=1), DataLoader([0]), "train_dataloader")
        warnings.warn("The number of training batches (3) is smaller than the logging interval Trainer("
                      "log_every_n_steps=10). Set a lower value for log_every_n_steps if you want to see logs for the "
                      "training epoch.", PossibleUserWarning, stacklevel=1)  # fmt: skip
    assert not [str(w.message) for w in caught]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> Path:
    """A tiny run without --seed (today's behaviour), for the tests that start from it or compare with it."""
    out = tmp_path_factory.mktemp("default") / "run"
    main_pipeline(["--out", str(out), "--no-diagnose", *tiny_args()])
    return out


def test_pipeline_reuses_given_checkpoints(default_run, tmp_path):
    first = default_run
    second = tmp_path / "second"
    summary = main_pipeline(["--out", str(second), "--no-diagnose", "--sft-checkpoint",
                             str(first / "runs/sft/checkpoints/last.ckpt"), "--rm-checkpoint",
                             str(first / "runs/rm/checkpoints/last.ckpt"), "--seed", "3", *tiny_args()])  # fmt: skip
    assert not (second / "runs/sft").exists() and not (second / "runs/rm").exists()
    assert summary["rm_accuracy"] is None  # a reused reward model: its accuracy is in its own run
    assert (second / "runs/ppo/checkpoints/last.ckpt").is_file() and set(summary["seconds"]) == {"ppo"}
    # Under a seed, PPO takes it, but the world stays the checkpoints' (seed 0): its held-out prompts stay held out.
    assert json.loads((second / "runs/world/world.json").read_text())["seed"] == 0
    config = yaml.safe_load((second / "runs/ppo/config.yaml").read_text())
    assert (config["seed_everything"], config["model"]["init_args"]["seed"]) == (3, 3)


def test_pipeline_runs_a_critic_free_method_into_runs_ppo(default_run, tmp_path):
    """`--ppo-config grpo`: the packaged config's own folder is runs/grpo, yet in the pipeline the RL phase lands in
    runs/ppo like PPO's, where the summary and the diagnosis read it."""
    out = tmp_path / "grpo"
    summary = main_pipeline(["--out", str(out), "--ppo-config", "grpo", "--sft-checkpoint",
                             str(default_run / "runs/sft/checkpoints/last.ckpt"), "--rm-checkpoint",
                             str(default_run / "runs/rm/checkpoints/last.ckpt"), *tiny_args()])  # fmt: skip
    assert (out / "runs/ppo/checkpoints/last.ckpt").is_file() and not (out / "runs/grpo").exists()
    config = yaml.safe_load((out / "runs/ppo/config.yaml").read_text())["model"]["init_args"]
    assert config["advantage"]["estimator"] == "grpo" and config["kl"]["placement"] == "loss"
    assert summary["iterations"] == 2 and summary["win_rate_vs_sft"] is not None
    assert (out / "diagnose" / "report.md").is_file()


def recorded_seeds(run: Path) -> dict[str, Any]:
    """The seeds a run used: the world's (world.json) and, per phase, those of the config LightningCLI saved."""
    seeds: dict[str, Any] = {"world": json.loads((run / "runs/world/world.json").read_text())["seed"]}
    for phase in PHASES:
        config = yaml.safe_load((run / "runs" / phase / "config.yaml").read_text())
        module = config["model"]["init_args"]
        seeds[phase] = {"seed_everything": config["seed_everything"],
                        **{key: module[key] for key in ("seed", "eval_seed") if key in module}}  # fmt: skip
        if isinstance(module.get("eval"), dict):  # PPO's evaluation seed is in its eval group
            seeds[phase]["eval_seed"] = module["eval"]["seed"]
    return seeds


def expected_seeds(s: int) -> dict[str, Any]:
    """What --seed S sets; S = 0 is what the configs and the modules' defaults set today."""
    return {"world": s, "sft": {"seed_everything": s, "eval_seed": 1234 + s}, "rm": {"seed_everything": s, "seed": s},
            "ppo": {"seed_everything": s, "seed": s, "eval_seed": 1234 + s}}  # fmt: skip


def test_seed_sets_the_world_and_every_phase_seed(default_run, tmp_path):
    assert seed_args(None) == {phase: [] for phase in PHASES}  # no --seed: the configs as they are
    assert recorded_seeds(default_run) == expected_seeds(0)
    out = tmp_path / "seed1"
    summary = main_pipeline(["--out", str(out), "--no-diagnose", "--seed", "1", *tiny_args()])
    assert summary["seed"] == 1 and recorded_seeds(out) == expected_seeds(1)
    for name in ("sft_train.jsonl", "prefs_train.jsonl", "prompts_val.jsonl"):  # another world
        assert (out / "runs/world" / name).read_bytes() != (default_run / "runs/world" / name).read_bytes(), name


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["--seed", "1", "--seeds", "0,1"], "not allowed with"), (["--seeds", "0,2,0"], "given twice"),
     (["--seeds", "0,x"], "not an integer"), (["--seed", "-1"], "a seed is >= 0")],
)  # fmt: skip
def test_bad_seed_flags_fail_clearly(argv, message, tmp_path):
    with pytest.raises(UsageError, match=message):
        main_pipeline(["--out", str(tmp_path), *argv])
    assert not list(tmp_path.iterdir())  # refused before anything ran


def test_summary_records_the_best_gold_along_the_run(monkeypatch, tmp_path):
    logged = {"eval/gold_reward": {4: 1.0, 9: 2.0, 14: 2.0, 19: 1.5}, "objective/kl": dict.fromkeys(range(20), 0.1)}
    monkeypatch.setattr(pipeline, "read_scalars", lambda run_dir: logged)
    s = pipeline.summarize(tmp_path)
    # the first of two equal peaks; the run kept 1.5 / 2.0 of it
    assert (s["gold_reward_ppo"], s["best_gold_reward_ppo"], s["best_gold_iteration"]) == (1.5, 2.0, 9)
    assert s["final_over_best_gold"] == 0.75 and s["iterations"] == 20
    logged["eval/gold_reward"] = {4: -1.0, 9: -0.5, 19: -2.0}  # no ratio of negative rewards
    s = pipeline.summarize(tmp_path)
    assert (s["best_gold_reward_ppo"], s["best_gold_iteration"], s["final_over_best_gold"]) == (-0.5, 9, None)
    del logged["eval/gold_reward"]  # no gold judge (a user's own data)
    s = pipeline.summarize(tmp_path)
    assert s["best_gold_reward_ppo"] is s["best_gold_iteration"] is s["final_over_best_gold"] is None


def test_summary_without_a_gold_judge_says_so_once_and_prints_no_none(monkeypatch, tmp_path, capsys):
    # a user's own data: the PPO phase logs proxy figures only, and the reward model has no Bayes accuracy
    logged = {"eval/proxy_reward": {1: 0.4}, "eval/sft_proxy_reward": {1: 0.1}, "objective/kl": {0: 0.0, 1: 0.2},
              "objective/kl_coef": {0: 0.05, 1: 0.05}, "diversity/distinct_2": {1: 0.9}, "rm/accuracy": {4: 0.7},
              "rm/baseline_accuracy": {4: 0.6}}  # fmt: skip
    monkeypatch.setattr(pipeline, "read_scalars", lambda run_dir: logged)
    (tmp_path / "runs" / "rm").mkdir(parents=True)
    s = {**pipeline.summarize(tmp_path), "seconds": {"ppo": 1.0}, "run_dir": str(tmp_path)}
    assert s["gold_reward_ppo"] is s["win_rate_vs_sft"] is s["rm_bayes_accuracy"] is None  # summary.json: nulls
    pipeline._print_summary(s)
    printed = capsys.readouterr().out
    assert printed.count("no gold judge for this data: gold reward and win rate are not measured") == 1
    assert "None" not in printed and "nan" not in printed
    assert "gold reward  " not in printed and "win rate vs SFT" not in printed and "best gold" not in printed
    assert "proxy reward     SFT 0.100  ->  PPO 0.400" in printed
    assert "reward model     held-out accuracy 0.700; bag-of-words baseline 0.600\n" in printed
    assert "diversity        distinct-2 0.900\n" in printed  # the per-input figures were not logged


def test_seeds_table_names_the_figures_no_run_has_instead_of_rows_of_dashes():
    runs = {seed: {**dict.fromkeys(pipeline.SEED_FIGURES), "kl": 0.1 * (seed + 1), "run_dir": f"seed_{seed}"}
            for seed in (0, 1)}  # fmt: skip
    runs[1]["win_rate_vs_sft"] = 0.5  # measured by one run only: a dash for the other
    table = pipeline.seeds_table(pipeline.summarize_seeds(runs))
    assert "None" not in table and "nan" not in table
    assert "| KL to SFT | 0.100 | 0.200 |" in table and "| win rate vs SFT | - | 0.500 | 0.500 | - |" in table
    assert "gold reward, SFT" not in table.split("\n\n")[0]
    assert table.split("\n\n")[1].startswith("No value in any run: gold reward, SFT; gold reward, PPO (final)")


FIGURES = ("gold_reward_sft", "gold_reward_ppo", "best_gold_reward_ppo", "best_gold_iteration", "final_over_best_gold",
           "win_rate_vs_sft", "proxy_reward_sft", "proxy_reward_ppo", "kl", "kl_coef", "distinct_2",
           "per_input_distinct_2_ppo", "per_input_distinct_2_sft", "iterations", "rm_accuracy",
           "rm_baseline_accuracy", "rm_bayes_accuracy")  # fmt: skip


def test_seeds_run_the_recipe_per_seed_and_summarise_them(default_run, tmp_path, capsys):
    out = tmp_path / "study"
    main(["pipeline", "--out", str(out), "--no-diagnose", "--seeds", "0,1", *tiny_args()])  # the `rlhf` command
    runs = {s: json.loads((out / f"seed_{s}" / "summary.json").read_text()) for s in (0, 1)}
    for s, run in runs.items():
        assert run["seed"] == s and (out / f"seed_{s}/runs/ppo/checkpoints/last.ckpt").is_file()
    assert recorded_seeds(out / "seed_1") == expected_seeds(1)
    assert [pipeline.checkpoint_world_seed(out / f"seed_{s}/runs/sft/checkpoints/last.ckpt") for s in (0, 1)] == [0, 1]
    # Seed 0 is the run without --seed, to the bit; seed 1 is another world and other figures.
    default = json.loads((default_run / "summary.json").read_text())
    assert {k: runs[0][k] for k in FIGURES} == {k: default[k] for k in FIGURES}
    assert (out / "seed_0/runs/world/world.json").read_text() == (default_run / "runs/world/world.json").read_text()
    assert {k: runs[1][k] for k in FIGURES} != {k: runs[0][k] for k in FIGURES}
    # The study's statistics, recomputed from the per-seed files (two seeds: t = 12.7062 with 1 df).
    saved = json.loads((out / "summary.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["run_dirs"] == [str(out / "seed_0"), str(out / "seed_1")]
    assert set(saved["figures"]) >= {"gold_reward_sft", "gold_reward_ppo", "best_gold_reward_ppo",
                                     "final_over_best_gold", "win_rate_vs_sft", "kl", "per_input_distinct_2_sft",
                                     "per_input_distinct_2_ppo", "proxy_reward_ppo"}  # fmt: skip
    for key, figure in saved["figures"].items():
        values = [runs[0][key], runs[1][key]]
        assert figure["values"] == values, key
        if None in values:  # gold final / best is not defined for a negative best
            assert figure["ci95"] is None, key
            continue
        mean, half = statistics.fmean(values), 12.7062 * statistics.stdev(values) / math.sqrt(2)
        assert figure["mean"] == pytest.approx(mean) and figure["ci95"] == pytest.approx([mean - half, mean + half])
        assert (figure["min"], figure["max"]) == (min(values), max(values)), key
    table = (out / "summary.md").read_text()
    assert "| figure | seed 0 | seed 1 | mean | 95% CI | min | max |" in table and "win rate vs SFT" in table
    assert table.split("\n\n")[-1] in capsys.readouterr().out  # the table is printed at the end


def main_pipeline(argv: list[str]) -> dict:
    from rlhf_lightning.pipeline import pipeline_main

    return pipeline_main(argv)


@pytest.mark.parametrize("preset_path", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_is_accepted_by_its_phases(preset_path, tmp_path, capsys):
    preset = load_preset(preset_path)
    assert preset.get("description"), "a preset says what it does"
    extra = phase_configs(combine_presets([preset]), tmp_path)
    assert extra == {phase: ["-c", str(tmp_path / "preset" / f"{phase}.yaml")] if preset_part(preset, phase) else []
                     for phase in PHASES}  # fmt: skip
    # Every part, the DPO one (`rlhf fit -c dpo --preset NAME`; the pipeline has no DPO phase) included.
    touched = [phase for phase in PRESET_PHASES if preset_part(preset, phase)]
    assert touched, "a preset changes at least one phase"
    for phase in touched:
        with pytest.raises(SystemExit) as done:
            main(["fit", "-c", str(ROOT / "configs" / f"{phase}.yaml"), "--preset", str(preset_path), "--print_config"])
        assert done.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        part = preset_part(preset, phase)
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


def test_data_dir_budgets_are_sized_to_the_data(tmp_path):
    data = tmp_path / "data"
    write_unicode_data_dir(data)
    args = pipeline.parse_args(["--out", str(tmp_path / "run"), "--data-dir", str(data)])
    sized = pipeline.check_phases(args)
    # Two ~1,100-token responses among the folder's: the response budget is capped, and they are cut with a warning;
    # the prompts (at most 17 tokens) all fit.
    data_args = ["--data.init_args.max_prompt_len=17", "--data.init_args.max_response_len=256",
                 "--data.init_args.truncation=warn"]  # fmt: skip
    assert sized == {
        "sft": [*data_args, "--model.init_args.backbone.max_seq_len=273",
                "--model.init_args.eval_sampling.max_new_tokens=256"],
        "rm": [*data_args, "--model.init_args.norm_sampling.max_new_tokens=256"],
        "ppo": [*data_args, "--model.init_args.sampling.max_new_tokens=256"],
    }  # fmt: skip
    assert not (tmp_path / "run").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data"]
    # the phases get them before the user's own overrides, which win
    (sft_cmd,) = [cmd for phase, cmd in pipeline.phase_plan(args, tmp_path, None, sized) if phase == "sft"]
    assert sft_cmd[-len(sized["sft"]) :] == sized["sft"]
