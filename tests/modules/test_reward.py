"""The reward-model phase end to end through the real CLI, at tiny size: SFT first, then a 2-member ensemble RM from
its checkpoint; the checkpoint, the logged metrics, the ensemble, the bootstrap and the start-up errors."""

from __future__ import annotations

import glob
import json
import math
from pathlib import Path

import pytest
import torch
from test_sft import TINY

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import PreferenceDataModule, Tokenizer
from rlhf_lightning.data.collate import join_left_right
from rlhf_lightning.diagnose.events import read_scalars
from rlhf_lightning.models.backbone import load_sft_backbone
from rlhf_lightning.models.reward import RewardModel, load_reward_model
from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT
from rlhf_lightning.modules import RewardModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SFT_TINY = TINY  # the tiny SFT run of test_sft.py, whose checkpoint the reward phase starts from
NORM_SAMPLES = 16
RM_TINY = [
    "--model.init_args.ensemble_size=2",
    f"--model.init_args.norm_samples={NORM_SAMPLES}",
    "--model.init_args.warmup_steps=2",
    "--data.init_args.batch_size=8",
    "--trainer.max_steps=6",
    "--trainer.val_check_interval=3",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    *QUIET,
]
SFT_CKPT = "runs/sft/checkpoints/last.ckpt"
RM_CKPT = "runs/rm/checkpoints/last.ckpt"
RM_TAGS = (
    "rm/loss", "rm/train_accuracy", "rm/accuracy", "rm/accuracy_gold", "rm/bayes_accuracy", "rm/margin", "rm/ece",
    "rm/len_corr", "rm/score_mean", "rm/score_std", "rm/ensemble_std", "rm/norm_mean", "rm/norm_std",
    "rm/baseline_accuracy",
)  # fmt: skip


def scalars(run_dir) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(f"{run_dir}/events.out.tfevents.*")
    assert len(files) == 1, files
    acc = EventAccumulator(files[0])
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def rm_fit(*args: str) -> None:
    main(["--debug", "fit", "-c", str(CONFIGS / "rm.yaml"), *args])  # --debug: a refusal raises its own exception


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny SFT run, then a tiny reward-model run from its checkpoint, in one folder (the configs' paths)."""
    root = tmp_path_factory.mktemp("rm")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the configs' paths (runs/...) are relative
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), *SFT_TINY])
        rm_fit(f"--model.init_args.sft_checkpoint={SFT_CKPT}", *RM_TINY)
    return root


@pytest.fixture(scope="module")
def val_batch(runs) -> dict[str, torch.Tensor]:
    dm = PreferenceDataModule(data_dir=str(runs / "runs/world"), batch_size=16, generate_world=False)
    dm.setup()
    return next(iter(dm.val_dataloader()))


def test_checkpoint_loads_with_the_sft_tokenizer_and_measured_normalisation(runs):
    model, tokenizer = load_reward_model(runs / RM_CKPT)
    assert isinstance(model, RewardModel) and not model.training
    assert model.n_members == 2 and model.mode == "heads" and len(model.backbones) == 1
    sft_meta = load_checkpoint(runs / SFT_CKPT, phase="sft")[RLHF_KEY]
    _, sft_tokenizer = load_sft_backbone(str(runs / SFT_CKPT))
    assert tokenizer.fingerprint() == sft_tokenizer.fingerprint()
    assert tokenizer.fingerprint() == Tokenizer.load(runs / "runs/world/tokenizer.json").fingerprint()
    # the reward model reads with the SFT backbone's shape
    assert model.spec()["backbone"] == sft_meta["backbone"]
    # normalisation statistics were measured and stored (not the identity the model is built with)
    assert model.norm_std.shape == (2,) and model.norm_mean.shape == (2,)
    assert not torch.equal(model.norm_std, torch.ones(2))
    assert not torch.equal(model.norm_mean, torch.zeros(2))
    assert (model.norm_std > 1e-6).all()
    assert (runs / "runs/rm/checkpoints/tokenizer.json").is_file()
    assert not list((runs / "runs/rm/checkpoints").glob(".*tmp*"))


def test_normalisation_is_measured_on_sft_samples_with_the_checkpoints_own_weights(runs):
    """Re-derive the stored statistics: the SFT policy's samples for NORM_SAMPLES training prompts (drawn from the
    module's seed 0), scored by the checkpoint's own members, have exactly the stored mean and std."""
    model, tokenizer = load_reward_model(runs / RM_CKPT)
    policy, _ = load_sft_backbone(str(runs / SFT_CKPT))
    dm = PreferenceDataModule(data_dir=str(runs / "runs/world"), generate_world=False)
    dm.setup()
    prompts = dm.train_prompt_batch(NORM_SAMPLES, 0)
    out = generate(policy.eval(), prompts["prompt_ids"], prompts["prompt_mask"],
                   SamplingConfig(max_new_tokens=32, temperature=1.0), tokenizer.eos_id, tokenizer.pad_id,
                   torch.Generator().manual_seed(0))  # fmt: skip
    ids, mask = join_left_right(prompts["prompt_ids"], prompts["prompt_mask"], out.response_ids, out.response_mask)
    with torch.no_grad():
        raw = model.raw_members(ids, mask)
    torch.testing.assert_close(model.norm_mean, raw.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.norm_std, raw.std(0), atol=1e-5, rtol=1e-5)
    scores = model.score(ids, mask)  # normalised: centred with unit spread on those samples
    torch.testing.assert_close(scores.members.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(scores.members.std(0), torch.ones(2), atol=1e-5, rtol=0)


def test_logged_metrics(runs):
    logged = scalars(runs / "runs/rm")
    for tag in RM_TAGS:
        assert tag in logged, tag
        assert torch.isfinite(torch.tensor(logged[tag])).all(), (tag, logged[tag])
    assert len(logged["rm/accuracy"]) == 2  # validated at steps 3 and 6 (the sanity check logs nothing)
    assert len(logged["rm/loss"]) == 6  # every step
    assert "data/skipped/prefs_train" in logged and "data/truncated_responses/prefs_train" in logged
    for tag in ("rm/accuracy", "rm/accuracy_gold", "rm/train_accuracy"):
        assert all(0.0 <= x <= 1.0 for x in logged[tag]), tag
    assert all(0.0 <= x <= 0.5 for x in logged["rm/ece"])
    # fitted once on the training pairs: the same held-out accuracy at every validation
    assert len(set(logged["rm/baseline_accuracy"])) == 1 and 0.0 <= logged["rm/baseline_accuracy"][0] <= 1.0
    assert all(-1.0 <= x <= 1.0 for x in logged["rm/len_corr"])
    assert all(x > 0 for x in logged["rm/ensemble_std"] + logged["rm/norm_std"] + logged["rm/score_std"])
    # the Bayes accuracy is the annotators' ceiling on the val pairs, as the world recorded it
    world = json.loads((runs / "runs/world/world.json").read_text())
    bayes = world["annotators"]["val"]["bayes_accuracy"]
    assert logged["rm/bayes_accuracy"] == pytest.approx([bayes, bayes], abs=1e-6)
    # the last logged normalisation statistics are the checkpoint's
    model, _ = load_reward_model(runs / RM_CKPT)
    assert logged["rm/norm_mean"][-1] == pytest.approx(float(model.norm_mean.mean()), abs=1e-5)
    assert logged["rm/norm_std"][-1] == pytest.approx(float(model.norm_std.mean()), abs=1e-5)


def test_a_run_ending_between_validations_validates_its_last_step(runs, tmp_path, monkeypatch):
    """max_steps 5 with val_check_interval 3: validated at step 3 by the interval and at step 5 because it ends."""
    monkeypatch.chdir(tmp_path)
    rm_fit(f"--model.init_args.sft_checkpoint={runs / SFT_CKPT}", f"--data.init_args.data_dir={runs / 'runs/world'}",
           *RM_TINY, "--model.init_args.ensemble_size=1", "--trainer.max_steps=5")  # fmt: skip
    logged = read_scalars(tmp_path / "runs/rm")
    assert sorted(logged["rm/accuracy"]) == [2, 4]  # logged at the step before the count (steps 3 and 5)
    # the checkpoint was saved after that last validation: it holds the normalisation measured there
    model, _ = load_reward_model(tmp_path / RM_CKPT)
    assert logged["rm/norm_mean"][4] == pytest.approx(float(model.norm_mean.mean()), abs=1e-5)


def test_ensemble_members_differ_and_were_trained(runs, val_batch):
    model, _ = load_reward_model(runs / RM_CKPT)
    w0, w1 = (head.proj.weight for head in model.heads)
    assert not torch.allclose(w0, w1)
    with torch.no_grad():
        r = model.raw_members(val_batch["chosen_ids"], val_batch["chosen_mask"])  # (B, 2)
    assert r.shape == (16, 2)
    assert (r[:, 0] - r[:, 1]).abs().max() > 1e-3
    # training moved the heads from their seeded initialisation and the trunk from the SFT weights
    sft_backbone, _ = load_sft_backbone(str(runs / SFT_CKPT))
    fresh = RewardModel(sft_backbone, n_members=2, mode="heads", seed=0)
    for trained, init in zip(model.heads, fresh.heads, strict=True):
        assert not torch.allclose(trained.proj.weight, init.proj.weight)
    assert not torch.allclose(model.backbones[0].tok_emb.weight, sft_backbone.tok_emb.weight)


def test_bootstrap_weights_are_stored_per_pair_and_member(runs):
    state = torch.load(runs / RM_CKPT, map_location="cpu", weights_only=False)["state_dict"]
    n_train = json.loads((runs / "runs/world/world.json").read_text())["files"]["prefs_train.jsonl"]
    w = state["bootstrap_weights"]
    assert w.shape == (n_train, 2)
    assert not torch.equal(w, torch.ones_like(w))
    assert (w >= 0).all() and torch.equal(w, w.round())  # Poisson(1) counts
    assert abs(float(w.mean()) - 1.0) < 0.05
    assert 0.25 < float((w == 0).float().mean()) < 0.5  # P(Poisson(1) = 0) = e^-1 ~ 0.37: pairs a member never sees
    assert not torch.equal(w[:, 0], w[:, 1])  # each member has its own resample


def test_module_reloads_self_contained(runs, val_batch):
    module = RewardModule.load_from_checkpoint(runs / RM_CKPT)  # no trainer, no SFT checkpoint needed
    model, tokenizer = load_reward_model(runs / RM_CKPT)
    assert module.tokenizer.fingerprint() == tokenizer.fingerprint()
    state = torch.load(runs / RM_CKPT, map_location="cpu", weights_only=False)["state_dict"]
    torch.testing.assert_close(module.bootstrap_weights, state["bootstrap_weights"])
    module.eval()
    with torch.no_grad():
        a = module.reward_model.score(val_batch["chosen_ids"], val_batch["chosen_mask"])
        b = model.score(val_batch["chosen_ids"], val_batch["chosen_mask"])
    torch.testing.assert_close(a.members, b.members)


def test_a_single_normalisation_sample_never_gives_nan_statistics():
    """norm_samples=1 leaves no spread to measure: it must be refused up front, or give finite statistics, never a
    NaN norm_std that turns every normalised reward into NaN (the std of one sample is NaN, and clamp keeps NaN)."""
    try:
        module = RewardModule(norm_samples=1)
    except ValueError as err:
        assert "norm_samples" in str(err)
        return
    torch.manual_seed(0)
    module.reward_model = RewardModel(TinyGPT(GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16)), 2)
    module._norm_batch = (torch.tensor([[3, 4, 5, 6]]), torch.ones(1, 4, dtype=torch.bool))  # one sample
    module.refresh_normalisation()
    assert torch.isfinite(module.reward_model.norm_std).all(), module.reward_model.norm_std


def test_refresh_normalisation_measures_each_members_mean_and_std():
    torch.manual_seed(0)
    module = RewardModule(ensemble_size=2, norm_samples=3)
    module.reward_model = RewardModel(TinyGPT(GPTConfig(vocab_size=30, n_layer=1, n_head=2, d_model=16)), 2)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 0, 0], [9, 0, 0, 0]])
    mask = ids != 0
    module._norm_batch = (ids, mask)
    module.refresh_normalisation()
    raw = module.reward_model.raw_members(ids, mask).detach()
    torch.testing.assert_close(module.reward_model.norm_mean, raw.mean(0))
    torch.testing.assert_close(module.reward_model.norm_std, raw.std(0))
    assert module.reward_model.training  # the train/eval mode is restored


# -- start-up errors -----------------------------------------------------------------------------------------------
def test_missing_sft_checkpoint_names_the_path(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nowhere" / "sft.ckpt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        rm_fit(f"--model.init_args.sft_checkpoint={missing}", f"--data.init_args.data_dir={runs / 'runs/world'}",
               *RM_TINY)  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))


def test_reward_checkpoint_as_sft_checkpoint_names_the_phase(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'reward' phase, but a 'sft' checkpoint"):
        rm_fit(f"--model.init_args.sft_checkpoint={runs / RM_CKPT}", f"--data.init_args.data_dir={runs / 'runs/world'}",
               *RM_TINY)  # fmt: skip
    assert not list(tmp_path.rglob("*.ckpt"))


def test_malformed_prefs_file_names_file_line_and_field(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    data.mkdir()
    good = {"prompt": "review : phone battery", "chosen": "the battery is good .", "rejected": "it is bad ."}
    bad = {"prompt": "x", "chosen": 3, "rejected": "y"}
    (data / "prefs_train.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    (data / "prefs_val.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(ValueError, match=r"prefs_train\.jsonl:2: field 'chosen'") as info:
        rm_fit(f"--model.init_args.sft_checkpoint={runs / SFT_CKPT}", f"--data.init_args.data_dir={data}",
               "--data.init_args.generate_world=false",
               f"--data.init_args.tokenizer_path={runs / 'runs/sft/checkpoints/tokenizer.json'}", *RM_TINY)  # fmt: skip
    assert str(data / "prefs_train.jsonl") in str(info.value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_pairs_sampled_from_the_sft_policy_through_the_cli(runs, monkeypatch):
    monkeypatch.chdir(runs)
    tiny_world = ["--data.init_args.data_dir=runs/world_policy", "--data.init_args.world.n_sft=20",
                  "--data.init_args.world.n_pairs=60", "--data.init_args.pair_source=sft_policy",
                  "--data.init_args.pair_sampling.max_new_tokens=16"]  # fmt: skip
    rm_fit(f"--model.init_args.sft_checkpoint={SFT_CKPT}", *RM_TINY, *tiny_world,
           "--trainer.default_root_dir=runs/rm_policy", "--trainer.logger.init_args.name=rm_policy",
           "--trainer.callbacks.init_args.dirpath=runs/rm_policy/checkpoints")  # fmt: skip
    logged = scalars(runs / "runs/rm_policy")
    # The val pairs are the policy's, so the ceiling is theirs, not the one the world recorded for its own pairs.
    world = json.loads((runs / "runs/world_policy/world.json").read_text())
    assert logged["rm/bayes_accuracy"][0] != pytest.approx(world["annotators"]["val"]["bayes_accuracy"])
    assert "data/unended_responses/prefs_sft_policy_train" in logged
    assert all(0.0 <= x <= 1.0 for x in logged["rm/accuracy"])
    assert (runs / "runs/rm_policy/checkpoints/last.ckpt").is_file()


class FixedScores(torch.nn.Module):
    """A stand-in reward model whose member scores (2B, K) are given, in the order pair_scores concatenates rows."""

    def __init__(self, scores: torch.Tensor):
        super().__init__()
        self.scores = torch.nn.Parameter(scores)

    def raw_members(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert input_ids.shape[0] == self.scores.shape[0]
        return self.scores


def test_training_loss_equals_a_hand_computation_with_margin_and_bootstrap_weights():
    # 3 pairs, 2 members; chosen scores then rejected scores.
    r_c = [[2.0, 0.0], [0.5, 1.0], [-1.0, 3.0]]
    r_r = [[1.0, 0.5], [0.5, -1.0], [0.0, 1.0]]
    weights = [[1.0, 0.0], [2.0, 1.0], [0.0, 3.0]]  # Poisson counts of pairs 0, 1, 2 (indices 2, 0, 1 in the split)
    margin = 0.25
    module = RewardModule(margin=margin, ensemble_size=2)
    module.reward_model = FixedScores(torch.tensor(r_c + r_r))
    module.register_buffer("bootstrap_weights", torch.tensor([weights[1], weights[2], weights[0]]))
    ids = torch.zeros(3, 4, dtype=torch.long)
    mask = torch.ones(3, 4, dtype=torch.bool)
    batch = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": ids, "rejected_mask": mask,
             "index": torch.tensor([2, 0, 1])}  # fmt: skip
    loss = module.training_step(batch, 0)

    def bt(c: float, r: float) -> float:
        return math.log1p(math.exp(-(c - r - margin)))  # -log sigmoid(r_c - r_r - margin)

    member_losses = []
    for k in range(2):
        total = sum(weights[i][k] * bt(r_c[i][k], r_r[i][k]) for i in range(3))
        member_losses.append(total / sum(weights[i][k] for i in range(3)))
    assert float(loss) == pytest.approx(sum(member_losses) / 2, rel=1e-6)
    loss.backward()  # and the loss is differentiable in the scores
    assert module.reward_model.scores.grad.abs().sum() > 0
