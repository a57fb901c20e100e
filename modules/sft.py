"""Stage 1: supervised fine-tuning of the policy on prompt -> response demonstrations."""

from __future__ import annotations

import math
from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable
from torchmetrics.text.rouge import ROUGEScore

from rlhf_lit.hf.models import (
    FOUR_D_MASK_FAMILIES,
    LoRA,
    ModelSpec,
    apply_lora,
    enable_checkpointing,
    lm_inputs,
    merged,
    next_token_logprobs,
    takes_4d_mask,
)
from rlhf_lit.math import losses
from rlhf_lit.rl.generation import GenerationConfig, generate_texts
from rlhf_lit.training.optim import LRSchedule
from rlhf_lit.training.stage_module import StageModule


class SFTModule(StageModule):
    """Causal-LM loss on prompt + response (prompt tokens masked by the datamodule's ``loss_mask``)."""

    stage = "sft"

    def __init__(
        self,
        model: ModelSpec,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: Optional[LRSchedule] = None,
        weight_decay: float = 0.0,
        lora: Optional[LoRA] = None,
        rouge_samples: int = 0,
        generation: Optional[GenerationConfig] = None,
    ) -> None:
        """
        Args:
            model: spec of the policy to fine-tune (built in configure_model).
            optimizer: optimizer class and arguments; biases and norms get no weight decay.
            schedule: warmup + decay of the learning rate.
            weight_decay: decoupled weight decay of the weight matrices.
            lora: train low-rank adapters instead of all weights (merged on export).
            rouge_samples: at each validation, greedily generate for this many held-out prompts and log
                ROUGE-1/2/L against the references (0 disables).
            generation: settings of those generations (greedy by default).
        """
        super().__init__(optimizer, schedule, weight_decay)
        self.save_hyperparameters()
        self.spec, self.lora, self.rouge_samples = model, lora, rouge_samples
        self.generation = generation or GenerationConfig(do_sample=False)
        self.model = None
        self.samples: list[dict] = []

    def configure_model(self) -> None:
        if self.model is None:
            model = self.spec.build_causal_lm(self.tokenizer)
            if self.spec.gradient_checkpointing:
                enable_checkpointing(model)
            packed = self._trainer is not None and self.trainer.datamodule is not None and self.data.packed
            if packed and not takes_4d_mask(model):
                raise ValueError(
                    f"data.pack needs a model family that takes 4D attention masks and position_ids "
                    f"({', '.join(FOUR_D_MASK_FAMILIES)}) with sdpa attention; {model.config.model_type!r} with "
                    f"{model.config._attn_implementation!r} attention does not: set pack: false"
                )
            # from_pretrained returns eval mode and Lightning does not switch it: without this, dropout and
            # gradient checkpointing would be silently off for a pretrained model (issue #13).
            self.model = apply_lora(model, self.lora).train()

    def forward(self, input_ids, attention_mask, position_ids=None, attention_mask_4d=None, loss_mask=None):
        """(B, T) ids and mask -> next-token log-probs (B, T - 1), computed in LM-head chunks (no (B, T, V)
        logits; #18), only where ``loss_mask`` (B, T) reads them when it is given (0 elsewhere; #30). Packed
        rows bring their positions and a (B, 1, T, T) block-diagonal mask (see datamodules.collate.pack_sft)."""
        if attention_mask_4d is None:
            kw = lm_inputs(self.model, input_ids, attention_mask)
        else:
            kw = {"input_ids": input_ids, "attention_mask": attention_mask_4d, "position_ids": position_ids}
        return next_token_logprobs(self.model, loss_mask, **kw)

    def step(self, batch):
        ids, mask, loss_mask = batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        with self.uncached_autocast():
            logprobs = self(ids, mask, batch.get("position_ids"), batch.get("attention_mask_4d"), loss_mask)
        return losses.sft_loss(logprobs, batch["loss_mask"])

    def training_step(self, batch, batch_idx):
        loss, stats = self.step(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, stats = self.step(batch)
        n = batch["input_ids"].size(0)
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        return loss

    def on_validation_epoch_end(self):
        if "val/loss" in self.trainer.callback_metrics:
            self.log("val/ppl", math.exp(min(20.0, float(self.trainer.callback_metrics["val/loss"]))))
        if self.rouge_samples and not self.trainer.sanity_checking:
            self.log_dict({f"val/{k}": v for k, v in self.rouge().items()})

    def rouge(self) -> dict[str, float]:
        """ROUGE-1/2/L (F-measure) of greedy generations on held-out prompts; keeps them in ``samples``."""
        records = self.data.eval_records[: self.rouge_samples]
        if not records:
            return {}
        refs = [r["response"] for r in records]
        texts, _ = generate_texts(
            self.model,
            self.tokenizer,
            [r.get("messages") or r["prompt"] for r in records],
            self.generation,
            self.data.eval_batch_size,
            device=self.device,
        )
        self.samples = [
            {"prompt": r["prompt"], "generation": t, "reference": ref} for r, t, ref in zip(records, texts, refs)
        ]
        scores = ROUGEScore(rouge_keys=("rouge1", "rouge2", "rougeL"))(texts, refs)
        return {k.replace("_fmeasure", ""): float(v) for k, v in scores.items() if k.endswith("_fmeasure")}

    def export_models(self):
        return {"": lambda out: merged(self.model).save_pretrained(out, safe_serialization=True)}
