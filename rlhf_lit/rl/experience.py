"""PPO's experience room: sample responses, score them (reward source, reference, old log-probs and values),
and the rollout batch's bookkeeping (DAPO's dynamic-sampling buffer, the step's metrics).

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.hf.models import gathered
from rlhf_lit.math.rl import overlong_penalty, varied_groups
from rlhf_lit.rl.actor_critic import ActorCritic, sequence_logprobs
from rlhf_lit.rl.config import PPOConfig
from rlhf_lit.rl.generation import GenerationConfig, decode, sample, stop_ids
from rlhf_lit.rl.rewards import score


@dataclass
class Rollout:
    """One batch of experience. ids/mask: (B, P + R); the rest (B, R) except scores (B,)."""

    input_ids: Tensor
    attention_mask: Tensor
    prompt_len: int
    mask: Tensor
    logprobs: Optional[Tensor]
    """old log-probs; None until the first training forward fills them (``score_policy=False``)"""
    ref_logprobs: Optional[Tensor]
    values: Optional[Tensor]
    scores: Tensor
    entropy: Optional[Tensor]
    prompts: list[str]
    responses: list[str]
    ended: Tensor
    """(B,) True where the response's last kept token is a stop token (eos or end-of-turn), wherever it
    lands, the last generated column included"""
    timing: dict = field(default_factory=dict)
    columns: dict = field(default_factory=dict)
    """the rows' extra fields, ``{name: [B values]}`` (what reward functions received)"""
    engine_logprobs: Optional[Tensor] = None
    """(B, R) the sampling engine's own log-probs of the response tokens (vLLM), else None"""

    @property
    def eos_fraction(self) -> Tensor:
        return self.ended.float().mean()


def repeat_groups(batch: dict, k: int) -> tuple[Tensor, Tensor, list[str], dict]:
    """A prompt batch's ids and mask (B, P), texts and extra columns, each row repeated ``k`` times in
    adjacent rows (group estimators sample k responses per prompt): (B * k, P) and lists of B * k."""
    ids, mask, prompts, columns = batch["prompt_ids"], batch["prompt_mask"], batch["prompt"], batch.get("columns") or {}
    if k > 1:
        ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
        prompts = [p for p in prompts for _ in range(k)]
        columns = {name: [v for v in col for _ in range(k)] for name, col in columns.items()}
    return ids, mask, prompts, columns


def fill_from_forward(ac: ActorCritic, ro: Rollout, temperature: float, algo: Optional[PPOConfig] = None) -> tuple:
    """The fused first forward (PPOConfig.fuse_first_forward): the training forward of the whole batch, whose
    detached log-probs, entropy and values become the rollout's old ones (one pass instead of two).
    Returns the forward's (logprobs, entropy, values), with gradients, for the update (the entropy's only
    where ``algo`` has an entropy bonus)."""
    out = ac(ro.input_ids, ro.attention_mask, ro.prompt_len, temperature, algo is None or algo.entropy_bonus)
    ro.logprobs, ro.entropy = out[0].detach(), out[1].detach()
    ro.values = out[2].detach() if out[2] is not None else None
    return out


def sample_rows(ro: Rollout) -> list[dict]:
    """The rollout's prompt, response and score per row (the sample table's rows)."""
    return [{"prompt": p, "response": r, "score": float(s)} for p, r, s in zip(ro.prompts, ro.responses, ro.scores)]


@torch.no_grad()
def make_rollout(
    ac: ActorCritic,
    ref: nn.Module,
    reward: nn.Module,
    tokenizer,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    prompts: list[str],
    gen: GenerationConfig,
    ref_from_adapters: bool = False,
    synced_gpus: bool = False,
    score_policy: bool = True,
    columns: Optional[dict] = None,
    engine=None,
) -> Rollout:
    """Sample responses with the actor, then score them with the reward source, the reference, the
    actor (old log-probs) and the critic (old values). prompt_ids, prompt_mask: (B, P) left-padded.

    ``score_policy=False`` skips the actor/critic pass (logprobs, entropy, values left None): with one
    PPO epoch of one minibatch the first training forward computes exactly those, so the caller takes
    them from it, detached, instead of running the actor and critic twice. Without a reference (``ref``
    None and no adapters: no KL anywhere) ``ref_logprobs`` is None. ``engine``: the vLLM engine that samples
    (``gen.engine == 'vllm'``); its own log-probs are kept as ``engine_logprobs``.
    """
    t0 = time.perf_counter()
    # ZeRO-3: gather the actor once per rollout, not per token; an engine holds its own copy (synced by the caller)
    with contextlib.nullcontext() if engine is not None else gathered(ac.policy.parameters()):
        responses, mask, engine_logprobs = sample(
            ac.policy, tokenizer, prompt_ids, prompt_mask, gen, synced_gpus=synced_gpus, engine=engine
        )
    t1 = time.perf_counter()
    input_ids = torch.cat([prompt_ids, responses], 1)
    attention_mask = torch.cat([prompt_mask, mask], 1)
    p = prompt_ids.size(1)
    stops = stop_ids(tokenizer, gen)
    ended = ended_with_stop(responses, mask, stops)
    texts = decode(tokenizer, responses, mask, stops)
    scores = score(reward, prompts, texts, input_ids, attention_mask, columns, ended).float()
    logprobs = entropy = values = ref_logprobs = None
    # Experience is scored in eval mode (DeepSpeed-Chat, OpenRLHF): with dropout active the old
    # log-probs and values would be noisy, and KL to an identical reference would not be 0 (#13).
    was_training = ac.training
    ac.eval()
    try:
        if score_policy:
            logprobs, entropy, values = ac(input_ids, attention_mask, p, gen.temperature)
        if ref_from_adapters:  # LoRA actor: the reference is the base model with adapters off (no copy)
            with ac.policy.disable_adapter():
                ref_logprobs = sequence_logprobs(ac.policy, input_ids, attention_mask, p, gen.temperature)
        elif ref is not None:
            ref_logprobs = sequence_logprobs(ref, input_ids, attention_mask, p, gen.temperature)
    finally:
        ac.train(was_training)
    t2 = time.perf_counter()
    return Rollout(
        input_ids,
        attention_mask,
        p,
        mask.float(),
        logprobs,
        ref_logprobs,
        values,
        scores,
        entropy,
        prompts,
        texts,
        ended,
        {"generate_s": t1 - t0, "score_s": t2 - t1},
        dict(columns or {}),
        engine_logprobs,
    )


def ended_with_stop(responses: Tensor, mask: Tensor, stops: list[int]) -> Tensor:
    """(B, R) responses and mask -> (B,) whether each row's last kept token is a stop token. Read from
    the tokens, not from the mask's length: a stop in the last column leaves the mask full."""
    if responses.size(1) == 0:
        return torch.zeros(responses.size(0), dtype=torch.bool, device=responses.device)
    last = responses.gather(1, (mask.long().sum(-1) - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.isin(last, torch.tensor(stops, device=responses.device)) & (mask.sum(-1) > 0)


def select_rows(ro: Rollout, keep: Tensor) -> Rollout:
    """The rows of ``ro`` where ``keep`` (B,) bool is True."""
    idx = keep.nonzero().squeeze(-1)
    rows = idx.tolist()
    out = {}
    for f in fields(ro):
        v = getattr(ro, f.name)
        if isinstance(v, Tensor):
            v = v[idx]
        elif isinstance(v, list):
            v = [v[i] for i in rows]
        elif f.name == "columns":
            v = {k: [col[i] for i in rows] for k, col in v.items()}
        out[f.name] = v
    return Rollout(**out)


def concat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Rollouts of different prompt and response widths as one: prompts left-padded to the widest P,
    responses right-padded to the widest R (padding is masked; positions come from the mask)."""
    p, r = max(x.prompt_len for x in parts), max(x.mask.size(1) for x in parts)

    def widen(x: Rollout, t: Tensor, value) -> Tensor:  # (B, P_x + R_x) -> (B, P + R)
        left, right = p - x.prompt_len, r - x.mask.size(1)
        return torch.nn.functional.pad(t, (left, right), value=value)

    def cat(name: str) -> Optional[Tensor]:
        ts = [getattr(x, name) for x in parts]
        if any(t is None for t in ts):
            return None
        if ts[0].dim() == 1:
            return torch.cat(ts)
        return torch.cat([torch.nn.functional.pad(t, (0, r - t.size(1))) for t in ts])

    timing: dict = {}
    for x in parts:
        for k, v in x.timing.items():
            timing[k] = timing.get(k, 0.0) + v
    names = {k for x in parts for k in x.columns}
    return Rollout(
        input_ids=torch.cat([widen(x, x.input_ids, pad_id) for x in parts]),
        attention_mask=torch.cat([widen(x, x.attention_mask, 0) for x in parts]),
        prompt_len=p,
        mask=cat("mask"),
        logprobs=cat("logprobs"),
        ref_logprobs=cat("ref_logprobs"),
        values=cat("values"),
        scores=cat("scores"),
        entropy=cat("entropy"),
        prompts=[t for x in parts for t in x.prompts],
        responses=[t for x in parts for t in x.responses],
        ended=cat("ended"),
        engine_logprobs=cat("engine_logprobs"),
        timing=timing,
        columns={k: [v for x in parts for v in x.columns.get(k, [None] * len(x.prompts))] for k in names},
    )


def penalised_scores(ro: Rollout, algo: PPOConfig, max_new_tokens: int) -> Tensor:
    """(B,) scores after the missing-eos penalty, DAPO's soft overlong punishment and the clip."""
    scores = ro.scores
    if algo.missing_eos_penalty is not None:
        scores = scores - algo.missing_eos_penalty * (~ro.ended).float()
    if algo.overlong_buffer is not None:
        scores = scores + overlong_penalty(ro.mask.sum(-1), max_new_tokens, algo.overlong_buffer, algo.overlong_penalty)
    if algo.score_clip is not None:
        scores = scores.clamp(-algo.score_clip, algo.score_clip)
    return scores


class InformativeBuffer:
    """DAPO's dynamic sampling (Yu et al. 2025): groups whose scores are all equal carry no signal from
    their scores and are dropped (filtered on the scores before any KL penalty, as DAPO filters on
    accuracy); the others wait here until a full batch is ready. Only valid while the policy does not
    change, which holds because no update happens until then."""

    def __init__(self, group_size: int, pad_id: int) -> None:
        self.group_size, self.pad_id = group_size, pad_id
        self.pending: Optional[Rollout] = None

    def add(self, ro: Rollout) -> float:
        """Keep ``ro``'s informative groups; returns the share of rows kept."""
        self.device = ro.mask.device  # the collective runs on the rollouts' device (NCCL needs CUDA tensors)
        keep = varied_groups(ro.scores, self.group_size)
        kept = select_rows(ro, keep)
        self.pending = kept if self.pending is None else concat_rollouts([self.pending, kept], self.pad_id)
        return float(keep.float().mean())

    def size(self) -> int:
        return 0 if self.pending is None else self.pending.mask.size(0)

    def ready(self, n: int, any_rank=bool) -> Optional[Rollout]:
        """The first ``n`` pending rows once at least ``n`` are pending on every rank (``any_rank``: whether a
        flag holds on any rank, so all ranks decide together), else None."""
        short = torch.tensor(self.size() < n, device=self.device)
        return None if any_rank(short) else self.take(n)

    def take(self, n: int) -> Rollout:
        """The first ``n`` pending rows (whole groups when n is a multiple of the group size); the rest is
        dropped, as DAPO does."""
        out, self.pending = select_rows(self.pending, torch.arange(self.size()) < n), None
        return out
