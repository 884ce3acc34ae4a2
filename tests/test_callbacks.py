"""RLHFDiagnostics on a tiny Lightning run of a dummy module that replays scripted PPO metrics."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from rlhf_lightning.callbacks import RLHFDiagnostics, best_checkpoint_score
from rlhf_lightning.diagnose.detectors import Finding
from rlhf_lightning.diagnose.events import read_run

ITERATIONS = 20
GOLD_AT_EVAL = {4: 0.1, 9: 0.3, 14: 0.2, 19: 0.25}  # the best held-out gold is at iteration 9


def script() -> list[dict[str, float]]:
    """Per-iteration metrics whose KL explodes (exp(i / 3) nats), with an evaluation every 5 iterations."""
    rows = []
    for i in range(ITERATIONS):
        row = {"objective/kl": math.exp(i / 3), "objective/kl_coef": 0.05, "objective/proxy_reward": 0.1 * i}
        if i in GOLD_AT_EVAL:
            row["eval/gold_reward"] = GOLD_AT_EVAL[i]
        rows.append(row)
    return rows


class ReplayModule(pl.LightningModule):
    """Stands in for PPOModule: one batch = one iteration; logs at step = iteration, then sets last_metrics."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.iteration = 0
        self.last_metrics: dict[str, float] = {}
        self.rows = script()

    def training_step(self, batch, batch_idx):
        metrics = self.rows[self.iteration]
        self.logger.log_metrics(metrics, step=self.iteration)
        self.iteration += 1
        self.last_metrics = metrics
        return self.layer(batch[0]).pow(2).mean()

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.zeros(ITERATIONS, 2)), batch_size=1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(tmp_path, callback: RLHFDiagnostics) -> tuple[ReplayModule, list[str]]:
    module = ReplayModule()
    trainer = pl.Trainer(
        max_epochs=1,
        logger=TensorBoardLogger(str(tmp_path), name="", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        accelerator="cpu",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)
    return module, [str(w.message) for w in caught]


def test_flags_warnings_and_best_checkpoint(tmp_path):
    callback = RLHFDiagnostics()
    module, messages = fit(tmp_path, callback)
    assert module.iteration == ITERATIONS
    blowup = [m for m in messages if "[kl_trouble.kl_blowup]" in m]
    assert len(blowup) == 1 and "KL" in blowup[0] and "Try:" in blowup[0]  # once, with evidence and a fix
    first = next(f for f in callback.findings if f.name == "kl_trouble.kl_blowup").iteration

    h = read_run(tmp_path)
    flag = h.get("diagnostics/kl_trouble")
    assert flag.steps.tolist() == list(range(ITERATIONS))  # the steps the module logged its metrics at
    assert flag.values.tolist() == [float(i >= first) for i in range(ITERATIONS)]
    assert h.get("diagnostics/mode_collapse").values.max() == 0.0

    best = torch.load(tmp_path / "best.ckpt", map_location="cpu", weights_only=False)
    (state,) = [v for k, v in best["callbacks"].items() if "RLHFDiagnostics" in k]
    assert state["best"] == pytest.approx(0.3) and state["seen_iteration"] == 10  # saved after iteration 9

    resumed = RLHFDiagnostics()
    resumed.load_state_dict(callback.state_dict())
    assert resumed.state_dict() == callback.state_dict()


def test_stop_on_a_family_stops_when_it_fires(tmp_path):
    callback = RLHFDiagnostics(stop_on=["kl_trouble"], save_best=False)
    module, messages = fit(tmp_path, callback)
    first = next(f for f in callback.findings if f.name == "kl_trouble.kl_blowup").iteration
    assert module.iteration == first + 1 < ITERATIONS
    assert any("stopping at iteration" in m for m in messages)
    assert not (tmp_path / "best.ckpt").exists()


def test_invalid_configuration_fails_at_construction():
    with pytest.raises(ValueError, match="stop_on"):
        RLHFDiagnostics(stop_on=["reward_hack"])
    with pytest.raises(ValueError, match="unknown detector"):
        RLHFDiagnostics(thresholds={"kl_trouble.blowup": {"bound": 1.0}})


def test_module_without_last_metrics_warns_once_and_does_nothing():
    callback = RLHFDiagnostics()
    trainer = SimpleNamespace(is_global_zero=True)
    module = SimpleNamespace(iteration=1, logger=None)
    with pytest.warns(UserWarning, match="no last_metrics") as record:
        callback.on_train_batch_end(trainer, module, None, None, 0)
        callback.on_train_batch_end(trainer, module, None, None, 1)
    assert len(record) == 1 and callback.findings == []


def _finding(family: str, active: bool) -> Finding:
    return Finding(f"{family}.x", "", True, active, 0 if active else None, active, "", (), ())


def test_best_checkpoint_score():
    quiet = [_finding("reward_hacking", False)]
    gold = {"eval/gold_reward": 0.4, "eval/proxy_reward": 9.0}
    assert best_checkpoint_score(gold, gold_seen=True, findings=quiet) == (0.4, "eval/gold_reward")
    proxy = {"eval/proxy_reward": 1.0, "objective/ensemble_std": 0.3, "objective/kl": 4.0}
    assert best_checkpoint_score(proxy, gold_seen=True, findings=quiet) is None  # gold exists: proxy never ranks
    assert best_checkpoint_score(proxy, gold_seen=False, findings=quiet)[0] == pytest.approx(0.7)
    assert best_checkpoint_score(proxy, False, quiet, max_kl=3.0) is None
    assert best_checkpoint_score(proxy, False, [_finding("reward_hacking", True)]) is None
    assert best_checkpoint_score({"objective/kl": 1.0}, False, quiet) is None  # not an evaluation
    # fresh labels rank before the proxy, whatever the warnings: the audit measures quality itself
    audited = {**proxy, "eval/audit_win_rate": 0.62}
    assert best_checkpoint_score(audited, False, [_finding("reward_hacking", True)]) == (0.62, "eval/audit_win_rate")


def test_without_gold_the_callback_never_sees_the_judge(tmp_path, caplog):
    # The lab's view of a real run: gold is logged by the module but neither the detectors nor best.ckpt read it.
    callback = RLHFDiagnostics(gold=False)
    with caplog.at_level("INFO"):
        fit(tmp_path, callback)
    said = [r.message for r in caplog.records if "cannot be evaluated" in r.message]
    assert len(said) == 1 and "annotation_shift" in said[0]
    assert "eval/gold_reward" not in callback.state_dict()["points"]
    assert callback.state_dict()["best"] is None and not (tmp_path / "best.ckpt").exists()  # no held-out proxy either
    assert any(f.name == "kl_trouble.kl_blowup" and f.triggered for f in callback.findings)
    h = read_run(tmp_path)
    assert h.get("diagnostics/annotation_shift") is None  # a 0 would read as quiet: not evaluated, so no flag
    assert h.get("diagnostics/kl_trouble") is not None
