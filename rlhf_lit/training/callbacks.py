"""Callbacks: the Hugging Face export at the end of fit, and sample tables for W&B (or JSONL)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from rlhf_lit.errors import InputError
from rlhf_lit.hf.models import DTYPES, gathered
from rlhf_lit.training.outputs import check_output, mark


class HFExport(L.Callback):
    """At the end of fit, write the stage's models in Hugging Face format to ``dirpath``.

    The directory opens with ``from_pretrained`` (SFT, PPO actor) or ``load_scalar_model`` (reward,
    critic). It is written to a temporary sibling and renamed, so a crash leaves no half export. It
    replaces only a directory rlhf-lit wrote (its ``.rlhf-lit`` marker): anything else at ``dirpath`` is
    refused in one line when fit starts, before training (#28). A fit that took no optimizer step writes
    nothing, so a previous export is never replaced by an untrained model.
    """

    def __init__(self, dirpath: str, dtype: Optional[str] = None, overwrite: bool = False) -> None:
        """
        Args:
            dirpath: output directory (an earlier rlhf-lit export there is replaced).
            dtype: floating weights saved as float32, bfloat16 or float16 (config.json says so); None keeps
                the dtype they were trained in (fp32 master weights under bf16-mixed).
            overwrite: replace ``dirpath`` even when rlhf-lit did not write it (``rlhf-lit --overwrite fit ...``
                sets this for every export).
        """
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"HFExport dtype must be one of {', '.join(DTYPES)} or null, got {dtype!r}")
        self.dirpath, self.dtype, self.overwrite = Path(dirpath), dtype, overwrite

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # checked up front: a refusal after training would lose the trained weights
            check_output(self.dirpath, "HFExport dirpath", self.overwrite)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0:
            rank_zero_warn(f"no optimizer step was taken: nothing exported, {self.dirpath} left as it was")
            return
        # Under ZeRO-3 every rank takes part in gathering the full weights; rank 0 writes them.
        with gathered(pl_module.parameters()):
            if trainer.is_global_zero:
                self.write(trainer, pl_module)
        trainer.strategy.barrier("hf-export")

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import shutil

        dm = trainer.datamodule
        data = dm.report() if dm is not None and hasattr(dm, "report") else []
        target = self.dirpath
        try:  # still ours after training? If not, the trained weights go beside it, never over it
            check_output(target, "HFExport dirpath", self.overwrite)
        except InputError as e:  # (raising here would lose the weights, and leave other ranks at the barrier)
            target = target.with_name(f"{target.name}.{time.strftime('%Y%m%d-%H%M%S')}")
            rank_zero_warn(f"{e}; the export goes to {target} instead")
        tmp = target.with_name(f".{target.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pl_module.export(tmp, data=data)
        if self.dtype is not None:
            for folder in {f.parent for f in tmp.rglob("*.safetensors")}:
                cast_export(folder, self.dtype)
        mark(tmp, f"{getattr(pl_module, 'stage', 'stage')} export")
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
        tmp.rename(target)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        elif old.exists():  # --overwrite over a file
            old.unlink()


def cast_export(folder: Path, dtype: str) -> None:
    """Rewrite a saved model's floating tensors (every safetensors file) in ``dtype`` and record it in its
    config.json: a file at a time, so memory holds one shard, never a second copy of the training model."""
    from safetensors.torch import load_file, save_file

    for f in folder.glob("*.safetensors"):
        tensors = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(tensors, f, metadata={"format": "pt"})
    cfg = folder / "config.json"
    if cfg.exists():
        config = json.loads(cfg.read_text())
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = dtype
        cfg.write_text(json.dumps(config, indent=2))


class SampleTable(L.Callback):
    """Every ``every_n`` validations (SFT) or training steps (PPO), log the module's ``samples``
    (a list of dicts such as prompt / generation / reference / score) as a W&B table, or append them
    to ``samples.jsonl`` in the log directory when W&B is not the logger."""

    def __init__(self, every_n: int = 1, max_rows: int = 16) -> None:
        """
        Args:
            every_n: log every n-th time the module has new samples.
            max_rows: rows per table.
        """
        self.every_n, self.max_rows, self.count = every_n, max_rows, 0

    def _emit(self, trainer, pl_module, key):
        samples = getattr(pl_module, "samples", None)
        if not samples or not trainer.is_global_zero:
            return
        self.count += 1
        if (self.count - 1) % self.every_n:
            return
        rows = samples[: self.max_rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                cols = list(rows[0])
                logger.log_table(
                    key=key, columns=cols, data=[[r[c] for c in cols] for r in rows], step=trainer.global_step
                )
                return
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        with open(log_dir / "samples.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": trainer.global_step, "key": key, **r}) + "\n")

    def on_validation_end(self, trainer, pl_module):
        # Not on_validation_epoch_end: Lightning calls the callbacks' epoch-end hooks before the module's,
        # where SFT generates this validation's samples; they would land one validation late.
        if not trainer.sanity_checking:
            self._emit(trainer, pl_module, "val/samples")

    def on_train_batch_end(self, trainer, pl_module, *args):
        if getattr(pl_module, "stage", "") == "ppo":
            self._emit(trainer, pl_module, "ppo/samples")


class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


class NonFiniteGuard(L.Callback):
    """Skips optimizer steps whose gradients are not finite (a NaN/inf loss gives such gradients).

    The step is skipped by dropping every gradient, so the optimizer leaves the weights alone; a
    warning is logged and ``train/nonfinite_steps`` counts them. At the first bad step of a streak the
    (still good) weights are checkpointed to ``<log dir>/before-nonfinite.ckpt``; after ``max_in_row``
    bad steps in a row the run stops with :class:`NonFiniteError` naming that checkpoint. Under
    DeepSpeed the engine owns the gradients (and fp16 overflow handling), so this guard does nothing.
    """

    def __init__(self, max_in_row: int = 10) -> None:
        """
        Args:
            max_in_row: consecutive non-finite steps tolerated before the run stops.
        """
        self.max_in_row, self.in_row, self.total = max_in_row, 0, 0
        self.checkpoint: Path | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        # One fused norm over all gradients (NaN or inf anywhere makes it non-finite): a per-tensor
        # check cost 20-30% of a tiny model's step.
        if torch.isfinite(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)):
            self.in_row = 0
            return
        self.in_row += 1
        self.total += 1
        if self.in_row == 1:
            self.checkpoint = Path(trainer.log_dir or trainer.default_root_dir) / "before-nonfinite.ckpt"
            trainer.save_checkpoint(self.checkpoint)
        for p in params:
            p.grad = None  # torch optimizers skip parameters without a gradient
        rank_zero_warn(
            f"non-finite gradient at step {trainer.global_step}: update skipped "
            f"({self.in_row} in a row, {self.total} in total)"
        )
        pl_module.log("train/nonfinite_steps", float(self.total))
        if self.in_row >= self.max_in_row:
            raise NonFiniteError(
                f"{self.in_row} optimizer steps in a row had non-finite gradients (step "
                f"{trainer.global_step}); the weights from before are in {self.checkpoint}"
            )
