"""Stage 3 on CPU with tiny models: wiring, frozen parts, EMA, estimators, and a learning test."""

import pytest
import torch
from helpers import changed, datamodule, snapshot, trainer, unchanged

from datamodules import PromptDataModule
from modules import PPOModule
from rlhf_lit.hf.models import TinyModel
from rlhf_lit.math.estimators import GRPO, REINFORCEPP, RLOO, DrGRPO
from rlhf_lit.math.kl_control import AdaptiveKL
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.generation import GenerationConfig
from rlhf_lit.rl.rewards import CallableReward, ModelReward, SumReward
from rlhf_lit.training.callbacks import HFExport

LOGGED = [
    "objective/scores",
    "objective/rlhf_reward",
    "objective/kl",
    "objective/entropy",
    "objective/non_score_reward",
    "ppo/policy_loss",
    "ppo/value_loss",
    "ppo/approx_kl",
    "ppo/clipfrac",
    "ppo/ratio_mean",
    "ppo/ratio_var",
    "ppo/value_clipfrac",
    "rollout/response_len_mean",
    "rollout/eos_fraction",
    "time/generate_s",
    "time/score_s",
    "time/train_s",
    "time/tokens_per_s",
]


def spec(seed=0):
    return TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128, seed=seed)


@pytest.fixture(scope="module")
def reward_export(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path_factory.mktemp("rm") / "export"
    spec(seed=7).build_scalar(tok).save_pretrained(path, meta={"score_mean": 0.1, "score_std": 2.0})
    tok.save_pretrained(path)
    return str(path)


def ppo_module(reward, **kw):
    kw.setdefault("critic", spec(seed=1))
    return PPOModule(
        actor=spec(),
        reward=reward,
        optimizer=lambda p: torch.optim.AdamW(p, lr=3e-3),
        generation=GenerationConfig(max_new_tokens=8),
        **kw,
    )


def build(module, dm):
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    return module


def test_ppo_wiring_frozen_parts_ema_and_exports(tokenizer_dir, reward_export, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=4, max_prompt_len=32)
    module = build(ppo_module(ModelReward(reward_export), algo=PPOConfig(critic_lr=1e-3, ema_beta=0.9)), dm)
    actor0, critic0 = snapshot(module.ac.policy), snapshot(module.ac.critic)
    ref0, reward0 = snapshot(module.ref), snapshot(module.reward)
    t = trainer(tmp_path, max_steps=4, callbacks=[HFExport(str(tmp_path / "out"))])
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy) and changed(critic0, module.ac.critic)
    assert unchanged(ref0, module.ref) and unchanged(reward0, module.reward)
    assert not any(p.requires_grad for p in [*module.ref.parameters(), *module.reward.parameters()])
    # #18: frozen models held in bf16, trained ones and the EMA in fp32
    assert {p.dtype for p in [*module.ref.parameters(), *module.reward.parameters()]} == {torch.bfloat16}
    assert {p.dtype for p in [*module.ac.parameters(), *module.ema.parameters()]} == {torch.float32}
    opt_params = {id(p) for g in t.optimizers[0].param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in module.ac.parameters()}  # one optimizer, actor + critic only
    assert {g["initial_lr"] for g in t.optimizers[0].param_groups} == {3e-3, 1e-3}  # actor and critic lr
    # EMA: away from the actor, and between its start and the actor.
    flat = lambda ps: torch.cat([p.detach().flatten() for p in ps])
    start, actor, ema = flat(actor0.values()), flat(module.ac.policy.parameters()), flat(module.ema.parameters())
    assert not torch.equal(ema, actor)
    assert (ema - start).norm() < (actor - start).norm() and (ema - actor).norm() < (start - actor).norm()
    for key in LOGGED:
        assert key in t.callback_metrics, key
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"actor", "actor_ema", "critic"}


def test_ppo_epochs_and_minibatches_and_adaptive_kl(tokenizer_dir, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=4, max_prompt_len=32)
    module = build(
        ppo_module(
            CallableReward("rule_rewards:apple_share"),
            kl=AdaptiveKL(init=0.2, target=0.01, horizon=10),
            algo=PPOConfig(ppo_epochs=2, num_minibatches=2),
        ),
        dm,
    )
    t = trainer(tmp_path, max_steps=8)
    t.fit(module, datamodule=dm)
    # 2 rollouts x 2 epochs x 2 minibatches = 8 optimizer steps
    assert t.global_step == 8 and t.fit_loop.epoch_loop.batch_progress.total.completed == 2
    assert module.kl.value != 0.2  # the adaptive controller moved beta after each rollout


@pytest.mark.parametrize(
    "estimator", [GRPO(samples_per_prompt=2), RLOO(samples_per_prompt=3), DrGRPO(samples_per_prompt=2), REINFORCEPP()]
)
def test_critic_free_estimators_run_without_a_critic(estimator, tokenizer_dir, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32)
    module = build(ppo_module(CallableReward("rule_rewards:word_count"), critic=None, advantage=estimator), dm)
    assert module.ac.critic is None
    actor0 = snapshot(module.ac.policy)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy)
    assert "ppo/value_loss" not in t.callback_metrics
    assert len(module.samples) == 2 * estimator.samples_per_prompt


def test_value_head_on_the_actor_instead_of_a_critic(tokenizer_dir, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32)
    module = build(ppo_module(CallableReward("rule_rewards:word_count"), critic=None, value_head_on_actor=True), dm)
    assert module.ac.critic is None and module.ac.value_head is not None
    head0 = module.ac.value_head.weight.detach().clone()
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=dm)
    assert not torch.equal(head0, module.ac.value_head.weight) and "ppo/value_loss" in t.callback_metrics


def test_gae_without_critic_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a critic"):
        PPOModule(actor=spec(), reward=CallableReward("rule_rewards:apple_share"))


def test_sum_reward_and_ptx_mix(tokenizer_dir, reward_export, tmp_path):
    from helpers import blend

    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32, ptx_blend=blend(40))
    reward = SumReward(
        [ModelReward(reward_export, normalize=False), CallableReward("rule_rewards:apple_share")], [1.0, 2.0]
    )
    module = build(ppo_module(reward, algo=PPOConfig(ptx_coef=0.5)), dm)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=dm)
    assert "ppo/ptx_loss" in t.callback_metrics and torch.isfinite(t.callback_metrics["ppo/ptx_loss"])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_actor_uses_adapters_off_as_reference(family, tokenizer_dir, tmp_path):
    from rlhf_lit.hf.models import LoRA

    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32)
    actor = TinyModel(family=family, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_positions=128)
    module = PPOModule(
        actor=actor,
        reward=CallableReward("rule_rewards:apple_share"),
        critic=spec(1),
        lora=LoRA(r=4, alpha=8),
        critic_lora=LoRA(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),  # OPT critic (#18)
        generation=GenerationConfig(max_new_tokens=6),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    build(module, dm)
    assert module.ref is None
    base = {k: v.clone() for k, v in module.ac.named_parameters() if "lora" not in k and "value_head" not in k}
    trainable = {k for k, v in module.ac.named_parameters() if v.requires_grad}
    assert trainable == {k for k in dict(module.ac.named_parameters()) if "lora" in k or "value_head" in k}
    head0 = module.ac.critic.value_head.weight.detach().clone()
    t = trainer(tmp_path, max_steps=2, callbacks=[HFExport(str(tmp_path / "out"))])
    t.fit(module, datamodule=dm)
    assert all(torch.equal(v, dict(module.ac.named_parameters())[k]) for k, v in base.items())
    assert not torch.equal(head0, module.ac.critic.value_head.weight)
    assert "objective/kl" in t.callback_metrics
    from transformers import AutoModelForCausalLM

    from rlhf_lit.hf.models import load_scalar_model

    AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "actor")  # merged export loads as a plain model
    critic = load_scalar_model(str(tmp_path / "out" / "critic"))  # so does the critic, adapters merged
    assert not any("lora" in k for k, _ in critic.named_parameters())


def test_mean_reward_rises_with_a_rule_based_reward(tokenizer_dir, tmp_path):
    """PPO against 'share of capital letters' from a random tiny policy: the reward must rise clearly."""
    torch.manual_seed(0)
    dm = datamodule(PromptDataModule, tokenizer_dir, n=400, batch_size=16, max_prompt_len=32)
    module = build(
        PPOModule(
            actor=spec(),
            reward=CallableReward("rule_rewards:caps_share"),
            critic=spec(1),
            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
            generation=GenerationConfig(max_new_tokens=8),
            kl=AdaptiveKL(init=0.01, target=20, horizon=1000),
            algo=PPOConfig(critic_lr=1e-2, ppo_epochs=2, ema_beta=None),
        ),
        dm,
    )
    scores = []
    module.on_train_batch_end = lambda *a: scores.append(float(module.trainer.callback_metrics["objective/scores"]))
    t = trainer(tmp_path, max_steps=60)
    t.fit(module, datamodule=dm)
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.3, (first, last)


def test_diverged_minibatches_are_skipped_and_counted(tokenizer_dir, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32)
    # every ratio is >= 1 (masked tokens count as 1), so max_ratio 0.5 marks every minibatch diverged
    module = build(
        ppo_module(CallableReward("rule_rewards:word_count"), algo=PPOConfig(max_ratio=0.5, ema_beta=None)), dm
    )
    actor0 = snapshot(module.ac.policy)
    t = trainer(tmp_path, max_steps=2, max_epochs=1, limit_train_batches=2)
    t.fit(module, datamodule=dm)
    assert unchanged(actor0, module.ac.policy)
    assert t.callback_metrics["ppo/skipped_minibatches"] == 1.0


@pytest.mark.parametrize("estimator", [GRPO(samples_per_prompt=4), RLOO(samples_per_prompt=4)])
def test_group_advantages_are_not_whitened_again_over_tokens(estimator):
    """Issue #15: with whiten_advantages on (the default), GRPO's [1.276, 0.061, -0.182, -1.155] for
    responses of 1, 1, 1 and 30 tokens became [4.675, 2.195, 1.699, -0.286]: the third sample, below its
    group's mean, was reinforced. Group advantages now reach the loss as the estimator made them."""
    module = PPOModule(actor=spec(), reward=CallableReward("rule_rewards:word_count"), critic=None, advantage=estimator)
    mask = torch.zeros(4, 30)
    for row, n in enumerate([1, 1, 1, 30]):
        mask[row, :n] = 1
    seq = torch.tensor([1.276, 0.061, -0.182, -1.155])
    rewards = torch.zeros(4, 30)
    rewards[torch.arange(4), mask.sum(-1).long() - 1] = seq  # the score on each response's last token
    adv, _ = module.updater.advantages(rewards, None, mask)
    expected, _ = estimator(rewards, None, mask)
    torch.testing.assert_close(adv, expected)
    first = adv[:, 0]
    assert first[2] < 0 < first[1] and first[3] < 0  # signs follow each sample against its group
