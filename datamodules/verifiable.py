"""An embedded verifiable task: arithmetic questions with exact answers and a rule checker.

The set-up of RL with verifiable rewards (DeepSeekMath/GRPO, DAPO, Dr. GRPO): the reward is 1 when the
answer is right, 0 otherwise, checked by a rule against the row's reference ``answer`` column (which
reaches the checker through the prompt datamodule, as a user's own answers would). Demonstrations are
right except for ``demo_noise`` of them (a wrong answer), so supervised fine-tuning leaves a policy that
is right only part of the time: RL has something to improve that the checker can see. Seeded, offline,
pure Python.

    Human: What is 17 + 25?
    Assistant: 42
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from datamodules.sources import GENERATORS, HH_TEMPLATE

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
NUMBER = re.compile(r"-?\d+")


def make_problem(rng: random.Random, ops: str, max_operand: int) -> tuple[str, int]:
    op = rng.choice(ops)
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if op == "*":  # keep products as small as sums: one factor is a single digit
        b = rng.randint(0, 9)
    return f"What is {a} {op} {b}?", OPS[op](a, b)


def arithmetic(
    n: int = 4000, seed: int = 0, ops: str = "+-", max_operand: int = 30, demo_noise: float = 0.3, suffix: str = ""
) -> Iterator[dict]:
    """``n`` rows: an HH prompt, a demonstration (SFT) and the reference answer as the ``answer`` column.

    Args:
        ops: the operators drawn from, any of ``+-*``.
        max_operand: operands are drawn from 0..max_operand (the second factor of a product from 0..9).
        demo_noise: share of demonstrations whose answer is off by 1-3 (the SFT policy's imperfection).
        suffix: text after the question (e.g. " Answer with the number only." for a chat model).
    """
    if not ops or set(ops) - set(OPS):
        raise ValueError(f"ops must be made of {''.join(OPS)}, got {ops!r}")
    if not 0 <= demo_noise <= 1 or max_operand < 1:
        raise ValueError(f"need 0 <= demo_noise <= 1 and max_operand >= 1, got {demo_noise}, {max_operand}")
    rng = random.Random(seed)
    for _ in range(n):
        ask, answer = make_problem(rng, ops, max_operand)
        shown = answer + rng.choice([-3, -2, -1, 1, 2, 3]) if rng.random() < demo_noise else answer
        prompt = HH_TEMPLATE.format(prompt=ask + suffix)
        yield {"prompt": prompt, "response": f" {shown}", "columns": {"answer": str(answer)}}


def exact_match(prompt: str, response: str, answer) -> float:
    """1.0 when the response's last number is the reference answer, else 0.0 (the GSM8K convention: a
    chat model may restate the question, "7 + 5 = 12", and only its final number counts, so listing
    several numbers does not pay)."""
    found = NUMBER.findall(response)
    return float(bool(found) and found[-1] == str(answer).strip())


def parsed_answer(prompt: str, response: str) -> float:
    """The same check with the answer computed from the prompt instead of a column (for evaluating
    prompts that carry no answer)."""
    m = re.search(r"What is (-?\d+) ([-+*]) (-?\d+)\?", prompt)
    return exact_match(prompt, response, OPS[m.group(2)](int(m.group(1)), int(m.group(3)))) if m else 0.0


GENERATORS["arithmetic"] = arithmetic
