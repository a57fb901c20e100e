"""Dataset normalizers: each turns one raw row into a record of the common schema.

Records are dicts with ``source`` and ``row`` (the original row index) plus some of:
``prompt``, ``response`` (SFT), ``chosen``/``rejected`` (+ optional ``margin``) (preference).
Prompt-only use needs just ``prompt``. ``columns`` holds a row's extra fields kept on request (e.g. a
reference ``answer``): they travel with the prompt to reward functions. Responses are the raw text that
follows the prompt, so ``prompt + response`` is the original text.

A normalizer factory is registered by name and called with the source's options; it returns a
function ``row -> record`` that raises :class:`Drop` for rows the data says to skip (counted by
reason) and :class:`~datamodules.readers.BadRow` for invalid input (an error unless skipping).
Pure Python: no lightning, deepspeed or wandb.
"""

from __future__ import annotations

import inspect
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

from datamodules.readers import BadRow, DataError, read_hub, read_rows
from rlhf_lit.hf.chat_format import hh_text

ASSISTANT = "\n\nAssistant:"
HUMAN = "\n\nHuman:"
HH_TEMPLATE = "\n\nHuman: {prompt}\n\nAssistant:"
TLDR_TEMPLATE = "SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:"


class Drop(Exception):
    """A row the normalizer leaves out on purpose; ``reason`` is the drop-count key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


Normalizer = Callable[[dict], dict]
REGISTRY: dict[str, Callable[..., Normalizer]] = {}
GENERATORS: dict[str, Callable[..., Iterable[dict]]] = {}


def register(name: str):
    """Register a normalizer factory ``f(**options) -> (row -> record)`` under ``name``."""

    def deco(factory):
        REGISTRY[name] = factory
        return factory

    return deco


def text(row: dict, name: str, allow_empty: bool = True) -> str:
    """The string field ``name`` of ``row``, or a BadRow naming the field."""
    if name not in row:
        raise BadRow(f"missing_field:{name}", f"field {name!r} is missing")
    value = row[name]
    if not isinstance(value, str):
        raise BadRow(f"wrong_type:{name}", f"field {name!r} should be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise BadRow(f"empty_field:{name}", f"field {name!r} is empty")
    return value


def number(row: dict, name: str) -> float:
    if name not in row:
        raise BadRow(f"missing_field:{name}", f"field {name!r} is missing")
    value = row[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)  # CSV cells arrive as strings
        except (TypeError, ValueError):
            raise BadRow(f"wrong_type:{name}", f"field {name!r} should be a number, got {value!r}") from None
    return float(value)


def pair(prompt: str, chosen: str, rejected: str) -> dict:
    """A preference record, dropping empty or identical responses (counted by reason)."""
    if not chosen.strip():
        raise Drop("empty_chosen")
    if not rejected.strip():
        raise Drop("empty_rejected")
    if chosen == rejected:
        raise Drop("identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def split_hh(chosen: str, rejected: str) -> dict:
    """Split two HH dialogues into prompt + responses.

    The prompt is their longest common prefix cut back to end at the last "\\n\\nAssistant:" (not a split
    on "Assistant:", which breaks on multi-turn dialogues and on replies quoting the word).
    """
    if chosen == rejected:
        raise Drop("identical")
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(ASSISTANT)
    if cut < 0:
        raise Drop("no_shared_assistant_turn")
    prompt = chosen[: cut + len(ASSISTANT)]
    c, r = chosen[len(prompt) :], rejected[len(prompt) :]
    # If a "Human:" turn follows, the two dialogues diverged before the final reply: their
    # histories differ and there is no single prompt (seen in the real harmless-base data).
    if re.search(r"\n\s*Human:", c) or re.search(r"\n\s*Human:", r):
        raise Drop("history_differs")
    return pair(prompt, c, r)


@register("hh_rlhf")
def hh_rlhf() -> Normalizer:
    """Anthropic HH-RLHF: ``chosen``/``rejected`` whole dialogues."""
    return lambda row: split_hh(text(row, "chosen"), text(row, "rejected"))


@register("shp")
def shp(min_score_ratio: Optional[float] = None, max_pairs_per_post: Optional[int] = None) -> Normalizer:
    """Stanford SHP: A is preferred when ``labels == 1``. The SHP authors suggest min_score_ratio=2."""
    per_post: Counter = Counter()

    def norm(row):
        post, a, b = text(row, "history", False), text(row, "human_ref_A"), text(row, "human_ref_B")
        label = number(row, "labels")
        if label not in (0, 1):
            raise BadRow("wrong_value:labels", f"field 'labels' should be 0 or 1, got {row['labels']!r}")
        if min_score_ratio is not None and number(row, "score_ratio") < min_score_ratio:
            raise Drop("score_ratio_below_min")
        if max_pairs_per_post is not None:
            key = row.get("post_id", post)
            if per_post[key] >= max_pairs_per_post:
                raise Drop("post_cap")
            per_post[key] += 1
        chosen, rejected = (a, b) if label == 1 else (b, a)
        return pair(HH_TEMPLATE.format(prompt=post), " " + chosen, " " + rejected)

    return norm


def tldr_prompt(row: dict) -> str:
    fields = {k: text(row, k) for k in ("subreddit", "title", "post")}
    return TLDR_TEMPLATE.format(**fields)


@register("tldr")
def tldr() -> Normalizer:
    """Reddit TL;DR for SFT, OpenAI layout (subreddit/title/post/summary) or CarperAI (prompt/label)."""

    def norm(row):
        if "prompt" in row or "label" in row:
            prompt, response = text(row, "prompt"), text(row, "label")
        else:
            prompt, response = tldr_prompt(row), text(row, "summary")
        if not response.strip():
            raise Drop("empty_response")
        return {"prompt": prompt, "response": response}

    return norm


@register("comparisons")
def comparisons() -> Normalizer:
    """OpenAI summarize-from-feedback comparisons: nested (info/summaries/choice) or CarperAI
    (prompt/chosen/rejected)."""

    def norm(row):
        if "info" not in row:
            prompt = text(row, "prompt")
            # CarperAI's chosen/rejected repeat "TL;DR:", which the prompt already ends with.
            c, r = (re.sub(r"^TL;DR:", "", text(row, k)) for k in ("chosen", "rejected"))
            return pair(prompt, c, r)
        info, summaries = row["info"], row.get("summaries")
        if not isinstance(info, dict):
            raise BadRow("wrong_type:info", "field 'info' should be an object")
        if not isinstance(summaries, list) or len(summaries) != 2 or not all(isinstance(s, dict) for s in summaries):
            raise BadRow("wrong_type:summaries", "field 'summaries' should be a list of two objects with 'text'")
        choice = number(row, "choice")
        if choice not in (0, 1):
            raise BadRow("wrong_value:choice", f"field 'choice' should be 0 or 1, got {row['choice']!r}")
        if "post" not in info and "article" in info:  # the CNN/DM part of the release
            info = {"subreddit": info.get("site", "news"), "title": info.get("title") or "", "post": info["article"]}
        prompt = tldr_prompt(info)
        texts = [text(s, "text") for s in summaries]
        return pair(prompt, texts[int(choice)], texts[1 - int(choice)])

    return norm


@register("rm_static")
def rm_static() -> Normalizer:
    """Dahoas rm-static style rows: prompt, response, chosen, rejected."""
    return lambda row: pair(text(row, "prompt"), text(row, "chosen"), text(row, "rejected"))


def columns(row: dict, names: Optional[list[str]]) -> dict:
    """``{"columns": {name: row[name]}}`` for the extra fields kept on request ({} when none are asked);
    a missing one is a BadRow naming it."""
    if not names:
        return {}
    missing = [n for n in names if n not in row]
    if missing:
        raise BadRow(f"missing_field:{missing[0]}", f"field {missing[0]!r} (listed in 'extra') is missing")
    return {"columns": {n: row[n] for n in names}}


@register("prompts")
def prompts(template: str = HH_TEMPLATE, field: str = "prompt", extra: Optional[list[str]] = None) -> Normalizer:
    """Prompt-only CSV/JSON (e.g. awesome-chatgpt-prompts: act, prompt), wrapped in ``template``. ``extra``
    names columns kept for reward functions (e.g. ``[answer]``)."""

    def norm(row):
        value = text(row, field)
        if not value.strip():
            raise Drop("empty_prompt")
        return {"prompt": template.format(prompt=value), **columns(row, extra)}

    return norm


ROLES = ("system", "user", "assistant")


def conversation(row: dict, name: str) -> list[dict]:
    """The field ``name`` as a list of ``{role, content}`` messages, or a BadRow naming the field and turn."""
    value = row.get(name)
    if name not in row:
        raise BadRow(f"missing_field:{name}", f"field {name!r} is missing")
    if not isinstance(value, list) or not value:
        raise BadRow(f"wrong_type:{name}", f"field {name!r} should be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(
                f"wrong_value:{name}",
                f"field {name!r} message {i} should be {{role: {'/'.join(ROLES)}, content: string}}, got {str(m)[:80]}",
            )
    return [{"role": m["role"], "content": m["content"]} for m in value]


def reply(row: dict, name: str) -> str:
    """A response field given as text or, in the conversational layout, as messages ending with the reply."""
    if isinstance(row.get(name), list):
        messages = conversation(row, name)
        if messages[-1]["role"] != "assistant":
            raise BadRow(f"wrong_value:{name}", f"field {name!r} should end with an assistant message")
        return messages[-1]["content"]
    return text(row, name)


def split_conversation(messages: list[dict]) -> tuple[list[dict], Optional[str]]:
    """(the messages before the final assistant reply, that reply) — (messages, None) without one."""
    if messages[-1]["role"] == "assistant":
        return messages[:-1], messages[-1]["content"]
    return messages, None


@register("json")
def generic(
    fields: Optional[dict[str, str]] = None, template: str = "{prompt}", extra: Optional[list[str]] = None
) -> Normalizer:
    """Any local table: ``fields`` maps record keys (prompt, response, chosen, rejected, margin, messages)
    to columns. Conversational rows are read too: ``messages`` (a list of ``{role, content}``; a final
    assistant message is the SFT response), and ``prompt`` / ``chosen`` / ``rejected`` given as message
    lists (TRL's conversational layout). Such records keep ``messages`` (rendered through the tokenizer's
    chat template) and an HH-text ``prompt`` (what reward functions read). ``extra`` names unmapped columns
    kept with the record (e.g. ``[answer, tests]``): reward functions receive them as keyword arguments."""
    fields = fields or {"prompt": "prompt", "response": "response"}
    unknown = set(fields) - {"prompt", "response", "chosen", "rejected", "margin", "messages"}
    if unknown or not {"prompt", "messages"} & set(fields):
        raise DataError(
            "json source: 'fields' must map 'prompt' or 'messages' and any of response/chosen/rejected/margin; "
            f"got {sorted(fields)}"
        )

    def norm(row):
        rec: dict = {}
        if "messages" in fields:
            messages, response = split_conversation(conversation(row, fields["messages"]))
            rec["messages"] = messages
            if response is not None:
                rec["response"] = response
        elif isinstance(row.get(fields["prompt"]), list):
            rec["messages"] = conversation(row, fields["prompt"])
        if "messages" in rec:
            rec["prompt"] = hh_text(rec["messages"])
        else:
            rec["prompt"] = template.format(prompt=text(row, fields["prompt"]))
        for k in ("response", "chosen", "rejected"):
            if k in fields:
                rec[k] = reply(row, fields[k])
        if "margin" in fields:
            rec["margin"] = number(row, fields["margin"])
        rec.update(columns(row, extra))
        if "response" in rec and not rec["response"].strip():
            raise Drop("empty_response")
        if "chosen" in rec and "rejected" in rec:
            return {**rec, **pair(rec["prompt"], rec["chosen"], rec["rejected"])}
        return rec

    return norm


@dataclass
class LoadResult:
    """Records of one source and how many rows were read and dropped (by reason)."""

    name: str
    records: list[dict]
    rows: int = 0
    dropped: Counter = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return len(self.records)

    def summary(self) -> dict[str, Any]:
        return {"source": self.name, "rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped)}


def check_options(label: str, name: str, factory: Callable, options: dict) -> None:
    """Options a source does not take: one line naming them and the ones it does (#28: a command-line
    override of ``blend.sources`` merges the replaced source's options into the new one)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise DataError(
            f"source {label!r}: {', '.join(unknown)} not an option of {name} "
            f"(its options: {', '.join(params) or 'none'}); "
            "a command-line override of blend.sources keeps the replaced source's options: set sources in a YAML file"
        )


def load_source(
    name: str,
    path: Optional[str] = None,
    hub: Optional[str] = None,
    hub_split: str = "train",
    hub_subset: Optional[str] = None,
    options: Optional[dict] = None,
    skip_bad_rows: bool = False,
    label: Optional[str] = None,
) -> LoadResult:
    """Read and normalise every row of one source. Strict by default: the first bad row raises a
    :class:`DataError` naming file, row and field; with ``skip_bad_rows`` it is counted instead.
    Invariant: ``rows == kept + sum(dropped.values())``."""
    options = dict(options or {})
    label = label or name
    factory = GENERATORS.get(name) or REGISTRY.get(name)
    if factory is not None:
        check_options(label, name, factory, options)
    if name in GENERATORS:
        rows = ((f"{name} row {i}", r) for i, r in enumerate(GENERATORS[name](**options)))
        norm: Normalizer = lambda r: r  # generated rows are records already
    elif name in REGISTRY:
        if (path is None) == (hub is None):
            raise DataError(f"source {label!r}: give exactly one of 'path' (a local file) or 'hub' (a dataset name)")
        try:
            norm = REGISTRY[name](**options)
        except TypeError as e:
            raise DataError(f"source {label!r}: bad options {sorted(options)}: {e}") from None
        rows = read_rows(os.path.expanduser(path)) if path else read_hub(hub, hub_split, hub_subset)
    else:
        raise DataError(f"unknown source {name!r}; registered: {sorted({*REGISTRY, *GENERATORS})}")
    result = LoadResult(label, [])
    for i, (where, row) in enumerate(rows):
        result.rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            record = norm(row)
        except Drop as d:
            result.dropped[d.reason] += 1
            continue
        except BadRow as b:
            if not skip_bad_rows:
                msg = str(b) if str(b).startswith(str(where)) else f"{where}: {b}"
                raise DataError(msg) from None
            result.dropped[b.reason] += 1
            continue
        result.records.append({**record, "source": label, "row": i})
    return result
