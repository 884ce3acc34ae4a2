"""TRL-style records and the other file types: every layout, in every file type, reads as the equivalent JSONL of the
package's own schema; conversational records render with the default or a tokenizer's chat template; errors name the
file, the record and the field; a UTF-16 file, an ambiguous lookup and a missing extra each say what is wrong."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rlhf_lightning.data import DataError, PreferenceDataModule, SFTDataModule, Tokenizer, read_jsonl, write_jsonl
from rlhf_lightning.data.formats import (
    ChatTemplate,
    chat_template_of,
    find_data_file,
    read_records,
    to_record,
)


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def chat(*turns: str) -> str:
    """A prompt of user/assistant turns (alternating, user first) as the default template renders it."""
    roles = ("user", "assistant")
    return "\n".join(f"<|{roles[i % 2]}|>\n{t}" for i, t in enumerate(turns)) + "\n<|assistant|>\n"


# name -> (kind, records in that layout, the same records in the package's own schema)
LAYOUTS = {
    "sft_completion": (
        "sft",
        [{"prompt": "review the kettle .", "completion": "it boils ."}, {"prompt": "a lamp ?", "completion": "bright"}],
        [{"prompt": "review the kettle .", "response": "it boils ."}, {"prompt": "a lamp ?", "response": "bright"}],
    ),
    "sft_messages": (
        "sft",
        [
            {"messages": [{"role": "system", "content": "be brief"}, user("the kettle ?"), assistant("it boils .")]},
            {"messages": [user("hi"), assistant("hello"), user("a lamp ?"), assistant("bright")]},
        ],
        [
            {"prompt": "<|system|>\nbe brief\n" + chat("the kettle ?"), "response": "it boils ."},
            {"prompt": chat("hi", "hello", "a lamp ?"), "response": "bright"},
        ],
    ),
    "sft_conversational_completion": (
        "sft",
        [{"prompt": [user("the kettle ?")], "completion": [assistant("it boils .")]}] * 2,
        [{"prompt": chat("the kettle ?"), "response": "it boils ."}] * 2,
    ),
    "preference_standard": (
        "preference",
        [{"prompt": "the kettle ?", "chosen": "it boils .", "rejected": "bad", "id": 3}] * 2,
        [{"prompt": "the kettle ?", "chosen": "it boils .", "rejected": "bad"}] * 2,
    ),
    "preference_conversational": (
        "preference",
        [{"prompt": [user("the kettle ?")], "chosen": [assistant("it boils .")], "rejected": [assistant("bad")]}] * 2,
        [{"prompt": chat("the kettle ?"), "chosen": "it boils .", "rejected": "bad"}] * 2,
    ),
    "preference_implicit_prompt": (
        "preference",
        [
            {
                "chosen": [user("the kettle ?"), assistant("it boils .")],
                "rejected": [user("the kettle ?"), assistant("no")],
            },
            {
                "chosen": [user("hi"), assistant("hello"), user("a lamp ?"), assistant("bright")],
                "rejected": [user("hi"), assistant("hello"), user("a lamp ?"), assistant("dim")],
            },
        ],
        [
            {"prompt": chat("the kettle ?"), "chosen": "it boils .", "rejected": "no"},
            {"prompt": chat("hi", "hello", "a lamp ?"), "chosen": "bright", "rejected": "dim"},
        ],
    ),
    "prompt_standard": ("prompt", [{"prompt": "the kettle ?"}, {"prompt": "a lamp ?"}], None),
    "prompt_conversational": (
        "prompt",
        [{"prompt": [user("the kettle ?")]}, {"prompt": [user("hi"), assistant("hello"), user("a lamp ?")]}],
        [{"prompt": chat("the kettle ?")}, {"prompt": chat("hi", "hello", "a lamp ?")}],
    ),
}
FILE_TYPES = ["jsonl", "parquet", "dataset", "dataset_without_datasets"]


def write(path: Path, rows: list[dict], file_type: str) -> Path:
    """``rows`` as a file of ``file_type`` at ``path`` (suffix added); a dataset folder in two shards."""
    if file_type == "jsonl":
        path = path.with_suffix(".jsonl")
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif file_type == "parquet":
        path = path.with_suffix(".parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path), num_shards=2)
    return path


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_and_file_type_reads_as_the_equivalent_jsonl(tmp_path, monkeypatch, layout, file_type):
    kind, rows, own = LAYOUTS[layout]
    write_jsonl(tmp_path / "own.jsonl", own or rows)
    expected = read_jsonl(tmp_path / "own.jsonl", kind)
    path = write(tmp_path / "data", rows, file_type)
    if file_type == "dataset_without_datasets":  # what `import datasets` meets without it: pyarrow reads the shards
        monkeypatch.setitem(sys.modules, "datasets", None)
    data = read_records(path, kind)
    assert data.records == expected.records
    assert (data.lines, data.skipped) == ([1, 2], 0)


def test_a_tokenizers_chat_template_renders_conversational_records(tmp_path):
    # ChatML, as Qwen's tokenizer_config.json writes it, with the BOS token as an AddedToken dict.
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = {"chat_template": template, "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    chat_template = chat_template_of(tmp_path / "tokenizer.json")  # the folder of a tokenizer.json, too
    rows = [{"messages": [user("the kettle ?"), assistant("it boils .")]}]
    path = write(tmp_path / "sft", rows, "parquet")
    assert read_records(path, "sft", chat_template=chat_template).records == [
        {
            "prompt": "<s><|im_start|>user\nthe kettle ?<|im_end|>\n<|im_start|>assistant\n",
            "response": "it boils .<|im_end|>\n",
        }
    ]
    # Without a template in the folder, or without a tokenizer folder, the default template renders them.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert chat_template_of(tmp_path) is None and chat_template_of(None) is None
    assert read_records(path, "sft", chat_template=None).records == [
        {"prompt": chat("the kettle ?"), "response": "it boils ."}
    ]


def test_chat_templates_are_found_where_transformers_saves_them(tmp_path):
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert chat_template_of(tmp_path).source == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # transformers >= 4.47 saves it beside the config
    assert chat_template_of(tmp_path).source == "J"
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": named[:1]}))
    with pytest.raises(ValueError, match=r"chat_template: a list of templates without one named 'default'"):
        chat_template_of(tmp_path)


def test_a_template_that_refuses_a_record_is_that_records_error(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    rows = [
        {"prompt": [user("the kettle ?")], "completion": [assistant("it boils .")]},
        {"prompt": [{"role": "system", "content": "be brief"}], "completion": [assistant("ok")]},
    ]
    path = write(tmp_path / "sft", rows, "jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}:2: field 'prompt': ") + r".*no system role"):
        read_records(path, "sft", chat_template=chat_template_of(tmp_path))
    data = read_records(path, "sft", on_error="skip", chat_template=chat_template_of(tmp_path))
    assert data.records == [{"prompt": "user: the kettle ?\nassistant: ", "response": "it boils .\n"}]
    assert data.skipped == 1


def test_a_template_whose_prompt_is_not_the_conversations_beginning_is_refused():
    # A template that closes every conversation with a marker cannot have a response split off after the prompt.
    template = ChatTemplate("{{ messages | length }}{% if add_generation_prompt %}>{% endif %}", "T")
    record = {"messages": [user("a b"), assistant("c")]}
    with pytest.raises(DataError, match=r"x:1: field 'messages': T renders the conversation with another beginning"):
        to_record(record, "x:1", "sft", template)


def test_a_broken_template_is_no_records_fault(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for m in messages %}"}))
    path = write(tmp_path / "sft", [{"messages": [user("a"), assistant("b")]}], "jsonl")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: chat_template: not a valid Jinja template") as info:
        read_records(path, "sft", on_error="skip", chat_template=chat_template_of(tmp_path))  # raised, not skipped
    assert not isinstance(info.value, DataError)


# record -> the error it gives in a preference / sft file (after "where: ")
BAD_RECORDS = {
    "string_pair_without_prompt": (
        "preference",
        {"chosen": "the kettle ? it boils .", "rejected": "the kettle ? bad"},
        r"field 'prompt': missing: 'chosen' and 'rejected' are strings, .* add a 'prompt' field",
    ),
    "pair_sharing_nothing": (
        "preference",
        {"chosen": [user("a"), assistant("b")], "rejected": [user("c"), assistant("d")]},
        r"field 'chosen': without 'prompt', chosen and rejected must start with the same",
    ),
    "pair_without_reply": (
        "preference",
        {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("b")]},
        r"field 'chosen': no reply after the messages",
    ),
    "reply_of_the_user": (
        "preference",
        {"prompt": [user("a")], "chosen": [assistant("b")], "rejected": [user("c")]},
        r"field 'rejected': a response must start with an assistant message, got role 'user'",
    ),
    "content_not_a_string": (
        "sft",
        {"messages": [user("a"), {"role": "assistant", "content": None}]},
        r"field 'messages': message 2: 'content' expected a non-empty string, got null",
    ),
    "empty_role": (
        "sft",
        {"messages": [{"role": "", "content": "a"}, assistant("b")]},
        r"field 'messages': message 1: 'role' expected a non-empty string, got an empty",
    ),
    "last_message_of_the_user": (
        "sft",
        {"messages": [assistant("a"), user("b")]},
        r"field 'messages': the last message must be the assistant's reply, got role 'user'",
    ),
    "messages_not_a_list": ("sft", {"messages": "a b"}, r"field 'messages': expected a non-empty list of messages"),
    "completion_missing": ("sft", {"prompt": [user("a")]}, r"field 'response': missing \(a record needs 'prompt' and"),
}


@pytest.mark.parametrize("file_type", ["jsonl", "parquet"])
@pytest.mark.parametrize("case", sorted(BAD_RECORDS))
def test_bad_records_name_file_row_and_field_and_can_be_skipped(tmp_path, case, file_type):
    kind, bad, reason = BAD_RECORDS[case]
    good = LAYOUTS["preference_implicit_prompt" if kind == "preference" else "sft_messages"][1][0]
    # One record per file type's row: Parquet needs one schema, so the bad record stands alone in its columns' types.
    rows = [good, bad, good] if file_type == "jsonl" else [bad]
    path = write(tmp_path / "data", rows, file_type)
    where = f"{path}:2" if file_type == "jsonl" else f"{path} row 1"
    with pytest.raises(DataError, match=re.escape(f"{where}: ") + reason):
        read_records(path, kind)
    if file_type == "jsonl":
        data = read_records(path, kind, on_error="skip")
        assert (data.lines, data.skipped) == ([1, 3], 1)


@pytest.mark.parametrize("file_type", ["parquet", "dataset", "dataset_without_datasets"])
def test_a_tables_bad_rows_are_named_and_skipped(tmp_path, monkeypatch, file_type):
    rows = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": None}, {"prompt": "d", "completion": " "}]
    path = write(tmp_path / "sft", rows, file_type)
    if file_type == "dataset_without_datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=re.escape(f"{path} row 2: field 'response': missing")):
        read_records(path, "sft")  # a null cell is a missing field
    data = read_records(path, "sft", on_error="skip")
    assert (data.records, data.lines, data.skipped) == ([{"prompt": "a", "response": "b"}], [1], 2)
    assert data.reasons[1].startswith(f"{path} row 3: field 'completion': expected a non-empty string")


@pytest.mark.parametrize(
    ("encoding", "bom", "why"),
    [
        ("utf-16", True, "byte-order mark FF FE"),
        ("utf-16-be", True, "byte-order mark FE FF"),
        ("utf-16-le", False, "NUL bytes between ASCII characters"),
        ("utf-16-be", False, "NUL bytes between ASCII characters"),
    ],
)
def test_a_utf16_file_is_named_as_such(tmp_path, encoding, bom, why):
    text = ("\ufeff" if bom and encoding != "utf-16" else "") + '{"prompt": "the kettle ?"}\n'
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(text.encode(encoding))
    for read in (read_jsonl, read_records):
        with pytest.raises(DataError) as info:
            read(path, "prompt", on_error="skip")  # a whole-file error: nothing to skip
        assert str(info.value) == f"{path}: file is UTF-16 ({why}); save it as UTF-8"


def test_lookup_finds_each_file_type_and_refuses_two(tmp_path):
    assert find_data_file(tmp_path, "sft_train") is None
    folder = write(tmp_path / "sft_train", LAYOUTS["sft_completion"][1], "dataset")
    assert find_data_file(tmp_path, "sft_train") == folder
    write(tmp_path / "sft_train", LAYOUTS["sft_completion"][1], "parquet")
    dm = SFTDataModule(data_dir=str(tmp_path), generate_world=False)
    with pytest.raises(DataError, match=r"sft_train.parquet and sft_train/ are both there for sft_train") as info:
        dm.file("sft_train.jsonl")
    assert info.value.where == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"sft_val.jsonl does not exist, nor sft_val.parquet or a datasets"):
        dm.file("sft_val.jsonl")


@pytest.mark.parametrize("file_type", ["parquet", "dataset"])
def test_without_the_data_extra_a_table_names_it(tmp_path, monkeypatch, file_type):
    path = write(tmp_path / "sft", LAYOUTS["sft_completion"][1], file_type)
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DataError) as info:
        read_records(path, "sft")
    message = str(info.value)
    assert "\n" not in message and message.endswith("needs pyarrow: pip install 'rlhf-lightning[data]'")
    assert message.startswith(f"{path}: reading a")


def test_an_unreadable_parquet_file_is_named(tmp_path):
    path = tmp_path / "sft.parquet"
    path.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=re.escape(f"{path}: cannot read it: ")):
        read_records(path, "sft", on_error="skip")


def test_a_dataset_dict_folder_asks_for_one_split(tmp_path):
    splits = {"train": datasets.Dataset.from_list(LAYOUTS["sft_completion"][1])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "sft"))
    with pytest.raises(DataError, match=r"a DatasetDict of splits \['train'\]; name one split's folder"):
        read_records(tmp_path / "sft", "sft")


def test_data_modules_read_parquet_and_dataset_folders(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write(data / "sft_train", LAYOUTS["sft_messages"][1] * 3, "parquet")
    write(data / "sft_val", LAYOUTS["sft_conversational_completion"][1], "dataset")
    write(data / "prefs_train", LAYOUTS["preference_implicit_prompt"][1] * 2, "dataset")
    write(data / "prefs_val", LAYOUTS["preference_conversational"][1], "parquet")
    write(data / "prompts_val", LAYOUTS["prompt_conversational"][1], "parquet")
    write(data / "prompts_train", LAYOUTS["prompt_standard"][1], "dataset")
    texts = [v for _, _, own in LAYOUTS.values() for r in own or [] for v in r.values()] + ["the kettle ? a lamp ?"]
    Tokenizer.train_word_level(texts).save(tmp_path / "tok")
    common = {
        "data_dir": str(data),
        "generate_world": False,
        "tokenizer_path": str(tmp_path / "tok"),
        "batch_size": 2,
        "max_prompt_len": 32,
    }  # the default template renders a conversation into more than 16 tokens

    sft = SFTDataModule(**common, eval_prompts=2)
    sft.prepare_data()
    sft.setup("fit")
    assert (len(sft.train_examples), len(sft.val_examples)) == (6, 2)
    assert sft.train_prompts == [r["prompt"] for r in LAYOUTS["sft_messages"][2]]
    assert sft.eval_prompts()[0] == [r["prompt"] for r in LAYOUTS["prompt_conversational"][2]]
    where = sft._read("sft_train.jsonl", "sft")[1]
    assert where[:2] == [f"{data / 'sft_train.parquet'} row 1", f"{data / 'sft_train.parquet'} row 2"]

    prefs = PreferenceDataModule(**common)
    prefs.prepare_data()
    prefs.setup("fit")
    assert (len(prefs.train_examples), len(prefs.val_examples)) == (4, 2)
    assert next(iter(prefs.train_dataloader()))["chosen_ids"].shape[0] == 2
    prefs.train_prompt_batch(3, seed=0)  # drawn from the prompts_train folder
    assert prefs.data_stats["data/skipped/prompts_train"] == 0.0
