"""What the stage modules share: the contract with their datamodule, optimizer + schedule, throughput,
the Hugging Face export and its model card. One copy here instead of one per stage."""

from __future__ import annotations

import contextlib
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import lightning as L
import numpy as np
import torch
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import DeepSpeedStrategy

from rlhf_lit.errors import InputError
from rlhf_lit.hf.models import autocast_dtype, check_frozen_dtype, hold_frozen
from rlhf_lit.rl.update import Ranks
from rlhf_lit.training.memory import release_freed_memory
from rlhf_lit.training.optim import LRSchedule, clip_grad_norms, param_groups, with_fused_kernel


@runtime_checkable
class StageData(Protocol):
    """The one contract between a stage module and its datamodule: what a module may read of it, set by
    the datamodule's ``setup`` (Lightning calls it before the module's). ``datamodules.StageDataModule``
    implements it; any datamodule with these members works with the stage modules."""

    tokenizer: Any
    """the tokenizer every model of the stage is built with"""
    eval_records: list
    """held-out records (``prompt``, ``messages``, ``response`` ...) for generation metrics"""
    eval_batch_size: int
    packed: bool
    """whether training rows hold several examples (block-diagonal masks)"""

    def report(self) -> list[dict]:
        """Per source: rows read, kept and dropped by reason (written into model cards)."""


class StageModule(L.LightningModule):
    """Base LightningModule of a stage. Subclasses build their models in ``configure_model``."""

    stage = "stage"

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        schedule: Optional[LRSchedule] = None,
        weight_decay: float = 0.0,
        frozen_dtype: str = "bfloat16",
    ) -> None:
        super().__init__()
        self.optimizer_factory, self.schedule, self.weight_decay = optimizer, schedule or LRSchedule(), weight_decay
        self.tokenizer = None
        self.frozen_dtype = check_frozen_dtype(frozen_dtype)
        self._rng_to_restore: Optional[dict] = None

    @property
    def data(self) -> StageData:
        """The trainer's datamodule, checked against the :class:`StageData` contract."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if not isinstance(dm, StageData):
            missing = [
                k for k in ("tokenizer", "eval_records", "eval_batch_size", "packed", "report") if not hasattr(dm, k)
            ]
            raise ValueError(
                f"{type(self).__name__} needs a datamodule with {', '.join(missing)} "
                "(rlhf_lit.training.stage_module.StageData)"
            )
        return dm

    def any_rank(self, flag: torch.Tensor) -> bool:
        """Whether ``flag`` holds on any data-parallel rank (every rank gets the same answer)."""
        if self._trainer is not None and self.trainer.world_size > 1:
            flag = self.trainer.strategy.reduce(flag.float(), reduce_op="sum") > 0
        return bool(flag)

    def sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        """Data parallel: whitening statistics of the global batch, not of each rank's shard."""
        if self._trainer is None or self.trainer.world_size == 1:
            return t
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def mean_over_ranks(self, x: torch.Tensor) -> torch.Tensor:
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        return self.trainer.strategy.reduce(x, reduce_op="mean")

    # -- the Lightning internals a stage needs, in one place: neither fact has a public accessor -----------
    @property
    def uses_deepspeed(self) -> bool:
        """Whether a DeepSpeed engine holds the model: it then owns the gradients (clipping them by its
        ``gradient_clipping``) and casts every module it holds to its precision."""
        return self._trainer is not None and isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def gradient_scale(self) -> float:
        """fp16 mixed precision: the loss scale still on the gradients after ``manual_backward`` (else 1)."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return float(scaler.get_scale()) if scaler is not None else 1.0

    def manual_step(self, loss: torch.Tensor, clip: dict) -> dict:
        """One step under manual optimization: backward, each named group ``{name: (params, max_norm)}``
        clipped to its own norm (:func:`clip_grad_norms`; under DeepSpeed the engine clips), the optimizer
        and the schedule. Returns the groups' norms before clipping."""
        opt, sched = self.optimizers(), self.lr_schedulers()
        opt.zero_grad()
        self.manual_backward(loss)
        stats = {} if self.uses_deepspeed else clip_grad_norms(clip, self.gradient_scale())
        opt.step()
        sched.step()
        return stats

    def uncached_autocast(self):
        """The trainer's autocast, when one is on (bf16-mixed, 16-mixed), without its weight cache: each
        layer casts its weight where it runs. The cache keeps every cast weight until the step ends; a
        stage that uses each weight once per forward gains nothing from it. SmolLM2 SFT in bf16 on CPU:
        peak RSS 4,326 -> 4,218 MiB, the step as fast (#30). PPO is left as it was (its rollout runs in
        inference mode, where autocast caches nothing; its training forward was not measured without it)."""
        device, dtype = self.device.type, autocast_dtype(self.device.type)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=dtype, cache_enabled=False)

    def ranks(self) -> Ranks:
        """This run's collectives over data-parallel ranks, for the torch-only update rooms."""
        world = self.trainer.world_size if self._trainer is not None else 1
        return Ranks(self.sum_over_ranks, self.any_rank, self.mean_over_ranks, world)

    def hold_frozen(self, *modules: Optional[torch.nn.Module], dtype: str) -> None:
        """Frozen models (reference, reward, monitor) stored in ``dtype`` (:func:`rlhf_lit.hf.models.hold_frozen`).
        Under DeepSpeed its own precision decides: bf16 there casts every module it holds, frozen ones too."""
        if self.uses_deepspeed:
            return
        # A half-true trainer computes the policy in half: the frozen models then compute in their
        # storage dtype too; fp32 and mixed trainers upcast them layer by layer (#27).
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        compute_held = precision.endswith("-true") and not precision.startswith(("32", "64"))
        for m in modules:
            if m is not None:
                hold_frozen(m, dtype, compute_held=compute_held)

    def setup(self, stage: str) -> None:
        if self.tokenizer is None:
            self.tokenizer = self.data.tokenizer
        if self.tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer: its datamodule set none in setup")

    measure_throughput = True
    """log Lightning's ThroughputMonitor figures (PPO times its generate/score/train phases itself)"""

    def configure_callbacks(self):
        """Every stage skips non-finite updates, and SFT/reward log their throughput with Lightning's
        ThroughputMonitor (train/device/samples_per_sec, train/device/items_per_sec = attended tokens/s,
        rolling over 5 steps, from the 5th step, on logging steps only). It replaced a hand-written meter
        at no measured cost: 150 tiny SFT steps took 3.94-4.01 s with it and 4.26-4.56 s with the old
        meter, one thread. A trainer-level callback of either kind wins."""
        from lightning.pytorch.callbacks import ThroughputMonitor

        from rlhf_lit.training.callbacks import NonFiniteGuard

        out = []
        if not any(isinstance(c, NonFiniteGuard) for c in self.trainer.callbacks):
            out.append(NonFiniteGuard())
        if self.measure_throughput and not any(isinstance(c, ThroughputMonitor) for c in self.trainer.callbacks):
            out.append(ThroughputMonitor(batch_size_fn=self.batch_size, length_fn=self.batch_tokens, window_size=5))
        return out

    frozen: tuple[str, ...] = ()
    """attributes holding frozen models (reference, reward model ...): they stay in eval mode (no dropout)
    whatever mode the module is put in"""

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            if getattr(self, name, None) is not None:
                getattr(self, name).eval()
        return self

    def checkpointed_parts(self) -> dict:
        """Objects with ``state_dict``/``load_state_dict`` saved into checkpoints and restored on resume, by
        checkpoint key (PPO: its KL controller)."""
        return {}

    def trainable_groups(self) -> list[dict]:
        """Parameter groups for the optimizer (PPO overrides this for actor + critic)."""
        return param_groups(self, self.weight_decay)

    steps_per_batch: int = 1
    """optimizer steps each training batch makes (PPO: its epochs times its minibatches)"""

    def optimizer_steps(self) -> int:
        """How many optimizer steps the schedule spans. Under manual optimization Lightning counts each
        ``opt.step()`` as a global step (so max_steps counts them) but estimates the total from batches."""
        if self.automatic_optimization:
            return int(self.trainer.estimated_stepping_batches)
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches) * self.steps_per_batch

    @staticmethod
    def refuse_reference_with_lora(lora, reference, model: str) -> None:
        """With LoRA the reference is ``model`` with its adapters disabled: an explicit reference spec would be
        ignored, so the pair is refused (as TRL does), naming the key."""
        if lora is not None and reference is not None:
            raise InputError(
                f"model.init_args.reference: with lora the reference is the {model} with its adapters disabled; "
                "remove reference, or lora to train against another reference"
            )

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_groups())
        bad = [g["lr"] for g in opt.param_groups if not g.get("lr", 1.0) > 0]
        if bad:  # an lr of 0 trained nothing without a word (#28)
            raise InputError(f"model.init_args.optimizer: the learning rate must be > 0, got {bad[0]}")
        if not isinstance(self.trainer.strategy, DeepSpeedStrategy):  # DeepSpeed owns and wraps its optimizer
            opt = with_fused_kernel(opt)
        total = max(1, self.optimizer_steps())
        sched = self.schedule.build(opt, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def logging_step(self) -> bool:
        """Whether the logger writes this step (every ``log_every_n_steps``). Each ``self.log`` costs
        0.3-1 ms whether written or not, so per-step metrics beyond the loss are logged on these steps only."""
        connector = getattr(self._trainer, "_logger_connector", None) if self._trainer is not None else None
        return bool(getattr(connector, "should_update_logs", True))

    def batch_size(self, batch) -> int:
        """Samples in a training batch, for Lightning's ThroughputMonitor (the reward stage counts pairs)."""
        return batch["input_ids"].size(0)

    @staticmethod
    def batch_tokens(batch) -> int:
        """Attended tokens of a training batch (padding excluded), ThroughputMonitor's items."""
        return int(batch["attention_mask"].sum())

    # -- resume: RNG states travel with the checkpoint (PPO samples, dropout), so a resumed run continues
    # with the random numbers an uninterrupted one would have drawn.
    # Stored as tensors, lists and numbers only, so checkpoints load with torch.load(weights_only=True).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Hyperparameters given as objects (not through the CLI, whose config dicts are kept) are
        # recorded by their repr: a checkpoint must never need unpickling arbitrary classes.
        if "hyper_parameters" in checkpoint:
            checkpoint["hyper_parameters"] = {
                k: v if _plain(v) else repr(v) for k, v in checkpoint["hyper_parameters"].items()
            }
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "python": list(random.getstate()[1]),
            "python_gauss": random.getstate()[2],
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        }
        if torch.cuda.is_available():  # GPU sampling and dropout draw from the CUDA generators
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint.update({key: part.state_dict() for key, part in self.checkpointed_parts().items()})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Applied in on_train_start: building models after the restore (configure_model) draws random
        # numbers, which would otherwise shift the stream the resumed run continues with.
        self._rng_to_restore = checkpoint.get("rng_states")
        for key, part in self.checkpointed_parts().items():
            if key in checkpoint:
                part.load_state_dict(checkpoint[key])

    def on_train_start(self) -> None:
        # freed tensors go back to the system, for runs that trade speed for memory (gradient checkpointing):
        # ~30% lower peak RSS there (#18), at a price in page faults not worth paying otherwise (#19). After
        # configure_model, which builds the models.
        checkpointing = any(getattr(m, "is_gradient_checkpointing", False) for m in self.modules())
        release_freed_memory(checkpointing=checkpointing)
        states, self._rng_to_restore = self._rng_to_restore, None
        if states:
            torch.set_rng_state(states["torch"])
            random.setstate((3, tuple(states["python"]), states["python_gauss"]))
            name, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(states["cuda"])

    # -- export ---------------------------------------------------------------------------------
    def export_models(self) -> dict[str, Callable[[Path], None]]:
        """Subfolder name ('' for the root) -> a function that saves that model there."""
        raise NotImplementedError

    def export_tokenizer(self):
        """The tokenizer saved with the exports (the stage's own)."""
        return self.tokenizer

    def export(self, dirpath: str | Path, data: Optional[Iterable[dict]] = None) -> Path:
        """Save every exported model in Hugging Face format (safetensors), the tokenizer and a model card."""
        dirpath = Path(dirpath)
        metrics = {k: round(float(v), 6) for k, v in self.trainer.callback_metrics.items()} if self._trainer else {}
        for sub, save in self.export_models().items():
            out = dirpath / sub
            out.mkdir(parents=True, exist_ok=True)
            save(out)
            self.export_tokenizer().save_pretrained(out)
            write_model_card(out, self.stage + (f" ({sub})" if sub else ""), metrics, list(data or []))
        return dirpath


def _plain(value) -> bool:
    """Whether ``value`` is built from types ``torch.load(weights_only=True)`` accepts."""
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def write_model_card(out: Path, stage: str, metrics: dict, data: list[dict]) -> None:
    lines = [f"# rlhf-lit export: {stage}", "", "Written by rlhf-lit at the end of fit.", "", "## Data", ""]
    lines += [
        f"- {d.get('source')}: {d.get('kept')} records kept of {d.get('rows')} rows, dropped {d.get('dropped')}, "
        f"parts {d.get('parts')}"
        for d in data
    ] or ["- (not recorded)"]
    lines += ["", "## Final metrics", "", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```", ""]
    (out / "README.md").write_text("\n".join(lines))
