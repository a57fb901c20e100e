"""The embedded task: gold reward components, generator determinism, label noise."""

import pytest

from datamodules.synthetic import gold_reward, synthetic

P = "\n\nHuman: {}\n\nAssistant:"


@pytest.mark.parametrize(
    "ask, response, expected",
    [
        ("List 3 fruits.", " apple, pear, plum.", 3.0),
        ("List 3 fruits.", " apple, pear, plum", 2.5),  # no period
        ("List 3 fruits.", " apple, pear.", 1 + (1 - 1 / 3) + 0.5 + 0.5),  # one short
        ("List 2 fruits.", " apple, cat.", 0.5 * (1 + 1 + 0.5) + 0.5),  # one off-category
        ("List 2 fruits.", " apple, apple.", 1 + 1 + 0.25 + 0.5),  # repeat
        ("List 2 tools.", " Sure, 2 plus 3 is 5.", 0.0),  # off-task: right number of commas, nothing on topic
        ("Answer politely: what is 2 plus 3?", " Sure, 2 plus 3 is 5.", 3.0),
        ("Answer politely: what is 2 plus 3?", " 2 plus 3 is 5.", 2.25),
        ("Answer politely: what is 2 plus 3?", " Sure, 2 plus 3 is 6.", 1.5),
        ("Reply in capitals: hello.", " HELLO!", 3.0),
        ("Reply in capitals: hello.", " hello!", 1.5),
        ("Reply in capitals: hello.", " STOP!", 1.5),
        ("Something else", " anything", 0.0),
    ],
)
def test_gold_reward_components(ask, response, expected):
    assert gold_reward(P.format(ask), response) == pytest.approx(expected)


def test_rambling_is_penalised_and_empty_scores_zero():
    p = P.format("Reply in capitals: hello.")
    assert gold_reward(p, " HELLO! " + "UM " * 14) == pytest.approx(3.0 - 0.25 * 3)
    assert gold_reward(p, " HELLO! um") < 3.0  # lowercase letters lower the capitals share
    assert gold_reward(p, "") == 0.0


def test_generator_is_deterministic_and_pairs_have_a_gold_order():
    a, b = list(synthetic(n=300, seed=5)), list(synthetic(n=300, seed=5))
    assert a == b and a != list(synthetic(n=300, seed=6))
    agree = [gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"]) for r in a]
    assert all(gold_reward(r["prompt"], r["chosen"]) != gold_reward(r["prompt"], r["rejected"]) for r in a)
    assert 0.8 < sum(agree) / len(agree) < 0.97  # 10% label noise by default
    clean = list(synthetic(n=300, seed=5, label_noise=0.0))
    assert all(gold_reward(r["prompt"], r["chosen"]) > gold_reward(r["prompt"], r["rejected"]) for r in clean)
