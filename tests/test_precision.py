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


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_forwards_run_bf16_autocast_without_its_weight_cache(stage, tokenizer_dir, tmp_path, monkeypatch):
    """SFT, reward and DPO forwards run under the trainer's bf16 autocast with the weight cache off (#30:
    it kept every cast weight to the step's end); a fp32 trainer has no autocast to change."""
    seen = []
    real = torch.nn.functional.linear

    def linear(*args, **kwargs):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    losses(tmp_path, tokenizer_dir, stage, "bf16-mixed", steps=1)
    assert seen and all(on and not cached for on, cached in seen)
    seen.clear()
    losses(tmp_path, tokenizer_dir, stage, "32-true", steps=1)
    assert seen and not any(on for on, _ in seen)


def test_fp32_cpu_attention_switch_is_validated(monkeypatch):
    from rlhf_lit.hf.models.attention import FP32_ATTENTION_ENV, upcast_attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv(FP32_ATTENTION_ENV, raising=False)  # auto, even where the suite runs with it forced
    assert upcast_attention(cpu) and not upcast_attention(cuda)  # auto: on CPU only
    monkeypatch.setenv(FP32_ATTENTION_ENV, "1")
    assert upcast_attention(cpu) and upcast_attention(cuda)
    monkeypatch.setenv(FP32_ATTENTION_ENV, "0")
    assert not upcast_attention(cpu)
    monkeypatch.setenv(FP32_ATTENTION_ENV, "sometimes")
    with pytest.raises(ValueError, match=FP32_ATTENTION_ENV):
        upcast_attention(cpu)


def test_fp32_cpu_attention_is_sdpa_on_the_upcast_inputs(monkeypatch):
    import torch.nn.functional as F

    from rlhf_lit.hf.models.attention import FP32_ATTENTION_ENV, sdpa_fp32_on_cpu

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g).bfloat16() for _ in range(3))
    mask = torch.ones(7, 7, dtype=torch.bool).tril().expand(2, 1, 7, 7).clone()
    mask[1, :, :, 5:] = False
    mask[1, :, 5:, 5] = True  # padding attends to itself
    layer = torch.nn.Module()
    layer.is_causal = True
    monkeypatch.setenv(FP32_ATTENTION_ENV, "1")
    out, _ = sdpa_fp32_on_cpu(layer, q, k, v, mask)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).transpose(1, 2)
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    monkeypatch.setenv(FP32_ATTENTION_ENV, "0")
    out, _ = sdpa_fp32_on_cpu(layer, q, k, v, mask)
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2))


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_built_models_run_attention_in_fp32_under_bf16_autocast_on_cpu(family, tok, monkeypatch, tmp_path):
    """The models rlhf-lit builds take the fp32 attention (#30): under bf16 autocast their logits and
    gradients change with the switch and stay within bf16's tolerance of the fp32 model's; switched off
    they are transformers' sdpa bit for bit; a saved model names plain sdpa."""
    from rlhf_lit.hf.models.attention import FP32_ATTENTION_ENV, NAME

    model = TinyModel(family, 64, 2, 4, 128, 128, seed=1).build_causal_lm(tok).train()
    assert model.config._attn_implementation == NAME
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tok) - 1, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0

    def run(bf16: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        return logits.detach(), grad

    want_logits, want_grad = run(False)
    got = {}
    for switch in ("1", "0"):
        monkeypatch.setenv(FP32_ATTENTION_ENV, switch)
        got[switch] = run(True)
        logits, grad = got[switch]
        assert (logits - want_logits).abs().max() < 0.05 * want_logits.abs().max()
        assert (grad - want_grad).norm() < REL_TOL * 5 * want_grad.norm()
    assert not torch.equal(got["1"][0], got["0"][0])  # the switch changes what runs
    model.set_attn_implementation("sdpa")
    assert torch.equal(run(True)[0], got["0"][0])  # switched off: transformers' sdpa, bit for bit
    model.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
