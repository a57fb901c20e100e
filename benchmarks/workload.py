"""The benchmark's fixed, seeded workload: HH-style preference data, a locally trained BPE and the
initial models every framework starts from (same weights, same tokens).

    python benchmarks/workload.py --size tiny --out runs/bench/workload-tiny

Writes ``hh.jsonl`` (HH-RLHF's original schema: whole ``chosen``/``rejected`` dialogues), ``records.jsonl``
(the same rows as prompt/chosen/rejected, split by rlhf-lit's HH normaliser, for the peers),
``conversations.jsonl`` (the same rows as chat messages, TRL's conversational format: a tokenizer with a
chat template renders them as rlhf-lit does, so every framework trains on the same tokens), ``tokenizer/``,
``policy/`` (OPTForCausalLM), ``reward/`` (rlhf-lit scalar-model export: backbone + value head) and
``reward_hf/`` (the same weights as OPTForSequenceClassification, for TRL), and ``meta.json`` (sizes,
parameter counts, rows kept/dropped by the token limits).
Runs in the project's environment (the peers only read the files).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.utils import logging as hf_logging

from datamodules.sources import split_hh
from rlhf_lit.hf.chat_format import to_messages
from rlhf_lit.hf.models import ScalarModel
from rlhf_lit.hf.tokenizer import save_atomically, train_bpe

# The fixed shapes: tiny (overhead-bound) and a ~30M-parameter size where matmuls dominate.
SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512),
    "30m": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, ffn_dim=2048),
}
# Real shapes, built from config (issue #18's memory benchmark; #19's compute-bound size): published
# sizes, random weights (the real SmolLM2-135M-Instruct's where `make smollm2` converted it). They read
# SmolLM2's tokenizer (49,152 tokens; OPT's own is not available offline); the OPT shapes keep OPT's
# 50,272-row vocabulary so embedding and LM-head memory is the real one (sampled ids past the tokenizer's
# decode to nothing).
SMOLLM2_DIR = Path(__file__).resolve().parent.parent / "models/smollm2-135m-instruct"
SHAPES = {
    "smollm2": (
        "llama",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
    ),
    "opt-350m": (
        "opt",
        dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, ffn_dim=4096, word_embed_proj_dim=512),
    ),
    "opt-1.3b": ("opt", dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192)),
    "opt-2.7b": ("opt", dict(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32, ffn_dim=10240)),
}
OPT_VOCAB = 50272
VOCAB, MAX_PROMPT, MAX_ANSWER, ROWS = 4096, 64, 64, 2000
SYLLABLES = (
    "ka lo mi ne ru sa ti vo pe da gu fi ze ho ja ly qu be ro na wi te cu mo xi sha tri ble gra por ven dul kes mar fen"
).split()


def lexicon(rng: random.Random, n: int = 6000) -> list[str]:
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(words)


def _zipf(n: int) -> list[float]:
    total, out = 0.0, []
    for rank in range(n):
        total += 1.0 / (rank + 20)
        out.append(total)
    return out


def sentence(rng: random.Random, words: list[str], n_words: int) -> str:
    # Zipf-like word frequencies, as in natural text, so the BPE learns frequent words whole.
    picks = rng.choices(words, cum_weights=_zipf(len(words)), k=n_words)
    return " ".join(picks).capitalize() + rng.choice(".?!")


def dialogue_rows(seed: int, n: int) -> list[dict]:
    """HH-RLHF rows: a 1-3 turn dialogue, then two different final assistant replies."""
    rng = random.Random(seed)
    words = lexicon(rng)
    rng.shuffle(words)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(1, 3)):
            turns.append(f"\n\nHuman: {sentence(rng, words, rng.randint(3, 9))}")
            turns.append(f"\n\nAssistant: {sentence(rng, words, rng.randint(3, 9))}")
        context = "".join(turns[:-1]) + "\n\nAssistant:"
        reply = lambda: " " + " ".join(sentence(rng, words, rng.randint(3, 8)) for _ in range(rng.randint(1, 3)))
        a, b = reply(), reply()
        while b == a:
            b = reply()
        rows.append({"chosen": context + a, "rejected": context + b})
    return rows


VERSION = 4  # bump when what build() writes changes: an older workload folder is rebuilt


def build(size: str, out: Path, seed: int = 0, policy_only: bool = False) -> dict:
    """The workload folder of a size (kept when it exists in this version). ``policy_only``: no reward
    exports (an actor for memory.py --largest, whose critic comes from another shape: saves two copies)."""
    if (out / "meta.json").exists():
        meta = json.loads((out / "meta.json").read_text())
        if meta.get("version") == VERSION and meta.get("seed") == seed and (policy_only or (out / "reward").exists()):
            return meta
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_logging.set_verbosity_error()  # the value head is new by design: no load reports, no progress bars
    hf_logging.disable_progress_bar()
    rows = dialogue_rows(seed, ROWS)
    records = [split_hh(r["chosen"], r["rejected"]) for r in rows]
    if size in SHAPES:
        if not (SMOLLM2_DIR / "tokenizer.json").exists():
            raise SystemExit(f"size {size} reads SmolLM2's tokenizer: run `make smollm2` first ({SMOLLM2_DIR})")
        AutoTokenizer.from_pretrained(SMOLLM2_DIR).save_pretrained(out / "tokenizer")
    else:
        tok = train_bpe((t for r in records for t in (r["prompt"], r["chosen"], r["rejected"])), VOCAB)
        save_atomically(tok, str(out / "tokenizer"))
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    # The limits: prompts <= 64 tokens, answers (with eos) <= 64. Rows beyond them are dropped and counted.
    n_tok = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])
    keep = [
        i
        for i, r in enumerate(records)
        if n_tok(r["prompt"]) <= MAX_PROMPT and max(n_tok(r["chosen"]), n_tok(r["rejected"])) < MAX_ANSWER
    ]
    with open(out / "hh.jsonl", "w") as f:
        f.writelines(json.dumps(rows[i]) + "\n" for i in keep)
    with open(out / "records.jsonl", "w") as f:
        f.writelines(json.dumps({k: records[i][k] for k in ("prompt", "chosen", "rejected")}) + "\n" for i in keep)
    reply = lambda text: [{"role": "assistant", "content": text.strip()}]
    with open(out / "conversations.jsonl", "w") as f:
        f.writelines(
            json.dumps(
                {
                    "prompt": to_messages(records[i]["prompt"]),
                    "chosen": reply(records[i]["chosen"]),
                    "rejected": reply(records[i]["rejected"]),
                }
            )
            + "\n"
            for i in keep
        )

    torch.manual_seed(seed)
    policy = initial_policy(size, tok)
    cfg = policy.config
    policy.save_pretrained(out / "policy")
    tok.save_pretrained(out / "policy")
    embed = policy.get_input_embeddings().weight.numel()
    if cfg.model_type == "opt":
        embed += policy.model.decoder.embed_positions.weight.numel()
    total, vocab = sum(p.numel() for p in policy.parameters()), policy.get_input_embeddings().num_embeddings
    del policy  # one model in memory at a time: the real shapes reach 10 GB each
    if not policy_only:  # the reward model / critic: the policy's backbone plus a value head, in both formats
        rm = ScalarModel(AutoModel.from_pretrained(out / "policy"))
        torch.nn.init.normal_(rm.value_head.weight, std=1.0 / (cfg.hidden_size + 1) ** 0.5)
        rm.save_pretrained(out / "reward")
        tok.save_pretrained(out / "reward")
        head = rm.value_head.weight.data.clone()
        del rm
        seq = AutoModelForSequenceClassification.from_pretrained(out / "policy", num_labels=1)
        seq.score.weight.data.copy_(head)
        seq.config.pad_token_id = tok.pad_token_id
        seq.save_pretrained(out / "reward_hf")
        tok.save_pretrained(out / "reward_hf")
        del seq

    prompt_tokens = [n_tok(records[i]["prompt"]) for i in keep]
    meta = {
        "version": VERSION,
        "size": size,
        "family": cfg.model_type,
        "mean_prompt_tokens": sum(prompt_tokens) / len(prompt_tokens),
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "vocab": vocab,
        "real_weights": size == "smollm2" and (SMOLLM2_DIR / "model.safetensors").exists(),
        "params": total,
        "non_embedding_params": total - embed,
        "rows": len(rows),
        "kept": len(keep),
        "dropped_over_token_limits": len(rows) - len(keep),
        "max_prompt_tokens": MAX_PROMPT,
        "max_answer_tokens": MAX_ANSWER,
        "seed": seed,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return meta


def initial_policy(size: str, tok):
    """The policy every contender starts from: OPT of the benchmark's small sizes, or a real shape."""
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    if size == "smollm2" and (SMOLLM2_DIR / "model.safetensors").exists():
        return AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32)
    if size in SHAPES:
        family, shape = SHAPES[size]
        extra = {"vocab_size": OPT_VOCAB, "dropout": 0.0, "attention_dropout": 0.0} if family == "opt" else {}
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **shape, **extra, **ids))
    cfg = OPTConfig(
        vocab_size=len(tok),
        max_position_embeddings=MAX_PROMPT + MAX_ANSWER + 2,
        word_embed_proj_dim=SIZES[size]["hidden_size"],
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        **ids,
        **SIZES[size],
    )
    return OPTForCausalLM(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted({**SIZES, **SHAPES}), default="tiny")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    print(json.dumps(build(a.size, Path(a.out or f"runs/bench/workload-{a.size}"))))


if __name__ == "__main__":
    main()
