"""A word-level tokenizer of an exact number of ids, for the benchmarks that match a peer's vocabulary (TRL's 300).

The package's own path (:meth:`Tokenizer.train_word_level`) builds it: the given words, then unused filler words
``w0``, ``w1``, ... (skipping any already present) until the tokenizer has exactly ``vocab`` ids. Each filler is one
word, so any text of the given words tokenises as before (one id per word, no ``<unk>``), and a sampled filler id
decodes to a word that encodes back to that id.
"""

from __future__ import annotations

from collections.abc import Iterable

from rlhf_lightning.data.tokenizer import Tokenizer


def padded_word_tokenizer(vocab: int, words: Iterable[str] = ()) -> tuple[Tokenizer, list[str]]:
    """The word-level tokenizer of ``words`` padded with filler words to exactly ``vocab`` ids, and the fillers.

    With no ``words``, the fillers are ``w0`` ... ``w{vocab - 4}`` (3 ids are ``<pad>``, ``<eos>``, ``<unk>``).

    Raises:
        ValueError: ``words`` alone already need more than ``vocab`` ids.
    """
    words = list(words)
    base = Tokenizer.train_word_level([], extra_words=words)
    if vocab < base.vocab_size:
        raise ValueError(f"vocabulary {vocab} is below the {base.vocab_size} ids the words need")
    taken = base.backend.get_vocab(with_added_tokens=True)
    fillers: list[str] = []
    i = 0
    while len(fillers) < vocab - base.vocab_size:
        if f"w{i}" not in taken:
            fillers.append(f"w{i}")
        i += 1
    tokenizer = Tokenizer.train_word_level([], extra_words=[*words, *fillers])
    if tokenizer.vocab_size != vocab:
        raise RuntimeError(f"the word-level tokenizer has {tokenizer.vocab_size} ids, asked for {vocab}")
    return tokenizer, fillers
