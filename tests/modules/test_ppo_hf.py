"""Hugging Face models end to end: a tiny GPT-2 and a locally trained tokenizer (``rlhf hf-tiny``) through the whole
pipeline (SFT -> reward model -> PPO, configs/hf/), the export of the PPO policy, and PPO with LoRA adapters whose
reference is the SFT policy (the same model with its adapters disabled)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from test_ppo import QUIET, RESUME_TAGS, RM_TINY, fit, make_module, scalars
from test_sft import TINY

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import PromptDataModule, SFTDataModule, Tokenizer
from rlhf_lightning.data.collate import collate_prompts, tokenize_prompts
from rlhf_lightning.data.jsonl import read_jsonl
from rlhf_lightning.diagnose.events import read_scalars
from rlhf_lightning.errors import UsageError
from rlhf_lightning.hf_tiny import make_tiny_hf
from rlhf_lightning.models.backbone import backbone_from_spec, build_backbone, load_sft_backbone
from rlhf_lightning.models.lora import LoRABackbone, LoRAConfig
from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.models.tinygpt import GPTConfig
from rlhf_lightning.pipeline import pipeline_main

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: A small world (the default one is sized for real runs); a preset, so every phase asks for the same one.
SMALL_WORLD = {"description": "a small world",
               "all": {"data": {"init_args": {"world": {"n_sft": 300, "n_pairs": 300}}}}}  # fmt: skip
LORA = LoRAConfig(r=4, alpha=8.0)
#: The tiny phases of tests/modules/test_sft.py and test_ppo.py (the TinyGPT shape in TINY is ignored: the HF model is
#: the backbone), PPO as make_module's: 2 iterations of 8 responses of <= 8 tokens.
PPO_TINY = ["--model.init_args.iterations=2", "--model.init_args.rollout_batch=8", "--model.init_args.minibatch_size=4",
            "--model.init_args.ppo_epochs=1", "--model.init_args.eval.every=2", "--data.init_args.eval_prompts=8",
            "--model.init_args.sampling.max_new_tokens=8", "--model.init_args.eval.groups=4", *QUIET]  # fmt: skip
TINY_PIPELINE_ARGS = [arg for phase, args in (("sft", TINY), ("rm", RM_TINY), ("ppo", PPO_TINY))
                      for arg in (f"--{phase}-args", " ".join(args))]  # fmt: skip


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The whole pipeline at tiny size on a tiny GPT-2 and its tokenizer, through the CLI (``--hf-model``)."""
    root = tmp_path_factory.mktemp("hf")
    model_dir = make_tiny_hf(root / "tiny-gpt2")
    preset = root / "small_world.yaml"
    preset.write_text(yaml.safe_dump(SMALL_WORLD))
    main(["pipeline", "--out", str(root / "run"), "--hf-model", str(model_dir), "--preset", str(preset),
          "--no-diagnose", *TINY_PIPELINE_ARGS])  # fmt: skip
    return root / "run"


@pytest.fixture(scope="module")
def lora_run(base) -> Path:
    """PPO with the LoRA preset through the CLI, from the pipeline's SFT and reward-model checkpoints."""
    out = base.parent / "lora"
    main(["pipeline", "--out", str(out), "--hf-model", str(base.parent / "tiny-gpt2"), "--preset",
          str(CONFIGS / "hf/lora.yaml"), "--sft-checkpoint", str(base / "runs/sft/checkpoints/last.ckpt"),
          "--rm-checkpoint", str(base / "runs/rm/checkpoints/last.ckpt"), "--data-dir", str(base / "runs/world"),
          "--no-diagnose", "--ppo-args", " ".join(PPO_TINY)])  # fmt: skip
    return out


def tokenizer_of(base: Path) -> Tokenizer:
    return Tokenizer.load(base / "runs/sft/checkpoints")


def val_prompts(base: Path, tokenizer: Tokenizer, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) left-padded ids and mask of the first held-out prompts."""
    records = read_jsonl(base / "runs/world/prompts_val.jsonl", "prompt").records[:n]
    batch = collate_prompts(tokenize_prompts(records, tokenizer, 16)[0], tokenizer.pad_id)
    return batch["prompt_ids"], batch["prompt_mask"]


def assert_same_greedy_tokens(export_dir: Path, policy: torch.nn.Module, base: Path) -> None:
    """The exported directory loads with AutoModelForCausalLM and generates the policy's greedy tokens."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_of(base)
    ids, mask = val_prompts(base, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(export_dir, local_files_only=True).eval()
    with torch.no_grad():
        ours = generate(policy.eval(), ids, mask, SamplingConfig(max_new_tokens=8, temperature=0.0),
                        tokenizer.eos_id, tokenizer.pad_id).response_ids  # fmt: skip
        theirs = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=8)
    assert torch.equal(theirs[:, ids.shape[1] :], ours)


def policy_of(ckpt: Path) -> torch.nn.Module:
    """The PPO checkpoint's policy, rebuilt from the checkpoint alone."""
    loaded = load_checkpoint(ckpt, phase="ppo")
    policy = backbone_from_spec(loaded[RLHF_KEY]["backbone"])
    policy.load_state_dict({k[len("policy.") :]: v for k, v in loaded["state_dict"].items() if k.startswith("policy.")})
    return policy


def test_pipeline_runs_every_phase_on_the_hf_model(base):
    for phase in ("sft", "rm", "ppo"):
        assert (base / f"runs/{phase}/checkpoints/last.ckpt").is_file(), phase
    assert load_checkpoint(base / "runs/sft/checkpoints/last.ckpt")[RLHF_KEY]["backbone"]["kind"] == "hf"
    logged = read_scalars(base / "runs/ppo")
    assert sorted(logged["objective/kl"]) == [0, 1]
    assert all(math.isfinite(v) for series in logged.values() for v in series.values())
    assert json.loads((base / "summary.json").read_text())["gold_reward_ppo"] is not None


def test_exported_hf_policy_generates_the_checkpoints_greedy_tokens(base, tmp_path):
    ckpt = base / "runs/ppo/checkpoints/last.ckpt"
    main(["export", str(ckpt), "--out", str(tmp_path / "export")])
    config = json.loads((tmp_path / "export/config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["rlhf_phase"] == "ppo"
    assert_same_greedy_tokens(tmp_path / "export", policy_of(ckpt), base)


def test_lora_starts_at_zero_kl_and_trains_only_the_adapters_against_the_sft_policy(base, tmp_path):
    module = make_module(base, iterations=1, lora=LORA, lr=1e-2, eval_groups=2)
    before: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    dm = PromptDataModule(data_dir=str(base / "runs/world"), eval_prompts=8, generate_world=False,
                          tokenizer_path=str(base / "runs/sft/checkpoints"))  # fmt: skip
    L.Trainer(max_epochs=1, logger=False, callbacks=[Snapshot()], enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu").fit(module, dm)  # fmt: skip
    # The rollout was scored before any update: B = 0, so policy and reference agree exactly.
    assert module.last_metrics["objective/kl"] == 0.0
    assert isinstance(module.policy, LoRABackbone) and not isinstance(module.ref_policy, torch.nn.Module)
    after = module.state_dict()
    assert not any(k.startswith("ref_policy.") for k in after)  # no second copy of the policy
    policy_keys = [k for k in before if k.startswith("policy.")]
    lora_keys = [k for k in policy_keys if ".lora_" in k]
    assert lora_keys and any(not torch.equal(before[k], after[k]) for k in lora_keys)
    assert all(torch.equal(before[k], after[k]) for k in policy_keys if k not in lora_keys)
    # The reference is the SFT policy (not the untrained model the SFT run started from), the policy moved off it.
    sft, _ = load_sft_backbone(str(base / "runs/sft/checkpoints/last.ckpt"))
    ids, mask = val_prompts(base, tokenizer_of(base))
    module.policy.eval()
    with torch.no_grad():
        expected = torch.log_softmax(sft.eval()(ids, mask) @ sft.lm_head_weight.T, -1)
        reference = torch.log_softmax(module.ref_policy(ids, mask) @ module.ref_policy.lm_head_weight.T, -1)
        policy = torch.log_softmax(module.policy(ids, mask) @ module.policy.lm_head_weight.T, -1)
    assert torch.equal(reference[mask], expected[mask])
    assert not torch.allclose(policy[mask], expected[mask])
    untrained = build_backbone(GPTConfig(), 1, str(base.parent / "tiny-gpt2"))
    assert untrained.training  # SFT trains it with its dropout on, like a freshly built TinyGPT
    untrained.eval()
    with torch.no_grad():
        assert not torch.allclose(untrained(ids, mask)[mask], sft(ids, mask)[mask])


def test_lora_through_the_cli_starts_at_zero_kl_and_exports_merged(base, lora_run, tmp_path):
    ckpt = lora_run / "runs/ppo/checkpoints/last.ckpt"
    assert load_checkpoint(ckpt)[RLHF_KEY]["backbone"]["kind"] == "lora"
    logged = read_scalars(lora_run / "runs/ppo")
    assert logged["objective/kl"][0] == 0.0 and logged["objective/kl"][1] != 0.0
    assert all(math.isfinite(v) for series in logged.values() for v in series.values())
    main(["export", str(ckpt), "--out", str(tmp_path / "export")])
    from safetensors.torch import load_file

    assert not any("lora" in key for key in load_file(tmp_path / "export/model.safetensors"))
    assert_same_greedy_tokens(tmp_path / "export", policy_of(ckpt), base)


def test_lora_resume_repeats_the_uninterrupted_run(base, tmp_path):
    tokenizer_path = str(base / "runs/sft/checkpoints")
    opts = {"iterations": 2, "lora": LORA, "lr": 1e-2, "eval_groups": 2}
    fit(base, tmp_path / "whole", make_module(base, **opts), tokenizer_path=tokenizer_path)
    fit(base, tmp_path / "cut", make_module(base, **opts), stop_after=1, tokenizer_path=tokenizer_path)
    last = tmp_path / "cut/ckpt/last.ckpt"
    fit(base, tmp_path / "cut", make_module(base, **opts), ckpt_path=str(last), tokenizer_path=tokenizer_path)
    whole, cut = scalars(tmp_path / "whole/ppo"), scalars(tmp_path / "cut/ppo")
    for tag in RESUME_TAGS:
        assert whole[tag] == cut[tag], tag


def test_missing_paths_name_their_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="hf_model_path"):
        build_backbone(GPTConfig(), 10, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="tokenizer_path"):
        SFTDataModule(tokenizer_path=str(tmp_path / "nope")).load_tokenizer()
    with pytest.raises(UsageError, match="--hf-model"):
        pipeline_main(["--out", str(tmp_path / "run"), "--hf-model", str(tmp_path)])


def test_lora_flag_reaches_the_ppo_module(capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(CONFIGS / "hf/ppo.yaml"), "--model.init_args.lora.r=8", "--print_config"])
    assert done.value.code in (0, None)
    lora = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["lora"]
    assert lora["r"] == 8 and lora["alpha"] == 16.0
