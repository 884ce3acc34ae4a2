"""Which of a run's policies to keep (``best.ckpt``): the rule the online callback applies, and its replay offline.

With a gold judge, the best held-out gold; without one, the best audit win rate where the run has fresh labels,
else a conservative proxy trusted only while no reward-hacking warning holds. :func:`replay` applies the same rule
to a finished run's history, so `rlhf evaluate-detectors` can measure on the world how much of the gold gain the
gold-free rule keeps.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from rlhf_lightning import tags
from rlhf_lightning.diagnose.detectors import GOLD_TAGS, Finding, run_detectors
from rlhf_lightning.diagnose.history import History

GOLD_TAG = tags.EVAL_GOLD_REWARD
PROXY_TAG = tags.EVAL_PROXY_REWARD
AUDIT_TAG = tags.EVAL_AUDIT_WIN_RATE


def best_checkpoint_score(
    metrics: Mapping[str, float], gold_seen: bool, findings: Sequence[Finding], max_kl: float | None = None
) -> tuple[float, str] | None:
    """The score that ranks this iteration's policy for ``best.ckpt``, and what it is; None: not a candidate.

    With a gold judge, the held-out gold reward (``eval/gold_reward``) at evaluations, and nothing else: once gold
    has been seen, the proxy never ranks a checkpoint. Without one, the audit's win rate against SFT
    (``eval/audit_win_rate``) when the run has fresh labels: measured on the suite of `rlhf evaluate-detectors`, it
    kept the most gold (docs/no_gold.md). Without labels, a conservative proxy: the held-out proxy reward minus the
    ensemble's disagreement on this rollout (``objective/ensemble_std``, 0 without an ensemble), and only while no
    reward-hacking finding is active and the KL is at most ``max_kl`` (when set) — the proxy is trusted only where
    it has not been exploited.
    """
    if GOLD_TAG in metrics:
        return float(metrics[GOLD_TAG]), GOLD_TAG
    if gold_seen:
        return None
    if AUDIT_TAG in metrics:
        return float(metrics[AUDIT_TAG]), AUDIT_TAG
    if PROXY_TAG not in metrics:
        return None
    if max_kl is not None and not float(metrics.get(tags.KL, math.inf)) <= max_kl:
        return None
    if any(f.active and f.family == "reward_hacking" for f in findings):
        return None
    return float(metrics[PROXY_TAG]) - float(metrics.get(tags.ENSEMBLE_STD, 0.0)), "conservative proxy"


def replay(
    h: History, thresholds: Mapping[str, Mapping[str, float]] | None = None, max_kl: float | None = None
) -> int | None:
    """The iteration whose policy :func:`best_checkpoint_score` would have kept on ``h`` without gold (the
    callback's ``gold=False``): at every evaluation, the findings on the history up to it; None when no iteration
    was a candidate."""
    evals = h.get(PROXY_TAG) if h.get(PROXY_TAG) is not None else h.get(AUDIT_TAG)
    if evals is None:
        return None
    blind = h.without(GOLD_TAGS)
    best: tuple[float, int] | None = None
    for step in evals.steps:
        upto = blind.until(int(step))
        metrics = {tag: float(s.values[-1]) for tag, s in upto.scalars.items() if len(s.steps) and s.steps[-1] == step}
        score = best_checkpoint_score(metrics, False, run_detectors(upto, thresholds), max_kl)
        if score is not None and (best is None or score[0] > best[0]):
            best = (score[0], int(step))
    return best[1] if best is not None else None
