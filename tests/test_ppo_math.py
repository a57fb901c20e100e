"""The pure PPO math against hand-computed values and naive loops."""

import pytest
import torch

from rlhf_lit.math import rl as ppo
from rlhf_lit.math.estimators import GAE, GRPO, RLOO
from rlhf_lit.math.kl_control import AdaptiveKL, FixedKL
from rlhf_lit.math.ops import last_attended_index, logprobs_from_logits, masked_mean, masked_var, masked_whiten


def naive_gae(rewards, values, mask, gamma, lam):
    b, t = rewards.shape
    adv = torch.zeros(b, t)
    for i in range(b):
        n = int(mask[i].sum())  # response tokens are a prefix of the row
        last = 0.0
        for s in reversed(range(n)):
            next_v = values[i, s + 1].item() if s + 1 < n else 0.0
            delta = rewards[i, s].item() + gamma * next_v - values[i, s].item()
            last = delta + gamma * lam * last
            adv[i, s] = last
    return adv, (adv + values) * mask


def random_masked(b=5, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0 if seed == 2 else 1, t + 1, (b,), generator=g)  # seed 2 may mask a row whole
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    return torch.randn(b, t, generator=g), torch.randn(b, t, generator=g), mask


def test_gae_hand_computed():
    adv, ret = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.8]]))  # A_0 = sum(r) - V_0, A_1 = r_1 - V_1
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0]]))
    # gamma=0.9, lam=0.5: delta_1 = 1 - 0.2 = 0.8; delta_0 = 0 + 0.9*0.2 - 0.5 = -0.32; A_0 = -0.32 + 0.45*0.8
    adv, _ = ppo.gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]]), torch.ones(1, 2), 0.9, 0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.04, 0.8]]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_naive_loop_on_masked_batches(seed, gamma, lam):
    rewards, values, mask = random_masked(seed=seed)
    adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = naive_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    assert (adv[mask == 0] == 0).all()


def test_policy_loss_has_zero_gradient_where_clipped_unfavourably():
    old = torch.zeros(1, 4)
    # ratios e^0.5 > 1.2 with A > 0 and e^-0.5 < 0.8 with A < 0: clipped, flat. The others are not.
    new = torch.tensor([[0.5, -0.5, 0.5, -0.5]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, stats = ppo.policy_loss(new, old, adv, torch.ones(1, 4), clip_eps=0.2)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0
    assert new.grad[0, 2] != 0 and new.grad[0, 3] != 0
    assert stats["clipfrac"] == 0.5


def test_policy_loss_value_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, stats = ppo.policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), adv, mask)
    assert loss.item() == pytest.approx(-1.5)
    assert stats["ratio_mean"] == 1.0 and stats["approx_kl"] == 0.0


def test_value_loss_clipping_hand_computed():
    values, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    loss, stats = ppo.value_loss(values, old, ret, torch.ones(1, 2), clip=0.2)
    # token 0: max((1-0)^2, (0.2-0)^2) = 1; token 1: max((0-1)^2, (0-1)^2) = 1 -> 0.5 * mean = 0.5
    assert loss.item() == pytest.approx(0.5)
    loss, _ = ppo.value_loss(torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.8**2)  # the clipped value 0.2 is further from the return


def test_kl_estimators():
    lp, ref = torch.randn(64, 9), torch.randn(64, 9)
    assert (ppo.kl_penalty(lp, ref, "k3") >= 0).all()
    torch.testing.assert_close(ppo.kl_penalty(lp, ref, "k1"), lp - ref)
    torch.testing.assert_close(ppo.kl_penalty(lp, ref, "k2"), 0.5 * (lp - ref) ** 2)
    assert ppo.kl_penalty(lp, lp, "k3").abs().max() == 0
    with pytest.raises(ValueError, match="unknown KL estimator"):
        ppo.kl_penalty(lp, ref, "k9")


def test_shaped_rewards_put_score_on_last_response_token():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp, ref = torch.tensor([[0.5, 0.5, 9.0], [0.0, 0.0, 0.0]]), torch.zeros(2, 3)
    rewards, stats = ppo.shaped_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.95, 0.0], [0.0, 0.0, -1.0]]))
    assert stats["kl"].item() == pytest.approx(0.5)  # (0.5 + 0.5 + 0) / 2 sequences


def test_masked_whitening_equals_whitening_of_valid_slice():
    x, _, mask = random_masked(b=6, t=9, seed=3)
    out = masked_whiten(x, mask)
    valid = x[mask.bool()]
    ref = (valid - valid.mean()) / torch.sqrt(valid.var() + 1e-8)
    torch.testing.assert_close(out[mask.bool()], ref)
    assert (out[~mask.bool()] == 0).all()
    torch.testing.assert_close(masked_var(x, mask), valid.var())
    # the one-pass form used across data-parallel ranks (sum_fn) gives the same numbers
    torch.testing.assert_close(masked_whiten(x, mask, sum_fn=lambda t: t), out)
    # and summing the moments of two shards equals whitening the whole batch
    halves = [
        masked_whiten(
            x[:3],
            mask[:3],
            sum_fn=lambda t: (
                t + torch.stack([(x[3:] * mask[3:]).sum(), (x[3:] ** 2 * mask[3:]).sum(), mask[3:].sum()]).double()
            ),
        )
    ]
    torch.testing.assert_close(halves[0], out[:3])
    torch.testing.assert_close(masked_mean(x, mask), valid.mean())


def test_logprobs_from_logits_matches_naive():
    logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    naive = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    torch.testing.assert_close(logprobs_from_logits(logits, labels), naive)


def test_last_attended_index_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_attended_index(right).tolist() == [2, 0, 3]
    assert last_attended_index(left).tolist() == [3, 3, 3]
    both = torch.tensor([[0, 1, 1, 0]])  # left-padded prompt + right-padded response
    assert last_attended_index(both).tolist() == [2]


def test_adaptive_kl_moves_beta_towards_target():
    kl = AdaptiveKL(init=0.1, target=6.0, horizon=1000)
    kl.update(current_kl=12.0, n_steps=100)  # too much KL: beta rises (error clipped at +0.2)
    assert kl.value == pytest.approx(0.1 * (1 + 0.2 * 0.1))
    before = kl.value
    kl.update(current_kl=3.0, n_steps=100)  # too little: beta falls
    assert kl.value < before
    fixed = FixedKL(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    restored = AdaptiveKL(init=1.0)
    restored.load_state_dict(kl.state_dict())
    assert restored.value == kl.value


def test_group_advantages_hand_computed():
    scores = torch.tensor([1.0, 3.0, 0.0, 0.0, 2.0, 4.0])
    rloo = ppo.group_advantages(scores, 2, "rloo")
    torch.testing.assert_close(rloo, torch.tensor([-2.0, 2.0, 0.0, 0.0, -2.0, 2.0]))
    grpo = ppo.group_advantages(scores, 3, "grpo")
    g = scores.view(2, 3)
    torch.testing.assert_close(grpo, ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-6)).reshape(-1))
    with pytest.raises(ValueError, match="multiple of group_size"):
        ppo.group_advantages(scores, 4)


def test_estimators_interface():
    rewards, values, mask = random_masked(b=4, t=5, seed=1)
    adv, ret = GAE(1.0, 0.95)(rewards, values, mask)
    assert adv.shape == (4, 5)
    for est in (GRPO(samples_per_prompt=2), RLOO(samples_per_prompt=2)):
        assert not est.needs_critic
        adv, _ = est(rewards, None, mask)
        per_seq = adv.sum(-1) / mask.sum(-1)
        torch.testing.assert_close(adv, per_seq[:, None] * mask)  # one advantage per sequence
    with pytest.raises(ValueError):
        GRPO(samples_per_prompt=1)


def test_clip_grad_norms_clips_each_group_to_its_own_norm():
    from rlhf_lit.training.optim import clip_grad_norms

    a, b = torch.zeros(2, requires_grad=True), torch.zeros(1, requires_grad=True)
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([100.0])  # norms 5 and 100
    norms = clip_grad_norms({"actor": ([a], 1.0), "critic": ([b], 10.0)})
    assert norms["actor_grad_norm"].item() == pytest.approx(5.0) and norms["critic_grad_norm"].item() == pytest.approx(
        100.0
    )
    assert a.grad.tolist() == pytest.approx([0.6, 0.8], rel=1e-5)  # 5 -> 1, direction kept
    assert b.grad.tolist() == pytest.approx([10.0], rel=1e-5)  # one joint norm (100.1) would have left a at 0.05x
    a.grad = torch.tensor([3.0, 4.0]) * 8  # fp16 loss scale 8: true norm 5, clipped to 1 (x8 while scaled)
    assert clip_grad_norms({"actor": ([a], 1.0)}, scale=8.0)["actor_grad_norm"].item() == pytest.approx(5.0)
    assert (a.grad / 8).norm().item() == pytest.approx(1.0, rel=1e-5)
    c = torch.zeros(1, requires_grad=True)
    c.grad = torch.tensor([7.0])
    assert clip_grad_norms({"x": ([c], None)})["x_grad_norm"].item() == 7.0 and c.grad.item() == 7.0  # None: no clip


# -- the GRPO-era variants (issue #15) ------------------------------------------------------------
def naive_aggregate(x, mask, mode, norm=None):
    rows = []
    total, count = 0.0, 0.0
    for i in range(x.size(0)):
        n = int(mask[i].sum())
        s = sum(x[i, t].item() for t in range(n))
        total, count = total + s, count + n
        if n:  # a row masked out whole is not a sequence of the loss
            rows.append(s / n if mode == "seq_mean_token_mean" else s / (norm or 1))
    if mode == "token_mean":
        return total / count
    return sum(rows) / len(rows)


def test_loss_aggregations_hand_computed():
    x, mask = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert ppo.aggregate(x, mask, "token_mean").item() == pytest.approx(10 / 4)  # every token the same weight
    assert ppo.aggregate(x, mask, "seq_mean_token_mean").item() == pytest.approx((2 + 4) / 2)  # every sequence
    assert ppo.aggregate(x, mask, "seq_mean_token_sum_norm", norm=4).item() == pytest.approx((6 / 4 + 4 / 4) / 2)
    # a row masked out whole (overlong filter) leaves the sequence means, not a zero in them (audit #27)
    x3, mask3 = torch.cat([x, x[:1]]), torch.cat([mask, torch.zeros(1, 3)])
    for mode in ppo.LOSS_AGGREGATIONS:
        assert ppo.aggregate(x3, mask3, mode, norm=4).item() == pytest.approx(
            ppo.aggregate(x, mask, mode, norm=4).item()
        )
    with pytest.raises(ValueError, match="norm"):
        ppo.aggregate(x, mask, "seq_mean_token_sum_norm")
    with pytest.raises(ValueError, match="loss aggregation"):
        ppo.aggregate(x, mask, "sum")


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("mode", ppo.LOSS_AGGREGATIONS)
def test_loss_aggregations_match_a_naive_loop(seed, mode):
    x, _, mask = random_masked(seed=seed)
    assert ppo.aggregate(x, mask, mode, norm=7).item() == pytest.approx(naive_aggregate(x, mask, mode, 7), rel=1e-5)


def test_clip_higher_lets_a_favoured_ratio_grow_past_the_lower_bound():
    old, adv, mask = torch.zeros(1, 2), torch.tensor([[1.0, -1.0]]), torch.ones(1, 2)
    # token 0: ratio e^0.24 = 1.271 with A > 0: clipped by the symmetric 0.2, inside DAPO's 1 + 0.28.
    # Token 1: ratio e^-0.25 = 0.779 with A < 0 is below 1 - 0.2 either way (clip_eps_high leaves it).
    new = torch.tensor([[0.24, -0.25]], requires_grad=True)
    ppo.policy_loss(new, old, adv, mask, clip_eps=0.2)[0].backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0
    new.grad = None
    loss, stats = ppo.policy_loss(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    loss.backward()
    assert new.grad[0, 0] == pytest.approx(-torch.exp(torch.tensor(0.24)).item() / 2) and new.grad[0, 1] == 0
    assert loss.item() == pytest.approx((-torch.exp(torch.tensor(0.24)).item() + 0.8) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_kl_loss_is_k3_on_the_current_logprobs_with_gradient():
    lp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    loss, stats = ppo.kl_loss(lp, ref, torch.ones(1, 2), "k3")
    # k3 = q/p - 1 - log(q/p): 0.5 - 1 + log 2 = 0.1931 on token 0, 0 on token 1 (p = q); token mean
    assert loss.item() == pytest.approx((0.5 - 1 + 0.693147) / 2, rel=1e-5) and stats["kl_loss"] == loss.detach()
    loss.backward()
    # d/d(log p) of (e^(log q - log p) - 1 + log p - log q) = 1 - q/p = 0.5 on token 0, 0 on token 1
    torch.testing.assert_close(lp.grad, torch.tensor([[0.25, 0.0]]))


def test_dr_grpo_baseline_is_the_group_mean_without_the_std():
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0, 0.0])
    torch.testing.assert_close(ppo.group_advantages(scores, 2, "mean"), torch.tensor([0.5, -0.5, 0, 0, 1.5, -1.5]))
    from rlhf_lit.math.estimators import DrGRPO

    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv, ret = DrGRPO(samples_per_prompt=2)(torch.tensor([[0.0, 2.0], [1.0, 0.0]]), None, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5], [-0.5, 0.0]]))  # broadcast over each response


def test_varied_groups_marks_groups_whose_scores_differ():
    keep = ppo.varied_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5001]), 2)
    assert keep.tolist() == [True, True, False, False, False, False, True, True]


def test_discounted_returns_hand_computed_and_against_a_loop():
    torch.testing.assert_close(
        ppo.discounted_returns(torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), 0.5), torch.tensor([[0.25, 0.5, 1.0]])
    )
    rewards, _, mask = random_masked(seed=3)
    out = ppo.discounted_returns(rewards, mask, 0.9)
    for i in range(rewards.size(0)):
        n = int(mask[i].sum())
        for t in range(n):
            expected = sum(0.9 ** (s - t) * rewards[i, s].item() for s in range(t, n))
            assert out[i, t].item() == pytest.approx(expected, abs=1e-5)
    assert (out[mask == 0] == 0).all()


def test_reinforce_pp_returns_and_group_baseline():
    from rlhf_lit.math.estimators import REINFORCEPP

    # per-token KL penalty -0.1 on every token, the score 1 on the last: returns count what follows
    rewards, mask = torch.tensor([[-0.1, -0.1, 0.9], [-0.1, 0.0, 0.0]]), torch.tensor([[1.0, 1, 1], [1, 0, 0]])
    adv, ret = REINFORCEPP()(rewards, None, mask)
    torch.testing.assert_close(adv, torch.tensor([[0.7, 0.8, 0.9], [-0.1, 0.0, 0.0]]))
    assert REINFORCEPP.needs_critic is False and REINFORCEPP.token_whitening is True  # batch-normalised later
    # with a group baseline: the group's mean score (1 + 0) / 2 = 0.5, not the mean of score plus KL
    # penalties (0.7 - 0.1) / 2 = 0.3 (OpenRLHF's reinforce_baseline; audit #27), is taken off the last token
    scores = torch.tensor([1.0, 0.0])
    adv, _ = REINFORCEPP(samples_per_prompt=2, group_baseline=True)(rewards, None, mask, scores=scores)
    torch.testing.assert_close(adv, torch.tensor([[0.2, 0.3, 0.4], [-0.6, 0.0, 0.0]]))
    naive = rewards.clone()  # the same by a loop: each row's last token loses its group's mean score
    for i in range(2):
        naive[i, int(mask[i].sum()) - 1] -= scores.mean()
        for t in range(3):
            assert adv[i, t].item() == pytest.approx(float((naive[i, t:] * mask[i, t:]).sum()) * float(mask[i, t]))
    with pytest.raises(ValueError, match="needs the sequence scores"):
        REINFORCEPP(samples_per_prompt=2, group_baseline=True)(rewards, None, mask)


def test_overlong_penalty_hand_computed():
    lengths = torch.tensor([5, 6, 8, 10, 12])
    torch.testing.assert_close(ppo.overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.5, -1.0, -1.0]))
    torch.testing.assert_close(ppo.overlong_penalty(lengths, 10, 4, factor=2.0)[2], torch.tensor(-1.0))
    with pytest.raises(ValueError, match="buffer"):
        ppo.overlong_penalty(lengths, 10, 11)


def test_tis_weights_hand_computed_and_against_a_loop():
    """Truncated importance sampling (Yao et al. 2025): min(pi_trainer / pi_engine, cap) per token, 1 at pad."""
    lp = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    engine = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    w, stats = ppo.tis_weights(lp, engine, mask, cap=1.5)
    torch.testing.assert_close(w, torch.tensor([[1.5, 0.5, 1.0]]))  # 2.0 capped at 1.5; 0.5; pad
    torch.testing.assert_close(stats["tis_weight_mean"], torch.tensor(1.0))
    torch.testing.assert_close(stats["tis_clipped_frac"], torch.tensor(0.5))
    a, b, m = random_masked(seed=4)
    w, _ = ppo.tis_weights(a, b, m, cap=2.0)
    for i in range(m.size(0)):
        for j in range(m.size(1)):
            want = min(float(torch.exp(a[i, j] - b[i, j])), 2.0) if m[i, j] else 1.0
            assert abs(w[i, j].item() - want) < 1e-5


def test_tis_weights_scale_each_tokens_policy_term_without_gradient():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, mask = torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    weights = torch.tensor([[2.0, 0.5]], requires_grad=True)
    loss, _ = ppo.policy_loss(lp, lp.detach(), adv, mask, weights=weights)
    torch.testing.assert_close(loss, torch.tensor(-1.25))  # mean of -A * ratio * w at ratio 1: -(2 + 0.5) / 2
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -0.25]]))  # d/dlp of -w * exp(lp - old) / 2
    assert weights.grad is None  # weights are constants


def test_logprob_mismatch_mean_and_max_over_response_tokens():
    stats = ppo.logprob_mismatch(
        torch.tensor([[-1.0, -2.0, -3.0]]), torch.tensor([[-1.5, -2.0, -9.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    )
    torch.testing.assert_close(stats["logprob_diff_mean"], torch.tensor(0.25))  # pad (diff 6) left out
    torch.testing.assert_close(stats["logprob_diff_max"], torch.tensor(0.5))


def test_kl_in_loss_gradients_by_exact_expectation_over_a_categorical():
    """On-policy, the expected gradient of each estimator used as a loss, summed exactly over a categorical
    distribution's outcomes: k1 gives 0, k2 the gradient of KL(pi||ref), k3 that of KL(ref||pi) (#27)."""
    g = torch.Generator().manual_seed(0)
    theta, ref = torch.randn(6, generator=g), torch.log_softmax(torch.randn(6, generator=g), -1)

    def expected_grad(estimator):
        t = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(t, -1)
        weights = logp.exp().detach()  # samples drawn from the current policy: no gradient through them
        loss = (weights * ppo.kl_penalty(logp[None], ref[None], estimator)[0]).sum()
        return torch.autograd.grad(loss, t)[0]

    def kl_grad(forward: bool):
        t = theta.clone().requires_grad_(True)
        logp = torch.log_softmax(t, -1)
        kl = (logp.exp() * (logp - ref)).sum() if forward else (ref.exp() * (ref - logp)).sum()
        return torch.autograd.grad(kl, t)[0]

    torch.testing.assert_close(expected_grad("k1"), torch.zeros(6), atol=1e-6, rtol=0)
    torch.testing.assert_close(expected_grad("k2"), kl_grad(forward=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected_grad("k3"), kl_grad(forward=False), atol=1e-5, rtol=1e-5)
    from rlhf_lit.rl.config import PPOConfig

    assert PPOConfig(kl_in_loss=True).kl_estimator == "k3" and PPOConfig().kl_estimator == "k1"
    with pytest.raises(ValueError, match="kl_in_loss with kl_estimator k1 regularises nothing"):
        PPOConfig(kl_in_loss=True, kl_estimator="k1")
