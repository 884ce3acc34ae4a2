"""Bad checkpoints, as users give them: damaged files, a checkpoint of the wrong phase, checkpoints trained with
different tokenizers. Each is a clear error at start-up, before any training step, naming the file at fault."""

from __future__ import annotations

import io
import random
import re
import struct
import zipfile
from pathlib import Path

import pytest

from rlhf_lightning.checkpoint import load_checkpoint
from rlhf_lightning.cli import main
from rlhf_lightning.data import Tokenizer
from rlhf_lightning.world import WORDS

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
#: One optimizer step, no validation: these runs only have to leave real checkpoints behind.
ONE_STEP = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0", "--trainer.logger=false", *QUIET]
TINY_SFT = ["--model.init_args.backbone.n_layer=1", "--model.init_args.backbone.d_model=16",
            "--model.init_args.backbone.n_head=2", "--data.init_args.batch_size=8", *ONE_STEP]  # fmt: skip
SFT_CKPT = "runs/sft/checkpoints/last.ckpt"
RM_CKPT = "runs/rm/checkpoints/last.ckpt"
OWN_SFT_CKPT = "own/sft/last.ckpt"  # an SFT run with the user's own tokenizer


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A world, an SFT and a reward-model checkpoint on it, and an SFT checkpoint trained with another tokenizer."""
    root = tmp_path_factory.mktemp("ckpt_faults")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), *TINY_SFT])
        main(["fit", "-c", str(CONFIGS / "rm.yaml"), "--data.init_args.batch_size=8",
              "--model.init_args.norm_samples=4", *ONE_STEP])  # fmt: skip
        # Same words, other ids: what a tokenizer trained on a user's own corpus looks like.
        Tokenizer.train_word_level(["a corpus of its own ."] * 3, extra_words=WORDS[::-1]).save(root / "own_tok")
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), *TINY_SFT, f"--data.init_args.tokenizer_path={root / 'own_tok'}",
              "--trainer.callbacks.init_args.dirpath=own/sft"])  # fmt: skip
    return root


def member_data_offset(raw: bytes, name: str) -> int:
    """Where the bytes of the zip member ``name`` start in ``raw`` (after its local header)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(name))
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def flip(raw: bytes, at: int) -> bytes:
    return raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :]


def largest_tensor(raw: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        return max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size).filename


#: damage name -> (raw checkpoint bytes -> damaged bytes, what the message must say after the path).
DAMAGE = {
    "truncated": (lambda raw: raw[: len(raw) // 2], r"is truncated or corrupt"),
    "empty": (lambda raw: b"", r"is empty \(0 bytes\)"),
    "random_bytes": (lambda raw: random.Random(0).randbytes(4096), r"is truncated or corrupt"),
    "not_a_checkpoint": (lambda raw: b"epoch: 3\nloss: 0.1\n", r"is truncated or corrupt"),
    # Without the CRC check, this one loads with one weight silently changed...
    "flipped_tensor_byte": (lambda raw: flip(raw, member_data_offset(raw, largest_tensor(raw)) + 5), r"CRC"),
    # ...and this one makes the unpickler ask for an absurd allocation (a MemoryError with no message).
    "flipped_pickle_byte": (lambda raw: flip(raw, member_data_offset(raw, "data.pkl") + 40), r"CRC"),
}


def damaged(runs: Path, tmp_path: Path, how: str, source: str = SFT_CKPT) -> Path:
    path = tmp_path / f"{how}.ckpt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(DAMAGE[how][0]((runs / source).read_bytes()))
    return path


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_a_damaged_file_is_refused_naming_it(runs, tmp_path, how):
    path = damaged(runs, tmp_path, how)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {path} ") + ".*" + DAMAGE[how][1]):
        load_checkpoint(path, phase="sft")


def ppo_fit(runs: Path, *extra: str) -> None:
    """``rlhf fit -c configs/ppo.yaml`` on the fixture's checkpoints and world, with ``extra`` arguments last (under
    ``--debug``: a refusal raises its own exception, not rlhf's one-line exit)."""
    main(["--debug", "fit", "-c", str(CONFIGS / "ppo.yaml"), f"--model.init_args.sft_checkpoint={runs / SFT_CKPT}",
          f"--model.init_args.reward_checkpoint={runs / RM_CKPT}", f"--data.init_args.data_dir={runs / 'runs/world'}",
          "--data.init_args.generate_world=false", "--data.init_args.eval_prompts=8", *QUIET, *extra])  # fmt: skip


def rm_fit(runs: Path, *extra: str) -> None:
    main(["--debug", "fit", "-c", str(CONFIGS / "rm.yaml"), f"--data.init_args.data_dir={runs / 'runs/world'}",
          "--data.init_args.generate_world=false", "--data.init_args.batch_size=8", "--model.init_args.norm_samples=4",
          *ONE_STEP, *extra])  # fmt: skip


def assert_nothing_trained(runs_dir: Path) -> None:
    # Checkpoints are written after training steps: none means the run stopped at start-up.
    assert not list(runs_dir.rglob("*.ckpt*")), "a training step ran before the error"


@pytest.mark.parametrize(
    ("how", "argument"),
    [
        ("truncated", "--model.init_args.sft_checkpoint"),
        ("flipped_tensor_byte", "--model.init_args.reward_checkpoint"),
        ("empty", "--ckpt_path"),
    ],
)
def test_ppo_refuses_a_damaged_checkpoint_at_start_up(runs, tmp_path, monkeypatch, how, argument):
    bad = damaged(runs, tmp_path / "bad", how, source=RM_CKPT if "reward" in argument else SFT_CKPT)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {bad} ") + ".*" + DAMAGE[how][1]):
        ppo_fit(runs, f"{argument}={bad}")
    assert_nothing_trained(tmp_path / "runs")


def test_reward_phase_refuses_a_damaged_sft_checkpoint_at_start_up(runs, tmp_path, monkeypatch):
    bad = damaged(runs, tmp_path / "bad", "truncated")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {bad} is truncated or corrupt")):
        rm_fit(runs, f"--model.init_args.sft_checkpoint={bad}")
    assert_nothing_trained(tmp_path / "runs")


def test_export_refuses_a_damaged_checkpoint(runs, tmp_path, capsys):
    bad = damaged(runs, tmp_path, "flipped_pickle_byte")
    with pytest.raises(SystemExit) as exc:
        main(["export", str(bad), "--out", str(tmp_path / "hf")])
    assert exc.value.code == 2
    assert re.search(re.escape(f"rlhf: error: export: checkpoint {bad} is corrupt") + ".*CRC", capsys.readouterr().err)
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize(
    ("argument", "given", "message"),
    [
        ("--model.init_args.sft_checkpoint", RM_CKPT, "is from the 'reward' phase, but a 'sft' checkpoint is needed"),
        ("--model.init_args.reward_checkpoint", SFT_CKPT, "is from the 'sft' phase, but a 'reward' checkpoint is"),
        ("--ckpt_path", SFT_CKPT, "is from the 'sft' phase, but a 'ppo' checkpoint is needed"),
    ],
)
def test_ppo_refuses_a_checkpoint_of_the_wrong_phase_at_start_up(runs, tmp_path, monkeypatch, argument, given, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {runs / given}") + ".*" + re.escape(message)):
        ppo_fit(runs, f"{argument}={runs / given}")
    assert_nothing_trained(tmp_path / "runs")


def test_ppo_refuses_sft_and_reward_checkpoints_trained_with_different_tokenizers(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = runs / OWN_SFT_CKPT
    # The data module reads with the policy's tokenizer; the reward model was trained with the world's.
    with pytest.raises(ValueError, match=re.escape(f"the tokenizers of {own} and {runs / RM_CKPT} differ")):
        ppo_fit(runs, f"--model.init_args.sft_checkpoint={own}", f"--data.init_args.tokenizer_path={runs / 'own_tok'}")
    # The data module's own tokenizer (the world's) against the policy's.
    with pytest.raises(ValueError, match=re.escape(f"the data module's tokenizer differs from the one of {own}")):
        ppo_fit(runs, f"--model.init_args.sft_checkpoint={own}")
    assert_nothing_trained(tmp_path / "runs")


def test_resuming_with_another_tokenizer_names_the_checkpoint(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ckpt = runs / SFT_CKPT
    with pytest.raises(ValueError, match=re.escape(f"the tokenizer of checkpoint {ckpt} differs from the data module")):
        main(["--debug", "fit", "-c", str(CONFIGS / "sft.yaml"), *TINY_SFT,
              f"--data.init_args.data_dir={runs / 'runs/world'}", "--data.init_args.generate_world=false",
              f"--data.init_args.tokenizer_path={runs / 'own_tok'}", f"--ckpt_path={ckpt}"])  # fmt: skip
    assert_nothing_trained(tmp_path / "runs")
