"""Stage 2: a reward model trained on preference pairs (Bradley-Terry), scored at the last attended token."""

from __future__ import annotations

import copy
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric

from rlhf_lit.hf.models import ModelSpec, enable_checkpointing, takes_4d_mask
from rlhf_lit.math import losses
from rlhf_lit.math.ops import last_attended_index, pack_shared_prompt, split_shared_prompt
from rlhf_lit.training.optim import LRSchedule
from rlhf_lit.training.stage_module import StageModule

LOSSES = ("bradley_terry", "divergent_suffix")


class RewardModule(StageModule):
    """Scalar-head model; each batch holds B chosen rows then B rejected rows, scored in one forward."""

    stage = "reward"

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: Optional[LRSchedule] = None,
        weight_decay: float = 0.0,
        loss: str = "bradley_terry",
        center_coef: float = 0.0,
        shared_prompt: bool = True,
    ) -> None:
        """
        Args:
            model: spec of the backbone (a value head is added, or loaded with a reward export).
            optimizer: optimizer class and arguments.
            schedule: warmup + decay of the learning rate.
            weight_decay: decoupled weight decay of the weight matrices.
            loss: 'bradley_terry' on the last-token scores (with the pair's margin when the data has one),
                or 'divergent_suffix', DeepSpeed-Chat's token-wise loss over the differing suffix.
            center_coef: weight of the reward-centering term (Eisenstein et al. 2023); 0 disables it.
            shared_prompt: run each pair's prompt once (same scores, P + 2R tokens instead of 2(P + R));
                only with bradley_terry. Families of FOUR_D_MASK_FAMILIES pack prompt, chosen and rejected
                in one row under a mask that keeps the responses apart; others run both responses on the
                prompt's KV cache (not with gradient checkpointing, which drops the cache).
        """
        super().__init__(optimizer, schedule, weight_decay)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.save_hyperparameters()
        self.spec, self.loss_type, self.center_coef = model, loss, center_coef
        self.shared_prompt = shared_prompt and loss == "bradley_terry"  # divergent_suffix reads every token
        self.model = None
        self.val_stats: dict[str, float] = {}
        self.epoch_sums: dict = {}
        self.train_stats: dict[str, float] = {}
        # Running mean of the score and its square, on validation and on training data: the export records
        # mean/std (validation's when there was one) for PPO's reward normalisation.
        self.val_moments, self.train_moments = (nn.ModuleList([MeanMetric(), MeanMetric()]) for _ in range(2))

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.spec.build_scalar(self.tokenizer).train()  # from_pretrained returns eval mode (#13)
            if self.spec.gradient_checkpointing:
                enable_checkpointing(self.model.backbone)

    def forward(self, input_ids, attention_mask):
        """(B, T) -> scores (B,) at each row's last attended token."""
        return self.model.score(input_ids, attention_mask)

    def step(self, batch):
        with self.uncached_autocast():
            return self.scored_loss(batch)

    def scored_loss(self, batch):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        b = ids.size(0) // 2
        pad, shared = self.tokenizer.pad_token_id, self.shared_prompt and "prompt_len" in batch
        if shared and takes_4d_mask(self.model.backbone):
            # one row per pair: 1.6x fewer token slots than 2B padded rows on HH-style data (#30)
            packed = pack_shared_prompt(ids, mask, batch["prompt_len"], pad)
            scores = self.model.score_packed(*packed).t().reshape(-1)  # chosen rows, then rejected
        elif shared and not self.spec.gradient_checkpointing and bool((batch["prompt_len"] > 0).all()):
            parts = split_shared_prompt(ids, mask, batch["prompt_len"], pad)
            scores = self.model.score_shared_prompt(*parts).view(b, 2).t().reshape(-1)
        else:
            values = self.model(ids, mask)  # (2B, T)
            scores = values.gather(1, last_attended_index(mask).unsqueeze(1)).squeeze(1)
        chosen, rejected = scores[:b], scores[b:]
        if self.loss_type == "divergent_suffix":
            loss, stats = losses.divergent_suffix_loss(
                values[:b], values[b:], ids[:b], ids[b:], mask[:b], mask[b:], chosen, rejected
            )
        else:
            loss, stats = losses.pairwise_loss(chosen, rejected, batch.get("margin"), self.center_coef)
        return loss, stats, scores.detach()

    def training_step(self, batch, batch_idx):
        loss, stats, scores = self.step(batch)
        b = batch["input_ids"].size(0) // 2
        # Epoch means from running sums; step values on logging steps only (each self.log costs ~1 ms).
        for k, v in stats.items():
            self.epoch_sums[k] = self.epoch_sums.get(k, 0.0) + v.detach() * b
        self.epoch_sums["n"] = self.epoch_sums.get("n", 0) + b
        if self.logging_step():
            self.log_dict({f"rm/{k}_step": v for k, v in stats.items()}, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.train_moments[0].update(scores)
        self.train_moments[1].update(scores**2)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, stats, scores = self.step(batch)
        self.val_moments[0].update(scores)
        self.val_moments[1].update(scores**2)
        b = batch["input_ids"].size(0) // 2
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=b, sync_dist=True)

    @staticmethod
    def moments(pair) -> dict[str, float]:
        """Mean and std of the scores seen by a (mean, mean-of-squares) metric pair; resets it."""
        if not pair[0].update_count:
            return {}
        mean, sq = float(pair[0].compute()), float(pair[1].compute())
        pair[0].reset(), pair[1].reset()
        return {"score_mean": mean, "score_std": max(sq - mean**2, 0.0) ** 0.5}

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            self.val_stats = self.moments(self.val_moments)
            self.log_dict({f"val/{k}": v for k, v in self.val_stats.items()})

    def on_train_epoch_end(self):
        # Computed here on every rank (torchmetrics syncs across ranks), not in the rank-0 export.
        self.train_stats = self.moments(self.train_moments)
        sums, self.epoch_sums = self.epoch_sums, {}
        n = sums.pop("n", 0)
        if n:
            self.log_dict({f"rm/{k}_epoch": v / n for k, v in sums.items()}, sync_dist=True)

    def batch_size(self, batch) -> int:
        return batch["input_ids"].size(0) // 2  # pairs: B chosen rows, then B rejected

    def export_tokenizer(self):
        """Where pad equals eos, the export pads with unk instead: transformers' classifiers find the last
        token as the last one that is not pad, so a reply ending with eos would be read one token early
        by ``pipeline("text-classification")`` and RewardBench. rlhf-lit masks padding either way."""
        tok = self.tokenizer
        if tok.pad_token_id != tok.eos_token_id or tok.unk_token is None or tok.unk_token_id == tok.eos_token_id:
            return tok
        tok = copy.deepcopy(tok)
        tok.pad_token = tok.unk_token
        return tok

    def export_models(self):
        meta = (
            {**self.val_stats, "score_stats_from": "val"}
            if self.val_stats
            else {**self.train_stats, "score_stats_from": "train"}
        )
        pad = self.export_tokenizer().pad_token_id
        return {"": lambda out: self.model.save_pretrained(out, meta={**meta, "pad_token_id": pad})}
