"""Direct preference optimisation and its family (DPO, conservative DPO, IPO, SimPO, ORPO): the policy
learns from preference pairs directly, with no reward model and no sampling (Rafailov et al. 2023)."""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.cli import OptimizerCallable

from rlhf_lit.hf.models import LoRA, ModelSpec, apply_lora, enable_checkpointing, merged, response_logps, set_dropout
from rlhf_lit.math import losses
from rlhf_lit.math.preference import DPOConfig
from rlhf_lit.training.optim import LRSchedule
from rlhf_lit.training.stage_module import StageModule


class DPOModule(StageModule):
    """The policy (usually the SFT export) trained on chosen/rejected pairs against a frozen reference."""

    stage = "dpo"
    frozen = ("ref",)  # the reference stays in eval mode (no dropout)

    def __init__(
        self,
        model: ModelSpec,
        reference: Optional[ModelSpec] = None,
        loss: Optional[DPOConfig] = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: Optional[LRSchedule] = None,
        weight_decay: float = 0.0,
        lora: Optional[LoRA] = None,
        frozen_dtype: str = "float32",
        dropout: Optional[float] = 0.0,
    ) -> None:
        """
        Args:
            model: spec of the policy to train (built in configure_model).
            reference: spec of the frozen reference (default: the model's spec; with LoRA, the model with
                adapters disabled; none for the reference-free losses).
            loss: the preference loss and its knobs.
            optimizer: optimizer class and arguments.
            schedule: warmup + decay of the learning rate.
            weight_decay: decoupled weight decay of the weight matrices.
            lora: train low-rank adapters instead of all weights (merged on export).
            frozen_dtype: storage dtype of the frozen reference: float32 (default: the step-0 loss is exactly
                log 2), or bfloat16/float16 for half the reference's memory (computed in fp32 layer by layer
                under fp32 and mixed-precision trainers, on every machine). The rounding of the weights alone
                moved SmolLM2's step-0 loss on 8 HH pairs to 0.6878 (log 2 = 0.6931; per-sequence log-ratios up
                to 0.30 nats), the same on CPUs with and without bf16 units (#27).
            dropout: every dropout probability of the policy (and so of the LoRA adapters-off reference). 0
                (default, as TRL) makes the step-0 loss exactly log 2 and the cached reference deterministic;
                with a GPT-2/OPT checkpoint's 0.1 three calls on one batch gave 0.6903 / 0.6901 / 0.6947 (#27).
                None keeps the checkpoint's.
        """
        self.refuse_reference_with_lora(lora, reference, "model")
        super().__init__(optimizer, schedule, weight_decay, frozen_dtype)
        self.save_hyperparameters()
        self.spec, self.ref_spec, self.lora = model, reference or model, lora
        self.cfg = loss or DPOConfig()
        self.dropout = dropout
        self.model = self.ref = None
        self.ref_cache: dict[int, tuple[float, float]] = {}  # pair index -> reference (chosen, rejected)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        model = self.spec.build_causal_lm(self.tokenizer)
        if self.spec.gradient_checkpointing:
            enable_checkpointing(model)
        if self.dropout is not None:
            set_dropout(model, self.dropout)
        self.model = apply_lora(model, self.lora).train()  # from_pretrained returns eval mode (#13)
        if self.cfg.needs_reference and self.lora is None:
            self.ref = self.ref_spec.build_causal_lm(self.tokenizer).eval().requires_grad_(False)
        self.hold_frozen(self.ref, dtype=self.frozen_dtype)

    @torch.no_grad()
    def reference_logps(self, batch):
        """(2B,) reference log-probs: cached per pair index, else the frozen copy or the adapters-off model."""
        index = batch.get("index") if self.cfg.cache_reference and self.training else None  # training pairs only
        if index is not None and all(int(i) in self.ref_cache for i in index):
            pairs = torch.tensor([self.ref_cache[int(i)] for i in index], device=batch["input_ids"].device)
            return torch.cat([pairs[:, 0], pairs[:, 1]])
        args = (batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
        if self.ref is None:  # adapters off, in eval mode: the reference never sees dropout
            was_training = self.model.training
            self.model.eval()
            try:
                with self.model.disable_adapter():
                    logps, _ = response_logps(self.model, *args)
            finally:
                self.model.train(was_training)
        else:
            logps, _ = response_logps(self.ref, *args)
        if index is not None:
            b = len(index)
            for k, i in enumerate(index.tolist()):
                self.ref_cache[i] = (float(logps[k]), float(logps[b + k]))
        return logps

    def step(self, batch):
        with self.uncached_autocast():
            logps, n = response_logps(self.model, batch["input_ids"], batch["attention_mask"], batch["prompt_len"])
        b = logps.size(0) // 2
        ref = self.reference_logps(batch) if self.cfg.needs_reference else None
        c = self.cfg
        return losses.preference_loss(
            logps[:b],
            logps[b:],
            None if ref is None else ref[:b],
            None if ref is None else ref[b:],
            n[:b],
            n[b:],
            c.loss_type,
            c.beta,
            c.label_smoothing,
            c.simpo_gamma,
            c.orpo_lambda,
        )

    def training_step(self, batch, batch_idx):
        loss, stats = self.step(batch)
        b = self.batch_size(batch)
        if self.logging_step():
            self.log_dict({f"dpo/{k}": v for k, v in stats.items()}, batch_size=b)
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        return loss

    def validation_step(self, batch, batch_idx):
        loss, stats = self.step(batch)
        self.log_dict({f"val/{k}": v for k, v in stats.items()}, batch_size=self.batch_size(batch), sync_dist=True)
        return loss

    def batch_size(self, batch) -> int:
        return batch["input_ids"].size(0) // 2  # pairs: B chosen rows, then B rejected

    def export_models(self):
        return {"": lambda out: merged(self.model).save_pretrained(out, safe_serialization=True)}
