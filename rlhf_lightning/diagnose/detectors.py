"""Pure detectors of what goes wrong in a PPO run, over a run's metric :class:`History`.

Each detector returns one :class:`Finding`. It computes a boolean signal at every point of its metrics (using only
the points up to that one, so the online callback and the offline report agree on when it first fired) and reports
the first point where the signal holds, whether it still holds at the end, and the numbers behind it. A detector
whose metrics the run did not log returns a finding with ``evaluated=False`` instead of failing.

Trends are least-squares slopes with their t-statistic (slope / standard error), so "rising" means rising beyond
the run's own noise, whatever the units of the reward. Thresholds are keyword arguments with documented defaults;
:func:`run_detectors` takes overrides per detector name.

Families (the prefix of a finding's name): ``reward_hacking`` (the policy exploits the proxy reward model),
``mode_collapse``, ``kl_trouble`` (a mis-set KL penalty) and ``annotation_shift`` (the reward model learned the
annotators' biases, so its reward was wrong from the start).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from rlhf_lightning import tags
from rlhf_lightning.diagnose.history import History, Series

FAMILIES = ("reward_hacking", "mode_collapse", "kl_trouble", "annotation_shift")


@dataclass(frozen=True)
class Finding:
    """What one detector concluded about a run.

    Fields:
        name: ``family.detector``, e.g. ``reward_hacking.gold_divergence``.
        title: the symptom in words.
        evaluated: False when the run lacks the detector's metrics (``evidence`` says which).
        triggered: the signal held at some iteration.
        iteration: the first iteration where it held (None when it never did).
        active: it holds at the last iteration seen.
        evidence: the numbers behind the verdict (at the first trigger, else at the last point).
        causes, fixes: likely causes and what to try, most likely first.
    """

    name: str
    title: str
    evaluated: bool
    triggered: bool
    iteration: int | None
    active: bool
    evidence: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]

    @property
    def family(self) -> str:
        """The family of the finding: one of :data:`FAMILIES`."""
        return self.name.split(".", 1)[0]


#: What a detector can need beyond the policy's own samples, and what that is in a real run. A detector that needs
#: nothing of these reads only the policy's samples (lengths, diversity, entropy).
NEEDS = {
    "gold": "the gold judge (only the embedded world has one)",
    "proxy": "the reward model's scores",
    "reference": "the reference (SFT) policy: the KL to it and the penalty's coefficient",
    "ensemble": "a reward-model ensemble",
    "labels": "a few hundred fresh preference labels, policy against SFT samples (an audit)",
}


@dataclass(frozen=True)
class _Spec:
    name: str
    title: str
    causes: tuple[str, ...]
    fixes: tuple[str, ...]
    needs: tuple[str, ...] = ()  # keys of NEEDS


Detector = Callable[..., Finding]
#: Every detector by finding name, in report order.
DETECTORS: dict[str, Detector] = {}
#: What each detector needs (keys of :data:`NEEDS`), by finding name.
DETECTOR_NEEDS: dict[str, tuple[str, ...]] = {}


def _detector(spec: _Spec) -> Callable[[Detector], Detector]:
    if unknown := set(spec.needs) - set(NEEDS):
        raise ValueError(f"{spec.name} needs {sorted(unknown)}: not in NEEDS")

    def register(fn: Detector) -> Detector:
        DETECTORS[spec.name] = fn
        DETECTOR_NEEDS[spec.name] = spec.needs
        return fn

    return register


# -- numerical helpers ---------------------------------------------------------------------------------------------


def trend(steps: np.ndarray, values: np.ndarray, window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope (per step) and its t-statistic at every point, over the trailing ``window`` points.

    ``window=None`` fits every point so far (an expanding window). Points with fewer than 3 points to fit (or fewer
    than ``window``) get NaN. A perfect line has an infinite t-statistic of the slope's sign.

    Args:
        steps: (n,) the x of each point.
        values: (n,) the y of each point.
    Returns:
        slope, t: (n,) each.
    """
    n = len(values)
    # Centred first so that the sums of squares below lose no precision to large offsets.
    x = np.asarray(steps, dtype=np.float64) - float(np.mean(steps)) if n else np.zeros(0)
    y = np.asarray(values, dtype=np.float64) - float(np.mean(values)) if n else np.zeros(0)
    cum = [np.concatenate([[0.0], np.cumsum(a)]) for a in (np.ones(n), x, y, x * x, x * y, y * y)]
    end = np.arange(1, n + 1)
    start = np.zeros(n, dtype=np.int64) if window is None else np.maximum(end - window, 0)
    k, sx, sy, sxx, sxy, syy = (c[end] - c[start] for c in cum)
    slope = np.full(n, np.nan)
    t = np.full(n, np.nan)
    ok = (k >= 3) if window is None else (k >= max(window, 3))
    with np.errstate(divide="ignore", invalid="ignore"):
        cxx = sxx - sx * sx / k
        cxy = sxy - sx * sy / k
        cyy = syy - sy * sy / k
        b = cxy / cxx
        resid = np.maximum(cyy - b * cxy, 0.0)
        se = np.sqrt(resid / (k - 2) / cxx)
        # A residual at rounding level is a perfect line: infinite t of the slope's sign (0 for a flat line).
        tt = np.where(se > 1e-12 * np.abs(b), b / se, np.sign(b) * np.inf)
        tt = np.where(b == 0, 0.0, tt)
    ok &= cxx > 0
    slope[ok], t[ok] = b[ok], tt[ok]
    return slope, t


def trailing_mean(values: np.ndarray, k: int) -> np.ndarray:
    """Mean of the last ``k`` points at every point (of all points so far before the k-th). (n,) -> (n,)."""
    c = np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
    end = np.arange(1, len(values) + 1)
    start = np.maximum(end - max(k, 1), 0)
    return (c[end] - c[start]) / (end - start)


def sustained(mask: np.ndarray, k: int) -> np.ndarray:
    """True where ``mask`` held at this point and the ``k - 1`` before it. (n,) bool -> (n,) bool."""
    run = np.zeros(len(mask), dtype=np.int64)
    for i, m in enumerate(mask):
        run[i] = (run[i - 1] + 1 if i else 1) if m else 0
    return run >= max(k, 1)


def _aligned(h: History, *names: str) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """The steps all of ``names`` share and each one's values there; None when a tag is missing or none are shared."""
    series = [h.get(name) for name in names]
    if any(s is None for s in series):
        return None
    steps = series[0].steps
    for s in series[1:]:
        steps = np.intersect1d(steps, s.steps)
    if not len(steps):
        return None
    return steps, [s.values[np.searchsorted(s.steps, steps)] for s in series]


def _baseline(h: History, tag: str | None, series: Series, first_k: int) -> tuple[float, str]:
    """The reference level of a metric: the first value of ``tag`` (an SFT measurement) if logged, else the mean of
    the series' first ``first_k`` points (iteration 0 samples the SFT policy itself). Returns it and its source."""
    ref = h.get(tag) if tag else None
    if ref is not None:
        return float(ref.values[0]), tag
    k = min(max(first_k, 1), len(series.values))
    return float(np.mean(series.values[:k])), f"its first {k} point(s)"


def _result(spec: _Spec, steps: np.ndarray, signal: np.ndarray, describe: Callable[[int], str]) -> Finding:
    hits = np.flatnonzero(signal)
    if hits.size:
        i = int(hits[0])
        evidence = f"{describe(i)}; held at {hits.size} of {len(signal)} points"
        first, active = int(steps[i]), bool(signal[-1])
        return Finding(spec.name, spec.title, True, True, first, active, evidence, spec.causes, spec.fixes)
    evidence = describe(len(signal) - 1) if len(signal) else "no points"
    return Finding(spec.name, spec.title, True, False, None, False, evidence, spec.causes, spec.fixes)


def _against_start(
    spec: _Spec, h: History, tag: str, smooth: int, fires: Callable[[np.ndarray, float], np.ndarray],
    describe: Callable[[float, float], str],
) -> Finding:  # fmt: skip
    """A detector on one per-iteration metric against its start: ``fires(trailing mean of smooth points, mean of the
    first smooth points)`` gives the signal (arrays), ``describe(trailing mean, start)`` the evidence at a point."""
    s = h.get(tag)
    if s is None:
        # the need in words too, where the tag alone does not say it (an ensemble's disagreement)
        return not_evaluated(spec, _needs(tag) + "".join(f" ({NEEDS[n]})" for n in spec.needs if n == "ensemble"))
    ts = trailing_mean(s.values, smooth)
    base, _ = _baseline(h, None, s, smooth)
    evidence = lambda i: f"at iteration {s.steps[i]}: {describe(float(ts[i]), base)}"  # noqa: E731
    return _result(spec, s.steps, fires(ts, base), evidence)


def not_evaluated(spec: _Spec, why: str) -> Finding:
    """The finding of a detector that could not run on this history."""
    return Finding(spec.name, spec.title, False, False, None, False, f"not evaluated: {why}", spec.causes, spec.fixes)


def _needs(*names: str) -> str:
    return "needs " + " and ".join(names)


def _f(x: float) -> str:
    return f"{x:.3g}"


def _trend(t: float) -> str:
    """A trend's t-statistic in words: NaN means too few points to fit a line (fewer than 3, or than its window)."""
    return "trend: too few points yet" if np.isnan(t) else f"trend t={_f(t)}"


def kl_series(h: History) -> tuple[str, Series] | None:
    """The run's KL to the reference and its tag: the rollout's ``objective/kl`` (every RL iteration), else the
    held-out ``eval/kl`` (at each evaluation): a DPO run samples nothing in training and logs only the latter. None
    when the run logged neither."""
    for tag in (tags.KL, tags.EVAL_KL):
        s = h.get(tag)
        if s is not None:
            return tag, s
    return None


def is_dpo(h: History) -> bool:
    """Whether the run is a DPO run (it logged ``dpo/loss``, or its hparams are DPOModule's: a ``beta`` and a
    ``loss`` and no PPO ``kl`` group). Its ``beta`` scales the implicit reward (always > 0); it is no KL penalty."""
    hp = h.hparams
    dpo_hparams = "beta" in hp and "loss" in hp and "kl" not in hp and "kl_coef" not in hp
    return h.get(tags.DPO_LOSS) is not None or dpo_hparams


#: Why the detectors that compare with the gold judge's reward did not run (a user's own data has no judge).
NO_GOLD = "no gold judge for this data"


def has_gold(h: History) -> bool:
    """Whether the run logged a gold reward (rollout or held-out): only runs on the embedded world have a judge."""
    return h.get(tags.GOLD_REWARD) is not None or h.get(tags.EVAL_GOLD_REWARD) is not None


# -- reward hacking ------------------------------------------------------------------------------------------------

_RM_EXPLOITED = "the policy found inputs the reward model over-scores (reward-model exploitation, over-optimisation)"
_MORE_KL = "a larger or adaptive KL coefficient (kl.controller: adaptive with a kl.target), or fewer iterations"
_ENSEMBLE = "a conservative ensemble reward (ensemble_size > 1 in the reward phase, rewards.ensemble_k > 0 in PPO)"
_BETTER_RM = "a better reward model: more or cleaner preference pairs, de-biased annotators"

GOLD_DIVERGENCE = _Spec(
    "reward_hacking.gold_divergence",
    "proxy reward rises while the gold reward falls",
    (_RM_EXPLOITED, "the KL penalty is too weak to keep the policy where the reward model is accurate"),
    ("keep the checkpoint of the gold (or conservative-proxy) peak (RLHFDiagnostics save_best)", _MORE_KL, _ENSEMBLE),
    ("gold", "proxy"),
)


@_detector(GOLD_DIVERGENCE)
def gold_divergence(
    h: History,
    window: int = 20,
    t_min: float = 3.0,
    smooth: int = 10,
    drop_frac: float = 0.5,
    eval_window: int = 5,
    eval_smooth: int = 1,
) -> Finding:
    """Proxy up, gold down: the over-optimisation signature.

    Fires where, over the trailing ``window`` points, the proxy's slope has t > ``t_min`` and the gold's t <
    ``-t_min``; or where the gold (trailing mean of ``smooth`` points) has lost at least ``drop_frac`` of its gain
    from the start to its peak while the proxy is higher than at the gold's peak (and both trends still point that
    way). Uses the rollout's gold and proxy (per iteration), else the evaluation's. Both tests are strict because a
    rollout's mean gold is noisy (docs/failure_modes.md, "Why these defaults").

    A DPO run optimises its implicit reward, not a reward model's: its proxy is the implicit-reward margin on the
    held-out pairs (``rewards/val_margins``; ``eval/proxy_reward`` when that is missing), against ``eval/gold_reward``.
    Evaluations are few (a handful per run) and each is a mean over every held-out prompt, so on evaluation points
    the trends span ``eval_window`` points and the gold is smoothed over ``eval_smooth``.
    """
    if not has_gold(h):
        return not_evaluated(GOLD_DIVERGENCE, NO_GOLD)
    rollout = () if is_dpo(h) else ((tags.PROXY_REWARD, tags.GOLD_REWARD),)
    implicit = ((tags.DPO_VAL_MARGINS, tags.EVAL_GOLD_REWARD),) if is_dpo(h) else ()
    for proxy_tag, gold_tag in (*rollout, *implicit, (tags.EVAL_PROXY_REWARD, tags.EVAL_GOLD_REWARD)):
        pair = _aligned(h, proxy_tag, gold_tag)
        if pair is not None and len(pair[0]) >= 3:
            break
    else:
        return not_evaluated(GOLD_DIVERGENCE, _needs(tags.GOLD_REWARD, tags.PROXY_REWARD) + " (>= 3)")
    steps, (proxy, gold) = pair
    if gold_tag == tags.EVAL_GOLD_REWARD:
        window, smooth = eval_window, eval_smooth
    w = min(window, len(steps))
    _, tp = trend(steps, proxy, w)
    _, tg = trend(steps, gold, w)
    gs, ps = trailing_mean(gold, smooth), trailing_mean(proxy, smooth)
    peak_at = np.array([int(np.argmax(gs[: i + 1])) for i in range(len(gs))])
    peak = gs[peak_at]
    gain, drop, proxy_since = peak - gs[0], peak - gs, ps - ps[peak_at]
    by_slope = (tp > t_min) & (tg < -t_min)
    by_peak = (gain > 0) & (drop > 0) & (drop >= drop_frac * gain) & (proxy_since > 0) & (tp > 0) & (tg < 0)
    signal = by_slope | by_peak

    means = f" (means of {smooth} points)" if smooth > 1 else ""

    def describe(i: int) -> str:
        return (
            f"at iteration {steps[i]}{means}: {proxy_tag} {_f(ps[i])} ({_trend(tp[i])}, "
            f"{proxy_since[i]:+.3g} since the gold peak), {gold_tag} {_f(gs[i])} ({_trend(tg[i])}), {_f(drop[i])} "
            f"below its peak {_f(peak[i])} at iteration {steps[peak_at[i]]}"
        )

    return _result(GOLD_DIVERGENCE, steps, signal, describe)


KL_OUTPACES_REWARD = _Spec(
    "reward_hacking.kl_outpaces_reward",
    "KL keeps growing while the reward gained per unit of sqrt(KL) collapses",
    (_RM_EXPLOITED + "; past the reward model's reliable region, more KL buys no reward",),
    (_MORE_KL, _ENSEMBLE, "stop earlier: keep the checkpoint before the gain fell"),
    ("proxy", "reference"),
)


@_detector(KL_OUTPACES_REWARD)
def kl_outpaces_reward(
    h: History,
    window: int = 20,
    t_min: float = 2.0,
    min_growth: float = 0.05,
    gain_frac: float = 0.25,
    patience: int = 3,
) -> Finding:
    """Reward gained per unit of sqrt(KL), now against when the KL started to grow.

    The rollout's proxy and ``objective/kl``, else (a DPO run) the held-out ``eval/proxy_reward`` and ``eval/kl``.
    Reward grows about linearly in sqrt(KL) while the proxy is trustworthy (the scaling of reward-model
    over-optimisation), so d reward / d sqrt(KL) stays roughly constant on a healthy run. Fires where sqrt(KL) rises
    (trailing-``window`` slope t > ``t_min``, and by at least ``min_growth`` of its level over the window, so that
    noise on a settled KL is no growth) and that gain (ratio of the two trailing slopes) is below ``gain_frac``
    times the gain at the first window where sqrt(KL) rose (below 0 if that gain was not positive). A 10-point window
    let the noise of one rollout's reward make the gain negative for a few iterations of a healthy run, and even
    with 20 one healthy run crossed the line at a single iteration: the condition must hold ``patience`` iterations
    in a row.
    """
    for reward_tag, kl_tag in ((tags.PROXY_REWARD, tags.KL), (tags.EVAL_PROXY_REWARD, tags.EVAL_KL)):
        pair = _aligned(h, reward_tag, kl_tag)
        if pair is not None:
            break
    else:
        return not_evaluated(KL_OUTPACES_REWARD, _needs(tags.PROXY_REWARD, tags.KL) + f" (or {tags.EVAL_PROXY_REWARD}"
                             f" and {tags.EVAL_KL})")  # fmt: skip
    steps, (reward, kl) = pair
    root = np.sqrt(np.clip(kl, 0.0, None))
    sr, _ = trend(steps, reward, window)
    sk, tk = trend(steps, root, window)
    with np.errstate(invalid="ignore"):
        rising = (tk > t_min) & (sk * window >= min_growth * root)
    with np.errstate(divide="ignore", invalid="ignore"):
        gain = np.where(rising, sr / sk, np.nan)
    first = np.flatnonzero(rising)
    base = float(gain[first[0]]) if first.size else np.nan
    signal = sustained(rising & (gain < gain_frac * max(base, 0.0)), patience)

    def describe(i: int) -> str:
        # The gain is only defined where sqrt(KL) rises, and its reference once it first rose.
        gains = (
            f"reward gain per sqrt(KL) {_f(gain[i])} against {_f(base)} when the KL started to grow"
            if rising[i]
            else "sqrt(KL) not rising"
        )
        return f"at iteration {steps[i]}: {kl_tag} {_f(kl[i])} (sqrt(KL) {_trend(tk[i])}), {gains}"

    return _result(KL_OUTPACES_REWARD, steps, signal, describe)


LENGTH_CORRELATION = _Spec(
    "reward_hacking.length_correlation",
    "the proxy reward increasingly follows response length",
    ("the reward model rewards length (length-biased preference data), and the policy learned to ramble",),
    ("length-normalise or length-penalise the reward", _BETTER_RM, _MORE_KL),
    ("proxy",),
)


@_detector(LENGTH_CORRELATION)
def length_correlation(h: History, smooth: int = 5, corr_min: float = 0.5, rise: float = 0.2) -> Finding:
    """Rising score-length correlation within the rollouts.

    Fires where the trailing mean (``smooth`` points) of ``rollout/score_length_corr`` is at least ``corr_min`` and
    at least ``rise`` above its mean over the first ``smooth`` points.
    """
    s = h.get(tags.SCORE_LENGTH_CORR)
    if s is None:
        return not_evaluated(LENGTH_CORRELATION, _needs(tags.SCORE_LENGTH_CORR))
    cs = trailing_mean(s.values, smooth)
    base, _ = _baseline(h, None, s, smooth)
    signal = (cs >= corr_min) & (cs - base >= rise)

    def describe(i: int) -> str:
        return f"at iteration {s.steps[i]}: score-length correlation {_f(cs[i])} (mean of {smooth}), from {_f(base)}"

    return _result(LENGTH_CORRELATION, s.steps, signal, describe)


ENSEMBLE_DISAGREEMENT = _Spec(
    "reward_hacking.ensemble_disagreement",
    "the reward-model ensemble disagrees more and more on the policy's samples",
    ("the policy moved where the reward models were not trained (out of distribution), so their scores diverge",),
    ("raise ensemble_k (penalise disagreement)", _MORE_KL, "keep the checkpoint before the disagreement grew"),
    ("ensemble",),
)


@_detector(ENSEMBLE_DISAGREEMENT)
def ensemble_disagreement(h: History, smooth: int = 5, ratio: float = 2.0) -> Finding:
    """Rising ensemble disagreement: fires where the trailing mean (``smooth`` points) of ``objective/ensemble_std``
    exceeds ``ratio`` times its mean over the first ``smooth`` points."""
    return _against_start(
        ENSEMBLE_DISAGREEMENT, h, tags.ENSEMBLE_STD, smooth, lambda cs, base: cs > ratio * base,
        lambda cs, base: f"ensemble std {_f(cs)} (mean of {smooth}), {_f(base)} at the start",
    )  # fmt: skip


PROXY_OUT_OF_RANGE = _Spec(
    "reward_hacking.proxy_out_of_range",
    "the reward model scores the policy's samples far outside the range it was calibrated on",
    (
        _RM_EXPLOITED + "; the reward model was fit and normalised on SFT-like responses, and its scores far above "
        "them are extrapolation, not evidence",
    ),
    (_MORE_KL, _ENSEMBLE, "keep the checkpoint from before the proxy left its range"),
    ("proxy",),
)


@_detector(PROXY_OUT_OF_RANGE)
def proxy_out_of_range(h: History, max_shift: float = 1.5, smooth: int = 5) -> Finding:
    """The rollout's mean proxy reward (trailing mean of ``smooth`` points) more than ``max_shift`` above its first
    ``smooth`` points. The reward model is normalised to mean 0 and std 1 on the SFT policy's samples
    (models/reward.py), so ``max_shift`` is in standard deviations of the SFT policy's scores: a mean that far out is
    a policy the reward model never saw the like of in training."""
    return _against_start(
        PROXY_OUT_OF_RANGE, h, tags.PROXY_REWARD, smooth, lambda ps, base: ps - base > max_shift,
        lambda ps, base: f"proxy {_f(ps)} (mean of {smooth}), {ps - base:+.3g} from the start",
    )  # fmt: skip


LENGTH_DRIFT = _Spec(
    "reward_hacking.length_drift",
    "the policy's responses grow much longer than the SFT policy's",
    ("the reward model pays for length (a length-biased reward model, or a missing length penalty)",),
    ("length-normalise or length-penalise the reward (length_debias)", _BETTER_RM, _MORE_KL),
)


@_detector(LENGTH_DRIFT)
def length_drift(h: History, ratio: float = 1.4, smooth: int = 5) -> Finding:
    """``rollout/length_mean`` (trailing mean of ``smooth`` points) above ``ratio`` times its first ``smooth``
    points (iteration 0 samples the SFT policy): no reward model needed, only the policy's own samples."""
    return _against_start(
        LENGTH_DRIFT, h, tags.LENGTH_MEAN, smooth, lambda ls, base: ls > ratio * base,
        lambda ls, base: f"responses {_f(ls)} tokens (mean of {smooth}), {_f(base)} at the start",
    )  # fmt: skip


AUDIT_DECLINE = _Spec(
    "reward_hacking.audit_decline",
    "fresh labels prefer the policy less than they did, while the reward model still prefers it",
    (_RM_EXPLOITED, "the reward model learned the annotators' biases (the audit's raters do not share them)"),
    ("keep the checkpoint of the audit's peak", _MORE_KL, _BETTER_RM),
    ("labels", "proxy"),
)


@_detector(AUDIT_DECLINE)
def audit_decline(h: History, z: float = 1.5) -> Finding:
    """At an evaluation, the audit's win rate against SFT (``eval/audit_win_rate``, the mean of
    ``eval/audit_labels`` fresh labels) is more than ``z`` standard errors below its best so far, or below 50% by
    ``z`` standard errors, while the proxy still prefers the policy (``eval/proxy_win_rate`` above 50%). Standard
    errors are binomial; the difference from the best uses both points' errors."""
    triple = _aligned(h, tags.EVAL_AUDIT_WIN_RATE, tags.EVAL_AUDIT_LABELS, tags.EVAL_PROXY_WIN_RATE)
    if triple is None:
        return not_evaluated(AUDIT_DECLINE, _needs(tags.EVAL_AUDIT_WIN_RATE, tags.EVAL_PROXY_WIN_RATE))
    steps, (audit, n, proxy_wins) = triple
    se = np.sqrt(np.clip(audit * (1.0 - audit), 1e-12, None) / np.maximum(n, 1.0))
    best_at = np.array([int(np.argmax(audit[: i + 1])) for i in range(len(audit))])
    best = audit[best_at]
    below_best = best - audit > z * np.sqrt(se**2 + se[best_at] ** 2)
    below_sft = audit < 0.5 - z * se
    signal = (below_best | below_sft) & (proxy_wins > 0.5)

    def describe(i: int) -> str:
        return (
            f"at iteration {steps[i]}: audit win rate {_f(audit[i])} +- {_f(se[i])} ({int(n[i])} labels), best "
            f"{_f(best[i])} at iteration {steps[best_at[i]]}; the proxy prefers the policy on {_f(proxy_wins[i])}"
        )

    return _result(AUDIT_DECLINE, steps, signal, describe)


# -- mode collapse -------------------------------------------------------------------------------------------------

_COLLAPSE = "the policy concentrates on a few high-reward responses (mode collapse), helped by a weak KL penalty"
_ENTROPY_FIX = "an entropy bonus (entropy_coef > 0)"


def _drop(
    spec: _Spec, h: History, candidates: tuple[tuple[str, str | None, bool], ...], frac: float, smooth: int
) -> Finding:
    """Fires where a diversity metric (trailing mean of ``smooth`` points) falls below ``frac`` of its baseline.

    ``candidates``: (tag, SFT-baseline tag or None, inverted) for each metric that measures it; an inverted metric
    (self-BLEU: higher is less diverse) is compared as 1 - value. The earliest trigger among the logged ones wins.
    """
    findings = []
    for tag, baseline_tag, inverted in candidates:
        s = h.get(tag)
        if s is None:
            continue
        values = 1.0 - s.values if inverted else s.values
        s = Series(s.steps, values)
        base, source = _baseline(h, baseline_tag, s, smooth)
        if inverted and baseline_tag and h.get(baseline_tag) is not None:
            base = 1.0 - base
        cs = trailing_mean(values, smooth)
        signal = cs < frac * base
        label = f"1 - {tag}" if inverted else tag

        def describe(i: int, s=s, cs=cs, base=base, source=source, label=label) -> str:
            share = f", {_f(cs[i] / base)} of it" if base else ""  # no share of a baseline of 0
            return f"at iteration {s.steps[i]}: {label} {_f(cs[i])} against {_f(base)} ({source}){share}"

        findings.append(_result(spec, s.steps, signal, describe))
    if not findings:
        return not_evaluated(spec, "needs one of " + ", ".join(c[0] for c in candidates))
    fired = [f for f in findings if f.triggered]
    return min(fired, key=lambda f: f.iteration) if fired else findings[0]


PER_INPUT_DIVERSITY = _Spec(
    "mode_collapse.per_input_diversity",
    "the k samples of one prompt become alike",
    (_COLLAPSE,),
    (_ENTROPY_FIX, _MORE_KL, "a higher sampling temperature in the rollouts"),
)


@_detector(PER_INPUT_DIVERSITY)
def per_input_diversity(h: History, frac: float = 0.4, smooth: int = 1) -> Finding:
    """Per-input diversity below ``frac`` of the SFT policy's: ``diversity/per_input_distinct_2`` against
    ``eval/sft_per_input_distinct_2``, or 1 - ``diversity/per_input_self_bleu`` against the SFT's (each against its
    first evaluation when the SFT value is not logged). Evaluations are sparse, hence ``smooth=1``. ``frac`` sits
    below where a healthy run ends (PPO makes the policy surer; docs/failure_modes.md, "Why these defaults")."""
    return _drop(
        PER_INPUT_DIVERSITY,
        h,
        (
            (tags.PER_INPUT_DISTINCT_2, tags.EVAL_SFT_PER_INPUT_DISTINCT_2, False),
            (tags.PER_INPUT_SELF_BLEU, tags.EVAL_SFT_PER_INPUT_SELF_BLEU, True),
        ),
        frac,
        smooth,
    )


ENTROPY_COLLAPSE = _Spec(
    "mode_collapse.entropy",
    "the policy's entropy collapses",
    (_COLLAPSE,),
    (_ENTROPY_FIX, _MORE_KL, "a lower learning rate"),
)


@_detector(ENTROPY_COLLAPSE)
def entropy_collapse(h: History, frac: float = 0.3, smooth: int = 5) -> Finding:
    """``objective/entropy`` (trailing mean of ``smooth`` points) below ``frac`` of its first ``smooth`` points (the
    first update's minibatches are the SFT policy's own samples). PPO lowers entropy on healthy runs too, hence a
    lower fraction than for diversity."""
    return _drop(ENTROPY_COLLAPSE, h, ((tags.ENTROPY, None, False),), frac, smooth)


ACROSS_INPUT_DIVERSITY = _Spec(
    "mode_collapse.across_input_diversity",
    "responses to different prompts become alike (across-input distinct-2 collapses)",
    (_COLLAPSE + "; late stage: one response fits every prompt",),
    (_ENTROPY_FIX, _MORE_KL, "keep the checkpoint before the collapse"),
)


@_detector(ACROSS_INPUT_DIVERSITY)
def across_input_diversity(h: History, frac: float = 0.5, smooth: int = 5) -> Finding:
    """Rollout ``diversity/distinct_2`` (trailing mean of ``smooth`` points) below ``frac`` of its first points."""
    return _drop(ACROSS_INPUT_DIVERSITY, h, ((tags.DISTINCT_2, None, False),), frac, smooth)


DUPLICATES = _Spec(
    "mode_collapse.duplicates",
    "identical responses to different prompts",
    (_COLLAPSE + "; the reward model scores a generic response highly whatever the prompt",),
    (_ENTROPY_FIX, _MORE_KL, _BETTER_RM + " (prompt-specific pairs)"),
)


@_detector(DUPLICATES)
def duplicates(h: History, smooth: int = 3, max_rate: float = 0.25) -> Finding:
    """``rollout/duplicate_rate`` (trailing mean of ``smooth`` points) reaches ``max_rate``, having started below."""
    s = h.get(tags.DUPLICATE_RATE)
    if s is None:
        return not_evaluated(DUPLICATES, _needs(tags.DUPLICATE_RATE))
    cs = trailing_mean(s.values, smooth)
    base, _ = _baseline(h, None, s, smooth)
    signal = (cs >= max_rate) & (base < max_rate)

    def describe(i: int) -> str:
        return f"at iteration {s.steps[i]}: {_f(cs[i])} of the responses duplicate another prompt's, from {_f(base)}"

    return _result(DUPLICATES, s.steps, signal, describe)


# -- KL trouble ----------------------------------------------------------------------------------------------------

NEGATIVE_KL = _Spec(
    "kl_trouble.negative_kl",
    "the KL estimate is negative for several iterations",
    (
        "the k1 estimator (log p - log p_ref) is unbiased but not positive; a sustained negative mean means the "
        "samples do not come from the policy the log-probabilities are computed for (temperature, top-k/top-p or "
        "padding differ between sampling and scoring), or the reference is not the SFT policy",
    ),
    (
        "sample with temperature 1 and no top-k/top-p, or score at the sampling temperature",
        "a non-negative estimator (kl_estimator: k3 or full)",
    ),
    ("reference",),
)


@_detector(NEGATIVE_KL)
def negative_kl(h: History, window: int = 5, tol: float = 0.05) -> Finding:
    """``objective/kl`` (else ``eval/kl``, :func:`kl_series`): the mean of the last ``window`` points below ``-tol``
    (nats per sequence)."""
    found = kl_series(h)
    if found is None:
        return not_evaluated(NEGATIVE_KL, _needs(tags.KL) + f" (or {tags.EVAL_KL})")
    tag, s = found
    m = trailing_mean(s.values, window)
    signal = (m < -tol) & (np.arange(len(m)) >= window - 1)

    def describe(i: int) -> str:
        return f"at iteration {s.steps[i]}: mean {tag} {_f(m[i])} over the last {window} points"

    return _result(NEGATIVE_KL, s.steps, signal, describe)


KL_BLOWUP = _Spec(
    "kl_trouble.kl_blowup",
    "the KL to the reference blows up",
    (
        "beta too low (or zero) for the learning rate: nothing holds the policy near the reference",
        "too large policy steps (learning rate, epochs, clip range)",
    ),
    (_MORE_KL, "a lower learning rate, fewer ppo_epochs or target_approx_kl"),
    ("reference",),
)


@_detector(KL_BLOWUP)
def kl_blowup(
    h: History,
    bound: float = 30.0,
    growth: float = 3.0,
    window: int = 10,
    floor: float = 10.0,
    smooth: int = 3,
    min_base: float = 2.0,
) -> Finding:
    """``objective/kl`` (trailing mean of ``smooth`` points) above ``bound`` nats, or above ``floor`` and ``growth``
    times what it was ``window`` points earlier (exploding growth) when that earlier level was at least ``min_base``
    nats: every run starts at KL 0 and a healthy one climbs a few nats fast, which is not a blow-up. A run without
    ``objective/kl`` (DPO) is read on ``eval/kl`` (:func:`kl_series`), its points the evaluations."""
    found = kl_series(h)
    if found is None:
        return not_evaluated(KL_BLOWUP, _needs(tags.KL) + f" (or {tags.EVAL_KL})")
    tag, s = found
    ks = trailing_mean(s.values, smooth)
    lag = np.full(len(ks), np.nan)
    if 0 < window < len(ks):
        lag[window:] = ks[:-window]
    with np.errstate(invalid="ignore"):
        signal = (ks > bound) | ((ks > floor) & (lag >= min_base) & (ks >= growth * lag))

    def describe(i: int) -> str:
        before = f", {_f(lag[i])} {window} points earlier" if np.isfinite(lag[i]) else ""
        return f"at iteration {s.steps[i]}: {tag} {_f(ks[i])} nats (mean of {smooth}){before}; bound {_f(bound)}"

    return _result(KL_BLOWUP, s.steps, signal, describe)


BETA_AT_BOUND = _Spec(
    "kl_trouble.beta_at_bound",
    "the adaptive controller's beta sits at kl.min_coef or kl.max_coef",
    (
        "the KL target is out of reach: at kl.max_coef the policy drifts despite the strongest penalty (target too "
        "low or steps too large); at kl.min_coef the KL stays below the target with no penalty at all (target too "
        "high)",
    ),
    ("a reachable kl.target, or wider [kl.min_coef, kl.max_coef]", "a smaller learning rate when beta sits at the max"),
    ("reference",),
)


def kl_hparams(hparams: dict) -> dict:
    """A run's KL settings as ``kl_controller``, ``kl_coef``, ``kl_min``, ``kl_max``: from the PPO module's ``kl``
    group (``controller``, ``coef``, ``min_coef``, ``max_coef``), or as they are in a run of an earlier version,
    which logged them as flat keys."""
    group = hparams.get("kl")
    if not isinstance(group, dict):
        return hparams
    names = {"controller": "kl_controller", "coef": "kl_coef", "min_coef": "kl_min", "max_coef": "kl_max"}
    return {flat: group[key] for key, flat in names.items() if key in group}


#: Why the detectors of a KL coefficient do not read a DPO run.
_DPO_BETA = (
    "a DPO run: its beta scales the implicit reward (always > 0), it is no KL penalty or controller; read "
    "kl_blowup on eval/kl instead"
)


@_detector(BETA_AT_BOUND)
def beta_at_bound(h: History, patience: int = 3, rtol: float = 1e-3) -> Finding:
    """Beta at a bound for ``patience`` iterations in a row: the module's own flag ``objective/kl_coef_at_bound``
    when logged, else ``objective/kl_coef`` within ``rtol`` of hparams' ``kl.min_coef`` or ``kl.max_coef`` (the flat
    ``kl_min`` / ``kl_max`` of older runs); only for an adaptive controller (read from hparams.yaml; a run without
    it is judged by the flag alone)."""
    if is_dpo(h):
        return not_evaluated(BETA_AT_BOUND, _DPO_BETA)
    hp = kl_hparams(h.hparams)
    # The module logs the flag under every controller (always 0 but for the adaptive one): a fixed or annealed beta
    # follows its schedule, and "at its bound" means nothing there.
    if hp.get("kl_controller", "adaptive") != "adaptive":
        why = f"kl.controller is {hp['kl_controller']}, not adaptive: its beta has no bounds to sit at"
        return not_evaluated(BETA_AT_BOUND, why)
    flag = h.get(tags.KL_COEF_AT_BOUND)
    if flag is not None:
        signal = sustained(flag.values > 0.5, patience)

        def describe_flag(i: int) -> str:
            held = "set" if signal[i] else "not set"
            return f"at iteration {flag.steps[i]}: objective/kl_coef_at_bound {held} {patience} iterations in a row"

        return _result(BETA_AT_BOUND, flag.steps, signal, describe_flag)
    if "kl_controller" not in hp:
        return not_evaluated(BETA_AT_BOUND, "no kl_controller in hparams (applies to the adaptive controller)")
    s = h.get(tags.KL_COEF)
    if s is None or "kl_min" not in hp or "kl_max" not in hp:
        return not_evaluated(BETA_AT_BOUND, _needs(tags.KL_COEF, "kl_min/kl_max in hparams"))
    lo, hi = float(hp["kl_min"]), float(hp["kl_max"])
    at = np.isclose(s.values, lo, rtol=rtol, atol=0.0) | np.isclose(s.values, hi, rtol=rtol, atol=0.0)
    signal = sustained(at, patience)

    def describe(i: int) -> str:
        return f"at iteration {s.steps[i]}: beta {_f(s.values[i])}, bounds [{_f(lo)}, {_f(hi)}]"

    return _result(BETA_AT_BOUND, s.steps, signal, describe)


NO_KL_PENALTY = _Spec(
    "kl_trouble.no_kl_penalty",
    "the KL penalty is off while the KL grows",
    ("kl.coef 0 (or annealed to 0): the only thing keeping the policy near the SFT policy is gone",),
    ("a positive kl.coef, or an adaptive controller", "kl.floor > 0 for an annealed controller"),
    ("reference",),
)


@_detector(NO_KL_PENALTY)
def no_kl_penalty(h: History, window: int = 10, t_min: float = 2.0) -> Finding:
    """Beta (``objective/kl_coef``, else hparams' ``kl_coef`` of a fixed controller) is 0 while ``objective/kl``
    rises (trailing-``window`` slope t > ``t_min``). Not for a DPO run: its beta is no penalty that can be off."""
    if is_dpo(h):
        return not_evaluated(NO_KL_PENALTY, _DPO_BETA)
    kl = h.get(tags.KL)
    if kl is None:
        return not_evaluated(NO_KL_PENALTY, _needs(tags.KL))
    if h.get(tags.KL_COEF) is not None:
        pair = _aligned(h, tags.KL, tags.KL_COEF)
        if pair is None:
            return not_evaluated(NO_KL_PENALTY, "objective/kl and objective/kl_coef share no iteration")
        steps, (kl_values, beta) = pair
    elif "kl_coef" in (hp := kl_hparams(h.hparams)) and hp.get("kl_controller", "fixed") == "fixed":
        steps, kl_values = kl.steps, kl.values
        beta = np.full(len(steps), float(hp["kl_coef"]))
    else:
        return not_evaluated(NO_KL_PENALTY, _needs("objective/kl_coef (or kl_coef of a fixed controller)"))
    _, t = trend(steps, kl_values, window)
    signal = (np.abs(beta) <= 1e-12) & (t > t_min)

    def describe(i: int) -> str:
        return f"at iteration {steps[i]}: beta {_f(beta[i])}, KL {_f(kl_values[i])} ({_trend(t[i])})"

    return _result(NO_KL_PENALTY, steps, signal, describe)


# -- annotation distribution shift / flawed reward model -----------------------------------------------------------

_SHIFT = (
    "the reward model learned the annotators' biases or a different distribution than the gold raters' "
    "(annotation distribution shift): its reward was wrong before the policy moved"
)

LENGTH_BIAS = _Spec(
    "annotation_shift.length_bias",
    "proxy rises from the start, gold does not, and the proxy follows length",
    (_SHIFT + "; here a length bias", "length-biased annotators"),
    (_BETTER_RM, "length-normalise or length-penalise the reward", "check the reward model's gold agreement first"),
    ("gold", "proxy"),
)


@_detector(LENGTH_BIAS)
def length_bias(
    h: History, t_min: float = 2.0, gold_t_max: float = 1.0, corr_min: float = 0.5, min_points: int = 10
) -> Finding:
    """Over all points so far (at least ``min_points``): proxy trend t > ``t_min``, gold trend t < ``gold_t_max``
    (not reliably rising), and mean score-length correlation at least ``corr_min``."""
    if not has_gold(h):
        return not_evaluated(LENGTH_BIAS, NO_GOLD)
    needed = (tags.PROXY_REWARD, tags.GOLD_REWARD, tags.SCORE_LENGTH_CORR)
    triple = _aligned(h, *needed)
    if triple is None:
        return not_evaluated(LENGTH_BIAS, _needs(*needed))
    steps, (proxy, gold, corr) = triple
    _, tp = trend(steps, proxy, None)
    _, tg = trend(steps, gold, None)
    mean_corr = np.cumsum(corr) / np.arange(1, len(corr) + 1)
    signal = (np.arange(len(steps)) >= min_points - 1) & (tp > t_min) & (tg < gold_t_max) & (mean_corr >= corr_min)

    def describe(i: int) -> str:
        return (
            f"iterations {steps[0]}-{steps[i]}: proxy {_trend(tp[i])}, gold {_trend(tg[i])} "
            f"({_f(gold[0])} -> {_f(gold[i])}), mean score-length correlation {_f(mean_corr[i])}"
        )

    return _result(LENGTH_BIAS, steps, signal, describe)


PROXY_GOLD_DISAGREEMENT = _Spec(
    "annotation_shift.proxy_gold_disagreement",
    "on held-out prompts the proxy says the policy beats SFT, the gold judge says it does not",
    (_SHIFT, _RM_EXPLOITED),
    (_BETTER_RM, "measure the reward model's agreement with gold raters on policy samples", _ENSEMBLE),
    ("gold", "proxy"),
)


@_detector(PROXY_GOLD_DISAGREEMENT)
def proxy_gold_disagreement(h: History, patience: int = 2) -> Finding:
    """At ``patience`` evaluations in a row: ``eval/proxy_reward`` above ``eval/sft_proxy_reward`` while
    ``eval/gold_reward`` is not above ``eval/sft_gold_reward`` (each against its first evaluation when the SFT value
    is not logged)."""
    if not has_gold(h):
        return not_evaluated(PROXY_GOLD_DISAGREEMENT, NO_GOLD)
    pair = _aligned(h, tags.EVAL_PROXY_REWARD, tags.EVAL_GOLD_REWARD)
    if pair is None:
        return not_evaluated(PROXY_GOLD_DISAGREEMENT, _needs(tags.EVAL_PROXY_REWARD, tags.EVAL_GOLD_REWARD))
    steps, (proxy, gold) = pair
    proxy_base, _ = _baseline(h, tags.EVAL_SFT_PROXY_REWARD, Series(steps, proxy), 1)
    gold_base, _ = _baseline(h, tags.EVAL_SFT_GOLD_REWARD, Series(steps, gold), 1)
    proxy_gain, gold_gain = proxy - proxy_base, gold - gold_base
    signal = sustained((proxy_gain > 0) & (gold_gain <= 0), patience)

    def describe(i: int) -> str:
        return (
            f"at iteration {steps[i]}: proxy {_f(proxy[i])} vs SFT {_f(proxy_base)} ({proxy_gain[i]:+.3g}), "
            f"gold {_f(gold[i])} vs SFT {_f(gold_base)} ({gold_gain[i]:+.3g})"
        )

    return _result(PROXY_GOLD_DISAGREEMENT, steps, signal, describe)


# -- all of them ---------------------------------------------------------------------------------------------------


#: The tags that come from the gold judge: ``gold=False`` sets them aside. The audit's win rate is not among them: on
#: the world its labels come from simulated annotators, in a real run from a few hundred fresh human labels.
GOLD_TAGS = (
    tags.GOLD_REWARD,
    tags.EVAL_GOLD_REWARD,
    tags.EVAL_SFT_GOLD_REWARD,
    tags.EVAL_WIN_RATE,
    tags.EVAL_GOLD_REWARD_SE,
)


def gold_free(name: str) -> bool:
    """Whether the detector ``name`` works without the gold judge."""
    return "gold" not in DETECTOR_NEEDS[name]


def run_detectors(
    h: History, thresholds: Mapping[str, Mapping[str, float]] | None = None, gold: bool = True
) -> list[Finding]:
    """Every detector on ``h``, in :data:`DETECTORS` order.

    Args:
        thresholds: keyword overrides per finding name, e.g. ``{"kl_trouble.kl_blowup": {"bound": 50}}``.
        gold: False sets the gold judge's metrics (:data:`GOLD_TAGS`) aside, as for a run without a judge: the
            detectors that need gold report :data:`NO_GOLD`, and the others see exactly what they would see then.
    Raises:
        ValueError: ``thresholds`` names an unknown detector.
        TypeError: it gives a detector an argument it does not take.
    """
    thresholds = thresholds or {}
    unknown = sorted(set(thresholds) - set(DETECTORS))
    if unknown:
        raise ValueError(f"unknown detector(s) in thresholds: {unknown}; known: {sorted(DETECTORS)}")
    if not gold:
        h = h.without(GOLD_TAGS)
    return [fn(h, **dict(thresholds.get(name, {}))) for name, fn in DETECTORS.items()]
