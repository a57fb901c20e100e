import math

import pytest
import torch

from rlhf_lit.math import losses
from rlhf_lit.math.ops import logprobs_from_logits


def test_sft_loss_reads_mask_on_target_side():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 10.0  # position 0 predicts token 2 almost surely
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 0]])
    loss, stats = losses.sft_loss(logprobs_from_logits(logits[:, :-1], ids[:, 1:]), mask)
    expected = -torch.log_softmax(logits[0, 0], -1)[2]
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)  # fp32 cancellation in 10 - logsumexp
    assert stats["tokens"] == 1


def test_pairwise_loss_hand_computed():
    loss, stats = losses.pairwise_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
    expected = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["accuracy"] == 0.5 and stats["margin"] == 0.0
    with_margin, _ = losses.pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), margin=torch.tensor([1.0]))
    assert with_margin.item() == pytest.approx(math.log(2), rel=1e-5)
    centered, _ = losses.pairwise_loss(torch.tensor([2.0]), torch.tensor([1.0]), center_coef=0.1)
    assert centered.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1))) + 0.9, rel=1e-5)


def test_divergent_suffix_loss_matches_naive_loop():
    g = torch.Generator().manual_seed(0)
    c_ids = torch.tensor([[5, 6, 7, 8, 0], [5, 6, 9, 0, 0]])
    r_ids = torch.tensor([[5, 6, 1, 0, 0], [5, 6, 9, 4, 4]])
    c_mask, r_mask = (c_ids != 0).long(), (r_ids != 0).long()
    cv, rv = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    loss, _ = losses.divergent_suffix_loss(cv, rv, c_ids, r_ids, c_mask, r_mask, cv[:, 0], rv[:, 0])
    per_pair = []
    for i in range(2):
        start = next(t for t in range(5) if c_ids[i, t] != r_ids[i, t] or c_mask[i, t] != r_mask[i, t])
        end = max(int(c_mask[i].sum()), int(r_mask[i].sum()))
        per_pair.append(-torch.nn.functional.logsigmoid(cv[i, start:end] - rv[i, start:end]).mean())
    assert loss.item() == pytest.approx(torch.stack(per_pair).mean().item(), rel=1e-5)
