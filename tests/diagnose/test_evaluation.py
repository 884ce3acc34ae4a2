"""`rlhf evaluate-detectors`: ground truth from gold, precision/recall/lead of gold-free warnings, checkpoint rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rlhf_lightning.cli import main as rlhf_main
from rlhf_lightning.diagnose.evaluation import Truth, combine, evaluate, gain_kept, gold_truth, pooled, score
from rlhf_lightning.diagnose.history import History
from rlhf_lightning.diagnose.selection import replay

EVALS = np.arange(4, 60, 5)


def run_points(synth, seed: int, falls: bool) -> dict:
    """A healthy synthetic run, or one whose held-out gold peaks at iteration 29 and falls while the proxy and the
    rollout lengths keep rising (a length-hacking run that the gold-free ``length_drift`` can see)."""
    points = synth.healthy_points(seed)
    t = np.arange(synth.n, dtype=np.float64)
    rise = synth.rise(EVALS.astype(float))
    gold = 1.0 + rise - (0.015 * np.maximum(EVALS - 29, 0) if falls else 0.0)
    evals = {
        "eval/gold_reward": gold,
        "eval/gold_reward_se": np.full(len(EVALS), 0.05),
        "eval/sft_gold_reward": np.full(len(EVALS), 1.0),
        "eval/proxy_reward": rise + (0.03 * EVALS if falls else 0.0),
        "eval/kl": 0.1 * EVALS,
        "eval/audit_win_rate": 0.5 + 0.3 * rise - (0.006 * np.maximum(EVALS - 29, 0) if falls else 0.0),
        "eval/audit_labels": np.full(len(EVALS), 256.0),
        "eval/proxy_win_rate": np.full(len(EVALS), 0.8),
    }
    for tag, values in evals.items():
        points[tag] = dict(zip(map(int, EVALS), map(float, values), strict=True))
    if falls:
        synth.set_series(points, "rollout/length_mean", 12.0 + 0.3 * t)
    return points


def test_gold_truth_falls_only_beyond_the_noise(synth):
    h = History.from_points(run_points(synth, 0, falls=True))
    truth = gold_truth(h)
    assert truth.falling and truth.peak_step == 29 and truth.sft_gold == 1.0
    healthy = gold_truth(History.from_points(run_points(synth, 0, falls=False)))
    assert not healthy.falling and healthy.peak_step == 59
    # the same drop within two standard errors is no fall
    points = run_points(synth, 0, falls=True)
    points["eval/gold_reward_se"] = {k: 1.0 for k in points["eval/gold_reward_se"]}
    assert not gold_truth(History.from_points(points)).falling
    assert gold_truth(History()) is None
    # gold never above SFT: the SFT policy (iteration 0) was the best
    points["eval/sft_gold_reward"] = {k: 5.0 for k in points["eval/sft_gold_reward"]}
    never = gold_truth(History.from_points(points))
    assert never.falling and never.peak_step == 0


def test_score_counts_precision_recall_lead_and_false_alarms():
    truths = {
        "a_s0": Truth(True, 30, 1.0, 2.0, 1.5),
        "b_s0": Truth(True, 20, 1.0, 2.0, 1.5),
        "ppo_s0": Truth(False, 59, 1.0, 2.0, 2.0),
        "c_s0": Truth(False, 59, 1.0, 2.0, 2.0),
    }
    first = {"a_s0": 25, "b_s0": None, "ppo_s0": 40, "c_s0": None}
    s = score(list(truths), truths, first.get, defaults=["ppo_s0"])
    assert (s.precision, s.recall, s.median_lead) == (0.5, 0.5, 5.0)
    assert (s.false_alarms_default, s.defaults, s.warned, s.falling) == (1, 1, 2, 2)
    assert math.isnan(score([], truths, first.get, []).precision)
    both = combine(["x", "y"], {"r": {"x": 30, "y": 12}, "q": {"x": None}})
    assert both("r") == 12 and both("q") is None


def test_gain_kept_is_the_share_of_the_gold_gain(synth):
    h = History.from_points(run_points(synth, 0, falls=True))
    truth = gold_truth(h)
    assert gain_kept(h, truth, 29) == pytest.approx(1.0)
    last = (h.get("eval/gold_reward").values[-1] - 1.0) / (truth.best_gold - 1.0)
    assert gain_kept(h, truth, 59) == pytest.approx(last) and last < 0.7
    assert gain_kept(h, truth, None) == 0.0  # nothing picked: the SFT policy, none of the gain


def test_online_rule_replayed(synth):
    h = History.from_points(run_points(synth, 0, falls=True))
    assert replay(h) == 29  # the audit's peak
    # without labels: length_drift (reward hacking) fires as the lengths grow, and later evaluations are no
    # candidates for the proxy
    blind = h.without(("eval/audit_win_rate", "eval/audit_labels"))
    picked = replay(blind, {"reward_hacking.length_drift": {"ratio": 1.4}})
    assert picked is not None and picked < 59
    assert replay(History()) is None


def test_evaluate_calibrates_on_one_seed_and_reports_on_the_others(synth):
    histories = {
        f"{name}_s{seed}": History.from_points(run_points(synth, seed, falls=name == "hacked"))
        for name in ("ppo", "hacked")
        for seed in range(3)
    }
    result = evaluate(histories, calibrate_seeds=[0], default_prefix="ppo_s")
    assert [r for r, v in result["runs"].items() if v["calibration"]] == ["hacked_s0", "ppo_s0"]
    assert {r for r, v in result["runs"].items() if v["falling"]} == {"hacked_s0", "hacked_s1", "hacked_s2"}
    combo = result["combination"]
    held = combo["held_out"]
    assert (held["precision"], held["recall"], held["false_alarms_default"]) == (1.0, 1.0, 0)
    assert held["defaults"] == 2 and held["median_lead"] >= 0
    assert combo["unseen_settings"]["falling"] == 0  # no configuration held out
    unseen = evaluate(histories, calibrate_seeds=[0], default_prefix="ppo_s", holdout=["hacked"])
    assert [r for r, v in unseen["runs"].items() if v["calibration"]] == ["ppo_s0"]
    assert unseen["combination"]["unseen_settings"]["falling"] == 3
    drift = result["detectors"]["reward_hacking.length_drift"]["held_out"]
    assert drift["recall"] == 1.0
    assert "reward_hacking.gold_divergence" not in result["detectors"]  # needs gold: never scored
    kept = result["selection"]["best audit win rate"]["hacked_s1"]
    assert kept["gain"] == pytest.approx(kept["best_gain"]) and kept["step"] == 29
    last = result["selection"]["last evaluation"]
    assert pooled(last.values()) < pooled(result["selection"]["best audit win rate"].values()) == pytest.approx(1.0)


def test_cli_writes_the_tables(tmp_path, synth, capsys):
    dirs = []
    for name, falls in (("ppo", False), ("hacked", True)):
        for seed in range(2):
            d = tmp_path / f"{name}_s{seed}" / "runs/ppo"
            synth.write_events(d, run_points(synth, seed, falls), synth.hparams)
            dirs.append(str(d.parent.parent))
    rlhf_main(["evaluate-detectors", *dirs, "--out", str(tmp_path / "ev")])
    text = (tmp_path / "ev/detectors.md").read_text()
    assert "| hacked_s1 | held out |" in text and "## The best combination" in text
    assert json.loads((tmp_path / "ev/detectors.json").read_text(), parse_constant=float)["runs"]["ppo_s0"]
    with pytest.raises(SystemExit) as exc:
        rlhf_main(["evaluate-detectors", str(tmp_path / "nothing")])
    assert exc.value.code == 2
    # runs without gold (a user's own data): one line that says why, exit status 2
    blind = tmp_path / "blind_s0" / "runs/ppo"
    synth.write_events(blind, {k: v for k, v in run_points(synth, 0, False).items() if "gold" not in k})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        rlhf_main(["evaluate-detectors", str(blind.parent.parent)])
    assert exc.value.code == 2 and "no run has held-out gold" in capsys.readouterr().err
