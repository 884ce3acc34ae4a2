"""The SFT phase end to end through the real CLI, at tiny size, and its checkpoint."""

from __future__ import annotations

import glob
from pathlib import Path

import lightning as L
import pytest
import torch

from rlhf_lightning.checkpoint import load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import SFTDataModule, Tokenizer
from rlhf_lightning.models.sampling import SamplingConfig
from rlhf_lightning.modules import SFTModule
from rlhf_lightning.modules.common import finite_rank_mean, sample_eval

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sft.yaml"
TINY = [
    "--model.init_args.backbone.n_layer=1",
    "--model.init_args.backbone.d_model=32",
    "--model.init_args.backbone.n_head=2",
    "--data.init_args.eval_prompts=8",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.log_every_n_steps=1",
]


def scalars(run_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(glob.glob(f"{run_dir}/events.out.tfevents.*")[0])
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the config's paths (runs/...) are relative
        main(["fit", "-c", str(CONFIG), *TINY])
    return root


def test_cli_writes_checkpoint_events_and_tokenizer(sft_run):
    ckpt = sft_run / "runs/sft/checkpoints/last.ckpt"
    assert ckpt.is_file()
    assert (sft_run / "runs/sft/checkpoints/tokenizer.json").is_file()
    assert (sft_run / "runs/world/world.json").is_file()  # the world was written on first use
    logged = scalars(sft_run / "runs/sft")
    for tag in ("sft/loss", "sft/val_loss", "sft/val_ppl", "eval/gold_reward", "eval/well_formed", "eval/eos_rate",
                "eval/distinct_1_words", "eval/distinct_2_words", "data/skipped/sft_train"):  # fmt: skip
        assert tag in logged, tag
    assert len(logged["eval/gold_reward"]) == 2  # validated at steps 3 and 6
    assert all(torch.isfinite(torch.tensor(v)).all() for v in logged.values())
    assert not list((sft_run / "runs/sft/checkpoints").glob(".*tmp*"))  # atomic writes leave no temp file


def test_checkpoint_reloads_self_contained(sft_run):
    ckpt_path = sft_run / "runs/sft/checkpoints/last.ckpt"
    meta = load_checkpoint(ckpt_path, phase="sft")["rlhf"]
    assert meta["backbone"]["kind"] == "tinygpt"
    module = SFTModule.load_from_checkpoint(ckpt_path)  # no trainer, no data module: the checkpoint is enough
    tok = Tokenizer.load(sft_run / "runs/world/tokenizer.json")
    assert module.tokenizer.fingerprint() == tok.fingerprint()
    dm = SFTDataModule(data_dir=str(sft_run / "runs/world"), eval_prompts=4, generate_world=False)
    dm.setup()
    prompts, batch = dm.eval_prompts()
    samples = sample_eval(module.model, module.tokenizer, prompts, batch["prompt_ids"], batch["prompt_mask"],
                          SamplingConfig(8), seed=0, judge=dm.judge)  # fmt: skip
    assert len(samples.responses) == 4 and samples.gold.shape == (4,)
    # The reloaded weights are the trained ones, not a fresh initialisation.
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(module.state_dict()["model.tok_emb.weight"], state["model.tok_emb.weight"])


def test_wrong_phase_and_corrupt_checkpoints_fail_clearly(sft_run, tmp_path):
    ckpt_path = sft_run / "runs/sft/checkpoints/last.ckpt"
    with pytest.raises(ValueError, match="'sft' phase, but a 'reward' checkpoint"):
        load_checkpoint(ckpt_path, phase="reward")
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(ckpt_path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_unknown_config_key_fails_at_start(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONFIG), "--model.init_args.no_such_option=1"])
    assert "no_such_option" in capsys.readouterr().err


def test_finite_rank_mean_returns_the_loss_to_log_and_stops_on_nan():
    module = L.LightningModule()  # outside a Trainer: one process, the mean is the loss itself
    loss = torch.tensor(2.5, requires_grad=True)
    logged = finite_rank_mean(module, loss * 2, "sft/loss")
    assert float(logged) == 5.0 and not logged.requires_grad
    with pytest.raises(FloatingPointError, match=r"sft/loss is not finite at step 0 \(this rank's value: nan\)"):
        finite_rank_mean(module, loss * float("nan"), "sft/loss")
