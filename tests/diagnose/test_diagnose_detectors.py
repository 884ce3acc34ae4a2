"""Each detector fires on a run broken in its way and stays quiet on a healthy run; missing metrics never crash."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf_lightning.diagnose.detectors import (
    DETECTORS,
    FAMILIES,
    GOLD_TAGS,
    gold_free,
    run_detectors,
    sustained,
    trailing_mean,
    trend,
)
from rlhf_lightning.diagnose.history import History

t = np.arange(60, dtype=np.float64)
#: The detectors that compare with the gold judge's reward (a user's own data has none).
GOLD_DETECTORS = {
    "reward_hacking.gold_divergence",
    "annotation_shift.length_bias",
    "annotation_shift.proxy_gold_disagreement",
}


def _gold_peaks_then_falls(p, s):
    s.set_series(p, "objective/proxy_reward", 0.03 * t)
    s.set_series(p, "objective/gold_reward", 0.8 * s.rise(np.minimum(t, 30)) - 0.03 * np.maximum(t - 30, 0))


def _reward_stalls_while_kl_grows(p, s):
    kl = 0.3 * t
    s.set_series(p, "objective/kl", kl)
    s.set_series(p, "objective/proxy_reward", 0.3 * np.sqrt(kl[np.minimum(t, 25).astype(int)]))


def _adaptive_beta_hits_max(p, s):
    s.set_series(p, "objective/kl_coef", np.minimum(0.05 * 1.2**t, 10.0))
    p["__hparams__"] = {**s.hparams, "kl_controller": "adaptive"}


def _no_penalty(p, s):
    s.set_series(p, "objective/kl_coef", np.zeros(len(t)))
    s.set_series(p, "objective/kl", 0.3 * t)


def _gold_flat_proxy_follows_length(p, s):
    rng = np.random.default_rng(1)
    s.set_series(p, "objective/gold_reward", 0.1 + rng.normal(0, 0.02, len(t)))
    s.set_series(p, "rollout/score_length_corr", np.full(len(t), 0.7))


def _audit_peaks_then_falls(p, s):
    s.set_series(p, "eval/audit_win_rate", np.array([0.6, 0.7, 0.72, 0.62, 0.55, 0.5]))


def _eval_gold_below_sft(p, s):
    s.set_series(p, "eval/gold_reward", np.full(len(p["eval/gold_reward"]), -0.1))


#: finding name -> how to break the healthy run so that it must fire
BREAKS = {
    "reward_hacking.gold_divergence": _gold_peaks_then_falls,
    "reward_hacking.kl_outpaces_reward": _reward_stalls_while_kl_grows,
    "reward_hacking.length_correlation": lambda p, s: s.set_series(
        p, "rollout/score_length_corr", np.linspace(0.1, 0.8, len(t))
    ),
    "reward_hacking.ensemble_disagreement": lambda p, s: s.set_series(
        p, "objective/ensemble_std", np.linspace(0.1, 0.4, len(t))
    ),
    "reward_hacking.proxy_out_of_range": lambda p, s: s.set_series(
        p, "objective/proxy_reward", np.linspace(0.0, 3.0, len(t))
    ),
    "reward_hacking.length_drift": lambda p, s: s.set_series(p, "rollout/length_mean", np.linspace(12, 30, len(t))),
    "reward_hacking.audit_decline": _audit_peaks_then_falls,
    "mode_collapse.per_input_diversity": lambda p, s: s.set_series(
        p, "diversity/per_input_distinct_2", np.linspace(0.5, 0.1, len(p["diversity/per_input_distinct_2"]))
    ),
    "mode_collapse.entropy": lambda p, s: s.set_series(p, "objective/entropy", np.linspace(2.0, 0.2, len(t))),
    "mode_collapse.across_input_diversity": lambda p, s: s.set_series(
        p, "diversity/distinct_2", np.linspace(0.6, 0.1, len(t))
    ),
    "mode_collapse.duplicates": lambda p, s: s.set_series(p, "rollout/duplicate_rate", np.linspace(0, 0.6, len(t))),
    "kl_trouble.negative_kl": lambda p, s: s.set_series(p, "objective/kl", np.full(len(t), -0.3)),
    "kl_trouble.kl_blowup": lambda p, s: s.set_series(p, "objective/kl", np.exp(t / 10)),
    "kl_trouble.beta_at_bound": _adaptive_beta_hits_max,
    "kl_trouble.no_kl_penalty": _no_penalty,
    "annotation_shift.length_bias": _gold_flat_proxy_follows_length,
    "annotation_shift.proxy_gold_disagreement": _eval_gold_below_sft,
}


def _history(points: dict, hparams: dict) -> History:
    hparams = points.pop("__hparams__", hparams)
    return History.from_points(points, hparams)


def test_every_detector_has_a_broken_run():
    assert set(BREAKS) == set(DETECTORS)
    assert {name.split(".")[0] for name in DETECTORS} == set(FAMILIES)


@pytest.mark.parametrize("seed", range(4))
def test_healthy_run_triggers_nothing(synth, seed):
    hparams = {**synth.hparams, "kl_controller": "adaptive"}  # so that beta_at_bound is evaluated too
    findings = run_detectors(History.from_points(synth.healthy_points(seed), hparams))
    assert all(f.evaluated for f in findings), [f.evidence for f in findings if not f.evaluated]
    assert not [f.name for f in findings if f.triggered], [f.evidence for f in findings if f.triggered]


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_detector_fires_on_its_broken_run(synth, name):
    points = synth.healthy_points()
    BREAKS[name](points, synth)
    finding = DETECTORS[name](_history(points, synth.hparams))
    assert finding.evaluated and finding.triggered, finding.evidence
    assert finding.name == name and finding.iteration is not None
    assert "iteration" in finding.evidence and finding.causes and finding.fixes


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_first_trigger_is_the_same_online(synth, name):
    """Signals use only past points: the history cut at the first trigger fires there, and one point earlier not."""
    points = synth.healthy_points()
    BREAKS[name](points, synth)
    full = _history(points, synth.hparams)
    first = DETECTORS[name](full).iteration

    def cut(last: int) -> History:
        kept = {tag: {k: v for k, v in pts.items() if k <= last} for tag, pts in points.items()}
        return History.from_points({tag: pts for tag, pts in kept.items() if pts}, full.hparams)

    assert DETECTORS[name](cut(first)).iteration == first
    assert not DETECTORS[name](cut(first - 1)).triggered


def test_missing_metrics_are_not_evaluated():
    findings = run_detectors(History())
    assert len(findings) == len(DETECTORS)
    assert not any(f.evaluated or f.triggered for f in findings)
    assert all(f.evidence.startswith("not evaluated") for f in findings)
    by_name = {f.name: f.evidence for f in findings}
    assert by_name["reward_hacking.ensemble_disagreement"].endswith("(a reward-model ensemble)")


def test_fixed_controller_skips_beta_at_bound(synth):
    f = DETECTORS["kl_trouble.beta_at_bound"](History.from_points(synth.healthy_points(), synth.hparams))
    assert not f.evaluated and "fixed" in f.evidence


def test_fixed_controller_skips_beta_at_bound_though_the_module_logs_its_flag(synth):
    # a real run's hparams.yaml: the kl group; the module logs objective/kl_coef_at_bound (0) under every controller
    points = synth.healthy_points()
    synth.set_series(points, "objective/kl_coef_at_bound", np.zeros(len(t)))
    hparams = {"kl": {"controller": "fixed", "coef": 0.05}}
    f = DETECTORS["kl_trouble.beta_at_bound"](History.from_points(points, hparams))
    assert not f.evaluated and "kl.controller is fixed" in f.evidence


@pytest.mark.parametrize("n", [1, 2, 5])
def test_short_runs_and_undefined_figures_read_as_words_not_nan(synth, n):
    """Trends need 3 points (some a window of 10 or 20), and a share of a baseline a nonzero baseline."""
    points = synth.healthy_points(n=n)
    synth.set_series(points, "diversity/distinct_2", np.zeros(n))
    findings = run_detectors(History.from_points(points, {**synth.hparams, "kl_controller": "adaptive"}))
    for f in findings:
        assert "nan" not in f.evidence.lower() and "None" not in f.evidence, f.evidence
    evidence = {f.name: f.evidence for f in findings}
    assert "(sqrt(KL) trend: too few points yet), sqrt(KL) not rising" in evidence["reward_hacking.kl_outpaces_reward"]
    diversity = evidence["mode_collapse.across_input_diversity"]
    assert diversity.endswith(f" 0 against 0 (its first {min(n, 5)} point(s))")  # no share of a baseline of 0


def test_gold_detectors_say_there_is_no_gold_judge(synth):
    points = {tag: v for tag, v in synth.healthy_points().items() if "gold" not in tag}
    findings = {f.name: f for f in run_detectors(History.from_points(points, synth.hparams))}
    for name in GOLD_DETECTORS:
        assert not findings[name].evaluated and findings[name].evidence == "not evaluated: no gold judge for this data"
    assert all(f.evaluated for name, f in findings.items() if name not in GOLD_DETECTORS | {"kl_trouble.beta_at_bound"})


def test_gold_free_is_what_the_detectors_need(synth):
    assert {name for name in DETECTORS if not gold_free(name)} == GOLD_DETECTORS


def test_without_gold_the_detectors_see_a_run_without_a_judge(synth):
    """gold=False: the gold detectors are not evaluated, and the others conclude exactly as on the run's history
    with the gold tags removed (so a warning measured on the world means the same on a run without a judge)."""
    points = synth.healthy_points()
    _gold_peaks_then_falls(points, synth)
    _audit_peaks_then_falls(points, synth)
    h = History.from_points(points, synth.hparams)
    blind = run_detectors(h, gold=False)
    stripped = run_detectors(History.from_points({k: v for k, v in points.items() if k not in GOLD_TAGS}, h.hparams))
    assert blind == stripped
    by_name = {f.name: f for f in blind}
    assert all(not by_name[name].evaluated for name in GOLD_DETECTORS)
    assert by_name["reward_hacking.audit_decline"].triggered
    assert {f.name for f in run_detectors(h) if f.triggered} >= {"reward_hacking.gold_divergence"}


def test_audit_decline_needs_the_proxy_to_still_prefer_the_policy(synth):
    points = synth.healthy_points()
    _audit_peaks_then_falls(points, synth)
    synth.set_series(points, "eval/proxy_win_rate", np.full(6, 0.4))  # the proxy agrees the policy got worse
    assert not DETECTORS["reward_hacking.audit_decline"](History.from_points(points)).triggered
    # 20 labels: a fall from 0.72 to 0.5 is within noise
    synth.set_series(points, "eval/proxy_win_rate", np.full(6, 0.8))
    synth.set_series(points, "eval/audit_labels", np.full(6, 20.0))
    assert not DETECTORS["reward_hacking.audit_decline"](History.from_points(points)).triggered


def test_beta_at_bound_reads_the_modules_flag(synth):
    points = synth.healthy_points()
    synth.set_series(points, "objective/kl_coef_at_bound", (t >= 30).astype(float))
    f = DETECTORS["kl_trouble.beta_at_bound"](History.from_points(points))  # no hparams needed
    assert f.triggered and f.iteration == 32 and f.active


def test_thresholds_override_and_validate(synth):
    h = History.from_points(synth.healthy_points(), synth.hparams)
    blowup = {f.name: f for f in run_detectors(h, {"kl_trouble.kl_blowup": {"bound": 1.0}})}["kl_trouble.kl_blowup"]
    assert blowup.triggered
    with pytest.raises(ValueError, match="unknown detector"):
        run_detectors(h, {"kl_trouble.nope": {}})
    with pytest.raises(TypeError):
        run_detectors(h, {"kl_trouble.kl_blowup": {"nope": 1.0}})


def test_trend_slope_and_t_statistic():
    steps = np.arange(6)
    slope, t_stat = trend(steps, np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0]), 3)
    assert np.isnan(slope[:2]).all() and np.allclose(slope[2:], 2.0) and np.isinf(t_stat[2:]).all()
    # y = 0, 1, 0 at x = 0, 1, 2: slope 0. Expanding fit of 0, 1, 0, 3: Sxx = 5, Sxy = 4, Syy = 6, so the slope is
    # 4/5, the residual sum of squares 6 - 0.8 * 4 = 2.8 and t = 0.8 / sqrt(2.8 / (4 - 2) / 5).
    slope, t_stat = trend(np.arange(4), np.array([0.0, 1.0, 0.0, 3.0]), None)
    assert slope[2] == pytest.approx(0.0, abs=1e-12) and t_stat[2] == 0.0
    assert slope[3] == pytest.approx(0.8) and t_stat[3] == pytest.approx(0.8 / np.sqrt(2.8 / 2 / 5))


def test_trailing_mean_and_sustained():
    assert np.allclose(trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    assert sustained(np.array([True, True, False, True, True, True]), 2).tolist() == [0, 1, 0, 0, 1, 1]


def _dpo_points(kl: np.ndarray) -> dict[str, dict[int, float]]:
    """A DPO run's tags: dpo/loss every 10 steps, the held-out evaluation (eval/*, with eval/kl) every 50; no
    objective/* (DPO samples nothing in training)."""
    evals = np.arange(49, 50 * len(kl), 50)
    rise = 1.0 - np.exp(-evals / 150.0)
    per_eval = {
        "eval/gold_reward": 1.2 + 0.8 * rise,
        "eval/sft_gold_reward": np.full(len(evals), 1.2),
        "eval/proxy_reward": 0.6 * rise,
        "eval/sft_proxy_reward": np.zeros(len(evals)),
        "eval/kl": kl,
    }
    points = {tag: dict(zip(map(int, evals), map(float, v), strict=True)) for tag, v in per_eval.items()}
    points["dpo/loss"] = {step: 0.69 - 1e-4 * step for step in range(0, 50 * len(kl), 10)}
    return points


#: A DPO run's hparams.yaml: beta is the implicit reward's scale (and betas Adam's), no PPO kl group.
DPO_HPARAMS = {"beta": 0.01, "label_smoothing": 0.0, "loss": "sigmoid", "lr": 3e-4, "betas": [0.9, 0.95]}


def test_a_dpo_run_is_read_on_eval_kl_and_its_beta_is_no_kl_coefficient():
    findings = {f.name: f for f in run_detectors(History.from_points(_dpo_points(np.linspace(1, 9, 8)), DPO_HPARAMS))}
    for name in ("kl_trouble.kl_blowup", "kl_trouble.negative_kl", "reward_hacking.kl_outpaces_reward"):
        assert findings[name].evaluated and not findings[name].triggered and "eval/kl" in findings[name].evidence, name
    for name in ("kl_trouble.no_kl_penalty", "kl_trouble.beta_at_bound"):  # beta 0.01 is no (tiny) KL penalty
        assert not findings[name].evaluated and "a DPO run" in findings[name].evidence, name
    assert findings["reward_hacking.gold_divergence"].evaluated  # on eval/proxy_reward and eval/gold_reward
    # Known by its hparams alone too (a run whose dpo/loss was not kept), and by dpo/loss alone (no hparams.yaml).
    points = _dpo_points(np.linspace(1, 9, 8))
    only_eval = {tag: v for tag, v in points.items() if tag != "dpo/loss"}
    for h in (History.from_points(only_eval, DPO_HPARAMS), History.from_points(points)):
        assert "a DPO run" in DETECTORS["kl_trouble.no_kl_penalty"](h).evidence


def test_a_dpo_runs_kl_blowup_and_negative_kl_fire_on_eval_kl():
    blown = DETECTORS["kl_trouble.kl_blowup"](History.from_points(_dpo_points(np.linspace(5, 40, 8)), DPO_HPARAMS))
    assert blown.triggered and blown.evidence.startswith("at iteration 399: eval/kl 35 nats (mean of 3)")
    negative = DETECTORS["kl_trouble.negative_kl"](History.from_points(_dpo_points(np.full(8, -0.5)), DPO_HPARAMS))
    assert negative.triggered and "mean eval/kl -0.5" in negative.evidence


def test_a_ppo_run_reads_objective_kl_though_it_logs_eval_kl_too(synth):
    points = synth.healthy_points()
    synth.set_series(points, "objective/kl", np.full(len(t), -0.3))
    points["eval/kl"] = {step: 4.0 for step in points["eval/gold_reward"]}
    f = DETECTORS["kl_trouble.negative_kl"](History.from_points(points, synth.hparams))
    assert f.triggered and "mean objective/kl -0.3" in f.evidence
    findings = {f.name: f for f in run_detectors(History.from_points(points, synth.hparams))}
    assert findings["kl_trouble.no_kl_penalty"].evaluated  # a PPO run's kl_coef is read as before


def test_a_dpo_runs_gold_divergence_reads_its_implicit_reward():
    """DPO climbs its implicit reward: the held-out pairs' margin rising while the gold falls from its peak is the
    over-optimisation, even where the reward model's proxy falls with the gold (measured: failures/dpo_small_beta)."""
    gold = np.array([1.19, 1.82, 2.25, 1.78, 1.72, 1.53, 1.50, 1.49])  # seed 1 of failures/dpo_small_beta
    points = _dpo_points(np.linspace(5, 12, 8))
    evals = sorted(points["eval/gold_reward"])
    points["eval/gold_reward"] = dict(zip(evals, gold, strict=True))
    points["eval/proxy_reward"] = dict(zip(evals, 0.3 * gold, strict=True))  # the reward model agrees with the gold
    margins = dict(zip(evals, np.linspace(0.006, 0.033, 8), strict=True))
    f = DETECTORS["reward_hacking.gold_divergence"](History.from_points({**points, "rewards/val_margins": margins}))
    assert f.triggered and f.iteration == 299 and f.evidence.startswith("at iteration 299: rewards/val_margins")
    healthy = _dpo_points(np.linspace(1, 2, 8))  # gold rising to the end (the packaged dpo's shape)
    healthy["rewards/val_margins"] = margins
    f = DETECTORS["reward_hacking.gold_divergence"](History.from_points(healthy, DPO_HPARAMS))
    assert f.evaluated and not f.triggered and "rewards/val_margins" in f.evidence
    # Without the implicit reward's tag, the reward model's proxy (which falls with the gold here) is read.
    f = DETECTORS["reward_hacking.gold_divergence"](History.from_points(points, DPO_HPARAMS))
    assert f.evaluated and not f.triggered and "eval/proxy_reward" in f.evidence
