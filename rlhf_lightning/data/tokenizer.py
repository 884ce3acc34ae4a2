"""The tokenizer every phase shares: a thin wrapper around a Rust ``tokenizers.Tokenizer`` that knows its EOS and pad.

Three sources, nothing ever downloaded:

- :meth:`Tokenizer.train_word_level`: one id per word, for the embedded world, whose text is words of a known
  grammar (~80 words: short sequences, and the gold judge and every calibrated default are tuned to
  them). It has an ``<unk>`` for any other word, so it does not suit other text.
- :meth:`Tokenizer.train_byte_bpe`: a byte-level BPE, the default for a user's own text. Every byte has a token,
  so nothing is unknown and decoding gives the text back exactly.
- any local ``tokenizer.json`` / Hugging Face tokenizer directory (:meth:`Tokenizer.load`).

Encoding never adds special tokens (no BOS/EOS post-processing, no truncation, no padding, whatever the loaded
``tokenizer.json`` says): where EOS goes and how sequences are cut is the data layer's policy
(:mod:`rlhf_lightning.data.collate`), not the tokenizer file's. Special tokens that appear literally in a text are
still recognised, as in ``transformers``, so prompts may carry a chat template's markers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rlhf_lightning.io import atomic_open

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
TOKENIZER_FILE = "tokenizer.json"
#: Written by :meth:`Tokenizer.save` beside tokenizer.json: the EOS and pad token names.
SPECIALS_FILE = "rlhf_tokenizer.json"
# Where load() looks for the special tokens, first match wins: ours, then the two files transformers writes.
_SPECIALS_SOURCES = (SPECIALS_FILE, "tokenizer_config.json", "special_tokens_map.json")


class Tokenizer:
    """A ``tokenizers.Tokenizer`` with a known EOS token and pad token.

    Args:
        backend: the Rust tokenizer; its truncation and padding are switched off.
        eos_token: the token that ends a response.
        pad_token: the padding token; None: the EOS token (as for GPT-2, which has no pad token). Padded positions
            are always masked, so sharing the id is harmless.

    Attributes:
        backend: the wrapped ``tokenizers.Tokenizer``.
        eos_token, pad_token: the special tokens' strings.

    Raises:
        ValueError: a special token is not in the vocabulary.
    """

    def __init__(self, backend: tokenizers.Tokenizer, eos_token: str, pad_token: str | None = None):
        pad_token = pad_token or eos_token
        for name, token in (("eos_token", eos_token), ("pad_token", pad_token)):
            if backend.token_to_id(token) is None:
                raise ValueError(f"{name} {token!r} is not in the tokenizer's vocabulary")
        backend.no_truncation()
        backend.no_padding()
        self.backend = backend
        self.eos_token, self.pad_token = eos_token, pad_token
        self._eos_id, self._pad_id = backend.token_to_id(eos_token), backend.token_to_id(pad_token)
        self._vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        self._unk_id = _unk_id(backend)

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def train_word_level(cls, texts: Iterable[str], extra_words: Iterable[str] = ()) -> Tokenizer:
        """A word-level tokenizer of the words in ``texts`` and ``extra_words``.

        Words are split as the ``Whitespace`` pre-tokenizer does: runs of word characters, and runs of punctuation
        such as "." apart from them. Ids: ``<pad>`` 0, ``<eos>`` 1, ``<unk>`` 2, then every word in code-point
        order. The ids thus depend on the set of words only, not on their counts or order: the same input gives a
        byte-identical tokenizer.json, and two corpora of the same grammar (``extra_words`` = its whole vocabulary)
        give the same tokenizer and fingerprint. ``<unk>`` is an ordinary entry rather than a special token, so
        decoding shows it instead of silently dropping it. Decoding joins tokens with single spaces: decode(encode(t))
        == t for text of known words whose tokens are separated by single spaces.

        Args:
            texts: the corpus.
            extra_words: words to include even when the corpus lacks them (e.g. the whole vocabulary of a grammar).
        """
        split = pre_tokenizers.Whitespace()
        # The Rust trainer only collects the words (in parallel, without a Python object per word); the ids are
        # assigned here, because the trainer orders words by count and breaks ties in a hash map's order.
        collector = tokenizers.Tokenizer(models.WordLevel(unk_token=UNK))
        collector.pre_tokenizer = split
        trainer = trainers.WordLevelTrainer(vocab_size=sys.maxsize, min_frequency=0, show_progress=False)
        collector.train_from_iterator(itertools.chain(texts, extra_words), trainer)
        words = sorted(collector.get_vocab())
        vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *words])}
        backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        backend.pre_tokenizer = split
        backend.add_special_tokens([PAD, EOS])
        return cls(backend, EOS, PAD)

    @classmethod
    def train_byte_bpe(cls, texts: Iterable[str], vocab_size: int) -> Tokenizer:
        """A byte-level BPE (as GPT-2's) of at most ``vocab_size`` tokens, learnt from ``texts``.

        Text is split into GPT-2's pre-tokens (words with their leading space, digit runs, punctuation runs, whitespace
        runs) and each pre-token's UTF-8 bytes are merged by the learnt merges. All 256 bytes are in the vocabulary
        whether the texts use them or not, so any text encodes without ``<unk>`` (there is none) and, as no
        normaliser or prefix space is added, decode(encode(t)) == t exactly: whitespace runs, capitals, accents,
        emoji, CJK, tabs and newlines included. The one exception is the literal text of a special token
        (``<pad>``, ``<eos>``), which is recognised as that token (see the module doc) and dropped by decoding.

        Ids: ``<pad>`` 0, ``<eos>`` 1, the 256 bytes in code-point order of their printable stand-ins, then one per
        merge in the order learnt. A merge is learnt only from a pair seen at least twice: on small data, merges of
        pairs seen once would spend the vocabulary on memorising single long words. Training is deterministic (the
        Rust trainer breaks ties between equally frequent pairs by their ids, never by a hash map's order), so the
        same texts in the same order give a byte-identical tokenizer.json in every process, and every rank of a run
        can train its own.

        Args:
            texts: the corpus.
            vocab_size: the most tokens, specials and the 256 bytes included; fewer when the texts run out of
                pairs seen twice.
        """
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=[PAD, EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer)
        return cls(backend, EOS, PAD)

    @classmethod
    def load(cls, path: str | os.PathLike, eos_token: str | None = None, pad_token: str | None = None) -> Tokenizer:
        """Loads a local ``tokenizer.json`` file or a directory holding one (a Hugging Face tokenizer directory, or
        one written by :meth:`save`).

        The EOS and pad tokens are, in order of precedence: the arguments, then the ``eos_token`` / ``pad_token``
        entries of ``rlhf_tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` in the same
        folder. No pad token anywhere: pad = EOS.

        Raises:
            FileNotFoundError: neither ``path`` nor ``path/tokenizer.json`` is a file.
            ValueError: a file is not a valid tokenizer / JSON, or the EOS token cannot be determined or is not in
                the vocabulary.
        """
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(
                f"no tokenizer at {path}: expected a {TOKENIZER_FILE} file or a directory containing one"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(os.fspath(file))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            raise ValueError(f"{file} is not a valid {TOKENIZER_FILE}: {err}") from err
        for source in _SPECIALS_SOURCES:
            specials = _read_specials(file.parent / source)
            eos_token = eos_token or specials.get("eos_token")
            pad_token = pad_token or specials.get("pad_token")
        if eos_token is None:
            sources = ", ".join(_SPECIALS_SOURCES)
            raise ValueError(f"{path}: cannot determine the EOS token (no eos_token in {sources}); pass eos_token=")
        try:
            return cls(backend, eos_token, pad_token)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    @classmethod
    def from_json_str(cls, s: str, eos_token: str, pad_token: str | None = None) -> Tokenizer:
        """The inverse of :meth:`to_json_str` (e.g. a tokenizer embedded in a checkpoint)."""
        return cls(tokenizers.Tokenizer.from_str(s), eos_token, pad_token)

    def to_json_str(self) -> str:
        """The tokenizer.json contents (compact)."""
        return self.backend.to_str()

    def save(self, directory: str | os.PathLike) -> None:
        """Writes ``tokenizer.json`` and ``rlhf_tokenizer.json`` (the special tokens) into ``directory``, each
        atomically; :meth:`load` reads the directory back."""
        directory = Path(directory)
        with atomic_open(directory / TOKENIZER_FILE) as f:
            f.write(self.to_json_str())
        with atomic_open(directory / SPECIALS_FILE) as f:
            json.dump({"eos_token": self.eos_token, "pad_token": self.pad_token}, f, ensure_ascii=False)

    # -- properties --------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """One more than the largest token id: the rows an embedding needs."""
        return self._vocab_size

    @property
    def unk_id(self) -> int | None:
        """The id of the unknown token (what a word outside the vocabulary becomes); None when the tokenizer has none
        (a byte-level BPE)."""
        return self._unk_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def fingerprint(self) -> str:
        """16 hex digits identifying the vocabulary (every token and its id) and the EOS and pad tokens: equal
        fingerprints mean token ids mean the same thing, so a model trained with one tokenizer can run with the
        other."""
        vocab = sorted(self.backend.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
        payload = json.dumps({"vocab": vocab, "eos": self.eos_token, "pad": self.pad_token})
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    # -- encoding and decoding ---------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``, without special tokens added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """:meth:`encode` of each text, in parallel in Rust."""
        return [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; special tokens (EOS, pad) left out unless ``skip_special_tokens`` is False."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, ids: Sequence[Sequence[int]], skip_special_tokens: bool = True) -> list[str]:
        """:meth:`decode` of each sequence, in parallel in Rust."""
        return self.backend.decode_batch([list(x) for x in ids], skip_special_tokens=skip_special_tokens)


def _unk_id(backend: tokenizers.Tokenizer) -> int | None:
    """The unknown token's id, as the tokenizer.json's model names it: ``unk_token`` (word-level, BPE, WordPiece) or
    ``unk_id`` (Unigram); None for a model without one."""
    model = json.loads(backend.to_str())["model"]
    if model.get("unk_id") is not None:
        return model["unk_id"]
    return backend.token_to_id(model["unk_token"]) if model.get("unk_token") else None


def _read_specials(file: Path) -> dict[str, str]:
    """The ``eos_token`` / ``pad_token`` named in a JSON file (each a string, or transformers' ``{"content": ...}``
    form); {} when the file does not exist."""
    if not file.is_file():
        return {}
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}")
    specials = {}
    for key in ("eos_token", "pad_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str) and value:
            specials[key] = value
    return specials


def tokenizer_meta(tokenizer: Tokenizer) -> dict[str, str | None]:
    """The tokenizer as checkpoint entries (its JSON and special tokens)."""
    return {"tokenizer": tokenizer.to_json_str(), "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token}


def tokenizer_from_meta(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer of a checkpoint's entries (:func:`tokenizer_meta`)."""
    return Tokenizer.from_json_str(meta["tokenizer"], meta["eos_token"], meta["pad_token"])


def check_same_tokenizer(tokenizer: Tokenizer, other: Tokenizer, message: str) -> None:
    """Raises ValueError(message) unless the two tokenizers are the same by :meth:`Tokenizer.fingerprint`: a model
    and the text it reads or writes must number the tokens alike."""
    if tokenizer.fingerprint() != other.fingerprint():
        raise ValueError(message)
