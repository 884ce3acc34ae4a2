"""A small data folder of a user's own text, as the tests' fixture: real English with punctuation, capitals, digits,
accents, emoji, CJK, tabs, newlines and runs of spaces, in every file the data modules read.

:func:`write_unicode_data_dir` writes, deterministically (from the text below, nothing random, nothing downloaded):

- ``sft_train.jsonl``: 40 demonstrations; the last two have one ~4 KB response each (:data:`LONG_RESPONSES`): a run on
  this folder needs a ``max_response_len`` that fits them (or ``truncation: warn``);
- ``prefs_train.jsonl``: 40 pairs; ``prompts_train.jsonl``: 20 prompts;
- ``sft_val.jsonl``, ``prefs_val.jsonl``, ``prompts_val.jsonl``: 10 records each, on topics of their own, with a word
  (:data:`VAL_ONLY_WORD`) that no training file holds.

Every text but the long responses is under 300 bytes. With the default tokenizer of this folder (the byte-level BPE
its training files give, 1172 tokens) a prompt has at most 17 tokens, a short response 56 (57 with EOS), the long
ones about 1,100: ``max_prompt_len`` 17 and ``max_response_len`` 57 fit every file but sft_train.jsonl, 1106 that too.
"""

from __future__ import annotations

from pathlib import Path

from rlhf_lightning.data import write_jsonl

#: (question, helpful answer, unhelpful answer) per topic: the first 20 are the training topics, the rest validation's.
TOPICS: tuple[tuple[str, str, str], ...] = (
    ("How do I brew a good cup of coffee?",
     "Use 15 g of fresh beans per 250 ml of water at 93 °C; brew for 4 minutes. ☕ Enjoy!",
     "Coffee is coffee."),
    ("What's the capital of Japan?",
     "Tokyo (東京), home to ~14 million people; it became the capital in 1868.",
     "Somewhere in Asia, I think..."),
    ("Can you recommend a café in Paris?",
     "Try Café de Flore on Boulevard Saint-Germain — it opened in 1887 and serves a great crème brûlée.",
     "There are many cafés."),
    ("How many legs does a spider have?", "Eight: 4 pairs, attached to the cephalothorax. 🕷️", "Lots of legs!!"),
    ("Translate 'thank you' into Chinese.", "谢谢 (xièxie), or 感谢 (gǎnxiè) when it is more formal.", "No idea."),
    ("Why is the sky blue?",
     "Rayleigh scattering: air molecules scatter short (blue) wavelengths about 5.5× more than red ones.",
     "Because it is."),
    ("Give me a haiku about autumn.",
     "Crisp leaves drift and fall,\n\tgolden light on quiet paths —\nthe year exhales slow. 🍂",
     "Autumn. Leaves. The end."),
    ("What is 12% of 250?", "12% of 250 is 30, since 0.12 × 250 = 30.", "About 25?"),
    ("Who wrote 'Don Quixote'?",
     "Miguel de Cervantes Saavedra; Part I appeared in 1605 and Part II in 1615.",
     "Some Spanish guy."),
    ("How do I say 'hello' in Korean?", "안녕하세요 (annyeonghaseyo) is the polite form; 안녕 is casual. 👋", "Hello?"),
    ("Is a tomato a fruit?",
     "Botanically, yes: it's a berry that grows from the flower's ovary. In the kitchen it's a vegetable. 🍅",
     "No."),
    ("What does 'naïve' mean?",
     "Naïve means showing a lack of experience or judgment; the diaeresis on the ï is optional in English.",
     "It means nothing."),
    ("How far is the Moon?",
     "On average 384,400 km (238,855 miles) — about 1.28 light-seconds away. 🌕",
     "Far, far away."),
    ("Name three prime numbers.", "2, 3 and 5 — the first three primes; 2 is the only even one.", "1, 4, 9."),
    ("How should I store fresh basil?",
     "Trim the stems and keep them in a glass of water at room temperature, loosely covered: cold turns it black.",
     "In the freezer, obviously."),
    ("What's the boiling point of water in Fahrenheit?",
     "212 °F at sea level (100 °C); it drops by roughly 1 °F every 500 ft of altitude.",
     "Hot enough."),
    ("Write a short greeting for my résumé's cover letter.",
     "Dear Hiring Manager,\n\nI'm excited to apply for the role — my résumé is attached. 🙂",
     "Hey, hire me."),
    ("What is the largest planet?",
     "Jupiter: its mass is ~318 Earths, and the Great Red Spot is a storm wider than Earth. 🪐",
     "The Sun."),
    ("How do you pronounce 'Zürich'?",
     "Roughly “TSUE-rikh”: the ü is a rounded 'ee' sound, as in über.",
     "Zoo-rick, easy."),
    ("Any tips for learning Japanese kanji?",
     "Learn the radicals first (e.g. 木 tree, 水 water), review with spaced repetition, and write each one by hand.",
     "Just memorize them all."),
    # Validation topics.
    ("What is a quokkafish?",
     "A quokkafish is a made-up creature: half marsupial, half reef fish, entirely fictional. 🐟",
     "A fish."),
    ("How long should I boil an egg?", "9–12 minutes for hard-boiled; 6 minutes for a jammy yolk. 🥚", "Until done."),
    ("What's the square root of 144?", "12, because 12 × 12 = 144.", "Fourteen-ish."),
    ("Translate 'good night' into French.",
     "« Bonne nuit » — and « fais de beaux rêves » means 'sweet dreams'.",
     "Nuit."),
    ("Who painted the Mona Lisa?",
     "Leonardo da Vinci, between about 1503 and 1519; it hangs in the Louvre.",
     "Picasso."),
    ("What does 'façade' mean?", "The front of a building; figuratively, a misleading outward appearance.", "A door."),
    ("Give me a fun fact about octopuses.",
     "Octopuses have 3 hearts and blue, copper-based blood. 🐙",
     "They are wet."),
    ("How do I write 'mountain' in Chinese?", "山 (shān) — the character looks like three peaks. ⛰️", "Mountain."),
    ("Why do cats purr?",
     "Mostly contentment, but also to self-soothe: purring at 25–150 Hz may even help bones heal.",
     "Cats are loud."),
    ("What's 7 factorial?", "7! = 5,040 (7 × 6 × 5 × 4 × 3 × 2 × 1).", "49."),
)  # fmt: skip
TRAIN_TOPICS, VAL_TOPICS = TOPICS[:20], TOPICS[20:]
#: A word only the validation files hold.
VAL_ONLY_WORD = "quokkafish"
#: The two ~4 KB responses of sft_train.jsonl: every training answer, repeated until the text passes 4,000 bytes.
LONG_RESPONSES: tuple[str, ...] = tuple(
    "  ".join(
        f"({j + 1}) {TRAIN_TOPICS[(j + k) % 20][1]}" for j in range(60)
    ).encode()[:4096].decode(errors="ignore")
    for k in (0, 7)
)  # fmt: skip
LONG_PROMPT = "Tell me everything you know, in one long answer!"


def _prompt(topic: int, variant: int) -> str:
    """The question of ``TOPICS[topic]``, phrased one of two ways."""
    question = TOPICS[topic][0]
    return question if variant == 0 else f"Quick question #{topic + 1}:  {question}"


def write_unicode_data_dir(path: Path) -> None:
    """Writes the data folder described in the module doc into ``path`` (created if missing)."""
    path.mkdir(parents=True, exist_ok=True)
    for split, first, n, k in (("train", 0, 40, 20), ("val", 20, 10, 10)):
        # Record i is on topic first + i % k, phrased by its variant i // k (train: each topic twice).
        picks = [(first + i % k, i // k) for i in range(n)]
        sft = [{"prompt": _prompt(t, v), "response": TOPICS[t][1]} for t, v in picks]
        if split == "train":
            sft[-len(LONG_RESPONSES) :] = [{"prompt": LONG_PROMPT, "response": r} for r in LONG_RESPONSES]
        prefs = [{"prompt": _prompt(t, v), "chosen": TOPICS[t][1], "rejected": TOPICS[t][2]} for t, v in picks]
        prompts = [{"prompt": _prompt(first + i, 0)} for i in range(k)]
        write_jsonl(path / f"sft_{split}.jsonl", sft)
        write_jsonl(path / f"prefs_{split}.jsonl", prefs)
        write_jsonl(path / f"prompts_{split}.jsonl", prompts)
