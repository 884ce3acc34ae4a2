"""``rlhf frontier``: gold reward against the distance from the SFT policy, per method (Gao, Schulman & Hilton 2022).

    rlhf frontier --out runs/frontier --quick                  # everything from scratch, small (minutes)
    rlhf frontier --out runs/frontier --methods ppo,dpo,best_of_n \\
        --sft-checkpoint runs/pipeline/runs/sft/checkpoints/last.ckpt \\
        --rm-checkpoint runs/pipeline/runs/rm/checkpoints/last.ckpt

From ONE SFT policy and ONE reward model (trained first into ``OUT/runs/{world,sft,rm}`` as ``rlhf pipeline`` trains
them, unless given), each method moves away from the SFT policy and is measured on the same held-out prompts (the
same evaluation: 256 prompts, seed 1234): gold reward, proxy reward and the KL to the SFT policy per response. The
x axis is ``d = sqrt(KL)``. How each method spans its KL budgets:

- best_of_n: n in {1, 2, 4, ...} (``rlhf best-of-n``; its KL is the analytic ``log n - (n - 1) / n``).
- ppo, grpo, rloo, reinforce_pp: every evaluation along a run is a point (``eval/kl``, ``eval/gold_reward``,
  ``eval/proxy_reward``), a run per KL coefficient beta (one with ``--quick``); the learning rate is 3e-4, which
  overoptimizes within the run, so the points reach past the gold peak.
- dpo: every validation along a run is a point, a run per DPO beta.

``eval/kl`` is the k1 estimate on the policy's own held-out samples, the same function for the RL methods and DPO.
Each trained method's gold is relative to its run's SFT evaluation (``eval/sft_gold_reward``: the same samples every
run), best-of-n's to its n = 1. The fits (:mod:`rlhf_lightning.rl.frontier`) are Gao et al.'s: the best-of-n form
``d (a - b d)`` for best_of_n, the RL form ``d (a - b log d)`` for every trained method (DPO included).

Writes ``OUT/frontier.json`` (every point), ``OUT/frontier.md`` (per method: a, b, R^2, best gold and its KL, wall
time), ``OUT/frontier.png`` (gold and proxy against d, points and fitted curves); each trained run is an ordinary
run directory ``OUT/<method>/beta_<beta>/`` (TensorBoard logs under runs/), best-of-n's files are in
``OUT/best_of_n/``. ``--sft-args`` etc. append ``rlhf fit`` overrides to every run of that kind (the tests' tiny
sizes).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_lightning import tags
from rlhf_lightning.diagnose.events import EVENT_GLOB, read_scalars
from rlhf_lightning.errors import USER_ERRORS, ArgumentParser, UsageError, user_message
from rlhf_lightning.io import atomic_open
from rlhf_lightning.modules.common import markdown_table
from rlhf_lightning.pipeline import check_phases, join_option_values, parse_args, phase_plan, run_plan
from rlhf_lightning.rl.frontier import FitForm, distance, fit, predict


@dataclass(frozen=True)
class Method:
    """How a trained method runs: a packaged config, the overrides that make it the method, the override that sets
    its beta (a format string), and which budget of :class:`Budget` it takes ("rl" or "dpo")."""

    config: str
    overrides: tuple[str, ...] = ()
    beta: str = "--model.init_args.kl.coef={}"
    budget: str = "rl"


_ADV, _KL = "--model.init_args.advantage.", "--model.init_args.kl."
#: The trained methods. When packaged configs for the critic-free estimators exist, a row becomes e.g. Method("grpo").
TRAINED = {
    "ppo": Method("ppo"),
    "grpo": Method("ppo", (f"{_ADV}estimator=grpo", f"{_ADV}samples_per_prompt=4", f"{_KL}placement=loss",
                           f"{_KL}estimator=k3")),
    "rloo": Method("ppo", (f"{_ADV}estimator=rloo", f"{_ADV}samples_per_prompt=4")),
    "reinforce_pp": Method("ppo", (f"{_ADV}estimator=reinforce_pp",)),
    "dpo": Method("dpo", beta="--model.init_args.beta={}", budget="dpo"),
}  # fmt: skip
METHODS = ("best_of_n", *TRAINED)


@dataclass(frozen=True)
class Budget:
    """The sizes of a frontier run: best-of-n's n, the betas and the ``rlhf fit`` overrides of each kind of run."""

    ns: tuple[int, ...]
    betas: dict[str, tuple[float, ...]]
    args: dict[str, tuple[str, ...]]  # "sft", "rm", "rl", "dpo"


_RL_LR = "--model.init_args.lr=3.0e-4"  # past the gold peak within the run (benchmarks/RESULTS.md, the PPO recipe)
_DPO_VAL = ("--trainer.limit_val_batches=4", "--model.init_args.lr=3.0e-4")  # validation is a point: keep it cheap
FULL = Budget(
    ns=(1, 2, 4, 8, 16, 32, 64, 128),
    betas={"rl": (0.01, 0.05), "dpo": (0.05, 0.1, 0.3)},
    args={"sft": (), "rm": (), "rl": (_RL_LR, "--model.init_args.iterations=60", "--model.init_args.eval.every=5"),
          "dpo": (*_DPO_VAL, "--trainer.max_steps=400", "--trainer.val_check_interval=50")},
)  # fmt: skip
QUICK = Budget(
    ns=(1, 2, 4, 8, 16),
    betas={"rl": (0.01,), "dpo": (0.1,)},
    args={"sft": ("--trainer.max_steps=300", "--trainer.val_check_interval=150"),
          "rm": ("--trainer.max_steps=300", "--trainer.val_check_interval=150"),
          "rl": (_RL_LR, "--model.init_args.iterations=24", "--model.init_args.eval.every=4",
                 "--model.init_args.eval.groups=0"),
          "dpo": (*_DPO_VAL, "--trainer.max_steps=100", "--trainer.val_check_interval=20")},
)  # fmt: skip

#: Which form is fitted to which method (Gao et al.: best-of-n's own form, the RL form for policies trained away).
FORMS: dict[str, FitForm] = {name: "bon" if name == "best_of_n" else "rl" for name in METHODS}


def method_points(scalars: dict[str, dict[int, float]]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """From a trained run's scalars: its SFT evaluation (``gold``, ``proxy``) and a point per evaluation (``step``,
    ``kl``, ``d``, ``gold``, ``proxy``), in step order."""
    kl, gold, proxy = (scalars.get(tag, {}) for tag in (tags.EVAL_KL, tags.EVAL_GOLD_REWARD, tags.EVAL_PROXY_REWARD))
    sft_gold, sft_proxy = (scalars.get(tag, {}) for tag in (tags.EVAL_SFT_GOLD_REWARD, tags.EVAL_SFT_PROXY_REWARD))
    if not kl or not gold or not sft_gold:
        raise ValueError("the run logged no eval/kl, eval/gold_reward or eval/sft_gold_reward (no gold judge?)")
    sft = {"gold": sft_gold[max(sft_gold)], "proxy": sft_proxy[max(sft_proxy)] if sft_proxy else None}
    points = [{"step": step, "kl": kl[step], "d": distance(kl[step]), "gold": gold[step], "proxy": proxy.get(step)}
              for step in sorted(kl) if step in gold]  # fmt: skip
    return sft, points


def summarize_method(form: FitForm, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A method's fits and best point from its runs (each with ``sft`` and ``points``, see :func:`method_points`):
    gold and proxy relative to each run's SFT evaluation, all runs' points in one fit per quantity."""
    points = [(label, p) for label, run in runs.items() for p in run["points"]]
    summary: dict[str, Any] = {"form": form, "max_d": max((p["d"] for _, p in points), default=0.0)}
    for quantity in ("gold", "proxy"):
        usable = [(label, p) for label, p in points if None not in (p[quantity], runs[label]["sft"][quantity])]
        gains = np.array([p[quantity] - runs[label]["sft"][quantity] for label, p in usable])
        result = fit(form, np.array([p["d"] for _, p in usable]), gains)
        summary[f"fit_{quantity}"] = None if result is None else {"a": result.a, "b": result.b, "r2": result.r2}
    label, best = max(points, key=lambda lp: lp[1]["gold"])
    summary["best"] = {"gold": best["gold"], "gain": best["gold"] - runs[label]["sft"]["gold"], "kl": best["kl"],
                       "run": label, "step": best["step"]}  # fmt: skip
    return summary


def frontier_table(methods: dict[str, dict[str, Any]]) -> str:
    """The per-method Markdown table of ``frontier.md``: form, points, gold fit (a, b, R^2), proxy fit's R^2, best
    gold (its gain over SFT) and the KL where it was reached, wall time."""

    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    head = ["method", "form", "points", "a", "b", "R^2 gold", "R^2 proxy", "best gold (gain)", "KL at best (nats)",
            "wall (s)"]  # fmt: skip
    rows = []
    for name, m in methods.items():
        g, p, best = m["fit_gold"] or {}, m["fit_proxy"] or {}, m["best"]
        rows.append([name, m["form"], str(sum(len(r["points"]) for r in m["runs"].values())), num(g.get("a")),
                     num(g.get("b")), num(g.get("r2")), num(p.get("r2")), f"{best['gold']:.3f} ({best['gain']:+.3f})",
                     f"{best['kl']:.2f}", f"{m['seconds']:.0f}"])  # fmt: skip
    return markdown_table(head, rows) + "\n"


def plot_frontier(methods: dict[str, dict[str, Any]], path: Path) -> None:
    """Two panels, gold and proxy against sqrt(KL): each method's points (a marker per run) in its colour, its SFT
    evaluation (the first run's; a star at d = 0) and its fitted curve from there up to its farthest point."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.get_cmap("tab10")
    for name, m in methods.items():
        colour = colours(METHODS.index(name) % 10)
        for ax, quantity in zip(axes, ("gold", "proxy"), strict=True):
            for j, (label, run) in enumerate(m["runs"].items()):
                pts = [p for p in run["points"] if p[quantity] is not None]
                legend = name if label == name else f"{name} {label}"
                ax.scatter([p["d"] for p in pts], [p[quantity] for p in pts], color=colour, marker="os^Dv"[j % 5],
                           s=18, label=legend if quantity == "gold" else None)  # fmt: skip
            coef, sft = m[f"fit_{quantity}"], next(iter(m["runs"].values()))["sft"][quantity]
            if sft is not None:  # the SFT evaluation, d = 0, where the method's curve starts
                ax.scatter([0.0], [sft], color=colour, marker="*", s=60, edgecolors="black", linewidths=0.5)
            if coef is not None and sft is not None:
                d = np.linspace(0.0, m["max_d"], 100)
                ax.plot(d, sft + predict(m["form"], coef["a"], coef["b"], d), color=colour, lw=1.5)
    for ax, quantity in zip(axes, ("gold", "proxy"), strict=True):
        ax.set_xlabel("d = sqrt(KL(pi || pi_sft)), KL in nats per response")
        ax.set_ylabel(f"{quantity} reward (held-out prompts)")
        ax.set_title(f"{quantity} reward against distance from SFT")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="rlhf frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the frontier's folder")
    parser.add_argument("--quick", action="store_true", help="small sizes: one beta per method, n up to 16")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--sft-checkpoint", type=Path, help="use this SFT checkpoint (default: train one in OUT)")
    parser.add_argument("--rm-checkpoint", type=Path, help="use this reward model (default: train one in OUT)")
    for kind in ("sft", "rm", "rl", "dpo", "best-of-n"):
        parser.add_argument(f"--{kind}-args", default="", help=f"extra arguments of every {kind} run")
    options = {f"--{kind}-args" for kind in ("sft", "rm", "rl", "dpo", "best-of-n")}
    args = parser.parse_args(join_option_values(argv, options))
    args.methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or len(set(args.methods)) != len(args.methods):
        parser.error(f"--methods {','.join(args.methods)}: each of {', '.join(METHODS)} at most once")
    for name in ("sft_checkpoint", "rm_checkpoint"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            parser.error(f"--{name.replace('_', '-')} {path} does not exist")
    args.out = args.out.resolve()
    return args


def frontier_main(argv: list[str]) -> dict[str, Any]:
    """``rlhf frontier``; returns what it writes to ``frontier.json``.

    Every run's config and overrides are checked (pipeline's :func:`check_phases`) before anything trains, so a
    mistake in the last method's settings costs seconds, not the first methods' training."""
    from rlhf_lightning.cli import main as rlhf_main

    args = _parse(argv)
    budget, out = QUICK if args.quick else FULL, args.out
    world = out / "runs" / "world"
    # The SFT and reward-model phases of `rlhf pipeline` (its PPO phase is left out: the methods are run below).
    given = [f"--{name}-checkpoint={getattr(args, f'{name}_checkpoint')}" for name in ("sft", "rm")
             if getattr(args, f"{name}_checkpoint") is not None]  # fmt: skip
    phase_args = [f"--{phase}-args={shlex.join(budget.args[phase])} {getattr(args, f'{phase}_args')}"
                  for phase in ("sft", "rm")]  # fmt: skip
    base_argv = ["--out", str(out), "--no-diagnose", *given, *phase_args]
    planned = _planned_runs(args, budget, world)
    for name, runs in planned.items():
        for label, (_, extra) in runs.items():
            try:
                check_phases(parse_args([*base_argv, f"--ppo-config={TRAINED[name].config}",
                                         f"--ppo-args={shlex.join(extra)}"]))  # fmt: skip
            except USER_ERRORS as err:  # the pipeline's third phase is this method's run: say which
                raise UsageError(user_message(err).replace("ppo phase:", f"{name} {label}:", 1)) from err

    out.mkdir(parents=True, exist_ok=True)
    base = parse_args(base_argv)
    start = time.perf_counter()
    base_seconds = run_plan(out, [(phase, cmd) for phase, cmd in phase_plan(base, out, None) if phase != "ppo"])
    sft = args.sft_checkpoint.resolve() if args.sft_checkpoint else out / "runs/sft/checkpoints/last.ckpt"
    rm = args.rm_checkpoint.resolve() if args.rm_checkpoint else out / "runs/rm/checkpoints/last.ckpt"
    if not (world / "world.json").is_file():  # both checkpoints given: the runs below read this world
        rlhf_main(["world", "--out", str(world)])

    methods: dict[str, dict[str, Any]] = {}
    for name in args.methods:
        started = time.perf_counter()
        if name == "best_of_n":
            runs = {"best_of_n": _best_of_n(out / "best_of_n", sft, rm, world, budget, args.best_of_n_args)}
        else:
            runs = {label: {"beta": beta, **_trained_run(out / name / label, TRAINED[name].config, sft, rm, extra)}
                    for label, (beta, extra) in planned[name].items()}  # fmt: skip
        methods[name] = {**summarize_method(FORMS[name], runs), "runs": runs,
                         "seconds": time.perf_counter() - started}  # fmt: skip
    record = {"out": str(out), "quick": args.quick, "sft_checkpoint": str(sft), "rm_checkpoint": str(rm),
              "base_seconds": base_seconds, "seconds": time.perf_counter() - start, "methods": methods}  # fmt: skip
    with atomic_open(out / "frontier.json") as f:
        json.dump(record, f, indent=2)
    plot_frontier(methods, out / "frontier.png")
    table = frontier_table(methods)
    with atomic_open(out / "frontier.md") as f:
        f.write(f"# rlhf frontier ({'quick' if args.quick else 'full'}, one seed)\n\nGold reward against d = sqrt(KL"
                " to SFT, nats per response) on the held-out prompts; the form fitted to gold - SFT gold (best_of_n: "
                "d (a - b d); the others: d (a - b log d)); wall time per method, every beta.\n\n"
                f"{table}\nPlot: {out / 'frontier.png'}; points: {out / 'frontier.json'}.\n")  # fmt: skip
    print(f"\n== rlhf frontier ({out}) ==\n{table}", end="")
    return record


#: Per trained method, per run label (``beta_<beta>``): the run's beta and its ``rlhf fit`` overrides.
Planned = dict[str, dict[str, tuple[float, list[str]]]]


def _planned_runs(args: argparse.Namespace, budget: Budget, world: Path) -> Planned:
    """The trained runs of the methods asked: their overrides are the method's, its beta, the budget's, the shared
    world, then the user's ``--rl-args`` / ``--dpo-args``."""
    planned: Planned = {}
    for name in args.methods:
        if name not in TRAINED:
            continue
        method, runs = TRAINED[name], planned.setdefault(name, {})
        own = shlex.split(getattr(args, f"{method.budget}_args"))
        for beta in budget.betas[method.budget]:
            runs[f"beta_{beta:g}"] = (beta, [*method.overrides, method.beta.format(beta), *budget.args[method.budget],
                                             f"--data.init_args.data_dir={world}", *own])  # fmt: skip
    return planned


def _trained_run(run_dir: Path, config: str, sft: Path, rm: Path, extra: list[str]) -> dict[str, Any]:
    """One trained run as ``rlhf pipeline``'s third phase with ``config`` in its own run directory (the SFT and reward
    checkpoints given); its SFT evaluation, points (:func:`method_points`), folder and seconds."""
    run_dir.mkdir(parents=True, exist_ok=True)
    args = parse_args(["--out", str(run_dir), "--no-diagnose", f"--sft-checkpoint={sft}", f"--rm-checkpoint={rm}",
                       f"--ppo-config={config}", f"--ppo-args={shlex.join(extra)}"])  # fmt: skip
    seconds = sum(run_plan(run_dir, phase_plan(args, run_dir, None)).values())
    # The run's logger folder (runs/ppo, runs/dpo, ...): the one folder of runs/ with event files.
    (log_dir,) = [p for p in (run_dir / "runs").iterdir() if p.is_dir() and any(p.glob(EVENT_GLOB))]
    sft_eval, points = method_points(read_scalars(log_dir))
    return {"dir": str(log_dir), "seconds": seconds, "sft": sft_eval, "points": points}


def _best_of_n(folder: Path, sft: Path, rm: Path, world: Path, budget: Budget, extra: str) -> dict[str, Any]:
    """``rlhf best-of-n`` over the budget's n; its n = 1 row as the SFT evaluation, a point per n (``step``: n)."""
    from rlhf_lightning.cli import main as rlhf_main

    started = time.perf_counter()
    rlhf_main(["best-of-n", "--sft-checkpoint", str(sft), "--rm-checkpoint", str(rm), "--data-dir", str(world),
               "--n", ",".join(map(str, budget.ns)), "--out", str(folder), *shlex.split(extra)])  # fmt: skip
    rows = json.loads((folder / "best_of_n.json").read_text())["rows"]
    points = [{"step": r["n"], "kl": r["kl"], "d": distance(r["kl"]), "gold": r["gold"], "proxy": r["proxy"]}
              for r in rows]  # fmt: skip
    first = min(rows, key=lambda r: r["n"])
    return {"dir": str(folder), "seconds": time.perf_counter() - started,
            "sft": {"gold": first["gold"], "proxy": first["proxy"]}, "points": points}  # fmt: skip
