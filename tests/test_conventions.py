"""What real checkpoints need (issue #13), shown on tiny models: chat templates, BOS, end-of-turn stop
tokens, conversational rows, train/eval modes, checkpointing that runs, experience scored in eval mode,
`ended` from the last kept token, per-model gradient clipping, every family through PPO."""

import json

import lightning as L
import pytest
import torch
from conftest import CHATML, FAMILIES
from helpers import build_ppo, changed, datamodule, snapshot, trainer, unchanged
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from datamodules import PreferenceDataModule, PromptDataModule, SFTDataModule
from datamodules import collate as C
from datamodules.readers import DataError
from datamodules.sources import load_source
from modules import PPOModule, RewardModule, SFTModule
from rlhf_lit.hf.chat_format import ChatFormat, to_messages
from rlhf_lit.hf.models import HFModel, TinyModel
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.experience import ended_with_stop
from rlhf_lit.rl.generation import GenerationConfig, generate_texts
from rlhf_lit.rl.rewards import CallableReward

HH = "\n\nHuman: List 3 fruits.\n\nAssistant:"


@pytest.fixture(scope="module")
def chat_tokenizer_dir(tokenizer_dir, tmp_path_factory):
    """The test BPE with ChatML's special tokens and template (as SmolLM2 / Qwen tokenizers have)."""
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    path = tmp_path_factory.mktemp("chat") / "tok"
    tok.save_pretrained(path)
    return str(path)


def pretrained(tok, path, family="llama", dropout=0.0):
    """A tiny model saved with save_pretrained: from_pretrained returns it in eval mode, like a hub model."""
    spec = TinyModel(
        family=family, hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=256, dropout=dropout
    )
    spec.build_causal_lm(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


# -- chat templates -------------------------------------------------------------------------------
def test_template_mode_renders_prompts_and_closes_replies_with_end_of_turn(chat_tokenizer_dir):
    tok = HFTokenizer(chat_tokenizer_dir).load()
    fmt = ChatFormat(tok)
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert fmt.template and fmt.end_of_turn == eot and fmt.stop_ids == [tok.eos_token_id, eot]
    assert fmt.prompt_text(HH) == "<|im_start|>user\nList 3 fruits.<|im_end|>\n<|im_start|>assistant\n"
    ids = fmt.response_ids([" apple, pear."])[0]
    assert ids[-1] == eot and tok.decode(ids[:-1]) == "apple, pear."  # HH's leading space dropped
    # The same conversation given as messages renders identically.
    assert fmt.prompt_ids([[{"role": "user", "content": "List 3 fruits."}]]) == fmt.prompt_ids([HH])


def test_hh_option_turns_the_template_off_and_the_choice_travels_with_the_export(chat_tokenizer_dir, tmp_path):
    tok = HFTokenizer(chat_tokenizer_dir, chat_template="hh").load()
    fmt = ChatFormat(tok)
    assert not fmt.template and fmt.prompt_text(HH) == HH and fmt.stop_ids == [tok.eos_token_id]
    tok.save_pretrained(tmp_path / "export")
    assert not ChatFormat(HFTokenizer(str(tmp_path / "export")).load()).template
    (tmp_path / "t.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert (
        ChatFormat(HFTokenizer(str(tmp_path / "export"), chat_template=str(tmp_path / "t.jinja")).load()).prompt_text(
            HH
        )
        == "[List 3 fruits.]"
    )
    with pytest.raises(ValueError, match="chat_template 'nope.jinja'"):
        HFTokenizer(chat_tokenizer_dir, chat_template="nope.jinja").load()


def test_hh_mode_adds_bos_when_the_tokenizer_does(tokenizer_dir):
    from tokenizers.processors import TemplateProcessing

    plain = AutoTokenizer.from_pretrained(tokenizer_dir)
    bos = plain.bos_token_id
    assert ChatFormat(plain).prompt_ids([HH])[0][0] != bos  # the BPE adds none: neither do we
    backend = AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer
    backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert tok("a")["input_ids"][0] == bos  # a Llama-style tokenizer: BOS by default
    ids = ChatFormat(tok).prompt_ids([HH])[0]
    assert ids[0] == bos and ids.count(bos) == 1


def test_hh_rows_sft_pairs_and_prompts_go_through_the_template(chat_tokenizer_dir):
    tok = HFTokenizer(chat_tokenizer_dir).load()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    recs = [{"prompt": HH, "response": " apple, pear, plum.", "chosen": " apple.", "rejected": " no."}]
    sft, _ = C.encode_sft(tok, recs, 64)
    text = tok.decode(sft[0]["input_ids"])
    assert text == "<|im_start|>user\nList 3 fruits.<|im_end|>\n<|im_start|>assistant\napple, pear, plum.<|im_end|>"
    trained = tok.decode([t for t, m in zip(sft[0]["input_ids"], sft[0]["loss_mask"]) if m])
    assert trained == "apple, pear, plum.<|im_end|>"
    pairs, _ = C.encode_pairs(tok, recs, 64)
    assert pairs[0]["chosen_ids"][-1] == eot and tok.decode(pairs[0]["chosen_ids"]).endswith(
        "assistant\napple.<|im_end|>"
    )
    prompts, _ = C.encode_prompts(tok, recs, 64)
    assert tok.decode(prompts[0]["prompt_ids"]).endswith("<|im_start|>assistant\n") and prompts[0]["prompt"] == HH


def test_sft_on_every_assistant_turn_of_a_multi_turn_row(chat_tokenizer_dir, tok):
    conv = "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: List 3 fruits.\n\nAssistant:"
    for t, closing in ((HFTokenizer(chat_tokenizer_dir).load(), "<|im_end|>"), (tok, "</s>")):
        items, _ = C.encode_sft(t, [{"prompt": conv, "response": " apple."}], 128, all_assistant_turns=True)
        trained = t.decode([i for i, m in zip(items[0]["input_ids"], items[0]["loss_mask"]) if m])
        assert "hello there" in trained and "apple." in trained and "hi" not in trained and "fruits" not in trained
        assert trained.endswith(closing)
        last_only, _ = C.encode_sft(t, [{"prompt": conv, "response": " apple."}], 128)
        assert "hello" not in t.decode([i for i, m in zip(last_only[0]["input_ids"], last_only[0]["loss_mask"]) if m])


def test_json_source_reads_conversational_rows(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."},
            ]
        },
        {"messages": [{"role": "user", "content": "Only a question"}]},
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = load_source("json", path=str(path), options={"fields": {"messages": "messages"}})
    first = res.records[0]
    assert first["messages"] == rows[0]["messages"][:2] and first["response"] == "Hello."
    assert first["prompt"] == "Be brief.\n\nHuman: Hi?\n\nAssistant:" and "response" not in res.records[1]
    assert to_messages(first["messages"]) == rows[0]["messages"][:2]
    # TRL's conversational preference layout: prompt / chosen / rejected as message lists.
    pref = tmp_path / "pref.jsonl"
    pref.write_text(
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "2+2?"}],
                "chosen": [{"role": "assistant", "content": "4"}],
                "rejected": [{"role": "assistant", "content": "5"}],
            }
        )
        + "\n"
    )
    rec = load_source(
        "json", path=str(pref), options={"fields": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected"}}
    ).records[0]
    assert (rec["chosen"], rec["rejected"], rec["messages"]) == ("4", "5", [{"role": "user", "content": "2+2?"}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'messages' message 0 should be"):
        load_source("json", path=str(bad), options={"fields": {"messages": "messages"}})


def test_generation_stops_at_the_end_of_turn_token(chat_tokenizer_dir):
    tok = HFTokenizer(chat_tokenizer_dir).load()
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    model = (
        TinyModel(family="llama", hidden_size=32, num_layers=1, num_heads=4, ffn_size=64).build_causal_lm(tok).eval()
    )

    class OnlyEndOfTurn(torch.nn.Module):  # an LM head that always prefers <|im_end|>
        def forward(self, hidden):
            logits = torch.zeros(*hidden.shape[:-1], len(tok))
            logits[..., eot] = 100.0
            return logits

    model.lm_head = OnlyEndOfTurn()
    texts, batches = generate_texts(model, tok, [HH], GenerationConfig(max_new_tokens=5, do_sample=False))
    ids, mask, p, resp_mask = batches[0]
    assert ids[0, p].item() == eot and resp_mask.sum().item() == 1 and texts == [""]


# -- modes, checkpointing, experience --------------------------------------------------------------
def count_checkpointed(model) -> list[int]:
    """Counts calls of each layer's checkpoint function (set by gradient_checkpointing_enable)."""
    calls = [0]
    for m in model.modules():
        f = getattr(m, "_gradient_checkpointing_func", None)
        if f is not None and getattr(m, "gradient_checkpointing", False):

            def counted(*a, _f=f, **k):
                calls[0] += 1
                return _f(*a, **k)

            m._gradient_checkpointing_func = counted
    return calls


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_pretrained_models_train_in_train_mode_with_checkpointing_that_runs(stage, tokenizer_dir, tok, tmp_path):
    path = pretrained(tok, tmp_path / "pre", dropout=0.1)
    spec = HFModel(path, gradient_checkpointing=True)
    module, dm_cls = (
        (SFTModule(spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)), SFTDataModule)
        if stage == "sft"
        else (RewardModule(spec, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3)), PreferenceDataModule)
    )
    dm = datamodule(dm_cls, tokenizer_dir, n=40)
    dm.setup()
    module.tokenizer = dm.tokenizer
    module.configure_model()
    assert all(m.training for m in module.model.modules())
    calls = count_checkpointed(module.model)
    before = snapshot(module.model)
    with pytest.warns() as seen:
        trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    assert not [w for w in seen if "eval mode" in str(w.message)]
    assert calls[0] >= 2 * 2 and changed(before, module.model)  # 2 layers x 2 steps at least


def test_experience_is_scored_in_eval_mode_and_kl_starts_at_zero(tokenizer_dir, tok, tmp_path):
    """Dropout kept on (dropout: null): the rollout still scores in eval mode, so an actor equal to the
    reference has KL exactly 0 and the old log-probs are the deterministic ones."""
    path = pretrained(tok, tmp_path / "pre", dropout=0.3)
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=4, max_prompt_len=32)
    module = PPOModule(
        actor=HFModel(path),
        critic=HFModel(path),
        reward=CallableReward("rule_rewards:word_count"),
        generation=GenerationConfig(max_new_tokens=6),
        dropout=None,
        algo=PPOConfig(ema_beta=None),
        frozen_dtype="float32",  # the reference exactly equal to the actor (bf16 storage rounds it)
    )
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    assert module.ac.training and module.ac.policy.training and not module.ref.training
    ro = module.rollout(next(iter(dm.train_dataloader())))
    assert module.ac.training  # restored after scoring
    # Equal up to float rounding (two log-softmax formulas); dropout noise would be orders larger.
    torch.testing.assert_close(ro.logprobs * ro.mask, ro.ref_logprobs * ro.mask, atol=1e-5, rtol=0)
    again = module.ac(ro.input_ids, ro.attention_mask, ro.prompt_len)[0]
    assert ((again - ro.logprobs) * ro.mask).abs().max() > 1e-2  # train mode: dropout is on


def test_ppo_turns_dropout_off_by_default(tokenizer_dir, tok, tmp_path):
    path = pretrained(tok, tmp_path / "pre", family="opt", dropout=0.3)
    module = PPOModule(actor=HFModel(path), critic=HFModel(path), reward=CallableReward("rule_rewards:word_count"))
    module.tokenizer = tok
    module.configure_model()
    from rlhf_lit.hf.models import has_dropout

    assert not has_dropout(module.ac) and has_dropout(module.ref)  # the reference is untouched (and in eval)


def test_ended_reads_the_last_kept_token():
    stops = [2, 9]
    responses = torch.tensor([[5, 6, 2], [5, 2, 0], [5, 6, 7], [9, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])
    # Row 0 stops in the last column: the mask is full, yet the response ended.
    assert ended_with_stop(responses, mask, stops).tolist() == [True, True, False, True]


def test_actor_and_critic_are_clipped_each_to_its_own_norm(tokenizer_dir, tmp_path):
    """SGD with lr 1: the actor's step is its clipped gradient. Its norm is the actor's limit, and a
    critic loss 1000x larger changes nothing in the actor's step (one joint norm would shrink it)."""

    def run(vf_coef):
        L.seed_everything(0)
        dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=4, max_prompt_len=32)
        spec = TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128)
        module = PPOModule(
            actor=spec,
            critic=spec,
            reward=CallableReward("rule_rewards:word_count"),
            optimizer=lambda p: torch.optim.SGD(p, lr=1.0),
            generation=GenerationConfig(max_new_tokens=6),
            algo=PPOConfig(
                ema_beta=None, vf_coef=vf_coef, actor_max_grad_norm=1e-3, critic_max_grad_norm=1e-3, critic_lr=1.0
            ),
        )
        dm.setup("fit")
        module.tokenizer = dm.tokenizer
        module.configure_model()
        before = snapshot(module.ac.policy)
        t = trainer(tmp_path / str(vf_coef), max_steps=1)
        t.fit(module, datamodule=dm)
        step = torch.cat([(p.detach() - before[k]).flatten() for k, p in module.ac.policy.named_parameters()])
        return step, t.callback_metrics

    step, logs = run(1.0)
    assert float(logs["ppo/actor_grad_norm"]) > 1e-3 and "ppo/critic_grad_norm" in logs
    assert step.norm().item() == pytest.approx(1e-3, rel=1e-3)
    big, _ = run(1000.0)
    torch.testing.assert_close(big, step)


@pytest.mark.parametrize("family", FAMILIES)
def test_ppo_runs_for_every_family(family, tokenizer_dir, tmp_path):
    spec = TinyModel(family=family, hidden_size=32, num_layers=1, num_heads=4, ffn_size=64, max_positions=128)
    dm = datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=24)
    module = build_ppo(dm, actor=spec, critic=spec, reward=CallableReward("rule_rewards:word_count"))
    actor0, critic0, ref0 = snapshot(module.ac.policy), snapshot(module.ac.critic), snapshot(module.ref)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy) and changed(critic0, module.ac.critic) and unchanged(ref0, module.ref)
    assert torch.isfinite(t.callback_metrics["ppo/policy_loss"])


def test_every_config_key_of_stages_and_datamodules_shows_its_docstring_in_help():
    """``rlhf-lit fit --model.help modules.PPOModule`` shows each key's docstring (#28): jsonargparse reads a
    Google "Args:" section only when it is one (a docstring opening with "Args:" on its first line is read
    as a summary and every key showed its type alone)."""
    import inspect

    import lightning as L
    from jsonargparse import ArgumentParser

    import datamodules
    import modules
    from rlhf_lit.rl import config, generation
    from rlhf_lit.training import callbacks

    classes = [c for m in (modules, datamodules, callbacks) for _, c in inspect.getmembers(m, inspect.isclass)]
    classes = [c for c in classes if issubclass(c, (L.LightningModule, L.LightningDataModule, L.Callback))]
    classes += [config.PPOConfig, generation.GenerationConfig]
    assert len(classes) >= 8
    for cls in classes:
        if cls.__module__.split(".")[0] not in ("modules", "datamodules", "rlhf_lit"):
            continue
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "c", sub_configs=True)
        bare = [a.dest for a in parser._actions if a.dest.startswith("c.") and (a.help or "").startswith("(type")]
        assert not bare, f"{cls.__name__}: keys without a docstring: {bare}"
