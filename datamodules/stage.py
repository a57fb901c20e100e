"""One LightningDataModule per kind of stage data over a :class:`~datamodules.blend.Blend`.

Each implements :class:`rlhf_lit.training.stage_module.StageData`, the one contract stage modules read (tokenizer,
held-out records, eval batch size, packing, data report): the tokenizer is trained or fetched once in
``prepare_data`` (one process per node) and loaded in ``setup``, which encodes the datamodule's part of
the blend once (id lists, padded per batch) and reports rows kept and dropped by reason.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import partial
from typing import Optional

import lightning as L
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from datamodules import collate as C
from datamodules.blend import Blend
from datamodules.sampler import ResumableSampler
from rlhf_lit.errors import InputError
from rlhf_lit.hf.tokenizer import TokenizerSpec


class StageDataModule(L.LightningDataModule):
    """Base: blend -> stage records -> encoded items -> padded batches."""

    stage = "sft"

    def __init__(
        self,
        blend: Blend,
        tokenizer: TokenizerSpec,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        max_seq_len: int = 512,
        eval_limit: Optional[int] = None,
        num_workers: int = 0,
        seed: int = 0,
        bucket_by_length: bool = False,
        part: Optional[str] = None,
    ) -> None:
        """
        Args:
            blend: the sources, weights and stage split.
            tokenizer: tokenizer spec (hub/local path, or a BPE trained on the blend's text).
            batch_size: training batch size per process.
            eval_batch_size: validation batch size (defaults to batch_size).
            max_seq_len: longest sequence in tokens (prompt + response).
            eval_limit: use at most this many held-out records for validation.
            num_workers: DataLoader workers.
            seed: shuffling seed of the training loader.
            bucket_by_length: training batches of similar lengths (shuffled in windows of 50 batches, sorted
                by length, batches shuffled): less padding, same data per epoch.
            part: the blend's split part to train on (default: the datamodule's kind, sft / reward / ppo; e.g.
                a DPO stage on the reward model's pairs reads ``reward``).
        """
        super().__init__()
        for key, value, least in (("max_seq_len", max_seq_len, 2), ("batch_size", batch_size, 1)):
            if value < least:  # up front, not a cryptic "check the sources and the split" later (#28)
                raise InputError(f"data.init_args.{key}: must be at least {least}, got {value}")
        self.blend, self.tokenizer_spec = blend, tokenizer
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.max_seq_len, self.eval_limit, self.num_workers, self.seed = max_seq_len, eval_limit, num_workers, seed
        self.bucket_by_length, self.part = bucket_by_length, part or self.stage
        self.tokenizer = None
        self.train_items: list[dict] = []
        self.eval_items: list[dict] = []
        self.eval_records: list[dict] = []
        self.dropped: Counter = Counter()
        self.cut: Counter = Counter()
        """rows kept but cut to a length limit, by reason (counted and reported, never silent)"""
        self._resume: Optional[dict] = None

    packed = False
    """whether training rows hold several examples (SFT packing)"""

    def report(self) -> list[dict]:
        """Per source: rows read, kept, dropped by reason and part sizes (for model cards and logs)."""
        return self.blend.report()

    def corpus(self):
        """Every text of the blend, for training a tokenizer on the run's own data."""
        for name in self.blend.parts:
            for part in ("train", "eval"):
                for kind in [name] if name in ("sft", "reward", "ppo") else ["sft", "reward"]:
                    for r in self.blend.records(name, part, kind=kind):
                        yield from (r[k] for k in ("prompt", "response", "chosen", "rejected") if k in r)

    def encode(self, records: list[dict]) -> tuple[list[dict], Counter]:
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        raise NotImplementedError

    @staticmethod
    def length(item: dict) -> int:
        """Tokens of an encoded item (what padding is measured against)."""
        return len(item["input_ids"])

    def prepare_data(self) -> None:
        # One process per node trains (or downloads) the tokenizer; the others wait, then load it in setup.
        self.tokenizer_spec.load(texts=self.corpus)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.tokenizer_spec.load(texts=self.corpus)
        if self.train_items or self.eval_items:
            return
        self.train_items, dropped = self.encode(self.blend.records(self.part, kind=self.stage))
        self.eval_records = self.blend.records(self.part, "eval", kind=self.stage)[: self.eval_limit]
        self.eval_items, eval_dropped = self.encode(self.eval_records)
        unusable = {
            f"{src}_{which}_not_{kind}": n
            for (src, name, which, kind), n in self.blend.unsupported.items()
            if name == self.part and kind == self.stage and (which == "train" or name == kind)
        }
        self.dropped = dropped + eval_dropped + Counter(unusable)
        if not self.train_items:
            raise ValueError(
                f"{type(self).__name__}: the blend gives no {self.stage!r} training records in part "
                f"{self.part!r}; check the sources and the split {self.blend.split}"
            )
        rank_zero_info(
            json.dumps(
                {
                    "data": self.blend.report(),
                    "stage": self.stage,
                    "train": len(self.train_items),
                    "eval": len(self.eval_items),
                    "dropped_when_encoding": dict(self.dropped),
                    **({"cut_when_encoding": dict(self.cut)} if +self.cut else {}),
                }
            )
        )

    def _sampler(self, n: int, batch_size: int, seed: int, shuffle: bool = True, items=None) -> ResumableSampler:
        world = self.trainer.world_size if self.trainer is not None else 1
        lengths = [self.length(x) for x in items] if self.bucket_by_length and items is not None else None
        # Data parallel: each rank takes every world-th index, so buckets span the global batch.
        sampler = ResumableSampler(n, seed, shuffle, lengths, batch_size * world)
        if shuffle and self._resume is not None:
            sampler.resume(self._resume["epoch"], self._resume["batches"] * batch_size * self._resume["world_size"])
        return sampler

    def _loader(self, items, batch_size, shuffle):
        return DataLoader(
            items,
            batch_size=batch_size,
            sampler=self._sampler(len(items), batch_size, self.seed, shuffle, items),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            drop_last=False,
        )

    def train_dataloader(self):
        return self._loader(self.train_items, self.batch_size, shuffle=True)

    # -- mid-epoch resume: the checkpoint records how far into the epoch training got ------------------
    def state_dict(self) -> dict:
        if self.trainer is None:
            return {}
        # "processed", not "completed": ModelCheckpoint saves in on_train_batch_end, before the batch
        # counts as completed, and the restarted loop resumes after the processed ones.
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches": done, "world_size": self.trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state or None

    def val_dataloader(self):
        return self._loader(self.eval_items, self.eval_batch_size, shuffle=False) if self.eval_items else []

    def test_dataloader(self):
        return self.val_dataloader()


class SFTDataModule(StageDataModule):
    """Prompt + response pairs for supervised fine-tuning."""

    stage = "sft"

    def __init__(
        self, *args, mask_prompt: bool = True, pack: bool = False, all_assistant_turns: bool = False, **kwargs
    ) -> None:
        """
        Args:
            mask_prompt: train on response tokens only (False: on the whole text, as DeepSpeed-Chat).
            all_assistant_turns: in multi-turn rows (HH dialogues, ``messages``), train on every assistant
                turn, not only the final reply (user and system turns stay masked; with mask_prompt).
            pack: put several examples in each row of up to max_seq_len tokens, each attending only to itself
                (block-diagonal mask, positions restarting per example): almost no padding. batch_size then
                counts rows. Needs a family that takes 4D attention masks and position_ids (opt, gpt2,
                gpt_neox, llama: tested; others get a clear error).
        """
        super().__init__(*args, **kwargs)
        self.mask_prompt, self.pack, self.all_assistant_turns = mask_prompt, pack, all_assistant_turns
        self.packed = pack

    def encode(self, records):
        items, dropped = C.encode_sft(
            self.tokenizer, records, self.max_seq_len, self.mask_prompt, self.all_assistant_turns
        )
        return (C.pack_sft(items, self.max_seq_len, self.seed) if self.pack else items), dropped

    def collate(self, items):
        return (C.collate_packed if self.pack else C.collate_sft)(items, self.tokenizer.pad_token_id)


class PreferenceDataModule(StageDataModule):
    """Prompt + chosen/rejected pairs for the reward model."""

    stage = "reward"

    def encode(self, records):
        return C.encode_pairs(self.tokenizer, records, self.max_seq_len)

    @staticmethod
    def length(item):
        # Sort key for bucketing: the length of the pair's packed row, prompt once then both responses (the
        # reward model's shared_prompt on families that take 4D masks). On the SmolLM2 benchmark workload
        # the rows pad 1% above their real tokens, vs 14% with the former key (prompt bin, then the longer
        # response) and 27% unsorted (#30).
        return len(item["chosen_ids"]) + len(item["rejected_ids"]) - item["prompt_len"]

    def collate(self, items):
        return C.collate_pairs(items, self.tokenizer.pad_token_id)


class PromptDataModule(StageDataModule):
    """Prompts for PPO rollouts (left-padded), plus an optional pretraining/SFT blend for PPO-ptx."""

    stage = "ppo"

    def __init__(
        self,
        *args,
        max_prompt_len: int = 256,
        ptx_blend: Optional[Blend] = None,
        ptx_batch_size: Optional[int] = None,
        **kwargs,
    ) -> None:
        """
        Args:
            max_prompt_len: prompts are cut from the left to this many tokens.
            ptx_blend: SFT-style data whose language-model loss is mixed into the actor's (InstructGPT's PPO-ptx).
            ptx_batch_size: batch size of the ptx loader (defaults to batch_size).
        """
        super().__init__(*args, **kwargs)
        if max_prompt_len < 1:
            raise InputError(f"data.init_args.max_prompt_len: must be at least 1, got {max_prompt_len}")
        self.max_prompt_len, self.ptx_blend = max_prompt_len, ptx_blend
        self.ptx_batch_size = ptx_batch_size or self.batch_size
        self.ptx_items: list[dict] = []

    def encode(self, records):
        items, dropped = C.encode_prompts(self.tokenizer, records, self.max_prompt_len)
        cut = sum(x.pop("cut") for x in items)
        self.cut["prompt_cut_to_max_prompt_len"] += cut
        if items and cut * 2 > len(items):  # a tiny max_prompt_len trains on prompt tails alone (#28)
            rank_zero_warn(
                f"data.init_args.max_prompt_len={self.max_prompt_len} cuts {cut} of {len(items)} prompts from the "
                "left (the model sees only their last tokens)"
            )
        return items, dropped

    @staticmethod
    def length(item):
        return len(item["prompt_ids"])

    def collate(self, items):
        return C.collate_prompts(items, self.tokenizer.pad_token_id)

    def setup(self, stage=None):
        super().setup(stage)
        if self.ptx_blend is not None and not self.ptx_items:
            self.ptx_items, dropped = C.encode_sft(
                self.tokenizer, self.ptx_blend.records(next(iter(self.ptx_blend.parts)), kind="sft"), self.max_seq_len
            )
            self.dropped += dropped
            if not self.ptx_items:
                raise ValueError("PromptDataModule: ptx_blend gives no SFT records")

    def train_dataloader(self):
        prompts = super().train_dataloader()
        if not self.ptx_items:
            return prompts
        # Repeat the ptx data so it lasts as long as the prompts: the prompts define the epoch.
        need = len(prompts) * self.ptx_batch_size
        items = self.ptx_items * (need // len(self.ptx_items) + 1)
        ptx = DataLoader(
            items,
            batch_size=self.ptx_batch_size,
            sampler=self._sampler(len(items), self.ptx_batch_size, self.seed + 1),
            collate_fn=partial(C.collate_sft, pad_id=self.tokenizer.pad_token_id),
        )
        return CombinedLoader({"prompts": prompts, "ptx": ptx}, mode="min_size")
