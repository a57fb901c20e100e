"""A bare PyTorch + transformers loop doing the same math as rlhf-lit's stages on the benchmark
workload: no Lightning, no callbacks, no logging. Ours ÷ this is the framework's overhead.

    python benchmarks/run_bare.py sft --workload runs/bench/workload-tiny --steps 40 --warmup 5

Data encoding and the pure math (losses, GAE, PPO losses, rollout scoring, a reward pair packed in one
row) are the library's: what this leaves out is what the Lightning modules add around them. Models are
transformers' as loaded (their sdpa attention) and SFT computes the full logits, as a hand-written loop
does; rlhf-lit's model builders run attention in fp32 on CPU and its SFT runs the LM head on the loss's
positions only (benchmarks/README.md measures each).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from common import HPARAMS, UNITS, StepLog, emit, parser, read_jsonl
from torch.utils.data import DataLoader, RandomSampler
from transformers import AutoModelForCausalLM, AutoTokenizer

from datamodules import collate as C
from rlhf_lit.hf.models import load_scalar_model
from rlhf_lit.hf.models.forward import PADDING_FREE_ENV
from rlhf_lit.math import losses
from rlhf_lit.math import rl as ppo
from rlhf_lit.math.ops import logprobs_from_logits, pack_shared_prompt
from rlhf_lit.rl.actor_critic import ActorCritic
from rlhf_lit.rl.experience import make_rollout
from rlhf_lit.rl.generation import GenerationConfig

H = HPARAMS


def batches(items, collate, steps: int):
    """``steps`` shuffled batches, cycling over the data."""
    g = torch.Generator().manual_seed(H["seed"])
    while True:
        for batch in DataLoader(
            items, batch_size=H["batch_size"], sampler=RandomSampler(items, generator=g), collate_fn=collate
        ):
            if steps == 0:
                return
            steps -= 1
            yield batch


def optimizer(*groups):
    # fused: what rlhf-lit and Hugging Face's Trainer pick for Adam on CPU (rlhf_lit.training.optim.with_fused_kernel)
    return torch.optim.AdamW([p for g in groups for p in g.parameters() if p.requires_grad], lr=H["lr"], fused=True)


def run_sft(w: Path, tok, records, steps: int, log: StepLog) -> None:
    items, _ = C.encode_sft(tok, [{"prompt": r["prompt"], "response": r["chosen"]} for r in records], H["max_seq_len"])
    model = AutoModelForCausalLM.from_pretrained(w / "policy").train()
    opt = optimizer(model)
    log.start()
    for b in batches(items, lambda x: C.collate_sft(x, tok.pad_token_id), steps):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
        loss, _ = losses.sft_loss(logprobs_from_logits(logits[:, :-1], b["input_ids"][:, 1:]), b["loss_mask"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.end(units=b["input_ids"].size(0), tokens=int(b["attention_mask"].sum()))


def run_reward(w: Path, tok, records, steps: int, log: StepLog) -> None:
    items, _ = C.encode_pairs(tok, records, H["max_seq_len"])
    model = load_scalar_model(str(w / "reward")).train()
    opt = optimizer(model)
    log.start()
    for b in batches(items, lambda x: C.collate_pairs(x, tok.pad_token_id), steps):
        # As RewardModule: each pair in one row, its prompt once, the two responses apart under a 4D mask.
        n = b["input_ids"].size(0) // 2
        packed = pack_shared_prompt(b["input_ids"], b["attention_mask"], b["prompt_len"], tok.pad_token_id)
        scores = model.score_packed(*packed)
        loss = -F.logsigmoid(scores[:, 0] - scores[:, 1]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.end(units=n, tokens=int(b["attention_mask"].sum()))


def run_ppo(w: Path, tok, records, steps: int, log: StepLog) -> None:
    items, _ = C.encode_prompts(tok, records, H["max_prompt_len"])
    policy = AutoModelForCausalLM.from_pretrained(w / "policy")
    ac = ActorCritic(policy, load_scalar_model(str(w / "reward"))).train()
    ref = AutoModelForCausalLM.from_pretrained(w / "policy").eval().requires_grad_(False)
    reward = load_scalar_model(str(w / "reward")).eval().requires_grad_(False)
    score = lambda prompts, texts, ids, mask: reward.score(ids, mask)
    opt = optimizer(ac)
    gen = GenerationConfig(max_new_tokens=H["response_length"], temperature=H["temperature"])
    log.start()
    for b in batches(items, lambda x: C.collate_prompts(x, tok.pad_token_id), steps):
        # One PPO epoch, one minibatch: the old log-probs and values are the training forward's, detached.
        ro = make_rollout(ac, ref, score, tok, b["prompt_ids"], b["prompt_mask"], b["prompt"], gen, score_policy=False)
        # entropy_grad=False: a plain loop keeps no graph of an entropy it never uses
        logprobs, _, values = ac(ro.input_ids, ro.attention_mask, ro.prompt_len, gen.temperature, entropy_grad=False)
        old_lp, old_v = logprobs.detach(), values.detach()
        rewards, _ = ppo.shaped_rewards(ro.scores, old_lp, ro.ref_logprobs, ro.mask, H["kl_coef"])
        adv, ret = ppo.gae(rewards, old_v, ro.mask)
        adv = ppo.whiten(adv, ro.mask)
        loss, _ = ppo.policy_loss(logprobs, old_lp, adv, ro.mask)
        vf, _ = ppo.value_loss(values, old_v, ret, ro.mask)
        opt.zero_grad()
        (loss + vf).backward()
        opt.step()
        log.end(units=ro.mask.size(0))


def main() -> None:
    p = parser(__doc__)
    a = p.parse_args()
    torch.manual_seed(H["seed"])
    w = Path(a.workload)
    tok = AutoTokenizer.from_pretrained(w / "tokenizer")
    log = StepLog()
    # bf16: autocast around the whole step, as Lightning's bf16-mixed does (fp32 master weights)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.dtype == "bf16"):
        {"sft": run_sft, "reward": run_reward, "ppo": run_ppo}[a.task](
            w, tok, read_jsonl(w / "records.jsonl"), a.steps + a.warmup, log
        )
    emit("bare", a.task, log, a.warmup, unit=UNITS[a.task])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # A plain loop runs padded rows: the library's padding-free forward (which its scalar models, built by
    # load_scalar_model, would otherwise take on CPU) is rlhf-lit's, measured as such (#30)
    os.environ.setdefault(PADDING_FREE_ENV, "0")
    main()
