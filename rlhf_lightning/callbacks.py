"""Lightning callbacks of the PPO phase.

``RLHFDiagnostics`` runs the detectors of :mod:`rlhf_lightning.diagnose.detectors` online, on the metrics the PPO
module produced in each iteration, so that a run says it is being reward-hacked (or collapsing, or mis-set) while it
runs, and can stop itself and keep its best checkpoint. Configure it from a phase's YAML::

    trainer:
      callbacks:
        - class_path: rlhf_lightning.callbacks.RLHFDiagnostics
          init_args:
            stop_on: [kl_trouble.kl_blowup]
            save_best: true
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from rlhf_lightning import tags
from rlhf_lightning.checkpoint import checkpoint_dir
from rlhf_lightning.diagnose.detectors import DETECTORS, FAMILIES, GOLD_TAGS, NO_GOLD, Finding, run_detectors
from rlhf_lightning.diagnose.history import History
from rlhf_lightning.diagnose.selection import GOLD_TAG, best_checkpoint_score


class RLHFDiagnostics(pl.Callback):
    """Online reward-hacking, mode-collapse, KL and annotation-shift detectors for the PPO phase.

    After every training batch (one PPO iteration) it reads ``pl_module.last_metrics`` (the iteration's metrics)
    and ``pl_module.iteration`` (already incremented), appends them to its history, runs every detector, logs one
    0/1 flag per family — ``diagnostics/reward_hacking``, ``diagnostics/mode_collapse``,
    ``diagnostics/kl_trouble``, ``diagnostics/annotation_shift``: 1 while a finding of the family holds — at the
    step the module logged the metrics at (``iteration - 1``), and warns once per finding with its evidence. Its
    history is part of the checkpoint, so a resumed run keeps its baselines and does not warn again.

    Args:
        stop_on: finding names (``kl_trouble.kl_blowup``) or families (``reward_hacking``) that stop the run when
            they first fire.
        warn: warn once per finding when it first fires.
        save_best: keep ``best.ckpt``, saved whenever :func:`best_checkpoint_score` reaches a new best.
        best_path: where; default ``best.ckpt`` beside the ModelCheckpoint's files (else in ``default_root_dir``).
        best_max_kl: without a gold judge, only iterations with a KL at most this rank for ``best.ckpt``.
        thresholds: overrides per detector, e.g. ``{"kl_trouble.kl_blowup": {"bound": 50.0}}``.
        gold: False: act as without a gold judge even on the world (the lab's view of a real run): the detectors
            and ``best.ckpt`` never see the gold judge's metrics.
    """

    def __init__(
        self,
        stop_on: list[str] | None = None,
        warn: bool = True,
        save_best: bool = True,
        best_path: str | None = None,
        best_max_kl: float | None = None,
        thresholds: dict[str, dict[str, float]] | None = None,
        gold: bool = True,
    ):
        super().__init__()
        self.stop_on = list(stop_on or [])
        unknown = [s for s in self.stop_on if s not in FAMILIES and s not in DETECTORS]
        if unknown:
            raise ValueError(f"stop_on: unknown {unknown}; use families {list(FAMILIES)} or {sorted(DETECTORS)}")
        self.warn = warn
        self.save_best = save_best
        self.best_path = best_path
        self.best_max_kl = best_max_kl
        self.thresholds = dict(thresholds or {})
        self.gold = gold
        run_detectors(History(), self.thresholds)  # a misspelt detector or argument fails now, not mid-run
        self._points: dict[str, dict[int, float]] = {}
        self._fired: set[str] = set()
        self._seen_iteration: int | None = None
        self._best: float | None = None
        self._no_metrics_warned = False
        self._blind_said = False
        self.findings: list[Finding] = []  #: the findings after the last iteration

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = getattr(pl_module, "last_metrics", None)
        iteration = getattr(pl_module, "iteration", None)
        if metrics is None or iteration is None:
            if not self._no_metrics_warned:
                rank_zero_warn(f"{type(self).__name__}: the module has no last_metrics/iteration; nothing to diagnose")
                self._no_metrics_warned = True
            return
        if not metrics or iteration == self._seen_iteration:
            return  # no new iteration in this batch
        self._seen_iteration = iteration
        step = int(iteration) - 1  # PPOModule logs an iteration's metrics at the iteration's index, before the +1
        if not self.gold:
            metrics = {tag: value for tag, value in metrics.items() if tag not in GOLD_TAGS}
        for tag, value in metrics.items():
            self._points.setdefault(tag, {})[step] = float(value)
        hparams = dict(getattr(pl_module, "hparams", None) or {})
        self.findings = run_detectors(History.from_points(self._points, hparams), self.thresholds)
        new = [f for f in self.findings if f.triggered and f.name not in self._fired]
        self._fired.update(f.name for f in new)

        if trainer.is_global_zero:
            self._report(pl_module, step, new)
        gold_seen = GOLD_TAG in self._points or tags.GOLD_REWARD in self._points
        score = best_checkpoint_score(metrics, gold_seen, self.findings, self.best_max_kl) if self.save_best else None
        stop = any(f.name in self.stop_on or f.family in self.stop_on for f in new)
        # Every rank must take the same decisions (save_checkpoint has a barrier; a stop on one rank only hangs
        # the others). The PPO module's metrics are already the ranks' means; the broadcast makes the agreement
        # independent of that.
        stop, score = trainer.strategy.broadcast((stop, score), src=0)
        if score is not None and (self._best is None or score[0] > self._best):
            self._best = score[0]
            path = self._best_ckpt_path(trainer)
            # whole, to resume from; said explicitly, or Lightning says it chose that for us on every save
            trainer.save_checkpoint(path, weights_only=False)
            rank_zero_info(f"{type(self).__name__}: new best {score[1]} {score[0]:.4g} at iteration {step}: {path}")
        if stop:
            trainer.should_stop = True
            rank_zero_warn(f"{type(self).__name__}: stopping at iteration {step} (stop_on: {self.stop_on})")

    def _report(self, pl_module: pl.LightningModule, step: int, new: list[Finding]) -> None:
        # A family whose every detector needs the gold judge, on a run without one: no flag (a 0 would read as
        # "quiet"), and one line that says so.
        blind = [
            family
            for family in FAMILIES
            if all(not f.evaluated and f.evidence.endswith(NO_GOLD) for f in self.findings if f.family == family)
        ]
        if blind and not self._blind_said:
            self._blind_said = True
            rank_zero_info(f"{type(self).__name__}: {NO_GOLD}: {', '.join(blind)} cannot be evaluated (each of its "
                           "detectors compares with gold); no diagnostics/ flag is logged for it")  # fmt: skip
        if pl_module.logger is not None:
            flags = {
                f"diagnostics/{family}": float(any(f.active for f in self.findings if f.family == family))
                for family in FAMILIES
                if family not in blind
            }
            pl_module.logger.log_metrics(flags, step=step)
        if self.warn:
            for f in new:
                rank_zero_warn(f"[{f.name}] {f.title}: {f.evidence}. Likely: {f.causes[0]}. Try: {f.fixes[0]}")

    def _best_ckpt_path(self, trainer: pl.Trainer) -> Path:
        if self.best_path:
            return Path(self.best_path)
        return checkpoint_dir(trainer) / "best.ckpt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "points": {tag: dict(points) for tag, points in self._points.items()},
            "fired": sorted(self._fired),
            "seen_iteration": self._seen_iteration,
            "best": self._best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._points = {tag: dict(points) for tag, points in state_dict["points"].items()}
        self._fired = set(state_dict["fired"])
        self._seen_iteration = state_dict["seen_iteration"]
        self._best = state_dict["best"]
