"""The PPO phase at tiny size: one iteration's effect, the oracle-reward run, exact resume, the NaN stop, start-up
errors, and the CLI end to end. A tiny SFT run and a tiny reward-model run (through the CLI) come first."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from test_sft import TINY

from rlhf_lightning.checkpoint import AtomicCheckpointIO, load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models.lora import LoRAConfig
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.modules.ppo import PPO_STATE_KEY
from rlhf_lightning.modules.ppo_eval import EvalConfig
from rlhf_lightning.modules.ppo_passes import sequence_scores
from rlhf_lightning.modules.ppo_setup import import_score_fn
from rlhf_lightning.rl import KLConfig, RewardConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
RM_TINY = ["--data.init_args.batch_size=8", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
           "--trainer.limit_val_batches=1", "--model.init_args.norm_samples=8", *QUIET]  # fmt: skip
SFT_CKPT = "runs/sft/checkpoints/last.ckpt"
RM_CKPT = "runs/rm/checkpoints/last.ckpt"
#: Small PPO settings: 8 responses of <= 8 tokens per iteration, 2 minibatches, 1 epoch -> 2 optimizer steps.
SMALL = {"rollout_batch": 8, "minibatch_size": 4, "ppo_epochs": 1, "eval_every": 2, "eval_table_rows": 2}


def scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} over every event file of a run directory (a resumed run appends a second file)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(glob.glob(f"{run_dir}/events.out.tfevents.*")):
        acc = EventAccumulator(path)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A folder holding a tiny world, SFT checkpoint and reward-model checkpoint (the configs' relative paths)."""
    root = tmp_path_factory.mktemp("ppo_base")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), *TINY])
        main(["fit", "-c", str(CONFIGS / "rm.yaml"), *RM_TINY])
    return root


def grouped(settings: dict) -> dict:
    """PPOModule's keyword arguments from settings written flat for brevity (``kl_coef`` for ``kl.coef``, as
    ``PPOModule.RENAMED`` maps them; ``kl_in_loss`` a bool), with the KL, reward and evaluation ones in their groups."""
    out, groups = {}, {"kl": {}, "rewards": {}, "eval": {}}
    for key, value in settings.items():
        if key not in PPOModule.RENAMED:
            out[key] = value
            continue
        group, name = PPOModule.RENAMED[key].split(".")
        groups[group][name] = ("loss" if value else "reward") if key == "kl_in_loss" else value
    configs = {"kl": KLConfig, "rewards": RewardConfig, "eval": EvalConfig}
    return {**out, **{group: configs[group](**values) for group, values in groups.items() if values}}


def make_module(base: Path, **overrides) -> PPOModule:
    args = {"sft_checkpoint": str(base / SFT_CKPT), "reward_checkpoint": str(base / RM_CKPT), "iterations": 2,
            "sampling": {"max_new_tokens": 8, "temperature": 1.0}, **SMALL, **overrides}  # fmt: skip
    from rlhf_lightning.models.sampling import SamplingConfig

    args["sampling"] = SamplingConfig(**args["sampling"])
    return PPOModule(**grouped(args))


class StopAfter(Callback):
    """Stops the run once the module has finished ``n`` iterations (a stand-in for a crash after a checkpoint)."""

    def __init__(self, n: int):
        self.n = n

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.iteration >= self.n:
            trainer.should_stop = True


def fit(
    base: Path, out: Path, module: PPOModule, ckpt_path: str | None = None, stop_after: int | None = None,
    tokenizer_path: str | None = None,
):  # fmt: skip
    dm = PromptDataModule(data_dir=str(base / "runs/world"), eval_prompts=8, generate_world=False,
                          tokenizer_path=tokenizer_path)  # fmt: skip
    steps_per_iteration = module.hparams.ppo_epochs * module.hparams.rollout_batch // module.hparams.minibatch_size
    callbacks = [ModelCheckpoint(dirpath=out / "ckpt", save_last=True, every_n_train_steps=steps_per_iteration)]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = L.Trainer(
        max_epochs=1, logger=TensorBoardLogger(str(out), name="ppo", version=""), callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        devices=1, default_root_dir=str(out),
    )  # fmt: skip
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return trainer


def test_one_iteration_changes_the_policy_and_not_the_reference(base, tmp_path):
    module = make_module(base, iterations=1)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    dm = PromptDataModule(data_dir=str(base / "runs/world"), eval_prompts=8, generate_world=False)
    L.Trainer(max_epochs=1, logger=False, callbacks=[Snapshot()], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module, dm)  # fmt: skip
    after = module.state_dict()
    changed = lambda prefix: any(  # noqa: E731
        not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)
    )
    assert changed("policy.")
    assert changed("critic_backbone.") and changed("value_head.")
    assert not changed("ref_policy.") and not changed("reward_model.")
    assert module.iteration == 1
    # The reference starts equal to the policy (both are the SFT weights).
    sft = load_checkpoint(base / SFT_CKPT, phase="sft")["state_dict"]
    torch.testing.assert_close(before["ref_policy.tok_emb.weight"], sft["model.tok_emb.weight"])
    torch.testing.assert_close(before["policy.tok_emb.weight"], sft["model.tok_emb.weight"])


def test_oracle_reward_raises_the_gold_score(base, tmp_path):
    """Against the gold judge itself, a short run must raise the gold reward of the rollouts. The tiny policy rarely
    ends within 8 tokens: the judge's own missing-EOS term grades those responses, not a flat missing_eos_score."""
    module = make_module(base, reward_source="gold", iterations=12, rollout_batch=32, minibatch_size=16,
                         ppo_epochs=2, lr=3e-3, kl_coef=0.01, eval_every=12, missing_eos_score=None)  # fmt: skip
    fit(base, tmp_path, module)
    gold = scalars(tmp_path / "ppo")["objective/gold_reward"]
    assert sorted(gold) == list(range(12))
    first, last = sum(gold[i] for i in range(3)) / 3, sum(gold[i] for i in range(9, 12)) / 3
    assert last > first + 0.1, (first, last)


RESUME_TAGS = ("objective/proxy_reward", "objective/kl", "objective/kl_coef", "policy/approx_kl", "value/loss",
               "objective/entropy", "rollout/length_mean", "eval/gold_reward", "eval/win_rate")  # fmt: skip


def test_resume_repeats_the_uninterrupted_run_exactly(base, tmp_path):
    # An adaptive KL controller and running score statistics: both must come back from the checkpoint.
    opts = {"iterations": 4, "kl_controller": "adaptive", "kl_target": 0.5, "kl_horizon": 100,
            "score_norm": "running", "lr": 1e-3}  # fmt: skip
    fit(base, tmp_path / "whole", make_module(base, **opts))
    fit(base, tmp_path / "cut", make_module(base, **opts), stop_after=2)
    last = tmp_path / "cut/ckpt/last.ckpt"
    assert torch.load(last, weights_only=False)[PPO_STATE_KEY]["iteration"] == 2
    fit(base, tmp_path / "cut", make_module(base, **opts), ckpt_path=str(last))
    whole, cut = scalars(tmp_path / "whole/ppo"), scalars(tmp_path / "cut/ppo")
    assert set(whole["objective/kl_coef"]) == {0, 1, 2, 3} == set(cut["objective/kl_coef"])
    assert len(set(whole["objective/kl_coef"].values())) > 1  # the controller did move beta
    for tag in RESUME_TAGS:
        assert whole[tag] == cut[tag], tag  # bit-for-bit, at every logged iteration
    final = torch.load(tmp_path / "cut/ckpt/last.ckpt", weights_only=False)
    reference = torch.load(tmp_path / "whole/ckpt/last.ckpt", weights_only=False)
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, final["state_dict"][key]), key


@pytest.mark.parametrize(
    "options",
    [
        {"kl_estimator": "full", "kl_in_loss": True, "kl_metric": "full"},
        {"kl_estimator": "k3", "kl_in_loss": True, "critic": "shared"},
        {"kl_controller": "annealed", "kl_floor": 0.01, "kl_anneal_iterations": 2, "entropy_coef": 0.01,
         "target_approx_kl": 1e-9},
        {"length_debias": True, "score_norm": "running"},
        {"lora": LoRAConfig(r=4, alpha=8.0)},
    ],
    ids=["full-kl-in-loss", "kl-in-loss-shared-critic", "annealed-entropy-early-stop", "length-debias", "lora"],
)  # fmt: skip
def test_options_run_and_log_finite_metrics(base, tmp_path, options):
    module = make_module(base, iterations=2, ppo_epochs=2, **options)
    fit(base, tmp_path, module)
    logged = scalars(tmp_path / "ppo")
    assert sorted(logged["objective/kl"]) == [0, 1]
    assert all(math.isfinite(v) for series in logged.values() for v in series.values())
    if options.get("critic") == "shared":
        assert module.critic_backbone is None  # the value head sits on the policy's trunk
    if options.get("kl_in_loss"):
        assert logged["objective/non_score_reward"] == {0: 0.0, 1: 0.0}  # the KL is in the loss, not the reward
    if options.get("kl_metric") == "full":
        assert logged["objective/kl"][1] >= 0  # the exact KL is never negative
    if options.get("lora"):
        assert logged["objective/kl"][0] == 0.0  # adapters start at zero: the policy is its reference, the SFT model
    if options.get("target_approx_kl"):
        assert logged["policy/epochs"] == {0: 1.0, 1: 1.0}  # stopped after the first epoch each time
        assert logged["objective/kl_coef"][1] < logged["objective/kl_coef"][0]
    if options.get("length_debias"):
        assert sorted(logged["objective/length_slope"]) == [0, 1]
    else:
        assert "objective/length_slope" not in logged


def test_checkpoint_leaves_out_the_frozen_models_and_reloads(base, tmp_path):
    fit(base, tmp_path, make_module(base, iterations=1))
    ckpt = torch.load(tmp_path / "ckpt/last.ckpt", weights_only=False)
    keys = ckpt["state_dict"].keys()
    assert not any(k.startswith(("ref_policy.", "reward_model.")) for k in keys)
    assert any(k.startswith("policy.") for k in keys) and any(k.startswith("critic_backbone.") for k in keys)
    assert ckpt["rlhf"]["phase"] == "ppo" and ckpt[PPO_STATE_KEY]["iteration"] == 1
    loaded = PPOModule.load_from_checkpoint(tmp_path / "ckpt/last.ckpt")  # no trainer: the policy alone rebuilds
    torch.testing.assert_close(loaded.policy.tok_emb.weight, ckpt["state_dict"]["policy.tok_emb.weight"])
    assert loaded.ref_policy is None


_CALLS = {"n": 0}


def nan_on_second_call(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward source that breaks at its second call (iteration 1)."""
    _CALLS["n"] += 1
    return [math.nan if _CALLS["n"] >= 2 else 0.0 for _ in prompts]


def test_nan_reward_stops_the_run_and_keeps_the_last_good_state(base, tmp_path):
    _CALLS["n"] = 0
    module = make_module(base, reward_source=f"{__name__}:nan_on_second_call", iterations=4)
    with pytest.raises(FloatingPointError, match=r"reward .* not finite at iteration 1"):
        fit(base, tmp_path, module)
    saved = torch.load(tmp_path / "ckpt/last-good.ckpt", weights_only=False)
    assert saved[PPO_STATE_KEY]["iteration"] == 1  # the state after iteration 0, before the bad rollout
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())


def test_startup_errors(base, tmp_path):
    with pytest.raises(ValueError, match=r"minibatch_size \(3\) must divide rollout_batch \(8\)"):
        make_module(base, minibatch_size=3)
    with pytest.raises(FileNotFoundError, match=r"reward_checkpoint .*nope.ckpt does not exist"):
        make_module(base, reward_checkpoint=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ValueError, match=r"kl\.estimator 'k1' cannot be used with kl\.placement 'loss'"):
        make_module(base, kl_estimator="k1", kl_in_loss=True)
    with pytest.raises(ValueError, match=r"rewards\.norm_samples must be 0"):
        make_module(base, reward_norm_samples=1)
    with pytest.raises(ValueError, match="cannot be imported"):
        import_score_fn("no_such_module_xyz:fn")
    # A reward model whose tokenizer differs from the SFT policy's: caught when the models are built.
    other = tmp_path / "other_rm.ckpt"
    ckpt = torch.load(base / RM_CKPT, weights_only=False)
    ckpt["rlhf"]["tokenizer"] = ckpt["rlhf"]["tokenizer"].replace('"good"', '"goood"', 1)
    torch.save(ckpt, other)
    with pytest.raises(ValueError, match=r"tokenizers of .* differ"):
        fit(base, tmp_path, make_module(base, reward_checkpoint=str(other)))


def words(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward that pays for length alone (one point per word): what a length-biased reward model learns."""
    return [float(len(r.split())) for r in responses]


def test_length_debias_takes_the_length_incentive_out_of_the_reward(base, tmp_path):
    lengths = {}
    for debias in (False, True):
        out = tmp_path / str(debias)
        module = make_module(base, reward_source=f"{__name__}:words", iterations=12, rollout_batch=32,
                             minibatch_size=16, ppo_epochs=2, lr=3e-3, kl_coef=0.01, eval_every=12,
                             length_debias=debias, sampling={"max_new_tokens": 16, "temperature": 1.0})  # fmt: skip
        fit(base, out, module)
        logged = scalars(out / "ppo")
        lengths[debias] = [logged["rollout/length_mean"][i] for i in range(12)]
        if debias:
            slopes = list(logged["objective/length_slope"].values())
            assert all(0.5 < s < 1.5 for s in slopes), slopes  # about one point per token: a word is a token
    # Both runs pay -1 for a response without EOS. Paid for length, the plain run keeps long responses; with the
    # length trend removed only the EOS penalty is left, and the responses shrink (measured: 10.9 and 2.3 tokens).
    assert sum(lengths[True][-3:]) / 3 < sum(lengths[False][-3:]) / 3 - 3, lengths


def test_lora_dropout_is_off_in_the_update(base):
    module = make_module(base, iterations=1, lora=LoRAConfig(r=4, alpha=8.0, dropout=0.5), eval_groups=0)
    dm = PromptDataModule(data_dir=str(base / "runs/world"), eval_prompts=8, generate_world=False)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, accelerator="cpu").fit(module, dm)  # fmt: skip
    # The update runs the policy in training mode: after the first step (B != 0) dropout on the adapters' input would
    # make every later minibatch's ratio differ from what the rollout's weights give (and resume inexact). The first
    # ratio cannot show it: with B = 0 the adapters' output is 0 whatever the dropout does.
    ids, mask = torch.randint(2, 20, (2, 6)), torch.ones(2, 6, dtype=torch.bool)
    module.policy.train()
    assert torch.equal(module.policy(ids, mask), module.policy(ids, mask))


def test_cli_end_to_end(base, tmp_path, monkeypatch, capsys):
    for name in ("runs/world", "runs/sft", "runs/rm"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(base / name)
    monkeypatch.chdir(tmp_path)
    main(["fit", "-c", str(CONFIGS / "ppo.yaml"), "--model.init_args.iterations=2", "--model.init_args.rollout_batch=8",
          "--model.init_args.minibatch_size=4", "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=2",
          "--model.init_args.sampling.max_new_tokens=8", "--data.init_args.eval_prompts=8",
          "--trainer.callbacks.init_args.every_n_train_steps=2", *QUIET])  # fmt: skip
    assert (tmp_path / "runs/ppo/checkpoints/last.ckpt").is_file()
    logged = scalars(tmp_path / "runs/ppo")
    for tag in ("objective/proxy_reward", "objective/gold_reward", "objective/kl", "objective/kl_coef",
                "objective/entropy", "policy/clipfrac", "policy/approx_kl", "value/loss",
                "value/explained_variance", "rollout/length_mean", "rollout/eos_rate", "diversity/distinct_1",
                "diversity/distinct_2", "perf/rollout_s", "perf/update_s", "perf/tokens_per_s", "eval/win_rate",
                "eval/gold_reward", "diversity/self_bleu", "diversity/ead", "rollout/duplicate_rate",
                "diversity/per_input_distinct_2", "diversity/per_input_self_bleu", "eval/sft_per_input_distinct_2",
                "objective/kl_coef_at_bound", "eval/audit_win_rate", "eval/proxy_win_rate", "eval/gold_reward_se",
                "eval/sft_length_mean"):  # fmt: skip
        assert tag in logged, tag
        assert all(math.isfinite(v) for v in logged[tag].values()), tag
    assert sorted(logged["objective/kl"]) == [0, 1]
    # Resuming with a changed model setting: LightningCLI resumes with the checkpoint's, and says so.
    capsys.readouterr()
    main(["fit", "-c", str(CONFIGS / "ppo.yaml"), "--model.init_args.iterations=3", "--model.init_args.rollout_batch=8",
          "--model.init_args.minibatch_size=4", "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=2",
          "--model.init_args.sampling.max_new_tokens=8", "--data.init_args.eval_prompts=8", *QUIET,
          "--ckpt_path=runs/ppo/checkpoints/last.ckpt"])  # fmt: skip
    assert capsys.readouterr().err.endswith("the config's values are ignored: iterations (config 3, checkpoint 2)\n")


def test_sigkill_mid_run_resumes_to_the_same_end(base, tmp_path):
    """A PPO run killed with SIGKILL after its second checkpoint resumes from it and ends with the same metrics as an
    uninterrupted run; no partially written checkpoint is left behind.

    The run is killed while hang_hook.HangAfterIterations holds it at the start of its third iteration (after the
    second iteration's checkpoint is written), so where it dies does not depend on the machine's speed."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    kill_at = 2
    here = Path(__file__).resolve().parent
    # This checkout's packages, and the folder of hang_hook for the subprocess to import the hook from.
    paths = [str(CONFIGS.parent), str(CONFIGS.parent / "kernels"), str(here), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    args = ["fit", "-c", str(CONFIGS / "ppo.yaml"), f"--model.init_args.sft_checkpoint={base / SFT_CKPT}",
            f"--model.init_args.reward_checkpoint={base / RM_CKPT}", f"--data.init_args.data_dir={base / 'runs/world'}",
            "--data.init_args.generate_world=false", "--model.init_args.iterations=6",
            "--model.init_args.rollout_batch=8",
            "--model.init_args.minibatch_size=4", "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=3",
            "--model.init_args.sampling.max_new_tokens=8", "--data.init_args.eval_prompts=8",
            "--trainer.callbacks.init_args.every_n_train_steps=2", *QUIET]  # fmt: skip

    def run(where: Path, *extra: str) -> subprocess.Popen:
        where.mkdir(parents=True, exist_ok=True)
        # stderr to a file, not a pipe: a run held by the hook must not also be blocked on a full pipe.
        with open(where / "stderr.log", "a") as log:
            return subprocess.Popen([sys.executable, "-m", "rlhf_lightning.cli", *args, *extra], cwd=where, env=env,
                                    stdout=subprocess.DEVNULL, stderr=log)  # fmt: skip

    def finish(where: Path, proc: subprocess.Popen) -> None:
        try:
            returncode = proc.wait(timeout=600)  # a safety net against a hung run, not a measure of speed
        finally:
            proc.kill()  # only a run the test gave up on is still there
        assert returncode == 0, (where / "stderr.log").read_text()[-3000:]

    finish(tmp_path / "whole", run(tmp_path / "whole"))
    marker = tmp_path / "held"
    hook = json.dumps({"class_path": "hang_hook.HangAfterIterations",
                       "init_args": {"after": kill_at, "marker": str(marker)}})  # fmt: skip
    proc = run(tmp_path / "cut", f"--trainer.callbacks+={hook}")
    try:
        # The marker decides when to kill; the deadline is only a safety net against a run that hangs elsewhere.
        deadline = time.monotonic() + 600
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run ended or hung before the hook held it: " + (
            tmp_path / "cut/stderr.log").read_text()[-3000:]  # fmt: skip
    finally:
        proc.kill()  # SIGKILL; also when the test gave up on the run, which must not outlive it
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt_dir = tmp_path / "cut/runs/ppo/checkpoints"
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]  # atomic writes
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=False)[PPO_STATE_KEY]["iteration"] == kill_at
    finish(tmp_path / "cut", run(tmp_path / "cut", f"--ckpt_path={ckpt_dir / 'last.ckpt'}"))
    whole, cut = scalars(tmp_path / "whole/runs/ppo"), scalars(tmp_path / "cut/runs/ppo")
    for tag in ("objective/proxy_reward", "objective/kl", "policy/approx_kl", "eval/gold_reward"):
        after = {step: v for step, v in whole[tag].items() if step >= kill_at}
        assert after and after == {step: cut[tag][step] for step in after}, tag
    assert max(whole["objective/kl"]) == max(cut["objective/kl"]) == 5  # both ran to the last iteration


def test_ensemble_reward_pays_the_conservative_score(base, tmp_path, monkeypatch):
    """A 2-member reward ensemble: PPO logs the members' disagreement on its samples and is paid mean - k * std."""
    from rlhf_lightning.data.collate import join_left_right
    from rlhf_lightning.models.sampling import SamplingConfig, generate

    monkeypatch.chdir(base)
    main(["fit", "-c", str(CONFIGS / "rm.yaml"), *RM_TINY, "--model.init_args.ensemble_size=2",
          "--trainer.callbacks.init_args.dirpath=runs/rm2/checkpoints", "--trainer.default_root_dir=runs/rm2",
          "--trainer.logger.init_args.name=rm2"])  # fmt: skip
    module = make_module(base, reward_checkpoint=str(base / "runs/rm2/checkpoints/last.ckpt"), ensemble_k=1.5,
                         iterations=1)  # fmt: skip
    fit(base, tmp_path, module)
    assert scalars(tmp_path / "ppo")["objective/ensemble_std"][0] > 0
    # What the module pays for a response is the ensemble's mean minus 1.5 times its std.
    dm = PromptDataModule(data_dir=str(base / "runs/world"), generate_world=False)
    dm.setup()
    prompts, batch = dm.rollout_prompts(0, 4, seed=0)
    out = generate(module.policy.eval(), batch["prompt_ids"], batch["prompt_mask"], SamplingConfig(8),
                   module.tokenizer.eos_id, module.tokenizer.pad_id, torch.Generator().manual_seed(0))  # fmt: skip
    with torch.no_grad():
        paid, _ = sequence_scores(module._models, "model", 1.5, None, module.device, prompts, [], batch["prompt_ids"],
                                  batch["prompt_mask"], out.response_ids, out.response_mask, out.ended)  # fmt: skip
        scores = module.reward_model.score(*join_left_right(batch["prompt_ids"], batch["prompt_mask"],
                                                            out.response_ids, out.response_mask))  # fmt: skip
    assert module.reward_model.n_members == 2 and bool((scores.std > 0).all())
    torch.testing.assert_close(paid, scores.mean - 1.5 * scores.std)


def test_reward_normalisation_is_remeasured_on_the_responses_ppo_samples(base, tmp_path):
    """The reward phase measured its statistics on 32-token samples; a PPO run sampling 8 tokens re-measures them on
    the SFT policy's 8-token responses (prompts and noise from its seed), so its first scores are centred there."""
    from rlhf_lightning.models.backbone import load_sft_backbone
    from rlhf_lightning.models.reward import load_reward_model
    from rlhf_lightning.models.sampling import SamplingConfig, sample_prompt_responses

    module = make_module(base, iterations=1, reward_norm_samples=16, seed=3)
    fit(base, tmp_path, module)
    stored, tokenizer = load_reward_model(base / RM_CKPT)
    policy, _ = load_sft_backbone(str(base / SFT_CKPT))
    dm = PromptDataModule(data_dir=str(base / "runs/world"), generate_world=False)
    dm.setup()
    ids, mask = sample_prompt_responses(policy, dm, tokenizer, 16, SamplingConfig(max_new_tokens=8), 3)
    with torch.no_grad():
        raw = stored.raw_members(ids, mask)  # (16, 1)
    torch.testing.assert_close(module.reward_model.norm_mean, raw.mean(0))
    torch.testing.assert_close(module.reward_model.norm_std, raw.std(0))
    assert not torch.allclose(module.reward_model.norm_mean, stored.norm_mean)
    kept = make_module(base, iterations=1, reward_norm_samples=0)
    fit(base, tmp_path / "kept", kept)
    torch.testing.assert_close(kept.reward_model.norm_mean, stored.norm_mean)
