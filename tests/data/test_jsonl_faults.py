"""Malformed JSONL as the data modules meet it, for every kind of file they read (demonstrations, preference pairs,
prompts): each bad line is a DataError naming file:line and field, raised in setup (before any DataLoader worker
exists); a 10 MB line is refused by the default line limit, or read when the limit is lifted; and what the package
writes is never left half-written when writing fails midway."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from tokenizers import normalizers

from rlhf_lightning.cli import main
from rlhf_lightning.data import (
    DataError,
    PreferenceDataModule,
    PromptDataModule,
    SFTDataModule,
    Tokenizer,
    read_jsonl,
    write_jsonl,
)
from rlhf_lightning.data.collate import SFTExample
from rlhf_lightning.data.modules import MAX_LINE_BYTES

GOOD = {
    "sft": {"prompt": "review the kettle .", "response": "it boils fast ."},
    "preference": {"prompt": "review the kettle .", "chosen": "it boils fast .", "rejected": "bad ."},
    "prompt": {"prompt": "review the kettle ."},
}
#: kind -> (data module, its training file, the field the bad lines get wrong: the last of the kind's schema)
MODULES = {
    "sft": (SFTDataModule, "sft_train.jsonl", "response"),
    "preference": (PreferenceDataModule, "prefs_train.jsonl", "rejected"),
    "prompt": (PromptDataModule, "prompts_train.jsonl", "prompt"),
}
TEN_MB = "fast " * (2 * 1024 * 1024)  # a word of user_data's tokenizer: no unknown tokens


def bad_line(kind: str, case: str) -> tuple[bytes, bool, str]:
    """Line 2 of a ``kind`` file for ``case``: (its bytes, whether the message names the field, the reason)."""
    field = MODULES[kind][2]
    good = GOOD[kind]

    def with_value(value: object) -> bytes:
        return json.dumps({**good, field: value}).encode()  # ensure_ascii: a lone surrogate stays an escape

    cases = {
        "broken_json": (json.dumps(good).encode()[:-1], False, r"invalid JSON: Expecting .*\(column \d+\)"),
        "not_an_object": (b'["a list", "of strings"]', False, r"expected a JSON object, got list"),
        "wrong_type_int": (with_value(17), True, r"expected a non-empty string, got int"),
        # A list prompt is a conversational one (data/formats.py): its items must be messages.
        "wrong_type_list": (
            with_value(["a", "b"]),
            True,
            r"message 1: expected an object with 'role' and 'content', got str"
            if field == "prompt"
            else r"expected a non-empty string, got list",
        ),
        "null": (with_value(None), True, r"expected a non-empty string, got null"),
        "missing": (
            json.dumps({k: v for k, v in good.items() if k != field} or {"id": 1}).encode(),
            True,
            r"missing \(a record needs ",
        ),
        "empty_string": (with_value(""), True, r"expected a non-empty string, got an empty or whitespace-only one"),
        "whitespace_only": (
            with_value("\u3000 \t"),
            True,
            r"expected a non-empty string, got an empty or whitespace-only one",
        ),
        "lone_surrogate": (with_value("fine \ud800 text"), True, r"contains an unpaired surrogate \('\\ud800' at "),
        "nul_character": (with_value("fine\x00text"), True, r"contains a NUL character"),
        "non_utf8": (
            with_value("caf\u00e9").replace(b"\\u00e9", b"\xe9"),
            False,
            r"invalid UTF-8 at byte \d+: b'\\xe9",
        ),
        "ten_megabyte_line": (
            with_value(TEN_MB),
            False,
            re.escape(f"line longer than max_line_bytes={MAX_LINE_BYTES}"),
        ),
    }
    return cases[case]


CASES = [
    "broken_json", "not_an_object", "wrong_type_int", "wrong_type_list", "null", "missing", "empty_string",
    "whitespace_only", "lone_surrogate", "nul_character", "non_utf8", "ten_megabyte_line",
]  # fmt: skip


def write_lines(path: Path, lines: list[bytes], newline: bytes = b"\n") -> Path:
    path.write_bytes(b"".join(line + newline for line in lines))
    return path


def user_data(root: Path) -> Path:
    """A folder of good files of every kind, and a tokenizer trained on them (so setup reads only the files)."""
    for kind, (_, train_file, _) in MODULES.items():
        for split in ("train", "val"):
            write_jsonl(root / train_file.replace("train", split), [GOOD[kind]] * 3)
    Tokenizer.train_word_level([v for record in GOOD.values() for v in record.values()]).save(root)
    return root


def data_module(kind: str, root: Path, **kwargs):
    cls = MODULES[kind][0]
    return cls(
        data_dir=str(root), generate_world=False, tokenizer_path=str(root), batch_size=2, eval_prompts=2, **kwargs
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", sorted(MODULES))
def test_a_bad_line_stops_setup_naming_file_line_and_field(tmp_path, kind, case):
    root = user_data(tmp_path)
    line, names_field, reason = bad_line(kind, case)
    path = write_lines(
        root / MODULES[kind][1], [json.dumps(GOOD[kind]).encode(), line, json.dumps(GOOD[kind]).encode()]
    )
    dm = data_module(kind, root)
    dm.prepare_data()
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    field = MODULES[kind][2] if names_field else None
    assert (info.value.where, info.value.field) == (f"{path}:2", field)
    at = f"field {field!r}: " if field else ""
    assert re.match(re.escape(f"{path}:2: {at}") + reason, str(info.value)), str(info.value)[:300]


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_text_that_tokenises_to_nothing_is_named_by_its_file_line(tmp_path, kind):
    # A Hugging Face tokenizer's normaliser (BERT's, here) deletes zero-width spaces: valid text, no token.
    root = user_data(tmp_path)
    tokenizer = Tokenizer.load(root)
    tokenizer.backend.normalizer = normalizers.BertNormalizer(clean_text=True, strip_accents=False, lowercase=False)
    tokenizer.save(root)
    _, name, field = MODULES[kind]
    good = json.dumps(GOOD[kind]).encode()
    invisible = json.dumps({**GOOD[kind], field: "\u200b"}).encode()
    # Line 2 is skipped (on_error="skip"): the record of line 3 is record 1, and the message must say line 3.
    write_lines(root / name, [good, b"{broken", invisible])
    dm = data_module(kind, root, on_error="skip")
    with pytest.raises(DataError) as info:
        dm.setup("fit")
    assert (info.value.where, info.value.field) == (f"{root / name}:3", field)
    assert str(info.value) == f"{root / name}:3: field {field!r}: tokenises to no tokens"


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_a_ten_megabyte_line_is_skipped_and_counted(tmp_path, kind):
    root = user_data(tmp_path)
    name = MODULES[kind][1]
    write_lines(root / name, [bad_line(kind, "ten_megabyte_line")[0], *[json.dumps(GOOD[kind]).encode()] * 2])
    lenient = data_module(kind, root, on_error="skip")
    lenient.setup("fit")
    assert lenient.data_stats[f"data/skipped/{name.removesuffix('.jsonl')}"] == 1.0  # counted, never dropped silently


def test_a_ten_megabyte_line_is_read_when_the_limit_is_lifted(tmp_path):
    root = user_data(tmp_path)
    write_lines(root / "sft_train.jsonl", [bad_line("sft", "ten_megabyte_line")[0], json.dumps(GOOD["sft"]).encode()])
    unlimited = data_module("sft", root, max_line_bytes=None, truncation="warn")
    unlimited.setup("fit")
    # The long response is cut to the token budget, and counted as such.
    assert unlimited.data_stats["data/skipped/sft_train"] == 0.0
    assert unlimited.data_stats["data/truncated_responses/sft_train"] == 1.0
    assert len(unlimited.train_examples[0].response_ids) == unlimited.hparams.max_response_len


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_bom_and_crlf_files_read_like_plain_ones(tmp_path, kind):
    root = user_data(tmp_path)
    lines = [json.dumps(GOOD[kind]).encode()] * 3
    write_lines(root / MODULES[kind][1], [b"\xef\xbb\xbf" + lines[0], *lines[1:]], newline=b"\r\n")
    plain = data_module(kind, user_data(tmp_path / "plain"))
    plain.setup("fit")
    windows = data_module(kind, root)
    windows.setup("fit")
    assert windows.train_prompts == plain.train_prompts == [GOOD[kind]["prompt"]] * (3 if kind == "prompt" else 1)
    examples = {"sft": "train_examples", "preference": "train_examples", "prompt": "_train"}[kind]
    assert getattr(windows, examples) == getattr(plain, examples)  # the same token ids: no BOM or \r in a token


def test_validation_happens_in_setup_before_any_worker_exists(tmp_path, monkeypatch):
    root = user_data(tmp_path)
    write_lines(root / "sft_train.jsonl", [json.dumps(GOOD["sft"]).encode(), bad_line("sft", "null")[0]])
    loaders = []
    monkeypatch.setattr("rlhf_lightning.data.modules.DataLoader", lambda *a, **k: loaders.append(1))
    dm = data_module("sft", root, num_workers=2)
    with pytest.raises(DataError, match=re.escape(f"{root / 'sft_train.jsonl'}:2: field 'response'")):
        dm.setup("fit")
    assert not loaders  # raised in the main process, before a loader (let alone a worker) was made
    monkeypatch.undo()

    # With valid files, the workers get tokenised examples only, and a whole epoch goes through them.
    write_jsonl(root / "sft_train.jsonl", [GOOD["sft"]] * 6)
    dm = data_module("sft", root, num_workers=2)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.num_workers == 2 and all(isinstance(x, SFTExample) for x in loader.dataset)
    assert sum(batch["input_ids"].shape[0] for batch in loader) == 6


def test_write_jsonl_whose_records_fail_midway_leaves_the_old_file_or_none(tmp_path):
    def records():
        yield {"prompt": "first"}
        yield {"prompt": "second"}
        raise RuntimeError("the source broke")

    with pytest.raises(RuntimeError, match="the source broke"):
        write_jsonl(tmp_path / "new.jsonl", records())
    assert os.listdir(tmp_path) == []  # no file, no temporary file
    write_jsonl(tmp_path / "old.jsonl", [{"prompt": "old"}])
    with pytest.raises(RuntimeError, match="the source broke"):
        write_jsonl(tmp_path / "old.jsonl", records())
    assert (tmp_path / "old.jsonl").read_text() == '{"prompt": "old"}\n'
    assert os.listdir(tmp_path) == ["old.jsonl"]


def test_rlhf_world_failing_midway_leaves_no_complete_looking_world(tmp_path, monkeypatch, capsys):
    import rlhf_lightning.world.writer as writer

    written = []

    def fail_on_the_fourth(path, records):
        if len(written) == 3:
            raise OSError(28, "No space left on device")
        written.append(Path(path).name)
        return write_jsonl(path, records)

    monkeypatch.setattr(writer, "write_jsonl", fail_on_the_fourth)
    out = tmp_path / "world"
    with pytest.raises(SystemExit):
        main(["world", "--out", str(out)])
    assert capsys.readouterr().err == "rlhf: error: No space left on device\n"
    # world.json is what says a world is complete; without it the data modules write the world again.
    assert sorted(p.name for p in out.iterdir()) == sorted(written)
    for name in written:  # each file that exists is whole: every line a valid record
        kind = {"sft": "sft", "prefs": "preference", "prompts": "prompt"}[name.split("_")[0]]
        lines = (out / name).read_bytes().count(b"\n")
        assert len(read_jsonl(out / name, kind).records) == lines
