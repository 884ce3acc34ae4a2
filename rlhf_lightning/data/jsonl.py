"""JSONL schemas, streaming validation and atomic writing: the one format every phase's data comes in.

One JSON object per line, UTF-8. Three kinds of record, each a set of required non-empty string fields:

    "sft"         {"prompt": str, "response": str}                   demonstrations
    "preference"  {"prompt": str, "chosen": str, "rejected": str}    preference pairs
    "prompt"      {"prompt": str}                                    prompts for PPO and evaluation

Extra keys (ids, sources, annotator metadata) are allowed and dropped: a record comes back with exactly its kind's
fields, so the rest of the package never depends on what else a file carries.

A bad line raises a :class:`DataError` that names the file, the 1-based line and the field, or, with
``on_error="skip"``, is skipped and counted in :attr:`JsonlData.skipped` for the caller to log as ``data/skipped``.
Nothing is dropped silently: a blank line is a bad line too. A UTF-16 file is refused as a whole, saying so.

The other layouts a record may come in (TRL's prompt/completion and conversational records) and the other file types
(Parquet, ``datasets`` folders) are :mod:`rlhf_lightning.data.formats`', built on :func:`collect` and the checks here.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

from rlhf_lightning.io import atomic_open, write_jsonl  # noqa: F401  (re-exported: part of the JSONL API)

Kind = Literal["sft", "preference", "prompt"]
OnError = Literal["raise", "skip"]
#: Turns one parsed object (a JSON line, a table row) and where it is into a record, or raises :class:`DataError`.
ToRecord = Callable[[Mapping[str, Any], str], dict[str, str]]

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
        lines: the 1-based line (in a table: row) of each record, so that a later error about a record
            (tokenisation) can name it.
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
    to_record: ToRecord | None = None,
) -> JsonlData:
    """Reads and validates a JSONL file of ``kind`` records, streaming it line by line.

    Args:
        path: the file.
        kind: "sft", "preference" or "prompt" (see :data:`SCHEMAS`).
        on_error: "raise" the first bad line's :class:`DataError`, or "skip" bad lines (counted, first reasons kept).
        max_line_bytes: a line longer than this (not counting its newline) is a bad line, read no further than the
            limit; None: no limit.
        to_record: turns a line's JSON object and its ``"path:line"`` into a record, raising :class:`DataError`;
            None: :func:`record_of` with the kind's fields (the other layouts: :mod:`rlhf_lightning.data.formats`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a bad line (with ``on_error="raise"``), a UTF-16 file, or no valid record in the whole file.
        ValueError: an unknown ``kind`` or ``on_error``.
    """
    check_read_args(kind, on_error)
    if max_line_bytes is not None and max_line_bytes < 1:
        raise ValueError(f"max_line_bytes must be >= 1 or None, got {max_line_bytes}")
    path_str = os.fspath(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"JSONL file {path_str} does not exist")
    to_record = to_record or partial(record_of, fields=SCHEMAS[kind])
    with open(path, "rb") as f:
        _refuse_utf16(f.read(4), path_str)
        f.seek(0)
        rows = (
            (lineno, partial(_parse_line, raw, to_record, f"{path_str}:{lineno}", lineno == 1, max_line_bytes))
            for lineno, raw in enumerate(_lines(f, max_line_bytes), start=1)
        )
        return collect(path_str, rows, on_error)


def check_read_args(kind: str, on_error: str) -> None:
    """Raises ValueError for an unknown ``kind`` or ``on_error`` (the arguments every reader takes)."""
    if kind not in SCHEMAS:
        raise ValueError(f"kind must be one of {sorted(SCHEMAS)}, got {kind!r}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")


def collect(source: str, rows: Iterable[tuple[int, Callable[[], dict[str, str]]]], on_error: OnError) -> JsonlData:
    """The records of a file whose rows are given as (1-based number, parser of that row), parsed in order.

    A parser's :class:`DataError` is raised or, with ``on_error="skip"``, counted; an error raised while fetching
    the next row (the file itself is unreadable) is always raised. No record at all is an error naming ``source``.
    """
    records: list[dict[str, str]] = []
    numbers: list[int] = []
    skipped = 0
    reasons: list[str] = []
    for number, parse in rows:
        try:
            records.append(parse())
            numbers.append(number)
        except DataError as err:
            if on_error == "raise":
                raise
            skipped += 1
            if len(reasons) < MAX_REASONS:
                reasons.append(str(err))
    if not records:
        detail = f" ({skipped} bad lines skipped, first: {reasons[0]})" if skipped else ""
        raise DataError(source, f"no records{detail}")
    return JsonlData(records, skipped, reasons, numbers)


def _refuse_utf16(head: bytes, where: str) -> None:
    """A UTF-16 file (Windows tools save "Unicode" text so) would fail as "invalid UTF-8 at byte 0": say what it is."""
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        why = f"byte-order mark {head[0]:02X} {head[1]:02X}"
    elif len(head) == 4 and ((head[1] == head[3] == 0 != head[0]) or (head[0] == head[2] == 0 != head[1])):
        why = "NUL bytes between ASCII characters"
    else:
        return
    raise DataError(where, f"file is UTF-16 ({why}); save it as UTF-8")


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


def _parse_line(
    raw: bytes | None, to_record: ToRecord, where: str, first: bool, max_line_bytes: int | None
) -> dict[str, str]:
    """One line (None: over ``max_line_bytes``) -> its record, or a DataError saying what is wrong there."""
    if raw is None:
        raise DataError(
            where,
            f"line longer than max_line_bytes={max_line_bytes} (raise the limit if "
            "records this long are intended; a file without newlines is one line)",
        )
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
        raise DataError(where, f"expected a JSON object, got {type_name(obj)}")
    return to_record(obj, where)


def record_of(obj: Mapping[str, Any], where: str, fields: tuple[str, ...]) -> dict[str, str]:
    """The record of exactly ``fields`` (non-empty strings) of ``obj``, or a DataError naming the field at fault."""
    needs = ", ".join(map(repr, fields))
    return {field: field_text(obj, field, where, needs) for field in fields}


def field_text(obj: Mapping[str, Any], field: str, where: str, needs: str) -> str:
    """``obj[field]`` checked by :func:`check_text`; missing, it is an error that says what a record ``needs``."""
    if field not in obj:
        raise DataError(where, f"missing (a record needs {needs})", field)
    return check_text(obj[field], where, field)


def check_text(value: Any, where: str, field: str) -> str:
    """``value`` if it is a non-empty string of real text, else a DataError about ``field``."""
    if not isinstance(value, str):
        raise DataError(where, f"expected a non-empty string, got {type_name(value)}", field)
    if not value.strip():
        raise DataError(where, "expected a non-empty string, got an empty or whitespace-only one", field)
    if bad := _BAD_CHARS.search(value):
        what = "a NUL character" if bad.group() == "\x00" else "an unpaired surrogate"
        raise DataError(where, f"contains {what} ({bad.group()!r} at character {bad.start()})", field)
    return value


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
