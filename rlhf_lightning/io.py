"""Atomic file writes: a reader sees the old file or the whole new one, never half of one."""

from __future__ import annotations

import json
import os
import secrets
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def atomic_open(path: str | os.PathLike, binary: bool = False) -> Iterator[IO]:
    """Opens ``path`` for writing (UTF-8 text, or bytes with ``binary``) so that it is replaced whole or not at all.

    Writes go to a temporary file in the same folder (so the final rename stays on one filesystem, where it is
    atomic), which is flushed, fsynced and renamed over ``path`` when the block exits normally, and removed when it
    raises: readers see the old file or the new one, never half of one. Creates missing parent folders.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # newline="\n": the same bytes on every platform (no \r\n on Windows).
        text = {} if binary else {"encoding": "utf-8", "newline": "\n"}
        with open(tmp, "xb" if binary else "x", **text) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_jsonl(path: str | os.PathLike, records: Iterable[Mapping[str, Any]]) -> int:
    """Writes ``records`` to ``path`` as JSONL, atomically (see :func:`atomic_open`); returns how many.

    One object per line, UTF-8 with non-ASCII text kept as is (``ensure_ascii=False``); newlines inside strings are
    escaped by JSON, so a record never spans two lines.

    Raises:
        TypeError: a record is not a mapping, or holds a value JSON cannot represent; ``path`` is left untouched.
        ValueError: a record holds NaN or an infinity (not JSON); ``path`` is left untouched.
        UnicodeEncodeError: a string holds an unpaired surrogate; ``path`` is left untouched.
    """
    n = 0
    with atomic_open(path) as f:
        for n, record in enumerate(records, start=1):
            if not isinstance(record, Mapping):
                raise TypeError(f"record {n - 1}: expected a mapping, got {type(record).__name__}")
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False))
            f.write("\n")
    return n
