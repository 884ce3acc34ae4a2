"""The runs that `rlhf evaluate-detectors` scores: failure presets, fixes and healthy defaults over seeds.

    python benchmarks/detector_suite.py --out /tmp/suite --sft-checkpoint SFT --rm-checkpoint RM [--jobs 2]

Every run is ``rlhf pipeline --out OUT/NAME_sS --seed S --no-diagnose`` from one SFT policy and reward model (the
length-biased presets and the ensemble runs train their reward model once, in the group's first run, and the others
reuse it), with the held-out evaluation every 5 iterations instead of 20 so that a warning's lead time is measured
in 5-iteration steps. A finished run (``summary.json`` present) is skipped, so the script resumes. ``--jobs`` runs
that many at once, each with one torch thread.

The suite is :data:`SUITE`: healthy runs (the packaged PPO, GRPO and RLOO configs; two failure presets with their
fixes), failure presets (no KL, a too-small beta, a length-biased reward model under PPO and GRPO, RLOO with two
samples and no KL), and the default, no-KL and small-beta PPO runs again on a 4-head reward ensemble whose
disagreement is logged (its mean is the reward). Which runs fail is not decided here: `rlhf evaluate-detectors`
takes that from the gold judge.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

#: The PPO arguments every run of the suite gets: denser held-out evaluations (the warnings' time resolution).
EVAL_ARGS = "--model.init_args.eval.every=5"


class SuiteRun(NamedTuple):
    """One configuration of the suite: ``rl_config`` is the RL phase's packaged config, ``presets`` go on top in
    order, ``rm_group`` names the reward model of presets that change the reward phase (the group's first run
    trains it, the others reuse it; None: the shared one), ``ppo_args`` are extra RL-phase arguments."""

    name: str
    rl_config: str
    presets: tuple[str, ...] = ()
    rm_group: str | None = None
    ppo_args: str = ""


#: A 4-head reward ensemble that only reports its disagreement (``objective/ensemble_std``): PPO pays the members'
#: mean, so the runs differ from the others by the reward model alone.
ENSEMBLE = (("fixes/ensemble_reward",), "ensemble", "--model.init_args.rewards.ensemble_k=0.0")


SUITE = (
    SuiteRun("ppo", "ppo"),
    SuiteRun("grpo", "grpo"),
    SuiteRun("rloo", "rloo"),
    SuiteRun("no_kl+adaptive_kl", "ppo", ("failures/no_kl", "fixes/adaptive_kl")),
    SuiteRun("low_beta+annealed_kl", "ppo", ("failures/low_beta", "fixes/annealed_kl")),
    SuiteRun("no_kl", "ppo", ("failures/no_kl",)),
    SuiteRun("low_beta", "ppo", ("failures/low_beta",)),
    SuiteRun("rloo_k2_no_kl", "rloo", ("failures/rloo_k2_no_kl",)),
    SuiteRun("length_bias", "ppo", ("failures/length_bias",), "length"),
    SuiteRun("grpo_length_bias", "grpo", ("failures/grpo_length_bias",), "length"),
    SuiteRun("ens_ppo", "ppo", *ENSEMBLE),
    SuiteRun("ens_no_kl", "ppo", (*ENSEMBLE[0], "failures/no_kl"), *ENSEMBLE[1:]),
    SuiteRun("ens_low_beta", "ppo", (*ENSEMBLE[0], "failures/low_beta"), *ENSEMBLE[1:]),
)


def command(run: SuiteRun, seed: int, out: Path, sft: Path, rm: Path | None) -> list[str]:
    """The `rlhf pipeline` command of one run (``rm`` None: the run trains its reward model)."""
    cmd = [sys.executable, "-m", "rlhf_lightning.cli", "pipeline", "--out", str(out), "--seed", str(seed)]
    ppo_args = f"{EVAL_ARGS} {run.ppo_args}".strip()
    cmd += ["--no-diagnose", "--ppo-config", run.rl_config, "--ppo-args", ppo_args, "--sft-checkpoint", str(sft)]
    for preset in run.presets:
        cmd += ["--preset", preset]
    if rm is not None:
        cmd += ["--rm-checkpoint", str(rm)]
    return cmd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sft-checkpoint", type=Path, required=True)
    parser.add_argument("--rm-checkpoint", type=Path, required=True, help="the reward model of the unbiased data")
    parser.add_argument("--group-rm", action="append", default=[], metavar="GROUP=PATH",
                        help="a reward model to reuse for a group (length, ensemble; default: trained)")  # fmt: skip
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", help="comma-separated run names of SUITE (default: all)")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = [r for r in SUITE if not args.only or r.name in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = [(r, s) for s in seeds for r in runs]
    group_rm = {group: Path(path) for group, path in (g.split("=", 1) for g in args.group_rm)}
    for group in dict.fromkeys(r.rm_group for r, _ in pending if r.rm_group and r.rm_group not in group_rm):
        # The group's first run trains the reward model the others reuse: it runs alone, before them.
        first = next(p for p in pending if p[0].rm_group == group)
        pending.remove(first)
        proc = launch(*first, args, None, env)
        if proc is not None:
            proc.wait()
        group_rm[group] = args.out / f"{first[0].name}_s{first[1]}" / "runs/rm/checkpoints/last.ckpt"
    active: list[subprocess.Popen] = []
    while pending or active:
        active = [p for p in active if p.poll() is None]
        while pending and len(active) < args.jobs:
            run, seed = pending.pop(0)
            proc = launch(run, seed, args, group_rm[run.rm_group] if run.rm_group else args.rm_checkpoint, env)
            if proc is not None:
                active.append(proc)
        time.sleep(2)


def launch(run: SuiteRun, seed: int, args: argparse.Namespace, rm: Path | None, env: dict) -> subprocess.Popen | None:
    """Starts one run (its log beside its folder); None when it already finished."""
    out = args.out / f"{run.name}_s{seed}"
    if (out / "summary.json").is_file():
        return None
    with open(f"{out}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(command(run, seed, out, args.sft_checkpoint, rm), stdout=log, stderr=log, env=env)


if __name__ == "__main__":
    main()
