"""PPO's experience: the actor-critic wrapper, the algorithm's knobs, and rollout generation + scoring.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor, nn

from rlhf_lit.generation import GenerationConfig, decode, sample, stop_ids
from rlhf_lit.models import ScalarModel, gathered, lm_hidden, lm_inputs
from rlhf_lit.ops import chunked_logprobs, masked_mean
from rlhf_lit.ppo import KL_ESTIMATORS, LOSS_AGGREGATIONS, overlong_penalty, varied_groups
from rlhf_lit.rewards import score


@dataclass
class PPOConfig:
    """The knobs of the PPO update (defaults: DeepSpeed-Chat's / InstructGPT's published settings)."""

    ppo_epochs: int = 1
    """passes over each rollout batch"""
    num_minibatches: int = 1
    """shuffled minibatches per pass (one optimizer step each)"""
    clip_eps: float = 0.2
    """policy ratio clip (the lower side, and the upper one unless clip_eps_high is set)"""
    clip_eps_high: Optional[float] = None
    """upper ratio clip, 1 + clip_eps_high (DAPO's clip-higher: 0.28 with clip_eps 0.2); None: clip_eps"""
    loss_agg: str = "token_mean"
    """how per-token policy (and KL) losses become one number: token_mean, seq_mean_token_mean (GRPO's
    paper) or seq_mean_token_sum_norm (Dr. GRPO: each sequence's sum / max_new_tokens)"""
    kl_in_loss: bool = False
    """put the KL to the reference in the loss (kl coefficient x kl_estimator on the current log-probs;
    the estimator then defaults to GRPO's k3) instead of in the reward; the rollout's KL is still measured
    and logged"""
    dynamic_sampling: bool = False
    """group estimators: drop groups whose scores are all equal (no signal from the scores; a KL penalty in
    the reward would still differ between their rows, as in DAPO, which filters on accuracy) and keep
    sampling batches until one full batch of informative groups is ready (DAPO); the excess is dropped"""
    overlong_filter: bool = False
    """leave responses cut at max_new_tokens without a stop token out of the loss (DAPO)"""
    overlong_buffer: Optional[int] = None
    """DAPO's soft overlong punishment: the score falls linearly by up to overlong_penalty over the last
    overlong_buffer tokens before max_new_tokens (None: off)"""
    overlong_penalty: float = 1.0
    """the score lost at max_new_tokens (with overlong_buffer)"""

    def fused(self, dropout_active: bool) -> bool:
        """Whether the first training forward can stand in for the scoring pass (see fuse_first_forward)."""
        return self.fuse_first_forward and self.ppo_epochs == 1 and self.num_minibatches == 1 and not dropout_active

    value_clip: Optional[float] = 0.2
    """value clip around the rollout's values (None: plain squared error)"""
    vf_coef: float = 1.0
    """weight of the value loss in the combined loss"""
    entropy_coef: float = 0.0
    """entropy bonus weight"""
    kl_estimator: Optional[str] = None
    """per-token KL estimator: k1, k2 or k3 (default: k1 as a reward penalty, k3 with kl_in_loss). In the
    loss, k1's expected gradient on-policy is exactly 0 (it regularises nothing: refused); k2's is the
    gradient of KL(actor||ref), k3's that of KL(ref||actor) (#27)"""
    score_clip: Optional[float] = 5.0
    """clip rewards to ±score_clip (None: no clipping)"""
    whiten_advantages: bool = True
    """whiten GAE advantages over the batch's tokens (group estimators' advantages never are)"""
    whiten_rewards: bool = False
    missing_eos_penalty: Optional[float] = None
    """subtracted from the score of responses that hit max_new_tokens without eos"""
    ptx_coef: float = 0.0
    """weight of the pretraining/SFT loss mixed into the actor's (InstructGPT's gamma); needs ptx data"""
    ema_beta: Optional[float] = 0.992
    """EMA of the actor's weights after every step (None: no EMA)"""
    critic_lr: float = 5e-6
    """learning rate of the critic's parameter group"""
    max_ratio: Optional[float] = 20.0
    """skip a minibatch whose max policy ratio exceeds this (a diverged update; logged)"""
    fuse_first_forward: bool = True
    """with ppo_epochs 1 and one minibatch, take the old log-probs and values from the training forward
    (detached) instead of a separate scoring pass: same update, one actor+critic forward fewer. Only
    when no dropout is active (a train-mode forward with dropout is not the eval-mode scoring pass)"""
    actor_max_grad_norm: Optional[float] = 1.0
    """clip the actor's gradient to this norm (None: no clipping); actor and critic are clipped
    separately, as DeepSpeed-Chat's two engines do, so a large critic gradient never shrinks the actor's
    step. Under DeepSpeed the engine's ``gradient_clipping`` (one joint norm) applies instead"""
    critic_max_grad_norm: Optional[float] = 1.0
    """clip the critic's (or value head's) gradient to this norm (None: no clipping)"""
    tis_cap: Optional[float] = None
    """truncated importance sampling (Yao et al. 2025) when a separate engine samples (generation.engine:
    vllm): each token's policy loss is weighted by min(pi_trainer / pi_engine, tis_cap), correcting for
    the engine's numerics differing from the trainer's (e.g. 2.0; None: off)"""

    def __post_init__(self):
        if self.ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError("ppo_epochs and num_minibatches must be >= 1")
        if self.kl_estimator is None:
            self.kl_estimator = "k3" if self.kl_in_loss else "k1"
        if self.kl_in_loss and self.kl_estimator == "k1":
            raise ValueError(
                "algo.kl_in_loss with kl_estimator k1 regularises nothing (its expected gradient is 0): "
                "use k3 (GRPO's, the default with kl_in_loss) or k2"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or null, got {self.tis_cap}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.clip_eps_high is not None and self.clip_eps_high <= 0:
            raise ValueError(f"clip_eps_high must be > 0 or null, got {self.clip_eps_high}")
        if self.loss_agg not in LOSS_AGGREGATIONS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGREGATIONS}, got {self.loss_agg!r}")
        if self.overlong_buffer is not None and self.overlong_buffer < 1:
            raise ValueError(f"overlong_buffer must be >= 1 or null, got {self.overlong_buffer}")
        if self.ema_beta is not None and not 0 < self.ema_beta < 1:
            raise ValueError(f"ema_beta must be in (0, 1) or null, got {self.ema_beta}")
        if min(self.vf_coef, self.entropy_coef, self.ptx_coef, self.critic_lr) < 0:
            raise ValueError("vf_coef, entropy_coef, ptx_coef and critic_lr must be >= 0")
        for name in ("actor_max_grad_norm", "critic_max_grad_norm"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0 or null, got {getattr(self, name)}")


class ActorCritic(nn.Module):
    """Policy and value model in one module, so one optimizer and one DeepSpeed engine hold both
    (Lightning's DeepSpeedStrategy takes a single optimizer; TRL's PolicyAndValueWrapper).

    The value comes from a separate ``critic`` network (DeepSpeed-Chat, OpenRLHF), or from a linear
    ``value_head`` on the policy's last hidden state (one network, cheaper, values and policy interfere).
    """

    def __init__(
        self, policy: nn.Module, critic: Optional[ScalarModel] = None, value_head: Optional[nn.Linear] = None
    ) -> None:
        super().__init__()
        if critic is not None and value_head is not None:
            raise ValueError("give a separate critic or a value head on the actor, not both")
        self.policy, self.critic, self.value_head = policy, critic, value_head

    @property
    def has_values(self) -> bool:
        return self.critic is not None or self.value_head is not None

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prompt_len: int, temperature: float = 1.0):
        """Log-probs and entropy of the response tokens and the values before each of them.

        input_ids, attention_mask: (B, P + R). Returns logprobs, entropy, values: (B, R) (values None
        without a critic). Position P-1 predicts the first response token, hence the shift.
        """
        hidden, head = response_hidden(self.policy, input_ids, attention_mask, prompt_len)
        logprobs, entropy = chunked_logprobs(hidden, head, input_ids[:, prompt_len:], temperature, entropy=True)
        values = None
        if self.critic is not None:
            values = self.critic(input_ids, attention_mask)[:, prompt_len - 1 : -1]
        elif self.value_head is not None:
            if isinstance(head, nn.Identity):  # a family that gives logits whole: ask for its hidden states
                out = self.policy(**lm_inputs(self.policy, input_ids, attention_mask), output_hidden_states=True)
                hidden = out.hidden_states[-1][:, prompt_len - 1 : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logprobs, entropy, values


def response_hidden(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int):
    """The hidden states that predict the R response tokens, (B, R, H) (positions P-1 .. P+R-2), and the
    LM head: the head then runs on response positions only, in chunks, never on the prompt and never on
    the whole (B, R, V) at once (issue #18)."""
    hidden, head = lm_hidden(model, **lm_inputs(model, input_ids, attention_mask))
    return hidden[:, prompt_len - 1 : -1], head


def sequence_logprobs(model, input_ids, attention_mask, prompt_len: int, temperature: float = 1.0) -> Tensor:
    """(B, P + R) -> log-probs of the R response tokens (B, R) (no entropy: the reference needs none)."""
    hidden, head = response_hidden(model, input_ids, attention_mask, prompt_len)
    return chunked_logprobs(hidden, head, input_ids[:, prompt_len:], temperature)[0]


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


def rollout_metrics(ro: Rollout, kl_stats: dict, per_step: list[dict], skipped: int, timing: dict) -> dict:
    """The step's logged figures: objective (scores, KL and the rest of ``kl_stats``, entropy), rollout
    shape, the update's mean ``ppo/`` stats over its optimizer steps, and the phases' timing."""
    seconds = max(sum(timing.values()), 1e-9)
    logs = {
        "objective/scores": ro.scores.mean(),
        **{f"objective/{k}": v for k, v in kl_stats.items()},  # kl, non_score_reward, rlhf_reward
        "objective/entropy": masked_mean(ro.entropy, ro.mask),
        "rollout/response_len_mean": ro.mask.sum(-1).mean(),
        "rollout/eos_fraction": ro.eos_fraction,
        "ppo/skipped_minibatches": float(skipped),
        **{f"time/{k}": v for k, v in timing.items()},
        "time/tokens_per_s": float(ro.mask.sum()) / seconds,
        "time/prompts_per_s": ro.mask.size(0) / seconds,
    }
    for key in per_step[0] if per_step else []:
        logs[f"ppo/{key}"] = torch.stack([s[key] for s in per_step]).mean()
    return logs


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
        keep = varied_groups(ro.scores, self.group_size)
        kept = select_rows(ro, keep)
        self.pending = kept if self.pending is None else concat_rollouts([self.pending, kept], self.pad_id)
        return float(keep.float().mean())

    def size(self) -> int:
        return 0 if self.pending is None else self.pending.mask.size(0)

    def take(self, n: int) -> Rollout:
        """The first ``n`` pending rows (whole groups when n is a multiple of the group size); the rest is
        dropped, as DAPO does."""
        out, self.pending = select_rows(self.pending, torch.arange(self.size()) < n), None
        return out
