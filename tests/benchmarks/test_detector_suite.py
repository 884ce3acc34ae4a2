"""benchmarks/detector_suite.py: every run of the suite is a valid `rlhf pipeline` command on packaged presets."""

from __future__ import annotations

from rlhf_lightning.packaged import resolve_config
from rlhf_lightning.pipeline import parse_args


def test_every_suite_run_is_a_pipeline_command(load_bench, tmp_path):
    suite = load_bench("detector_suite")
    sft, shared_rm = tmp_path / "sft.ckpt", tmp_path / "rm.ckpt"
    sft.touch()
    shared_rm.touch()
    names = [run.name for run in suite.SUITE]
    assert len(names) == len(set(names))
    for run in suite.SUITE:
        rm = None if run.rm_group else shared_rm  # a group's first run trains its reward model
        cmd = suite.command(run, 1, tmp_path / f"{run.name}_s1", sft, rm)
        args = parse_args(cmd[cmd.index("pipeline") + 1 :])
        assert args.seed == 1 and args.sft_checkpoint == sft and args.rm_checkpoint == rm
        assert suite.EVAL_ARGS in args.ppo_args and run.ppo_args in args.ppo_args
        for preset in (*run.presets, run.rl_config):
            assert resolve_config(preset, "--preset").is_file()
