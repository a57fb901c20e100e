"""Rollouts through vLLM (issue #25), on the CPU with the real SmolLM2-135M-Instruct: the engine's greedy
tokens against rlhf-lit's kv_loop, weight sync after a PPO step, engine-sampled PPO and GRPO runs, the
engine-vs-trainer log-prob mismatch. Skipped, with the reason, where vLLM or the model is not installed."""

import importlib.util

import pytest
import torch
from conftest import REPO
from helpers import changed, snapshot, trainer, unchanged

MODEL = REPO / "models" / "smollm2-135m-instruct"
needs_vllm = [
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None, reason="vLLM is not installed: `make vllm` installs it"
    ),
    pytest.mark.skipif(not (MODEL / "model.safetensors").exists(), reason="the real model: run `make smollm2`"),
]


def test_engine_vllm_without_vllm_is_one_line_error_naming_the_install(tmp_path, monkeypatch, capsys):
    import sys

    from rlhf_lit.apps.cli import main

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    cfg = tmp_path / "gen.yaml"
    cfg.write_text("model:\n  init_args:\n    generation: {engine: vllm, max_new_tokens: 4}\n")
    code = main(["fit", "--config", str(REPO / "configs/ppo/tiny.yaml"), "--config", str(cfg)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1, err
    assert "make vllm" in err[0] and "Traceback" not in err[0]
    from rlhf_lit.rl.generation import GenerationConfig
    from rlhf_lit.rl.vllm_engine import VLLMOptions

    with pytest.raises(ValueError, match="generation.vllm.dtype must be one of"):
        GenerationConfig(engine="vllm", vllm=VLLMOptions(dtype="int8"))


QUESTIONS = [
    "What is the capital of France?",
    "Name three fruits.",
    "What is 7 plus 5?",
    "Write one sentence about the sea.",
]


def smollm2():
    from rlhf_lit.hf.tokenizer import HFTokenizer

    tok = HFTokenizer(str(MODEL), chat_template="auto").load()
    model = __import__("transformers").AutoModelForCausalLM.from_pretrained(str(MODEL)).eval()
    return model, tok


def prompts(tok):
    from rlhf_lit.hf.chat_format import ChatFormat
    from rlhf_lit.math.ops import pad_sequences

    ids = ChatFormat(tok).prompt_ids([[{"role": "user", "content": q}] for q in QUESTIONS])
    return pad_sequences(ids, tok.pad_token_id, side="left")


@pytest.fixture(scope="module")
def engine_and_model():
    for mark in needs_vllm:
        if mark.args[0]:
            pytest.skip(mark.kwargs["reason"])
    from rlhf_lit.rl.vllm_engine import VLLMEngine, VLLMOptions

    model, tok = smollm2()
    engine = VLLMEngine.from_model(model, tok, VLLMOptions(dtype="float32"), seed=0)
    yield engine, model, tok
    engine.close()


def greedy(model, tok, engine=None, n=16):
    from rlhf_lit.rl.generation import GenerationConfig, sample

    ids, mask = prompts(tok)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, engine="vllm" if engine else "kv_loop")
    return sample(model, tok, ids, mask, cfg, engine=engine)


def test_greedy_engine_tokens_equal_kv_loop_and_its_logprobs_the_trainers(engine_and_model):
    engine, model, tok = engine_and_model
    ours, our_mask, none = greedy(model, tok)
    theirs, their_mask, engine_lp = greedy(model, tok, engine)
    assert none is None and engine_lp.shape == theirs.shape
    assert theirs.size(0) == len(QUESTIONS)
    # the same (B, R) layout and stop semantics: the first 16 tokens of every prompt agree (fp32 engine)
    assert torch.equal(theirs[:, :16], ours[:, :16]) and torch.equal(their_mask, our_mask)
    # the engine's log-probs of its tokens are the trainer's within fp32 kernel differences
    assert mismatch(model, tok, theirs, their_mask, engine_lp) < 1e-3
    assert (engine_lp * their_mask).sum() < 0  # real log-probs, not zeros


def mismatch(model, tok, responses, mask, engine_lp) -> float:
    """max |trainer log-prob - engine log-prob| over the response tokens"""
    from rlhf_lit.hf.models import next_token_logprobs

    ids, prompt_mask = prompts(tok)
    full, full_mask = torch.cat([ids, responses], 1), torch.cat([prompt_mask, mask], 1)
    with torch.no_grad():
        lp = next_token_logprobs(model, input_ids=full, attention_mask=full_mask)[:, ids.size(1) - 1 :]
    return float(((lp - engine_lp).abs() * mask).max())


def test_sync_pushes_new_weights_into_the_engine(engine_and_model):
    engine, model, tok = engine_and_model
    before, _, _ = greedy(model, tok, engine)
    changed_model = __import__("copy").deepcopy(model)
    with torch.no_grad():  # a layer and the (tied) embeddings changed
        changed_model.model.layers[0].mlp.down_proj.weight.mul_(1.5)
        changed_model.model.embed_tokens.weight.mul_(1.1)
    engine.sync(changed_model)
    after, after_mask, after_lp = greedy(changed_model, tok, engine)
    ours, _, _ = greedy(changed_model, tok)
    assert not torch.equal(after, before)  # the reload took effect
    assert torch.equal(after, ours)  # and the engine now computes the new model,
    # its tied LM head included (a stale head left the tokens and moved the log-probs by 0.77 nats)
    assert mismatch(changed_model, tok, after, after_mask, after_lp) < 1e-3
    engine.sync(model)  # back, for the fixture's other users
    again, _, _ = greedy(model, tok, engine)
    assert torch.equal(again, before)


def ppo_module(estimator: str, dtype: str, tis_cap=None):
    from modules import PPOModule
    from rlhf_lit.hf.models import HFModel
    from rlhf_lit.math.estimators import GRPO
    from rlhf_lit.math.kl_control import FixedKL
    from rlhf_lit.rl.config import PPOConfig
    from rlhf_lit.rl.generation import GenerationConfig
    from rlhf_lit.rl.rewards import CallableReward
    from rlhf_lit.rl.vllm_engine import VLLMOptions

    grpo = estimator == "grpo"
    return PPOModule(
        actor=HFModel(str(MODEL)),
        critic=None if grpo else HFModel(str(MODEL)),
        reward=CallableReward("datamodules.verifiable:exact_match"),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
        kl=FixedKL(0.05),
        advantage=GRPO(samples_per_prompt=2) if grpo else None,
        generation=GenerationConfig(max_new_tokens=8, temperature=0.7, engine="vllm", vllm=VLLMOptions(dtype=dtype)),
        algo=PPOConfig(ema_beta=None, score_clip=None, kl_in_loss=grpo, kl_estimator="k3", tis_cap=tis_cap),
        samples_every=0,
    )


def csv_rows(path) -> list[dict]:
    import csv

    return list(csv.DictReader(open(next(path.rglob("metrics.csv")))))


class EngineFollowsActor(__import__("lightning").Callback):
    """After each training step (its optimizer step and the sync), the engine's greedy answers and the
    trained actor's own (kv_loop) greedy answers to the same prompts."""

    def __init__(self):
        self.pairs = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        tok = module.tokenizer
        engine_tokens, _, _ = greedy(module.ac.policy, tok, module.engine, n=8)
        actor_tokens, _, _ = greedy(module.ac.policy, tok, n=8)
        self.pairs.append((engine_tokens, actor_tokens))


@pytest.mark.slow
@needs_vllm[0]
@needs_vllm[1]
@pytest.mark.parametrize("estimator,dtype", [("ppo", "float32"), ("grpo", "bfloat16")])
def test_three_engine_sampled_steps_train_the_actor_and_log_the_mismatch(estimator, dtype, tmp_path):
    from datamodules import Blend, PromptDataModule, SourceSpec
    from rlhf_lit.hf.tokenizer import HFTokenizer

    dm = PromptDataModule(
        Blend(
            [SourceSpec("arithmetic", options={"n": 40, "seed": 0, "suffix": " Answer with the number only."})],
            seed=0,
            eval_fraction=0.0,
        ),
        HFTokenizer(str(MODEL), chat_template="auto"),
        batch_size=2,
        max_prompt_len=48,
    )
    module = ppo_module(estimator, dtype, tis_cap=2.0)
    follow = EngineFollowsActor()
    t = trainer(tmp_path, max_steps=3, callbacks=[follow])
    t.strategy.connect(module)
    dm.prepare_data()
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    actor, ref = snapshot(module.ac.policy), snapshot(module.ref)
    t.fit(module, datamodule=dm)
    assert changed(actor, module.ac.policy) and unchanged(ref, module.ref)
    assert len(follow.pairs) == 3
    diffs = [float(r["rollout/logprob_diff_mean"]) for r in csv_rows(tmp_path) if r.get("rollout/logprob_diff_mean")]
    if dtype == "float32":  # sync works, not only runs: after each step the engine computes as the actor
        assert all(torch.equal(e, a) for e, a in follow.pairs)
        assert len(diffs) == 3 and max(diffs) < 1e-3, diffs
    else:  # a bf16 engine against the fp32 trainer: small, not zero
        assert len(diffs) == 3 and all(0 < d < 0.5 for d in diffs), diffs
    logged = {k for r in csv_rows(tmp_path) for k, v in r.items() if v}
    for key in ("rollout/logprob_diff_mean", "rollout/logprob_diff_max", "rollout/tis_weight_mean", "time/sync_s"):
        assert key in logged, key
    assert module.engine is None  # closed at the end of the fit


@needs_vllm[0]
@needs_vllm[1]
def test_chat_answers_through_the_engine(monkeypatch, capsys):
    import io

    from rlhf_lit.apps.chat import main

    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\nquit\n"))
    code = main(["--model", str(MODEL), "--engine", "vllm", "--greedy", "--max-new-tokens", "12"])
    out = capsys.readouterr().out.splitlines()
    assert code in (0, None) and out[0] == "Human: What is the capital of France?"
    assert out[1].startswith("Assistant:") and "Paris" in out[1], out


def test_engine_weights_of_a_lora_actor_are_the_merged_plain_checkpoint(tok):
    """What the engine loads (at build and every sync): the plain model's names and the merged weights, no
    adapter tensors; the tied LM head left out."""
    from rlhf_lit.hf.models import LoRA, TinyModel, apply_lora
    from rlhf_lit.rl.vllm_engine import engine_weights, merged_adapters

    spec = TinyModel(family="llama", hidden_size=32, num_layers=2, num_heads=4, ffn_size=64)
    plain = spec.build_causal_lm(tok)
    lora = apply_lora(spec.build_causal_lm(tok), LoRA(r=4, alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_()  # adapters that change the weights
    with merged_adapters(lora):  # the tensors are the base weights themselves: copied while merged
        merged = {k: v.clone() for k, v in engine_weights(lora)}
    want = dict(engine_weights(plain))
    assert merged.keys() == want.keys() and not any("lora" in k for k in merged)
    assert ("lm_head.weight" in want) is not bool(plain.config.tie_word_embeddings)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], want[q])  # the adapters' delta is in
    # unmerged again outside the block (peft's subtraction leaves float rounding in the frozen base)
    torch.testing.assert_close(dict(engine_weights(lora))[q], want[q], atol=1e-6, rtol=0)


@pytest.mark.slow
@needs_vllm[0]
@needs_vllm[1]
def test_engine_built_from_a_lora_actor_computes_the_merged_model():
    """The engine's first copy is written from the merged weights under their plain names (a LoRA model's own
    save would carry base_layer/lora tensors the engine cannot load)."""
    from rlhf_lit.hf.models import LoRA, apply_lora
    from rlhf_lit.rl.vllm_engine import VLLMEngine, VLLMOptions

    model, tok = smollm2()
    lora = apply_lora(model, LoRA(r=4, alpha=8))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    engine = VLLMEngine.from_model(lora, tok, VLLMOptions(dtype="float32"), seed=0)
    try:
        theirs, mask, engine_lp = greedy(lora, tok, engine)
        ours, _, _ = greedy(lora, tok)
        assert torch.equal(theirs, ours)
        assert mismatch(lora, tok, theirs, mask, engine_lp) < 1e-3
    finally:
        engine.close()
