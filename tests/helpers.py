"""Builders shared by the module tests: tiny data modules, trainers and exports."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from datamodules import Blend, SourceSpec
from rlhf_lit.hf.tokenizer import HFTokenizer


def blend(n=200, **opts):
    return Blend([SourceSpec("synthetic", options={"n": n, "seed": 0, **opts})], seed=1, eval_fraction=0.1)


def datamodule(cls, tokenizer_dir, n=200, batch_size=8, **kw):
    return cls(blend(n), HFTokenizer(tokenizer_dir), batch_size=batch_size, max_seq_len=64, **kw)


def trainer(tmp_path, max_steps=4, callbacks=(), val=False, **kw):
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(str(tmp_path), name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2 if val else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        callbacks=list(callbacks),
        deterministic=True,
        enable_checkpointing=any(type(c).__name__ == "ModelCheckpoint" for c in callbacks),
        **kw,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict, module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.named_parameters())


def unchanged(before: dict, module: torch.nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in module.named_parameters())


def build_ppo(dm, **kw):
    """A PPOModule with the test defaults (AdamW lr 1e-2, 6 new tokens, no EMA) built on ``dm``'s tokenizer;
    keywords override them (actor, critic, reward, algo, ...)."""
    from modules import PPOModule
    from rlhf_lit.rl.config import PPOConfig
    from rlhf_lit.rl.generation import GenerationConfig

    kw.setdefault("optimizer", lambda p: torch.optim.AdamW(p, lr=1e-2))
    kw.setdefault("generation", GenerationConfig(max_new_tokens=6))
    kw.setdefault("algo", PPOConfig(ema_beta=None))
    module = PPOModule(**kw)
    dm.setup("fit")
    module.tokenizer = dm.tokenizer
    module.configure_model()
    return module
