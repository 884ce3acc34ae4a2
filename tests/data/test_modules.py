"""The data modules: the world written on first use, a user's own files and their tokenizer, the length budgets and
unknown-token checks, errors that name the file."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from unicode_corpus import VAL_ONLY_WORD, write_unicode_data_dir

from rlhf_lightning.checkpoint import RLHF_KEY, load_checkpoint
from rlhf_lightning.cli import main as cli_main
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule, SFTDataModule, Tokenizer, write_jsonl
from rlhf_lightning.data.tokenizer import tokenizer_from_meta
from rlhf_lightning.world.writer import META_FILE

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
#: A tiny SFT run (as tests/modules/test_sft.py's).
SFT_TINY = [
    "--model.init_args.backbone.n_layer=1",
    "--model.init_args.backbone.d_model=32",
    "--model.init_args.backbone.n_head=2",
    "--data.init_args.eval_prompts=8",
    "--trainer.val_check_interval=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def test_users_own_files_without_a_world(tmp_path):
    demos = [{"prompt": f"question {i} ?", "response": f"answer number {i} ."} for i in range(10)]
    write_jsonl(tmp_path / "sft_train.jsonl", demos)
    write_jsonl(tmp_path / "sft_val.jsonl", demos[:4])
    write_jsonl(tmp_path / "prompts_val.jsonl", [{"prompt": "question 1 ?"}, {"prompt": "question 2 ?"}])
    dm = SFTDataModule(data_dir=str(tmp_path), generate_world=False, batch_size=4, eval_prompts=5)
    dm.prepare_data()
    dm.setup()
    assert dm.tokenizer.unk_id is None  # a byte-level BPE trained on the user's corpus...
    assert not (tmp_path / "tokenizer.json").exists()  # ...and kept out of the user's folder
    assert not (tmp_path / META_FILE).exists() and dm.judge is None  # no gold judge for real data
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["loss_mask"].any()
    prompts, eval_batch = dm.eval_prompts()
    assert prompts == ["question 1 ?", "question 2 ?"] * 2 + ["question 1 ?"]  # cycled to eval_prompts
    assert eval_batch["prompt_ids"].shape[0] == 5


def test_missing_file_names_the_path_and_skip_is_counted(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sft_train\.jsonl"):
        dm = SFTDataModule(data_dir=str(tmp_path), generate_world=False)
        dm.file("sft_train.jsonl")
    good = [{"prompt": "a b", "response": "c d"}] * 3
    (tmp_path / "sft_train.jsonl").write_text(
        "".join('{"prompt": "a b", "response": "c d"}\n' for _ in good) + '{"prompt": 3}\n'
    )
    write_jsonl(tmp_path / "sft_val.jsonl", good)
    strict = SFTDataModule(data_dir=str(tmp_path), generate_world=False)
    with pytest.raises(ValueError, match=r"sft_train.jsonl:4: field 'prompt'"):
        strict.setup()
    lenient = SFTDataModule(data_dir=str(tmp_path), generate_world=False, on_error="skip")
    lenient.prepare_data()
    lenient.setup()
    assert lenient.data_stats["data/skipped/sft_train"] == 1.0
    assert len(lenient.train_examples) == 3


# -- the tokenizer of a user's data ----------------------------------------------------------------------------------
#: Budgets that fit every text of the unicode folder, its two ~4 KB responses included.
FITS = {"max_prompt_len": 64, "max_response_len": 2048}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


@pytest.fixture
def unicode_dir(tmp_path: Path) -> Path:
    write_unicode_data_dir(tmp_path / "data")
    return tmp_path / "data"


def test_nothing_is_written_into_a_users_data_dir(unicode_dir: Path) -> None:
    before = snapshot(unicode_dir)
    for cls in (SFTDataModule, PreferenceDataModule, PromptDataModule):
        dm = cls(data_dir=str(unicode_dir), generate_world=False, batch_size=4, eval_prompts=4, **FITS)
        dm.prepare_data()
        dm.setup("fit")
        dm.eval_prompts()
        assert dm.tokenizer.unk_id is None and dm.data_stats["data/unk_rate/prompts_val"] == 0.0
    assert snapshot(unicode_dir) == before


def test_the_tokenizer_learns_from_the_training_files_only(unicode_dir: Path, tmp_path: Path) -> None:
    train_only = tmp_path / "train_only"
    train_only.mkdir()
    for path in unicode_dir.glob("*_train.jsonl"):
        shutil.copy(path, train_only / path.name)
    write_jsonl(unicode_dir / "sft_test.jsonl", [{"prompt": "held out", "response": VAL_ONLY_WORD * 3}])
    full, train = (SFTDataModule(data_dir=str(d), generate_world=False, **FITS) for d in (unicode_dir, train_only))
    full.setup()
    assert full.tokenizer.to_json_str() == train.load_tokenizer().to_json_str()  # val/test text changes nothing
    assert len(full.tokenizer.encode(" " + VAL_ONLY_WORD)) > 1
    small = SFTDataModule(data_dir=str(unicode_dir), generate_world=False, tokenizer_vocab_size=300, **FITS)
    assert small.load_tokenizer().vocab_size == 300


def test_every_phase_trains_the_same_tokenizer_and_changed_data_is_refused(
    unicode_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # the config's paths (runs/...) are relative
    data = [f"--data.init_args.data_dir={unicode_dir}", "--data.init_args.generate_world=false"]
    cli_main(["fit", "-c", str(CONFIGS / "sft.yaml"), *data, *SFT_TINY, "--trainer.max_steps=2",
              "--data.init_args.batch_size=8", "--data.init_args.truncation=warn"])  # fmt: skip
    saved = Tokenizer.load(tmp_path / "runs/sft/checkpoints")  # the run keeps its tokenizer beside the checkpoint
    ckpt = tmp_path / "runs/sft/checkpoints/last.ckpt"
    assert tokenizer_from_meta(load_checkpoint(ckpt)[RLHF_KEY]).fingerprint() == saved.fingerprint()
    for cls in (SFTDataModule, PreferenceDataModule, PromptDataModule):  # a later phase run alone on the same data
        assert (
            cls(data_dir=str(unicode_dir), generate_world=False).load_tokenizer().fingerprint() == saved.fingerprint()
        )

    write_jsonl(unicode_dir / "prompts_train.jsonl", [{"prompt": "Entirely new text: Ωmega 🦀!"}] * 3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["fit", "-c", str(CONFIGS / "rm.yaml"), *data, f"--model.init_args.sft_checkpoint={ckpt}",
                  "--data.init_args.max_prompt_len=32", "--trainer.max_steps=1"])  # fmt: skip
    assert f"rlhf: error: the data module's tokenizer differs from the one of {ckpt}" in capsys.readouterr().err
    assert not (tmp_path / "runs/rm/checkpoints").exists()


# -- length budgets and unknown tokens -------------------------------------------------------------------------------
def word_data(root: Path, prompts: list[str], responses: list[str]) -> Path:
    """sft_{train,val}.jsonl of ``prompts`` x ``responses`` (val: the first record), and a word-level tokenizer of
    the words a to e in ``root/tok`` (anything else is unknown)."""
    records = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
    write_jsonl(root / "sft_train.jsonl", records)
    write_jsonl(root / "sft_val.jsonl", records[:1])
    Tokenizer.train_word_level(["a b c d e"]).save(root / "tok")
    return root


def sft(root: Path, **kwargs) -> SFTDataModule:
    return SFTDataModule(data_dir=str(root), generate_world=False, tokenizer_path=str(root / "tok"), **kwargs)


@pytest.mark.parametrize("setting", ["max_prompt_len", "max_response_len"])
def test_a_budget_that_would_cut_text_is_an_error_or_a_warning(tmp_path: Path, setting: str) -> None:
    # Texts of 1 .. 100 words; a response also needs room for its EOS.
    texts = [" ".join(["a"] * n) for n in range(1, 101)]
    prompts, responses = (texts, ["b"] * 100) if setting == "max_prompt_len" else (["b"] * 100, texts)
    root = word_data(tmp_path, prompts, responses)
    budgets = {"max_prompt_len": 200, "max_response_len": 200, setting: 50}
    what, fit = ("prompts", 99) if setting == "max_prompt_len" else ("responses", 100)
    cut = 50 if setting == "max_prompt_len" else 51
    message = (f"{root / 'sft_train.jsonl'}: data.init_args.{setting}: 50 would cut {cut} of 100 {what}; "
               f"{fit} keeps 99% of them whole, {fit + 1} all")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(message) + r" \(or set data.init_args.truncation: warn"):
        sft(root, **budgets).setup()
    warned = sft(root, truncation="warn", **budgets)
    with pytest.warns(UserWarning, match=re.escape(message) + "; cutting them"):
        warned.setup()
    assert warned.data_stats[f"data/truncated_{what}/sft_train"] == cut and len(warned.train_examples) == 100
    sft(root, **{**budgets, setting: fit + 1}).setup()  # the budget named as fitting all: no error


def test_unknown_tokens_above_the_limit_are_an_error_below_it_a_warning(tmp_path: Path) -> None:
    # 10 records of 8 tokens, one unknown ("zz"): 1.25% of sft_train's tokens.
    root = word_data(tmp_path, ["a b c d"] * 10, ["a b c d"] * 9 + ["a b c zz"])
    with pytest.raises(ValueError, match=re.escape(f"{root / 'sft_train.jsonl'}: 1.25% of its tokens are the "
                                                   "tokenizer's unknown token (data.init_args.max_unk_rate: 0.01); "
                                                   "the tokenizer was likely trained on other text")):  # fmt: skip
        sft(root).setup()
    lenient = sft(root, max_unk_rate=0.02)
    with pytest.warns(UserWarning, match=re.escape(f"{root / 'sft_train.jsonl'}: 1.25% of its tokens are the")):
        lenient.setup()
    assert lenient.data_stats["data/unk_rate/sft_train"] == 1 / 80
    assert lenient.data_stats["data/unk_rate/sft_val"] == 0.0


def test_a_word_level_tokenizer_meets_other_text(unicode_dir: Path) -> None:
    Tokenizer.train_word_level(["the kettle is great ."]).save(unicode_dir / "tok")
    with pytest.raises(ValueError, match=r"sft_train\.jsonl: \d+\.\d\d% of its tokens are the tokenizer's unknown"):
        sft(unicode_dir, **FITS).setup()


def test_an_old_cached_tokenizer_in_a_users_folder_is_not_used(unicode_dir: Path) -> None:
    Tokenizer.train_word_level(["the kettle is great ."]).save(unicode_dir)
    dm = SFTDataModule(data_dir=str(unicode_dir), generate_world=False, **FITS)
    with pytest.warns(UserWarning, match=re.escape(f"{unicode_dir / 'tokenizer.json'} is not used")):
        dm.setup()
    assert dm.tokenizer.unk_id is None


@pytest.mark.parametrize(
    ("setting", "value"), [("tokenizer_vocab_size", 257), ("max_unk_rate", 1.5), ("truncation", "cut")]
)
def test_settings_out_of_range_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^data\.init_args\.{setting} must"):
        SFTDataModule(**{setting: value})
