"""Rule-based rewards used by the tests through CallableReward's import path."""

TARGET = " apple"


def apple_share(prompt: str, response: str) -> float:
    """Share of the response's words that are 'apple' (a reward a policy can learn fast)."""
    words = response.replace(",", " ").replace(".", " ").split()
    return sum(w == "apple" for w in words) / max(1, len(words))


def word_count(prompt: str, response: str) -> float:
    """Words in the response / 10: varies between samples even for a random policy."""
    return len(response.split()) / 10


def caps_share(prompt: str, response: str) -> float:
    """Share of the response's letters that are capitals: dense enough for a random policy to climb."""
    letters = [c for c in response if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


SEEN: list[tuple[str, str]] = []  # (prompt, answer) pairs the checker below received


def answer_seen(prompt: str, response: str, answer: str) -> float:
    """Records the reference answer each prompt arrived with (a test reads SEEN); scores length."""
    SEEN.append((prompt, answer))
    return len(response.split()) / 10


def constant(prompt: str, response: str) -> float:
    """The same score for every response: every group of samples is uninformative."""
    return 1.0
