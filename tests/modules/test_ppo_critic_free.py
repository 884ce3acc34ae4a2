"""The RL phase with the critic-free advantage estimators (GRPO, RLOO, REINFORCE++): k responses per prompt in
consecutive rows, no critic built, stepped or saved, an exact resume, and the CLI end to end."""

from __future__ import annotations

import math

import pytest
import torch
from test_ppo import CONFIGS, QUIET, base, fit, make_module, scalars  # noqa: F401  (base: the shared fixture)

from rlhf_lightning.checkpoint import load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.rl import AdvantageConfig


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_a_critic_free_run_builds_and_saves_no_critic(base, tmp_path, estimator):  # noqa: F811
    advantage = AdvantageConfig(estimator, samples_per_prompt=4 if estimator != "reinforce_pp" else 1)
    module = make_module(base, advantage=advantage, iterations=2)
    seen = []
    rollout = module.make_rollout

    def recording(iteration):
        out = rollout(iteration)
        seen.append(out[0])
        return out

    module.make_rollout = recording
    fit(base, tmp_path, module)
    assert module.value_head is None and module.critic_backbone is None
    # one optimizer group (the policy's): nothing of a critic is stepped
    assert len(module.optimizers().param_groups) == 1
    state = load_checkpoint(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    assert not [key for key in state if key.startswith(("value_head", "critic_backbone"))]
    logged = scalars(tmp_path / "ppo")
    assert not [tag for tag in logged if tag.startswith("value/")]
    assert all(math.isfinite(v) for v in logged["policy/loss"].values())
    if advantage.samples_per_prompt > 1:  # each prompt's k responses are consecutive rows
        prompts = seen[0].prompt_ids.view(-1, advantage.samples_per_prompt, seen[0].prompt_ids.shape[1])
        assert (prompts == prompts[:, :1]).all() and not (prompts[0, 0] == prompts[1, 0]).all()
        # a group's advantages sum to 0 per token position of equal length: the mean of the group is its baseline
        sequence = seen[0].advantages.sum(-1) / seen[0].response_mask.sum(-1)
        assert sequence.numel() == module.hparams.rollout_batch


def test_a_critic_free_run_resumes_to_the_same_end(base, tmp_path):  # noqa: F811
    advantage = AdvantageConfig("grpo", samples_per_prompt=4)
    whole = tmp_path / "whole"
    fit(base, whole, make_module(base, advantage=advantage, iterations=3))
    cut = tmp_path / "cut"
    fit(base, cut, make_module(base, advantage=advantage, iterations=3), stop_after=1)
    fit(base, cut, make_module(base, advantage=advantage, iterations=3), ckpt_path=str(cut / "ckpt" / "last.ckpt"))
    a = load_checkpoint(whole / "ckpt" / "last.ckpt")["state_dict"]
    b = load_checkpoint(cut / "ckpt" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], msg=key)


def test_samples_per_prompt_must_divide_the_rollout(base):  # noqa: F811
    with pytest.raises(ValueError, match=r"advantage.samples_per_prompt \(3\) must divide rollout_batch \(8\)"):
        make_module(base, advantage=AdvantageConfig("rloo", samples_per_prompt=3))


@pytest.mark.parametrize("method", ["grpo", "rloo", "reinforce_pp"])
def test_each_packaged_critic_free_config_runs_through_the_cli(base, tmp_path, monkeypatch, method):  # noqa: F811
    for name in ("runs/world", "runs/sft", "runs/rm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(base / name)
    monkeypatch.chdir(tmp_path)
    # by its packaged name, as a user types it: `rlhf fit -c grpo`
    main(["--debug", "fit", "-c", method, "--model.init_args.iterations=2", "--model.init_args.rollout_batch=8",
          "--model.init_args.minibatch_size=4", "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=2",
          "--model.init_args.sampling.max_new_tokens=8", "--data.init_args.eval_prompts=8",
          "--model.init_args.eval.groups=4", *QUIET])  # fmt: skip
    run = tmp_path / "runs" / method
    logged = scalars(run)
    assert sorted(logged["objective/kl"]) == [0, 1] and "eval/gold_reward" in logged
    assert not [tag for tag in logged if tag.startswith("value/")]
    # the checkpoints follow the logger into the method's own folder
    state = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert state["hyper_parameters"]["advantage"]["estimator"] == method
    assert not (tmp_path / "runs/ppo").exists()
