"""Evaluation of exported policies and reward models: gold and proxy rewards, KL to a reference,
win rates, reward-model accuracy. Used by the pipeline's summary and by ``rlhf-lit evaluate``."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional

import torch

from rlhf_lit.errors import InputError
from rlhf_lit.hf.chat_format import ChatFormat
from rlhf_lit.hf.hub import HubUnavailable
from rlhf_lit.hf.models import HFModel, load_scalar_model
from rlhf_lit.hf.tokenizer import HFTokenizer
from rlhf_lit.math.ops import pad_sequences
from rlhf_lit.rl.actor_critic import sequence_logprobs
from rlhf_lit.rl.experience import ended_with_stop
from rlhf_lit.rl.generation import ENGINES, GenerationConfig, generate_texts, stop_ids
from rlhf_lit.rl.rewards import CallableReward, ModelReward, RewardSource, score
from rlhf_lit.rl.vllm_engine import require_vllm


def load_policy(path: str, chat_template: str = "auto", dtype: str = "float32"):
    """An exported causal LM and its tokenizer (``chat_template`` as HFTokenizer's), in eval mode."""
    spec = HFModel(path, dtype=dtype)
    if Path(path).is_dir() and not_a_policy(spec):
        raise InputError(f"{path}: a reward model or critic (a scalar head), not a policy to generate with")
    tok = HFTokenizer(path, chat_template=chat_template).load()
    return spec.build_causal_lm(tok).eval(), tok


def not_a_policy(spec: HFModel) -> bool:
    """Whether a local model folder holds a scalar model (an rlhf-lit reward/critic export or a
    sequence-classification checkpoint): loaded as a causal LM it would print garbage (#28)."""
    config = Path(spec.path) / "config.json"
    archs = json.loads(config.read_text()).get("architectures") or [] if config.is_file() else []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs)
    classifier = any(a.endswith("ForSequenceClassification") for a in archs)
    return classifier or (spec.value_head_path() is not None and not causal)


def sample(
    model,
    tok,
    prompts: list[str],
    gen: GenerationConfig,
    batch_size: int = 32,
    seed: int = 0,
    max_prompt_len: int = 256,
):
    """Seeded responses to ``prompts``; see :func:`rlhf_lit.rl.generation.generate_texts`."""
    torch.manual_seed(seed)
    return generate_texts(model, tok, prompts, gen, batch_size, max_prompt_len)


@torch.no_grad()
def evaluate_policy(
    policy: str,
    prompts: list[str],
    rewards: dict[str, RewardSource],
    reference: Optional[str] = None,
    gen: Optional[GenerationConfig] = None,
    batch_size: int = 32,
    seed: int = 0,
    examples: int = 3,
    chat_template: str = "auto",
    columns: Optional[dict[str, list]] = None,
) -> dict:
    """Mean/std of each reward source over sampled responses, response length, and the KL (sum of
    log p_policy - log p_ref over response tokens, averaged over prompts) when a reference is given.
    ``columns``: the prompts' extra fields, ``{name: [value per prompt]}``, given to the reward sources."""
    gen = gen or GenerationConfig()
    model, tok = load_policy(policy, chat_template)
    texts, batches = sample(model, tok, prompts, gen, batch_size, seed)
    stops = stop_ids(tok, gen)
    ended = [ended_with_stop(ids[:, p:], resp_mask, stops) for ids, _, p, resp_mask in batches]  # per batch
    out: dict = {"n": len(prompts), "response_len_mean": statistics.mean(len(tok(t)["input_ids"]) for t in texts)}
    for name, source in rewards.items():
        source.build(tok)
        scores = []
        for i, (ids, mask, _, _) in enumerate(batches):
            chunk, resp = prompts[i * batch_size : (i + 1) * batch_size], texts[i * batch_size : (i + 1) * batch_size]
            cols = {k: v[i * batch_size : (i + 1) * batch_size] for k, v in (columns or {}).items()}
            scores += score(source, chunk, resp, ids, mask, cols, ended[i]).tolist()
        out[f"{name}_mean"], out[f"{name}_std"] = statistics.mean(scores), statistics.pstdev(scores)
        out[f"{name}_scores"] = scores
    if reference:
        ref, _ = load_policy(reference)
        kls = []
        for ids, mask, p, resp_mask in batches:
            lp = sequence_logprobs(model, ids, mask, p, gen.temperature)
            rlp = sequence_logprobs(ref, ids, mask, p, gen.temperature)
            kls += ((lp - rlp) * resp_mask).sum(-1).tolist()
        out["kl"] = statistics.mean(kls)
    out["examples"] = [{"prompt": p, "response": r} for p, r in zip(prompts[:examples], texts[:examples])]
    return out


def _chunks(xs, n):
    return [xs[i : i + n] for i in range(0, len(xs), n)]


def win_rate(scores_a: list[float], scores_b: list[float]) -> float:
    """Share of prompts where A scores above B (ties count half)."""
    pairs = list(zip(scores_a, scores_b))
    return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / max(1, len(pairs))


@torch.no_grad()
def reward_accuracy(reward_dir: str, pairs: list[dict], gold: Optional[str] = None, batch_size: int = 32) -> dict:
    """Accuracy of a reward export on held-out pairs: against the data's labels, and against the gold
    function's order when one is given (the embedded task's ground truth)."""
    model, tok = load_scalar_model(reward_dir).eval(), HFTokenizer(reward_dir).load()
    fn = CallableReward(gold).fn if gold else None
    data_hits, gold_hits = [], []
    fmt = ChatFormat(tok)
    for chunk in _chunks(pairs, batch_size):
        # Encoded as the reward stage encodes pairs: the chat format's prompt, then reply + end-of-turn.
        prompts = fmt.prompt_ids([r.get("messages") or r["prompt"] for r in chunk])
        seqs = [p + c for k in ("chosen", "rejected") for p, c in zip(prompts, fmt.response_ids([r[k] for r in chunk]))]
        ids, mask = pad_sequences(seqs, tok.pad_token_id)
        s = model.score(ids, mask)
        c, r = s[: len(chunk)], s[len(chunk) :]
        data_hits += (c > r).tolist()
        if fn:
            for rec, sc, sr in zip(chunk, c.tolist(), r.tolist()):
                gc, gr = fn(rec["prompt"], rec["chosen"]), fn(rec["prompt"], rec["rejected"])
                if gc != gr:
                    gold_hits.append((sc > sr) == (gc > gr))
    out = {
        "heldout_pairs": len(pairs),
        "heldout_accuracy_vs_labels": sum(data_hits) / max(1, len(data_hits)),
        "heldout_accuracy_vs_labels_ci95": wilson_interval(sum(data_hits), len(data_hits)),
    }
    if fn:
        out["heldout_accuracy_vs_gold"] = sum(gold_hits) / max(1, len(gold_hits))
    out["heldout_accuracy"] = out.get("heldout_accuracy_vs_gold", out["heldout_accuracy_vs_labels"])
    return out


def wilson_interval(hits: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval of a proportion (better than the normal approximation near 0 and 1 and
    for the few hundred pairs a CPU run scores)."""
    if n == 0:
        return [0.0, 1.0]
    p = hits / n
    centre, half = p + z * z / (2 * n), z * ((p * (1 - p) + z * z / (4 * n)) / n) ** 0.5
    return [round((centre - half) / (1 + z * z / n), 4), round((centre + half) / (1 + z * z / n), 4)]


def main(argv: list[str]) -> int:
    # A handful of flags for a one-off measurement; configs stay the schema for training.
    p = argparse.ArgumentParser(prog="rlhf-lit evaluate", description="Score exported policies on a prompt set.")
    p.add_argument("--policy", required=True, help="exported policy directory (A)")
    p.add_argument("--policy-b", help="a second policy: reports the win rate of A over B")
    p.add_argument(
        "--prompts",
        required=True,
        help="a file of prompts: .txt (one per line) or .jsonl with 'prompt' (other fields, e.g. 'answer', reach "
        "--gold as keyword arguments)",
    )
    p.add_argument("--reward-model", help="reward export used as judge/proxy")
    p.add_argument("--gold", help="import path of a gold reward function, e.g. datamodules.synthetic:gold_reward")
    p.add_argument("--reference", help="reference policy for the KL")
    p.add_argument("--n", type=int, default=200, help="number of prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine", default="kv_loop", choices=ENGINES, help="generation engine (vllm: `make vllm` installs it)"
    )
    p.add_argument(
        "--chat-template",
        default="auto",
        help="'auto' (the policy tokenizer's template, else HH text), 'hh', or a Jinja template file",
    )
    a = p.parse_args(argv)
    try:
        prompts, columns = read_prompts(a.prompts)
        prompts, columns = prompts[: a.n], {k: v[: a.n] for k, v in columns.items()}
        rewards: dict[str, RewardSource] = {}
        if a.reward_model:
            rewards["rm_score"] = ModelReward(a.reward_model, normalize=False)
        if a.gold:
            rewards["gold_reward"] = CallableReward(a.gold)
        if not rewards:
            raise ValueError("give --reward-model and/or --gold to score responses")
        gen = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, engine=a.engine)
        if a.engine == "vllm":
            require_vllm()
        kw = {"seed": a.seed, "chat_template": a.chat_template, "columns": columns}
        result = {"A": evaluate_policy(a.policy, prompts, rewards, a.reference, gen, **kw)}
        if a.policy_b:
            result["B"] = evaluate_policy(a.policy_b, prompts, rewards, a.reference, gen, **kw)
            judge = "gold_reward" if a.gold else "rm_score"
            result["win_rate_a_over_b"] = win_rate(result["A"][f"{judge}_scores"], result["B"][f"{judge}_scores"])
            result["judge"] = judge
    except (ValueError, FileNotFoundError, HubUnavailable) as e:
        print(f"rlhf-lit evaluate: error: {e}", file=sys.stderr)
        return 1
    for r in (result.get("A"), result.get("B")):
        for k in [k for k in (r or {}) if k.endswith("_scores")]:
            r.pop(k)
    print(json.dumps(result, indent=2))
    return 0


def read_prompts(path: str) -> tuple[list[str], dict[str, list]]:
    """Prompts and the rows' other fields as columns, ``{name: [value per row]}`` (none for .txt). Errors
    name the file and line (#28): a directory, undecodable bytes, malformed JSON, no prompt at all."""
    if not Path(path).is_file():
        raise ValueError(
            f"{path}: not a prompts file" + (" (a directory)" if Path(path).is_dir() else " (no such file)")
        )
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: bytes are not valid UTF-8") from None
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    if not numbered:
        raise ValueError(f"{path}: no prompts (the file has no non-blank line)")
    if not path.endswith(".jsonl"):
        return [line.replace("\\n", "\n") for _, line in numbered], {}
    rows = []
    for n, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise ValueError(f"{path}:{n}: field 'prompt' is missing or not a string")
        rows.append(row)
    names = sorted({k for r in rows for k in r if k != "prompt"})
    return [r["prompt"] for r in rows], {k: [r.get(k) for r in rows] for k in names}
