"""The tokenizer wrapper: local word-level and byte-level BPE training, loading (ours and Hugging Face directories),
ids preserved."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from rlhf_lightning.data import Tokenizer

CORPUS = [
    "the kettle is great .",
    "the lamp is not great .",
    "a very quiet kettle .",
    "the kettle boils fast .",
]
EXTRA = ["toaster", "superb"]


@pytest.fixture
def word() -> Tokenizer:
    return Tokenizer.train_word_level(CORPUS, extra_words=EXTRA)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style byte-level BPE trained here on a few sentences and saved as a Hugging Face tokenizer directory.
    Its post-processor appends EOS and its tokenizer.json enables truncation, as real ones may: both must be ignored.
    """
    from transformers import PreTrainedTokenizerFast

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([*CORPUS, "Héllo wörld, the café is great!"], trainer=trainer)
    backend.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))]
    )
    backend.enable_truncation(max_length=4)
    path = tmp_path_factory.mktemp("hf_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def test_word_level_ids_and_round_trip(word: Tokenizer) -> None:
    assert (word.pad_id, word.eos_id, word.backend.token_to_id("<unk>")) == (0, 1, 2)
    assert word.vocab_size == 3 + len({w for t in CORPUS for w in t.split()} | set(EXTRA))

    text = "the superb toaster is not quiet ."
    ids = word.encode(text)
    assert len(ids) == 7 and 2 not in ids  # every word known, "." its own token, no EOS added
    assert word.decode(ids) == text
    assert word.encode("the kettle.") == word.encode("the kettle .")

    # Unknown words decode visibly; EOS and pad are dropped unless asked for.
    assert word.decode([*word.encode("the gizmo"), word.eos_id, word.pad_id]) == "the <unk>"
    assert word.decode([word.encode("the")[0], word.eos_id], skip_special_tokens=False) == "the <eos>"


def test_batch_matches_single(word: Tokenizer) -> None:
    texts = ["the lamp .", "a very very quiet kettle", "great"]
    ids = word.encode_batch(texts)
    assert ids == [word.encode(t) for t in texts]
    assert word.decode_batch(ids) == texts


def test_training_is_deterministic(word: Tokenizer) -> None:
    # Ids follow the words' code points, never their counts or a hash map's order...
    vocab = word.backend.get_vocab()
    assert sorted(vocab, key=vocab.get) == [
        "<pad>", "<eos>", "<unk>", ".", "a", "boils", "fast", "great", "is", "kettle", "lamp", "not", "quiet",
        "superb", "the", "toaster", "very",
    ]  # fmt: skip
    # ...so the file is byte-identical for the same words, whatever their order, counts or source.
    shuffled = [*CORPUS[::-1], *CORPUS[:2], "toaster"]
    again = Tokenizer.train_word_level(shuffled, extra_words=["superb", "the kettle", "."])
    assert again.to_json_str() == word.to_json_str()


def test_save_load_and_json_str_preserve_ids(word: Tokenizer, tmp_path: Path) -> None:
    word.save(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == ["rlhf_tokenizer.json", "tokenizer.json"]
    text = "the superb lamp boils ."
    for loaded in (
        Tokenizer.load(tmp_path / "tok"),
        Tokenizer.load(tmp_path / "tok" / "tokenizer.json"),
        Tokenizer.from_json_str(word.to_json_str(), word.eos_token, word.pad_token),
    ):
        assert loaded.encode(text) == word.encode(text)
        assert (loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (word.eos_id, word.pad_id, word.vocab_size)
        assert loaded.fingerprint() == word.fingerprint()
        assert loaded.to_json_str() == word.to_json_str()


def test_fingerprint(word: Tokenizer) -> None:
    assert len(word.fingerprint()) == 16
    assert Tokenizer.train_word_level(CORPUS).fingerprint() != word.fingerprint()  # no extra words
    assert Tokenizer.train_word_level(CORPUS[::-1], EXTRA).fingerprint() == word.fingerprint()  # same words
    same_vocab_other_pad = Tokenizer(tokenizers.Tokenizer.from_str(word.to_json_str()), "<eos>", "<eos>")
    assert same_vocab_other_pad.fingerprint() != word.fingerprint()


def test_hugging_face_directory(hf_dir: Path) -> None:
    tok = Tokenizer.load(hf_dir)
    eos = tok.backend.token_to_id("<|endoftext|>")
    assert tok.eos_id == eos and tok.pad_id == eos  # GPT-2 style: no pad token, so pad = EOS
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.vocab_size == tok.backend.get_vocab_size(with_added_tokens=True)

    text = "the kettle is great, Héllo wörld! 😀"
    ids = tok.encode(text)
    assert len(ids) > 4  # the file's truncation is off
    assert eos not in ids  # the file's post-processor's EOS is not added
    assert tok.decode(ids) == text  # byte-level: exact, emoji (never seen in training) included
    assert tok.decode([*ids, eos, eos]) == text
    assert tok.decode_batch([ids, ids[:1]]) == [text, "the"]

    reloaded = Tokenizer.from_json_str(tok.to_json_str(), tok.eos_token)
    assert reloaded.encode(text) == ids and reloaded.fingerprint() == tok.fingerprint()
    assert tok.fingerprint() != Tokenizer.train_word_level(CORPUS).fingerprint()


def test_hugging_face_pad_token(hf_dir: Path, tmp_path: Path) -> None:
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer.json").write_text((hf_dir / "tokenizer.json").read_text())
    # The older form, an AddedToken dict, in special_tokens_map.json: pad and EOS are read from either file.
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": None}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "Ġthe"}}))
    tok = Tokenizer.load(tmp_path)
    assert tok.pad_token == "Ġthe" and tok.pad_id != tok.eos_id
    assert Tokenizer.load(tmp_path, pad_token="<|endoftext|>").pad_id == tok.eos_id  # arguments win


def test_load_errors(word: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tokenizer at {tmp_path / 'missing'}:")):
        Tokenizer.load(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no tokenizer at {tmp_path}:")):
        Tokenizer.load(tmp_path)  # a directory without tokenizer.json

    bare = tmp_path / "bare.json"
    bare.write_text(word.to_json_str())
    with pytest.raises(ValueError, match=re.escape(f"{bare}: cannot determine the EOS token") + ".* pass eos_token="):
        Tokenizer.load(bare)
    assert Tokenizer.load(bare, eos_token="<eos>").pad_id == word.eos_id
    with pytest.raises(ValueError, match=re.escape(f"{bare}: eos_token '</s>' is not in the tokenizer's vocabulary")):
        Tokenizer.load(bare, eos_token="</s>")

    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.load(bare)

    broken = tmp_path / "broken" / "tokenizer.json"
    broken.parent.mkdir()
    broken.write_text('{"model": 1}')
    with pytest.raises(ValueError, match=re.escape(f"{broken} is not a valid tokenizer.json")):
        Tokenizer.load(broken.parent)


# -- byte-level BPE --------------------------------------------------------------------------------------------------
#: Text a user's data may hold: every kind of character and spacing the byte-level BPE must give back exactly.
UNICODE = [
    "Hello, World! How's it going?",
    "  two leading spaces, two trailing  ",
    "tabs\tand\t\ttabs; newlines\nand\r\nCRLF\n\n",
    "Digits: 3.14159, 2024-06-01, $19.99 (42%).",
    "Accents: café, naïve, résumé, Zürich, São Paulo, Ångström, façade.",
    "Emoji: 😀 👍🏽 🚀 ☕ and a family 👨‍👩‍👧 (ZWJ).",
    "CJK: 日本語のテキスト, 中文文本, 한국어 텍스트.",
    "Punctuation runs!!! ... — « » “quotes” ‘single’ ¿qué? (a) [b] {c} <d> @#&*",
    "ALL CAPS and MiXeD cAsE",
]
#: Never in any training text: letters, scripts and symbols the tokenizer sees first at encoding time.
UNSEEN = ["ẞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ไทย Ελληνικά עברית", "\x00\x07\u200b\ufeff", "e\u0301 combining", "🦀🧬", " ", "\n"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_byte_bpe(UNICODE * 3, vocab_size=400)


def test_byte_bpe_round_trip_is_exact_and_never_unknown(bpe: Tokenizer) -> None:
    vocab = bpe.backend.get_vocab()
    assert (bpe.pad_id, bpe.eos_id) == (0, 1) and bpe.unk_id is None and "<unk>" not in vocab
    assert len(vocab) > 258  # the 256 bytes, the 2 specials and learnt merges
    for text in UNICODE + UNSEEN:
        ids = bpe.encode(text)
        assert bpe.decode(ids) == text, text
        assert all(0 <= i < bpe.vocab_size for i in ids) and bpe.eos_id not in ids and bpe.pad_id not in ids
    assert bpe.decode_batch(bpe.encode_batch(UNICODE + UNSEEN)) == UNICODE + UNSEEN
    assert len(bpe.encode(UNICODE[0])) < len(UNICODE[0].encode())  # learnt merges: fewer tokens than bytes


def test_byte_bpe_vocabulary_size_and_merges_of_pairs_seen_twice() -> None:
    assert Tokenizer.train_byte_bpe(UNICODE * 3, vocab_size=300).vocab_size == 300
    assert Tokenizer.train_byte_bpe(["xyzzy"], vocab_size=400).vocab_size == 258  # each pair seen once: no merge
    twice = Tokenizer.train_byte_bpe(["xyzzy xyzzy"], vocab_size=400)
    assert twice.vocab_size > 258 and len(twice.encode("xyzzy")) == 1


def test_byte_bpe_is_byte_identical_across_processes(bpe: Tokenizer) -> None:
    # The Rust trainer's hash maps are seeded per process, Python's by PYTHONHASHSEED: neither may show in the file.
    code = (
        "import hashlib, json, sys; from rlhf_lightning.data import Tokenizer; "
        "t = Tokenizer.train_byte_bpe(json.loads(sys.argv[1]), 400); "
        "print(hashlib.sha256(t.to_json_str().encode()).hexdigest())"
    )
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": os.pathsep.join(sys.path)}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(UNICODE * 3)], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        digests.add(out.stdout.strip())
    assert digests == {hashlib.sha256(bpe.to_json_str().encode()).hexdigest()}


def test_unk_id_of_each_model() -> None:
    assert Tokenizer.train_word_level(CORPUS).unk_id == 2
    assert Tokenizer.train_byte_bpe(CORPUS, 300).unk_id is None
    unigram = tokenizers.Tokenizer(models.Unigram([("<eos>", 0.0), ("<unk>", 0.0), ("a", -1.0)], unk_id=1))
    assert Tokenizer(unigram, "<eos>").unk_id == 1
