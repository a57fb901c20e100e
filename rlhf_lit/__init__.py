"""rlhf-lit: end-to-end RLHF (SFT -> reward model -> PPO) with PyTorch Lightning.

The core library: pure PPO math (``ppo``), losses, KL controllers, advantage estimators, model and
tokenizer specs, rollout, the CLI, the pipeline, evaluation and the DeepSpeed strategy. It imports
nothing from ``modules`` or ``datamodules``; configs name those by ``class_path``.
"""

__version__ = "0.1.0"
