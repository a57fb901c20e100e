"""The actor and critic in one module (one optimizer, one DeepSpeed engine) and the response log-probs.

Shapes: ``B`` rollouts, ``P`` prompt tokens (left-padded), ``R`` response tokens (right-padded).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from rlhf_lit.hf.models import LoRA, ModelSpec, ScalarModel, apply_lora, enable_checkpointing, lm_hidden, lm_inputs
from rlhf_lit.math.ops import chunked_logprobs


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

    def clip_groups(self, actor_max_norm: Optional[float], critic_max_norm: Optional[float]) -> dict:
        """Actor and critic as separate clipping groups ``{name: (params, max_norm)}``: each is clipped to its
        own norm, as DeepSpeed-Chat's two engines do, so a large critic gradient never shrinks the actor's step."""
        groups = {"actor": (self.policy.parameters(), actor_max_norm)}
        if self.has_values:
            groups["critic"] = ((self.critic or self.value_head).parameters(), critic_max_norm)
        return groups

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        prompt_len: int,
        temperature: float = 1.0,
        entropy_grad: bool = True,
    ):
        """Log-probs and entropy of the response tokens and the values before each of them.

        input_ids, attention_mask: (B, P + R). Returns logprobs, entropy, values: (B, R) (values None
        without a critic). Position P-1 predicts the first response token, hence the shift.
        ``entropy_grad=False``: the entropy without a graph (logged, no entropy bonus in the loss).
        """
        hidden, head = response_hidden(self.policy, input_ids, attention_mask, prompt_len)
        targets = input_ids[:, prompt_len:]
        logprobs, entropy = chunked_logprobs(hidden, head, targets, temperature, True, entropy_grad=entropy_grad)
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


def build_actor_critic(
    actor: ModelSpec,
    tokenizer,
    lora: Optional[LoRA] = None,
    critic: Optional[ModelSpec] = None,
    critic_lora: Optional[LoRA] = None,
    value_head: bool = False,
) -> ActorCritic:
    """The policy from ``actor`` (with LoRA adapters if given) and the values from a ``critic`` network
    (its backbone with ``critic_lora`` if given) or, with ``value_head``, a linear head on the policy.
    Neither critic nor head: a critic-free estimator (GRPO, RLOO)."""
    policy = actor.build_causal_lm(tokenizer)
    if actor.gradient_checkpointing:
        enable_checkpointing(policy)
    policy = apply_lora(policy, lora)
    scalar = head = None
    if value_head:
        head = nn.Linear(policy.get_input_embeddings().embedding_dim, 1, bias=False)
    elif critic is not None:
        scalar = critic.build_scalar(tokenizer)
        if critic.gradient_checkpointing:
            enable_checkpointing(scalar.backbone)
        scalar.backbone = apply_lora(scalar.backbone, critic_lora, task_type=None)
    return ActorCritic(policy, scalar, head)
