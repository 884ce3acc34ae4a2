"""KL failure presets at reduced size: without a KL penalty (or with one ten times too small) the KL to the SFT policy
climbs, and the detectors name a missing penalty; the fixes (the adaptive controller, beta annealed from high) hold it
lower. Tiny models, a dozen iterations: the full-size evidence of every preset is in benchmarks/RESULTS.md, and the
data presets' symptom (a flawed reward model) is checked at reduced size in tests/modules/test_reward_bias.py."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_pipeline import TINY

from rlhf_lightning.diagnose.detectors import run_detectors
from rlhf_lightning.diagnose.events import read_run
from rlhf_lightning.pipeline import pipeline_main

ROOT = Path(__file__).resolve().parents[1]
FAILURES, FIXES = ROOT / "configs" / "failures", ROOT / "configs" / "fixes"
#: A short, aggressive PPO run: 12 iterations of 16 responses at a high learning rate, so the KL moves in seconds.
PPO_SMALL = ("--model.init_args.iterations=12 --model.init_args.rollout_batch=16 --model.init_args.minibatch_size=8 "
             "--model.init_args.ppo_epochs=2 --model.init_args.lr=3e-3 --model.init_args.sampling.max_new_tokens=12 "
             "--model.init_args.eval.every=6 --model.init_args.eval.groups=4 --data.init_args.eval_prompts=8 "
             "--trainer.enable_progress_bar=false --trainer.enable_model_summary=false")  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """Tiny SFT and reward-model checkpoints (and the world) that every preset run below reuses."""
    out = tmp_path_factory.mktemp("preset_base")
    pipeline_main(["--out", str(out), "--no-diagnose", "--sft-args", TINY["sft"], "--rm-args", TINY["rm"],
                   "--ppo-args", TINY["ppo"]])  # fmt: skip
    return out


def run_preset(base: Path, out: Path, *presets: Path):
    args = ["--out", str(out), "--no-diagnose", "--sft-checkpoint", str(base / "runs/sft/checkpoints/last.ckpt"),
            "--rm-checkpoint", str(base / "runs/rm/checkpoints/last.ckpt"), "--data-dir", str(base / "runs/world"),
            "--ppo-args", PPO_SMALL]  # fmt: skip
    for preset in presets:
        args += ["--preset", str(preset)]
    pipeline_main(args)
    history = read_run(out / "runs" / "ppo")
    return history, {f.name: f for f in run_detectors(history)}


def test_no_kl_is_named_and_the_adaptive_fix_removes_it(base, tmp_path):
    broken, findings = run_preset(base, tmp_path / "no_kl", FAILURES / "no_kl.yaml")
    assert findings["kl_trouble.no_kl_penalty"].triggered, findings["kl_trouble.no_kl_penalty"].evidence
    assert set(broken.get("objective/kl_coef").values) == {0.0}

    fixed, fixed_findings = run_preset(base, tmp_path / "fixed", FAILURES / "no_kl.yaml", FIXES / "adaptive_kl.yaml")
    assert not fixed_findings["kl_trouble.no_kl_penalty"].triggered
    assert min(fixed.get("objective/kl_coef").values) > 0
    # With the penalty back, the policy stays closer to the reference than without it.
    assert fixed.get("objective/kl").values[-3:].mean() < broken.get("objective/kl").values[-3:].mean()


def test_low_beta_drifts_further_than_its_annealed_fix(base, tmp_path):
    broken, _ = run_preset(base, tmp_path / "low_beta", FAILURES / "low_beta.yaml")
    assert broken.get("objective/kl_coef").values == pytest.approx(0.005)
    fixed, fixed_findings = run_preset(base, tmp_path / "fixed", FAILURES / "low_beta.yaml", FIXES / "annealed_kl.yaml")
    beta = fixed.get("objective/kl_coef").values
    assert beta[0] == pytest.approx(0.3) and all(beta[1:] <= beta[:-1]), beta  # starts high, only decreases
    assert fixed.get("objective/kl").values[-3:].mean() < broken.get("objective/kl").values[-3:].mean()
    assert not any(f.triggered for name, f in fixed_findings.items() if name.startswith("kl_trouble")), fixed_findings
