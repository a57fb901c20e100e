"""Pure tensor math: PPO/GRPO/DPO losses, advantages, KL estimators and controllers. Torch only."""
