"""How a conversation becomes tokens: the tokenizer's chat template, or the HH text format.

One switch decides it for every stage, ``evaluate`` and ``chat``: a tokenizer spec's ``chat_template``
(``auto``: the tokenizer's own template when it has one, the HH format otherwise; ``hh``; or a Jinja
file). It is applied to the tokenizer itself at load time (:func:`apply_chat_template_option`), so a
stage's export carries the choice to the next stage and to ``chat``.

Records keep their prompt as HH text (``"\\n\\nHuman: ...\\n\\nAssistant:"``, what reward functions read)
and, where the source has them, ``messages`` (a list of ``{role, content}``); :func:`to_messages`
turns either into the conversation that is rendered. Pure Python + a tokenizer: no lightning.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Union

from rlhf_lit.errors import InputError

HH_TURN = {"user": "\n\nHuman: {}", "assistant": "\n\nAssistant: {}", "system": "{}"}
HH_PROMPT_END = "\n\nAssistant:"
ROLES = {"human": "user", "assistant": "assistant"}
Prompt = Union[str, list]


class ChatTemplateError(InputError):
    """A chat template that cannot render a conversation; the message names the tokenizer/template."""


def apply_chat_template_option(tok, option: str, where: str):
    """Set ``tok.chat_template`` from a spec's option: 'auto' keeps it, 'hh' removes it, else a file."""
    if option == "auto":
        return tok
    if option == "hh":
        tok.chat_template = None
        return tok
    path = Path(option).expanduser()
    if not path.is_file():
        raise ChatTemplateError(
            f"chat_template {option!r} ({where}): use 'auto', 'hh' or the path of a Jinja template file"
        )
    tok.chat_template = path.read_text()
    return tok


def hh_turns(dialogue: str) -> list[tuple[str, str]]:
    """Split an HH dialogue into (role, text) turns on "\\n\\nHuman: " / "\\n\\nAssistant: "."""
    parts = re.split(r"\n\n(Human|Assistant): ?", dialogue)
    return [(parts[i].lower(), parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def to_messages(prompt: Prompt) -> list[dict]:
    """The conversation before the reply: a message list as given, an HH prompt parsed into its turns
    (the empty final Assistant turn dropped), or any other text as one user turn (TL;DR, CSV prompts)."""
    if isinstance(prompt, list):
        return prompt
    turns = hh_turns(prompt)
    if not turns:
        return [{"role": "user", "content": prompt.strip()}]
    if turns[-1] == ("assistant", "") or (turns[-1][0] == "assistant" and not turns[-1][1].strip()):
        turns = turns[:-1]
    return [{"role": ROLES[r], "content": t.strip()} for r, t in turns]


def hh_text(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Messages rendered in the HH text format (system text first, then Human/Assistant turns)."""
    out = "".join(HH_TURN.get(m["role"], HH_TURN["user"]).format(m["content"]) for m in messages)
    return out + HH_PROMPT_END if add_generation_prompt else out


class ChatFormat:
    """Rendering and stop tokens of one tokenizer (``ChatFormat(tok)``).

    - template mode (the tokenizer has a chat template): prompts through ``apply_chat_template`` with the
      generation prompt, the template's own BOS convention, responses end with the template's
      end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ...), which is also a stop token;
    - HH mode: HH text, a BOS where the tokenizer adds one by default, responses end with eos.
    """

    def __init__(self, tok) -> None:
        self.tok = tok
        self.template = bool(getattr(tok, "chat_template", None))
        if self.template:
            self.bos: list[int] = []  # templates write their BOS themselves (Hugging Face's convention)
            self.end_of_turn = self._template_end_of_turn()
        else:
            probe = tok("a")["input_ids"]
            self.bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []
            self.end_of_turn = tok.eos_token_id

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self.tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        except Exception as e:  # jinja raises its own types (e.g. a template's raise_exception)
            name = getattr(self.tok, "name_or_path", "") or "tokenizer"
            raise ChatTemplateError(
                f"chat template of {name!r} cannot render {[m.get('role') for m in messages]}: "
                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
            ) from None

    def _template_end_of_turn(self) -> int:
        """The first special token the template writes after an assistant message's content."""
        marker = "rlhf-lit-end-marker"
        text = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], False)
        after = text[text.rfind(marker) + len(marker) :]
        special = set(self.tok.all_special_ids) | {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        for i in self.tok(after, add_special_tokens=False)["input_ids"]:
            if i in special:
                return i
        return self.tok.eos_token_id

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end a response: eos and the template's end-of-turn token."""
        return list(dict.fromkeys(i for i in (self.tok.eos_token_id, self.end_of_turn) if i is not None))

    def prompt_text(self, prompt: Prompt) -> str:
        """The text the model continues: the conversation with the assistant's turn opened."""
        if self.template:
            return self._render(to_messages(prompt), True)
        return hh_text(prompt) if isinstance(prompt, list) else prompt  # HH text stays as the source wrote it

    def prompt_ids(self, prompts: list[Prompt]) -> list[list[int]]:
        """Token ids of each prompt (BOS included by the tokenizer's convention)."""
        if not prompts:
            return []
        ids = self.tok([self.prompt_text(p) for p in prompts], add_special_tokens=False)["input_ids"]
        return [self.bos + x for x in ids]

    def response_ids(self, responses: list[str], ended: Optional[list[bool]] = None) -> list[list[int]]:
        """Token ids of each response followed by the end-of-turn token (eos in HH mode), except where
        ``ended`` says the reply was cut (at max_new_tokens) before its stop token. In template mode the
        leading space HH responses carry is dropped (the template puts the reply on its own line)."""
        if not responses:
            return []
        texts = [r.lstrip() for r in responses] if self.template else responses
        ended = [True] * len(texts) if ended is None else ended
        ids = self.tok(texts, add_special_tokens=False)["input_ids"]
        return [x + [self.end_of_turn] if e else x for x, e in zip(ids, ended)]

    def header_len(self, prompt: Prompt) -> int:
        """How many leading tokens of ``prompt_ids([prompt])[0]`` come before the first message's content:
        BOS, a template's system block and first role header (``<|im_start|>user\n``), HH's ``Human:``.
        What a cut of a too-long conversation keeps from its start."""
        text, messages = self.prompt_text(prompt), to_messages(prompt)
        first = next((m["content"] for m in messages if m["content"].strip()), "")
        at = text.find(first.strip()) if first.strip() else -1
        if at <= 0:
            return len(self.bos)
        offsets = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        return len(self.bos) + sum(1 for _, end in offsets if end <= at)

    def conversation_ids(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A whole conversation and a loss mask that is 1 on every assistant turn's tokens (and the
        end-of-turn token after it), 0 elsewhere: SFT on all assistant turns of a multi-turn row.

        The conversation is rendered once and tokenized with character offsets, so each token is
        attributed to the message whose content it covers."""
        messages = [{**m, "content": m["content"].strip()} for m in messages]
        text = self._render(messages, False) if self.template else hh_text(messages, add_generation_prompt=False)
        spans, cursor = [], 0
        for m in messages:
            content = m["content"]
            at = text.find(content, cursor) if content else -1
            if at < 0:
                continue
            cursor = at + len(content)
            if m["role"] == "assistant":
                spans.append((at, cursor))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        mask = [int(any(s < b and e > a for a, b in spans)) for s, e in offsets]  # overlaps a reply
        if not self.template:  # HH text has no end-of-turn token: the final reply ends with eos
            ids, mask = ids + [self.end_of_turn], mask + [1]
        else:  # the end-of-turn token right after an assistant turn's content is a target too
            for k in range(1, len(ids)):
                if ids[k] == self.end_of_turn and mask[k - 1]:
                    mask[k] = 1
            while mask and not mask[-1]:  # nothing to learn after the last reply's end-of-turn
                ids, mask = ids[:-1], mask[:-1]
        return self.bos + ids, [0] * len(self.bos) + mask
