"""``rlhf-lit chat --model DIR``: a terminal chat with any exported causal LM (like DeepSpeed-Chat's chat.py).

The conversation is kept as messages and rendered the way the stages train: through the model's chat
template when its tokenizer has one (stopping at its end-of-turn token), in the HH text format
("\\n\\nHuman: ...\\n\\nAssistant:") otherwise; ``--chat-template`` overrides it as the configs do.
Type ``clear`` to start over and ``quit`` to leave. When standard input is not a terminal, each line is
one user turn, so a scripted conversation can be piped in.
"""

from __future__ import annotations

import argparse
import sys

import torch

from rlhf_lit.hf.hub import HubUnavailable
from rlhf_lit.rl.generation import ENGINES, GenerationConfig, generate_texts
from rlhf_lit.rl.vllm_engine import require_vllm


def reply(model, tok, history: list[dict], gen: GenerationConfig, max_context: int) -> str:
    """The model's answer to the conversation so far (a list of {role, content} messages)."""
    return generate_texts(model, tok, [history], gen, max_prompt_len=max_context)[0][0]


def main(argv: list[str]) -> int:
    # A chat session's few flags; argparse is the right size for an interactive tool.
    p = argparse.ArgumentParser(
        prog="rlhf-lit chat", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="exported model directory (e.g. RUN_DIR/ppo/export/actor)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument("--max-context", type=int, default=512, help="keep at most this many tokens of history")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine", default="kv_loop", choices=ENGINES, help="generation engine (vllm: `make vllm` installs it)"
    )
    p.add_argument(
        "--chat-template",
        default="auto",
        help="'auto' (the tokenizer's template, else HH text), 'hh', or a Jinja template file",
    )
    p.add_argument("--system", help="a system message opening the conversation")
    a = p.parse_args(argv)
    try:
        from rlhf_lit.apps.evaluate import load_policy

        model, tok = load_policy(a.model, a.chat_template)
        gen = GenerationConfig(
            max_new_tokens=a.max_new_tokens,
            do_sample=not a.greedy,
            temperature=a.temperature,
            top_k=a.top_k,
            top_p=a.top_p,
            engine=a.engine,
        )
        if a.engine == "vllm":
            require_vllm()
    except (HubUnavailable, ValueError, OSError, ImportError) as e:
        print(f"rlhf-lit chat: error: {e}", file=sys.stderr)
        return 1
    torch.manual_seed(a.seed)
    interactive = sys.stdin.isatty()
    if interactive:
        print("rlhf-lit chat: type 'clear' to start over, 'quit' to leave.")
    start = [{"role": "system", "content": a.system}] if a.system else []
    history = list(start)
    while True:
        try:
            line = input("Human: ") if interactive else sys.stdin.readline()
            line.encode("utf-8")  # stdin may decode with surrogateescape: undecodable bytes stay as surrogates
        except (EOFError, KeyboardInterrupt):
            break
        except (UnicodeDecodeError, UnicodeEncodeError):  # bytes that are not text: one line, not a traceback (#28)
            print("rlhf-lit chat: error: standard input: bytes are not valid UTF-8", file=sys.stderr)
            return 1
        if not interactive and line == "":
            break  # end of piped input
        msg = line.strip()
        if not msg:
            continue
        if msg.lower() in ("quit", "exit"):
            break
        if msg.lower() == "clear":
            history = list(start)
            print("[history cleared]", flush=True)
            continue
        if not interactive:
            print(f"Human: {msg}")
        history.append({"role": "user", "content": msg})
        answer = reply(model, tok, history, gen, a.max_context).strip()
        history.append({"role": "assistant", "content": answer})
        print(f"Assistant: {answer}", flush=True)
    return 0
