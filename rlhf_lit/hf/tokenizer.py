"""Tokenizer specs: load one from the hub or a directory, or train a byte-level BPE on the run's own text.

A spec is what a config names; ``load()`` returns a ``transformers`` fast tokenizer with a pad token.
Padding is masked by the attention mask everywhere (never found by id), so pad may equal eos: a
pretrained tokenizer without pad reuses an existing token and the model's vocabulary is left alone.
Its ``chat_template`` option decides how conversations are rendered (see rlhf_lit.hf.chat_format).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Optional

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rlhf_lit.errors import InputError
from rlhf_lit.hf.chat_format import apply_chat_template_option
from rlhf_lit.hf.hub import hub_errors

SPECIALS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


class TokenizerSpec:
    """Base class for tokenizer specs."""

    def load(self, texts: Callable[[], Iterable[str]] | None = None) -> PreTrainedTokenizerFast:
        """Return the tokenizer. ``texts`` yields training text for specs that train one."""
        raise NotImplementedError


class HFTokenizer(TokenizerSpec):
    """A tokenizer from the hub or a local directory (for example a stage's export)."""

    def __init__(
        self,
        path: str,
        chat_template: str = "auto",
        add_pad_token: bool = False,
        gguf_file: Optional[str] = None,
        trust_remote_code: bool = False,
    ) -> None:
        """
        Args:
            path: hub name or local directory with tokenizer files.
            chat_template: how conversations are rendered: 'auto' (the tokenizer's chat template when it
                has one, else the HH text format), 'hh', or the path of a Jinja template file. Saved with
                the stage's export, so later stages, evaluate and chat render the same way.
            add_pad_token: add a dedicated ``<pad>`` token when the tokenizer has none (the model's
                embeddings grow by one row, initialised to the mean embedding, identically in every model).
                Default: reuse eos as pad (masked by the attention mask), leaving the vocabulary unchanged.
            gguf_file: a GGUF file inside ``path`` to read the tokenizer from (needs the ``gguf`` package).
            trust_remote_code: allow tokenizer code from the hub (off unless asked).
        """
        self.path, self.chat_template, self.add_pad_token = path, chat_template, add_pad_token
        self.gguf_file, self.trust_remote_code = gguf_file, trust_remote_code

    def load(self, texts=None) -> PreTrainedTokenizerFast:
        kw = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        folder = Path(self.path)
        if folder.is_dir() and not self.gguf_file and not any((folder / f).exists() for f in TOKENIZER_FILES):
            # transformers would build an empty tokenizer and fail much later ("cannot reshape a tensor of 0
            # elements", #28), or ask for sentencepiece
            raise InputError(f"{self.path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}...) in this directory")
        with hub_errors(self.path, "tokenizer"):
            tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=self.trust_remote_code, **kw)
        if len(tok) == 0:
            raise InputError(f"{self.path}: the tokenizer loaded empty (no vocabulary)")
        tok = apply_chat_template_option(tok, self.chat_template, self.path)
        return ensure_pad(tok, self.add_pad_token, self.path)


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "tokenizer.model",
    "vocab.txt",
    "merges.txt",
)


class TrainedBPE(TokenizerSpec):
    """A byte-level BPE trained locally on the run's text, cached in ``save_dir`` (offline work and tests)."""

    def __init__(self, save_dir: str, vocab_size: int = 2000, min_frequency: int = 2) -> None:
        """
        Args:
            save_dir: where the trained tokenizer is saved; reused when it already holds one.
            vocab_size: target vocabulary size, special tokens included.
            min_frequency: minimum pair count for a merge.
        """
        self.save_dir, self.vocab_size, self.min_frequency = save_dir, vocab_size, min_frequency

    def load(self, texts=None) -> PreTrainedTokenizerFast:
        if (Path(self.save_dir) / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(self.save_dir)
        if texts is None:
            raise ValueError(f"no tokenizer in {self.save_dir} and no text given to train one")
        tok = train_bpe(texts(), self.vocab_size, self.min_frequency)
        save_atomically(tok, self.save_dir)
        return AutoTokenizer.from_pretrained(self.save_dir)


def train_bpe(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (GPT-2's scheme) and wrap it with pad/bos/eos/unk set, right padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # padding_side must be a constructor argument to be saved with the tokenizer.
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="right", **SPECIALS)


def save_atomically(tok: PreTrainedTokenizerFast, save_dir: str) -> None:
    """save_pretrained into a temporary sibling, then rename, so a crash never leaves half a tokenizer."""
    target = Path(save_dir)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tok.save_pretrained(tmp)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process won the race: keep its copy
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def ensure_pad(tok, add_pad_token: bool, where: str):
    """Give ``tok`` a pad token: its own, a new ``<pad>`` when ``add_pad_token``, else eos (or unk).

    Reusing a token keeps a pretrained vocabulary (and the exported model's) unchanged: padding is
    masked by the attention mask, and rewards are read at the last attended token, so pad == eos is
    safe here (DeepSpeed-Chat and TRL pad with eos too)."""
    if tok.pad_token is not None:
        return tok
    if add_pad_token:
        tok.add_special_tokens({"pad_token": SPECIALS["pad_token"]})
        return tok
    existing = tok.eos_token or tok.unk_token
    if existing is None:
        raise ValueError(f"tokenizer {where!r} has no pad, eos or unk token to pad with; set add_pad_token: true")
    tok.pad_token = existing
    return tok


def tokenizer_fingerprint(tok) -> str:
    """A short hash of the vocabulary and special tokens, to check that two stages share a tokenizer."""
    payload = json.dumps([sorted(tok.get_vocab().items()), tok.pad_token, tok.eos_token], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]
