"""JSONL validation: every malformed line is reported with file, line and field, or skipped and counted."""

import json
import os
import pickle
import re
from pathlib import Path

import pytest

from rlhf_lightning.data import DataError, read_jsonl, write_jsonl

PAIR = {"prompt": "Review the kettle.", "chosen": "it boils fast .", "rejected": "bad ."}


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Writes raw lines (each gets a newline) exactly as given, bypassing write_jsonl's own checks."""
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


def good(n: int = 1) -> list[str]:
    return [json.dumps({**PAIR, "prompt": f"Review product {i}."}) for i in range(n)]


# Each malformed line 2 of a preference file, and the message it must produce (after "<path>:2: ").
BAD_LINES = {
    "broken_json": ('{"prompt": "a", "chosen": "b"', r"invalid JSON: Expecting .* \(column 30\)"),
    "not_object": ('["a", "b", "c"]', r"expected a JSON object, got list"),
    "string_value": ('"just a string"', r"expected a JSON object, got str"),
    "missing": (json.dumps({"prompt": "p", "rejected": "r"}), r"field 'chosen': missing"),
    "wrong_type": (json.dumps({**PAIR, "chosen": 17}), r"field 'chosen': expected a non-empty string, got int"),
    "null": (json.dumps({**PAIR, "rejected": None}), r"field 'rejected': expected a non-empty string, got null"),
    "empty": (json.dumps({**PAIR, "prompt": ""}), r"field 'prompt': expected a non-empty string, got an empty"),
    "whitespace": (json.dumps({**PAIR, "chosen": " \t\n "}), r"field 'chosen': .*whitespace-only"),
    "nul": (json.dumps({**PAIR, "chosen": "ok\u0000no"}), r"field 'chosen': contains a NUL character"),
    "surrogate": ('{"prompt": "p", "chosen": "a\\ud800b", "rejected": "r"}', r"field 'chosen': .*unpaired surrogate"),
    "blank": ("   ", r"blank line"),
    "invalid_utf8": (b'{"prompt": "caf\xe9", "chosen": "c", "rejected": "r"}', r"invalid UTF-8 at byte 15"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_raises_with_file_line_and_field(tmp_path: Path, case: str) -> None:
    bad, reason = BAD_LINES[case]
    path = write_lines(tmp_path / "prefs.jsonl", [good()[0], bad, good()[0]])
    with pytest.raises(DataError, match=re.escape(f"{path}:2: ") + reason) as info:
        read_jsonl(path, "preference")
    assert info.value.where == f"{path}:2"
    # The error crosses process boundaries (DataLoader workers, spawn) intact.
    assert str(pickle.loads(pickle.dumps(info.value))) == str(info.value)


def test_skip_counts_bad_lines_and_keeps_good_ones(tmp_path: Path) -> None:
    lines = good(3)
    bad = [BAD_LINES[case][0] for case in sorted(BAD_LINES)]
    path = write_lines(tmp_path / "prefs.jsonl", [lines[0], *bad, lines[1], lines[2]])
    data = read_jsonl(path, "preference", on_error="skip")
    assert data.records == [json.loads(x) for x in lines]
    assert data.skipped == len(bad)
    assert len(data.reasons) == 10  # the first MAX_REASONS, in file order
    assert data.reasons[0].startswith(f"{path}:2: ")
    assert data.reasons[1].startswith(f"{path}:3: ")


def test_extra_keys_are_dropped_and_kinds_checked(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "p", "response": "r", "id": 7, "x": None})])
    assert read_jsonl(path, "sft").records == [{"prompt": "p", "response": "r"}]
    assert read_jsonl(path, "prompt").records == [{"prompt": "p"}]
    with pytest.raises(DataError, match=r"sft.jsonl:1: field 'chosen': missing"):
        read_jsonl(path, "preference")
    with pytest.raises(ValueError, match="kind must be one of"):
        read_jsonl(path, "pairs")
    with pytest.raises(ValueError, match="on_error must be"):
        read_jsonl(path, "sft", on_error="ignore")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.jsonl"))):
        read_jsonl(tmp_path / "nope.jsonl", "sft")
    empty = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match=re.escape(f"{empty}: no records")):
        read_jsonl(empty, "sft")
    all_bad = write_lines(tmp_path / "bad.jsonl", ["{", "[]"])
    with pytest.raises(DataError, match=r"no records \(2 bad lines skipped, first: .*bad.jsonl:1: invalid JSON"):
        read_jsonl(all_bad, "sft", on_error="skip")


def test_bom_crlf_and_line_separators(tmp_path: Path) -> None:
    # A Windows editor's BOM and CRLF endings are fine; U+2028 inside a string must not split the record.
    text = "first\u2028second"
    path = tmp_path / "win.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": text}, ensure_ascii=False).encode() + b"\r\n")
    assert read_jsonl(path, "prompt").records == [{"prompt": text}]


def test_round_trip_with_non_ascii(tmp_path: Path) -> None:
    records = [
        {"prompt": "Évalue le café ☕", "chosen": "très bon 😀", "rejected": "mauvais\nsur deux lignes"},
        {"prompt": "日本語のレビュー", "chosen": "良い", "rejected": '悪い "quoted" \\ back'},
        {"prompt": "Review \u2028 the lamp.", "chosen": "it glows .", "rejected": "no ."},
    ]
    path = tmp_path / "out" / "prefs.jsonl"
    assert write_jsonl(path, records) == 3
    raw = path.read_bytes()
    assert raw.count(b"\n") == 3 and "☕".encode() in raw  # one line per record, UTF-8 rather than \u escapes
    assert read_jsonl(path, "preference").records == records
    assert os.listdir(path.parent) == ["prefs.jsonl"]  # no temporary file left behind


@pytest.mark.parametrize(
    ("bad", "error"),
    [({"prompt": object()}, TypeError), ({"prompt": float("nan")}, ValueError), (["not", "a", "dict"], TypeError)],
)
def test_failed_write_leaves_old_file_intact(tmp_path: Path, bad: object, error: type) -> None:
    path = tmp_path / "prompts.jsonl"
    write_jsonl(path, [{"prompt": "old"}])
    before = path.read_bytes()
    with pytest.raises(error):
        write_jsonl(path, [{"prompt": "new"}, bad])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["prompts.jsonl"]


def test_ten_megabyte_line(tmp_path: Path) -> None:
    long = "word " * (2 * 1024 * 1024)  # 10 MiB
    path = write_lines(tmp_path / "sft.jsonl", [json.dumps({"prompt": "p", "response": long})])
    assert read_jsonl(path, "sft").records[0]["response"] == long

    # With a limit, the long line is a clear error, or skipped without losing the lines after it.
    write_lines(path, [json.dumps({"prompt": "p", "response": long}), json.dumps({"prompt": "q", "response": "r"})])
    with pytest.raises(DataError, match=r"sft.jsonl:1: line longer than max_line_bytes=1000"):
        read_jsonl(path, "sft", max_line_bytes=1000)
    data = read_jsonl(path, "sft", on_error="skip", max_line_bytes=1000)
    assert data.records == [{"prompt": "q", "response": "r"}] and data.skipped == 1


def test_max_line_bytes_boundary(tmp_path: Path) -> None:
    line = json.dumps({"prompt": "p"})
    path = write_lines(tmp_path / "p.jsonl", [line, line + " "])
    data = read_jsonl(path, "prompt", on_error="skip", max_line_bytes=len(line))
    assert (len(data.records), data.skipped) == (1, 1)
    assert data.reasons[0].startswith(f"{path}:2: line longer")
