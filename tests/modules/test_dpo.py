"""The DPO phase at tiny size: the CLI end to end (checkpoint, tags), the cached reference log-probs (never the
reference model in a training step), the first loss, and the checkpoint alone rebuilding the policy."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_ppo import base, scalars  # noqa: F401  (base: the shared fixture)

from rlhf_lightning.checkpoint import load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule
from rlhf_lightning.data.modules import collate_indexed_pairs
from rlhf_lightning.diagnose.detectors import run_detectors
from rlhf_lightning.diagnose.events import read_run
from rlhf_lightning.modules import DPOModule
from rlhf_lightning.modules.dpo import pair_logps

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: 4 steps of 8 pairs, validation at steps 2 and 4 on 2 batches, 8 held-out prompts with responses of <= 8 tokens.
DPO_TINY = ["--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--data.init_args.eval_prompts=8",
            "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.eval.groups=2",
            "--model.init_args.eval.samples_per_prompt=2", *QUIET]  # fmt: skip


def test_cli_end_to_end(base, monkeypatch):  # noqa: F811
    monkeypatch.chdir(base)
    main(["--debug", "fit", "-c", "dpo", *DPO_TINY,
          "--model.init_args.reward_checkpoint=runs/rm/checkpoints/last.ckpt"])  # fmt: skip
    ckpt = base / "runs/dpo/checkpoints/last.ckpt"
    meta = load_checkpoint(ckpt, phase="dpo")["rlhf"]
    assert meta["phase"] == "dpo" and "tokenizer" in str(meta.keys()) and meta["backbone"]
    logged = scalars(base / "runs/dpo")
    for tag in ("dpo/loss", "dpo/val_loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "rewards/val_accuracies", "rewards/val_accuracy_gold", "eval/gold_reward",
                "eval/sft_gold_reward", "eval/win_rate", "eval/proxy_reward", "eval/kl",
                "diversity/per_input_distinct_2", "eval/sft_per_input_distinct_2"):  # fmt: skip
        assert tag in logged, tag
        assert all(math.isfinite(v) for v in logged[tag].values()), tag
    assert sorted(logged["eval/gold_reward"]) == [1, 3]  # each validation (steps 2 and 4, 0-based global steps)
    # The checkpoint alone rebuilds the trained policy (no SFT checkpoint, no data module).
    module = DPOModule.load_from_checkpoint(ckpt, map_location="cpu")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith(("ref_policy.", "reward_model.")) for k in state)
    torch.testing.assert_close(module.policy.state_dict(), {k[len("policy.") :]: v for k, v in state.items()})
    assert module.tokenizer is not None
    main(["--debug", "export", str(ckpt), "--out", str(base / "dpo_export")])  # a causal LM like SFT's and PPO's
    assert (base / "dpo_export/config.json").is_file()


def test_a_failure_preset_and_the_diagnosis_of_the_run(base, tmp_path, monkeypatch, capsys):  # noqa: F811
    """`rlhf fit -c dpo --preset failures/dpo_small_beta` runs the preset's dpo part (the tiny overrides after it
    win), and `rlhf diagnose` reads the run: the KL detectors on eval/kl, DPO's beta no KL coefficient."""
    for name in ("world", "sft", "rm"):
        (tmp_path / "runs").mkdir(exist_ok=True)
        (tmp_path / "runs" / name).symlink_to(base / "runs" / name)
    monkeypatch.chdir(tmp_path)
    main(["--debug", "fit", "-c", "dpo", "--preset", "failures/dpo_small_beta", *DPO_TINY,
          "--model.init_args.reward_checkpoint=runs/rm/checkpoints/last.ckpt"])  # fmt: skip
    saved = yaml.safe_load((tmp_path / "runs/dpo/config.yaml").read_text())
    assert saved["model"]["init_args"]["beta"] == 0.01 and saved["model"]["init_args"]["lr"] == 3e-4
    assert saved["trainer"]["val_check_interval"] == 2  # the command line's, after the preset
    capsys.readouterr()
    main(["diagnose", "runs/dpo"])
    report = capsys.readouterr().out
    findings = {f.name: f for f in run_detectors(read_run(tmp_path / "runs/dpo"))}
    for name in ("kl_trouble.kl_blowup", "kl_trouble.negative_kl"):
        assert findings[name].evaluated and "eval/kl" in findings[name].evidence, name
        assert f"`{name}`: at iteration 3: " in report
    assert (
        not findings["kl_trouble.no_kl_penalty"].evaluated
        and "a DPO run" in findings["kl_trouble.no_kl_penalty"].evidence
    )


class RefCalls(Callback):
    """Counts the reference model's forward passes during training steps and elsewhere (after configure_model)."""

    def __init__(self) -> None:
        self.in_training_step = self.elsewhere = 0
        self.training = False

    def on_fit_start(self, trainer, module) -> None:
        def count(*_) -> None:
            if self.training:
                self.in_training_step += 1
            else:
                self.elsewhere += 1

        module.ref_policy.register_forward_hook(count)

    def on_train_batch_start(self, *_) -> None:
        self.training = True

    def on_train_batch_end(self, *_) -> None:
        self.training = False


def test_reference_logps_are_cached_and_the_reference_never_runs_in_a_training_step(base, tmp_path):  # noqa: F811
    dm = PreferenceDataModule(data_dir=str(base / "runs/world"), batch_size=8, eval_prompts=4,
                              tokenizer_path=str(base / "runs/sft/checkpoints/tokenizer.json"))  # fmt: skip
    module = DPOModule(sft_checkpoint=str(base / "runs/sft/checkpoints/last.ckpt"), ref_batch_size=64,
                       sampling={"max_new_tokens": 4, "temperature": 1.0}, eval={"groups": 0})  # fmt: skip
    calls = RefCalls()
    trainer = L.Trainer(max_steps=3, val_check_interval=3, limit_val_batches=1, logger=False, callbacks=[calls],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, dm)
    assert calls.in_training_step == 0
    assert calls.elsewhere > 0  # the evaluation's SFT samples and KL do use it
    # The cache holds every pair of both splits, and is the reference's own log-probs of each.
    assert module.ref_logps_train.shape == (len(dm.train_examples), 2)
    assert module.ref_logps_val.shape == (len(dm.val_examples), 2)
    batch = collate_indexed_pairs(list(enumerate(dm.train_examples))[5:9], dm.tokenizer.pad_id)
    torch.testing.assert_close(pair_logps(module.ref_policy, batch), module.ref_logps_train[5:9])


def test_first_loss_is_log_2_and_pair_logps_match_a_plain_forward(base):  # noqa: F811
    """Before any update the policy is the reference: every margin is 0 and the sigmoid loss is log 2. pair_logps
    equals the log-softmax of the plain logits summed over each response's tokens."""
    dm = PreferenceDataModule(data_dir=str(base / "runs/world"), batch_size=4,
                              tokenizer_path=str(base / "runs/sft/checkpoints/tokenizer.json"))  # fmt: skip
    dm.setup("fit")
    module = DPOModule(sft_checkpoint=str(base / "runs/sft/checkpoints/last.ckpt"))
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.datamodule = dm  # configure_model reads the data module's tokenizer and pairs
    module.trainer = trainer
    module.configure_model()
    batch = collate_indexed_pairs(list(enumerate(dm.train_examples))[:4], dm.tokenizer.pad_id)
    loss, rewards = module._pair_loss(batch, module.ref_logps_train)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    torch.testing.assert_close(rewards, torch.zeros(4, 2), atol=1e-5, rtol=0)
    ex = dm.train_examples[0]
    ids = torch.tensor([ex.prompt_ids + ex.chosen_ids])
    with torch.no_grad():
        logits = module.policy(ids, torch.ones_like(ids, dtype=torch.bool)) @ module.policy.lm_head_weight.T
    logp = logits.log_softmax(-1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    expected = logp[len(ex.prompt_ids) - 1 :].sum()
    assert pair_logps(module.policy, batch)[0, 0].item() == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize(
    ("setting", "message"),
    [("beta=0", "beta must be > 0"), ("label_smoothing=0.5", r"label_smoothing must be in \[0, 0.5\)"),
     ("loss=ipo --model.init_args.label_smoothing=0.1", "applies to loss 'sigmoid' only")],
)  # fmt: skip
def test_bad_settings_stop_in_one_line(base, monkeypatch, capsys, setting, message):  # noqa: F811
    monkeypatch.chdir(base)
    words = [f"--model.init_args.{w.removeprefix('--model.init_args.')}" for w in setting.split()]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", "dpo", *QUIET, *words])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_best_of_n_command(base, tmp_path, capsys):  # noqa: F811
    """``rlhf best-of-n`` through main: one row per n, n = 1 the SFT policy itself (KL 0), the proxy rising with n
    (the expected maximum of more samples), the analytic KL, and the JSON and markdown files."""
    out = tmp_path / "bon"
    main(["--debug", "best-of-n", "--sft-checkpoint", str(base / "runs/sft/checkpoints/last.ckpt"),
          "--rm-checkpoint", str(base / "runs/rm/checkpoints/last.ckpt"), "--data-dir", str(base / "runs/world"),
          "--n", "4,1,2", "--prompts", "6", "--max-new-tokens", "6", "--out", str(out)])  # fmt: skip
    rows = json.loads((out / "best_of_n.json").read_text())["rows"]
    assert [r["n"] for r in rows] == [1, 2, 4]
    assert rows[0]["kl"] == 0.0 and rows[2]["kl"] == pytest.approx(math.log(4) - 0.75)
    assert rows[0]["proxy"] <= rows[1]["proxy"] <= rows[2]["proxy"]
    assert all(math.isfinite(r["gold"]) for r in rows)
    assert (out / "best_of_n.md").read_text().startswith("| n | gold | proxy | KL (nats) |")
    assert "[best-of-n] 4 samples x 6 prompts" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["best-of-n", "--n", "0,2", "--out", str(out)])
    assert "rlhf: error: best-of-n: --n '0,2': every n must be >= 1" in capsys.readouterr().err
