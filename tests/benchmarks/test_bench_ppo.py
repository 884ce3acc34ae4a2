"""The PPO throughput benchmark (benchmarks/bench_ppo.py) runs end to end at a tiny shape with the peer's vocabulary
of 300 ids and says so; the padded world tokenizer (benchmarks/word_vocab.py) tokenises the world's text as the world
tokenizer does. No figure is asserted beyond being positive: timings belong in benchmarks, never in tests."""

from __future__ import annotations

import re

from rlhf_lightning.data.tokenizer import Tokenizer
from rlhf_lightning.world.grammar import WORDS


def test_bench_ppo_tiny_runs_at_vocabulary_300(capsys, load_bench):
    bench = load_bench("bench_ppo")
    # --threads 0 leaves torch's thread count to the test process; a tiny model keeps it to seconds. Of 2 iterations
    # the last also evaluates and is not timed: 1 timed after no warm-up.
    bench.main(["--layers", "1", "--heads", "2", "--width", "32", "--vocab", "300", "--prompts", "4",
                "--response-tokens", "6", "--epochs", "1", "--minibatches", "1", "--iterations", "2", "--warmup", "0",
                "--threads", "0"])  # fmt: skip
    out = capsys.readouterr().out
    assert re.search(r"^vocabulary (\d+) token ids", out, re.M).group(1) == "300"
    assert float(re.search(r"^iteration \d+ ms -> ([\d.]+) samples/s", out, re.M).group(1)) > 0


def test_padded_world_tokenizer_tokenises_the_world_alike(load_bench):
    word_vocab = load_bench("word_vocab")
    world = Tokenizer.train_word_level([], extra_words=WORDS)  # what the data module trains on the world
    padded, fillers = word_vocab.padded_word_tokenizer(300, WORDS)
    assert world.vocab_size == 81 and padded.vocab_size == 300 and len(fillers) == 300 - 81
    text = " ".join(WORDS)
    ids = padded.encode(text)
    assert len(ids) == len(world.encode(text)) == len(WORDS) and padded.unk_id not in ids
    assert padded.decode(ids) == world.decode(world.encode(text))
    assert (padded.eos_id, padded.pad_id) == (world.eos_id, world.pad_id)
    # Every id decodes to a word that encodes back to it: a random policy's filler tokens are valid text.
    words = padded.decode(list(range(3, 300))).split()
    assert padded.encode(" ".join(words)) == list(range(3, 300))
