"""Lightning's DeepSpeedStrategy, also on DeepSpeed's CPU accelerator (gloo), so ZeRO 1/2/3 and offload
can be exercised on machines without CUDA by the same code path users run on GPUs.

Lightning refuses a non-CUDA accelerator in ``setup_environment``, validates CUDA device indices in
``setup_distributed`` and passes ``device_rank=root_device.index`` (None on CPU) to
``deepspeed.initialize``. This subclass lifts exactly those three points when the accelerator is the
CPU; on GPUs it behaves as Lightning's class. Use ``DS_ACCELERATOR=cpu`` on CPU machines (set here
when no CUDA device is visible, before deepspeed is imported).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from typing import Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

from lightning.fabric.utilities.seed import reset_seed  # noqa: E402
from lightning.pytorch.accelerators import CPUAccelerator  # noqa: E402
from lightning.pytorch.strategies import DeepSpeedStrategy as _LightningDeepSpeed  # noqa: E402
from lightning.pytorch.strategies.ddp import DDPStrategy  # noqa: E402


class DeepSpeedStrategy(_LightningDeepSpeed):
    """Lightning's DeepSpeedStrategy (all its arguments), usable with ``accelerator: cpu`` too."""

    strategy_name = "rlhf_lit_deepspeed"

    @property
    def on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        if not self.on_cpu:
            return super().setup_environment()
        DDPStrategy.setup_environment(self)  # skips only the CUDA-only check; still calls setup_distributed

    def setup_distributed(self) -> None:
        if not self.on_cpu:
            return super().setup_distributed()
        # Lightning validates CUDA device indices here; CPU devices have none.
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _get_process_group_backend(self) -> str:
        return "gloo" if self.on_cpu else super()._get_process_group_backend()

    @property
    def _device_rank(self) -> Optional[int]:
        return self.local_rank if self.on_cpu else self.root_device.index

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        """As Lightning's, with a device rank that exists on CPU (``root_device.index`` is None there)."""
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank),
            config=self.config,
            model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()),
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer

    @contextlib.contextmanager
    def model_sharded_context(self):
        """ZeRO-3: tell transformers too (HfDeepSpeedConfig), so ``from_pretrained``/``from_config``
        inside ``configure_model`` load and initialise partitioned weights instead of touching empty shards."""
        self._init_config_if_needed()
        if self.zero_stage_3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.config)  # a live reference switches it on
        with super().model_sharded_context():
            yield

    def _initialize_deepspeed_inference(self, model) -> None:
        """As Lightning's (validate/test/predict outside fit), with the CPU-safe device rank."""
        if not self.on_cpu:
            return super()._initialize_deepspeed_inference(model)
        import deepspeed
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        config = {"train_micro_batch_size_per_gpu": 1, **{k: self.config[k] for k in ("bf16",) if k in self.config}}
        if self.zero_stage_3:
            config.update({k: self.config[k] for k in ("zero_allow_untested_optimizer", "zero_optimization")})
        remove_module_hooks(model)
        self.model, _, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self._device_rank),
            config=config,
            model=model,
            optimizer=None,
            lr_scheduler=None,
            model_parameters=[],
            dist_init_required=False,
        )
