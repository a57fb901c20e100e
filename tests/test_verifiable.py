"""Verifiable rewards (issue #15): a row's answer reaches reward functions, a remote reward over HTTP, the
GRPO-era variants wired into the PPO module, the embedded arithmetic task and a pipeline without a
reward stage."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import rule_rewards
import torch
from conftest import write_jsonl
from helpers import build_ppo, changed, snapshot, trainer, unchanged

from datamodules import Blend, PromptDataModule, SourceSpec
from datamodules.readers import DataError
from datamodules.sources import load_source
from datamodules.verifiable import arithmetic, exact_match, parsed_answer
from rlhf_lit.errors import InputError
from rlhf_lit.hf.models import TinyModel
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.math.estimators import GRPO, REINFORCEPP
from rlhf_lit.math.kl_control import FixedKL
from rlhf_lit.rl.actor_critic import sequence_logprobs
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.experience import concat_rollouts, select_rows
from rlhf_lit.rl.rewards import CallableReward, HTTPReward


def spec(seed=0):
    return TinyModel(family="opt", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64, max_positions=128, seed=seed)


def answer_rows(tmp_path, n=24):
    rows = [{"question": f"What is {i} + {i + 1}?", "answer": str(2 * i + 1), "difficulty": i % 3} for i in range(n)]
    return write_jsonl(tmp_path / "qa.jsonl", rows), {f"What is {i} + {i + 1}?": str(2 * i + 1) for i in range(n)}


def prompt_dm(tokenizer_dir, path, batch_size=4):
    source = SourceSpec("json", path=str(path), options={"fields": {"prompt": "question"}, "extra": ["answer"]})
    blend = Blend([source], seed=0, split=[0, 0, 1], eval_fraction=0.0)
    return PromptDataModule(blend, HFTokenizer(tokenizer_dir), batch_size=batch_size, max_prompt_len=32)


def test_a_reward_function_receives_each_prompts_reference_answer(tokenizer_dir, tmp_path):
    path, truth = answer_rows(tmp_path)
    dm = prompt_dm(tokenizer_dir, path)
    module = build_ppo(
        dm,
        actor=spec(),
        critic=None,
        reward=CallableReward("rule_rewards:answer_seen"),
        advantage=GRPO(samples_per_prompt=2),
    )
    rule_rewards.SEEN.clear()
    trainer(tmp_path, max_steps=2).fit(module, datamodule=dm)
    assert len(rule_rewards.SEEN) == 2 * 4 * 2  # 2 steps x 4 prompts x 2 samples, each with its own answer
    assert all(truth[prompt] == answer for prompt, answer in rule_rewards.SEEN)
    assert len({p for p, _ in rule_rewards.SEEN}) == 8


def test_columns_errors_are_one_line_and_name_the_field(tmp_path):
    with pytest.raises(InputError, match=r"needs column 'answer' but the prompts carry \['label'\].*extra: \[answer\]"):
        CallableReward("rule_rewards:answer_seen")(["p"], ["r"], torch.zeros(1, 2), torch.ones(1, 2), {"label": [1]})
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "a?", "answer": "1"}, {"question": "b?"}])
    with pytest.raises(DataError, match=r"qa.jsonl:2: field 'answer' \(listed in 'extra'\) is missing"):
        load_source("json", path=str(path), options={"fields": {"prompt": "question"}, "extra": ["answer"]})
    # a function taking **columns gets all of them; one taking none still works
    seen = {}
    fn = CallableReward("rule_rewards:constant")
    assert fn(["p"], ["r"], torch.zeros(1, 2), torch.ones(1, 2), {"answer": ["1"]}).tolist() == [1.0]
    fn.fn, fn.takes_all, fn.required, fn.names = (lambda p, r, **kw: seen.update(kw) or 0.0), True, [], []
    fn(["p"], ["r"], torch.zeros(1, 2), torch.ones(1, 2), {"answer": ["1"], "tests": [["t"]]})
    assert seen == {"answer": "1", "tests": ["t"]}


class Handler(BaseHTTPRequestHandler):
    fail_first = 0  # answer 500 to this many requests first
    delay = 0.0
    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).received.append(body)
        if self.path == "/bad":
            self.send_error(400, "bad request")
            return
        if type(self).fail_first > 0:
            type(self).fail_first -= 1
            self.send_error(503, "busy")
            return
        time.sleep(type(self).delay)
        rewards = [float(r.strip() == a) for r, a in zip(body["responses"], body["columns"]["answer"])]
        data = json.dumps({"rewards": rewards}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    Handler.received, Handler.fail_first, Handler.delay = [], 0, 0.0
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_http_reward_batches_retries_and_reports_errors(server):
    ids, mask = torch.zeros(5, 3), torch.ones(5, 3)
    prompts, responses = [f"q{i}" for i in range(5)], [" 1", "2", " 3", "x", " 5"]
    columns = {"answer": ["1", "2", "0", "4", "5"]}
    Handler.fail_first = 1  # the first request is answered 503 and retried
    remote = HTTPReward(f"{server}/score", batch_size=2, timeout=5, retries=2, backoff=0.01)
    assert remote(prompts, responses, ids, mask, columns).tolist() == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert remote.requests == 4  # 3 batches of <= 2 rows + 1 retry
    assert [len(b["prompts"]) for b in Handler.received] == [2, 2, 2, 1]
    assert Handler.received[-1]["columns"] == {"answer": ["5"]}
    with pytest.raises(InputError, match=r"answered HTTP 400"):
        HTTPReward(f"{server}/bad", retries=3, backoff=0.01)(prompts, responses, ids, mask, columns)
    Handler.delay = 0.5
    with pytest.raises(InputError, match=r"failed after 2 attempts"):
        HTTPReward(f"{server}/score", timeout=0.1, retries=1, backoff=0.01)(prompts, responses, ids, mask, columns)


@pytest.fixture()
def dm(tokenizer_dir):
    from helpers import datamodule

    return datamodule(PromptDataModule, tokenizer_dir, batch_size=2, max_prompt_len=32)


def test_kl_in_the_loss_with_clip_higher_and_dr_grpo_aggregation(dm, tmp_path):
    algo = PPOConfig(
        ema_beta=None, kl_in_loss=True, kl_estimator="k3", clip_eps_high=0.28, loss_agg="seq_mean_token_sum_norm"
    )
    module = build_ppo(
        dm, actor=spec(), critic=None, reward=CallableReward("rule_rewards:word_count"), advantage=GRPO(2), algo=algo
    )
    actor0, ref0 = snapshot(module.ac.policy), snapshot(module.ref)
    t = trainer(tmp_path, max_steps=3)
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy) and unchanged(ref0, module.ref)
    m = t.callback_metrics
    assert "ppo/kl_loss" in m and "objective/kl" in m
    assert m["objective/non_score_reward"] == 0  # the KL is in the loss, not in the reward


def test_without_kl_no_reference_is_built(dm, tmp_path):
    module = build_ppo(
        dm,
        actor=spec(),
        critic=None,
        reward=CallableReward("rule_rewards:word_count"),
        advantage=GRPO(2),
        kl=FixedKL(0),
    )
    assert module.ref is None and module.kl.off
    actor0 = snapshot(module.ac.policy)
    t = trainer(tmp_path, max_steps=2)
    t.fit(module, datamodule=dm)
    assert changed(actor0, module.ac.policy)
    assert "objective/kl" not in t.callback_metrics and "objective/rlhf_reward" in t.callback_metrics


def test_dynamic_sampling_trains_only_on_informative_groups(dm, tmp_path):
    algo = PPOConfig(ema_beta=None, dynamic_sampling=True)
    module = build_ppo(
        dm, actor=spec(), critic=None, reward=CallableReward("rule_rewards:constant"), advantage=GRPO(2), algo=algo
    )
    actor0 = snapshot(module.ac.policy)
    t = trainer(tmp_path, max_steps=5, max_epochs=1, limit_train_batches=3)
    t.fit(module, datamodule=dm)
    # every group scored the same: no batch was ever full, no update happened, nothing is pending
    assert t.global_step == 0 and unchanged(actor0, module.ac.policy)
    assert module.buffer.size() == 0 and t.callback_metrics["rollout/informative_fraction"] == 0
    with pytest.raises(ValueError, match="dynamic_sampling needs a group estimator"):
        build_ppo(
            dm,
            actor=spec(),
            critic=None,
            reward=CallableReward("rule_rewards:constant"),
            advantage=REINFORCEPP(),
            algo=algo,
        )
    varied = build_ppo(
        dm, actor=spec(), critic=None, reward=CallableReward("rule_rewards:word_count"), advantage=GRPO(2), algo=algo
    )
    t = trainer(tmp_path / "b", max_steps=2, max_epochs=1, limit_train_batches=8)
    t.fit(varied, datamodule=dm)
    assert t.global_step == 2  # informative groups filled full batches (possibly over several rollouts)


def test_concatenated_rollouts_keep_every_rows_tokens_and_logprobs(dm):
    module = build_ppo(
        dm, actor=spec(), critic=None, reward=CallableReward("rule_rewards:word_count"), advantage=GRPO(2)
    )
    loader = iter(dm.train_dataloader())
    a, b = module.rollout(next(loader)), module.rollout(next(loader))
    assert a.prompt_len != b.prompt_len or a.mask.size(1) != b.mask.size(1)  # the widths differ
    both = concat_rollouts([a, select_rows(b, torch.tensor([True, False, True, True]))], dm.tokenizer.pad_token_id)
    assert both.mask.size(0) == 7 and both.prompts == a.prompts + [b.prompts[i] for i in (0, 2, 3)]
    lp = sequence_logprobs(module.ac.policy.eval(), both.input_ids, both.attention_mask, both.prompt_len)
    for row, (ro, i) in enumerate([(a, i) for i in range(4)] + [(b, i) for i in (0, 2, 3)]):
        n = int(ro.mask[i].sum())
        torch.testing.assert_close(both.logprobs[row, :n], ro.logprobs[i, :n])
        torch.testing.assert_close(lp[row, :n], ro.logprobs[i, :n], atol=1e-5, rtol=1e-5)  # padding changes nothing
        assert both.mask[row].sum() == n and both.scores[row] == ro.scores[i]


def test_overlong_filter_and_soft_penalty(dm):
    algo = PPOConfig(ema_beta=None, overlong_filter=True, overlong_buffer=4, overlong_penalty=1.0)
    module = build_ppo(
        dm, actor=spec(), critic=None, reward=CallableReward("rule_rewards:word_count"), advantage=GRPO(2), algo=algo
    )
    ro = module.rollout(next(iter(dm.train_dataloader())))
    assert ro.mask.size(1) == 6  # max_new_tokens: a random tiny model does not stop early
    ro.mask[:] = 0
    ro.mask[0, :6], ro.mask[1, :2] = 1, 1  # 6 tokens: at max_new_tokens, 2 tokens: before the buffer
    ro.mask[2:, :4] = 1  # 4 tokens: 2 into the 4-token buffer, penalty -0.5
    ro.ended[:] = torch.tensor([False, True, True, True])
    rewards, _, _ = module.updater.rewards(ro)
    module.algo.overlong_buffer = None
    plain, _, _ = module.updater.rewards(ro)
    last = ro.mask.sum(-1).long() - 1  # the score sits on each response's last token
    torch.testing.assert_close((rewards - plain)[torch.arange(4), last], torch.tensor([-1.0, 0.0, -0.5, -0.5]))
    adv, ret = module.updater.advantages(rewards, None, ro.mask)
    loss, _ = module.updater.minibatch_loss(module.ac, ro, torch.arange(4), adv, ret, None)
    ro.ended[:] = False  # every response cut off: the filter leaves nothing to learn from
    loss_none, _ = module.updater.minibatch_loss(module.ac, ro, torch.arange(4), adv, ret, None)
    assert loss_none.item() == 0 and loss.item() != 0


def test_arithmetic_task_and_checkers():
    rows = list(arithmetic(n=200, seed=3, ops="+-*", max_operand=20, demo_noise=0.25))
    assert rows == list(arithmetic(n=200, seed=3, ops="+-*", max_operand=20, demo_noise=0.25))  # seeded
    right = [exact_match(r["prompt"], r["response"], r["columns"]["answer"]) for r in rows]
    assert 0.6 < sum(right) / len(right) < 0.9  # the demonstrations are wrong about 25% of the time
    assert all(parsed_answer(r["prompt"], " " + r["columns"]["answer"]) == 1.0 for r in rows)
    assert exact_match("", " 41 or 42", "42") == 1.0 and exact_match("", " 42 or 41", "42") == 0.0
    assert exact_match("", "The answer to 7 + 5 is 12.", 12) == 1.0
    assert exact_match("", " -7.", -7) == 1.0 and exact_match("", " no idea", "3") == 0.0
    with pytest.raises(ValueError, match="ops"):
        list(arithmetic(n=1, ops="/"))


def test_evaluate_cli_passes_jsonl_fields_to_the_checker(tokenizer_dir, tmp_path, capsys):
    from transformers import AutoTokenizer

    from rlhf_lit.apps.evaluate import main

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    policy = tmp_path / "policy"
    spec().build_causal_lm(tok).save_pretrained(policy)
    tok.save_pretrained(policy)
    with_answers = write_jsonl(
        tmp_path / "qa.jsonl", [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(4)]
    )
    args = ["--policy", str(policy), "--gold", "datamodules.verifiable:exact_match", "--max-new-tokens", "4"]
    assert main([*args, "--prompts", str(with_answers)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["A"]["n"] == 4 and 0 <= result["A"]["gold_reward_mean"] <= 1
    bare = write_jsonl(tmp_path / "q.jsonl", [{"prompt": "What is 1 + 1?"}])
    assert main([*args, "--prompts", str(bare)]) == 1
    assert "needs column 'answer'" in capsys.readouterr().err


def test_a_reward_source_without_columns_still_works():
    from rlhf_lit.rl.rewards import score

    legacy = lambda prompts, responses, ids, mask: torch.ones(len(prompts))  # forward before columns existed
    assert score(legacy, ["p"], ["r"], torch.zeros(1, 2), torch.ones(1, 2)).tolist() == [1.0]
    with pytest.raises(TypeError):  # given columns, it is called with them (and must take them)
        score(legacy, ["p"], ["r"], torch.zeros(1, 2), torch.ones(1, 2), {"answer": ["1"]})
