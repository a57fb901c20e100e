"""The DPO family: losses against hand-computed values and a naive loop, and the stage's wiring on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import changed, datamodule, snapshot, trainer, unchanged

from datamodules import PreferenceDataModule
from modules import DPOModule
from rlhf_lit.hf.models import LoRA, TinyModel, response_logps
from rlhf_lit.math import losses
from rlhf_lit.math.preference import DPOConfig
from rlhf_lit.training.callbacks import HFExport


def spec(seed=0):
    return TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128, seed=seed)


def test_dpo_losses_hand_computed():
    pc, pr, rc, rr = torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0])
    n2, n4 = torch.tensor([2]), torch.tensor([4])
    # DPO: h = beta * ((-3 + 4) - (-5 + 4)) = 0.1 * 2 = 0.2; loss = -log sigmoid(0.2)
    loss, stats = losses.preference_loss(pc, pr, rc, rr, n2, n4, "sigmoid", beta=0.1)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-0.2)))
    assert stats["chosen_reward"].item() == pytest.approx(0.1)
    assert stats["rejected_reward"].item() == pytest.approx(-0.1)
    assert stats["reward_accuracy"] == 1 and stats["reward_margin"].item() == pytest.approx(0.2)
    # conservative DPO, eps 0.2: 0.8 * -log sigmoid(0.2) + 0.2 * -log sigmoid(-0.2)
    loss, _ = losses.preference_loss(pc, pr, rc, rr, n2, n4, "sigmoid", beta=0.1, label_smoothing=0.2)
    assert loss.item() == pytest.approx(0.8 * math.log(1 + math.exp(-0.2)) + 0.2 * math.log(1 + math.exp(0.2)))
    # IPO on length-averaged log-ratios: h = 1/2 - (-1)/4 = 0.75; (0.75 - 1/(2*0.5))^2 = 0.0625
    loss, stats = losses.preference_loss(pc, pr, rc, rr, n2, n4, "ipo", beta=0.5)
    assert loss.item() == pytest.approx(0.0625)
    # its stats are the averaged log-ratios it optimises: 0.5 * 1/2 and 0.5 * -1/4 (audit #27)
    assert stats["chosen_reward"].item() == pytest.approx(0.25) and stats["rejected_reward"].item() == pytest.approx(
        -0.125
    )
    # where summed and averaged disagree: chosen +2 over 4 tokens (0.5 a token), rejected +1 in 1 token
    _, flip = losses.preference_loss(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-4.0]),
                                     torch.tensor([-4.0]), n4, torch.tensor([1]), "ipo", beta=0.5)  # fmt: skip
    assert flip["reward_accuracy"] == 0 and flip["reward_margin"].item() == pytest.approx(0.5 * (0.5 - 1.0))
    for other in ("ipo", "simpo", "orpo"):  # label smoothing is conservative DPO's: elsewhere an error
        with pytest.raises(ValueError, match="label_smoothing"):
            losses.preference_loss(pc, pr, rc, rr, n2, n4, other, label_smoothing=0.1)
        with pytest.raises(ValueError, match="loss.label_smoothing 0.1 applies to loss_type sigmoid"):
            DPOConfig(loss_type=other, label_smoothing=0.1)
    # SimPO: -log sigmoid(2 * (-3/2 - -5/4) - 0.5) = -log sigmoid(-1.0); no reference needed
    loss, stats = losses.preference_loss(pc, pr, None, None, n2, n4, "simpo", beta=2.0, simpo_gamma=0.5)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1.0)))
    assert stats["reward_accuracy"] == 0  # the rejected reply has the higher average log-prob
    # ORPO: NLL 1.5 + 0.1 * -log sigmoid(log odds(e^-1.5) - log odds(e^-1.25))
    odds = lambda a: a - math.log(1 - math.exp(a))
    loss, _ = losses.preference_loss(pc, pr, None, None, n2, n4, "orpo", orpo_lambda=0.1)
    expected = 1.5 + 0.1 * math.log(1 + math.exp(-(odds(-1.5) - odds(-1.25))))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="reference"):
        losses.preference_loss(pc, pr, None, None, n2, n4, "sigmoid")
    with pytest.raises(ValueError, match="loss_type"):
        DPOConfig(loss_type="kto")


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "simpo"])
def test_dpo_losses_match_a_naive_loop(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(6, generator=g) * 10 for _ in range(4))
    cl, rl = torch.randint(1, 9, (6,), generator=g), torch.randint(1, 9, (6,), generator=g)
    loss, _ = losses.preference_loss(pc, pr, rc, rr, cl, rl, loss_type, beta=0.3, simpo_gamma=0.2)
    total = 0.0
    for i in range(6):
        if loss_type == "sigmoid":
            h = 0.3 * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            total += -math.log(1 / (1 + math.exp(-h)))
        elif loss_type == "ipo":
            h = ((pc[i] - rc[i]) / cl[i] - (pr[i] - rr[i]) / rl[i]).item()
            total += (h - 1 / 0.6) ** 2
        else:
            h = 0.3 * (pc[i] / cl[i] - pr[i] / rl[i]).item() - 0.2
            total += -math.log(1 / (1 + math.exp(-h)))
    assert loss.item() == pytest.approx(total / 6, rel=1e-5)


def test_response_logps_match_a_token_loop(tok):
    model = spec().build_causal_lm(tok).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0], [5, 6, 10, 11, 0], [5, 6, 12, 0, 0]])
    mask = (ids != 0).long()
    prompt_len = torch.tensor([2, 2])  # pairs (row 0, row 2) and (row 1, row 3)
    logps, n = response_logps(model, ids, mask, prompt_len)
    logits = model(input_ids=ids, attention_mask=mask).logits
    for row in range(4):
        length = int(mask[row].sum())
        expect = sum(F.log_softmax(logits[row, t - 1], -1)[ids[row, t]].item() for t in range(2, length))
        assert logps[row].item() == pytest.approx(expect, abs=1e-4) and n[row] == length - 2


def dpo_dm(tokenizer_dir):
    return datamodule(PreferenceDataModule, tokenizer_dir, n=300, batch_size=8)


def test_dpo_wiring_frozen_reference_cache_export_and_learning(tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    dm = dpo_dm(tokenizer_dir)
    module = DPOModule(spec(), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), frozen_dtype="bfloat16")
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    model0, ref0 = snapshot(module.model), snapshot(module.ref)
    batch = next(iter(dm.train_dataloader()))
    loss0, _ = module.step(batch)
    assert all(p.dtype == torch.bfloat16 for p in module.ref.parameters())  # frozen reference held in bf16 (#18)
    assert loss0.item() == pytest.approx(math.log(2), abs=2e-3)  # policy == reference up to bf16 rounding
    exact = DPOModule(spec(), frozen_dtype="float32")
    exact.tokenizer = dm.tokenizer
    exact.configure_model()
    assert exact.step(batch)[0].item() == pytest.approx(math.log(2), abs=1e-5)  # an fp32 reference: h = 0
    calls = []
    module.ref.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))  # one call per forward
    module.ref_cache.clear()
    t = trainer(tmp_path, max_steps=-1, max_epochs=2, val=True, callbacks=[HFExport(str(tmp_path / "out"))])
    t.fit(module, datamodule=dm)
    per_epoch = len(dm.train_dataloader())
    validation = 2 * 2 + 0  # 2 validation batches at each epoch's end, never cached
    assert len(calls) == per_epoch + validation  # the second epoch read the cache
    assert changed(model0, module.model) and unchanged(ref0, module.ref)
    assert module.model.training and not module.ref.training
    assert not any(p.requires_grad for p in module.ref.parameters())
    m = t.callback_metrics
    for key in ["dpo/loss", "dpo/reward_accuracy", "dpo/reward_margin", "dpo/chosen_logp", "val/reward_accuracy"]:
        assert key in m, key
    import csv

    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    curve = [float(r["dpo/loss"]) for r in rows if r.get("dpo/loss")]
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.02, curve  # the loss fell (0.675 -> 0.643 here)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(
        loaded.get_input_embeddings().weight, module.model.get_input_embeddings().weight.detach()
    )


def test_lora_dpo_uses_adapters_off_as_reference_and_simpo_builds_none(tokenizer_dir, tmp_path):
    dm = dpo_dm(tokenizer_dir)
    dm.setup("fit")
    lora = DPOModule(spec(), lora=LoRA(r=4, alpha=8))
    lora.tokenizer = dm.tokenizer
    lora.configure_model()
    assert lora.ref is None
    batch = next(iter(dm.train_dataloader()))
    loss, _ = lora.step(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # adapters start at zero: policy == reference
    simpo = DPOModule(spec(), loss=DPOConfig(loss_type="simpo", beta=2.0))
    simpo.tokenizer = dm.tokenizer
    simpo.configure_model()
    assert simpo.ref is None
    before = snapshot(simpo.model)
    trainer(tmp_path, max_steps=2).fit(simpo, datamodule=dm)
    assert changed(before, simpo.model)


def test_pipeline_stage_list_errors_name_the_stage(tmp_path):
    from rlhf_lit.apps.pipeline import Pipeline, StagePlan
    from rlhf_lit.errors import InputError

    sft = StagePlan(name="sft", config="configs/sft/tiny.yaml")
    dpo = StagePlan(name="dpo", config="configs/dpo/tiny.yaml", inputs={"model.init_args.model": "{rm}"})
    expected = r"stages\[1\] \(dpo\)\.inputs: \{rm\} names no earlier stage \(earlier: sft\)"
    with pytest.raises(InputError, match=expected):
        Pipeline(str(tmp_path), {"sources": []}, [sft, dpo])
    with pytest.raises(InputError, match="each with its own name"):
        Pipeline(str(tmp_path), {"sources": []}, [sft, sft])
    with pytest.raises(ValueError, match="loss_type must be one of"):
        DPOConfig(loss_type="kto")


@pytest.mark.parametrize("lora", [None, LoRA(r=4)])
def test_dpo_turns_dropout_off_so_step0_is_log2_on_every_call(tokenizer_dir, lora):
    """With a checkpoint's dropout (OPT: 0.1) the same batch gave a different loss on every call, the
    adapters-off reference too (#27); by default DPO sets dropout to 0 and the reference runs in eval mode."""
    from rlhf_lit.hf.models import has_dropout

    dm = dpo_dm(tokenizer_dir)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    losses_by = {}
    for dropout in (None, 0.0):
        checkpoint = TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, dropout=0.1)
        module = DPOModule(checkpoint, frozen_dtype="float32", lora=lora, dropout=dropout)
        module.tokenizer = dm.tokenizer
        module.configure_model()
        module.train()
        assert has_dropout(module.model) is (dropout is None)
        torch.manual_seed(0)
        losses_by[dropout] = [module.step(batch)[0].item() for _ in range(3)]
    assert len(set(losses_by[None])) == 3  # the checkpoint's dropout: noise on every call
    assert losses_by[0.0] == pytest.approx([math.log(2)] * 3, abs=1e-6)


@pytest.mark.parametrize("native_bf16", ["0", "1"])
def test_real_smollm2_dpo_step0_loss_is_log2_on_both_machine_kinds(native_bf16, monkeypatch, tmp_path):
    """The real SmolLM2 against its default frozen reference: step-0 loss log 2 within 1e-3 whether the CPU
    computes bf16 natively or not (RLHF_LIT_NATIVE_BF16 forces each branch; #26, #27)."""
    from conftest import REPO, write_jsonl

    from datamodules import Blend, SourceSpec
    from rlhf_lit.hf.models import HFModel
    from rlhf_lit.hf.tokenizer import HFTokenizer

    model = REPO / "models" / "smollm2-135m-instruct"
    if not (model / "model.safetensors").exists():
        pytest.skip("the real model is not installed: run `make smollm2`")
    monkeypatch.setenv("RLHF_LIT_NATIVE_BF16", native_bf16)
    H, A = "\n\nHuman: ", "\n\nAssistant: "
    rows = [
        {"chosen": f"{H}What do bees make?{A}Bees make honey.", "rejected": f"{H}What do bees make?{A}Cars."},
        {"chosen": f"{H}What is 2 plus 2?{A}It is 4.", "rejected": f"{H}What is 2 plus 2?{A}It is 5."},
        {"chosen": f"{H}Name a yellow fruit.{A}A banana.", "rejected": f"{H}Name a yellow fruit.{A}A brick."},
        {"chosen": f"{H}Capital of France?{A}Paris.", "rejected": f"{H}Capital of France?{A}I like turtles."},
    ]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    blend = Blend([SourceSpec("hh_rlhf", path=str(data))], seed=0, split=[0, 1, 0], eval_fraction=0.0)
    dm = PreferenceDataModule(blend, HFTokenizer(str(model), chat_template="auto"), batch_size=4, max_seq_len=64)
    dm.prepare_data()
    dm.setup("fit")
    module = DPOModule(HFModel(str(model)))
    module.tokenizer = dm.tokenizer
    module.configure_model()
    module.train()
    with torch.no_grad():
        loss, _ = module.step(next(iter(dm.train_dataloader())))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-3)


def test_an_explicit_reference_under_lora_is_an_error_not_ignored():
    """With LoRA the reference is the model with its adapters off: an explicit reference spec would be
    silently ignored (audit #27), so DPO and PPO refuse the pair, naming the key (as TRL does)."""
    from modules import PPOModule
    from rlhf_lit.errors import InputError
    from rlhf_lit.hf.models import LoRA, TinyModel
    from rlhf_lit.math.estimators import GRPO
    from rlhf_lit.rl.rewards import CallableReward

    tiny = TinyModel(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64)
    with pytest.raises(InputError, match="model.init_args.reference: with lora the reference is the model"):
        DPOModule(tiny, reference=tiny, lora=LoRA(r=2))
    reward = CallableReward("datamodules.verifiable:exact_match")
    with pytest.raises(InputError, match="model.init_args.reference: with lora the reference is the actor"):
        PPOModule(tiny, reward, reference=tiny, lora=LoRA(r=2), advantage=GRPO())
    assert DPOModule(tiny, lora=LoRA(r=2)).ref_spec is tiny
    assert PPOModule(tiny, reward, reference=tiny, advantage=GRPO()).ref_spec is tiny
