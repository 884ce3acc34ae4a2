"""Config mistakes through the real ``rlhf fit`` entry: a key that does not exist (on the command line or misspelled
in a YAML file) or a value of the wrong type exits with status 2 and one line naming the key, before anything is
built or written."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

SFT = "not a setting of rlhf_lightning.modules.SFTModule"
#: (extra arguments or YAML text, the one line it must end with: the setting's full name and what is wrong with it)
CASES = {
    "cli_unknown_model_key": (["--model.init_args.no_such_key=1"], f"model.init_args.no_such_key: {SFT}"),
    "cli_unknown_nested_key": (
        ["--model.init_args.backbone.n_layerz=2"],
        "model.init_args.backbone.n_layerz: not a setting of rlhf_lightning.models.tinygpt.GPTConfig",
    ),
    "cli_wrong_type": (["--trainer.max_steps=ten"], "trainer.max_steps: Expected a <class 'int'>. Got value: ten"),
    "yaml_misspelled_model_key": (
        "model:\n  init_args:\n    learning_rate: 0.1\n",
        f"model.init_args.learning_rate: {SFT}",
    ),
    "yaml_misspelled_data_key": (
        "data:\n  init_args:\n    batchsize: 3\n",
        "data.init_args.batchsize: not a setting of rlhf_lightning.data.SFTDataModule",
    ),
    "yaml_misspelled_section": (
        "trainr:\n  max_steps: 3\n",
        "Subcommand 'fit' does not accept option 'trainr.max_steps'",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_config_mistake_exits_naming_the_key(tmp_path, monkeypatch, capsys, case):
    given, message = CASES[case]
    monkeypatch.chdir(tmp_path)
    if isinstance(given, str):  # a second config file over the phase's, as a preset is given
        (tmp_path / "mine.yaml").write_text(given)
        given = ["-c", "mine.yaml"]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(CONFIGS / "sft.yaml"), *given])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == f"rlhf: error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == (["mine.yaml"] if case.startswith("yaml") else [])


@pytest.mark.parametrize("given", [["--model.init_args.kl_coef=0.1"], "model:\n  init_args:\n    eval_every: 3\n"])
def test_a_flat_ppo_key_of_an_earlier_version_names_its_new_key(tmp_path, monkeypatch, capsys, given):
    monkeypatch.chdir(tmp_path)
    if isinstance(given, str):
        (tmp_path / "old.yaml").write_text(given)
        given = ["-c", "old.yaml"]
    with pytest.raises(SystemExit) as exc:
        main(["fit", "-c", str(CONFIGS / "ppo.yaml"), *given])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    new = "kl.coef" if given[0].startswith("--") else "eval.every"
    assert f"is now model.init_args.{new}" in err, err[-2000:]
