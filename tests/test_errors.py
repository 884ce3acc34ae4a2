"""User errors through the real ``rlhf`` entry: one line ``rlhf: error: <message>`` naming the file/line/field or the
setting, exit status 2, before any training, and no run directory left behind; ``--debug`` shows the traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_lightning.cli import main
from rlhf_lightning.data import Tokenizer, write_jsonl
from rlhf_lightning.errors import UsageError, condense, user_message
from rlhf_lightning.world import WorldConfig, write_world


@pytest.fixture(scope="module")
def user_data(tmp_path_factory) -> Path:
    """A user's own data folder: the world's files without world.json (so no judge), small."""
    folder = tmp_path_factory.mktemp("user_data")
    write_world(folder, WorldConfig(n_sft=60, n_pairs=60))
    (folder / "world.json").unlink()
    for path in folder.glob("*_test.jsonl"):
        path.unlink()
    return folder


def copy_data(user_data: Path, to: Path) -> Path:
    to.mkdir()
    for path in user_data.iterdir():
        (to / path.name).write_bytes(path.read_bytes())
    return to


def one_line_error(capsys, argv: list[str]) -> str:
    """The one stderr line of a command that must fail with a user error (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("rlhf: error: "), lines[0]
    return lines[0].removeprefix("rlhf: error: ")


def test_a_late_phase_setting_fails_before_any_phase_trains(tmp_path, capsys):
    out = tmp_path / "run"
    sizes = "--model.init_args.rollout_batch=10 --model.init_args.minibatch_size=4"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--ppo-args", sizes])
    assert message == "ppo phase: minibatch_size (4) must divide rollout_batch (10)"
    assert not out.exists()


def test_a_misspelled_override_names_the_setting_and_its_class(tmp_path, capsys):
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--ppo-args", "--model.init_args.kl.coeff=0.1"])
    assert message == "ppo phase: model.init_args.kl.coeff: not a setting of rlhf_lightning.rl.KLConfig"
    assert not out.exists()


def test_a_negative_learning_rate_names_the_setting(tmp_path, capsys):
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--rm-args", "--model.init_args.lr=-0.1"])
    assert message == "rm phase: model.init_args.lr must be > 0, got -0.1"
    assert not out.exists()


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("not a folder")
    message = one_line_error(capsys, ["pipeline", "--out", str(file)])
    assert message == f"pipeline: --out {file} is a file; the run directory must be a folder (or not exist yet)"
    assert file.read_text() == "not a folder"


def test_a_missing_data_file_of_a_late_phase_fails_before_sft_trains(user_data, tmp_path, capsys):
    data = copy_data(user_data, tmp_path / "data")
    (data / "prefs_val.jsonl").unlink()
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--data-dir", str(data)])
    assert message == (
        f"rm phase: data file {data / 'prefs_val.jsonl'} does not exist, nor prefs_val.parquet or a datasets "
        "folder prefs_val/ there"
    )
    assert not out.exists()


def test_a_bad_preference_record_names_file_line_and_field(user_data, tmp_path, capsys):
    data = copy_data(user_data, tmp_path / "data")
    lines = (data / "prefs_val.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"prompt": "a", "chosen": 3, "rejected": "b"})
    (data / "prefs_val.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--data-dir", str(data)])
    assert message == f"--data-dir: {data / 'prefs_val.jsonl'}:3: field 'chosen': expected a non-empty string, got int"
    assert not out.exists()


def test_a_utf16_file_is_one_line_naming_the_file(user_data, tmp_path, capsys):
    data = copy_data(user_data, tmp_path / "data")
    path = data / "sft_val.jsonl"
    path.write_bytes(path.read_text(encoding="utf-8").encode("utf-16"))
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--data-dir", str(data)])
    assert message == f"--data-dir: {path}: file is UTF-16 (byte-order mark FF FE); save it as UTF-8"
    assert not out.exists()


def test_a_checkpoint_tokenizer_of_other_text_is_refused_before_training(user_data, tmp_path, capsys):
    # An SFT run on other text: its tokenizer (word-level, as the world's) beside its checkpoint. The check builds the
    # phases without reading the checkpoint itself, so a stand-in file is enough to get there.
    sft = tmp_path / "other_sft"
    sft.mkdir()
    (sft / "last.ckpt").write_bytes(b"")
    Tokenizer.train_word_level(["an entirely different vocabulary of other words"]).save(sft)
    out = tmp_path / "run"
    message = one_line_error(capsys, ["pipeline", "--out", str(out), "--data-dir", str(user_data),
                                      "--sft-checkpoint", str(sft / "last.ckpt")])  # fmt: skip
    assert message.startswith(f"rm phase: {user_data / 'prefs_train.jsonl'}: ")
    assert "of its tokens are the tokenizer's unknown token (data.init_args.max_unk_rate: 0.01)" in message
    assert not out.exists()


def test_a_prompt_the_budget_would_cut_is_refused_naming_the_setting(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    long_prompt = "Please read the following instruction carefully before you answer it: " * 3
    write_jsonl(data / "sft_train.jsonl", [{"prompt": long_prompt, "response": "Yes."}] * 4)
    write_jsonl(data / "sft_val.jsonl", [{"prompt": "Short?", "response": "Yes."}] * 2)
    write_jsonl(data / "prompts_val.jsonl", [{"prompt": "Short?"}] * 2)
    monkeypatch.chdir(tmp_path)
    message = one_line_error(capsys, ["fit", "-c", "sft", f"--data.init_args.data_dir={data}",
                                      "--data.init_args.generate_world=false"])  # fmt: skip
    assert message.startswith(f"{data / 'sft_train.jsonl'}: data.init_args.max_prompt_len: 16 would cut 4 of 4 prompts")
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before training


def test_fit_config_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "ppo.yaml")
    message = one_line_error(capsys, ["fit", "-c", config, "--model.init_args.kl.controller=adaptiv"])
    assert message == (
        "model.init_args.kl.controller: Expected a typing.Literal['fixed', 'adaptive', 'annealed']. Got value: adaptiv"
    )
    assert not list(tmp_path.iterdir())


def test_debug_shows_the_traceback(tmp_path, capsys):
    file = tmp_path / "run"
    file.write_text("")
    with pytest.raises(UsageError, match="is a file"):
        main(["pipeline", "--debug", "--out", str(file)])


JSONARGPARSE_NESTED = """Parser key "model":
  Does not validate against any of the Union subtypes
  Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
  Errors:
    - Problem with given class_path 'rlhf_lightning.modules.PPOModule':
        Parser key "kl":
          Does not validate against any of the Union subtypes
          Subtypes: [<class 'rlhf_lightning.rl.kl.KLConfig'>, <class 'NoneType'>]
          Errors:
            - Problem with given class_path 'rlhf_lightning.rl.KLConfig':
                Option 'coeff' is not accepted
            - Expected a <class 'NoneType'>
          Given value type: <class 'dict'>
          Given value: {'coeff': 3}
    - Expected a <class 'NoneType'>
  Given value type: <class 'dict'>
  Given value: {'init_args': {'kl': {'coeff': 3}}}"""

INSTANTIATION = """Does not validate against any of the Union subtypes
Subtypes: [<class 'lightning.pytorch.core.module.LightningModule'>, <class 'NoneType'>]
Errors:
  - minibatch_size (4) must divide rollout_batch (10)
  - Expected a <class 'NoneType'>
Given value type: <class 'jsonargparse._namespace.Namespace'>
Given value: Namespace(class_path='rlhf_lightning.modules.PPOModule', init_args=Namespace(sft_checkpoint='x'))"""


@pytest.mark.parametrize(
    ("message", "line"),
    [
        (JSONARGPARSE_NESTED, "model.init_args.kl.coeff: not a setting of rlhf_lightning.rl.KLConfig"),
        (INSTANTIATION, "minibatch_size (4) must divide rollout_batch (10)"),
        ('Parser key "trainer.max_steps":\n  Expected a <class \'int\'>. Got value: ten',
         "trainer.max_steps: Expected a <class 'int'>. Got value: ten"),
        ("data/x.jsonl:3: field 'chosen': expected a non-empty string, got int",
         "data/x.jsonl:3: field 'chosen': expected a non-empty string, got int"),
    ],
)  # fmt: skip
def test_condense_keeps_the_setting_and_the_reason(message, line):
    assert condense(message) == line


def test_an_os_error_reads_without_its_errno():
    assert user_message(FileExistsError(17, "File exists", "run")) == "run: file exists"
    assert user_message(OSError(28, "No space left on device")) == "No space left on device"
    assert user_message(FileNotFoundError("data file x does not exist")) == "data file x does not exist"
