"""The data modules: the world written on first use, a user's own files, errors that name the file."""

from __future__ import annotations

import pytest

from rlhf_lightning.data import SFTDataModule, write_jsonl
from rlhf_lightning.world.writer import META_FILE


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
