"""``rlhf evaluate-detectors RUN_DIR ...``: how often each gold-free warning is right, and how early, judged by gold.

A run of the embedded world has a gold judge; a user's run does not. This scores the detectors that do not need
gold (:func:`~rlhf_lightning.diagnose.detectors.gold_free`) against what the gold judge says happened, so that a
warning on a real run comes with a measured precision, recall and lead time.

Ground truth (:func:`gold_truth`): the held-out gold reward ``eval/gold_reward`` of the run's evaluations **falls**
when its last value is more than ``z`` standard errors below its best (the two evaluations' errors combined, from
``eval/gold_reward_se``), or below the SFT policy's. Its peak is the evaluation of the best gold, or iteration 0 when
no evaluation beat the SFT policy.

A detector (or a combination: any of its members) **warns** on a run when it fires at any iteration, run with
``gold=False`` (it sees what it would see without a judge). Over a set of runs: precision = falling runs among the
warned ones, recall = warned runs among the falling ones, lead time = the gold peak's iteration minus the first
warning's (positive: the warning came first), and the false alarms on the healthy default runs.

Calibrate on some runs and report on others: thresholds (:data:`GRID`) and the combination are chosen on the
calibration runs (``--calibrate``: names ending ``_s<seed>`` of those seeds, less the configurations named by
``--holdout``, which no calibration run has) and reported on the rest; the combination's scores are also given on
the held-out configurations alone (settings the calibration never saw).

Gold-free checkpoint selection (:data:`SELECTIONS`): each rule picks one of the run's evaluations without reading
gold; its score is the gold gain it keeps, pooled over the runs: the sum of (gold at the pick - SFT gold) over the
sum of (the gold-selected policy's gold - SFT gold), where the gold-selected policy is the best evaluation, or the
SFT policy itself when no evaluation beat it. Per run, the same share (undefined when SFT was the best).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from rlhf_lightning import tags
from rlhf_lightning.diagnose.detectors import DETECTORS, GOLD_TAGS, gold_free, run_detectors
from rlhf_lightning.diagnose.events import NoEventsError, read_run
from rlhf_lightning.diagnose.history import History
from rlhf_lightning.diagnose.selection import replay
from rlhf_lightning.errors import ArgumentParser
from rlhf_lightning.io import atomic_open

#: Thresholds tried per detector on the calibration runs (the detector's keyword arguments); the others keep their
#: defaults.
GRID: dict[str, dict[str, tuple[float, ...]]] = {
    "reward_hacking.audit_decline": {"z": (1.5, 2.0, 2.5, 3.0)},
    "reward_hacking.proxy_out_of_range": {"max_shift": (1.0, 1.25, 1.5, 2.0)},
    "kl_trouble.no_kl_penalty": {"t_min": (2.0, 4.0)},
    "reward_hacking.length_drift": {"ratio": (1.2, 1.3, 1.4, 1.6)},
    "reward_hacking.kl_outpaces_reward": {"gain_frac": (0.25, 0.5)},
    "kl_trouble.kl_blowup": {"bound": (6.0, 8.0, 10.0, 15.0, 30.0)},
    "mode_collapse.per_input_diversity": {"frac": (0.4, 0.6, 0.7)},
}
#: The most detectors a combination may have (every subset up to this size is tried).
MAX_COMBINATION = 3


class Truth(NamedTuple):
    """What the gold judge says about one run (gold values are held-out means at the evaluations)."""

    falling: bool
    peak_step: int
    sft_gold: float
    best_gold: float
    final_gold: float


class Scores(NamedTuple):
    """A warning rule over a set of runs; NaN where undefined (no warned run, no falling run)."""

    precision: float
    recall: float
    median_lead: float
    warned: int
    falling: int
    false_alarms_default: int
    defaults: int


def tensorboard_dir(run_dir: Path) -> Path:
    """The RL phase's TensorBoard folder of a pipeline run directory (``runs/ppo``), else ``run_dir`` itself."""
    return run_dir / "runs/ppo" if (run_dir / "runs/ppo").is_dir() else run_dir


def gold_truth(h: History, z: float = 2.0) -> Truth | None:
    """The ground truth of a run (see the module doc); None without held-out gold."""
    gold, se, sft = h.get(tags.EVAL_GOLD_REWARD), h.get(tags.EVAL_GOLD_REWARD_SE), h.get(tags.EVAL_SFT_GOLD_REWARD)
    if gold is None or se is None or sft is None:
        return None
    errors = se.values[np.searchsorted(se.steps, gold.steps)]
    peak = int(np.argmax(gold.values))
    drop = gold.values[peak] - gold.values[-1]
    falling = drop > z * math.hypot(errors[peak], errors[-1]) or gold.values[-1] < sft.values[0]
    # A run whose gold never beat SFT's peaked at iteration 0: the SFT policy itself was its best.
    peak_step = int(gold.steps[peak]) if gold.values[peak] > sft.values[0] else 0
    return Truth(bool(falling), peak_step, float(sft.values[0]), float(gold.values[peak]), float(gold.values[-1]))


def first_warnings(h: History, thresholds: Mapping[str, Mapping[str, float]]) -> dict[str, int | None]:
    """Each gold-free detector's first iteration on ``h`` without gold (None: it never fired or was not evaluated)."""
    findings = run_detectors(h, thresholds, gold=False)
    return {f.name: f.iteration for f in findings if gold_free(f.name) and f.evaluated}


def score(
    runs: Sequence[str], truths: Mapping[str, Truth], warn: Callable[[str], int | None], defaults: Sequence[str]
) -> Scores:
    """Precision, recall and median lead time of ``warn`` (run name -> first warning or None) over ``runs``."""
    warned = [r for r in runs if warn(r) is not None]
    falling = [r for r in runs if truths[r].falling]
    hits = [r for r in warned if truths[r].falling]
    leads = [truths[r].peak_step - warn(r) for r in hits]
    return Scores(
        precision=len(hits) / len(warned) if warned else math.nan,
        recall=len(hits) / len(falling) if falling else math.nan,
        median_lead=float(np.median(leads)) if leads else math.nan,
        warned=len(warned),
        falling=len(falling),
        false_alarms_default=sum(warn(r) is not None for r in runs if r in defaults),
        defaults=sum(r in defaults for r in runs),
    )


def _f1(s: Scores) -> float:
    p, r = (0.0 if math.isnan(x) else x for x in (s.precision, s.recall))
    return 2 * p * r / (p + r) if p + r else 0.0


def _rank(s: Scores) -> tuple:
    """Higher is better: no false alarm on a healthy default, then F1, then lead time."""
    lead = -math.inf if math.isnan(s.median_lead) else s.median_lead
    return (s.false_alarms_default == 0, _f1(s), lead)


def combine(members: Sequence[str], warnings: Mapping[str, Mapping[str, int | None]]) -> Callable[[str], int | None]:
    """The rule "any of ``members`` warns": run name -> its earliest first warning (None if none warns)."""

    def warn(run: str) -> int | None:
        its = [warnings[run].get(m) for m in members]
        its = [i for i in its if i is not None]
        return min(its) if its else None

    return warn


# -- gold-free checkpoint selection ---------------------------------------------------------------------------------


def _evals(h: History, tag: str) -> tuple[np.ndarray, np.ndarray] | None:
    s = h.get(tag)
    return (s.steps, s.values) if s is not None else None


def pick_last(h: History, warning: int | None) -> int | None:
    """The last evaluation: what a run without any selection keeps."""
    s = h.get(tags.EVAL_KL)
    return int(s.steps[-1]) if s is not None else None


def pick_audit(h: History, warning: int | None) -> int | None:
    """The evaluation with the best audit win rate (the earliest of ties)."""
    s = _evals(h, tags.EVAL_AUDIT_WIN_RATE)
    return int(s[0][int(np.argmax(s[1]))]) if s is not None else None


def _best_before(h: History, tag: str, warning: int | None) -> int | None:
    """The evaluation with the best ``tag`` among those before ``warning`` (all of them when nothing warned; the
    first evaluation when the warning came before any); None when the run did not log ``tag``."""
    s = _evals(h, tag)
    if s is None:
        return None
    steps, values = s
    keep = steps < warning if warning is not None else np.ones(len(steps), bool)
    if not keep.any():
        return int(steps[0])
    return int(steps[keep][int(np.argmax(values[keep]))])


def pick_proxy_before_warning(h: History, warning: int | None) -> int | None:
    """The best held-out proxy reward before the first warning (:func:`_best_before`)."""
    return _best_before(h, tags.EVAL_PROXY_REWARD, warning)


def pick_audit_before_warning(h: History, warning: int | None) -> int | None:
    """The best audit win rate before the first warning (:func:`_best_before`)."""
    return _best_before(h, tags.EVAL_AUDIT_WIN_RATE, warning)


#: Gold-free checkpoint rules: (history, the chosen combination's first warning) -> the evaluation's iteration.
SELECTIONS: dict[str, Callable[[History, int | None], int | None]] = {
    "last evaluation": pick_last,
    "best audit win rate": pick_audit,
    "best proxy before the first warning": pick_proxy_before_warning,
    "best audit win rate before the first warning": pick_audit_before_warning,
}


#: RLHFDiagnostics' ``best.ckpt`` rule without gold, replayed (:func:`rlhf_lightning.diagnose.selection.replay`).
ONLINE_RULE = "RLHFDiagnostics without gold (best.ckpt replayed): the best audit win rate"
#: The same without the audit's labels: the conservative proxy while no reward-hacking warning holds.
ONLINE_RULE_NO_LABELS = "RLHFDiagnostics without gold or labels (replayed): conservative proxy, no hacking warning"
AUDIT_TAGS = (tags.EVAL_AUDIT_WIN_RATE, tags.EVAL_AUDIT_LABELS)


def gold_gain(h: History, truth: Truth, step: int | None) -> tuple[float, float]:
    """(gold at ``step`` - SFT gold, the gold-selected policy's gold - SFT gold): the picked policy's gain and the
    best one's (0 when no evaluation beat SFT: the SFT policy was the best). Nothing picked keeps the SFT policy."""
    gold = h.get(tags.EVAL_GOLD_REWARD)
    at = truth.sft_gold if step is None or gold is None else float(gold.values[int(np.searchsorted(gold.steps, step))])
    return at - truth.sft_gold, max(truth.best_gold - truth.sft_gold, 0.0)


def gain_kept(h: History, truth: Truth, step: int | None) -> float:
    """The share of the best gain that the policy at ``step`` keeps (:func:`gold_gain`); NaN when SFT was the
    best."""
    gain, best = gold_gain(h, truth, step)
    return gain / best if best > 0 else math.nan


# -- the whole evaluation -------------------------------------------------------------------------------------------


def _config(name: str) -> str:
    return re.sub(r"_s\d+$", "", name)


def _seed(name: str) -> int | None:
    m = re.search(r"_s(\d+)$", name)
    return int(m.group(1)) if m else None


def evaluate(
    histories: Mapping[str, History],
    calibrate_seeds: Sequence[int],
    default_prefix: str,
    z: float = 2.0,
    holdout: Sequence[str] = (),
) -> dict:
    """The whole evaluation as a dict (see the module doc); the Markdown is :func:`render`.

    Raises:
        ValueError: no history has held-out gold.

    Args:
        histories: run name (``<config>_s<seed>``) -> its RL phase's history.
        calibrate_seeds: the seeds whose runs choose the thresholds and the combination.
        holdout: configurations (run names less ``_s<seed>``) kept out of the calibration whatever their seed.
        default_prefix: runs whose name starts with it are the healthy default (its false alarms are counted).
    """
    truths = {name: t for name, h in histories.items() if (t := gold_truth(h, z)) is not None}
    if not truths:
        raise ValueError(
            f"no run has held-out gold ({tags.EVAL_GOLD_REWARD}, {tags.EVAL_GOLD_REWARD_SE}): nothing to judge the "
            "detectors against (runs of the embedded world only)"
        )
    names = sorted(truths)
    calib = [n for n in names if _seed(n) in calibrate_seeds and _config(n) not in holdout]
    held = [n for n in names if n not in calib]
    unseen = [n for n in names if _config(n) in holdout]
    defaults = [n for n in names if n.startswith(default_prefix)]
    detectors = [n for n in DETECTORS if gold_free(n)]

    # Thresholds: per detector, the grid point that ranks best on the calibration runs (the first of ties).
    # Only the detector being calibrated runs, on the histories without gold (what run_detectors(gold=False) sees).
    thresholds: dict[str, dict[str, float]] = {}
    blind = {r: histories[r].without(GOLD_TAGS) for r in calib}
    for name, grid in GRID.items():
        best = None
        for values in itertools.product(*grid.values()):
            kw = dict(zip(grid, values, strict=True))
            warnings = {r: DETECTORS[name](blind[r], **kw).iteration for r in calib}
            s = score(calib, truths, warnings.get, defaults)
            if best is None or _rank(s) > best[0]:
                best = (_rank(s), kw)
        thresholds[name] = best[1]
    warnings = {r: first_warnings(histories[r], thresholds) for r in names}
    as_shipped = {r: first_warnings(histories[r], {}) for r in names}
    per_detector = {
        d: {
            "calibration": score(calib, truths, combine([d], warnings), defaults),
            "held_out": score(held, truths, combine([d], warnings), defaults),
            "all": score(names, truths, combine([d], warnings), defaults),
            "defaults_all": score(names, truths, combine([d], as_shipped), defaults),
        }
        for d in detectors
        if any(d in warnings[r] for r in names)
    }
    candidates = sorted(per_detector)
    best_combo = max(
        (c for k in range(1, MAX_COMBINATION + 1) for c in itertools.combinations(candidates, k)),
        key=lambda c: (*_rank(score(calib, truths, combine(c, warnings), defaults)), -len(c)),
    )
    combo_warn = combine(best_combo, warnings)
    picks = {rule: {r: pick(histories[r], combo_warn(r)) for r in names} for rule, pick in SELECTIONS.items()}
    picks[ONLINE_RULE] = {r: replay(histories[r], thresholds) for r in names}
    picks[ONLINE_RULE_NO_LABELS] = {r: replay(histories[r].without(AUDIT_TAGS), thresholds) for r in names}
    selections = {
        rule: {
            r: dict(zip(("gain", "best_gain"), gold_gain(histories[r], truths[r], at[r]), strict=True))
            | {"step": at[r]}
            for r in names
        }
        for rule, at in picks.items()
    }
    return {
        "z": z,
        "runs": {
            r: {
                **truths[r]._asdict(),
                "calibration": r in calib,
                "first_warning": combo_warn(r),
                "warnings": warnings[r],
            }
            for r in names
        },
        "thresholds": thresholds,
        "detectors": {d: {k: v._asdict() for k, v in s.items()} for d, s in per_detector.items()},
        "combination": {
            "members": list(best_combo),
            "calibration": score(calib, truths, combo_warn, defaults)._asdict(),
            "held_out": score(held, truths, combo_warn, defaults)._asdict(),
            "unseen_settings": score(unseen, truths, combo_warn, defaults)._asdict(),
            "all": score(names, truths, combo_warn, defaults)._asdict(),
        },
        "selection": selections,
    }


def pooled(gains: Iterable[Mapping[str, float]]) -> float:
    """Sum of the picks' gains over the sum of the best gains (NaN when no run gained)."""
    gains = list(gains)
    best = sum(g["best_gain"] for g in gains)
    return sum(g["gain"] for g in gains) / best if best > 0 else math.nan


def _shares(kept: Mapping[str, Mapping[str, float]]) -> str:
    shares = [g["gain"] / g["best_gain"] for g in kept.values() if g["best_gain"] > 0]
    return f"{_pct(float(np.median(shares)))} ({_pct(min(shares))})" if shares else "—"


def _pct(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:g}"


def _score_cells(s: Mapping) -> str:
    return (
        f"{_pct(s['precision'])} | {_pct(s['recall'])} ({s['falling']} falling, {s['warned']} warned) | "
        f"{_num(s['median_lead'])} | {s['false_alarms_default']}/{s['defaults']}"
    )


def render(result: dict) -> str:
    """The evaluation as Markdown: ground truth per run, each detector, the best combination, checkpoint rules."""
    runs = result["runs"]
    lines = [
        "# Gold-free detectors against the gold judge",
        "",
        f"Ground truth: held-out gold falls more than {result['z']:g} standard errors below its peak, or ends "
        "below SFT's. Lead time: the gold peak's iteration minus the first warning's (positive: warned first).",
        "",
        "## Runs",
        "",
        "| run | split | SFT gold | best gold (iteration) | final gold | gold falls | first "
        "warning of the combination |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        split = "calibration" if r["calibration"] else "held out"
        lines.append(
            f"| {name} | {split} | {r['sft_gold']:.3f} | {r['best_gold']:.3f} ({r['peak_step']}) | "
            f"{r['final_gold']:.3f} | {'**yes**' if r['falling'] else 'no'} | {_num(r['first_warning'])} |"
        )
    head = "| precision | recall | median lead | false alarms on the default |"
    lines += [
        "",
        "## Each gold-free detector",
        "",
        f"| detector | thresholds | split {head}",
        "|---|---|---|" + "---|" * 4,
    ]
    for d, s in result["detectors"].items():
        kw = ", ".join(f"{k}={v:g}" for k, v in result["thresholds"].get(d, {}).items()) or "defaults"
        for split in ("calibration", "held_out"):
            lines.append(f"| `{d}` | {kw} | {split.replace('_', ' ')} | {_score_cells(s[split])} |")
        lines.append(f"| `{d}` | its defaults | all runs | {_score_cells(s['defaults_all'])} |")
    c = result["combination"]
    lines += [
        "",
        "## The best combination (any member warns), chosen on the calibration runs",
        "",
        "members: " + ", ".join(f"`{m}`" for m in c["members"]),
        "",
        f"| split {head}",
        "|---|" + "---|" * 4,
    ]
    splits = ("calibration", "held_out", "unseen_settings", "all")
    lines += [f"| {split.replace('_', ' ')} | {_score_cells(c[split])} |" for split in splits]
    lines += [
        "",
        "## Gold-free checkpoint selection: the share of the gold gain kept",
        "",
        "Pooled: the picks' summed gold gain over SFT against the gold-selected checkpoints' (the best evaluation, or "
        "SFT itself when none beat it); per run: the same share, over the runs that beat SFT.",
        "",
        "| rule | pooled, all runs | pooled, held-out runs | per run: median (min) |",
        "|---|---|---|---|",
    ]
    for rule, kept in result["selection"].items():
        held = [g for r, g in kept.items() if not runs[r]["calibration"]]
        lines.append(f"| {rule} | {_pct(pooled(kept.values()))} | {_pct(pooled(held))} | {_shares(kept)} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``rlhf evaluate-detectors``."""
    parser = ArgumentParser(prog="rlhf evaluate-detectors", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="pipeline run directories named <config>_s<seed> (benchmarks/detector_suite.py)",
    )
    parser.add_argument("--out", type=Path, default=Path("detectors"), help="output folder (detectors.md, .json)")
    parser.add_argument("--calibrate", default="0", help="comma-separated seeds whose runs calibrate (default 0)")
    parser.add_argument("--holdout", default="", help="comma-separated configurations never calibrated on")
    parser.add_argument("--default", default="ppo_s", help="name prefix of the healthy default runs")
    parser.add_argument("--z", type=float, default=2.0, help="standard errors of the ground truth's gold drop")
    args = parser.parse_args(argv)
    histories = {}
    for d in args.run_dirs:
        try:
            histories[d.name] = read_run(tensorboard_dir(d))
        except NoEventsError as e:
            parser.error(str(e))
    seeds = [int(s) for s in args.calibrate.split(",")]
    holdout = [c for c in args.holdout.split(",") if c]
    result = evaluate(histories, seeds, args.default, args.z, holdout)
    text = render(result)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_open(args.out / "detectors.json") as f:
        json.dump(result, f, indent=1, default=float)
    with atomic_open(args.out / "detectors.md") as f:
        f.write(text)
    print(text)
