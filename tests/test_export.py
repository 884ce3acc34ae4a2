"""``rlhf export``: tiny checkpoints written by hand, exported, reloaded with transformers' Auto classes, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_lightning.checkpoint import RLHF_KEY
from rlhf_lightning.cli import main
from rlhf_lightning.data import Tokenizer
from rlhf_lightning.data.tokenizer import tokenizer_meta
from rlhf_lightning.export import export_checkpoint
from rlhf_lightning.models.backbone import backbone_spec
from rlhf_lightning.models.hf import HFCausalLM
from rlhf_lightning.models.reward import RewardModel
from rlhf_lightning.models.sampling import SamplingConfig, generate
from rlhf_lightning.models.tinygpt import GPTConfig, TinyGPT

TEXTS = ["the phone is good .", "a bad case , really bad", "great battery and a great screen"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train_word_level(TEXTS)


def perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``module`` with every parameter moved off its initial value (LayerNorm gains and all biases included), so a
    mapping that drops or misplaces one shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return module.eval()


def tinygpt(tokenizer: Tokenizer, seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, d_model=32, max_seq_len=24)
    return perturbed(TinyGPT(config), seed)


def hf_gpt2(tokenizer: Tokenizer, seed: int = 0) -> HFCausalLM:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=24, n_embd=32, n_layer=1, n_head=2)
    return HFCausalLM(perturbed(GPT2LMHeadModel(config), seed))


def save_ckpt(path: Path, phase: str, prefix: str, module: torch.nn.Module, tokenizer: Tokenizer, **meta) -> Path:
    """A checkpoint in the format the phase modules write (the parts ``load_checkpoint`` and export read)."""
    state = {prefix + k: v for k, v in module.state_dict().items()}
    torch.save({"state_dict": state, RLHF_KEY: {"phase": phase, **tokenizer_meta(tokenizer), **meta}}, path)
    return path


def policy_ckpt(tmp_path: Path, tokenizer: Tokenizer, backbone: torch.nn.Module, phase: str = "sft") -> Path:
    prefix = {"sft": "model.", "ppo": "policy."}[phase]
    spec = backbone_spec(backbone)
    return save_ckpt(tmp_path / f"{phase}.ckpt", phase, prefix, backbone, tokenizer, backbone=spec)


def reward_model(
    tokenizer: Tokenizer, backbone: torch.nn.Module, k: int = 1, mode: str = "heads", pooling: str = "last"
) -> RewardModel:
    model = perturbed(RewardModel(backbone, n_members=k, mode=mode, seed=3, pooling=pooling), seed=4)
    model.norm_mean.copy_(torch.linspace(-0.5, 0.5, k))
    model.norm_std.copy_(torch.linspace(1.5, 2.0, k))
    return model


def reward_ckpt(tmp_path: Path, tokenizer: Tokenizer, model: RewardModel) -> Path:
    return save_ckpt(tmp_path / "rm.ckpt", "reward", "reward_model.", model, tokenizer, reward_model=model.spec())


def prompts(tokenizer: Tokenizer, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, T) padded ids and mask of the TEXTS, padded on ``side``."""
    rows = tokenizer.encode_batch(TEXTS)
    t = max(map(len, rows))
    ids = torch.full((len(rows), t), tokenizer.pad_id)
    mask = torch.zeros(len(rows), t, dtype=torch.bool)
    for i, row in enumerate(rows):
        cols = slice(t - len(row), t) if side == "left" else slice(0, len(row))
        ids[i, cols], mask[i, cols] = torch.tensor(row), True
    return ids, mask


def check_policy_export(out: Path, backbone: torch.nn.Module, tokenizer: Tokenizer) -> None:
    """The exported causal LM gives the backbone's logits and its greedy tokens on left-padded prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert (hf_tok.eos_token_id, hf_tok.pad_token_id) == (tokenizer.eos_id, tokenizer.pad_id)
    assert hf_tok(TEXTS[0]).input_ids == tokenizer.encode(TEXTS[0])

    ids, mask = prompts(tokenizer, "right")
    with torch.no_grad():
        expected = backbone.logits(backbone(ids, mask))
        actual = model(input_ids=ids, attention_mask=mask.long()).logits[..., : tokenizer.vocab_size]
    torch.testing.assert_close(actual[mask], expected[mask], atol=ATOL, rtol=0)

    ids, mask = prompts(tokenizer, "left")
    config = SamplingConfig(max_new_tokens=8, temperature=0.0)
    ours = generate(backbone, ids, mask, config, tokenizer.eos_id, tokenizer.pad_id).response_ids
    theirs = model.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, max_new_tokens=8)
    assert torch.equal(theirs[:, ids.shape[1] :], ours)


@pytest.mark.parametrize("phase", ["sft", "ppo"])
def test_tinygpt_policy_exports_as_gpt2_with_the_same_logits_and_greedy_tokens(tmp_path, tokenizer, phase):
    backbone = tinygpt(tokenizer)
    out = export_checkpoint(policy_ckpt(tmp_path, tokenizer, backbone, phase), tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["rlhf_phase"] == phase
    assert config["activation_function"] == "gelu" and config["tie_word_embeddings"]
    check_policy_export(out, backbone, tokenizer)


def test_hf_policy_exports_its_inner_model(tmp_path, tokenizer):
    backbone = hf_gpt2(tokenizer)
    out = export_checkpoint(policy_ckpt(tmp_path, tokenizer, backbone), tmp_path / "export")
    check_policy_export(out, backbone, tokenizer)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["tinygpt", "hf"])
def test_reward_exports_as_sequence_classifier_of_raw_member_scores(tmp_path, tokenizer, k, kind):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm = reward_model(tokenizer, tinygpt(tokenizer) if kind == "tinygpt" else hf_gpt2(tokenizer), k)
    out = export_checkpoint(reward_ckpt(tmp_path, tokenizer, rm), tmp_path / "export")
    model = AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True).eval()
    assert model.config.num_labels == k and model.config.pad_token_id == tokenizer.pad_id
    assert model.config.rlhf_norm_mean == pytest.approx(rm.norm_mean.tolist())
    assert model.config.rlhf_norm_std == pytest.approx(rm.norm_std.tolist())
    assert AutoTokenizer.from_pretrained(out, local_files_only=True).padding_side == "right"

    ids, mask = prompts(tokenizer, "right")  # rows of different lengths
    ids[0, int(mask[0].sum()) - 1] = tokenizer.eos_id  # a sequence ending in EOS, as scored pairs do
    with torch.no_grad():
        raw = rm.raw_members(ids, mask)
        logits = model(input_ids=ids, attention_mask=mask.long()).logits
    torch.testing.assert_close(logits, raw, atol=ATOL, rtol=0)
    mean, std = torch.tensor(model.config.rlhf_norm_mean), torch.tensor(model.config.rlhf_norm_std)
    torch.testing.assert_close(((logits - mean) / std).mean(-1), rm.score(ids, mask).mean, atol=ATOL, rtol=0)


def test_reward_exports_that_cannot_match_are_refused(tmp_path, tokenizer):
    rm = reward_model(tokenizer, tinygpt(tokenizer), k=2, mode="backbones")
    with pytest.raises(ValueError, match="one backbone per member"):
        export_checkpoint(reward_ckpt(tmp_path, tokenizer, rm), tmp_path / "a")
    eos_padded = Tokenizer(tokenizer.backend, tokenizer.eos_token)  # pad = EOS
    rm = reward_model(eos_padded, tinygpt(eos_padded))
    with pytest.raises(ValueError, match="pad token is its EOS token"):
        export_checkpoint(reward_ckpt(tmp_path, eos_padded, rm), tmp_path / "b")
    rm = reward_model(tokenizer, tinygpt(tokenizer), pooling="mean")  # a classifier reads the last token only
    with pytest.raises(ValueError, match="pooling 'mean' is not a sequence-classification model"):
        export_checkpoint(reward_ckpt(tmp_path, tokenizer, rm), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_bad_checkpoints_give_clear_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out")
    good = policy_ckpt(tmp_path, tokenizer, tinygpt(tokenizer))
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        export_checkpoint(corrupt, tmp_path / "out")
    odd = save_ckpt(tmp_path / "odd.ckpt", "world", "", torch.nn.Linear(2, 2), tokenizer)
    with pytest.raises(ValueError, match="phase 'world'"):
        export_checkpoint(odd, tmp_path / "out")
    broken = torch.load(good, weights_only=False)
    del broken["state_dict"]["model.ln_f.bias"]
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="do not fit"):
        export_checkpoint(tmp_path / "broken.ckpt", tmp_path / "out")
    del broken[RLHF_KEY]["backbone"]
    torch.save(broken, tmp_path / "broken.ckpt")
    with pytest.raises(ValueError, match="lacks the 'backbone' entry"):
        export_checkpoint(tmp_path / "broken.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force_and_is_replaced_whole(tmp_path, tokenizer):
    ckpt = policy_ckpt(tmp_path, tokenizer, tinygpt(tokenizer))
    out = tmp_path / "export"
    out.mkdir()
    export_checkpoint(ckpt, out)  # an empty directory is fine
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(FileExistsError, match="--force"):
        export_checkpoint(ckpt, out)
    export_checkpoint(ckpt, out, force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "sft.ckpt"]  # no temporary siblings left


def test_cli(tmp_path, tokenizer, capsys):
    ckpt = policy_ckpt(tmp_path, tokenizer, tinygpt(tokenizer))
    main(["export", str(ckpt), "--out", str(tmp_path / "export")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == {"out": str(tmp_path / "export"), "phase": "sft", "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(SystemExit) as exc:
        main(["export", str(ckpt), "--out", str(tmp_path / "export")])
    assert exc.value.code == 2 and "--force" in capsys.readouterr().err


def test_a_conversion_that_changes_the_logits_is_refused(tmp_path, tokenizer, monkeypatch):
    import rlhf_lightning.export as export

    exact = export._gpt2_config

    def tanh_gelu(backbone, tok):  # GPT-2's own GELU approximation instead of TinyGPT's exact one
        config = exact(backbone, tok)
        config.activation_function = "gelu_new"
        return config

    monkeypatch.setattr(export, "_gpt2_config", tanh_gelu)
    with pytest.raises(ValueError, match="policy logits differ"):
        export_checkpoint(policy_ckpt(tmp_path, tokenizer, tinygpt(tokenizer)), tmp_path / "out")
    assert not (tmp_path / "out").exists()
