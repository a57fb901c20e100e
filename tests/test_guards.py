"""Numeric guards: non-finite updates are skipped and counted; a streak stops the run with a checkpoint."""

import pytest
import torch
from helpers import datamodule, snapshot, trainer

from datamodules import SFTDataModule
from modules import SFTModule
from rlhf_lit.hf.models import TinyModel
from rlhf_lit.training.callbacks import NonFiniteError, NonFiniteGuard


def poisoned_module(bad_steps):
    module = SFTModule(
        TinyModel(hidden_size=32, num_layers=1, num_heads=4, ffn_size=64),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
    )
    forward = module.forward

    def maybe_nan(*inputs):
        logits = forward(*inputs)
        return logits * float("nan") if module.trainer.global_step in bad_steps else logits

    module.forward = maybe_nan
    return module


def test_nonfinite_steps_are_skipped_and_counted(tokenizer_dir, tmp_path):
    dm = datamodule(SFTDataModule, tokenizer_dir, n=80)
    module = poisoned_module(bad_steps={1, 2})
    seen = {}
    module.on_train_batch_start = lambda batch, i: seen.__setitem__(module.trainer.global_step, snapshot(module.model))
    t = trainer(tmp_path, max_steps=5)
    t.fit(module, datamodule=dm)
    assert t.global_step == 5
    # the updates of steps 1 and 2 were skipped: weights before step 2 and 3 equal those before step 1
    assert all(torch.equal(seen[1][k], seen[3][k]) for k in seen[1])
    assert not all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0])
    assert t.callback_metrics["train/nonfinite_steps"] == 2
    assert (tmp_path / "logs" / "version_0" / "before-nonfinite.ckpt").exists()


def test_a_streak_stops_the_run_with_a_clear_error(tokenizer_dir, tmp_path):
    dm = datamodule(SFTDataModule, tokenizer_dir, n=80)
    module = poisoned_module(bad_steps=set(range(2, 100)))
    t = trainer(tmp_path, max_steps=20, callbacks=[NonFiniteGuard(max_in_row=3)])
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row .*before-nonfinite\.ckpt"):
        t.fit(module, datamodule=dm)
    ckpt = torch.load(tmp_path / "logs" / "version_0" / "before-nonfinite.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
