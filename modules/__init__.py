"""One LightningModule per RLHF stage."""

from modules.dpo import DPOModule
from modules.ppo import PPOModule
from modules.reward import RewardModule
from modules.sft import SFTModule

__all__ = ["SFTModule", "RewardModule", "PPOModule", "DPOModule"]
