"""JSONL schemas, streaming validation and atomic writing: the one format every phase's data comes in.

One JSON object per line, UTF-8. Three kinds of record, each a set of required non-empty string fields:

    "sft"         {"prompt": str, "response": str}                   demonstrations
    "preference"  {"prompt": str, "chosen": str, "rejected": str}    preference pairs
    "prompt"      {"prompt": str}                                    prompts for PPO and evaluation

Extra keys (ids, sources, annotator metadata) are allowed and dropped: a record comes back with exactly its kind's
fields, so the rest of the package never depends on what else a file carries.

A bad line raises a :class:`DataError` that names the file, the 1-based line and the field, or, with
``on_error="skip"``, is skipped and counted in :attr:`JsonlData.skipped` for the caller to log as ``data/skipped``.
Nothing is dropped silently: a blank line is a bad line too.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from rlhf_lightning.io import atomic_open, write_jsonl  # noqa: F401  (re-exported: part of the JSONL API)

Kind = Literal["sft", "preference", "prompt"]
OnError = Literal["raise", "skip"]

#: The required string fields of each kind of record, in the order they are reported.
SCHEMAS: dict[str, tuple[str, ...]] = {
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "prompt": ("prompt",),
}

#: How many skip messages :attr:`JsonlData.reasons` keeps: enough to see the pattern, bounded for a broken file.
MAX_REASONS = 10

# JSON can spell both as escapes (\u0000, an unpaired \ud800) although neither is text: NUL truncates strings in C
# libraries downstream, and a lone surrogate cannot be encoded as UTF-8 at all (it would break the write, or the
# tokenizer, far from the line that caused it).
_BAD_CHARS = re.compile("[\x00\ud800-\udfff]")

# Lines over max_line_bytes are consumed in pieces of this size, so that skipping one never holds it in memory.
_CHUNK_BYTES = 1 << 20


class DataError(ValueError):
    """A malformed data file or record, with where it is and what is wrong.

    The message reads ``"{where}: field '{field}': {reason}"`` (or ``"{where}: {reason}"`` when no single field is
    at fault), e.g. ``data/prefs.jsonl:17: field 'chosen': expected a non-empty string, got int``.

    Attributes:
        where: ``"path:line"`` (1-based line), ``"path"`` for a whole-file problem, or ``"record i"`` for a record
            that was already read (tokenisation).
        reason: what is wrong.
        field: the record field at fault, or None.
    """

    def __init__(self, where: str, reason: str, field: str | None = None):
        self.where, self.reason, self.field = where, reason, field
        at = f"field {field!r}: " if field is not None else ""
        super().__init__(f"{where}: {at}{reason}")

    def __reduce__(self):
        # Exceptions are pickled by their args; ours has three, so that it survives DataLoader workers and spawn.
        return type(self), (self.where, self.reason, self.field)


class JsonlData(NamedTuple):
    """The valid records of a file, and what was skipped.

    Attributes:
        records: one dict per valid line, holding exactly the fields of its kind (all non-empty strings).
        skipped: how many lines were skipped (``on_error="skip"``); 0 with ``on_error="raise"``.
        reasons: the messages of the first :data:`MAX_REASONS` skipped lines.
        lines: the 1-based line of each record, so that a later error about a record (tokenisation) can name it.
    """

    records: list[dict[str, str]]
    skipped: int
    reasons: list[str]
    lines: list[int]


def read_jsonl(
    path: str | os.PathLike,
    kind: Kind,
    on_error: OnError = "raise",
    max_line_bytes: int | None = None,
) -> JsonlData:
    """Reads and validates a JSONL file of ``kind`` records, streaming it line by line.

    Args:
        path: the file.
        kind: "sft", "preference" or "prompt" (see :data:`SCHEMAS`).
        on_error: "raise" the first bad line's :class:`DataError`, or "skip" bad lines (counted, first reasons kept).
        max_line_bytes: a line longer than this (not counting its newline) is a bad line, read no further than the
            limit; None: no limit.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a bad line (with ``on_error="raise"``), or no valid record in the whole file.
        ValueError: an unknown ``kind`` or ``on_error``.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if max_line_bytes is not None and max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be >= 1 or None, got {max_line_bytes}")
    path_str = os.fspath(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"JSONL file {path_str} does not exist")

    fields = SCHEMAS[kind]
    records: list[dict[str, str]] = []
    lines: list[int] = []
    skipped = 0
    reasons: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(_lines(f, max_line_bytes), start=1):
            where = f"{path_str}:{lineno}"
            try:
                if raw is None:
                    raise DataError(
                        where,
                        f"line longer than max_line_bytes={max_line_bytes} (raise the limit if "
                        "records this long are intended; a file without newlines is one line)",
                    )
                records.append(_parse_line(raw, fields, where, first=lineno == 1))
                lines.append(lineno)
            except DataError as err:
                if on_error == "raise":
                    raise
                skipped += 1
                if len(reasons) < MAX_REASONS:
                    reasons.append(str(err))
    if not records:
        detail = f" ({skipped} bad lines skipped, first: {reasons[0]})" if skipped else ""
        raise DataError(path_str, f"no records{detail}")
    return JsonlData(records, skipped, reasons, lines)


def _lines(f: IO[bytes], max_line_bytes: int | None) -> Iterator[bytes | None]:
    """The lines of a binary file (newline included), None for one over ``max_line_bytes`` (consumed, not kept).

    Binary lines split on b"\\n" only: U+2028 and the other separators that str.splitlines() honours are legal inside
    a JSON string and must not cut a record in two.
    """
    if max_line_bytes is None:
        yield from f
        return
    while line := f.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = f.readline(_CHUNK_BYTES)
            yield None
        else:
            yield line


def _parse_line(raw: bytes, fields: tuple[str, ...], where: str, first: bool) -> dict[str, str]:
    """One line -> its record with exactly ``fields``, or a DataError saying what is wrong there."""
    try:
        # utf-8-sig on the first line: editors on Windows start files with a byte-order mark, which is not JSON.
        text = raw.decode("utf-8-sig" if first else "utf-8").rstrip("\r\n")  # columns then count within the line
    except UnicodeDecodeError as err:
        raise DataError(where, f"invalid UTF-8 at byte {err.start}: {raw[err.start : err.start + 4]!r}") from None
    if not text.strip():
        raise DataError(where, "blank line (expected one JSON object per line)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(where, f"invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(obj, dict):
        raise DataError(where, f"expected a JSON object, got {_type_name(obj)}")
    record = {}
    for field in fields:
        if field not in obj:
            raise DataError(where, f"missing (a record needs {', '.join(map(repr, fields))})", field)
        value = obj[field]
        if not isinstance(value, str):
            raise DataError(where, f"expected a non-empty string, got {_type_name(value)}", field)
        if not value.strip():
            raise DataError(where, "expected a non-empty string, got an empty or whitespace-only one", field)
        if bad := _BAD_CHARS.search(value):
            what = "a NUL character" if bad.group() == "\x00" else "an unpaired surrogate"
            raise DataError(where, f"contains {what} ({bad.group()!r} at character {bad.start()})", field)
        record[field] = value
    return record


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
