"""rlhf-lit: end-to-end RLHF (SFT -> reward model -> PPO, DPO, GRPO-style RL) with PyTorch Lightning.

The core library in layers; each imports only from the ones above it in this list (tests/test_layout.py):

- ``errors``: the one-line input error every layer raises;
- ``math``: pure tensor functions and the small objects over them (losses, advantages, KL control);
- ``hf``: Hugging Face adapters (model specs and builders, tokenizers, chat templates, the hub);
- ``rl``: the RL loop without Lightning (generation, reward sources, PPO experience and update);
- ``training``: the Lightning layer (the stage modules' base, callbacks, checkpoint IO, optimizers);
- ``apps``: the applications (the ``rlhf-lit`` CLI, pipelines, studies, evaluation, chat, conversion).

It imports nothing from ``modules`` or ``datamodules``; configs name those by ``class_path``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__version__ = "0.2.0"

# 0.1's flat modules, moved into the layers above in 0.2 (#29). Configs and code that name the old paths
# keep working for this release, with a warning naming the new path.
RENAMED = {
    **{f"rlhf_lit.{m}": f"rlhf_lit.math.{m}" for m in ("ops", "losses", "estimators", "kl_control")},
    "rlhf_lit.dpo": "rlhf_lit.math.preference",
    "rlhf_lit.ppo": "rlhf_lit.math.rl",
    **{f"rlhf_lit.{m}": f"rlhf_lit.hf.{m}" for m in ("models", "tokenizer", "chat_format", "hub")},
    **{f"rlhf_lit.{m}": f"rlhf_lit.rl.{m}" for m in ("generation", "vllm_engine", "rewards")},
    "rlhf_lit.rollout": "rlhf_lit.rl.experience",
    "rlhf_lit.stage": "rlhf_lit.training.stage_module",
    **{
        f"rlhf_lit.{m}": f"rlhf_lit.training.{m}"
        for m in ("callbacks", "checkpoint", "optim", "strategies", "memory", "outputs")
    },
    **{
        f"rlhf_lit.{m}": f"rlhf_lit.apps.{m}"
        for m in ("cli", "pipeline", "experiments", "evaluate", "chat", "convert", "recipes", "plots")
    },
}


class RenamedModuleWarning(UserWarning):
    """An import path of rlhf-lit 0.1 that moved (shown once per path)."""


class _Renamed(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Old module path -> the same module object as the new path (never a second copy: a class imported by
    either path is the same class, so isinstance checks and jsonargparse's class_path agree)."""

    def __init__(self) -> None:
        self.specs: dict = {}

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in RENAMED:
            return None
        # origin: `python -m OLD` (runpy) sets sys.argv[0] and __file__ from it
        return importlib.util.spec_from_loader(
            fullname, self, origin=importlib.util.find_spec(RENAMED[fullname]).origin
        )

    def _target(self, name: str):
        warnings.warn(f"{name} moved to {RENAMED[name]} in rlhf-lit 0.2; update the import or class_path",
                      RenamedModuleWarning, stacklevel=3)  # fmt: skip
        return importlib.import_module(RENAMED[name])

    def create_module(self, spec):
        module = self._target(spec.name)
        self.specs[spec.name] = module.__spec__  # the import system overwrites it with the alias's
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.specs.pop(module.__spec__.name, module.__spec__)

    def get_code(self, fullname):  # `python -m rlhf_lit.cli` (runpy) runs the new module's code
        module = self._target(fullname)
        return module.__spec__.loader.get_code(module.__name__)


if not any(isinstance(f, _Renamed) for f in sys.meta_path):
    sys.meta_path.append(_Renamed())
