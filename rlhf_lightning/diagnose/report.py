"""``rlhf diagnose RUN_DIR [RUN_DIR ...] [--out DIR]``: findings with evidence, likely causes and fixes, and plots.

Reads each run's TensorBoard event files, runs every detector, prints a Markdown report (also written to
``OUT/report.md``) and writes the PNG plots of :mod:`rlhf_lightning.diagnose.plots` into ``OUT``. ``OUT`` defaults to
``RUN_DIR/diagnose`` for one run and ``./diagnose`` for several.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlhf_lightning.diagnose.detectors import (
    FAMILIES,
    GOLD_TAGS,
    NO_GOLD,
    Finding,
    run_detectors,
)
from rlhf_lightning.diagnose.events import NoEventsError, read_run
from rlhf_lightning.diagnose.history import History
from rlhf_lightning.diagnose.plots import plot_runs
from rlhf_lightning.errors import ArgumentParser
from rlhf_lightning.io import atomic_open

FAMILY_TITLES = {
    "reward_hacking": "reward hacking (reward-model exploitation)",
    "mode_collapse": "mode collapse",
    "annotation_shift": "annotation distribution shift (flawed reward model)",
    "kl_trouble": "KL misconfiguration",
}


def _verdict(findings: list[Finding]) -> str:
    fired = [f for f in findings if f.triggered]
    if fired:
        return "**triggered**: " + ", ".join(f"`{f.name}` (iteration {f.iteration})" for f in fired)
    if any(f.evaluated for f in findings):
        return "quiet"
    if all(f.evidence.endswith(NO_GOLD) for f in findings):
        return f"not evaluated ({NO_GOLD})"
    return "not evaluated (metrics missing)"


def render_run(label: str, h: History, findings: list[Finding], gold: bool = True) -> str:
    """The Markdown section of one run: a verdict per family, then each triggered finding in full. ``gold=False``:
    the findings were computed without the gold judge's metrics, and the section says so."""
    last = h.last_step
    span = f"iterations 0-{last}" if last is not None else "no iterations"
    lines = [f"## {label}", "", f"{span}, {len(h.scalars)} metrics"]
    if not gold:
        blind = [fam for fam in FAMILIES if not any(f.evaluated for f in findings if f.family == fam)]
        lines += ["", "`--no-gold`: gold-free evidence only (the gold judge's metrics were set aside, as in a run "
                  "without one)" + (f"; could not evaluate: {', '.join(blind)}" if blind else "") + "."]  # fmt: skip
    lines += ["", "| family | verdict |", "|---|---|"]
    lines += [f"| {FAMILY_TITLES[fam]} | {_verdict([f for f in findings if f.family == fam])} |" for fam in FAMILIES]
    for f in findings:
        if not f.triggered:
            continue
        state = "still active at the end" if f.active else "not active at the end"
        lines += ["", f"### `{f.name}`: {f.title}", "", f"- first at iteration {f.iteration}, {state}"]
        lines += [f"- evidence: {f.evidence}", "- likely causes:"]
        lines += [f"  - {c}" for c in f.causes]
        lines += ["- fixes:"] + [f"  - {x}" for x in f.fixes]
    quiet = [f for f in findings if f.evaluated and not f.triggered]
    # The detectors that need the gold judge are named once, under one reason, rather than each as missing metrics.
    no_gold = [f"`{f.name}`" for f in findings if not f.evaluated and f.evidence.endswith(NO_GOLD)]
    skipped = [f for f in findings if not f.evaluated and not f.evidence.endswith(NO_GOLD)]
    if quiet:
        lines += ["", "### Quiet", ""] + [f"- `{f.name}`: {f.evidence}" for f in quiet]
    if skipped or no_gold:
        lines += ["", "### Not evaluated", ""] + [f"- `{f.name}`: {f.evidence}" for f in skipped]
    if no_gold:
        lines.append(f"- {NO_GOLD}: gold reward and win rate are not measured, so {', '.join(no_gold)} (which compare "
                     "the proxy with the gold reward) were not evaluated")  # fmt: skip
    return "\n".join(lines)


def render_report(
    runs: Sequence[tuple[str, History, list[Finding]]], plots: Sequence[Path], out: Path, gold: bool = True
) -> str:
    """The whole report: one section per run, then the plots (linked relative to ``out``)."""
    parts = ["# rlhf diagnose", ""] + [render_run(label, h, findings, gold) + "\n" for label, h, findings in runs]
    parts += ["## Plots", ""]
    parts += [f"![{p.stem}]({p.relative_to(out)})" for p in plots] or ["(no run has the metrics to plot)"]
    return "\n".join(parts) + "\n"


def diagnose(run_dirs: Sequence[str | Path], out: str | Path | None = None, gold: bool = True) -> tuple[str, Path]:
    """Diagnoses ``run_dirs`` into ``out`` (see the module doc); returns the report text and the report's path.
    ``gold=False`` diagnoses as if the runs had no gold judge: the detectors, the report and the plots never see its
    metrics.

    Raises:
        NoEventsError: a run directory holds no event files.
    """
    run_dirs = [Path(d) for d in run_dirs]
    out = Path(out) if out is not None else (run_dirs[0] / "diagnose" if len(run_dirs) == 1 else Path("diagnose"))
    histories = [(str(d), read_run(d)) for d in run_dirs]
    if not gold:
        histories = [(label, h.without(GOLD_TAGS)) for label, h in histories]
    runs = [(label, h, run_detectors(h)) for label, h in histories]
    plots = plot_runs(histories, out)
    text = render_report(runs, plots, out, gold)
    path = out / "report.md"
    with atomic_open(path) as f:
        f.write(text)
    return text, path


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``rlhf diagnose``; a directory without event files is a usage error (exit status 2)."""
    parser = ArgumentParser(prog="rlhf diagnose", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="a run's TensorBoard log folder")
    parser.add_argument("--out", type=Path, help="output folder (default RUN_DIR/diagnose, or ./diagnose for several)")
    parser.add_argument("--no-gold", action="store_true",
                        help="diagnose as without a gold judge: gold-free evidence only (docs/no_gold.md)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        text, path = diagnose(args.run_dirs, args.out, gold=not args.no_gold)
    except NoEventsError as e:
        parser.error(str(e))
    print(text)
    print(f"report: {path}; plots beside it")
