"""The record layouts and file types a data file may come in, normalised to the three kinds of :mod:`.jsonl`.

Layouts, per record (TRL's dataset formats, so that a TRL user's files work as they are):

    kind          standard                                    conversational (lists of {"role", "content"})
    "sft"         prompt + response, or prompt + completion   messages (the last one the assistant's reply), or
                                                              prompt + completion
    "preference"  prompt + chosen + rejected                  prompt + chosen + rejected, or chosen + rejected
                                                              whose shared leading messages are the prompt
    "prompt"      prompt                                      prompt

A conversational record is rendered to text with a chat template: the prompt's messages with
``add_generation_prompt=True``, and each response as what the whole conversation renders to beyond that, so that
prompt + response is exactly the rendered conversation. The template is a Hugging Face tokenizer's ``chat_template``
when the caller passes one (:func:`chat_template_of`), else :data:`DEFAULT_CHAT_TEMPLATE`. A string ``chosen`` /
``rejected`` pair without ``prompt`` is refused: where a shared prompt ends in plain text is a guess.

File types: ``.parquet`` (read with pyarrow), a ``datasets`` ``save_to_disk`` folder (read with ``datasets`` when
installed, else its Arrow files with pyarrow), anything else JSONL. pyarrow and datasets are the optional extra
``rlhf-lightning[data]``. Errors name the file and the record (``path:line`` in JSONL, ``path row N`` in a table,
both 1-based) and the field, and ``on_error="skip"`` skips bad records of any file type.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from rlhf_lightning.data.jsonl import (
    SCHEMAS,
    DataError,
    JsonlData,
    Kind,
    OnError,
    check_read_args,
    check_text,
    collect,
    field_text,
    read_jsonl,
    type_name,
)

#: Suffix of a Parquet file; a folder is a ``datasets`` folder; any other file is read as JSONL.
PARQUET = ".parquet"
_EXTRA_HINT = "pip install 'rlhf-lightning[data]'"
# What a record of each kind needs, for "missing" messages.
_NEEDS = {
    "sft": "'prompt' and 'response' (or 'completion'), or 'messages'",
    "preference": "'prompt', 'chosen' and 'rejected' (or, without 'prompt', message lists sharing the prompt)",
    "prompt": "'prompt'",
}
# Rows are read from Arrow in batches of this many, so that a large table never sits in memory as Python objects.
_BATCH_ROWS = 1024


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, rendered as ``transformers`` renders a tokenizer's ``chat_template``.

    Attributes:
        source: the Jinja text; it sees ``messages`` (``{"role", "content"}`` dicts), ``add_generation_prompt``,
            ``bos_token``, ``eos_token`` and ``raise_exception(message)``.
        origin: where it comes from, for error messages.
        bos_token, eos_token: the tokenizer's special tokens as text ("" when it has none).
    """

    source: str
    origin: str
    bos_token: str = ""
    eos_token: str = ""

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The text of ``messages``; raises jinja2.TemplateError when the template refuses them."""
        return _compile(self.source, self.origin).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


#: The template of conversational records when the tokenizer has none (or is trained here): each message as
#: ``<|role|>`` and its content on the next line, messages one line apart, and ``<|assistant|>`` as the generation
#: prompt. E.g. a user turn and the reply: ``"<|user|>\nhi\n<|assistant|>\n"`` (the prompt) + ``"hello"``.
DEFAULT_CHAT_TEMPLATE = ChatTemplate(
    # '\n' as Jinja string literals: trim_blocks (as in transformers) would drop a newline right after a tag.
    source="{% for m in messages %}{% if not loop.first %}{{ '\\n' }}{% endif %}<|{{ m.role }}|>{{ '\\n' }}"
    "{{ m.content }}{% endfor %}{% if add_generation_prompt %}{{ '\\n<|assistant|>\\n' }}{% endif %}",
    origin="the default chat template",
)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str, origin: str) -> jinja2.Template:
    # The environment transformers renders chat templates in (sandboxed: a template is data from a model folder).
    # No strftime_now: templates that print today's date would make the rendered data depend on the day.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:  # a broken template is no record's fault: never skipped
        raise ValueError(f"{origin}: not a valid Jinja template: {err} (template line {err.lineno})") from None


def chat_template_of(tokenizer_path: str | os.PathLike | None) -> ChatTemplate | None:
    """The chat template of a Hugging Face tokenizer (a folder, or a tokenizer.json inside one), or None.

    Looked for where ``transformers`` saves it: ``chat_template.jinja``, else ``chat_template`` in
    ``tokenizer_config.json`` (a string, or a list of named templates: the one named "default"). None for
    ``tokenizer_path=None`` (a tokenizer trained here) and for a tokenizer without one.

    Raises:
        ValueError: tokenizer_config.json is not JSON, or its chat_template is neither form.
    """
    if tokenizer_path is None:
        return None
    folder = Path(tokenizer_path) if Path(tokenizer_path).is_dir() else Path(tokenizer_path).parent
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON: {err}") from None
    jinja_path = folder / "chat_template.jinja"
    if jinja_path.is_file():
        source, origin = jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    else:
        source, origin = config.get("chat_template"), f"{config_path}: chat_template"
    if isinstance(source, list):
        named = {entry.get("name"): entry.get("template") for entry in source if isinstance(entry, dict)}
        if "default" not in named:
            raise ValueError(f"{origin}: a list of templates without one named 'default' (has {sorted(named)})")
        source = named["default"]
    if source is None:
        return None
    if not isinstance(source, str):
        raise ValueError(f"{origin}: expected a string or a list of named templates, got {type_name(source)}")
    return ChatTemplate(source, origin, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))


def _token_text(token: Any) -> str:
    # tokenizer_config.json writes a special token as its text or as an AddedToken dict {"content": ..., ...}.
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) else ""


# -- records ---------------------------------------------------------------------------------------------------------
def to_record(obj: Mapping[str, Any], where: str, kind: Kind, template: ChatTemplate | None = None) -> dict[str, str]:
    """The ``kind`` record (exactly the fields of :data:`SCHEMAS`) of a record in any layout of the module doc.

    Args:
        obj: the record as read (a JSON object, a table row).
        where: the record's place, for errors (``path:line``, ``path row N``).
        kind: "sft", "preference" or "prompt".
        template: renders conversational records; None: :data:`DEFAULT_CHAT_TEMPLATE`.

    Raises:
        DataError: naming ``where`` and the field at fault.
    """
    template = template or DEFAULT_CHAT_TEMPLATE
    needs = _NEEDS[kind]
    if kind == "sft":
        if "messages" in obj:
            messages = _messages(obj["messages"], where, "messages")
            if messages[-1]["role"] != "assistant":
                role = messages[-1]["role"]
                raise DataError(where, f"the last message must be the assistant's reply, got role {role!r}", "messages")
            if len(messages) < 2:
                raise DataError(where, "needs the prompt's messages before the assistant's reply", "messages")
            prompt, (response,) = _render(template, where, ("messages", messages[:-1]), [("messages", messages[-1:])])
            return {"prompt": prompt, "response": response}
        reply = "completion" if "completion" in obj else "response"
        if isinstance(obj.get("prompt"), list):
            prompt, (response,) = _render(template, where, _conversation(obj, "prompt", where, needs),
                                          [_conversation(obj, reply, where, needs, reply=True)])  # fmt: skip
            return {"prompt": prompt, "response": response}
        return {"prompt": field_text(obj, "prompt", where, needs), "response": field_text(obj, reply, where, needs)}
    if kind == "preference":
        if "prompt" not in obj and isinstance(obj.get("chosen"), list):
            return _implicit_prompt(obj, where, template, needs)
        if "prompt" not in obj and isinstance(obj.get("chosen"), str) and isinstance(obj.get("rejected"), str):
            raise DataError(
                where,
                "missing: 'chosen' and 'rejected' are strings, and where a prompt they share ends in plain text "
                "is a guess; add a 'prompt' field (or give them as message lists)",
                "prompt",
            )
        if isinstance(obj.get("prompt"), list):
            replies = [_conversation(obj, field, where, needs, reply=True) for field in ("chosen", "rejected")]
            prompt, (chosen, rejected) = _render(template, where, _conversation(obj, "prompt", where, needs), replies)
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        return {field: field_text(obj, field, where, needs) for field in SCHEMAS["preference"]}
    if isinstance(obj.get("prompt"), list):
        prompt, _ = _render(template, where, _conversation(obj, "prompt", where, needs), [])
        return {"prompt": prompt}
    return {"prompt": field_text(obj, "prompt", where, needs)}


def _implicit_prompt(obj: Mapping[str, Any], where: str, template: ChatTemplate, needs: str) -> dict[str, str]:
    """A conversational pair without ``prompt``: the messages ``chosen`` and ``rejected`` both start with are it."""
    chosen = _conversation(obj, "chosen", where, needs)[1]
    rejected = _conversation(obj, "rejected", where, needs)[1]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(where, "without 'prompt', chosen and rejected must start with the same (prompt) messages",
                        "chosen")  # fmt: skip
    replies = []
    for field, messages in (("chosen", chosen), ("rejected", rejected)):
        if shared == len(messages):
            raise DataError(where, "no reply after the messages chosen and rejected share (the prompt)", field)
        _check_reply(messages[shared:], where, field)
        replies.append((field, messages[shared:]))
    prompt, (chosen_text, rejected_text) = _render(template, where, ("chosen", chosen[:shared]), replies)
    return {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}


def _conversation(
    obj: Mapping[str, Any], field: str, where: str, needs: str, reply: bool = False
) -> tuple[str, list[dict[str, str]]]:
    """(field, its checked messages); a ``reply`` must start with the assistant's message."""
    if field not in obj:
        raise DataError(where, f"missing (a record needs {needs})", field)
    messages = _messages(obj[field], where, field)
    if reply:
        _check_reply(messages, where, field)
    return field, messages


def _check_reply(messages: list[dict[str, str]], where: str, field: str) -> None:
    # The prompt is rendered with the assistant's generation prompt: a response of another role would not follow it.
    if messages[0]["role"] != "assistant":
        raise DataError(where, f"a response must start with an assistant message, got role {messages[0]['role']!r}",
                        field)  # fmt: skip


def _messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    """``value`` as a non-empty list of ``{"role", "content"}`` (other keys dropped), or a DataError."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else type_name(value)
        raise DataError(where, f"expected a non-empty list of messages ({{'role', 'content'}}), got {got}", field)
    messages = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise DataError(where, f"message {i}: expected an object with 'role' and 'content', got "
                                   f"{type_name(message)}", field)  # fmt: skip
        checked = {}
        for key in ("role", "content"):
            if key not in message:
                raise DataError(where, f"message {i}: missing {key!r}", field)
            try:
                checked[key] = check_text(message[key], where, field)
            except DataError as err:
                raise DataError(where, f"message {i}: {key!r} {err.reason}", field) from None
        messages.append(checked)
    return messages


def _render(
    template: ChatTemplate,
    where: str,
    prompt: tuple[str, list[dict[str, str]]],
    replies: list[tuple[str, list[dict[str, str]]]],
) -> tuple[str, list[str]]:
    """The prompt's text (with the generation prompt) and each reply's: the conversation's text beyond the prompt."""
    field = prompt[0]
    try:
        prompt_text = template.render(prompt[1], add_generation_prompt=True)
        texts = []
        for field, reply in replies:  # rebinds field: a template error below names the reply it rendered
            full = template.render(prompt[1] + reply, add_generation_prompt=False)
            if not full.startswith(prompt_text):
                raise DataError(
                    where,
                    f"{template.origin} renders the conversation with another beginning than its prompt with "
                    "add_generation_prompt=True, so the response cannot be split off",
                    field,
                )
            texts.append(check_text(full[len(prompt_text) :], where, field))
    except jinja2.TemplateError as err:
        raise DataError(where, f"{template.origin} failed: {err}", field) from None
    return check_text(prompt_text, where, prompt[0]), texts


# -- files -----------------------------------------------------------------------------------------------------------
def find_data_file(data_dir: str | os.PathLike, name: str) -> Path | None:
    """The file of ``name`` (e.g. "sft_train") in ``data_dir``: NAME.jsonl, NAME.parquet or a folder NAME/; None if
    none is there.

    Raises:
        DataError: more than one is there (which one is meant is a guess).
    """
    candidates = [Path(data_dir) / f"{name}.jsonl", Path(data_dir) / f"{name}{PARQUET}", Path(data_dir) / name]
    found = [path for path in candidates if path.exists()]
    if len(found) > 1:
        names = " and ".join(path.name + ("/" if path.is_dir() else "") for path in found)
        raise DataError(os.fspath(data_dir), f"{names} are both there for {name}; remove or rename all but one")
    return found[0] if found else None


def locations(path: str | os.PathLike, numbers: list[int]) -> list[str]:
    """Where the records at 1-based ``numbers`` (:attr:`JsonlData.lines`) of a :func:`read_records` file are."""
    table = Path(path).is_dir() or Path(path).suffix == PARQUET
    return [_row(path, n) if table else f"{os.fspath(path)}:{n}" for n in numbers]


def _row(path: str | os.PathLike, number: int) -> str:
    return f"{os.fspath(path)} row {number}"


def read_records(
    path: str | os.PathLike,
    kind: Kind,
    on_error: OnError = "raise",
    max_line_bytes: int | None = None,
    chat_template: ChatTemplate | None = None,
) -> JsonlData:
    """Reads and normalises the ``kind`` records of a JSONL file, a Parquet file or a ``datasets`` folder.

    Args:
        path: the file or folder (the type: see the module doc).
        kind: "sft", "preference" or "prompt".
        on_error: "raise" the first bad record's :class:`DataError`, or "skip" bad records (counted).
        max_line_bytes: JSONL's line limit (see :func:`~rlhf_lightning.data.jsonl.read_jsonl`).
        chat_template: renders conversational records; None: :data:`DEFAULT_CHAT_TEMPLATE`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: a bad record (with ``on_error="raise"``), an unreadable file, no record, or a Parquet file or
            folder without the ``data`` extra installed.
    """
    check_read_args(kind, on_error)
    convert = partial(to_record, kind=kind, template=chat_template)
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist")
    if not path.is_dir() and path.suffix != PARQUET:
        return read_jsonl(path, kind, on_error, max_line_bytes, to_record=convert)
    rows = (
        (n, partial(convert, {key: value for key, value in row.items() if value is not None}, _row(path, n)))
        for n, row in enumerate(_table_rows(path), start=1)
    )  # a table has every column in every row: a null cell is how a row lacks a field
    return collect(os.fspath(path), rows, on_error)


def _table_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of a Parquet file or ``datasets`` folder as dicts, streamed; DataError if it cannot be read."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        what = "a datasets folder" if path.is_dir() else "a Parquet file"
        raise DataError(os.fspath(path), f"reading {what} needs pyarrow: {_EXTRA_HINT}") from None
    try:
        if not path.is_dir():
            for batch in pq.ParquetFile(path).iter_batches(batch_size=_BATCH_ROWS):
                yield from batch.to_pylist()
        else:
            yield from _dataset_rows(path, pa)
    except (pa.ArrowException, OSError) as err:
        raise DataError(os.fspath(path), f"cannot read it: {err}") from None


def _dataset_rows(path: Path, pa: Any) -> Iterator[dict[str, Any]]:
    """The rows of a ``Dataset.save_to_disk`` folder: with ``datasets`` if installed, else its Arrow stream files."""
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise DataError(os.fspath(path), f"a DatasetDict of splits {splits}; name one split's folder instead")
    state_path = path / "state.json"
    if not state_path.is_file() and not (path / "dataset_info.json").is_file():
        raise DataError(os.fspath(path), "a folder, but not a datasets save_to_disk folder (no state.json)")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        dataset = datasets.load_from_disk(os.fspath(path))
        for batch in dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS):
            yield from batch.to_pylist()
        return
    # state.json lists the shards in order; without it, their names sort in order (data-00000-of-00002.arrow, ...).
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    names = [f["filename"] for f in state.get("_data_files", [])] or sorted(p.name for p in path.glob("*.arrow"))
    for name in names:
        with pa.memory_map(os.fspath(path / name)) as source:
            for batch in pa.ipc.open_stream(source):
                yield from batch.to_pylist()
