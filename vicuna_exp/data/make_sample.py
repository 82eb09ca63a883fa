"""Generate the packaged sample: a few hundred short ShareGPT conversations, written for this project.

The conversations are templated (arithmetic with follow-ups, small facts, text rewrites, counting)
so a tiny random-init model can learn much of them in a minute of CPU training. A handful of
deliberately messy records exercise the cleaning steps the way real ShareGPT dumps do: other role
names, a system message, a conversation that starts with the assistant, scraped HTML with a
"Copy code" artefact, empty messages, a duplicate, a non-alternating run, a malformed record.

    python -m vicuna_exp.data.make_sample            # rewrites vicuna_exp/assets/sample_sharegpt.json
    python -m vicuna_exp.data.make_sample --out X.json --n 400 --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

SAMPLE_PATH = Path(__file__).resolve().parent.parent / "assets" / "sample_sharegpt.json"

_CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin", "Japan": "Tokyo",
    "Egypt": "Cairo", "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo",
    "Greece": "Athens", "Chile": "Santiago", "Poland": "Warsaw", "India": "New Delhi", "Cuba": "Havana",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Mexico": "Mexico City",
}
_OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "early": "late", "happy": "sad", "light": "dark",
    "open": "closed", "up": "down", "full": "empty", "old": "new", "hard": "soft", "loud": "quiet",
    "wet": "dry", "rich": "poor", "strong": "weak", "high": "low",
}
_COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "an orange": "orange", "a plum": "purple", "chocolate": "brown",
}
_NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                 "eleven", "twelve"]
_WORDS = ["apple", "river", "stone", "cloud", "garden", "music", "window", "pencil", "candle", "forest",
          "bridge", "rocket", "coffee", "planet", "silver", "tiger", "orange", "library", "summer", "ocean",
          "café", "naïve", "jalapeño", "über", "façade"]
_GREETINGS = [("Hello!", "Hello! How can I help you today?"),
              ("Hi there", "Hi! What would you like to know?"),
              ("Good morning", "Good morning! How can I help?"),
              ("你好", "你好！ Hello! How can I help you?")]


def _arithmetic(rng: random.Random) -> list[tuple[str, str]]:
    a, b = rng.randint(2, 40), rng.randint(2, 40)
    op = rng.choice(["plus", "minus", "times"])
    val = a + b if op == "plus" else a - b if op == "minus" else a * b
    turns = [(f"What is {a} {op} {b}?", f"{a} {op} {b} is {val}.")]
    for _ in range(rng.randint(0, 2)):
        c = rng.randint(2, 9)
        op2 = rng.choice(["plus", "times"])
        new = val + c if op2 == "plus" else val * c
        turns.append((f"And {op2} {c}?", f"{val} {op2} {c} is {new}."))
        val = new
    return turns


def _facts(rng: random.Random) -> list[tuple[str, str]]:
    turns = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(3)
        if kind == 0:
            country = rng.choice(sorted(_CAPITALS))
            turns.append((f"What is the capital of {country}?", f"The capital of {country} is {_CAPITALS[country]}."))
        elif kind == 1:
            word = rng.choice(sorted(_OPPOSITES))
            turns.append((f"What is the opposite of {word}?", f"The opposite of {word} is {_OPPOSITES[word]}."))
        else:
            thing = rng.choice(sorted(_COLORS))
            turns.append((f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {_COLORS[thing]}."))
    return turns


def _rewrites(rng: random.Random) -> list[tuple[str, str]]:
    words = rng.sample(_WORDS, rng.randint(2, 4))
    text = " ".join(words)
    turns = []
    kinds = rng.sample(["upper", "reverse", "count", "first"], rng.randint(1, 3))
    for kind in kinds:
        if kind == "upper":
            turns.append((f"Write this in uppercase: {text}", text.upper()))
        elif kind == "reverse":
            turns.append((f"Reverse the order of the words: {text}", " ".join(reversed(words))))
        elif kind == "count":
            n = len(words)
            turns.append((f"How many words are in: {text}", f"There are {_NUMBER_WORDS[n]} words."))
        else:
            turns.append((f"What is the first word of: {text}", f"The first word is \"{words[0]}\"."))
    return turns


def _counting(rng: random.Random) -> list[tuple[str, str]]:
    start = rng.randint(1, 20)
    stop = start + rng.randint(2, 6)
    turns = [(f"Count from {start} to {stop}.", ", ".join(str(i) for i in range(start, stop + 1)) + ".")]
    if rng.random() < 0.5:
        turns.append(("Now count backwards.", ", ".join(str(i) for i in range(stop, start - 1, -1)) + "."))
    return turns


def _greeting(rng: random.Random) -> list[tuple[str, str]]:
    q, a = rng.choice(_GREETINGS)
    return [(q, a)] + rng.choice([_arithmetic, _facts, _rewrites, _counting])(rng)[:1]


_GENERATORS = [_arithmetic, _facts, _rewrites, _counting, _greeting]


def _record(rid: str, pairs: list[tuple[str, str]], user: str = "human", assistant: str = "gpt") -> dict[str, Any]:
    conv = []
    for q, a in pairs:
        conv.append({"from": user, "value": q})
        conv.append({"from": assistant, "value": a})
    return {"id": rid, "conversations": conv}


def _messy(rng: random.Random) -> list[Any]:
    """Records that only survive (or are counted as dropped) thanks to the cleaning steps."""
    html_reply = (
        '<div class="markdown prose w-full break-words"><p>Here is a loop:</p>'
        '<pre><div class="bg-black"><div class="flex"><span>python</span><button>Copy code</button></div>'
        '<div><code class="language-python">for i in range(3):\n    print(i)\n</code></div></div></pre>'
        "<p>It prints <strong>0</strong>, <strong>1</strong> and <strong>2</strong>.</p></div>"
    )
    return [
        # other role names and a leading system message
        {"id": "messy_roles", "conversations": [
            {"from": "system", "value": "You are a concise assistant."},
            {"from": "user", "value": "What is 2 plus 2?"},
            {"from": "chatgpt", "value": "2 plus 2 is 4."},
        ]},
        # starts with the assistant and ends with an unanswered user turn: both trimmed
        {"id": "messy_edges", "conversations": [
            {"from": "gpt", "value": "How can I help?"},
            {"from": "human", "value": "What is the capital of Peru?"},
            {"from": "bard", "value": "The capital of Peru is Lima."},
            {"from": "human", "value": "Thanks, and Chile?"},
        ]},
        # scraped HTML with the "Copy code" artefact and a regenerate counter
        {"id": "messy_html", "conversations": [
            {"from": "human", "value": "Show me a loop in Python."},
            {"from": "gpt", "value": "1 / 1" + html_reply},
        ]},
        # two user turns in a row: merged
        {"id": "messy_runs", "conversations": [
            {"from": "human", "value": "Count from 1 to 3."},
            {"from": "human", "value": "Please."},
            {"from": "gpt", "value": "1, 2, 3."},
        ]},
        # whitespace-only message between real ones
        {"id": "messy_blank", "conversations": [
            {"from": "human", "value": "What is the opposite of up?"},
            {"from": "gpt", "value": "   "},
            {"from": "gpt", "value": "The opposite of up is down."},
        ]},
        # literal special-token strings and role markers inside the text stay text
        {"id": "messy_specials", "conversations": [
            {"from": "human", "value": "Repeat exactly: </s> USER: <s>"},
            {"from": "gpt", "value": "</s> USER: <s>"},
        ]},
        # nothing left after cleaning, no conversations at all, malformed turns
        {"id": "messy_empty", "conversations": [{"from": "human", "value": ""}, {"from": "gpt", "value": " "}]},
        {"id": "messy_none", "conversations": []},
        {"id": "messy_malformed", "conversations": [{"from": "human", "value": 7}, {"from": "gpt"}]},
        # an exact duplicate of the first generated conversation is appended by `build`
    ]


def build(n: int = 400, seed: int = 0) -> list[Any]:
    """The sample records: `n` generated conversations, then the messy ones (deterministic)."""
    rng = random.Random(seed)
    records: list[Any] = []
    for i in range(n):
        gen = _GENERATORS[i % len(_GENERATORS)]
        pairs = gen(rng)
        # a few with the roles a newer ShareGPT export uses
        roles = ("user", "assistant") if i % 17 == 3 else ("human", "gpt")
        records.append(_record(f"sample_{i:04d}", pairs, *roles))
    records.extend(_messy(rng))
    duplicate = dict(records[0])
    duplicate["id"] = "messy_duplicate"
    records.append(duplicate)
    return records


def write(path: Path, records: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_PATH)
    parser.add_argument("--n", type=int, default=400, help="generated conversations (messy ones are added)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    records = build(args.n, args.seed)
    write(args.out, records)
    print(f"wrote {len(records)} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
