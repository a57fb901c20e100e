"""PPO's update room without a Trainer (#29): a rollout batch and a plain torch optimizer in, optimizer
steps out. Hand-built rollouts, so every figure the update starts from is known."""

import dataclasses

import pytest
import torch

from rlhf_lit.hf.models import TinyModel
from rlhf_lit.math import rl as ppo
from rlhf_lit.math.estimators import GAE, GRPO
from rlhf_lit.math.kl_control import AdaptiveKL, FixedKL
from rlhf_lit.math.ops import masked_mean
from rlhf_lit.rl.actor_critic import build_actor_critic
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.experience import Rollout, fill_from_forward
from rlhf_lit.rl.update import PPOUpdate, Ranks, ema_update

B, P, R = 4, 3, 5


def spec(seed=0):
    return TinyModel(family="opt", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_positions=64, seed=seed)


@pytest.fixture()
def ac(tok):
    torch.manual_seed(0)
    return build_actor_critic(spec(), tok, critic=spec(1))


def rollout(ac, scores=(1.0, -1.0, 0.5, 0.0), lengths=(5, 3, 5, 1)) -> Rollout:
    """Random prompts and responses; old log-probs and values from the actor-critic itself (on-policy)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 300, (B, P + R), generator=g)
    mask = torch.zeros(B, R)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    attention = torch.cat([torch.ones(B, P), mask], 1).long()
    with torch.no_grad():
        logprobs, entropy, values = ac(ids, attention, P)
    ref = logprobs - 0.1  # a reference 0.1 nats less likely on every token: KL k1 = 0.1 per token
    return Rollout(ids, attention, P, mask, logprobs, ref, values, torch.tensor(scores), entropy,
                   ["p"] * B, ["r"] * B, torch.ones(B, dtype=torch.bool))  # fmt: skip


def plain_step(model, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    calls = []

    def step(loss):
        opt.zero_grad()
        loss.backward()
        opt.step()
        calls.append(float(loss))
        return {"grad_steps": torch.tensor(len(calls))}

    return step, calls


def test_rewards_put_the_score_on_the_last_token_and_the_kl_penalty_on_every_one(ac):
    ro = rollout(ac)
    update = PPOUpdate(PPOConfig(score_clip=0.75), FixedKL(0.2), GAE(), max_new_tokens=R)
    rewards, stats, scores = update.rewards(ro)
    torch.testing.assert_close(scores, torch.tensor([0.75, -0.75, 0.5, 0.0]))  # clipped to ±0.75
    expected = -0.2 * 0.1 * ro.mask  # k1 = logp - ref = 0.1 on every response token
    for row, n in enumerate((5, 3, 5, 1)):
        expected[row, n - 1] += scores[row]
    torch.testing.assert_close(rewards, expected)
    torch.testing.assert_close(stats["kl"], torch.tensor((0.1 * ro.mask).sum(-1).mean().item()))
    # the KL in the loss instead: no penalty in the reward, the KL is still measured
    in_loss = PPOUpdate(PPOConfig(score_clip=0.75, kl_in_loss=True), FixedKL(0.2), GAE(), max_new_tokens=R)
    rewards, stats, _ = in_loss.rewards(ro)
    assert rewards.sum().item() == pytest.approx(scores.sum().item()) and stats["kl"] > 0


def test_gae_advantages_are_whitened_and_group_advantages_are_not(ac):
    ro = rollout(ac)
    gae = PPOUpdate(PPOConfig(), FixedKL(0.0), GAE(), max_new_tokens=R)
    rewards, _, scores = gae.rewards(ro)
    adv, ret = gae.advantages(rewards, ro.values, ro.mask, scores)
    valid = adv[ro.mask.bool()]  # whitened with masked_var, Bessel-corrected
    assert abs(valid.mean().item()) < 1e-5 and valid.std().item() == pytest.approx(1.0, abs=1e-4)
    raw, _ = ppo.gae(rewards, ro.values, ro.mask, 1.0, 0.95)
    torch.testing.assert_close(ret, (raw + ro.values) * ro.mask)  # returns from the unwhitened advantages

    group = PPOUpdate(PPOConfig(), FixedKL(0.0), GRPO(samples_per_prompt=2), max_new_tokens=R)
    rewards, _, scores = group.rewards(ro)
    adv, _ = group.advantages(rewards, None, ro.mask, scores)
    # rows (0, 1) and (2, 3) are groups: (s - mean) / (std + eps) per group, the same on every token
    expected = ppo.group_advantages(scores, 2)
    torch.testing.assert_close(adv[:, 0], expected)


def test_the_minibatch_loss_is_the_clipped_policy_loss_plus_the_value_loss(ac):
    ro = rollout(ac)
    algo = PPOConfig(vf_coef=0.5)
    update = PPOUpdate(algo, FixedKL(0.0), GAE(), max_new_tokens=R)
    rewards, _, scores = update.rewards(ro)
    adv, ret = update.advantages(rewards, ro.values, ro.mask, scores)
    idx = torch.tensor([0, 2])
    loss, stats = update.minibatch_loss(ac, ro, idx, adv, ret)
    logprobs, _, values = ac(ro.input_ids[idx], ro.attention_mask[idx], P)
    policy, _ = ppo.policy_loss(logprobs, ro.logprobs[idx], adv[idx], ro.mask[idx], 0.2)
    value, _ = ppo.value_loss(values, ro.values[idx], ret[idx], ro.mask[idx], 0.2)
    torch.testing.assert_close(loss, policy + 0.5 * value)
    assert stats["ratio_max"].item() == pytest.approx(1.0, abs=1e-5)  # on-policy: every ratio is 1
    assert {"policy_loss", "clipfrac", "value_loss", "approx_kl"} <= stats.keys()


def test_run_takes_epochs_times_minibatches_steps_changes_both_models_and_updates_the_kl(ac):
    ro = rollout(ac)
    kl = AdaptiveKL(init=0.05, target=0.01, horizon=10)  # observed KL 0.1 * tokens >> target: beta grows
    update = PPOUpdate(PPOConfig(ppo_epochs=2, num_minibatches=2), kl, GAE(), max_new_tokens=R)
    before = {k: v.detach().clone() for k, v in ac.named_parameters()}
    step, calls = plain_step(ac)
    result = update.run(ac, ro, step)
    assert len(calls) == 4 and len(result.per_step) == 4 and result.skipped == 0
    assert all(torch.isfinite(torch.tensor(calls)))
    changed = {k.split(".")[0] for k, v in ac.named_parameters() if not torch.equal(v, before[k])}
    assert changed == {"policy", "critic"}
    assert kl.value > 0.05 and {"kl", "non_score_reward", "rlhf_reward"} <= result.kl_stats.keys()
    assert result.per_step[-1]["grad_steps"] == 4  # the step's own stats join the minibatch's


def test_a_diverged_minibatch_is_skipped_on_every_rank_and_takes_no_step(ac):
    ro = rollout(ac)
    ro.logprobs = ro.logprobs - 5.0  # the current policy is e^5 times likelier than the "old" one
    asked = []
    ranks = Ranks(any=lambda flag: asked.append(bool(flag)) or True)  # another rank diverged: skip here too
    update = PPOUpdate(PPOConfig(max_ratio=20.0), FixedKL(0.0), GAE(), max_new_tokens=R, ranks=lambda: ranks)
    before = [p.detach().clone() for p in ac.parameters()]
    step, calls = plain_step(ac)
    result = update.run(ac, ro, step)
    assert result.skipped == 1 and calls == [] and asked == [True]
    assert all(torch.equal(a, b) for a, b in zip(before, ac.parameters()))


def test_ema_update_moves_the_copy_by_one_minus_beta():
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    old = [p.detach().clone() for p in a.parameters()]
    ema_update(a, b, beta=0.9)
    for e, o, p in zip(a.parameters(), old, b.parameters()):
        torch.testing.assert_close(e, 0.9 * o + 0.1 * p.detach())


def test_the_entropy_bonus_back_propagates_and_a_logged_entropy_carries_no_graph(ac):
    """entropy_coef 0 (the default): the entropy is logged only and computed without a graph (no softmax
    backward over the vocabulary, #30); with a bonus its gradient joins the loss's."""
    ro = rollout(ac)
    logged = ac(ro.input_ids, ro.attention_mask, P, 1.0, entropy_grad=False)
    graph = ac(ro.input_ids, ro.attention_mask, P)
    assert logged[0].requires_grad and not logged[1].requires_grad and graph[1].requires_grad
    torch.testing.assert_close(logged[1], graph[1].detach())
    for coef in (0.0, 0.5):  # the fused first forward follows the config too
        out = fill_from_forward(ac, dataclasses.replace(ro), 1.0, PPOConfig(entropy_coef=coef))
        assert out[1].requires_grad == (coef > 0)

    def policy_grads(loss):
        ac.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in ac.policy.named_parameters() if p.grad is not None}

    grads, idx = {}, torch.arange(B)
    for coef in (0.0, 0.5):
        update = PPOUpdate(PPOConfig(entropy_coef=coef), FixedKL(0.0), GAE(), max_new_tokens=R)
        rewards, _, scores = update.rewards(ro)
        adv, ret = update.advantages(rewards, ro.values, ro.mask, scores)
        grads[coef] = policy_grads(update.minibatch_loss(ac, ro, idx, adv, ret)[0])
    bonus = policy_grads(-0.5 * masked_mean(graph[1], ro.mask))
    assert any(g.abs().sum() > 0 for g in bonus.values())
    for k, g in bonus.items():
        torch.testing.assert_close(grads[0.5][k] - grads[0.0].get(k, 0), g, atol=1e-6, rtol=1e-4)
