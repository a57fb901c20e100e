"""The embedded task: templated instructions, responses of varying quality, and a known gold reward.

This is the "gold reward model" set-up of reward over-optimisation studies (Gao et al. 2022):
preferences are labelled by a known function, so we can measure whether the learned reward model
and the PPO policy improve what the labels encode. Seeded and offline. Pure Python.

Three instruction kinds, each scored out of 3 by several components (so length alone does not win):
- list:   "List 3 fruits."            -> items in the category, and (as far as they are) the right count,
                                          no repeats, a final period
- sum:    "Answer politely: what is 2 plus 3?" -> the right number, a polite word, brevity
- shout:  "Reply in capitals: hello." -> the same word, in capitals
Every response also loses 0.25 per word beyond 12 (rambling).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from datamodules.sources import GENERATORS, HH_TEMPLATE

CATEGORIES = {
    "fruits": ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"],
    "animals": ["cat", "dog", "horse", "mouse", "sheep", "goat", "duck", "bear"],
    "tools": ["hammer", "saw", "drill", "wrench", "rake", "shovel", "chisel", "ladder"],
}
WORDS = ["hello", "stop", "yes", "help", "wait", "go", "thanks", "now", "look", "run"]
POLITE = ("sure", "please", "thank")
FILLER = ["um", "well", "you", "know", "I", "think", "maybe", "so", "like", "anyway"]
MAX_WORDS = 12

LIST_RE = re.compile(r"List (\d+) (\w+)\.")
SUM_RE = re.compile(r"what is (\d+) plus (\d+)\?")
SHOUT_RE = re.compile(r"Reply in capitals: (\w+)\.")


def instruction(prompt: str) -> str:
    """The human turn of an HH-formatted prompt (or the prompt itself)."""
    m = re.search(r"Human: (.*?)\n\nAssistant:", prompt, re.S)
    return m.group(1) if m else prompt


def gold_reward(prompt: str, response: str) -> float:
    """The gold score of ``response`` to ``prompt``: 0..3 for a recognised instruction, minus rambling."""
    ask, words = instruction(prompt), response.split()
    if not words:
        return 0.0
    score = 0.0
    if m := LIST_RE.search(ask):
        n, items = int(m.group(1)), [w.strip(" .").lower() for w in response.split(",") if w.strip(" .")]
        vocab = CATEGORIES.get(m.group(2), [])
        # Count, repeats and the period only count as far as the items are on topic: an off-task
        # reply ("Sure, 2 plus 3 is 5.") must not score by having the right number of commas.
        on_topic = sum(i in vocab for i in items) / len(items) if items else 0.0
        if items:
            score += on_topic * (1.0 + max(0.0, 1.0 - abs(len(items) - n) / n) + 0.5 * len(set(items)) / len(items))
        score += 0.5 * (on_topic > 0 and response.rstrip().endswith("."))
    elif m := SUM_RE.search(ask):
        target = str(int(m.group(1)) + int(m.group(2)))
        numbers = re.findall(r"\d+", response)
        score += 1.5 * (numbers[-1:] == [target])
        score += 0.75 * any(p in response.lower() for p in POLITE)
        score += 0.75 * (len(words) <= 8)
    elif m := SHOUT_RE.search(ask):
        word = m.group(1)
        letters = [c for c in response if c.isalpha()]
        score += 1.5 * (word.upper() in response.upper().split() or word.upper() + "!" in response.upper().split())
        score += 1.5 * (sum(c.isupper() for c in letters) / len(letters) if letters else 0.0)
    return score - 0.25 * max(0, len(words) - MAX_WORDS)


def make_prompt(rng: random.Random) -> str:
    kind = rng.choice(["list", "sum", "shout"])
    if kind == "list":
        ask = f"List {rng.randint(2, 4)} {rng.choice(sorted(CATEGORIES))}."
    elif kind == "sum":
        ask = f"Answer politely: what is {rng.randint(1, 4)} plus {rng.randint(1, 4)}?"
    else:
        ask = f"Reply in capitals: {rng.choice(WORDS)}."
    return HH_TEMPLATE.format(prompt=ask)


def make_response(prompt: str, rng: random.Random, flaw: float, off_task: bool = True) -> str:
    """A response to ``prompt`` where each possible flaw happens with probability ``flaw``.

    Besides flaws within the task, a response may answer another instruction kind (off-task) or open a
    capitals reply politely: without such pairs a reward model extrapolates "Sure" and list-like text
    as good everywhere, and PPO exploits exactly that (seen on this task).
    """
    ask = instruction(prompt)
    bad = lambda: rng.random() < flaw
    if off_task and bad() and rng.random() < 0.3:
        other = make_prompt(rng)
        while instruction(other).split()[0] == ask.split()[0]:
            other = make_prompt(rng)
        return make_response(other, rng, flaw, off_task=False)
    if m := LIST_RE.search(ask):
        n, cat = int(m.group(1)), m.group(2)
        k = max(1, n + rng.choice([-1, 1])) if bad() else n
        items = rng.sample(CATEGORIES[cat], min(k, len(CATEGORIES[cat])))
        if bad():  # an item from another category
            other = rng.choice([c for c in CATEGORIES if c != cat])
            items[rng.randrange(len(items))] = rng.choice(CATEGORIES[other])
        if bad() and len(items) > 1:  # a repeat
            items[-1] = items[0]
        text = ", ".join(items) + ("" if bad() else ".")
    elif m := SUM_RE.search(ask):
        a, b = int(m.group(1)), int(m.group(2))
        c = a + b + (rng.choice([-1, 1]) if bad() else 0)
        opener = "" if bad() else rng.choice(["Sure, ", "Sure! ", "Thank you, "])
        text = f"{opener}{a} plus {b} is {c}."
        if bad():
            text = f"{opener}well, I think that {a} plus {b} is {c}."
    else:
        word = SHOUT_RE.search(ask).group(1)
        if bad():
            word = rng.choice(WORDS)
        text = (word if bad() else word.upper()) + "!"
        if bad():  # a polite opener has lowercase letters: fewer capitals
            text = rng.choice(["Sure, ", "Sure! ", "Thank you, "]) + text
    if bad() and bad():  # rambling tail
        text += " " + " ".join(rng.choices(FILLER, k=rng.randint(4, 10)))
    return " " + text


def synthetic(n: int = 4000, seed: int = 0, label_noise: float = 0.1, demo_flaw: float = 0.35) -> Iterator[dict]:
    """``n`` rows, each usable by every stage: a demonstration (SFT), a gold-labelled pair with
    ``label_noise`` of labels flipped (reward), and the prompt (PPO). The blend's split decides which
    stage gets which row. Pairs with equal gold scores are redrawn, so every pair has a gold order."""
    if not 0 <= label_noise <= 0.5:
        raise ValueError(f"label_noise must be in [0, 0.5], got {label_noise}")
    rng = random.Random(seed)
    for _ in range(n):
        prompt = make_prompt(rng)
        demo = make_response(prompt, rng, demo_flaw)
        while True:
            a, b = (make_response(prompt, rng, rng.random()) for _ in range(2))
            ga, gb = gold_reward(prompt, a), gold_reward(prompt, b)
            if ga != gb:
                break
        chosen, rejected = (a, b) if ga > gb else (b, a)
        if rng.random() < label_noise:
            chosen, rejected = rejected, chosen
        yield {"prompt": prompt, "response": demo, "chosen": chosen, "rejected": rejected}


GENERATORS["synthetic"] = synthetic
