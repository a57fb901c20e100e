"""bf16-mixed as a first-class precision of every stage (issue #19): the first steps' losses match fp32
within a stated tolerance, PPO trains with the EMA still moving, and exports come in the dtype asked for."""

import csv

import lightning as L
import pytest
import torch
from helpers import build_ppo, changed, datamodule, snapshot, trainer, unchanged
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from modules import DPOModule, RewardModule, SFTModule
from rlhf_lit.hf.models import TinyModel
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.rewards import CallableReward
from rlhf_lit.training.callbacks import HFExport

# bf16 keeps 8 bits of mantissa: activations and logits round at ~0.4%. Measured relative deltas of the first
# three losses against fp32 (tiny llama, the same batches): SFT <= 2e-5, reward <= 9e-4, DPO <= 1.3e-4.
REL_TOL = 0.01


def spec(seed=0):
    return TinyModel(
        family="llama", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128, seed=seed
    )


def adamw(params):
    return torch.optim.AdamW(params, lr=1e-3)


STAGES = {
    "sft": (SFTDataModule, lambda: SFTModule(spec(), optimizer=adamw)),
    "reward": (PreferenceDataModule, lambda: RewardModule(spec(), optimizer=adamw)),
    "dpo": (PreferenceDataModule, lambda: DPOModule(spec(), optimizer=adamw)),
}


def losses(tmp_path, tokenizer_dir, stage, precision, steps=3):
    L.seed_everything(0)
    dm_cls, make = STAGES[stage]
    t = trainer(tmp_path / precision, max_steps=steps, precision=precision)
    t.fit(make(), datamodule=datamodule(dm_cls, tokenizer_dir))
    rows = csv.DictReader(open(tmp_path / precision / "logs" / "version_0" / "metrics.csv"))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_bf16_mixed_first_losses_match_fp32(stage, tokenizer_dir, tmp_path):
    fp32 = losses(tmp_path, tokenizer_dir, stage, "32-true")
    bf16 = losses(tmp_path, tokenizer_dir, stage, "bf16-mixed")
    assert len(fp32) == len(bf16) == 3
    assert fp32 != bf16  # bf16 really ran (autocast rounds)
    for a, b in zip(fp32, bf16):
        assert abs(a - b) <= REL_TOL * abs(a), (fp32, bf16)


def test_ppo_under_bf16_mixed_trains_scores_close_to_fp32_and_moves_the_ema(tokenizer_dir, tmp_path):
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=4, max_prompt_len=32)
    module = build_ppo(
        dm,
        actor=spec(),
        critic=spec(seed=1),
        reward=CallableReward("rule_rewards:word_count"),
        algo=PPOConfig(ema_beta=0.9),
    )
    actor0, critic0, ref0 = snapshot(module.ac.policy), snapshot(module.ac.critic), snapshot(module.ref)
    # The same rollout scored in fp32 and under autocast: log-probs and values within bf16's rounding.
    ro = module.rollout(next(iter(dm.train_dataloader())))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _, values = module.ac.eval()(ro.input_ids, ro.attention_mask, ro.prompt_len)
    module.ac.train()
    assert lp.dtype == values.dtype == torch.float32  # read out in fp32 whatever the autocast dtype
    assert ((lp - ro.logprobs) * ro.mask).abs().max() < 0.05 and ((values - ro.values) * ro.mask).abs().max() < 0.05
    t = trainer(tmp_path, max_steps=3, precision="bf16-mixed", callbacks=[HFExport(str(tmp_path / "out"), "bfloat16")])
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy) and changed(critic0, module.ac.critic) and unchanged(ref0, module.ref)
    assert all(torch.isfinite(t.callback_metrics[k]) for k in ("ppo/policy_loss", "ppo/value_loss", "objective/kl"))
    ema = dict(module.ema.named_parameters())
    assert all(p.dtype == torch.float32 for p in ema.values())  # master copies stay fp32 under autocast
    assert any(not torch.equal(actor0[k], ema[k]) for k in actor0)  # the EMA moved
    # Exports in the asked dtype: the files, the config, and from_pretrained's result.
    for sub in ("actor", "actor_ema", "critic"):
        tensors = load_file(next((tmp_path / "out" / sub).glob("*.safetensors")))
        assert {v.dtype for v in tensors.values() if v.is_floating_point()} == {torch.bfloat16}, sub
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "actor")
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="HFExport dtype must be one of"):
        HFExport(str(tmp_path / "x"), "int8")
