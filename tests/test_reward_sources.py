"""Any Hugging Face reward model as the reward source (issue #17): raw checkpoints without a pad token as
actor, critic and reward; a sequence-classification reward model with its own tokenizer and chat
template; score statistics estimated or a one-line error."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import CHATML, REPO
from helpers import build_ppo, changed, datamodule, snapshot, trainer
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from datamodules import PromptDataModule
from rlhf_lit.errors import InputError
from rlhf_lit.hf.chat_format import ChatFormat
from rlhf_lit.hf.models import HFModel, TinyModel
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.math.ops import pad_sequences
from rlhf_lit.rl.rewards import ModelReward


@pytest.fixture(scope="module")
def raw_dir(tokenizer_dir, tmp_path_factory):
    """A raw pretrained-style checkpoint whose tokenizer has no pad token (as Llama-3's or GPT-2's)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    path = tmp_path_factory.mktemp("raw") / "llama"
    TinyModel(
        family="llama", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=256
    ).build_causal_lm(tok).save_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    return str(path)


@pytest.fixture(scope="module")
def classifier_dir(tokenizer_dir, tmp_path_factory):
    """A one-label Llama sequence-classification reward model with its own tokenizer: another vocabulary
    (two added tokens) and a ChatML template."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        max_position_embeddings=256,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(cfg)
    path = tmp_path_factory.mktemp("clf") / "rm"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def ppo(actor, critic, reward, tokenizer, tmp_path, steps=2):
    dm = PromptDataModule(
        datamodule(PromptDataModule, tokenizer, batch_size=2).blend,
        HFTokenizer(tokenizer),
        batch_size=2,
        max_prompt_len=24,
    )
    module = build_ppo(dm, actor=actor, critic=critic, reward=reward)
    before = snapshot(module.ac.policy)
    t = trainer(tmp_path, max_steps=steps)
    t.fit(module, datamodule=dm)
    assert changed(before, module.ac.policy) and torch.isfinite(t.callback_metrics["ppo/policy_loss"])
    return module, t


def test_raw_checkpoint_without_pad_as_actor_critic_and_reward(raw_dir, tmp_path):
    """Once an IndexError: the actor's tokenizer gained '<pad>' and was resized, the reward model was not.
    Now the pad reuses eos, nobody is resized, and the formats are detected."""
    with pytest.raises(InputError, match="no saved score statistics.*normalize: false.*stats_rollouts"):
        ModelReward(raw_dir).build(HFTokenizer(raw_dir).load())
    reward = ModelReward(raw_dir, stats_rollouts=2)
    module, t = ppo(HFModel(raw_dir), HFModel(raw_dir), reward, raw_dir, tmp_path)
    vocab = len(HFTokenizer(raw_dir).load())
    assert (
        module.ac.policy.get_input_embeddings().num_embeddings
        == vocab
        == module.reward.model.backbone.get_input_embeddings().num_embeddings
    )
    assert module.reward.same_tokenizer and reward._moments[0] == 2  # statistics from the first two rollouts
    assert "reward/truncated_rows" in t.callback_metrics


def test_classifier_reward_with_its_own_tokenizer_and_template_drives_ppo(classifier_dir, tokenizer_dir, tmp_path):
    reward = ModelReward(classifier_dir, normalize=False, max_length=40)
    module, t = ppo(
        TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64),
        TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, seed=1),
        reward,
        tokenizer_dir,
        tmp_path,
    )
    assert not reward.same_tokenizer and type(reward.model).__name__ == "SequenceClassifier"
    # The scores are those of the model called directly through transformers on its own rendering.
    own = AutoTokenizer.from_pretrained(classifier_dir)
    prompts, responses = (
        [module.samples[0]["prompt"], "\n\nHuman: List 3 fruits.\n\nAssistant:"],
        [" apple, pear.", " hi"],
    )
    fmt = ChatFormat(own)
    ids = [p + r for p, r in zip(fmt.prompt_ids(prompts), fmt.response_ids(responses))]
    assert own.decode(ids[1]).startswith("<|im_start|>user\nList 3 fruits.<|im_end|>")
    ids, mask = pad_sequences([x[-40:] for x in ids], own.pad_token_id)
    hf = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        for p in hf.parameters():  # PPO holds its reward model in bf16 (frozen_dtype): the same rounded weights
            p.copy_(p.bfloat16().float())
        expected = hf(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = reward(prompts, responses, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_re_rendered_reply_keeps_cut_replies_open_the_header_and_the_hh_space(classifier_dir, tokenizer_dir):
    """A reward model with its own tokenizer (audit #27, item 5): (a) a reply cut at max_new_tokens gets no
    end-of-turn token (the actor's own tokens have none), (b) a too-long conversation loses its middle, not
    the template's first role header, (c) an HH reward model sees "Assistant: reply" with HH's space."""
    actor_tok = HFTokenizer(tokenizer_dir).load()
    reward = ModelReward(classifier_dir, normalize=False, max_length=48)
    reward.build(actor_tok)
    own, prompt = reward.tokenizer, "\n\nHuman: Name a fruit.\n\nAssistant:"
    ids, mask = reward.encode([prompt, prompt], [" apple", " apple"], "cpu", torch.tensor([True, False]))
    texts = [own.decode(x[m.bool()]) for x, m in zip(ids, mask)]
    assert texts[0].endswith("apple<|im_end|>") and texts[1].endswith("apple") and reward.truncated == 0
    ended = reward(2 * [prompt], [" apple", " apple"], torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1),
                   ended=torch.tensor([True, False]))  # fmt: skip
    assert ended[0] != ended[1]  # scored as rendered: the cut reply is not the ended one
    long = "\n\nHuman: " + " ".join(["tell me more about fruit"] * 20) + "\n\nAssistant:"
    (cut,), (cut_mask,) = reward.encode([long], [" a pear"], "cpu", torch.tensor([True]))
    text = own.decode(cut[cut_mask.bool()])
    assert cut_mask.sum() == 48 and reward.truncated == 1
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\na pear<|im_end|>")
    hh = ModelReward(classifier_dir, normalize=False, chat_template="hh")
    hh.build(actor_tok)
    (x,), _ = hh.encode([prompt], ["Hello there"], "cpu")  # a template actor's reply has no leading space
    assert hh.tokenizer.decode(x).endswith("\n\nAssistant: Hello there" + hh.tokenizer.eos_token)


def test_classifier_checkpoint_as_critic_keeps_its_score_head(classifier_dir):
    tok = HFTokenizer(classifier_dir).load()
    critic = HFModel(classifier_dir).build_scalar(tok)
    hf = AutoModelForSequenceClassification.from_pretrained(classifier_dir)
    torch.testing.assert_close(critic.value_head.weight, hf.score.weight)
    ids, mask = pad_sequences([tok("a b c")["input_ids"], tok("a")["input_ids"]], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(
            critic.eval().score(ids, mask),
            hf.eval()(input_ids=ids, attention_mask=mask).logits[:, 0],
            atol=1e-5,
            rtol=1e-5,
        )


def test_classifier_with_two_labels_is_one_clear_error(tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=2,
        pad_token_id=tok.pad_token_id,
    )
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "two")
    tok.save_pretrained(tmp_path / "two")
    with pytest.raises(InputError, match="needs one label.*num_labels=2"):
        ModelReward(str(tmp_path / "two"), normalize=False).build(tok)


def test_missing_statistics_is_one_line_from_the_cli(raw_dir, tmp_path):
    over = {
        "trainer": {
            "max_steps": 1,
            "logger": False,
            "callbacks": [],
            "default_root_dir": str(tmp_path),
            "enable_progress_bar": False,
        },
        "model": {
            "init_args": {
                "actor": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": raw_dir}},
                "critic": {"class_path": "rlhf_lit.hf.models.HFModel", "init_args": {"path": raw_dir}},
                "reward": {"class_path": "rlhf_lit.rl.rewards.ModelReward", "init_args": {"path": raw_dir}},
            }
        },
        "data": {
            "init_args": {
                "tokenizer": {"class_path": "rlhf_lit.hf.tokenizer.HFTokenizer", "init_args": {"path": raw_dir}},
                "blend": {"sources": [{"name": "synthetic", "options": {"n": 40, "seed": 0}}]},
            }
        },
    }
    (tmp_path / "over.yaml").write_text(yaml.safe_dump(over))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "rlhf_lit",
            "fit",
            "--config",
            str(REPO / "configs/ppo/tiny.yaml"),
            "--config",
            str(tmp_path / "over.yaml"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("rlhf-lit: error: reward model")
