"""Stages 1 and 2 on CPU with tiny models: the wiring, learning, export."""

import json

import pytest
import torch
from conftest import FAMILIES, write_jsonl
from helpers import changed, datamodule, snapshot, trainer
from transformers import AutoModelForCausalLM

from datamodules import Blend, PreferenceDataModule, SFTDataModule, SourceSpec
from modules import RewardModule, SFTModule
from rlhf_lit.hf.models import TinyModel, lm_inputs, load_scalar_model
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.training.callbacks import HFExport
from rlhf_lit.training.optim import LRSchedule


def spec(family="opt"):
    return TinyModel(family=family, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128)


def adamw(lr):
    return lambda params: torch.optim.AdamW(params, lr=lr)


def test_sft_fit_changes_weights_logs_and_exports_identical_model(tokenizer_dir, tmp_path):
    dm = datamodule(SFTDataModule, tokenizer_dir)
    module = SFTModule(spec(), optimizer=adamw(1e-3), rouge_samples=4, weight_decay=0.01)
    t = trainer(tmp_path, max_steps=6, val=True, callbacks=[HFExport(str(tmp_path / "export"))], val_check_interval=3)
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    before = snapshot(module.model)
    t.fit(module, datamodule=dm)
    assert changed(before, module.model)
    for key in ("train/loss", "val/loss", "val/ppl", "val/rouge1", "val/rouge2", "val/rougeL"):
        assert key in t.callback_metrics, key
    logged = next(tmp_path.rglob("metrics.csv")).read_text().splitlines()[0]  # ThroughputMonitor logs to loggers
    assert "train/device/items_per_sec" in logged and "train/device/samples_per_sec" in logged
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    batch = next(iter(dm.val_dataloader()))
    module.model.eval()
    with torch.no_grad():
        ours = module.model(**lm_inputs(module.model, batch["input_ids"], batch["attention_mask"])).logits
        theirs = loaded(**lm_inputs(loaded, batch["input_ids"], batch["attention_mask"])).logits
    torch.testing.assert_close(ours, theirs)
    card = (tmp_path / "export" / "README.md").read_text()
    assert "synthetic" in card and "val/loss" in card


def test_sft_loss_falls_on_data_it_can_memorize(tokenizer_dir, tmp_path):
    rows = [{"q": f"List {n} fruits.", "a": " apple, pear."} for n in range(2, 6)] * 2
    path = write_jsonl(tmp_path / "tiny.jsonl", rows)
    b = Blend(
        [SourceSpec("json", path=str(path), options={"fields": {"prompt": "q", "response": "a"}})],
        split=[1, 0, 0],
        eval_fraction=0,
    )
    dm = SFTDataModule(b, HFTokenizer(tokenizer_dir), batch_size=8, max_seq_len=32)
    module = SFTModule(spec(), optimizer=adamw(1e-2), schedule=LRSchedule(decay="constant"))
    t = trainer(tmp_path, max_steps=40)
    losses = []
    module.on_train_batch_end = lambda out, *a: losses.append(float(out["loss"]))
    t.fit(module, datamodule=dm)
    assert losses[-1] < 0.2 * losses[0], (losses[0], losses[-1])


def test_sft_mask_prompt_option(tokenizer_dir):
    masked = datamodule(SFTDataModule, tokenizer_dir, n=20)
    whole = datamodule(SFTDataModule, tokenizer_dir, n=20, mask_prompt=False)
    masked.setup(), whole.setup()
    a, b = masked.train_items[0], whole.train_items[0]
    assert a["input_ids"] == b["input_ids"] and a["input_ids"][-1] == masked.tokenizer.eos_token_id
    assert 0 < sum(a["loss_mask"]) < sum(b["loss_mask"]) == len(b["input_ids"])


def separable_pairs(tmp_path, n=64):
    rows = [
        {"prompt": f"\n\nHuman: item {i}\n\nAssistant:", "chosen": " good answer", "rejected": " bad answer"}
        for i in range(n)
    ]
    return Blend(
        [SourceSpec("rm_static", path=str(write_jsonl(tmp_path / "sep.jsonl", rows)))], split=[0, 1, 0], eval_fraction=0
    )


@pytest.mark.parametrize("loss", ["bradley_terry", "divergent_suffix"])
def test_reward_model_separates_a_separable_fixture(tokenizer_dir, tmp_path, loss):
    dm = PreferenceDataModule(separable_pairs(tmp_path), HFTokenizer(tokenizer_dir), batch_size=16, max_seq_len=32)
    module = RewardModule(spec(), optimizer=adamw(3e-3), loss=loss)
    t = trainer(tmp_path, max_steps=24, callbacks=[HFExport(str(tmp_path / "rm"))])
    t.fit(module, datamodule=dm)
    module.eval()
    correct = []
    with torch.no_grad():
        for batch in dm.train_dataloader():
            s = module(batch["input_ids"], batch["attention_mask"])
            b = s.size(0) // 2
            correct += (s[:b] > s[b:]).tolist()
    assert sum(correct) / len(correct) >= 0.95
    for key in ("rm/accuracy_epoch", "rm/loss_epoch", "rm/margin_epoch", "rm/chosen_score_epoch", "train/loss"):
        assert key in t.callback_metrics, key
    loaded = load_scalar_model(str(tmp_path / "rm"))
    assert loaded.meta["score_stats_from"] == "train" and loaded.meta["score_std"] > 0  # no validation ran
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval().score(batch["input_ids"], batch["attention_mask"]),
            module(batch["input_ids"], batch["attention_mask"]),
        )


def test_reward_export_records_score_stats(tokenizer_dir, tmp_path):
    dm = datamodule(PreferenceDataModule, tokenizer_dir)
    module = RewardModule(spec(), optimizer=adamw(1e-3))
    t = trainer(tmp_path, max_steps=3, val=True, callbacks=[HFExport(str(tmp_path / "rm"))], val_check_interval=3)
    t.fit(module, datamodule=dm)
    meta = json.loads((tmp_path / "rm" / "config.json").read_text())  # a sequence-classification config
    assert meta["architectures"] == ["OPTForSequenceClassification"] and len(meta["id2label"]) == 1
    assert meta["score_stats_from"] == "val" and meta["score_std"] > 0
    assert meta["score_mean"] == pytest.approx(float(t.callback_metrics["val/score_mean"]))
    for key in ("val/accuracy", "val/score_mean", "val/score_std", "val/margin"):
        assert key in t.callback_metrics, key


def test_reward_export_loads_in_plain_transformers_and_the_text_classification_pipeline(tokenizer_dir, tmp_path):
    """The reward export is an ordinary one-label sequence-classification checkpoint: transformers' model,
    its text-classification pipeline and rlhf-lit give the same scores."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from rlhf_lit.rl.rewards import ModelReward

    dm = datamodule(PreferenceDataModule, tokenizer_dir)
    module = RewardModule(spec(), optimizer=adamw(1e-3))
    trainer(tmp_path, max_steps=2, callbacks=[HFExport(str(tmp_path / "rm"))]).fit(module, datamodule=dm)
    texts = ["\n\nHuman: List 3 fruits.\n\nAssistant: apple, pear, plum.</s>", "\n\nHuman: hi\n\nAssistant: no</s>"]
    tok = AutoTokenizer.from_pretrained(tmp_path / "rm")
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == tok.pad_token_id
    enc = tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        direct = hf(**enc).logits[:, 0]
        ours = module.model.eval().score(enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(direct, ours, atol=1e-5, rtol=1e-5)
    piped = pipeline("text-classification", model=str(tmp_path / "rm"), function_to_apply="none")(texts)
    torch.testing.assert_close(torch.tensor([p["score"] for p in piped]), direct, atol=1e-5, rtol=1e-5)
    reward = ModelReward(str(tmp_path / "rm"), normalize=False)
    reward.build(tok)
    with torch.no_grad():
        scored = reward([], [], enc["input_ids"], enc["attention_mask"])
    torch.testing.assert_close(scored, direct, atol=1e-5, rtol=1e-5)


def test_reward_truncates_prompt_from_the_left_and_counts_drops(tok):
    from datamodules.collate import encode_pairs

    long_prompt = "\n\nHuman: " + "word " * 50 + "\n\nAssistant:"
    recs = [
        {"prompt": long_prompt, "chosen": " yes", "rejected": " no"},
        {"prompt": "P", "chosen": " x" * 40, "rejected": " y"},
    ]
    items, dropped = encode_pairs(tok, recs, max_len=16)
    assert len(items) == 1 and dropped == {"response_fills_max_seq_len": 1}
    item = items[0]
    assert len(item["chosen_ids"]) <= 16 and tok.decode(item["chosen_ids"]).endswith("Assistant: yes</s>")


@pytest.mark.parametrize("family", FAMILIES)
def test_both_stages_run_for_every_family(family, tokenizer_dir, tmp_path):
    for module, dm_cls in (
        (SFTModule(spec(family), optimizer=adamw(1e-3)), SFTDataModule),
        (RewardModule(spec(family), optimizer=adamw(1e-3)), PreferenceDataModule),
    ):
        dm = datamodule(dm_cls, tokenizer_dir, n=40)
        t = trainer(tmp_path / dm_cls.__name__, max_steps=2)
        dm.setup()
        module.tokenizer = dm.tokenizer
        module.configure_model()
        before = snapshot(module.model)
        t.fit(module, datamodule=dm)
        assert changed(before, module.model) and torch.isfinite(t.callback_metrics["train/loss"])


def test_sft_lora_with_gradient_checkpointing_merges_on_export(tokenizer_dir, tmp_path):
    from rlhf_lit.hf.models import LoRA

    dm = datamodule(SFTDataModule, tokenizer_dir, n=40)
    s = TinyModel(
        family="gpt2",
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        ffn_size=64,
        max_positions=128,
        gradient_checkpointing=True,
    )
    module = SFTModule(s, optimizer=adamw(1e-2), lora=LoRA(r=4, alpha=8))
    t = trainer(tmp_path, max_steps=3, callbacks=[HFExport(str(tmp_path / "export"))])
    dm.setup()
    module.tokenizer = dm.tokenizer
    module.configure_model()
    trainable = {k for k, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora" in k for k in trainable)
    before = snapshot(module.model)
    t.fit(module, datamodule=dm)
    assert changed(before, module.model)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not any("lora" in k for k, _ in loaded.named_parameters())
    batch = next(iter(dm.train_dataloader()))
    module.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**lm_inputs(loaded, batch["input_ids"], batch["attention_mask"])).logits,
            module.model(**lm_inputs(module.model, batch["input_ids"], batch["attention_mask"])).logits,
            atol=1e-4,
            rtol=1e-4,
        )
